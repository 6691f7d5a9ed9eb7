"""Several seeds of one model trained as one batched model.

A small model leaves a GPU idle between launches, so training S seeds one after
another costs S times the launches for little more arithmetic. :func:`stack` makes one
module out of S models of the same architecture: every parameter becomes the S models'
parameters stacked along a new first dimension, and every layer that holds parameters
reads the batch of its input as S equal parts, part ``s`` through seed ``s``'s weights.
Layers without parameters (attention, activations, rotary positions) need nothing:
rows of a batch never meet there. One forward and backward of the stack on the S
seeds' batches concatenated is therefore S independent forward and backward passes,
in one sequence of launches; AdamW works element by element, so one optimizer over the
stacked parameters is S optimizers.

A stacked layer keeps the parameter names of the layer it replaces, so seed ``s`` of a
stack is ``{name: tensor[s]}`` of its state dict (:func:`member_state`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Addend


class _Stacked(nn.Module):
    """A layer of S seeds: parameters (S, ...) named as the original layer's."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.seeds = len(layers)
        for name, first in layers[0]._parameters.items():
            if first is None:  # Linear(bias=False), LayerNorm(bias=False)
                self.register_parameter(name, None)
                continue
            if any(getattr(layer, name).requires_grad != first.requires_grad for layer in layers):
                raise ValueError(f"cannot stack `{name}`: it is frozen in some seeds and trained in others")
            stacked = torch.stack([getattr(layer, name).detach() for layer in layers])
            self.register_parameter(name, nn.Parameter(stacked, requires_grad=first.requires_grad))

    def _parts(self, x: torch.Tensor, features: int) -> torch.Tensor:
        """(S * B, ..., features) as (S, B * ..., features): seed s's rows are the s-th part."""
        if x.shape[0] % self.seeds:
            raise ValueError(f"a stack of {self.seeds} seeds got a batch of {x.shape[0]} rows: pass S equal parts")
        return x.reshape(self.seeds, -1, features)


class StackedLinear(_Stacked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._parts(x, self.weight.shape[-1])
        weight = self.weight.transpose(1, 2)  # (S, in, out)
        y = torch.bmm(parts, weight) if self.bias is None else torch.baddbmm(self.bias[:, None], parts, weight)
        return y.reshape(*x.shape[:-1], -1)


class StackedLayerNorm(_Stacked):
    def __init__(self, layers: list[nn.LayerNorm]) -> None:
        super().__init__(layers)
        self.normalized_shape, self.eps = layers[0].normalized_shape, layers[0].eps
        if len(self.normalized_shape) != 1 or not layers[0].elementwise_affine:
            raise ValueError("only LayerNorm over the last dimension with weight and bias can be stacked")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        parts = self._parts(y, y.shape[-1])
        bias = self.bias[:, None] if self.bias is not None else 0
        return (parts * self.weight[:, None] + bias).reshape(y.shape)


class StackedEmbedding(_Stacked):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        S, vocab, width = self.weight.shape
        rows = tokens.shape[0]
        if rows % S:
            raise ValueError(f"a stack of {S} seeds got a batch of {rows} rows: pass S equal parts")
        seed = torch.arange(S, device=tokens.device).repeat_interleave(rows // S)
        offsets = (seed * vocab).view(rows, *([1] * (tokens.dim() - 1)))
        return F.embedding(tokens + offsets, self.weight.reshape(S * vocab, width))


class StackedAddend(_Stacked):
    """:class:`Addend` of S seeds: its leading input dimension is S parts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = self.weight.shape[0]
        if x.shape[0] % S:
            raise ValueError(f"a stack of {S} seeds got a batch of {x.shape[0]} rows: pass S equal parts")
        parts = x.reshape(S, -1, *self.weight.shape[1:])
        return (parts + self.weight[:, None]).reshape(x.shape)


STACKED = {nn.Linear: StackedLinear, nn.LayerNorm: StackedLayerNorm, nn.Embedding: StackedEmbedding, Addend: StackedAddend}


def stack(models: list[nn.Module]) -> nn.Module:
    """One module computing every model of ``models`` (same architecture, any weights) on
    its own part of the batch: input rows ``[s * B, (s + 1) * B)`` go through
    ``models[s]``. Raises ``ValueError`` for a layer with parameters it cannot stack."""
    if not models:
        raise ValueError("stack() needs at least one model")
    stacked = copy.deepcopy(models[0])
    named = [dict(model.named_modules()) for model in models]
    for name, module in list(stacked.named_modules()):
        kind = STACKED.get(type(module))
        if kind is not None:
            _replace(stacked, name, kind([modules[name] for modules in named]))
        elif any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"cannot stack `{name or 'the model'}` ({type(module).__name__}): its parameters are not in a stackable layer")
    return stacked


def member_state(stacked: nn.Module, seed_index: int) -> dict[str, torch.Tensor]:
    """The state dict of model ``seed_index`` of a :func:`stack`."""
    return {name: tensor[seed_index] for name, tensor in stacked.state_dict().items()}


def clip_grad_norm_per_seed_(parameters: list[nn.Parameter], max_norm: float, seeds: int) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` applied to each seed of stacked parameters on its
    own (the norm of one seed's gradient never scales another's); returns the S norms."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(seeds)
    norms = torch.stack([g.reshape(seeds, -1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype).view(seeds, *([1] * (g.dim() - 1))))
    return norms


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
