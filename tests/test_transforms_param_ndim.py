"""``param_ndim`` (rai-toolbox's ParamTransformingOptimizer): broadcasting, references, hooks, bad inputs.

The references below never reshape: they walk the sub-tensors with explicit index loops
(:func:`subtensors`) and compute on Python floats, so they share no code with the library.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import re
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn
from state_helpers import assert_state_dicts_equal

from samgria import (
    SAM,
    ClampGrad,
    ClampParams,
    GradSign,
    NormalizeGrad,
    ParamTransform,
    ProjectParams,
    ScaleGrad,
    SparsifyGrad,
    Transform,
    TransformingOptimizer,
)
from samgria._checks import check_choice
from samgria.transforms.grad import kept_count
from samgria.transforms.param_ndim import batch_shape

F64 = torch.float64


# -- references -------------------------------------------------------------------------------------
def sub_ndim(param_ndim, ndim):
    ndim = max(ndim, 1)
    if param_ndim is None:
        return ndim
    return param_ndim + ndim if param_ndim < 0 else param_ndim


def subtensors(tensor, param_ndim):
    """Every sub-tensor of ``tensor`` under ``param_ndim``, as index tuples into it (loops only)."""
    shape = tuple(tensor.shape) or (1,)
    lead = len(shape) - sub_ndim(param_ndim, len(shape))
    inner = [range(size) for size in shape[lead:]]
    for outer in itertools.product(*[range(size) for size in shape[:lead]]):
        yield [outer + rest for rest in itertools.product(*inner)]


def apply_per_subtensor(tensor, param_ndim, fn, other=None):
    """A float64 copy of ``tensor`` with ``fn(values) -> values`` applied to each sub-tensor
    (``fn(values, other_values)`` with the same sub-tensor of ``other`` when given)."""
    out = tensor.detach().clone().to(F64)
    view = out.reshape(1) if out.ndim == 0 else out
    other_view = None if other is None else (other.reshape(1) if other.ndim == 0 else other)
    for indices in subtensors(view, param_ndim):
        values = [float(view[i]) for i in indices]
        new = fn(values) if other is None else fn(values, [float(other_view[i]) for i in indices])
        for i, value in zip(indices, new):
            view[i] = value
    return out


def lp_norm(values, p):
    if p == math.inf:
        return max(abs(v) for v in values)
    return sum(abs(v) ** p for v in values) ** (1.0 / p)


def ref_normalize(values, p, eps):
    norm = lp_norm(values, p) + eps
    return [v / norm if norm > 0 else 0.0 for v in values]


def ref_sparsify(values, q):
    k = math.ceil(q * len(values))  # the tests use q * m that are not within 1e-12 of an integer
    tau = sorted((abs(v) for v in values), reverse=True)[k - 1]
    return [v if abs(v) >= tau else 0.0 for v in values]


def ref_project_l2(values, center, radius):
    offset = [v - c for v, c in zip(values, center)]
    norm = math.sqrt(sum(d * d for d in offset))
    if norm <= radius:
        return values
    return [c + d * radius / norm for c, d in zip(center, offset)]


# -- fixtures ---------------------------------------------------------------------------------------
SHAPES = [(), (5,), (4, 3), (2, 3, 4)]


def make_params(seed=0, dtype=F64):
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)) for shape in SHAPES]


def set_grads(params, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)


def two_groups(params, first, second):
    """Group 0: the 0-dim and 1-dim parameters, group 1: the 2-dim and 3-dim ones."""
    return [{"params": params[:2], **first}, {"params": params[2:], **second}]


def grads_after(transforms, first, second, *, foreach=True, lr=0.0):
    params = make_params()
    optimizer = TransformingOptimizer(
        two_groups(params, first, second), torch.optim.SGD, transforms=transforms, lr=lr, transform_foreach=foreach
    )
    set_grads(params)
    raw = [p.grad.clone() for p in params]
    optimizer.step()
    return raw, [p.grad for p in params], params, optimizer


# -- the semantics of param_ndim ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "param_ndim,expected",
    [
        (0, (120, 1)),
        (1, (24, 5)),
        (-3, (24, 5)),
        (2, (6, 4, 5)),
        (-2, (6, 4, 5)),
        (3, (2, 3, 4, 5)),
        (-1, (2, 3, 4, 5)),
        (4, (1, 2, 3, 4, 5)),
        (-4, (120, 1)),
        (None, (1, 2, 3, 4, 5)),
    ],
)
def test_batch_shape_follows_the_rai_table(param_ndim, expected):
    # rai-toolbox's "Additional Explanation of param_ndim" for a shape-(d0, d1, d2, d3) parameter.
    assert batch_shape((2, 3, 4, 5), param_ndim) == expected


def test_batch_shape_of_0_dim_and_empty_tensors():
    for param_ndim in (-1, 0, 1, None):
        assert batch_shape((), param_ndim) == (1, 1)
    assert batch_shape((5, 0), 1) == (5, 0)
    assert batch_shape((0, 3), -1) == (0, 3)


# -- float64 references, per group --------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize(
    "ctor,first,second",
    [
        ({}, {}, {}),  # the default: each whole gradient, L2
        ({"p": 1, "param_ndim": -1}, {"param_ndim": 0}, {"p": 0.5}),
        ({"p": math.inf, "eps": 0.25}, {"param_ndim": 1, "eps": 0.0}, {"param_ndim": -2, "p": 3.0}),
        ({"p": 2, "param_ndim": 1}, {"param_ndim": -1, "p": 1.5}, {"param_ndim": None}),
    ],
)
def test_normalize_grad_matches_a_per_subtensor_loop(foreach, ctor, first, second):
    transform = NormalizeGrad(**ctor)
    raw, got, _, optimizer = grads_after([transform], first, second, foreach=foreach)
    for index, (g_raw, g_got) in enumerate(zip(raw, got)):
        group = optimizer.param_groups[0 if index < 2 else 1]
        expected = apply_per_subtensor(
            g_raw, group["param_ndim"], lambda v: ref_normalize(v, group["p"], group["eps"])
        )
        torch.testing.assert_close(g_got, expected, rtol=1e-12, atol=1e-15)


def test_normalize_grad_keeps_its_whole_tensor_default():
    """The rai default (-1) would normalise each row: NormalizeGrad keeps its documented whole-tensor L2."""
    assert NormalizeGrad().param_ndim is None and NormalizeGrad().p == 2.0
    raw, got, _, _ = grads_after([NormalizeGrad()], {}, {})
    for g_raw, g_got in zip(raw, got):
        torch.testing.assert_close(g_got, g_raw / (g_raw.norm() + 1e-12), rtol=1e-14, atol=0)
    _, rows, _, _ = grads_after([NormalizeGrad(param_ndim=-1)], {}, {})
    assert not torch.allclose(rows[2], got[2])


def test_normalize_grad_zero_subtensor_stays_zero_with_eps_zero():
    param = nn.Parameter(torch.ones(3, 2, dtype=F64))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[NormalizeGrad(eps=0.0, p=1, param_ndim=-1)])
    param.grad = torch.tensor([[0.0, 0.0], [3.0, -1.0], [0.0, 2.0]], dtype=F64)
    optimizer.step()
    assert torch.equal(param.grad, torch.tensor([[0.0, 0.0], [0.75, -0.25], [0.0, 1.0]], dtype=F64))


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize(
    "ctor,first,second",
    [
        ({"q": 0.3}, {}, {}),
        ({"q": 0.45, "param_ndim": -1}, {"q": 1.0}, {"param_ndim": 1}),
        ({"q": 0.55, "param_ndim": 0}, {"param_ndim": None, "q": 0.7}, {"param_ndim": 2, "q": 0.15}),
    ],
)
def test_sparsify_grad_matches_a_per_subtensor_loop(foreach, ctor, first, second):
    raw, got, _, optimizer = grads_after([SparsifyGrad(**ctor)], first, second, foreach=foreach)
    for index, (g_raw, g_got) in enumerate(zip(raw, got)):
        group = optimizer.param_groups[0 if index < 2 else 1]
        expected = apply_per_subtensor(g_raw, group["param_ndim"], lambda v: ref_sparsify(v, group["q"]))
        assert torch.equal(g_got, expected), index


def test_sparsify_grad_count_ties_and_q_one():
    assert kept_count(0.1, 30) == 3  # 0.1 * 30 == 3.0000000000000004 in floating point
    assert [kept_count(q, 10) for q in (1e-9, 0.1, 0.15, 0.3, 0.95, 1.0)] == [1, 1, 2, 3, 10, 10]
    param = nn.Parameter(torch.zeros(2, 4, dtype=F64))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[SparsifyGrad(q=0.25, param_ndim=-1)])
    param.grad = torch.tensor([[1.0, -3.0, 3.0, 2.0], [0.5, 0.25, -4.0, 1.0]], dtype=F64)
    optimizer.step()
    # Row 0: the largest magnitude 3 is tied: both are kept. Row 1: one element.
    assert torch.equal(param.grad, torch.tensor([[0.0, -3.0, 3.0, 0.0], [0.0, 0.0, -4.0, 0.0]], dtype=F64))
    untouched = torch.randn(3, 5, dtype=F64)
    param = nn.Parameter(torch.zeros(3, 5, dtype=F64))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[SparsifyGrad(q=1.0)])
    param.grad = untouched.clone()
    optimizer.step()
    assert torch.equal(param.grad, untouched)


def test_rai_l1q_normed_gradient_as_a_chain():
    """rai's L1qNormedGradientOptim(q=0.75): signs of the top 25% per row, with unit L1 norm."""
    transforms = [SparsifyGrad(q=0.25, param_ndim=-1), GradSign(), NormalizeGrad(eps=0.0, p=1, param_ndim=-1)]
    raw, got, _, _ = grads_after(transforms, {}, {})

    def l1q(values):
        kept = ref_sparsify(values, 0.25)
        signs = [math.copysign(1.0, v) if v != 0 else 0.0 for v in kept]
        total = sum(abs(s) for s in signs)
        return [s / total for s in signs]

    for g_raw, g_got in zip(raw, got):
        torch.testing.assert_close(g_got, apply_per_subtensor(g_raw, -1, l1q), rtol=1e-12, atol=0)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("center", ["zero", "initial"])
