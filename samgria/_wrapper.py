"""``WrappingOptimizer``: the one base of optimizers that drive another optimizer.

:class:`~samgria.TransformingOptimizer` drives its *inner* optimizer and every
:class:`~samgria.MetaOptimizer` its *outer* one. Both are real :class:`torch.optim.Optimizer` s
and use torch's own machinery for everything torch already does — no copies of it:

* ``param_groups`` *is* the driven optimizer's list, so schedulers, ``add_param_group`` and
  ``lr`` edits reach it.
* ``state`` is one ``defaultdict(dict)`` owned by the wrapper, packed and loaded by torch's own
  :meth:`~torch.optim.Optimizer.state_dict` / :meth:`~torch.optim.Optimizer.load_state_dict`
  (so hooks run, floating-point state is cast to the parameter's dtype and device -- a
  transform slot's non-floating tensors keep their dtype (``TransformingOptimizer._before_cast``)
  --, and
  ``torch.distributed.checkpoint`` sees all of it). The driven optimizer sees the same entries
  through a view that hides the keys the wrapper reserves for itself (a transform's slot), so an
  optimizer that initialises its state lazily (``if len(state) == 0``) still does. The
  dictionary sits in a ``_SharedState`` that both hold; the view holds the wrapper only weakly,
  so nothing the driven optimizer holds refers back to it and a wrapper is freed as soon as its
  last reference goes, as a torch optimizer is.
* A driven optimizer whose class has its own ``state_dict`` / ``load_state_dict`` keeps them:
  what the former adds beside ``state`` and ``param_groups`` is packed too, and the latter runs
  on the checkpoint without the wrapper's keys (see ``_own_driven``).
* A driven optimizer that is itself a wrapper (a ``TransformingOptimizer`` as a
  ``MetaOptimizer``'s outer optimizer) shares the state and groups: its own checkpoint steps
  (the transform chain's record, validation and export) run inside the outer wrapper's.
* Step hooks, state-dict hooks and pickling are torch's. The driven optimizer's ``step`` is
  called without torch's hook wrapper, so the global step hooks fire once per step (for the
  wrapper); hooks registered on the driven optimizer itself do not run — register them on the
  wrapper.
* Pickling and :func:`copy.deepcopy` drop hooks, as torch does, the callables listed in
  ``_dropped_on_pickle`` (they are ``None`` afterwards; ``copy.copy`` keeps these), and what another object patched onto the
  instance (an LR scheduler's wrapper of ``step``, which a copy would call on the original), as
  torch's pickling carries none of it. Like ``state_dict()``, they refuse while a step is half
  done (:meth:`_check_idle`). ``copy.copy`` gives a wrapper around a shallow copy of the driven
  optimizer (``_shallow_copy_of_driven``): the state dictionary and param groups are shared,
  as torch's ``copy.copy`` shares them, until a load rebinds the copy's own.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import sys
import types
import warnings
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, cast

import torch
from torch.optim import Optimizer

from samgria._checks import check_like_default
from samgria._frameworks import called_from, scheduler_wrapped_step, stacklevel_outside
from samgria._snapshot import StateStructure, StepSnapshot, is_entry
from samgria.functional._grouping import unique_params
from samgria.functional._views import values_as_real

__all__ = [
    "WrappingOptimizer",
    "built_by_zero_redundancy",
    "eager_under_compile",
    "refuse_driven",
    "step_required_arguments",
    "unhooked_step",
    "warn_of_hooks_not_run",
    "with_hooks",
]


def unhooked_step(optimizer: Optimizer, closure: Any = None) -> Any:
    """``optimizer.step(closure)`` without torch's hook wrapper: no step hook fires.

    For an optimizer that runs inside another one's step (a wrapper's driven optimizer, an
    adversary inside a transform), so that the global step hooks fire once per user-visible step.
    torch wraps every optimizer class's ``step`` once (``Optimizer._patch_step_function`` marks
    the wrapper with ``hooked`` and ``functools.wraps`` keeps the original in ``__wrapped__``);
    the wrapper runs the global and the optimizer's own step hooks (a :class:`WrappingOptimizer`'s
    class gets :func:`with_hooks` instead, whose ``__wrapped__`` is its step without hooks). This
    module is the one place samgria relies on that detail of torch.
    """
    step: Any = type(optimizer).step  # torch's hook wrapper, or a class's own step
    if getattr(step, "hooked", False) and hasattr(step, "__wrapped__"):
        step = step.__wrapped__
    _record_call_for_schedulers(optimizer)
    return step(optimizer) if closure is None else step(optimizer, closure)


def _record_call_for_schedulers(optimizer: Optimizer) -> None:
    """Record a call of ``optimizer.step`` as an LR scheduler's patch of it would.

    A scheduler built on a driven optimizer (before it was wrapped, or on ``opt.inner``) patched
    its ``step`` on the instance to record the call; the wrapper calls the class's ``step``, and
    not at all when it skips a step (non-finite gradients): without the record the scheduler
    warns that it stepped before the optimizer, although the user called ``step()``.
    """
    if getattr(optimizer.__dict__.get("step"), "_wrapped_by_lr_sched", False):
        optimizer._opt_called = True  # type: ignore[attr-defined]


def eager_under_compile(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, run eagerly when ``torch.compile`` traces a function that calls it.

    torch runs its optimizers' ``state_dict``, ``load_state_dict``, ``zero_grad`` and
    ``add_param_group`` eagerly under ``torch.compile`` (a graph break), and traces their
    ``step``. A wrapper's step cannot be traced: the driven optimizer reads the state through a
    view of the wrapper's (:class:`_DrivenState`), on which Dynamo failed with an internal error
    while it built its guards. So a compiled training step (forward, backward,
    ``optimizer.step()``) compiles what it can and runs the step as it runs outside, and
    ``fullgraph=True`` says that it cannot capture the call. Outside ``torch.compile`` the
    method is called as it is (no frame of Dynamo's in between). torch's own decorator for
    these methods imports Dynamo at the first call, not at samgria's import (which importing it
    would make twice as slow).

    The meta-learning calls that run a differentiable inner loop (``MetaOptimizer.adapt``, a
    ``Learner``'s forward and ``adapt``, ``adapt_params``) run eagerly the same way: traced
    inside a compiled function (a compiled closure), the model's forward would become graphs
    that cannot be differentiated twice, and torch refuses there the ``force_eager`` stance the
    inner loop takes for compiled modules ("attempted to set_stance in a torch.compile region").
    """
    eager = torch._disable_dynamo(method)

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return eager(*args, **kwargs)
        return method(*args, **kwargs)

    return call


