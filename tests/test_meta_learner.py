"""Learner: clone / adapt(loss) / adapt_on / adapt_closure against hand-written SGD steps."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from samgria.meta.functional import functional_forward
from samgria.meta.inner_optim import InnerSAM
from samgria.meta.learner import Learner
from samgria.meta.maml import MAML
from samgria.data.task import Task

DT = torch.float64
mse = nn.functional.mse_loss


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 1, bias=False).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 1, dtype=DT)
    return model, x, y


def ls_grad(w, x, y):
    return (2.0 / x.shape[0]) * ((x @ w.T - y).T @ x)


def test_clone_adapt_is_chainable_and_equals_hand_written_steps():
    model, x, y = setup()
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, lr=0.5)
    learner = meta.clone()
    assert learner.params["weight"] is model.weight
    out = learner.adapt(mse(learner(x), y))
    assert out is learner
    learner.adapt(mse(learner(x), y))
    w = model.weight.detach()
    for _ in range(2):
        w = w - 0.1 * ls_grad(w, x, y)
    torch.testing.assert_close(learner.params["weight"], w, rtol=0, atol=1e-12)
    assert learner.steps_taken == 2
    torch.testing.assert_close(learner(x), x @ w.T, rtol=0, atol=1e-12)


def test_adapt_on_and_adapt_closure_equal_manual_adapt():
    model, x, y = setup()
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, inner_steps=3, lr=0.5)
    manual = meta.clone()
    for _ in range(3):
        manual.adapt(mse(manual(x), y))
    on = meta.clone().adapt_on(mse, x, y)
    closure = meta.clone().adapt_closure(lambda f: mse(f(x), y))
    for other in (on, closure):
        torch.testing.assert_close(other.params["weight"], manual.params["weight"], rtol=0, atol=0)
    two = meta.clone().adapt_on(mse, x, y, 2)
    assert two.steps_taken == 2
    zero = meta.clone().adapt_on(mse, x, y, steps=0)
    assert zero.params["weight"] is model.weight


def test_second_order_graph_reaches_model_and_first_order_drops_hessian():
    model, x, y = setup()
    xq, yq = x.flip(0), y.flip(0)
    w = model.weight.detach()
    w1 = w - 0.1 * ls_grad(w, x, y)
    hess = (2.0 / 6) * x.T @ x
    g_q = ls_grad(w1, xq, yq)
    second = Learner(model, inner_lr=0.1).adapt_on(mse, x, y)
    mse(second(xq), yq).backward()
    torch.testing.assert_close(model.weight.grad, g_q @ (torch.eye(3, dtype=DT) - 0.1 * hess), rtol=0, atol=1e-12)
    model.weight.grad = None
    first = Learner(model, inner_lr=0.1, first_order=True).adapt_on(mse, x, y)
    mse(first(xq), yq).backward()
    torch.testing.assert_close(model.weight.grad, g_q, rtol=0, atol=1e-12)


def test_track_graph_false_detaches_from_the_model():
    model, x, y = setup()
    learner = Learner(model, inner_lr=0.1, track_graph=False).adapt_on(mse, x, y, steps=2)
    assert learner.params["weight"].grad_fn is None
    assert learner.params["weight"] is not model.weight
    w = model.weight.detach()
    for _ in range(2):
        w = w - 0.1 * ls_grad(w, x, y)
    torch.testing.assert_close(learner.params["weight"].detach(), w, rtol=0, atol=1e-12)


def test_params_property_is_a_fresh_dict_and_forward_with_overrides():
    model, x, y = setup()
    learner = Learner(model)
    d = learner.params
    d.clear()
    assert "weight" in learner.params
    zeros = {"weight": torch.zeros(1, 3, dtype=DT)}
    assert torch.equal(learner.forward_with(zeros)(x), torch.zeros(6, 1, dtype=DT))
    assert torch.equal(learner(x), functional_forward(model, {"weight": model.weight}, x))
    assert "Learner(model=Linear" in repr(learner)


def test_inner_reg_fn_is_added_to_the_support_loss():
    model, x, y = setup()
    lam = 2.0

    def proximal(current, base):
        return 0.5 * lam * ((current["weight"] - base["weight"]) ** 2).sum()

    learner = Learner(model, inner_lr=0.1, inner_reg_fn=proximal).adapt_on(mse, x, y, steps=2)
    w0 = model.weight.detach()
    w = w0
    for _ in range(2):
        w = w - 0.1 * (ls_grad(w, x, y) + lam * (w - w0))
    torch.testing.assert_close(learner.params["weight"], w, rtol=0, atol=1e-12)


def test_grad_transforms_need_a_closure():
    model, x, y = setup()
    learner = Learner(model, grad_transforms=[InnerSAM(0.1)])
    with pytest.raises(ValueError, match="grad_transforms need to re-evaluate the support loss"):
        learner.adapt(mse(learner(x), y))


def test_learner_refuses_frozen_adapt_names_and_an_empty_adapt_set():
    """A frozen parameter named in adapt_names was dropped without a word: a learner over a frozen
    head "took" its steps and left the output unchanged. It is refused, and so is a learner that
    would adapt nothing; a frozen parameter outside adapt_names stays allowed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)).to(DT)
    model[1].requires_grad_(False)
    x, y = torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)
    message = r"^adapt_names contains parameters that do not require grad, which cannot be adapted: \['1\.weight'\]$"
    with pytest.raises(ValueError, match=message):
        Learner(model, adapt_names=["0.weight", "1.weight"])
    with pytest.raises(ValueError, match=r"^Learner adapts no parameter: adapt_names=\[\]; a learner adapts at least one \(to run the model without adaptation, call the model itself\)$"):
        Learner(model, adapt_names=[])
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match=r"none of the 4 does"):
        Learner(model)
    model[0].requires_grad_(True)
    learner = Learner(model, inner_lr=0.5)  # adapts the trainable layer only
    assert learner.adapt_names == ["0.weight", "0.bias"]
    before = learner(x).detach()
    learner.adapt(mse(learner(x), y))
    assert not torch.equal(learner(x), before)