@pytest.mark.parametrize(
    "ctor,first,second",
    [
        ({"radius": 0.8}, {}, {}),  # the default param_ndim=-1
        ({"radius": 1.5, "param_ndim": None}, {"param_ndim": 0, "radius": 0.3}, {"param_ndim": 2}),
        ({"radius": 0.4, "p": math.inf}, {"radius": 1.0}, {"param_ndim": 0}),
        ({"radius": 0.0, "param_ndim": 1}, {}, {"radius": 2.0, "param_ndim": -1}),
    ],
)
def test_project_params_matches_a_per_subtensor_loop(foreach, center, ctor, first, second):
    params = make_params()
    start = [p.detach().clone() for p in params]
    transform = ProjectParams(center=center, **ctor)
    optimizer = TransformingOptimizer(
        two_groups(params, first, second), torch.optim.SGD, transforms=[transform], lr=0.7, transform_foreach=foreach
    )
    for step in range(2):
        set_grads(params, seed=10 + step)
        stepped = [(p - 0.7 * p.grad).detach() for p in params]
        optimizer.step()
        for index, (param, moved) in enumerate(zip(params, stepped)):
            group = optimizer.param_groups[0 if index < 2 else 1]
            radius = group["radius"]
            middle = start[index] if center == "initial" else torch.zeros_like(moved)
            if group["p"] == math.inf:
                expected = torch.tensor(
                    [min(max(w, c - radius), c + radius) for w, c in zip(moved.reshape(-1).tolist(), middle.reshape(-1).tolist())],
                    dtype=F64,
                ).reshape(moved.shape)
            else:
                expected = apply_per_subtensor(
                    moved, group["param_ndim"], lambda v, c: ref_project_l2(v, c, radius), other=middle
                )
            torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-15)
            if center == "initial":
                assert torch.equal(optimizer.state[param]["project_params.center"], start[index])


@pytest.mark.parametrize("project_first", [True, False])
def test_project_params_centres_a_parameter_whose_first_gradient_comes_from_sams_second_pass(project_first):
    """A parameter the first pass does not use (stochastic routing) gets its first gradient in
    SAM's re-evaluation, after ProjectParams' pre_update recorded the centres: the step raised
    KeyError. Placed before SAM, ProjectParams centres it where that first step left it; placed
    after SAM, before the step, as every other parameter."""
    used = nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    routed = nn.Parameter(torch.tensor([0.5, 0.25, -0.5], dtype=torch.float64))
    calls = [0]
    projection, sam = ProjectParams(0.01, center="initial", param_ndim=None), SAM(0.05)
    optimizer = TransformingOptimizer(
        [used, routed], torch.optim.SGD, lr=0.1, transforms=[projection, sam] if project_first else [sam, projection]
    )

    def closure():
        optimizer.zero_grad()
        calls[0] += 1
        loss = (used**2).sum() + (((routed - 3.0) ** 2).sum() if calls[0] % 2 == 0 else 0.0)
        loss.backward()
        return loss

    start = routed.detach().clone()
    optimizer.step(closure)
    after_first = routed.detach().clone()
    assert not torch.equal(after_first, start)  # the inner step moved it
    center = optimizer.state[routed]["project_params.center"]
    if project_first:
        assert torch.equal(center, after_first)  # nothing to project this step
    else:
        assert torch.equal(center, start)
        torch.testing.assert_close((after_first - start).norm(), torch.tensor(0.01, dtype=torch.float64))
    optimizer.step(closure)
    torch.testing.assert_close((routed.detach() - center).norm(), torch.tensor(0.01, dtype=torch.float64))


