"""The transform base classes and the chain, as users writing their own transforms use them.

``PerturbationTransform`` subclasses, seed-protocol objects (``ProtocolTransform``) and slot
names of user transforms (``Chain``); the references are the weights before the step (bit for
bit), the object's own ``state_dict()`` and hand-written messages.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transform_infos import assert_bitwise_equal, make_closure, make_data, make_model, params_of, step_in_loop

import samgria.transforms.sam as sam_module
from samgria import (
    ASAM,
    ESAM,
    GSAM,
    SAM,
    WSAM,
    FriendlySAM,
    EMA,
    LAMP,
    Lookahead,
    LookSAM,
    MultiStepSAM,
    ParamTransform,
    Perturbation,
    PerturbationTransform,
    ProtocolTransform,
    Transform,
    TransformingOptimizer,
)


# -- PerturbationTransform subclasses: a perturb() that raises -------------------------------------
class SignPerturbation(PerturbationTransform):
    r"""Moves each weight in place, :math:`w \leftarrow w + \rho\,\operatorname{sign}(g)`, and fails
    (a simulated out-of-memory) before the ``fail_at``-th parameter with a gradient."""

    def __init__(self, rho=0.5, fail_at=None):
        self.rho = rho
        self.fail_at = fail_at

    def group_defaults(self):
        return {"rho": self.rho}

    @torch.no_grad()
    def perturb(self, ctx):
        moves = []
        for group in ctx.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if len(moves) == self.fail_at:
                    raise RuntimeError("out of memory (simulated)")
                backup = param.detach().clone()
                param.add_(torch.sign(param.grad), alpha=group["rho"])
                param.grad = None
                moves.append((param, backup, backup, False))
        return Perturbation(moves) if moves else None


class DeclaredSafe(SignPerturbation):
    """Says its perturb() leaves the weights as they were when it raises (it does not, here)."""

    writes_weights_before_step = False


class OverridesAgain(DeclaredSafe):
    """Overrides the perturb() its parent declared for: the declaration does not speak for this one."""

    def perturb(self, ctx):
        return super().perturb(ctx)


class NoPerturbOverride(PerturbationTransform):
    """Overrides pre_update only: perturb() is the base's."""

    def pre_update(self, ctx):
        pass


@pytest.mark.parametrize("loop", ["closure", "two-call"])
def test_a_users_perturb_that_raises_after_moving_weights_leaves_them_bit_for_bit(loop):
    model = make_model()
    x, y = make_data()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SignPerturbation(0.5)]
    )
    closure = make_closure(model, optimizer, x, y)
    optimizer.step(closure)  # momentum state exists
    optimizer.transforms[0].fail_at = 2
    before = params_of(model)
    state_before = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    with pytest.raises(RuntimeError, match=r"^out of memory \(simulated\)$"):
        if loop == "closure":
            optimizer.step(closure)
        else:
            closure()
            optimizer.first_step()
    assert_bitwise_equal(before, params_of(model))
    assert set(optimizer.state) == set(state_before)
    for param, entry in state_before.items():
        assert set(optimizer.state[param]) == set(entry)
        assert all(torch.equal(optimizer.state[param][k], v) for k, v in entry.items())
    # The optimizer goes on as if the failed step had not been tried.
    optimizer.transforms[0].fail_at = None
    step_in_loop(optimizer, closure, loop)


def test_a_users_perturb_that_raises_with_atomic_false_is_not_undone():
    """``atomic=False`` copies nothing: the weights the failing perturb() moved stay moved."""
    model = make_model()
    x, y = make_data()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SignPerturbation(0.5, fail_at=2)], atomic=False
    )
    before = params_of(model)
    with pytest.raises(RuntimeError, match="simulated"):
        optimizer.step(make_closure(model, optimizer, x, y))
    moved = [not torch.equal(a, b) for a, b in zip(before, params_of(model))]
    assert sum(moved) == 2


def test_writes_weights_before_step_is_derived_for_subclasses_that_override_perturb():
    assert SignPerturbation.writes_weights_before_step is True
    assert SignPerturbation().writes_weights_before_step is True
    assert DeclaredSafe.writes_weights_before_step is False
    assert OverridesAgain.writes_weights_before_step is True
    assert NoPerturbOverride.writes_weights_before_step is False

    class Child(SignPerturbation):  # inherits the derived value, derived again
        pass

    assert Child.writes_weights_before_step is True

    class SafeChild(DeclaredSafe):  # DeclaredSafe's declaration covers the perturb() it inherits
        pass

    assert SafeChild.writes_weights_before_step is False

    class DeclaresTrue(PerturbationTransform):
        writes_weights_before_step = True

    assert DeclaresTrue.writes_weights_before_step is True


@pytest.mark.parametrize(
    "cls", [SAM, ASAM, GSAM, WSAM, FriendlySAM, LookSAM, ESAM, MultiStepSAM], ids=lambda cls: cls.__name__
)
def test_the_built_in_perturbations_take_no_copy_of_the_weights(cls):
    assert cls.writes_weights_before_step is False
    assert cls().writes_weights_before_step is False
    assert PerturbationTransform.writes_weights_before_step is False


