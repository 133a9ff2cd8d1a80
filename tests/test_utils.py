"""Tests for ``samgria.utils``: flat gradient vectors and BatchNorm running-statistics control."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from samgria import SAM, TransformingOptimizer
from samgria.utils import frozen_bn_stats, get_grad, set_grad


def _params(dtype: torch.dtype = torch.float64) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (4,), (2, 1, 2)]
    return [nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)) for shape in shapes]


# -- get_grad / set_grad --------------------------------------------------------------------------
def test_get_grad_concatenates_in_parameter_order() -> None:
    params = _params()
    for index, param in enumerate(params):
        param.grad = torch.full_like(param, float(index + 1))
    flat = get_grad(params)
    expected = torch.tensor([1.0] * 6 + [2.0] * 4 + [3.0] * 4, dtype=torch.float64)
    assert torch.equal(flat, expected)


def test_get_grad_fills_zeros_for_missing_grads() -> None:
    params = _params()
    params[1].grad = torch.arange(4, dtype=torch.float64)
    flat = get_grad(params)
    assert torch.equal(flat[:6], torch.zeros(6, dtype=torch.float64))
    assert torch.equal(flat[6:10], torch.arange(4, dtype=torch.float64))
    assert torch.equal(flat[10:], torch.zeros(4, dtype=torch.float64))
    assert params[0].grad is None and params[2].grad is None, "get_grad must not create grads"


def test_get_grad_casts_to_first_parameter_dtype() -> None:
    first = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    second = nn.Parameter(torch.zeros(3, dtype=torch.float32))
    first.grad = torch.tensor([0.1, 0.2], dtype=torch.float64)
    second.grad = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    flat = get_grad([first, second])
    assert flat.dtype == torch.float64
    assert torch.equal(flat[2:], second.grad.double())


def test_get_grad_refuses_to_discard_the_imaginary_part_of_a_later_complex_gradient() -> None:
    """The vector takes the first parameter's dtype: a real first parameter cast a complex
    gradient to real (torch only warned), so [1, 1, 3+4j] came back as [1, 1, 3]."""
    real = torch.zeros(2, requires_grad=True)
    cplx = torch.zeros(1, dtype=torch.complex64, requires_grad=True)
    real.grad, cplx.grad = torch.ones(2), torch.tensor([3 + 4j])
    with pytest.raises(TypeError, match=r"^params\[1\] is complex \(torch.complex64\) but params\[0\] is torch.float32"):
        get_grad([real, cplx])
    assert torch.equal(get_grad([cplx, real]), torch.tensor([3 + 4j, 1, 1], dtype=torch.complex64))


def test_get_grad_rejects_empty() -> None:
    with pytest.raises(ValueError, match="get_grad needs at least one parameter, got an empty iterable"):
        get_grad([])


def test_set_grad_get_grad_round_trip_is_exact() -> None:
    params = _params()
    flat = torch.randn(14, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    set_grad(flat, params)
    for param, piece in zip(params, flat.split([p.numel() for p in params])):
        assert param.grad is not None and param.grad.shape == param.shape
        assert torch.equal(param.grad.reshape(-1), piece)
    assert torch.equal(get_grad(params), flat)


def test_set_grad_creates_independent_grads_and_reuses_existing_ones() -> None:
    params = _params()
    existing = torch.zeros_like(params[0])
    params[0].grad = existing
    flat = torch.ones(14, dtype=torch.float64)
    set_grad(flat, params)
    assert params[0].grad is existing, "an existing grad is written in place"
    flat.fill_(7.0)  # the new grads must not alias the flat vector
    assert torch.equal(get_grad(params), torch.ones(14, dtype=torch.float64))


def test_set_grad_casts_to_each_parameter_dtype() -> None:
    low = nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    high = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    flat = torch.tensor([1.0 + 2**-12, 2.0, 0.1, 0.2], dtype=torch.float32)
    set_grad(flat, [low, high])
    assert low.grad.dtype == torch.bfloat16 and high.grad.dtype == torch.float64
    assert torch.equal(low.grad, flat[:2].to(torch.bfloat16))
    assert torch.equal(high.grad, flat[2:].to(torch.float64))


def _inference_zeros(shape: tuple[int, ...]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.zeros(shape)


@pytest.mark.parametrize(
    "unwritable",
    [lambda shape: torch.ones(1).expand(shape), _inference_zeros],
    ids=["expand-view", "inference-tensor"],
)
def test_set_grad_replaces_a_grad_torch_cannot_write_in_place(unwritable) -> None:
    """A later parameter's grad that copy_ refuses (an expand view, an inference tensor) raised
    RuntimeError after the earlier grads were written; it gets a new grad, as a sparse one does."""
    first, second = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    kept = torch.full((2,), 9.0)
    first.grad, second.grad = kept, unwritable((3,))
    set_grad(torch.arange(5.0), [first, second])
    assert first.grad is kept and torch.equal(kept, torch.tensor([0.0, 1.0]))
    assert torch.equal(second.grad, torch.tensor([2.0, 3.0, 4.0])) and second.grad.stride() == (1,)
    assert not second.grad.is_inference()


@pytest.mark.parametrize(
    "bad, shape_text",
    [
        (torch.zeros(13), r"\(13,\)"),
        (torch.zeros(15), r"\(15,\)"),
        (torch.zeros(2, 7), r"\(2, 7\)"),
        (torch.zeros(()), r"\(\)"),
    ],
)
def test_set_grad_rejects_bad_shapes(bad: torch.Tensor, shape_text: str) -> None:
    params = _params()
    with pytest.raises(ValueError, match=rf"grads must be a 1-D tensor of length 14 .*got shape {shape_text}"):
        set_grad(bad, params)
    assert all(param.grad is None for param in params), "nothing is written on error"


# -- frozen_bn_stats -------------------------------------------------------------------------------
def _bn_net(momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3, momentum=momentum),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.BatchNorm1d(5, momentum=momentum),
    ).double()


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def _assert_buffers_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = dict(model.named_buffers())
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
def test_frozen_bn_stats_keeps_running_stats_and_batch_stat_outputs(momentum: float | None) -> None:
    model = _bn_net(momentum)
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model(x)  # give the buffers non-trivial values (and num_batches_tracked = 1)
    before = _bn_buffers(model)
    reference = copy.deepcopy(model)

    with frozen_bn_stats(model) as yielded:
        assert yielded is model
        frozen_out = model(x)
        model(2 * x + 1)
    _assert_buffers_equal(model, before)
    assert int(model[1].num_batches_tracked) == 1

    # Train-mode output uses the batch statistics: equal to a normal train-mode forward.
    expected_out = reference(x)
    assert torch.equal(frozen_out, expected_out)
    # ... and normal forwards do update the reference's stats, so the checks above can fail.
    reference(2 * x + 1)
    assert not torch.equal(reference[1].running_mean, before["1.running_mean"])
    assert not torch.equal(reference[5].running_var, before["5.running_var"])
    assert int(reference[1].num_batches_tracked) == 3


def test_frozen_bn_stats_restores_flags_on_exception_and_leaves_eval_layers_alone() -> None:
    model = _bn_net()
    untracked = nn.BatchNorm1d(5, track_running_stats=False).double()
    model.append(untracked)
    with pytest.raises(RuntimeError, match="boom"):
        with frozen_bn_stats(model):
            assert not model[1].track_running_stats and not model[5].track_running_stats
            raise RuntimeError("boom")
    assert model[1].track_running_stats and model[5].track_running_stats
    assert not untracked.track_running_stats, "a layer without running stats stays without them"

    # After the exception the stats update normally again.
    model(torch.randn(4, 2, 4, 4, dtype=torch.float64))
    assert int(model[1].num_batches_tracked) == 1

    # Layers in eval mode keep normalising with the running statistics inside the block.
    model.eval()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    expected = model(x)
    with frozen_bn_stats(model):
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("raise_inside", [False, True], ids=["normal exit", "exception"])
def test_frozen_bn_stats_keeps_instancenorm_running_stats(raise_inside: bool) -> None:
    """InstanceNorm with ``track_running_stats=True`` updates its statistics in train mode whatever
    the flag says; inside the block they must stay bit for bit, and outside they update again."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, affine=True, track_running_stats=True), nn.BatchNorm1d(3)
    ).double()
    x = torch.randn(4, 2, 7, dtype=torch.float64)
    model(x)
    before = _bn_buffers(model)
    reference = copy.deepcopy(model)
    with contextlib.suppress(RuntimeError):
        with frozen_bn_stats(model):
            out = model(x)
            model(3 * x - 1)
            if raise_inside:
                raise RuntimeError("boom")
    _assert_buffers_equal(model, before)
    assert torch.equal(out, reference(x)), "train-mode output: batch statistics, as a plain forward"
    assert not torch.equal(reference[1].running_mean, before["1.running_mean"]), "a plain forward updates them"
    model(x)
    assert torch.equal(model[1].running_var, reference[1].running_var), "tracking resumes after the block"


