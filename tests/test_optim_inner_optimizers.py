"""``TransformingOptimizer`` around the inner optimizers the conformance tests leave out.

torch.optim's NAdam, RAdam, Adamax, ASGD, Rprop, Adafactor and Muon (foreach on and off,
``maximize``, complex parameters where the optimizer takes them, several param groups),
SparseAdam and LBFGS, and third-party optimizers (pytorch_optimizer's, transformers' Adafactor).
References: the bare optimizer (``transforms=()`` equal bit for bit), a hand-written float64 SAM
loop around the bare optimizer (perturb, second closure, restore, ``inner.step()``), and the
state before a step that raised (bit for bit).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from state_helpers import assert_same, weights_only_roundtrip

from samgria import LAMP, SAM, Transform, TransformingOptimizer

RHO = 0.05
STEPS = 3

_GEN = torch.Generator().manual_seed(1234)
X = torch.randn(8, 4, generator=_GEN, dtype=torch.float64)
Y = torch.randn(8, 3, generator=_GEN, dtype=torch.float64)


def make_params(kind: str = "real", seed: int = 0) -> list[torch.Tensor]:
    """``[weight (3, 4), bias (3,)]``; ``"matrices"``: a second layer ``(3, 3)`` instead of the bias
    (Muon's 2-D parameters; a Hessian that reads the weights); ``"complex"``: complex128."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    second = torch.randn(*((3, 3) if kind == "matrices" else (3,)), generator=generator, dtype=torch.float64)
    params = [weight, second]
    if kind == "complex":
        params = [torch.complex(p, 0.5 * p) for p in params]
    return [p.requires_grad_() for p in params]


def loss_fn(params) -> torch.Tensor:
    weight, second = (torch.view_as_real(p).sum(-1) if p.is_complex() else p for p in params)
    out = torch.tanh(X @ weight.T)
    out = torch.tanh(out @ second) if second.dim() == 2 else out + second
    return ((out - Y) ** 2).mean() + 0.01 * (weight**2).sum()


def make_closure(optimizer, params, fail_at: int | None = None, create_graph: bool = False):
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == fail_at:
            raise KeyError("closure failed")
        optimizer.zero_grad()
        loss = loss_fn(params)
        loss.backward(create_graph=create_graph)
        return loss

    return closure


def grouped(params, groups: bool):
    return [{"params": [params[0]]}, {"params": [params[1]]}] if groups else params


def clone(params) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def assert_checkpoint_like_bare(ours, theirs) -> None:
    """A plain wrapper's ``state_dict()`` is the bare optimizer's, with the chain's record in its
    groups."""
    assert_same({key: value for key, value in ours.items() if key != "param_groups"},
                {key: value for key, value in theirs.items() if key != "param_groups"}, "state_dict()")
    for group, bare_group in zip(ours["param_groups"], theirs["param_groups"]):
        assert_same({key: value for key, value in group.items() if key != "transform_chain"}, bare_group, "param_groups")


def assert_params_same(actual, expected) -> None:
    assert_same([p.detach() for p in actual], [p.detach() for p in expected], "params")


def assert_params_close(actual, expected) -> None:
    for p, q in zip(actual, expected):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)


def hand_sam_step(bare, params, maximize: bool = False) -> None:
    """One SAM step around ``bare``, by hand: perturb by rho g / |g| (down the gradient when the
    optimizer maximises), evaluate again, put the weights back, ``bare.step()``."""
    radius = -RHO if maximize else RHO
    bare.zero_grad()
    loss_fn(params).backward()
    grads = [torch.view_as_real(p.grad) if p.is_complex() else p.grad for p in params]
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    originals = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, [p.grad.clone() for p in params]):
            p.add_(g, alpha=float(radius / norm))
    bare.zero_grad()
    loss_fn(params).backward()
    with torch.no_grad():
        for p, w in zip(params, originals):
            p.copy_(w)
    bare.step()


def hand_step(bare, params) -> None:
    bare.zero_grad()
    loss_fn(params).backward()
    bare.step()


