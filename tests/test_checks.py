"""The argument checks of ``samgria._checks``: one message shape, the right exception type."""

import copy
import math

import numpy as np
import pytest
import torch

from samgria import EMA, LAMP, Lookahead, LookSAM, TransformingOptimizer
from samgria._checks import check_int


@pytest.mark.parametrize(
    "kwargs, rule",
    [
        ({}, "an integer"),
        ({"low": 1}, "an integer >= 1"),
        ({"high": 5}, "an integer <= 5"),
        ({"low": 0, "high": 5}, r"an integer in \[0, 5\]"),
    ],
)
def test_check_int_states_its_rule_for_every_refusal(kwargs, rule):
    with pytest.raises(TypeError, match=rf"^n must be {rule}, got 1\.5$"):
        check_int("n", 1.5, **kwargs)
    with pytest.raises(TypeError, match=rf"^n must be {rule}, got True$"):
        check_int("n", True, **kwargs)
    with pytest.raises(ValueError, match=rf"^n must be {rule}, got nan$"):
        check_int("n", math.nan, **kwargs)


def test_check_int_bounds_are_inclusive():
    assert check_int("n", 0, low=0, high=5) == 0
    assert check_int("n", np.int64(5), low=0, high=5) == 5
    assert type(check_int("n", np.int64(5), high=5)) is int
    with pytest.raises(ValueError, match=r"^n must be an integer in \[0, 5\], got 6$"):
        check_int("n", 6, low=0, high=5)
    with pytest.raises(ValueError, match=r"^n must be an integer in \[0, 5\], got -1$"):
        check_int("n", -1, low=0, high=5)
    with pytest.raises(ValueError, match=rf"^n must be an integer <= 5, got {2**70}$"):
        check_int("n", 2**70, high=5)


def test_check_int_states_where_its_upper_bound_comes_from():
    with pytest.raises(ValueError, match=r"^n must be an integer in \[0, 5\] \(five at most\), got 6$"):
        check_int("n", 6, low=0, high=5, high_reason=" (five at most)")
    assert check_int("n", 5, low=0, high=5, high_reason=" (five at most)") == 5


# -- a checkpoint's counters and generator states: None is no value --------------------------------
def _trained_optimizer(transform):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[transform])
    inputs = torch.randn(4, 3)

    def closure():
        optimizer.zero_grad()
        loss = model(inputs).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure)
    return model, optimizer, closure


NONE_IN_CHECKPOINT = {
    "EMA-step": (lambda: EMA(0.9), "ema.step", r"^the checkpoint's EMA slot 'ema' holds step=None, not an integer >= 0$"),
    "Lookahead-step": (
        lambda: Lookahead(0.5, k=3),
        "lookahead.step",
        r"^the checkpoint's Lookahead slot 'lookahead' holds step=None, not an integer >= 0$",
    ),
    "LookSAM-step": (
        lambda: LookSAM(0.05, k=3),
        "look_sam.step",
        r"^the checkpoint's LookSAM slot 'look_sam' holds step=None, not an integer >= 0$",
    ),
    "LAMP-cycle_step": (
        lambda: LAMP(1e-2, rollback_len=3, seed=0),
        "lamp.cycle_step",
        r"^the checkpoint's LAMP slot 'lamp' holds cycle_step=None, not an integer in \[0, 3\]$",
    ),
    "LAMP-rng_state": (
        lambda: LAMP(1e-2, rollback_len=3, seed=0),
        "lamp.rng_state",
        r"^the checkpoint's LAMP slot 'lamp' holds an invalid generator state for device cpu: expected a tensor, got NoneType$",
    ),
}


@pytest.mark.parametrize("case", sorted(NONE_IN_CHECKPOINT))
def test_a_checkpoint_counter_or_generator_state_of_none_is_refused_at_load(case):
    """A counter or generator state stored as None was taken for an absent one: the load went
    through and the next step raised TypeError ('NoneType' and 'int'); it is refused at load,
    with the optimizer as it was."""
    make, key, message = NONE_IN_CHECKPOINT[case]
    _, source, _ = _trained_optimizer(make())
    saved = copy.deepcopy(source.state_dict())
    assert key in saved["state"][0]
    saved["state"][0][key] = None
    model, optimizer, closure = _trained_optimizer(make())
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(saved)
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, entry in before["state"].items():
        assert after["state"][index].keys() == entry.keys()
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after["state"][index][name], value), name
            else:
                assert after["state"][index][name] == value, name
    optimizer.step(closure)  # still usable
