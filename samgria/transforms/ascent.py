r"""Multi-step adversarial ascent: optax's ``sam`` as a transform.

:class:`MultiStepSAM` generalises :class:`~samgria.SAM` the way ``optax.contrib.sam`` does: the
weights climb the loss for ``ascent_steps`` steps (optax's ``sync_period - 1``), each step taken
by an *adversary* — SAM's normalised gradient step by default, or any ``torch.optim`` optimizer —
the closure is re-evaluated after every step, and the inner optimizer then steps from the
original weights with the last gradient. The weights are restored bit for bit afterwards (the
machinery of :class:`~samgria.SAM`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch.optim import Optimizer

from samgria._frameworks import stacklevel_outside
from samgria._checks import check_bool, check_int, check_real
from samgria._wrapper import unhooked_step
from samgria.functional import add_directions_, global_norm
from samgria.functional._grouping import group_indices_by_device_and_dtype
from samgria.functional._views import as_real
from samgria.functional.norms import scale_
from samgria.transforms.base import TransformContext
from samgria.transforms.sam import _FLOAT32_MAX, Perturbation, _scales_within_range, _swappable
from samgria.transforms.sam_family import Finish, _current_grads_finite, _FinishingTransform, _Step

__all__ = ["MultiStepSAM"]

#: ``adversary(param_groups) -> torch.optim.Optimizer``: builds the optimizer that takes the ascent steps.
AdversaryFactory = Callable[[list[dict[str, Any]]], Optimizer]


def _check_adversary(adversary: Any, rho: float) -> str:
    """Build the adversary once over a probe tensor; return the checkpoint's record of it: its
    class and the hyperparameters it sets differently from that class's defaults, ``lr`` and
    how it computes (``foreach``, ``fused``, ...) aside (``"SGD(momentum=0.9)"``, or ``"SGD"``).

    Raises:
        TypeError: ``adversary`` is not callable, is an optimizer instance, does not build a
            ``torch.optim.Optimizer``, or builds one whose ``step`` needs a closure (LBFGS).
        ValueError: The optimizer it builds maximises (it is handed the gradient of ``-L``).
    """
    rule = (
        "a callable that builds a torch.optim.Optimizer from a list of param groups (e.g. "
        "torch.optim.SGD or functools.partial(torch.optim.SGD, momentum=0.9)), or None"
    )
    if isinstance(adversary, Optimizer):
        raise TypeError(f"adversary must be {rule}, got the optimizer instance {adversary!r}")
    if not callable(adversary):
        raise TypeError(f"adversary must be {rule}, got {adversary!r}")
    built = adversary([{"params": [torch.zeros(1)], "lr": rho}])
    if not isinstance(built, Optimizer):
        raise TypeError(f"adversary must be {rule}, but adversary(param_groups) returned {built!r}")
    if isinstance(built, torch.optim.LBFGS):
        raise TypeError(
            f"adversary must be {rule} whose step() works without a closure, got one that builds LBFGS"
        )
    # pytorch_optimizer's optimizers keep maximize on the instance, not in their groups.
    kept_on_itself = getattr(built, "maximize", None) is True
    if any(group["maximize"] if "maximize" in group else kept_on_itself for group in built.param_groups):
        raise ValueError(
            f"adversary must build an optimizer that minimises (it is handed the gradient of -L, "
            f"so its steps climb L), got one with maximize=True: {built!r}"
        )
    return _adversary_record(built, rho)


def _adversary_record(built: Optimizer, rho: float) -> str:
    """``"SGD(momentum=0.9)"``: what the checkpoint records of an adversary (see above).

    Only the hyperparameters that differ from the class's own defaults are named, each by a
    representation that does not depend on the process (a function or another object by its type
    name), so that a record does not change with a torch release that adds a default nor between
    processes.
    """
    how = {"lr", "foreach", "fused", "differentiable", "capturable"}
    try:
        # cast: a subclass's constructor, whose defaults Optimizer's signature does not know
        plain = cast("Callable[..., Optimizer]", type(built))([{"params": [torch.zeros(1)], "lr": rho}]).defaults
    except Exception:  # a class without defaults for its other arguments: name every value
        plain = {}
    changed = []
    for key, value in sorted(built.defaults.items()):
        if key in how or (key in plain and _same_value(plain[key], value)):
            continue
        changed.append(f"{key}={_stable_repr(value)}")
    name = type(built).__name__
    return f"{name}({', '.join(changed)})" if changed else name


def _same_value(first: Any, second: Any) -> bool:
    """Whether two hyperparameter values are equal (tensors element for element)."""
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return (
            isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)
            and first.shape == second.shape and bool(torch.equal(first, second))
        )
    try:
        return bool(first == second)
    except Exception:
        return False


def _stable_repr(value: Any) -> str:
    """``repr`` of plain values (tensors as lists); another object's type name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_stable_repr(item) for item in value)
        return f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, torch.Tensor):
        return f"tensor({_stable_repr(value.tolist())})"
    return type(value).__qualname__


