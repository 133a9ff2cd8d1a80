"""Meta-training across processes: 2 CPU ranks (gloo) against one process on the whole meta-batch.

The test starts this file once as a script on 2 ranks (``tests/distributed_harness.py``, the
way torchrun would); each rank runs every case below with ``distributed=True`` and saves what it
got. The tests compare the ranks with each other (replicas stay identical) and with the same case
run here in one process over the whole meta-batch, where nothing is distributed. The global
meta-batch has 5 tasks, so the ranks hold 3 and 2: the all-reduce must weight ranks by their
tasks to give the mean over all 5.

Cases: the closure API (second-order MAML with ``meta.adapt``, MetaSGD with ``task_losses``,
Reptile, MAML through ``meta.clone()`` learners counted with ``add_task_weight``),
``MetaTrainer.fit`` with evaluation (the same three algorithms), the ``meta_step`` builder with
per-task weights (MAML, Reptile), also on a rank that holds no task or only tasks of weight 0,
SAM on the outer loop, Reptile with an idle rank, MAML and Reptile in float16 with very large
and very small task weights, a closure that returns its loss as a Python float, a non-finite
task on one rank, errors that every rank raises together, the samplers' shares, evaluation with
fewer tasks than ranks, a checkpoint saved after 3 of 6 iterations and resumed by fresh
trainers on both ranks, and the same with dropout, whose ranks draw different amounts from torch's
global random stream (3 and 2 tasks) from differently seeded streams. The docs' torchrun example
runs on 2 ranks as well.
"""

from __future__ import annotations

import argparse
import gc
import os
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from distributed_harness import run_ranks, skip_without_gloo
from torch import nn

from samgria import (
    MAML,
    DistributedTaskSampler,
    FewShotSampler,
    MetaSGD,
    MetaTrainer,
    Reptile,
    SinusoidTaskSampler,
    meta_step,
)

WORLD_SIZE = 2
GLOBAL_BATCH = 5  # shares of 3 and 2 tasks
STEPS = 3
DT = torch.float64
ALGORITHMS = ("maml", "metasgd", "reptile")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "meta_distributed.py"


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)


def make_sampler(seed: int) -> SinusoidTaskSampler:
    return SinusoidTaskSampler(k_support=5, k_query=6, seed=seed, dtype=DT)


def build(algorithm: str, model: nn.Module, distributed: bool) -> Any:
    if algorithm == "maml":  # second order, two inner steps
        return MAML(model, torch.optim.SGD, lr=0.1, momentum=0.9, inner_lr=0.05, inner_steps=2, distributed=distributed)
    if algorithm == "metasgd":
        return MetaSGD(model, torch.optim.Adam, lr=0.01, inner_lr=0.05, inner_steps=1, distributed=distributed)
    return Reptile(model, torch.optim.SGD, lr=0.5, inner_lr=0.05, inner_steps=3, distributed=distributed)


def meta_weights(meta: Any) -> list[torch.Tensor]:
    """Every meta-parameter (Meta-SGD's rates included), detached copies."""
    return [p.detach().clone() for group in meta.param_groups for p in group["params"]]


def share(items: list, rank: int, world_size: int) -> list:
    return DistributedTaskSampler(make_sampler(0), rank=rank, world_size=world_size).shard(items)


# -- the cases: each runs one process's part (the whole meta-batch when world_size == 1) ----------
def closure_case(algorithm: str, rank: int, world_size: int) -> dict[str, Any]:
    """``meta.step(closure)`` on this rank's share of each meta-batch."""
    meta = build(algorithm, make_model(), world_size > 1)
    tasks_of_rank = DistributedTaskSampler(make_sampler(0), rank=rank, world_size=world_size)
    losses = []
    for _ in range(STEPS):
        tasks = tasks_of_rank.sample(GLOBAL_BATCH)

        def closure() -> torch.Tensor:
            meta.zero_grad()
            if algorithm == "metasgd":  # vectorised: all tasks of the rank at once
                loss = meta.task_losses(tasks, F.mse_loss, vectorize=True).mean()
            else:
                query = []
                for task in tasks:
                    learner = meta.adapt(lambda f, t=task: F.mse_loss(f(t.support_x), t.support_y))
                    query.append(F.mse_loss(learner(task.query_x), task.query_y))
                loss = torch.stack(query).mean()
            if loss.requires_grad:
                loss.backward()
            return loss

        losses.append(float(meta.step(closure).detach()))
    return {"weights": meta_weights(meta), "losses": losses}


class _FailsOnce(torch.optim.SGD):
    """SGD whose first step raises before it changes anything (a transient failure). The record
    of the failure lives outside the optimizer: a failed meta-step puts back the attributes of an
    outer optimizer that is not torch's own, so a flag on the instance would be cleared again."""

    failed: weakref.WeakSet = weakref.WeakSet()  # the optimizers whose first step has raised

    def step(self, closure=None):  # type: ignore[override]
        if self not in self.failed:
            self.failed.add(self)
            raise RuntimeError("transient")
        return super().step(closure)


