"""Registry of transforms for the generic tests (in the spirit of torch's OptimizerInfo).

Each :class:`TransformInfo` says how to build the transform, whether it re-evaluates the
closure, which param-group keys it owns (short names), which bad constructor inputs must fail
with which message, and a list of :class:`Config` s: whole optimizers built around the transform
(the default, per-group overrides, adaptive variants, chains, qualified keys beside an inner
optimizer that owns the same name). The generic tests run over every (info, config) pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from samgria._checks import check_real
from samgria import ASAM, LAMP, SAM, ClampGrad, ClipGradNorm, GradSign, NormalizeGrad, ScaleGrad, Transform, TransformingOptimizer
from samgria import ESAM, GSAM, WSAM, FriendlySAM, LookSAM
from samgria import ClampParams, ParamTransform, ProjectParams, SparsifyGrad
from samgria import EMA, Lookahead
from samgria import MultiStepSAM

__all__ = [
    "ErrorInput",
    "Config",
    "TransformInfo",
    "TRANSFORM_INFOS",
    "CONFIGS",
    "config_id",
    "split_groups",
    "make_model",
    "make_data",
    "make_closure",
    "params_of",
    "assert_bitwise_equal",
]


@dataclass(frozen=True, eq=False)
class ErrorInput:
    """Constructor keyword arguments that must raise ``error_type`` matching ``error_regex``.

    When every keyword is one of the transform's group keys, the same value given in a param
    group must raise the same error, prefixed with ``"param_groups[0]: "``.
    """

    kwargs: dict[str, Any]
    error_type: type[Exception]
    error_regex: str


GroupsFn = Callable[[nn.Module], list[dict[str, Any]]]


def split_groups(first: Mapping[str, Any], rest: Mapping[str, Any] | None = None) -> GroupsFn:
    """Two param groups: the first half of ``model.parameters()`` with ``first``'s keys, the rest with ``rest``'s.

    Works for any model (the generic tests also build a mixed-dtype one).
    """
    rest = dict(rest or {})

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        params = list(model.parameters())
        half = len(params) // 2
        return [{"params": params[:half], **first}, {"params": params[half:], **rest}]

    return groups


@dataclass(frozen=True, eq=False)
class Config:
    """One optimizer built around a transform.

    Attributes:
        id: Short name for test ids.
        transforms: Returns fresh transform instances (a list, or a mapping of slot names).
        inner: The inner optimizer class.
        inner_kwargs: Its keyword arguments.
        groups: ``model -> param groups`` (with transform keys, short or qualified); ``None``
            for ``model.parameters()``.
        expect_groups: For each built group, items it must hold (stored key -> value): where
            the config's hyperparameters land (short or qualified key).
    """

    id: str
    transforms: Callable[[], Any]
    inner: type[torch.optim.Optimizer] = torch.optim.SGD
    inner_kwargs: dict[str, Any] = field(default_factory=lambda: {"lr": 0.1, "momentum": 0.9})
    groups: GroupsFn | None = None
    expect_groups: tuple[dict[str, Any], ...] = ()

    def build(self, model: nn.Module, **optimizer_kwargs: Any) -> TransformingOptimizer:
        """``TransformingOptimizer`` over ``model``; ``optimizer_kwargs`` (``transform_foreach``,
        ``non_finite``, ``atomic``) go to its constructor."""
        params = self.groups(model) if self.groups is not None else model.parameters()
        return TransformingOptimizer(
            params, self.inner, transforms=self.transforms(), **optimizer_kwargs, **self.inner_kwargs
        )

    def build_bare(self, model: nn.Module) -> torch.optim.Optimizer:
        """The inner optimizer alone, with the same groups minus the transforms' keys."""
        if self.groups is None:
            return self.inner(model.parameters(), **self.inner_kwargs)
        return self.inner(self.without_group_overrides().groups(model), **self.inner_kwargs)

    def without_group_overrides(self) -> Config:
        """The same optimizer with every transform key dropped from the groups (constructor values)."""
        if self.groups is None:
            return self
        inner_keys = set(self.inner([nn.Parameter(torch.zeros(1))], **self.inner_kwargs).defaults)
        groups = self.groups

        def stripped(model: nn.Module) -> list[dict[str, Any]]:
            return [{k: v for k, v in g.items() if k == "params" or k in inner_keys} for g in groups(model)]

        return Config(f"{self.id}-stripped", self.transforms, self.inner, self.inner_kwargs, stripped)

    def transform_list(self) -> list[Any]:
        made = self.transforms()
        return list(made.values()) if isinstance(made, Mapping) else list(made)

    @property
    def needs_closure(self) -> bool:
        """Whether some transform of the chain re-evaluates the closure."""
        return any(getattr(t, "needs_closure", False) for t in self.transform_list())

    @property
    def standalone_equivalent(self) -> bool:
        """One transform and no group overrides: the seed protocol beside the bare inner
        optimizer must give the same result."""
        return len(self.transform_list()) == 1 and self.groups is None and not isinstance(self.transforms(), Mapping)


@dataclass
class TransformInfo:
    """How to build and check one transform class.

    Attributes:
        name: The class name.
        factory: ``factory(**overrides)`` builds the transform with test defaults.
        needs_closure: Whether it re-evaluates the closure.
        group_keys: Its per-group hyperparameters (short names), in declaration order.
        error_inputs: Bad constructor inputs and the errors they must raise.
        param_state_keys: Slot keys it keeps for every parameter that has a gradient.
        object_state_keys: Slot keys it keeps at object level (on the first parameter), which
            a parameter without a gradient may therefore carry.
        configs: Optimizers built around it; ``configs[0]`` is the default one.
    """

    name: str
    factory: Callable[..., Transform]
    needs_closure: bool
    group_keys: tuple[str, ...]
    error_inputs: list[ErrorInput] = field(default_factory=list)
    param_state_keys: tuple[str, ...] = ()
    object_state_keys: tuple[str, ...] = ()
    configs: list[Config] = field(default_factory=list)

    def make(self, **kwargs: Any) -> Transform:
        return self.factory(**kwargs)

    def default_config(self) -> Config:
        return Config("default", lambda: [self.make()])


