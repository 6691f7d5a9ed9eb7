"""Training a model on an objective over one or several seeds, and going on with a run
that was stopped.

:func:`train_seeds` trains one model per seed, all of them together as one stacked
model (:mod:`.stacking`: one sequence of launches per step for every seed, each seed
with its own initialisation, data, gradient clipping and log, exactly as if it had been
trained alone). :func:`train` is the one-seed case. Both run AdamW with linear warmup
and cosine decay, bf16 autocast on a GPU, gradient clipping at 1, evaluating every
``eval_every`` steps on held-out data. With a ``time_limit`` they stop when the time is
up and return the whole state (model, optimizer, schedule, data generators, logs) to
save; ``resume`` goes on from such a state with the same data and schedule as one
uninterrupted run.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..pattern import Pattern
from .models import Decoder, ModelSpec
from .objectives import HELD_OUT_SEED, solved
from .stacking import clip_grad_norm_per_seed_, member_state, stack
from .tasks import IGNORE, Batch


@dataclass(frozen=True)
class TrainConfig:
    """How to train: steps, batch, optimizer, evaluation, and the curriculum: phases
    ``(steps, {field: value})`` trained, in order, on the objective with those fields
    changed (``{"seq": 128}``, ``{"seq": 1024, "pairs": 16}``) before the objective
    itself takes the rest of ``steps``. A phase's ``"batch"`` is its batch size instead
    of ``batch`` (long phases take fewer rows per step); the final phase takes ``batch``."""

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

    def phases(self, objective) -> list[Phase]:
        """Every phase in order, the final one ``objective`` itself at ``batch``."""
        rest = self.steps - sum(steps for steps, _ in self.curriculum)
        if rest <= 0:
            raise ValueError(f"steps={self.steps} leaves no step for the final phase after the curriculum {self.curriculum}")
        phases = []
        for steps, given in self.curriculum:
            changes = {name: value for name, value in given.items() if name != "batch"}
            batch = given.get("batch", self.batch)
            if not isinstance(batch, int) or batch < 1:
                raise ValueError(f"curriculum phase {given}: batch is {batch!r}; it must be a positive integer")
            phases.append(Phase(replace(objective, **changes), steps, batch))
        return [*phases, Phase(objective, rest, self.batch)]


@dataclass(frozen=True)
class Phase:
    """Part of a run: ``steps`` steps of ``task`` at ``batch`` rows per step and seed."""

    task: object
    steps: int
    batch: int


@dataclass
class Run:
    """One seed's run so far: its log (JSON-ready) and, when stopped by a time limit, the
    state to resume from (``state`` is None once the run is complete)."""

    log: dict
    state: dict | None = None
    model: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        return self.state is None


@dataclass
class Runs:
    """Seeds trained together: one log and one final model per seed, in the order of the
    seeds, and, when stopped by a time limit, their one state to resume from."""

    logs: list[dict]
    state: dict | None = None
    models: list[torch.nn.Module] = field(default_factory=list, repr=False)

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
    """Train a model of ``spec`` on ``objective`` from seed ``config.seed``; see
    :func:`train_seeds`."""
    runs = train_seeds(spec, objective, config, [config.seed], time_limit=time_limit, resume=resume, prepare=prepare,
                       on_eval=on_eval)  # fmt: skip
    return Run(runs.logs[0], runs.state, runs.models[0] if runs.models else None)


def train_seeds(
    spec: ModelSpec,
    objective,
    config: TrainConfig,
    seeds: Sequence[int],
    *,
    time_limit: float | None = None,
    resume: dict | None = None,
    prepare: Callable[[Decoder], None] | None = None,
    on_eval: Callable[[dict, Decoder], None] | None = None,
) -> Runs:
    """Train one model of ``spec`` on ``objective`` per seed of ``seeds``, all in one
    stacked model (``config.seed`` is ignored; each seed's log records its own).

    Seed ``s`` starts from ``torch.manual_seed(s)``'s initialisation and draws its training
    and held-out data from generators of its own, so its run is the run it would be alone.
    ``prepare`` may change each new model before training (freeze parameters: only those
    that require a gradient are optimized; every seed must freeze the same ones);
    ``on_eval`` receives every evaluation's record (step, length, metrics, seconds so far)
    and that seed's model, to add what it measures to the record.
    """
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds}: give at least one seed, each once")
    device = torch.device(config.device)
    members = []
    for seed in seeds:
        torch.manual_seed(seed)
        member = Decoder(spec)
        if prepare is not None:
            prepare(member)
        members.append(member)
    if objective.uses_documents and not members[0].keeps_documents_apart:
        raise ValueError(
            f"the {objective.name} task packs files into rows with document ids: use a pattern with `document` "
            f"(e.g. nsa_packed, document) or dense attention, not {spec.label}"
        )
    model = stack(members).to(device)
    evaluator = copy.deepcopy(members[0]).to(device)  # takes each seed's weights in turn
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    warmup = max(1, config.warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / config.steps)))
    )
    data = [torch.Generator().manual_seed(seed) for seed in seeds]
    held_out = [torch.Generator().manual_seed(HELD_OUT_SEED + seed) for seed in seeds]
    phases = config.phases(objective)
    logs = [_new_log(spec, objective, replace(config, seed=seed), phases, len(seeds)) for seed in seeds]
    first = 0
    if resume is not None:
        if resume.get("seeds") != seeds:
            raise ValueError(f"resume holds the seeds {resume.get('seeds')}, not {seeds}")
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        for generator, state in zip(data + held_out, resume["data"] + resume["held_out"]):
            generator.set_state(state.cpu())
        logs, first = resume["logs"], resume["step"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    ends = [sum(phase.steps for phase in phases[: n + 1]) for n in range(len(phases))]
    pending = _PendingLosses(logs)

    def evaluate(phase: Phase, step: int) -> None:
        task = phase.task
        for index, log in enumerate(logs):
            evaluator.load_state_dict(member_state(model, index))
            evaluator.eval()
            with autocast:
                metrics = task.evaluate(evaluator, phase.batch, config.eval_batches, held_out[index], device)
            record = {"step": step, "seq": task.seq, **metrics, "seconds": log["seconds"] + time.perf_counter() - started}
            if on_eval is not None:
                on_eval(record, evaluator)
            log["evals"].append(record)

    for step in range(first, config.steps):
        if time_limit is not None and time.perf_counter() - started > time_limit:
            pending.flush()
            for log in logs:
                log["seconds"] += time.perf_counter() - started
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "data": [g.get_state() for g in data], "held_out": [g.get_state() for g in held_out],
                     "logs": logs, "step": step, "seeds": seeds}  # fmt: skip
            return Runs(logs, state, _members(model, evaluator, len(seeds)))
        phase = next(phase for phase, end in zip(phases, ends) if step < end)
        batch = seeds_batch([phase.task.batch(phase.batch, generator) for generator in data]).to(device)
        losses = training_step(model, parameters, optimizer, batch, len(seeds), autocast)
        schedule.step()
        pending.add(step, losses)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            pending.flush()
            evaluate(phase, step + 1)
            pending.restart_clock()  # evaluation time is no step's
        elif pending.due(step):
            pending.flush()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    for log in logs:
        log["seconds"] += time.perf_counter() - started
        log["final"] = log["evals"][-1][objective.metric]
        log["solved"] = solved(objective, log["final"])
        # Skip the first steps: they compile and tune kernels.
        timed = log["step_seconds"][min(10, len(log["step_seconds"]) // 2) :]
        log["step_ms"] = 1000 * statistics.median(timed) if timed else None
        log["peak_memory_mb"] = peak
    return Runs(logs, None, _members(model, evaluator, len(seeds)))


class _PendingLosses:
    """Step losses kept on the device and read back in groups. Reading a loss back waits
    for the GPU; reading after every step would stop the host from preparing the next
    batch while the GPU runs this one. Each step of a group is logged with the group's
    mean time (the first 10 steps, which compile and tune kernels, one by one)."""

    GROUP = 50

    def __init__(self, logs: list[dict]) -> None:
        self.logs, self.steps, self.losses = logs, [], []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.since = time.perf_counter()

    def add(self, step: int, losses: torch.Tensor) -> None:
        self.steps.append(step)
        self.losses.append(losses.detach())

    def due(self, step: int) -> bool:
        return step < 10 or len(self.steps) >= self.GROUP

    def flush(self) -> None:
        if not self.steps:
            return
        values = torch.stack(self.losses).tolist()  # waits for the GPU
        seconds = (time.perf_counter() - self.since) / len(values)
        for step, row in zip(self.steps, values):
            for log, loss in zip(self.logs, row):
                log["step"].append(step)
                log["loss"].append(loss)
                log["step_seconds"].append(seconds)
        self.steps, self.losses = [], []
        self.restart_clock()


def _new_log(spec: ModelSpec, objective, config: TrainConfig, phases, stacked: int) -> dict:
    return {
        "model": {**{f.name: getattr(spec, f.name) for f in fields(spec)}, "attention": _attention_name(spec), "label": spec.label},
        "task": objective.name, "metric": objective.metric, "config": asdict(config),
        "phases": [{"steps": phase.steps, "seq": phase.task.seq, "batch": phase.batch} for phase in phases],
        "stacked_seeds": stacked,  # seeds trained together: each step's time is theirs together
        "step": [], "loss": [], "evals": [], "seconds": 0.0, "step_seconds": [],
    }  # fmt: skip


def training_step(model, parameters: list, optimizer, batch: Batch, seeds: int, autocast) -> torch.Tensor:
    """One step of a stacked model on ``batch`` (the seeds' batches, :func:`seeds_batch`):
    forward under ``autocast``, each seed's loss, backward, each seed's gradients clipped
    to norm 1, the optimizer's step. Returns the (seeds,) losses, on the device."""
    with autocast:
        logits = model(batch.tokens, batch.doc_ids)  # (S * B, L, vocab)
    losses = _loss_per_seed(logits, batch.targets, seeds)
    optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()  # seed s's parameters get the gradient of its own loss alone
    clip_grad_norm_per_seed_(parameters, 1.0, seeds)
    optimizer.step()
    return losses


def seeds_batch(batches: list[Batch]) -> Batch:
    """The seeds' batches as one, seed s's rows the s-th part."""
    doc_ids = None if batches[0].doc_ids is None else torch.cat([b.doc_ids for b in batches])
    return Batch(torch.cat([b.tokens for b in batches]), torch.cat([b.targets for b in batches]), doc_ids)


def _loss_per_seed(logits: torch.Tensor, targets: torch.Tensor, seeds: int) -> torch.Tensor:
    """(S,) mean cross-entropy of each seed over its scored positions."""
    scored = targets != IGNORE
    losses = F.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
    seed = torch.arange(seeds, device=targets.device).repeat_interleave(targets.shape[0] // seeds)
    seed = seed[:, None].expand_as(targets)[scored]
    total = torch.zeros(seeds, device=targets.device).index_add_(0, seed, losses)
    count = torch.zeros(seeds, device=targets.device).index_add_(0, seed, torch.ones_like(losses))
    return total / count


def _members(model: torch.nn.Module, template: Decoder, seeds: int) -> list[Decoder]:
    """Each seed of a stacked model as a model of its own."""
    members = []
    for index in range(seeds):
        member = copy.deepcopy(template)
        member.load_state_dict(member_state(model, index))
        members.append(member)
    return members


def _attention_name(spec: ModelSpec) -> str:
    return spec.attention.name if isinstance(spec.attention, Pattern) else str(spec.attention)
