"""Registry of transforms for the generic tests (in the spirit of torch's OptimizerInfo).

Each entry says how to build the transform, whether it re-evaluates the closure, which
param-group keys it owns, and which bad constructor inputs must fail with which message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from samgria import ASAM, LAMP, SAM, ClampGrad, ClipGradNorm, GradSign, NormalizeGrad, ScaleGrad, Transform


@dataclass
class ErrorInput:
    kwargs: dict[str, Any]
    error_type: type[Exception]
    error_regex: str


@dataclass
class TransformInfo:
    name: str
    factory: Callable[..., Transform]
    needs_closure: bool
    group_keys: tuple[str, ...]
    stateful: bool = False
    error_inputs: list[ErrorInput] = field(default_factory=list)

    def make(self, **kwargs: Any) -> Transform:
        return self.factory(**kwargs)


TRANSFORM_INFOS = [
    TransformInfo(
        "SAM",
        lambda **kw: SAM(**{"rho": 0.05, **kw}),
        needs_closure=True,
        group_keys=("rho",),
        error_inputs=[
            ErrorInput({"rho": -1.0}, ValueError, r"rho must be a finite number >= 0, got -1\.0"),
            ErrorInput({"rho": float("nan")}, ValueError, r"rho must be .*got nan"),
            ErrorInput({"rho": "0.1"}, TypeError, r"rho must be a real number, got '0\.1'"),
        ],
    ),
    TransformInfo(
        "ASAM",
        lambda **kw: ASAM(**{"rho": 0.5, "eta": 0.01, **kw}),
        needs_closure=True,
        group_keys=("rho", "eta", "adaptive"),
        error_inputs=[
            ErrorInput({"rho": -0.5}, ValueError, r"rho must be a finite number >= 0, got -0\.5"),
            ErrorInput({"eta": -1e-3}, ValueError, r"eta must be a finite number >= 0, got -0\.001"),
            ErrorInput({"adaptive": 1}, TypeError, r"adaptive must be a bool, got 1"),
        ],
    ),
    TransformInfo(
        "LAMP",
        lambda **kw: LAMP(**{"eps": 5e-3, "rollback_len": 3, "seed": 0, **kw}),
        needs_closure=False,
        group_keys=(),
        stateful=True,
        error_inputs=[
            ErrorInput({"eps": -1e-3}, ValueError, r"eps must be a finite number >= 0, got -0\.001"),
            ErrorInput({"rollback_len": 0}, ValueError, r"rollback_len must be >= 1, got 0"),
            ErrorInput({"rollback_len": 2.5}, TypeError, r"rollback_len must be an integer, got 2\.5"),
            ErrorInput({"rollback_len": True}, TypeError, r"rollback_len must be an integer, got True"),
            ErrorInput({"seed": 1.5}, TypeError, r"seed must be an integer or None, got 1\.5"),
        ],
    ),
    TransformInfo(
        "ClipGradNorm",
        lambda **kw: ClipGradNorm(**{"max_grad_norm": 0.05, **kw}),
        needs_closure=False,
        group_keys=("max_grad_norm",),
        error_inputs=[
            ErrorInput({"max_grad_norm": 0.0}, ValueError, r"max_grad_norm must be > 0, got 0\.0"),
            ErrorInput({"max_grad_norm": None}, TypeError, r"max_grad_norm must be a real number, got None"),
        ],
    ),
    TransformInfo(
        "GradSign",
        lambda **kw: GradSign(**kw),
        needs_closure=False,
        group_keys=(),
        error_inputs=[ErrorInput({"scale": 2.0}, TypeError, r"takes no arguments")],
    ),
    TransformInfo(
        "NormalizeGrad",
        lambda **kw: NormalizeGrad(**kw),
        needs_closure=False,
        group_keys=("normalize_eps",),
        error_inputs=[ErrorInput({"eps": -1.0}, ValueError, r"eps must be >= 0, got -1\.0")],
    ),
    TransformInfo(
        "ScaleGrad",
        lambda **kw: ScaleGrad(**{"scale": 0.5, "bias": 1e-3, **kw}),
        needs_closure=False,
        group_keys=("grad_scale", "grad_bias"),
        error_inputs=[ErrorInput({"scale": float("nan")}, TypeError, r"scale must be a real number, got nan")],
    ),
    TransformInfo(
        "ClampGrad",
        lambda **kw: ClampGrad(**{"grad_min": -0.01, "grad_max": 0.02, **kw}),
        needs_closure=False,
        group_keys=("grad_min", "grad_max"),
        error_inputs=[
            ErrorInput({"grad_min": 1.0, "grad_max": 0.0}, ValueError, r"grad_min must be <= grad_max, got grad_min=1\.0, grad_max=0\.0")
        ],
    ),
]


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A small MLP with a frozen parameter and an unused one (their grads stay ``None``)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype)
    model.register_parameter("unused", nn.Parameter(torch.randn(4, dtype=dtype)))
    model[2].bias.requires_grad_(False)
    return model


def make_data(dtype: torch.dtype = torch.float64, seed: int = 1, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=generator, dtype=dtype)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=generator, dtype=dtype)
    return x, y


def make_closure(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise_equal(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()