def two_call_step(optimizer, params) -> None:
    optimizer.zero_grad()
    loss_fn(params).backward()
    optimizer.first_step(zero_grad=True)
    loss_fn(params).backward()
    optimizer.second_step(zero_grad=True)


# -- the cases --------------------------------------------------------------------------------------


def _torch_cases():
    optim = torch.optim
    return [
        ("NAdam-decoupled", optim.NAdam, {"weight_decay": 0.1, "momentum_decay": 0.006, "decoupled_weight_decay": True}, "real", False),
        ("NAdam-maximize-forloop", optim.NAdam, {"weight_decay": 0.1, "maximize": True, "foreach": False}, "real", True),
        ("NAdam-complex", optim.NAdam, {"momentum_decay": 0.006}, "complex", False),
        ("RAdam-decoupled-foreach", optim.RAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True, "foreach": True}, "real", True),
        ("RAdam-maximize-complex", optim.RAdam, {"maximize": True, "lr": 0.01}, "complex", False),
        ("Adamax-forloop", optim.Adamax, {"weight_decay": 0.1, "foreach": False}, "real", False),
        ("Adamax-maximize-complex", optim.Adamax, {"maximize": True}, "complex", True),
        ("ASGD-averaging-foreach", optim.ASGD, {"t0": 1, "lambd": 0.1, "foreach": True}, "real", True),
        ("ASGD-maximize-forloop", optim.ASGD, {"maximize": True, "weight_decay": 0.1, "foreach": False}, "real", False),
        ("ASGD-complex", optim.ASGD, {"t0": 1}, "complex", False),
        ("Rprop-etas-foreach", optim.Rprop, {"etas": (0.5, 1.5), "foreach": True}, "real", True),
        ("Rprop-maximize-complex-forloop", optim.Rprop, {"maximize": True, "foreach": False}, "complex", False),
        ("Adafactor", optim.Adafactor, {}, "real", True),
        ("Adafactor-maximize-foreach", optim.Adafactor, {"weight_decay": 0.1, "maximize": True, "foreach": True}, "real", False),
        ("Muon", optim.Muon, {}, "matrices", False),
        ("Muon-momentum-tensor-lr", optim.Muon, {"momentum": 0.8, "lr": torch.tensor(0.01)}, "matrices", True),
    ]


TORCH_CASES = [pytest.param(*case[1:], id=case[0]) for case in _torch_cases()]
torch_cases = pytest.mark.parametrize("cls,kwargs,kind,groups", TORCH_CASES)


def build(cls, kwargs, params, groups, transforms=(), **options):
    return TransformingOptimizer(grouped(params, groups), cls, transforms=transforms, **options, **copy.deepcopy(kwargs))


def bare_of(cls, kwargs, params, groups):
    return cls(grouped(params, groups), **copy.deepcopy(kwargs))


@torch_cases
def test_plain_equals_the_bare_optimizer_with_a_scheduler(cls, kwargs, kind, groups):
    params, bare_params = make_params(kind), make_params(kind)
    optimizer, bare = build(cls, kwargs, params, groups), bare_of(cls, kwargs, bare_params, groups)
    ours, theirs = (torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (optimizer, bare))
    for _ in range(STEPS):
        optimizer.step(make_closure(optimizer, params))
        hand_step(bare, bare_params)
        ours.step()
        theirs.step()
    assert_params_same(params, bare_params)
    assert_same(optimizer.state_dict()["state"], bare.state_dict()["state"], "state")


@torch_cases
def test_sam_equals_a_hand_written_loop_and_both_loops_agree(cls, kwargs, kind, groups):
    params, two_call_params, bare_params = make_params(kind), make_params(kind), make_params(kind)
    optimizer = build(cls, kwargs, params, groups, [SAM(rho=RHO)])
    two_call = build(cls, kwargs, two_call_params, groups, [SAM(rho=RHO)])
    bare = bare_of(cls, kwargs, bare_params, groups)
    for _ in range(STEPS):
        optimizer.step(make_closure(optimizer, params))
        two_call_step(two_call, two_call_params)
        hand_sam_step(bare, bare_params, maximize=kwargs.get("maximize", False))
    assert_params_close(params, bare_params)
    assert_params_same(two_call_params, params)
    assert_same(two_call.state_dict(), optimizer.state_dict(), "state_dict()")


