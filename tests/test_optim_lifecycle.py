"""Object lifecycle: copies and deletions of optimizers, and transforms that outlive them.

The reference is torch's own behaviour: an optimizer is freed as soon as its last reference goes;
``copy.copy`` of an optimizer shares its state and param groups until a load rebinds the copy's
own (a wrapper's copy drives a shallow copy of its inner optimizer); deleting one object (a copy,
the original, the wrapper) never changes how another live object steps. Transform objects that
outlive their optimizer (one ``SAM()`` reused across a sweep) keep no parameters, and SAM keeps
no buffers for parameters that left the optimizer.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import pickle
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.functional import mse_loss

from samgria import EMA, LAMP, MAML, SAM, TransformingOptimizer
from samgria._wrapper import WrappingOptimizer, _DrivenState
from samgria.data.task import Task
from state_helpers import assert_state_dicts_equal


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def make_closure(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 1) -> Callable[[], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(6, 2, generator=generator, dtype=torch.float64)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def ended_like(outcome: tuple[list[torch.Tensor], dict], expected: tuple[list[torch.Tensor], dict]) -> None:
    """Two runs' ``(weights, state_dict)`` are the same, bit for bit."""
    (weights, state), (expected_weights, expected_state) = outcome, expected
    assert len(weights) == len(expected_weights)
    assert all(torch.equal(a, b) for a, b in zip(weights, expected_weights))
    assert_state_dicts_equal(state, expected_state)


def weights_of(model: nn.Module) -> list[torch.Tensor]:
    return [param.detach().clone() for param in model.parameters()]


def _meta_closure(meta, model: nn.Module) -> Callable[[], torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 3, generator=generator, dtype=torch.float64), torch.randn(5, 2, generator=generator, dtype=torch.float64)
    task = Task(x, y, x, y)

    def closure() -> torch.Tensor:
        meta.zero_grad()
        learner = meta.adapt(lambda f: mse_loss(f(task.support_x), task.support_y))
        loss = mse_loss(learner(task.query_x), task.query_y)
        loss.backward()
        return loss

    return closure


def test_a_driven_optimizer_that_outlives_its_wrapper_keeps_its_state_and_steps_as_torchs():
    """Held elsewhere, the inner optimizer sees its entries (without the transforms' slots) and
    steps exactly as a torch SGD given the same state."""
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapper = TransformingOptimizer(inner, transforms=[SAM(0.05), LAMP(seed=0), EMA(0.9)])
    for _ in range(2):
        wrapper.step(make_closure(model, wrapper))
    kept = {param: {key: value.clone() for key, value in wrapper.state[param].items() if "." not in key} for param in model.parameters()}
    assert all(set(entry) == {"momentum_buffer"} for entry in kept.values())
    twin_model = copy.deepcopy(model)
    twin = torch.optim.SGD(twin_model.parameters(), lr=0.1, momentum=0.9)
    twin.load_state_dict({"state": {i: dict(entry) for i, entry in enumerate(kept.values())}, "param_groups": twin.state_dict()["param_groups"]})
    del wrapper

    assert {key for entry in inner.state.values() for key in entry} == {"momentum_buffer"}
    for param in model.parameters():
        assert torch.equal(inner.state[param]["momentum_buffer"], kept[param]["momentum_buffer"])
    for _ in range(2):
        inner.step(make_closure(model, inner))
        twin.step(make_closure(twin_model, twin))
    for param, twin_param in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(param, twin_param)