def _info(info: TransformInfo, *extra: Config) -> TransformInfo:
    info.configs = [info.default_config(), *extra]
    return info


def _sam(**kw: Any) -> SAM:
    return SAM(**{"rho": 0.05, **kw})


def _asam(**kw: Any) -> ASAM:
    return ASAM(**{"rho": 0.5, "eta": 0.01, **kw})


def _lamp(**kw: Any) -> LAMP:
    return LAMP(**{"eps": 5e-3, "rollback_len": 3, "seed": 0, **kw})


def _clip(**kw: Any) -> ClipGradNorm:
    return ClipGradNorm(**{"max_grad_norm": 0.05, **kw})


def _scale(**kw: Any) -> ScaleGrad:
    return ScaleGrad(**{"scale": 0.5, "bias": 1e-3, **kw})


def _clamp(**kw: Any) -> ClampGrad:
    return ClampGrad(**{"grad_min": -0.01, "grad_max": 0.02, **kw})


TRANSFORM_INFOS = [
    _info(
        TransformInfo(
            "SAM",
            _sam,
            needs_closure=True,
            group_keys=("rho",),
            error_inputs=[
                ErrorInput({"rho": -1.0}, ValueError, r"rho must be a finite number >= 0, got -1\.0"),
                ErrorInput({"rho": float("nan")}, ValueError, r"rho must be a finite number >= 0, got nan"),
                ErrorInput({"rho": float("inf")}, ValueError, r"rho must be a finite number >= 0, got inf"),
                ErrorInput({"rho": "0.1"}, TypeError, r"rho must be a finite number >= 0, got '0\.1'"),
                ErrorInput({"rho": True}, TypeError, r"rho must be a finite number >= 0, got True"),
            ],
        ),
        Config(
            "group_rho_zero",
            lambda: [_sam()],
            groups=split_groups({"rho": 0.0}, {"rho": 0.1}),
            expect_groups=({"rho": 0.0}, {"rho": 0.1}),
        ),
        Config("scale_grad_then_sam", lambda: [ScaleGrad(2.0), _sam()], expect_groups=({"grad_scale": 2.0, "rho": 0.05},)),
        Config(
            "adadelta_qualified_rho",
            lambda: [_sam()],
            inner=torch.optim.Adadelta,
            inner_kwargs={"lr": 0.5},
            groups=split_groups({"sam.rho": 0.1}),
            # Adadelta owns "rho": SAM's radius is stored as "sam.rho".
            expect_groups=({"sam.rho": 0.1, "rho": 0.9}, {"sam.rho": 0.05, "rho": 0.9}),
        ),
    ),
    _info(
        TransformInfo(
            "ASAM",
            _asam,
            needs_closure=True,
            group_keys=("rho", "eta", "adaptive"),
            error_inputs=[
                ErrorInput({"rho": -0.5}, ValueError, r"rho must be a finite number >= 0, got -0\.5"),
                ErrorInput({"eta": -1e-3}, ValueError, r"eta must be a finite number >= 0, got -0\.001"),
                ErrorInput({"eta": float("inf")}, ValueError, r"eta must be a finite number >= 0, got inf"),
                ErrorInput({"adaptive": 1}, TypeError, r"adaptive must be a bool, got 1"),
            ],
        ),
        Config(
            "group_not_adaptive",
            lambda: [_asam()],
            groups=split_groups({"adaptive": False}),
            expect_groups=({"adaptive": False, "rho": 0.5}, {"adaptive": True, "rho": 0.5}),
        ),
        Config(
            "group_eta",
            lambda: [_asam()],
            groups=split_groups({"eta": 0.1}, {"eta": 0.0, "rho": 1.0}),
            expect_groups=({"eta": 0.1, "rho": 0.5}, {"eta": 0.0, "rho": 1.0}),
        ),
    ),
    _info(
        TransformInfo(
            "LAMP",
            _lamp,
            needs_closure=False,
            group_keys=("eps",),
            param_state_keys=("sum", "count"),
            object_state_keys=("cycle_step", "rng_state"),
            error_inputs=[
                ErrorInput({"eps": -1e-3}, ValueError, r"eps must be a finite number >= 0, got -0\.001"),
                ErrorInput({"eps": float("nan")}, ValueError, r"eps must be a finite number >= 0, got nan"),
                ErrorInput({"rollback_len": 0}, ValueError, r"rollback_len must be an integer >= 1, got 0"),
                ErrorInput({"rollback_len": 2.5}, TypeError, r"rollback_len must be an integer >= 1, got 2\.5"),
                ErrorInput({"rollback_len": True}, TypeError, r"rollback_len must be an integer >= 1, got True"),
                ErrorInput({"seed": 1.5}, TypeError, r"seed must be an integer, got 1\.5"),
                ErrorInput({"seed": 2**64}, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\], got 18446744073709551616"),
            ],
        ),
        Config(
            "two_lamps",
            lambda: [_lamp(), _lamp(eps=1e-2, rollback_len=2, seed=1)],
            groups=split_groups({"lamp_1.eps": 2e-2}),
            expect_groups=({"lamp.eps": 5e-3, "lamp_1.eps": 2e-2}, {"lamp.eps": 5e-3, "lamp_1.eps": 1e-2}),
        ),
        Config("group_eps_zero", lambda: [_lamp()], groups=split_groups({"eps": 0.0}), expect_groups=({"eps": 0.0}, {"eps": 5e-3})),
        Config("sam_then_lamp", lambda: [_sam(), _lamp()], expect_groups=({"rho": 0.05, "eps": 5e-3},)),
    ),
    _info(
        TransformInfo(
            "ClipGradNorm",
            _clip,
            needs_closure=False,
            group_keys=("max_grad_norm",),
            error_inputs=[
                ErrorInput({"max_grad_norm": 0.0}, ValueError, r"max_grad_norm must be a finite number > 0, got 0\.0"),
                ErrorInput({"max_grad_norm": float("inf")}, ValueError, r"max_grad_norm must be a finite number > 0, got inf"),
                ErrorInput({"max_grad_norm": None}, TypeError, r"max_grad_norm must be a finite number > 0, got None"),
            ],
        ),
        Config(
            "group_max_grad_norm",
            lambda: [_clip()],
            groups=split_groups({"max_grad_norm": 0.01}),
            expect_groups=({"max_grad_norm": 0.01}, {"max_grad_norm": 0.05}),
        ),
    ),
    # GradSign has no argument and no hyperparameter: nothing to get wrong at construction.
    _info(TransformInfo("GradSign", GradSign, needs_closure=False, group_keys=())),
    _info(
        TransformInfo(
            "NormalizeGrad",
            NormalizeGrad,
            needs_closure=False,
            group_keys=("eps", "p", "param_ndim"),
            error_inputs=[
                ErrorInput({"eps": -1.0}, ValueError, r"eps must be a finite number >= 0, got -1\.0"),
                ErrorInput({"eps": "1e-8"}, TypeError, r"eps must be a finite number >= 0, got '1e-8'"),
                ErrorInput({"p": 0.0}, ValueError, r"p must be a real number > 0, got 0\.0"),
                ErrorInput({"p": -1}, ValueError, r"p must be a real number > 0, got -1"),
                ErrorInput({"p": float("nan")}, ValueError, r"p must be a real number > 0, got nan"),
                ErrorInput({"p": "inf"}, TypeError, r"p must be a real number > 0, got 'inf'"),
                ErrorInput({"param_ndim": 1.0}, TypeError, r"param_ndim must be an integer or None, got 1\.0"),
                ErrorInput({"param_ndim": True}, TypeError, r"param_ndim must be an integer or None, got True"),
            ],
        ),
        Config(
            "two_normalize_grads",
            lambda: [NormalizeGrad(eps=1.0), NormalizeGrad(eps=0.1)],
            groups=split_groups({"normalize_grad.eps": 0.5}),
            expect_groups=(
                {"normalize_grad.eps": 0.5, "normalize_grad_1.eps": 0.1},
                {"normalize_grad.eps": 1.0, "normalize_grad_1.eps": 0.1},
            ),
        ),
        Config(
            "adam_qualified_eps",
            lambda: [NormalizeGrad()],
            inner=torch.optim.Adam,
            inner_kwargs={"lr": 1e-2},
            # Adam owns "eps": NormalizeGrad's is stored as "normalize_grad.eps".
            expect_groups=({"normalize_grad.eps": 1e-12, "eps": 1e-8},),
        ),
        # param_ndim (samgria/transforms/param_ndim.py): per row with L1, per group overrides.
        Config("l1_rows", lambda: [NormalizeGrad(p=1, param_ndim=-1)], expect_groups=({"p": 1.0, "param_ndim": -1},)),
        Config(
            "group_param_ndim_p",
            lambda: [NormalizeGrad(eps=1e-3)],
            groups=split_groups({"param_ndim": 0, "p": math.inf}, {"param_ndim": 1, "p": 0.5}),
            expect_groups=({"param_ndim": 0, "p": math.inf}, {"param_ndim": 1, "p": 0.5}),
        ),
        Config(
            "adam_linf_rows_group_whole",
            lambda: [NormalizeGrad(p=math.inf, param_ndim=-1)],
            inner=torch.optim.Adam,
            inner_kwargs={"lr": 1e-2},
            groups=split_groups({"param_ndim": None}),
            expect_groups=({"param_ndim": None, "normalize_grad.eps": 1e-12}, {"param_ndim": -1, "p": math.inf}),
        ),
    ),
    _info(
        TransformInfo(
            "ScaleGrad",
            _scale,
            needs_closure=False,
            group_keys=("grad_scale", "grad_bias"),
            error_inputs=[
                ErrorInput({"scale": float("nan")}, ValueError, r"scale must be a finite number, got nan"),
                ErrorInput({"bias": float("-inf")}, ValueError, r"bias must be a finite number, got -inf"),
                ErrorInput({"scale": "2"}, TypeError, r"scale must be a finite number, got '2'"),
            ],
        ),
        Config(
            "group_scale_bias",
            lambda: [_scale()],
            groups=split_groups({"grad_scale": 2.0, "grad_bias": -1e-3}),
            expect_groups=({"grad_scale": 2.0, "grad_bias": -1e-3}, {"grad_scale": 0.5, "grad_bias": 1e-3}),
        ),
    ),
    _info(
        TransformInfo(
            "ClampGrad",
            _clamp,
            needs_closure=False,
            group_keys=("grad_min", "grad_max"),
            error_inputs=[
                ErrorInput({"grad_min": 1.0, "grad_max": 0.0}, ValueError, r"grad_max must be a finite number >= grad_min = 1, got 0\.0"),
                ErrorInput({"grad_min": float("nan")}, ValueError, r"grad_min must be a finite number, got nan"),
                ErrorInput({"grad_max": float("inf")}, ValueError, r"grad_max must be a finite number >= grad_min = -0\.01, got inf"),
                ErrorInput({"grad_max": "1"}, TypeError, r"grad_max must be a finite number >= grad_min = -0\.01, got '1'"),
            ],
        ),
        Config(
            "group_bounds",
            lambda: [_clamp()],
            groups=split_groups({"grad_min": -0.05, "grad_max": 0.005}),
            expect_groups=({"grad_min": -0.05, "grad_max": 0.005}, {"grad_min": -0.01, "grad_max": 0.02}),
        ),
    ),
]