@torch_cases
def test_weights_only_checkpoint_resumes_as_the_bare_optimizer_resumes(cls, kwargs, kind, groups):
    """(torch's own load casts NAdam's float32 ``mu_product`` to the parameters' dtype: the bare
    optimizer's resumed run is the reference, not its uninterrupted one.)"""
    params, bare_params = make_params(kind), make_params(kind)
    optimizer = build(cls, kwargs, params, groups, [SAM(rho=RHO)])
    bare = bare_of(cls, kwargs, bare_params, groups)
    for _ in range(2):
        optimizer.step(make_closure(optimizer, params))
        hand_sam_step(bare, bare_params, maximize=kwargs.get("maximize", False))
    resumed_params, resumed_bare_params = clone(params), clone(bare_params)
    resumed = build(cls, kwargs, resumed_params, groups, [SAM(rho=RHO)])
    resumed.load_state_dict(weights_only_roundtrip(optimizer.state_dict()))
    resumed_bare = bare_of(cls, kwargs, resumed_bare_params, groups)
    resumed_bare.load_state_dict(weights_only_roundtrip(bare.state_dict()))
    for _ in range(2):
        resumed.step(make_closure(resumed, resumed_params))
        hand_sam_step(resumed_bare, resumed_bare_params, maximize=kwargs.get("maximize", False))
    assert_params_close(resumed_params, resumed_bare_params)
    for p, q in zip(resumed_params, resumed_bare_params):
        for key, value in resumed_bare.state[q].items():
            torch.testing.assert_close(resumed.state[p][key], value, rtol=1e-10, atol=1e-12)


@torch_cases
def test_second_pass_raising_leaves_weights_and_all_state_as_before(cls, kwargs, kind, groups):
    params = make_params(kind)
    optimizer = build(cls, kwargs, params, groups, [SAM(rho=RHO), LAMP(eps=1e-3, rollback_len=2, seed=0)])
    for _ in range(2):
        optimizer.step(make_closure(optimizer, params))
    before, weights = copy.deepcopy(optimizer.state_dict()), clone(params)
    with pytest.raises(KeyError, match="closure failed"):
        optimizer.step(make_closure(optimizer, params, fail_at=2))
    assert_params_same(params, weights)
    assert_same(optimizer.state_dict(), before, "state_dict()")


# -- SparseAdam, LBFGS, Muon's 2-D rule -----------------------------------------------------------


def _embedding_loss(embedding: torch.nn.Embedding) -> torch.Tensor:
    return (embedding(torch.tensor([1, 2, 4, 2])) ** 2).sum()


def test_sparse_adam_plain_equals_the_bare_optimizer_and_sam_refuses_sparse_gradients():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 3, sparse=True).double()
    bare_embedding = copy.deepcopy(embedding)
    optimizer = TransformingOptimizer(embedding.parameters(), torch.optim.SparseAdam, lr=0.01)
    bare = torch.optim.SparseAdam(bare_embedding.parameters(), lr=0.01)
    for _ in range(STEPS):
        optimizer.zero_grad()
        _embedding_loss(embedding).backward()
        optimizer.step()
        bare.zero_grad()
        _embedding_loss(bare_embedding).backward()
        bare.step()
    assert_same(embedding.weight.detach(), bare_embedding.weight.detach(), "weight")
    sam = TransformingOptimizer(embedding.parameters(), torch.optim.SparseAdam, transforms=[SAM(rho=RHO)])
    weight = embedding.weight.detach().clone()

    def closure():
        sam.zero_grad()
        loss = _embedding_loss(embedding)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="SAM does not support sparse gradients"):
        sam.step(closure)
    assert_same(embedding.weight.detach(), weight, "weight")
    assert len(sam.state) == 0


