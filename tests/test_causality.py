"""Causality: no output at a position depends on anything after it (queries, keys, values,
gates), for the shipped causal patterns and both selection modes, through the kernels
(Triton's interpreter, float32) and the dense reference (float64).

A selection shared per query block once summed the scores of all the block's queries, so
that later tokens moved earlier outputs: `per=block` failed this test before its queries
took the choice of the block's first query.
"""

from __future__ import annotations

import pytest
import torch

import sparsedsl
from sparsedsl.frontend.resources import shipped_pattern_path

SMALL_NSA = dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=4, window=24, pool="mean")  # one free choice
CASES = {
    # name: (shipped pattern, parameters)
    "causal": ("causal", {}),
    "sliding_window": ("sliding_window", dict(window=20)),
    "streaming": ("streaming", {}),
    "moba": ("moba", dict(block=16, topk=2)),
    "nsa-per-token": ("nsa", SMALL_NSA),
    "nsa-per-block": ("nsa", SMALL_NSA | dict(per="block")),
}
L, LAST_KEPT = 128, 100  # positions after 100 change; 100 sits inside a block of 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["kernels", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_outputs_do_not_depend_on_later_positions(case, dtype):
    name, params = CASES[case]
    pattern = sparsedsl.load(shipped_pattern_path(name)).with_params(**params)
    generator = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D = 1, 4, 2, 16
    inputs = {
        "q": torch.randn(B, Hq, L, D, generator=generator),
        "k": torch.randn(B, Hkv, L, D, generator=generator),
        "v": torch.randn(B, Hkv, L, D, generator=generator),
    }
    if pattern.checked.gated:
        inputs["gates"] = torch.rand(B, Hq, L, len(pattern.ir.output_branches), generator=generator)
    changed = {key: value.clone() for key, value in inputs.items()}
    for value in changed.values():
        value[:, :, LAST_KEPT + 1 :] = torch.randn(value[:, :, LAST_KEPT + 1 :].shape, generator=generator)

    def run(tensors):
        named = {key: value.to(dtype) for key, value in tensors.items()}
        return pattern(named.pop("q"), named.pop("k"), named.pop("v"), **named)

    before, after = run(inputs), run(changed)
    torch.testing.assert_close(after[:, :, : LAST_KEPT + 1], before[:, :, : LAST_KEPT + 1], rtol=0, atol=1e-6)
    assert (after[:, :, LAST_KEPT + 1 :] - before[:, :, LAST_KEPT + 1 :]).abs().max() > 1e-2  # the change reached
