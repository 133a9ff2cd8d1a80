"""A compiled meta-loss and meta-gradient: ``torch.compile`` around the vectorised inner loop.

The engine's vectorised inner loop (:func:`~samgria.meta.engine.vmapped_task_losses`) is a pure
function of the meta-parameters and the stacked task tensors. :class:`CompiledMetaLoss` wraps its
mean, here written for plain SGD,

.. math::

    \\mathcal{L}(\\theta, \\alpha) = \\frac{1}{B} \\sum_{i=1}^{B}
    \\mathcal{L}^q_i\\big(\\phi_i^{(k)}\\big), \\qquad
    \\phi_i^{(j+1)} = \\phi_i^{(j)} - \\alpha \\odot \\nabla \\mathcal{L}^s_i\\big(\\phi_i^{(j)}\\big),
    \\quad \\phi_i^{(0)} = \\theta,

in ``torch.compile(torch.func.grad_and_value(...))``, so one call returns the meta-loss and its
exact meta-gradient with respect to :math:`\\theta` (and Meta-SGD's rates :math:`\\alpha`) from a
single compiled program: no Python interpreter overhead per operation and no autograd graph
kept between calls. It computes what ``meta.task_losses(tasks, loss_fn).mean().backward()``
computes for MAML (Finn et al., 2017), FOMAML, Meta-SGD (Li et al., 2017) and ANIL (Raghu et
al., 2020), with per-group (or learned) step sizes, and with the inner loop's other options
when they are traceable: an update rule (``inner_step_fn``, e.g. momentum or Adam), a
regulariser (``inner_reg_fn``) and gradient transforms (``grad_transforms``, e.g. ``InnerSAM``).

The compiled program is built once per configuration (adapted names, trainable names,
``steps``, ``first_order``) and kept; ``torch.compile`` itself recompiles only when the task
shapes or the model's structure change. Step sizes enter as tensors, so editing a group's
``inner_lr`` (by hand or with a scheduler) does not recompile.

:func:`compiled_path_blocker` says when the compiled path cannot reproduce ``task_losses``:
Reptile (its update is a pseudo-gradient, not a meta-gradient), tasks of unequal shapes, a model that could not be vmapped, a second-order inner loop
whose support gradient may pass through a normalisation layer whose double backward ``vmap`` gets
wrong
(:func:`~samgria.meta.vectorize.second_order_vmap_blocker`) or through weight normalisation
(``torch.nn.utils.parametrizations.weight_norm``, ``torch.nn.utils.weight_norm``: torch's double
backward of it is wrong, and the compiled program cannot route around it as the eager paths do,
:func:`~samgria.meta.engine.twice_differentiable_forward`), and a model with a parameter
registered under more than one name (tied weights: the inductor backend miscompiled their
meta-gradient, by about 1e-2 for Meta-SGD with torch 2.13). A model wrapped in ``torch.compile``
is traced through the module it wraps.

Differences from ``backward()``: a meta-parameter that does not influence the loss receives a
zero gradient instead of ``None``; dropout draws its random numbers inside the compiled program
(the same distribution, other numbers).
"""

from __future__ import annotations

import inspect
import itertools
import re
import sys
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from samgria._checks import check_bool, check_optional_bool
from samgria.data.task import Task
from samgria.meta.base import MetaOptimizer
from samgria.meta.functional import one_steps_argument
from samgria.meta.functional import check_steps
from samgria.meta.engine import (
    InnerLoop,
    InnerRegFn,
    _module_label,
    _norms_reached_by_adaptation,
    stack_tasks,
    vmap_blocker,
    vmapped_task_losses,
    weight_normalised_modules,
)
from samgria.meta.inner_optim import InnerStepFn

__all__ = ["CompiledMetaLoss", "compiled_path_blocker"]


def _compile_keywords() -> frozenset[str] | None:
    """The keyword arguments of :func:`torch.compile` but ``model`` (``None`` for a
    ``torch.compile`` that takes any, through ``**kwargs``)."""
    try:
        parameters = inspect.signature(torch.compile).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the keys are left to torch.compile
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in parameters if p.kind in named) - {"model"}


def _compile_probe() -> None:
    """What :func:`check_compile_options` hands to ``torch.compile`` (never called)."""


