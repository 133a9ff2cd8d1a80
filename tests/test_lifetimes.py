"""Object lifetimes over long runs: what a transform keeps between steps and between models.

A transform object used through the seed protocol (``apply(model, ...)`` / ``post_step(model)``
beside a plain optimizer) keeps its state itself, by parameter. Reused for the next model of a
sweep (a notebook cell run again, a hyperparameter loop), it must not keep every earlier model's
parameters and state alive, nor lose the state of a model that is still in use.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pickle
import sys
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.functional import mse_loss

from samgria import EMA, ESAM, LAMP, SAM, Lookahead, LookSAM, Transform, TransformingOptimizer

#: The transforms that keep per-parameter state in the seed protocol, built afresh.
STATEFUL: dict[str, Callable[[], Transform]] = {
    "LAMP": lambda: LAMP(eps=1e-2, rollback_len=3, seed=0),
    "EMA": lambda: EMA(0.9),
    "Lookahead": lambda: Lookahead(k=2),
    "LookSAM": lambda: LookSAM(k=2),
    "ESAM": lambda: ESAM(seed=0),
}

_generator = torch.Generator().manual_seed(3)
X = torch.randn(6, 3, generator=_generator, dtype=torch.float64)
Y = torch.randn(6, 2, generator=_generator, dtype=torch.float64)


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def seed_protocol_steps(transform: Transform, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` steps of the seed protocol's loop over ``model``."""
    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mse_loss(model(x), y)

    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(X, Y).backward()
        transform.apply(model, loss_fn, (X, Y))
        optimizer.step()
        transform.post_step(model)


def closure_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = mse_loss(model(X), Y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_a_seed_protocol_transform_reused_for_the_next_model_keeps_no_earlier_one(name, no_cyclic_collector):
    """A sweep with one transform object: each trial's model, once dropped, is freed by the
    next trial's first use of the transform (its parameters and their state used to stay in the
    transform for as long as it lived, one more model per trial)."""
    transform = STATEFUL[name]()
    dropped = []
    for seed in range(3):
        model = make_model(seed)
        seed_protocol_steps(transform, model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
        dropped.append(weakref.ref(model[0].weight))
        del model  # freed as the last reference goes
    assert [ref() is None for ref in dropped[:-1]] == [True, True]
    assert transform.state_dict()["state"]  # the last model's state is there


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_a_seed_protocol_transform_shared_by_live_models_steps_each_as_its_own(name, no_cyclic_collector):
    """Two models in use (a GAN's two networks), one of them seen through a new container at
    every call, with one transform object: each ends as with a transform of its own, bit for
    bit, whatever containers were freed meanwhile (the state of a freed container's parameters
    that a live model holds is kept)."""
    def run(shared: bool) -> list[torch.Tensor]:
        first, second = make_model(0), make_model(1)
        transforms = [STATEFUL[name]()] * 2 if shared else [STATEFUL[name](), STATEFUL[name]()]
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (first, second)]
        for _ in range(5):
            seed_protocol_steps(transforms[0], first, optimizers[0], steps=1)
            container = nn.Sequential(*second)  # new at every call, freed after it
            seed_protocol_steps(transforms[1], container, optimizers[1], steps=1)
            del container  # freed at once
        return [p.detach().clone() for m in (first, second) for p in m.parameters()]

    shared, separate = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(shared, separate))


@pytest.mark.parametrize("earlier", ["dropped", "kept"])
@pytest.mark.parametrize("name", ["ESAM", "LAMP", "LookSAM", "Lookahead"])
def test_a_seed_protocol_transform_reused_for_the_next_model_steps_it_as_a_fresh_one(name, earlier):
    """The next model of a sweep starts its own cycle (LAMP's rollback, Lookahead's and LookSAM's
    k steps) and generator (ESAM's seed), as with a new transform object, whether the earlier
    model is still held or not (it used to take over the earlier model's counters and generator
    state)."""
    def trained(transform: Transform) -> list[torch.Tensor]:
        model = make_model(1)
        seed_protocol_steps(transform, model, torch.optim.SGD(model.parameters(), lr=0.1), steps=4)
        return [p.detach().clone() for p in model.parameters()]

    reused, earlier_model = STATEFUL[name](), make_model(0)
    seed_protocol_steps(reused, earlier_model, torch.optim.SGD(earlier_model.parameters(), lr=0.1), steps=3)
    if earlier == "dropped":
        del earlier_model
    assert all(torch.equal(a, b) for a, b in zip(trained(reused), trained(STATEFUL[name]())))


