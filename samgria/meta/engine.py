"""The one inner-loop engine of the meta-learning half.

Every meta-learner, every entry point (``Learner``, ``MetaOptimizer.adapt``,
``task_losses``, ``evaluate``, the ``meta_step`` builder, ``MetaTrainer``,
``CompiledMetaLoss``) describes its inner loop with one :class:`InnerLoop` and runs it here.

An inner loop of :math:`k` steps on a support loss :math:`\\mathcal{L}^s` with an optional
regulariser :math:`R` and gradient transforms :math:`T` (e.g. SAM) is

.. math::

    \\phi^{(0)} = \\theta, \\qquad
    g^{(j)} = T\\big(\\nabla_\\phi [\\mathcal{L}^s(\\phi^{(j)}) + R(\\phi^{(j)}, \\theta)]\\big), \\qquad
    \\phi^{(j+1)}, s^{(j+1)} = U(\\phi^{(j)}, g^{(j)}, \\alpha, s^{(j)}),

where :math:`U` is the update rule (plain SGD :math:`\\phi - \\alpha \\odot g` by default,
:func:`~samgria.meta.inner_optim.sgd_inner_step`) with state :math:`s`. Second order keeps the
graph of :math:`g` (MAML); first order treats :math:`g` as a constant (FOMAML); without
``track_graph`` the loop starts from detached weights (Reptile, evaluation).

Three paths run the same loop over a meta-batch of tasks, chosen by one dispatcher
(:func:`task_losses`, in the shape of ``torch.optim.sgd()`` choosing a for-loop or a
multi-tensor implementation):

* ``"loop"``: one task after the other, gradients by :func:`torch.autograd.grad`. The only
  path that can back-propagate each task as soon as it is done (memory independent of the
  meta-batch size) and checkpoint inner steps.
* ``"vmap"``: all tasks at once with :func:`torch.func.vmap`, gradients by
  :func:`torch.func.grad`. Needs tasks of equal shapes.
* ``"compiled"``: the vmap path inside ``torch.compile(torch.func.grad_and_value(...))``
  (:class:`~samgria.meta.compiled.CompiledMetaLoss`).

The per-step code (:func:`run_inner_loop`) is shared by all three; only the source of the
support gradient differs (:func:`autograd_support_grads` or :func:`functorch_support_grads`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call, vmap

from samgria._checks import check_bool, check_int, check_real
from samgria.data.task import Task
from samgria.meta.inner_optim import InnerStepFn, sgd_inner_step

__all__ = [
    "InnerLoop",
    "autograd_support_grads",
    "can_vectorize",
    "functorch_support_grads",
    "run_inner_loop",
    "take_inner_steps",
    "refuse_unvectorisable",
    "second_order_vmap_blocker",
    "stack_tasks",
    "task_losses",
    "vmap_blocker",
]

Tensors = dict[str, torch.Tensor]
LossOf = Callable[[Tensors], torch.Tensor]
#: ``grad_source(loss_of, at, create_graph) -> {name: gradient}`` over the names of ``at``.
GradSource = Callable[[LossOf, Tensors, bool], Tensors]
InnerRegFn = Callable[[Tensors, Tensors], torch.Tensor]

#: The paths of :func:`task_losses` and of the trainer.
PATHS = ("loop", "vmap", "compiled")


@dataclasses.dataclass(frozen=True)
class InnerLoop:
    """One description of an inner loop (what every path runs).

    Attributes:
        adapt_names: Names of the adapted parameters (ANIL: the head's).
        lrs: Step size of each adapted name: a number, or a tensor (Meta-SGD's learned rates).
        inner_steps: Number of inner steps.
        first_order: Treat the support gradients as constants (FOMAML).
        track_graph: Start from the meta-parameters themselves, so the adapted weights are
            connected to them (``False``: detached copies; Reptile, evaluation).
        inner_step_fn: The update rule (an :class:`~samgria.meta.inner_optim.InnerStepFn`).
        inner_reg_fn: ``inner_reg_fn(current, base) -> scalar`` added to the support loss.
        grad_transforms: Support-gradient transforms applied in order (e.g. ``InnerSAM``).
        checkpoint: Recompute each second-order inner step in the backward pass instead of
            storing its activations (:func:`torch.utils.checkpoint.checkpoint`); loop path only.

    Every field is checked when a loop is built or :meth:`replace`-d, with the rules of the
    :class:`~samgria.meta.base.MetaOptimizer` constructor: ``inner_steps`` an integer ``>= 0``,
    the flags bools, the rate of every adapted name a finite number ``>= 0`` or a real tensor.
    A tensor rate's values are not read (a learned rate, Meta-SGD's, may take any value, and a
    loop is built at every meta-step, also inside the compiled program); the checks cost
    O(fields + rates).

    Raises:
        TypeError: A field is of the wrong kind: ``adapt_names`` a string or holding a non-string,
            ``lrs`` not a mapping, a rate neither a real number nor a real tensor (a ``bool`` is
            not a number), ``inner_steps`` not an integer, ``first_order``, ``track_graph`` or
            ``checkpoint`` not a bool, ``inner_step_fn`` or ``inner_reg_fn`` not callable, a
            gradient transform without ``transform_inner_grads``.
        ValueError: ``inner_steps`` is negative, a numeric rate is negative, NaN or infinite, or
            ``lrs`` has no entry for an adapted name.
    """

    adapt_names: tuple[str, ...]
    lrs: Mapping[str, float | torch.Tensor]
    inner_steps: int
    first_order: bool = False
    track_graph: bool = True
    inner_step_fn: InnerStepFn = sgd_inner_step
    inner_reg_fn: InnerRegFn | None = None
    grad_transforms: tuple[Any, ...] = ()
    checkpoint: bool = False

    def __post_init__(self) -> None:
        """Check every field (see the class); store a list of names as a tuple, NumPy bools and
        integers as Python's."""
        names = self.adapt_names
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise TypeError(f"adapt_names must be a sequence of parameter names, got {names!r}")
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"adapt_names must be a sequence of parameter names (str), got {names!r}")
        if not isinstance(names, tuple):
            object.__setattr__(self, "adapt_names", tuple(names))
        lrs = self.lrs
        if not isinstance(lrs, Mapping):
            raise TypeError(f"lrs must be a mapping from every adapted name to its step size, got {lrs!r}")
        missing = [n for n in names if n not in lrs]
        if missing:
            raise ValueError(f"lrs has no entry for the adapted parameters {missing}")
        for name in names:
            _check_rate(f"lrs[{name!r}]", lrs[name])
        steps = check_int("inner_steps", self.inner_steps, low=0)
        if type(self.inner_steps) is not int:
            object.__setattr__(self, "inner_steps", steps)
        for flag in ("first_order", "track_graph", "checkpoint"):
            value = getattr(self, flag)
            if check_bool(flag, value) is not value:  # a NumPy bool: stored as a bool
                object.__setattr__(self, flag, bool(value))
        if not callable(self.inner_step_fn):
            raise TypeError(f"inner_step_fn must be callable, got {self.inner_step_fn!r}")
        transforms = check_inner_options(self.inner_step_fn, self.inner_reg_fn, self.grad_transforms)
        if transforms is not self.grad_transforms:
            object.__setattr__(self, "grad_transforms", transforms)

    @property
    def second_order(self) -> bool:
        """Whether the meta-gradient flows through the support gradients."""
        return self.track_graph and not self.first_order

    def replace(self, **changes: Any) -> InnerLoop:
        """Return a copy with some fields changed, checked as the constructor checks them.

        Raises:
            TypeError: A changed field is of the wrong kind (see the class), or ``changes``
                names something that is not a field.
            ValueError: A changed field is out of range (see the class).
        """
        return dataclasses.replace(self, **changes)


