"""Generation with a pattern: a layer's :class:`KVCache` (``kvcache``), attention of new
tokens against it (``generation``: prefill and decode, what ``Pattern.prefill`` and
``Pattern.decode`` call) and the launchers of the flash-decoding kernels (``decoding``)."""