def test_lbfgs_is_refused_with_the_reason():
    with pytest.raises(TypeError, match="got LBFGS \\(it re-evaluates the closure itself\\)"):
        TransformingOptimizer(make_params(), torch.optim.LBFGS, transforms=[SAM(rho=RHO)])


def test_muon_refusing_a_1d_parameter_mid_step_leaves_everything_as_before():
    """torch's Muon checks the dimensions inside its loop over the groups, after the groups
    before stepped: the wrapper copies the state for it."""
    params = make_params("matrices")
    optimizer = TransformingOptimizer([{"params": [params[0]]}, {"params": [params[1]]}], torch.optim.Muon, transforms=[SAM(rho=RHO)])
    optimizer.step(make_closure(optimizer, params))
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer.add_param_group({"params": [bias]})
    before, weights = copy.deepcopy(optimizer.state_dict()), clone(params)

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(params) + ((bias - 1) ** 2).sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="2D"):
        optimizer.step(closure)
    assert_params_same(params, weights)
    assert_same(optimizer.state_dict(), before, "state_dict()")


# -- third-party optimizers -------------------------------------------------------------------------


def _third_party_cases():
    po = pytest.importorskip("pytorch_optimizer")
    return {
        "Lion": (po.Lion, {"lr": 1e-3}),
        "Prodigy": (po.Prodigy, {}),
        "AdaBelief": (po.AdaBelief, {"rectify": True}),
        "ScheduleFreeAdamW": (po.ScheduleFreeAdamW, {"lr": 1e-2}),
        "Ranger": (po.Ranger, {}),
        "Adan": (po.Adan, {"max_grad_norm": 1.0}),
        "DAdaptAdam": (po.DAdaptAdam, {}),
        "Ranger21": (po.Ranger21, {"num_iterations": 10}),
        "StableSPAM": (po.StableSPAM, {}),
    }


THIRD_PARTY = ["Lion", "Prodigy", "AdaBelief", "ScheduleFreeAdamW", "Ranger", "Adan", "DAdaptAdam", "Ranger21", "StableSPAM"]
third_party = pytest.mark.parametrize("name", THIRD_PARTY)


def _build_third(name, params, transforms=(), wrapped=True):
    cls, kwargs = _third_party_cases()[name]
    optimizer = TransformingOptimizer(params, cls, transforms=transforms, **kwargs) if wrapped else cls(params, **kwargs)
    if hasattr(optimizer, "train"):  # schedule-free: train mode before stepping
        optimizer.train()
    return optimizer


@third_party
def test_third_party_plain_and_sam_equal_the_bare_optimizer_and_the_hand_loop(name):
    plain_params, sam_params, two_call_params = make_params(), make_params(), make_params()
    bare_params, hand_params = make_params(), make_params()
    plain = _build_third(name, plain_params)
    sam = _build_third(name, sam_params, [SAM(rho=RHO)])
    two_call = _build_third(name, two_call_params, [SAM(rho=RHO)])
    bare = _build_third(name, bare_params, wrapped=False)
    hand = _build_third(name, hand_params, wrapped=False)
    for _ in range(STEPS):
        plain.step(make_closure(plain, plain_params))
        hand_step(bare, bare_params)
        sam.step(make_closure(sam, sam_params))
        two_call_step(two_call, two_call_params)
        hand_sam_step(hand, hand_params)
    assert_params_same(plain_params, bare_params)
    assert_checkpoint_like_bare(plain.state_dict(), bare.state_dict())
    assert_params_close(sam_params, hand_params)
    assert_params_same(two_call_params, sam_params)
    if hasattr(sam, "eval"):  # schedule-free: the averaged weights, as the bare optimizer's
        sam.eval()
        hand.eval()
        assert_params_close(sam_params, hand_params)