@pytest.mark.parametrize("tied", [False, True], ids=["swapped", "in-place"])
def test_sams_perturb_that_raises_leaves_the_weights_without_the_optimizers_copy(monkeypatch, tied):
    """Why SAM may declare ``False``: a failure inside its move leaves the weights as they were
    (swapped parameters are computed into buffers; tied ones are put back), with no copy taken."""
    model = make_model()
    if tied:  # one storage for two parameters: perturbed in place
        model[0].bias.data = model[2].weight.data.view(-1)[:8]
    x, y = make_data()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.5)])
    name = "add_directions_" if tied else "perturbed_into_private"
    original = getattr(sam_module, name)

    def apply_then_fail(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(sam_module, name, apply_then_fail)
    monkeypatch.setattr(optimizer, "_structure_for", lambda transforms: None)  # no copy to fall back on
    before = params_of(model)
    with pytest.raises(RuntimeError, match="simulated"):
        optimizer.step(make_closure(model, optimizer, x, y))
    assert_bitwise_equal(before, params_of(model))


# -- subclasses of the built-ins that override the hook --------------------------------------------
def _moves_then_raises(cls):
    """A subclass of ``cls`` whose perturb() moves every weight with a gradient in place by +1,
    then raises."""

    class MovesThenRaises(cls):
        @torch.no_grad()
        def perturb(self, ctx):
            for group in ctx.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.add_(1.0)
            raise RuntimeError("perturb failed after moving the weights")

    MovesThenRaises.__name__ = f"My{cls.__name__}"
    return MovesThenRaises


@pytest.mark.parametrize("loop", ["closure", "two-call"])
@pytest.mark.parametrize("cls", [SAM, GSAM, MultiStepSAM], ids=lambda cls: cls.__name__)
def test_a_subclass_overriding_a_built_ins_perturb_gets_the_copy_and_a_raise_moves_nothing(cls, loop):
    """``class MySAM(SAM)`` overriding perturb() inherited SAM's writes_weights_before_step =
    False, which speaks for SAM's own perturb(): no copy was taken, and a perturb() that raised
    after moving the weights in place left them moved (by +1 here). Now it gets True and the
    optimizer puts the weights back, bit for bit."""
    custom = _moves_then_raises(cls)
    assert custom.writes_weights_before_step is True
    assert custom().writes_weights_before_step is True
    model = make_model()
    x, y = make_data()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[custom()])
    closure = make_closure(model, optimizer, x, y)
    before = params_of(model)
    with pytest.raises(RuntimeError, match="^perturb failed after moving the weights$"):
        step_in_loop(optimizer, closure, loop)
    assert_bitwise_equal(before, params_of(model))


def test_a_declaration_counts_in_the_class_that_overrides_the_hook_or_below_it():
    class MySAM(SAM):  # overrides perturb and says it is safe: its own word
        writes_weights_before_step = False

        def perturb(self, ctx):
            return super().perturb(ctx)

    class MyGSAM(GSAM):
        def perturb(self, ctx):
            return super().perturb(ctx)

    class Declared(MyGSAM):  # below the override: speaks for it
        writes_weights_before_step = False

    class LoggingSAM(SAM):  # SAM's perturb, SAM's declaration
        pass

    class Mixed(LoggingSAM, MySAM):  # MySAM's perturb (and declaration), through the MRO
        pass

    assert MySAM.writes_weights_before_step is False
    assert MyGSAM.writes_weights_before_step is True
    assert Declared.writes_weights_before_step is False
    assert LoggingSAM.writes_weights_before_step is False
    assert Mixed.writes_weights_before_step is False
    assert _moves_then_raises(Declared).writes_weights_before_step is True


def test_a_param_transform_overriding_a_declared_pre_step_hook_gets_the_copy():
    """The same rule for ParamTransform's pre-step hook: a parent's False (its hook changes only
    the gradients) does not speak for a child's hook, which may write the weights."""

    class GradOnly(ParamTransform):
        writes_weights_before_step = False

        def pre_step_transform_(self, param, group):
            param.grad.mul_(2.0)

    class Shrinks(GradOnly):
        def pre_step_transform_(self, param, group):
            param.mul_(0.5)
            if param.shape[0] == 1:  # the last layer: after the others were shrunk
                raise RuntimeError("hook failed after writing the weights")

    class GradOnlyToo(GradOnly):
        writes_weights_before_step = False

        def pre_step_transform_(self, param, group):
            param.grad.mul_(3.0)

    assert GradOnly.writes_weights_before_step is False
    assert Shrinks.writes_weights_before_step is True
    assert GradOnlyToo.writes_weights_before_step is False
    model = make_model()
    x, y = make_data()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[Shrinks()])
    before = params_of(model)
    with pytest.raises(RuntimeError, match="^hook failed after writing the weights$"):
        optimizer.step(make_closure(model, optimizer, x, y))
    assert_bitwise_equal(before, params_of(model))


