"""SAM overhead: step time and memory of ``TransformingOptimizer`` + ``SAM`` against their floor.

SAM needs two forward-backward passes and one inner step, so its floor is that work done by a
plain loop. This script measures, in one run:

1. **Time ratio** — SAM step time / (two forward-backward passes + one plain inner step), for a
   20×256 ReLU MLP (batch 64) and a small conv net with BatchNorm (32×32 inputs, batch 64),
   with momentum SGD as the inner optimizer. Targets on the CPU: ≤ 1.10 (MLP), ≤ 1.03 (conv).
   Rows: samgria ``step(closure)``, samgria ``first_step()``/``second_step()``, and the widely
   used "naive" SAM (davda54-style, written inline below: ``e_w = rho·g/‖g‖`` stored per
   parameter, ``p.add_(e_w)``, then ``p.sub_(e_w)``). Every variant has its own model copy; the
   variants are timed interleaved (round-robin, in a rotating order), and each ratio is the
   median of the per-round ratios to the baseline timed in the same round, so that load from
   other processes hits numerator and denominator alike.
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
   naive SAM: its ``e_w``). SAM should keep nothing; LAMP keeps its running sum.

The "(A/A)" row times the plain step a second time: its ratio shows the noise floor.
"faults" is the median number of minor page faults per step. With glibc's default settings a
step whose transient peak is above the previous step's re-faults that memory (about 1 µs per
4 KiB page): SAM's transient w + e buffers (1× the parameters, freed when the weights are
restored) can pay this every step, while the naive SAM keeps ``e_w`` allocated between steps
and does not. ``--retain-freed-memory`` asks glibc to keep freed memory (as jemalloc or
tcmalloc do, which PyTorch's CPU performance guides recommend) to measure without that effect.

Usage::

    python benchmarks/sam_overhead.py --quick        # CI, < 60 s
    python benchmarks/sam_overhead.py                # more repetitions
    python benchmarks/sam_overhead.py --profile      # also a torch.profiler table of a SAM step
    python benchmarks/sam_overhead.py --retain-freed-memory --threads 1

Prints a table; when matplotlib is importable writes ``benchmarks/results/sam_overhead.png``
and ``benchmarks/results/sam_overhead.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
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
    def build(self) -> torch.optim.Optimizer:
        return TransformingOptimizer(
            self.model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, transforms=[SAM(rho=RHO)]
        )

    def closure(self) -> torch.Tensor:
        self.optimizer.zero_grad()
        loss = self.loss()
        loss.backward()
        return loss

    def step(self) -> None:
        self.optimizer.step(self.closure)

    def transform_state_bytes(self) -> int:
        return _tensor_bytes(self.optimizer.state)


class SamgriaTwoCall(SamgriaClosure):
    def step(self) -> None:
        self.optimizer.zero_grad()
        self.loss().backward()
        self.optimizer.first_step(zero_grad=True)
        self.loss().backward()
        self.optimizer.second_step()


class SamgriaLamp(SamgriaClosure):
    def build(self) -> torch.optim.Optimizer:
        return TransformingOptimizer(
            self.model.parameters(),
            torch.optim.SGD,
            lr=LR,
            momentum=MOMENTUM,
            transforms=[SAM(rho=RHO), LAMP(eps=5e-3, rollback_len=10, seed=0)],
        )


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


VARIANTS: dict[str, type[Variant]] = {
    "plain two-pass": Baseline,
    "plain two-pass (A/A)": Baseline,  # the noise floor: should read 1.00
    "samgria step(closure)": SamgriaClosure,
    "samgria first/second_step": SamgriaTwoCall,
    "samgria SAM+LAMP": SamgriaLamp,
    "naive SAM (add/sub e_w)": Naive,
}
BASELINE = "plain two-pass"


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
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    deadline = None
    round_index = 0
    while round_index < warmup + max_rounds:
        if round_index == warmup:
            deadline = time.perf_counter() + seconds
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            faults_before = _minor_faults()
            start = time.perf_counter()
            variants[name].step()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
                faults[name].append(_minor_faults() - faults_before)
        round_index += 1
        if deadline is not None and time.perf_counter() > deadline and round_index >= warmup + min_rounds:
            break
    result = {}
    for name in names:
        ratios = sorted(t / b for t, b in zip(times[name], times[BASELINE]))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
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


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory mapped (no trimming, no per-chunk mmap), as jemalloc does.

    glibc's default returns a large freed block at the top of the heap to the system, so a step
    whose peak is higher than the previous step's faults its pages in again (about 1 µs per
    4 KiB page). Returns whether the setting was applied (glibc on Linux only).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    size = 1 << 30
    return bool(libc.mallopt(m_trim_threshold, size)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


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
            "peak_mb": peak / 2**20,
            "extra_peak_x_params": (peak - peak0) / param_bytes,
            "extra_kept_x_params": (kept - kept0) / param_bytes,
            "state_x_params": variant.transform_state_bytes() / param_bytes,
        }
        for (name, variant), (peak, kept) in zip(variants.items(), measured.values())
    }


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


# -- main --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, < 60 s (CI)")
    parser.add_argument("--rounds", type=int, default=None, help="most timed rounds per model (default 400, 100 quick)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="time budget for timing, per model (default 60, 8 quick)"
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs available)")
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="tell glibc malloc to keep freed memory mapped (see retain_freed_memory)",
    )
    args = parser.parse_args(argv)

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    retained = retain_freed_memory() if args.retain_freed_memory else False
    rounds = args.rounds or (100 if args.quick else 400)
    seconds = args.seconds if args.seconds is not None else (8.0 if args.quick else 60.0)
    warmup = 2 if args.quick else 5
    print(
        f"torch {torch.__version__}, {threads} threads, up to {rounds} interleaved rounds or {seconds:g} s "
        f"per model; glibc keeps freed memory: {'yes' if retained else 'no (default malloc settings)'}"
    )

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
        memory = measure_memory(variants)
        results["models"][model_name] = {
            "param_mb": param_bytes / 2**20,
            "variants": {name: {**timing[name], **memory[name]} for name in variants},
        }
        print(
            f"\n{model_name}: {param_bytes / 2**20:.2f} MB of parameters; "
            f"time target <= {TARGETS[model_name]:.2f}, extra-memory target <= 1.00x params"
        )
        print(
            f"{'variant':<27} {'ms/step':>8} {'ratio':>6} {'IQR':>12} {'min ratio':>9} {'faults':>6} "
            f"{'extra peak':>10} {'extra kept':>10} {'state':>6}"
        )
        for name in variants:
            row = results["models"][model_name]["variants"][name]
            iqr = f"[{row['ratio_q1']:.2f}, {row['ratio_q3']:.2f}]"
            print(
                f"{name:<27} {row['median_ms']:>8.2f} {row['ratio']:>6.3f} {iqr:>12} {row['min_ratio']:>9.3f} "
                f"{row['page_faults']:>6.0f} "
                f"{row['extra_peak_x_params']:>9.2f}x {row['extra_kept_x_params']:>9.2f}x "
                f"{row['state_x_params']:>5.2f}x"
            )
        if args.profile:
            profile_sam_step(variants, model_name)

    write_results(results)
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
