"""``Learner``: one adaptable copy of a model's parameters (iteryne / learn2learn style).

A learner holds fast weights :math:`\\phi` (a ``{name: tensor}`` mapping) that start at the
meta-parameters :math:`\\theta` and move with each differentiable inner step

.. math::

    \\phi \\leftarrow \\text{step}\\big(\\phi, \\nabla_\\phi [\\mathcal{L}_{\\text{sup}}(\\phi)
    + R(\\phi, \\theta)]\\big),

where the step is plain SGD by default (:func:`~samgria.meta.inner_optim.sgd_inner_step`) or
any :class:`~samgria.meta.inner_optim.InnerStepFn`, and :math:`R` an optional inner-loop
regulariser. Calling the learner runs the model statelessly with :math:`\\phi`; for
second-order MAML the output is graph-connected to :math:`\\theta`. The model itself is never
modified (see :mod:`samgria.meta.functional` for the BatchNorm policy).

Learners are usually made by :meth:`samgria.meta.base.MetaOptimizer.clone` or
:meth:`~samgria.meta.base.MetaOptimizer.adapt`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from samgria._checks import check_bool
from samgria._wrapper import eager_under_compile
from samgria.meta.engine import (
    InnerLoop,
    InnerRegFn,
    apply_inner_update,
    check_inner_options,
    copy_update_state,
    connected_support_grads,
    grads_of_loss,
    take_inner_steps,
    twice_differentiable_forward,
)
from samgria.meta.functional import (
    LearningRate,
    check_params,
    check_steps,
    functional_forward,
    one_steps_argument,
    resolve_adapt_names,
    resolve_lrs,
)
from samgria.meta.inner_optim import InnerStepFn, sgd_inner_step

__all__ = ["Learner"]



def _params_mapping(params: Any) -> dict[str, torch.Tensor]:
    """``params`` checked as a mapping of parameter names to tensors, as a dict: a mapping, a
    ``torch.nn.ParameterDict``, or an iterable of ``(name, tensor)`` pairs that ``dict()`` takes
    (``model.named_parameters()``, a list of ``[name, tensor]`` lists)."""
    if not callable(getattr(params, "items", None)) and not isinstance(params, (str, bytes, torch.Tensor)):
        try:
            params = dict(params)
        except (TypeError, ValueError):  # not an iterable of pairs: check_params names it
            pass
    return check_params(params)


class Learner:
    """Fast weights of a model that adapt with differentiable inner steps.

    Args:
        model: The module whose architecture defines the forward pass.
        params: Starting fast weights, a mapping of names to tensors or an iterable of
            ``(name, tensor)`` pairs (default: the model's live parameters, so meta-gradients
            accumulate into ``model.parameters()``).
        inner_lr: Step size: a number ``>= 0`` or a mapping name -> number/tensor (Meta-SGD).
        inner_steps: Default number of steps of :meth:`adapt_on` / :meth:`adapt_closure`.
        first_order: Do not differentiate through the support gradients (FOMAML).
        adapt_names: Names of the parameters to adapt (default: all that require grad).
        inner_step_fn: Update rule (default plain SGD).
        inner_reg_fn: ``inner_reg_fn(current_params, base_params) -> scalar`` added to the
            support loss at every step.
        grad_transforms: Objects with ``transform_inner_grads(params, grads, grad_fn)``
            applied in order to the support gradients of :meth:`adapt_on` /
            :meth:`adapt_closure` steps (e.g. :class:`~samgria.meta.inner_optim.InnerSAM`).
        track_graph: ``False`` detaches the fast weights after every step (no graph to the
            meta-parameters at all; used by Reptile and evaluation).
        checkpoint: Recompute each second-order inner step of :meth:`adapt_on` /
            :meth:`adapt_closure` in the backward pass instead of keeping its activations (one set
            of weights kept per step instead). :meth:`adapt` takes a loss computed outside, whose
            activations are kept whatever this says.

    Attributes:
        loop: The :class:`~samgria.meta.engine.InnerLoop` this learner runs (its rule,
            rates, order, regulariser and transforms).

    Raises:
        TypeError: ``model`` is not a module, ``params`` is not a mapping of names to tensors,
            ``inner_lr`` is neither a real number (a bool is none) nor a mapping of names to
            rates, ``inner_steps`` is not an integer, ``adapt_names`` is not a sequence of
            names, a flag is not a bool, or a callable argument is not callable.
        ValueError: ``inner_lr`` is negative or not finite (or, a mapping, has no rate for an
            adapted parameter), ``inner_steps`` is negative, ``adapt_names`` names an unknown
            parameter or one that does not require grad, or no parameter is adapted.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, torch.Tensor] | None = None,
        *,
        inner_lr: LearningRate = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        adapt_names: Iterable[str] | None = None,
        inner_step_fn: InnerStepFn | None = None,
        inner_reg_fn: InnerRegFn | None = None,
        grad_transforms: Sequence[Any] | None = None,
        track_graph: bool = True,
        checkpoint: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        first_order = check_bool("first_order", first_order)
        if params is not None:
            params = _params_mapping(params)
        transforms = check_inner_options(inner_step_fn, inner_reg_fn, grad_transforms)
        self.model = model
        start = dict(model.named_parameters()) if params is None else dict(params)
        if not track_graph:
            start = {n: p.detach().requires_grad_(p.requires_grad) for n, p in start.items()}
        names = resolve_adapt_names(start, adapt_names, "parameters of model" if params is None else "in params")
        if not names:
            raise ValueError(
                f"Learner adapts no parameter: adapt_names={adapt_names!r}; a learner adapts at least "
                "one (to run the model without adaptation, call the model itself)"
            )
        self.loop = InnerLoop(
            adapt_names=tuple(names),
            lrs=resolve_lrs(inner_lr, names, "inner_lr", start),
            inner_steps=check_steps(inner_steps),
            first_order=first_order,
            track_graph=check_bool("track_graph", track_graph),
            inner_step_fn=inner_step_fn if inner_step_fn is not None else sgd_inner_step,
            inner_reg_fn=inner_reg_fn,
            grad_transforms=tuple(transforms),
            checkpoint=check_bool("checkpoint", checkpoint),
        )
        self.base_params: dict[str, torch.Tensor] = dict(start)
        self._params: dict[str, torch.Tensor] = dict(start)
        self._inner_state: dict[str, Any] = {}
        self.steps_taken = 0

    # The inner-loop settings, read from the loop description.
    @property
    def adapt_names(self) -> list[str]:
        """Names of the adapted parameters."""
        return list(self.loop.adapt_names)

    @property
    def lrs(self) -> dict[str, Any]:
        """Step size of each adapted parameter."""
        return dict(self.loop.lrs)

    @property
    def inner_steps(self) -> int:
        """Default number of inner steps."""
        return self.loop.inner_steps

    @property
    def first_order(self) -> bool:
        """Whether support gradients are constants."""
        return self.loop.first_order

    @property
    def track_graph(self) -> bool:
        """Whether fast weights keep a graph to the model."""
        return self.loop.track_graph

    @property
    def inner_step_fn(self) -> InnerStepFn:
        """The update rule."""
        return self.loop.inner_step_fn

    @property
    def inner_reg_fn(self) -> InnerRegFn | None:
        """The inner-loop regulariser, or None."""
        return self.loop.inner_reg_fn

    @property
    def grad_transforms(self) -> list[Any]:
        """Inner gradient transforms."""
        return list(self.loop.grad_transforms)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The current fast weights, ``{name: tensor}`` (a new dict; the tensors are shared)."""
        return dict(self._params)

    def forward_with(self, params: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
        """Return ``f(*args, **kwargs)`` running the model with ``params`` (others: current)."""
        merged = {**self._params, **params}

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._forward(merged, args, kwargs)

        return forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward pass with the current fast weights.

        For a second-order learner, the forward is differentiable twice, as in every
        second-order inner loop of samgria (:func:`~samgria.meta.engine.twice_differentiable_forward`):
        scaled-dot-product attention runs through torch's math backend, and a model wrapped in
        :func:`torch.compile` runs eagerly, because neither the fused attention kernels' backward
        nor a compiled graph's can be differentiated again, which the meta-gradient through the
        support gradients needs. The learner cannot tell a support forward from a query one, so
        both do so.
        """
        return self._forward(self._params, args, kwargs)

    @eager_under_compile  # a compiled function around it: see eager_under_compile
    def _forward(self, params: Mapping[str, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        second_order = self.loop.second_order and torch.is_grad_enabled()
        with twice_differentiable_forward(second_order, self.model):
            return functional_forward(self.model, params, *args, **kwargs)

    @eager_under_compile
    def adapt(self, loss: torch.Tensor) -> Learner:
        """Take one differentiable inner step on a support loss computed with this learner.

        Args:
            loss: Scalar support loss, e.g. ``loss_fn(learner(x), y)``.

        Returns:
            ``self`` (calls can be chained).

        Raises:
            ValueError: ``loss`` is not a scalar connected to the fast weights.
        """
        self._step(loss)
        return self

    def adapt_on(
        self,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        x: Any,
        y: Any,
        inner_steps: int | None = None,
        *,
        steps: int | None = None,
    ) -> Learner:
        """Run ``inner_steps`` inner steps on the support batch ``(x, y)``.

        The support loss ``loss_fn(learner(x), y)`` is recomputed at each step.

        Args:
            loss_fn: ``loss_fn(prediction, target) -> scalar``.
            x: Support inputs.
            y: Support targets.
            inner_steps: Number of steps (default: the learner's ``inner_steps``).
            steps: Former name of ``inner_steps``.

        Returns:
            ``self``.
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        return self.adapt_closure(lambda f: loss_fn(f(x), y), one_steps_argument(inner_steps, steps))

    def adapt_closure(
        self,
        support_closure: Callable[[Callable[..., Any]], torch.Tensor],
        inner_steps: int | None = None,
        *,
        steps: int | None = None,
    ) -> Learner:
        """Run ``inner_steps`` inner steps on ``support_closure(f)``.

        Args:
            support_closure: ``support_closure(f) -> scalar support loss`` where ``f(*inputs)``
                runs the model with the current fast weights.
            inner_steps: Number of steps (default: the learner's ``inner_steps``).
            steps: Former name of ``inner_steps``.

        Returns:
            ``self``.

        Raises:
            TypeError: ``support_closure`` is not callable or ``inner_steps`` not an int.
            ValueError: ``inner_steps`` is negative, or the support loss depends on none of
                the fast weights (nothing changes).
        """
        if not callable(support_closure):
            raise TypeError(f"support_closure must be callable, got {support_closure!r}")
        inner_steps = one_steps_argument(inner_steps, steps)
        steps = self.inner_steps if inner_steps is None else check_steps(inner_steps, "inner_steps")

        names = self.loop.adapt_names

        def support_loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return support_closure(self.forward_with(params))

        with torch.enable_grad():
            fast, self._inner_state = take_inner_steps(
                self.loop,
                self.base_params,
                {n: self._params[n] for n in names},
                self._inner_state,
                support_loss,
                steps,
                connected_support_grads,
                self.model,
            )
        self._set_fast(fast)
        self.steps_taken += steps
        return self

    def _step(self, loss: torch.Tensor) -> None:
        """One inner step on a support loss computed by the caller."""
        names = self.loop.adapt_names
        if not names:  # nothing to adapt (all frozen / adapt=False): a no-op step, as in the vmap path
            self.steps_taken += 1
            return
        if self.loop.inner_reg_fn is not None:
            loss = loss + self.loop.inner_reg_fn(dict(self._params), dict(self.base_params))
        create_graph = self.loop.second_order and torch.is_grad_enabled()
        fast = {n: self._params[n] for n in names}
        grads = grads_of_loss(loss, fast, create_graph, connected=True)
        state = copy_update_state(self._inner_state)
        self._set_fast(apply_inner_update(self.loop, fast, grads, state, create_graph, None))
        self._inner_state = state
        self.steps_taken += 1

    def _set_fast(self, fast: dict[str, torch.Tensor]) -> None:
        if not self.loop.track_graph:
            fast = {n: v.detach().requires_grad_(True) for n, v in fast.items()}
        self._params = {**self._params, **fast}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={type(self.model).__name__}, adapt={len(self.adapt_names)} tensors, "
            f"steps_taken={self.steps_taken}, first_order={self.first_order})"
        )