def test_a_wrapper_outliving_the_meta_optimizer_that_drove_it_steps_on():
    model = make_model()
    wrapper = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=1e-2, momentum=0.9, transforms=[SAM(0.05)])
    meta = MAML(model, wrapper, inner_lr=0.1)
    meta.step(_meta_closure(meta, model))
    momentum = {param: wrapper.state[param]["momentum_buffer"].clone() for param in model.parameters()}
    del meta
    assert all(torch.equal(wrapper.state[param]["momentum_buffer"], momentum[param]) for param in model.parameters())
    before = weights_of(model)
    wrapper.step(make_closure(model, wrapper))
    assert all(not torch.equal(param, old) for param, old in zip(model.parameters(), before))


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "pickled scheduler", "deepcopy, wrapper deleted first"])
def test_a_copy_of_the_inner_optimizer_alone_is_a_plain_optimizer_with_its_state(how):
    """Its state_dict() packs plain dicts, as torch's does: they load into a torch Adam and survive
    ``torch.load(weights_only=True)`` (the copied wrapper is freed at once, and the copy's
    entries, which hide the transforms' keys, were packed as they are)."""
    model = make_model()
    wrapper = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=0.1, transforms=[SAM(0.05), LAMP(seed=0), EMA(0.9)])
    scheduler = torch.optim.lr_scheduler.StepLR(wrapper.inner, 1, 0.5)
    wrapper.step(make_closure(model, wrapper))
    scheduler.step()
    originals = [wrapper.state[param]["exp_avg"].clone() for param in model.parameters()]
    inner = wrapper.inner
    if how == "pickled scheduler":
        copied = pickle.loads(pickle.dumps(scheduler)).optimizer
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(inner))
    else:
        if how != "deepcopy":
            del wrapper, scheduler
        copied = copy.deepcopy(inner)
    assert sorted({key for entry in copied.state.values() for key in entry}) == ["exp_avg", "exp_avg_sq", "step"]
    assert all(torch.equal(entry["exp_avg"], original) for entry, original in zip(copied.state.values(), originals))
    packed = copied.state_dict()
    assert {type(entry) for entry in packed["state"].values()} == {dict}
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=True)
    fresh = torch.optim.Adam(make_model().parameters(), lr=0.1)
    fresh.load_state_dict(reloaded)
    assert_state_dicts_equal(fresh.state_dict(), packed)


def test_sam_drops_the_backups_of_a_param_group_deleted_from_the_optimizer():
    model, held = make_model(), {"extra": nn.Linear(1, 50).double()}
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    optimizer.add_param_group({"params": list(held["extra"].parameters())})
    x, inputs = torch.ones(1, dtype=torch.float64), torch.ones(6, 3, dtype=torch.float64)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(inputs).square().mean() + sum(layer(x).sum() for layer in held.values())
        loss.backward()
        return loss

    optimizer.step(closure)
    removed = weakref.ref(held["extra"].weight)
    del optimizer.param_groups[1]
    for param in held.pop("extra").parameters():
        optimizer.state.pop(param, None)
    optimizer.step(closure)
    assert removed() is None


def test_a_transform_that_outlives_its_optimizer_keeps_no_parameters(no_cyclic_collector):
    sam = SAM(0.05)
    for seed in range(2):  # a sweep: one transform object, a new model and optimizer per trial
        model = make_model(seed)
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[sam])
        optimizer.step(make_closure(model, optimizer))
        weight = weakref.ref(model[0].weight)
        del optimizer, model  # freed as the last reference goes
        assert weight() is None


def _copy_discarded_or_not(build: Callable[[nn.Module], torch.optim.Optimizer], step: Callable, discard: bool):
    model = make_model()
    optimizer = build(model)
    step(model, optimizer)
    if discard:
        copy.copy(optimizer)  # thrown away at once
    step(model, optimizer)
    return weights_of(model), optimizer.state_dict()


@pytest.mark.parametrize("kind", ["TransformingOptimizer", "MAML"])
def test_discarding_a_shallow_copy_of_an_optimizer_changes_nothing(kind):
    """copy.copy of a torch optimizer shares its state; throwing the copy away must not touch the
    original (a finaliser-based design once handed the shared inner optimizer a state of its own
    there, and the original's next step dropped the momentum)."""
    if kind == "MAML":
        def build(model):
            return MAML(model, torch.optim.SGD, lr=1e-2, momentum=0.9, inner_lr=0.1)

        def step(model, optimizer):
            optimizer.step(_meta_closure(optimizer, model))
    else:
        def build(model):
            return TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(0.05)])

        def step(model, optimizer):
            optimizer.step(make_closure(model, optimizer))
    ended_like(_copy_discarded_or_not(build, step, discard=True), _copy_discarded_or_not(build, step, discard=False))


