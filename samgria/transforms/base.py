"""The transform protocol shared by every pre-step and post-step transform.

A transform runs around the inner optimizer's step inside
:class:`~samgria.TransformingOptimizer`:

* ``pre_update(ctx)`` runs after the closure's first evaluation and before the inner step; it may
  rewrite gradients or perturb the weights and re-evaluate the closure (SAM).
* ``post_update(ctx)`` runs after the inner step (LAMP).

Like each transform of an optax ``chain``, every transform in an optimizer owns one *slot*,
named after the transform (``"sam"``, ``"lamp"``, ``"lamp_1"`` for a second LAMP, or a name you
give). The slot holds

* its per-group hyperparameters, declared by :meth:`Transform.group_defaults` and stored in the
  param groups (see :class:`~samgria.TransformingOptimizer` for the key names), read through
  ``ctx.param_groups`` by their short names;
* its per-parameter state, ``ctx.state[p]``: the keys are stored in the optimizer's
  ``state[p]`` as ``"<slot>.<key>"``, so they are checkpointed with it and never collide with
  another transform's or the inner optimizer's;
* its object-level state (counters, random generator states), ``ctx.slot_state()``: stored the
  same way on the first parameter of the optimizer (or of a device), so that everything lives in
  ``optimizer.state`` — which is all that ``torch.distributed.checkpoint`` carries.

Every transform also speaks the seed protocol :class:`GradientTransform`
(``apply(model, loss_fn, batch)`` before descent and ``post_step(model)`` after it), so it can be
used beside a plain optimizer without the wrapper.
"""

from __future__ import annotations

import copy
import re
import types
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from samgria._checks import check_loaded_tensor
from samgria.functional._grouping import unique_params

__all__ = [
    "GradientTransform",
    "Transform",
    "TransformContext",
    "GroupView",
    "ProtocolTransform",
]


@runtime_checkable
class GradientTransform(Protocol):
    """The seed protocol: any object with these two methods is a gradient transform.

    ``apply`` runs after ``loss.backward()`` and before ``optimizer.step()``; ``post_step`` runs
    after ``optimizer.step()``. Such an object can be used on its own beside any optimizer, or
    placed in ``TransformingOptimizer(..., transforms=[...])``.
    """

    def apply(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        batch: tuple[Any, ...],
    ) -> None:
        """Pre-descent hook: may rewrite gradients or perturb and re-evaluate."""
        ...

    def post_step(self, model: nn.Module) -> None:
        """Post-descent hook: may modify the updated parameters."""
        ...


def _derive_writes_weights(cls: type, base: type, hook: str) -> None:
    """Set ``cls.writes_weights_before_step`` to whether ``cls``'s ``hook`` is not ``base``'s (a
    method that may move the weights before the inner step: the optimizer then copies them first,
    for atomicity), unless a class declares the attribute that defines that ``hook`` or derives
    from the one that does.

    A declaration speaks for the hook its class sees: one made above the class that overrides
    the hook (``class MySAM(SAM)`` overriding ``perturb`` below SAM's ``False``) does not count.
    """
    mro = cls.__mro__
    definer = next(index for index, klass in enumerate(mro) if hook in vars(klass))
    declared = any(
        "writes_weights_before_step" in vars(klass) and not vars(klass).get("_derived_writes", False)
        for klass in mro[: definer + 1]
    )
    if not declared:
        cls.writes_weights_before_step = getattr(cls, hook) is not getattr(base, hook)  # type: ignore[attr-defined]
    cls._derived_writes = not declared  # type: ignore[attr-defined]


def forget_autocast_copies() -> None:
    """Drop ``torch.autocast``'s cached low-precision copies of the weights; call after moving them.

    Inside an autocast region that stays open (a block around ``step(closure)``, around both
    passes of the two-call loop, or around an evaluation), autocast reuses the copy of a weight
    it cast at the first forward until the outermost region exits, whatever the parameter holds
    since: a re-evaluation at perturbed weights, or an evaluation at averaged ones, would run at
    the old weights.
    """
    torch.clear_autocast_cache()


#: A memory address in a ``repr`` (``<function f at 0x7f...>``): it changes from process to process.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _recorded(value: Any) -> str:
    """How a checkpoint records a setting: its ``repr`` without memory addresses; a Python
    function by its module and qualified name, and where it is not a module-level name (a lambda,
    a local function) also by the line it starts on, so that two lambdas stay apart."""
    if isinstance(value, types.FunctionType):
        name = f"{value.__module__}.{value.__qualname__}"
        if "<" in value.__qualname__:  # "<lambda>", "outer.<locals>.rule": the name alone is not unique
            name += f" (line {value.__code__.co_firstlineno})"
        return f"<function {name}>"
    return _ADDRESS.sub("", repr(value))