def with_hooks(body: Callable[..., Any]) -> Callable[..., Any]:
    """A wrapper class's ``step`` inside torch's hook wrapper, once per step.

    torch wraps every optimizer class's ``step`` in :meth:`torch.optim.Optimizer.profile_hook_step`
    (step hooks, profiling, the call record LR schedulers read) when it first builds one, unless
    it is marked ``hooked``. A :class:`WrappingOptimizer` applies that same wrapper itself at
    that moment (:meth:`WrappingOptimizer._patch_step_function`) with two additions: a subclass's
    (or a mixin's) ``step`` that calls ``super().step()`` runs the hooks once, not once per class
    (an in-step mark in the instance, never pickled), and the optimizer may act before the
    hooks run and after a step raises (:meth:`WrappingOptimizer._before_step_hooks`,
    :meth:`~WrappingOptimizer._after_failed_step`). The call's arguments reach the hooks and
    ``body`` as they were given; ``inspect.signature`` shows ``body``'s. ``__wrapped__`` is the
    step without hooks (what :func:`unhooked_step` calls). Under ``torch.compile`` the step runs
    eagerly (:func:`eager_under_compile`).
    """
    hooked = Optimizer.profile_hook_step(body)

    def run(self: Any, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.__dict__.get("_hooks_running"):  # super().step() inside a step: its hooks ran
            return body(self, *args, **kwargs)
        self.__dict__["_hooks_running"] = True
        for wrapper in self._wrapper_chain():  # the optimizers this step drives, also when it skips
            _record_call_for_schedulers(wrapper._driven)
        try:
            self._before_step_hooks(args, kwargs)
            return call(self, *args, **kwargs)
        except BaseException:
            self._after_failed_step()
            raise
        finally:
            self.__dict__.pop("_hooks_running", None)

    eager_run = torch._disable_dynamo(run)  # as eager_under_compile's, without a frame more outside

    @functools.wraps(body)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return eager_run(self, hooked, args, kwargs)
        return run(self, hooked, args, kwargs)

    @functools.wraps(body)
    def unhooked(self: Any, *args: Any, **kwargs: Any) -> Any:
        return run(self, body, args, kwargs)

    step.hooked = True  # type: ignore[attr-defined]
    step.__wrapped__ = unhooked  # type: ignore[attr-defined]
    return step


#: How many callers up :func:`_called_by_checkpoint_state_init` looks: ten from a
#: meta-optimizer's step, which drives the outer TransformingOptimizer (the meta-optimizer's
#: step, torch's hook wrapper, ``_guarded_step``, ``_driven_step``, ``unhooked_step``, then the
#: outer's ``with_hooks`` frames and ``_step``), three more for each subclass whose ``step``
#: calls ``super().step()``, with room for a framework's wrappers.
_STATE_INIT_FRAMES = 24


def _called_by_checkpoint_state_init() -> bool:
    """Whether ``torch.distributed.checkpoint``'s ``_init_optim_state`` is calling ``step()``.

    It initialises a fresh optimizer's state by one step with every ``lr`` zero and zero gradients
    before it loads a checkpoint into it; a user's first step may look the same (a warm-up from
    lr 0 with zero gradients) and must run every transform. The function is private to torch and
    this is the one place that names it; where a torch build lacks it, the look of the step alone
    decides.
    """
    try:
        from torch.distributed.checkpoint.state_dict import _init_optim_state
    except ImportError:
        return True
    return called_from(_init_optim_state, _STATE_INIT_FRAMES)  # step(), torch's hook wrapper, the caller


#: How many callers up :func:`built_by_zero_redundancy` looks: ZeRO's ``_init_local_optimizer``
#: calls the constructor (``type.__call__`` adds no frame); room for subclasses' ``__init__``
#: calling ``super().__init__()`` and a factory or two.
_ZERO_INIT_FRAMES = 8


def built_by_zero_redundancy() -> bool:
    """Whether ``torch.distributed.optim.ZeroRedundancyOptimizer`` is building the caller's
    optimizer as its local one (``_init_local_optimizer``), which sees only this rank's shard of
    the parameters.

    ZeRO passes the local optimizer no marker, so its caller is what tells; the function is
    private to torch and this is the one place that names it (a torch build without it: not
    recognised). Not imported (importing ``torch.distributed.optim`` scripts its functional
    optimizers, slowly and with warnings): a ZeRO that is running has been imported. Ask from the
    optimizer's ``__init__``.
    """
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    zero = getattr(module, "ZeroRedundancyOptimizer", None)
    init_local = getattr(zero, "_init_local_optimizer", None)
    return init_local is not None and called_from(init_local, _ZERO_INIT_FRAMES)


def _a(name: str) -> str:
    """``name`` with its indefinite article."""
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _held_optimizer(optimizer: Optimizer) -> tuple[str, Optimizer] | None:
    """The first of ``optimizer``'s instance attributes (or an item of a list, tuple or dict
    attribute) that is another ``torch.optim.Optimizer``, with the attribute's name; ``None`` if
    there is none."""
    for attribute_name, value in vars(optimizer).items():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if isinstance(item, Optimizer) and item is not optimizer:
                return attribute_name, item
    return None


def step_required_arguments(optimizer: Optimizer) -> tuple[bool, list[str]]:
    """Whether the ``step`` of ``optimizer``'s class requires its first argument after ``self``
    (the closure), and the names of the other arguments it requires (positional or keyword-only,
    without a default): the wrapper calls the inner step with no argument but, at most, a
    closure. The class's, not the instance's: an LR scheduler replaces the instance's ``step``
    with a wrapper of its own. (An optimizer whose ``closure=None`` default only raises at the
    call, as some third-party ones do, is found out at its first step.)"""
    try:
        parameters = list(inspect.signature(type(optimizer).step).parameters.values())[1:]
    except (AttributeError, TypeError, ValueError):  # no signature to read: assume it works
        return False, []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        parameter for parameter in parameters
        if parameter.default is inspect.Parameter.empty
        and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    closure_required = bool(parameters) and parameters[0].kind in positional and parameters[0] in required
    return closure_required, [parameter.name for parameter in required if parameter is not parameters[0] or not closure_required]


def refuse_driven(optimizer: Optimizer, name: str) -> None:
    """Raise ``ValueError`` if ``optimizer`` is already driven by a wrapper, ``TypeError`` if its
    ``state`` or ``param_groups`` cannot be set (the wrapper's view, a load's groups) or if it
    holds another optimizer, whose state it keeps (timm's ``Lookahead``, torch's
    ``ZeroRedundancyOptimizer``).

    A wrapper takes the optimizer's state and param groups over; a second wrapper around the same
    optimizer would share them with the first (and take the first one's filled-in settings for
    its own). State kept in another optimizer is out of the wrapper's sight: its checkpoints
    would leave it out and its atomic steps could not roll it back. A samgria wrapper as the
    optimizer is accepted: the wrappers drive one another (``_wrapper_chain``). Called by
    constructors before they change anything.
    """
    state = getattr(optimizer, "state", None)
    if isinstance(state, _DrivenState):
        owner = state._owner
        if owner is None:
            # Its param groups still hold that wrapper's settings and its state the wrapper's
            # keys (hidden by the view): a new wrapper would take them for its own.
            raise ValueError(
                f"{name} was driven by a wrapping optimizer, deleted since, whose settings and state "
                f"it still holds: build a new {type(optimizer).__name__} to wrap again"
            )
        raise ValueError(
            f"{name} is already driven by a {type(owner).__name__}, which holds its state and "
            f"param groups: build a new {type(optimizer).__name__} to wrap again"
        )
    for attribute_name in ("state", "param_groups"):
        attribute = getattr(type(optimizer), attribute_name, None)
        if isinstance(attribute, property) and attribute.fset is None:
            # The wrapper owns the state and gives the driven optimizer a view of it, and a load
            # installs new param groups; an optimizer whose ``state`` or ``param_groups`` is a
            # read-only property (one that wraps another optimizer and answers with that one's,
            # as pytorch_optimizer's Magma and Lookahead) can take neither.
            raise TypeError(
                f"{name} must be an optimizer whose {attribute_name} can be set, got a "
                f"{type(optimizer).__name__}, whose {attribute_name} is a read-only property (an "
                "optimizer wrapping another one?): wrap the optimizer it wraps, or put it outside"
            )
    _, others_required = step_required_arguments(optimizer)
    if others_required:
        raise TypeError(
            f"{name} must be an optimizer whose step() takes no arguments but a closure, got "
            f"{type(optimizer).__name__}, whose step() requires "
            f"{', '.join(repr(argument) for argument in others_required)}, which the wrapper cannot pass: use it "
            "on its own"
        )
    held = None if isinstance(optimizer, WrappingOptimizer) else _held_optimizer(optimizer)
    if held is not None:
        attribute_name, other = held
        if any(cls.__name__ == "ZeroRedundancyOptimizer" for cls in type(optimizer).__mro__):
            advice = (
                "it holds this rank's shard of that state only, and the other ranks hold the rest: "
                "shard the parameters with FSDP2 (torch.distributed.fsdp.fully_shard) instead"
            )
        else:
            advice = "wrap the optimizer it holds instead"
        raise TypeError(
            f"{name} must be an optimizer that keeps its own state, got {_a(type(optimizer).__name__)}, "
            f"which holds another optimizer (its attribute {attribute_name!r}, {_a(type(other).__name__)}) "
            "and keeps its state there, where the wrapper's checkpoints and atomic steps cannot "
            f"see it: {advice}"
        )


#: The hook dictionaries of a torch optimizer, with the methods that register into them.
_HOOK_DICTIONARIES = (
    ("_optimizer_step_pre_hooks", "register_step_pre_hook"),
    ("_optimizer_step_post_hooks", "register_step_post_hook"),
    ("_optimizer_state_dict_pre_hooks", "register_state_dict_pre_hook"),
    ("_optimizer_state_dict_post_hooks", "register_state_dict_post_hook"),
    ("_optimizer_load_state_dict_pre_hooks", "register_load_state_dict_pre_hook"),
    ("_optimizer_load_state_dict_post_hooks", "register_load_state_dict_post_hook"),
)


def _step_patched_on_instance(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` was replaced on the instance (``optimizer.step =
    torch.compile(optimizer.step)``, a patch of the method) by something other than the class's
    own step, bound again, or an LR scheduler's record of the calls of it, which the wrapper keeps
    (:func:`_record_call_for_schedulers`; a scheduler's record of a patch's calls counts as the patch).
    A wrapper steps its driven optimizer with the class's ``step`` (:func:`unhooked_step`)."""
    value = optimizer.__dict__.get("step")
    if value is None:
        return False
    own = getattr(type(optimizer), "step", None)
    if getattr(value, "_wrapped_by_lr_sched", False):  # what it wraps: the class's, or a patch
        wrapped = scheduler_wrapped_step(value)
        return wrapped is not None and wrapped is not own
    # The class's own step bound to it again (accelerate puts back its saved optimizer.step so).
    return not (getattr(value, "__func__", None) is own and getattr(value, "__self__", None) is optimizer)


def warn_of_hooks_not_run(optimizer: Optimizer, name: str, wrapper: str) -> None:
    """Warn if ``optimizer``, about to be driven by a ``wrapper``, has hooks of its own, or its
    ``step`` replaced on the instance (a compiled ``step``), which the wrapper does not call either.

    The wrapper steps, packs and loads with its own hooks (the driven optimizer's step runs
    without torch's hook wrapper, so that the global step hooks fire once per step): hooks
    registered on the driven optimizer before it was wrapped would never run again, silently.
    Called by constructors before they change anything (the driven optimizer holds no hook of a
    wrapper's then: :func:`refuse_driven` refuses one that was driven).
    """
    if _step_patched_on_instance(optimizer):
        warnings.warn(
            f"{name} has its step replaced on the instance (optimizer.step = "
            f"torch.compile(optimizer.step), a patch of the method), which the {wrapper} does "
            "not call: it steps with the step of the class. Replace or compile the "
            f"{wrapper}'s step instead",
            UserWarning,
            stacklevel=stacklevel_outside(),
        )
    found = []
    for attribute, register in _HOOK_DICTIONARIES:
        hooks = _hooks_of(optimizer, attribute)
        count = len(hooks) if hooks is not None else 0
        if count:
            found.append(f"{count} {register}")
    if found:
        warnings.warn(
            f"{name} has hooks of its own ({', '.join(found)}), which the {wrapper} does not run: "
            "it steps, saves and loads with its own hooks (torch's global optimizer hooks fire once "
            f"per step); register them on the {wrapper} instead",
            UserWarning,
            stacklevel=stacklevel_outside(),
        )


_MISSING = object()


def is_torch_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` is an instance of one of ``torch.optim``'s own classes (their
    modules: ``torch.optim.adam``, ..., and ``torch.optim`` itself for Adafactor and Muon)."""
    module = type(optimizer).__module__
    return module == "torch.optim" or module.startswith("torch.optim.")


#: torch.optim's classes that check some inputs only inside their loop over tensors, after they
#: wrote the tensors before (Muon a gradient's dimensions and ``ns_steps``, Adafactor ``eps``).
_CHECKING_WHILE_WRITING = tuple(
    cls for cls in (getattr(torch.optim, "Adafactor", None), getattr(torch.optim, "Muon", None)) if cls is not None
)


def checks_before_writing(optimizer: Any) -> bool:
    """Whether ``optimizer`` is one of torch.optim's own, which check a param group's inputs
    before they write into its tensors (but step the groups one after another): all but
    Adafactor and Muon (:data:`_CHECKING_WHILE_WRITING`)."""
    return is_torch_optimizer(optimizer) and not isinstance(optimizer, _CHECKING_WHILE_WRITING)


def _unpickled(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` has its attributes (not a wrapper whose ``__setstate__`` is yet to run,
    in a cycle being unpickled)."""
    return not isinstance(optimizer, WrappingOptimizer) or optimizer._driven_attr in optimizer.__dict__


class _VisibleEntry(MutableMapping):
    """One parameter's state as the driven optimizer sees it: the reserved keys hidden."""

    __slots__ = ("_entry", "_hidden")

    def __init__(self, entry: dict[Any, Any], hidden: Any) -> None:
        self._entry = entry
        self._hidden = hidden

    def __getitem__(self, key: Any) -> Any:
        if self._hidden(key):
            raise KeyError(key)
        return self._entry[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._hidden(key):
            raise KeyError(f"state key {key!r} is reserved by the wrapping optimizer")
        self._entry[key] = value

    def __delitem__(self, key: Any) -> None:
        if self._hidden(key):
            raise KeyError(key)
        del self._entry[key]

    def __iter__(self) -> Iterator[Any]:
        return (key for key in list(self._entry) if not self._hidden(key))

    def __len__(self) -> int:
        return sum(1 for key in self._entry if not self._hidden(key))

    def __repr__(self) -> str:
        return repr(dict(self.items()))


class _SharedState:
    """A wrapper's ``state``, held by the wrapper and by the view its driven optimizer reads
    through (:class:`_DrivenState`), which holds the wrapper itself only weakly.

    So nothing the driven optimizer holds refers back to the wrapper: a wrapper is freed as soon
    as its last reference goes, as torch's optimizers are (the driven optimizer's view used to
    hold the wrapper, and every wrapper waited for Python's cyclic collector), and a driven
    optimizer that outlives its wrapper, or a copy of it, reads the same entries on. ``state`` is
    the ``defaultdict`` torch's methods pack and load (the wrapper's ``state`` property reads and
    sets it); ``hider`` tells the keys the wrapper reserves (``Chain.hides``; ``None``: none).
    Each wrapper has its own, made once: a shallow copy gets its own over the same dictionary, and
    drives a shallow copy of the driven optimizer, as ``copy.copy`` of a torch optimizer shares
    the dictionary and the param groups until a load rebinds the copy's own.
    """

    state: Any = None  # None while unpickling, until the pickled state arrives
    hider: Any = None
    _owner_ref: Any = None

    def __init__(self, state: Any, hider: Any, owner: WrappingOptimizer) -> None:
        self.state = state
        self.hider = hider
        self._owner_ref = weakref.ref(owner)

    def owner(self) -> WrappingOptimizer | None:
        """The wrapper this state is the ``state`` of, while it lives."""
        return None if self._owner_ref is None else self._owner_ref()

    def hides(self, key: Any) -> bool:
        """Whether ``state[p][key]`` is reserved by the wrapper (hidden from the driven optimizer)."""
        hider = self.hider
        return hider is not None and hider.hides(key)

    def __getstate__(self) -> dict[str, Any]:
        return {"state": self.state, "hider": self.hider, "owner": self.owner()}

    def __setstate__(self, pickled: dict[str, Any]) -> None:
        self.state = pickled["state"]
        self.hider = pickled["hider"]
        owner = pickled["owner"]
        self._owner_ref = None if owner is None else weakref.ref(owner)


_UNPICKLED = _SharedState.__new__(_SharedState)  # a view's state until unpickling fills it in: empty


class _ReadThrough(_SharedState):
    """The state of a view unpickled from a development version, whose view held the wrapper
    itself: read through the wrapper (which this holds) until the wrapper's next step or
    checkpoint gives its driven optimizer a view of its own (``_adopt_driven_state``)."""

    def __init__(self, owner: WrappingOptimizer) -> None:  # (state and hider are read through it)
        self._wrapper = owner

    @property  # type: ignore[override]
    def state(self) -> Any:
        source = self._wrapper.__dict__.get("_state_source")
        return None if source is None else source.state

    @property  # type: ignore[override]
    def hider(self) -> Any:
        source = self._wrapper.__dict__.get("_state_source")
        return None if source is None else source.hider

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ReadThrough, (self._wrapper,))


class _DrivenState(MutableMapping):
    """The driven optimizer's ``state``: a live view of the wrapper's (see the module docstring).

    It holds the wrapper's :class:`_SharedState` and the wrapper only weakly (``_owner``), so
    that the driven optimizer keeps no wrapper alive.
    """

    _source: _SharedState = _UNPICKLED  # until __init__ or unpickling sets it
    _owner_ref: Any = None
    _driven_ref: Any = None
    _hooked = False  # made by _show_state (not unpickled, nor a development version's _ReadThrough)

    def __init__(self, owner: WrappingOptimizer, driven: Optimizer) -> None:
        self._source = owner._state_source
        self._owner_ref = weakref.ref(owner)
        self._driven_ref = weakref.ref(driven)  # whose state this is: its state_dict() packs plain dicts

    @property
    def _owner(self) -> WrappingOptimizer | None:
        """The wrapper whose state this is, while it lives."""
        return None if self._owner_ref is None else self._owner_ref()

    def __getstate__(self) -> dict[str, Any]:
        driven = None if self._driven_ref is None else self._driven_ref()
        return {"source": self._source, "owner": self._owner, "driven": driven}

    def __setstate__(self, pickled: dict[str, Any]) -> None:
        if "source" not in pickled:  # pickled by a development version that held the wrapper itself
            pickled = {"source": _ReadThrough(pickled["_owner"]), "owner": pickled["_owner"]}
        self._source = pickled["source"]
        owner, driven = pickled["owner"], pickled.get("driven")
        self._owner_ref = None if owner is None else weakref.ref(owner)
        self._driven_ref = None if driven is None else weakref.ref(driven)

    def __getitem__(self, param: Any) -> Any:
        source = self._source
        state = source.state
        if state is None:  # while unpickling, before the wrapper's state is restored
            raise KeyError(param)
        entry = state[param]  # defaultdict: created on first access, as in torch
        if not is_entry(entry):  # a value of the driven optimizer's own (a global counter)
            return entry
        # The driven optimizer reads every parameter's entry on every step: an entry with only
        # keys already known to be visible is answered by one set comparison.
        hider = source.hider
        if entry and hider is not None and not hider.visible_keys.issuperset(entry) and hider.hides_any(entry):
            return _VisibleEntry(entry, hider.hides)
        return entry

    # ``MutableMapping``'s ``get``, ``pop``, ``popitem`` and ``setdefault`` rely on ``self[key]``
    # raising ``KeyError``; this view reads through a ``defaultdict`` (as torch's state does), so
    # they are written out, with ``defaultdict``'s answers.
    def get(self, param: Any, default: Any = None) -> Any:
        """``default`` for an absent entry, which it does not create."""
        return self[param] if param in self else default

    def pop(self, param: Any, default: Any = _MISSING) -> Any:
        """The entry, removed (as ``del``); ``default`` or ``KeyError`` for an absent one."""
        if param in self:
            value = self[param]
            del self[param]
            return value
        if default is _MISSING:
            raise KeyError(param)
        return default

    def popitem(self) -> tuple[Any, Any]:
        """The last entry, removed (as ``dict.popitem``)."""
        for param in reversed(list(self)):
            return param, self.pop(param)
        raise KeyError("popitem(): the state is empty")

    def clear(self) -> None:
        for param in list(self):
            del self[param]

    def setdefault(self, param: Any, default: Any = None) -> Any:
        """The entry; an absent one is set to ``default`` first."""
        if param not in self:
            self[param] = default
        return self[param]

    def copy(self) -> defaultdict[Any, Any]:
        """A shallow copy, as ``defaultdict.copy`` gives it."""
        return defaultdict(dict, self.items())

    def __setitem__(self, param: Any, value: Any) -> None:
        source = self._source
        old = source.state.get(param, {})
        hidden = source.hides
        kept = {key: item for key, item in old.items() if hidden(key)} if isinstance(old, dict) else {}
        if not is_entry(value) or (type(value) is not dict and not kept):
            # Any value under any key, kept as the object itself, as torch's state takes it
            # (MADGRAD keeps a tensor counter under "k"); a parameter's entry holding a wrapper's
            # keys stays a dict.
            if kept:
                raise TypeError(
                    f"the state entry of a parameter holds the wrapper's keys {sorted(kept)}: it "
                    f"must stay a dict, got {type(value).__name__}"
                )
            source.state[param] = value
            return
        if type(value) is dict and (source.hider is None or not source.hider.hides_any(value)):
            # The object itself, as torch keeps it: an optimizer that assigns a new dict and then
            # fills it (``state = {}; self.state[p] = state; state["step"] = 0``) writes into it.
            value.update(kept)
            source.state[param] = value
            return
        merged = kept
        merged.update(value)
        source.state[param] = merged

    def __delitem__(self, param: Any) -> None:
        if param not in self:
            raise KeyError(param)
        state = self._source.state
        entry = state[param]
        if is_entry(entry):
            kept = {key: value for key, value in entry.items() if self._source.hides(key)}
            if kept:
                # The entry object leaves with whoever holds it, as torch's ``del`` unlinks it;
                # the wrapper's keys stay in a new entry.
                state[param] = kept
                return
        del state[param]

    def _holds(self, entry: dict[Any, Any]) -> bool:
        """Whether the driven optimizer sees ``entry`` as present: it is empty (created by an
        access, as torch's ``defaultdict`` creates it) or holds a key that is not hidden."""
        if not is_entry(entry):
            return True
        hider = self._source.hider
        return not entry or hider is None or hider.visible_keys.issuperset(entry) or not all(map(hider.hides, entry))

    def __iter__(self) -> Iterator[Any]:
        state = self._source.state
        if state is None:  # see __contains__
            return iter(())
        return iter([param for param, entry in state.items() if self._holds(entry)])

    def items(self):  # type: ignore[override]
        """The live entries, as torch's ``state.items()`` gives them (what an optimizer writes into
        while it iterates lands in the state)."""
        # The driven optimizer's state_dict() reads this before its post-hooks run: make sure the
        # packing hook is there (an optimizer unpickled after its wrapper got fresh hook dicts).
        driven = None if self._driven_ref is None else self._driven_ref()
        if driven is not None:
            _hook_packing(driven)
        return [(param, self[param]) for param in self]

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, param: object) -> bool:
        state = self._source.state
        if state is None:
            # (while a copy is unpickled, the driven optimizer's own __setstate__ -- Adam's reads
            # its state -- may run before the state arrives: empty then)
            return False
        # ``in`` first: the owner's state may itself be a view (a wrapper driving a wrapper),
        # whose ``get`` would read through a defaultdict and create the entry.
        return param in state and self._holds(state[param])

    def __repr__(self) -> str:
        owner = self._owner
        return f"<state of {type(owner).__name__ if owner is not None else 'a deleted wrapper'}>"


