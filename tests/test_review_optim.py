"""Regression tests from a review of the optimizer half: each pins one fixed defect."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from samgria import LAMPRollback, SAM, TransformingOptimizer


def _closure(model, optimizer, x, y):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def test_duplicate_parameter_in_a_group_is_restored_bit_for_bit():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "optimizer contains a parameter group with duplicate parameters"
        optimizer = TransformingOptimizer([weight, weight], torch.optim.SGD, lr=0.0, transforms=[SAM(rho=0.1)])
    before = weight.detach().clone()

    def closure():
        optimizer.zero_grad()
        loss = weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)  # lr=0: the weights must come back exactly
    assert torch.equal(weight.detach(), before)


def test_two_call_default_equals_step_closure_with_an_unperturbed_group():
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
        groups = [{"params": model[0].parameters()}, {"params": model[1].parameters(), "rho": 0.0}]
        return model, TransformingOptimizer(groups, torch.optim.SGD, lr=0.1, transforms=[SAM(rho=0.1)])

    x, y = torch.randn(8, 3), torch.randn(8, 1)
    model_a, opt_a = build()
    model_b, opt_b = build()
    opt_a.step(_closure(model_a, opt_a, x, y))
    nn.functional.mse_loss(model_b(x), y).backward()
    opt_b.first_step()
    nn.functional.mse_loss(model_b(x), y).backward()
    opt_b.second_step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_state_dict_hooks_run():
    optimizer = TransformingOptimizer([nn.Parameter(torch.randn(3))], torch.optim.SGD, lr=0.1, transforms=[SAM()])
    called = []
    optimizer.register_state_dict_pre_hook(lambda opt: called.append("pre"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: called.append("post"))
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: called.append("load_pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: called.append("load_post"))
    optimizer.load_state_dict(optimizer.state_dict())
    assert called == ["pre", "post", "load_pre", "load_post"]


class _CountingTransform:
    """A user GradientTransform with object state and the usual state_dict protocol."""

    def __init__(self) -> None:
        self.calls = 0

    def apply(self, model, loss_fn, batch) -> None:
        self.calls += 1

    def post_step(self, model) -> None:
        pass

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state_dict) -> None:
        self.calls = state_dict["calls"]


def test_protocol_transform_object_state_round_trips():
    param = nn.Parameter(torch.randn(3))
    user = _CountingTransform()
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.1, transforms=[user])
    for _ in range(3):
        param.grad = torch.ones(3)
        optimizer.step()
    resumed = _CountingTransform()
    TransformingOptimizer([param], torch.optim.SGD, lr=0.1, transforms=[resumed]).load_state_dict(optimizer.state_dict())
    assert resumed.calls == user.calls == 3


def test_lamp_standalone_in_the_seed_readme_loop_rolls_back_to_the_mean():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lamp = LAMPRollback(eps=0.0, rollback_len=1)  # mean of 2 plain iterates
    iterates = []
    def loss_fn(inputs):
        return model(inputs).square().mean()

    for _ in range(2):  # the seed README's loop: backward, apply, step, zero_grad, post_step
        batch = (torch.randn(4, 2),)
        loss_fn(*batch).backward()
        lamp.apply(model, loss_fn, batch)
        optimizer.step()
        optimizer.zero_grad()
        iterates.append(model.weight.detach().clone())
        lamp.post_step(model)
    torch.testing.assert_close(model.weight.detach(), (iterates[0] + iterates[1]) / 2)


def test_two_call_step_can_be_abandoned_after_a_failing_second_pass():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(rho=0.1)])
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.mse_loss(model(torch.randn(4, 3)), torch.randn(4, 1)).backward()
    optimizer.first_step(zero_grad=True)
    # The second forward raises (e.g. OOM, caught by the trainer, which skips the batch):
    optimizer.cancel_step()  # restores w exactly and clears the pending step
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    copy.deepcopy(optimizer.state_dict())  # and the optimizer is usable again
