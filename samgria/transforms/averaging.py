r"""Weight averaging after the inner step: Lookahead and an exponential moving average (EMA).

Both are post-step transforms: the inner optimizer takes its step as usual and the transform then
acts on (Lookahead) or reads (EMA) the updated weights. Each keeps one extra copy of the weights
per parameter in its slot of ``optimizer.state`` (Lookahead's slow weights, the EMA's averages),
in the parameter's dtype, and a step counter on the first parameter, so ``state_dict()`` and
``torch.distributed.checkpoint`` carry everything and a resumed run continues bit for bit. A
parameter converted mid-training (``model.double()``, ``.half()``, ``.to(device)``) has its kept
weights converted to its dtype on its device at its next step, as a checkpoint reloaded into a
fresh optimizer has them; one whose ``.data`` was replaced by a tensor of another shape (an
embedding resized) is refused at its next step and by the swap blocks below (``ValueError``,
nothing changed), as torch's optimizers refuse state that no longer fits.

As everywhere in samgria, only the parameters that have a gradient at a step take part in it
(frozen and unused parameters are left alone), and complex parameters are treated as pairs of
reals. A step in which no parameter has a gradient is no step for them either, as for torch's
optimizers: it leaves the counter, the kept weights and the weights as they are. Both
transforms can put their kept weights into the model for a while —
:meth:`EMA.averaged_weights` and :meth:`Lookahead.slow_weights` — and restore the training
weights bit for bit afterwards, also when the block raises. Over FSDP2 (``fully_shard``) the
block reshards the model on entry and on exit, so that every forward inside and after it
gathers the shards anew (a forward without a backward leaves the root's gathered weights in
place by default, and the next forward would reuse them).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from samgria._checks import check_bool, check_int, check_real
from samgria._frameworks import wrapper_chain
from samgria.functional._grouping import group_indices_by_device_and_dtype, unique_params
from samgria.functional._sharding import is_sharded
from samgria.functional._views import LOW_PRECISION, as_real
from samgria.transforms.base import Transform, TransformContext, forget_autocast_copies

__all__ = ["Lookahead", "EMA"]

#: Object-level keys (on the first parameter that requires grad).
_OBJECT_KEYS = ("step",)


# -- kernels: a foreach fast path and a per-tensor path with the same arithmetic ---------------------
def _lerp_(starts: Sequence[torch.Tensor], ends: Sequence[torch.Tensor], weight: float, *, foreach: bool) -> None:
    r"""In place: :math:`s_i \leftarrow s_i + w\,(e_i - s_i)`, rounded as :func:`torch.lerp` rounds.

    16-bit tensors take the per-tensor kernel on both paths, so the two paths agree bit for bit.
    """
    if foreach:
        for (_device, dtype), indices in group_indices_by_device_and_dtype(starts).items():
            if dtype not in LOW_PRECISION:
                torch._foreach_lerp_([starts[i] for i in indices], [ends[i] for i in indices], weight)
                continue
            for i in indices:
                starts[i].lerp_(ends[i], weight)
        return
    for start, end in zip(starts, ends):
        start.lerp_(end, weight)


def _copy_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], *, foreach: bool) -> None:
    r"""In place: :math:`t_i \leftarrow s_i` (exact)."""
    if foreach:
        for indices in group_indices_by_device_and_dtype(targets).values():
            torch._foreach_copy_([targets[i] for i in indices], [sources[i] for i in indices])
        return
    for target, source in zip(targets, sources):
        target.copy_(source)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 (``fully_shard``) modules among ``model.modules()``; none before FSDP2 is imported.

    An ``FSDPModule`` cannot exist before its module is imported, so ``import samgria`` (and a
    torch without ``torch.distributed``) never imports it.
    """
    if "torch.distributed.fsdp" not in sys.modules and "torch.distributed._composable.fsdp" not in sys.modules:
        return []
    try:  # public from torch 2.6; earlier releases keep it under _composable
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - depends on the torch build
        try:
            from torch.distributed._composable.fsdp import FSDPModule  # type: ignore[no-redef]
        except ImportError:
            return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def _reshard(modules: Sequence[nn.Module]) -> None:
    """Free the gathered (unsharded) weights of FSDP2 modules: the next forward gathers the shards."""
    for module in modules:
        module.reshard()  # type: ignore[operator]  # FSDPModule.reshard, not recursive