@third_party
def test_third_party_weights_only_checkpoint_resumes_as_the_bare_optimizer_resumes(name):
    params, bare_params = make_params(), make_params()
    optimizer = _build_third(name, params)
    bare = _build_third(name, bare_params, wrapped=False)
    for _ in range(2):
        optimizer.step(make_closure(optimizer, params))
        hand_step(bare, bare_params)
    resumed_params, resumed_bare_params = clone(params), clone(bare_params)
    resumed = _build_third(name, resumed_params)
    resumed.load_state_dict(weights_only_roundtrip(optimizer.state_dict()))
    resumed_bare = _build_third(name, resumed_bare_params, wrapped=False)
    resumed_bare.load_state_dict(weights_only_roundtrip(bare.state_dict()))
    for _ in range(2):
        resumed.step(make_closure(resumed, resumed_params))
        hand_step(resumed_bare, resumed_bare_params)
    assert_params_same(resumed_params, resumed_bare_params)
    assert_checkpoint_like_bare(resumed.state_dict(), resumed_bare.state_dict())


class _FailsOnce(Transform):
    """A post-step transform that raises at its ``at``-th call."""

    slot_name = "fails_once"

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def init_state(self, ctx) -> None:
        pass

    def post_update(self, ctx) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise KeyError("post-step transform failed")


@third_party
def test_third_party_failed_step_leaves_weights_and_all_state_as_before(name):
    """Also what the inner optimizer keeps in its own attributes (StableSPAM's ``total_step``,
    Ranger21's ``lookahead_step``, both in its checkpoints): a step that raised after the inner
    step changed nothing, and the run goes on as one without it."""
    params, reference_params = make_params(), make_params()
    optimizer = _build_third(name, params, [SAM(rho=RHO), _FailsOnce(at=3)])
    reference = _build_third(name, reference_params, [SAM(rho=RHO), _FailsOnce(at=0)])
    for _ in range(2):
        optimizer.step(make_closure(optimizer, params))
        reference.step(make_closure(reference, reference_params))
    before, weights = copy.deepcopy(optimizer.state_dict()), clone(params)
    with pytest.raises(KeyError, match="closure failed"):
        optimizer.step(make_closure(optimizer, params, fail_at=2))
    with pytest.raises(KeyError, match="post-step transform failed"):
        optimizer.step(make_closure(optimizer, params))
    assert_params_same(params, weights)
    assert_same(optimizer.state_dict(), before, "state_dict()")
    optimizer.step(make_closure(optimizer, params))
    reference.step(make_closure(reference, reference_params))
    assert_params_same(params, reference_params)
    assert_same(optimizer.state_dict(), reference.state_dict(), "state_dict()")


#: torch's note that backward(create_graph=True) ties a parameter and its gradient in a cycle.
CREATE_GRAPH_WARNING = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")


@pytest.mark.parametrize("name", ["AdaBelief", "ScheduleFreeAdamW"])
@pytest.mark.parametrize("loop", ["closure", "two_call"])
def test_sam_climbs_down_for_an_inner_optimizer_keeping_maximize_on_itself(name, loop):
    """pytorch_optimizer's optimizers keep ``maximize=True`` on the instance, not in the groups:
    SAM must perturb down the gradient of L (the worst case of -L), as for torch's."""
    po = pytest.importorskip("pytorch_optimizer")
    cls = {"AdaBelief": po.AdaBelief, "ScheduleFreeAdamW": po.ScheduleFreeAdamW}[name]
    params, hand_params = make_params(), make_params()
    optimizer = TransformingOptimizer(params, cls, transforms=[SAM(rho=RHO)], lr=1e-2, maximize=True)
    hand = cls(hand_params, lr=1e-2, maximize=True)
    assert "maximize" not in optimizer.param_groups[0]
    for _ in range(STEPS):
        if loop == "closure":
            optimizer.step(make_closure(optimizer, params))
        else:
            two_call_step(optimizer, params)
        hand_sam_step(hand, hand_params, maximize=True)
    assert_params_close(params, hand_params)