#: The keyword arguments of :func:`torch.compile` that are flags.
_BOOL_OPTIONS = frozenset({"fullgraph", "disable", "isolate_recompiles"})


def check_compile_options(options: Mapping[Any, Any], name: str = "compile_options") -> dict[str, Any]:
    """``options`` as a dict, checked as keyword arguments of :func:`torch.compile` before anything
    is compiled.

    Every key must be a keyword argument of ``torch.compile`` other than ``model`` (the compiled
    function is the meta-loss); the values are left to ``torch.compile`` itself, which is called
    on a function that is never run (it checks ``mode``, ``backend``, ``options`` there, not when
    the program is first run, where a refusal would send a trainer to the uncompiled path). When
    ``torch.compile`` refuses even no options (an unsupported platform), the values are not
    checked: that is reported where the program is built.

    The kinds of the values ``torch.compile`` takes as they come are checked here: ``fullgraph``
    and ``disable`` (and ``isolate_recompiles``) must be bools, ``dynamic`` ``None`` or a bool,
    ``mode`` (and ``name``) ``None`` or a string, ``backend`` a backend's name or a callable.

    Raises:
        TypeError: A key that is no keyword argument of ``torch.compile``
            (``"compile_options must name keyword arguments of torch.compile (backend, ...), got
            'inner_steps'"``), or a value of the wrong kind (``"compile_options['backend'] must
            be a backend's name (a str) or a callable backend, got 5"``).
        ValueError: ``torch.compile`` refuses the values (an unknown ``mode`` or ``backend``,
            ``mode`` together with ``options``), with its message.
    """
    allowed = _compile_keywords()
    for key in options:
        if allowed is not None and key not in allowed:
            raise TypeError(
                f"{name} must name keyword arguments of torch.compile ({', '.join(sorted(allowed))}), got {key!r}"
            )
    checked = dict(options)
    # torch.compile takes these as they come (backend=5 fails when the program is first built,
    # fullgraph="no" is true): their kinds are checked here.
    for key, value in checked.items():
        entry = f"{name}[{key!r}]"
        if key in _BOOL_OPTIONS:
            checked[key] = check_bool(entry, value)
        elif key == "dynamic":
            checked[key] = check_optional_bool(entry, value)
        elif key in ("mode", "name") and value is not None and not isinstance(value, str):
            raise TypeError(f"{entry} must be None or a str, got {value!r}")
        elif key == "backend" and value is not None and not (isinstance(value, str) or callable(value)):
            raise TypeError(f"{entry} must be a backend's name (a str) or a callable backend, got {value!r}")
    if checked:
        try:
            torch.compile(_compile_probe)
        except Exception:  # torch.compile works nowhere here: nothing to learn about the options
            return checked
        try:
            torch.compile(_compile_probe, **{"dynamic": False, **checked})
        except Exception as error:
            raise ValueError(
                f"{name} must be keyword arguments that torch.compile accepts, got {checked!r} "
                f"({type(error).__name__}: {error})"
            ) from None
    return checked


LossFn = Callable[[Any, Any], torch.Tensor]

#: The oldest torch whose ``torch.compile`` builds a program for the compiled meta-loss:
#: before it, Dynamo breaks the graph inside ``torch.func.grad_and_value`` and runs the whole
#: function eagerly without an error (measured on 2.4.1, 2.5.1 and 2.6.0; 2.7.1 compiles it).
_COMPILE_NEEDS_TORCH = (2, 7)