# -- the SAM family (samgria/transforms/sam_family.py) ---------------------------------------------
def _gsam(**kw: Any) -> GSAM:
    return GSAM(**{"rho": 0.05, "alpha": 0.4, **kw})


def _wsam(**kw: Any) -> WSAM:
    # decouple=False by default here: the decoupled form needs the optimizer's lr, which the seed
    # protocol (the standalone generic test of the default config) does not have.
    return WSAM(**{"rho": 0.05, "gamma": 0.8, "decouple": False, **kw})


def _friendly_sam(**kw: Any) -> FriendlySAM:
    return FriendlySAM(**{"rho": 0.05, "sigma": 1.0, "lmbda": 0.9, **kw})


def _look_sam(**kw: Any) -> LookSAM:
    # k=2: step 2 (the third) is a SAM step, which the generic re-evaluation tests need.
    return LookSAM(**{"rho": 0.05, "alpha": 0.7, "k": 2, **kw})


def _esam(**kw: Any) -> ESAM:
    return ESAM(**{"rho": 0.05, "beta": 0.5, "seed": 0, **kw})


TRANSFORM_INFOS += [
    _info(
        TransformInfo(
            "GSAM",
            _gsam,
            needs_closure=True,
            group_keys=("rho", "alpha"),
            error_inputs=[
                ErrorInput({"rho": -1.0}, ValueError, r"rho must be a finite number >= 0, got -1\.0"),
                ErrorInput({"alpha": -0.5}, ValueError, r"alpha must be a finite number >= 0, got -0\.5"),
                ErrorInput({"alpha": float("nan")}, ValueError, r"alpha must be a finite number >= 0, got nan"),
                ErrorInput({"alpha": "0.1"}, TypeError, r"alpha must be a finite number >= 0, got '0\.1'"),
            ],
        ),
        Config(
            "group_alpha_rho",
            lambda: [_gsam()],
            groups=split_groups({"alpha": 0.0, "rho": 0.1}, {"alpha": 1.0}),
            expect_groups=({"alpha": 0.0, "rho": 0.1}, {"alpha": 1.0, "rho": 0.05}),
        ),
        Config("scale_grad_then_gsam", lambda: [ScaleGrad(2.0), _gsam()], expect_groups=({"grad_scale": 2.0, "alpha": 0.4},)),
        Config(
            "adadelta_qualified_rho",
            lambda: [_gsam()],
            inner=torch.optim.Adadelta,
            inner_kwargs={"lr": 0.5},
            groups=split_groups({"gsam.rho": 0.1}),
            expect_groups=({"gsam.rho": 0.1, "rho": 0.9}, {"gsam.rho": 0.05, "rho": 0.9}),
        ),
    ),
    _info(
        TransformInfo(
            "WSAM",
            _wsam,
            needs_closure=True,
            group_keys=("rho", "gamma"),
            error_inputs=[
                ErrorInput({"gamma": 1.0}, ValueError, r"gamma must be a finite number in \[0, 1\), got 1\.0"),
                ErrorInput({"gamma": -0.1}, ValueError, r"gamma must be a finite number in \[0, 1\), got -0\.1"),
                ErrorInput({"gamma": float("nan")}, ValueError, r"gamma must be a finite number in \[0, 1\), got nan"),
                ErrorInput({"rho": float("inf")}, ValueError, r"rho must be a finite number >= 0, got inf"),
                ErrorInput({"decouple": 1}, TypeError, r"decouple must be a bool, got 1"),
            ],
        ),
        Config(
            "decoupled_group_gamma",
            lambda: [_wsam(decouple=True)],
            groups=split_groups({"gamma": 0.5}, {"lr": 0.05}),
            expect_groups=({"gamma": 0.5, "rho": 0.05}, {"gamma": 0.8, "lr": 0.05}),
        ),
        Config("decoupled_then_lamp", lambda: [_wsam(decouple=True), _lamp()], expect_groups=({"gamma": 0.8, "eps": 5e-3},)),
        Config(
            "decoupled_adamw",
            lambda: [_wsam(decouple=True)],
            inner=torch.optim.AdamW,
            inner_kwargs={"lr": 1e-2, "weight_decay": 0.1},
            groups=split_groups({"gamma": 0.6}),
            expect_groups=({"gamma": 0.6, "weight_decay": 0.1}, {"gamma": 0.8, "lr": 1e-2}),
        ),
        Config("wsam_then_clip", lambda: [_wsam(), _clip()], expect_groups=({"max_grad_norm": 0.05, "gamma": 0.8},)),
    ),
    _info(
        TransformInfo(
            "FriendlySAM",
            _friendly_sam,
            needs_closure=True,
            group_keys=("rho", "sigma", "lmbda"),
            param_state_keys=("momentum",),
            error_inputs=[
                ErrorInput({"sigma": -1.0}, ValueError, r"sigma must be a finite number >= 0, got -1\.0"),
                ErrorInput({"lmbda": 1.5}, ValueError, r"lmbda must be a finite number in \[0, 1\], got 1\.5"),
                ErrorInput({"lmbda": "0.9"}, TypeError, r"lmbda must be a finite number in \[0, 1\], got '0\.9'"),
                ErrorInput({"rho": float("nan")}, ValueError, r"rho must be a finite number >= 0, got nan"),
            ],
        ),
        Config(
            "group_sigma_lmbda",
            lambda: [_friendly_sam()],
            groups=split_groups({"sigma": 0.5, "lmbda": 0.6}, {"rho": 0.0}),
            expect_groups=({"sigma": 0.5, "lmbda": 0.6, "rho": 0.05}, {"sigma": 1.0, "lmbda": 0.9, "rho": 0.0}),
        ),
        Config("friendly_sam_then_clip", lambda: [_friendly_sam(), _clip()], expect_groups=({"sigma": 1.0, "max_grad_norm": 0.05},)),
        Config(
            "adam",
            lambda: [_friendly_sam(sigma=0.5)],
            inner=torch.optim.Adam,
            inner_kwargs={"lr": 1e-2},
            expect_groups=({"sigma": 0.5, "lmbda": 0.9, "lr": 1e-2},),
        ),
    ),
    _info(
        TransformInfo(
            "LookSAM",
            _look_sam,
            needs_closure=True,
            group_keys=("rho", "alpha"),
            param_state_keys=("g_v",),
            object_state_keys=("step",),
            error_inputs=[
                ErrorInput({"k": 0}, ValueError, r"k must be an integer >= 1, got 0"),
                ErrorInput({"k": 2.0}, TypeError, r"k must be an integer >= 1, got 2\.0"),
                ErrorInput({"k": True}, TypeError, r"k must be an integer >= 1, got True"),
                ErrorInput({"alpha": -1.0}, ValueError, r"alpha must be a finite number >= 0, got -1\.0"),
                ErrorInput({"rho": -0.1}, ValueError, r"rho must be a finite number >= 0, got -0\.1"),
            ],
        ),
        Config(
            "group_alpha_rho",
            lambda: [_look_sam()],
            groups=split_groups({"alpha": 0.0}, {"rho": 0.1, "alpha": 2.0}),
            expect_groups=({"alpha": 0.0, "rho": 0.05}, {"alpha": 2.0, "rho": 0.1}),
        ),
        # A transform before LookSAM: the two-call loop must still equal step(closure) bit for bit.
        Config("scale_grad_then_look_sam", lambda: [ScaleGrad(2.0, 1e-3), _look_sam()], expect_groups=({"grad_scale": 2.0, "alpha": 0.7},)),
        Config("look_sam_then_lamp", lambda: [_look_sam(), _lamp()], expect_groups=({"alpha": 0.7, "eps": 5e-3},)),
    ),
    _info(
        TransformInfo(
            "ESAM",
            _esam,
            needs_closure=True,
            group_keys=("rho", "beta"),
            object_state_keys=("rng_state",),
            error_inputs=[
                ErrorInput({"beta": 0.0}, ValueError, r"beta must be a finite number in \(0, 1\], got 0\.0"),
                ErrorInput({"beta": 1.5}, ValueError, r"beta must be a finite number in \(0, 1\], got 1\.5"),
                ErrorInput({"beta": float("nan")}, ValueError, r"beta must be a finite number in \(0, 1\], got nan"),
                ErrorInput({"rho": -1.0}, ValueError, r"rho must be a finite number >= 0, got -1\.0"),
                ErrorInput({"seed": 1.5}, TypeError, r"seed must be an integer, got 1\.5"),
                ErrorInput({"seed": 2**64}, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\], got 18446744073709551616"),
            ],
        ),
        Config(
            "group_beta",
            lambda: [_esam()],
            groups=split_groups({"beta": 1.0}, {"beta": 0.3, "rho": 0.1}),
            expect_groups=({"beta": 1.0, "rho": 0.05}, {"beta": 0.3, "rho": 0.1}),
        ),
        Config("esam_then_lamp", lambda: [_esam(), _lamp(seed=1)], expect_groups=({"beta": 0.5, "eps": 5e-3},)),
    ),
]