def test_project_params_around_initial_weights_needs_apply_before_post_step_in_the_seed_protocol():
    """Through the seed protocol alone, post_step() without apply() raised a bare KeyError
    ('project_params.center'): the centre is recorded by apply()."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    model.weight.grad, model.bias.grad = torch.ones(2, 3), torch.ones(2)
    before = [p.detach().clone() for p in model.parameters()]
    transform = ProjectParams(0.1, center="initial")
    with pytest.raises(RuntimeError, match=r"call apply\(\) before post_step\(\) \(nothing was changed\)$"):
        transform.post_step(model)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    transform.apply(model, None, ())
    with torch.no_grad():
        model.weight.add_(1.0)  # the step moves the weight 1.0 away: projected back to radius 0.1
    transform.post_step(model)
    offset = model.weight.detach() - before[0]
    torch.testing.assert_close(offset.norm(dim=-1), torch.full((2,), 0.1))


def test_project_params_leaves_points_inside_the_ball_bit_for_bit():
    param = nn.Parameter(torch.tensor([[0.1, 0.2], [3.0, 4.0]], dtype=F64))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[ProjectParams(radius=1.0)])
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert torch.equal(param[0], torch.tensor([0.1, 0.2], dtype=F64))
    torch.testing.assert_close(param[1].detach(), torch.tensor([0.6, 0.8], dtype=F64), rtol=1e-15, atol=0)


def test_clamp_params_matches_an_elementwise_loop_per_group():
    params = make_params()
    optimizer = TransformingOptimizer(
        two_groups(params, {"param_min": -0.2}, {"param_max": math.inf}), torch.optim.SGD, lr=0.5,
        transforms=[ClampParams(-0.5, 0.4)],
    )
    set_grads(params)
    stepped = [(p - 0.5 * p.grad).detach() for p in params]
    optimizer.step()
    for index, (param, moved) in enumerate(zip(params, stepped)):
        low, high = (-0.2, 0.4) if index < 2 else (-0.5, math.inf)
        expected = torch.tensor([min(max(v, low), high) for v in moved.reshape(-1).tolist()], dtype=F64).reshape(moved.shape)
        assert torch.equal(param.detach(), expected)


# -- elementwise transforms honour every param_ndim (so they need no key) -----------------------------
class _PreHook(ParamTransform):
    def __init__(self, fn, param_ndim=-1):
        super().__init__(param_ndim)
        self.fn = fn

    def pre_step_transform_(self, param, group):
        self.fn(param.grad)


class _PostHook(ParamTransform):
    def __init__(self, fn, param_ndim=-1):
        super().__init__(param_ndim)
        self.fn = fn

    def post_step_transform_(self, param, group):
        self.fn(param)


def _Hooked(fn, post=False, param_ndim=-1):
    return (_PostHook if post else _PreHook)(fn, param_ndim=param_ndim)


@pytest.mark.parametrize(
    "builtin,fn,post",
    [
        (GradSign(), torch.Tensor.sign_, False),
        (ScaleGrad(0.5, 0.1), lambda g: g.mul_(0.5).add_(0.1), False),
        (ClampGrad(-0.3, 0.2), lambda g: g.clamp_(-0.3, 0.2), False),
        (ClampParams(-0.3, 0.2), lambda w: w.clamp_(-0.3, 0.2), True),
    ],
    ids=["GradSign", "ScaleGrad", "ClampGrad", "ClampParams"],
)
def test_elementwise_transforms_equal_their_per_subtensor_hook_for_every_param_ndim(builtin, fn, post):
    _, _, expected, _ = grads_after([copy.deepcopy(builtin)], {}, {}, lr=0.3)
    for param_ndim in (-1, 0, 1, None):
        _, _, got, _ = grads_after([_Hooked(fn, post)], {"param_ndim": param_ndim}, {"param_ndim": param_ndim}, lr=0.3)
        for a, b in zip(got, expected):
            assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
    assert "param_ndim" not in builtin.group_defaults()


# -- bad inputs -------------------------------------------------------------------------------------
def out_of_range_message(key, value, where="param_groups[0]", bound=1, position=0, shape="()"):
    return (
        rf"^{re.escape(where)}: {re.escape(key)} must be None or an integer in \[-{bound}, {bound}\] for "
        rf"params\[{position}\] of shape {re.escape(shape)}, got {value}$"
    )


@pytest.mark.parametrize(
    "transforms,key",
    [
        (lambda: [NormalizeGrad()], "param_ndim"),
        (lambda: [SparsifyGrad()], "param_ndim"),
        (lambda: [ProjectParams(center="initial")], "param_ndim"),
        (lambda: [_Hooked(torch.Tensor.sign_)], "param_ndim"),
        (lambda: [_Hooked(torch.Tensor.sign_, post=True)], "param_ndim"),
        (lambda: [ScaleGrad(2.0), NormalizeGrad()], "param_ndim"),
        (lambda: [ScaleGrad(2.0), SparsifyGrad(q=1.0)], "param_ndim"),
        (lambda: [ClampGrad(-0.5, 0.5), ProjectParams()], "param_ndim"),
        (lambda: [ScaleGrad(2.0), _Hooked(torch.Tensor.sign_)], "param_ndim"),
        (lambda: [SAM(0.05), NormalizeGrad(), ProjectParams()], "normalize_grad.param_ndim"),
        (lambda: [SAM(0.05), NormalizeGrad(), ProjectParams()], "project_params.param_ndim"),
    ],
    ids=[
        "normalize", "sparsify", "project", "pre_hook", "post_hook", "scale_then_normalize", "scale_then_sparsify",
        "clamp_then_project", "scale_then_pre_hook", "qualified_normalize", "qualified_project",
    ],
)
@pytest.mark.parametrize("value", [2, -2, 7])
@pytest.mark.parametrize("with_closure", [True, False], ids=["closure", "no_closure"])
def test_param_ndim_out_of_range_is_refused_before_anything_changes(transforms, key, value, with_closure):
    # Group 0 holds a 0-dim and a 1-dim parameter: param_ndim must lie in [-1, 1] for both. The
    # value is set after a first step (momentum buffers exist) and refused before any transform of
    # the step runs (before the closure too), so the transforms before the one that owns the key
    # change nothing either.
    params = make_params()
    chain = transforms()
    optimizer = TransformingOptimizer(two_groups(params, {}, {}), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=chain)
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype) for i, p in enumerate(params)]

    def closure():
        for p, g in zip(params, grads):
            p.grad = g.clone()
        return torch.tensor(0.0)

    closure()
    optimizer.step(closure)
    optimizer.param_groups[0][key] = value
    closure()
    weights = [p.detach().clone() for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=out_of_range_message(key, value)):
        optimizer.step(closure) if with_closure else optimizer.step()
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert str(optimizer.state_dict()) == str(state)


def test_param_ndim_out_of_range_is_refused_where_a_group_is_checked():
    # When the optimizer is built, by add_param_group and load_state_dict, and in the seed protocol
    # (the constructor's value, checked at apply).
    params = make_params()
    message = out_of_range_message("param_ndim", 3, "param_groups[1]", 2, 0, "(4, 3)")
    with pytest.raises(ValueError, match=message):
        TransformingOptimizer(two_groups(params, {}, {"param_ndim": 3}), torch.optim.SGD, lr=0.1, transforms=[SparsifyGrad()])
    with pytest.raises(ValueError, match=out_of_range_message("param_ndim", 2, "param_groups[0]", 1, 0, "()")):
        TransformingOptimizer(params, torch.optim.SGD, lr=0.1, transforms=[NormalizeGrad(param_ndim=2)])
    optimizer = TransformingOptimizer(params[:2], torch.optim.SGD, lr=0.1, transforms=[NormalizeGrad()])
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": params[2:], "param_ndim": 3})
    assert len(optimizer.param_groups) == 1
    with pytest.raises(ValueError, match=out_of_range_message("normalize_grad.param_ndim", -3, "param_groups[0]", 2, 1, "(4, 3)")):
        TransformingOptimizer(
            [{"params": [params[3], params[2]], "normalize_grad.param_ndim": -3}], torch.optim.SGD, lr=0.1,
            transforms=[NormalizeGrad(), SparsifyGrad()],
        )
    model = nn.Linear(3, 2)  # a 2-dim weight and a 1-dim bias
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[NormalizeGrad()])
    saved = optimizer.state_dict()
    saved["param_groups"][0]["param_ndim"] = 2
    with pytest.raises(ValueError, match=out_of_range_message("param_ndim", 2, "the checkpoint's param_groups[0]", 1, 1, "(2,)")):
        optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["param_ndim"] is None
    set_grads(list(model.parameters()))
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=out_of_range_message("param_ndim", 2, "param_groups[0]", 1, 1, "(2,)")):
        NormalizeGrad(param_ndim=2).apply(model, lambda: model.weight.sum(), ())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_param_ndim_range_is_per_parameter():
    # 1 fits the 2-dim and 3-dim parameters of group 1, and -3 / 3 only the 3-dim one.
    params = make_params()
    optimizer = TransformingOptimizer(
        two_groups(params, {}, {"param_ndim": 1}), torch.optim.SGD, lr=0.1, transforms=[NormalizeGrad()]
    )
    set_grads(params)
    optimizer.param_groups[1]["param_ndim"] = 3
    with pytest.raises(ValueError, match=out_of_range_message("param_ndim", 3, "param_groups[1]", 2, 0, "(4, 3)")):
        optimizer.step()
    optimizer.param_groups[1]["param_ndim"] = 2
    optimizer.step()


def test_param_ndim_must_be_an_integer_or_none_everywhere():
    params = make_params()
    for bad in (1.0, "1", True):
        with pytest.raises(TypeError, match=rf"^param_ndim must be an integer or None, got {re.escape(repr(bad))}$"):
            NormalizeGrad(param_ndim=bad)
        with pytest.raises(TypeError, match=rf"^param_groups\[1\]: param_ndim must be an integer or None, got {re.escape(repr(bad))}$"):
            TransformingOptimizer(two_groups(params, {}, {"param_ndim": bad}), torch.optim.SGD, lr=0.1, transforms=[ProjectParams()])
    optimizer = TransformingOptimizer(params[:2], torch.optim.SGD, lr=0.1, transforms=[NormalizeGrad()])
    with pytest.raises(TypeError, match=r"^param_groups\[1\]: param_ndim must be an integer or None, got 0\.5$"):
        optimizer.add_param_group({"params": params[2:], "param_ndim": 0.5})
    for bad in (math.nan, math.inf):  # NaN and inf are value errors everywhere; the rule still says "or None"
        with pytest.raises(ValueError, match=rf"^param_ndim must be an integer or None, got {bad!r}$"):
            NormalizeGrad(param_ndim=bad)
    import numpy as np

    assert NormalizeGrad(param_ndim=np.int64(-1)).param_ndim == -1


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda: SparsifyGrad(q=0.0), ValueError, r"^q must be a finite number in \(0, 1\], got 0\.0$"),
        (lambda: SparsifyGrad(q=1.0000001), ValueError, r"^q must be a finite number in \(0, 1\], got 1\.0000001$"),
        (lambda: NormalizeGrad(p=0), ValueError, r"^p must be a real number > 0, got 0$"),
        (lambda: NormalizeGrad(p=-2.0), ValueError, r"^p must be a real number > 0, got -2\.0$"),
        (lambda: ProjectParams(p=1), ValueError, r"^p must be one of 2, inf, got 1$"),
        (lambda: ProjectParams(radius=-0.1), ValueError, r"^radius must be a finite number >= 0, got -0\.1$"),
        (lambda: ProjectParams(center="init"), ValueError, r"^center must be one of 'zero', 'initial', got 'init'$"),
        (lambda: ClampParams(0.5, 0.25), ValueError, r"^param_max must be a real number >= param_min = 0\.5, got 0\.25$"),
    ],
)
def test_bad_constructor_values_name_the_argument_and_value(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_bad_group_values_name_the_group():
    params = make_params()
    with pytest.raises(ValueError, match=r"^param_groups\[1\]: q must be a finite number in \(0, 1\], got 1\.5$"):
        TransformingOptimizer(two_groups(params, {}, {"q": 1.5}), torch.optim.SGD, lr=0.1, transforms=[SparsifyGrad()])
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: normalize_grad\.p must be a real number > 0, got -1$"):
        TransformingOptimizer(
            two_groups(params, {"normalize_grad.p": -1}, {}), torch.optim.SGD, lr=0.1, transforms=[NormalizeGrad(), ProjectParams()]
        )


@pytest.mark.parametrize(
    "value,error",
    [("2", TypeError), (torch.tensor(2.0), TypeError), (True, TypeError), (None, TypeError), (1, ValueError), (math.nan, ValueError)],
    ids=["str", "tensor", "bool", "none", "one", "nan"],
)
def test_project_params_p_of_the_wrong_kind_is_a_type_error_wherever_it_is_checked(value, error):
    """One message shape: a value of none of the choices' kinds is a TypeError, as a string is for
    every real hyperparameter (a tensor p used to be accepted: ``tensor(2.) in (2, inf)`` is true)."""
    message = rf"p must be one of 2, inf, got {re.escape(repr(value))}$"
    with pytest.raises(error, match="^" + message):
        ProjectParams(p=value)
    params = make_params()
    with pytest.raises(error, match=r"^param_groups\[1\]: " + message):
        TransformingOptimizer(two_groups(params, {}, {"p": value}), torch.optim.SGD, lr=0.1, transforms=[ProjectParams()])
    optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=0.1, transforms=[ProjectParams(0.5)])
    optimizer.param_groups[0]["p"] = value  # a step-time edit
    set_grads(params)
    weights = [p.detach().clone() for p in params]
    with pytest.raises(error, match=r"^param_groups\[0\]: " + message):
        optimizer.step()
    assert all(torch.equal(p, w) for p, w in zip(params, weights))


def test_project_params_center_of_the_wrong_kind_is_a_type_error():
    with pytest.raises(TypeError, match=r"^center must be one of 'zero', 'initial', got 0$"):
        ProjectParams(center=0)
    with pytest.raises(TypeError, match=r"^center must be one of 'zero', 'initial', got None$"):
        ProjectParams(center=None)


@pytest.mark.parametrize("value", [2, 2.0, np.float64(2.0), Fraction(2), math.inf, np.float32(math.inf)], ids=repr)
def test_project_params_p_of_any_real_type_is_the_equal_choice(value):
    params, twin = make_params(), make_params()
    optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=0.5, transforms=[ProjectParams(0.5, p=value)])
    reference = TransformingOptimizer(twin, torch.optim.SGD, lr=0.5, transforms=[ProjectParams(0.5, p=float(value))])
    set_grads(params)
    set_grads(twin)
    optimizer.step()
    reference.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin))


def test_check_choice_type_error_for_a_value_of_no_choices_kind_value_error_for_another_value():
    assert check_choice("path", None, (None, "loop", "vmap")) is None
    assert check_choice("path", "loop", (None, "loop", "vmap")) == "loop"
    with pytest.raises(TypeError, match=r"^path must be one of None, 'loop', 'vmap', got 1$"):
        check_choice("path", 1, (None, "loop", "vmap"))
    with pytest.raises(ValueError, match=r"^path must be one of None, 'loop', 'vmap', got 'Loop'$"):
        check_choice("path", "Loop", (None, "loop", "vmap"))
    with pytest.raises(TypeError, match=r"^non_finite must be one of 'skip', 'raise', got None$"):
        check_choice("non_finite", None, ("skip", "raise"))
    with pytest.raises(TypeError, match=r"^flag must be one of True, 'auto', got 1$"):
        check_choice("flag", 1, (True, "auto"))  # a bool choice takes bools only
    assert check_choice("flag", True, (True, "auto")) is True


# -- the hook base class ------------------------------------------------------------------------------
def test_hooks_that_replace_grad_or_data_raise():
    class ReplacesGrad(ParamTransform):
        def pre_step_transform_(self, param, group):
            param.grad = param.grad.sign()

    class ReplacesData(ParamTransform):
        def post_step_transform_(self, param, group):
            param.data = param.clamp(-1, 1)

    for transform, hook, what in [
        (ReplacesGrad(), "pre_step_transform_", "param.grad"),
        (ReplacesData(), "post_step_transform_", "param.data"),
    ]:
        param = nn.Parameter(torch.tensor([-3.0, 2.0]))
        optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.1, transforms=[transform])
        param.grad = torch.tensor([1.0, -1.0])
        with pytest.raises(RuntimeError, match=rf"^{type(transform).__name__}\.{hook} assigned a new tensor to {re.escape(what)}, "):
            optimizer.step()
        assert torch.equal(param.detach(), torch.tensor([-3.0, 2.0]))  # a post-step failure is undone too


def test_a_hook_that_points_param_data_at_a_slice_of_itself_raises():
    # The slice starts where the view does (same data_ptr) but has another shape: a new tensor
    # all the same, so what the hook does next would reach part of the view only.
    class Truncates(ParamTransform):
        def post_step_transform_(self, param, group):
            param.data = param.data[:1]

    param = nn.Parameter(torch.tensor([[-3.0, 2.0], [1.0, 4.0]]))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.1, transforms=[Truncates()])
    param.grad = torch.ones_like(param)
    with pytest.raises(RuntimeError, match=r"^Truncates\.post_step_transform_ assigned a new tensor to param\.data, "):
        optimizer.step()
    assert torch.equal(param.detach(), torch.tensor([[-3.0, 2.0], [1.0, 4.0]]))


def test_a_hook_that_assigns_to_param_grad_data_raises_with_nothing_changed():
    # param.grad.data = ... rebinds the temporary view's storage only: the real gradient kept its
    # values and the step went on with them, silently.
    class RebindsGradData(ParamTransform):
        writes_weights_before_step = False

        def pre_step_transform_(self, param, group):
            param.grad.data = param.grad.data.sign()

    param = nn.Parameter(torch.tensor([[-3.0, 2.0], [1.0, 4.0]]))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.1, transforms=[RebindsGradData()])
    param.grad = torch.tensor([[0.5, -2.0], [3.0, 0.25]])
    message = r"^RebindsGradData\.pre_step_transform_ assigned a new tensor to param\.grad\.data, "
    with pytest.raises(RuntimeError, match=message):
        optimizer.step()
    assert torch.equal(param.detach(), torch.tensor([[-3.0, 2.0], [1.0, 4.0]]))
    assert torch.equal(param.grad, torch.tensor([[0.5, -2.0], [3.0, 0.25]]))


class _OwnKeysOnly(ParamTransform):
    """A subclass whose group_defaults lists its own key only (no super()): param_ndim is the instance's."""

    writes_weights_before_step = False

    def __init__(self, alpha=2.0, param_ndim=-1):
        super().__init__(param_ndim)
        self.alpha = alpha

    def group_defaults(self):
        return {"alpha": self.alpha}

    def pre_step_transform_(self, param, group):
        # each sub-tensor scaled by alpha over its largest magnitude
        peak = param.grad.abs().amax(dim=tuple(range(1, param.grad.ndim)), keepdim=True)
        param.grad.mul_(group["alpha"] / peak)


