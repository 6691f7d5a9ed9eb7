"""sparsedsl: a compiler for sparse attention patterns.

Write which keys each query may see in a small ``.attn`` file; sparsedsl parses it,
checks it, lowers it to a block-level IR and runs it. Importing this package lets
``.attn`` files be imported as modules (``from sparsedsl.patterns.nsa import nsa``).
"""

__version__ = "0.1.0"  # first: the modules below read it

from .compiler import compile_source, load
from .errors import InputError, PatternError
from .integrations import importer as _importer
from .pattern import Pattern
from .serving.kvcache import KVCache
from .serving.pages import PagePool

__all__ = ["KVCache", "PagePool", "Pattern", "PatternError", "InputError", "compile_source", "load", "__version__"]

_importer.install()