# -- weight averaging after the step (samgria/transforms/averaging.py) --------------------------------------
def _lookahead(**kw: Any) -> Lookahead:
    # k=2: the second step synchronises, so every generic test sees synchronisations.
    return Lookahead(**{"alpha": 0.5, "k": 2, **kw})


def _ema(**kw: Any) -> EMA:
    # A pure EMA leaves the weights alone, which the generic tests cannot tell from doing nothing:
    # the default switches the averages into the weights every 2 steps (Switch EMA). The pure EMA
    # runs in the chains below, where the state comparisons see it.
    return EMA(**{"decay": 0.8, "switch_every": 2, **kw})


TRANSFORM_INFOS += [
    _info(
        TransformInfo(
            "Lookahead",
            _lookahead,
            needs_closure=False,
            group_keys=("alpha",),
            param_state_keys=("slow",),
            object_state_keys=("step",),
            error_inputs=[
                ErrorInput({"alpha": 0.0}, ValueError, r"alpha must be a finite number in \(0, 1\], got 0\.0"),
                ErrorInput({"alpha": 1.5}, ValueError, r"alpha must be a finite number in \(0, 1\], got 1\.5"),
                ErrorInput({"alpha": float("nan")}, ValueError, r"alpha must be a finite number in \(0, 1\], got nan"),
                ErrorInput({"alpha": "0.5"}, TypeError, r"alpha must be a finite number in \(0, 1\], got '0\.5'"),
                ErrorInput({"k": 0}, ValueError, r"k must be an integer >= 1, got 0"),
                ErrorInput({"k": 2.5}, TypeError, r"k must be an integer >= 1, got 2\.5"),
                ErrorInput({"k": True}, TypeError, r"k must be an integer >= 1, got True"),
            ],
        ),
        Config(
            "group_alpha",
            lambda: [_lookahead()],
            groups=split_groups({"alpha": 1.0}, {"alpha": 0.2}),
            expect_groups=({"alpha": 1.0}, {"alpha": 0.2}),
        ),
        Config("sam_then_lookahead", lambda: [_sam(), _lookahead()], expect_groups=({"rho": 0.05, "alpha": 0.5},)),
        # Lookahead writes its slow weights before SAM re-evaluates: a failing re-evaluation must undo that.
        Config("lookahead_then_sam", lambda: [_lookahead(k=3), _sam()], expect_groups=({"rho": 0.05, "alpha": 0.5},)),
        Config(
            "rmsprop_qualified_alpha",
            lambda: [_lookahead()],
            inner=torch.optim.RMSprop,
            inner_kwargs={"lr": 1e-2},
            groups=split_groups({"lookahead.alpha": 0.8}),
            # RMSprop owns "alpha": Lookahead's is stored as "lookahead.alpha".
            expect_groups=({"lookahead.alpha": 0.8, "alpha": 0.99}, {"lookahead.alpha": 0.5, "alpha": 0.99}),
        ),
        Config(
            "look_sam_then_lookahead",
            lambda: [_look_sam(), _lookahead()],
            expect_groups=({"look_sam.alpha": 0.7, "lookahead.alpha": 0.5},),
        ),
    ),
    _info(
        TransformInfo(
            "EMA",
            _ema,
            needs_closure=False,
            group_keys=("decay",),
            param_state_keys=("average",),
            object_state_keys=("step",),
            error_inputs=[
                ErrorInput({"decay": 1.5}, ValueError, r"decay must be a finite number in \[0, 1\], got 1\.5"),
                ErrorInput({"decay": -0.1}, ValueError, r"decay must be a finite number in \[0, 1\], got -0\.1"),
                ErrorInput({"decay": float("nan")}, ValueError, r"decay must be a finite number in \[0, 1\], got nan"),
                ErrorInput({"decay": "0.9"}, TypeError, r"decay must be a finite number in \[0, 1\], got '0\.9'"),
                ErrorInput({"warmup": 1}, TypeError, r"warmup must be a bool, got 1"),
                ErrorInput({"warmup_gamma": 0.0}, ValueError, r"warmup_gamma must be a finite number > 0, got 0\.0"),
                ErrorInput({"warmup_power": float("inf")}, ValueError, r"warmup_power must be a finite number > 0, got inf"),
                ErrorInput({"switch_every": 0}, ValueError, r"switch_every must be an integer >= 1, got 0"),
                ErrorInput({"switch_every": 1.5}, TypeError, r"switch_every must be an integer >= 1, got 1\.5"),
            ],
        ),
        Config(
            "group_decay",
            lambda: [_ema()],
            groups=split_groups({"decay": 0.0}, {"decay": 0.95}),
            expect_groups=({"decay": 0.0}, {"decay": 0.95}),
        ),
        Config("sam_then_ema", lambda: [_sam(), EMA(0.9)], expect_groups=({"rho": 0.05, "decay": 0.9},)),
        Config(
            "sam_then_ema_warmup_groups",
            lambda: [_sam(), EMA(0.95, warmup=True, warmup_power=0.75)],
            groups=split_groups({"decay": 0.5, "rho": 0.1}),
            expect_groups=({"rho": 0.1, "decay": 0.5}, {"rho": 0.05, "decay": 0.95}),
        ),
        Config("lookahead_then_ema", lambda: [_lookahead(), EMA(0.9)], expect_groups=({"alpha": 0.5, "decay": 0.9},)),
    ),
]

