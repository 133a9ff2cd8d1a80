"""SAM overhead: step time and memory of ``TransformingOptimizer`` + ``SAM`` against their floor.

SAM needs two forward-backward passes and one inner step, so its floor is that work done by a
plain loop. This script measures, in one run:

1. **Time ratio** — SAM step time / (two forward-backward passes + one plain inner step), for a
   20×256 ReLU MLP (batch 64) and a small conv net with BatchNorm (32×32 inputs, batch 64),
   with momentum SGD as the inner optimizer. Targets on the CPU: ≤ 1.10 (MLP), ≤ 1.03 (conv).
   Rows: samgria ``step(closure)``, samgria ``first_step()``/``second_step()``, a diagnostic
   row of ``step(closure)`` without the non-finite check of the second pass's gradients (what
   the non-finite policy costs; not a mode the library offers), ``step(closure)`` with
   ``atomic="full"`` (a copy of the weights and the inner optimizer's state before every inner
   step), and three
   reference SAMs written inline below: the "naive" SAM (davda54's first version:
   ``e_w = rho·g/‖g‖`` stored per parameter, ``p.add_(e_w)``, then ``p.sub_(e_w)``), davda54/sam
   as it is today (``old_p = p.data.clone()``, ``p.add_(e_w)``, restore by ``p.data = old_p``) and
   pytorch_optimizer's SAM (``old_p = p.clone()``, ``p.add_(e_w)``, restore by
   ``p.copy_(old_p)``), both without the ``1.0 *`` multiplication the two libraries run for
   ``adaptive=False`` (davda54 in the norm and in ``e_w``, pytorch_optimizer 4.1 in ``e_w``; the
   real classes are slightly slower and peak
   higher, so the rows flatter them). Every variant has its own model copy; the
   variants are timed interleaved (round-robin, in a rotating order), and each ratio is the
   median of the per-round ratios to the baseline timed in the same round, so that load from
   other processes hits numerator and denominator alike. Every such step starts with the caches
   full of another variant's model; the "in a row" column (:func:`time_in_a_row`) times steps
   that follow a step of the same optimizer, as in a training loop (each variant runs a few
   steps per round; the first one is not timed), so it also shows what a variant's memory
   traffic costs once its own buffers are warm.
2. **Peak extra memory** of a SAM step over the plain two-pass step, in multiples of the
   parameter bytes (target ≤ 1.0×). CPU PyTorch has no allocator statistics, so live tensor
   bytes are tracked with a ``TorchDispatchMode`` (:class:`LiveBytes`): an op's output storage
   that is none of its inputs' storages is a new allocation, counted once, and un-counted by a
   ``weakref.finalize`` on the storage's Python object (PyTorch keeps one per storage) when
   the storage is freed -- also when it was passed around without an op (``param.data = t``).
   This sees every tensor an op creates during the step -- activations, gradients (also those
   the autograd engine makes), optimizer buffers -- and nothing made before the step starts.
   Every step starts with ``grad = None`` (``zero_grad()``) and existing optimizer state.
3. **Memory kept between steps** beyond the inner optimizer's: "extra kept" is the bytes
   allocated during the step and still live after it, minus the plain step's (which keeps its
   gradients); "state" is the bytes of the wrapper's per-parameter transform state (for the
   naive SAM: its ``e_w``). samgria's SAM keeps its weight backup (1.00x, by design: allocated
   once, it keeps the process peak of section 4 down); LAMP keeps its running sum. (The
   davda54-style row reads 1.00x kept although it keeps nothing net: its weights move into the
   clone made during the step, and the old weight storage, made before the step, is freed --
   the tracker counts only storages made during the step.) For samgria, "state" counts the
   transforms' slots of ``optimizer.state`` and the weight backup SAM keeps between steps.
4. **Process peak memory** (max RSS), which is what the operating system, a container limit or
   a cluster scheduler sees, beside the live-tensor peak, for a GPT-style decoder (5.3M
   parameters) with AdamW: plain two-pass AdamW, samgria (default; ``atomic=False``;
   ``atomic=False`` with a closure that returns ``loss.detach()``), davda54-style and pytorch_optimizer-style. Each
   variant runs in its own fresh single-thread process (``--peak-reps`` of them): peak RSS
   (``VmHWM``, reset once the model and optimizer are built) minus the RSS at that point, per
   parameter byte, then the live-tensor peak of one more step. The two measures differ because
   glibc malloc serves tensors up to its dynamic mmap threshold (raised to the largest freed
   block, so soon every activation and gradient size) from the heap, and a heap region freed in
   the middle is never given back: the process peak is the heap's high-water mark, which grows
   whenever a pass cannot reuse the holes the previous one left. Measured causes: memory kept alive *across the re-evaluation* that was allocated among
   the first pass's activations -- the first gradients (samgria's ``.data`` swap writes w + e
   into them) and the first loss's autograd graph (returned by ``step``) -- makes the second
   pass lay its activations out anew. Single runs vary by about ±0.2x (heap layout); the
   medians over ``--peak-reps`` are what to compare.

5. **LookSAM** (``--looksam-only`` runs just this section, writing no files): step time of
   ``LookSAM(k)`` for k = 5 and 10, of SAM and -- when installed -- of pytorch_optimizer's
   LookSAM, against a plain *one-pass* step (one forward-backward pass and one inner step), with
   the ideal ratio (passes per step: 1 + 1/k for LookSAM, 2 for SAM). LookSAM alternates SAM
   steps and one-pass steps, so ratios are taken over blocks of lcm(k) interleaved rounds.

6. **The SAM family against pytorch_optimizer** (``--family-only`` runs just this section,
   writing no files; skipped with one line when pytorch_optimizer is not installed): samgria's
   ASAM, GSAM, WSAM (decoupled and coupled), FriendlySAM and SAM against pytorch_optimizer's same
   algorithms, set up as tests/test_transforms_sam_family.py sets them up to find them equal, on
   the first of ``--models``, interleaved with the plain two-pass step and its A/A row. Per pair:
   the median and IQR of the per-round ratio samgria / pytorch_optimizer. One torch thread, steps
   timed in CPU time (``time.thread_time``): on a shared machine wall time moves by more than
   these differences (a few %), and a step's CPU time does not count waiting for a core.
   ``--family-rounds`` rounds (80; 12 with ``--quick``, a smoke test rather than a measurement).

The "(A/A)" row times the plain step a second time: its ratio shows the noise floor.
"faults" is the median number of minor page faults per step. With glibc's default settings a
step whose transient peak is above the previous step's re-faults that memory (about 1 µs per
4 KiB page): a SAM that allocates 1× the parameters during the step and frees it when the
weights are restored (the davda54-style and pytorch_optimizer-style rows' clones) can pay this
every step, while samgria's SAM (its backup buffer kept between steps) and the naive SAM (its
``e_w`` kept) do not. ``--retain-freed-memory`` asks glibc to keep freed memory (as jemalloc or
tcmalloc do, which PyTorch's CPU performance guides recommend) to measure without that effect.

Usage::

    python benchmarks/sam_overhead.py --quick        # CI, 1-2 minutes on 2 cores
    python benchmarks/sam_overhead.py --looksam-only --quick   # section 5 alone
    python benchmarks/sam_overhead.py --family-only --models mlp   # section 6 alone (80 rounds)
    python benchmarks/sam_overhead.py                # more repetitions
    python benchmarks/sam_overhead.py --profile      # also a torch.profiler table of a SAM step
    python benchmarks/sam_overhead.py --retain-freed-memory --threads 1
    python benchmarks/sam_overhead.py --models mlp --peak-reps 5   # process peak, 5 processes each

Prints a table; when matplotlib is importable writes ``benchmarks/results/sam_overhead.png``
and ``benchmarks/results/sam_overhead.json``. A run without ``--quick`` also copies the figure to
``docs/images/sam_overhead.png`` for the docs' benchmarks page.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from samgria import LAMP, SAM, TransformingOptimizer  # noqa: E402
from _checks import int_at_least, number_in  # noqa: E402
from _docs_figures import publish_figures  # noqa: E402
from _process import minor_faults, peak_rss_bytes, reset_peak_rss, retain_freed_memory, rss_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"mlp": 1.10, "conv": 1.03}
RHO, LR, MOMENTUM = 0.05, 1e-3, 0.9


# -- models and data ---------------------------------------------------------------------------------
def make_mlp() -> nn.Module:
    """20 hidden ReLU layers of width 256 (input 256, 10 classes)."""
    layers: list[nn.Module] = []
    for _ in range(20):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10))


def make_conv() -> nn.Module:
    """A small VGG-style net with BatchNorm for 3×32×32 inputs."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16), *block(16, 16), nn.MaxPool2d(2),
        *block(16, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (make_mlp, (64, 256)),
    "conv": (make_conv, (64, 3, 32, 32)),
}