def test_a_shallow_copy_of_the_inner_optimizer_works_on_after_the_wrapper_is_gone():
    model = make_model()
    wrapper = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=0.1, transforms=[SAM(0.05), LAMP(seed=0)])
    wrapper.step(make_closure(model, wrapper))
    inner = wrapper.inner
    shallow = copy.copy(inner)
    del wrapper
    assert [sorted(entry) for entry in shallow.state.values()] == [["exp_avg", "exp_avg_sq", "step"]] * 4
    assert all(shallow.state[param]["exp_avg"] is inner.state[param]["exp_avg"] for param in model.parameters())  # shared
    shallow.step(make_closure(model, shallow))
    assert all(int(entry["step"]) == 2 for entry in inner.state.values())
    again = pickle.loads(pickle.dumps(shallow))
    assert [sorted(entry) for entry in again.state.values()] == [["exp_avg", "exp_avg_sq", "step"]] * 4


@pytest.mark.parametrize("with_ema", [False, True], ids=["SAM", "SAM+EMA"])
def test_a_shallow_copy_of_a_wrapper_steps_on_after_the_original_is_deleted(with_ema):
    """The copy steps on from the shared state, as it would with the original alive (a
    finaliser-based design once emptied the shared entries when the original went: momentum lost
    where an entry held no key of a transform)."""
    def run(delete_original: bool):
        model = make_model()
        transforms = [SAM(0.05), EMA(0.9)] if with_ema else [SAM(0.05)]
        original = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=transforms)
        original.step(make_closure(model, original))
        shallow = copy.copy(original)
        if delete_original:
            del original
        for _ in range(2):
            shallow.step(make_closure(model, shallow))
        return weights_of(model), shallow.state_dict()

    ended_like(run(delete_original=True), run(delete_original=False))


# -- freed at once, as torch's optimizers are ------------------------------------------------------
def _stepped(kind: str, model: nn.Module) -> list[object]:
    """The objects a user would hold for ``kind`` (all of them to be deleted), after two steps."""
    if kind == "torch Adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        held = [optimizer]
    elif kind in ("MAML", "MAML driving SAM"):
        outer = (
            TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=1e-2, momentum=0.9, transforms=[SAM(0.05)])
            if kind == "MAML driving SAM"
            else torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        )
        meta = MAML(model, outer, inner_lr=0.1)
        for _ in range(2):
            meta.step(_meta_closure(meta, model))
        return [meta, outer]
    else:
        transforms = {"no transforms": [], "SAM": [SAM(0.05)], "SAM, LAMP and EMA": [SAM(0.05), LAMP(seed=0), EMA(0.9)]}
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=0.1, transforms=transforms[kind])
        held = [optimizer, optimizer.inner]
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer))
    return held


@pytest.mark.parametrize("kind", ["torch Adam", "no transforms", "SAM", "SAM, LAMP and EMA", "MAML", "MAML driving SAM"])
@pytest.mark.parametrize("then", ["stepped", "checkpointed", "copied", "unpickled"])
def test_a_deleted_optimizer_frees_its_model_at_once_as_torchs(kind, then, no_cyclic_collector):
    """With Python's cyclic collector off, deleting the optimizer and the model frees both, as it
    frees a torch optimizer: nothing the inner optimizer holds refers back to its wrapper (its
    state view held the wrapper, and a sweep kept up to ten dead models until the collector ran)."""
    model = make_model()
    held = _stepped(kind, model)
    optimizer = held[0]
    if then == "checkpointed":
        optimizer.load_state_dict(optimizer.state_dict())
    elif then == "copied":
        held.append(copy.copy(optimizer))
    elif then == "unpickled":
        model, optimizer = pickle.loads(pickle.dumps((model, optimizer)))
        held = [optimizer]
    watched = [weakref.ref(model[0].weight), *map(weakref.ref, held)]
    del model, optimizer, held
    assert [ref() is None for ref in watched] == [True] * len(watched)