# -- param_ndim transforms: top-q sparsification, constraints, per-parameter hooks ----------------------------
def _sparsify(**kw: Any) -> SparsifyGrad:
    return SparsifyGrad(**{"q": 0.3, **kw})


def _clamp_params(**kw: Any) -> ClampParams:
    return ClampParams(**{"param_min": -0.3, "param_max": 0.3, **kw})


def _project(**kw: Any) -> ProjectParams:
    # center="initial": a radius small enough to bind within the generic tests' few steps, and
    # state to checkpoint. Projection around zero is tested in test_transforms_param_ndim.py.
    return ProjectParams(**{"radius": 0.01, "center": "initial", **kw})


class HookedRowTransform(ParamTransform):
    """A ParamTransform written with both hooks, as a user would, reading a key of its own.

    Before the step: centre each sub-tensor's gradient (subtract its mean). After the step: scale
    each sub-tensor down so that its largest magnitude is at most ``limit``.
    """

    def __init__(self, limit: float = 0.3, param_ndim: int | None = -1) -> None:
        super().__init__(param_ndim)
        self.limit = limit
        self.validate_group(self.group_defaults())

    def group_defaults(self) -> dict[str, Any]:
        return {**super().group_defaults(), "limit": self.limit}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        super().validate_group(group)
        check_real("limit", group["limit"], low=0.0, low_open=True)

    def pre_step_transform_(self, param: torch.Tensor, group: Mapping[str, Any]) -> None:
        dims = tuple(range(1, param.ndim))
        param.grad.sub_(param.grad.mean(dim=dims, keepdim=True))

    def post_step_transform_(self, param: torch.Tensor, group: Mapping[str, Any]) -> None:
        dims = tuple(range(1, param.ndim))
        largest = param.abs().amax(dim=dims, keepdim=True)
        param.mul_(torch.where(largest > group["limit"], group["limit"] / largest, 1.0))


