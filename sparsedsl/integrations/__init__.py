"""Adapters that run sparsedsl patterns inside other libraries.

Each adapter is its own module and imports its library only when used, so that
``import sparsedsl`` never needs them:

- :mod:`sparsedsl.integrations.transformers`: a Hugging Face ``transformers`` attention
  implementation (``register(pattern, name)``, then ``attn_implementation=name``).
"""