@pytest.mark.parametrize("kind", ["TransformingOptimizer", "MAML"])
def test_the_inner_optimizer_of_a_deleted_wrapper_is_refused_by_a_new_one_naming_why(kind):
    """Its param groups and state still hold the deleted wrapper's settings and keys, which a new
    wrapper would take for its own: refused, as while the wrapper lives."""
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if kind == "MAML":
        wrapper, name = MAML(model, inner, inner_lr=0.1), "outer"
        rewrap = functools.partial(MAML, model, inner_lr=0.1)
    else:
        wrapper, name = TransformingOptimizer(inner, transforms=[SAM(0.05), LAMP(seed=0)]), "params"
        rewrap = functools.partial(TransformingOptimizer, transforms=[SAM(0.05)])
    copy.copy(wrapper)  # a discarded shallow copy: the live wrapper still drives the optimizer
    for _ in range(2):
        with pytest.raises(ValueError, match=rf"^{name} is already driven by a {kind}, which holds its state and param groups: build a new SGD to wrap again$"):
            rewrap(inner)
        if kind == "MAML":
            wrapper.step(_meta_closure(wrapper, model))
        else:
            wrapper.step(make_closure(model, wrapper))
    shallow = copy.copy(wrapper)  # drives a copy of the inner optimizer, which it refuses while it lives
    del wrapper
    with pytest.raises(ValueError, match=rf"^{name} was driven by a wrapping optimizer, deleted since, whose settings and state it still holds: build a new SGD to wrap again$"):
        rewrap(inner)
    with pytest.raises(ValueError, match=rf"^{name} is already driven by a {kind}, which holds its state and param groups"):
        rewrap(shallow.outer if kind == "MAML" else shallow.inner)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("order", ["wrapper first", "inner first"])
def test_a_wrapper_copied_with_its_inner_optimizer_shares_one_state_with_it_in_either_order(how, order):
    """Copied together (a checkpoint of several objects), the copies of the wrapper and of its
    inner optimizer hold one state whichever is reached first: a checkpoint loaded into the
    copied wrapper is the state the copied inner optimizer steps with."""
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(0.05)])
    optimizer.step(make_closure(model, optimizer))
    checkpoint = copy.deepcopy(optimizer.state_dict())
    optimizer.step(make_closure(model, optimizer))
    objects = (model, optimizer, optimizer.inner) if order == "wrapper first" else (model, optimizer.inner, optimizer)
    copied = copy.deepcopy(objects) if how == "deepcopy" else pickle.loads(pickle.dumps(objects))
    copied_model = copied[0]
    copied_optimizer, copied_inner = (copied[1], copied[2]) if order == "wrapper first" else (copied[2], copied[1])
    assert copied_optimizer.inner is copied_inner
    copied_optimizer.load_state_dict(copy.deepcopy(checkpoint))  # its own tensors (a load takes them as they are)
    for param in copied_model.parameters():
        assert copied_inner.state[param]["momentum_buffer"] is copied_optimizer.state[param]["momentum_buffer"]
    reference_model = copy.deepcopy(copied_model)
    reference = TransformingOptimizer(reference_model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(0.05)])
    reference.load_state_dict(checkpoint)
    copied_optimizer.step(make_closure(copied_model, copied_optimizer))
    reference.step(make_closure(reference_model, reference))
    assert all(torch.equal(a, b) for a, b in zip(copied_model.parameters(), reference_model.parameters()))
    assert_state_dicts_equal(copied_optimizer.state_dict(), reference.state_dict())


# -- shallow copies share the inner optimizer; each steps with its own state ------------------------
def _sgd_with_sam(model: nn.Module) -> TransformingOptimizer:
    return TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(0.05)])


@pytest.mark.parametrize("kind", ["torch SGD", "TransformingOptimizer"])
def test_a_shallow_copy_that_loads_a_checkpoint_leaves_the_original_stepping_its_own_state(kind):
    """As with torch's optimizers, whose ``copy.copy`` shares the state dict and whose
    ``load_state_dict`` rebinds the loading object's own: the original's next step is the same
    with or without the copy's load (the shared inner optimizer stepped the copy's state), and
    the copy steps from the checkpoint it loaded."""
    build = (lambda model: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) if kind == "torch SGD" else _sgd_with_sam

    def run(copy_loads: bool):
        model = make_model()
        optimizer = build(model)
        optimizer.step(make_closure(model, optimizer))
        early = copy.deepcopy(optimizer.state_dict())
        optimizer.step(make_closure(model, optimizer, seed=2))
        if copy_loads:
            shallow = copy.copy(optimizer)
            checkpoint = copy.deepcopy(early)
            checkpoint["param_groups"][0]["lr"] = 0.5  # the copy's groups only, as torch's load
            shallow.load_state_dict(copy.deepcopy(checkpoint))
            assert_state_dicts_equal(shallow.state_dict(), checkpoint)
        optimizer.step(make_closure(model, optimizer))
        return weights_of(model), optimizer.state_dict()

    ended_like(run(copy_loads=True), run(copy_loads=False))