TRANSFORM_INFOS += [
    _info(
        TransformInfo(
            "SparsifyGrad",
            _sparsify,
            needs_closure=False,
            group_keys=("q", "param_ndim"),
            error_inputs=[
                ErrorInput({"q": 0.0}, ValueError, r"q must be a finite number in \(0, 1\], got 0\.0"),
                ErrorInput({"q": 1.5}, ValueError, r"q must be a finite number in \(0, 1\], got 1\.5"),
                ErrorInput({"q": -0.1}, ValueError, r"q must be a finite number in \(0, 1\], got -0\.1"),
                ErrorInput({"q": float("nan")}, ValueError, r"q must be a finite number in \(0, 1\], got nan"),
                ErrorInput({"q": "0.5"}, TypeError, r"q must be a finite number in \(0, 1\], got '0\.5'"),
                ErrorInput({"param_ndim": "rows"}, TypeError, r"param_ndim must be an integer or None, got 'rows'"),
            ],
        ),
        Config("rows", lambda: [_sparsify(q=0.5, param_ndim=-1)], expect_groups=({"q": 0.5, "param_ndim": -1},)),
        Config(
            "group_q_param_ndim",
            lambda: [_sparsify()],
            groups=split_groups({"q": 1.0}, {"q": 0.2, "param_ndim": 1}),
            expect_groups=({"q": 1.0, "param_ndim": None}, {"q": 0.2, "param_ndim": 1}),
        ),
        # rai-toolbox's L1qNormedGradientOptim as a chain; two transforms own param_ndim: qualified keys.
        Config(
            "l1q_chain_qualified_param_ndim",
            lambda: [_sparsify(q=0.25, param_ndim=-1), GradSign(), NormalizeGrad(p=1, param_ndim=-1)],
            groups=split_groups({"sparsify_grad.param_ndim": None, "normalize_grad.param_ndim": None}),
            expect_groups=(
                {"sparsify_grad.param_ndim": None, "normalize_grad.param_ndim": None, "q": 0.25, "p": 1.0},
                {"sparsify_grad.param_ndim": -1, "normalize_grad.param_ndim": -1, "q": 0.25, "p": 1.0},
            ),
        ),
    ),
    _info(
        TransformInfo(
            "ClampParams",
            _clamp_params,
            needs_closure=False,
            group_keys=("param_min", "param_max"),
            error_inputs=[
                ErrorInput({"param_min": 1.0, "param_max": 0.0}, ValueError, r"param_max must be a real number >= param_min = 1, got 0\.0"),
                ErrorInput({"param_min": float("nan")}, ValueError, r"param_min must be a real number < inf, got nan"),
                ErrorInput({"param_min": float("inf")}, ValueError, r"param_min must be a real number < inf, got inf"),
                ErrorInput({"param_max": float("-inf")}, ValueError, r"param_max must be a real number > -inf, got -inf"),
                ErrorInput({"param_max": "1"}, TypeError, r"param_max must be a real number > -inf, got '1'"),
            ],
        ),
        Config(
            "group_bounds",
            lambda: [_clamp_params()],
            groups=split_groups({"param_min": -0.1, "param_max": 0.05}),
            expect_groups=({"param_min": -0.1, "param_max": 0.05}, {"param_min": -0.3, "param_max": 0.3}),
        ),
        Config("non_negative", lambda: [ClampParams(0.0, math.inf)], expect_groups=({"param_min": 0.0, "param_max": math.inf},)),
        # ClampParams owns no param_ndim (elementwise): NormalizeGrad's short key stays unambiguous.
        Config(
            "normalize_rows_then_clamp",
            lambda: [NormalizeGrad(param_ndim=-1), _clamp_params()],
            groups=split_groups({"param_ndim": 0}),
            expect_groups=({"param_ndim": 0, "param_min": -0.3}, {"param_ndim": -1, "param_max": 0.3}),
        ),
    ),
    _info(
        TransformInfo(
            "ProjectParams",
            _project,
            needs_closure=False,
            group_keys=("radius", "p", "param_ndim"),
            param_state_keys=("center",),
            error_inputs=[
                ErrorInput({"radius": -1.0}, ValueError, r"radius must be a finite number >= 0, got -1\.0"),
                ErrorInput({"radius": float("inf")}, ValueError, r"radius must be a finite number >= 0, got inf"),
                ErrorInput({"radius": None}, TypeError, r"radius must be a finite number >= 0, got None"),
                ErrorInput({"p": 1}, ValueError, r"p must be one of 2, inf, got 1"),
                ErrorInput({"center": "origin"}, ValueError, r"center must be one of 'zero', 'initial', got 'origin'"),
                ErrorInput({"param_ndim": 0.5}, TypeError, r"param_ndim must be an integer or None, got 0\.5"),
            ],
        ),
        Config(
            "linf_group_radius",
            lambda: [_project(p=math.inf)],
            groups=split_groups({"radius": 0.002}),
            expect_groups=({"radius": 0.002, "p": math.inf}, {"radius": 0.01, "p": math.inf}),
        ),
        Config(
            "group_param_ndim",
            lambda: [_project()],
            groups=split_groups({"param_ndim": None}, {"param_ndim": 0, "radius": 0.005}),
            expect_groups=({"param_ndim": None, "radius": 0.01}, {"param_ndim": 0, "radius": 0.005}),
        ),
        Config(
            "adam_whole_tensor",
            lambda: [_project(param_ndim=None, radius=0.02)],
            inner=torch.optim.Adam,
            inner_kwargs={"lr": 1e-2},
            expect_groups=({"param_ndim": None, "radius": 0.02},),
        ),
        # rai-toolbox's LinfProjectedOptim: the sign of the gradient, then the L-inf ball.
        Config("sign_then_linf", lambda: [GradSign(), _project(p=math.inf)], expect_groups=({"p": math.inf, "radius": 0.01},)),
    ),
    _info(
        TransformInfo(
            "HookedRowTransform",
            HookedRowTransform,
            needs_closure=False,
            group_keys=("param_ndim", "limit"),
            error_inputs=[
                ErrorInput({"param_ndim": 1.5}, TypeError, r"param_ndim must be an integer or None, got 1\.5"),
                ErrorInput({"limit": 0.0}, ValueError, r"limit must be a finite number > 0, got 0\.0"),
            ],
        ),
        Config(
            "group_param_ndim_limit",
            lambda: [HookedRowTransform()],
            groups=split_groups({"param_ndim": None}, {"param_ndim": 0, "limit": 0.2}),
            expect_groups=({"param_ndim": None, "limit": 0.3}, {"param_ndim": 0, "limit": 0.2}),
        ),
        Config(
            "sam_then_hooks_whole",
            lambda: [_sam(), HookedRowTransform(limit=0.25, param_ndim=None)],
            expect_groups=({"rho": 0.05, "param_ndim": None, "limit": 0.25},),
        ),
    ),
]