def test_a_subclass_without_param_ndim_in_its_group_defaults_uses_its_own_value():
    # It raised KeyError('param_ndim') at construction.
    weight, bias = nn.Parameter(torch.zeros(2, 3, dtype=F64)), nn.Parameter(torch.zeros(2, dtype=F64))
    grads = [torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.25, -1.0]], dtype=F64), torch.tensor([3.0, -6.0], dtype=F64)]
    groups = [{"params": [weight]}, {"params": [bias], "alpha": 3.0}]
    optimizer = TransformingOptimizer(groups, torch.optim.SGD, lr=1.0, transforms=[_OwnKeysOnly(param_ndim=-1)])
    assert "param_ndim" not in optimizer.param_groups[0]
    weight.grad, bias.grad = grads[0].clone(), grads[1].clone()
    optimizer.step()
    # param_ndim=-1: each row of the weight, each element of the bias
    expected_weight = [[2.0 * g / 4.0 for g in [1.0, -4.0, 2.0]], [2.0 * g / 1.0 for g in [0.5, 0.25, -1.0]]]
    expected_bias = [3.0 * g / abs(g) for g in [3.0, -6.0]]
    assert weight.grad.tolist() == expected_weight and bias.grad.tolist() == expected_bias
    assert weight.detach().tolist() == [[-v for v in row] for row in expected_weight]