def _torch_release(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a torch version string (``"2.6.0+cu124"`` -> ``(2, 6)``), or
    ``None`` for one that does not start with them (a build's own naming)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def _tied_parameter(model: nn.Module) -> tuple[str, str] | None:
    """The first two names under which ``model`` registers one parameter, or ``None``."""
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            return first_name[id(param)], name
        first_name[id(param)] = name
    return None


def _weight_norm_blocker(model: nn.Module, loop: InnerLoop) -> str | None:
    """Why a second-order ``loop`` cannot be compiled through the weight normalisation of
    ``model``, or ``None`` (in an ``nn.Sequential``, a layer before the first adapted child is
    passed by the support gradient's first backward only, as in
    :func:`~samgria.meta.engine.vmap_blocker`)."""
    if not loop.second_order:
        return None
    normalised = weight_normalised_modules(model)
    if not normalised:
        return None
    reached = _norms_reached_by_adaptation(model, loop.adapt_names, normalised)
    label = _module_label(*normalised[0]) if reached is None else (reached[0] if reached else None)
    if label is None:
        return None
    return (
        f"second-order gradients {'may ' if reached is None else ''}pass through the weight "
        f"normalisation of {label}, whose double backward torch gets wrong (torch._weight_norm's "
        "fused kernel); the eager paths compute it by its composite formula, which the compiled "
        "program cannot"
    )


def compiled_path_blocker(
    meta: MetaOptimizer, tasks: Sequence[Task] | None = None, loop: InnerLoop | None = None
) -> str | None:
    """Say why :class:`CompiledMetaLoss` cannot reproduce ``meta.task_losses``, or return ``None``.

    Args:
        meta: The meta-optimizer.
        tasks: The meta-batch to check too (``None``: check ``meta`` only).
        loop: The inner loop to check (default: ``meta.inner_loop()``).

    Returns:
        A human-readable reason, or ``None`` when the compiled path applies.

    Raises:
        TypeError: ``meta`` is not a :class:`~samgria.meta.base.MetaOptimizer`.
    """
    if not isinstance(meta, MetaOptimizer):
        raise TypeError(f"meta must be a samgria MetaOptimizer, got {type(meta).__name__}")
    name = type(meta).__name__
    release = _torch_release(str(torch.__version__))
    if release is not None and release < _COMPILE_NEEDS_TORCH:
        return (
            f"torch {torch.__version__} compiles no program for it (its graph breaks inside "
            "torch.func.grad_and_value and it runs eagerly); the compiled path needs torch "
            f"{'.'.join(map(str, _COMPILE_NEEDS_TORCH))} or later"
        )
    if meta.outer_update != "meta_gradient":
        return (
            f"{name} forms its outer update from the adapted weights (outer_update="
            f"{meta.outer_update!r}), not from a meta-gradient"
        )
    for path in ("vmap", "compiled"):
        if path in meta.path_policy.failed:
            return f"{name}: the {path} path failed earlier for this model ({meta.path_policy.failed[path]})"
    tied = _tied_parameter(meta.model)
    if tied is not None:
        return (
            f"the model registers one parameter as {tied[0]!r} and as {tied[1]!r} (tied weights), "
            "and torch.compile's inductor backend miscompiles the meta-gradient of such a parameter"
        )
    loop = meta.inner_loop() if loop is None else loop
    reason = _weight_norm_blocker(meta.model, loop)
    if reason is not None:
        return reason
    return vmap_blocker(meta.model, loop, None if tasks is None else list(tasks))


class _Uncompiled(nn.Module):
    """What ``torch.compile(module)`` wraps, held as a plain module under the same attribute,
    ``_orig_mod``: its parameters and buffers have the names the meta-optimizer knows
    (``"_orig_mod.0.weight"``), and its forward is the original module's, which the compiled
    meta-loss traces (Dynamo skips the frames of an ``OptimizedModule`` under
    ``torch.func.functional_call``, and the program would run eagerly without a word)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._orig_mod = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._orig_mod(*args, **kwargs)


def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile``-d module (an ``OptimizedModule``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def _traced_module(model: nn.Module) -> nn.Module:
    """``model``, or for a ``torch.compile``-d model (an ``OptimizedModule``) the module it
    wraps, with the same parameter names; the compiled meta-loss compiles the whole functional
    program itself, so the model's own compilation adds nothing there."""
    if _is_compiled(model):
        # An OptimizedModule's ``_orig_mod`` is the module it wraps (nn.Module.__getattr__ is
        # typed Tensor | Module).
        return _Uncompiled(_traced_module(cast(nn.Module, model._orig_mod)))
    return model


_program_ids = itertools.count()


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn`` in a function with a code object of its own.

    ``torch.compile`` keeps its caches, its recompile limit and its decision to skip a function
    after an error per *code object*. Every ``grad_and_value`` wrapper shares one, so without
    this, one program's failure or recompilations would affect every other program in the
    process.

    What Dynamo keeps for a program dies with its function (so with the
    :class:`CompiledMetaLoss` that built it): the function has a globals mapping of its own (a
    copy of this module's), in which Dynamo installs the graphs it compiles
    (``__compiled_fn_<n>_<uuid>``), and when the function is collected :func:`_forget_code`
    drops the cache entries of its code object (Dynamo maps each compiled code object back to
    the original one, a cycle through code objects that the garbage collector cannot see).
    """

    def compiled_meta_loss(*args: Any) -> Any:
        return fn(*args)

    code = compiled_meta_loss.__code__
    name = f"compiled_meta_loss_{next(_program_ids)}"
    if sys.version_info >= (3, 11):
        renamed = code.replace(co_name=name, co_qualname=name)
    else:
        renamed = code.replace(co_name=name)
    function = types.FunctionType(
        renamed,
        dict(compiled_meta_loss.__globals__),
        name,
        compiled_meta_loss.__defaults__,
        compiled_meta_loss.__closure__,
    )
    weakref.finalize(function, _forget_code, function.__code__).atexit = False
    return function


def _forget_code(code: types.CodeType) -> None:
    """Drop what Dynamo keeps for ``code``, whose function is gone: its cache entries (compiled
    graphs, guards), its recompile reasons, and the finalizers through which Dynamo would keep
    each entry's guards until a long-lived object they match by identity (a function's code
    object in torch, a module class) dies."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:  # nothing was compiled
        return
    # Private APIs of torch (a code object's cache entries) and of Python (weakref.finalize's
    # registry), used here only: Dynamo registers a finalizer for each compiled entry on the
    # long-lived objects its guards watch (a code object of torch's, a module class), and that
    # finalizer holds the entry's guards (about 0.4 MB per compile measured) for as long as the
    # watched object lives, i.e. for the process. No public API releases them. Should either API
    # go, only those guards stay behind; the graphs still go with reset_code below.
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

        guards = {id(entry.guard_manager) for entry in _debug_get_cache_entry_list(code)}
        for finalizer in list(weakref.finalize._registry):  # type: ignore[attr-defined]
            callback = (finalizer.peek() or (None, None))[1]
            owner = getattr(getattr(callback, "func", None), "__self__", None)
            if id(getattr(owner, "guard_manager", None)) in guards:
                finalizer.detach()
    except Exception:  # a finalizer must not raise: the cache entries still go below
        pass
    dynamo.reset_code(code)
    failures = getattr(sys.modules.get("torch._dynamo.utils"), "guard_failures", None)
    if isinstance(failures, dict):
        failures.pop(code, None)


class CompiledMetaLoss:
    """The meta-loss and meta-gradient of a meta-batch from one compiled program.

    ``loss, grads = CompiledMetaLoss(meta, loss_fn)(tasks)`` gives the mean post-adaptation
    query loss and ``{meta-parameter: gradient}``, equal (up to floating-point rounding) to
    ``meta.task_losses(tasks, loss_fn).mean()`` and its ``backward()``; :meth:`backward`
    accumulates the gradients into ``.grad`` instead. The current meta-parameters, param-group
    settings (``inner_lr``, ``adapt``) and ``meta.first_order`` are read at every call.

    A model wrapped in ``torch.compile`` (an ``OptimizedModule``) is traced through the module
    it wraps, under the same parameter names: this program compiles the model's forward with
    everything else, and the model's own compile options play no part in it.

    The first call of a configuration compiles (seconds to a minute on a CPU); later calls with
    tasks of the same shapes run the compiled code. ``torch.compile`` keeps at most
    ``torch._dynamo.config.recompile_limit`` (8) versions (task shapes) of each program and runs
    further ones uncompiled; every program has a code object of its own, so programs of other
    configurations or instances do not count against it. A deleted instance releases its
    programs and what ``torch.compile`` keeps for them (compiled graphs, guards).

    Args:
        meta: A MAML-family meta-optimizer (MAML, FOMAML, MetaSGD, ANIL) with plain SGD inner
            steps (see :func:`compiled_path_blocker`).
        loss_fn: ``loss_fn(prediction, target) -> scalar`` for support and query losses; it
            must be traceable by ``torch.compile``.
        inner_steps: Number of inner steps (default: ``meta.inner_steps`` at each call).
        inner_step_fn: Inner update rule (default plain SGD); must be traceable.
        inner_reg_fn: Inner-loop regulariser; must be traceable.
        grad_transforms: Inner-loop gradient transforms (e.g. ``InnerSAM``).
        steps: Former name of ``inner_steps``.
        **compile_options: Keyword arguments of :func:`torch.compile` (e.g. ``mode=...``,
            ``backend=...``). Default ``dynamic=False``: one specialised program per task shape.
            Checked by :func:`check_compile_options` when given.

    Raises:
        TypeError: ``meta`` is not a ``MetaOptimizer``, ``loss_fn`` is not callable, or a
            keyword argument is neither this class's nor one of ``torch.compile``'s, or is of
            the wrong kind (:func:`check_compile_options`).
        ValueError: ``steps`` is negative, ``meta`` cannot use the compiled path (Reptile, a
            custom inner loop, a second-order loop through BatchNorm), or ``torch.compile``
            refuses ``compile_options``.
    """

    def __init__(
        self,
        meta: MetaOptimizer,
        loss_fn: LossFn,
        *,
        inner_steps: int | None = None,
        inner_step_fn: InnerStepFn | None = None,
        inner_reg_fn: InnerRegFn | None = None,
        grad_transforms: Sequence[Any] | None = None,
        steps: int | None = None,
        **compile_options: Any,
    ) -> None:
        if not isinstance(meta, MetaOptimizer):
            raise TypeError(f"meta must be a samgria MetaOptimizer, got {type(meta).__name__}")
        inner_steps = one_steps_argument(inner_steps, steps)
        self.inner_options: dict[str, Any] = {
            "inner_step_fn": inner_step_fn,
            "inner_reg_fn": inner_reg_fn,
            "grad_transforms": grad_transforms,
        }
        reason = compiled_path_blocker(meta, loop=meta.inner_loop(inner_steps, **self.inner_options))
        if reason is not None:
            raise ValueError(f"meta cannot use the compiled path: {reason}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        options = check_compile_options(compile_options)
        self.meta = meta
        self.loss_fn = loss_fn
        self.steps = None if inner_steps is None else check_steps(inner_steps, "inner_steps")
        self.compile_options: dict[str, Any] = {"dynamic": False, **options}
        self._programs: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._lr_tensors: dict[tuple[Any, ...], torch.Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        """A copy or a pickle holds no built program: each is compiled around this
        meta-optimizer's model (a closure over it, which ``copy.deepcopy`` would share: a copy
        computed with the original's buffers), and torch's compiled functions cannot be
        pickled. The copy builds its own on its first call."""
        state = dict(self.__dict__)
        state["_programs"] = {}
        state["_lr_tensors"] = {}
        return state

    @property
    def num_programs(self) -> int:
        """Number of configurations built so far (each compiled on its first call)."""
        return len(self._programs)

    def clear(self) -> None:
        """Forget the built programs; what ``torch.compile`` keeps for them (compiled graphs,
        guards) goes with them, and the next call of a configuration compiles again."""
        self._programs.clear()
        self._lr_tensors.clear()

    def _program(self, key: tuple[Any, ...], loop: InnerLoop) -> Callable[..., Any]:
        program = self._programs.get(key)
        if program is not None:
            return program
        model, loss_fn = _traced_module(self.meta.model), self.loss_fn

        def meta_loss(
            trainable: dict[str, dict[str, torch.Tensor]],
            constant: dict[str, dict[str, torch.Tensor]],
            support_x: torch.Tensor,
            support_y: torch.Tensor,
            query_x: torch.Tensor,
            query_y: torch.Tensor,
        ) -> torch.Tensor:
            params = {**constant["params"], **trainable["params"]}
            lrs = {**constant["lrs"], **trainable["lrs"]}
            losses, _ = vmapped_task_losses(
                model, loop.replace(lrs=lrs), params, support_x, support_y, query_x, query_y, loss_fn
            )
            return losses.mean()

        program = torch.compile(_own_code(torch.func.grad_and_value(meta_loss)), **self.compile_options)
        self._programs[key] = program
        return program

    def _lr_tensor(self, value: float, like: torch.Tensor, previous: dict[tuple[Any, ...], torch.Tensor]) -> torch.Tensor:
        """The rate ``value`` as a 0-dim tensor like ``like``: the one of this call or of the
        previous call when there is one (only those are kept: a scheduled ``inner_lr`` takes a
        new value at every step)."""
        key = (value, like.dtype, like.device)
        tensor = self._lr_tensors.get(key)
        if tensor is None:
            tensor = previous.get(key)
            if tensor is None:
                tensor = torch.tensor(value, dtype=like.dtype, device=like.device)
            self._lr_tensors[key] = tensor
        return tensor

    def __call__(self, tasks: Sequence[Task]) -> tuple[torch.Tensor, dict[torch.Tensor, torch.Tensor]]:
        """Compute the meta-loss of ``tasks`` and its meta-gradient.

        Args:
            tasks: The meta-batch: a non-empty sequence of equal-shape
                :class:`~samgria.data.task.Task`.

        Returns:
            ``(loss, grads)``: the detached scalar meta-loss and a dict from each trainable
            meta-parameter (the model's parameters with ``requires_grad``, Meta-SGD's rates) to
            its gradient.

        Raises:
            TypeError: ``tasks`` is not a sequence of Task.
            ValueError: ``tasks`` is empty or cannot use the compiled path (unequal shapes), or
                ``meta`` can no longer use it.
        """
        meta = self.meta
        loop = meta.inner_loop(self.steps, **self.inner_options)
        tasks = meta._check_tasks(tasks, loop.inner_steps)
        reason = compiled_path_blocker(meta, tasks, loop)
        if reason is not None:
            raise ValueError(f"the compiled path cannot be used: {reason}")
        adapt_names, lrs = loop.adapt_names, loop.lrs
        model_params = dict(meta.model.named_parameters())

        trainable: dict[str, dict[str, torch.Tensor]] = {"params": {}, "lrs": {}}
        constant: dict[str, dict[str, torch.Tensor]] = {"params": {}, "lrs": {}}
        previous_lrs, self._lr_tensors = self._lr_tensors, {}
        owners: dict[tuple[str, str], torch.Tensor] = {}
        for name, p in model_params.items():
            side = trainable if p.requires_grad else constant
            side["params"][name] = p.detach()
            if p.requires_grad:
                owners["params", name] = p
        for name in adapt_names:
            lr = lrs[name]
            if isinstance(lr, torch.Tensor):
                side = trainable if lr.requires_grad else constant
                side["lrs"][name] = lr.detach()
                if lr.requires_grad:
                    owners["lrs", name] = lr
            else:
                constant["lrs"][name] = self._lr_tensor(float(lr), model_params[name], previous_lrs)

        key = (
            tuple(adapt_names),
            tuple(trainable["params"]),
            tuple(trainable["lrs"]),
            loop.inner_steps,
            loop.first_order,
        )
        program = self._program(key, loop)
        try:
            with torch.enable_grad():  # one grad mode for every call: no recompile on a mode guard
                grads, loss = program(trainable, constant, *stack_tasks(tasks))
        except Exception:
            # torch.compile may give up on a function for good after an error in tracing (a
            # bug in loss_fn, say): rebuild the program, with a fresh cache, on the next call.
            self._programs.pop(key, None)
            raise
        out: dict[torch.Tensor, torch.Tensor] = {}
        for (kind, name), owner in owners.items():
            g = grads[kind][name]
            out[owner] = out[owner] + g if owner in out else g
        return loss.detach(), out

    def backward(self, tasks: Sequence[Task]) -> torch.Tensor:
        """Compute the meta-loss of ``tasks`` and accumulate its meta-gradient into ``.grad``.

        Like ``loss.backward()``: a gradient is added to an existing ``.grad`` and assigned
        where ``.grad`` is ``None``.

        Args:
            tasks: The meta-batch (see :meth:`__call__`).

        Returns:
            The detached scalar meta-loss.
        """
        loss, grads = self(tasks)
        with torch.no_grad():
            for p, g in grads.items():
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        return loss

    def __repr__(self) -> str:
        return (
            f"CompiledMetaLoss({type(self.meta).__name__}, steps={self.steps}, "
            f"programs={self.num_programs}, compile_options={self.compile_options})"
        )
