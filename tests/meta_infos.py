"""Registry of meta-learner configurations for the generic meta tests (the meta-learning
counterpart of ``transform_infos.py``, in the spirit of torch's ``OptimizerInfo``).

Each :class:`MetaInfo` is one meta-optimizer configuration: the algorithm (MAML, FOMAML,
Reptile, MetaSGD, ANIL), its inner loop (steps, per-group ``inner_lr`` / ``adapt=False`` groups,
first or second order, checkpointed steps), the outer optimizer (SGD, Adam, or an already built
``TransformingOptimizer`` with SAM), the model it runs on, the inner options handed to every
call (``inner_step_fn``, ``inner_reg_fn``, ``grad_transforms``) and which paths (loop, vmap,
compiled) apply to it. ``test_meta_generic.py`` runs its contracts over every entry.

The fields are declarative on purpose: the hand-written references in the tests read what is
adapted and with which step size from the declaration (:meth:`MetaInfo.adapted_lrs`), not from
the library, and :meth:`MetaInfo.paths` is derived from the documented rules (checkpointed
second-order steps and second order through BatchNorm need the loop), then checked against the
engine's own ``vmap_blocker``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samgria.data import Task
from samgria.meta import ANIL, FOMAML, MAML, AdamInnerStep, InnerSAM, MetaOptimizer, MetaSGD, MomentumInnerStep, Reptile
from samgria.optim import TransformingOptimizer
from samgria.transforms import SAM

__all__ = [
    "ALGORITHMS",
    "DT",
    "META_INFOS",
    "MODELS",
    "MetaInfo",
    "info_id",
    "make_tasks",
    "mse",
    "proximal",
]

DT = torch.float64
mse = F.mse_loss
ALGORITHMS = ("MAML", "FOMAML", "Reptile", "MetaSGD", "ANIL")
IN_FEATURES = 2


# ------------------------------------------------------------------------- models and tasks
def make_mlp(seed: int = 0) -> nn.Module:
    """``2 -> 5 -> 5 -> 1`` tanh MLP (smooth, so second-order terms are never trivially zero)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1)
    ).to(DT)


def make_frozen_mlp(seed: int = 0) -> nn.Module:
    """The MLP with a frozen parameter (``requires_grad=False``): never adapted, no meta-gradient."""
    model = make_mlp(seed)
    model[2].bias.requires_grad_(False)
    return model


def make_bn_mlp(seed: int = 0) -> nn.Module:
    """An MLP with a BatchNorm layer in train mode (batch statistics): second order needs the loop."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN_FEATURES, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


#: Model factories by name; every model's head (ANIL) is its last module.
MODELS: dict[str, Callable[[int], nn.Module]] = {
    "mlp": make_mlp,
    "frozen_mlp": make_frozen_mlp,
    "bn_mlp": make_bn_mlp,
}


def make_tasks(n: int = 3, k: int = 5, q: int = 4, seed: int = 1, sizes: list[int] | None = None) -> list[Task]:
    """``n`` regression tasks ``y = sin(a . x) + b`` with ``k`` support and ``q`` query points.

    ``sizes`` gives each task its own support size (tasks of unequal shapes).
    """
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for i in range(n):
        a = torch.randn(IN_FEATURES, 1, generator=g, dtype=DT)
        b = torch.randn(1, generator=g, dtype=DT)
        ks = k if sizes is None else sizes[i]
        sx = torch.randn(ks, IN_FEATURES, generator=g, dtype=DT)
        qx = torch.randn(q, IN_FEATURES, generator=g, dtype=DT)
        tasks.append(Task(sx, torch.sin(sx @ a) + b, qx, torch.sin(qx @ a) + b))
    return tasks


# ------------------------------------------------------------------------- inner options
def proximal(current: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """An inner regulariser: ``0.25 * ||phi - theta||^2`` (iMAML's proximal term)."""
    return 0.25 * sum(((current[n] - base[n]) ** 2).sum() for n in current)


GroupsFn = Callable[[nn.Module], list[dict[str, Any]]]


def first_layer_groups(first: Mapping[str, Any], rest: Mapping[str, Any] | None = None) -> GroupsFn:
    """Two param groups: the first Linear's parameters with ``first``'s keys, the rest with ``rest``'s."""
    rest = dict(rest or {})

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        params = list(model.parameters())
        return [{"params": params[:2], **first}, {"params": params[2:], **rest}]

    return groups


def head_groups(head: Mapping[str, Any], body: Mapping[str, Any] | None = None) -> GroupsFn:
    """Two param groups: the body with ``body``'s keys, and the head (the last module) with ``head``'s."""

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        head_ids = {id(p) for p in model[-1].parameters()}
        params = [p for p in model.parameters() if id(p) not in head_ids]
        return [{"params": params, **(body or {})}, {"params": list(model[-1].parameters()), **head}]

    return groups


# ------------------------------------------------------------------------- the registry entry
OUTERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
}