def _to_slot(key: str, value: Any) -> Any:
    """An adversary state value as the slot keeps it.

    A step counter (a 0-dim tensor under ``"step"``) is kept as a number: on load, torch casts
    every other floating-point state tensor to the parameter's dtype (which would round a count
    held in a 16-bit dtype), and the adversary's own ``load_state_dict`` turns it back into the
    tensor it expects.
    """
    if key == "step" and isinstance(value, torch.Tensor) and value.ndim == 0:
        return value.item()
    return value


def _fresh(value: Any) -> Any:
    """A copy the adversary may write into (state in the slot is never written in place)."""
    if isinstance(value, torch.Tensor):
        return value.clone(memory_format=torch.preserve_format)
    return copy.deepcopy(value)


class _Ascent(_Step):
    """The ascent in progress: the moves from :math:`w`, what takes the next step, the commit.

    Args:
        moves: As for :class:`~samgria.Perturbation` (the backups hold :math:`w`).
        finish: Commits the adversary's state (``None`` when nothing is kept).
        moved: The moved parameters, in order.
        groups: Their param groups (views).
        adversary: The optimizer taking the ascent steps, or ``None`` for SAM's step.
    """

    def __init__(
        self,
        moves: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]],
        finish: Finish | None,
        *,
        moved: list[torch.Tensor],
        groups: list[Mapping[str, Any]],
        adversary: Optimizer | None,
        scale_dependent: bool = False,
    ) -> None:
        super().__init__(moves, finish, scale_dependent=scale_dependent)
        self.moved = moved
        self.groups = groups
        self.adversary = adversary