def test_learner_errors_name_argument_and_value():
    model, x, y = setup()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        Learner({})
    with pytest.raises(ValueError, match=r"lr must be a finite number >= 0, got -0\.5"):
        Learner(model, inner_lr=-0.5)
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 0, got -1"):
        Learner(model, inner_steps=-1)
    with pytest.raises(ValueError, match=r"adapt_names contains names that are not parameters of model: \['bias'\]"):
        Learner(model, adapt_names=["bias"])
    with pytest.raises(TypeError, match=r"^adapt_names must be a sequence of parameter names, got 'weight'$"):
        Learner(model, adapt_names="weight")  # not the names 'w', 'e', 'i', ...
    with pytest.raises(TypeError, match="inner_step_fn must be callable, got 1"):
        Learner(model, inner_step_fn=1)
    with pytest.raises(TypeError, match="inner_reg_fn must be callable, got 'l2'"):
        Learner(model, inner_reg_fn="l2")
    with pytest.raises(TypeError, match="grad_transforms entries must have a transform_inner_grads method"):
        Learner(model, grad_transforms=[object()])
    with pytest.raises(TypeError, match="first_order must be a bool, got None"):
        Learner(model, first_order=None)
    with pytest.raises(TypeError, match=r"^track_graph must be a bool, got 'no'$"):
        Learner(model, track_graph="no")  # was read by truth value: tracking on
    with pytest.raises(TypeError, match=r"^checkpoint must be a bool, got nan$"):
        Learner(model, checkpoint=float("nan"))
    learner = Learner(model)
    with pytest.raises(TypeError, match="loss_fn must be callable, got 'mse'"):
        learner.adapt_on("mse", x, y)
    with pytest.raises(TypeError, match="support_closure must be callable, got 5"):
        learner.adapt_closure(5)
    with pytest.raises(ValueError, match=r"^steps must be an integer >= 0, got -3$"):
        learner.adapt_on(mse, x, y, steps=-3)
    with pytest.raises(TypeError, match="the support loss must be a scalar tensor, got float"):
        learner.adapt(1.0)