def reptile_adapted_before_case(mode: str, rank: int, world_size: int) -> dict[str, Any]:
    """Reptile with tasks adapted before the step (a framework's earlier micro-batches, or manual
    optimization's closure that adapts nothing): the first share of each rank's tasks
    (``"split"``), or all of them (``"before_only"``), adapted before ``step(closure)``; all of
    them before ``step()``, whose first call fails and is retried (``"retry"``); all of them
    after two adaptations that ``clear_records()`` forgets on rank 0 (``"cleared"``). Their
    weights count in the rank's weight as those adapted in the closure do, once."""
    distributed = world_size > 1
    if mode == "retry":
        meta = Reptile(make_model(), _FailsOnce, lr=0.5, inner_lr=0.05, inner_steps=3, distributed=distributed)
    else:
        meta = build("reptile", make_model(), distributed)
    tasks_of_rank = DistributedTaskSampler(make_sampler(0), rank=rank, world_size=world_size)
    for _ in range(STEPS):
        tasks = tasks_of_rank.sample(GLOBAL_BATCH)
        if mode == "cleared" and rank == 0:
            for task in tasks[:2]:
                meta.adapt(lambda f, t=task: F.mse_loss(f(t.support_x), t.support_y))
            meta.clear_records()
        cut = 1 if mode == "split" else len(tasks)
        for task in tasks[:cut]:
            meta.adapt(lambda f, t=task: F.mse_loss(f(t.support_x), t.support_y))
        if mode in ("retry", "cleared"):
            try:
                meta.step()
            except RuntimeError as error:
                assert str(error) == "transient"
                meta.step()
            continue

        def closure(rest=tasks[cut:]) -> torch.Tensor:
            for task in rest:
                meta.adapt(lambda f, t=task: F.mse_loss(f(t.support_x), t.support_y))
            return torch.zeros((), dtype=DT)

        meta.step(closure)
    return {"weights": meta_weights(meta)}


def failed_step_case(rank: int, world_size: int) -> dict[str, Any]:
    """MAML without a closure (``zero_grad``, back-propagate, ``step()``): a step that raises is
    caught, and the next batch is trained as usual. Its weights must equal those of a run that
    never saw the failed batch; the ranks hold 3 and 1 tasks of the failed batch, 1 and 3 of the
    next ones (so a task weight carried over from the failed batch would weight them wrongly)."""
    sampler = make_sampler(2)
    batches = [sampler.sample(4) for _ in range(3)]

    def share_of(tasks: list, index: int) -> list:
        if world_size == 1:
            return tasks
        first = 3 if index == 0 else 1
        return tasks[:first] if rank == 0 else tasks[first:]

    def train(meta: Any, indices: list[int]) -> None:
        for index in indices:
            meta.zero_grad()
            meta.task_losses(share_of(batches[index], index), F.mse_loss).sum().backward()
            try:
                meta.step()
            except RuntimeError as error:
                assert str(error) == "transient"

    failed = MAML(make_model(), _FailsOnce, lr=0.1, inner_lr=0.05, distributed=world_size > 1)
    train(failed, [0, 1, 2])
    clean = MAML(make_model(), torch.optim.SGD, lr=0.1, inner_lr=0.05, distributed=world_size > 1)
    train(clean, [1, 2])
    retry_refusal = None
    if world_size > 1:  # a retry of the failed step: refused, and the message says why
        retried = MAML(make_model(), _FailsOnce, lr=0.1, inner_lr=0.05, distributed=True)
        retried.task_losses(share_of(batches[0], 0), F.mse_loss).sum().backward()
        try:
            retried.step()
        except RuntimeError as error:
            assert str(error) == "transient"
        try:
            retried.step()
        except ValueError as error:
            retry_refusal = str(error)
    return {"failed": meta_weights(failed), "clean": meta_weights(clean), "retry_refusal": retry_refusal}


def learner_case(rank: int, world_size: int) -> dict[str, Any]:
    """The closure API through ``meta.clone()`` learners, which count their tasks themselves."""
    meta = build("maml", make_model(), world_size > 1)
    tasks_of_rank = DistributedTaskSampler(make_sampler(0), rank=rank, world_size=world_size)
    for _ in range(STEPS):
        tasks = tasks_of_rank.sample(GLOBAL_BATCH)

        def closure() -> torch.Tensor:
            meta.zero_grad()
            query = []
            for task in tasks:
                learner = meta.clone().adapt_on(F.mse_loss, task.support_x, task.support_y)
                meta.add_task_weight(1.0)  # adapted without meta.adapt: count the task
                query.append(F.mse_loss(learner(task.query_x), task.query_y))
            loss = torch.stack(query).mean()
            loss.backward()
            return loss

        meta.step(closure)
    return {"weights": meta_weights(meta)}