def _check_rate(name: str, rate: Any) -> None:
    """Check one step size of :class:`InnerLoop`: a finite number ``>= 0`` or a real tensor (its
    dtype only: a learned rate may take any value, and reading values would sync a device)."""
    if isinstance(rate, torch.Tensor):
        if rate.dtype == torch.bool or rate.is_complex():
            raise TypeError(f"{name} must be a real number or a real tensor, got a tensor of dtype {rate.dtype}")
        return
    check_real(name, rate, low=0.0)


# ---------------------------------------------------------------------- checks
def check_inner_options(
    inner_step_fn: Any, inner_reg_fn: Any, grad_transforms: Any
) -> tuple[Any, ...]:
    """Check the optional inner-loop pieces (the one place); return the transforms as a tuple."""
    if inner_step_fn is not None and not callable(inner_step_fn):
        raise TypeError(f"inner_step_fn must be callable, got {inner_step_fn!r}")
    if inner_reg_fn is not None and not callable(inner_reg_fn):
        raise TypeError(f"inner_reg_fn must be callable, got {inner_reg_fn!r}")
    if grad_transforms is None:
        return ()
    if isinstance(grad_transforms, (str, bytes)) or not isinstance(grad_transforms, Sequence):
        raise TypeError(f"grad_transforms must be a sequence of inner-loop gradient transforms, got {grad_transforms!r}")
    for t in grad_transforms:
        if not callable(getattr(t, "transform_inner_grads", None)):
            raise TypeError(f"grad_transforms entries must have a transform_inner_grads method, got {t!r}")
    return tuple(grad_transforms)