def test_a_discarded_shallow_copy_does_not_keep_the_originals_load_from_its_inner_optimizer():
    """After ``copy.copy(optimizer)`` is thrown away, a checkpoint the original loads is what its
    inner optimizer steps with (the copy's unpickling had pointed the shared inner optimizer at
    the copy's state, so the original's load never reached it)."""
    def run(discard: bool):
        model = make_model()
        optimizer = _sgd_with_sam(model)
        optimizer.step(make_closure(model, optimizer))
        early, early_weights = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(model.state_dict())
        optimizer.step(make_closure(model, optimizer, seed=2))
        if discard:
            copy.copy(optimizer)
        model.load_state_dict(early_weights)
        optimizer.load_state_dict(early)
        assert all(optimizer.inner.state[param] is optimizer.state[param] for param in model.parameters())
        optimizer.step(make_closure(model, optimizer, seed=2))
        return weights_of(model), optimizer.state_dict()

    ended_like(run(discard=True), run(discard=False))


def test_a_discarded_shallow_copy_of_a_meta_optimizer_keeps_a_direct_load_completing_its_groups():
    """A checkpoint loaded straight into the innermost optimizer gets the meta-optimizer's group
    keys back (``inner_lr`` as the user set it); a discarded ``copy.copy`` of the meta-optimizer
    must not change that (its view of the outer optimizer named the dead copy, and the load lost
    ``inner_lr`` and ``adapt``, stepping with the constructor's rate)."""
    def run(discard: bool):
        model = make_model()
        meta = MAML(model, _sgd_with_sam(model), inner_lr=0.1)
        meta.step(_meta_closure(meta, model))
        meta.param_groups[0]["inner_lr"] = 0.3
        if discard:
            copy.copy(meta)
        meta.outer.inner.load_state_dict(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9).state_dict())
        assert (meta.param_groups[0]["inner_lr"], meta.param_groups[0]["adapt"]) == (0.3, True)
        meta.step(_meta_closure(meta, model))
        return weights_of(model), meta.state_dict()

    ended_like(run(discard=True), run(discard=False))


@pytest.mark.parametrize("order", ["wrapper first", "inner first"])
def test_a_pickle_whose_inner_view_held_the_wrapper_itself_unpickles_and_steps_on(order, monkeypatch, no_cyclic_collector):
    """Pickles written while the inner optimizer's view held the wrapper itself (and the wrapper
    pickled no shared state) still unpickle, in either order, and step as today's pickle does."""
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=0.1, transforms=[SAM(0.05), LAMP(seed=0)])
    optimizer.step(make_closure(model, optimizer))
    objects = (model, optimizer) if order == "wrapper first" else (model, optimizer.inner, optimizer)
    getstate = WrappingOptimizer.__getstate__
    monkeypatch.setattr(_DrivenState, "__getstate__", lambda view: {"_owner": view._owner})
    monkeypatch.setattr(WrappingOptimizer, "__getstate__", lambda wrapper: {k: v for k, v in getstate(wrapper).items() if k != "_state_source"})
    legacy = pickle.dumps(objects)
    monkeypatch.undo()
    results = []
    for unpickled in (pickle.loads(legacy), pickle.loads(pickle.dumps(objects))):
        copied_model, copied = unpickled[0], unpickled[-1]
        assert sorted(copied.inner.state[next(copied_model.parameters())]) == ["exp_avg", "exp_avg_sq", "step"]
        for _ in range(2):
            copied.step(make_closure(copied_model, copied))
        results.append((weights_of(copied_model), copied.state_dict()))
    ended_like(*results)
    copied_model, copied = (unpickled := pickle.loads(legacy))[0], unpickled[-1]
    copied.step(make_closure(copied_model, copied))
    watched = weakref.ref(copied)
    del copied, unpickled
    assert watched() is None  # once it has stepped, nothing it drives holds it: freed at once