# -- multi-step adversarial ascent (samgria/transforms/ascent.py) ------------------------------------------
# The generic tests include the two-call loop, which takes one ascent step: every config here has
# ascent_steps=1 (ascent_steps > 1 is tested in test_transforms_ascent.py).
def _multi_step_sam(**kw: Any) -> MultiStepSAM:
    return MultiStepSAM(**{"rho": 0.05, **kw})


def _momentum_adversary(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, momentum=0.9)


TRANSFORM_INFOS += [
    _info(
        TransformInfo(
            "MultiStepSAM",
            _multi_step_sam,
            needs_closure=True,
            group_keys=("rho",),
            error_inputs=[
                ErrorInput({"rho": -1.0}, ValueError, r"rho must be a finite number >= 0, got -1\.0"),
                ErrorInput({"rho": float("nan")}, ValueError, r"rho must be a finite number >= 0, got nan"),
                ErrorInput({"ascent_steps": 0}, ValueError, r"ascent_steps must be an integer >= 1, got 0"),
                ErrorInput({"ascent_steps": 2.0}, TypeError, r"ascent_steps must be an integer >= 1, got 2\.0"),
                ErrorInput({"ascent_steps": True}, TypeError, r"ascent_steps must be an integer >= 1, got True"),
                ErrorInput({"normalize": 1}, TypeError, r"normalize must be a bool, got 1"),
                ErrorInput({"reset_state": "no"}, TypeError, r"reset_state must be a bool, got 'no'"),
                ErrorInput({"adversary": 3}, TypeError, r"adversary must be a callable that builds a torch\.optim\.Optimizer .*, got 3"),
                ErrorInput({"adversary": lambda groups: None}, TypeError, r"adversary must be .*, but adversary\(param_groups\) returned None"),
                ErrorInput({"adversary": torch.optim.LBFGS}, TypeError, r"adversary must be .* whose step\(\) works without a closure, got one that builds LBFGS"),
                ErrorInput(
                    {"adversary": lambda groups: torch.optim.SGD(groups, maximize=True)},
                    ValueError,
                    r"adversary must build an optimizer that minimises .* got one with maximize=True",
                ),
            ],
        ),
        Config(
            "momentum_adversary_kept_state",
            lambda: [_multi_step_sam(adversary=_momentum_adversary, reset_state=False)],
            groups=split_groups({"rho": 0.1}),
            expect_groups=({"rho": 0.1}, {"rho": 0.05}),
        ),
        Config(
            "adam_adversary_kept_state_group_rho_zero",
            lambda: [_multi_step_sam(rho=0.01, adversary=torch.optim.Adam, reset_state=False)],
            groups=split_groups({"rho": 0.0}, {"rho": 0.02}),
            expect_groups=({"rho": 0.0}, {"rho": 0.02}),
        ),
        Config("unnormalized_then_lamp", lambda: [_multi_step_sam(rho=0.5, normalize=False), _lamp()], expect_groups=({"rho": 0.5, "eps": 5e-3},)),
        Config(
            "adadelta_qualified_rho",
            lambda: [_multi_step_sam(adversary=torch.optim.SGD)],
            inner=torch.optim.Adadelta,
            inner_kwargs={"lr": 0.5},
            groups=split_groups({"multi_step_sam.rho": 0.1}),
            expect_groups=({"multi_step_sam.rho": 0.1, "rho": 0.9}, {"multi_step_sam.rho": 0.05, "rho": 0.9}),
        ),
    ),
]