def errors_case() -> dict[str, str]:
    """What every rank raises, together (no rank is left waiting in a collective)."""
    messages = {}

    def message(run) -> str:
        try:
            run()
        except ValueError as error:
            return str(error)
        return "no error"

    trainer = MetaTrainer(build("maml", make_model(), True), F.mse_loss, make_sampler(0))
    messages["meta_batch_size"] = message(lambda: trainer.fit(2, 1, progress=False))
    reptile = build("reptile", make_model(), True)
    messages["reptile"] = message(lambda: reptile.step(lambda: None))
    maml = build("maml", make_model(), True)
    task = make_sampler(0).sample(1)[0]

    def uncounted() -> torch.Tensor:
        maml.zero_grad()
        learner = maml.clone().adapt_on(F.mse_loss, task.support_x, task.support_y)
        loss = F.mse_loss(learner(task.query_x), task.query_y)
        loss.backward()
        return loss

    messages["uncounted"] = message(lambda: maml.step(uncounted))
    messages["unchanged"] = str(all(torch.equal(a, b) for a, b in zip(meta_weights(maml), meta_weights(build("maml", make_model(), True)))))
    return messages


def trainer_case(algorithm: str, rank: int, world_size: int) -> dict[str, Any]:
    """``MetaTrainer.fit`` with evaluation every 2 iterations (5 held-out tasks: shares 3 and 2)."""
    meta = build(algorithm, make_model(), world_size > 1)
    trainer = MetaTrainer(meta, F.mse_loss, make_sampler(1), vectorize=algorithm != "maml")
    history = trainer.fit(4, GLOBAL_BATCH, eval_every=2, eval_tasks=make_sampler(9).sample(5), progress=False)
    return {"weights": meta_weights(meta), "history": vars(history)}


def meta_step_case(algorithm: str, rank: int, world_size: int) -> dict[str, Any]:
    """The ``meta_step`` builder with per-task weights: the weighted mean over every rank's tasks."""
    meta = build(algorithm, make_model(), world_size > 1)
    sampler = make_sampler(2)
    losses = []
    for _ in range(2):
        tasks = sampler.sample(GLOBAL_BATCH)
        weights = [0.5 + i for i in range(GLOBAL_BATCH)]
        with meta_step(meta, loss_fn=F.mse_loss) as ms:
            for task, weight in share(list(zip(tasks, weights)), rank, world_size):
                ms.task((task.support_x, task.support_y), (task.query_x, task.query_y), weight=weight)
        losses.append(float(ms.loss))
    return {"weights": meta_weights(meta), "losses": losses}


def meta_step_idle_rank_case(algorithm: str, rank: int, world_size: int) -> dict[str, Any]:
    """The ``meta_step`` builder when rank 1 holds no task (first meta-step) or only a task of
    weight 0 (second): it takes part with weight 0, as the guide says a rank may; it raised
    ValueError locally while rank 0 waited in the all-reduce. Then a meta-step without a weighted
    task anywhere raises on every rank."""
    meta = build(algorithm, make_model(), world_size > 1)
    sampler = make_sampler(6)
    losses = []
    for with_zero_weight_task in (False, True):
        tasks = sampler.sample(3)
        weighted = [(tasks[0], 1.0), (tasks[1], 2.5)]
        idle = [(tasks[2], 0.0)] if with_zero_weight_task else []
        mine = weighted + idle if world_size == 1 else (weighted if rank == 0 else idle)
        with meta_step(meta, loss_fn=F.mse_loss) as ms:
            for task, weight in mine:
                ms.task((task.support_x, task.support_y), (task.query_x, task.query_y), weight=weight)
        losses.append(float(ms.loss))
    refusal = "no error"
    try:
        with meta_step(meta, loss_fn=F.mse_loss) as ms:
            task = sampler.sample(1)[0]
            ms.task((task.support_x, task.support_y), (task.query_x, task.query_y), weight=0.0)
    except ValueError as error:
        refusal = str(error)
    return {"weights": meta_weights(meta), "losses": losses, "refusal": refusal}


def outer_sam_case(rank: int, world_size: int) -> dict[str, Any]:
    """SAM on the outer loop: both closure evaluations are reduced, so SAM sees the global gradient."""
    from samgria import SAM, TransformingOptimizer

    model = make_model()
    outer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(rho=0.05)])
    meta = MAML(model, outer, inner_lr=0.05, distributed=world_size > 1)
    tasks_of_rank = DistributedTaskSampler(make_sampler(5), rank=rank, world_size=world_size)
    for _ in range(2):
        tasks = tasks_of_rank.sample(GLOBAL_BATCH)

        def closure() -> torch.Tensor:
            meta.zero_grad()
            loss = meta.task_losses(tasks, F.mse_loss).mean()
            loss.backward()
            return loss

        meta.step(closure)
    return {"weights": meta_weights(meta)}