# ---------------------------------------------------------------------- support gradients
def check_scalar_loss(loss: Any, what: str) -> None:
    """Check that a loss is a scalar tensor; ``what`` names it (``"the support loss"``).

    Raises:
        TypeError: ``loss`` is not a tensor.
        ValueError: ``loss`` has a dimension (under vmap: per task).
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{what} must be a scalar tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(f"{what} must be a scalar tensor, got shape {tuple(loss.shape)}")


def check_support_loss(loss: Any) -> torch.Tensor:
    """Check that a support loss is a scalar tensor that can be differentiated."""
    check_scalar_loss(loss, "the support loss")
    if not loss.requires_grad:
        raise ValueError(
            "the support loss does not depend on any parameter that requires grad; compute it "
            "from the fast weights (the callable or learner passed to the closure), with grad enabled"
        )
    return loss


def grads_of_loss(
    loss: torch.Tensor, at: Tensors, create_graph: bool, allow_unused: bool = True, *, connected: bool = False
) -> Tensors:
    """Gradients of a computed support loss w.r.t. ``at``.

    A weight the loss does not depend on gets no entry (the update leaves it as it is); with
    ``allow_unused=False`` it raises instead. ``connected=True`` (a loss the user computed: the
    learner and closure APIs) refuses a loss that depends on none of ``at``.

    Raises:
        ValueError: ``loss`` is not a differentiable scalar, or (``connected``) depends on none
            of the weights of ``at`` (e.g. computed with the model instead of the fast weights):
            a step would silently change nothing.
    """
    check_support_loss(loss)
    names = list(at)
    raw = torch.autograd.grad(loss, [at[n] for n in names], create_graph=create_graph, allow_unused=allow_unused)
    if connected and names and all(g is None for g in raw):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ValueError(
            f"the support loss depends on none of the {len(names)} adapted weights ({shown}): "
            "compute it from the fast weights (the learner, or the callable passed to the "
            "closure), not from the model itself, and adapt weights that it uses"
        )
    return {n: g for n, g in zip(names, raw) if g is not None}


def autograd_support_grads(loss_of: LossOf, at: Tensors, create_graph: bool, *, connected: bool = False) -> Tensors:
    """Support gradients with :func:`torch.autograd.grad` (the loop path).

    First order evaluates the loss at detached copies of ``at``, so no graph to the
    meta-parameters is built for it. ``connected``: see :func:`grads_of_loss`. Runs outside
    ``torch.inference_mode`` (an evaluation inside it adapts as under ``no_grad``, as the
    :func:`torch.func.grad` paths do; data made inside it cannot be differentiated through).
    """
    with torch.inference_mode(False), torch.enable_grad():
        if not create_graph or any(v.is_inference() for v in at.values()):
            # Fast weights made inside inference mode are inference tensors: copied to normal ones.
            at = {n: (v.clone() if v.is_inference() else v.detach()).requires_grad_(True) for n, v in at.items()}
        return grads_of_loss(loss_of(at), at, create_graph, connected=connected)


def connected_support_grads(loss_of: LossOf, at: Tensors, create_graph: bool) -> Tensors:
    """:func:`autograd_support_grads` for a support loss the user computes (the closure API):
    a loss that depends on none of the adapted weights raises instead of adapting nothing."""
    return autograd_support_grads(loss_of, at, create_graph, connected=True)


def functorch_support_grads(loss_of: LossOf, at: Tensors, create_graph: bool) -> Tensors:
    """Support gradients with :func:`torch.func.grad` (the vmap and compiled paths)."""

    def scalar_loss_of(weights: Tensors) -> torch.Tensor:
        loss = loss_of(weights)
        check_scalar_loss(loss, "the support loss")  # torch.func.grad's own error names no argument
        return loss

    if create_graph:
        return torch.func.grad(scalar_loss_of)(at)
    with torch.no_grad():  # torch.func.grad still differentiates; no graph to the outer level
        return torch.func.grad(scalar_loss_of)(at)


# ---------------------------------------------------------------------- one inner loop
@contextlib.contextmanager
def twice_differentiable_attention(enabled: bool) -> Iterator[None]:
    """Run scaled-dot-product attention through its math backend when ``enabled``.

    torch's fused CPU/GPU attention kernels (flash, memory-efficient) have backward passes that
    cannot be differentiated again; second-order MAML through a transformer needs the math
    backend, which is composed of ordinary differentiable operations.
    """
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _composite_weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``torch._weight_norm(v, g, dim)`` written with ordinary operations:
    :math:`w = g \\, v / \\lVert v \\rVert`, the norm over every dimension but ``dim``
    (``dim=-1``: over all), the formula torch itself uses for the other dimensions."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


class _CompositeWeightNorm(torch.overrides.TorchFunctionMode):
    """Run ``torch._weight_norm`` as :func:`_composite_weight_norm`; every other function as is."""

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        if func is torch._weight_norm:
            return _composite_weight_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def weight_normalised_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules of ``model`` whose weight is normalised by ``torch._weight_norm``: through
    ``torch.nn.utils.parametrizations.weight_norm`` (a ``_WeightNorm`` parametrization) or the
    hook-based ``torch.nn.utils.weight_norm`` (a ``WeightNorm`` forward pre-hook). A forward that
    calls ``torch._weight_norm`` itself is not seen."""
    from torch.nn.utils.weight_norm import WeightNorm

    # torch names the parametrization's class privately, and the hook-based form is found in the
    # module's private hook dictionary: no public way tells either.
    parametrization = getattr(torch.nn.utils.parametrizations, "_WeightNorm", None)
    found = []
    for name, module in model.named_modules():
        lists = getattr(module, "parametrizations", None)
        hooks = getattr(module, "_forward_pre_hooks", {}).values()
        if any(isinstance(hook, WeightNorm) for hook in hooks) or (
            parametrization is not None
            and isinstance(lists, nn.ModuleDict)
            and any(isinstance(p, parametrization) for plist in lists.values() for p in plist.modules())
        ):
            found.append((name, module))
    return found