#: Every (info, config) pair, for ``pytest.mark.parametrize`` (ids from :func:`config_id`).
CONFIGS = [(info, config) for info in TRANSFORM_INFOS for config in info.configs]


def config_id(pair: tuple[TransformInfo, Config]) -> str:
    info, config = pair
    return f"{info.name}-{config.id}"


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A small MLP with a frozen parameter and an unused one (their grads stay ``None``).

    ``model.parameters()`` yields the unused parameter first (it is registered on the
    ``Sequential`` itself), so object-level transform state lands on a parameter without grad.
    """
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


class ToyScheduleFree(torch.optim.Optimizer):
    """A schedule-free-style optimizer, for the ``train()``/``eval()`` contract: SGD on the
    training sequence ``y``; ``eval()`` puts the running mean ``x`` of the iterates into the
    weights (keeping ``y``), ``train()`` puts ``y`` back; ``step`` in eval mode raises."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr, "train_mode": True})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError("ToyScheduleFree: step() in eval mode")
            for param in group["params"]:
                if param.grad is None:
                    continue
                param.add_(param.grad, alpha=-group["lr"])
                state = self.state[param]
                state["count"] = state.get("count", 0) + 1
                mean = state.setdefault("x", torch.zeros_like(param))
                mean.add_((param - mean) / state["count"])
        return loss

    @torch.no_grad()
    def eval(self) -> None:
        for group in self.param_groups:
            if group["train_mode"]:
                for param in group["params"]:
                    if "x" in self.state[param]:
                        self.state[param]["y"] = param.clone()
                        param.copy_(self.state[param]["x"])
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        for group in self.param_groups:
            if not group["train_mode"]:
                for param in group["params"]:
                    if "y" in self.state[param]:
                        param.copy_(self.state[param].pop("y"))
                group["train_mode"] = True


def step_in_loop(optimizer, closure, loop):
    """One step of ``loop``: ``"closure"`` (``step(closure)``) or the two-call loop (any other)."""
    if loop == "closure":
        optimizer.step(closure)
    else:
        closure()
        optimizer.first_step()
        closure()
        optimizer.second_step()


def step_installing(optimizer, install, loop):
    """One step of ``loop`` ("closure" or "two-call") whose passes' gradients ``install()`` sets."""
    if loop == "closure":

        def closure():
            optimizer.zero_grad()
            install()
            return torch.zeros(())

        optimizer.step(closure)
    else:
        install()
        optimizer.first_step()
        install()
        optimizer.second_step()
