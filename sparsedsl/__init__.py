"""sparsedsl: a compiler for sparse attention patterns.

Write which keys each query may see in a small ``.attn`` file; sparsedsl parses it,
checks it, lowers it to a block-level IR and runs it. Importing this package lets
``.attn`` files be imported as modules (``from sparsedsl.patterns.nsa import nsa``).
"""

from . import importer as _importer
from .errors import InputError, PatternError
from .loading import compile_source, load
from .pattern import Pattern
from .runtime.kvcache import KVCache
from .version import __version__

__all__ = ["KVCache", "Pattern", "PatternError", "InputError", "compile_source", "load", "__version__"]

_importer.install()
