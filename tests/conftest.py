"""Test-wide settings: the generated kernels run on Triton's CPU interpreter, write into a
private cache, and start from NaN-filled outputs so that an unwritten element fails."""

import os
import tempfile

os.environ["TRITON_INTERPRET"] = "1"
os.environ["SPARSEDSL_POISON_OUTPUTS"] = "1"
os.environ.setdefault("SPARSEDSL_CACHE_DIR", tempfile.mkdtemp(prefix="sparsedsl-test-cache-"))


import shutil
import subprocess

import pytest


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty folder no file can be created in: mode 0o555, and for root (who ignores
    modes) the immutable attribute where `chattr` can set it; skipped where neither works."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if _writable(folder) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        if _writable(folder):
            pytest.skip("cannot make a folder read-only here (root without chattr)")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def _writable(folder) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_text("")
    except OSError:
        return False
    probe.unlink()
    return True