def _sam_sgd_rho(model: nn.Module) -> TransformingOptimizer:
    optimizer = _sgd_with_sam(model)
    optimizer.param_groups[0]["rho"] = 0.5  # a group setting a direct load must keep
    return optimizer


def _maml(model: nn.Module, outer: torch.optim.Optimizer) -> MAML:
    meta = MAML(model, outer, inner_lr=0.1)
    meta.param_groups[0]["inner_lr"] = 0.3  # a group setting a direct load must keep
    return meta


_WRAPPERS = {
    "TransformingOptimizer": (_sam_sgd_rho, lambda optimizer: optimizer.inner, {"rho": 0.5}),
    "MAML": (
        lambda model: _maml(model, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)),
        lambda meta: meta.outer,
        {"inner_lr": 0.3},
    ),
    "MAML driving SAM": (lambda model: _maml(model, _sam_sgd_rho(model)), lambda meta: meta.outer.inner, {"inner_lr": 0.3, "rho": 0.5}),
}


def _step_any(optimizer, model: nn.Module, seed: int = 1) -> None:
    optimizer.step(_meta_closure(optimizer, model) if isinstance(optimizer, MAML) else make_closure(model, optimizer, seed))


def _momenta(optimizer) -> list[torch.Tensor | None]:
    return [entry.get("momentum_buffer") for entry in optimizer.state.values()]


@pytest.mark.parametrize("kind", list(_WRAPPERS))
@pytest.mark.parametrize(
    "history", ["a copy stepped and was discarded", "the original is deleted", "a copy loaded a checkpoint", "into the copy's"]
)
def test_a_direct_load_into_the_inner_optimizer_is_taken_by_its_own_wrapper_alone(kind, history):
    """``copy.copy`` of a wrapper drives a shallow copy of its inner optimizer, so a checkpoint
    loaded straight into one wrapper's inner optimizer is that wrapper's (taken over at once, its
    group settings completed, the user's load hooks run) and no other's. They shared one inner
    optimizer: the load went to whichever wrapper had last registered its hook, or crashed
    torch's hook loop, or lost the group settings when the original was gone."""
    build, innermost, settings = _WRAPPERS[kind]
    model = make_model()
    wrapper = build(model)
    _step_any(wrapper, model)
    early = copy.deepcopy(wrapper.state_dict())
    _step_any(wrapper, model, seed=2)
    shallow = copy.copy(wrapper)
    assert innermost(shallow) is not innermost(wrapper)
    assert innermost(shallow).param_groups is innermost(wrapper).param_groups  # as torch's copy.copy
    other = None
    if history == "a copy stepped and was discarded":
        _step_any(shallow, model)
        _step_any(wrapper, model)
        del shallow
        target = wrapper
    elif history == "the original is deleted":
        del wrapper
        target = shallow
    elif history == "a copy loaded a checkpoint":
        shallow.load_state_dict(copy.deepcopy(early))
        target, other = wrapper, shallow
    else:  # the two still share the state dictionary and its entries
        target, other = shallow, wrapper
    kept = None if other is None else [momentum.clone() for momentum in _momenta(other)]
    ran = []
    innermost(target).register_load_state_dict_post_hook(lambda optimizer: ran.append(type(optimizer).__name__))
    innermost(target).load_state_dict(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9).state_dict())
    assert ran == ["SGD"]
    if other is not None:
        assert len(_momenta(other)) == len(kept) and all(a is not None and torch.equal(a, b) for a, b in zip(_momenta(other), kept))
    assert {key: target.param_groups[0][key] for key in settings} == settings
    assert _momenta(target) == []  # the loaded state (empty, as torch's fresh SGD packs it), taken at once
    _step_any(target, model)
    assert {key: target.param_groups[0][key] for key in settings} == settings


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_deep_copy_made_while_a_shallow_copy_holds_another_state_is_the_originals(how):
    model = make_model()
    optimizer = _sam_sgd_rho(model)
    optimizer.step(make_closure(model, optimizer))
    early = copy.deepcopy(optimizer.state_dict())
    optimizer.step(make_closure(model, optimizer, seed=2))
    shallow = copy.copy(optimizer)
    shallow.load_state_dict(copy.deepcopy(early))
    deep = copy.deepcopy(optimizer) if how == "deepcopy" else pickle.loads(pickle.dumps(optimizer))
    originals = _momenta(optimizer)
    for inner in (optimizer.inner, deep.inner):  # what each inner optimizer steps with: its wrapper's
        assert all(torch.equal(entry["momentum_buffer"], original) for entry, original in zip(inner.state.values(), originals))
    assert_state_dicts_equal(deep.state_dict(), optimizer.state_dict())
    deep.inner.load_state_dict(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9).state_dict())
    assert _momenta(deep) == [] and deep.param_groups[0]["rho"] == 0.5


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("order", ["wrapper first", "inner first"])
def test_a_direct_load_into_a_copied_inner_optimizer_is_taken_over_at_once_in_either_order(how, order):
    """Before the copied wrapper ever steps, a checkpoint loaded straight into its copied inner
    optimizer is its state at once, and its group settings stay (reached first, the inner
    optimizer had no hooks yet when the wrapper was filled in: the load was taken only at the
    next step, without the settings)."""
    model = make_model()
    optimizer = _sam_sgd_rho(model)
    optimizer.step(make_closure(model, optimizer))
    objects = (model, optimizer, optimizer.inner) if order == "wrapper first" else (model, optimizer.inner, optimizer)
    copied = copy.deepcopy(objects) if how == "deepcopy" else pickle.loads(pickle.dumps(objects))
    copied_model, copied_optimizer = copied[0], copied[1] if order == "wrapper first" else copied[2]
    copied_optimizer.inner.load_state_dict(torch.optim.SGD(copied_model.parameters(), lr=0.1, momentum=0.9).state_dict())
    assert copied_optimizer.param_groups[0]["rho"] == 0.5
    assert _momenta(copied_optimizer) == []
    copied_optimizer.step(make_closure(copied_model, copied_optimizer))
    assert copied_optimizer.param_groups[0]["rho"] == 0.5
    assert [sorted(entry) for entry in copied_optimizer.state.values()] == [["momentum_buffer"]] * 4


