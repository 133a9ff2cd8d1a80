"""Comparing optimizer state in tests: by parameter position, tensors bit for bit."""

from __future__ import annotations

import torch


def params_in_order(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def state_by_index(optimizer):
    """``optimizer.state`` keyed by parameter position (empty entries are the same as none)."""
    out = {}
    for index, param in enumerate(params_in_order(optimizer)):
        if param in optimizer.state and optimizer.state[param]:
            out[index] = dict(optimizer.state[param])
    return out


def groups_without_params(optimizer):
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def assert_same_value(a, b, where):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), where
        assert torch.equal(a, b), where
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def assert_states_equal(first, second):
    assert first.keys() == second.keys()
    for index in first:
        assert first[index].keys() == second[index].keys(), index
        for key in first[index]:
            assert_same_value(first[index][key], second[index][key], (index, key))


def assert_state_dicts_equal(actual, expected):
    """Two ``state_dict()``s equal: the same param groups, every state entry bit for bit."""
    assert actual["param_groups"] == expected["param_groups"]
    assert_states_equal(actual["state"], expected["state"])