@dataclass(frozen=True, eq=False)
class MetaInfo:
    """One meta-optimizer configuration.

    Attributes:
        name: Test id.
        algorithm: One of :data:`ALGORITHMS`.
        inner_lr: The constructor's ``inner_lr`` (groups may override it).
        inner_steps: Number of inner steps.
        first_order: ``first_order=`` of MAML, MetaSGD and ANIL (FOMAML and Reptile always are).
        checkpoint: ``checkpoint_inner_steps=``.
        outer: ``"sgd"``, ``"adam"`` (built from the class) or ``"sam"`` (an already built
            ``TransformingOptimizer(SGD, [SAM(rho=0.05)])`` handed to the meta-optimizer).
        outer_lr: Outer learning rate (default: that of :data:`OUTERS`; SAM: 0.1).
        groups: ``model -> param groups`` (with ``inner_lr`` / ``adapt`` keys), or ``None``.
        model: Key of :data:`MODELS`.
        inner_step_fn, inner_reg_fn, grad_transforms: Inner options passed to every call.
        compiled: Also compare the compiled path (``CompiledMetaLoss``) with the loop.
    """

    name: str
    algorithm: str
    inner_lr: float = 0.1
    inner_steps: int = 1
    first_order: bool = False
    checkpoint: bool = False
    outer: str = "sgd"
    outer_lr: float | None = None
    groups: GroupsFn | None = None
    model: str = "mlp"
    inner_step_fn: Any = None
    inner_reg_fn: Any = None
    grad_transforms: tuple[Any, ...] = ()
    compiled: bool = False
    notes: str = field(default="", compare=False)

    # -------------------------------------------------------------- building
    def make_model(self, seed: int = 0) -> nn.Module:
        return MODELS[self.model](seed)

    def head(self, model: nn.Module) -> nn.Module:
        """ANIL's head: the model's last module."""
        return model[-1]

    def build(self, model: nn.Module, **meta_kwargs: Any) -> MetaOptimizer:
        """Build the meta-optimizer over ``model``; ``meta_kwargs`` (e.g. ``non_finite``) go to
        its constructor."""
        kwargs: dict[str, Any] = {"inner_lr": self.inner_lr, "inner_steps": self.inner_steps, **meta_kwargs}
        if self.checkpoint:
            kwargs["checkpoint_inner_steps"] = True
        if self.algorithm in ("MAML", "MetaSGD", "ANIL"):
            kwargs["first_order"] = self.first_order
        if self.algorithm == "ANIL":
            kwargs["head"] = self.head(model)
        cls = {"MAML": MAML, "FOMAML": FOMAML, "Reptile": Reptile, "MetaSGD": MetaSGD, "ANIL": ANIL}[self.algorithm]
        if self.outer == "sam":
            params = self.groups(model) if self.groups is not None else model.parameters()
            lr = 0.1 if self.outer_lr is None else self.outer_lr
            outer = TransformingOptimizer(params, torch.optim.SGD, transforms=[SAM(rho=0.05)], lr=lr)
            return cls(model, outer, **kwargs)
        outer_cls, outer_kwargs = OUTERS[self.outer]
        outer_kwargs = dict(outer_kwargs)
        if self.outer_lr is not None:
            outer_kwargs["lr"] = self.outer_lr
        if self.groups is not None:
            kwargs["params"] = self.groups(model)
        return cls(model, outer_cls, **kwargs, **outer_kwargs)

    @property
    def inner_options(self) -> dict[str, Any]:
        """The inner options of every call (``task_losses``, ``adapt``, trainer, compiled)."""
        return {
            "inner_step_fn": self.inner_step_fn,
            "inner_reg_fn": self.inner_reg_fn,
            "grad_transforms": list(self.grad_transforms) if self.grad_transforms else None,
        }

    # -------------------------------------------------------------- what the configuration is
    @property
    def meta_gradient(self) -> bool:
        """Whether the outer update is a meta-gradient (all but Reptile's pseudo-gradient)."""
        return self.algorithm != "Reptile"

    @property
    def update_field(self) -> str:
        """The task field a NaN in which makes the update itself non-finite: the query target
        (the meta-loss) for the MAML family, the support target (the adapted weights, so the
        pseudo-gradient) for Reptile, whose query loss is monitoring only."""
        return "query_y" if self.meta_gradient else "support_y"

    @property
    def second_order(self) -> bool:
        return self.algorithm in ("MAML", "MetaSGD", "ANIL") and not self.first_order

    @property
    def has_norm_layer(self) -> bool:
        return self.model == "bn_mlp"

    @property
    def adapts_before_the_head(self) -> bool:
        """Whether a parameter before the head (the last module) is adapted: in ``bn_mlp`` the
        support gradient then back-propagates through the BatchNorm layer."""
        head = f"{len(MODELS[self.model](0)) - 1}."
        return any(not name.startswith(head) for name in self.adapted_lrs(MODELS[self.model](0)))

    @property
    def vmap_blocker(self) -> str | None:
        """Why the vmap path does not apply (from the documented rules), or ``None``."""
        if self.second_order and self.checkpoint:
            return "checkpointed inner steps need the loop path"
        if self.second_order and self.has_norm_layer and self.adapts_before_the_head:
            return "second-order gradients pass through 1 (BatchNorm1d), whose double backward torch.func.vmap gets wrong"
        return None

    @property
    def paths(self) -> tuple[str, ...]:
        """The paths that apply: ``"loop"`` always, ``"vmap"`` unless blocked, ``"compiled"``
        where the registry asks for it (a MAML-family entry that vmap can run)."""
        paths = ["loop"]
        if self.vmap_blocker is None:
            paths.append("vmap")
            if self.compiled and self.meta_gradient:
                paths.append("compiled")
        return tuple(paths)

    @property
    def plain_sgd_inner(self) -> bool:
        """Plain SGD inner steps without gradient transforms (what the hand-written references do)."""
        return self.inner_step_fn is None and not self.grad_transforms

    def adapted_lrs(self, model: nn.Module) -> dict[str, float]:
        """``{name: inner step size}`` of the adapted parameters, from the declaration:
        trainable parameters of groups without ``adapt=False``, ANIL's head only."""
        groups = self.groups(model) if self.groups is not None else [{"params": list(model.parameters())}]
        name_of = {id(p): n for n, p in model.named_parameters()}
        head = {id(p) for p in self.head(model).parameters()}
        lrs = {}
        for group in groups:
            if group.get("adapt", True) is False:
                continue
            for p in group["params"]:
                if not p.requires_grad or (self.algorithm == "ANIL" and id(p) not in head):
                    continue
                lrs[name_of[id(p)]] = float(group.get("inner_lr", self.inner_lr))
        return {n: lrs[n] for n in name_of.values() if n in lrs}  # model order