def test_multistep_sam_refuses_an_adversary_or_inner_optimizer_keeping_maximize_on_itself():
    """MultiStepSAM's adversary is handed the gradient of -L and must minimise it (climb L): one
    that keeps ``maximize=True`` on the instance (pytorch_optimizer's) was accepted, as only the
    groups were read, and stepped down L, silently → refused as torch's ``maximize=True`` is. An
    inner optimizer keeping it there is refused at the step as torch's is."""
    import functools

    from samgria import MultiStepSAM

    po = pytest.importorskip("pytorch_optimizer")
    with pytest.raises(ValueError, match=r"^adversary must build an optimizer that minimises .* got one with maximize=True: AdaBelief"):
        MultiStepSAM(rho=RHO, ascent_steps=2, adversary=functools.partial(po.AdaBelief, maximize=True))
    MultiStepSAM(rho=RHO, ascent_steps=2, adversary=functools.partial(po.AdaBelief, maximize=False))

    params = make_params()
    transform = MultiStepSAM(rho=RHO, ascent_steps=2, adversary=torch.optim.SGD)
    optimizer = TransformingOptimizer(params, po.AdaBelief, transforms=[transform], lr=1e-2, maximize=True)
    weights = clone(params)
    with pytest.raises(ValueError, match=r"^MultiStepSAM's adversary climbs L .*maximize=True"):
        optimizer.step(make_closure(optimizer, params))
    assert_params_same(params, weights)

@CREATE_GRAPH_WARNING
@pytest.mark.parametrize("loop", ["closure", "two_call"])
def test_a_hessian_optimizer_after_a_perturbing_reevaluation_is_refused_with_nothing_changed(loop):
    """SophiaH differentiates the gradients of ``backward(create_graph=True)``; after SAM's
    re-evaluation their graph holds the moved weights, which are back at w before the inner step:
    the two-call loop took a Hessian mixing w and w + e silently, ``step(closure)`` raised
    torch's 'modified by an inplace operation' from inside SophiaH."""
    po = pytest.importorskip("pytorch_optimizer")
    params, bare_params = make_params("matrices"), make_params("matrices")
    bare = po.SophiaH(bare_params, update_period=1)
    bare.step(make_closure(bare, bare_params, create_graph=True))
    optimizer = TransformingOptimizer(params, po.SophiaH, transforms=[SAM(rho=RHO)], update_period=1)
    optimizer.load_state_dict(bare.state_dict())  # a state to keep (SophiaH's first step estimates)
    before, weights = copy.deepcopy(optimizer.state_dict()), clone(params)
    with pytest.raises(RuntimeError, match="SAM re-evaluated the loss at moved weights with backward\\(create_graph=True\\)"):
        if loop == "closure":
            optimizer.step(make_closure(optimizer, params, create_graph=True))
        else:
            optimizer.zero_grad()
            loss_fn(params).backward()
            optimizer.first_step()
            loss_fn(params).backward(create_graph=True)
            optimizer.second_step()
    assert_params_same(params, weights)
    assert_same(optimizer.state_dict(), before, "state_dict()")



class _MovesAndReEvaluates:
    """A seed-protocol object that evaluates the loss at moved weights and puts them back."""

    def apply(self, model, loss_fn, batch):
        params = list(model.parameters())
        with torch.no_grad():
            for p in params:
                p.add_(0.01)
        try:
            loss_fn(*batch)
        finally:
            with torch.no_grad():
                for p in params:
                    p.sub_(0.01)

    def post_step(self, model):
        pass


@CREATE_GRAPH_WARNING
def test_a_hessian_optimizer_after_a_seed_objects_reevaluation_is_refused_naming_the_object():
    """The refusal named the re-evaluating transforms by ``needs_closure``, which a seed-protocol
    object does not declare: the message read " re-evaluated the loss ..." and "cannot follow :
    use SophiaH on its own" → it names the object, as the other messages do."""
    po = pytest.importorskip("pytorch_optimizer")
    params = make_params("matrices")
    optimizer = TransformingOptimizer(params, po.SophiaH, transforms=[_MovesAndReEvaluates()], update_period=1)
    weights = clone(params)
    name = r"_MovesAndReEvaluates \(seed protocol\)"
    with pytest.raises(RuntimeError, match=rf"^{name} re-evaluated the loss at moved weights .* cannot follow {name}: use SophiaH on its own"):
        optimizer.step(make_closure(optimizer, params, create_graph=True))
    assert_params_same(params, weights)

