"""TransformingOptimizer with the model features people train with: parametrizations, activation
checkpointing, memory formats and packed weights, lazy modules, weight averaging, progressive
unfreezing and model surgery between steps.

Each result is compared with an independent reference: a hand-written SAM loop in float64
(``sam_reference``), or torch's own optimizer where no transform applies.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from state_helpers import assert_state_dicts_equal
from torch import nn

from samgria import EMA, SAM, Lookahead, TransformingOptimizer


def sam_reference(model, loss_of, steps, *, lr=0.1, rho=0.05):
    """SAM by hand, on a float64 copy of ``model``: ``e = rho g / ||g||`` over every parameter
    with a gradient, the second gradient at ``w + e``, ``w`` put back, then ``torch.optim.SGD``."""
    model = copy.deepcopy(model).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(model).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.stack([p.grad.norm() for p in params]).norm()
        originals = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=rho / norm.item())
        optimizer.zero_grad()
        loss_of(model).backward()
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
        optimizer.step()
    return model


def sam_steps(model, loss_of, optimizer, steps, two_call):
    """``steps`` steps of ``optimizer`` by ``step(closure)`` or by the two-call loop."""
    for _ in range(steps):
        if two_call:
            optimizer.zero_grad()
            loss_of(model).backward()
            optimizer.first_step()
            loss_of(model).backward()
            optimizer.second_step()
        else:

            def closure():
                optimizer.zero_grad()
                loss = loss_of(model)
                loss.backward()
                return loss

            optimizer.step(closure)


def assert_close_to(model, reference):
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.double(), expected, rtol=1e-12, atol=1e-14, msg=name)


# -- model surgery: a parameter whose .data was replaced by a tensor of another shape ------------------
class _Rows(nn.Module):
    """One parameter of 3 rows, whose row count the tests change (an embedding resized)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(3, 4))

    def forward(self, x):
        return (x @ self.rows.t()).square().mean()


@pytest.mark.parametrize("rows", [1, 5], ids=["shrunk_to_one_row", "grown"])
@pytest.mark.parametrize("make", [lambda: EMA(0.5), lambda: Lookahead(k=1)], ids=["EMA", "Lookahead"])
def test_kept_weights_of_a_resized_parameter_are_refused_with_nothing_changed(make, rows):
    """``param.data = bigger`` (an embedding resized) after EMA or Lookahead kept weights of the old
    shape: an EMA whose parameter shrank to one row broadcast it into every row of its average
    (silently), and the other cases raised torch's 'The size of tensor a (3) must match ...' from
    inside the step → a ValueError naming the shapes and the remedy, weights and state as before
    (torch's momentum SGD refuses such a parameter too)."""
    x = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).reshape(2, 4)
    reference = _Rows()
    torch_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        torch_optimizer.zero_grad()
        reference(x).backward()
        torch_optimizer.step()
    reference.rows.data = torch.ones(rows, 4, dtype=torch.float64)
    torch_optimizer.zero_grad()
    reference(x).backward()
    with pytest.raises(RuntimeError):  # torch's own optimizer does not step it either
        torch_optimizer.step()

    model = _Rows()
    transform = make()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), transform])
    sam_steps(model, lambda m: m(x), optimizer, 2, two_call=False)
    model.rows.data = torch.ones(rows, 4, dtype=torch.float64)
    weights = model.rows.detach().clone()
    state = copy.deepcopy(optimizer.state_dict())
    key = f"{optimizer.slots[1]}.{transform._kept_key}"
    for two_call in (False, True):
        with pytest.raises(ValueError, match=rf"{type(transform).__name__}: .*shape \(3, 4\).*now of shape \({rows}, 4\).*del optimizer\.state\[param\]\['{key}'\]"):
            sam_steps(model, lambda m: m(x), optimizer, 1, two_call=two_call)
        assert torch.equal(model.rows, weights)
        assert_state_dicts_equal(optimizer.state_dict(), state)
        optimizer.cancel_step()  # the two-call loop's step stays pending on an error in second_step()

    del optimizer.state[model.rows][key]  # the remedy the message names: kept afresh from the weights
    sam_steps(model, lambda m: m(x), optimizer, 1, two_call=False)
    assert optimizer.state[model.rows][key].shape == (rows, 4)


@pytest.mark.parametrize("rows", [5, 2], ids=["broadcast", "not_broadcastable"])
def test_averaged_weights_of_a_resized_parameter_refused_before_anything_is_written(rows):
    """``ema.averaged_weights(optimizer)`` after a parameter was resized since its last step: an
    average of 1 row was broadcast into the 5 rows of the parameter (silently), and one of 3 rows
    raised torch's error for 2 rows after an earlier parameter already held its average, which
    the block left there → ValueError before any parameter is written."""
    first = nn.Parameter(torch.ones(2, dtype=torch.float64))
    second = nn.Parameter(torch.ones(1 if rows == 5 else 3, 4, dtype=torch.float64))
    ema = EMA(0.5)
    optimizer = TransformingOptimizer([first, second], torch.optim.SGD, lr=0.1, transforms=[ema])
    for _ in range(2):
        optimizer.zero_grad()
        (first.square().sum() + second.square().sum()).backward()
        optimizer.step()
    old_shape = tuple(second.shape)
    second.data = torch.full((rows, 4), 3.0, dtype=torch.float64)
    before = [first.detach().clone(), second.detach().clone()]
    with pytest.raises(ValueError, match=rf"EMA: .*shape {re.escape(str(old_shape))}.*now of shape \({rows}, 4\)"):
        with ema.averaged_weights(optimizer):
            pass
    assert torch.equal(first, before[0]) and torch.equal(second, before[1])
