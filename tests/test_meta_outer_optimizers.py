"""Meta-optimizers over any outer optimizer, against the bare outer optimizer driven by hand.

The reference meta-step: the meta-gradient (MAML: second order through one inner SGD step) or
Reptile's pseudo-gradient computed by hand with ``torch.autograd``, set as ``.grad``, then the bare
outer optimizer's ``step()``, in float64, bit for bit. Outer optimizers: torch.optim's NAdam, RAdam,
Adamax, ASGD, Rprop, Adafactor, LBFGS, Adam with ``maximize``, pytorch_optimizer's Lion (also with
``maximize``, kept on the object), Prodigy, ScheduleFreeAdamW (``train()``/``eval()``), Ranger21,
StableSPAM, DAdaptAdam, the Hessian optimizers SophiaH and AdaHessian, and a TransformingOptimizer
with SAM. Also: a meta-step that raises or is skipped leaves the weights, the outer state, the
outer param groups and the outer optimizer's own attributes as before; weights-only checkpoints
and an LR scheduler; ``MetaTrainer``; Reptile and ``maximize``.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from meta_helpers import ListSampler
from state_helpers import assert_same, weights_only_roundtrip
from samgria import MAML, SAM, MetaTrainer, Reptile, TransformingOptimizer
from samgria.data import Task

po = pytest.importorskip("pytorch_optimizer")

INNER_LR = 0.1
RHO = 0.05
DT = torch.float64


def _task(generator: torch.Generator) -> Task:
    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=DT)

    return Task(draw(5, 4), draw(5, 2), draw(6, 4), draw(6, 2))


_GEN = torch.Generator().manual_seed(1)
TASKS = [_task(_GEN) for _ in range(6)]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)


def two_groups(model: nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:]}]


def meta_closure(meta, tasks=TASKS[:3], create_graph: bool = False):
    def closure():
        meta.zero_grad()
        losses = []
        for task in tasks:
            learner = meta.adapt(lambda f, task=task: F.mse_loss(f(task.support_x), task.support_y))
            losses.append(F.mse_loss(learner(task.query_x), task.query_y))
        loss = torch.stack(losses).mean()
        if meta.outer_update == "meta_gradient":
            loss.backward(create_graph=create_graph)
        return loss

    return closure


def adapted(model, params, task, create_graph):
    loss = F.mse_loss(functional_call(model, params, (task.support_x,)), task.support_y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return {name: p - INNER_LR * g for (name, p), g in zip(params.items(), grads)}


def hand_maml_grads(model, tasks=TASKS[:3], create_graph: bool = False):
    """MAML's meta-gradient by hand (one second-order inner step), set as ``.grad``."""
    params = dict(model.named_parameters())
    losses = [
        F.mse_loss(functional_call(model, adapted(model, params, t, True), (t.query_x,)), t.query_y) for t in tasks
    ]
    loss = torch.stack(losses).mean()
    if create_graph:
        loss.backward(create_graph=True)
    else:
        for p, g in zip(params.values(), torch.autograd.grad(loss, list(params.values()))):
            p.grad = g
    return loss


def hand_reptile_grads(model, tasks=TASKS[:3]):
    """Reptile's pseudo-gradient ``-mean_i(theta'_i - theta)`` by hand, set as ``.grad``; returns
    the monitoring loss (the mean query loss at the adapted weights, which LBFGS reads)."""
    params = dict(model.named_parameters())
    fast = [adapted(model, params, t, False) for t in tasks]
    with torch.no_grad():
        for name, p in params.items():
            acc = torch.zeros_like(p)
            for f in fast:
                acc.add_(f[name].detach() - p, alpha=1 / len(tasks))
            p.grad = acc.neg_()
        return torch.stack([F.mse_loss(functional_call(model, f, (t.query_x,)), t.query_y) for f, t in zip(fast, tasks)]).mean()


def hand_closure(model, bare, algo, tasks=TASKS[:3], create_graph=False):
    def closure():
        bare.zero_grad()
        if algo is Reptile:
            return hand_reptile_grads(model, tasks)
        return hand_maml_grads(model, tasks, create_graph)

    return closure


