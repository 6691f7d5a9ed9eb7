"""Learned pooling under context parallelism: a pooled window may cross the ranks'
boundary, so a call takes the pooling functions themselves (``k_cmp=``/``v_cmp=``, such as
``sparsedsl.nn.CompressionMLP``), and each chunk's call is given the keys they pool from
the keys it gathered or fetched."""

from __future__ import annotations

from typing import Callable

import torch

from ..runtime.inputs import learned_pooling_by_branch


def learned_poolers(pattern, k_cmp, v_cmp) -> dict:
    """{branch: (pool keys, pool values)} of the learned compress branches, from ``k_cmp``/
    ``v_cmp`` given as functions from (B, Hkv, L, D) raw keys or values to (B, Hkv, count(L),
    D) pooled ones (or dicts of them by branch); an InputError where they are tensors."""
    how = ("with `cp_group` a pooled window may cross the ranks' boundary, so pass k_cmp= and v_cmp= as functions "
           "that pool raw keys and values, (B, Hkv, L, D) to (B, Hkv, pooled count, D), such as "
           "sparsedsl.nn.CompressionMLP")  # fmt: skip
    return learned_pooling_by_branch(f"pattern `{pattern.name}` with `cp_group`", pattern.ir, k_cmp, v_cmp, callable, how, how)


def pooled_call(
    poolers: dict, kv: dict, keys: torch.Tensor, values: torch.Tensor, pad: Callable = lambda t: t
) -> dict:  # fmt: skip
    """The ``k_cmp=``/``v_cmp=`` keywords of a chunk's call: each learned branch pools its
    own keys and values where ``kv`` holds them (popped: they are not passed as
    ``branch_kv``), else the shared ``keys``/``values``, laid out by ``pad``."""
    if not poolers:
        return {}
    own = {name: kv.pop(name, (keys, values)) for name in poolers}
    return {
        "k_cmp": {name: pool_k(pad(own[name][0])) for name, (pool_k, _) in poolers.items()},
        "v_cmp": {name: pool_v(pad(own[name][1])) for name, (_, pool_v) in poolers.items()},
    }
