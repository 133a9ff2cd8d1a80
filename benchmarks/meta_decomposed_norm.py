"""Does a decomposed BatchNorm pay for second-order MAML under vmap? (It does not, on CPU.)

torch's vmap batching rules for the double backward of ``BatchNorm`` with batch statistics give
wrong values (pytorch/functorch#534), so samgria never vmaps a second-order inner loop through
a native normalisation layer and runs the per-task loop instead. The alternative would be a
*decomposed* BatchNorm -- batch mean and variance written with elementary tensor operations,
whose batching rules are right -- which could then be vmapped. This script measures both sides
of that trade-off on a conv4 few-shot model (Conv(3x3)-BatchNorm-ReLU-MaxPool x4 on 1x28x28,
5-way 1-shot, 15 queries per class, one inner step, second order):

* exactness: the meta-gradient of the decomposed layer under vmap against the native layer on
  the loop (float64, max abs difference; above ``EXACT_RTOL`` x the native one's largest entry,
  or not finite, it fails the run);
* time per meta-batch, single thread, as ratios against the native loop (the default); each timed
  row's meta-gradient must be finite and match the native loop's within ``TIMED_RTOL`` (float32).

Run: ``python benchmarks/meta_decomposed_norm.py`` (about two minutes on 2 cores);
``--quick`` for a small configuration.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # this checkout's samgria

from samgria import MAML  # noqa: E402
from samgria.data.task import Task  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _checks import require_close, require_finite  # noqa: E402

#: Tolerances on max|meta-grad(row) - meta-grad(native, loop)| relative to the native one's largest
#: entry. Exactness, float64: the same math in another order differs by float64 rounding, measured
#: 8.5e-15 (--quick) and 4.6e-15 (full). Timed rows, float32: measured 2.7e-6 (--quick) and 1.0e-4
#: at 64 channels, where float32 rounding flips ReLU and max-pool choices near ties; 1e-2 keeps a
#: margin. A wrong layer (the unbiased variance: a 1/(n-1) in place of 1/n) is off by far more.
EXACT_RTOL = 1e-10
TIMED_RTOL = 1e-2


class DecomposedBatchNorm2d(nn.Module):
    """BatchNorm2d with batch statistics, written with elementary operations."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        normalised = (x - mean) / torch.sqrt(var + self.eps)
        return normalised * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def conv4(norm: type[nn.Module], channels: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    in_channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(in_channels, channels, 3, padding=1), norm(channels), nn.ReLU(), nn.MaxPool2d(2)]
        in_channels = channels
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, 5)).to(dtype)


def few_shot_tasks(count: int, dtype: torch.dtype, ways: int = 5, shots: int = 1, queries: int = 15) -> list[Task]:
    generator = torch.Generator().manual_seed(1)
    tasks = []
    for _ in range(count):
        support_x = torch.randn(ways * shots, 1, 28, 28, generator=generator, dtype=dtype)
        query_x = torch.randn(ways * queries, 1, 28, 28, generator=generator, dtype=dtype)
        tasks.append(Task(support_x, torch.arange(ways).repeat_interleave(shots), query_x, torch.arange(ways).repeat_interleave(queries)))
    return tasks


def meta_gradient(model: nn.Module, tasks: list[Task], vectorize: bool) -> tuple[float, list[torch.Tensor]]:
    """Seconds for one second-order meta-gradient, and the gradient."""
    meta = MAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.4)
    meta.zero_grad()
    start = time.perf_counter()
    meta.task_losses(tasks, F.cross_entropy, vectorize=vectorize).mean().backward()
    return time.perf_counter() - start, [p.grad.clone() for p in model.parameters()]


def max_abs(tensors: list[torch.Tensor]) -> float:
    """The largest absolute entry of ``tensors`` (NaN if one is NaN)."""
    return float(torch.stack([t.abs().max() for t in tensors]).max())


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Max |a - b| over the tensor pairs; NaN if an entry is NaN (torch's max keeps it, Python's may not)."""
    return max_abs([x - y for x, y in zip(a, b)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model and meta-batch (CI)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    channels, meta_batch, repeats = (8, 2, 1) if args.quick else (64, 8, 2)

    exact_tasks = few_shot_tasks(2 if args.quick else 4, torch.float64)
    _, native = meta_gradient(conv4(nn.BatchNorm2d, 8, torch.float64), exact_tasks, vectorize=False)
    _, decomposed = meta_gradient(conv4(DecomposedBatchNorm2d, 8, torch.float64), exact_tasks, vectorize=True)
    difference = max_difference(native, decomposed)
    print(f"exactness (float64): max |decomposed under vmap - native on the loop| = {difference:.2e}")
    require_close("exactness (float64): max|meta-grad(decomposed, vmap) - meta-grad(native, loop)|", difference,
                  EXACT_RTOL * max_abs(native))  # fmt: skip

    tasks = few_shot_tasks(meta_batch, torch.float32)
    rows = [
        ("native BatchNorm, loop (default)", nn.BatchNorm2d, False),
        ("decomposed BatchNorm, loop", DecomposedBatchNorm2d, False),
        ("decomposed BatchNorm, vmap", DecomposedBatchNorm2d, True),
    ]
    seconds, grads = {}, {}
    for name, norm, vectorize in rows:
        runs = [meta_gradient(conv4(norm, channels, torch.float32), tasks, vectorize) for _ in range(repeats)]
        seconds[name], grads[name] = min(run[0] for run in runs), runs[-1][1]
        require_finite(f"{name}: the timed meta-gradient's entries", grads[name])
    reference = grads[rows[0][0]]
    for name, _, _ in rows[1:]:
        require_close(f"{name} (float32): max|meta-grad - meta-grad(native, loop)|",
                      max_difference(reference, grads[name]), TIMED_RTOL * max_abs(reference))  # fmt: skip
    baseline = seconds[rows[0][0]]
    print(f"conv4 ({channels} channels), meta-batch {meta_batch}, second order, one thread:")
    for name, _, _ in rows:
        print(f"  {name:34s} {seconds[name]:7.3f} s   ratio {seconds[name] / baseline:5.2f}")


if __name__ == "__main__":
    main()