@pytest.mark.parametrize("standalone", [False, True], ids=["optimizer", "seed-protocol"])
def test_a_subclass_without_param_ndim_in_its_group_defaults_is_refused_a_value_that_does_not_fit(standalone):
    # Checked for every group before any hook runs (the bias, second, does not fit param_ndim=2).
    weight, bias = nn.Parameter(torch.ones(2, 3)), nn.Parameter(torch.ones(2))
    model = nn.Module()
    model.weight, model.bias = weight, bias
    transform = _OwnKeysOnly(param_ndim=2)
    weight.grad, bias.grad = torch.full((2, 3), 2.0), torch.full((2,), 2.0)
    message = r"^param_groups\[0\]: param_ndim must be None or an integer in \[-1, 1\] for params\[1\] of shape \(2,\), got 2$"
    with pytest.raises(ValueError, match=message):
        if standalone:
            transform.apply(model, lambda: None, ())
        else:
            TransformingOptimizer([weight, bias], torch.optim.SGD, lr=1.0, transforms=[transform]).step()
    assert torch.equal(weight.grad, torch.full((2, 3), 2.0)) and torch.equal(bias.grad, torch.full((2,), 2.0))
    assert torch.equal(weight.detach(), torch.ones(2, 3)) and torch.equal(bias.detach(), torch.ones(2))


def test_a_subclass_that_checks_no_group_is_refused_a_bad_param_ndim_under_its_qualified_key():
    # A subclass whose validate_group checks nothing: the hooks' own check refuses the value,
    # naming the key the group stores it under when another transform of the chain owns one too.
    class Lenient(ParamTransform):
        def validate_group(self, group):
            pass

        def pre_step_transform_(self, param, group):
            param.grad.mul_(2)

    params = make_params()
    optimizer = TransformingOptimizer(two_groups(params, {}, {}), torch.optim.SGD, lr=0.1, transforms=[Lenient(), NormalizeGrad()])
    optimizer.param_groups[0]["lenient.param_ndim"] = 2
    set_grads(params)
    grads = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match=out_of_range_message("lenient.param_ndim", 2)):
        optimizer.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_only_a_subclass_without_a_pre_step_hook_scales_with_the_gradients():
    # A pre-step hook may do anything to the gradients (clip, sign, add): the safe answer is False,
    # which makes the two-call loop under GradScaler refuse it before GSAM, WSAM or LookSAM.
    class Pre(ParamTransform):
        def pre_step_transform_(self, param, group):
            param.grad.clamp_(-1, 1)

    class Post(ParamTransform):
        def post_step_transform_(self, param, group):
            param.clamp_(-1, 1)

    groups = [{"params": [], "param_ndim": -1}]
    assert Pre().scales_with_gradients(groups) is False
    assert Pre().keeps_direction_of_gradients(groups) is False
    assert Post().scales_with_gradients(groups) is True