# -- seed-protocol objects ---------------------------------------------------------------------------
class Pending:
    """Keeps a ``saved`` tensor only while a two-step cycle is open; its state_dict has it only then."""

    writes_weights_before_step = False

    def __init__(self):
        self.t = 0
        self.saved = None

    def apply(self, model, loss_fn, batch):
        pass

    def post_step(self, model):
        self.t += 1
        self.saved = None if self.t % 2 == 0 else torch.tensor(float(self.t))

    def state_dict(self):
        state = {"t": self.t}
        if self.saved is not None:
            state["saved"] = self.saved
        return state

    def load_state_dict(self, state):
        self.t = state["t"]
        self.saved = state.get("saved")

    def __repr__(self):
        return "Pending()"


def _slot_entries(optimizer, slot):
    """Every ``"<slot>.<key>"`` entry of the optimizer's state, by parameter position."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        index: {k: v for k, v in optimizer.state[p].items() if k.startswith(slot + ".")}
        for index, p in enumerate(params)
        if p in optimizer.state and any(k.startswith(slot + ".") for k in optimizer.state[p])
    }


def _grad_step(optimizer, model):
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.ones_like(param)
    optimizer.step()


def test_a_seed_objects_slot_holds_exactly_what_its_state_dict_returns_now():
    model = nn.Linear(2, 1)
    obj = Pending()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[obj])
    _grad_step(optimizer, model)
    assert optimizer.state_dict()["state"][0] == {"pending.t": 1, "pending.saved": torch.tensor(1.0)}
    _grad_step(optimizer, model)
    assert obj.state_dict() == {"t": 2}
    checkpoint = optimizer.state_dict()
    assert checkpoint["state"] == {0: {"pending.t": 2}}

    resumed = Pending()
    twin = TransformingOptimizer(nn.Linear(2, 1).parameters(), torch.optim.SGD, lr=0.1, transforms=[resumed])
    twin.load_state_dict(checkpoint)
    assert resumed.state_dict() == {"t": 2} and resumed.saved is None


def test_a_seed_objects_state_leaves_the_parameter_that_held_it_once_that_is_frozen():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    obj = Pending()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[obj])
    _grad_step(optimizer, model)
    optimizer.state_dict()
    assert _slot_entries(optimizer, "pending") == {0: {"pending.t": 1, "pending.saved": torch.tensor(1.0)}}
    model[0].weight.requires_grad_(False)
    model[0].weight.grad = None
    _grad_step(optimizer, model)
    _grad_step(optimizer, model)
    checkpoint = optimizer.state_dict()
    assert {k: v for k, v in checkpoint["state"].get(0, {}).items() if k.startswith("pending.")} == {}
    assert {k: v for k, v in checkpoint["state"][1].items() if k.startswith("pending.")} == {"pending.t": 3, "pending.saved": torch.tensor(3.0)}
    assert _slot_entries(optimizer, "pending") == {1: {"pending.t": 3, "pending.saved": torch.tensor(3.0)}}


_OBJECT_STATE_CHAINS = {
    "sam-lookahead": lambda: [SAM(0.05), Lookahead(k=4)],
    "ema": lambda: [EMA(0.9)],
    "looksam": lambda: [LookSAM(k=3)],
    "lamp": lambda: [LAMP(seed=0, rollback_len=3)],
}


def _train_without_first_layer_for_a_while(make_chain, how):
    """3 steps, 5 with the first layer out of training (``how``: its param group taken out of
    ``param_groups`` and put back, or its parameters frozen and unfrozen), then 4 more."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    inputs, targets = torch.randn(8, 4), torch.randn(8, 1)
    optimizer = TransformingOptimizer(
        [{"params": model[0].parameters()}, {"params": model[1].parameters()}],
        torch.optim.SGD, lr=0.1, momentum=0.9, transforms=make_chain(),
    )

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    if how == "group":
        first_group = optimizer.param_groups.pop(0)  # torch keeps its parameters' state entries
    else:
        model[0].requires_grad_(False)
    for _ in range(5):
        optimizer.step(closure)
    if how == "group":
        optimizer.param_groups.insert(0, first_group)
    else:
        model[0].requires_grad_(True)
    for _ in range(4):
        optimizer.step(closure)
    return model, optimizer


@pytest.mark.parametrize("chain", list(_OBJECT_STATE_CHAINS))
def test_object_level_state_goes_on_counting_when_the_first_param_group_is_taken_out_and_put_back(chain):
    """Taking the first group out of param_groups restarted the counters, generators and cycles
    on the new first parameter, and putting it back switched to the stale ones of the group's
    first parameter (two copies, both checkpointed). The reference: the same run with the first
    layer frozen instead, whose object-level state moves along (tested above)."""
    make_chain = _OBJECT_STATE_CHAINS[chain]
    model, optimizer = _train_without_first_layer_for_a_while(make_chain, "group")
    reference_model, reference = _train_without_first_layer_for_a_while(make_chain, "freeze")
    object_keys = {"lookahead.step", "ema.step", "look_sam.step", "lamp.cycle_step", "lamp.rng_state"}

    def object_state(model, optimizer):
        return {
            (name, key): value
            for name, param in model.named_parameters()
            for key, value in optimizer.state[param].items()
            if key in object_keys
        }

    held, expected = object_state(model, optimizer), object_state(reference_model, reference)
    assert held.keys() == expected.keys() and {name for name, _ in held} == {"0.weight"}
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert_bitwise_equal(held[key], value)
        else:
            assert held[key] == value, key
    if chain in ("sam-lookahead", "ema"):
        assert held[("0.weight", f"{chain.split('-')[-1]}.step")] == 12
        for param, reference_param in zip(model.parameters(), reference_model.parameters()):
            assert_bitwise_equal(param, reference_param)