@contextlib.contextmanager
def twice_differentiable_forward(enabled: bool, model: nn.Module | None = None) -> Iterator[None]:
    """Make the forward passes run in it differentiable twice when ``enabled``.

    Three pieces of torch have no correct double backward, and each is routed around:

    * Attention runs through its math backend (:func:`twice_differentiable_attention`).
    * Weight normalisation, ``torch._weight_norm(v, g, dim)`` (called by
      ``torch.nn.utils.parametrizations.weight_norm`` and the hook-based
      ``torch.nn.utils.weight_norm``), is computed as :math:`v \\, (g / \\lVert v \\rVert)`,
      the norm over every dimension but ``dim``, through a
      :class:`torch.overrides.TorchFunctionMode` (thread-local) that intercepts that one
      function. For ``dim`` 0 or the last dimension torch calls a fused kernel
      (``_weight_norm_interface``) whose double backward is wrong: the second-order
      meta-gradient through a weight-normalised layer was off by about 1e-2 on every path
      (torch 2.13; ``torch.autograd.gradgradcheck`` fails for the fused kernel and passes for
      the composite formula). The mode costs a Python call per torch function, so it is
      entered only where ``model`` has a weight-normalised layer
      (:func:`weight_normalised_modules`), or is not given.
    * Modules and functions wrapped in :func:`torch.compile` run their own code eagerly
      (``torch.compiler.set_stance("force_eager")``): the graphs AOTAutograd compiles have no
      double backward ("torch.compile with aot_autograd does not currently support double
      backward"), so a compiled model could not take a second-order inner step.

    Inside a program being compiled (the compiled path) only the attention backend applies:
    Dynamo traces the original code already, and it does not send ``torch._weight_norm`` (a
    private function) through a mode, so the compiled path refuses second-order weight
    normalisation (:func:`~samgria.meta.compiled.compiled_path_blocker`).
    """
    if not enabled:
        yield
        return
    if torch.compiler.is_compiling():
        with twice_differentiable_attention(True):
            yield
        return
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    eager = set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
    composite = (
        _CompositeWeightNorm()
        if model is None or weight_normalised_modules(model)
        else contextlib.nullcontext()
    )
    with eager, twice_differentiable_attention(True), composite:
        yield