def hand_step(model, bare, algo, tasks=TASKS[:3], create_graph=False):
    closure = hand_closure(model, bare, algo, tasks, create_graph)
    if isinstance(bare, torch.optim.LBFGS):
        bare.step(closure)
    else:
        closure()
        bare.step()


def assert_like_bare(meta, model, bare, bare_model) -> None:
    """The weights, the state and the groups (but the meta-optimizer's inner_lr and adapt) of the
    bare optimizer, bit for bit."""
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in bare_model.parameters()], "weights")
    ours, theirs = meta.state_dict(), bare.state_dict()
    assert_same(ours["state"], theirs["state"], "state")
    groups = [{k: v for k, v in g.items() if k not in ("inner_lr", "adapt")} for g in ours["param_groups"]]
    assert_same(groups, theirs["param_groups"], "param_groups")


def attributes(optimizer) -> dict:
    """An optimizer's own attributes but torch's bookkeeping, copied."""
    return {
        key: value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        for key, value in vars(optimizer).items()
        if key not in ("state", "param_groups", "defaults") and not key.startswith("_") and not callable(value)
    }


# -- the cases -----------------------------------------------------------------------------------

CASES = {
    "NAdam": (torch.optim.NAdam, {"lr": 0.01, "weight_decay": 0.1}),
    "RAdam": (torch.optim.RAdam, {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}),
    "Adamax": (torch.optim.Adamax, {"foreach": False}),
    "ASGD": (torch.optim.ASGD, {"t0": 1, "lambd": 0.1}),
    "Rprop": (torch.optim.Rprop, {"etas": (0.5, 1.5)}),
    "Adafactor": (torch.optim.Adafactor, {}),
    "Adam-maximize": (torch.optim.Adam, {"lr": 0.01, "maximize": True}),
    "LBFGS": (torch.optim.LBFGS, {"lr": 0.5, "max_iter": 3}),
    "Lion": (po.Lion, {"lr": 1e-3}),
    "Lion-maximize": (po.Lion, {"lr": 1e-3, "maximize": True}),
    "Prodigy": (po.Prodigy, {}),
    "ScheduleFreeAdamW": (po.ScheduleFreeAdamW, {"lr": 1e-2}),
    "Ranger21": (po.Ranger21, {"num_iterations": 10}),
    "StableSPAM": (po.StableSPAM, {}),
    "DAdaptAdam": (po.DAdaptAdam, {}),
}
MINIMISING = [name for name in CASES if "maximize" not in name]
#: Third-party optimizers that count in their groups (all) and on themselves (StableSPAM).
COUNTING = ["Lion", "ScheduleFreeAdamW", "Ranger21", "StableSPAM"]


def build_pair(name, algo, groups: bool = False):
    """``(meta, model, bare, bare_model)`` for outer optimizer ``name``."""
    cls, kwargs = CASES[name]
    model, bare_model = make_model(), make_model()
    params = two_groups(model) if groups else model.parameters()
    bare_params = two_groups(bare_model) if groups else bare_model.parameters()
    meta = algo(model, cls, inner_lr=INNER_LR, params=params, **copy.deepcopy(kwargs))
    bare = cls(bare_params, **copy.deepcopy(kwargs))
    if hasattr(bare, "train"):  # schedule-free: train mode before stepping
        meta.train()
        bare.train()
    return meta, model, bare, bare_model


@pytest.mark.parametrize("name", list(CASES))
def test_maml_step_equals_a_hand_written_meta_step(name):
    """Also ``maximize=True`` (on the groups, or on the object as pytorch_optimizer keeps it): the
    outer optimizer ascends the meta-loss as the bare one ascends a loss."""
    meta, model, bare, bare_model = build_pair(name, MAML)
    for _ in range(3):
        meta.step(meta_closure(meta))
        hand_step(bare_model, bare, MAML)
    assert_like_bare(meta, model, bare, bare_model)
    if hasattr(bare, "eval"):  # schedule-free: the averaged weights
        meta.eval()
        bare.eval()
        assert_like_bare(meta, model, bare, bare_model)