def test_a_seed_objects_checkpoint_resumes_when_the_parameter_that_held_it_is_frozen_at_resume():
    """Fine-tuning resumed with the first layer frozen: the load looked for the object's keys on
    the new first parameter that requires grad, found none there, never called the object's
    load_state_dict (its counter restarted at 0) and the next state_dict() dropped the saved value."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[Pending()])
    for _ in range(5):
        _grad_step(optimizer, model)
    checkpoint = optimizer.state_dict()
    assert {k for k in checkpoint["state"][0] if k.startswith("pending.")} == {"pending.t", "pending.saved"}

    frozen = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    frozen[0].requires_grad_(False)
    resumed = Pending()
    twin = TransformingOptimizer(frozen.parameters(), torch.optim.SGD, lr=0.1, transforms=[resumed])
    twin.load_state_dict(checkpoint)
    assert resumed.t == 5 and torch.equal(resumed.saved, torch.tensor(5.0))
    _grad_step(twin, frozen)
    assert resumed.t == 6
    twin.state_dict()
    assert _slot_entries(twin, "pending") == {2: {"pending.t": 6}}  # on the first trainable parameter


def _raises():
    raise RuntimeError("cannot export")


@pytest.mark.parametrize(
    "state_dict,error,message",
    [
        (_raises, RuntimeError, "^cannot export$"),
        (lambda: {"t": 5, 0: 1}, TypeError, r"^Pending\(\)\.state_dict\(\) must have string keys, got 0$"),
    ],
    ids=["raises", "non-string-key"],
)
def test_a_seed_objects_state_dict_that_fails_leaves_the_slot_as_it_was(state_dict, error, message):
    model = nn.Linear(2, 1)
    obj = Pending()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[obj])
    _grad_step(optimizer, model)
    optimizer.state_dict()
    obj.state_dict = state_dict
    with pytest.raises(error, match=message):
        optimizer.state_dict()
    assert _slot_entries(optimizer, "pending") == {0: {"pending.t": 1, "pending.saved": torch.tensor(1.0)}}


class SeedSAM:
    """A seed-library SAM as a plain object: its apply moves the weights and calls loss_fn."""

    def __init__(self, rho=0.05):
        self.rho = rho

    def apply(self, model, loss_fn, batch):
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
        moves = []
        with torch.no_grad():
            for p in params:
                e = self.rho * p.grad / norm
                p.add_(e)
                moves.append(e)
        loss_fn(*batch).backward()
        with torch.no_grad():
            for p, e in zip(params, moves):
                p.sub_(e)

    def post_step(self, model):
        pass

    def __repr__(self):
        return f"SeedSAM(rho={self.rho})"


_NEEDS_CLOSURE = "SeedSAM(rho=0.05) re-evaluates the loss, which needs a closure: call optimizer.step(closure)"


@pytest.mark.parametrize("loop", ["two-call", "closure-less"])
def test_a_seed_object_that_re_evaluates_names_only_step_closure_without_a_closure(loop):
    model = make_model()
    x, y = make_data()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SeedSAM(0.05)], model=model)
    closure = make_closure(model, optimizer, x, y)
    optimizer.step(closure)  # works with a closure
    before = params_of(model)
    with pytest.raises(RuntimeError) as caught:
        closure()
        if loop == "two-call":
            optimizer.first_step()
            closure()
            optimizer.second_step()
        else:
            optimizer.step()
    assert str(caught.value) == _NEEDS_CLOSURE
    assert_bitwise_equal(before, params_of(model))


# -- the chain: slot names of user transforms --------------------------------------------------------
class GradEMA(Transform):
    """Pre-step: replaces each gradient by an exponential moving average of the gradients."""

    saves_state_before_step = True

    def __init__(self, beta=0.5):
        self.beta = beta

    def group_defaults(self):
        return {"beta": self.beta}

    @torch.no_grad()
    def pre_update(self, ctx):
        for group in ctx.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = ctx.state[p]
                average = p.grad.clone() if "m" not in state else state["m"] * group["beta"] + p.grad * (1 - group["beta"])
                state["m"] = average
                p.grad.copy_(average)


class DottedEMA(GradEMA):
    slot_name = "my.ema"


def test_a_slot_name_that_is_not_an_identifier_is_refused_in_a_list_as_in_a_mapping():
    model = make_model()
    with pytest.raises(ValueError) as caught:
        TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=0.1, transforms=[SAM(0.05), DottedEMA()])
    assert str(caught.value) == (
        "transforms slot names must be identifiers, got 'my.ema', the slot name of transforms[1] "
        "(DottedEMA): set its slot_name to ASCII letters, digits and underscores, not starting with "
        "a digit, or name its slot with transforms={'name': ...}"
    )
    with pytest.raises(ValueError) as caught:
        TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=0.1, transforms={"my.ema": GradEMA()})
    assert str(caught.value) == (
        "transforms slot names must be identifiers, got 'my.ema' (ASCII letters, digits and "
        "underscores, not starting with a digit)"
    )


def test_a_seed_objects_class_name_that_is_not_an_identifier_is_refused():
    Dotted = type("Seed.Clip", (), {"apply": lambda self, m, f, b: None, "post_step": lambda self, m: None})
    with pytest.raises(ValueError) as caught:
        TransformingOptimizer(make_model().parameters(), torch.optim.SGD, lr=0.1, transforms=[Dotted()])
    assert str(caught.value).startswith(
        "transforms slot names must be identifiers, got 'seed.clip', the slot name of transforms[0] (Seed.Clip)"
    )


def test_a_users_slot_name_names_its_state_and_is_numbered_when_repeated():
    class NamedEMA(GradEMA):
        slot_name = "ema"

    model = make_model()
    x, y = make_data()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=0.1, transforms=[NamedEMA(), NamedEMA(0.9)])
    assert optimizer.slots == ["ema", "ema_1"]
    optimizer.step(make_closure(model, optimizer, x, y))
    weight = model[0].weight
    assert {"exp_avg", "exp_avg_sq", "step", "ema.m", "ema_1.m"} <= set(optimizer.state[weight])


class Glättung:
    """A seed-protocol object whose class name is a Python identifier but not an ASCII one."""

    def apply(self, model, loss_fn, batch):
        pass

    def post_step(self, model):
        pass


def test_a_non_ascii_slot_name_is_refused_with_the_rule_and_the_advice_works():
    """'glättung'.isidentifier() is True, yet slot names are ASCII: the message said
    "identifiers" and advised setting slot_name, which a seed-protocol object's own slot_name
    did not change. Now the message states the rule, and following its advice works."""
    obj = Glättung()
    with pytest.raises(ValueError) as caught:
        TransformingOptimizer(make_model().parameters(), torch.optim.SGD, lr=0.1, transforms=[obj])
    assert str(caught.value) == (
        "transforms slot names must be identifiers, got 'glättung', the slot name of transforms[0] "
        "(Glättung): set its slot_name to ASCII letters, digits and underscores, not starting with "
        "a digit, or name its slot with transforms={'name': ...}"
    )
    with pytest.raises(ValueError) as caught:
        TransformingOptimizer(make_model().parameters(), torch.optim.SGD, lr=0.1, transforms={"glättung": obj})
    assert str(caught.value) == (
        "transforms slot names must be identifiers, got 'glättung' (ASCII letters, digits and "
        "underscores, not starting with a digit)"
    )
    obj.slot_name = "smooth"  # the advice
    optimizer = TransformingOptimizer(make_model().parameters(), torch.optim.SGD, lr=0.1, transforms=[obj])
    assert optimizer.slots == ["smooth"]


def test_a_slot_name_with_a_trailing_newline_is_refused():
    """The rule's regex ended in "$", which also matches before a final newline: "sam\n" was
    accepted, as a given name and as a slot_name, and state keys became "sam\n.x"."""
    with pytest.raises(ValueError, match=r"slot names must be identifiers, got 'sam\\n'"):
        TransformingOptimizer(make_model().parameters(), torch.optim.SGD, lr=0.1, transforms={"sam\n": SAM(0.05)})

    class Trailing(SAM):
        slot_name = "sam\n"

    with pytest.raises(ValueError, match=r"got 'sam\\n', the slot name of transforms\[0\]"):
        TransformingOptimizer(make_model().parameters(), torch.optim.SGD, lr=0.1, transforms=[Trailing(0.05)])


class NamedCounter:
    """A seed-protocol object that names its slot, as a Transform's slot_name does."""

    slot_name = "my_slot"

    def __init__(self):
        self.n = 0

    def apply(self, model, loss_fn, batch):
        pass

    def post_step(self, model):
        self.n += 1

    def state_dict(self):
        return {"n": torch.tensor(float(self.n))}

    def load_state_dict(self, state):
        self.n = int(state["n"])