@pytest.mark.parametrize("first_order", [False, True])
def test_adapt_on_a_loss_not_built_from_the_fast_weights_raises_and_changes_nothing(first_order):
    model, x, y = setup()
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, lr=0.5, first_order=first_order)
    learner = meta.clone()
    learner.adapt(mse(learner(x), y))  # the fast weights are no longer the model's own
    params, state = learner.params, learner._inner_state
    other = torch.randn(3, 1, dtype=DT, requires_grad=True)
    for loss in (mse(model(x), y), mse(x @ other, y)):
        with pytest.raises(ValueError, match="the support loss depends on none of the [0-9]+ adapted weights"):
            learner.adapt(loss)
        assert learner.steps_taken == 1
        assert learner._inner_state is state
        assert all(learner.params[n] is p for n, p in params.items())
    w = model.weight.detach() - 0.1 * ls_grad(model.weight.detach(), x, y)
    torch.testing.assert_close(learner.params["weight"], w, rtol=0, atol=1e-12)


class UsesOneHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 1, bias=False)
        self.unused = nn.Linear(3, 1, bias=False)

    def forward(self, x):
        return self.used(x)


def test_a_loss_using_only_some_adapted_weights_adapts_those_and_leaves_the_rest():
    torch.manual_seed(0)
    model = UsesOneHead().to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 1, dtype=DT)
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, lr=0.5)
    w = model.used.weight.detach()
    for _ in range(2):
        w = w - 0.1 * ls_grad(w, x, y)
    learner = meta.clone()
    learner.adapt(mse(learner(x), y)).adapt(mse(learner(x), y))
    for adapted in (learner, meta.adapt(lambda f: mse(f(x), y), inner_steps=2)):
        torch.testing.assert_close(adapted.params["used.weight"], w, rtol=0, atol=1e-12)
        assert adapted.params["unused.weight"] is model.unused.weight