@pytest.mark.parametrize("name", MINIMISING)
def test_reptile_step_equals_the_pseudo_gradient_by_hand(name):
    meta, model, bare, bare_model = build_pair(name, Reptile)
    for _ in range(3):
        meta.step(meta_closure(meta))
        hand_step(bare_model, bare, Reptile)
    assert_like_bare(meta, model, bare, bare_model)


#: torch's note that backward(create_graph=True) ties a parameter and its gradient in a cycle.
CREATE_GRAPH_WARNING = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")


@CREATE_GRAPH_WARNING
@pytest.mark.parametrize("cls", [po.SophiaH, po.AdaHessian], ids=["SophiaH", "AdaHessian"])
def test_a_hessian_outer_optimizer_equals_the_bare_one_with_create_graph(cls):
    """The closure back-propagates the meta-loss with ``create_graph=True``: the Hutchinson
    estimate differentiates the meta-gradients, as the bare optimizer's does."""
    model, bare_model = make_model(), make_model()
    meta = MAML(model, cls, inner_lr=INNER_LR, lr=0.01)
    bare = cls(bare_model.parameters(), lr=0.01)
    for step in range(2):
        torch.manual_seed(step)  # the Hutchinson probes
        meta.step(meta_closure(meta, create_graph=True))
        torch.manual_seed(step)
        hand_step(bare_model, bare, MAML, create_graph=True)
    assert_like_bare(meta, model, bare, bare_model)


@pytest.mark.parametrize("inner", [torch.optim.Adam, po.Lion], ids=["Adam", "Lion"])
@pytest.mark.parametrize("algo", [MAML, Reptile], ids=["MAML", "Reptile"])
def test_sam_as_outer_optimizer_equals_a_hand_written_sam_meta_step(algo, inner):
    """SAM around the outer optimizer: the meta-update evaluated at theta + rho g / |g|, and the
    same outer optimizer's update of it."""
    model, bare_model = make_model(), make_model()
    outer = TransformingOptimizer(model.parameters(), inner, transforms=[SAM(rho=RHO)], lr=0.01)
    meta = algo(model, outer, inner_lr=INNER_LR)
    bare = inner(bare_model.parameters(), lr=0.01)
    params = list(bare_model.parameters())
    for _ in range(2):
        meta.step(meta_closure(meta))
        hand_closure(bare_model, bare, algo)()
        norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
        originals = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(p.grad.clone(), alpha=float(RHO / norm))
        hand_closure(bare_model, bare, algo)()
        with torch.no_grad():
            for p, w in zip(params, originals):
                p.copy_(w)
        bare.step()
    # (SAM's norm is summed in another order than the hand loop's: close, not bit for bit)
    torch.testing.assert_close(list(model.parameters()), params, rtol=1e-10, atol=1e-12)


# -- a meta-step that raises or is skipped ---------------------------------------------------------


def _failing_step(meta, model, how: str, algo):
    """Run one meta-step that fails: the closure raises, the update is not finite (skipped), or
    the outer step raises after stepping the first group (a group value edited to None)."""
    closure = meta_closure(meta)
    if how == "closure-raises":

        def failing():
            closure()
            raise KeyError("closure failed")

        with pytest.raises(KeyError, match="closure failed"):
            meta.step(failing)
    elif how == "non-finite":

        def non_finite():
            loss = closure()
            if algo is Reptile:
                next(iter(meta._records[0][0].values()))[0, 0] = math.nan
            else:
                next(model.parameters()).grad[0, 0] = math.nan
            return loss

        with pytest.warns(RuntimeWarning, match="is skipped"):
            meta.step(non_finite)
    else:
        betas = meta.param_groups[1]["betas"]
        meta.param_groups[1]["betas"] = None  # the first group steps, the second raises
        try:
            with pytest.raises(TypeError, match="NoneType"):
                if how == "outer-raises-with-closure":
                    meta.step(closure)
                else:
                    closure()
                    meta.step()
        finally:
            meta.param_groups[1]["betas"] = betas


