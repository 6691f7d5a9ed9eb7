"""Test-wide settings: the generated kernels run on Triton's CPU interpreter, write into a
private cache, and start from NaN-filled outputs so that an unwritten element fails."""

import os
import tempfile

os.environ["TRITON_INTERPRET"] = "1"
os.environ["SPARSEDSL_POISON_OUTPUTS"] = "1"
os.environ.setdefault("SPARSEDSL_CACHE_DIR", tempfile.mkdtemp(prefix="sparsedsl-test-cache-"))