def test_frozen_bn_stats_rejects_non_module() -> None:
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got \[1, 2\]"):
        with frozen_bn_stats([1, 2]):  # type: ignore[arg-type]
            pass


# -- BatchNorm with SAM end to end -----------------------------------------------------------------
def _sam_bn_step(use_context: bool) -> tuple[nn.Module, torch.Tensor, nn.Module]:
    """One SAM step on a conv net with BatchNorm; returns (model, x, copy of model before)."""
    model = _bn_net()
    before = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(8, 2, 4, 4, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 5, (8,), generator=generator)
    optimizer = TransformingOptimizer(
        model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        momentum=0.9,
        transforms=[SAM(rho=0.5)],
        reevaluation_context=(lambda: frozen_bn_stats(model)) if use_context else None,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return model, x, before


def test_sam_with_frozen_bn_stats_updates_running_stats_once_per_step() -> None:
    model, x, before = _sam_bn_step(use_context=True)
    # Reference: one plain train-mode forward at the weights before the step.
    before(x)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked", "5.running_mean", "5.running_var"):
        assert torch.equal(dict(model.named_buffers())[name], dict(before.named_buffers())[name]), name
    assert int(model[1].num_batches_tracked) == 1


def test_sam_without_frozen_bn_stats_updates_twice_but_takes_the_same_step() -> None:
    frozen_model, _, _ = _sam_bn_step(use_context=True)
    plain_model, _, _ = _sam_bn_step(use_context=False)
    # Without the context the second forward also updates the statistics ...
    assert int(plain_model[1].num_batches_tracked) == 2
    assert not torch.equal(plain_model[1].running_mean, frozen_model[1].running_mean)
    # ... but the training forward uses batch statistics either way: the weights are identical.
    for (name, frozen), plain in zip(frozen_model.named_parameters(), plain_model.parameters()):
        assert torch.equal(frozen, plain), name


def test_set_grad_rejects_a_non_tensor_with_a_type_error():
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="grads must be a torch.Tensor, got list"):
        set_grad([0.0, 1.0], [param])