def default_slot_name(obj: Any) -> str:
    """``"sam"`` for ``SAM()`` (or the class ``SAM``), ``"normalize_grad"`` for
    ``NormalizeGrad()``: snake case of the class."""
    name = obj.__name__ if isinstance(obj, type) else type(obj).__name__
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    return name.lower()


class GroupView(Mapping):
    """A param group as one transform sees it: its hyperparameters under their short names.

    ``view["rho"]`` reads the group's key for this transform's ``rho`` (``"rho"`` or
    ``"sam.rho"``, see :class:`~samgria.TransformingOptimizer`); every other key (``"params"``,
    ``"lr"``, …) reads the group as it is.
    """

    __slots__ = ("group", "_keys")

    def __init__(self, group: Mapping[str, Any], keys: Mapping[str, str]) -> None:
        self.group = group
        self._keys = keys

    def __getitem__(self, key: str) -> Any:
        return self.group[self._keys.get(key, key)]

    def __iter__(self) -> Iterator[str]:
        stored = {value: key for key, value in self._keys.items()}
        return (stored.get(key, key) for key in self.group)

    def __len__(self) -> int:
        return len(self.group)

    def __repr__(self) -> str:
        return f"GroupView({dict((k, v) for k, v in self.items() if k != 'params')})"


class _SlotEntry(MutableMapping):
    """One parameter's state in one slot: ``entry[key]`` is ``state[p]["<slot>.<key>"]``."""

    __slots__ = ("_entry", "_prefix")

    def __init__(self, entry: dict[Any, Any], prefix: str) -> None:
        self._entry = entry
        self._prefix = prefix

    def __getitem__(self, key: str) -> Any:
        return self._entry[self._prefix + key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._entry[self._prefix + key] = value

    def __delitem__(self, key: str) -> None:
        del self._entry[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        size = len(self._prefix)
        return (
            key[size:] for key in list(self._entry) if isinstance(key, str) and key.startswith(self._prefix)
        )

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


class _SlotState(Mapping):
    """``slot_state[p]``: parameter ``p``'s entry in one slot of the optimizer's ``state``."""

    __slots__ = ("_state", "_prefix")

    def __init__(self, state: MutableMapping[Any, dict[Any, Any]], prefix: str) -> None:
        self._state = state
        self._prefix = prefix

    def __getitem__(self, param: torch.Tensor) -> _SlotEntry:
        return _SlotEntry(self._state[param], self._prefix)

    def __contains__(self, param: object) -> bool:
        if not isinstance(param, torch.Tensor):  # an inner optimizer's own key (SPAM's "total_step")
            return False
        entry = self._state.get(param) if param in self._state else None
        if not entry or not isinstance(entry, Mapping):
            return False
        return any(isinstance(key, str) and key.startswith(self._prefix) for key in entry)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (param for param in list(self._state) if param in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class TransformContext:
    """What one transform sees during one optimizer step.

    Attributes:
        param_groups: The optimizer's param groups as :class:`GroupView` s (hyperparameters by
            their short names; ``"params"`` and the inner optimizer's keys as they are).
        state: ``state[p]`` is parameter ``p``'s entry in this transform's slot (a dict-like
            view of the optimizer's ``state[p]``; created on first access).
        reevaluate: Re-runs the closure at the current weights (under grad mode) with the
            gradients cleared first, and returns its loss; ``None`` when the step has no closure
            (then a transform that needs one must raise). Inside the optimizer, when the
            re-evaluation's gradients are not finite it raises a private ``Exception`` subclass
            that ends the step for the non-finite policy (skipped and counted, or
            ``FloatingPointError`` with ``non_finite="raise"``). Let it propagate; put weights you
            moved back in a ``finally`` or an ``except Exception: ...; raise`` (or let the
            optimizer's copy restore them, see ``Transform.writes_weights_before_step``). A
            transform that swallows it does not bypass the policy: the optimizer ends the step
            all the same once ``pre_update`` returns. Whatever the closure raises propagates as
            well.
        foreach: Whether to use the ``torch._foreach_*`` fast path.
        model: The module the closure evaluates, when known (used by protocol adapters).
        standalone: ``True`` when the transform runs through the seed protocol (``apply`` /
            ``post_step``) rather than inside an optimizer.
        grad_norm: The global L2 norm of the gradients as they are now, when the optimizer
            already computed it (``None`` otherwise).
        spare_buffers: Memory a transform freed during this step, by ``id(param)`` (laid out like
            that parameter); the optimizer reuses it for its snapshot of the weights.
    """

    def __init__(
        self,
        param_groups: Sequence[Mapping[str, Any]],
        state: MutableMapping[Any, dict[Any, Any]],
        *,
        slot: str,
        keys: Mapping[str, str] | None = None,
        reevaluate: Callable[[], Any] | None = None,
        foreach: bool = True,
        model: nn.Module | None = None,
        standalone: bool = False,
        grad_norm: float | None = None,
        spare_buffers: dict[int, torch.Tensor] | None = None,
    ) -> None:
        keys = keys or {}
        self.spare_buffers = {} if spare_buffers is None else spare_buffers
        self.raw_param_groups = param_groups
        self.param_groups = [GroupView(group, keys) for group in param_groups]
        self.slot = slot
        self._optimizer_state = state
        self.state = _SlotState(state, slot + ".")
        self.reevaluate = reevaluate
        self.foreach = foreach
        self.model = model
        self.standalone = standalone
        self.grad_norm = grad_norm

    def slot_state(self, device: torch.device | None = None, keys: tuple[str, ...] = ()) -> _SlotEntry | None:
        """This transform's object-level state (counters, generator states).

        Stored in the optimizer's ``state`` of the first parameter that requires grad (the first
        on ``device``, when given) under this slot's keys — ``torch.distributed.checkpoint``
        carries only the state of parameters that require grad; ``None`` when there is no such
        parameter. Keys must not coincide with the transform's per-parameter keys. ``keys``
        names the object-level keys: when the parameter that held them is no longer the first
        that requires grad (it was frozen, or its param group was taken out of ``param_groups``,
        whose state entries torch keeps, or a group was put before it), they are moved to the new
        one, so they are held once and go on counting.
        """
        anchor = next(
            (
                param
                for group in self.raw_param_groups
                for param in group["params"]
                if param.requires_grad and (device is None or param.device == device)
            ),
            None,
        )
        if anchor is None:
            return None
        prefix = self.slot + "."
        entry = _SlotEntry(self._optimizer_state[anchor], prefix)
        missing = [key for key in keys if key not in entry]
        if missing:
            # Every entry of the state, not only the param groups' parameters: a group taken out
            # of param_groups leaves its parameters' entries (and maybe the keys) behind. In the
            # seed protocol, where the transform's state spans every model it is used with, the
            # entries of the model's own parameters only (another model's keys are its own).
            sources: Iterable[tuple[Any, Any]] = self._optimizer_state.items()
            if self.standalone and self.model is not None:
                state = self._optimizer_state
                sources = [(param, state[param]) for param in self.model.parameters() if param in state]
            for param, param_state in list(sources):
                if (
                    param is anchor
                    or not isinstance(param, torch.Tensor)  # an inner optimizer's own key
                    or not isinstance(param_state, MutableMapping)
                    or (device is not None and param.device != device)
                ):
                    continue
                held = _SlotEntry(self._optimizer_state[param], prefix)
                for key in [key for key in missing if key in held]:
                    entry[key] = held.pop(key)
        return entry


class Transform:
    """Base class of samgria transforms.

    Subclasses override :meth:`pre_update` and/or :meth:`post_update`, declare their per-group
    hyperparameters in :meth:`group_defaults`, check them in :meth:`validate_group` and declare
    constructor-only settings (a checkpoint must have been made with the same ones) in
    :meth:`settings`.

    Attributes:
        needs_closure: ``True`` when :meth:`pre_update` re-evaluates the closure.
        saves_state_before_step: ``True`` when the transform writes its state before the inner
            step (in :meth:`pre_update`, or when its perturbation is restored). It must then
            assign new objects, never write into existing tensors: the optimizer keeps the
            references of the state at the start of the step (no copies) and puts them back if
            anything later in the step raises, the step is skipped or cancelled. Only then:
            undeclared, what :meth:`pre_update` wrote may stay written after such a step (also
            with ``atomic="full"``); declared, a write into an existing tensor
            (``st["count"] += 1`` on a tensor, ``add_``) stays, as the reference put back is
            that same tensor (``st["count"] = st["count"] + 1`` assigns a new one).
        slot_name: The default name of the transform's slot: ASCII letters, digits and
            underscores, not starting with a digit (default: the class name in snake case).
        supports_sharded_params: ``True`` when the transform is right for sharded (``DTensor``)
            parameters such as FSDP2's: it works elementwise on each rank's shard, or takes
            norms with :func:`~samgria.functional.global_norm` (which sums over the shards), or
            uses ``DTensor`` operations. Transforms that take a per-tensor quantity of a local
            shard set it to ``False``; the optimizer then refuses sharded parameters.
        supports_local_first_pass: ``True`` when the update stays the same on every replica if
            the first pass's gradients are each rank's own (``first_pass_context``, the SAM
            paper's m-sharpness): the transform uses them only to perturb. Transforms whose
            update mixes them in (GSAM, WSAM) set it to ``False``; the optimizer then refuses
            ``first_pass_context``.
        writes_weights_before_step: ``True`` when :meth:`pre_update` may change weights in
            place and leave them changed (a :class:`~samgria.transforms.ParamTransform` whose
            pre-step hook may write ``param``; a :class:`~samgria.PerturbationTransform` whose
            ``perturb`` may raise after moving weights in place — the default of subclasses that
            override it). With ``atomic=True`` the optimizer then copies the weights at the
            start of the step and writes them back if the step raises, is skipped or cancelled.
            (A transform that moves the weights and always puts them back itself, also when it
            raises, as SAM does, declares ``False``.) A subclass with ``needs_closure = True``
            in its class that overrides :meth:`pre_update` gets ``True`` unless it declares the
            attribute (in the class that defines that :meth:`pre_update`, or below it): a
            re-evaluation whose gradients are not finite ends the step from inside
            ``ctx.reevaluate()``, where the weights it moved to evaluate may not be back yet.
        combines_gradients: ``True`` when :meth:`pre_update` hands on gradients it computed
            from the evaluations' gradients (GSAM, WSAM, LookSAM's steps in between), which can
            overflow where theirs did not: the optimizer then checks them once more right after
            it, in ``step(closure)``, ``step()`` and the two-call loop alike (where it runs after
            the re-evaluating transform, ``second_step()`` runs it and then checks), so that
            every loop skips the same steps.
    """

    needs_closure: bool = False
    saves_state_before_step: bool = False
    writes_weights_before_step: bool = False
    combines_gradients: bool = False
    supports_sharded_params: bool = True
    supports_local_first_pass: bool = True
    slot_name: str | None = None

    #: A base class whose subclasses derive ``writes_weights_before_step`` from a hook of their
    #: own (``PerturbationTransform``'s ``perturb``), not from :meth:`pre_update`.
    _writes_derived_from_own_hook: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A pre_update that re-evaluates may move the weights to evaluate elsewhere; a
        # re-evaluation whose gradients are not finite ends the step from inside it (the
        # non-finite policy), so weights it moved and had not put back would stay moved.
        if cls.needs_closure is True and not cls._writes_derived_from_own_hook:
            _derive_writes_weights(cls, Transform, "pre_update")

    @property
    def reevaluations(self) -> int:
        """The most closure re-evaluations :meth:`pre_update` makes in one step.

        1 when ``needs_closure``, else 0 (``MultiStepSAM``: ``ascent_steps``).
        ``first_pass_context`` needs a chain that re-evaluates at most once per step.
        """
        return int(self.needs_closure)

    # -- configuration -----------------------------------------------------------------------
    def group_defaults(self) -> dict[str, Any]:
        """Per-group hyperparameters and their defaults (the constructor's values)."""
        return {}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        """Raise ``ValueError``/``TypeError`` if a group holds an invalid hyperparameter value.

        ``group`` maps this transform's hyperparameters by their short names; a transform with a
        ``param_ndim`` hyperparameter also finds the group's ``"params"`` there (whether a
        ``param_ndim`` fits depends on each parameter's dimension).
        """

    def settings(self) -> dict[str, Any]:
        """Constructor-only settings that change behaviour (e.g. LAMP's ``rollback_len``).

        They identify the transform in a checkpoint, by their ``repr`` (:meth:`describe`): loading
        one made with other settings raises. A value whose ``repr`` does not tell it apart from
        another (two objects of one class without a ``__repr__``) does not either.
        """
        return {}

    def default_slot(self) -> str:
        """The slot name used when the chain does not name this transform."""
        return self.slot_name or default_slot_name(self)

    def describe(self) -> str:
        """``"LAMP(rollback_len=10, seed=0)"``: the type and settings, as checkpoints record them.

        Each setting by its ``repr`` without the memory addresses that change from process to
        process, a Python function by its module and qualified name (``<function rule at
        0x7f...>`` is recorded as ``<function mymodule.rule>``; a lambda or local function also by
        its first line), so that a checkpoint loads wherever the same transform is built.
        """
        args = ", ".join(f"{key}={_recorded(value)}" for key, value in self.settings().items())
        return f"{type(self).__name__}({args})"

    # -- hooks inside TransformingOptimizer ----------------------------------------------------
    def pre_update(self, ctx: TransformContext) -> None:
        """Runs before the inner optimizer's step. Default: nothing."""

    def post_update(self, ctx: TransformContext) -> None:
        """Runs after the inner optimizer's step. Default: nothing."""

    def init_state(self, ctx: TransformContext) -> None:
        """Create the transform's state without changing any weight (default: nothing).

        Called instead of the hooks by a step that only initialises state: every gradient zero
        and every ``lr`` zero while the optimizer holds no state yet — what
        ``torch.distributed.checkpoint`` does to a fresh optimizer before loading into it. It
        loads only the keys that exist then, so a transform with state must create every
        per-parameter key (``ctx.state[p]``) and object-level key (``ctx.slot_state(keys=...)``)
        here, with its final shape and dtype: a key it leaves out is silently not restored.
        At such a step the optimizer warns when a transform that overrides :meth:`pre_update` or
        :meth:`post_update` does not override this (one that keeps no state overrides it with
        a method that does nothing); construction and training steps do not warn.
        """

    def check_loaded_state(self, ctx: TransformContext) -> None:
        """Raise ``ValueError`` if the slot of a checkpoint being loaded is unusable (default: nothing).

        Runs before the load commits, on the loaded state (``ctx.state``, ``ctx.slot_state()``);
        it may normalise values in place (they are not installed yet).
        """

    def _check_loaded_tensors(self, ctx: TransformContext, key: str) -> None:
        """:func:`~samgria._checks.check_loaded_tensor` for every parameter's ``key`` in the slot
        of a checkpoint being loaded (for :meth:`check_loaded_state`)."""
        for param in unique_params(ctx.param_groups):
            if param in ctx.state and key in ctx.state[param]:
                check_loaded_tensor(type(self).__name__, ctx.slot, key, ctx.state[param][key], param)

    def convert_loaded(self, entry: dict[str, Any], param: torch.Tensor) -> None:
        """Convert a parameter's entries of a checkpoint being loaded for ``param``, in place, while
        they still have the checkpoint's dtypes (default: nothing).

        Runs before torch's ``load_state_dict`` casts the state's tensors to the parameter's
        dtype (a slot's non-floating tensors keep theirs), on a copy of the entry with this
        slot's keys by their short names (LAMP turns a float32 run's sum into the running mean a
        16-bit parameter keeps, which the cast would otherwise have overflowed). Nothing is
        checked yet: leave what is not as expected alone for :meth:`check_loaded_state`.
        """

    def export_state(self, ctx: TransformContext) -> None:
        """Copy state kept outside the slot into it, before ``state_dict()`` packs (default: nothing)."""

    def import_state(self, ctx: TransformContext) -> None:
        """Take state back from the slot after ``load_state_dict()`` (default: nothing)."""

    def active(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        """Whether the transform would do anything on these groups (e.g. ``rho > 0`` somewhere)."""
        return True

    def scales_with_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        r"""Whether :meth:`pre_update` leaves the gradients alone, or maps gradients :math:`g` to
        a result that scales with them, :math:`T(s\,g) = s\,T(g)` for every :math:`s > 0`,
        keeping nothing of their size.

        In the two-call loop under ``torch.amp.GradScaler`` the transforms before the
        re-evaluating one act on the first pass's gradients still multiplied by the loss scale.
        GSAM, WSAM and LookSAM mix those into the step, so the optimizer refuses that step when a
        transform before them is not scale-equivariant (clipping to a threshold, adding an
        ``eps`` or a bias, taking signs). Default: ``False`` (the safe answer for a transform that
        may rewrite gradients); a transform whose ``pre_update`` does nothing is not asked.
        """
        return False

    def can_overflow_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        """Whether :meth:`pre_update` may, with these groups' settings, turn finite gradients into
        infinite ones (:class:`~samgria.ScaleGrad` with a scale beyond 1 or a bias; not a
        rescaling by a norm).

        When it may, the optimizer checks the gradients right after it, as after a transform that
        combines gradients (``combines_gradients``), and skips the step whole (the non-finite
        policy) instead of handing them to the inner optimizer. Asked at every step (maybe more
        than once), after :meth:`pre_update` ran; a read of every gradient is saved where it
        answers ``False``.
        Default: ``False``.
        """
        return False

    def keeps_direction_of_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        r"""Whether :meth:`pre_update` leaves the gradients alone, or maps gradients :math:`g` to
        a result whose direction does not depend on their size: :math:`T(s\,g) = c\,T(g)` for
        every :math:`s > 0`, with one :math:`c > 0` for all the parameters.

        What SAM and ASAM, which use only the direction of the gradients they perturb with, need
        of the transforms before them in the two-call loop under ``torch.amp.GradScaler`` (where
        those transforms see the first pass's gradients multiplied by the loss scale): the
        optimizer refuses the step otherwise. Default: :meth:`scales_with_gradients`
        (:math:`c = s`).
        """
        return self.scales_with_gradients(param_groups)

    # -- the seed protocol, for use beside a plain optimizer ---------------------------------
    def _standalone_context(self, model: nn.Module, reevaluate: Callable[[], Any] | None) -> TransformContext:
        """The context of a seed-protocol call with ``model``.

        The transform keeps the state itself, by parameter, for every model it is used with
        (:class:`_ModulesSeen` drops that of the parameters of freed models).
        """
        params = [p for p in model.parameters() if p.requires_grad]
        group = {"params": params, **self.group_defaults()}
        if "_standalone_state" not in self.__dict__:
            self._standalone_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        modules = self.__dict__.get("_standalone_modules")
        if modules is None:
            modules = self.__dict__["_standalone_modules"] = _ModulesSeen()
        modules.note(model, self._standalone_state)
        self._standalone_params = params  # the positions state_dict() numbers the state by
        return TransformContext(
            [group],
            self._standalone_state,
            slot=self.default_slot(),
            reevaluate=reevaluate,
            foreach=True,
            model=model,
            standalone=True,
        )

    def apply(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        batch: tuple[Any, ...],
    ) -> None:
        """Seed protocol, pre-descent: call after ``loss.backward()``, before ``optimizer.step()``.

        Uses the constructor's hyperparameters for every parameter of ``model``. A transform that
        re-evaluates computes ``loss_fn(*batch).backward()`` itself (gradients cleared first).
        The transform keeps its state itself: one object may serve several models, in turn or
        one after another (a sweep), each with a state of its own; that of a model that was
        freed is dropped at the next call.
        """

        def reevaluate() -> torch.Tensor:
            for param in model.parameters():
                param.grad = None
            forget_autocast_copies()  # the weights moved
            with torch.enable_grad():
                loss = loss_fn(*batch)
                loss.backward()
            return loss

        try:
            with torch.no_grad():
                self.pre_update(self._standalone_context(model, reevaluate))
        finally:
            forget_autocast_copies()  # the weights went back

    def post_step(self, model: nn.Module) -> None:
        """Seed protocol, post-descent: call after ``optimizer.step()``."""
        with torch.no_grad():
            self.post_update(self._standalone_context(model, None))

    def state_dict(self) -> dict[str, Any]:
        """The state of standalone (seed-protocol) use, for inspection.

        Keyed by each parameter's position among the model's parameters that require grad (as
        the last :meth:`apply` or :meth:`post_step` saw them); parameters without state are
        left out. There is no ``load_state_dict`` for standalone use: to checkpoint and resume,
        use the transform inside :class:`~samgria.TransformingOptimizer`, whose ``state_dict``
        carries every slot.
        """
        state = self.__dict__.get("_standalone_state", {})
        params = self.__dict__.get("_standalone_params", [])
        return {
            "state": {index: dict(state[param]) for index, param in enumerate(params) if state.get(param)}
        }

    def __repr__(self) -> str:
        items = {**self.group_defaults(), **self.settings()}
        args = ", ".join(f"{key}={value!r}" for key, value in items.items())
        return f"{type(self).__name__}({args})"


class _ModulesSeen:
    """The modules a transform was used with through the seed protocol (``apply`` /
    ``post_step``), held weakly: they tell which parameters of its state are still in use.

    The transform keeps its state itself, by parameter, for as long as it lives (a transform
    object reused over a sweep's models, or for two models in turn). When a module it was used
    with (the model, or one of its submodules) has been freed, the next call drops the state of
    every parameter that no module it was used with still holds: that of a dropped model, or of
    a parameter its module replaced; the state of a model seen through a new container at every
    call (``nn.Sequential(encoder, head)``) stays, as its layers live on. Weak references to
    modules, never to parameters (``torch.utils.swap_tensors`` refuses a tensor that has one),
    by ``id``, each entry gone as its module goes. Copied and pickled empty: a weak reference
    cannot be pickled, and the copy records the modules it is used with.
    """

    __slots__ = ("models", "modules", "freed", "__weakref__")

    def __init__(self) -> None:
        self.models: dict[int, weakref.ref[nn.Module]] = {}  # those given to a call
        self.modules: dict[int, weakref.ref[nn.Module]] = {}  # and every submodule of them
        self.freed = False  # a recorded module was freed since the last call

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ModulesSeen, ())

    def _watch(self, name: str, module: nn.Module) -> None:
        """Record ``module`` in the table ``name`` (``"models"`` or ``"modules"``)."""
        seen, key = weakref.ref(self), id(module)  # (no reference cycle through the callback)

        def forget(ref: weakref.ref[nn.Module]) -> None:  # runs as the module is freed
            owner = seen()
            if owner is not None and getattr(owner, name).get(key) is ref:
                del getattr(owner, name)[key]
                owner.freed = True

        getattr(self, name)[key] = weakref.ref(module, forget)

    def note(self, model: nn.Module, state: MutableMapping[Any, Any]) -> None:
        """Record ``model`` (and its submodules); drop the entries of ``state`` that no recorded
        module holds, if a recorded module has been freed since the last call."""
        if self.freed:
            self.freed = False
            # ``parameters()`` of each model given to a call (it may have new layers since), and
            # the parameters each other module holds itself (a layer of a freed container).
            held = {id(param) for param in model.parameters()}
            for table, recurse in ((self.models, True), (self.modules, False)):
                for ref in list(table.values()):
                    module = ref()
                    if module is not None:
                        held.update(id(param) for param in module.parameters(recurse=recurse))
            for param in [param for param in state if id(param) not in held]:
                del state[param]
        if id(model) not in self.models:
            self._watch("models", model)
        # At every call: a layer put into the model since (a head swapped in) is in use too,
        # and keeps its state once swapped out, for as long as it lives.
        for module in model.modules():
            if id(module) not in self.modules:
                self._watch("modules", module)


class _ParameterView(nn.Module):
    """Stands in for the model when a protocol transform runs inside the optimizer without one.

    ``parameters()`` / ``named_parameters()`` yield the optimizer's parameters; calling it raises.
    """

    def __init__(self, param_groups: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self._groups = param_groups

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # type: ignore[override]
        for group_index, group in enumerate(self._groups):
            for param_index, param in enumerate(group["params"]):
                yield f"{prefix}group{group_index}.{param_index}", param

    def parameters(self, recurse: bool = True):  # type: ignore[override]
        for _, param in self.named_parameters():
            yield param

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "this transform calls the model, but TransformingOptimizer was not given one: pass "
            "model=<your module> to TransformingOptimizer"
        )


class ProtocolTransform(Transform):
    """Adapts any :class:`GradientTransform` (``apply`` + ``post_step``) to the optimizer.

    Inside :meth:`TransformingOptimizer.step`, ``apply`` receives the optimizer's ``model`` (or a
    view of its parameters), a ``loss_fn`` that re-evaluates the closure — the closure already
    back-propagates, so the returned loss is detached and calling ``.backward()`` on it is a
    harmless no-op — and ``batch=()``. Without a closure (``step()`` without one, or the two-call
    loop ``first_step()`` / ``second_step()``) ``loss_fn`` raises ``RuntimeError``: an object
    that calls it needs ``optimizer.step(closure)``. When the object has
    ``state_dict``/``load_state_dict``, its state is copied into the slot by the optimizer's
    ``state_dict()`` (one slot key per key, and exactly the keys it returns then; the values
    should be tensors or numbers, which is what checkpoints carry) and handed back after
    ``load_state_dict()`` (tried on a deep copy of the object first, so that a state it refuses
    fails the load before anything changes). The slot sits in the state of the first parameter,
    so ``load_state_dict()`` casts its floating-point tensors to that parameter's dtype, as torch
    casts its state; non-floating tensors (counters, generator states) keep their dtype and move
    to the parameter's device (torch would cast them to a floating parameter's dtype too).

    The object's own attributes are outside the optimizer's atomic steps: the optimizer cannot
    see them, so what the object changed in itself during a step that later raises or is skipped
    stays changed (the weights and every slot are restored). The weights are copied at the start
    of each step, as ``apply`` may change them; an object whose ``apply`` leaves them as they
    were (or puts them back itself) declares ``writes_weights_before_step = False`` to save that
    copy. The gradients ``apply`` leaves are checked for the non-finite policy (it may compute
    them anew); an object that cannot take finite gradients beyond their dtype's range declares
    ``can_overflow_gradients(param_groups)`` returning ``False`` to save that read. Its
    ``slot_name`` attribute, if it has one, names its slot as a :class:`Transform`'s does.

    Raises:
        TypeError: If ``transform`` is a class, or an object without ``apply`` and ``post_step``.
    """

    # A seed-protocol object typically takes p.grad.norm() per tensor: on a shard, a shard's norm.
    supports_sharded_params = False
    @property
    def supports_local_first_pass(self) -> bool:  # type: ignore[override]
        """The object's own ``supports_local_first_pass``; ``False`` (m-sharpness refused) when it
        does not declare one: what it does with the first pass's gradients is not known."""
        return bool(getattr(self.transform, "supports_local_first_pass", False))

    @property
    def writes_weights_before_step(self) -> bool:  # type: ignore[override]
        """The object's own ``writes_weights_before_step``; ``True`` (the optimizer copies the
        weights at the start of the step) when it does not declare one: its ``apply`` may change
        the weights and leave them changed."""
        return bool(getattr(self.transform, "writes_weights_before_step", True))

    @property
    def reevaluations(self) -> int:
        """The object's own ``reevaluations``; 1 when it does not declare one (its ``apply`` may
        call ``loss_fn``)."""
        return int(getattr(self.transform, "reevaluations", 1))

    def __init__(self, transform: GradientTransform) -> None:
        rule = "an object with apply(model, loss_fn, batch) and post_step(model) methods"
        if isinstance(transform, type) or not isinstance(transform, GradientTransform):
            raise TypeError(f"transform must be {rule}, got {transform!r}")
        self.transform = transform

    def scales_with_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        """The object's own ``scales_with_gradients(param_groups)`` when it declares one; ``False``
        otherwise (its ``apply`` may rewrite the gradients)."""
        declared = getattr(self.transform, "scales_with_gradients", None)
        return bool(declared(param_groups)) if callable(declared) else False

    def keeps_direction_of_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        """The object's own ``keeps_direction_of_gradients(param_groups)`` when it declares one;
        else :meth:`scales_with_gradients`."""
        declared = getattr(self.transform, "keeps_direction_of_gradients", None)
        return bool(declared(param_groups)) if callable(declared) else self.scales_with_gradients(param_groups)

    def can_overflow_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        """The object's own ``can_overflow_gradients(param_groups)`` when it declares one; ``True``
        otherwise (the gradients are checked after ``apply``, which may compute them anew: the
        non-finite policy then skips a step it left infinite or NaN)."""
        declared = getattr(self.transform, "can_overflow_gradients", None)
        return bool(declared(param_groups)) if callable(declared) else True

    def default_slot(self) -> str:
        """The object's own ``slot_name`` (as a :class:`Transform`'s), else its class name in snake case."""
        return getattr(self.transform, "slot_name", None) or default_slot_name(self.transform)

    def describe(self) -> str:
        return type(self.transform).__qualname__

    def _model(self, ctx: TransformContext) -> nn.Module:
        return ctx.model if ctx.model is not None else _ParameterView(ctx.raw_param_groups)

    def pre_update(self, ctx: TransformContext) -> None:
        def loss_fn(*_batch: Any) -> torch.Tensor:
            if ctx.reevaluate is None:  # the two-call loop, or step() without a closure
                raise RuntimeError(
                    f"{self.transform!r} re-evaluates the loss, which needs a closure: call "
                    "optimizer.step(closure)"
                )
            loss = ctx.reevaluate()
            if not isinstance(loss, torch.Tensor):
                loss = torch.as_tensor(loss)
            return loss.detach().requires_grad_(True)

        self.transform.apply(self._model(ctx), loss_fn, ())

    def post_update(self, ctx: TransformContext) -> None:
        self.transform.post_step(self._model(ctx))

    def export_state(self, ctx: TransformContext) -> None:
        """Make the slot hold exactly the object's ``state_dict()`` (if it has one), key by key.

        Keys the object no longer returns are removed, also from a parameter that held the slot
        before it was frozen: the adapter keeps nothing else in the slot.
        """
        method = getattr(self.transform, "state_dict", None)
        slot = ctx.slot_state()
        if not callable(method) or slot is None:
            return
        current = dict(method())  # asked and checked first: if either fails, the slot is as it was
        bad = next((key for key in current if not isinstance(key, str)), None)
        if bad is not None:
            raise TypeError(f"{self.transform!r}.state_dict() must have string keys, got {bad!r}")
        for param in list(ctx.state):
            entry = ctx.state[param]
            # On the anchor: the keys the object no longer returns; elsewhere (a parameter that
            # held the slot before it was frozen): every key.
            stale = list(entry) if entry._entry is not slot._entry else [key for key in entry if key not in current]
            for key in stale:
                del entry[key]
        slot.update(current)

    @staticmethod
    def _loaded_slot(ctx: TransformContext) -> _SlotEntry | None:
        """The slot on the first parameter that requires grad, with every key of the slot moved
        there from the parameter that held it (frozen since the checkpoint was made): the
        adapter's slot holds object-level keys only."""
        keys = tuple(dict.fromkeys(key for param in list(ctx.state) for key in ctx.state[param]))
        return ctx.slot_state(keys=keys)

    def check_loaded_state(self, ctx: TransformContext) -> None:
        """Try the checkpoint's slot on a deep copy of the object before the load commits, so a
        state the object's own ``load_state_dict`` refuses fails with nothing changed (an object
        that cannot be deep-copied is only loaded after the commit)."""
        method = getattr(self.transform, "load_state_dict", None)
        slot = self._loaded_slot(ctx)
        if not callable(method) or slot is None or not len(slot):
            return
        try:
            # Any: the copy has the load_state_dict found above, which GradientTransform does not declare
            trial: Any = copy.deepcopy(self.transform)
        except Exception:  # noqa: BLE001 - any failure to copy: no trial, as documented
            return
        trial.load_state_dict(dict(slot.items()))

    def import_state(self, ctx: TransformContext) -> None:
        """Hand the slot's keys to the object's ``load_state_dict`` (if it has one)."""
        method = getattr(self.transform, "load_state_dict", None)
        slot = self._loaded_slot(ctx)
        if callable(method) and slot is not None and len(slot):
            method(dict(slot.items()))

    def __repr__(self) -> str:
        return repr(self.transform)


def transform_name(transform: Transform) -> str:
    """How messages name a transform of a chain: its class name, or for a seed-protocol object
    (:class:`ProtocolTransform`) the object's own class with ``(seed protocol)``."""
    if isinstance(transform, ProtocolTransform):
        return f"{transform.describe()} (seed protocol)"
    return type(transform).__name__