@CREATE_GRAPH_WARNING
def test_a_hessian_optimizer_without_reevaluation_equals_the_bare_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    params, bare_params = make_params("matrices"), make_params("matrices")
    optimizer = TransformingOptimizer(params, po.SophiaH, update_period=1)
    bare = po.SophiaH(bare_params, update_period=1)
    for step in range(STEPS):
        torch.manual_seed(step)
        optimizer.step(make_closure(optimizer, params, create_graph=True))
        torch.manual_seed(step)
        bare.step(make_closure(bare, bare_params, create_graph=True))
    assert_params_same(params, bare_params)
    assert_checkpoint_like_bare(optimizer.state_dict(), bare.state_dict())


@pytest.mark.parametrize("name", ["Lookahead", "SAM", "BSAM"])
def test_third_party_wrappers_and_sam_style_optimizers_are_refused_with_the_reason(name):
    po = pytest.importorskip("pytorch_optimizer")
    params = make_params()
    if name == "Lookahead":
        with pytest.raises(TypeError, match="got a Lookahead, whose param_groups is a read-only property"):
            TransformingOptimizer(po.Lookahead(torch.optim.Adam(params)), transforms=[SAM(rho=RHO)])
    elif name == "SAM":
        with pytest.raises(TypeError, match="holds another optimizer \\(its attribute 'base_optimizer'"):
            TransformingOptimizer(params, po.SAM, base_optimizer=torch.optim.SGD, lr=0.1)
    else:
        optimizer = TransformingOptimizer(params, po.BSAM, num_data=8)
        weights = clone(params)
        with pytest.raises(RuntimeError, match="the inner optimizer BSAM changed the weights and then called the closure"):
            optimizer.step(make_closure(optimizer, params))
        assert_params_same(params, weights)
        assert len(optimizer.state) == 0


@pytest.mark.parametrize("kwargs", [{"lr": 1e-3, "relative_step": False, "scale_parameter": False}, {"lr": None, "warmup_init": True}])
def test_transformers_adafactor_equals_the_bare_optimizer_and_the_hand_loop(kwargs):
    optimization = pytest.importorskip("transformers.optimization")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notes
        params, bare_params, sam_params, hand_params = (make_params() for _ in range(4))
        optimizer = TransformingOptimizer(params, optimization.Adafactor, **kwargs)
        bare = optimization.Adafactor(bare_params, **kwargs)
        sam = TransformingOptimizer(sam_params, optimization.Adafactor, transforms=[SAM(rho=RHO)], **kwargs)
        hand = optimization.Adafactor(hand_params, **kwargs)
        for _ in range(STEPS):
            optimizer.step(make_closure(optimizer, params))
            hand_step(bare, bare_params)
            sam.step(make_closure(sam, sam_params))
            hand_sam_step(hand, hand_params)
    assert_params_same(params, bare_params)
    assert_same(optimizer.state_dict()["state"], bare.state_dict()["state"], "state")
    assert_params_close(sam_params, hand_params)


# -- an inner optimizer whose state is a quantized tensor subclass ------------------------------------