def make_batch(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator), torch.randint(0, 10, (shape[0],), generator=generator)


# -- the naive SAM the field uses (davda54-style), for comparison -------------------------------------
class NaiveSAM(torch.optim.Optimizer):
    """The widely used PyTorch SAM, first version: ``e_w`` stored per parameter, add then subtract."""

    def __init__(self, params: Any, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05, **kwargs: Any):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grads = [p.grad.norm(p=2) for group in self.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.norm(torch.stack(grads), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = p.grad * scale.to(p)
                p.add_(e_w)
                self.state[p]["e_w"] = e_w
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.sub_(self.state[p]["e_w"])
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


class Davda54SAM(torch.optim.Optimizer):
    """The widely used PyTorch SAM (davda54/sam) as it is today: ``old_p = p.data.clone()`` kept in
    ``state``, ``p.add_(e_w)`` in place, and ``p.data = old_p`` to restore (the weights move to the
    clone's storage every step; the perturbed storage is freed). Without its ``1.0 *`` factor for
    ``adaptive=False`` (one multiplication per tensor in the norm and in ``e_w``)."""

    def __init__(self, params: Any, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05, **kwargs: Any):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grads = [p.grad.norm(p=2) for group in self.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.norm(torch.stack(grads), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


class PytorchOptimizerSAM(torch.optim.Optimizer):
    """pytorch_optimizer's SAM, same algorithm: ``old_p = p.clone()`` (in the base optimizer's state),
    ``p.add_(e_w)`` in place, and ``p.copy_(state.pop("old_p"))`` to restore (the weights stay in
    their storage; the clone is freed). Without its ``1.0 *`` factor for ``adaptive=False`` (one
    multiplication per tensor in ``e_w``; its norm is ``torch._foreach_norm`` of the gradients)."""

    def __init__(self, params: Any, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05, **kwargs: Any):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        norms = [p.grad.norm(p=2) for group in self.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.norm(torch.stack(norms), p=2).add_(1e-12)
        for group in self.param_groups:
            scale = group["rho"] / grad_norm
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.clone()
                e_w = p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.copy_(self.state[p].pop("old_p"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


# -- the variants timed ---------------------------------------------------------------------------------
class Variant:
    """One way of taking a training step, on its own copy of the model."""

    def __init__(self, name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.name = name
        self.model = model
        self.x, self.y = batch
        self.optimizer: torch.optim.Optimizer = self.build()

    def build(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def loss(self) -> torch.Tensor:
        return F.cross_entropy(self.model(self.x), self.y)

    def step(self) -> None:
        raise NotImplementedError

    def transform_state_bytes(self) -> int:
        """Bytes of per-parameter state beyond the inner optimizer's, kept between steps."""
        return 0


class Baseline(Variant):
    """The floor: two forward-backward passes and one plain inner step."""

    def build(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)

    def step(self) -> None:
        self.optimizer.zero_grad()
        self.loss().backward()
        self.optimizer.zero_grad()
        self.loss().backward()
        self.optimizer.step()


class SamgriaClosure(Variant):
    #: Keyword arguments of ``TransformingOptimizer`` beside the inner optimizer's.
    options: dict[str, Any] = {}

    def transforms(self) -> list[Any]:
        return [SAM(rho=RHO)]

    def build(self) -> torch.optim.Optimizer:
        return TransformingOptimizer(
            self.model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, transforms=self.transforms(), **self.options
        )

    def closure(self) -> torch.Tensor:
        self.optimizer.zero_grad()
        loss = self.loss()
        loss.backward()
        return loss

    def step(self) -> None:
        self.optimizer.step(self.closure)

    def transform_state_bytes(self) -> int:
        # optimizer.state holds the inner optimizer's keys too: count only the transforms' slots
        # ("<slot>.<key>"), plus the weight backup SAM keeps between steps.
        slots = tuple(f"{slot}." for slot in self.optimizer.slots)
        kept = {p: {k: v for k, v in s.items() if k.startswith(slots)} for p, s in self.optimizer.state.items()}
        backups = {
            id(buffer): {"backup": buffer}
            for transform in self.optimizer.transforms
            for _ref, buffer in transform.__dict__.get("_backups", {}).values()
        }
        return _tensor_bytes(kept) + _tensor_bytes(backups)


class SamgriaTwoCall(SamgriaClosure):
    def step(self) -> None:
        self.optimizer.zero_grad()
        self.loss().backward()
        self.optimizer.first_step(zero_grad=True)
        self.loss().backward()
        self.optimizer.second_step()


class SamgriaUnchecked(SamgriaClosure):
    """Diagnostic, not a supported mode: ``step(closure)`` without the non-finite check of the
    re-evaluation's gradients (the optimizer's ``_grads_finite()`` answers ``True`` without
    reading them), to measure what the non-finite policy costs: one more read of every gradient."""

    def step(self) -> None:
        self.optimizer._grads_finite = lambda grad_norm=None: True  # type: ignore[method-assign]
        try:
            self.optimizer.step(self.closure)
        finally:
            del self.optimizer._grads_finite


class SamgriaAtomicFull(SamgriaClosure):
    """``step(closure)`` with ``atomic="full"``: the weights and the inner optimizer's state copied
    before every inner step (what undoes a failure inside torch's step after it began writing)."""

    options = {"atomic": "full"}


class SamgriaLamp(SamgriaClosure):
    def transforms(self) -> list[Any]:
        return [SAM(rho=RHO), LAMP(eps=5e-3, rollback_len=10, seed=0)]


class Naive(Variant):
    def build(self) -> torch.optim.Optimizer:
        return NaiveSAM(self.model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)

    def step(self) -> None:
        self.optimizer.zero_grad()
        self.loss().backward()
        self.optimizer.first_step(zero_grad=True)
        self.loss().backward()
        self.optimizer.second_step()

    def transform_state_bytes(self) -> int:
        return _tensor_bytes({p: {"e_w": s["e_w"]} for p, s in self.optimizer.state.items() if "e_w" in s})


class Davda54(Naive):
    def build(self) -> torch.optim.Optimizer:
        return Davda54SAM(self.model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)

    def transform_state_bytes(self) -> int:
        # old_p *is* the weights between steps (p.data = old_p): nothing beyond them
        return 0


class PytorchOptimizer(Naive):
    def build(self) -> torch.optim.Optimizer:
        return PytorchOptimizerSAM(self.model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)

    def transform_state_bytes(self) -> int:
        return 0  # old_p is popped at the restore


VARIANTS: dict[str, type[Variant]] = {
    "plain two-pass": Baseline,
    "plain two-pass (A/A)": Baseline,  # the noise floor: should read 1.00
    "samgria step(closure)": SamgriaClosure,
    "samgria first/second_step": SamgriaTwoCall,
    "samgria, 2nd-pass check off": SamgriaUnchecked,  # diagnostic: the non-finite policy's cost
    "samgria, atomic='full'": SamgriaAtomicFull,
    "samgria SAM+LAMP": SamgriaLamp,
    "naive SAM (add/sub e_w)": Naive,
    "davda54-style (.data=old_p)": Davda54,
    "pytorch_optimizer-style": PytorchOptimizer,
}
BASELINE = "plain two-pass"
#: Steps per variant and round of the steady-state timing (:func:`time_in_a_row`; half with --quick).
IN_A_ROW = 8


def _tensor_bytes(state: Any) -> int:
    leaves, _ = tree_flatten(dict(state) if not isinstance(state, dict) else state)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build_variants(model_name: str) -> dict[str, Variant]:
    factory, shape = MODELS[model_name]
    batch = make_batch(shape)
    variants = {}
    for name, cls in VARIANTS.items():
        torch.manual_seed(0)
        variants[name] = cls(name, factory(), batch)
    return variants


# -- 1. time ----------------------------------------------------------------------------------------------
def time_variants(
    variants: dict[str, Variant], max_rounds: int, seconds: float, warmup: int, min_rounds: int = 5
) -> dict[str, dict[str, float]]:
    """Round-robin timing in a rotating order, for ``max_rounds`` rounds or ``seconds``.

    ``ratio`` is the median over rounds of (variant time / baseline time in the same round);
    ``min_ratio`` is the ratio of the fastest times (interference from other processes only
    ever adds time, so the minima are its least disturbed estimate).
    """
    names = list(variants)
    faults: dict[str, list[int]] = {name: [] for name in names}
    times = round_robin_times(variants, max_rounds, seconds, warmup, lambda timed: timed >= min_rounds, faults)
    result = {}
    for name in names:
        ratios = sorted(t / b for t, b in zip(times[name], times[BASELINE]))
        quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2 else [ratios[0]] * 3
        result[name] = {
            "median_ms": 1e3 * statistics.median(times[name]),
            "min_ms": 1e3 * min(times[name]),
            "ratio": statistics.median(ratios),
            "ratio_q1": quartiles[0],
            "ratio_q3": quartiles[2],
            "min_ratio": min(times[name]) / min(times[BASELINE]),
            "rounds": len(ratios),
            "page_faults": statistics.median(faults[name]),
        }
    return result


def round_robin_times(
    variants: dict[str, Variant],
    max_rounds: int,
    seconds: float,
    warmup: int,
    enough: Callable[[int], bool],
    faults: dict[str, list[int]] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Every variant's step times, one step per variant and round in a rotating order.

    Runs ``warmup`` untimed rounds, then timed ones: ``max_rounds`` at most, and no more once
    ``seconds`` have passed (wall time) and ``enough(timed rounds)`` holds. ``faults``, when given,
    gets each timed step's minor page faults. ``clock`` times the steps (``time.thread_time``: the
    CPU time of this thread, which with one torch thread is all of a step's work).
    """
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    deadline = None
    round_index = 0
    while round_index < warmup + max_rounds:
        if round_index == warmup:
            deadline = time.perf_counter() + seconds
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            faults_before = minor_faults() if faults is not None else 0
            start = clock()
            variants[name].step()
            elapsed = clock() - start
            if round_index >= warmup:
                times[name].append(elapsed)
                if faults is not None:
                    faults[name].append(minor_faults() - faults_before)
        round_index += 1
        if deadline is not None and time.perf_counter() > deadline and enough(round_index - warmup):
            break
    return times


def in_a_row_times(
    variants: dict[str, Variant], block: int, max_rounds: int, seconds: float, min_rounds: int = 3
) -> dict[str, list[float]]:
    """Per round (rotating order), each variant's time for ``block - 1`` steps after one untimed
    step (see :func:`time_in_a_row`): ``max_rounds`` rounds at most, and no more once ``seconds``
    have passed and ``min_rounds`` were run."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + seconds
    round_index = 0
    while round_index < max_rounds:
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            variant = variants[name]
            variant.step()
            start = time.perf_counter()
            for _ in range(block - 1):
                variant.step()
            times[name].append(time.perf_counter() - start)
        round_index += 1
        if time.perf_counter() > deadline and round_index >= min_rounds:
            break
    return times


def time_in_a_row(
    variants: dict[str, Variant], block: int, max_rounds: int, seconds: float, min_rounds: int = 3
) -> dict[str, float]:
    """Steady-state time ratio: each variant runs ``block`` steps in a row, as a training loop does.

    Per round (rotating order) every variant runs one untimed step -- it finds the caches full of
    the previous variant's model, as every step of the round-robin timing does -- and then
    ``block - 1`` timed steps, which find its own weights, gradients and buffers where the
    previous step left them. Returns each variant's median over rounds of (its time / the
    baseline's time in the same round).
    """
    times = in_a_row_times(variants, block, max_rounds, seconds, min_rounds)
    return {
        name: statistics.median(t / b for t, b in zip(values, times[BASELINE])) for name, values in times.items()
    }




# -- 2. memory ----------------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages allocated by ops while active, and their peak.

    A storage counts from the op that creates it (an output storage that is none of the op's
    inputs' storages) until the storage itself is freed: PyTorch keeps one Python object per
    storage, and a ``weakref.finalize`` on it runs when the last tensor using the storage --
    however it got there (``param.data = ...``, ``param.grad = ...``) -- is gone.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # storage data_ptr -> nbytes
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.live or key in inputs:
                continue  # empty, already counted, or in place / a view of an input
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out


def step_bytes(variant: Variant) -> tuple[int, int]:
    """(peak, still live after the step) bytes allocated during one step that starts with grad None."""
    variant.optimizer.zero_grad()
    gc.collect()
    with LiveBytes() as tracker:
        variant.step()
        gc.collect()
        return tracker.peak, tracker.current


def measure_memory(variants: dict[str, Variant]) -> dict[str, dict[str, float]]:
    param_bytes = _param_bytes(variants[BASELINE].model)
    for variant in variants.values():  # optimizer state exists before the measured step
        variant.step()
    measured = {name: step_bytes(variant) for name, variant in variants.items()}
    peak0, kept0 = measured[BASELINE]
    return {
        name: {
            "peak_mib": peak / 2**20,
            "extra_peak_x_params": (peak - peak0) / param_bytes,
            "extra_kept_x_params": (kept - kept0) / param_bytes,
            "state_x_params": variant.transform_state_bytes() / param_bytes,
        }
        for (name, variant), (peak, kept) in zip(variants.items(), measured.values())
    }


# -- 4. process peak memory: a GPT-style decoder with AdamW, one fresh process per variant -----------------
PEAK_MODEL = {"vocab": 1024, "d_model": 256, "layers": 6, "heads": 4, "seq": 64, "batch": 4}  # 5.28M parameters
ADAMW = {"lr": 1e-3, "weight_decay": 0.01}


class TinyGPT(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-norm causal self-attention blocks, LM head."""

    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        block = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos[:t]
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def _samgria_sam(params: Any, **extra: Any) -> torch.optim.Optimizer:
    return TransformingOptimizer(params, torch.optim.AdamW, **ADAMW, transforms=[SAM(rho=RHO)], **extra)


def _accepts_atomic() -> bool:
    import inspect

    return "atomic" in inspect.signature(TransformingOptimizer.__init__).parameters


PEAK_VARIANTS: dict[str, str] = {
    "plain AdamW two-pass": "plain",
    "samgria step(closure)": "samgria",
    "samgria, atomic=False": "samgria-nonatomic",
    "samgria, atomic=False, loss.detach()": "samgria-detached-loss",  # the closure returns loss.detach()
    "davda54-style (.data=old_p)": "davda54",
    "pytorch_optimizer-style": "pytorch_optimizer",
}
PEAK_BASELINE = "plain AdamW two-pass"


def build_peak_step(kind: str) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    """The decoder, its optimizer and one training step (every step starts with ``grad = None``)."""
    config = dict(PEAK_MODEL)
    batch = config.pop("batch")
    torch.manual_seed(0)
    model = TinyGPT(**config)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config["vocab"], (batch, config["seq"] + 1), generator=generator)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    optimizer: torch.optim.Optimizer
    if kind == "plain":
        optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)

        def step() -> None:
            optimizer.zero_grad()
            loss().backward()
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()

    elif kind in ("samgria", "samgria-nonatomic", "samgria-detached-loss"):
        nonatomic = kind != "samgria" and _accepts_atomic()
        optimizer = _samgria_sam(model.parameters(), **({"atomic": False} if nonatomic else {}))
        detach = kind == "samgria-detached-loss"

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = loss()
            value.backward()
            # Returning the loss itself keeps its autograd graph (freed of tensors by backward, but
            # thousands of small C++ nodes) alive until step() returns, across the re-evaluation.
            return value.detach() if detach else value

        def step() -> None:
            optimizer.zero_grad()
            optimizer.step(closure)

    elif kind in ("davda54", "pytorch_optimizer"):
        cls = Davda54SAM if kind == "davda54" else PytorchOptimizerSAM
        optimizer = cls(model.parameters(), torch.optim.AdamW, rho=RHO, **ADAMW)

        def step() -> None:
            optimizer.zero_grad()
            loss().backward()
            optimizer.first_step(zero_grad=True)
            loss().backward()
            optimizer.second_step()

    else:
        raise ValueError(f"unknown variant {kind!r}")
    return model, optimizer, step





def peak_child(kind: str, steps: int, warmup: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS over ``warmup + steps`` steps above the RSS after the model
    and optimizer are built, then the live-tensor peak of one more step, per parameter byte."""
    torch.set_num_threads(1)
    model, optimizer, step = build_peak_step(kind)
    param_bytes = _param_bytes(model)
    gc.collect()
    rss0 = rss_bytes()
    peak0 = rss0 if reset_peak_rss() else peak_rss_bytes()
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        step()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    peak = peak_rss_bytes()
    optimizer.zero_grad()
    gc.collect()
    with LiveBytes() as tracker:
        step()
        gc.collect()
        live_peak, live_kept = tracker.peak, tracker.current
    return {
        "param_bytes": param_bytes,
        "rss0_mb": rss0 / 2**20,
        "peak_x_params": (peak - peak0) / param_bytes,
        "live_peak_x_params": live_peak / param_bytes,
        "live_kept_x_params": live_kept / param_bytes,
        "ms": 1e3 * statistics.median(times),
    }


def measure_process_peaks(reps: int, steps: int, warmup: int, jobs: int, retain: bool) -> dict[str, Any]:
    """Every variant in ``reps`` fresh processes (``jobs`` at a time); medians over the repetitions.

    "peak over plain" pairs repetition i of a variant with repetition i of the plain step.
    """
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    names = [n for n in PEAK_VARIANTS if PEAK_VARIANTS[n] != "samgria-nonatomic" or _accepts_atomic()]

    def run(job: tuple[str, int]) -> dict[str, float]:
        name, _rep = job
        command = [
            sys.executable, str(Path(__file__).resolve()), "--peak-child", PEAK_VARIANTS[name],
            "--peak-steps", str(steps), "--peak-warmup", str(warmup),
        ] + (["--retain-freed-memory"] if retain else [])  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"{name}: child process failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    jobs_list = [(name, rep) for rep in range(reps) for name in names]
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        outcomes = list(pool.map(run, jobs_list))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for (name, _rep), outcome in zip(jobs_list, outcomes):
        runs[name].append(outcome)
    base = runs[PEAK_BASELINE]
    result: dict[str, Any] = {"param_bytes": base[0]["param_bytes"], "reps": reps, "steps": warmup + steps, "variants": {}}
    for name in names:
        rows = runs[name]
        result["variants"][name] = {
            "peak_x_params": [r["peak_x_params"] for r in rows],
            "peak_over_plain_x_params": statistics.median(
                r["peak_x_params"] - b["peak_x_params"] for r, b in zip(rows, base)
            ),
            "live_peak_over_plain_x_params": statistics.median(
                r["live_peak_x_params"] - b["live_peak_x_params"] for r, b in zip(rows, base)
            ),
            "live_kept_over_plain_x_params": statistics.median(
                r["live_kept_x_params"] - b["live_kept_x_params"] for r, b in zip(rows, base)
            ),
            "ms": statistics.median(r["ms"] for r in rows),
            "time_ratio": statistics.median(r["ms"] for r in rows) / statistics.median(b["ms"] for b in base),
        }
    return result


def print_process_peaks(result: dict[str, Any]) -> None:
    config = ", ".join(f"{k} {v}" for k, v in PEAK_MODEL.items())
    print(
        f"\nGPT-style decoder ({config}): {result['param_bytes'] / 2**20:.2f} MiB of parameters, AdamW; "
        f"one fresh single-thread process per variant and repetition ({result['reps']}x, "
        f"{result['steps']} steps each); medians"
    )
    print(
        f"{'variant':<38} {'process peak (max RSS)':>23} {'over plain':>10} "
        f"{'live peak over plain':>20} {'live kept':>9} {'ms/step':>8} {'ratio':>6}"
    )
    for name, row in result["variants"].items():
        peaks = " ".join(f"{p:.2f}" for p in row["peak_x_params"][:4])
        print(
            f"{name:<38} {peaks:>22}x {row['peak_over_plain_x_params']:>+9.2f}x "
            f"{row['live_peak_over_plain_x_params']:>+19.2f}x {row['live_kept_over_plain_x_params']:>+8.2f}x "
            f"{row['ms']:>8.1f} {row['time_ratio']:>6.2f}"
        )
    print(
        "(process peak: max RSS above the RSS after building model and optimizer; live: bytes of tensors "
        "allocated during one step; both per parameter byte; ms/step from separate processes, so noisier "
        "than the interleaved time ratios above)"
    )


# -- profiling (on request) ---------------------------------------------------------------------------------
def profile_sam_step(variants: dict[str, Variant], model_name: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name in (BASELINE, "samgria step(closure)"):
        variant = variants[name]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                variant.step()
        print(f"\n== torch.profiler, {model_name}, {name} (5 steps), top ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


# -- 5. LookSAM: the cost of a step against a plain one-pass step --------------------------------------------
LOOKSAM_KS = (5, 10)


class PlainOnePass(Variant):
    """The floor of LookSAM: one forward-backward pass and one plain inner step."""

    def build(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)

    def step(self) -> None:
        self.optimizer.zero_grad()
        self.loss().backward()
        self.optimizer.step()


class SamgriaNoTransform(SamgriaClosure):
    """``TransformingOptimizer`` with no transform: the wrapper's own cost (one gradient norm)."""

    def build(self) -> torch.optim.Optimizer:
        return TransformingOptimizer(self.model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM)


class SamgriaLookSAM(SamgriaClosure):
    """``TransformingOptimizer`` + ``LookSAM(k)``: a second pass on every k-th step only."""

    k = 5

    def build(self) -> torch.optim.Optimizer:
        from samgria import LookSAM

        return TransformingOptimizer(
            self.model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, transforms=[LookSAM(rho=RHO, k=self.k)]
        )


class PytorchOptimizerTwoPass(Variant):
    """A pytorch_optimizer SAM-family optimizer (``make(model)`` builds it) called as its docstring
    shows: the first pass, then ``step(closure)``, which runs the second."""

    make: Callable[[nn.Module], torch.optim.Optimizer]

    def build(self) -> torch.optim.Optimizer:
        return type(self).make(self.model)

    def closure(self) -> torch.Tensor:
        self.optimizer.zero_grad()
        loss = self.loss()
        loss.backward()
        return loss

    def step(self) -> None:
        self.closure()
        self.optimizer.step(self.closure)


class PytorchOptimizerLookSAM(PytorchOptimizerTwoPass):
    """pytorch_optimizer's LookSAM (if installed), called as its docstring shows: the first pass,
    then ``step(closure)``, which runs the closure again on every step."""

    k = 5

    def build(self) -> torch.optim.Optimizer:
        from pytorch_optimizer import LookSAM as TheirLookSAM

        return TheirLookSAM(self.model.parameters(), torch.optim.SGD, rho=RHO, k=self.k, lr=LR, momentum=MOMENTUM)


def looksam_variants(model_name: str) -> dict[str, tuple[Variant, float | None]]:
    """The variants of the LookSAM section and the ratio each ideally has (passes per step)."""
    import importlib.util

    factory, shape = MODELS[model_name]
    batch = make_batch(shape)
    kinds: list[tuple[str, type[Variant], float | None]] = [
        ("plain one-pass", PlainOnePass, 1.0),
        ("plain one-pass (A/A)", PlainOnePass, 1.0),
        ("samgria, no transform", SamgriaNoTransform, 1.0),
        ("samgria SAM step(closure)", SamgriaClosure, 2.0),
    ]
    for k in LOOKSAM_KS:
        kinds.append((f"samgria LookSAM k={k}", type(f"SamgriaLookSAM{k}", (SamgriaLookSAM,), {"k": k}), 1 + 1 / k))
    if importlib.util.find_spec("pytorch_optimizer") is not None:
        k = LOOKSAM_KS[0]
        kinds.append((f"pytorch_optimizer LookSAM k={k}", type("TheirLookSAM", (PytorchOptimizerLookSAM,), {"k": k}), None))
    variants = {}
    for name, cls, ideal in kinds:
        torch.manual_seed(0)
        variants[name] = (cls(name, factory(), batch), ideal)
    return variants


def time_looksam(variants: dict[str, Variant], max_rounds: int, seconds: float, warmup: int) -> dict[str, dict[str, float]]:
    """Round-robin timing (rotating order) as in :func:`time_variants`, against a one-pass step.

    LookSAM's steps alternate (a SAM step every k), so the ratio is taken over blocks of
    ``lcm(k...)`` consecutive rounds -- each holds the same mix of steps -- as the median over
    blocks of (variant time / plain one-pass time in the same block).
    """
    names = list(variants)
    baseline = names[0]
    block = math.lcm(*LOOKSAM_KS)
    times = round_robin_times(
        variants, max_rounds, seconds, warmup, lambda timed: timed >= 2 * block and timed % block == 0
    )
    blocks = len(times[baseline]) // block
    sums = {name: [sum(times[name][b * block : (b + 1) * block]) for b in range(blocks)] for name in names}
    result = {}
    for name in names:
        ratios = sorted(t / b for t, b in zip(sums[name], sums[baseline]))
        quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2 else [ratios[0]] * 3
        result[name] = {
            "mean_ms": 1e3 * statistics.mean(times[name][: blocks * block]),
            "ratio": statistics.median(ratios),
            "ratio_q1": quartiles[0],
            "ratio_q3": quartiles[2],
            "blocks": blocks,
        }
    return result


def run_looksam_section(models: list[str], rounds: int, seconds: float, warmup: int) -> dict[str, Any]:
    """Section 5: print and return the LookSAM table of every model."""
    results = {}
    for model_name in models:
        built = looksam_variants(model_name)
        timing = time_looksam({name: variant for name, (variant, _) in built.items()}, rounds, seconds, warmup)
        block = math.lcm(*LOOKSAM_KS)
        print(
            f"\nLookSAM, {model_name}: step time / plain one-pass step (median over {timing[next(iter(built))]['blocks']} "
            f"blocks of {block} interleaved rounds)"
        )
        print(f"{'variant':<34} {'ms/step':>8} {'ratio':>6} {'IQR':>12} {'ideal':>6}")
        for name, (_, ideal) in built.items():
            row = timing[name]
            row["ideal"] = ideal
            iqr = f"[{row['ratio_q1']:.2f}, {row['ratio_q3']:.2f}]"
            ideal_text = f"{ideal:.2f}" if ideal is not None else "-"
            print(f"{name:<34} {row['mean_ms']:>8.2f} {row['ratio']:>6.3f} {iqr:>12} {ideal_text:>6}")
        results[model_name] = timing
    print(
        "(ideal: forward-backward passes per step; pytorch_optimizer's LookSAM runs the closure on every "
        "step, so it saves nothing over SAM)"
    )
    return results


# -- 6. the SAM family against pytorch_optimizer ------------------------------------------------------------
#: Timed rounds of section 6 (``--family-rounds``): 80, or 12 with --quick.
FAMILY_ROUNDS, FAMILY_ROUNDS_QUICK = 80, 12


class SamgriaFamily(SamgriaClosure):
    """``TransformingOptimizer`` + one transform of the SAM family (``make()`` builds it)."""

    make: Callable[[], Any] = staticmethod(lambda: SAM(rho=RHO))

    def transforms(self) -> list[Any]:
        return [type(self).make()]


class PytorchOptimizerOneCall(PytorchOptimizerTwoPass):
    """pytorch_optimizer's WSAM: ``step(closure)`` runs both passes."""

    def step(self) -> None:
        self.optimizer.step(self.closure)


class _ConstantRho:
    """pytorch_optimizer's GSAM takes a rho scheduler: this one answers ``RHO``."""

    def step(self) -> float:
        return RHO


class PytorchOptimizerGSAM(Variant):
    """pytorch_optimizer's GSAM: built on an inner optimizer; ``step(closure)`` runs both passes,
    with a closure that returns the outputs and the loss."""

    def build(self) -> torch.optim.Optimizer:
        from pytorch_optimizer import GSAM as TheirGSAM

        self.inner = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        return TheirGSAM(self.model.parameters(), self.inner, self.model, _ConstantRho(), alpha=0.4, perturb_eps=0.0)

    def closure(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.inner.zero_grad()
        with torch.enable_grad():
            outputs = self.model(self.x)
            loss = F.cross_entropy(outputs, self.y)
            loss.backward()
        return outputs, loss.detach()

    def step(self) -> None:
        self.optimizer.step(self.closure)


def family_pairs() -> dict[str, tuple[type[Variant], type[Variant]]]:
    """Per algorithm, (samgria's variant, pytorch_optimizer's), with the same hyperparameters and the
    settings under which tests/test_transforms_sam_family.py finds them equal (no epsilon in the
    norms; ASAM with ``eta=0``, as pytorch_optimizer's ``adaptive=True`` has no eta)."""
    import pytorch_optimizer as po

    from samgria import ASAM, GSAM, WSAM, FriendlySAM

    def ours(name: str, make: Callable[[], Any]) -> type[Variant]:
        return type(f"Samgria{name}", (SamgriaFamily,), {"make": staticmethod(make)})

    def theirs(name: str, base: type[PytorchOptimizerTwoPass], make: Callable[..., Any]) -> type[Variant]:
        return type(f"PytorchOptimizer{name}", (base,), {"make": staticmethod(make)})

    sgd: dict[str, Any] = {"lr": LR, "momentum": MOMENTUM}
    pairs: dict[str, tuple[type[Variant], type[Variant]]] = {
        "ASAM": (
            ours("ASAM", lambda: ASAM(rho=RHO, eta=0.0)),
            theirs("ASAM", PytorchOptimizerTwoPass, lambda m: po.SAM(m.parameters(), torch.optim.SGD, rho=RHO, adaptive=True, **sgd)),
        ),
        "GSAM": (ours("GSAM", lambda: GSAM(RHO, alpha=0.4)), PytorchOptimizerGSAM),
    }
    for decouple in (True, False):
        name = f"WSAM decouple={decouple}"
        pairs[name] = (
            ours("WSAM", lambda d=decouple: WSAM(RHO, gamma=0.8, decouple=d)),
            theirs(
                "WSAM",
                PytorchOptimizerOneCall,
                lambda m, d=decouple: po.WSAM(m, m.parameters(), torch.optim.SGD, rho=RHO, gamma=0.8, decouple=d, eps=0.0, **sgd),
            ),
        )
    pairs["FriendlySAM"] = (
        ours("FriendlySAM", lambda: FriendlySAM(RHO, sigma=1.0, lmbda=0.9)),
        theirs(
            "FriendlySAM",
            PytorchOptimizerTwoPass,
            lambda m: po.FriendlySAM(m.parameters(), torch.optim.SGD, rho=RHO, sigma=1.0, lmbda=0.9, perturb_eps=0.0, **sgd),
        ),
    )
    pairs["SAM"] = (
        SamgriaClosure,
        theirs("SAM", PytorchOptimizerTwoPass, lambda m: po.SAM(m.parameters(), torch.optim.SGD, rho=RHO, **sgd)),
    )
    return pairs


def _median_iqr(values: list[float]) -> tuple[float, float, float]:
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) >= 2 else [values[0]] * 3
    return statistics.median(values), quartiles[0], quartiles[2]


def run_family_section(model_name: str, rounds: int, warmup: int) -> dict[str, Any] | None:
    """Section 6: samgria's SAM family against pytorch_optimizer's, per pair the median and IQR of
    the per-round ratio samgria / pytorch_optimizer; ``None`` (and one line) without pytorch_optimizer.

    One torch thread, steps timed in CPU time (``time.thread_time``): on a shared machine wall
    time moves by more than the differences measured here, and CPU time does not count the time
    the process waits for a core.
    """
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("pytorch_optimizer") is None:
        print("\nSAM family against pytorch_optimizer: skipped (pytorch_optimizer is not installed)")
        return None
    pairs = family_pairs()
    factory, shape = MODELS[model_name]
    batch = make_batch(shape)
    kinds: list[tuple[str, type[Variant]]] = [("plain two-pass", Baseline), ("plain two-pass (A/A)", Baseline)]
    for name, (ours, theirs) in pairs.items():
        kinds += [(f"samgria {name}", ours), (f"pytorch_optimizer {name}", theirs)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        variants = {}
        for name, cls in kinds:
            torch.manual_seed(0)
            variants[name] = cls(name, factory(), batch)
        times = round_robin_times(variants, rounds, 0.0, warmup, lambda timed: timed >= rounds, clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)
    base = times["plain two-pass"]
    ratio = {name: _median_iqr([t / b for t, b in zip(values, base)]) for name, values in times.items()}
    result: dict[str, Any] = {
        "model": model_name,
        "pytorch_optimizer": importlib.metadata.version("pytorch_optimizer"),
        "rounds": len(base),
        "clock": "thread CPU time, 1 torch thread",
        "base_ms": 1e3 * statistics.median(base),
        "aa_ratio": ratio["plain two-pass (A/A)"],
        "pairs": {},
    }
    print(
        f"\nSAM family against pytorch_optimizer {result['pytorch_optimizer']}, {model_name}: 1 torch thread, "
        f"CPU time of the step (time.thread_time; wall time on a shared machine moves more than these "
        f"differences), {len(base)} interleaved rounds; plain two-pass {result['base_ms']:.2f} ms"
    )
    print(f"{'algorithm':<22} {'samgria/plain':>13} {'po/plain':>9} {'samgria/po':>10} {'IQR':>14}")
    aa = ratio["plain two-pass (A/A)"]
    print(f"{'plain two-pass (A/A)':<22} {aa[0]:>13.3f} {'-':>9} {'-':>10} {f'[{aa[1]:.3f}, {aa[2]:.3f}]':>14}")
    for name in pairs:
        ours_times, theirs_times = times[f"samgria {name}"], times[f"pytorch_optimizer {name}"]
        pair = _median_iqr([o / t for o, t in zip(ours_times, theirs_times)])
        result["pairs"][name] = {
            "samgria_ratio": ratio[f"samgria {name}"][0],
            "pytorch_optimizer_ratio": ratio[f"pytorch_optimizer {name}"][0],
            "samgria_over_pytorch_optimizer": pair[0],
            "q1": pair[1],
            "q3": pair[2],
        }
        iqr = f"[{pair[1]:.3f}, {pair[2]:.3f}]"
        print(
            f"{name:<22} {ratio[f'samgria {name}'][0]:>13.3f} {ratio[f'pytorch_optimizer {name}'][0]:>9.3f} "
            f"{pair[0]:>10.3f} {iqr:>14}"
        )
    print(
        "(ratios: medians over rounds of per-round ratios; samgria/po below 1 means samgria is faster; "
        "the A/A row's IQR is the noise of one ratio)"
    )
    return result


# -- main --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, 1-2 minutes on 2 cores (CI)")
    looksam_block = math.lcm(*LOOKSAM_KS)
    parser.add_argument(
        "--rounds",
        type=int_at_least(looksam_block),
        default=None,
        help=f"most timed rounds per model (default 400, 100 quick; at least {looksam_block}, one block of the "
        "LookSAM timing)",
    )
    parser.add_argument(
        "--seconds", type=number_in(0.0), default=None, help="time budget for timing, per model (default 60, 5 quick)"
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per model")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads (default: CPUs available)")
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="tell glibc malloc to keep freed memory mapped (see retain_freed_memory)",
    )
    parser.add_argument(
        "--peak-reps",
        type=int_at_least(0),
        default=None,
        help="fresh processes per variant for the process peak (default 3, 1 quick; 0 skips)",
    )
    parser.add_argument("--peak-steps", type=int_at_least(1), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peak-warmup", type=int_at_least(0), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)  # internal: one measuring process
    parser.add_argument(
        "--looksam-only", action="store_true", help="only section 5 (LookSAM against a one-pass step); writes no files"
    )
    parser.add_argument(
        "--family-only",
        action="store_true",
        help="only section 6 (the SAM family against pytorch_optimizer's, if installed); writes no files",
    )
    parser.add_argument(
        "--family-rounds",
        type=int_at_least(2),
        default=None,
        help=f"timed rounds of section 6 (default {FAMILY_ROUNDS}, {FAMILY_ROUNDS_QUICK} quick)",
    )
    args = parser.parse_args(argv)
    peak_steps = args.peak_steps or (4 if args.quick else 9)
    peak_warmup = args.peak_warmup if args.peak_warmup is not None else (2 if args.quick else 3)

    if args.peak_child is not None:
        if args.retain_freed_memory:
            retain_freed_memory()
        print(json.dumps(peak_child(args.peak_child, peak_steps, peak_warmup)))
        return {}

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    retained = retain_freed_memory() if args.retain_freed_memory else False
    rounds = args.rounds or (100 if args.quick else 400)
    seconds = args.seconds if args.seconds is not None else (5.0 if args.quick else 60.0)
    warmup = 2 if args.quick else 5
    print(
        f"torch {torch.__version__}, {threads} threads, up to {rounds} interleaved rounds or {seconds:g} s "
        f"per model; glibc keeps freed memory: {'yes' if retained else 'no (default malloc settings)'}"
    )

    if args.looksam_only:
        return {"looksam": run_looksam_section(args.models, rounds, seconds, warmup)}
    family_rounds = args.family_rounds or (FAMILY_ROUNDS_QUICK if args.quick else FAMILY_ROUNDS)
    if args.family_only:
        return {"family": run_family_section(args.models[0], family_rounds, warmup)}

    results: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": threads,
        "malloc_retains_freed_memory": retained,
        "targets": TARGETS,
        "models": {},
    }
    for model_name in args.models:
        variants = build_variants(model_name)
        param_bytes = _param_bytes(variants[BASELINE].model)
        timing = time_variants(variants, rounds, seconds, warmup)
        block, budget, least = (IN_A_ROW // 2, seconds / 4, 2) if args.quick else (IN_A_ROW, seconds / 2, 3)
        in_a_row = time_in_a_row(variants, block, rounds // 4, budget, min_rounds=least)
        memory = measure_memory(variants)
        results["models"][model_name] = {
            "param_mib": param_bytes / 2**20,
            "variants": {
                name: {**timing[name], "ratio_in_a_row": in_a_row[name], **memory[name]} for name in variants
            },
        }
        print(
            f"\n{model_name}: {param_bytes / 2**20:.2f} MiB of parameters; "
            f"time target <= {TARGETS[model_name]:.2f}, extra-memory target <= 1.00x params"
        )
        print(
            f"{'variant':<27} {'ms/step':>8} {'ratio':>6} {'IQR':>12} {'min ratio':>9} {'in a row':>8} "
            f"{'faults':>6} {'extra peak':>10} {'extra kept':>10} {'state':>6}"
        )
        for name in variants:
            row = results["models"][model_name]["variants"][name]
            iqr = f"[{row['ratio_q1']:.2f}, {row['ratio_q3']:.2f}]"
            print(
                f"{name:<27} {row['median_ms']:>8.2f} {row['ratio']:>6.3f} {iqr:>12} {row['min_ratio']:>9.3f} "
                f"{row['ratio_in_a_row']:>8.3f} {row['page_faults']:>6.0f} "
                f"{row['extra_peak_x_params']:>9.2f}x {row['extra_kept_x_params']:>9.2f}x "
                f"{row['state_x_params']:>5.2f}x"
            )
        if args.profile:
            profile_sam_step(variants, model_name)

    # --quick: LookSAM on the first model only (CI's time budget).
    results["looksam"] = run_looksam_section(args.models[:1] if args.quick else args.models, rounds, seconds, warmup)
    # The SAM family against pytorch_optimizer's (when installed), on the first model.
    results["family"] = run_family_section(args.models[0], family_rounds, warmup)

    peak_reps = args.peak_reps if args.peak_reps is not None else (1 if args.quick else 3)
    if peak_reps > 0:
        jobs = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        peaks = measure_process_peaks(peak_reps, peak_steps, peak_warmup, jobs, retained)
        results["process_peak"] = {"model": PEAK_MODEL, "inner": "AdamW", **peaks}
        print_process_peaks(peaks)

    write_results(results)
    full = not args.quick and set(args.models) == {"mlp", "conv"}
    if full:  # both models
        publish_figures({RESULTS / "sam_overhead.png": "sam_overhead.png"})
    return results


def write_results(results: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot or results written")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, model_name in zip(axes[0], models):
        rows = results["models"][model_name]["variants"]
        names = list(rows)
        ratios = [rows[n]["ratio"] for n in names]
        errors = [[r - rows[n]["ratio_q1"] for n, r in zip(names, ratios)], [rows[n]["ratio_q3"] - r for n, r in zip(names, ratios)]]
        ax.barh(names, ratios, xerr=errors, color=[
            "grey" if n.startswith("plain") else "tab:orange" if n.startswith("naive") else "tab:blue" for n in names
        ])
        ax.axvline(TARGETS[model_name], color="red", linestyle="--", label=f"target {TARGETS[model_name]:.2f}")
        ax.set_xlim(0.9, max(max(ratios) * 1.05, TARGETS[model_name] * 1.05))
        ax.set_title(f"{model_name}: step time / two-pass floor")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "sam_overhead.png", dpi=100)
    (RESULTS / "sam_overhead.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS / 'sam_overhead.png'} and {RESULTS / 'sam_overhead.json'}")


if __name__ == "__main__":
    main()