def test_an_adapted_group_the_task_loss_does_not_use_gives_the_same_losses_on_both_paths():
    """The refusal of a disconnected support loss is for losses the user computes (learner and
    closure APIs); task_losses computes its own, and its loop path must agree with vmap (which
    gets zero gradients for unused weights) rather than raise."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.extra = nn.Linear(3, 1), nn.Linear(3, 1)

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = Gated()
    meta = MAML(model, torch.optim.SGD, lr=0.1, params=[{"params": model.body.parameters(), "adapt": False}, {"params": model.extra.parameters()}])
    generator = torch.Generator().manual_seed(0)
    tasks = [Task(*(torch.randn(5, n, generator=generator) for n in (3, 1, 3, 1))) for _ in range(3)]
    loop = meta.task_losses(tasks, nn.functional.mse_loss, vectorize=False)
    vmapped = meta.task_losses(tasks, nn.functional.mse_loss, vectorize=True)
    torch.testing.assert_close(loop, vmapped, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        expected = torch.stack([nn.functional.mse_loss(model(t.query_x), t.query_y) for t in tasks])
    torch.testing.assert_close(loop, expected, rtol=1e-6, atol=1e-7)


def test_a_learner_refuses_a_tensor_rate_that_would_change_its_parameters_shape():
    """Learner(m, inner_lr={"bias": torch.ones(3)}) for a bias of shape (1,) adapted it to shape (3,)."""
    model = nn.Linear(2, 1)
    message = "inner_lr['bias'] must be a number or a tensor broadcastable to its parameter's shape (1,), got a tensor of shape (3,)"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        Learner(model, inner_lr={"weight": 0.1, "bias": torch.ones(3)})
    learner = Learner(model, inner_lr={"weight": torch.tensor(0.1), "bias": torch.full((1,), 0.2)})
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    g_w, g_b = torch.autograd.grad(nn.functional.mse_loss(model(x), y), [model.weight, model.bias])
    learner.adapt_on(nn.functional.mse_loss, x, y)
    assert learner.params["bias"].shape == (1,)
    torch.testing.assert_close(learner.params["bias"], model.bias - 0.2 * g_b)
    torch.testing.assert_close(learner.params["weight"], model.weight - 0.1 * g_w)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"params": {"weight": 0.1}}, r"^params\['weight'\] must be a tensor, got 0\.1$"),
        ({"params": "x"}, r"^params must be a mapping of parameter names to tensors, got 'x'$"),
        ({"params": 3}, r"^params must be a mapping of parameter names to tensors, got 3$"),
        ({"adapt_names": 3}, r"^adapt_names must be a sequence of parameter names, got 3$"),
        ({"first_order": 1}, r"^first_order must be a bool, got 1$"),
    ],
    ids=["float-value", "str", "int", "adapt-names-int", "first-order-int"],
)
def test_learner_refuses_bad_params_and_adapt_names_naming_them(kwargs, message):
    """``params={"weight": 0.1}`` raised AttributeError ('float' has no 'requires_grad'),
    ``params="x"`` a ValueError of ``dict()``, ``adapt_names=3`` ``'int' object is not iterable``."""
    model, _, _ = setup()
    with pytest.raises(TypeError, match=message):
        Learner(model, **kwargs)


def test_learner_takes_a_numpy_bool_first_order_and_named_parameter_pairs():
    """``first_order=np.True_`` was refused (check_bool accepts it elsewhere); it is the bool it
    holds. ``params`` as ``(name, tensor)`` pairs is still taken as their dict."""
    np = pytest.importorskip("numpy")
    model, x, y = setup()
    w = model.weight.detach()
    learner = Learner(model, params=model.named_parameters(), inner_lr=0.1, first_order=np.True_)
    assert learner.first_order is True
    learner.adapt_on(mse, x, y)
    torch.testing.assert_close(learner.params["weight"], w - 0.1 * ls_grad(w, x, y), rtol=1e-12, atol=1e-14)
    # first order: the adapted weight's gradient w.r.t. the initial one is the identity
    (grad,) = torch.autograd.grad(learner.params["weight"].sum(), model.weight)
    torch.testing.assert_close(grad, torch.ones_like(w), rtol=0, atol=0)


def test_learner_takes_a_parameter_dict_and_name_tensor_lists():
    """``Learner(m, nn.ParameterDict(...))`` and ``Learner(m, [[name, tensor]])`` were refused
    (only a Mapping or tuples were taken); anything ``dict()`` takes as name/tensor pairs is
    taken, and a non-str name or non-tensor value is still refused naming params."""
    model, x, y = setup()
    w = model.weight.detach()
    expected = w - 0.1 * ls_grad(w, x, y)
    for params in (nn.ParameterDict({"weight": nn.Parameter(w.clone())}), [["weight", w.clone().requires_grad_()]]):
        learner = Learner(model, params=params, inner_lr=0.1)
        assert learner.adapt_names == ["weight"]
        learner.adapt_on(mse, x, y)
        torch.testing.assert_close(learner.params["weight"], expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match=r"^params must be a mapping of parameter names to tensors, got the key 0$"):
        Learner(model, params=[[0, w.clone().requires_grad_()]])
    with pytest.raises(TypeError, match=r"^params\['weight'\] must be a tensor, got 0\.5$"):
        Learner(model, params=[["weight", 0.5]])
    with pytest.raises(TypeError, match=r"^params must be a mapping of parameter names to tensors, got \[\[1, 2, 3\]\]$"):
        Learner(model, params=[[1, 2, 3]])


def test_inner_reg_fn_gets_the_current_weights_first_and_the_base_second():
    """``inner_reg_fn(current, base)``: an asymmetric regulariser (a pull of the current weights
    towards 0, the base only read) against hand-written steps."""
    model, x, y = setup()
    lam = 2.0
    seen = []

    def towards_zero(current, base):
        seen.append(base["weight"])
        return 0.5 * lam * (current["weight"] ** 2).sum()

    learner = Learner(model, inner_lr=0.1, inner_reg_fn=towards_zero).adapt_on(mse, x, y, steps=3)
    w = model.weight.detach()
    for _ in range(3):
        w = w - 0.1 * (ls_grad(w, x, y) + lam * w)
    torch.testing.assert_close(learner.params["weight"], w, rtol=0, atol=1e-12)
    assert len(seen) == 3 and all(torch.equal(b, model.weight) for b in seen)


class _ScaleGrads:
    def __init__(self, factor):
        self.factor = factor

    def transform_inner_grads(self, fast, grads, grad_fn):
        return {n: g * self.factor for n, g in grads.items()}


class _ShiftGrads:
    def transform_inner_grads(self, fast, grads, grad_fn):
        return {n: g + 1.0 for n, g in grads.items()}


def test_grad_transforms_apply_in_the_given_order():
    """``grad_transforms=[scale, shift]`` is ``shift(scale(g))``, not ``scale(shift(g))``."""
    model, x, y = setup()
    for transforms, rule in (
        ([_ScaleGrads(3.0), _ShiftGrads()], lambda g: 3.0 * g + 1.0),
        ([_ShiftGrads(), _ScaleGrads(3.0)], lambda g: 3.0 * (g + 1.0)),
    ):
        learner = Learner(model, inner_lr=0.1, grad_transforms=transforms).adapt_on(mse, x, y, steps=2)
        w = model.weight.detach()
        for _ in range(2):
            w = w - 0.1 * rule(ls_grad(w, x, y))
        torch.testing.assert_close(learner.params["weight"], w, rtol=0, atol=1e-12)


class _PreconditionByWeights:
    """Multiplies the gradient by ``w / w.detach()`` (1 in value, but connected to the weights)."""

    def transform_inner_grads(self, fast, grads, grad_fn):
        return {n: g * (fast[n] / fast[n].detach()) for n, g in grads.items()}


def test_first_order_treats_a_transformed_support_gradient_as_a_constant():
    """FOMAML's meta-gradient is the query gradient at the adapted weights, also when a gradient
    transform returns a gradient connected to the meta-parameters."""
    model, x, y = setup()
    xq, yq = torch.randn(5, 3, dtype=DT), torch.randn(5, 1, dtype=DT)
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, lr=0.5, first_order=True)
    learner = meta.adapt(lambda f: mse(f(x), y), 2, grad_transforms=[_PreconditionByWeights()])
    mse(learner(xq), yq).backward()
    w = model.weight.detach()
    for _ in range(2):
        w = w - 0.1 * ls_grad(w, x, y)
    torch.testing.assert_close(learner.params["weight"], w, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.weight.grad, ls_grad(w, xq, yq), rtol=0, atol=1e-12)


def test_a_transform_asking_for_some_weights_gets_their_gradients_only():
    """``grad_fn(weights)`` re-evaluates the support loss with ``weights`` changed and the other
    adapted weights kept, and returns the gradients of the names asked for only."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 1, dtype=DT)
    answers = []

    class _AskForWeight:
        def transform_inner_grads(self, fast, grads, grad_fn):
            answers.append(grad_fn({"weight": fast["weight"] + 0.5}))
            return grads

    Learner(model, inner_lr=0.1, grad_transforms=[_AskForWeight()]).adapt_on(mse, x, y, steps=1)
    (answer,) = answers
    assert set(answer) == {"weight"}
    w, b = model.weight.detach() + 0.5, model.bias.detach()
    expected = (2.0 / 6) * ((x @ w.T + b - y).T @ x)
    torch.testing.assert_close(answer["weight"], expected, rtol=0, atol=1e-12)