def copy_update_state(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of an update rule's state two levels deep (rules replace, never mutate, tensors)."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()}


def apply_inner_update(
    loop: InnerLoop,
    fast: Tensors,
    grads: Tensors,
    state: dict[str, Any],
    create_graph: bool,
    grad_fn: Callable[[Tensors], Tensors] | None,
) -> Tensors:
    """Transform the support gradients and apply the update rule; return the new fast weights.

    Args:
        loop: The inner loop.
        fast: Current adapted weights.
        grads: Their support gradients.
        state: The update rule's state (updated in place by the rule).
        create_graph: Whether the gradients keep their graph (second order).
        grad_fn: ``grad_fn(weights) -> gradients`` at other values of (some of) the adapted
            weights, the rest kept at ``fast``, for the gradient transforms (``None`` when the support loss cannot be re-evaluated).
    """
    if loop.grad_transforms:
        if grad_fn is None:
            raise ValueError(
                "grad_transforms need to re-evaluate the support loss: use adapt_on or "
                "adapt_closure instead of adapt(loss)"
            )
        for transform in loop.grad_transforms:
            grads = dict(transform.transform_inner_grads(fast, grads, grad_fn))
    if not create_graph:
        grads = {n: g.detach() for n, g in grads.items()}
    current = {n: fast[n] for n in grads}
    return {**fast, **loop.inner_step_fn(current, grads, {n: loop.lrs[n] for n in grads}, state)}


def _one_step(
    loop: InnerLoop,
    loss_of: LossOf,
    grad_source: GradSource,
    create_graph: bool,
    fast: Tensors,
    state: dict[str, Any],
) -> tuple[Tensors, dict[str, Any]]:
    state = copy_update_state(state)  # the input stays intact: a checkpoint recomputes from it
    grads = grad_source(loss_of, fast, create_graph)

    def grad_fn(weights: Mapping[str, torch.Tensor]) -> Tensors:
        at_weights = grad_source(loss_of, {**fast, **weights}, create_graph)
        return {n: at_weights[n] for n in weights if n in at_weights}

    return apply_inner_update(loop, fast, grads, state, create_graph, grad_fn), state


class _SameSupportLosses:
    """The support loss of one checkpointed inner step: records the losses of the step's forward
    and checks that its recomputations compute the same ones.

    The recomputation calls the support loss again, long after ``meta.adapt()`` returned: a
    closure that reads a variable changed since (the loop variable of ``for task in tasks:
    meta.adapt(lambda f: mse(f(task.support_x), task.support_y))``, the last task by then) would
    differentiate another task's loss, silently. Values within ``rtol`` (a recomputation on a GPU
    may round differently) pass.

    torch recomputes the step inside :meth:`recomputation` (the checkpoint's recompute context):
    in the backward pass, and also during the step's own forward, where the support gradient's
    backward needs the step's saved tensors. A step that evaluates the loss more than once (a
    gradient transform such as ``InnerSAM``) goes on recording after such a nested recomputation.
    """

    rtol = 1e-3

    def __init__(self, loss_of: LossOf) -> None:
        self._loss_of = loss_of
        self._recorded: list[torch.Tensor] = []
        self._recomputing: list[int] = []  # the next loss index of each recomputation under way

    @contextlib.contextmanager
    def recomputation(self) -> Iterator[None]:
        """Compare the losses computed inside (a recomputation of the step) with the recorded ones."""
        self._recomputing.append(0)
        try:
            yield
        finally:
            self._recomputing.pop()

    def __call__(self, adapted: Tensors) -> torch.Tensor:
        loss = self._loss_of(adapted)
        if not self._recomputing:
            self._recorded.append(loss.detach().clone())
            return loss
        index = self._recomputing[-1]
        self._recomputing[-1] += 1
        recorded = self._recorded[index] if index < len(self._recorded) else None
        if recorded is None or not torch.allclose(loss.detach(), recorded, rtol=self.rtol, atol=0.0, equal_nan=True):
            raise RuntimeError(
                "checkpoint_inner_steps=True recomputes each inner step in the backward pass by "
                f"evaluating the support loss again, which now gives {loss.item()!r} where the "
                f"inner step had {None if recorded is None else recorded.item()!r}: the support "
                "closure reads data that changed after meta.adapt() returned (in 'for task in "
                "tasks: meta.adapt(lambda f: loss(f(task.support_x), task.support_y))' the loop "
                "variable is the last task by then). Bind it when the closure is made "
                "(lambda f, task=task: ...), pass the data (meta.task_losses, learner.adapt_on), "
                "or use checkpoint_inner_steps=False"
            )
        return loss


def run_inner_loop(
    loop: InnerLoop,
    params: Mapping[str, torch.Tensor],
    support_loss: LossOf,
    grad_source: GradSource = autograd_support_grads,
    model: nn.Module | None = None,
) -> Tensors:
    """Run ``loop`` from ``params`` and return every parameter, the adapted ones updated.

    Args:
        loop: The inner loop.
        params: All parameters ``{name: tensor}`` (the starting point :math:`\\theta`).
        support_loss: ``support_loss(all_params) -> scalar``.
        grad_source: :func:`autograd_support_grads` (loop path) or
            :func:`functorch_support_grads` (vmap/compiled paths).
        model: The model ``support_loss`` evaluates, if known (see
            :func:`twice_differentiable_forward`).

    Returns:
        ``{name: tensor}`` of all parameters after ``loop.inner_steps`` steps.
    """
    if loop.track_graph:
        base = dict(params)
    else:
        base = {n: p.detach() for n, p in params.items()}
    fast = {n: base[n] for n in loop.adapt_names}
    fast, _ = take_inner_steps(loop, base, fast, {}, support_loss, loop.inner_steps, grad_source, model)
    return {**base, **fast}


def take_inner_steps(
    loop: InnerLoop,
    base: Mapping[str, torch.Tensor],
    fast: Tensors,
    state: dict[str, Any],
    support_loss: LossOf,
    steps: int,
    grad_source: GradSource = autograd_support_grads,
    model: nn.Module | None = None,
) -> tuple[Tensors, dict[str, Any]]:
    """Take ``steps`` inner steps from ``fast`` (with the update rule's ``state``).

    Args:
        loop: The inner loop (its ``inner_steps`` is not used here).
        base: All parameters at the start of the adaptation (the regulariser's anchor; the
            values of the parameters that are not adapted).
        fast: Current adapted weights.
        state: The update rule's state so far (not modified).
        support_loss: ``support_loss(all_params) -> scalar``.
        steps: Number of steps.
        grad_source: See :func:`run_inner_loop`.
        model: See :func:`run_inner_loop`.

    Returns:
        ``(fast, state)`` after the steps.
    """
    if not fast or steps == 0:
        return fast, state
    create_graph = loop.second_order and torch.is_grad_enabled()
    base = dict(base)

    def loss_of(adapted: Tensors) -> torch.Tensor:
        current = {**base, **adapted}
        loss = support_loss(current)
        if loop.inner_reg_fn is not None:
            loss = loss + loop.inner_reg_fn(current, dict(base))
        return loss

    checkpointed = loop.checkpoint and create_graph
    with twice_differentiable_forward(create_graph, model):
        for _ in range(steps):
            if checkpointed:
                from torch.utils.checkpoint import checkpoint

                losses = _SameSupportLosses(loss_of)
                fast, state = checkpoint(
                    _one_step, loop, losses, grad_source, create_graph, fast, state,
                    use_reentrant=False,
                    context_fn=functools.partial(_checkpoint_contexts, model, losses),
                )
            else:
                fast, state = _one_step(loop, loss_of, grad_source, create_graph, fast, state)
    return fast, state


def modules_under_several_names(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` registered under more than one name, as in
    ``nn.Sequential(block, nn.Tanh(), block)`` (the way to apply one layer twice)."""
    seen: set[int] = set()
    reused: dict[int, nn.Module] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            reused[id(module)] = module
        seen.add(id(module))
    return list(reused.values())


def stateless_call(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    reused: Sequence[nn.Module] | None = None,
) -> Any:
    """:func:`torch.func.functional_call` of ``model`` with ``params`` and ``buffers``, which
    leaves the model as it was also when a submodule is registered under two names.

    torch swaps such a module's tensors in once per name and back in the same order, so the
    second swap records the call's tensors as the originals and the module keeps them: its
    parameters are replaced by the fast weights, silently detached from the optimizer. The
    members of those modules are put back here.

    Args:
        reused: :func:`modules_under_several_names` of ``model``, when the caller knows them
            (found here otherwise).
    """
    if reused is None:
        reused = modules_under_several_names(model)
    # Module._parameters and ._buffers: the registries torch's functional_call swaps in place.
    kept = [(module, dict(module._parameters), dict(module._buffers)) for module in reused]
    try:
        return functional_call(model, (dict(params), dict(buffers)), args, kwargs)
    finally:
        for module, module_params, module_buffers in kept:
            module._parameters.update(module_params)
            module._buffers.update(module_buffers)


class _TwiceDifferentiable:
    """A re-enterable :func:`twice_differentiable_forward` (a checkpoint may recompute a step
    more than once, e.g. in a double backward) for ``model``."""

    def __init__(self, model: nn.Module | None) -> None:
        self._model = model
        self._contexts: list[contextlib.AbstractContextManager[None]] = []  # one per entry under way

    def __enter__(self) -> None:
        context = twice_differentiable_forward(True, self._model)
        context.__enter__()
        self._contexts.append(context)

    def __exit__(self, *exc_info: Any) -> Any:
        return self._contexts.pop().__exit__(*exc_info)


class _Recomputation(_TwiceDifferentiable):
    """The recompute context of a checkpointed step: twice differentiable, its support losses
    compared with those of the step's forward (re-enterable too)."""

    def __init__(self, model: nn.Module | None, losses: _SameSupportLosses) -> None:
        super().__init__(model)
        self._losses = losses
        self._marks: list[contextlib.AbstractContextManager[None]] = []

    def __enter__(self) -> None:
        mark = self._losses.recomputation()
        mark.__enter__()
        self._marks.append(mark)
        try:
            super().__enter__()
        except BaseException:
            self._marks.pop().__exit__(None, None, None)
            raise

    def __exit__(self, *exc_info: Any) -> Any:
        try:
            return super().__exit__(*exc_info)
        finally:
            self._marks.pop().__exit__(None, None, None)


def _checkpoint_contexts(model: nn.Module | None, losses: _SameSupportLosses) -> tuple[Any, Any]:
    """The forward and the recomputation of a checkpointed step are both twice differentiable;
    the recomputation's support losses are checked against the forward's."""
    return _TwiceDifferentiable(model), _Recomputation(model, losses)


# ---------------------------------------------------------------------- one task
def _task_loss(
    model: nn.Module,
    loop: InnerLoop,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    grad_source: GradSource,
    params: Tensors,
    buffers: Tensors,
    support_x: Any,
    support_y: Any,
    query_x: Any,
    query_y: Any,
    reused: Sequence[nn.Module],
) -> tuple[torch.Tensor, Tensors]:
    """Adapt on the support set and return (query loss, adapted weights) of one task
    (``reused``: :func:`modules_under_several_names` of ``model``)."""

    def forward(weights: Tensors, x: Any) -> Any:
        # A fresh copy of the buffers per forward (the BatchNorm policy of functional.py).
        return stateless_call(model, weights, {n: b.clone() for n, b in buffers.items()}, (x,), reused=reused)

    adapted = run_inner_loop(loop, params, lambda w: loss_fn(forward(w, support_x), support_y), grad_source, model)
    with torch.set_grad_enabled(loop.track_graph and torch.is_grad_enabled()):
        loss = loss_fn(forward(adapted, query_x), query_y)
    return loss, {n: adapted[n] for n in loop.adapt_names}


def _loop_task_losses(
    model: nn.Module,
    loop: InnerLoop,
    params: Tensors,
    tasks: Sequence[Task],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    backward_weights: Sequence[float] | None,
) -> tuple[torch.Tensor, list[Tensors]]:
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    reused = modules_under_several_names(model)
    losses, adapted = [], []
    for i, task in enumerate(tasks):
        loss, fast = _task_loss(
            model, loop, loss_fn, autograd_support_grads, params, buffers,
            task.support_x, task.support_y, task.query_x, task.query_y, reused,
        )
        check_scalar_loss(loss, f"the query loss of tasks[{i}]")
        if backward_weights is not None:
            if loss.requires_grad and backward_weights[i] != 0:
                (loss * backward_weights[i]).backward()
            loss = loss.detach()  # this task's graph is freed before the next task
        losses.append(loss)
        adapted.append(fast)
    return torch.stack(losses), adapted


def _vmap_task_losses(
    model: nn.Module,
    loop: InnerLoop,
    params: Tensors,
    tasks: Sequence[Task],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    backward_weights: Sequence[float] | None,
) -> tuple[torch.Tensor, list[Tensors]]:
    losses, fast = vmapped_task_losses(model, loop, params, *stack_tasks(tasks), loss_fn)
    if backward_weights is not None:
        if losses.requires_grad:
            weights = torch.as_tensor(list(backward_weights), dtype=losses.dtype, device=losses.device)
            (losses * weights).sum().backward()
        losses = losses.detach()
    return losses, [{n: v[i] for n, v in fast.items()} for i in range(len(tasks))]


def vmapped_task_losses(
    model: nn.Module,
    loop: InnerLoop,
    params: Tensors,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    loss_fn: Callable[[Any, Any], torch.Tensor],
) -> tuple[torch.Tensor, Tensors]:
    """The vmap path on stacked task tensors (leading axis: task); a pure function.

    Returns:
        ``(losses, adapted)``: shape ``(T,)`` query losses and the adapted weights, each with a
        leading task axis.
    """
    n_tasks = support_x.shape[0]
    buffers = {n: b.detach().unsqueeze(0).expand(n_tasks, *b.shape).clone() for n, b in model.named_buffers()}
    reused = modules_under_several_names(model)

    def one_task(p: Tensors, bufs: Tensors, sx: Any, sy: Any, qx: Any, qy: Any) -> tuple[torch.Tensor, Tensors]:
        loss, fast = _task_loss(model, loop, loss_fn, functorch_support_grads, p, bufs, sx, sy, qx, qy, reused)
        check_scalar_loss(loss, "the query loss of a task")  # under vmap: one task's shape
        return loss, fast

    return vmap(one_task, in_dims=(None, 0, 0, 0, 0, 0), randomness="different")(
        dict(params), buffers, support_x, support_y, query_x, query_y
    )


_IMPLEMENTATIONS = {"loop": _loop_task_losses, "vmap": _vmap_task_losses}


def task_losses(
    model: nn.Module,
    loop: InnerLoop,
    params: Mapping[str, torch.Tensor],
    tasks: Sequence[Task],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    path: str = "loop",
    backward_weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, list[Tensors]]:
    """Adapt to every task and return the query losses and adapted weights: the dispatcher.

    Args:
        model: The module (run with :func:`torch.func.functional_call`).
        loop: The inner loop.
        params: All parameters ``{name: tensor}``.
        tasks: The meta-batch.
        loss_fn: ``loss_fn(prediction, target) -> scalar``.
        path: ``"loop"`` or ``"vmap"`` (the compiled path computes gradients, see
            :class:`~samgria.meta.compiled.CompiledMetaLoss`).
        backward_weights: Back-propagate ``sum_i w_i * loss_i`` here (per task on the loop path,
            so only one task's graph is alive at a time) and return detached losses.

    Returns:
        ``(losses, adapted)``: shape ``(len(tasks),)`` and one ``{name: tensor}`` per task.
    """
    if path not in _IMPLEMENTATIONS:
        raise ValueError(f"path must be one of {sorted(_IMPLEMENTATIONS)}, got {path!r}")
    blocker = None if path == "loop" else vmap_blocker(model, loop, tasks)
    if blocker is not None:
        raise ValueError(f"the {path} path cannot be used: {blocker}")
    return _IMPLEMENTATIONS[path](model, loop, dict(params), tasks, loss_fn, backward_weights)


# ---------------------------------------------------------------------- what vmap can do
def second_order_vmap_blocker(model: nn.Module) -> str | None:
    """Name a submodule whose second-order gradient torch's ``vmap`` gets wrong, or ``None``.

    These are BatchNorm/InstanceNorm layers normalising with batch statistics (train mode or
    ``track_running_stats=False``) and LayerNorm layers: the batching rules of their double
    backward give wrong values (pytorch/functorch#534; checked against a loop and finite
    differences with torch 2.13). :func:`vmap_blocker` refuses a second-order loop only where
    its support gradient reaches one of them.

    Args:
        model: The module to inspect (its current train/eval mode counts).

    Returns:
        ``"name (TypeName)"`` of the first such submodule, or ``None``.
    """
    for name, module in _vmap_unsafe_norms(model):
        return _module_label(name, module)
    return None


def _module_label(name: str, module: nn.Module) -> str:
    return f"{name or '<model>'} ({type(module).__name__})"


def _vmap_unsafe_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules :func:`second_order_vmap_blocker` looks for, in ``named_modules`` order."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    return [
        (name, module)
        for name, module in model.named_modules()
        if (isinstance(module, norm_types) and (module.training or not module.track_running_stats))
        or isinstance(module, nn.LayerNorm)
    ]


def _norms_reached_by_adaptation(
    model: nn.Module, adapt_names: Sequence[str], norms: Sequence[tuple[str, nn.Module]]
) -> list[str] | None:
    """Which of ``norms`` an inner step's second-order gradient passes through, or ``None``
    when that cannot be told without running the model (then every one of them may be).

    The support gradient :math:`\\nabla_\\phi \\mathcal{L}^s` back-propagates through a module
    only where the module holds an adapted parameter or its input depends on one; only there does
    the meta-gradient need the module's double backward. In an ``nn.Sequential`` (its own
    ``forward``, no hooks) the data flows in the order of its children, so a norm in a child
    before the first child that holds an adapted parameter (shared parameters counted wherever
    they are registered) is not reached: ANIL's body before its head needs its first backward
    alone, which vmap batches correctly. Any other model is not run to find out (its forward
    could keep state, draw random numbers or see the probe's tensors): every norm counts.
    A child that reads another child's parameters without registering them is not seen.
    """
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return None
    # Module._forward_hooks and friends: a hook could route an adapted parameter anywhere, and
    # torch has no public way to ask whether a module has hooks.
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks")
    if any(getattr(module, name, None) for module in model.modules() for name in hook_dicts) or any(
        getattr(nn.modules.module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")
    ):
        return None
    names = set(adapt_names)
    adapted = {id(param) for name, param in model.named_parameters() if name in names}
    children = list(model)
    first = next(
        (
            index
            for index, child in enumerate(children)
            if any(id(param) in adapted for _, param in child.named_parameters(remove_duplicate=False))
        ),
        len(children),
    )
    # The last child each module is registered under (a module reused counts where it is last).
    last_child = {
        id(module): index
        for index, child in enumerate(children)
        for _, module in child.named_modules(remove_duplicate=False)
    }
    return [
        _module_label(name, norm) for name, norm in norms if last_child.get(id(norm), len(children)) >= first
    ]


def _signature(t: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(t.shape), t.dtype, t.device)


def _task_mismatch(tasks: Sequence[Task]) -> str | None:
    """Why ``tasks`` cannot be stacked along a task axis, or ``None`` when they can.

    The reason reads ``"got ..."`` and names the first task and field whose tensor is missing or
    differs from the first task's in shape, dtype or device.
    """
    if not tasks:
        return "got no tasks"
    fields = ("support_x", "support_y", "query_x", "query_y")
    for index, task in enumerate(tasks):
        for field in fields:
            value, first = getattr(task, field, None), getattr(tasks[0], field, None)
            if not isinstance(value, torch.Tensor):
                return f"got tasks[{index}].{field} = {type(value).__name__}"
            first_tensor = cast(torch.Tensor, first)  # tasks[0].{field} passed the check at index 0
            if _signature(value) != _signature(first_tensor):
                shape, dtype, device = _signature(value)
                first_shape, first_dtype, first_device = _signature(first_tensor)
                return (
                    f"got tasks[{index}].{field} of shape {shape}, {dtype} on {device} and tasks[0].{field} "
                    f"of shape {first_shape}, {first_dtype} on {first_device}"
                )
    return None


def can_vectorize(tasks: Sequence[Task]) -> bool:
    """Return ``True`` when every task's four tensors have the same shapes, dtypes and devices."""
    return _task_mismatch(tasks) is None


def stack_tasks(tasks: Sequence[Task]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack equal-shape tasks into ``(support_x, support_y, query_x, query_y)`` with a task axis.

    Raises:
        ValueError: ``tasks`` is empty, or a task's tensor differs from the first task's in
            shape, dtype or device (the message names the task and the field).
    """
    mismatch = _task_mismatch(tasks)
    if mismatch is not None:
        raise ValueError(f"stack_tasks needs tasks whose tensors all have equal shapes, dtypes and devices, {mismatch}")
    return (
        torch.stack([t.support_x for t in tasks]),
        torch.stack([t.support_y for t in tasks]),
        torch.stack([t.query_x for t in tasks]),
        torch.stack([t.query_y for t in tasks]),
    )


def refuse_unvectorisable(model: nn.Module, loop: InnerLoop, tasks: Sequence[Task] | None = None) -> None:
    """Raise ``ValueError`` where ``vectorize=True`` asks for a vmap path that :func:`vmap_blocker`
    refuses (``tasks=None``: what the model and the loop alone decide, known at construction)."""
    blocker = vmap_blocker(model, loop, tasks)
    if blocker is not None:
        raise ValueError(f"vectorize=True cannot be honoured: {blocker}; use vectorize=None/False")


def vmap_blocker(model: nn.Module, loop: InnerLoop, tasks: Sequence[Task] | None = None) -> str | None:
    """Say why the vmap (and compiled) path cannot run ``loop`` on ``tasks``, or ``None``.

    A second-order loop is refused where its support gradient may back-propagate through a
    module :func:`second_order_vmap_blocker` names: in an ``nn.Sequential``, one in or after the
    first child that holds an adapted parameter; in any other model, every such module.
    """
    if loop.checkpoint and loop.second_order:
        return (
            "checkpointed inner steps need the loop path (torch.func transforms do not support "
            "the saved-tensor hooks of torch.utils.checkpoint)"
        )
    if loop.second_order:
        norms = _vmap_unsafe_norms(model)
        if norms:
            reached = _norms_reached_by_adaptation(model, loop.adapt_names, norms)
            if reached is None:
                return (
                    f"second-order gradients may pass through {_module_label(*norms[0])}, whose double "
                    "backward torch.func.vmap gets wrong (pytorch/functorch#534)"
                )
            if reached:
                return (
                    f"second-order gradients pass through {reached[0]}, whose double backward "
                    "torch.func.vmap gets wrong (pytorch/functorch#534)"
                )
    if tasks is not None and not can_vectorize(list(tasks)):
        return "the tasks do not all have equal shapes, dtypes and devices"
    return None