def _plain_entries(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state-dict post-hook of the driven optimizer: its own ``state_dict()`` packs plain dicts
    (picklable and loadable like any torch checkpoint), not the live views of entries that hold
    a wrapper's hidden keys."""
    packed = state_dict["state"]
    for key, entry in packed.items():
        if isinstance(entry, _VisibleEntry):
            packed[key] = dict(entry.items())
    return state_dict


def _hooks_of(optimizer: Optimizer, attribute: str) -> Any:
    """``optimizer``'s hook dictionary ``attribute`` -- the real one also while a
    :class:`_RanAlready` stands in for it (during the optimizer's own ``state_dict`` or load) --
    or ``None`` before torch's ``__setstate__`` created it."""
    hooks = optimizer.__dict__.get(attribute)
    return hooks._hooks if isinstance(hooks, _RanAlready) else hooks


def _register_hook(optimizer: Optimizer, attribute: str, register: Callable[[], Any]) -> None:
    """Run ``register`` (one of torch's ``register_*_hook`` calls, which write into ``attribute``)
    with the real hook dictionary in place, also while a :class:`_RanAlready` stands in for it."""
    hooks = optimizer.__dict__.get(attribute)
    if not isinstance(hooks, _RanAlready):
        register()
        return
    optimizer.__dict__[attribute] = hooks._hooks
    try:
        register()
    finally:
        optimizer.__dict__[attribute] = hooks


def _hook_packing(driven: Optimizer) -> None:
    """Register :func:`_plain_entries` on ``driven`` unless it is there (or ``driven`` is not yet
    unpickled: its hook dictionaries come with torch's ``__setstate__``)."""
    hooks = _hooks_of(driven, "_optimizer_state_dict_post_hooks")
    if hooks is not None and _plain_entries not in hooks.values():
        _register_hook(
            driven,
            "_optimizer_state_dict_post_hooks",
            lambda: driven.register_state_dict_post_hook(_plain_entries, prepend=True),
        )


class _AdoptLoaded:
    """A load-state-dict post-hook of the driven optimizer: a state loaded into it directly
    (``optimizer.base_optimizer.load_state_dict(...)``) becomes its owner's at once, so that
    ``owner.state`` shows it and edits of it are kept. A weak reference: the owner holds the
    driven optimizer, not the other way round. A copy of the driven optimizer that shares its
    hooks (``_probe_own_load``'s) is not the owner's driven optimizer and is left alone."""

    __slots__ = ("owner",)

    def __init__(self, owner: WrappingOptimizer) -> None:
        self.owner = weakref.ref(owner)

    def __call__(self, optimizer: Optimizer) -> None:
        owner = self.owner()
        if owner is not None and owner.__dict__.get(owner._driven_attr) is optimizer:
            owner._adopt_driven_state()


class _NoteGroups:
    """A load-state-dict pre-hook of the driven optimizer: keeps what a direct load replaces --
    its state and param-group objects, which torch's load leaves as they were, and copies of the
    groups -- so that :meth:`WrappingOptimizer._adopt_driven_state` can put them back when it
    refuses the loaded groups, and complete those it takes. A weak reference, as
    :class:`_AdoptLoaded`'s."""

    __slots__ = ("owner",)

    def __init__(self, owner: WrappingOptimizer) -> None:
        self.owner = weakref.ref(owner)

    def __call__(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        owner = self.owner()
        if owner is not None and owner.__dict__.get(owner._driven_attr) is optimizer:
            groups = optimizer.param_groups
            owner.__dict__["_groups_before_load"] = (optimizer.state, groups, [dict(g) for g in groups])


#: The driven optimizer's hook dictionaries that :func:`_show_state` registers hooks in.
_HOOKS_SHOWN = (
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def _show_state(driven: Optimizer, owner: WrappingOptimizer) -> None:
    """Give ``driven`` the view of ``owner``'s state (and the hooks that pack it as plain dicts
    and take a state loaded into ``driven`` directly over)."""
    view = driven.state = _DrivenState(owner, driven)  # type: ignore[assignment]
    for attribute in _HOOKS_SHOWN:
        # Unpickling may reach the wrapper before the driven optimizer is filled in: its hook
        # dictionaries are made here then, and torch's __setstate__ keeps them (it makes those
        # that are missing), so that a load straight into it is taken over at once.
        if _hooks_of(driven, attribute) is None:
            driven.__dict__[attribute] = OrderedDict()
    _hook_packing(driven)
    view._hooked = True
    hooks = _hooks_of(driven, "_optimizer_load_state_dict_post_hooks")
    if hooks is not None and not any(isinstance(hook, _AdoptLoaded) and hook.owner() is owner for hook in hooks.values()):
        _register_hook(
            driven,
            "_optimizer_load_state_dict_post_hooks",
            lambda: driven.register_load_state_dict_post_hook(_AdoptLoaded(owner), prepend=True),
        )
    hooks = _hooks_of(driven, "_optimizer_load_state_dict_pre_hooks")
    if hooks is not None and not any(isinstance(hook, _NoteGroups) and hook.owner() is owner for hook in hooks.values()):
        _register_hook(
            driven,
            "_optimizer_load_state_dict_pre_hooks",
            lambda: driven.register_load_state_dict_pre_hook(_NoteGroups(owner)),
        )


#: The driven optimizer's hook dictionaries that its own ``state_dict`` / ``load_state_dict``
#: run, which :func:`_wrappers_hooks_only` filters: all but the step hooks.
_CHECKPOINT_HOOKS = tuple(attribute for attribute, _ in _HOOK_DICTIONARIES if "state_dict" in attribute)


def _is_wrappers_hook(hook: Any) -> bool:
    """Whether ``hook`` is one that a wrapper registered on its driven optimizer
    (:func:`_show_state`'s), not one of the user's."""
    return hook is _plain_entries or isinstance(hook, (_AdoptLoaded, _NoteGroups))


def _wrappers_hooks(optimizer: Optimizer) -> dict[str, OrderedDict[Any, Any]]:
    """New hook dictionaries for :data:`_CHECKPOINT_HOOKS` of ``optimizer`` holding only the
    wrappers' hooks (those it lacks are left out)."""
    found = {}
    for attribute in _CHECKPOINT_HOOKS:
        hooks = _hooks_of(optimizer, attribute)
        if hooks is not None:
            found[attribute] = OrderedDict((key, hook) for key, hook in hooks.items() if _is_wrappers_hook(hook))
    return found


@contextlib.contextmanager
def _wrappers_hooks_only(optimizer: Optimizer) -> Iterator[None]:
    """Within the block, ``optimizer``'s checkpoint hook dictionaries hold only the wrappers'
    hooks: a wrapper that runs its driven optimizer's own ``state_dict`` runs none of the hooks
    registered on that optimizer (the user registers them on the wrapper, as for step hooks)."""
    filtered = _wrappers_hooks(optimizer)
    saved = {attribute: optimizer.__dict__[attribute] for attribute in filtered}
    optimizer.__dict__.update(filtered)
    try:
        yield
    finally:
        optimizer.__dict__.update(saved)


def _shallow_copy_of_driven(driven: Optimizer) -> Optimizer:
    """What ``copy.copy`` of a wrapper drives: a shallow copy of ``driven`` with the same
    attributes (the same param-group list, as torch's ``copy.copy`` keeps it), hooks of its own
    (none, as torch's copy has) and none of what another object patched onto the instance (an LR
    scheduler's wrapper of ``step``). A driven wrapper is copied by ``copy.copy`` (the same, one
    level down). The copy gets its wrapper's view of the state (:func:`_show_state`)."""
    if isinstance(driven, WrappingOptimizer):
        return copy.copy(driven)
    copied = object.__new__(type(driven))
    copied.__dict__.update(
        (key, value)
        for key, value in driven.__dict__.items()
        if not key.startswith("_optimizer_") and not _patched_by_someone_else(driven, key, value)
    )
    Optimizer.__setstate__(copied, {})  # torch's empty hook dictionaries and step patch
    return copied


def _patched_by_someone_else(optimizer: Optimizer, key: str, value: Any) -> bool:
    """Whether ``optimizer.<key>`` is what another object set on the instance and torch's own
    pickling does not carry: a method patched on the instance (every LR scheduler wraps
    ``optimizer.step`` so; a copy would call the original's) or the scheduler's call flag."""
    if key == "_opt_called":
        return True
    return hasattr(type(optimizer), key) and isinstance(value, (types.FunctionType, types.MethodType, functools.partial))


class _EarlierRelease:
    """Put before the class of an object unpickled from an earlier release whose layout differs
    (see ``WrappingOptimizer._needed_from_pickle``): every attribute but the special methods
    raises the remedy, so that no method half-works on the old attributes. Pickled again, it is
    the original class with the same old attributes."""

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            return object.__getattribute__(self, name)
        original = type(self).__mro__[2]
        missing = object.__getattribute__(self, "__dict__")["_pickled_by_earlier_release"]
        raise RuntimeError(
            f"this {original.__name__} was pickled by an earlier samgria release (0.1.0), whose layout "
            f"differs (it has no {', '.join(missing)}), and cannot be used: load the file with that "
            "release and save optimizer.state_dict(), which this release loads into an optimizer built "
            "anew (the rest of the file, e.g. the model, unpickles as usual)"
        )

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        original = type(self).__mro__[2]
        state = dict(object.__getattribute__(self, "__dict__"))
        return (_unpickle_earlier_release, (original, state))

    def __copy__(self) -> Any:
        maker, arguments = object.__getattribute__(self, "__reduce_ex__")(2)
        return maker(*arguments)


_EARLIER_RELEASE_CLASSES: dict[type, type] = {}


def _earlier_release_class(cls: type) -> type:
    """``cls`` with :class:`_EarlierRelease` before it (one class per ``cls``)."""
    if cls not in _EARLIER_RELEASE_CLASSES:
        _EARLIER_RELEASE_CLASSES[cls] = type(cls.__name__, (_EarlierRelease, cls), {"__module__": cls.__module__})
    return _EARLIER_RELEASE_CLASSES[cls]


def _unpickle_earlier_release(cls: type[WrappingOptimizer], state: dict[str, Any]) -> Any:
    """Unpickle what an :class:`_EarlierRelease` object pickled: its class's ``__setstate__``
    marks it again."""
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


class _RanAlready:
    """Stands in for one of an optimizer's hook dictionaries (``attribute``) while torch's
    ``state_dict``/``load_state_dict`` would run those hooks at a point where the wrapper runs
    them itself: reading its ``values()`` (torch's loop) puts the real dictionary back and yields
    nothing."""

    def __init__(self, optimizer: Optimizer, attribute: str) -> None:
        self._optimizer = optimizer
        self._attribute = attribute
        self._hooks = optimizer.__dict__[attribute]
        setattr(optimizer, attribute, self)

    def values(self) -> tuple[()]:
        self.restore()
        return ()

    def restore(self) -> OrderedDict[Any, Any]:
        """Put the real dictionary back (if it is still away) and return it."""
        if self._optimizer.__dict__.get(self._attribute) is self:
            setattr(self._optimizer, self._attribute, self._hooks)
        return self._hooks


def _same_value(first: Any, second: Any) -> bool:
    """Whether two hyperparameter values are the same object or equal (tensors: equal shape,
    dtype and elements)."""
    if first is second:
        return True
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return (
            isinstance(first, torch.Tensor)
            and isinstance(second, torch.Tensor)
            and first.shape == second.shape
            and first.dtype == second.dtype
            and torch.equal(first.detach().cpu(), second.detach().cpu())
        )
    try:
        return type(first) is type(second) and bool(first == second)
    except Exception:  # a value whose comparison fails counts as changed
        return False


class WrappingOptimizer(Optimizer):
    """Base of optimizers whose ``param_groups`` are another optimizer's (see the module docstring).

    Subclasses call :meth:`_init_wrapper` from ``__init__`` and may override
    :meth:`_state_hider`, :meth:`_prepare_loaded` and :meth:`_check_idle`.
    """

    #: Attribute that holds the driven optimizer.
    _driven_attr = "inner"
    #: Attributes holding user callables that, like hooks, are not pickled.
    _dropped_on_pickle: tuple[str, ...] = ()
    #: Attributes never pickled (transient step state).
    _transient: tuple[str, ...] = ("_loading", "_own_load_checkpoint", "_hooks_running", "_groups_before_load")
    #: Attributes a pickle must hold: an object unpickled from an earlier release without them
    #: (whose layout differs) refuses every use with the remedy (:class:`_EarlierRelease`), not
    #: with an AttributeError at the first step -- and does not fail the unpickling, so that the
    #: rest of the file (the model) can still be read.
    _needed_from_pickle: tuple[str, ...] = ()
    #: What ``state`` reads and sets, shared with the driven optimizer's view (set in the
    #: instance by the ``state`` setter or by unpickling; annotated only).
    _state_source: _SharedState
    #: A checkpoint was loaded (into this optimizer or straight into the driven one) and no step
    #: has run since: its tensors may not fit the parameters (a checkpoint of another model with
    #: as many parameters), which torch's optimizers find out only while they write.
    _loaded_state_unstepped = False

    def _init_wrapper(self, driven: Optimizer, defaults: dict[str, Any]) -> None:
        """Set up what ``torch.optim.Optimizer.__init__`` sets up, around ``driven``'s groups.

        ``Optimizer.__init__`` builds new param groups from ``params``; a wrapper's groups are the
        driven optimizer's, so it is not called. torch's own ``__setstate__`` creates the hook
        dictionaries and patches ``step`` with the profiling/hook wrapper instead.
        """
        setattr(self, self._driven_attr, driven)
        self._loading = False
        Optimizer.__setstate__(self, {"defaults": defaults})
        self.state = defaultdict(dict)
        self._defaults_as_built = dict(defaults)  # what _with_edited_defaults compares against
        self._warned_capturable_if_run_uncaptured = True
        for param, entry in driven.state.items():  # an already built optimizer may hold state
            self.state[param] = entry
        _show_state(driven, self)

    def _patch_step_function(self) -> None:
        # torch's Optimizer.__init__/__setstate__ call this private method to wrap the class's
        # ``step`` in its hook wrapper once; a ``step`` not wrapped yet (the class's own, a
        # mixin's, one assigned later) gets :func:`with_hooks` instead, which torch's then leaves
        # alone. The one place samgria overrides it.
        cls = type(self)
        if not getattr(cls.step, "hooked", False):
            cls.step = with_hooks(cls.step)  # type: ignore[method-assign]
        super()._patch_step_function()

    def _with_edited_defaults(
        self, param_group: dict[str, Any], stored_key: Callable[[Any], Any] = lambda key: key
    ) -> dict[str, Any]:
        """``param_group`` with the entries of :attr:`defaults` changed (or added) since the
        optimizer was built, for keys it does not set.

        torch's ``add_param_group`` fills a new group from ``optimizer.defaults``; a wrapper's new
        group is filled by the driven optimizer and the transforms from their own values, so an
        edit of the wrapper's ``defaults`` is applied here (an entry counts as edited when its
        value differs from the one at construction: pickling keeps values, not objects).
        ``stored_key`` gives the spelling the groups store a key under: a key the group sets
        under another spelling (``"sam.rho"`` for ``"rho"``) is set.
        """
        built = self.__dict__.get("_defaults_as_built")
        if built is None:  # pickled by a release that did not record them
            return param_group
        given = {stored_key(key) for key in param_group}
        edited: dict[Any, Any] = {}
        for key, value in self.defaults.items():
            if key in built and _same_value(built[key], value):
                continue
            stored = stored_key(key)  # the group may name it under another spelling ("sam.rho")
            if stored in given or (stored in edited and key != stored):  # the stored spelling wins
                continue
            edited[stored] = value
        return {**edited, **param_group} if edited else param_group

    def _before_step_hooks(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Runs before the step hooks of a call of ``step`` (default: nothing)."""

    def _after_failed_step(self) -> None:
        """Runs when a call of ``step`` raises, also in a hook (default: nothing)."""

    @property
    def _driven(self) -> Optimizer:
        return getattr(self, self._driven_attr)

    # -- param groups are the driven optimizer's ------------------------------------------------
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The driven optimizer's param groups (the same list object)."""
        return self._driven.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._driven.param_groups = value

    # -- the state: one dictionary, shared with the driven optimizer's view ----------------------
    @property  # type: ignore[override]
    def state(self) -> defaultdict[Any, Any]:  # type: ignore[override]
        """The state, as torch's: ``state[p]`` for each parameter (see the module docstring)."""
        source = self.__dict__.get("_state_source")
        if source is None:
            raise AttributeError(f"{type(self).__name__} has no state yet (being built or unpickled)")
        return source.state

    @state.setter
    def state(self, value: Any) -> None:
        source = self.__dict__.get("_state_source")
        if source is None:
            self.__dict__["_state_source"] = _SharedState(value, self._state_hider(), self)
        else:
            source.state = value  # the driven optimizer's view reads it at once

    def _state_hider(self) -> Any:
        """What tells the ``state[p]`` keys this wrapper reserves (hidden from the driven
        optimizer): an object with ``hides(key)``, ``hides_any(keys)`` and ``visible_keys``, a live
        set of keys it answered ``False`` for (``Chain``); ``None`` (default): none."""
        return None

    # -- what subclasses refine -------------------------------------------------------------------
    def _hides_state_key(self, key: Any) -> bool:
        """Whether ``state[p][key]`` is reserved by the wrapper (hidden from the driven optimizer)."""
        return self._state_source.hides(key)

    def _groups_undo(self, spare_buffers: Mapping[int, torch.Tensor] | None = None) -> StepSnapshot | StateStructure:
        """What undoes a step of torch's own driven optimizer that refuses a param group: such an
        optimizer checks a group's inputs before it writes into its tensors, but steps the groups
        one after another, so the weights and state of every group before the last one with a
        gradient are copied (a :class:`StepSnapshot`); the state's references in any case (a
        :class:`StateStructure`: entries created before a refusal are removed).
        ``spare_buffers`` as :class:`StepSnapshot` takes them."""
        groups = self.param_groups
        if len(groups) > 1:
            stepped = [i for i, group in enumerate(groups) if any(p.grad is not None for p in group["params"])]
            if len(stepped) > 1:
                earlier = [param for param in unique_params(groups[: stepped[-1]]) if param.grad is not None]
                return StepSnapshot(earlier, self.state, spare_buffers, only_params_state=True)
        return StateStructure(self.state)

    def _unique_params(self) -> list[torch.Tensor]:
        """Every parameter of every group once, in group order."""
        return unique_params(self.param_groups)

    def _grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every parameter's gradient once, dense and real (complex as pairs of reals), and the
        gradients they were made from."""
        sources = [grad for grad in [param.grad for param in self._unique_params()] if grad is not None]
        kinds = {(grad.layout, grad.dtype) for grad in sources}
        if all(layout == torch.strided and not dtype.is_complex for layout, dtype in kinds):
            return sources, sources  # the common case: dense and real
        return [values_as_real(grad) if grad.is_sparse or grad.is_complex() else grad for grad in sources], sources

    # A driven optimizer that is itself a wrapper (a MetaOptimizer driving a TransformingOptimizer)
    # shares this wrapper's state and groups: its checkpoint hooks run as part of this wrapper's.
    def _driven_wrapper(self) -> WrappingOptimizer | None:
        driven = self.__dict__.get(self._driven_attr)
        return driven if isinstance(driven, WrappingOptimizer) else None

    def _check_idle(self, action: str) -> None:
        """Raise if ``action`` may not run now (e.g. between ``first_step`` and ``second_step``)."""
        driven = self._driven_wrapper()
        if driven is not None:
            driven._check_idle(action)

    def _before_pack(self) -> None:
        """Bring ``state`` and ``param_groups`` up to date before ``state_dict()`` packs them."""
        self._adopt_driven_state()
        driven = self._driven_wrapper()
        if driven is not None:
            driven._before_pack()

    def _prepare_loaded(
        self, state: defaultdict[Any, dict[Any, Any]], groups: list[dict[str, Any]]
    ) -> tuple[defaultdict[Any, dict[Any, Any]], list[dict[str, Any]]]:
        """Validate what ``load_state_dict`` is about to install; raise to leave everything as is."""
        driven = self._driven_wrapper()
        return (state, groups) if driven is None else driven._prepare_loaded(state, groups)

    def _after_load(self) -> None:
        """Runs once ``load_state_dict`` has installed the new state and groups."""
        self._loaded_state_unstepped = True
        driven = self._driven_wrapper()
        if driven is not None:
            driven._after_load()

    # -- a schedule-free driven optimizer's modes --------------------------------------------------
    def _driven_mode(self, name: str) -> Callable[[], Any]:
        """The driven optimizer's ``name`` method; ``eval()`` is refused between ``first_step`` and
        ``second_step`` (it would average perturbed weights). ``train()`` is not: the Hugging Face
        Trainer calls it at every training step, so also between the two passes."""
        method = getattr(self._driven, name)  # AttributeError when it has none: hasattr says so

        def switch() -> Any:
            if name == "eval":
                self._check_idle("eval()")
            return method()

        return switch

    @property
    def train(self) -> Callable[[], Any]:
        """The driven optimizer's ``train()``, where it has one: schedule-free optimizers switch
        the weights to the training sequence with it. The Hugging Face Trainer, accelerate and
        Lightning users find it as on the bare optimizer; ``hasattr(optimizer, "train")`` is
        ``False`` when the driven optimizer has none."""
        return self._driven_mode("train")

    @property
    def eval(self) -> Callable[[], Any]:
        """The driven optimizer's ``eval()``, where it has one (schedule-free optimizers switch
        the weights to the averaged sequence for evaluation); see :attr:`train`. Refused
        (``RuntimeError``) between ``first_step()`` and ``second_step()``."""
        return self._driven_mode("eval")

    # -- stepping the driven optimizer -------------------------------------------------------------
    def _is_state_init_step(self) -> bool:
        """Every ``lr`` zero, every gradient zero, no state yet, and called by
        ``torch.distributed.checkpoint``'s initialisation of a fresh optimizer before it loads
        into it (``_init_optim_state``): only create state; no weight may move.
        """
        if any(not isinstance(entry, dict) or entry for entry in self.state.values()):
            return False
        if any(group.get("lr", 0.0) != 0.0 for group in self.param_groups):
            return False
        # (a sparse gradient's stored values: torch has no != for sparse tensors)
        grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in self._unique_params() if p.grad is not None]
        if not grads or any(bool(torch.any(grad != 0)) for grad in grads):
            return False
        return _called_by_checkpoint_state_init()

    def _driven_step(self, closure: Any = None) -> Any:
        """Call the driven optimizer's ``step`` without torch's hook wrapper around it
        (:func:`unhooked_step`): the global step hooks fire once per step, for the wrapper."""
        self._adopt_driven_state()
        return unhooked_step(self._driven, closure)

    def _adopt_driven_state(self) -> bool:
        """Take over a state the driven optimizer was given directly (its own ``load_state_dict``).

        The wrapper's entries keep their reserved keys and get the driven optimizer's keys from
        the new state (reserved keys in it -- a wrapper's checkpoint given to the driven
        optimizer -- are not taken: the transforms' slots stay as they were, unchecked state
        never enters them); then the driven optimizer sees the wrapper's state again, and its
        new param groups are completed (:meth:`_took_driven_groups`). Returns whether there was
        such a state.
        """
        driven = self._driven
        before = self.__dict__.pop("_groups_before_load", None)
        loaded = driven.state
        if isinstance(loaded, _DrivenState):
            if not loaded._hooked:
                # Unpickled (the driven optimizer's own __setstate__ may have replaced the hook
                # dictionaries made for it), or a development version's: shown again.
                _show_state(driven, self)
            return False
        owners = self._owners_outwards()
        if before is not None:  # a direct load through torch's hooks: refused as load_state_dict would
            state_before, groups_before, previous = before
            try:
                for owner in owners:
                    owner._check_loaded_groups(driven.param_groups, previous)
            except BaseException:
                driven.state, driven.param_groups = state_before, groups_before  # what the load replaced
                raise
        hidden = self._hides_state_key
        # A new dictionary and new entries, bound to the outermost wrapper (whose state this
        # wrapper's is a view of, if any), as torch's load binds a new state: the old ones may be
        # a shallow copy's too (copy.copy shares them), which must keep them as they were.
        state: defaultdict[Any, Any] = defaultdict(dict)
        for param, entry in self.state.items():
            # (the driven optimizer's own entries and values are what the load gave it)
            kept = {key: value for key, value in entry.items() if hidden(key)} if is_entry(entry) else None
            if kept:
                state[param] = kept
        for param, entry in loaded.items():
            if is_entry(entry):
                state[param].update({key: value for key, value in entry.items() if not hidden(key)})
            else:
                state[param] = entry
        owners[-1].state = state
        _show_state(driven, self)
        if before is not None:
            for owner in owners:
                owner._took_driven_groups(before[2])
        for owner in owners:  # as a load of each (its tensors may not fit the parameters)
            owner._loaded_state_unstepped = True
        return True

    def _owners_outwards(self) -> list[WrappingOptimizer]:
        """This wrapper and the wrappers that drive it, innermost first (a meta-optimizer whose
        outer optimizer is a ``TransformingOptimizer``): they share the param groups."""
        owners: list[WrappingOptimizer] = [self]
        while (
            isinstance(view := owners[-1].state, _DrivenState)
            and (owner := view._owner) is not None
            and owner.__dict__.get(owner._driven_attr) is owners[-1]  # (a copy.copy of the driven wrapper is not)
        ):
            owners.append(owner)
        return owners

    def _check_loaded_groups(self, groups: list[dict[str, Any]], previous: list[dict[str, Any]]) -> None:
        """Raise if param groups that a direct load of the driven optimizer installed could not
        be completed into this optimizer's from ``previous`` (:meth:`_took_driven_groups`, run on
        copies); changes nothing. The optimizer is then put back as it was."""
        for index, group in enumerate(groups):
            self._complete_loaded_group(dict(group), index, previous)

    def _took_driven_groups(self, previous: list[dict[str, Any]]) -> None:
        """Complete the param groups a direct load of the driven optimizer installed, from its
        groups before the load (``previous``, paired by position, as torch pairs them), as
        :meth:`load_state_dict` completes a checkpoint's (:meth:`_complete_loaded_group`)."""
        for index, group in enumerate(self.param_groups):
            self._complete_loaded_group(group, index, previous)

    def _complete_loaded_group(self, group: dict[str, Any], index: int, previous: Sequence[Mapping[str, Any]]) -> None:
        """Check a checkpoint's group ``index`` and complete it in place from ``previous[index]``
        (the group at its position before the load). Default: nothing."""

    # -- checkpoints: torch's own, with a validation point before anything changes ---------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch's :meth:`~torch.optim.Optimizer.state_dict` of this optimizer (hooks run), with
        what a driven optimizer's own ``state_dict`` adds beside ``state`` and ``param_groups``
        and what a subclass keeps beside them (:meth:`_pack_extras`) -- added before the post-hooks
        run, so that they see the whole checkpoint, as torch's see theirs."""
        proxied = self._proxied()
        if proxied is not None:
            return proxied.state_dict()
        self._check_idle("state_dict()")
        self._before_pack()
        # torch's state_dict runs the post-hooks right after packing; the extras must be in the
        # dictionary first. So the hooks run here, the pre-hooks too (one of them may register a
        # post-hook), and torch's loops over them are given nothing while it packs (each
        # stand-in puts the real dictionary back as the loop reads it).
        for pre_hook in list(self._optimizer_state_dict_pre_hooks.values()):
            pre_hook(self)
        pre_hooks = _RanAlready(self, "_optimizer_state_dict_pre_hooks")
        post_hooks = _RanAlready(self, "_optimizer_state_dict_post_hooks")
        try:
            packed = super().state_dict()
        finally:
            pre_hooks.restore()
            hooks = post_hooks.restore()
        driven = self._own_driven()
        if driven is not None and type(driven).state_dict is not Optimizer.state_dict:
            with _wrappers_hooks_only(driven):  # its hooks do not run, as its step hooks do not
                own = driven.state_dict()
            for key, value in own.items():
                if key not in ("state", "param_groups"):
                    packed.setdefault(key, value)
        packed.update(self._pack_extras())
        for hook in list(hooks.values()):
            result = hook(self, packed)
            if result is not None:
                packed = result
        return packed

    def _proxied(self) -> WrappingOptimizer | None:
        """The optimizer that ``self`` stands in for, if ``self`` is a forwarding proxy of it:
        Lightning's ``LightningOptimizer`` is an instance of a subclass made on the fly, whose own
        ``__dict__`` holds none of the optimizer's attributes (its ``__getattr__`` reads them on
        the optimizer). Checkpoints go through the optimizer itself, whose hook dictionaries
        they swap for a while; ``None`` for the optimizer itself and its copies."""
        return None if "_state_source" in self.__dict__ else self._state_source.owner()

    def _pack_extras(self) -> dict[str, Any]:
        """What a subclass keeps in its checkpoints beside torch's ``state`` and ``param_groups``
        (default: nothing); :meth:`_take_extras` takes it back."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """torch's :meth:`~torch.optim.Optimizer.load_state_dict`, validated before it commits.

        Everything is checked before anything changes: a load that raises leaves the optimizer
        exactly as it was -- except through a load post-hook, which runs once the load is
        applied (as torch runs it): the load stays when one raises.
        """
        proxied = self._proxied()
        if proxied is not None:
            proxied.load_state_dict(state_dict)
            return
        self._check_idle("load_state_dict()")
        outer = self._loading  # a load_state_dict pre-hook may load too
        self._loading = True
        # The user's pre-hooks run here, as torch runs them (over a copy of the hooks, so one that
        # removes itself is fine), then _before_cast, which must see the checkpoint as they left
        # it and before torch's load casts it to the parameters' dtypes. torch's load_state_dict
        # runs its pre-hooks before the cast and offers no other point in between, so its loop
        # over them is given nothing: the stand-in (_RanAlready, with state_dict() the only use
        # of torch's private hook dictionaries) puts the real dictionary back as that loop reads
        # it, so post-hooks, and loads or hook registrations from them, see the real one. The
        # post-hooks likewise run here, once the extras (_load_extras) are in place too.
        hooks = self._optimizer_load_state_dict_pre_hooks
        try:
            state_dict = state_dict.copy()  # as torch hands its pre-hooks a shallow copy
            for hook in list(hooks.values()):
                result = hook(self, state_dict)
                if result is not None:
                    state_dict = result
            state_dict, extras = self._take_extras(state_dict)
            state_dict = self._before_cast(state_dict)
            pre_hooks = _RanAlready(self, "_optimizer_load_state_dict_pre_hooks")
            post_hooks = _RanAlready(self, "_optimizer_load_state_dict_post_hooks")
            self._own_load_checkpoint: dict[str, Any] | None = state_dict  # for the driven optimizer's own load (__setstate__)
            try:
                super().load_state_dict(state_dict)
            finally:
                self._own_load_checkpoint = None
                pre_hooks.restore()
                post = post_hooks.restore()
            self._load_extras(extras)
            for hook in list(post.values()):
                hook(self)
        finally:
            self._loading = outer

    # -- a driven optimizer's own state_dict / load_state_dict -----------------------------------
    # The wrapper packs and loads the whole state with torch's methods. A driven optimizer whose
    # class overrides them (pytorch_optimizer's restore the dtypes torch's cast changed and keep a
    # warm-up schedule or a step count beside the state) gets its own run too (without the hooks
    # registered on it, which do not run, as its step hooks do not): what its
    # state_dict() adds beside "state" and "param_groups" comes along, and its load_state_dict()
    # runs on the checkpoint without the wrapper's keys, first on a shallow copy of it (so that a
    # refusal fails the load before anything changes), then its state and attributes are taken.
    def _own_driven(self) -> Optimizer | None:
        """The innermost driven optimizer when its class overrides torch's ``state_dict`` or
        ``load_state_dict``, else ``None``."""
        driven = self._innermost_driven()
        if driven is None:
            return None
        kind = type(driven)
        if kind.state_dict is Optimizer.state_dict and kind.load_state_dict is Optimizer.load_state_dict:
            return None
        return driven

    def _own_checkpoint(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` as the driven optimizer would have packed it: the keys hidden from it
        (a transform's slot, through every wrapper in between) left out."""
        return {**state_dict, "state": self._visible_to_driven(state_dict["state"])}

    def _visible_to_driven(self, entries: Mapping[Any, Any]) -> dict[Any, Any]:
        """``entries`` (a state, by parameter or by index) as the innermost driven optimizer sees
        them: the keys hidden from it (a transform's slot, through every wrapper in between) left
        out, and the entries that held only such keys; values that are no entries as they are."""
        hides = [wrapper._hides_state_key for wrapper in self._wrapper_chain()]
        visible_entries = {}
        for key_of_entry, entry in entries.items():
            if is_entry(entry):
                visible = {key: value for key, value in entry.items() if not any(hide(key) for hide in hides)}
                if visible or not entry:
                    visible_entries[key_of_entry] = visible
            else:
                visible_entries[key_of_entry] = entry
        return visible_entries

    def _driven_setstate(self) -> None:
        """Run the innermost driven optimizer's class ``__setstate__`` over the state and groups
        just loaded, as torch's ``load_state_dict`` ends with ``self.__setstate__``: torch's
        optimizers fill in there what a checkpoint of an older torch lacks (Adam's ``amsgrad``,
        ``foreach``, ...) and turn a number ``step`` into a tensor."""
        driven = self._innermost_driven()
        if driven is None or type(driven).__setstate__ is Optimizer.__setstate__:
            return
        type(driven).__setstate__(driven, {"state": driven.state, "param_groups": driven.param_groups})

    def _check_driven_group_kinds(self) -> None:
        """Refuse, before a step changes anything, a param-group value of torch's own driven
        optimizer that is not of its default's kind (``group["eps"] = "1e-8"``): torch would
        raise only while it writes, after the groups and tensors before it stepped."""
        driven = self._innermost_driven()
        if driven is None or not is_torch_optimizer(driven):
            return
        checked = [(key, default) for key, default in driven.defaults.items() if key != "params"]
        for index, group in enumerate(self.param_groups):
            for key, default in checked:
                if key in group:
                    check_like_default(f"param_groups[{index}]: {key}", group[key], default)

    def _probe_driven_setstate(self, loaded_state: Mapping[Any, Any], groups: list[dict[str, Any]]) -> None:
        """Run :meth:`_driven_setstate`'s ``__setstate__`` first on a copy of the driven
        optimizer over copies of the entries it is about to see (the keys hidden from it left
        out) and of ``groups``, so that a refusal fails the load before anything changes
        (torch's Adam reads ``"step"`` of every entry there: a checkpoint whose entry lacks it
        was committed, and every later step raised)."""
        driven = self._innermost_driven()
        if driven is None or type(driven).__setstate__ is Optimizer.__setstate__:
            return
        entries = defaultdict(dict, self._visible_to_driven(loaded_state))
        probe = object.__new__(type(driven))
        probe.__dict__.update(driven.__dict__)
        # Torch's __setstate__ makes number steps tensors in the entries it is given: the copies'.
        type(driven).__setstate__(probe, {"state": entries, "param_groups": [dict(group) for group in groups]})

    def _innermost_driven(self) -> Optimizer | None:
        """The optimizer the last wrapper of :meth:`_wrapper_chain` drives (``None`` while it is
        being unpickled)."""
        last = self._wrapper_chain()[-1]
        return last.__dict__.get(last._driven_attr)

    def _wrapper_chain(self) -> list[WrappingOptimizer]:
        """This wrapper and every wrapper it drives, outermost first."""
        chain: list[WrappingOptimizer] = [self]
        while (driven := chain[-1]._driven_wrapper()) is not None:
            chain.append(driven)
        return chain

    def _probe_own_load(self, groups: list[dict[str, Any]]) -> Any:
        """Run the driven optimizer's own ``load_state_dict`` on a copy of it; return the copy
        (``None`` when its class has no such method of its own).

        The copy has its own state (the visible entries, copied) and param groups (``groups``, as
        this wrapper is about to install them, with the checkpoint's indices), so a load that
        changes them and then raises changes nothing of the driven optimizer's; its other
        attributes are the driven optimizer's own objects (what such a load changes inside them
        before it raises stays changed, as it would without the wrapper).
        """
        checkpoint = self.__dict__.get("_own_load_checkpoint")
        driven = self._own_driven()
        if checkpoint is None or driven is None or type(driven).load_state_dict is Optimizer.load_state_dict:
            return None
        own = self._own_checkpoint(checkpoint)
        saved_groups = own["param_groups"]
        own["param_groups"] = [
            {**group, "params": saved["params"]} for group, saved in zip(groups, saved_groups)
        ] if len(groups) == len(saved_groups) else saved_groups
        probe = object.__new__(type(driven))
        probe.__dict__.update(driven.__dict__)
        probe.__dict__["state"] = defaultdict(dict, {key: dict(entry) if is_entry(entry) else entry for key, entry in driven.state.items()})
        probe.__dict__["param_groups"] = [dict(group) for group in driven.param_groups]
        # The hooks registered on the driven optimizer do not run (as its step hooks do not);
        # the wrappers' own, which the copy shared, leave a copy alone.
        probe.__dict__.update(_wrappers_hooks(driven))
        probe.load_state_dict(own)
        return probe

    def _take_own_load(self, probe: Any) -> None:
        """Give the driven optimizer what its own load made of the copy: its state (taken over by
        the wrapper that drives it), the attributes it set, and what it changed in the param
        groups (their values; the parameters are the wrapper's)."""
        driven = cast(Optimizer, self._own_driven())  # not None: it made the probe
        original = dict(driven.__dict__)
        for key, value in probe.__dict__.items():
            if key in _CHECKPOINT_HOOKS:  # the copy's (see _probe_own_load)
                continue
            if key not in ("state", "param_groups") and original.get(key, _MISSING) is not value:
                driven.__dict__[key] = value
        for group, loaded in zip(driven.param_groups, probe.__dict__["param_groups"]):
            params = group["params"]
            group.clear()
            group.update(loaded)
            group["params"] = params
        driven.__dict__["state"] = probe.__dict__["state"]
        self._wrapper_chain()[-1]._adopt_driven_state()

    def _take_extras(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Split off (and check, raising before anything changes) what a subclass keeps in its
        checkpoints beside torch's ``state`` and ``param_groups``, once the user's pre-hooks have
        run (default: nothing)."""
        return state_dict, None

    def _load_extras(self, extras: Any) -> None:
        """Install what :meth:`_take_extras` split off, once the load has committed."""

    def _before_cast(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint as torch's ``load_state_dict`` should cast it to the parameters' dtypes
        (default: the driven wrapper's answer, or as given; a subclass returns a changed copy,
        never changing the caller's dict)."""
        driven = self._driven_wrapper()
        return driven._before_cast(state_dict) if driven is not None else state_dict

    # -- pickling: torch's, plus the wrapper's own attributes ------------------------------------
    def __getstate__(self) -> dict[str, Any]:  # type: ignore[override]
        self._check_idle("pickling or copying (copy.copy, copy.deepcopy)")  # a copy could not finish or undo the step
        state = super().__getstate__()
        skipped = set(self._dropped_on_pickle) | set(self._transient) | {"state", "param_groups", "defaults"}
        for key, value in self.__dict__.items():
            if key.startswith("_optimizer_") or key in skipped or _patched_by_someone_else(self, key, value):
                continue
            state[key] = value
        for key in self._dropped_on_pickle:
            state[key] = None
        return state

    def __copy__(self) -> WrappingOptimizer:
        """``copy.copy``: torch's protocol (``__getstate__``, then ``__setstate__`` on a new
        object, which makes it a shallow copy), except that the callables pickling drops
        (``_dropped_on_pickle``: the contexts, a process group) are the original's, shared as
        the state is: the copy runs the same algorithm (it ran without them)."""
        cls = type(self)
        copied = cls.__new__(cls)
        copied.__setstate__(self.__getstate__())
        for key in self._dropped_on_pickle:
            if key in self.__dict__:
                copied.__dict__[key] = self.__dict__[key]
        return copied

    def __setstate__(self, state: dict[str, Any]) -> None:
        if self.__dict__.get("_loading"):
            # torch's load_state_dict commits through __setstate__({"state", "param_groups"}).
            loaded_state, groups = self._prepare_loaded(state["state"], state["param_groups"])
            probe = self._probe_own_load(groups)  # a refusal comes before anything changes
            self._probe_driven_setstate(loaded_state, groups)
            self.state = loaded_state
            self.param_groups = groups
            if probe is not None:
                self._take_own_load(probe)
            self._driven_setstate()
            self._after_load()
            return
        missing = [key for key in self._needed_from_pickle if key not in state]
        if missing:
            self.__dict__.update(state)
            self.__dict__["_pickled_by_earlier_release"] = missing
            self.__class__ = _earlier_release_class(type(self))
            return
        state = dict(state)
        groups = state.pop("param_groups", None)
        entries, source = state.pop("state", None), state.pop("_state_source", None)
        for key in self._transient:  # not pickled: back to idle
            self.__dict__[key] = None
        self._loading = False
        Optimizer.__setstate__(self, state)  # hooks (empty, as torch unpickles), step patch
        driven = self.__dict__.get(self._driven_attr)
        if source is not None and (source.state is None or source.owner() is self):
            # Unpickled (or deep-copied) with this wrapper; not filled in yet where unpickling
            # reached it through the driven optimizer's view first.
            self.__dict__["_state_source"] = source
        else:
            # A shallow copy (copy.copy): a state of its own over the same dictionary, and a
            # shallow copy of the driven optimizer (the same param-group list), as copy.copy of
            # a torch optimizer shares the dictionary and the groups until a load rebinds the
            # copy's own. (Or a pickle from a development version, which carried no _SharedState.)
            self.__dict__.pop("_state_source", None)
            self.state = entries
            if source is not None and driven is not None:
                driven = self.__dict__[self._driven_attr] = _shallow_copy_of_driven(driven)
        if groups is not None and driven is not None and _unpickled(driven):
            self._driven.param_groups = groups
        # (a driven wrapper still being unpickled -- copying it alone reaches this wrapper through
        # its state's view -- gets the same groups from its own state)
        if driven is not None:  # torch's own __setstate__ gave it empty hook dicts: hook again
            _show_state(driven, self)