class MultiStepSAM(_FinishingTransform):
    r"""SAM with a multi-step adversarial ascent by any optimizer (``optax.contrib.sam``).

    With :math:`n` = ``ascent_steps``, starting from the weights :math:`a_0 = w` and the gradient
    :math:`g_0 = \nabla L(w)` of the closure's first evaluation,

    .. math::

        a_{i+1} = a_i + u_i, \qquad g_{i+1} = \nabla L(a_{i+1}), \qquad i = 0, \dots, n - 1,

        w_{t+1} = \mathrm{inner\_step}\big(w_t,\ g_n\big),

    the closure is re-evaluated at every :math:`a_{i+1}` (``n`` re-evaluations per step) and
    :math:`w` is restored bit for bit before the inner step. The ascent step :math:`u_i` is

    * by default (``adversary=None``) SAM's normalised gradient step,
      :math:`u_i = \rho\, g_i / \lVert g_i \rVert_2` — with ``ascent_steps=1`` this is
      :class:`~samgria.SAM`, bit for bit;
    * with an ``adversary``, the step of a torch optimizer over the perturbed weights that is
      handed :math:`-\hat g_i`, the gradient of :math:`-L` (so it climbs :math:`L`), where
      :math:`\hat g_i = g_i / \lVert g_i \rVert_2` (``normalize=True``) or :math:`g_i`. It is
      built for each step as ``adversary(param_groups)`` with one group per param group of the
      optimizer, holding that group's moved parameters and ``"lr"`` set to its ``rho``, e.g.
      ``adversary=functools.partial(torch.optim.SGD, momentum=0.9)`` or
      ``adversary=torch.optim.Adam``. ``torch.optim.SGD`` is the default step up to rounding.

    The norms are global (one over every parameter that has a gradient), as in SAM; each group's
    part of the ascent is scaled by (or, with an adversary, uses as learning rate) the group's
    ``rho``, and a group with ``rho=0`` is not perturbed. A gradient of norm zero at :math:`w`
    perturbs nothing (no re-evaluation, as SAM); at a later point it moves nothing on that step
    when ``normalize=True``.

    **The adversary's state.** With ``reset_state=True`` (the default, as in optax) the
    adversary starts afresh every step, so its state (momentum, Adam's moments) spans the
    ``ascent_steps`` steps of one optimizer step. With ``reset_state=False`` it carries over
    from step to step: it is kept in the slot (``state[p]["multi_step_sam.<key>"]``, the
    adversary's own keys, a step counter as a number) and checkpointed with the optimizer —
    ``state_dict()`` and ``torch.distributed.checkpoint`` alike — and committed only once the
    step's gradients are in (a failed or skipped step leaves it as it was). Between steps it keeps
    the adversary's dtypes; loading a checkpoint casts it as torch's ``load_state_dict`` casts
    an optimizer's own state (every floating-point value but ``"step"`` to the parameter's
    dtype), so a resumed run of a 16-bit model with NAdam's float32 ``mu_product`` (or ASGD's
    ``eta`` and ``mu``) continues as torch's NAdam (ASGD) would after a load, not bit for bit.
    A loaded state must have the keys the adversary makes, each tensor of the shape it makes
    (compared with one step of a fresh adversary on zero stand-ins); otherwise the load raises
    ``ValueError`` and changes nothing. An adversary that keeps state in its param groups (a ``group["step"]``) is refused: only the
    per-parameter state carries over.

    **optax's modes.** ``optax.contrib.sam(opt, adv_opt, sync_period=k, opaque_mode=True,
    reset_state=r)`` is ``TransformingOptimizer(params, inner, transforms=[MultiStepSAM(rho,
    ascent_steps=k - 1, adversary=..., reset_state=r)])`` driven by ``optimizer.step(closure)``:
    one call evaluates the closure ``k`` times (optax: the gradient it is given, then ``grad_fn``
    ``k - 1`` times) and the adversarial points are never visible outside the call. optax's
    default adversary ``chain(normalize(), sgd(rho))`` is ``adversary=None``;
    ``chain(normalize(), sgd(rho, momentum=m))`` is
    ``adversary=functools.partial(torch.optim.SGD, momentum=m)`` (optax negates the adversary's
    descent update, samgria negates its gradient: the same step for rules that commute with a
    sign flip — SGD, momentum, Nesterov, Adam, RMSprop — but not with weight decay inside the
    adversary). optax's transparent mode spreads the period over ``k`` calls of ``update``, one
    gradient each, with the adversarial weights visible between calls; samgria's
    counterpart is the two-call loop (:meth:`~samgria.TransformingOptimizer.first_step` moves
    the weights to :math:`a_1`, the caller runs the second forward and backward,
    :meth:`~samgria.TransformingOptimizer.second_step` restores and steps), for
    ``ascent_steps=1`` (``sync_period=2``); longer ascents need the closure and
    ``first_step()`` refuses them. optax needs opaque mode when every call to ``update`` has side
    effects such as BatchNorm statistics; here the closure's forward passes are the side
    effects, and ``reevaluation_context=lambda: samgria.frozen_bn_stats(model)`` keeps the
    running statistics to one update per step, from the pass at :math:`w`. optax's
    ``grad_fn(params, i)`` may pick a batch per ascent step; a closure can do the same with a
    counter of its own.

    Memory: SAM's (one backup of the moved parameters), plus the adversary's state; during a step
    with ``reset_state=False`` the adversary works on a copy of its kept state (so that a failed
    step leaves it as it was), which holds it twice until the step ends. Time: one
    forward and backward pass per ascent step beyond the first evaluation, plus one global norm
    per step after the first.

    References:
        Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
        ICLR 2021; ``optax.contrib.sam`` (DeepMind, Apache-2.0); Kim et al., "Exploring the Effect
        of Multi-step Ascent in Sharpness-Aware Minimization", arXiv:2302.10181, 2023.

    Args:
        rho: Default ascent step size :math:`\rho \ge 0` (per-group key ``"rho"``): the radius of
            each of SAM's steps, or the adversary's learning rate.
        ascent_steps: Ascent steps (closure re-evaluations) per optimizer step, an integer
            ``>= 1`` (optax's ``sync_period - 1``; a setting).
        adversary: ``None`` (SAM's step), or a callable building a :class:`torch.optim.Optimizer`
            from a list of param-group dicts (a torch optimizer class, a
            :func:`functools.partial` of one; a lambda works but does not pickle). It must
            minimise (not ``maximize=True``) and step without a closure. It is built once at
            construction over a probe tensor, to check it. The inner optimizer must not
            maximise either: a step with ``maximize=True`` in a group the adversary moves raises
            ``ValueError`` before anything moves (checked at every step: ``maximize`` is a
            group's, editable later).
        normalize: Divide the gradient by its global L2 norm before the ascent step (optax's
            ``normalize()``; a setting). With ``normalize=False`` the first ascent step of the
            two-call loop would climb by the loss-scaled gradients under ``GradScaler``:
            ``scaler.step(optimizer)`` refuses it (``RuntimeError``, the weights restored).
        reset_state: Start the adversary afresh at every step (a setting; see above).

    Raises:
        ValueError: If ``rho`` is negative or not finite, ``ascent_steps < 1``, or the adversary
            maximises.
        TypeError: If ``rho`` is not a real number (a bool included), ``ascent_steps`` is not an
            integer, ``normalize`` or ``reset_state`` is not a bool, or ``adversary`` does not
            build a torch optimizer that steps without a closure.
    """

    # The adversary may be any optimizer, whose state a sharded checkpoint may not hold apart.
    supports_sharded_params = False
    # SAM's move (_move_along), or the adversary's on copies (_hold) put back if it raises.
    writes_weights_before_step = False

    def __init__(
        self,
        rho: float = 0.05,
        ascent_steps: int = 1,
        *,
        adversary: AdversaryFactory | None = None,
        normalize: bool = True,
        reset_state: bool = True,
    ) -> None:
        self.rho = check_real("rho", rho, low=0.0)
        self.ascent_steps = check_int("ascent_steps", ascent_steps, low=1)
        self.normalize = check_bool("normalize", normalize)
        self.reset_state = check_bool("reset_state", reset_state)
        self._adversary_record = None if adversary is None else _check_adversary(adversary, self.rho)
        self.adversary = adversary
        # Only a kept adversary state is written before the inner step (committed with new objects).
        self.saves_state_before_step = self._keeps_state

    @property
    def _keeps_state(self) -> bool:
        return self.adversary is not None and not self.reset_state

    def group_defaults(self) -> dict[str, Any]:
        return {"rho": self.rho}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("rho", group["rho"], low=0.0)

    def settings(self) -> dict[str, Any]:
        return {
            "ascent_steps": self.ascent_steps,
            "adversary": self._adversary_record,
            "normalize": self.normalize,
            "reset_state": self.reset_state,
        }

    @property
    def reevaluations(self) -> int:
        """One re-evaluation per ascent step."""
        return self.ascent_steps

    # -- the step ------------------------------------------------------------------------------
    def _climb(self, ctx: TransformContext, step: _Step) -> None:
        """Re-evaluate at :math:`a_1` and ascend the other ``ascent_steps - 1`` times (re-evaluating
        after each); ``pre_update`` then restores :math:`w` and commits."""
        assert isinstance(step, _Ascent) and ctx.reevaluate is not None
        ctx.reevaluate()
        for _ in range(1, self.ascent_steps):
            if not self._advance(ctx, step):
                break  # standalone, non-finite gradients: stop climbing (warned)
            ctx.reevaluate()

    def perturb(self, ctx: TransformContext) -> Perturbation | None:
        """Take the first ascent step, :math:`w \\to a_1`; return the ascent (restores :math:`w`).

        This is all of the ascent in the two-call loop, which therefore needs ``ascent_steps=1``.
        """
        if self.ascent_steps > 1 and ctx.reevaluate is None:
            raise RuntimeError(
                f"MultiStepSAM(ascent_steps={self.ascent_steps}) re-evaluates the loss "
                f"{self.ascent_steps} times per step, which first_step()/second_step() cannot do: "
                "call optimizer.step(closure), or use ascent_steps=1 in the two-call loop"
            )
        gathered = self._gather(ctx)
        if not isinstance(gathered, tuple):
            return gathered
        params, grads, groups, norm = gathered
        moving = [i for i, group in enumerate(groups) if group["rho"] > 0]
        moved = [params[i] for i in moving]
        moved_groups = [groups[i] for i in moving]
        if self.adversary is None:  # SAM's move, the same kernels (bit for bit)
            scales = [self._radius(group) for group in moved_groups]
            directions = [as_real(grads[i]) for i in moving]  # read, not written, by the move
            divisors = [norm if self.normalize else 1.0] * len(moved)
            moves = self._move_along(moved, directions, scales, ctx.foreach, divisors).moves
            return _Ascent(moves, None, moved=moved, groups=moved_groups, adversary=None, scale_dependent=not self.normalize)

        if any(group.get("maximize", False) for group in moved_groups):
            raise ValueError(
                "MultiStepSAM's adversary climbs L (it is handed the gradient of -L), but the inner "
                "optimizer maximises (maximize=True), whose worst case lies down L: minimise the "
                "negated loss instead of maximize=True, or use MultiStepSAM without an adversary"
            )
        held = self._hold(moved, ctx.foreach)
        try:
            adversary = self._build_adversary(moved, moved_groups)
            if self._keeps_state:
                self._load_adversary_state(ctx, adversary, moved)
            self._adversary_step(adversary, moved, [grads[i] for i in moving], norm, ctx.foreach)
        except BaseException:
            held.restore()
            raise
        commit = self._committer(ctx, adversary, moved) if self._keeps_state else None
        return _Ascent(
            held.moves, commit, moved=moved, groups=moved_groups, adversary=adversary, scale_dependent=not self.normalize
        )

    def _advance(self, ctx: TransformContext, ascent: _Ascent) -> bool:
        """Take the next ascent step from the current gradients; ``False`` if they are not finite."""
        params, grads, _ = self._collect(ctx)
        norm = float(global_norm([as_real(grad) for grad in grads], foreach=ctx.foreach, like=grads))
        if not math.isfinite(norm):  # standalone, or finite gradients whose norm overflows
            warnings.warn(
                f"MultiStepSAM: the gradient norm at an ascent point is {norm}; the ascent stops "
                "there and the gradients stay as they are",
                RuntimeWarning,
                stacklevel=stacklevel_outside(),
            )
            return False
        if self.normalize and norm == 0.0:
            return True  # a stationary point: nothing moves on this step
        grad_of = {id(param): grad for param, grad in zip(params, grads)}
        chosen = [k for k, param in enumerate(ascent.moved) if id(param) in grad_of]
        movers = [ascent.moved[k] for k in chosen]
        movers_grads = [grad_of[id(param)] for param in movers]
        if not movers:
            return True
        if ascent.adversary is None:
            groups = [ascent.groups[k] for k in chosen]
            scales = [self._radius(group) for group in groups]
            divisors = [norm if self.normalize else 1.0] * len(groups)
            directions, scales = _scales_within_range([as_real(g) for g in movers_grads], scales, divisors)  # a tiny norm
            # In place: a swapped parameter's data is its backup buffer, a view is perturbed in place.
            add_directions_([as_real(p) for p in movers], directions, scales, foreach=ctx.foreach)
            for param in movers:
                param.grad = None
        else:
            self._adversary_step(ascent.adversary, movers, movers_grads, norm, ctx.foreach)
        return True

    # -- helpers ---------------------------------------------------------------------------------
    def _hold(self, params: list[torch.Tensor], foreach: bool) -> Perturbation:
        """Point each parameter at a copy of itself (its backup buffer) that the adversary may move.

        As in :meth:`~samgria.PerturbationTransform._move_along`: a parameter that owns its
        storage keeps its original tensor untouched (restored by re-pointing); a view is moved in
        place and restored from the copy. The moves are registered before the first one, as
        there, so that ``pre_update`` undoes them after an interrupt.
        """
        backups = self._backups_of(params)
        if foreach:
            for indices in group_indices_by_device_and_dtype(params).values():
                torch._foreach_copy_([backups[i] for i in indices], [params[i] for i in indices])
        else:
            for backup, param in zip(backups, params):
                backup.copy_(param)
        moves = [
            (param, param.data, backup, True) if swappable else (param, backup, backup, False)
            for param, backup, swappable in zip(params, backups, _swappable(params))
        ]
        held = self.__dict__["_moving"] = Perturbation(moves)
        try:
            for param, _original, backup, swapped in moves:
                if swapped:
                    param.data = backup
        except BaseException:  # the two-call loop has no pre_update to put them back
            held.restore()
            raise
        return held

    def _build_adversary(
        self, params: list[torch.Tensor], groups: list[Mapping[str, Any]], lr: float | None = None
    ) -> Optimizer:
        """``adversary(param_groups)``: one group per param group, ``lr`` its ``rho`` (or ``lr``), as
        a ``float`` (any real number ``validate_group`` accepts: a ``Fraction`` is no lr torch's
        optimizers compute with)."""
        buckets: dict[int, dict[str, Any]] = {}
        for param, group in zip(params, groups):
            bucket = buckets.setdefault(id(group), {"params": [], "lr": float(group["rho"]) if lr is None else lr})
            bucket["params"].append(param)
        assert self.adversary is not None
        adversary = self.adversary(list(buckets.values()))
        if not isinstance(adversary, Optimizer):
            raise TypeError(f"adversary(param_groups) must return a torch.optim.Optimizer, got {adversary!r}")
        return adversary

    def _adversary_step(
        self,
        adversary: Optimizer,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        norm: float,
        foreach: bool,
    ) -> None:
        r"""Hand the adversary :math:`-\hat g` (in the gradients' memory, which is consumed) and step it."""
        scale = -1.0 / norm if self.normalize else -1.0
        if abs(scale) > _FLOAT32_MAX:  # a tiny norm (1 / norm may be infinite): by 2**-k first, exact
            mantissa, exponent = math.frexp(norm)
            for grad in grads:
                limit, left = math.frexp(torch.finfo(grad.dtype).max)[1] - 2, -exponent
                while left > 0:  # left shrinks by limit each time
                    step = min(limit, left)
                    as_real(grad).mul_(2.0**step)
                    left -= step
            scale = -1.0 / mantissa
        scale_([as_real(grad) for grad in grads], [scale] * len(grads), foreach=foreach)
        for param, grad in zip(params, grads):
            param.grad = grad
        before = [{k: v for k, v in group.items() if k != "params"} for group in adversary.param_groups]
        unhooked_step(adversary)  # inside the optimizer's step: no second round of global hooks
        for param in params:
            param.grad = None
        if self._keeps_state:
            self._refuse_state_in_groups(adversary, before)

    @staticmethod
    def _refuse_state_in_groups(adversary: Optimizer, before: list[dict[str, Any]]) -> None:
        """Raise if the adversary wrote into its param groups (a step counter, as AdamP and Lion
        keep ``group["step"]``): with ``reset_state=False`` only its per-parameter state is kept,
        so that would restart every step (the optimizer undoes the step that raises)."""
        for group, saved in zip(adversary.param_groups, before):
            changed = sorted(
                str(key)
                for key in set(group) | set(saved)
                if key != "params"
                and (key not in group or key not in saved or not (group[key] is saved[key] or _same_value(group[key], saved[key])))
            )
            if changed:
                raise RuntimeError(
                    f"MultiStepSAM(reset_state=False) keeps the adversary's per-parameter state "
                    f"between steps, but {type(adversary).__name__} keeps state in its param groups "
                    f"({', '.join(changed)}), which would restart every step: use reset_state=True, "
                    "or an adversary that keeps its state per parameter (torch.optim's do)"
                )

    @staticmethod
    def _load_adversary_state(ctx: TransformContext, adversary: Optimizer, params: list[torch.Tensor]) -> None:
        """Give the adversary copies of the state kept in the slot, as its ``load_state_dict``
        installs a state (its ``__setstate__``, which turns a numeric ``"step"`` back into the
        tensor it expects) but without that method's cast of every floating-point value to the
        parameter's dtype, which would round NAdam's ``mu_product`` of a 16-bit parameter at
        every step (torch's NAdam keeps it in float32)."""
        stored = {id(param): ctx.state[param] for param in params if param in ctx.state}
        if not stored:
            return
        state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for group in adversary.param_groups:
            for param in group["params"]:
                if id(param) in stored:
                    state[param] = {key: _fresh(value) for key, value in stored[id(param)].items()}
        adversary.__setstate__({"state": state, "param_groups": adversary.param_groups})

    @staticmethod
    def _committer(ctx: TransformContext, adversary: Optimizer, params: list[torch.Tensor]) -> Finish:
        """The commit of the adversary's state: new objects, once the step's gradients are in."""

        def commit(checked: bool) -> None:
            if not (checked or _current_grads_finite(ctx)):
                return
            for param in params:
                state = adversary.state.get(param)
                if not state:
                    continue
                entry = ctx.state[param]
                for key in list(entry):
                    del entry[key]
                for key, value in state.items():
                    entry[key] = _to_slot(key, value)

        return commit

    @torch.no_grad()
    def _fresh_states(self, params: list[torch.Tensor], groups: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The adversary's state for ``params`` after one step with learning rate zero and zero
        gradients on stand-ins of the parameters (no weight changes), as the slot keeps it."""
        stand_ins = [torch.zeros_like(param, memory_format=torch.preserve_format) for param in params]
        for stand_in in stand_ins:
            stand_in.grad = torch.zeros_like(stand_in)
        adversary = self._build_adversary(stand_ins, groups, lr=0.0)
        unhooked_step(adversary)  # inside the optimizer's step: no second round of global hooks
        return [{key: _to_slot(key, value) for key, value in adversary.state.get(s, {}).items()} for s in stand_ins]

    def init_state(self, ctx: TransformContext) -> None:
        """Create the kept adversary state (what ``torch.distributed.checkpoint`` loads into)."""
        if not self._keeps_state:
            return
        params, _grads, groups = self._collect(ctx)
        missing = [i for i, group in enumerate(groups) if group["rho"] > 0 and params[i] not in ctx.state]
        if not missing:
            return
        fresh = self._fresh_states([params[i] for i in missing], [groups[i] for i in missing])
        for i, state in zip(missing, fresh):
            entry = ctx.state[params[i]]
            for key, value in state.items():
                entry[key] = value

    def check_loaded_state(self, ctx: TransformContext) -> None:
        """With ``reset_state=False``: raise ``ValueError`` unless every parameter's kept adversary
        state has the keys a fresh state of the adversary has, each tensor of its shape and kind
        (complex or not) — compared with the state the adversary makes on stand-ins."""
        if not self._keeps_state:
            return
        params: list[torch.Tensor] = []
        groups: list[Mapping[str, Any]] = []
        seen: set[int] = set()
        for group in ctx.param_groups:
            for param in group["params"]:
                if id(param) not in seen and param in ctx.state and len(ctx.state[param]):
                    seen.add(id(param))
                    params.append(param)
                    groups.append(group)
        if not params:
            return
        for param, expected in zip(params, self._fresh_states(params, groups)):
            entry = ctx.state[param]
            where = f"the checkpoint's MultiStepSAM slot {ctx.slot!r} holds"
            missing = [key for key in expected if key not in entry]
            if missing:
                raise ValueError(
                    f"{where} adversary state without {missing} for a parameter of shape "
                    f"{tuple(param.shape)} ({self._adversary_record} keeps {sorted(expected)})"
                )
            for key, fresh in expected.items():
                value = entry[key]
                if not isinstance(fresh, torch.Tensor):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"{where} {key!r} = {value!r}, not a tensor, where {self._adversary_record} keeps one")
                if value.shape != fresh.shape or value.is_complex() != fresh.is_complex():
                    raise ValueError(
                        f"{where} {key!r} of shape {tuple(value.shape)} and dtype {value.dtype} where "
                        f"{self._adversary_record} keeps shape {tuple(fresh.shape)} and dtype {fresh.dtype}"
                    )