def info_id(info: MetaInfo) -> str:
    return info.name


_groups_lr = first_layer_groups({"inner_lr": 0.05}, {"inner_lr": 0.2})
_frozen_first = first_layer_groups({"adapt": False})
_frozen_first_lr = first_layer_groups({"adapt": False}, {"inner_lr": 0.3})

META_INFOS: list[MetaInfo] = [
    # ------------------------------------------------------------------ MAML
    MetaInfo("maml-1step", "MAML"),
    MetaInfo("maml-3steps", "MAML", inner_steps=3),
    MetaInfo("maml-group-lrs-adam", "MAML", inner_steps=2, groups=_groups_lr, outer="adam"),
    MetaInfo("maml-adapt-false-group", "MAML", inner_steps=2, groups=_frozen_first),
    MetaInfo("maml-frozen-param", "MAML", inner_steps=2, model="frozen_mlp"),
    MetaInfo("maml-nesterov-inner", "MAML", inner_steps=3, inner_step_fn=MomentumInnerStep(0.9, nesterov=True)),
    MetaInfo("maml-momentum-inner", "MAML", inner_steps=2, inner_step_fn=MomentumInnerStep(0.9), compiled=True),
    MetaInfo("maml-adam-inner", "MAML", inner_lr=0.05, inner_steps=2, inner_step_fn=AdamInnerStep(betas=(0.9, 0.99))),
    MetaInfo("maml-inner-sam", "MAML", inner_steps=2, grad_transforms=(InnerSAM(0.05),)),
    MetaInfo("maml-proximal", "MAML", inner_steps=2, inner_reg_fn=proximal),
    MetaInfo("maml-checkpoint", "MAML", inner_steps=3, checkpoint=True),
    MetaInfo("maml-batchnorm", "MAML", inner_steps=2, model="bn_mlp"),
    MetaInfo(
        "maml-batchnorm-head-adapts", "MAML", inner_steps=2, model="bn_mlp", groups=head_groups({}, {"adapt": False}),
        notes="the support gradient stops at the head: second order vmaps through the body's BatchNorm",
    ),
    MetaInfo("maml-sam-outer", "MAML", inner_steps=2, outer="sam"),
    # ------------------------------------------------------------------ FOMAML
    MetaInfo("fomaml-1step", "FOMAML"),
    MetaInfo("fomaml-3steps-adam", "FOMAML", inner_steps=3, outer="adam"),
    MetaInfo("fomaml-momentum-inner", "FOMAML", inner_steps=3, inner_step_fn=MomentumInnerStep(0.5, dampening=0.1)),
    MetaInfo(
        "fomaml-inner-sam-proximal", "FOMAML", inner_steps=2,
        grad_transforms=(InnerSAM(0.05),), inner_reg_fn=proximal,
    ),
    MetaInfo("fomaml-batchnorm", "FOMAML", inner_steps=2, model="bn_mlp"),
    MetaInfo("fomaml-checkpoint", "FOMAML", inner_steps=2, checkpoint=True, notes="first order: vmap still applies"),
    MetaInfo("fomaml-sam-outer", "FOMAML", inner_steps=2, outer="sam"),
    # ------------------------------------------------------------------ Reptile
    MetaInfo("reptile-1step", "Reptile", outer_lr=0.5),
    MetaInfo("reptile-3steps-adam", "Reptile", inner_steps=3, outer="adam"),
    MetaInfo("reptile-adapt-false-group-lrs", "Reptile", inner_steps=2, groups=_frozen_first_lr, outer_lr=0.5),
    MetaInfo("reptile-adam-inner", "Reptile", inner_lr=0.05, inner_steps=3, inner_step_fn=AdamInnerStep()),
    MetaInfo("reptile-proximal", "Reptile", inner_steps=3, inner_reg_fn=proximal, outer_lr=0.5),
    MetaInfo("reptile-inner-sam", "Reptile", inner_steps=2, grad_transforms=(InnerSAM(0.1),)),
    MetaInfo("reptile-batchnorm", "Reptile", inner_steps=2, model="bn_mlp", outer_lr=0.5),
    MetaInfo("reptile-sam-outer", "Reptile", inner_steps=2, outer="sam", outer_lr=0.5),
    # ------------------------------------------------------------------ MetaSGD
    MetaInfo("metasgd-1step", "MetaSGD", compiled=True),
    MetaInfo("metasgd-2steps-first-order", "MetaSGD", inner_steps=2, first_order=True),
    MetaInfo("metasgd-group-lrs-adam", "MetaSGD", inner_steps=2, groups=_groups_lr, outer="adam"),
    MetaInfo("metasgd-adapt-false-group", "MetaSGD", inner_steps=2, groups=_frozen_first),
    MetaInfo("metasgd-frozen-param", "MetaSGD", model="frozen_mlp"),
    MetaInfo("metasgd-momentum-inner", "MetaSGD", inner_steps=2, inner_step_fn=MomentumInnerStep(0.9)),
    MetaInfo("metasgd-proximal", "MetaSGD", inner_steps=2, inner_reg_fn=proximal),
    MetaInfo("metasgd-checkpoint", "MetaSGD", inner_steps=2, checkpoint=True),
    MetaInfo("metasgd-sam-outer", "MetaSGD", inner_steps=2, outer="sam"),
    # ------------------------------------------------------------------ ANIL
    MetaInfo("anil-1step", "ANIL"),
    MetaInfo("anil-3steps", "ANIL", inner_steps=3),
    MetaInfo("anil-first-order", "ANIL", inner_steps=2, first_order=True),
    MetaInfo("anil-head-group-lr-adam", "ANIL", inner_steps=2, groups=head_groups({"inner_lr": 0.3}), outer="adam"),
    MetaInfo("anil-adam-inner", "ANIL", inner_lr=0.05, inner_steps=2, inner_step_fn=AdamInnerStep()),
    MetaInfo(
        "anil-inner-sam-proximal", "ANIL", inner_steps=2,
        grad_transforms=(InnerSAM(0.05),), inner_reg_fn=proximal,
    ),
    MetaInfo("anil-checkpoint", "ANIL", inner_steps=3, checkpoint=True),
    MetaInfo("anil-batchnorm", "ANIL", inner_steps=2, model="bn_mlp"),
    MetaInfo("anil-sam-outer", "ANIL", inner_steps=2, outer="sam"),
]

assert len({info.name for info in META_INFOS}) == len(META_INFOS), "duplicate MetaInfo names"