@pytest.mark.parametrize("how", ["closure-raises", "non-finite", "outer-raises-with-closure", "outer-raises"])
@pytest.mark.parametrize("algo", [MAML, Reptile], ids=["MAML", "Reptile"])
@pytest.mark.parametrize("name", COUNTING)
def test_a_failed_meta_step_leaves_the_outer_optimizer_as_before(name, algo, how):
    """The weights, the state, the groups' values (pytorch_optimizer's ``group["step"]``,
    ScheduleFree's ``weight_sum``) and the optimizer's own attributes (StableSPAM's
    ``total_step``, in its checkpoints) are as before; the run goes on as one without the step."""
    meta, model, reference, reference_model = build_pair(name, algo, groups=True)
    reference = algo(reference_model, reference, inner_lr=INNER_LR)  # the same run, no failure
    for _ in range(2):
        meta.step(meta_closure(meta))
        reference.step(meta_closure(reference))
    before, own, weights = copy.deepcopy(meta.state_dict()), attributes(meta.outer), [p.detach().clone() for p in model.parameters()]
    _failing_step(meta, model, how, algo)
    assert_same([p.detach() for p in model.parameters()], weights, "weights")
    assert_same(meta.state_dict(), before, "state_dict()")
    assert_same(attributes(meta.outer), own, "attributes")
    if how == "outer-raises" and algo is Reptile:
        meta.step()  # the tasks adapted before the step that raised are still recorded
    else:
        meta.step(meta_closure(meta))
    reference.step(meta_closure(reference))
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in reference_model.parameters()], "weights")
    assert_same(meta.state_dict(), reference.state_dict(), "state_dict()")


@pytest.mark.parametrize("name", ["StableSPAM", "ScheduleFreeAdamW"])
def test_a_failed_meta_step_over_non_atomic_sam_leaves_its_inner_optimizer_as_before(name):
    """``TransformingOptimizer(atomic=False)`` does not undo its inner step; the meta-step does,
    given a closure: the inner optimizer's groups and attributes too."""
    cls, kwargs = CASES[name]
    model = make_model()
    outer = TransformingOptimizer(two_groups(model), cls, transforms=[SAM(rho=RHO)], atomic=False, **kwargs)
    if hasattr(outer, "train"):
        outer.train()
    meta = MAML(model, outer, inner_lr=INNER_LR)
    for _ in range(2):
        meta.step(meta_closure(meta))
    before, own, weights = copy.deepcopy(meta.state_dict()), attributes(outer.inner), [p.detach().clone() for p in model.parameters()]
    _failing_step(meta, model, "outer-raises-with-closure", MAML)
    assert_same([p.detach() for p in model.parameters()], weights, "weights")
    assert_same(meta.state_dict(), before, "state_dict()")
    assert_same(attributes(outer.inner), own, "attributes")


@pytest.mark.parametrize("algo", [MAML, Reptile], ids=["MAML", "Reptile"])
def test_lbfgs_skipped_at_a_later_evaluation_leaves_everything_as_before(algo):
    """LBFGS steps between evaluations: a non-finite update found at its third evaluation."""
    meta, model, _, _ = build_pair("LBFGS", algo)
    meta.step(meta_closure(meta))
    before, weights = copy.deepcopy(meta.state_dict()), [p.detach().clone() for p in model.parameters()]
    closure, calls = meta_closure(meta), [0]

    def late_non_finite():
        calls[0] += 1
        loss = closure()
        if calls[0] == 3:
            if algo is Reptile:
                next(iter(meta._records[0][0].values()))[0, 0] = math.nan
            else:
                next(model.parameters()).grad[0, 0] = math.inf
        return loss

    with pytest.warns(RuntimeWarning, match="is skipped"):
        meta.step(late_non_finite)
    assert calls[0] == 3
    assert_same([p.detach() for p in model.parameters()], weights, "weights")
    assert_same(meta.state_dict(), before, "state_dict()")


# -- checkpoints, schedulers, MetaTrainer ------------------------------------------------------------