def test_a_seed_objects_slot_name_names_its_slot_and_its_state():
    model = make_model()
    x, y = make_data()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, transforms=[NamedCounter(), NamedCounter()]
    )
    assert optimizer.slots == ["my_slot", "my_slot_1"]
    optimizer.step(make_closure(model, optimizer, x, y))
    keys = {key for entry in optimizer.state_dict()["state"].values() for key in entry}
    assert {"my_slot.n", "my_slot_1.n"} <= keys
    assert not any(key.startswith("named_counter") for key in keys)
    other = NamedCounter()
    other.slot_name = "per_object"  # an instance's attribute wins over its class's
    optimizer = TransformingOptimizer(make_model().parameters(), torch.optim.SGD, lr=0.1, transforms=[other])
    assert optimizer.slots == ["per_object"]


# -- a seed-protocol object's fallback around loss_fn ---------------------------------------------
class _LookAheadWithFallback:
    """Moves the weights by -0.1 g, re-evaluates through ``loss_fn`` inside ``except Exception``
    (keeping the first pass's gradients if that fails) and comes back in a ``finally``."""

    def apply(self, model, loss_fn, batch):
        moved = [(p, p.grad * 0.1) for p in model.parameters() if p.grad is not None]
        with torch.no_grad():
            for p, delta in moved:
                p.sub_(delta)
        try:
            loss_fn(*batch)
        except Exception:  # noqa: BLE001 - the fallback a user writes
            pass
        finally:
            with torch.no_grad():
                for p, delta in moved:
                    p.add_(delta)

    def post_step(self, model):
        pass