def test_frozen_bn_stats_refuses_a_lazy_batchnorm_that_has_not_run_and_leaves_it_working():
    """Its first forward inside the block would create no running statistics and leave the layer
    half-initialised for good; refused before anything changes. Once it has run, it is frozen."""
    model = nn.Sequential(nn.LazyBatchNorm1d())
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"^frozen_bn_stats: 0 is a lazy norm layer \(LazyBatchNorm1d\) that has not run a forward yet"):
        with frozen_bn_stats(model):
            model(x)
    model(x)  # an ordinary first forward still initialises it
    layer = model[0]
    assert isinstance(layer, nn.BatchNorm1d) and int(layer.num_batches_tracked) == 1
    mean = layer.running_mean.clone()
    with frozen_bn_stats(model):
        model(torch.randn(5, 4))
    assert torch.equal(layer.running_mean, mean) and int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize(
    "layer",
    [lambda: nn.LazyBatchNorm1d(track_running_stats=False), lambda: nn.LazyInstanceNorm1d(track_running_stats=False)],
    ids=["LazyBatchNorm1d-untracked", "LazyInstanceNorm1d-untracked"],
)
def test_frozen_bn_stats_accepts_a_lazy_norm_layer_that_keeps_no_running_statistics(layer):
    """Nothing to keep, nothing to refuse: its first forward inside the block initialises it."""
    model = nn.Sequential(layer())
    x = torch.randn(4, 3, 5)
    with frozen_bn_stats(model):
        inside = model(x)
    assert not isinstance(model[0], nn.modules.lazy.LazyModuleMixin)
    assert torch.equal(inside, model(x))