def test_the_state_of_layers_carried_into_the_next_model_stays_when_the_earlier_model_goes(no_cyclic_collector):
    """A fine-tuning stage: the encoder moves from the first model to the second and the first
    is dropped; its averages go on, as when the first model is still held."""
    def run(drop: bool) -> dict:
        torch.manual_seed(0)
        encoder = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
        first, ema = nn.Sequential(encoder, nn.Linear(4, 2)).double(), EMA(0.5)
        seed_protocol_steps(ema, first, torch.optim.SGD(first.parameters(), lr=0.1), steps=2)
        second = nn.Sequential(encoder, nn.Linear(4, 2)).double()
        if drop:
            del first
        seed_protocol_steps(ema, second, torch.optim.SGD(second.parameters(), lr=0.1), steps=2)
        return ema.state_dict()["state"]

    dropped, kept = run(True), run(False)
    assert sorted(dropped) == sorted(kept) == [0, 1, 2, 3]
    assert all(torch.equal(dropped[i]["ema.average"], kept[i]["ema.average"]) for i in kept)


@pytest.mark.parametrize("name", ["LAMP", "EMA"])
def test_a_seed_protocol_transform_pickles_and_copies_after_use_and_steps_on_alike(name):
    transform, model = STATEFUL[name](), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seed_protocol_steps(transform, model, optimizer, steps=2)
    copies = [pickle.loads(pickle.dumps((transform, model, optimizer))), copy.deepcopy((transform, model, optimizer))]
    seed_protocol_steps(transform, model, optimizer, steps=2)
    for copied_transform, copied_model, copied_optimizer in copies:
        seed_protocol_steps(copied_transform, copied_model, copied_optimizer, steps=2)
        assert all(torch.equal(a, b) for a, b in zip(copied_model.parameters(), model.parameters()))


def samgria_classes() -> list[type]:
    """Every class defined in a module of the samgria package."""
    found = []
    for module in [module for name, module in sys.modules.items() if name == "samgria" or name.startswith("samgria.")]:
        found += [value for value in vars(module).values() if isinstance(value, type) and value.__module__ == module.__name__]
    return found


def test_no_pickling_method_relies_on_objects_getstate_which_python_3_10_lacks():
    """``object.__getstate__`` exists from Python 3.11 (setup.cfg declares 3.10): a
    ``__getstate__`` that calls ``super().__getstate__()`` needs a base below ``object`` that
    defines one (EMA, Lookahead and WSAM did not: pickling them raised AttributeError on 3.10)."""
    for package in ("samgria.integrations", "samgria.meta"):  # every module imported: every class seen
        importlib.import_module(package)

    relying = [
        klass.__qualname__
        for klass in samgria_classes()
        if "__getstate__" in vars(klass)
        and "super().__getstate__()" in inspect.getsource(vars(klass)["__getstate__"])
        and not any("__getstate__" in vars(base) for base in klass.__mro__[1:-1])
    ]
    assert len(samgria_classes()) > 50 and relying == []