@pytest.mark.parametrize("into", ["the copy", "the copy's inner optimizer"])
def test_a_shallow_copy_of_a_meta_optimizers_outer_optimizer_loads_for_itself_alone(into):
    """``copy.copy(meta.outer)`` shares the meta-optimizer's state (its state is a view of it) but
    is not what the meta-optimizer drives: a checkpoint loaded into it, or straight into its
    inner optimizer, is its own and leaves the meta-optimizer's momenta (the direct load bound
    the new state to the meta-optimizer, emptying them)."""
    model = make_model()
    outer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=1e-2, momentum=0.9, transforms=[SAM(0.05), EMA(0.9)])
    meta = MAML(model, outer, inner_lr=0.1)
    meta.step(_meta_closure(meta, model))
    kept = [momentum.clone() for momentum in _momenta(meta)]
    shallow = copy.copy(meta.outer)
    checkpoint = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9).state_dict()
    if into == "the copy":
        full = copy.deepcopy(shallow.state_dict())
        full["state"] = {}
        full["param_groups"][0]["lr"] = 0.7
        shallow.load_state_dict(full)
    else:
        shallow.inner.load_state_dict(checkpoint)
    assert len(_momenta(meta)) == len(kept) and all(a is not None and torch.equal(a, b) for a, b in zip(_momenta(meta), kept))
    assert meta.param_groups[0]["lr"] == 1e-2 and shallow.param_groups[0]["lr"] == 0.7
    assert all(momentum is None for momentum in _momenta(shallow))  # (the transforms' slots may stay)