def test_get_grad_and_set_grad_name_an_item_that_is_not_a_tensor():
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match=r"^params\[1\] must be a torch.Tensor, got 1.0$"):
        get_grad([param, 1.0])
    with pytest.raises(TypeError, match=r"^params\[0\] must be a torch.Tensor, got 'w'$"):
        set_grad(torch.zeros(2), ["w"])
    assert param.grad is None


@pytest.mark.parametrize("params", [5, None, 0.5])
def test_get_grad_and_set_grad_name_params_that_are_neither_a_tensor_nor_an_iterable(params):
    with pytest.raises(TypeError, match=rf"^params must be a tensor or an iterable of tensors, got {params}$"):
        get_grad(params)
    with pytest.raises(TypeError, match=rf"^params must be a tensor or an iterable of tensors, got {params}$"):
        set_grad(torch.zeros(2), params)


def test_get_grad_takes_a_sparse_gradient_as_the_dense_tensor_it_stands_for():
    """``reshape`` refused a sparse gradient (``nn.Embedding(..., sparse=True)``)."""
    torch.manual_seed(0)
    sparse, dense = nn.Embedding(5, 2, sparse=True), nn.Embedding(5, 2)
    dense.load_state_dict(sparse.state_dict())
    bias = nn.Parameter(torch.ones(3))
    for embedding in (sparse, dense):
        (embedding(torch.tensor([1, 1, 3])) * torch.tensor([2.0, -1.0])).sum().backward()
    bias.grad = torch.arange(3.0)
    assert sparse.weight.grad.layout == torch.sparse_coo
    want = torch.cat([torch.arange(3.0), dense.weight.grad.reshape(-1)])
    assert torch.equal(get_grad([bias, sparse.weight]), want)  # duplicate index 1 summed


def test_set_grad_replaces_a_sparse_gradient_by_a_dense_one_and_writes_the_others():
    """``copy_`` into a sparse gradient raised after the parameters before it were written."""
    embedding = nn.Embedding(5, 2, sparse=True)
    embedding(torch.tensor([1])).sum().backward()
    bias = nn.Parameter(torch.ones(3))
    bias.grad = torch.zeros(3)
    existing = bias.grad
    vector = torch.arange(13.0)
    set_grad(vector, [bias, embedding.weight])
    assert bias.grad is existing and torch.equal(bias.grad, torch.arange(3.0))  # written in place
    assert embedding.weight.grad.layout == torch.strided
    assert torch.equal(embedding.weight.grad, torch.arange(3.0, 13.0).reshape(5, 2))


def test_set_grad_refuses_a_complex_vector_for_a_real_parameter_before_writing():
    """The cast to the real parameter's dtype dropped the imaginary parts (torch's warning only)."""
    complex_param = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    real_param = nn.Parameter(torch.zeros(2))
    complex_param.grad = torch.zeros(2, dtype=torch.complex64)
    with pytest.raises(
        TypeError,
        match=r"^grads must be real where params\[1\] is real, got a torch.complex64 tensor with non-zero imaginary parts there$",
    ):
        set_grad(torch.tensor([1 + 2j, 3 + 4j, 5 + 6j, 7 + 8j]), [complex_param, real_param])
    assert torch.equal(complex_param.grad, torch.zeros(2, dtype=torch.complex64)) and real_param.grad is None
    set_grad(torch.tensor([1.0, 2.0, 3.0, 4.0]), [complex_param, real_param])  # real into complex: allowed
    assert torch.equal(complex_param.grad, torch.tensor([1 + 0j, 2 + 0j]))
    assert torch.equal(real_param.grad, torch.tensor([3.0, 4.0]))


def test_set_grad_takes_back_what_get_grad_made_for_complex_and_real_parameters():
    """get_grad makes a complex vector for a complex first parameter; its real parameters' slices
    have zero imaginary parts, and set_grad refused the round trip after the complex check."""
    complex_param = nn.Parameter(torch.tensor([1 + 2j, -3 + 0.5j]))
    real_param = nn.Parameter(torch.tensor([2.0, -1.0, 4.0]))
    (complex_param.abs().sum() + (real_param**2).sum()).backward()
    params = [complex_param, real_param]
    expected = [complex_param.grad.clone(), real_param.grad.clone()]
    vector = get_grad(params)
    assert vector.is_complex()
    for param in params:
        param.grad = None
    set_grad(vector * 2, params)
    assert torch.equal(complex_param.grad, expected[0] * 2)
    assert torch.equal(real_param.grad, expected[1] * 2)


