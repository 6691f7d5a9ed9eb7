"""Tools around the compiler, for people exploring patterns: ``explore`` (grids of
variants: costs, deviation, GPU timings, training quality), the analytic ``costs`` and GPU
``measure``-ments it reports, ``mask_stats`` and ``mask_plot`` (``sparsedsl mask``), the
``demo``, ``settings`` (``--set NAME=VALUE`` values) and ``timing`` (CUDA-graph timers).
Nothing in the compiler or the runtime imports them."""