def test_only_the_hooks_a_subclass_defines_run():
    class PreOnly(ParamTransform):
        def pre_step_transform_(self, param, group):
            param.grad.mul_(2)

    class Both(PreOnly):
        def post_step_transform_(self, param, group):
            param.clamp_(-1, 1)

    class OwnPost(PreOnly):
        def post_update(self, ctx):
            self.seen = True
            super().post_update(ctx)

    # A pre-step-only transform is no post-step transform: the optimizer copies nothing for it.
    assert PreOnly.post_update is Transform.post_update
    assert Both.post_update is ParamTransform.post_update
    assert OwnPost.post_update is not Transform.post_update
    param = nn.Parameter(torch.tensor([0.95, -3.0]))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.1, transforms=[Both()])
    param.grad = torch.tensor([-1.0, 1.0])
    optimizer.step()
    assert torch.equal(param.detach(), torch.tensor([1.0, -1.0]))
    assert torch.equal(param.grad, torch.tensor([-2.0, 2.0]))  # the hook's view wrote into the real gradient
    own = OwnPost()
    TransformingOptimizer([param], torch.optim.SGD, lr=0.1, transforms=[own]).step()
    assert own.seen


def test_hooks_see_sub_tensors_and_the_group_by_short_names():
    seen = []

    class Recorder(ParamTransform):
        def pre_step_transform_(self, param, group):
            seen.append((tuple(param.shape), tuple(param.grad.shape), group["param_ndim"], group["lr"]))

    params = make_params()
    optimizer = TransformingOptimizer(
        two_groups(params, {"recorder.param_ndim": 0}, {"recorder.param_ndim": None}), torch.optim.SGD, lr=0.1,
        transforms=[Recorder(), NormalizeGrad()],  # both own param_ndim: Recorder's key is "recorder.param_ndim"
    )
    set_grads(params)
    optimizer.step()
    assert seen == [
        ((1, 1), (1, 1), 0, 0.1),
        ((5, 1), (5, 1), 0, 0.1),
        ((1, 4, 3), (1, 4, 3), None, 0.1),
        ((1, 2, 3, 4), (1, 2, 3, 4), None, 0.1),
    ]


# -- layouts and dtypes -------------------------------------------------------------------------------
def test_channels_last_weights_are_written_back_when_no_view_exists():
    torch.manual_seed(0)
    weight = torch.randn(3, 4, 2, 2, dtype=F64)
    grad = torch.randn(3, 4, 2, 2, dtype=F64)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        param = nn.Parameter(weight.clone().to(memory_format=layout))
        transforms = [NormalizeGrad(eps=0.0, p=math.inf, param_ndim=0), ProjectParams(radius=0.5, param_ndim=0), _Hooked(lambda g: g.mul_(3.0), param_ndim=0)]
        optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.1, transforms=transforms)
        param.grad = grad.clone().to(memory_format=layout)
        optimizer.step()
        results.append((param.detach().contiguous(), param.grad.contiguous()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[1][1], 3.0 * grad.sign())


def test_complex_parameters_count_as_pairs_of_reals():
    z = torch.tensor([[3.0 + 4.0j, 1.0 - 1.0j], [0.0 + 0.0j, -2.0 + 0.0j]], dtype=torch.complex128)
    param = nn.Parameter(torch.zeros_like(z))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[NormalizeGrad(eps=0.0, param_ndim=0)])
    param.grad = z.clone()
    optimizer.step()
    torch.testing.assert_close(param.grad, torch.where(z == 0, 0, z / z.abs()), rtol=1e-15, atol=0)
    param = nn.Parameter(z.clone())
    # lr=1 with a zero gradient: an lr of 0 would make it a state-initialising step (no hooks run).
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=1.0, transforms=[ProjectParams(radius=1.0, param_ndim=-1)])
    param.grad = torch.zeros_like(z)
    optimizer.step()
    norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    torch.testing.assert_close(param.detach(), z / norms, rtol=1e-15, atol=0)


def test_project_params_initial_center_is_checkpointed_and_initialised_by_a_state_init_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.0, transforms=[ProjectParams(0.1, center="initial")])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # every lr and gradient zero, no state: what torch.distributed.checkpoint runs first
    assert all(torch.equal(optimizer.state[p]["project_params.center"], s) for p, s in zip(model.parameters(), start))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    other_model = nn.Linear(4, 3)
    other = TransformingOptimizer(other_model.parameters(), torch.optim.SGD, lr=0.0, transforms=[ProjectParams(0.1, center="initial")])
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    other.param_groups[0]["lr"] = 1.0
    for p in other_model.parameters():
        p.grad = torch.ones_like(p)
    other.step()
    # Projected around the checkpoint's centre (model's start), not other_model's own weights.
    distance = torch.linalg.vector_norm(other_model.weight.detach() - start[0], dim=1)
    assert torch.all(distance <= 0.1 + 1e-6), distance


@pytest.mark.parametrize("target", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("p", [2.0, math.inf], ids=["l2", "linf"])
def test_project_params_centre_follows_a_dtype_conversion_as_a_checkpoint_reloaded_into_a_fresh_optimizer(target, p):
    """``model.half()`` after the centre was recorded: the run went on projecting around the
    float32 centre, while a checkpoint loaded into a fresh optimizer holds it cast to the
    parameter's dtype (torch casts the state), so the resumed run left the uninterrupted one (as
    EMA, Lookahead and LAMP convert their kept weights at the next step)."""
    torch.manual_seed(0)
    x = torch.randn(8, 4)

    def build(model):
        return TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.3, transforms=[ProjectParams(0.05, p, center="initial")])

    def closure(optimizer, model):
        def evaluate():
            optimizer.zero_grad()
            loss = model(x.to(model.weight.dtype)).float().square().sum()
            loss.backward()
            return loss

        return evaluate

    model = nn.Linear(4, 3)
    optimizer = build(model)
    optimizer.step(closure(optimizer, model))
    model.to(target)
    optimizer.step(closure(optimizer, model))
    assert all(optimizer.state[q]["project_params.center"].dtype == target for q in model.parameters())
    resumed_model = copy.deepcopy(model)
    resumed = build(resumed_model)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for _ in range(3):
        optimizer.step(closure(optimizer, model))
        resumed.step(closure(resumed, resumed_model))
    for mine, theirs in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(mine, theirs)


CENTER_MISFITS = {
    # checkpoint's parameter, this optimizer's parameter, what the message says of each
    "transposed": (torch.zeros(2, 3), torch.zeros(3, 2), "of shape (2, 3) for a parameter of shape (3, 2)"),
    "other_size": (torch.zeros(2, 2), torch.zeros(3), "of shape (2, 2) for a parameter of shape (3,)"),
    "real_for_complex": (
        torch.zeros(3, dtype=F64), torch.zeros(3, dtype=torch.complex128),
        "of dtype torch.float64 for a parameter of dtype torch.complex128",
    ),
    "not_a_tensor": (torch.zeros(3), torch.zeros(3), "= [0.0, 1.0, 2.0], not a tensor, for a parameter of shape (3,)"),
}