class _KeptWeights(Transform):
    """What Lookahead and EMA share: one kept copy of the weights per parameter and a step counter.

    Subclasses name the per-parameter key (``_kept_key``) and implement :meth:`post_update`.
    """

    #: The per-parameter slot key that holds the kept weights.
    _kept_key = ""
    #: What the kept weights are called in messages.
    _kept_name = ""
    #: Whether the last step (or a checkpoint load) ran inside a TransformingOptimizer, which then
    #: keeps the kept weights (class default: a transform pickled before it was recorded).
    _held_by_optimizer = False

    def __init__(self) -> None:
        # Seed protocol: the parameters that had a gradient at apply() (zero_grad() may run
        # between the inner step and post_step()).
        self._had_grad: set[int] | None = None
        # How many swap blocks (averaged_weights / slow_weights) are open: no step inside one.
        self._open_swaps = 0

    def __getstate__(self) -> dict[str, Any]:
        # A copy made inside a swap block is outside every block: the block's exit belongs to
        # the original and would never run for the copy, which could then never step.
        # The instance's __dict__ itself: object has no __getstate__ before Python 3.11.
        state = dict(self.__dict__)
        state["_open_swaps"] = 0
        return state

    # -- who takes part in a step ----------------------------------------------------------------
    def _check_not_swapped(self) -> None:
        if self._open_swaps:
            raise RuntimeError(
                f"{type(self).__name__}: a step inside the block that swapped in its kept weights "
                "would be undone when the block exits; step after the block"
            )

    def scales_with_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        return True  # its pre_update leaves the gradients alone

    def pre_update(self, ctx: TransformContext) -> None:
        self._check_not_swapped()
        self._held_by_optimizer = not ctx.standalone
        if ctx.standalone:  # apply() runs before the step: remember which parameters had a gradient
            self._had_grad = {id(p) for g in ctx.param_groups for p in g["params"] if p.grad is not None}

    def _participants(self, ctx: TransformContext) -> list[torch.Tensor]:
        """The parameters that took part in this step: those with a gradient (seed protocol: also
        those that had one at ``apply()``)."""
        params = unique_params(ctx.param_groups)
        if ctx.standalone and self._had_grad is not None:
            had_grad = self._had_grad
            return [p for p in params if p.grad is not None or id(p) in had_grad]
        return [p for p in params if p.grad is not None]

    def _count_step(self, ctx: TransformContext) -> tuple[list[torch.Tensor], int] | None:
        """Start ``post_update``: the step's participants and the step count, incremented in the
        slot; ``None`` (nothing counted) when no parameter has a gradient or none requires grad.
        A parameter that no longer fits its kept weights is refused before anything changes."""
        self._check_not_swapped()
        self._held_by_optimizer = not ctx.standalone
        params = self._participants(ctx)
        self._check_all_fit(ctx, params)
        if ctx.standalone:
            self._had_grad = None  # apply()'s record, used
        slot = ctx.slot_state(keys=_OBJECT_KEYS)
        if slot is None or not params:
            return None
        step = slot.get("step", 0) + 1
        slot["step"] = step
        return params, step

    def _ensure_kept(
        self, ctx: TransformContext, params: Sequence[torch.Tensor], *, checked: bool = False
    ) -> list[torch.Tensor]:
        """Give every parameter without kept weights a copy of its current weights; return those.
        Refuses first, before anything is written, a parameter that no longer fits its kept
        weights (``checked``: :meth:`_count_step` did).

        The kept weights of a parameter converted since its last step (``model.double()``,
        ``.half()``, ``.to(device)``) are converted to its dtype on its device, as LAMP converts its
        running sum and ``load_state_dict`` a checkpoint's state (a new tensor, so that a failed
        step's restore puts the old one back).
        """
        if not checked:
            self._check_all_fit(ctx, params)
        fresh = []
        for param in params:
            entry = ctx.state[param]
            kept = entry.get(self._kept_key)
            if kept is None:
                entry[self._kept_key] = param.detach().clone(memory_format=torch.preserve_format)
                fresh.append(param)
            elif kept.dtype != param.dtype or kept.device != param.device:
                entry[self._kept_key] = kept.to(device=param.device, dtype=param.dtype)
        return fresh

    def _check_all_fit(self, ctx: TransformContext, params: Sequence[torch.Tensor]) -> None:
        """:meth:`_check_fits` for every parameter of ``params`` with kept weights, before any of
        them is written (no state entry is created)."""
        for param in params:
            if param in ctx.state:
                kept = ctx.state[param].get(self._kept_key)
                if kept is not None:
                    self._check_fits(param, kept, ctx.slot, standalone=ctx.standalone)

    def _check_fits(self, param: torch.Tensor, kept: torch.Tensor, slot: str, *, standalone: bool) -> None:
        """Raise ``ValueError`` if ``param`` no longer has the shape of its kept weights (its
        ``.data`` replaced since its last step: an embedding resized), which an update would
        broadcast or fail on, as torch's optimizers' state would."""
        if kept.shape != param.shape:
            name = type(self).__name__
            remedy = (
                f"use a new {name} for the resized model (through apply/post_step the {name} keeps "
                "them itself)"
                if standalone
                else f"del optimizer.state[param]['{slot}.{self._kept_key}'] to keep them afresh from its weights"
            )
            raise ValueError(
                f"{name}: the {self._kept_name} of a parameter are of shape "
                f"{tuple(kept.shape)}, but it is now of shape {tuple(param.shape)} (its .data was "
                "replaced since its last step): they no longer fit it, as torch's optimizer state "
                f"would not; {remedy}"
            )

    @torch.no_grad()
    def init_state(self, ctx: TransformContext) -> None:
        self._held_by_optimizer = not ctx.standalone
        self._ensure_kept(ctx, [p for p in unique_params(ctx.param_groups) if p.grad is not None])
        slot = ctx.slot_state(keys=_OBJECT_KEYS)
        if slot is not None:
            slot.setdefault("step", 0)

    def check_loaded_state(self, ctx: TransformContext) -> None:
        """Raise ``ValueError`` unless the kept weights fit their parameters (a tensor of the
        parameter's shape, complex exactly when it is) and the counter is valid."""
        name = type(self).__name__
        self._check_loaded_tensors(ctx, self._kept_key)
        slot = ctx.slot_state(keys=_OBJECT_KEYS)
        if slot is not None and "step" in slot:  # a None there too: the step adds 1 to it
            step = slot["step"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"the checkpoint's {name} slot {ctx.slot!r} holds step={step!r}, not an integer >= 0")
        self._held_by_optimizer = not ctx.standalone

    # -- swapping the kept weights into the model ------------------------------------------------
    def _holder(self, owner: Any) -> tuple[Any, str]:
        """The optimizer that holds this transform and its slot: ``owner`` itself, or the one that
        ``owner`` wraps (:func:`samgria._frameworks.wrapper_chain`: accelerate's
        ``AcceleratedOptimizer``, and so the Hugging Face Trainer's optimizer).

        Raises:
            TypeError: If ``owner`` is not an optimizer.
            ValueError: If no optimizer found that way holds this transform.
        """
        name = type(self).__name__
        rule = (
            f"owner must be the TransformingOptimizer that holds this {name} "
            f"(or the nn.Module it is used with through apply/post_step), got {type(owner).__name__}"
        )
        if not isinstance(owner, torch.optim.Optimizer):
            raise TypeError(rule)
        for candidate in wrapper_chain(owner):
            slots = [s for s, t in zip(getattr(candidate, "slots", ()), getattr(candidate, "transforms", ())) if t is self]
            if slots:
                return candidate, slots[0]
        raise ValueError(rule)

    def _kept_pairs(self, owner: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(parameter, kept weights)`` for every parameter of ``owner`` that has kept weights."""
        name = type(self).__name__
        if isinstance(owner, nn.Module):  # the seed protocol: the transform keeps the state
            if self._held_by_optimizer:
                raise ValueError(
                    f"owner must be the TransformingOptimizer that holds this {name}, got "
                    f"{type(owner).__name__}, a module: the {name} is stepped by a "
                    f"TransformingOptimizer, which keeps its {self._kept_name}; pass that optimizer"
                )
            state: Mapping[Any, Mapping[str, Any]] = self.__dict__.get("_standalone_state", {})
            prefix = self.default_slot() + "."
            params: list[torch.Tensor] = list(owner.parameters())
        else:
            holder, slot = self._holder(owner)
            state, prefix = holder.state, slot + "."
            params = unique_params(holder.param_groups)
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for param in params:
            entry = state.get(param) if param in state else None  # no defaultdict insertion
            kept = entry.get(prefix + self._kept_key) if entry else None
            if kept is not None:
                # before the block writes any parameter
                self._check_fits(param, kept, prefix[:-1], standalone=isinstance(owner, nn.Module))
                pairs.append((param, kept))
        return pairs

    @contextlib.contextmanager
    def _swapped_in(self, owner: Any, model: nn.Module | None) -> Iterator[None]:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {model!r}")
        if model is None:
            model = owner if isinstance(owner, nn.Module) else getattr(self._holder(owner)[0], "model", None)
        pairs = self._kept_pairs(owner)
        if model is None and any(is_sharded(param) for param, _ in pairs):
            raise ValueError(
                f"model must be the fully_shard-ed model when the parameters are sharded (DTensor), "
                f"got None: the {type(self).__name__} block reshards it, so that the forward inside "
                "and after the block gathers the swapped weights; pass model= (or build the "
                "TransformingOptimizer with model=)"
            )
        # After a forward without a backward FSDP2's root (by default) keeps the gathered training
        # weights, which the next forward would reuse: free them first.
        fsdp_modules = [] if model is None else _fsdp_modules(model)
        _reshard(fsdp_modules)
        if isinstance(owner, nn.Module):  # it yielded the gathered weights, now its sharded ones
            pairs = self._kept_pairs(owner)
        with torch.no_grad():
            training = [param.detach().clone(memory_format=torch.preserve_format) for param, _ in pairs]
            for param, kept in pairs:
                param.copy_(kept)
        forget_autocast_copies()  # an autocast region around the block cast the training weights
        self._open_swaps += 1
        try:
            yield
        finally:
            self._open_swaps -= 1
            with torch.no_grad():
                for (param, _), weights in zip(pairs, training):
                    param.copy_(weights)
            forget_autocast_copies()
            _reshard(fsdp_modules)  # the kept weights gathered inside the block


class Lookahead(_KeptWeights):
    r"""Lookahead (Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back",
    NeurIPS 2019), Algorithm 1, around any inner optimizer.

    The inner optimizer updates the *fast* weights :math:`\theta` as usual; the transform keeps
    *slow* weights :math:`\phi`, starting at the weights before a parameter's first step
    (:math:`\phi_0 = \theta_0`). After every ``k``-th inner step,

    .. math::

        \phi \leftarrow \phi + \alpha\,(\theta - \phi), \qquad \theta \leftarrow \phi ,

    computed as ``phi.lerp_(theta, alpha)`` followed by a copy. The inner optimizer's state
    (momentum, Adam's moments) is kept across the synchronisation, as in the paper (the authors'
    code's default ``pullback_momentum="none"``).

    ``alpha`` is a per-group key: a group with ``alpha=1`` is the plain inner optimizer. ``k`` is a
    setting (constructor-only, recorded in checkpoints): the step counter is one object-level
    count shared by every group, as in the paper, so every group synchronises at the same steps,
    and a resumed run must use the same ``k`` to synchronise at the same steps.

    State in the slot: per parameter ``"slow"`` (:math:`\phi`, in the parameter's dtype; created
    before the first inner step in which the parameter has a gradient, so
    ``saves_state_before_step`` is set); on the first parameter ``"step"``, the inner steps taken
    in which some parameter had a gradient (a step without any gradient does not count towards
    ``k``). Only parameters that have a gradient at a step are synchronised at it.

    Args:
        alpha: Default slow-weights step size :math:`\alpha \in (0, 1]` (per-group key ``"alpha"``).
        k: Synchronise every ``k`` inner steps, an integer ``>= 1``.

    Raises:
        ValueError: If ``alpha`` is not in ``(0, 1]`` or ``k < 1``.
        TypeError: If ``alpha`` is not a real number or ``k`` not an integer.
    """

    saves_state_before_step = True
    _kept_key = "slow"
    _kept_name = "slow weights"

    def __init__(self, alpha: float = 0.5, k: int = 5) -> None:
        super().__init__()
        self.alpha = check_real("alpha", alpha, low=0.0, high=1.0, low_open=True)
        self.k = check_int("k", k, low=1)

    def group_defaults(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("alpha", group["alpha"], low=0.0, high=1.0, low_open=True)

    def settings(self) -> dict[str, Any]:
        return {"k": self.k}

    @torch.no_grad()
    def pre_update(self, ctx: TransformContext) -> None:
        """Create the slow weights :math:`\\phi_0 = \\theta_0` of parameters stepping for the first time."""
        super().pre_update(ctx)
        self._ensure_kept(ctx, [p for p in unique_params(ctx.param_groups) if p.grad is not None])

    @torch.no_grad()
    def post_update(self, ctx: TransformContext) -> None:
        """Count the inner step; every ``k``-th: :math:`\\phi \\leftarrow \\phi + \\alpha(\\theta - \\phi)`, :math:`\\theta \\leftarrow \\phi`."""
        counted = self._count_step(ctx)
        if counted is None:  # no parameter has a gradient
            return
        params, step = counted
        self._ensure_kept(ctx, params, checked=True)  # a step without pre_update (never inside the optimizer)
        if step % self.k != 0:
            return
        # float: any real number validate_group accepts (a Fraction, a NumPy scalar), as torch's lerp_ takes it
        alpha_of = {id(p): float(group["alpha"]) for group in ctx.param_groups for p in group["params"]}
        for alpha in sorted({alpha_of[id(p)] for p in params}):
            fast = [as_real(p) for p in params if alpha_of[id(p)] == alpha]
            slow = [as_real(ctx.state[p]["slow"]) for p in params if alpha_of[id(p)] == alpha]
            _lerp_(slow, fast, alpha, foreach=ctx.foreach)
            _copy_(fast, slow, foreach=ctx.foreach)

    def slow_weights(self, owner: Any, *, model: nn.Module | None = None) -> contextlib.AbstractContextManager[None]:
        """Context manager: the parameters hold the slow weights :math:`\\phi` inside the block.

        On exit the fast (training) weights are restored bit for bit, also when the block raises.
        Parameters without slow weights (never stepped, frozen) keep their values. No optimizer
        step may be taken inside the block (it raises ``RuntimeError``). Over FSDP2
        (``fully_shard``) the block writes the local shards and reshards every FSDP2 module of
        ``model`` on entry and on exit (``FSDPModule.reshard``), so that every forward inside and
        after the block gathers the weights anew: sharded parameters need that model.

        Args:
            owner: The :class:`~samgria.TransformingOptimizer` that holds this transform (or a
                framework's optimizer around it: accelerate's ``AcceleratedOptimizer``, and so the
                Hugging Face Trainer's, Lightning's ``LightningOptimizer``), or the ``nn.Module``
                it is used with through ``apply`` / ``post_step``.
            model: The model to reshard (the ``fully_shard``-ed one); default: ``owner`` when it
                is a module, else the optimizer's ``model`` (``TransformingOptimizer(...,
                model=...)``).

        Raises:
            TypeError: If ``owner`` is neither an optimizer nor an ``nn.Module``, or ``model`` is
                not an ``nn.Module``.
            ValueError: If ``owner`` is an optimizer that neither holds this transform nor wraps
                one that does, a module
                while an optimizer holds it (steps it), the parameters are sharded (DTensor)
                and no model is known, or a parameter's shape changed since its last step
                (nothing is written).
        """
        return self._swapped_in(owner, model)


class EMA(_KeptWeights):
    r"""Exponential moving average of the weights (Polyak averaging with exponential weights).

    After every inner step the average :math:`a` moves towards the new weights :math:`\theta_n`:

    .. math::

        a_1 = \theta_1, \qquad a_n = d_n\, a_{n-1} + (1 - d_n)\,\theta_n \quad (n \ge 2),

    computed as ``a.lerp_(theta, 1 - d)``, exactly as :class:`torch.optim.swa_utils.AveragedModel`
    with :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` computes it (its first update copies
    the weights too): with ``warmup=False`` the averages are equal to that model's parameters, bit
    for bit, for real parameters (complex ones are averaged as pairs of reals, which rounds
    differently from a complex ``lerp_``). :math:`d_n` is the group's ``decay``; with ``warmup=True`` it follows timm's
    ``ModelEmaV3`` warm-up (``use_warmup=True``, ``update_after_step=0``, ``min_decay=0``),

    .. math::

        d_n = \min\bigl(\mathrm{decay},\ 1 - (1 + (n - 1)/\gamma)^{-p}\bigr),

    which averages over a window that grows with the number of steps instead of starting with
    a strong pull towards the initial weights (:math:`\gamma` = ``warmup_gamma``, :math:`p` =
    ``warmup_power``; timm's defaults :math:`\gamma = 1`, :math:`p = 2/3` suit runs of a million
    steps or more, and it suggests :math:`p = 3/4` for shorter ones: :math:`d_n` reaches 0.999 at
    about 10k steps with it, 32k with :math:`p = 2/3`).

    The training weights are not changed — evaluate the average with
    ``with ema.averaged_weights(optimizer): ...`` — unless ``switch_every`` is given: then every
    ``switch_every`` steps the averages are copied into the weights after the update (Switch EMA:
    Li et al., "Switch EMA: A Free Lunch for Better Flatness and Sharpness", 2024, who switch
    once per epoch: pass the number of steps of an epoch).

    ``decay`` is a per-group key (a group with ``decay=0`` tracks its weights exactly). The
    average covers the optimizer's parameters only: buffers (BatchNorm's running statistics) are
    neither averaged nor copied, as with ``AveragedModel(..., use_buffers=False)``, and
    :meth:`averaged_weights` swaps the parameters only, so an evaluation inside it uses the
    model's current statistics. :func:`torch.optim.swa_utils.update_bn` recomputes them for the
    averaged weights, but run on the training model inside the block it overwrites that model's
    statistics (``num_batches_tracked`` included), which the block does not put back: run it on
    ``copy.deepcopy(model)`` made inside the block to keep the training run's. The averages
    are kept in the parameter's dtype (as torch keeps optimizer state and timm its EMA model):
    with bfloat16 parameters and a decay near 1 the per-step change can fall below bfloat16's
    resolution.

    State in the slot: per parameter ``"average"``; on the first parameter ``"step"``, the updates
    made (``AveragedModel.n_averaged``): the steps in which some parameter had a gradient (a step
    without any gradient changes nothing, the counter and the warm-up's :math:`n` included). Only
    the parameters with a gradient at a step are averaged at it, with that step's :math:`d_n`; a
    parameter that gets its first gradient late starts its average with a copy of its weights
    then.

    Args:
        decay: Default decay :math:`\mathrm{decay} \in [0, 1]` (per-group key ``"decay"``).
        warmup: Use the warm-up schedule above.
        warmup_gamma: :math:`\gamma > 0` of the warm-up.
        warmup_power: :math:`p > 0` of the warm-up.
        switch_every: Copy the averages into the weights every this many steps (an integer
            ``>= 1``), or ``None`` (default): never.

    Raises:
        ValueError: If ``decay`` is not in ``[0, 1]``, ``warmup_gamma`` or ``warmup_power`` is not
            positive and finite, or ``switch_every < 1``.
        TypeError: If an argument is of the wrong type (``warmup`` not a bool, ``switch_every`` not
            an integer).
    """

    _kept_key = "average"
    _kept_name = "averages"

    def __init__(
        self,
        decay: float = 0.999,
        *,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2.0 / 3.0,
        switch_every: int | None = None,
    ) -> None:
        super().__init__()
        self.decay = check_real("decay", decay, low=0.0, high=1.0)
        self.warmup = check_bool("warmup", warmup)
        self.warmup_gamma = check_real("warmup_gamma", warmup_gamma, low=0.0, low_open=True)
        self.warmup_power = check_real("warmup_power", warmup_power, low=0.0, low_open=True)
        self.switch_every = None if switch_every is None else check_int("switch_every", switch_every, low=1)

    def group_defaults(self) -> dict[str, Any]:
        return {"decay": self.decay}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("decay", group["decay"], low=0.0, high=1.0)

    def settings(self) -> dict[str, Any]:
        warmup = {"warmup_gamma": self.warmup_gamma, "warmup_power": self.warmup_power} if self.warmup else {}
        return {"warmup": self.warmup, **warmup, "switch_every": self.switch_every}

    def decay_at(self, update: int, decay: float | None = None) -> float:
        r"""The decay :math:`d_n` of update ``update`` (:math:`n`, counted from 1; 0 at the first).

        Args:
            update: The update's number :math:`n \ge 1`.
            decay: The group's ``decay`` in :math:`[0, 1]` (default: the constructor's).

        Raises:
            TypeError: If ``update`` is not an integer or ``decay`` not a real number.
            ValueError: If ``update`` is below 1 or ``decay`` outside :math:`[0, 1]`.
        """
        update = check_int("update", update, low=1)
        decay = self.decay if decay is None else check_real("decay", decay, low=0.0, high=1.0)
        if update <= 1:
            return 0.0
        if self.warmup:
            return min(decay, 1.0 - (1.0 + (update - 1) / self.warmup_gamma) ** -self.warmup_power)
        return decay

    @torch.no_grad()
    def post_update(self, ctx: TransformContext) -> None:
        """Move the averages towards the new weights; every ``switch_every`` steps, switch."""
        counted = self._count_step(ctx)
        if counted is None:  # no parameter has a gradient
            return
        params, update = counted
        fresh = {id(p) for p in self._ensure_kept(ctx, params, checked=True)}  # a first average is a copy
        tracked = [p for p in params if id(p) not in fresh]
        decay_of = {id(p): group["decay"] for group in ctx.param_groups for p in group["params"]}
        if update == 1:  # AveragedModel's first update: a copy (also of init_state's averages)
            _copy_([as_real(ctx.state[p]["average"]) for p in tracked], [as_real(p) for p in tracked], foreach=ctx.foreach)
        else:
            for decay in sorted({decay_of[id(p)] for p in tracked}):
                chosen = [p for p in tracked if decay_of[id(p)] == decay]
                weight = 1 - self.decay_at(update, decay)
                _lerp_([as_real(ctx.state[p]["average"]) for p in chosen], [as_real(p) for p in chosen], weight, foreach=ctx.foreach)
        if self.switch_every is not None and update % self.switch_every == 0:
            _copy_([as_real(p) for p in params], [as_real(ctx.state[p]["average"]) for p in params], foreach=ctx.foreach)

    def averaged_weights(self, owner: Any, *, model: nn.Module | None = None) -> contextlib.AbstractContextManager[None]:
        """Context manager: the parameters hold the averages inside the block.

        ``with ema.averaged_weights(optimizer): evaluate(model)``. On exit the training weights
        are restored bit for bit, also when the block raises; buffers (BatchNorm's running
        statistics) are not swapped, and what the block writes to them stays. Parameters without an average
        (never stepped, frozen) keep their values. No optimizer step may be taken inside the
        block (it raises ``RuntimeError``). Saving ``model.state_dict()`` inside the block saves
        the averaged model (copy the tensors: they are the parameters' own). Over FSDP2
        (``fully_shard``) the block writes the local shards and reshards every FSDP2 module of
        ``model`` on entry and on exit (``FSDPModule.reshard``), so that every forward inside and
        after the block gathers the weights anew: sharded parameters need that model.

        Args:
            owner: The :class:`~samgria.TransformingOptimizer` that holds this transform (or a
                framework's optimizer around it: accelerate's ``AcceleratedOptimizer``, and so the
                Hugging Face Trainer's, Lightning's ``LightningOptimizer``), or the ``nn.Module``
                it is used with through ``apply`` / ``post_step``.
            model: The model to reshard (the ``fully_shard``-ed one); default: ``owner`` when it
                is a module, else the optimizer's ``model`` (``TransformingOptimizer(...,
                model=...)``).

        Raises:
            TypeError: If ``owner`` is neither an optimizer nor an ``nn.Module``, or ``model`` is
                not an ``nn.Module``.
            ValueError: If ``owner`` is an optimizer that neither holds this transform nor wraps
                one that does, a module
                while an optimizer holds it (steps it), the parameters are sharded (DTensor)
                and no model is known, or a parameter's shape changed since its last step
                (nothing is written).
        """
        return self._swapped_in(owner, model)