class _Quantized(torch.Tensor):
    """int8 codes and a float64 scale behind a float64 tensor, as torchao's ``OptimState8bit``
    (``AdamW8bit``'s state): a wrapper subclass (``__tensor_flatten__``) that implements
    ``detach`` and ``copy_`` but no ``clone``."""

    @staticmethod
    def __new__(cls, codes, scale):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=scale.dtype, device=codes.device)

    def __init__(self, codes, scale):
        self.codes, self.scale = codes, scale

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __tensor_flatten__(self):
        return ["codes", "scale"], None

    @classmethod
    def __tensor_unflatten__(cls, inner, context, outer_size, outer_stride):
        return cls(inner["codes"], inner["scale"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return cls(args[0].codes, args[0].scale)
        if func is torch.ops.aten.copy_.default and isinstance(args[1], cls):
            args[0].codes.copy_(args[1].codes)
            args[0].scale.copy_(args[1].scale)
            return args[0]
        raise NotImplementedError(f"_Quantized does not implement {func}")

    def dequantize(self) -> torch.Tensor:
        return self.codes.double() * self.scale


class _QuantizedMomentumSGD(torch.optim.Optimizer):
    """SGD with momentum kept as int8 codes and a scale, requantized in place at each step."""

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum"] = _Quantized(torch.zeros_like(p, dtype=torch.int8), torch.ones((), dtype=p.dtype))
                quantized = state["momentum"]
                momentum = quantized.dequantize() * group["momentum"] + p.grad
                scale = momentum.abs().max().clamp_min(1e-12) / 127
                quantized.codes.copy_(torch.round(momentum / scale).to(torch.int8))
                quantized.scale.copy_(scale)
                p.add_(quantized.dequantize(), alpha=-group["lr"])


def _quantized_state(optimizer, params):
    return [(optimizer.state[p]["momentum"].codes.clone(), optimizer.state[p]["momentum"].scale.clone()) for p in params]


def test_quantized_subclass_state_plain_equals_the_bare_optimizer():
    """A wrapper subclass without ``clone`` in the inner state (torchao's AdamW8bit/4bit/Fp8):
    the wrapper's step raised NotImplementedError (aten.clone) from its second step on; it steps
    as the bare optimizer, bit for bit."""
    params, bare_params = make_params(), make_params()
    optimizer = TransformingOptimizer(params, _QuantizedMomentumSGD)
    bare = _QuantizedMomentumSGD(bare_params)
    for _ in range(STEPS):
        optimizer.step(make_closure(optimizer, params))
        hand_step(bare, bare_params)
    assert_params_same(params, bare_params)
    for (codes, scale), (bare_codes, bare_scale) in zip(_quantized_state(optimizer, params), _quantized_state(bare, bare_params)):
        assert torch.equal(codes, bare_codes) and torch.equal(scale, bare_scale)


def test_quantized_subclass_state_failed_sam_step_leaves_weights_and_codes_as_before():
    """A SAM step that raised (in the second closure, or in a post-step transform after the
    inner step requantized the state) leaves the weights and the state's codes and scales bit
    for bit, in the same objects; the run goes on as one without the failures."""
    params, reference_params = make_params(), make_params()
    optimizer = TransformingOptimizer(params, _QuantizedMomentumSGD, transforms=[SAM(rho=RHO), _FailsOnce(at=3)])
    reference = TransformingOptimizer(reference_params, _QuantizedMomentumSGD, transforms=[SAM(rho=RHO), _FailsOnce(at=0)])
    for _ in range(2):
        optimizer.step(make_closure(optimizer, params))
        reference.step(make_closure(reference, reference_params))
    objects = [optimizer.state[p]["momentum"] for p in params]
    before, weights = _quantized_state(optimizer, params), clone(params)
    with pytest.raises(KeyError, match="closure failed"):
        optimizer.step(make_closure(optimizer, params, fail_at=2))
    with pytest.raises(KeyError, match="post-step transform failed"):
        optimizer.step(make_closure(optimizer, params))
    assert_params_same(params, weights)
    assert all(optimizer.state[p]["momentum"] is kept for p, kept in zip(params, objects))
    for (codes, scale), (kept_codes, kept_scale) in zip(_quantized_state(optimizer, params), before):
        assert torch.equal(codes, kept_codes) and torch.equal(scale, kept_scale)
    optimizer.step(make_closure(optimizer, params))
    reference.step(make_closure(reference, reference_params))
    assert_params_same(params, reference_params)
    for (codes, scale), (ref_codes, ref_scale) in zip(_quantized_state(optimizer, params), _quantized_state(reference, reference_params)):
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