@pytest.mark.parametrize("case", list(CENTER_MISFITS))
def test_project_params_refuses_a_checkpoint_whose_centre_does_not_fit_with_nothing_loaded(case):
    """As EMA, Lookahead and LAMP refuse theirs: a centre of another shape was loaded and used
    reshaped (the wrong centre), or failed in the middle of a later step."""
    saved, own, says = CENTER_MISFITS[case]

    def built(start):
        param = nn.Parameter(start.clone() + 0.1)
        optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=1.0, momentum=0.9, transforms=[ProjectParams(0.1, center="initial")])
        param.grad = torch.ones_like(param)
        optimizer.step()
        return param, optimizer

    _, source = built(saved)
    checkpoint = source.state_dict()
    if case == "not_a_tensor":
        checkpoint["state"][0]["project_params.center"] = [0.0, 1.0, 2.0]
    param, optimizer = built(own)
    weights, state = param.detach().clone(), copy.deepcopy(optimizer.state_dict())
    message = f"the checkpoint's ProjectParams slot 'project_params' holds 'center' {says}"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        optimizer.load_state_dict(checkpoint)
    assert torch.equal(param.detach(), weights)
    assert_state_dicts_equal(optimizer.state_dict(), state)


def float64_projection(moved, middle, radius, param_ndim):
    """The L2 projection of ``moved`` (float64) around ``middle`` per sub-tensor, on Python floats."""
    return apply_per_subtensor(moved, param_ndim, lambda v, c: ref_project_l2(v, c, radius), other=middle)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("center", ["zero", "initial"])
def test_project_params_l2_beyond_float32_squares_matches_a_float64_reference(dtype, center):
    """Finite weights whose float32 L2 norm overflows (near 1e20) were projected onto the centre;
    with a tiny radius, weights whose squares underflow (near 1e-25) were left outside the ball.
    Those sub-tensors are projected in float64 and rounded once; the others as before, bit for bit."""
    generator = torch.Generator().manual_seed(7)
    # group 0 (radius 1, rows): ordinary outside, huge, inside, huge beyond float32's squares
    big_scales = torch.tensor([[1.0], [1e20], [1e-3], [1e30]], dtype=F64)
    # group 1 (radius 1e-26): rows of tiny weights (one inside the ball), a zero row; and a whole tensor
    tiny_scales = torch.tensor([[1e-25], [1e-30], [0.0], [3e-26]], dtype=F64)
    starts = [
        (torch.randn(4, 30, generator=generator, dtype=F64) * big_scales).to(dtype),
        (torch.randn(4, 30, generator=generator, dtype=F64) * tiny_scales).to(dtype),
        torch.full((4,), 1e-25, dtype=dtype),
    ]
    grads = [
        (torch.randn(4, 30, generator=generator, dtype=F64) * big_scales).to(dtype),
        (torch.randn(4, 30, generator=generator, dtype=F64) * tiny_scales).to(dtype),
        torch.full((4,), -2e-25, dtype=dtype),
    ]
    params = [nn.Parameter(start.clone()) for start in starts]
    groups = [{"params": params[:1]}, {"params": params[1:2], "radius": 1e-26}, {"params": params[2:], "radius": 1e-26, "param_ndim": None}]
    optimizer = TransformingOptimizer(groups, torch.optim.SGD, lr=1.0, transforms=[ProjectParams(1.0, center=center)])
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    optimizer.step()
    for param, start, grad, group in zip(params, starts, grads, optimizer.param_groups):
        moved = start.clone().add_(grad, alpha=-1.0)  # SGD's step alone
        middle = start.double() if center == "initial" else torch.zeros(moved.shape, dtype=F64)
        expected = float64_projection(moved.double(), middle, group["radius"], group["param_ndim"])
        rows = slice(1, None) if param is params[0] else slice(None)  # the ordinary row: below
        torch.testing.assert_close(param[rows].detach().double(), expected[rows], rtol=torch.finfo(dtype).eps, atol=0)
        distance = torch.linalg.vector_norm(param[rows].detach().double() - middle[rows], dim=-1)
        assert torch.all(distance <= group["radius"] * (1 + 2 * torch.finfo(dtype).eps)), distance
    # the ordinary row: float32 arithmetic, exactly as before
    moved = starts[0].clone().add_(grads[0], alpha=-1.0)[:1].float()
    middle = starts[0][:1].float() if center == "initial" else torch.zeros(1, 30)
    offset = moved - middle
    ordinary = middle + offset * (1.0 / torch.linalg.vector_norm(offset, dim=1, keepdim=True))
    assert torch.equal(params[0][:1].detach(), ordinary.to(dtype))
    assert torch.equal(params[0][2], (starts[0][2] - grads[0][2]))  # inside the ball: as SGD left it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("center", ["zero", "initial"])
def test_project_params_l2_with_a_radius_far_below_the_norm_matches_a_float64_reference(dtype, center):
    """A row whose float32 factor r / ||w - c|| is below float32's smallest normal number (radius
    1e-35, norm near 1e11) was scaled by a subnormal factor: it landed at 1.4 r. Such rows are
    projected in float64 and rounded once, onto the sphere."""
    generator = torch.Generator().manual_seed(3)
    # row 0 starts at 0 (so its centre is 0 either way) and moves by ~1e10; row 1 is ordinary
    start = (torch.randn(2, 30, generator=generator, dtype=F64) * torch.tensor([[0.0], [1e-3]], dtype=F64)).to(dtype)
    grad = (torch.randn(2, 30, generator=generator, dtype=F64) * torch.tensor([[1e10], [1e-3]], dtype=F64)).to(dtype)
    param = nn.Parameter(start.clone())
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=1.0, transforms=[ProjectParams(1e-35, center=center)])
    param.grad = grad.clone()
    optimizer.step()
    moved = start.clone().add_(grad, alpha=-1.0).double()  # SGD's step alone
    middle = start.double() if center == "initial" else torch.zeros(moved.shape, dtype=F64)
    expected = float64_projection(moved, middle, 1e-35, -1)
    torch.testing.assert_close(param.detach().double(), expected, rtol=torch.finfo(dtype).eps, atol=0)