def test_a_seed_protocol_objects_except_exception_around_loss_fn_does_not_bypass_the_non_finite_policy():
    """The re-evaluation's non-finite gradients end the step from inside loss_fn; an ``except
    Exception`` swallowed that and the step applied the NaN gradients."""
    model = make_model()
    x, y = make_data()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, transforms=[_LookAheadWithFallback()], model=model
    )
    calls = [0]

    def closure():
        calls[0] += 1
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        (loss * float("nan") if calls[0] == 2 else loss).backward()
        return loss

    before = params_of(model)
    with pytest.warns(RuntimeWarning, match="the gradients of the second evaluation are not finite"):
        optimizer.step(closure)
    assert optimizer.skipped_steps == 1
    assert_bitwise_equal(before, params_of(model))


# -- a user's Perturbation whose buffer is the parameter's own memory ------------------------------
class _BufferIsTheParameter(PerturbationTransform):
    r""":math:`w + \rho\,\operatorname{sign}(g)` in place, naming the parameter (or an alias of it) as
    the move's buffer: "the tensor holding :math:`w + e`"."""

    writes_weights_before_step = False  # it moves the weights last and never raises after

    def __init__(self, alias):
        self.alias = alias

    def group_defaults(self):
        return {"rho": 0.5}

    @torch.no_grad()
    def perturb(self, ctx):
        moves = []
        for group in ctx.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                backup = param.detach().clone()
                param.add_(torch.sign(param.grad), alpha=group["rho"])
                moves.append((param, backup, self.alias(param), False))
        return Perturbation(moves) if moves else None


class _RaisingPostOnce(Transform):
    armed = False

    def post_update(self, ctx):
        if self.armed:
            raise RuntimeError("post-step transform failed")


@pytest.mark.parametrize(
    "alias", [lambda p: p, lambda p: p.data, lambda p: p.detach()], ids=["param", "data", "detach"]
)
def test_a_perturbations_buffer_that_is_the_parameter_is_not_used_for_the_optimizers_copy(alias):
    """The optimizer copied its pre-step weights into the move's buffer: the parameter itself, so a
    post-step failure restored the weights from a 'copy' the inner step had overwritten."""
    model = make_model()
    x, y = make_data()
    failing = _RaisingPostOnce()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[_BufferIsTheParameter(alias), failing]
    )
    closure = make_closure(model, optimizer, x, y)
    optimizer.step(closure)
    before = params_of(model)
    failing.armed = True
    with pytest.raises(RuntimeError, match="^post-step transform failed$"):
        optimizer.step(closure)
    assert_bitwise_equal(before, params_of(model))


# -- an inner optimizer's own top-level state beside a seed object's slot ----------------------------
class _SGDCountingSteps(torch.optim.SGD):
    """Keeps a step count at the top level of ``state``, under a string key (pytorch_optimizer's SPAM
    keeps ``"total_step"`` there)."""

    def step(self, closure=None):
        loss = super().step(closure)
        self.state["total_step"] = self.state.get("total_step", 0) + 1
        return loss


def test_a_seed_objects_state_is_checkpointed_beside_an_inner_optimizers_top_level_counter():
    """Looking for the slot's parameters in ``state`` iterated the inner optimizer's int as an entry:
    ``state_dict()`` raised ``TypeError: 'int' object is not iterable``."""
    model = nn.Linear(2, 1)
    optimizer = TransformingOptimizer(model.parameters(), _SGDCountingSteps, lr=0.1, transforms=[Pending()])
    for _ in range(3):
        _grad_step(optimizer, model)
    checkpoint = optimizer.state_dict()
    assert checkpoint["state"]["total_step"] == 3
    assert checkpoint["state"][0] == {"pending.t": 3, "pending.saved": torch.tensor(3.0)}

    resumed = Pending()
    twin = TransformingOptimizer(nn.Linear(2, 1).parameters(), _SGDCountingSteps, lr=0.1, transforms=[resumed])
    twin.load_state_dict(checkpoint)
    assert resumed.t == 3 and torch.equal(resumed.saved, torch.tensor(3.0))
    assert twin.state["total_step"] == 3


# -- settings() that hold a function or an object without a repr of its own --------------------------
class _Halve:
    """A rule object with Python's default repr (``<..._Halve object at 0x...>``)."""

    def __call__(self, grad):
        return grad * 0.5


class _OnEachGradient(Transform):
    """A stateless pre-step transform that rewrites each gradient in place: ``update(grad, group)``."""

    def init_state(self, ctx):
        pass

    @torch.no_grad()
    def pre_update(self, ctx):
        for group in ctx.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p.grad, group)


class RuleOnGradients(_OnEachGradient):
    """Pre-step: ``g <- rule(g)``; the rule is a constructor-only setting."""

    def __init__(self, rule=torch.sign):
        self.rule = rule

    def settings(self):
        return {"rule": self.rule}

    def update(self, grad, group):
        grad.copy_(self.rule(grad))