def number_loss_case(rank: int, world_size: int) -> dict[str, Any]:
    """MAML whose closure returns its loss as a Python float (``loss.item()``), over 2 meta-steps."""
    meta = build("maml", make_model(), world_size > 1)
    tasks_of_rank = DistributedTaskSampler(make_sampler(0), rank=rank, world_size=world_size)
    returned = []
    for _ in range(2):
        tasks = tasks_of_rank.sample(GLOBAL_BATCH)

        def closure() -> float:
            meta.zero_grad()
            loss = meta.task_losses(tasks, F.mse_loss).mean()
            loss.backward()
            return loss.item()

        returned.append(meta.step(closure))
    return {"returned": returned}


def half_precision_weights_case(rank: int, world_size: int) -> dict[str, Any]:
    """MAML and Reptile on a float16 model, 4 tasks (2 per rank) of equal weight, very large
    (3e4: a rank's weight of 6e4 times a gradient exceeds float16's 65504) or very small (1e-6:
    a rank's weight times a pseudo-gradient is below float16's normal range) -- one meta-step each."""
    results: dict[str, Any] = {}
    tasks = SinusoidTaskSampler(k_support=5, k_query=6, seed=0, dtype=torch.float16).sample(4)
    for algorithm, weight in (("maml", 3e4), ("reptile", 1e-6)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).half()
        if algorithm == "maml":
            meta: Any = MAML(model, torch.optim.SGD, lr=0.01, inner_lr=0.01, distributed=world_size > 1)
        else:
            meta = Reptile(model, torch.optim.SGD, lr=0.5, inner_lr=0.01, distributed=world_size > 1)
        initial = meta_weights(meta)
        mine = share(tasks, rank, world_size)

        def closure() -> torch.Tensor:
            meta.zero_grad()
            query = []
            for task in mine:
                learner = meta.adapt(lambda f, t=task: F.mse_loss(f(t.support_x), t.support_y), weight=weight)
                query.append(F.mse_loss(learner(task.query_x), task.query_y))
            loss = meta.meta_loss(query, [weight] * len(mine))
            if algorithm == "maml":
                loss.backward()
            return loss.detach()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a skipped step warns
            meta.step(closure)
        results[algorithm] = {"weights": meta_weights(meta), "initial": initial, "skipped": meta.skipped_steps}
    return results


def idle_rank_case(rank: int, world_size: int) -> dict[str, Any]:
    """Reptile with one task per meta-batch: rank 1 adapts nothing."""
    meta = build("reptile", make_model(), world_size > 1)
    sampler = DistributedTaskSampler(make_sampler(3), rank=rank, world_size=world_size)
    for _ in range(2):
        tasks = sampler.sample(1)

        def closure() -> torch.Tensor:
            for task in tasks:
                meta.adapt(lambda f, t=task: F.mse_loss(f(t.support_x), t.support_y))
            return torch.zeros((), dtype=DT)

        meta.step(closure)
    return {"weights": meta_weights(meta), "tasks": len(tasks)}


def non_finite_case(rank: int, world_size: int) -> dict[str, Any]:
    """A NaN target in the last task (rank 1's share): every rank skips the meta-step."""
    meta = build("maml", make_model(), world_size > 1)
    before = meta_weights(meta)
    tasks = make_sampler(4).sample(4)
    tasks[-1].query_y[0] = float("nan")
    mine = share(tasks, rank, world_size)

    def closure() -> torch.Tensor:
        meta.zero_grad()
        loss = meta.task_losses(mine, F.mse_loss).mean()
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta.step(closure)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, meta_weights(meta)))
    return {"skipped": meta.skipped_steps, "unchanged": unchanged, "warned": any("skipped" in str(w.message) for w in caught)}


