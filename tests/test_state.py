"""Tests for samgria.state: bit-exact, in-place snapshots of parameters and buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samgria.state import ParameterSnapshot, restore_state, save_state


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def state_bytes(model: nn.Module) -> dict[str, bytes]:
    """Raw bytes of every parameter and buffer, an independent bit-exact reference."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        out[name] = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return out


def mutate(model: nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    loss = model(torch.randn(8, 3)).pow(2).sum()  # also updates BatchNorm running stats
    loss.backward()
    optimizer.step()


def test_restore_is_bit_exact_in_place_and_covers_buffers():
    model = make_model()
    before = state_bytes(model)
    param_ids = [id(p) for p in model.parameters()]
    snapshot = save_state(model)
    mutate(model)
    assert state_bytes(model) != before
    assert not torch.equal(model[1].running_mean, snapshot.buffers["1.running_mean"])
    restore_state(model, snapshot)
    assert state_bytes(model) == before
    assert [id(p) for p in model.parameters()] == param_ids
    assert int(model[1].num_batches_tracked) == 0


def test_snapshot_is_a_copy_not_a_view():
    model = make_model()
    snapshot = save_state(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(snapshot.parameters["0.weight"], model[0].weight)
    assert not snapshot.parameters["0.weight"].requires_grad


def test_optimizer_stays_valid_after_restore():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshot = save_state(model)
    mutate(model)
    restore_state(model, snapshot)
    optimizer.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    expected = model[3].bias.detach() - 0.1 * model[3].bias.grad
    optimizer.step()
    torch.testing.assert_close(model[3].bias.detach(), expected, rtol=0, atol=0)


def test_context_manager_restores_on_exit_and_on_exception():
    model = make_model()
    before = state_bytes(model)
    with ParameterSnapshot(model) as snapshot:
        mutate(model)
    assert isinstance(snapshot, ParameterSnapshot)
    assert state_bytes(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with ParameterSnapshot(model):
            mutate(model)
            raise RuntimeError("boom")
    assert state_bytes(model) == before


def test_restore_into_another_model_of_same_architecture():
    source, target = make_model(), make_model()
    mutate(source)
    restore_state(target, save_state(source))
    assert state_bytes(target) == state_bytes(source)


def test_mismatched_names_shapes_dtypes_raise_and_leave_model_untouched():
    snapshot = save_state(make_model())
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    before = state_bytes(other)
    with pytest.raises(ValueError, match=r"parameter '3.weight' has shape \(3, 4\) in the model but \(2, 4\) in the snapshot"):
        restore_state(other, snapshot)
    assert state_bytes(other) == before

    no_bn = nn.Sequential(nn.Linear(3, 4), nn.Identity(), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"model parameters do not match the snapshot: missing from the model \['1.bias', '1.weight'\]"):
        restore_state(no_bn, snapshot)

    double = make_model().double()
    with pytest.raises(ValueError, match=r"parameter '0.weight' has dtype torch.float64 in the model but torch.float32"):
        restore_state(double, snapshot)


def test_bad_types():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got int"):
        save_state(3)
    with pytest.raises(TypeError, match=r"snapshot must be a ParameterSnapshot, got dict"):
        restore_state(make_model(), {})
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        save_state(make_model()).restore("x")


def test_repr_counts():
    assert repr(save_state(make_model())) == "ParameterSnapshot(6 parameters, 3 buffers)"


def test_restore_state_refuses_none_as_the_model():
    """``restore_state(None, snapshot)`` is no call of ``snapshot.restore()`` (whose ``None`` means the
    captured model): it names the bad argument and writes nothing."""
    model = make_model()
    snapshot = save_state(model)
    mutate(model)
    after = state_bytes(model)
    with pytest.raises(TypeError, match=r"^model must be a torch.nn.Module, got NoneType$"):
        restore_state(None, snapshot)
    assert state_bytes(model) == after


class _TwoWeights(nn.Module):
    def __init__(self, second_device: str = "cpu") -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(2))
        self.b = nn.Parameter(torch.ones(2, device=second_device))


def test_meta_tensors_are_refused_before_anything_is_written():
    """A meta tensor holds no values: restoring into one would write nothing (silently), and a
    snapshot of one has nothing to write (torch raised after the tensors before it were written)."""
    with pytest.raises(ValueError, match=r"^model must hold the values of its parameters, got parameter 'b' on the meta device$"):
        save_state(_TwoWeights("meta"))

    snapshot = save_state(_TwoWeights())
    target = _TwoWeights("meta")
    with torch.no_grad():
        target.a.fill_(5.0)
    with pytest.raises(ValueError, match=r"^model must hold the values of its parameters, got parameter 'b' on the meta device$"):
        restore_state(target, snapshot)
    assert torch.equal(target.a, torch.full((2,), 5.0)), "nothing written"


def test_lazy_parameters_are_refused_naming_the_parameter():
    with pytest.raises(ValueError, match=r"^model must have initialised parameters, got the lazy parameter '0.weight' .*run one forward"):
        save_state(nn.Sequential(nn.LazyLinear(2)))
    initialised = nn.Sequential(nn.LazyLinear(2))
    initialised(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"^model must have initialised parameters, got the lazy parameter '0.weight' "):
        restore_state(nn.Sequential(nn.LazyLinear(2)), save_state(initialised))


class _ExpandedBuffer(nn.Module):
    """A weight and a buffer expanded from one element (stride 0: its 3 positions share memory)."""

    def __init__(self, fill: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.register_buffer("shared", torch.full((1,), fill).expand(3))


def test_an_expanded_buffer_is_restored_with_everything_else():
    """``copy_`` refuses to write into a tensor whose elements share memory: the restore wrote the
    weight and then raised at the buffer, leaving the model half restored."""
    model = _ExpandedBuffer(2.0)
    snapshot = save_state(model)
    with torch.no_grad():
        model.weight.fill_(7.0)
        model.shared[:1].fill_(5.0)  # the one element behind all 3 positions
    restore_state(model, snapshot)
    assert torch.equal(model.weight, torch.ones(2))
    assert torch.equal(model.shared, torch.full((3,), 2.0)) and model.shared.stride() == (0,)
    with ParameterSnapshot(model):  # the context manager's exit restores the same way
        with torch.no_grad():
            model.shared[:1].fill_(float("nan"))
    assert torch.equal(model.shared, torch.full((3,), 2.0))
    not_a_number = _ExpandedBuffer(float("nan"))  # a NaN is the same value as a NaN here
    snapshot = save_state(not_a_number)
    with torch.no_grad():
        not_a_number.shared[:1].fill_(0.0)
    restore_state(not_a_number, snapshot)
    assert torch.isnan(not_a_number.shared).all()


def test_values_an_expanded_buffer_cannot_hold_are_refused_before_anything_is_written():
    source = _ExpandedBuffer()
    source.shared = torch.tensor([1.0, 2.0, 3.0])  # the same name, shape and dtype, its own memory
    snapshot = save_state(source)
    target = _ExpandedBuffer()
    with torch.no_grad():
        target.weight.fill_(7.0)
    with pytest.raises(ValueError, match=r"^buffer 'shared' of the model is expanded along dimension 0 \(one element for all its positions\), but the snapshot's values differ along it$"):
        restore_state(target, snapshot)
    assert torch.equal(target.weight, torch.full((2,), 7.0)), "nothing written"


def test_a_sparse_buffer_is_restored_with_everything_else():
    """The check for tensors whose elements share memory took a sparse buffer (strides 0 as torch
    reports them) for an expanded one and raised NotImplementedError narrowing it."""
    model = nn.Linear(2, 1)
    model.register_buffer("mask", torch.tensor([[1.0, 0.0], [0.0, 2.0]]).to_sparse())
    snapshot = save_state(model)
    with torch.no_grad():
        model.weight.fill_(7.0)
    model.mask.mul_(5.0)
    restore_state(model, snapshot)
    assert torch.equal(model.weight, snapshot.parameters["weight"])
    assert torch.equal(model.mask.to_dense(), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))


def test_an_inference_buffer_is_restored_with_everything_else():
    """A buffer made under torch.inference_mode() (such as a cache a module fills in its first
    forward) raised RuntimeError as the restore reached it, after the parameters were written."""
    model = make_model()
    with torch.inference_mode():
        cache = torch.arange(3.0)
    model.register_buffer("cache", cache)
    before = state_bytes(model)
    snapshot = save_state(model)
    mutate(model)
    with torch.inference_mode():
        model.cache.mul_(2.0)
    restore_state(model, snapshot)
    assert state_bytes(model) == before
    assert model.cache is cache and cache.is_inference()