def test_standalone_sam_reused_over_models_keeps_at_most_the_last_one(no_cyclic_collector):
    """SAM keeps only its backup buffers between steps: a new model's first step drops the
    previous model's."""
    sam, dropped = SAM(0.05), []
    for seed in range(3):
        model = make_model(seed)
        seed_protocol_steps(sam, model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
        dropped.append(weakref.ref(model[0].weight))
        del model
    assert [ref() is None for ref in dropped[:-1]] == [True, True]


@pytest.mark.parametrize("then", ["loaded", "loaded from a pickle"])
def test_a_transform_outliving_an_optimizer_that_loaded_a_checkpoint_keeps_no_parameters(then, no_cyclic_collector):
    """A sweep over checkpoints with one SAM object: an optimizer that loads a checkpoint and is
    dropped before its next step leaves no parameters or backups in the SAM (the groups SAM last
    stepped were those the load replaced, and the optimizer's deletion did not recognise them)."""
    sam = SAM(0.05)
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[sam])
    optimizer.step(closure_of(model, optimizer))
    checkpoint = optimizer.state_dict()
    optimizer.load_state_dict(pickle.loads(pickle.dumps(checkpoint)) if then == "loaded from a pickle" else checkpoint)
    weight = weakref.ref(model[0].weight)
    del optimizer, model, checkpoint
    assert weight() is None
    assert [key for key in ("_backups", "_groups_in_play") if key in vars(sam)] == []


def test_lamp_refuses_a_parameter_resized_since_its_last_step_naming_the_key_to_drop():
    """An embedding resized in place (``weight.data`` replaced) between steps: LAMP's running sum
    no longer fits it; the step raises naming the sum and the shapes (it raised about the
    arguments of an internal kernel), changes nothing, and goes on once the sum is dropped."""
    torch.manual_seed(0)
    embedding, head = nn.Embedding(5, 3), nn.Linear(3, 1)
    params = [*embedding.parameters(), *head.parameters()]
    optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=0.1, transforms=[LAMP(rollback_len=4, seed=0)])
    rows = torch.tensor([0, 1, 2])

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = head(embedding(rows)).square().mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    embedding.weight.data = torch.cat([embedding.weight.data, torch.randn(2, 3)])  # two tokens added
    weights = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"LAMP: the running sum of a parameter is of shape \(5, 3\), but it is now of shape \(7, 3\).*\['lamp\.sum'\]"):
        optimizer.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(weights, params))
    del optimizer.state[embedding.weight]["lamp.sum"]
    optimizer.step(closure)
    assert optimizer.state[embedding.weight]["lamp.sum"].shape == (7, 3)


def test_a_head_swapped_into_a_model_keeps_its_state_when_swapped_out_and_a_module_is_freed(no_cyclic_collector):
    """Task heads swapped in and out of one model: a head put in after the model's first call
    was not recorded, so its EMA average was dropped once any recorded module was freed (an
    activation replaced), though the head lives and is swapped back; now it is kept, as when
    nothing is freed."""
    def run(free: bool) -> torch.Tensor:
        model, ema = make_model(), EMA(0.5)
        heads = [model[2], nn.Linear(4, 2).double()]
        optimizer = torch.optim.SGD([*model[0].parameters(), *heads[0].parameters(), *heads[1].parameters()], lr=0.1)
        seed_protocol_steps(ema, model, optimizer, steps=1)
        model[2] = heads[1]
        seed_protocol_steps(ema, model, optimizer, steps=2)
        model[2] = heads[0]
        if free:
            model[1] = nn.Tanh()  # the old activation is freed
        seed_protocol_steps(ema, model, optimizer, steps=1)
        model[2] = heads[1]
        seed_protocol_steps(ema, model, optimizer, steps=1)
        return ema.state_dict()["state"][2]["ema.average"]

    assert torch.equal(run(free=True), run(free=False))


def test_lamp_through_the_seed_protocol_refuses_a_resized_parameter_naming_a_remedy_it_has():
    """Through apply/post_step no optimizer holds LAMP's sum: the refusal named
    optimizer.state[param]['lamp.sum'] to delete, which the user's optimizer does not have; it
    names a new LAMP, as EMA does."""
    model, lamp = make_model(), LAMP(rollback_len=3, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seed_protocol_steps(lamp, model, optimizer, steps=2)
    model[2].weight.data = torch.randn(2, 5, dtype=torch.float64)
    model[0] = nn.Linear(3, 5).double()
    with pytest.raises(ValueError, match=r"shape \(2, 4\), but it is now of shape \(2, 5\).*use a new LAMP") as raised:
        seed_protocol_steps(lamp, model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)
    assert "optimizer.state" not in str(raised.value)