def shares_case(rank: int, world_size: int) -> dict[str, Any]:
    """Two meta-batches of 5 few-shot tasks, this rank's shares."""
    inputs = torch.randn(60, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    labels = torch.arange(60) % 6
    sampler = DistributedTaskSampler(FewShotSampler(inputs, labels, 3, 2, 2, seed=5), rank=rank, world_size=world_size)
    return {"draws": [[vars(t) for t in sampler.sample(5)] for _ in range(2)]}


def evaluate_case(rank: int, world_size: int) -> dict[str, Any]:
    """Evaluation over 5 tasks, over 1 task (rank 1 holds none), and ``meta.evaluate`` on shares."""
    meta = build("maml", make_model(), world_size > 1)
    trainer = MetaTrainer(meta, F.mse_loss, make_sampler(0), vectorize=False)
    tasks = make_sampler(9).sample(5)
    return {
        "five": trainer.evaluate(tasks),
        "one": trainer.evaluate(tasks[:1]),
        "meta": meta.evaluate(share(tasks, rank, world_size), F.mse_loss, inner_steps=3),
    }


def checkpoint_case(rank: int, world_size: int, directory: Path) -> dict[str, Any]:
    """fit(6) against fit(3), checkpoint (rank 0 saves, every rank loads), fresh trainer, fit(3)."""
    distributed = world_size > 1
    eval_tasks = make_sampler(9).sample(3)

    def trainer(seed: int) -> MetaTrainer:
        meta = build("metasgd", make_model(seed), distributed)
        return MetaTrainer(meta, F.mse_loss, make_sampler(seed), vectorize=True)

    whole = trainer(0)
    whole.fit(6, GLOBAL_BATCH, eval_every=2, eval_tasks=eval_tasks, progress=False)
    first = trainer(0)
    first.fit(3, GLOBAL_BATCH, eval_every=2, eval_tasks=eval_tasks, progress=False)
    path = directory / "checkpoint.pt"
    if rank == 0:
        torch.save(first.state_dict(), path)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    resumed = trainer(7)  # another initialisation and another seed: everything must come from the file
    resumed.load_state_dict(torch.load(path))
    resumed.fit(3, GLOBAL_BATCH, eval_every=2, eval_tasks=eval_tasks, progress=False)
    return {
        "whole": {"weights": meta_weights(whole.meta), "history": vars(whole.history), "outer": whole.meta.state_dict()},
        "resumed": {"weights": meta_weights(resumed.meta), "history": vars(resumed.history), "outer": resumed.meta.state_dict()},
        "iterations": (whole.iteration, resumed.iteration),
    }


def dropout_checkpoint_case(rank: int, world_size: int, directory: Path) -> dict[str, Any]:
    """fit(4) against fit(2), checkpoint (rank 0 saves, every rank loads), fresh trainer, fit(2),
    with dropout: each rank draws from torch's global random stream per task it adapts (3 and 2),
    and the ranks' streams are seeded differently, so the ranks' random states differ."""
    distributed = world_size > 1

    def trainer(seed: int) -> MetaTrainer:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1)).to(DT)
        meta = MAML(model, torch.optim.SGD, lr=0.01, inner_lr=0.05, distributed=distributed)
        torch.manual_seed(100 + seed + rank)  # each rank its own stream
        return MetaTrainer(meta, F.mse_loss, make_sampler(seed), vectorize=False)

    whole = trainer(0)
    whole.fit(4, GLOBAL_BATCH, progress=False)
    first = trainer(0)
    first.fit(2, GLOBAL_BATCH, progress=False)
    path = directory / "dropout_checkpoint.pt"
    if rank == 0:  # only rank 0 takes the snapshot: no collective may run in state_dict
        torch.save(first.state_dict(), path)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    state = torch.load(path)
    resumed = trainer(7)  # another initialisation and another seed: everything must come from the file
    refused, unchanged = "", False
    if distributed:  # a checkpoint of 3 ranks is refused before anything changes
        before = meta_weights(resumed.meta), torch.get_rng_state()
        try:
            resumed.load_state_dict({**state, "rng": [*state["rng"], state["rng"][0]]})
        except Exception as error:  # noqa: BLE001 - the test says what it was
            refused = f"{type(error).__name__}: {error}"
        after = meta_weights(resumed.meta), torch.get_rng_state()
        unchanged = all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and torch.equal(before[1], after[1])
    resumed.load_state_dict(state)
    resumed.fit(2, GLOBAL_BATCH, progress=False)
    rng = state["rng"]
    return {
        "whole": {"weights": meta_weights(whole.meta), "history": vars(whole.history)},
        "resumed": {"weights": meta_weights(resumed.meta), "history": vars(resumed.history)},
        "rng": rng if isinstance(rng, torch.Tensor) else list(rng),
        "refused": refused,
        "unchanged": unchanged,
    }


