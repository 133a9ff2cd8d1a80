"""Comparing optimizer state in tests: by parameter position, tensors bit for bit."""

from __future__ import annotations

import io

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


def assert_same(actual, expected, where: str = "") -> None:
    """Nested containers equal; tensors bit for bit, with the same dtype."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {actual!r} is not a tensor"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
        assert torch.equal(actual, expected), f"{where}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert isinstance(actual, (dict,)) or hasattr(actual, "keys"), f"{where}: {actual!r} is not a mapping"
        assert set(actual.keys()) == set(expected.keys()), (
            f"{where}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"
        )
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)), f"{where}: {actual!r} is not a sequence"
        assert len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for index, (a, b) in enumerate(zip(actual, expected)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def weights_only_roundtrip(state_dict):
    """``state_dict`` through ``torch.save`` and ``torch.load(weights_only=True)``, in memory."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