@pytest.mark.parametrize("make_rule", [_Halve, lambda: (lambda grad: torch.sign(grad))], ids=["object", "lambda"])
def test_a_checkpoint_loads_into_an_equal_transform_whose_setting_lives_at_another_address(make_rule):
    """The chain recorded each setting's repr with its memory address (``<function ... at 0x7f...>``),
    which differs from process to process: a checkpoint never loaded where it was not saved (here: a
    rule object built anew, as it is in another process)."""
    model = nn.Linear(2, 1)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[RuleOnGradients(make_rule())])
    _grad_step(optimizer, model)
    checkpoint = optimizer.state_dict()
    assert "0x" not in checkpoint["param_groups"][0]["transform_chain"][0]

    twin = TransformingOptimizer(
        nn.Linear(2, 1).parameters(), torch.optim.SGD, lr=0.1, momentum=0.5, transforms=[RuleOnGradients(make_rule())]
    )
    twin.load_state_dict(checkpoint)
    assert twin.param_groups[0]["momentum"] == 0  # the checkpoint's groups were installed


def test_a_checkpoint_made_with_another_rule_is_still_refused():
    model = nn.Linear(2, 1)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[RuleOnGradients(torch.sign)])
    checkpoint = optimizer.state_dict()
    twin = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[RuleOnGradients(_Halve())])
    with pytest.raises(ValueError, match=r"transform 0 is rule_on_gradients=RuleOnGradients\(rule=<built-in method sign"):
        twin.load_state_dict(checkpoint)



def test_a_checkpoint_made_with_another_lambda_is_refused():
    """Recorded without its address, every lambda read ``<function <lambda>>``: a checkpoint made
    with one rule loaded silently into a transform with another. A function is recorded by its
    module and qualified name, and a lambda also by its first line."""
    halve = lambda grad: grad / 2  # noqa: E731
    negate = lambda grad: -grad  # noqa: E731
    model = nn.Linear(2, 1)
    checkpoint = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, transforms=[RuleOnGradients(halve)]
    ).state_dict()
    recorded = checkpoint["param_groups"][0]["transform_chain"][0]
    line = halve.__code__.co_firstlineno
    assert recorded.endswith(f"RuleOnGradients(rule=<function {__name__}.test_a_checkpoint_made_with_another_lambda_is_refused.<locals>.<lambda> (line {line})>)")
    twin = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[RuleOnGradients(negate)])
    with pytest.raises(ValueError, match=rf"\(line {line}\)>\) in the checkpoint and rule_on_gradients=RuleOnGradients\(rule=<function .*<lambda> \(line {line + 1}\)>\) here$"):
        twin.load_state_dict(checkpoint)
    twin = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[RuleOnGradients(torch.sign)])
    with pytest.raises(ValueError, match=r"in the checkpoint and rule_on_gradients=RuleOnGradients\(rule=<built-in method sign of type object>\) here$"):
        twin.load_state_dict(checkpoint)

# -- validate_group raising a ValueError subclass of the user's ------------------------------------------
class NotPositive(ValueError):
    """A user's error class whose constructor takes the key and the value, not a message."""

    def __init__(self, key, value):
        super().__init__(f"{key} must be > 0, got {value!r}")
        self.key = key


class ScaleBy(_OnEachGradient):
    """Pre-step: ``g <- gamma * g`` (per-group ``gamma``)."""

    def __init__(self, gamma=1.0):
        self.gamma = gamma

    def group_defaults(self):
        return {"gamma": self.gamma}

    def validate_group(self, group):
        if not group["gamma"] > 0:
            raise NotPositive("gamma", group["gamma"])

    def update(self, grad, group):
        grad.mul_(group["gamma"])


def test_a_validate_group_error_of_the_users_own_class_keeps_its_message_and_kind():
    """The chain rebuilt the error as ``type(error)(message)``: a class whose constructor takes other
    arguments failed there with ``TypeError: NotPositive.__init__() missing 1 required positional
    argument`` instead of the message."""
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: gamma must be > 0, got -1\.0$"):
        TransformingOptimizer([{"params": model.parameters(), "gamma": -1.0}], torch.optim.SGD, lr=0.1, transforms=[ScaleBy()])

    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[ScaleBy(), ScaleBy(2.0)])
    optimizer.param_groups[0]["scale_by_1.gamma"] = 0.0
    before = params_of(model)
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: scale_by_1\.gamma must be > 0, got 0\.0$"):
        _grad_step(optimizer, model)
    assert_bitwise_equal(before, params_of(model))


# -- a scheduler of a qualified key that records its initial value (timm's, AllenNLP's) ---------------
class _FieldScheduler:
    """Schedules any param-group key the way timm's ``Scheduler(param_group_field=...)`` does: it
    records each group's start value under ``"initial_<field>"``, then multiplies it by ``factor``
    per step."""

    def __init__(self, optimizer, field, factor):
        self.optimizer, self.field, self.factor, self.t = optimizer, field, factor, 0
        for group in optimizer.param_groups:
            group.setdefault(f"initial_{field}", group[field])

    def step(self):
        self.t += 1
        for group in self.optimizer.param_groups:
            group[self.field] = group[f"initial_{self.field}"] * self.factor**self.t


