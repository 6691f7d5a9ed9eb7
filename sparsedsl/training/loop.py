"""Training one model on one objective, and going on with a run that was stopped.

:func:`train` runs AdamW with linear warmup and cosine decay, bf16 autocast on a GPU,
gradient clipping at 1, evaluating every ``eval_every`` steps on held-out data. With a
``time_limit`` it stops when the time is up and returns the whole state (model,
optimizer, schedule, both data generators, log) to save; ``resume`` goes on from such a
state with the same data and schedule as one uninterrupted run.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable

import torch
import torch.nn.functional as F

from ..pattern import Pattern
from .models import Decoder, ModelSpec
from .objectives import HELD_OUT_SEED, solved


@dataclass(frozen=True)
class TrainConfig:
    """How to train: steps, batch, optimizer, evaluation, and the curriculum: phases
    ``(steps, {field: value})`` trained, in order, on the objective with those fields
    changed (``{"seq": 128}``, ``{"seq": 1024, "pairs": 16}``) before the objective
    itself takes the rest of ``steps``."""

    steps: int = 1000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 500
    eval_batches: int = 4
    curriculum: tuple[tuple[int, dict], ...] = ()
    device: str = "cpu"

    def phases(self, objective) -> list[tuple[object, int]]:
        """(objective, steps) of every phase, the final one ``objective`` itself."""
        rest = self.steps - sum(steps for steps, _ in self.curriculum)
        if rest <= 0:
            raise ValueError(f"steps={self.steps} leaves no step for the final phase after the curriculum {self.curriculum}")
        return [*((replace(objective, **fields), steps) for steps, fields in self.curriculum), (objective, rest)]


@dataclass
class Run:
    """A run so far: its log (JSON-ready) and, when stopped by a time limit, the state to
    resume from (``state`` is None once the run is complete)."""

    log: dict
    state: dict | None = None
    model: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        return self.state is None


def train(
    spec: ModelSpec,
    objective,
    config: TrainConfig,
    *,
    time_limit: float | None = None,
    resume: dict | None = None,
    prepare: Callable[[Decoder], None] | None = None,
    on_eval: Callable[[dict, Decoder], None] | None = None,
) -> Run:
    """Train a model of ``spec`` on ``objective``; see the module docstring. ``prepare``
    may change the new model before training (freeze parameters: only those that require
    a gradient are optimized); ``on_eval`` receives every evaluation's record (step,
    length, metrics, seconds so far) and the model, to add what it measures to the record."""
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = Decoder(spec).to(device)
    if prepare is not None:
        prepare(model)
    if objective.uses_documents and not model.keeps_documents_apart:
        raise ValueError(
            f"the {objective.name} task packs files into rows with document ids: use a pattern with `document` "
            f"(e.g. nsa_packed, document) or dense attention, not {spec.label}"
        )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    warmup = max(1, config.warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / config.steps)))
    )
    data = torch.Generator().manual_seed(config.seed)
    held_out = torch.Generator().manual_seed(HELD_OUT_SEED + config.seed)
    phases = config.phases(objective)
    log = {
        "model": {**{f.name: getattr(spec, f.name) for f in fields(spec)}, "attention": _attention_name(spec), "label": spec.label},
        "task": objective.name, "metric": objective.metric, "config": asdict(config),
        "phases": [{"steps": steps, "seq": task.seq} for task, steps in phases],
        "step": [], "loss": [], "evals": [], "seconds": 0.0, "step_seconds": [],
    }  # fmt: skip
    first = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        data.set_state(resume["data"])
        held_out.set_state(resume["held_out"])
        log, first = resume["log"], resume["step"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    ends = [sum(steps for _, steps in phases[: n + 1]) for n in range(len(phases))]

    def evaluate(task) -> dict:
        model.eval()
        with autocast:
            metrics = task.evaluate(model, config.batch, config.eval_batches, held_out, device)
        model.train()
        return metrics

    for step in range(first, config.steps):
        if time_limit is not None and time.perf_counter() - started > time_limit:
            log["seconds"] += time.perf_counter() - started
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "data": data.get_state(), "held_out": held_out.get_state(), "log": log, "step": step}  # fmt: skip
            return Run(log, state, model)
        task = next(task for (task, _), end in zip(phases, ends) if step < end)
        tick = time.perf_counter()
        batch = task.batch(config.batch, data).to(device)
        with autocast:
            logits = model(batch.tokens, batch.doc_ids, batch.scored)
        loss = F.cross_entropy(logits.float(), batch.targets[batch.scored])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        log["step"].append(step)
        log["loss"].append(loss.item())  # .item() waits for the step: the time below is the step's
        log["step_seconds"].append(time.perf_counter() - tick)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            record = {"step": step + 1, "seq": task.seq, **evaluate(task), "seconds": log["seconds"] + time.perf_counter() - started}
            if on_eval is not None:
                on_eval(record, model)
            log["evals"].append(record)
    log["seconds"] += time.perf_counter() - started
    log["final"] = log["evals"][-1][objective.metric]
    log["solved"] = solved(objective, log["final"])
    # Skip the first steps: they compile and tune kernels.
    timed = log["step_seconds"][min(10, len(log["step_seconds"]) // 2) :]
    log["step_ms"] = 1000 * statistics.median(timed) if timed else None
    log["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Run(log, None, model)


def _attention_name(spec: ModelSpec) -> str:
    return spec.attention.name if isinstance(spec.attention, Pattern) else str(spec.attention)