def test_checkpointed_inner_steps_recompute_a_stateful_rule_from_its_state_before_the_step():
    """A checkpointed step is recomputed in the backward pass from the update rule's state it
    started from (Adam's moments), not from the state later steps made of it: the
    meta-gradient equals the one of the stored steps."""
    from samgria.meta.inner_optim import AdamInnerStep

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 1, dtype=DT)
    xq, yq = torch.randn(5, 3, dtype=DT), torch.randn(5, 1, dtype=DT)
    grads = []
    for checkpointed in (False, True):
        meta = MAML(model, torch.optim.SGD, inner_lr=0.1, lr=0.5, checkpoint_inner_steps=checkpointed)
        meta.zero_grad()
        learner = meta.adapt(lambda f: mse(f(x), y), 3, inner_step_fn=AdamInnerStep())
        mse(learner(xq), yq).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for stored, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, stored, rtol=1e-10, atol=1e-12)


def test_checkpointed_inner_steps_refuse_a_support_loss_changed_by_two_percent():
    """The recomputation of a checkpointed step tolerates rounding (a relative 1e-3), not a
    support loss that changed by 2% since the step (the closure reads data changed since)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 1, dtype=DT)
    scale = [1.0]
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, lr=0.5, checkpoint_inner_steps=True)
    learner = meta.adapt(lambda f: scale[0] * mse(f(x), y), 2)
    query = mse(learner(x), y)
    scale[0] = 1.02
    with pytest.raises(RuntimeError, match=r"^checkpoint_inner_steps=True recomputes each inner step .* now gives"):
        query.backward()