def test_a_scheduler_of_a_qualified_key_may_record_it_under_a_prefixed_key():
    """``"initial_grad_ema.beta"`` (timm's record of the scheduled ``"grad_ema.beta"``) was taken for
    a misspelt slot close to ``"grad_ema"`` and the next step raised ``ValueError``; it is kept and
    ignored, as torch keeps ``"initial_lr"``. The run equals one whose beta is set by hand."""
    x, y = make_data()
    models = [make_model(), make_model()]
    optimizers = [
        TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[GradEMA(0.5), GradEMA(0.8)])
        for model in models
    ]
    closures = [make_closure(model, optimizer, x, y) for model, optimizer in zip(models, optimizers)]
    scheduler = _FieldScheduler(optimizers[0], "grad_ema.beta", 0.5)
    for step in range(1, 4):
        for optimizer, closure in zip(optimizers, closures):
            optimizer.step(closure)
        scheduler.step()
        optimizers[1].param_groups[0]["grad_ema.beta"] = 0.5 * 0.5**step
    assert optimizers[0].param_groups[0]["initial_grad_ema.beta"] == 0.5
    assert optimizers[0].param_groups[0]["grad_ema.beta"] == optimizers[1].param_groups[0]["grad_ema.beta"] == 0.0625
    assert_bitwise_equal(params_of(models[0]), params_of(models[1]))
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: the key 'gradema\.beta' names no slot of the chain"):
        TransformingOptimizer([{"params": models[0].parameters(), "gradema.beta": 0.1}], torch.optim.SGD, lr=0.1, transforms=[GradEMA(), GradEMA()])
    for key in ("base_grad_ema.beta", "max_grad_ema_1.beta"):  # the other words schedulers use
        TransformingOptimizer([{"params": models[0].parameters(), key: 0.1}], torch.optim.SGD, lr=0.1, transforms=[GradEMA(), GradEMA()])
    # any other word before the slot is a misspelling, as before
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: the key 'the_grad_ema\.beta' names no slot of the chain"):
        TransformingOptimizer([{"params": models[0].parameters(), "the_grad_ema.beta": 0.1}], torch.optim.SGD, lr=0.1, transforms=[GradEMA(), GradEMA()])

    class SubEMA(GradEMA):
        pass

    # the transform's own default slot, though it ends in "_<slot>": refused as before
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: the key 'sub_ema\.beta' names no slot of the chain \(slots: 'ema'\)"):
        TransformingOptimizer([{"params": models[0].parameters(), "sub_ema.beta": 0.1}], torch.optim.SGD, lr=0.1, transforms={"ema": SubEMA()})


@pytest.mark.parametrize(
    "bad, shown",
    [(1, "1"), (None, "None"), (SAM, r"<class 'samgria\.transforms\.sam\.SAM'>")],
    ids=["number", "none", "class"],
)
def test_protocol_transform_refuses_what_is_no_seed_protocol_object_at_construction(bad, shown):
    """ProtocolTransform(1) was built and the optimizer's first step raised AttributeError
    ('int' object has no attribute 'apply'); it is refused when built, naming the argument."""
    with pytest.raises(TypeError, match=rf"^transform must be an object with apply\(model, loss_fn, batch\) and post_step\(model\) methods, got {shown}$"):
        ProtocolTransform(bad)


class _ScalesGradients:
    """A seed-protocol object that multiplies every gradient by ``factor`` (no re-evaluation)."""

    def __init__(self, factor):
        self.factor = factor

    def apply(self, model, loss_fn, batch):
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.factor).mul_(self.factor)

    def post_step(self, model):
        pass


class _DeclaresNoOverflow(_ScalesGradients):
    def can_overflow_gradients(self, param_groups):
        return False


def test_a_seed_object_that_overflows_the_gradients_skips_the_step_unless_it_declares_it_cannot():
    """A seed-protocol object's ``apply`` may compute the gradients anew: its result went to the
    inner step unchecked (here 1e300 * 1e300 in float64: inf, then NaN weights with momentum). It
    is checked as ScaleGrad's is, and the step skipped whole; an object that declares
    ``can_overflow_gradients(param_groups) -> False`` is taken at its word (no check)."""
    model = make_model().double()
    x, y = make_data()
    x, y = x.double(), y.double()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[_ScalesGradients(1e300)], model=model)
    before, state_before = params_of(model), optimizer.state_dict()["state"]
    with pytest.warns(RuntimeWarning, match=r"^TransformingOptimizer: the gradients of the first evaluation, as _ScalesGradients \(seed protocol\) computed them, are not finite"):
        optimizer.step(make_closure(model, optimizer, x, y))
    assert optimizer.skipped_steps == 1
    assert_bitwise_equal(before, params_of(model))
    assert optimizer.state_dict()["state"] == state_before  # no momentum buffer either
    declared = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[_DeclaresNoOverflow(1e300)], model=model)
    assert ProtocolTransform(_DeclaresNoOverflow(2.0)).can_overflow_gradients(declared.param_groups) is False
    assert ProtocolTransform(_ScalesGradients(2.0)).can_overflow_gradients(declared.param_groups) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        declared.step(make_closure(model, declared, x, y))  # unchecked: the inner step takes inf
    assert not all(torch.isfinite(p).all() for p in model.parameters())
