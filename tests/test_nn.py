"""The layers: SparseAttention around any pattern, NativeSparseAttention, trainable."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsedsl import InputError
from sparsedsl.nn import NativeSparseAttention, SparseAttention

SMALL_NSA = dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=3, window=16)


def test_native_sparse_attention_kernels_match_the_reference_and_train():
    torch.manual_seed(0)
    layer = NativeSparseAttention(32, num_heads=4, num_kv_heads=2, head_dim=16, **SMALL_NSA)
    assert set(layer.compress_k) == {"cmp"} and layer.gate_proj.out_features == 4 * 3
    hidden = torch.randn(2, 40, 32, requires_grad=True)
    out = layer(hidden)  # float32 on the CPU: the generated kernels, interpreted
    assert out.shape == hidden.shape
    out.square().sum().backward()
    # (the MLPs start at zero output, so their first layers get gradients from the second step)
    for name in ("q_proj.weight", "compress_k.cmp.mlp.2.weight", "compress_v.cmp.mlp.2.bias", "gate_proj.bias"):
        assert layer.get_parameter(name).grad is not None and layer.get_parameter(name).grad.abs().sum() > 0, name

    exact = copy.deepcopy(layer).double()  # float64 runs the dense reference
    for p in exact.parameters():
        p.grad = None
    hidden64 = hidden.detach().double().requires_grad_()
    out64 = exact(hidden64)
    assert (out.double() - out64).abs().max() < 1e-4
    out64.square().sum().backward()
    for (name, p), p64 in zip(layer.named_parameters(), exact.parameters()):
        scale = max(1.0, p64.grad.abs().max().item())
        assert (p.grad.double() - p64.grad).abs().max() / scale < 1e-3, name


def test_sparse_attention_wraps_any_pattern():
    layer = SparseAttention("streaming", 24, num_heads=2, rope=False, sinks=2, window=8)
    assert layer.gate_proj is None and not len(layer.compress_k)
    assert layer(torch.randn(1, 20, 24)).shape == (1, 20, 24)
    documents = SparseAttention("document", 24, num_heads=2)
    out = documents(torch.randn(1, 20, 24), cu_seqlens=torch.tensor([0, 12, 20]))
    assert out.shape == (1, 20, 24)


def test_layer_errors_name_the_argument():
    with pytest.raises(InputError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        SparseAttention("causal", 24, num_heads=6, num_kv_heads=4)
    with pytest.raises(InputError, match=r"`hidden` must be \(batch, length, hidden_size\), got shape \(20, 24\)"):
        SparseAttention("causal", 24, num_heads=2)(torch.randn(20, 24))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_heads=0), "`num_heads` must be a positive integer, got 0"),  # ZeroDivisionError
        (dict(num_heads=2, num_kv_heads=-1), "`num_kv_heads` must be a positive integer, got -1"),
        (dict(num_heads=2, head_dim=0), "`head_dim` must be a positive integer, got 0"),
        (dict(hidden_size=24.0, num_heads=2), "`hidden_size` must be a positive integer, got 24.0"),
        # 30 // 4 = 7 would have silently dropped two of the 30 features
        (dict(hidden_size=30, num_heads=4), "hidden_size 30 is not a multiple of num_heads 4; pass head_dim= explicitly (e.g. head_dim=7)"),
    ],
)
def test_layer_sizes_are_checked(kwargs, message):
    arguments = {"hidden_size": 24, **kwargs}
    with pytest.raises(InputError) as info:
        SparseAttention("causal", arguments.pop("hidden_size"), **arguments)
    assert str(info.value) == f"SparseAttention: {message}"
    assert SparseAttention("causal", 30, num_heads=4, head_dim=8).head_dim == 8  # explicit: fine


@pytest.mark.parametrize(
    "hidden, message",
    [
        (torch.randn(1, 8, 23), "`hidden` must be (batch, length, hidden_size 24), got shape (1, 8, 23)"),
        (torch.randn(1, 8, 24, dtype=torch.float64), "`hidden` is torch.float64 but the layer's weights are torch.float32; convert one of them (hidden.to(torch.float32) or layer.to(torch.float64))"),
        (torch.ones(1, 8, 24, dtype=torch.long), "`hidden` must be floating-point hidden states (token ids go through an embedding first), got torch.int64"),
    ],
)
def test_hidden_states_are_checked_before_the_projections(hidden, message):
    with pytest.raises(InputError) as info:  # they reached nn.Linear (a RuntimeError) before
        SparseAttention("causal", 24, num_heads=2)(hidden)
    assert str(info.value) == f"SparseAttention: {message}"


def test_packed_native_sparse_attention_pools_each_document_alone():
    """A packed row through the layer (kernels) equals each document through it on its
    own (float64: the dense reference)."""
    torch.manual_seed(0)
    layer = NativeSparseAttention(32, num_heads=4, num_kv_heads=2, head_dim=16, packed=True, **SMALL_NSA)
    for module in (*layer.compress_k.values(), *layer.compress_v.values()):
        torch.nn.init.normal_(module.mlp[2].weight, std=0.1)  # make the learned pooling matter
    alone = NativeSparseAttention(32, num_heads=4, num_kv_heads=2, head_dim=16, **SMALL_NSA)
    alone.load_state_dict(layer.state_dict())
    alone.double()
    hidden = torch.randn(1, 60, 32)
    out = layer(hidden, cu_seqlens=torch.tensor([0, 21, 60]))
    for start, end in ((0, 21), (21, 60)):
        assert (out[:, start:end] - alone(hidden[:, start:end].double())).abs().max() < 1e-4
