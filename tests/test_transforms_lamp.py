"""LAMP (LAMPRollback): noise of global size eps, running mean, rollback."""

from __future__ import annotations

import math

import torch
from torch import nn
from transform_infos import assert_bitwise_equal, make_closure, make_data, make_model, params_of

from samgria import LAMP, LAMPRollback, TransformingOptimizer


def plain_iterates(steps, lr=0.1):
    x, y = make_data()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    closure = make_closure(model, optimizer, x, y)
    iterates = []
    for _ in range(steps):
        optimizer.step(closure)
        iterates.append(params_of(model))
    return iterates


def test_lamp_rollback_is_an_alias():
    assert LAMPRollback is LAMP


def test_eps_zero_rolls_back_to_the_mean_of_the_plain_iterates():
    rollback_len = 3
    iterates = plain_iterates(rollback_len + 1)
    expected = [torch.stack(ws).mean(dim=0) for ws in zip(*iterates)]
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[LAMP(eps=0.0, rollback_len=rollback_len)])
    closure = make_closure(model, optimizer, x, y)
    for step in range(rollback_len):
        optimizer.step(closure)
        assert_bitwise_equal(params_of(model), iterates[step])  # no noise, no rollback yet
    optimizer.step(closure)
    got = params_of(model)
    untouched = {id(model[2].bias), id(model.unused)}
    trainable = [i for i, p in enumerate(model.parameters()) if id(p) not in untouched]
    assert len(trainable) == len(got) - 2
    for i in trainable:
        torch.testing.assert_close(got[i], expected[i], rtol=1e-14, atol=1e-15)
    for i in set(range(len(got))) - set(trainable):  # frozen and unused: untouched
        assert torch.equal(got[i], iterates[0][i])
    assert optimizer.state[next(iter(model.parameters()))]["lamp_step"] == 0


def test_noise_has_global_norm_eps_and_scales_with_weight_magnitude():
    eps = 1e-2
    param = nn.Parameter(torch.tensor([0.0, 1.0, -4.0, 2.0], dtype=torch.float64))
    other = nn.Parameter(torch.tensor([[3.0, 0.5]], dtype=torch.float64))
    optimizer = TransformingOptimizer([param, other], torch.optim.SGD, lr=0.0, transforms=[LAMP(eps=eps, rollback_len=100, seed=3)])
    before = [param.detach().clone(), other.detach().clone()]

    def closure():
        optimizer.zero_grad()
        loss = param.sum() + other.sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    noise = [param.detach() - before[0], other.detach() - before[1]]
    norm = math.sqrt(sum(float((n**2).sum()) for n in noise))
    assert norm == torch.tensor(eps, dtype=torch.float64).item() or abs(norm - eps) < 1e-15
    assert noise[0][0] == 0.0  # |w| = 0: no noise
    ratio = (noise[0][1:] / before[0][1:].abs()).abs()
    assert (ratio <= eps).all()  # |u_i| <= |w_i| before normalisation


def test_same_seed_same_noise_different_seed_different_noise():
    def run(seed):
        x, y = make_data()
        model = make_model()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[LAMP(eps=1e-2, rollback_len=5, seed=seed)])
        closure = make_closure(model, optimizer, x, y)
        for _ in range(3):
            optimizer.step(closure)
        return params_of(model)

    assert_bitwise_equal(run(1), run(1))
    assert any(not torch.equal(a, b) for a, b in zip(run(1), run(2)))


def test_default_generator_is_torchs():
    def run():
        torch.manual_seed(123)
        x, y = make_data()
        model = make_model()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[LAMP(eps=1e-2, rollback_len=5)])
        closure = make_closure(model, optimizer, x, y)
        torch.manual_seed(7)
        for _ in range(3):
            optimizer.step(closure)
        return params_of(model)

    assert_bitwise_equal(run(), run())


def test_state_lives_in_optimizer_state_and_cycles():
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[LAMP(eps=1e-3, rollback_len=2, seed=0)])
    closure = make_closure(model, optimizer, x, y)
    first = next(iter(model.parameters()))
    steps = []
    for _ in range(6):
        optimizer.step(closure)
        steps.append(optimizer.state[first]["lamp_step"])
    assert steps == [1, 2, 0, 1, 2, 0]
    state = optimizer.state[model[0].weight]
    assert state["lamp_count"] == 0 and torch.equal(state["lamp_sum"], torch.zeros_like(model[0].weight))
    assert "lamp_sum" not in optimizer.state[model.unused]


def test_bfloat16_parameters_sum_in_float32():
    param = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.1, transforms=[LAMP(eps=0.0, rollback_len=4)])

    def closure():
        optimizer.zero_grad()
        loss = param.float().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert optimizer.state[param]["lamp_sum"].dtype == torch.float32
    assert param.dtype == torch.bfloat16