def test_a_shallow_copy_keeps_the_contexts_and_steps_as_the_original():
    """copy.copy went through pickling's __getstate__, which drops the contexts: the copy's
    re-evaluation updated BatchNorm's statistics a second time, and m-sharpness would have become
    SAM on the global gradient, silently. (copy.deepcopy and pickling drop them, as documented.)"""
    from samgria import frozen_bn_stats

    runs = []
    for shallow in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).double()
        entered = []

        @contextlib.contextmanager
        def first_pass():
            entered.append("first")
            yield

        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)],
            reevaluation_context=lambda model=model: frozen_bn_stats(model), first_pass_context=first_pass,
        )
        stepping = copy.copy(optimizer) if shallow else optimizer
        assert stepping.first_pass_context is optimizer.first_pass_context
        assert stepping.reevaluation_context is optimizer.reevaluation_context
        x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)

        def closure():
            stepping.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        stepping.step(closure)
        assert int(model[1].num_batches_tracked) == 1 and entered == ["first"]
        runs.append([t.detach().clone() for t in [*model.parameters(), *model.buffers()]])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    deep = copy.deepcopy(optimizer)
    assert deep.first_pass_context is None and deep.reevaluation_context is None


# -- the two-call loop's pending step ----------------------------------------------------------------
def _two_call_pass(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    mse_loss(model(x), y).backward()


@pytest.mark.parametrize("call", ["get_optimizer_state_dict", "set_optimizer_state_dict"])
def test_a_dcp_checkpoint_between_first_and_second_step_is_refused_with_the_step_left_pending(call):
    """DCP first initialises a fresh optimizer's state by a zero-gradient step with lr 0: between
    the passes (the gradients cleared by first_step) that step used to finish the pending step
    silently, at w with zero gradients, so that second_step() then raised "called without
    first_step()". It is refused as state_dict() is, nothing changed, and the step finishes as one
    that nothing interrupted."""
    from torch.distributed.checkpoint import state_dict as dcp

    def build() -> tuple[nn.Module, TransformingOptimizer]:
        model = make_model()
        return model, TransformingOptimizer(model.parameters(), torch.optim.SGD, transforms=[SAM(rho=0.1)], lr=0.1, momentum=0.9)

    saved = dcp.get_optimizer_state_dict(*build())

    def run(interrupt: bool) -> tuple[list[torch.Tensor], dict]:
        model, optimizer = build()
        _two_call_pass(model)
        optimizer.first_step()
        if interrupt:
            moved = weights_of(model)
            with pytest.raises(RuntimeError, match=r"between first_step\(\) and second_step\(\): finish the step \(or call cancel_step\(\)\)"):
                if call == "get_optimizer_state_dict":
                    dcp.get_optimizer_state_dict(model, optimizer)
                else:
                    dcp.set_optimizer_state_dict(model, optimizer, saved)
            assert all(torch.equal(a, b) for a, b in zip(weights_of(model), moved))  # still at w + e
            assert optimizer.param_groups[0]["lr"] == 0.1 and not optimizer.state
        _two_call_pass(model, seed=2)
        optimizer.second_step()
        return weights_of(model), optimizer.state_dict()

    ended_like(run(interrupt=True), run(interrupt=False))


def test_a_hyperparameter_edited_between_first_and_second_step_is_checked_as_step_closure_checks_it():
    """step(closure) validates the groups' transform hyperparameters at every step (they may be
    edited or scheduled); second_step() used to run the transforms after SAM (LAMP) with an
    invalid value edited in after first_step(). It refuses it as step(closure) does, nothing
    stepped, and the step finishes as one that nothing interrupted once the value is fixed."""

    def run(interrupt: bool) -> tuple[list[torch.Tensor], dict]:
        model = make_model()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, transforms=[SAM(rho=0.1), LAMP(seed=0)], lr=0.1, momentum=0.9)
        _two_call_pass(model)
        optimizer.first_step()
        _two_call_pass(model, seed=2)
        if interrupt:
            optimizer.param_groups[0]["eps"] = float("nan")
            with pytest.raises(ValueError, match=r"param_groups\[0\]: eps must be a finite number >= 0, got nan"):
                optimizer.second_step()
            assert not optimizer.state  # the inner optimizer did not step
            optimizer.param_groups[0]["eps"] = LAMP().eps
        optimizer.second_step()
        return weights_of(model), optimizer.state_dict()

    ended_like(run(interrupt=True), run(interrupt=False))