# -- 16-bit parameters: norms and projections in float32, bounds beyond the dtype's range ---------------
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("center", ["zero", "initial"])
@pytest.mark.parametrize("param_ndim", [-1, None])
def test_project_params_l2_on_float16_takes_the_norm_in_float32(foreach, center, param_ndim):
    """Rows of finite float16 weights whose norm exceeds 65504 are projected, not zeroed."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(3, 40, generator=generator).to(torch.float16)
    grad = (-16000.0 - 100.0 * torch.rand(3, 40, generator=generator)).to(torch.float16)
    param = nn.Parameter(start.clone())
    optimizer = TransformingOptimizer(
        [param], torch.optim.SGD, lr=1.0, transform_foreach=foreach,
        transforms=[ProjectParams(radius=2.0, center=center, param_ndim=param_ndim)],
    )
    param.grad = grad.clone()
    optimizer.step()
    moved = start.clone().add_(grad, alpha=-1.0)  # SGD's step alone
    # The reference: computed in float32, rounded once.
    middle = start.float() if center == "initial" else torch.zeros(3, 40)
    offset = moved.float() - middle
    dims = (1,) if param_ndim == -1 else (0, 1)
    norm = torch.linalg.vector_norm(offset, dim=dims, keepdim=True)
    assert float(norm.min()) > 65504  # beyond float16's range
    expected = (middle + offset * (2.0 / norm)).to(torch.float16)
    assert torch.equal(param.detach(), expected)
    # and, in float64: every sub-tensor now lies on the sphere of radius 2, to float16's precision
    sizes = torch.linalg.vector_norm(param.detach().double() - middle.double(), dim=dims)
    torch.testing.assert_close(sizes, torch.full_like(sizes, 2.0), rtol=2e-3, atol=0)


BEYOND_FLOAT16 = [
    ("clamp-both", lambda: ClampParams(-1e5, 1e5)),
    ("clamp-above", lambda: ClampParams(0.0, 1e5)),
    ("clamp-below", lambda: ClampParams(-7e4, 0.5)),
    ("clamp-float32-range", lambda: ClampParams(-1e300, 1e300)),
    ("project-inf", lambda: ProjectParams(1e5, p=math.inf)),
    ("project-inf-initial", lambda: ProjectParams(7e4, p=math.inf, center="initial")),
]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("name,make", BEYOND_FLOAT16, ids=[name for name, _ in BEYOND_FLOAT16])
def test_bounds_beyond_a_parameters_dtype_clamp_exactly(foreach, name, make):
    """A bound beyond float16's (or float32's) range never changes a finite value on that side:
    no "value cannot be converted to type c10::Half without overflow" on a float32 + float16 model."""
    generator = torch.Generator().manual_seed(0)
    starts = [(torch.randn(50, generator=generator) * 20000.0).to(dtype) for dtype in (torch.float32, torch.float16)]
    grads = [torch.randn(50, generator=generator).to(start.dtype) for start in starts]
    params = [nn.Parameter(start.clone()) for start in starts]
    transform = make()
    optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=0.5, transforms=[transform], transform_foreach=foreach)
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    optimizer.step()
    for param, start, grad in zip(params, starts, grads):
        moved = start.clone().add_(grad, alpha=-0.5).double()  # SGD's step alone
        if isinstance(transform, ClampParams):
            low, high = transform.param_min, transform.param_max
        else:
            middle = start.double() if transform.center == "initial" else 0.0
            low, high = middle - transform.radius, middle + transform.radius
        expected = torch.minimum(torch.maximum(moved, torch.as_tensor(low, dtype=F64)), torch.as_tensor(high, dtype=F64))
        assert torch.equal(param.detach(), expected.to(param.dtype))


@pytest.mark.parametrize("p", [2.0, math.inf])
@pytest.mark.parametrize("center", ["zero", "initial"])
@pytest.mark.parametrize("kind", ["fraction", "numpy-float32"])
def test_project_params_takes_every_real_radius_its_group_check_accepts(kind, center, p):
    """A Fraction group radius passed validate_group and then every step raised torch's
    TypeError; a NumPy float32 one warned of an overflow in a cast (float64 weights, p=inf).
    They project as the float of the same value, without a warning."""
    radius = Fraction(1, 2) if kind == "fraction" else np.float32(0.5)

    def run(group_radius):
        torch.manual_seed(0)
        weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        optimizer = TransformingOptimizer(
            [{"params": [weight], "radius": group_radius}], torch.optim.SGD, lr=0.5,
            transforms=[ProjectParams(p=p, center=center)],
        )  # fmt: skip
        for _ in range(2):
            weight.grad = torch.ones_like(weight)
            optimizer.step()
        return weight.detach().clone()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        projected = run(radius)
    assert torch.equal(projected, run(float(radius)))


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("center", ["zero", "initial"])
@pytest.mark.parametrize("p, param_ndim", [(2.0, -1), (2.0, None), (math.inf, -1)], ids=["rows", "whole", "inf"])
def test_project_params_projects_a_parameter_with_a_sparse_gradient_as_with_a_dense_one(p, param_ndim, center, foreach):
    """ProjectParams reads only whether a parameter has a gradient, not its values (as ClampParams,
    which accepted sparse gradients); it refused them ("param_ndim transforms do not support
    sparse gradients"). The same run with a dense embedding is the reference, bit for bit. (No
    token repeats within a batch and the inner SGD has no momentum: torch's sparse SGD adds
    uncoalesced entries one by one, which rounds differently from the dense sum, without samgria.)"""

    def run(sparse):
        torch.manual_seed(0)
        embedding, linear = nn.Embedding(6, 3, sparse=sparse), nn.Linear(3, 1)
        with torch.no_grad():
            embedding.weight.mul_(0.5)  # inside the ball at first: the steps take rows out of it
        optimizer = TransformingOptimizer(
            [{"params": embedding.parameters()}, {"params": linear.parameters()}], torch.optim.SGD, lr=0.5,
            transforms=[ProjectParams(1.0, p=p, center=center, param_ndim=param_ndim)],
            transform_foreach=foreach,
        )
        weights = []
        for tokens in ([0, 2, 3], [1, 2, 5], [0, 4, 5]):
            optimizer.zero_grad()
            (linear(embedding(torch.tensor(tokens))).sum() * 4).backward()
            assert embedding.weight.grad.is_sparse == sparse
            optimizer.step()
            weights.append(embedding.weight.detach().clone())
        centers = [optimizer.state[q].get("project_params.center") for q in (embedding.weight, linear.weight)]
        return weights, linear.weight.detach().clone(), centers

    weights, linear_weight, centers = run(sparse=True)
    expected, expected_linear_weight, expected_centers = run(sparse=False)
    for got, want in zip(weights, expected):
        assert torch.equal(got, want)
    assert torch.equal(linear_weight, expected_linear_weight)
    for got, want in zip(centers, expected_centers):
        assert (got is None and want is None) if center == "zero" else torch.equal(got, want)
    # The projection acted: some row (or element) lies on the ball's boundary, none outside it.
    offsets = weights[-1] - (centers[0] if center == "initial" else 0.0)
    sizes = offsets.abs() if p == math.inf else offsets.norm() if param_ndim is None else offsets.norm(dim=1)
    assert sizes.max() <= 1.0 + 1e-6 and (sizes >= 1.0 - 1e-6).any(), sizes


def test_a_param_transform_refuses_a_sparse_gradient_naming_itself_and_the_parameter():
    """Its hooks see ``param.grad``: the refusal said "param_ndim transforms do not support
    sparse gradients"; SAM's message shape now, before any hook runs."""
    calls = []
    for transform in (_PreHook(lambda g: calls.append(g)), _PostHook(lambda w: calls.append(w))):
        torch.manual_seed(0)
        embedding, linear = nn.Embedding(6, 3, sparse=True), nn.Linear(3, 1)
        optimizer = TransformingOptimizer(
            [{"params": linear.parameters()}, {"params": embedding.parameters()}], torch.optim.SGD, lr=0.1,
            momentum=0.9, transforms=[transform],
        )
        linear(embedding(torch.tensor([0, 2, 2]))).sum().backward()
        weights = [q.detach().clone() for q in (*linear.parameters(), embedding.weight)]
        message = (
            f"{type(transform).__name__} does not support sparse gradients (a parameter of shape (6, 3) has one): "
            "use a dense embedding, or give that parameter to another optimizer"
        )
        with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
            optimizer.step()
        assert not calls
        for q, before in zip((*linear.parameters(), embedding.weight), weights):
            assert torch.equal(q.detach(), before)
        assert not any(optimizer.state.values())