@pytest.mark.parametrize("name", ["NAdam", "Adafactor", "Lion", "Prodigy", "ScheduleFreeAdamW", "Ranger21", "StableSPAM"])
def test_weights_only_checkpoint_with_a_scheduler_resumes_as_the_bare_optimizer_resumes(name):
    """(torch's load casts NAdam's float32 ``mu_product`` to the parameters' dtype: the bare
    optimizer's resumed run is the reference, not its uninterrupted one.)"""
    meta, model, bare, bare_model = build_pair(name, MAML, groups=True)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (meta, bare)]
    for _ in range(2):
        meta.step(meta_closure(meta))
        hand_step(bare_model, bare, MAML)
        for scheduler in schedulers:
            scheduler.step()
    checkpoints = [weights_only_roundtrip(o.state_dict()) for o in (meta, bare, *schedulers)]
    resumed, resumed_model, resumed_bare, resumed_bare_model = build_pair(name, MAML, groups=True)
    resumed_model.load_state_dict(model.state_dict())
    resumed_bare_model.load_state_dict(bare_model.state_dict())
    resumed.load_state_dict(checkpoints[0])
    resumed_bare.load_state_dict(checkpoints[1])
    resumed_schedulers = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (resumed, resumed_bare)]
    for scheduler, checkpoint in zip(resumed_schedulers, checkpoints[2:]):
        scheduler.load_state_dict(checkpoint)
    for _ in range(2):
        resumed.step(meta_closure(resumed))
        hand_step(resumed_bare_model, resumed_bare, MAML)
        for scheduler in resumed_schedulers:
            scheduler.step()
    assert resumed.param_groups[0]["lr"] == CASES[name][1].get("lr", bare.defaults["lr"]) / 16
    assert_like_bare(resumed, resumed_model, resumed_bare, resumed_bare_model)


@pytest.mark.parametrize("name", ["LBFGS", "Adafactor", "Lion", "ScheduleFreeAdamW", "StableSPAM"])
@pytest.mark.parametrize("algo", [MAML, Reptile], ids=["MAML", "Reptile"])
def test_meta_trainer_fit_equals_the_bare_optimizer_driven_by_hand(algo, name):
    meta, model, bare, bare_model = build_pair(name, algo)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler(TASKS), vectorize=False)
    trainer.fit(3, 2, progress=False)
    for it in range(3):
        hand_step(bare_model, bare, algo, TASKS[2 * it : 2 * it + 2])
    torch.testing.assert_close(list(model.parameters()), list(bare_model.parameters()), rtol=1e-12, atol=1e-14)


# -- maximize ------------------------------------------------------------------------------------------


def _maximizing_outers():
    return {
        "group": lambda model: torch.optim.SGD(model.parameters(), lr=0.1, maximize=True),
        "object": lambda model: po.Lion(model.parameters(), lr=0.1, maximize=True),
        "SAM-inner-object": lambda model: TransformingOptimizer(
            model.parameters(), po.Lion, transforms=[SAM(rho=RHO)], lr=0.1, maximize=True
        ),
    }


@pytest.mark.parametrize("where", ["group", "object", "SAM-inner-object"])
def test_reptile_refuses_a_maximizing_outer_optimizer_leaving_it_as_it_was(where):
    """Reptile's pseudo-gradient is no gradient of a loss: a maximizing outer optimizer moved
    theta away from the adapted weights, silently."""
    model = make_model()
    outer = _maximizing_outers()[where](model)
    before = copy.deepcopy(outer.state_dict())
    with pytest.raises(ValueError, match=r"Reptile cannot drive an outer optimizer that maximizes \(.*maximize=True"):
        Reptile(model, outer)
    assert_same(outer.state_dict(), before, "state_dict()")
    with pytest.raises(ValueError, match=r"maximizes \(param_groups\[0\] has maximize=True\)"):
        Reptile(make_model(), torch.optim.Adam, maximize=True)


def test_reptile_refuses_maximize_set_since_construction_with_nothing_changed():
    model = make_model()
    meta = Reptile(model, torch.optim.SGD, lr=0.5, inner_lr=INNER_LR)
    meta.param_groups[0]["maximize"] = True
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"maximizes \(param_groups\[0\] has maximize=True\).*adapt on its negative"):
        meta.step(meta_closure(meta))
    assert_same([p.detach() for p in model.parameters()], weights, "weights")
    assert meta.num_recorded == 0 and len(meta.state) == 0
    meta.param_groups[0]["maximize"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meta.step(meta_closure(meta))  # moves towards the adapted weights again