def _spectral_net(legacy: bool) -> nn.Module:
    """Two spectrally normalised layers (2-D weights, so each keeps power-iteration vectors) and
    one with a 1-D weight (the parametrization keeps none), in float64."""
    torch.manual_seed(4)
    norm = nn.utils.spectral_norm if legacy else nn.utils.parametrizations.spectral_norm
    model = nn.Sequential(norm(nn.Linear(3, 4)), nn.Tanh(), norm(nn.Linear(4, 2)))
    if not legacy:
        model.append(norm(nn.LayerNorm(2), name="weight"))
    return model.double()


def _power_vectors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: buffer.clone()
        for name, buffer in model.named_buffers()
        if name.endswith(("_u", "_v")) and buffer.dim() == 1
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "hook"])
def test_frozen_bn_stats_keeps_spectral_norm_power_iteration_vectors(legacy: bool) -> None:
    """Inside the block a train-mode forward normalises as a plain one (it runs the power
    iteration); on exit u and v are what they were on entry."""
    model, reference = _spectral_net(legacy), _spectral_net(legacy)  # (the older form cannot be deep-copied)
    x = torch.randn(5, 3, dtype=torch.float64)
    model(x)
    reference(x)
    before = _power_vectors(model)
    assert len(before) == 4, sorted(before)
    with frozen_bn_stats(model):
        inside = model(x)
        model(2 * x)
    assert torch.equal(inside, reference(x)), "normalised as a plain train-mode forward"
    after = _power_vectors(model)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    moved = _power_vectors(reference)
    assert any(not torch.equal(moved[name], value) for name, value in before.items()), "a plain forward moves them"


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "hook"])
def test_sam_with_frozen_bn_stats_runs_one_power_iteration_per_step(legacy: bool) -> None:
    """After a SAM step u and v are those of one plain train-mode forward at the weights before
    the step (the first pass's), not of a second one at w + e."""
    model, reference = _spectral_net(legacy), _spectral_net(legacy)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    y = torch.randn(6, 2, dtype=torch.float64, generator=generator)
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(rho=0.5)],
        reevaluation_context=lambda: frozen_bn_stats(model),
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    reference(x)
    expected = _power_vectors(reference)
    actual = _power_vectors(model)
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "hook"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_graph_built_in_frozen_bn_stats_back_propagates_after_the_block(legacy: bool, mode: str) -> None:
    """The two-call loop's second forward runs inside the block and its backward after it: the
    block must not write buffers it did not change (the hook-based spectral norm in eval mode
    saves u and v themselves for the backward). Reference: the same forward and backward
    without the block, in eval mode, where nothing is updated."""
    model = _spectral_net(legacy)
    getattr(model, mode)()
    x = torch.randn(5, 3, dtype=torch.float64)
    with frozen_bn_stats(model):
        loss = model(x).square().sum()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    if mode == "eval":
        model.zero_grad()
        model(x).square().sum().backward()
        for got, expected in zip(grads, (p.grad for p in model.parameters())):
            assert torch.equal(got, expected)


def test_get_grad_and_set_grad_take_a_single_tensor_as_a_list_of_it():
    """A single tensor was iterated over as its rows: get_grad read the rows' (missing) grads as
    zeros, and set_grad wrote into the rows' grads, leaving the parameter's untouched. It counts
    as ``[tensor]`` now, as in ``torch.nn.utils.clip_grad_norm_``."""
    layer = nn.Linear(3, 2)
    layer.weight.grad = torch.arange(6.0).reshape(2, 3) + 1
    assert torch.equal(get_grad(layer.weight), get_grad([layer.weight]))
    assert torch.equal(get_grad(layer.weight), torch.arange(6.0) + 1)
    set_grad(torch.arange(6.0) * -2, layer.weight)
    assert torch.equal(layer.weight.grad, (torch.arange(6.0) * -2).reshape(2, 3))
    scalar = nn.Parameter(torch.tensor(1.0))  # a 0-dim tensor could not be iterated over at all
    set_grad(torch.tensor([5.0]), scalar)
    assert torch.equal(scalar.grad, torch.tensor(5.0)) and torch.equal(get_grad(scalar), torch.tensor([5.0]))
