"""A small meta-training loop: sample tasks, take meta-steps, evaluate, report progress, checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

import torch

from samgria._checks import check_bool, check_int, check_optional_bool, check_real
from samgria.data._validation import check_sampler
from samgria.data.sharding import DistributedTaskSampler, shard_bounds
from samgria.data.task import Task, TaskSampler, _cpu_random_state, load_sampler_state_dict, sampler_state_dict
from samgria.meta.base import MetaOptimizer, rng_untouched
from samgria.meta.functional import one_steps_argument, sequence_as_list
from samgria.meta.compiled import CompiledMetaLoss, check_compile_options, compiled_path_blocker
from samgria.meta import distributed as collectives
from samgria.meta.engine import PATHS, InnerLoop, InnerRegFn, refuse_unvectorisable, vmap_blocker
from samgria.meta.inner_optim import InnerStepFn
from samgria._frameworks import stacklevel_outside
from samgria._snapshot import GroupValues, StateStructure

__all__ = ["History", "MetaTrainer"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _task_list(name: str, tasks: Any) -> list[Any]:
    """``tasks`` as a list (:func:`~samgria.meta.functional.sequence_as_list`: an iterable or a
    map-style ``torch.utils.data.Dataset``; a single :class:`~samgria.data.task.Task` is refused)."""
    return sequence_as_list(name, tasks, "Task", refused=(Task,))


@dataclass
class History:
    """What :meth:`MetaTrainer.fit` recorded.

    Attributes:
        meta_loss: Mean query loss of each meta-iteration (before its outer update), one per
            iteration. For Reptile it is the mean post-adaptation loss the core reports, for
            monitoring (a task with an empty query set is scored on its support set).
        eval_loss: Mean post-adaptation query loss on the evaluation tasks, one per evaluation.
        eval_iterations: Number of completed meta-iterations at each evaluation.
    """

    meta_loss: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_iterations: list[int] = field(default_factory=list)


def _history_of(saved: Any) -> History:
    """The :class:`History` of a checkpoint's ``"history"``, checked before anything is loaded.

    It must be a mapping of exactly History's fields, each a list: ``meta_loss`` and
    ``eval_loss`` of real numbers (NaN and ±inf included: a skipped meta-step records its
    non-finite loss), ``eval_iterations`` of integers ``>= 1``, one per evaluation loss.

    Raises:
        TypeError: ``saved`` is not a mapping, a field is not a list, or an entry is of the
            wrong kind (a ``bool`` is not a number).
        ValueError: A field is missing or unknown, an iteration is below 1, or ``eval_loss``
            and ``eval_iterations`` differ in length.
    """
    where = "state_dict['history']"
    fields = [f.name for f in dataclasses.fields(History)]
    if not isinstance(saved, Mapping):
        raise TypeError(f"{where} must be a dict of History's fields {fields}, got {saved!r}")
    if set(saved) != set(fields):
        raise ValueError(f"{where} must hold exactly History's fields {fields}, got {sorted(saved, key=str)}")
    values: dict[str, list[Any]] = {}
    for name in fields:
        entries = saved[name]
        if not isinstance(entries, (list, tuple)):
            raise TypeError(f"{where}[{name!r}] must be a list, got {entries!r}")
        values[name] = []
        for i, value in enumerate(entries):
            if name == "eval_iterations":
                values[name].append(check_int(f"{where}[{name!r}][{i}]", value, low=1))
            elif isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{where}[{name!r}][{i}] must be a real number, got {value!r}")
            else:
                values[name].append(float(value))
    if len(values["eval_loss"]) != len(values["eval_iterations"]):
        raise ValueError(
            f"{where} must hold one eval_iterations entry per eval_loss entry, got "
            f"{len(values['eval_loss'])} and {len(values['eval_iterations'])}"
        )
    return History(**values)


def _paths_of(saved: Any) -> tuple[str | None, dict[str, str], dict[Any, dict[str, list[float]]], set[str]]:
    """``(path, failed, timings, fallback_reasons)`` of a checkpoint's ``"paths"``, checked
    before anything is loaded.

    It must be a mapping of exactly ``"path"`` (``None`` or a path), ``"failed"`` (``{path:
    reason}``, the reasons strings), ``"timings"`` (``{key: {path: [seconds, ...]}}``, each a
    finite number ``>= 0``) and ``"fallback_reasons"`` (a list of strings), the paths among
    ``samgria.meta.engine.PATHS``.

    Raises:
        TypeError: An entry is of the wrong kind.
        ValueError: An entry is missing or unknown, a path is unknown, or a duration is
            negative or not finite.
    """
    where = "state_dict['paths']"
    fields = ["path", "failed", "timings", "fallback_reasons"]
    if not isinstance(saved, Mapping):
        raise TypeError(f"{where} must be a dict of {fields}, got {saved!r}")
    if set(saved) != set(fields):
        raise ValueError(f"{where} must hold exactly {fields}, got {sorted(saved, key=str)}")

    def path_name(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be one of {list(PATHS)}, got {value!r}")
        if value not in PATHS:
            raise ValueError(f"{name} must be one of {list(PATHS)}, got {value!r}")
        return value

    path = saved["path"]
    if path is not None:
        if not isinstance(path, str) or path not in PATHS:
            raise ValueError(f"{where}['path'] must be None or one of {list(PATHS)}, got {path!r}")
    failed_saved = saved["failed"]
    if not isinstance(failed_saved, Mapping):
        raise TypeError(f"{where}['failed'] must be a dict of {{path: reason}}, got {failed_saved!r}")
    failed: dict[str, str] = {}
    for key, reason in failed_saved.items():
        name = path_name(f"{where}['failed'] keys", key)
        if not isinstance(reason, str):
            raise TypeError(f"{where}['failed'][{key!r}] must be a str, got {reason!r}")
        failed[name] = reason
    timings_saved = saved["timings"]
    if not isinstance(timings_saved, Mapping):
        raise TypeError(f"{where}['timings'] must be a dict of {{key: {{path: [seconds, ...]}}}}, got {timings_saved!r}")
    timings: dict[Any, dict[str, list[float]]] = {}
    for key, by_path in timings_saved.items():
        entry = f"{where}['timings'][{key!r}]"
        if not isinstance(by_path, Mapping):
            raise TypeError(f"{entry} must be a dict of {{path: [seconds, ...]}}, got {by_path!r}")
        timings[key] = {}
        for name, times in by_path.items():
            name = path_name(f"{entry} keys", name)
            if not isinstance(times, (list, tuple)):
                raise TypeError(f"{entry}[{name!r}] must be a list of durations, got {times!r}")
            timings[key][name] = [check_real(f"{entry}[{name!r}][{i}]", t, low=0.0) for i, t in enumerate(times)]
    reasons = saved["fallback_reasons"]
    if not isinstance(reasons, (list, tuple, set, frozenset)) or not all(isinstance(r, str) for r in reasons):
        raise TypeError(f"{where}['fallback_reasons'] must be a list of str, got {reasons!r}")
    return path, failed, timings, set(reasons)


def _has_modes(meta: MetaOptimizer) -> bool:
    """Whether ``meta``'s outer optimizer switches modes (``train()``/``eval()``, as schedule-free
    optimizers do; the meta-optimizer passes them on)."""
    return hasattr(meta, "train") and hasattr(meta, "eval")


def _in_train_mode(meta: MetaOptimizer) -> bool:
    """Whether ``meta``'s schedule-free outer optimizer is in train mode: ``False`` where a param
    group's ``"train_mode"`` is (pytorch_optimizer's and facebookresearch's ScheduleFree optimizers
    keep the mode there); ``True`` where nothing says otherwise."""
    return all(group.get("train_mode") is not False for group in meta.param_groups)


def _put_back(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    """Copy ``saved`` into ``params``, bit for bit (a mode switch there and back rounds)."""
    with torch.no_grad():
        for param, value in zip(params, saved):
            param.copy_(value)


class _ProgressBar:
    """A dependency-free one-line progress bar on a text stream (redrawn with ``\\r``)."""

    def __init__(self, total: int, stream: TextIO, width: int = 24, min_interval: float = 0.1) -> None:
        self.total, self.stream, self.width, self.min_interval = total, stream, width, min_interval
        self.start = self.last_draw = time.perf_counter()
        # Exponential moving average of the finite meta-losses: one non-finite (skipped) step
        # would make it NaN for the rest of the run. Until a finite one comes, the last loss.
        self.running: float | None = None
        self.last: float | None = None
        self.eval_loss: float | None = None
        self.done = 0

    def update(self, done: int, meta_loss: float, eval_loss: float | None = None) -> None:
        self.last = meta_loss
        if math.isfinite(meta_loss):
            self.running = meta_loss if self.running is None else 0.95 * self.running + 0.05 * meta_loss
        self.eval_loss = eval_loss if eval_loss is not None else self.eval_loss
        self.done = done
        now = time.perf_counter()
        if done == self.total or now - self.last_draw >= self.min_interval:
            self.last_draw = now
            self._draw(now - self.start)

    def _draw(self, elapsed: float) -> None:
        done = self.done
        filled = self.width * done // self.total
        rate = done / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - done) / rate if rate > 0 else 0.0
        line = (
            f"\rmeta-train {100 * done // self.total:3d}% |{'#' * filled}{'.' * (self.width - filled)}| "
            f"{done}/{self.total} [{elapsed:.0f}s<{remaining:.0f}s, {rate:.1f} it/s] "
            f"loss={self.running if self.running is not None else self.last:.4g}"
        )
        if self.eval_loss is not None:
            line += f" eval={self.eval_loss:.4g}"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.last is not None:
            self._draw(time.perf_counter() - self.start)
        self.stream.write("\n")
        self.stream.flush()


class MetaTrainer:
    r"""Drive a :class:`~samgria.meta.base.MetaOptimizer` over batches of sampled tasks.

    One meta-iteration samples ``meta_batch_size`` tasks and calls ``meta.step(closure)``
    with a closure that zero-grads, adapts to every task with the meta-optimizer's inner loop
    (:meth:`~samgria.meta.base.MetaOptimizer.inner_loop`), back-propagates the mean query loss

    .. math:: \mathcal{L}(\theta) = \frac{1}{B} \sum_{i=1}^{B}
              \ell\big(f_{\theta'_i}(x^{q}_i), y^{q}_i\big),
              \qquad \theta'_i = \text{inner loop on } (x^{s}_i, y^{s}_i),

    and returns it. The algorithm (MAML, FOMAML, Reptile, MetaSGD, ANIL) is whatever ``meta``
    is; for Reptile the outer update is the pseudo-gradient the optimizer forms itself.

    Paths and memory. The closure runs one of three paths of the engine:

    * ``"loop"``: task by task, each task back-propagated as soon as it is adapted, so only one
      task's (second-order) graph is alive at a time -- memory independent of the meta-batch
      size, and the only path that can checkpoint inner steps;
    * ``"vmap"``: all tasks at once with :func:`torch.func.vmap` and one backward (every task's
      graph alive together);
    * ``"compiled"`` (``compile=True``): the vmap path compiled with ``torch.compile``, with
      ``vectorize=None`` or ``True``.

    With ``vectorize=None`` (default) the trainer measures: the first meta-iterations alternate
    between the loop and vmap paths (two each) and the faster one is used from then on
    (:attr:`path`). The two give the same meta-gradient up to rounding. Where vmap cannot apply
    (unequal task shapes, a second-order loop through BatchNorm/LayerNorm, checkpointed steps)
    the loop runs without measuring. ``vectorize=True``/``False`` fixes the path.

    With ``compile=True`` the closure gets the meta-loss and its meta-gradient from a
    :class:`~samgria.meta.compiled.CompiledMetaLoss`, recomputed at the current weights on every
    call (an outer optimizer that re-evaluates it, such as SAM, gets what it would get without
    compilation). Where the compiled path does not apply (Reptile, unequal shapes, a second-order
    loop through BatchNorm, a compilation error) the trainer uses the uncompiled paths -- with
    ``vectorize=True`` the vmap path, otherwise the measured choice -- and warns once per reason.
    Evaluation never compiles.

    Non-finite meta-steps are skipped by the meta-optimizer (its ``non_finite`` policy);
    :meth:`fit` stops with an error after ``max_skipped_steps`` consecutive skipped steps,
    counted over ``fit`` and :meth:`train_step` calls and checkpoints (``fit(3); fit(3)`` stops
    where ``fit(6)`` does; a step taken by ``train_step`` resets the count).

    Schedule-free outer optimizers (pytorch_optimizer's ``ScheduleFreeAdamW``, facebookresearch's
    ``schedulefree``: any with ``train()`` and ``eval()``, which the meta-optimizer passes on)
    train at other weights than they evaluate at. :meth:`evaluate`, and so every evaluation of
    :meth:`fit`, switches such an optimizer to eval mode and back to train mode afterwards (also
    when the evaluation raises), putting the training weights back bit for bit, so that
    ``eval_every`` does not change the training run; one already in eval mode is evaluated as it
    is and left so, as is one that has not stepped yet (nothing is averaged). :meth:`train_step`,
    and so every meta-iteration of :meth:`fit`, switches it to train mode first. :meth:`fit`
    therefore ends in train mode, with the training weights in the model, as a run resumed from a
    checkpoint does: call ``meta.eval()`` before using or saving the model for inference (the next
    ``fit`` or ``train_step`` switches back). Other optimizers are left alone.

    Across processes. When ``meta`` was built with ``distributed=True``, every rank runs the
    same trainer with the same seeded ``sampler``: :meth:`fit` draws the global meta-batch of
    ``meta_batch_size`` tasks on every rank and adapts only this rank's contiguous share
    (:class:`~samgria.DistributedTaskSampler`), the meta-optimizer all-reduces the task-weighted
    meta-gradient, and the recorded meta-loss is the mean over all tasks -- the same on every
    rank and equal, up to the order of the sums, to one process adapting the whole meta-batch.
    :meth:`evaluate` takes the full list of held-out tasks on every rank, evaluates this rank's
    share and returns the mean over all of them. :meth:`train_step` takes this rank's tasks.
    With ``vectorize=None`` every rank takes the path rank 0 measured (one broadcast per
    meta-iteration); the ranks' results agree whichever path each used, up to rounding.

    Checkpoints. :meth:`state_dict` holds everything a resumed run needs to continue bit for
    bit: the model, the outer optimizer, the sampler's random stream (its ``state_dict()``, or
    its ``torch.Generator`` attribute ``generator``; a sampler with neither is not saved), torch's global random
    state, the :attr:`history`, the :attr:`iteration` counter and the path choice;
    :meth:`load_state_dict` restores them and :meth:`fit` continues the count. In a
    distributed run save rank 0's and load it on every rank, on the same number of ranks: the
    ranks share everything but torch's random state, which may differ (dropout draws as many
    numbers as a rank has tasks), so every :meth:`train_step` gathers every rank's state and a
    checkpoint carries one per rank (:meth:`state_dict` itself runs no collective).

    Args:
        meta: The meta-optimizer holding the model's meta-parameters.
        loss_fn: ``loss_fn(prediction, target) -> scalar`` used for support and query losses
            (e.g. ``torch.nn.functional.mse_loss``).
        sampler: A :class:`~samgria.data.TaskSampler` (anything with ``sample(n)``).
        vectorize: ``None`` chooses the path by measurement, ``True`` requires vmap, ``False``
            forces the per-task loop; for training and :meth:`evaluate` alike.
        compile: Compute meta-gradients with the compiled path (MAML, FOMAML, MetaSGD, ANIL),
            with ``vectorize=None`` or ``True``.
        compile_options: Keyword arguments of :func:`torch.compile` (e.g. ``{"mode":
            "max-autotune"}``), only with ``compile=True``; checked now, as
            :func:`~samgria.meta.compiled.check_compile_options` checks them (a key such as
            ``inner_steps`` is refused: the inner loop is the trainer's).
        inner_step_fn: Inner update rule (default plain SGD), on every path.
        inner_reg_fn: Inner-loop regulariser, on every path.
        grad_transforms: Inner-loop gradient transforms (e.g. ``InnerSAM``), on every path.
        max_skipped_steps: Consecutive skipped (non-finite) meta-steps after which :meth:`fit`
            raises.

    Attributes:
        iteration: Meta-iterations completed by :meth:`fit` over the trainer's life (restored
            by :meth:`load_state_dict`).
        history: The :class:`History` of every :meth:`fit` call so far (restored by
            :meth:`load_state_dict`); each call also returns its own.
        path: The path of the last meta-iteration (``None`` before the first).

    Raises:
        TypeError: ``meta`` is not a ``MetaOptimizer``, ``loss_fn`` is not callable,
            ``sampler`` has no ``sample`` method, an argument has the wrong type, or
            ``compile_options`` has a key that is no keyword argument of ``torch.compile`` or
            a value of the wrong kind (``fullgraph`` not a bool, ``backend`` neither a name
            nor a callable).
        ValueError: ``compile=True`` with ``vectorize=False`` (the compiled path is the
            vectorised one), ``vectorize=True`` where the model or the inner loop rules vmap
            out (:func:`~samgria.meta.engine.refuse_unvectorisable`: checkpointed second-order
            inner steps, a norm layer a second-order step back-propagates through),
            ``compile_options`` without ``compile=True`` or refused by ``torch.compile``,
            ``max_skipped_steps < 1``, or a ``DistributedTaskSampler`` sharded for another
            rank or world size than ``meta``.
    """

    #: Version of the :meth:`state_dict` layout.
    STATE_VERSION = 1

    def __init__(
        self,
        meta: MetaOptimizer,
        loss_fn: LossFn,
        sampler: TaskSampler,
        *,
        vectorize: bool | None = None,
        compile: bool = False,  # noqa: A002 - the name users expect (torch.compile)
        compile_options: Mapping[str, Any] | None = None,
        inner_step_fn: InnerStepFn | None = None,
        inner_reg_fn: InnerRegFn | None = None,
        grad_transforms: Sequence[Any] | None = None,
        max_skipped_steps: int = 10,
    ) -> None:
        if not isinstance(meta, MetaOptimizer):
            raise TypeError(f"meta must be a samgria MetaOptimizer, got {type(meta).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        check_sampler("sampler", sampler)
        vectorize = check_optional_bool("vectorize", vectorize)
        compile = check_bool("compile", compile)  # noqa: A001
        if compile and vectorize is False:
            raise ValueError(
                "compile=True runs the vectorised inner loop and cannot be combined with "
                "vectorize=False, got vectorize=False"
            )
        if compile_options is not None:
            if not isinstance(compile_options, Mapping):
                raise TypeError(f"compile_options must be a dict, got {type(compile_options).__name__}")
            if not compile:
                raise ValueError(f"compile_options need compile=True, got compile=False and {dict(compile_options)!r}")
            compile_options = check_compile_options(compile_options)
        self.max_skipped_steps = check_int("max_skipped_steps", max_skipped_steps, low=1)
        self.inner_options: dict[str, Any] = {
            "inner_step_fn": inner_step_fn,
            "inner_reg_fn": inner_reg_fn,
            "grad_transforms": grad_transforms,
        }
        loop = meta.inner_loop(**self.inner_options)  # checks them now, before any work
        if vectorize:  # what the model and the inner loop alone rule out, refused now
            refuse_unvectorisable(meta.model, loop)
        self.meta = meta
        self.loss_fn = loss_fn
        self.sampler = sampler
        self.vectorize = vectorize
        self.compile = compile
        self.compile_options: dict[str, Any] = dict(compile_options or {})
        self._compiled: CompiledMetaLoss | None = None
        self._consecutive_skips = 0  # skipped meta-steps in a row, over fit calls (max_skipped_steps)
        self._fallback_reasons: set[str] = set()
        # Every rank's torch CPU random state, gathered at the end of each train_step of a
        # distributed run (None before the first one, or with one process).
        self._rng_states: list[torch.Tensor] | None = None
        self.path: str | None = None
        self.iteration = 0
        self.history = History()
        self._shares = self._shares_of(sampler)

    def _shares_of(self, sampler: TaskSampler) -> TaskSampler:
        """What ``fit`` draws from: the sampler itself, or this rank's share of it."""
        rank, world_size = self.meta.rank, self.meta.world_size
        if isinstance(sampler, DistributedTaskSampler):
            if (sampler.rank, sampler.world_size) != (rank, world_size):
                raise ValueError(
                    f"sampler must be sharded like meta (rank {rank} of {world_size}), got a "
                    f"DistributedTaskSampler for rank {sampler.rank} of {sampler.world_size}"
                )
            return sampler
        if world_size == 1:
            return sampler
        return DistributedTaskSampler(sampler, rank=rank, world_size=world_size)

    @property
    def compiled_loss(self) -> CompiledMetaLoss | None:
        """The :class:`~samgria.meta.compiled.CompiledMetaLoss` in use (built on the first
        compiled meta-iteration), or ``None`` without ``compile=True``, before that iteration
        or after a compilation error disabled the compiled path."""
        return None if "compiled" in self.meta.path_policy.failed else self._compiled

    def _candidates(self, loop: InnerLoop, tasks: list[Task], evaluation: bool) -> list[str]:
        """The paths that can run ``loop`` on ``tasks``, in order of preference."""
        if self.vectorize is False:
            return ["loop"]
        if self.compile and not evaluation:
            reason = compiled_path_blocker(self.meta, tasks, loop)
            if reason is None:
                return ["compiled"]
            if "compiled" not in self.meta.path_policy.failed:  # that failure was warned about
                self._warn_fallback(reason)
        if self.vectorize is True:
            return ["vmap"]
        return ["loop", "vmap"] if vmap_blocker(self.meta.model, loop, tasks) is None else ["loop"]

    def _choose(self, key: tuple[Any, ...] | None, candidates: Sequence[str]) -> str | None:
        """The path for ``key`` among ``candidates`` (``None`` for a rank without tasks).

        With several processes and a measured choice (``vectorize=None``) every rank takes rank
        0's choice (one broadcast), so that rank 0's path state, which a checkpoint carries,
        decides for all ranks; a rank that cannot take it uses its own.
        """
        policy = self.meta.path_policy
        path = policy.choose(key, candidates) if candidates else None
        if self.vectorize is not None or self.meta.world_size == 1:
            return path
        agreed = collectives.broadcast_index(
            -1 if path is None else PATHS.index(path),
            self.meta.process_group,
            self.meta._unique_params()[0].device,
        )
        return PATHS[agreed] if agreed >= 0 and PATHS[agreed] in candidates else path

    @staticmethod
    def _key(loop: InnerLoop, tasks: list[Task], evaluation: bool) -> tuple[Any, ...]:
        first = tasks[0]
        shapes = tuple(tuple(getattr(first, f).shape) for f in ("support_x", "query_x"))
        return (evaluation, len(tasks), shapes, loop.inner_steps, loop.second_order)

    def train_step(self, tasks: Sequence[Task]) -> float:
        """Run one meta-update on ``tasks`` and return the mean query loss (before the update).

        (Also available under its former name ``meta_step``.) A skipped (non-finite) meta-step
        counts towards :meth:`fit`'s ``max_skipped_steps``, and a taken one resets the count. A
        schedule-free outer optimizer is switched to train mode first; if it was in eval mode and
        the meta-step raises, it is left in eval mode with the weights it had.

        Args:
            tasks: The meta-batch (anything ``list()`` takes, such as a map-style dataset); with a distributed ``meta``, this rank's share of it.

        Returns:
            The meta-loss as a Python float (distributed: the mean over every rank's tasks).

        Raises:
            TypeError: ``tasks`` is not a sequence of Task.
            ValueError: ``tasks`` is empty, or a task's support set is empty while inner steps
                would adapt on it (as :meth:`~samgria.meta.base.MetaOptimizer.task_losses`).
        """
        tasks = _task_list("tasks", tasks)
        if not tasks:
            raise ValueError("tasks must not be empty, got 0 tasks")
        meta = self.meta
        loop = meta.inner_loop(**self.inner_options)
        tasks = meta._check_tasks(tasks, loop.inner_steps)
        candidates = self._candidates(loop, tasks, evaluation=False)
        policy = meta.path_policy
        key = self._key(loop, tasks, evaluation=False)
        path = cast(str, self._choose(key, candidates))  # candidates is never empty: a path
        # A compiled path that fails falls back to the path that runs without compile=True: vmap
        # when it was asked for, else the loop. Only an uncompiled path can be the one asked for.
        fallback = "vmap" if path == "compiled" and self.vectorize is True else "loop"
        explicit = self.vectorize is True and path != "compiled"
        weights = [1.0 / len(tasks)] * len(tasks) if meta.outer_update == "meta_gradient" else None

        def run(which: str) -> torch.Tensor:
            meta.zero_grad()
            if which == "compiled":
                loss = self._compiled_for().backward(tasks)
                meta.add_task_weight(float(len(tasks)))  # the other paths record each task
                return loss
            losses, _ = meta.run_tasks(tasks, self.loss_fn, loop, path=which, backward_weights=weights)
            return losses.detach().mean()

        def closure() -> torch.Tensor:
            loss, used = policy.timed(key, path, lambda: policy.run(path, fallback, run, explicit=explicit))
            self.path = used
            return loss

        skipped_before = meta.skipped_steps
        with self._train_mode():
            loss = meta.step(closure)
        # Skipped meta-steps in a row, over train_step and fit calls (fit bounds them).
        self._consecutive_skips = self._consecutive_skips + 1 if meta.skipped_steps > skipped_before else 0
        if meta.world_size > 1:
            self._gather_rng_states()
        return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)

    def _gather_rng_states(self) -> None:
        """Keep every rank's torch CPU random state (one ``all_gather`` on the device of the
        meta-parameters, which is the process group's: CPU for gloo, the GPU for NCCL)."""
        meta = self.meta
        local = torch.get_rng_state().to(meta._unique_params()[0].device)
        gathered = [torch.empty_like(local) for _ in range(meta.world_size)]
        collectives._dist().all_gather(gathered, local, group=meta.process_group)
        self._rng_states = [state.cpu() for state in gathered]

    #: Former name of :meth:`train_step` (``samgria.meta_step`` is the task-by-task builder).
    meta_step = train_step

    # -- a schedule-free outer optimizer's modes (train() / eval(), passed on by the wrappers) --
    @contextmanager
    def _train_mode(self) -> Iterator[None]:
        """A meta-step in train mode: an outer optimizer with ``train``/``eval`` is switched to
        train mode first; if it was in eval mode and the step raises, it goes back to eval mode
        with the model's (averaged) weights as they were, bit for bit."""
        meta = self.meta
        if not _has_modes(meta):
            yield
            return
        params = meta._unique_params()
        averaged = None if _in_train_mode(meta) else [p.detach().clone() for p in params]
        try:
            meta.train()
            yield
        except BaseException:
            if averaged is not None:
                meta.eval()
                _put_back(params, averaged)
            raise

    @contextmanager
    def _averaged_weights(self) -> Iterator[None]:
        """An evaluation at the weights a schedule-free outer optimizer evaluates at: one in train
        mode is switched to eval mode, and back to train mode afterwards, also when the evaluation
        raises, with the training weights put back bit for bit (a switch there and back rounds,
        which would make ``eval_every`` change the training run); if ``eval()`` or the evaluation
        raises, the param groups' values and the state's keys are put back too. One already in
        eval mode, one that has not stepped yet (its two sequences are one), and an optimizer
        without ``train``/``eval``, are left as they are."""
        meta = self.meta
        if not _has_modes(meta) or not _in_train_mode(meta) or not any(meta.state.values()):
            # Before its first step the two sequences are one (ScheduleFree's eval() moves
            # nothing then; SPlus's raises KeyError, leaving a key that breaks its first step).
            yield
            return
        params = meta._unique_params()
        training = [p.detach().clone() for p in params]
        groups, structure = GroupValues(meta.param_groups), StateStructure(meta.state)
        try:
            meta.eval()
            yield
        except BaseException:
            # eval() or the evaluation raised: the modes, the keys eval() added to the state (SPlus
            # adds one per parameter before one it cannot average raises) and the weights as before.
            try:
                meta.train()
            finally:
                groups.restore()
                structure.restore()
                _put_back(params, training)
            raise
        meta.train()
        _put_back(params, training)

    def _compiled_for(self) -> CompiledMetaLoss:
        if self._compiled is None:
            self._compiled = CompiledMetaLoss(self.meta, self.loss_fn, **self.inner_options, **self.compile_options)
        return self._compiled

    def _warn_fallback(self, reason: str) -> None:
        """Warn once per distinct reason that the uncompiled path is used."""
        if reason not in self._fallback_reasons:
            self._fallback_reasons.add(reason)
            warnings.warn(
                f"MetaTrainer(compile=True): {reason}; using the uncompiled path",
                RuntimeWarning,
                stacklevel=stacklevel_outside(),
            )

    def evaluate(self, tasks: Sequence[Task], inner_steps: int | None = None, *, steps: int | None = None) -> float:
        """Mean post-adaptation query loss over ``tasks``; the model is left untouched, and so is
        torch's global random state (dropout draws from a fork of it), so ``eval_every`` does not
        change the training run.

        No second-order graph is built (the inner loop runs first-order). The inner loop is the
        one of training (the trainer's ``inner_step_fn``, ``inner_reg_fn`` and
        ``grad_transforms``), and the path follows ``vectorize`` as in training: measured when
        ``None``, with the same fallback to the loop (once, with a warning, remembered for
        training and evaluation alike) if vmap fails on the model.

        A schedule-free outer optimizer in train mode is evaluated in eval mode (at its averaged
        weights) and returned to train mode with the training weights as they were, bit for bit,
        also when the evaluation raises.

        With a distributed ``meta`` this is a collective: every rank calls it with the same
        ``tasks``; each rank evaluates its contiguous share (possibly empty when there are fewer
        tasks than ranks) and every rank returns the mean over all of ``tasks``.

        Args:
            tasks: Held-out tasks.
            inner_steps: Inner steps (default: the meta-optimizer's ``inner_steps``).
            steps: Former name of ``inner_steps``.

        Returns:
            The mean query loss after adaptation, as a Python float.

        Raises:
            TypeError: ``tasks`` is not a sequence of Task.
            ValueError: ``tasks`` is empty, or a task's support set is empty while inner steps
                would adapt on it (as :meth:`~samgria.meta.base.MetaOptimizer.task_losses`).
        """
        tasks = _task_list("tasks", tasks)
        if not tasks:
            raise ValueError("tasks must not be empty, got 0 tasks")
        meta = self.meta
        inner_steps = one_steps_argument(inner_steps, steps)
        loop = meta.inner_loop(inner_steps, create_graph=False, track_graph=False, **self.inner_options)
        tasks = meta._check_tasks(tasks, loop.inner_steps)
        if meta.world_size > 1:
            start, stop = shard_bounds(len(tasks), meta.rank, meta.world_size)
            tasks = tasks[start:stop]
        losses = None
        if not tasks:  # a rank without held-out tasks still takes part in the collectives
            self._choose(None, [])
        else:
            candidates = self._candidates(loop, tasks, evaluation=True)
            policy = meta.path_policy
            key = self._key(loop, tasks, evaluation=True)
            path = cast(str, self._choose(key, candidates))  # candidates is never empty: a path
            explicit = self.vectorize is True

            def run(which: str) -> torch.Tensor:
                with torch.no_grad(), rng_untouched(meta.model):
                    return meta.run_tasks(tasks, self.loss_fn, loop, path=which, record=False)[0]

            with self._averaged_weights():
                losses, _ = policy.timed(key, path, lambda: policy.run(path, "loop", run, explicit=explicit))
        return meta.mean_query_loss(losses)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """A snapshot of the training state (copies, safe to keep while training goes on).

        Returns:
            A dict that ``torch.save`` writes and ``torch.load`` (``weights_only=True``) reads:
            ``"version"``, ``"iteration"``, ``"history"`` (the :class:`History` as a dict),
            ``"model"`` (``model.state_dict()``), ``"meta"`` (the meta-optimizer's
            ``state_dict()``: outer optimizer state, Meta-SGD's rates), ``"skipped_steps"``,
            ``"consecutive_skips"`` (the skipped meta-steps in a row that ``max_skipped_steps``
            counts, over ``fit`` and ``train_step`` calls; a checkpoint without it loads as 0), ``"sampler"`` (the sampler's state: its ``state_dict()`` or its generator's, see
            :class:`~samgria.TaskSampler`), ``"rng"`` (torch's global CPU random state, which
            a sampler without a generator of its own and dropout on the CPU draw from; a model on
            a GPU draws its dropout masks from the CUDA generators, which are not saved: keep
            ``torch.cuda.get_rng_state_all()`` beside the checkpoint to resume it bit for bit) and ``"paths"``
            (the last path and the path policy's measurements and failures, so a resumed run
            makes the same choice).

            With one process ``"rng"`` is that state (a ``uint8`` tensor). With a distributed
            ``meta`` it is a list of one state per rank, in rank order: the calling rank's as it
            is now, every other rank's as it was at the end of the last :meth:`train_step` (the
            trainer gathers them there), or as loaded by :meth:`load_state_dict` if no step ran
            since (what another rank draws outside the trainer after its last step is not
            seen). Before either, the other ranks' states are unknown and the calling rank's
            stands in for them. No collective runs, so rank 0 alone may call this.
        """
        policy = self.meta.path_policy
        local = torch.get_rng_state()
        rng: torch.Tensor | list[torch.Tensor] = local
        world_size = self.meta.world_size
        if world_size > 1:
            known = self._rng_states
            states = list(known) if known is not None and len(known) == world_size else [local] * world_size
            states[self.meta.rank] = local
            rng = states
        state = {
            "version": self.STATE_VERSION,
            "iteration": self.iteration,
            "history": dataclasses.asdict(self.history),
            "model": self.meta.model.state_dict(),
            "meta": self.meta.state_dict(),
            "skipped_steps": self.meta.skipped_steps,
            "consecutive_skips": self._consecutive_skips,
            "sampler": sampler_state_dict(self.sampler),
            "rng": rng,
            "paths": {
                "path": self.path,
                "failed": dict(policy.failed),
                "timings": {key: {path: list(times) for path, times in by_path.items()}
                            for key, by_path in policy.timings.items()},  # fmt: skip
                "fallback_reasons": sorted(self._fallback_reasons),
            },
        }
        return copy.deepcopy(state)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, so that :meth:`fit` continues where it was saved.

        Everything is checked or loaded before anything of the trainer changes; when a part
        refuses (a model of another architecture, a sampler state of another kind), the
        meta-optimizer, the model, the sampler and torch's random state are put back as they
        were, and the exception propagates.

        Torch's random state is ``state_dict["rng"]``: with a distributed ``meta``, every rank
        loads the same checkpoint and takes its own rank's entry of a per-rank list; a single
        state (a checkpoint of one process) is set on every rank. A per-rank list from another
        number of ranks is refused. Random states that ``torch.load(map_location=...)`` moved
        off the CPU (torch's and the sampler's) are moved back, as torch sets them only from
        the CPU.

        Args:
            state_dict: What :meth:`state_dict` returned (or ``torch.load`` read back).

        Raises:
            TypeError: ``state_dict`` is not a mapping, its ``"history"`` is not a mapping of
                lists of numbers, an entry of its ``"paths"`` is of the wrong kind, or its ``"rng"`` is neither a random state (a 1-D
                ``torch.uint8`` tensor) nor a list of them.
            ValueError: It lacks an entry, has another version, a ``"history"`` without exactly
                :class:`History`'s fields (or with an iteration below 1, or not one per
                evaluation loss), a ``"paths"`` without exactly the entries :meth:`state_dict`
                saves (or with an unknown path, or a duration that is negative or not finite),
                or holds the random states of another number of ranks than this run's.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict from MetaTrainer.state_dict(), got {type(state_dict).__name__}")
        keys = {"version", "iteration", "history", "model", "meta", "skipped_steps", "sampler", "rng", "paths"}
        missing = sorted(keys - set(state_dict))
        if missing:
            raise ValueError(f"state_dict must hold every entry of MetaTrainer.state_dict(), missing {missing}")
        if state_dict["version"] != self.STATE_VERSION:
            raise ValueError(f"state_dict['version'] must be {self.STATE_VERSION}, got {state_dict['version']!r}")
        state = copy.deepcopy(dict(state_dict))
        history = _history_of(state["history"])
        skipped_steps = check_int("state_dict['skipped_steps']", state["skipped_steps"], low=0)
        consecutive_skips = check_int("state_dict['consecutive_skips']", state.get("consecutive_skips", 0), low=0)
        iteration = check_int("state_dict['iteration']", state["iteration"], low=0)
        path, failed, timings, fallback_reasons = _paths_of(state["paths"])
        # A checkpoint of a run without the bound (or of a larger max_keys) keeps its most
        # recent keys: the last ones, timings being kept least recently used first.
        timings = dict(list(timings.items())[-self.meta.path_policy.max_keys :])
        rng_states = self._rng_states_of(state["rng"])
        # The meta-optimizer validates before it changes anything, but the model (torch copies
        # the matching entries before it reports the others), the sampler and the random state
        # come after it: if any of them refuses, what was loaded before is put back.
        before, rng_before = self.state_dict(), torch.get_rng_state()
        try:
            self._load_components(state, rng_states[self.meta.rank])
        except BaseException:
            self._load_components(before, rng_before)
            raise
        self._rng_states = rng_states if self.meta.world_size > 1 else None
        self.meta.skipped_steps = skipped_steps
        self._consecutive_skips = consecutive_skips
        self.iteration = iteration
        self.history = history
        policy = self.meta.path_policy
        policy.failed = failed
        policy.timings = timings
        self.path = path
        self._fallback_reasons = fallback_reasons

    def _rng_states_of(self, rng: Any) -> list[torch.Tensor]:
        """The random state of every rank of this run from a checkpoint's ``"rng"``: a single
        state (one process) for every rank, or a per-rank list of this run's number of ranks."""
        world_size = self.meta.world_size
        if isinstance(rng, torch.Tensor):
            return [_cpu_random_state("state_dict['rng']", rng)] * world_size
        if not isinstance(rng, (list, tuple)) or not all(isinstance(r, torch.Tensor) for r in rng):
            raise TypeError(
                "state_dict['rng'] must be torch's random state (a tensor) or a list of one per rank, "
                f"got {type(rng).__name__}"
            )
        if len(rng) != world_size:
            raise ValueError(
                f"state_dict['rng'] holds the random states of {len(rng)} ranks, but this run has "
                f"{world_size}: a checkpoint of a distributed run resumes on the same number of ranks"
            )
        # A checkpoint read with torch.load(map_location="cuda") holds them on the GPU.
        return [_cpu_random_state(f"state_dict['rng'][{i}]", r) for i, r in enumerate(rng)]

    def _load_components(self, state: Mapping[str, Any], rng: torch.Tensor) -> None:
        """Load the meta-optimizer, the model, the sampler and torch's random state ``rng``."""
        self.meta.load_state_dict(state["meta"])
        self.meta.model.load_state_dict(state["model"])
        load_sampler_state_dict(self.sampler, state["sampler"])
        torch.set_rng_state(rng)

    def fit(
        self,
        num_iterations: int,
        meta_batch_size: int,
        *,
        eval_every: int | None = None,
        eval_tasks: Sequence[Task] | None = None,
        callback: Callable[[int, float], object] | None = None,
        progress: bool | None = None,
    ) -> History:
        """Meta-train for ``num_iterations`` outer updates.

        Iterations are counted over the trainer's life (:attr:`iteration`): after
        :meth:`load_state_dict`, or a previous call, the count continues, and ``eval_every`` and
        ``callback`` see the continued count.

        A meta-iteration that raises (an error, or ``KeyboardInterrupt``) before its update
        completes is not counted and leaves nothing behind: the meta-optimizer puts the weights
        and its state back, and the sampler's state (its ``state_dict()`` or its ``generator``'s)
        and torch's CPU random state are restored to where they were before it drew its tasks,
        so a :meth:`state_dict` saved then, or another ``fit``, continues as the uninterrupted
        run. (An exception from an evaluation or ``callback`` comes after the update: that
        iteration is counted.)

        Args:
            num_iterations: Number of meta-updates to take now (``>= 1``).
            meta_batch_size: Tasks sampled per meta-update (``>= 1``); with a distributed
                ``meta``, the global meta-batch (at least one task per rank), of which each rank
                adapts its share.
            eval_every: Evaluate on ``eval_tasks`` whenever the iteration count is a multiple
                of ``eval_every``.
            eval_tasks: Held-out tasks (the same on every rank). Required with
                ``eval_every``; given alone they are evaluated once, after the last meta-update.
            callback: ``callback(iteration, meta_loss)`` after each meta-update (and after the
                evaluation ``eval_every`` schedules at that iteration, so :attr:`history` and a
                :meth:`state_dict` saved by the callback hold it), where ``iteration`` counts
                completed updates (1-based, continued across calls).
                Returning a true value (``True``, ``np.True_``, a one-element tensor holding
                ``True``) stops training early; ``None`` or a false value continues.
            progress: ``None`` shows a progress bar with the running meta-loss (a moving
                average of the finite ones: a skipped step's loss is left out) on stderr
                only when stderr is a terminal (distributed: on rank 0 only); ``True`` always
                shows it; ``False`` never.

        Returns:
            The :class:`History` of this call's meta-losses and evaluation losses (
            :attr:`history` holds every call's).

        Raises:
            TypeError: An argument has the wrong type, or the sampler returns something other
                than an iterable of tasks (a list, a generator).
            ValueError: ``num_iterations``/``meta_batch_size``/``eval_every`` is below 1,
                ``meta_batch_size`` is below the number of processes, ``eval_every`` is given
                without ``eval_tasks``, ``eval_tasks`` is empty, or the sampler returns the
                wrong number of tasks.
        """
        num_iterations = check_int("num_iterations", num_iterations, low=1)
        meta_batch_size = check_int("meta_batch_size", meta_batch_size, low=1)
        world_size = self.meta.world_size
        if meta_batch_size < world_size:
            raise ValueError(
                f"meta_batch_size must be >= the number of processes ({world_size}) so that every rank "
                f"adapts a task, got {meta_batch_size}"
            )
        if eval_every is not None:
            eval_every = check_int("eval_every", eval_every, low=1)
            if eval_tasks is None:
                raise ValueError(f"eval_every={eval_every} needs eval_tasks, got eval_tasks=None")
        if eval_tasks is not None:
            eval_tasks = _task_list("eval_tasks", eval_tasks)
            if not eval_tasks:
                raise ValueError("eval_tasks must not be empty, got 0 tasks")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        progress = check_optional_bool("progress", progress)

        stream = sys.stderr
        on_terminal = hasattr(stream, "isatty") and stream.isatty() and self.meta.rank == 0
        show = progress is True or (progress is None and on_terminal)
        bar = _ProgressBar(num_iterations, stream) if show else None
        history = History()
        histories = (history, self.history)
        try:
            for done in range(1, num_iterations + 1):
                iteration = self.iteration + 1
                draws = self._draw_point()
                try:
                    tasks = self._sample(meta_batch_size)
                    loss = self.train_step(tasks)  # counts the skipped meta-steps in a row
                except BaseException as error:
                    # The meta-optimizer put the weights and its state back; the tasks and the
                    # random numbers the iteration drew are given back too, so that it did not
                    # happen (a checkpoint saved now resumes as the uninterrupted run).
                    self._return_to(draws, error)
                    raise
                self.iteration = iteration
                for h in histories:
                    h.meta_loss.append(loss)
                # A taken step resets the count to 0, so only a skipped one can reach the bound.
                if self._consecutive_skips >= self.max_skipped_steps:
                    raise RuntimeError(
                        f"MetaTrainer.fit: {self._consecutive_skips} consecutive meta-steps were skipped "
                        f"because the meta-loss or meta-gradient was not finite (last meta-loss "
                        f"{loss} at iteration {iteration}); lower the learning rates or check the "
                        f"data (max_skipped_steps={self.max_skipped_steps})"
                    )
                eval_loss = None
                # The scheduled evaluation comes before the callback, so that a checkpoint the
                # callback saves holds this iteration's evaluation in its history.
                # eval_every implies eval_tasks (checked above); the test narrows the type.
                if eval_every is not None and eval_tasks is not None and iteration % eval_every == 0:
                    eval_loss = self._record_evaluation(eval_tasks, iteration, histories)
                stop = callback is not None and bool(callback(iteration, loss))
                if eval_tasks is not None and eval_every is None and (done == num_iterations or stop):
                    eval_loss = self._record_evaluation(eval_tasks, iteration, histories)
                if bar is not None:
                    bar.update(done, loss, eval_loss)
                if stop:
                    break
        finally:
            if bar is not None:
                bar.close()
        return history

    def _draw_point(self) -> tuple[Any, torch.Tensor]:
        """What a meta-iteration draws from: a copy of the sampler's state (``None`` for a sampler
        that has none) and torch's CPU random state."""
        return copy.deepcopy(sampler_state_dict(self.sampler)), torch.get_rng_state()

    def _return_to(self, draws: tuple[Any, torch.Tensor], error: BaseException) -> None:
        """Restore what :meth:`_draw_point` returned after ``error``; a sampler that refuses its
        own state (one with ``state_dict`` but no ``load_state_dict``) does not hide ``error``:
        its refusal becomes a note of ``error`` (Python 3.11+)."""
        sampler_state, rng = draws
        torch.set_rng_state(rng)
        try:
            load_sampler_state_dict(self.sampler, sampler_state)
        except Exception as refusal:
            if hasattr(error, "add_note"):
                error.add_note(f"MetaTrainer.fit could not restore the sampler's state: {refusal!r}")

    def _record_evaluation(self, eval_tasks: Sequence[Task], iteration: int, histories: Sequence[History]) -> float:
        """Evaluate on ``eval_tasks`` and append the loss at ``iteration`` to ``histories``."""
        eval_loss = self.evaluate(eval_tasks)
        for h in histories:
            h.eval_loss.append(eval_loss)
            h.eval_iterations.append(iteration)
        return eval_loss

    def _sample(self, meta_batch_size: int) -> list[Task]:
        """This iteration's tasks: the meta-batch, or with several processes this rank's share."""
        if self.meta.world_size == 1:
            # As train_step takes them (and sample_shard with several processes): any iterable.
            tasks = _task_list(f"sampler.sample({meta_batch_size})", self.sampler.sample(meta_batch_size))
            if len(tasks) != meta_batch_size:
                raise ValueError(f"sampler.sample({meta_batch_size}) returned {len(tasks)} tasks")
            return tasks
        return self._shares.sample(meta_batch_size)