def run_cases(rank: int, world_size: int, directory: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for algorithm in ALGORITHMS:
        results[f"closure/{algorithm}"] = closure_case(algorithm, rank, world_size)
        results[f"trainer/{algorithm}"] = trainer_case(algorithm, rank, world_size)
    results["learner"] = learner_case(rank, world_size)
    results["failed_step"] = failed_step_case(rank, world_size)
    for mode in ("split", "before_only", "retry", "cleared"):
        results[f"reptile_adapted_before/{mode}"] = reptile_adapted_before_case(mode, rank, world_size)
    if world_size > 1:
        results["errors"] = errors_case()
    for algorithm in ("maml", "reptile"):
        results[f"meta_step/{algorithm}"] = meta_step_case(algorithm, rank, world_size)
        results[f"meta_step_idle/{algorithm}"] = meta_step_idle_rank_case(algorithm, rank, world_size)
    results["outer_sam"] = outer_sam_case(rank, world_size)
    results["idle_rank"] = idle_rank_case(rank, world_size)
    results["half_precision_weights"] = half_precision_weights_case(rank, world_size)
    results["number_loss"] = number_loss_case(rank, world_size)
    results["non_finite"] = non_finite_case(rank, world_size)
    results["shares"] = shares_case(rank, world_size)
    results["evaluate"] = evaluate_case(rank, world_size)
    results["checkpoint"] = checkpoint_case(rank, world_size, directory)
    results["dropout_checkpoint"] = dropout_checkpoint_case(rank, world_size, directory)
    return results


# -- the worker (runs in a child process) ----------------------------------------------------------
def _worker(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        results = run_cases(rank, world_size, Path(out_dir))
        # Free reference cycles (optimizers, DDP/FSDP modules) that still hold the process group
        # while it is alive: destroyed at interpreter exit instead, gloo's threads can abort a rank
        # that has finished (as benchmarks/distributed.py does).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


# -- the tests -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    skip_without_gloo()
    out_dir = tmp_path_factory.mktemp("meta_ddp")
    run_ranks(__file__, WORLD_SIZE, ["--out", str(out_dir)])
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the non-finite case warns
        return run_cases(0, 1, tmp_path_factory.mktemp("meta_one"))


def assert_close(actual: Any, expected: Any) -> None:
    """Equal up to the order of the sums over ranks (float64)."""
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-13)


def test_replicas_are_identical(ranks: list[dict[str, Any]]) -> None:
    cases = ["meta_step/maml", "meta_step/reptile", "meta_step_idle/maml", "meta_step_idle/reptile", "outer_sam", "idle_rank", "learner"]
    for name in [f"{kind}/{a}" for kind in ("closure", "trainer") for a in ALGORITHMS] + cases:
        for a, b in zip(ranks[0][name]["weights"], ranks[1][name]["weights"]):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_closure_api_equals_one_process_on_the_whole_meta_batch(ranks, one_process, algorithm) -> None:
    name = f"closure/{algorithm}"
    assert_close(ranks[0][name]["weights"], one_process[name]["weights"])
    for rank in ranks:  # the returned meta-loss is the mean over all 5 tasks, on every rank
        assert_close(rank[name]["losses"], one_process[name]["losses"])
    trained = one_process[name]["weights"][0]
    assert not torch.equal(trained, make_model()[0].weight.detach()), "it trained"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_trainer_equals_one_process_history_included(ranks, one_process, algorithm) -> None:
    name = f"trainer/{algorithm}"
    expected = one_process[name]
    for rank in ranks:
        assert_close(rank[name]["weights"], expected["weights"])
        assert_close(rank[name]["history"]["meta_loss"], expected["history"]["meta_loss"])
        assert_close(rank[name]["history"]["eval_loss"], expected["history"]["eval_loss"])
        assert rank[name]["history"]["eval_iterations"] == [2, 4]


def test_learners_counted_with_add_task_weight_give_the_same_update(ranks, one_process) -> None:
    for rank in ranks:
        assert_close(rank["learner"]["weights"], one_process["closure/maml"]["weights"])


def test_errors_are_raised_on_every_rank_alike(ranks) -> None:
    assert ranks[0]["errors"] == ranks[1]["errors"]
    errors = ranks[0]["errors"]
    assert errors["meta_batch_size"] == (
        "meta_batch_size must be >= the number of processes (2) so that every rank adapts a task, got 1"
    )
    assert errors["reptile"].startswith("Reptile.step found no adapted tasks on any of the 2 ranks")
    assert errors["uncounted"].startswith("MAML.step found no adapted tasks on any of the 2 ranks")
    assert "meta.add_task_weight(weight)" in errors["uncounted"]
    assert errors["unchanged"] == "True"


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_meta_step_builder_weights_every_rank_by_its_task_weights(ranks, one_process, algorithm) -> None:
    name = f"meta_step/{algorithm}"
    for rank in ranks:
        assert_close(rank[name]["weights"], one_process[name]["weights"])
        assert_close(rank[name]["losses"], one_process[name]["losses"])


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_meta_step_builder_on_a_rank_without_weighted_tasks_takes_part_with_weight_0(ranks, one_process, algorithm) -> None:
    name = f"meta_step_idle/{algorithm}"
    expected = one_process[name]
    for rank in ranks:
        assert_close(rank[name]["weights"], expected["weights"])
        assert_close(rank[name]["losses"], expected["losses"])  # the idle rank reports the mean too
    assert expected["refusal"] == "task weights must not all be 0, got [0.0]"
    meta_class = "MAML" if algorithm == "maml" else "Reptile"
    for rank in ranks:
        assert rank[name]["refusal"].startswith(f"{meta_class}.step found no adapted tasks on any of the 2 ranks")


def test_a_failed_step_without_a_closure_leaves_no_task_weight_for_the_next_batch(ranks) -> None:
    """The task weight of a MAML step that raised pairs with gradients that zero_grad() then
    discards: carried over to the next batch, it weighted the ranks wrongly (a silent wrong
    update). The run equals one that never saw the failed batch."""
    for rank in ranks:
        assert_close(rank["failed_step"]["failed"], rank["failed_step"]["clean"])


def test_a_retry_after_a_failed_step_is_refused_with_a_message_that_says_why(ranks) -> None:
    """Retrying a step that raised (the gradients still there) found a task weight of 0 on every
    rank and said no task was adapted, although every rank had adapted some: the message says
    that the failed step dropped the weights and what to do."""
    for rank in ranks:
        assert rank["failed_step"]["retry_refusal"].endswith(
            "; this rank's previous step raised, which drops the task weights counted for it (they pair "
            "with gradients that zero_grad() discards): zero the gradients and adapt the tasks again"
        )


@pytest.mark.parametrize("mode", ["split", "before_only", "retry", "cleared"])
def test_reptile_counts_the_weights_of_tasks_adapted_before_the_step(ranks, one_process, mode) -> None:
    """The closure's evaluation reset the rank's task weight and counted only the tasks it
    adapted: with tasks adapted before step(closure) the ranks were weighted wrongly (a silent
    wrong update), or, with all of them adapted before, every rank raised "no adapted tasks".
    A failed step lost the weight of the record it kept (its retry weighted the rank 0), and
    clear_records() kept the weights of the tasks it forgot."""
    for rank in ranks:
        assert_close(rank[f"reptile_adapted_before/{mode}"]["weights"], one_process["closure/reptile"]["weights"])


def test_sam_on_the_outer_loop_perturbs_with_the_global_meta_gradient(ranks, one_process) -> None:
    assert_close(ranks[0]["outer_sam"]["weights"], one_process["outer_sam"]["weights"])


def test_a_rank_without_tasks_contributes_nothing(ranks, one_process) -> None:
    assert [rank["idle_rank"]["tasks"] for rank in ranks] == [1, 0]
    assert_close(ranks[1]["idle_rank"]["weights"], one_process["idle_rank"]["weights"])


def test_a_loss_returned_as_a_python_number_is_the_mean_over_every_rank(ranks, one_process) -> None:
    """A closure that returns loss.item() got its own rank's loss back from step(): the ranks
    returned different numbers. It gets the weighted mean over every rank's tasks, as a float,
    the same on every rank (what a tensor loss gets)."""
    expected = one_process["number_loss"]["returned"]
    assert all(type(value) is float for value in expected)
    for rank in ranks:
        assert all(type(value) is float for value in rank["number_loss"]["returned"])
        assert rank["number_loss"]["returned"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_float16_meta_gradients_are_reduced_within_range_for_any_task_weight(ranks, one_process, algorithm) -> None:
    """Each rank's gradient was multiplied by its weight W_r before the sum (divided by the total
    after it), in the gradients' dtype: in float16, task weights of 3e4 made MAML's W_r g_r
    infinite (every rank skipped the step one process takes), weights of 1e-6 rounded Reptile's
    W_r g_r to 0 or a few bits (the weights did not move, silently). Each rank's gradient is now
    scaled by its share W_r / sum W_s: the update is one process's to float16 rounding."""
    expected = one_process["half_precision_weights"][algorithm]
    assert expected["skipped"] == 0
    moved = [not torch.equal(a, b) for a, b in zip(expected["weights"], expected["initial"])]
    assert all(moved), "one process moves every weight"
    for rank in ranks:
        result = rank["half_precision_weights"][algorithm]
        assert result["skipped"] == 0
        torch.testing.assert_close(result["weights"], expected["weights"], rtol=2e-3, atol=1e-5)


def test_a_non_finite_task_on_one_rank_skips_the_step_on_every_rank(ranks, one_process) -> None:
    expected = {"skipped": 1, "unchanged": True, "warned": True}
    assert one_process["non_finite"] == expected
    assert [rank["non_finite"] for rank in ranks] == [expected, expected]


def test_sampler_shares_are_disjoint_and_together_the_one_process_batch(ranks, one_process) -> None:
    for draw, whole in enumerate(one_process["shares"]["draws"]):
        mine = [ranks[0]["shares"]["draws"][draw], ranks[1]["shares"]["draws"][draw]]
        assert [len(m) for m in mine] == [3, 2]
        for got, want in zip(mine[0] + mine[1], whole):
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_evaluation_is_the_mean_over_every_rank(ranks, one_process) -> None:
    for key in ("five", "one", "meta"):
        values = [rank["evaluate"][key] for rank in ranks]
        assert values[0] == values[1], key
        assert values[0] == pytest.approx(one_process["evaluate"][key], rel=1e-12), key


def test_checkpoint_resumes_bit_for_bit(ranks, one_process) -> None:
    for result in [one_process, *ranks]:
        case = result["checkpoint"]
        assert case["iterations"] == (6, 6)
        whole, resumed = case["whole"], case["resumed"]
        assert all(torch.equal(a, b) for a, b in zip(whole["weights"], resumed["weights"]))
        assert whole["history"] == resumed["history"]
        assert whole["history"]["eval_iterations"] == [2, 4, 6]
        torch.testing.assert_close(whole["outer"], resumed["outer"], rtol=0, atol=0)
    assert_close(ranks[0]["checkpoint"]["whole"]["weights"], one_process["checkpoint"]["whole"]["weights"])


def test_checkpoint_with_dropout_resumes_bit_for_bit_on_every_rank(ranks, one_process) -> None:
    for result in [one_process, *ranks]:
        case = result["dropout_checkpoint"]
        whole, resumed = case["whole"], case["resumed"]
        assert all(torch.equal(a, b) for a, b in zip(whole["weights"], resumed["weights"]))
        assert whole["history"] == resumed["history"]
        assert len(whole["history"]["meta_loss"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["dropout_checkpoint"]["whole"]["weights"],
                                                 ranks[1]["dropout_checkpoint"]["whole"]["weights"]))
    # One process: torch's random state as before; two: one per rank, and they differ.
    assert isinstance(one_process["dropout_checkpoint"]["rng"], torch.Tensor)
    saved = ranks[0]["dropout_checkpoint"]["rng"]
    assert isinstance(saved, list) and len(saved) == WORLD_SIZE
    assert not torch.equal(saved[0], saved[1])
    for rank in ranks:
        assert rank["dropout_checkpoint"]["refused"] == (
            "ValueError: state_dict['rng'] holds the random states of 3 ranks, but this run has 2: a checkpoint "
            "of a distributed run resumes on the same number of ranks"
        )
        assert rank["dropout_checkpoint"]["unchanged"] is True


# -- one process ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"distributed": "yes"}, TypeError, r"distributed must be a bool, got 'yes'"),
        ({"process_group": "group"}, ValueError, r"process_group needs distributed=True, got distributed=False"),
        ({"distributed": True}, ValueError, r"distributed=True needs an initialised torch.distributed process group"),
    ],
)
def test_distributed_arguments_are_checked(kwargs, error, match) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(error, match=match):
        MAML(make_model(), torch.optim.SGD, lr=0.1, **kwargs)


