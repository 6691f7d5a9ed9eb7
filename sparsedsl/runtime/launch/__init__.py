"""Launchers of the generated training kernels, one module per kind of branch: ``static``
(mask branches and attention over pooled keys: forward, dK/dV, dQ), ``selection``
(scores, top-k and selected attention), ``pooling`` (mean and max pooling) and ``gating``
(the gate mix); ``common`` holds what they share. :mod:`..ops` wraps them as operators."""