@pytest.fixture
def group_of_one():
    skip_without_gloo()
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_group_of_one_process_changes_nothing(group_of_one) -> None:
    import copy

    def fit(distributed: bool) -> tuple[MetaTrainer, list[torch.Tensor]]:
        meta = build("metasgd", make_model(), distributed)
        trainer = MetaTrainer(meta, F.mse_loss, make_sampler(0), vectorize=True)
        trainer.fit(3, GLOBAL_BATCH, eval_tasks=make_sampler(9).sample(2), progress=False)
        return trainer, meta_weights(meta)

    (trainer, distributed), (plain_trainer, plain) = fit(True), fit(False)
    assert (trainer.meta.rank, trainer.meta.world_size) == (0, 1)
    assert (plain_trainer.meta.rank, plain_trainer.meta.world_size) == (0, 1)
    assert all(torch.equal(a, b) for a, b in zip(distributed, plain))
    assert trainer.history == plain_trainer.history
    copied = copy.deepcopy(trainer.meta)
    assert copied.distributed and copied.process_group is None


def test_documented_torchrun_example_runs_on_two_ranks() -> None:
    skip_without_gloo()
    outputs = run_ranks(EXAMPLE, WORLD_SIZE)
    assert "rank 0 of 2" in outputs[0] and "rank 1 of 2" in outputs[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of tests/test_meta_distributed.py")
    parser.add_argument("--out", required=True)
    _worker(parser.parse_args().out)


def test_a_shallow_copy_keeps_the_process_group_a_deep_copy_drops(group_of_one) -> None:
    """copy.copy went through pickling's __getstate__, which drops the process group: the copy's
    collectives would have run over the default group, with distributed still True."""
    import copy

    import torch.distributed as dist

    subgroup = dist.new_group([0])
    meta = MAML(make_model(), torch.optim.SGD, lr=0.1, distributed=True, process_group=subgroup)
    shallow, deep = copy.copy(meta), copy.deepcopy(meta)
    assert shallow.distributed and shallow.process_group is subgroup
    assert deep.distributed and deep.process_group is None
