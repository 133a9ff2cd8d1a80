"""GSAM, WSAM, FriendlySAM, LookSAM and ESAM against hand-written float64 references.

Each reference is a per-tensor transcription of the paper's equations (dicts of tensors by
parameter name, gradients from ``torch.func.functional_call``), independent of samgria; the inner
optimizer is torch's own, stepped with the reference's gradients. Where pytorch_optimizer
implements the same algorithm, the trajectories are also compared with it (skipped when it is not
installed). The contracts every transform keeps (checkpoints, the two-call loop, bad inputs, ...)
are tested for these transforms by ``test_transforms_generic.py`` through ``transform_infos.py``.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.func import functional_call
from transform_infos import assert_bitwise_equal, make_closure, make_data, make_model, params_of, step_in_loop, step_installing

from samgria import ASAM, ESAM, GSAM, SAM, WSAM, ClipGradNorm, FriendlySAM, GradSign, LookSAM, NormalizeGrad, ScaleGrad, TransformingOptimizer
from samgria import Transform as GradientTransformBase

SGD = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
ADAMW = (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 1e-2})
FIRST_LAYER = {"0.weight", "0.bias"}


# -- the independent reference -------------------------------------------------------------------------
def gradients(model, weights, x, y):
    """Gradient of the MSE loss at ``weights`` (name -> tensor); ``None`` where torch gives none."""
    trainable = {n: w.detach().clone().requires_grad_(p.requires_grad) for (n, p), w in zip(model.named_parameters(), weights.values())}
    loss = nn.functional.mse_loss(functional_call(model, trainable, (x,)), y)
    names = [n for n, t in trainable.items() if t.requires_grad]
    out = dict.fromkeys(trainable)
    out.update(zip(names, torch.autograd.grad(loss, [trainable[n] for n in names], allow_unused=True)))
    return out


def dot(a, b):
    return sum(float((a[n] * b[n]).sum()) for n in a if a[n] is not None and b.get(n) is not None)


def norm(a):
    return math.sqrt(dot(a, a))


def sam_point(weights, g, rho_of, scale=None):
    """w + e with e = rho g / |g| (``scale``: a per-name factor on e, e.g. ESAM's mask / beta)."""
    size = norm(g)
    moved = {}
    for n, w in weights.items():
        if g[n] is None:
            moved[n] = w
            continue
        e = rho_of(n) * g[n] / size
        moved[n] = w + (e if scale is None else e * scale[n])
    return moved


def run_reference(algorithm, steps, inner=SGD, groups=None):
    """Steps torch's ``inner`` with the gradients ``algorithm(t, weights, grad_fn)`` returns.

    ``algorithm`` may return ``(grads, after)``: ``after(weights, lr_of)`` runs after the inner step.
    ``groups``: ``model -> param groups`` for the inner optimizer (per-group lr, ...).
    """
    x, y = make_data()
    model = make_model()
    named = dict(model.named_parameters())
    cls, kwargs = inner
    optimizer = cls(groups(model) if groups else model.parameters(), **kwargs)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for t in range(steps):
        weights = {n: p.detach().clone() for n, p in named.items()}
        result = algorithm(t, weights, lambda w: gradients(model, w, x, y))
        grads, after = result if isinstance(result, tuple) else (result, None)
        for n, p in named.items():
            p.grad = grads.get(n)
        optimizer.step()
        if after is not None:
            with torch.no_grad():
                after(named, lambda n: lr_of[id(named[n])])
    return params_of(model)


def run_samgria(transform, steps, inner=SGD, groups=None):
    x, y = make_data()
    model = make_model()
    cls, kwargs = inner
    optimizer = TransformingOptimizer(groups(model) if groups else model.parameters(), cls, transforms=[transform], **kwargs)
    closure = make_closure(model, optimizer, x, y)
    for _ in range(steps):
        optimizer.step(closure)
    return params_of(model)


def two_groups(first=None, rest=None):
    """The first layer with ``first``'s keys, every other parameter with ``rest``'s."""

    def groups(model):
        named = dict(model.named_parameters())
        return [
            {"params": [named[n] for n in named if n in FIRST_LAYER], **(first or {})},
            {"params": [named[n] for n in named if n not in FIRST_LAYER], **(rest or {})},
        ]

    return groups


def per_group(first, rest):
    return lambda name: first if name in FIRST_LAYER else rest


def assert_close(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# -- references, one per paper -------------------------------------------------------------------------
def gsam_reference(rho_of, alpha_of):
    def step(t, w, grad):
        g = grad(w)
        g_p = grad(sam_point(w, g, rho_of))
        c = dot(g, g_p) / dot(g_p, g_p)
        # d = g_p - alpha g_perp,  g_perp = g - <g, g_p>/|g_p|^2 g_p
        return {n: None if g_p[n] is None else g_p[n] - alpha_of(n) * (g[n] - c * g_p[n]) for n in w}

    return step


def wsam_reference(rho_of, gamma_of, decouple):
    def step(t, w, grad):
        g = grad(w)
        g_p = grad(sam_point(w, g, rho_of))
        a = {n: gamma_of(n) / (1 - gamma_of(n)) for n in w}
        if not decouple:  # (1 - 2 gamma)/(1 - gamma) g + gamma/(1 - gamma) g_p
            return {n: None if g[n] is None else (1 - 2 * gamma_of(n)) / (1 - gamma_of(n)) * g[n] + a[n] * g_p[n] for n in w}

        def after(params, lr_of):  # w <- w - lr gamma/(1 - gamma) (g_p - g), after the inner step
            for n, p in params.items():
                if g[n] is not None:
                    p.sub_(lr_of(n) * a[n] * (g_p[n] - g[n]))

        return g, after

    return step


def friendly_sam_reference(rho_of, sigma_of, lmbda_of):
    m = {}

    def step(t, w, grad):
        g = grad(w)
        d = {}
        for n, gn in g.items():
            if gn is None:
                d[n] = None
            elif n not in m:  # first step: m = g, d = g
                d[n], m[n] = gn, gn.clone()
            else:  # d = g - sigma m_{t-1};  m_t = lmbda m_{t-1} + (1 - lmbda) g
                d[n] = gn - sigma_of(n) * m[n]
                m[n] = lmbda_of(n) * m[n] + (1 - lmbda_of(n)) * gn
        return grad(sam_point(w, d, rho_of))

    return step


def look_sam_reference(rho_of, alpha_of, k):
    g_v = {}

    def step(t, w, grad):
        g = grad(w)
        if t % k == 0:  # SAM step; g_v = g_s - <g, g_s>/|g|^2 g
            g_s = grad(sam_point(w, g, rho_of))
            c = dot(g, g_s) / dot(g, g)
            g_v.clear()
            g_v.update({n: g_s[n] - c * g[n] for n in g if g_s[n] is not None})
            return g_s
        scale = norm(g) / norm(g_v)  # g_s = g + alpha |g|/|g_v| g_v
        return {n: None if g[n] is None else g[n] + alpha_of(n) * scale * g_v[n] for n in g}

    return step


def esam_reference(rho_of, beta_of, seed):
    generator = torch.Generator().manual_seed(seed)

    def step(t, w, grad):
        g = grad(w)
        # m ~ Bernoulli(beta) per element, drawn tensor by tensor in parameter order; e = rho/beta m g/|g|
        scale = {
            n: torch.empty_like(g[n]).bernoulli_(beta_of(n), generator=generator) / beta_of(n) if beta_of(n) < 1 else 1.0
            for n in w
            if g[n] is not None and rho_of(n) > 0
        }
        return grad(sam_point(w, g, rho_of, scale={n: scale.get(n, 0.0) for n in w}))

    return step


# -- samgria equals the references ------------------------------------------------------------------------
@pytest.mark.parametrize("inner", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_gsam_matches_reference(inner):
    expected = run_reference(gsam_reference(lambda n: 0.05, lambda n: 0.4), 5, inner)
    assert_close(run_samgria(GSAM(rho=0.05, alpha=0.4), 5, inner), expected)


def test_gsam_per_group_rho_and_alpha():
    expected = run_reference(gsam_reference(per_group(0.2, 0.03), per_group(0.0, 0.7)), 5)
    got = run_samgria(GSAM(rho=0.03, alpha=0.7), 5, groups=two_groups({"rho": 0.2, "alpha": 0.0}))
    assert_close(got, expected)


@pytest.mark.parametrize("decouple", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize("inner", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_wsam_matches_reference(inner, decouple):
    expected = run_reference(wsam_reference(lambda n: 0.05, lambda n: 0.8, decouple), 5, inner)
    assert_close(run_samgria(WSAM(rho=0.05, gamma=0.8, decouple=decouple), 5, inner), expected)


def test_wsam_decoupled_per_group_gamma_and_lr():
    groups = two_groups({"gamma": 0.3, "lr": 0.05}, {"gamma": 0.9})
    expected = run_reference(wsam_reference(lambda n: 0.05, per_group(0.3, 0.9), True), 5, groups=two_groups({"lr": 0.05}))
    assert_close(run_samgria(WSAM(rho=0.05, gamma=0.9), 5, groups=groups), expected)


def test_wsam_forms_agree_for_plain_sgd():
    # Without momentum the decoupled step is the gradient of the WSAM loss.
    plain = (torch.optim.SGD, {"lr": 0.1})
    assert_close(run_samgria(WSAM(0.05, 0.8, decouple=True), 4, plain), run_samgria(WSAM(0.05, 0.8, decouple=False), 4, plain))


def test_wsam_coupled_per_group_gamma():
    # Each group's a = gamma / (1 - gamma) weighs both of its terms: a g_p + (1 - a) g.
    expected = run_reference(wsam_reference(lambda n: 0.05, per_group(0.3, 0.9), False), 5)
    assert_close(run_samgria(WSAM(rho=0.05, gamma=0.9, decouple=False), 5, groups=two_groups({"gamma": 0.3})), expected)


@pytest.mark.parametrize("decouple", [False, True])
def test_only_decoupled_wsam_copies_weights_and_state_before_the_inner_step(monkeypatch, decouple):
    """A post-step transform makes every atomic step copy the weights and the inner optimizer's
    state before the inner step (it may fail after that step wrote). Coupled WSAM's update is the
    inner optimizer's alone: its step takes no such copy, as SAM's does not (the generic atomic
    tests check that a failing step still puts everything back, WSAM-coupled among them)."""
    import samgria.optim

    copies = []

    class CountedSnapshot(samgria.optim.StepSnapshot):
        def __init__(self, *args, **kwargs):
            copies.append(kwargs.get("copy_state", True))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(samgria.optim, "StepSnapshot", CountedSnapshot)
    model, (x, y) = make_model(), make_data()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[WSAM(0.05, 0.8, decouple=decouple)])
    closure = make_closure(model, optimizer, x, y)
    optimizer.step(closure)
    assert any(copies) == decouple
    optimizer.step(closure)
    assert any(copies) == decouple


@pytest.mark.parametrize("loop", ["closure", "two_call"])
@pytest.mark.parametrize("name", ["GSAM", "WSAM-coupled", "WSAM-decoupled"])
def test_a_parameter_without_a_gradient_at_the_perturbed_weights_counts_it_as_zero(name, loop):
    # b's loss term is switched off at w + e (a route not taken there): g_p = 0 for b, so GSAM's
    # d = g_p - alpha (g - c g_p) and WSAM's forms give b a step from g (none at all before).
    rho, alpha, gamma, lr = 0.5, 0.4, 0.8, 0.1
    a = gamma / (1 - gamma)
    make = {"GSAM": lambda: GSAM(rho, alpha), "WSAM-coupled": lambda: WSAM(rho, gamma, decouple=False), "WSAM-decoupled": lambda: WSAM(rho, gamma)}

    def loss_of(w, b):  # (w - 1)^2 + b^2 where b < 1.05 (b has no gradient elsewhere)
        return (w - 1) ** 2 + (b**2 if b.item() < 1.05 else 0 * w)

    def grads(weights):  # name -> gradient or None
        trainable = [t.detach().clone().requires_grad_() for t in weights]
        return list(torch.autograd.grad(loss_of(*trainable), trainable, allow_unused=True))

    w, b = (nn.Parameter(torch.tensor([value], dtype=torch.float64)) for value in (0.01, 1.0))
    optimizer = TransformingOptimizer([w, b], torch.optim.SGD, lr=lr, momentum=0.9, transforms=[make[name]()])

    def closure():
        optimizer.zero_grad()
        loss = loss_of(w, b)
        loss.backward()
        return loss

    reference = [w.detach().clone(), b.detach().clone()]
    plain = torch.optim.SGD(reference, lr=lr, momentum=0.9)
    for _ in range(2):  # b is used at w in the first step, not in the second
        step_in_loop(optimizer, closure, loop)
        g = grads(reference)
        size = math.sqrt(sum(float(v.square().sum()) for v in g if v is not None))
        g_p = grads([t if v is None else t + rho * v / size for t, v in zip(reference, g)])
        present = [v is not None or u is not None for v, u in zip(g, g_p)]
        g = [torch.zeros(1, dtype=torch.float64) if v is None else v for v in g]
        g_p = [torch.zeros(1, dtype=torch.float64) if v is None else v for v in g_p]
        c = sum(float(v @ u) for v, u in zip(g, g_p)) / sum(float(u @ u) for u in g_p)
        if name == "GSAM":
            final = [u - alpha * (v - c * u) for v, u in zip(g, g_p)]
        elif name == "WSAM-coupled":
            final = [a * u + (1 - a) * v for v, u in zip(g, g_p)]
        else:
            final = g
        for tensor, grad, kept in zip(reference, final, present):
            tensor.grad = grad if kept else None
        plain.step()
        if name == "WSAM-decoupled":
            with torch.no_grad():
                for tensor, v, u, kept in zip(reference, g, g_p, present):
                    if kept:
                        tensor.sub_(lr * a * (u - v))
        torch.testing.assert_close([w.detach(), b.detach()], reference, rtol=1e-12, atol=1e-14)
    assert b.item() != 1.0



@pytest.mark.parametrize("loop", ["closure", "two_call"])
def test_look_sam_direction_counts_a_gradient_missing_at_the_perturbed_weights_as_zero(loop):
    # b's loss term is off at w + e: g_s = 0 for b, so g_v = g_s - <g, g_s>/|g|^2 g has the
    # component -c g_b there (it was left out), which the step in between adds to b's gradient.
    rho, alpha, lr = 0.5, 0.7, 0.1
    w, b = (nn.Parameter(torch.tensor([value], dtype=torch.float64)) for value in (0.01, 1.0))
    optimizer = TransformingOptimizer([w, b], torch.optim.SGD, lr=lr, transforms=[LookSAM(rho, alpha, k=2)])

    def closure():
        optimizer.zero_grad()
        loss = (w - 1) ** 2 + (b**2 if b.item() < 1.05 else 0 * w)
        loss.backward()
        return loss

    step_in_loop(optimizer, closure, loop)  # SAM step: b is not stepped (no g_s)
    g = torch.tensor([2 * (0.01 - 1), 2 * 1.0], dtype=torch.float64)
    e = rho * g / g.norm()
    g_s = torch.tensor([2 * (0.01 + e[0].item() - 1), 0.0], dtype=torch.float64)
    g_v = g_s - (g @ g_s) / (g @ g) * g
    w_1 = 0.01 - lr * g_s[0].item()
    torch.testing.assert_close([w.detach(), b.detach()], [torch.tensor([w_1], dtype=torch.float64), torch.ones(1, dtype=torch.float64)])
    step_in_loop(optimizer, closure, loop)  # in between: g + alpha |g| g_v / |g_v|
    g = torch.tensor([2 * (w_1 - 1), 2 * 1.0], dtype=torch.float64)
    expected = torch.tensor([w_1, 1.0], dtype=torch.float64) - lr * (g + alpha * g.norm() * g_v / g_v.norm())
    torch.testing.assert_close(torch.cat([w.detach(), b.detach()]), expected, rtol=1e-12, atol=1e-14)

@pytest.mark.parametrize("inner", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_friendly_sam_matches_reference(inner):
    expected = run_reference(friendly_sam_reference(lambda n: 0.05, lambda n: 1.0, lambda n: 0.9), 6, inner)
    assert_close(run_samgria(FriendlySAM(rho=0.05, sigma=1.0, lmbda=0.9), 6, inner), expected)


def test_friendly_sam_updates_its_average_while_nothing_is_perturbed():
    # rho = 0 in every group for two steps: nothing moves, but the average takes in their
    # gradients, so the third step (rho = 0.05) perturbs along g - sigma m with m = 0.9 g_0 + 0.1 g_1.
    rho = {"now": 0.0}
    reference_step = friendly_sam_reference(lambda n: rho["now"], lambda n: 1.0, lambda n: 0.9)

    def reference(t, w, grad):
        rho["now"] = 0.0 if t < 2 else 0.05
        return reference_step(t, w, grad)

    expected = run_reference(reference, 4)
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), SGD[0], transforms=[FriendlySAM(rho=0.0)], **SGD[1])
    closure = make_closure(model, optimizer, x, y)
    for t in range(4):
        for group in optimizer.param_groups:
            group["rho"] = 0.0 if t < 2 else 0.05
        optimizer.step(closure)
    assert_close(params_of(model), expected)


def test_friendly_sam_per_group_hyperparameters_and_a_rho_zero_group():
    reference = friendly_sam_reference(per_group(0.0, 0.1), per_group(0.5, 1.0), per_group(0.6, 0.9))
    expected = run_reference(reference, 6)
    got = run_samgria(FriendlySAM(rho=0.1), 6, groups=two_groups({"rho": 0.0, "sigma": 0.5, "lmbda": 0.6}))
    assert_close(got, expected)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("inner", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_look_sam_matches_reference(inner, k):
    expected = run_reference(look_sam_reference(lambda n: 0.05, lambda n: 0.7, k), 7, inner)
    assert_close(run_samgria(LookSAM(rho=0.05, alpha=0.7, k=k), 7, inner), expected)


def test_look_sam_per_group_alpha_and_rho():
    expected = run_reference(look_sam_reference(per_group(0.1, 0.05), per_group(0.0, 1.5), 3), 7)
    got = run_samgria(LookSAM(rho=0.05, alpha=1.5, k=3), 7, groups=two_groups({"rho": 0.1, "alpha": 0.0}))
    assert_close(got, expected)


@pytest.mark.parametrize("loop", ["closure", "two_call"])
@pytest.mark.parametrize("zeroed", ["rho", "gradient"])
def test_look_sam_step_that_perturbs_nothing_stores_a_zero_direction(zeroed, loop):
    # A SAM step that moves nothing has g_s = g, so g_v = g_s - <g, g_s>/|g|^2 g = 0: the steps
    # up to the next SAM step are the inner optimizer's, not g + alpha |g| times the direction
    # an earlier SAM step stored (rho scheduled down to 0; a zero gradient).
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[LookSAM(rho=0.05, alpha=0.7, k=2)])
    closure = make_closure(model, optimizer, x, y)
    for _ in range(4):  # SAM steps 0 and 2 store directions; 1 and 3 use them
        step_in_loop(optimizer, closure, loop)
    if zeroed == "rho":
        for group in optimizer.param_groups:
            group["rho"] = 0.0

        def at_sam_step():
            return closure()
    else:

        def at_sam_step():  # step 4: a zero gradient (a zero loss), no move
            optimizer.zero_grad()
            loss = 0.0 * nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

    step_in_loop(optimizer, at_sam_step, loop)
    reference = copy.deepcopy(model)
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    step_in_loop(optimizer, closure, loop)  # step 5, between SAM steps
    plain.zero_grad()
    nn.functional.mse_loss(reference(x), y).backward()
    plain.step()
    assert_bitwise_equal(params_of(model), params_of(reference))
    for param in model.parameters():
        if "look_sam.g_v" in optimizer.state[param]:
            assert not optimizer.state[param]["look_sam.g_v"].any()


def test_look_sam_forgets_the_direction_of_a_parameter_without_a_gradient_at_the_last_sam_step():
    # b has a gradient at SAM step 0, none at SAM step 2 (its loss term is off), one again at
    # step 3 (in between): the direction of step 2 holds nothing for b, so b steps with g_b alone.
    alpha, lr = 0.7, 0.1
    w = nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([0.5, 1.5], dtype=torch.float64))
    optimizer = TransformingOptimizer([w, b], torch.optim.SGD, lr=lr, transforms=[LookSAM(0.5, alpha, k=2)])
    uses_b = {"now": True}

    def closure():
        optimizer.zero_grad()
        loss = ((w - 1) ** 2).sum() * (w[0] + 2) + ((b * w).sum() ** 2 if uses_b["now"] else 0.0)
        loss.backward()
        return loss

    for t in range(3):
        uses_b["now"] = t != 2
        optimizer.step(closure)
    assert "look_sam.g_v" not in optimizer.state[b]
    uses_b["now"] = True
    b_before = b.detach().clone()
    closure()
    g_b = b.grad.clone()
    optimizer.step(closure)  # step 3, in between
    torch.testing.assert_close(b.detach(), b_before - lr * g_b, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("inner", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_esam_matches_reference(inner):
    expected = run_reference(esam_reference(lambda n: 0.05, lambda n: 0.5, seed=3), 5, inner)
    assert_close(run_samgria(ESAM(rho=0.05, beta=0.5, seed=3), 5, inner), expected)


def test_esam_per_group_beta():
    expected = run_reference(esam_reference(per_group(0.1, 0.05), per_group(1.0, 0.3), seed=0), 5)
    got = run_samgria(ESAM(rho=0.05, beta=0.3, seed=0), 5, groups=two_groups({"rho": 0.1, "beta": 1.0}))
    assert_close(got, expected)


# -- limits: each reduces to SAM --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "transform",
    [GSAM(0.05, alpha=0.0), WSAM(0.05, gamma=0.5, decouple=False), FriendlySAM(0.05, sigma=0.0), LookSAM(0.05, k=1), ESAM(0.05, beta=1.0)],
    ids=["GSAM-alpha0", "WSAM-gamma-half", "FriendlySAM-sigma0", "LookSAM-k1", "ESAM-beta1"],
)
def test_each_reduces_to_sam_bitwise(transform):
    assert_bitwise_equal(run_samgria(transform, 4), run_samgria(SAM(0.05), 4))


# -- LookSAM's cost --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 4, 5])
def test_look_sam_evaluates_the_closure_one_plus_one_over_k_times_per_step(k):
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[LookSAM(k=k)])
    closure = make_closure(model, optimizer, x, y)
    calls = {"n": 0}

    def counting():
        calls["n"] += 1
        return closure()

    for _ in range(20):
        optimizer.step(counting)
    assert calls["n"] == 20 + math.ceil(20 / k)  # one pass per step, a second on every k-th


# -- pytorch_optimizer ------------------------------------------------------------------------------------
@pytest.fixture
def pytorch_optimizer_float64_norm(monkeypatch):
    """pytorch_optimizer, with its SAM family's global gradient norm taken in float64.

    pytorch_optimizer (4.1) casts the squared norms to float32 before summing them, which moves its
    trajectories by about 1e-9 from a float64 computation; with the norm in float64 the updates
    agree to rounding.
    """
    pytest.importorskip("pytorch_optimizer")
    import pytorch_optimizer.optimizer.sam as sam_module

    def norm64(param_groups, device=None, *, weight_adaptive=False):
        grads = [p.grad for group in param_groups for p in group["params"] if p.grad is not None]
        return torch.stack([grad.double().norm() for grad in grads]).square().sum().reshape(1)

    monkeypatch.setattr(sam_module, "get_global_gradient_norm", norm64)
    import pytorch_optimizer

    return pytorch_optimizer


def _run_theirs(build, steps, first_pass):
    x, y = make_data()
    model = make_model()
    optimizer = build(model)
    closure = make_closure(model, optimizer, x, y)
    for _ in range(steps):
        if first_pass:  # their SAMs expect the first gradients before step()
            closure()
        optimizer.step(closure)
    return params_of(model)


class _ConstantRho:
    def __init__(self, rho):
        self.rho = rho

    def step(self):
        return self.rho


def test_gsam_equals_pytorch_optimizer(pytorch_optimizer_float64_norm):
    po = pytorch_optimizer_float64_norm
    x, y = make_data()
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    theirs = po.GSAM(model.parameters(), base, model, _ConstantRho(0.05), alpha=0.4, perturb_eps=0.0)

    def closure():  # their GSAM wants (outputs, loss) and calls it under no_grad
        base.zero_grad()
        with torch.enable_grad():
            outputs = model(x)
            loss = nn.functional.mse_loss(outputs, y)
            loss.backward()
        return outputs, loss.detach()

    for _ in range(5):
        theirs.step(closure)
    assert_close(run_samgria(GSAM(0.05, alpha=0.4), 5), params_of(model))


@pytest.mark.parametrize("decouple", [False, True], ids=["coupled", "decoupled"])
def test_wsam_equals_pytorch_optimizer(pytorch_optimizer_float64_norm, decouple):
    po = pytorch_optimizer_float64_norm

    def build(model):
        return po.WSAM(model, model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.8, decouple=decouple, eps=0.0, lr=0.1, momentum=0.9)

    assert_close(run_samgria(WSAM(0.05, gamma=0.8, decouple=decouple), 5), _run_theirs(build, 5, first_pass=False))


@pytest.mark.parametrize("sigma,lmbda", [(1.0, 0.9), (0.5, 0.6)])
def test_friendly_sam_equals_pytorch_optimizer(pytorch_optimizer_float64_norm, sigma, lmbda):
    po = pytorch_optimizer_float64_norm

    def build(model):
        return po.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, sigma=sigma, lmbda=lmbda, perturb_eps=0.0, lr=0.1, momentum=0.9)

    assert_close(run_samgria(FriendlySAM(0.05, sigma=sigma, lmbda=lmbda), 6), _run_theirs(build, 6, first_pass=True))


def test_pytorch_optimizers_look_sam_evaluates_twice_per_step_and_decomposes_per_tensor(pytorch_optimizer_float64_norm):
    # Documented difference: their LookSAM skips the perturbation between SAM steps but its
    # step(closure) still runs the closure, and it decomposes each tensor on its own.
    po = pytorch_optimizer_float64_norm
    calls = {"n": 0}

    def build(model):
        optimizer = po.LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=3, alpha=0.7, perturb_eps=0.0, lr=0.1, momentum=0.9)
        step = optimizer.step

        def counting_step(closure):
            def counted():
                calls["n"] += 1
                return closure()

            return step(counted)

        optimizer.step = counting_step
        return optimizer

    theirs = _run_theirs(build, 6, first_pass=True)
    assert calls["n"] == 6  # a second evaluation on every step (ours: 2 in 6 steps with k=3)
    ours = run_samgria(LookSAM(0.05, alpha=0.7, k=3), 6)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, theirs)) > 1e-6


@pytest.mark.parametrize("cls", [GSAM, WSAM, FriendlySAM, LookSAM])
def test_pytorch_optimizers_constructor_called_on_the_transform_points_to_transforming_optimizer(cls):
    """``LookSAM(params, SGD, rho=0.1, k=10)`` -- pytorch_optimizer's call, as the migration page's
    table shows it -- failed on the binding ("got multiple values for argument 'rho'", "takes from 1
    to 3 positional arguments but 5 were given") instead of saying what to write."""
    model = nn.Linear(2, 1)
    name = cls.__name__
    expected = (
        rf"^samgria\.{name} is a transform, not an optimizer \(pytorch_optimizer's {name} takes the params and a "
        rf"base optimizer\): use samgria\.TransformingOptimizer\(params, base_optimizer, transforms=\[samgria\.{name}\(rho=\.\.\.\)\]"
    )
    with pytest.raises(TypeError, match=expected):
        cls(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(TypeError, match=expected):
        cls(model, model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)  # WSAM's: the model first
    with pytest.raises(TypeError, match=expected):
        cls(params=model.parameters(), base_optimizer=torch.optim.SGD, rho=0.1)
    with pytest.raises(TypeError, match=r"^rho must be a finite number >= 0, got tensor\(0\.1000\)$"):
        cls(torch.tensor(0.1))  # a 0-dim tensor is a hyperparameter, named by its own check
    assert cls(0.2).rho == 0.2 and cls(rho=0.3).rho == 0.3
    assert list(inspect.signature(cls).parameters)[0] == "rho"  # help() shows __init__'s arguments


# -- per-group hyperparameters are read every step (schedulable) ------------------------------------------
SCHEDULES = [
    (GSAM, {"rho": 0.05, "alpha": 0.4}, {"rho": 0.1, "alpha": 0.2}),
    (WSAM, {"rho": 0.05, "gamma": 0.8}, {"rho": 0.1, "gamma": 0.6}),
    (FriendlySAM, {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9}, {"rho": 0.1, "sigma": 0.5, "lmbda": 0.7}),
    (LookSAM, {"rho": 0.05, "alpha": 0.7}, {"rho": 0.1, "alpha": 0.3}),
    (ESAM, {"rho": 0.05, "beta": 0.5}, {"rho": 0.1, "beta": 0.8}),
]


@pytest.mark.parametrize("cls,start,later", SCHEDULES, ids=[s[0].__name__ for s in SCHEDULES])
def test_group_hyperparameters_are_read_each_step(cls, start, later):
    extra = {"seed": 0} if cls is ESAM else {"k": 2} if cls is LookSAM else {}
    x, y = make_data()
    model_a, model_b = make_model(), make_model()
    opt_a = TransformingOptimizer(model_a.parameters(), torch.optim.SGD, lr=0.1, transforms=[cls(**start, **extra)])
    opt_b = TransformingOptimizer(model_b.parameters(), torch.optim.SGD, lr=0.1, transforms=[cls(**later, **extra)])
    for group in opt_a.param_groups:
        group.update(later)  # e.g. a schedule
    for optimizer, model in ((opt_a, model_a), (opt_b, model_b)):
        closure = make_closure(model, optimizer, x, y)
        for _ in range(4):
            optimizer.step(closure)
    assert_bitwise_equal(params_of(model_a), params_of(model_b))
    key = next(iter(later))
    opt_a.param_groups[0][key] = -1.0
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: {key} must be a finite number"):
        opt_a.step(make_closure(model_a, opt_a, x, y))


EXACT_VALUES = [
    (SAM, {"rho": 0.0625}),
    (ASAM, {"rho": 0.0625}),
    (GSAM, {"rho": 0.0625, "alpha": 0.375}),
    (WSAM, {"rho": 0.0625, "gamma": 0.75}),
    (lambda: WSAM(decouple=False), {"rho": 0.0625, "gamma": 0.75}),
    (FriendlySAM, {"rho": 0.0625, "sigma": 0.5, "lmbda": 0.875}),
    (lambda: LookSAM(k=2), {"rho": 0.0625, "alpha": 0.375}),
    (lambda: ESAM(seed=0), {"rho": 0.0625, "beta": 0.5}),
]


@pytest.mark.parametrize("kind", ["numpy-float32", "numpy-float16", "numpy-longdouble", "fraction"])
@pytest.mark.parametrize(
    "make,values", EXACT_VALUES, ids=["SAM", "ASAM", "GSAM", "WSAM", "WSAM-coupled", "FriendlySAM", "LookSAM", "ESAM"]
)
def test_group_hyperparameters_of_any_real_type_step_as_their_float(make, values, kind):
    """A group value validate_group accepts (any real number) steps as the float of the same value:
    NumPy scalars carried their own precision into the step's scalars (float32 rounding in a
    float64 run) and a Fraction crashed it mid-step (torch takes no Fraction as a scalar)."""
    numpy = pytest.importorskip("numpy")
    convert = {
        "numpy-float32": numpy.float32,
        "numpy-float16": numpy.float16,
        "numpy-longdouble": numpy.longdouble,
        "fraction": Fraction,
    }[kind]

    def run(convert):
        x, y = make_data()
        model = make_model()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[make()])
        for group in optimizer.param_groups:
            group.update({key: convert(value) for key, value in values.items()})
        closure = make_closure(model, optimizer, x, y)
        for _ in range(3):
            optimizer.step(closure)
        return params_of(model)

    assert_bitwise_equal(run(convert), run(float))


# -- ESAM's mask ----------------------------------------------------------------------------------------------
def test_esam_perturbs_a_beta_fraction_of_the_elements_by_rho_over_beta():
    torch.manual_seed(0)
    coefficients = torch.randn(20_000, dtype=torch.float64)
    param = nn.Parameter(torch.zeros(20_000, dtype=torch.float64))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[ESAM(rho=0.5, beta=0.25, seed=1)])
    seen = []

    def closure():
        optimizer.zero_grad()
        seen.append(param.detach().clone())
        loss = (coefficients * param).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    e = seen[1] - seen[0]
    moved = e != 0
    full = 0.5 / 0.25 * coefficients / coefficients.norm()  # rho/beta g/|g| where the mask is 1
    torch.testing.assert_close(e[moved], full[moved], rtol=1e-14, atol=0)
    fraction = float(moved.double().mean())
    assert abs(fraction - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 20_000)


def test_esam_without_seed_draws_from_torchs_default_generator():
    x, y = make_data()

    def run(seed):
        model = make_model()  # seeds torch itself: the default generator is seeded after it
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[ESAM(0.05, beta=0.5)])
        torch.manual_seed(seed)
        closure = make_closure(model, optimizer, x, y)
        for _ in range(3):
            optimizer.step(closure)
        assert not optimizer.state  # nothing checkpointed without a seed
        return params_of(model)

    assert_bitwise_equal(run(7), run(7))
    assert any(not torch.equal(a, b) for a, b in zip(run(7), run(8)))


# -- state is committed only with a step taken ---------------------------------------------------------------
STATEFUL = {
    "LookSAM": lambda: LookSAM(0.05, k=2),
    "FriendlySAM": lambda: FriendlySAM(0.05),
    "ESAM": lambda: ESAM(0.05, seed=0),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_two_call_step_with_non_finite_second_pass_is_skipped_and_commits_nothing(name):
    x, y = make_data()
    model, twin_model = make_model(), make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[STATEFUL[name]()])
    twin = TransformingOptimizer(twin_model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[STATEFUL[name]()])
    for opt, mdl in ((optimizer, model), (twin, twin_model)):
        closure = make_closure(mdl, opt, x, y)
        for _ in range(2):
            opt.step(closure)
    before = copy.deepcopy(optimizer.state_dict())

    nn.functional.mse_loss(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    (nn.functional.mse_loss(model(x), y) * float("inf")).backward()
    with pytest.warns(RuntimeWarning, match="second evaluation are not finite"):
        optimizer.second_step(zero_grad=True)
    _assert_same_state(before, optimizer.state_dict())

    for opt, mdl in ((optimizer, model), (twin, twin_model)):  # then both runs continue alike
        closure = make_closure(mdl, opt, x, y)
        for _ in range(3):
            opt.step(closure)
    assert_bitwise_equal(params_of(model), params_of(twin_model))


@pytest.mark.parametrize("non_finite", ["skip", "raise"])
def test_looksam_step_in_between_with_a_non_finite_second_pass_changes_nothing(non_finite):
    """Between its SAM steps LookSAM uses the first pass's gradients; in the two-call loop a
    non-finite second pass still skips (or raises), as it does under GradScaler."""
    x, y = make_data()
    model, twin_model = make_model(), make_model()
    optimizer, twin = (
        TransformingOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[LookSAM(0.05, k=2)], non_finite=non_finite)
        for m in (model, twin_model)
    )
    for opt, mdl in ((optimizer, model), (twin, twin_model)):
        opt.step(make_closure(mdl, opt, x, y))  # a SAM step: the next one is in between
    before_params, before = params_of(model), copy.deepcopy(optimizer.state_dict())
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    (nn.functional.mse_loss(model(x), y) * float("nan")).backward()
    if non_finite == "skip":
        with pytest.warns(RuntimeWarning, match="second evaluation are not finite"):
            optimizer.second_step(zero_grad=True)
        assert optimizer.skipped_steps == 1
    else:
        with pytest.raises(FloatingPointError, match="second evaluation are not finite"):
            optimizer.second_step(zero_grad=True)
    assert_bitwise_equal(before_params, params_of(model))
    _assert_same_state(before, optimizer.state_dict())
    for opt, mdl in ((optimizer, model), (twin, twin_model)):  # then both runs continue alike
        for _ in range(3):
            opt.step(make_closure(mdl, opt, x, y))
    assert_bitwise_equal(params_of(model), params_of(twin_model))


@pytest.mark.parametrize("name", ["FriendlySAM", "ESAM"])
def test_standalone_step_with_non_finite_gradients_at_the_perturbed_weights_commits_nothing(name):
    # The seed protocol has no optimizer to put the state back: the transform itself commits
    # its state (FriendlySAM's average, ESAM's generator) only with finite gradients at w + e.
    x, y = make_data()
    model = make_model()
    transform = {"FriendlySAM": lambda: FriendlySAM(0.05), "ESAM": lambda: ESAM(0.05, seed=0)}[name]()
    bad = {"now": False}

    def loss_fn(inputs, targets):
        loss = nn.functional.mse_loss(model(inputs), targets)
        return loss * float("inf") if bad["now"] else loss

    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    for poisoned in (False, True):  # the seed's loop: backward, apply, step
        plain.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        before = copy.deepcopy(transform.state_dict())
        bad["now"] = poisoned
        transform.apply(model, loss_fn, (x, y))
        bad["now"] = False
        if not poisoned:
            plain.step()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    _assert_same_state(before, transform.state_dict())


class _RaisesAfterwards(GradientTransformBase):
    """A pre-step transform placed after the SAM-family one that raises on demand."""

    def __init__(self):
        self.armed = False

    def pre_update(self, ctx):
        if self.armed:
            raise RuntimeError("later transform failed")


def _state_snapshot(optimizer):
    return copy.deepcopy(optimizer.state_dict())


def _assert_same_state(before, after):
    assert before["state"].keys() == after["state"].keys()
    for index, entry in before["state"].items():
        assert entry.keys() == after["state"][index].keys()
        for key, value in entry.items():
            other = after["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


class _FlakySGD(torch.optim.SGD):
    """SGD whose step raises on demand (e.g. out of memory)."""

    fail = False

    def step(self, closure=None):
        if self.fail:
            raise MemoryError("inner step failed")
        return super().step(closure)


@pytest.mark.parametrize("name", sorted(STATEFUL))
@pytest.mark.parametrize("where", ["later-transform", "cancel_step", "inner-step"])
def test_a_failure_after_the_commit_puts_the_state_back(name, where):
    x, y = make_data()
    model = make_model()
    later = _RaisesAfterwards()
    optimizer = TransformingOptimizer(
        model.parameters(), _FlakySGD, lr=0.1, momentum=0.9, transforms=[STATEFUL[name](), later]
    )
    closure = make_closure(model, optimizer, x, y)
    for _ in range(3):
        optimizer.step(closure)
    before, weights = _state_snapshot(optimizer), params_of(model)
    if where == "later-transform":
        later.armed = True
        with pytest.raises(RuntimeError, match="later transform failed"):
            optimizer.step(closure)
    elif where == "inner-step":
        optimizer.inner.fail = True
        with pytest.raises(MemoryError, match="inner step failed"):
            optimizer.step(closure)
    else:
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.cancel_step()
    _assert_same_state(before, _state_snapshot(optimizer))
    assert_bitwise_equal(params_of(model), weights)


AMP_FAMILY = {
    "GSAM": lambda: GSAM(0.05),
    "WSAM-decoupled": lambda: WSAM(0.05, gamma=0.8),
    "WSAM-coupled": lambda: WSAM(0.05, gamma=0.8, decouple=False),
    "FriendlySAM": lambda: FriendlySAM(0.05),
    "LookSAM": lambda: LookSAM(0.05, k=2),
    "ESAM": lambda: ESAM(0.05, seed=0),
}


@pytest.mark.parametrize("name", sorted(AMP_FAMILY))
def test_two_call_loop_under_grad_scaler_equals_the_unscaled_loop_bitwise(name):
    # The AMP recipe: both passes are scaled, the transforms finish on scaled gradients and the
    # optimizer unscales afterwards. With a power-of-two scale that never changes, scaling is
    # exact: the run equals the unscaled two-call loop bit for bit (decoupled WSAM unscales its
    # sharpness step by the factor the optimizer applied to the gradients).
    x, y = make_data()

    def run(scaler):
        model = make_model()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[AMP_FAMILY[name]()])
        scale = scaler.scale if scaler is not None else (lambda loss: loss)
        for _ in range(4):
            scale(nn.functional.mse_loss(model(x), y)).backward()
            optimizer.first_step(zero_grad=True)
            scale(nn.functional.mse_loss(model(x), y)).backward()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.second_step()
            optimizer.zero_grad()
        return params_of(model)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    assert_bitwise_equal(run(scaler), run(None))
    assert scaler.get_scale() == 2.0**10


class _StepSizeSGD(torch.optim.Optimizer):
    """Plain SGD whose groups name their learning rate ``"step_size"`` (no ``"lr"`` key)."""

    def __init__(self, params, step_size=0.1):
        super().__init__(params, {"step_size": step_size})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.sub_(param.grad, alpha=group["step_size"])


def test_wsam_decoupled_refuses_an_inner_optimizer_without_lr_with_a_clear_error():
    # The decoupled sharpness step is -lr gamma/(1 - gamma) (g_p - g): without group["lr"] it
    # used to fail with a bare KeyError('lr'); now a ValueError names the group and the way out.
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    optimizer = TransformingOptimizer([w], _StepSizeSGD, transforms=[WSAM(0.05, 0.8)])

    def closure():
        optimizer.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"WSAM\(decouple=True\).*param_groups\[0\] has no 'lr'.*decouple=False"):
        optimizer.step(closure)
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    optimizer = TransformingOptimizer([w], _StepSizeSGD, transforms=[WSAM(0.05, 0.8, decouple=False)])
    optimizer.step(closure)  # the coupled form needs no learning rate
    assert not torch.equal(w.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_wsam_decoupled_refuses_the_seed_protocol_with_a_clear_error():
    x, y = make_data()
    model = make_model()

    def loss_fn(inputs, targets):
        return nn.functional.mse_loss(model(inputs), targets)

    loss_fn(x, y).backward()
    with pytest.raises(RuntimeError, match=r"WSAM\(decouple=True\) .* use WSAM\(decouple=False\)"):
        WSAM(decouple=True).apply(model, loss_fn, (x, y))
    WSAM(decouple=False).apply(model, loss_fn, (x, y))  # the coupled form works standalone


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_dcp_state_dict_into_a_fresh_optimizer_continues_bitwise(name):
    # torch.distributed.checkpoint first initialises a fresh optimizer's state (a step with lr=0
    # and zero gradients), then loads into it: every state key must exist after the init.
    x = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
        return model, TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, transforms=[STATEFUL[name]()])

    model, optimizer = build(0)
    closure = make_closure(model, optimizer, x, y)
    for _ in range(3):
        optimizer.step(closure)
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer))
    fresh_model, fresh = build(1)
    fresh_model.load_state_dict(model.state_dict())
    set_optimizer_state_dict(fresh_model, fresh, optim_state_dict=saved)
    fresh_closure = make_closure(fresh_model, fresh, x, y)
    for _ in range(4):
        optimizer.step(closure)
        fresh.step(fresh_closure)
    assert_bitwise_equal(params_of(model), params_of(fresh_model))


# -- one object in two slots ------------------------------------------------------------------------------
TWICE = {
    "GSAM": lambda: GSAM(0.05, alpha=0.3),
    "WSAM-coupled": lambda: WSAM(0.05, gamma=0.8, decouple=False),
    "WSAM-decoupled": lambda: WSAM(0.05, gamma=0.8),
    "FriendlySAM": lambda: FriendlySAM(0.05),
    "LookSAM": lambda: LookSAM(0.05, k=2),
    "ESAM": lambda: ESAM(0.05, seed=0),
}


@pytest.mark.parametrize("name", sorted(TWICE))
def test_one_object_in_two_slots_steps_like_two_objects(name):
    """What a transform keeps between the parts of a step belongs to its slot, not to the object."""

    def run(transforms):
        x, y = make_data()
        model = make_model()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=transforms)
        closure = make_closure(model, optimizer, x, y)
        for _ in range(4):
            optimizer.step(closure)
        return params_of(model)

    shared = TWICE[name]()
    assert_bitwise_equal(run([shared, shared]), run([TWICE[name](), TWICE[name]()]))


# -- 16-bit parameters ------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_look_sam_on_float16_adds_alpha_times_a_gradient_norm_beyond_float16_range(foreach):
    """Between SAM steps the scale alpha * ||g|| (here about 1e5) is no float16 scalar: the sum is
    computed in float32 and rounded once (it used to raise "cannot be converted to c10::Half")."""
    size, alpha = 100, 1e4
    target = torch.linspace(0.5, 1.5, size)
    curvature = torch.linspace(1.0, 50.0, size)
    param = nn.Parameter(torch.zeros(size, dtype=torch.float16))
    optimizer = TransformingOptimizer(
        [param], torch.optim.SGD, lr=1e-8, transforms=[LookSAM(0.05, alpha=alpha, k=2)], transform_foreach=foreach
    )
    seen = []

    def closure():
        optimizer.zero_grad()
        param.grad = (param.detach().float() * curvature - target).to(torch.float16)
        seen.append(param.grad.clone())
        return torch.zeros(())

    optimizer.step(closure)  # the SAM step: stores the unit direction g_v
    unit = optimizer.state[param]["look_sam.g_v"].clone()
    assert unit.dtype == torch.float16 and float(unit.abs().max()) > 0
    optimizer.step(closure)  # in between: g + alpha ||g|| g_v, no re-evaluation
    g = seen[-1]
    scale = alpha * float(torch.linalg.vector_norm(g.float()))  # 16-bit norms are taken in float32
    assert scale > torch.finfo(torch.float16).max
    expected = torch.add(g.float(), unit.float(), alpha=scale).to(torch.float16)
    assert torch.isfinite(expected).all()
    assert torch.equal(param.grad, expected)
    # and, in float64, to float16's precision
    exact = g.double() + scale * unit.double()
    torch.testing.assert_close(param.grad.double(), exact, rtol=2**-10, atol=0)


# -- seeds ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1])
def test_esam_refuses_a_seed_torch_generators_do_not_take_at_construction(seed):
    with pytest.raises(ValueError, match=rf"^seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\], got {seed}$"):
        ESAM(0.05, seed=seed)


@pytest.mark.parametrize("negative", [-1, -(2**63)])
def test_esam_takes_a_negative_seed_modulo_2_to_the_64_as_torch_does(negative):
    assert torch.Generator().manual_seed(negative).initial_seed() == negative + 2**64
    assert_bitwise_equal(run_samgria(ESAM(0.05, seed=negative), 2), run_samgria(ESAM(0.05, seed=negative + 2**64), 2))


@pytest.mark.parametrize("make", [GSAM, WSAM, LookSAM], ids=["GSAM", "WSAM", "LookSAM"])
def test_transforms_whose_update_mixes_in_the_first_gradient_refuse_m_sharpness(make):
    """With ``first_pass_context`` (DDP's ``no_sync``) the first-pass gradient is each rank's own:
    GSAM's and WSAM's updates use it, and LookSAM's steps in between and its direction g_v, so
    the replicas would drift apart."""
    import contextlib

    model = nn.Linear(3, 2)
    name = make.__name__
    with pytest.raises(ValueError, match=rf"first_pass_context \(m-sharpness\) cannot be used with {name}: the update mixes in"):
        TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[make()], first_pass_context=contextlib.nullcontext)
    TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[make()])  # without it: fine
    assert SAM.supports_local_first_pass and not make.supports_local_first_pass


# -- GSAM's and WSAM(decouple=False)'s final gradient: one rounding in 16 bits -------------------------------
def _step_with_fixed_gradients(transform, passes, dtype, loop, foreach, lr=2.0**-10):
    """One SGD(lr) step with ``transform`` on zero parameters of ``dtype`` whose gradients are
    ``passes[0]`` (at w) and ``passes[1]`` (at w + e) whatever the weights: per parameter, a
    float64 tensor (representable in ``dtype``) or ``None`` (no gradient in that pass)."""
    params = [nn.Parameter(torch.zeros(len(g_p), dtype=dtype)) for g_p in passes[1]]
    optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=lr, transforms=[transform], transform_foreach=foreach)

    def install(grads):
        for param, grad in zip(params, grads):
            assert grad is None or torch.equal(grad.to(dtype).double(), grad)
            param.grad = None if grad is None else grad.to(dtype)

    if loop == "closure":
        evaluations = iter(passes)

        def closure():
            optimizer.zero_grad()
            install(next(evaluations))
            return torch.zeros(())

        optimizer.step(closure)
    else:
        install(passes[0])
        optimizer.first_step()
        install(passes[1])
        optimizer.second_step()
    return params, optimizer


def _gsam_reference(g, g_p, alpha):
    """GSAM's docstring in float64: d = g_p - alpha g_perp, g_perp = g - <g, g_p> / |g_p|^2 g_p."""
    parallel = float(g @ g_p) / float(g_p @ g_p)
    return g_p - alpha * (g - parallel * g_p)


def _wsam_reference(g, g_p, gamma):
    """WSAM's docstring in float64: (1 - 2 gamma) / (1 - gamma) g + gamma / (1 - gamma) g_p."""
    return (1 - 2 * gamma) / (1 - gamma) * g + gamma / (1 - gamma) * g_p


_F64 = torch.float64
_BF16_GAMMA = 3.995 / 4.995  # a = gamma / (1 - gamma) = 3.995: a * 2**126 is beyond bfloat16's range, within float32's
# (name, transform, dtype, g, g_p, reference). GSAM: g = g_p + h with h orthogonal to g_p (c = 1) and
# alpha = 0.5, so float32 arithmetic is exact; WSAM at gamma = 0.9: a = 9, 1 - a = -8.
_ONE_ROUNDING_CASES = {
    # (1 + alpha c) g_p = 1.5 g_p = 73728 > 65504 was rounded to inf first; d = g_p - h / 2 fits.
    "GSAM-float16-overflow": (
        lambda: GSAM(0.05, alpha=0.5),
        torch.float16,
        torch.tensor([53248.0, 45056.0, -45056.0, 1024.0], dtype=_F64),
        torch.tensor([49152.0, 49152.0, -45056.0, 1024.0], dtype=_F64),
        lambda g, g_p: _gsam_reference(g, g_p, 0.5),
    ),
    # a g_p = 9 g_p (up to 2.7e5) was rounded to inf first; 9 g_p - 8 g fits.
    "WSAM-float16-overflow": (
        lambda: WSAM(0.05, 0.9, decouple=False),
        torch.float16,
        torch.tensor([12000.0, 32000.0, -20800.0, 7000.0], dtype=_F64),
        torch.tensor([10000.0, 30000.0, -20000.0, 8000.0], dtype=_F64),
        lambda g, g_p: _wsam_reference(g, g_p, 0.9),
    ),
    # a g_p = 1.9975 * 2**127 rounds to inf in bfloat16 (not in float32); d = g_p where g = g_p.
    "WSAM-bfloat16-overflow": (
        lambda: WSAM(0.05, _BF16_GAMMA, decouple=False),
        torch.bfloat16,
        torch.tensor([2.0**126, -(2.0**126), 0.5], dtype=_F64),
        torch.tensor([2.0**126, -(2.0**126), 1.0], dtype=_F64),
        lambda g, g_p: _wsam_reference(g, g_p, _BF16_GAMMA),
    ),
    # Rounding 1.5 g_p to bfloat16 first gave 0.98046875 for 0.9765625 (gradients beyond
    # float32's products: test_gsam_inner_product_of_gradients_beyond_float32_products_...).
    "GSAM-bfloat16-rounding": (
        lambda: GSAM(0.05, alpha=0.5),
        torch.bfloat16,
        torch.tensor([1.0703125, 0.9453125, -3.015625, 5.0], dtype=_F64),
        torch.tensor([1.0078125, 1.0078125, -3.015625, 5.0], dtype=_F64),
        lambda g, g_p: _gsam_reference(g, g_p, 0.5),
    ),
    # rounding 9 g_p to bfloat16 first gave 1 for 1.0078125.
    "WSAM-bfloat16-rounding": (
        lambda: WSAM(0.05, 0.9, decouple=False),
        torch.bfloat16,
        torch.tensor([1.0078125, -2.015625, 3.0], dtype=_F64),
        torch.tensor([1.0078125, -2.015625, 3.0], dtype=_F64),
        lambda g, g_p: _wsam_reference(g, g_p, 0.9),
    ),
}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("loop", ["closure", "two-call"])
@pytest.mark.parametrize("case", sorted(_ONE_ROUNDING_CASES))
def test_gsam_and_wsam_round_a_16_bit_final_gradient_once(case, loop, foreach):
    """The final gradient (1 + alpha c) g_p - alpha g (GSAM), a g_p + (1 - a) g (WSAM) of a 16-bit
    parameter is computed in float32 and rounded once: rounding the first term to the dtype made
    it infinite where the sum fits (float16: above 65504 / 9 = 7.3e3 at gamma = 0.9)."""
    make, dtype, g, g_p, reference = _ONE_ROUNDING_CASES[case]
    (param,), optimizer = _step_with_fixed_gradients(make(), [[g], [g_p]], dtype, loop, foreach)
    expected = reference(g, g_p).to(dtype)
    assert torch.isfinite(expected).all()
    assert optimizer.skipped_steps == 0
    assert param.grad.dtype == dtype and torch.equal(param.grad, expected), (param.grad, expected)
    assert torch.isfinite(param).all()
    assert torch.equal(param.detach(), (-(2.0**-10) * expected.double()).to(dtype))


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("loop", ["closure", "two-call"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["GSAM", "WSAM"])
def test_gsam_and_wsam_keep_scale_then_add_in_float32_and_float64(name, dtype, loop, foreach):
    """float32 and float64 gradients are as before, bit for bit: round(round(a g_p) + b g), and
    round(a g_p) for a parameter without a first gradient (g = 0)."""
    # The first parameter has both gradients, the second only g_p. GSAM: |g_p| = 18 and 24 per
    # tensor, 30 in all, and integer <g, g_p>, so c = <g, g_p> / 30**2 is the float64 quotient.
    g = torch.tensor([6.0, -5.0, 11.0, 9.0], dtype=_F64)
    g_p = [torch.tensor([5.0, -7.0, 9.0, 13.0], dtype=_F64), torch.tensor([-8.0, 16.0, 16.0], dtype=_F64)]
    if name == "GSAM":
        transform, alpha = GSAM(0.05, alpha=0.4), 0.4
        scale, scale_first = 1.0 + alpha * (float(g @ g_p[0]) / 30.0**2), -alpha
    else:
        generator = torch.Generator().manual_seed(0)
        g = torch.randn(64, generator=generator, dtype=torch.float32).double()
        g_p = [torch.randn(n, generator=generator, dtype=torch.float32).double() for n in (64, 3)]
        transform, gamma = WSAM(0.05, 0.7, decouple=False), 0.7
        scale = gamma / (1.0 - gamma)
        scale_first = 1.0 - scale
    params, optimizer = _step_with_fixed_gradients(transform, [[g, None], g_p], dtype, loop, foreach)
    expected = [g_p[0].to(dtype).mul_(scale).add_(g.to(dtype), alpha=scale_first), g_p[1].to(dtype).mul_(scale)]
    assert optimizer.skipped_steps == 0
    assert_bitwise_equal([p.grad for p in params], expected)
    if dtype == torch.float32:  # the two roundings show: one rounding gives other bits
        once = (scale * g_p[0] + scale_first * g).to(dtype)
        assert not torch.equal(expected[0], once)


# -- gradients a transform combines are checked in both loops ---------------------------------------------
@pytest.mark.parametrize("non_finite", ["skip", "raise"])
@pytest.mark.parametrize("loop", ["closure", "two-call"])
@pytest.mark.parametrize(
    "make",
    [lambda: WSAM(0.05, 0.9, decouple=False), lambda: GSAM(0.05, 4.0)],
    ids=["WSAM-coupled", "GSAM"],
)
def test_a_combined_gradient_beyond_the_dtype_is_a_non_finite_step_in_both_loops(make, loop, non_finite):
    """Finite evaluations whose combination does not fit float16 (WSAM: 9 g_p - 8 g = 1.7e5;
    GSAM with alpha=4: g_p - 4 g_perp with g_perp = g near -1e4, about 5e4 + 4e4): the step is
    skipped (or raises), weights and state untouched, in step(closure) as in the two-call loop."""
    g, g_p = torch.tensor([-1e4, 0.0], dtype=_F64), torch.tensor([1e4, 1.0], dtype=_F64)
    transform = make()
    if isinstance(transform, WSAM):
        assert abs(float(_wsam_reference(g, g_p, 0.9)[0])) > 65504
    else:
        g, g_p = torch.tensor([-1e4, 1e4], dtype=_F64), torch.tensor([5e4, 5e4], dtype=_F64)
        assert float(_gsam_reference(g, g_p, 4.0).abs().max()) > 65504
    params = [nn.Parameter(torch.zeros(2, dtype=torch.float16))]
    optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=2.0**-10, transforms=[transform], non_finite=non_finite)
    passes = iter([[g], [g_p]])
    before = copy.deepcopy(optimizer.state_dict())

    def install():
        params[0].grad = next(passes)[0].to(torch.float16)

    if non_finite == "raise":
        with pytest.raises(FloatingPointError, match="not finite"):
            step_installing(optimizer, install, loop)
    else:
        with pytest.warns(RuntimeWarning, match="not finite: the step is skipped"):
            step_installing(optimizer, install, loop)
        assert optimizer.skipped_steps == 1
    assert torch.equal(params[0].detach(), torch.zeros(2, dtype=torch.float16))
    _assert_same_state(before, optimizer.state_dict())


@pytest.mark.parametrize("loop", ["closure", "two-call"])
def test_looksam_steps_in_between_that_overflow_the_dtype_are_skipped_in_both_loops(loop):
    """LookSAM's step in between, g + alpha |g| g_v, overflows float16 from finite gradients."""
    param = nn.Parameter(torch.zeros(2, dtype=torch.float16))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=1e-6, transforms=[LookSAM(rho=0.05, alpha=0.7, k=2)])
    grads = iter([[4e4, 0.0], [4e4, 3e4], [0.0, 4e4], [0.0, 4e4]])

    def install():
        param.grad = torch.tensor(next(grads), dtype=torch.float16)

    step_installing(optimizer, install, loop)  # a SAM step: stores g_v
    before = (param.detach().clone(), copy.deepcopy(optimizer.state_dict()))
    if loop == "two-call":
        grads = iter([[0.0, 4e4], [0.0, 4e4]])
    with pytest.warns(RuntimeWarning, match="not finite: the step is skipped"):
        step_installing(optimizer, install, loop)
    assert optimizer.skipped_steps == 1
    assert torch.equal(param.detach(), before[0]) and torch.isfinite(param).all()
    _assert_same_state(before[1], optimizer.state_dict())


@pytest.mark.parametrize(
    "after",
    [lambda: ScaleGrad(0.5), lambda: ClipGradNorm(0.01), lambda: NormalizeGrad(), lambda: GradSign()],
    ids=["ScaleGrad", "ClipGradNorm", "NormalizeGrad", "GradSign"],
)
def test_decoupled_wsam_before_a_gradient_transform_is_the_same_in_both_loops(after):
    """The decoupled sharpness term is applied as computed: what a later transform does to the
    gradient the inner optimizer gets (g) does not scale it, in the two-call loop as in
    step(closure)."""
    x, y = make_data()
    (model_a, closure_opt), (model_b, loop_opt) = [
        (model, TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[WSAM(0.05, 0.9), after()]))
        for model in (make_model(), make_model())
    ]
    closure = make_closure(model_a, closure_opt, x, y)
    for _ in range(3):
        closure_opt.step(closure)
        loop_opt.zero_grad()
        nn.functional.mse_loss(model_b(x), y).backward()
        loop_opt.first_step()
        nn.functional.mse_loss(model_b(x), y).backward()
        loop_opt.second_step()
        assert_bitwise_equal(params_of(model_a), params_of(model_b))


@pytest.mark.parametrize("loop", ["closure", "two-call"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gsam_inner_product_of_gradients_beyond_float32_products_is_taken_in_float64(dtype, loop):
    """<g, g_p> of elements near 1e20 overflows float32 products (1e40) though every gradient and
    the result fit: GSAM still gives its documented gradient, not a skipped step."""
    g = torch.tensor([2.0**66, 0.0, 2.0**60], dtype=_F64)
    g_p = torch.tensor([2.0**66, 2.0**66, 0.0], dtype=_F64)
    params, optimizer = _step_with_fixed_gradients(GSAM(0.05, 0.5), [[g], [g_p]], dtype, loop, foreach=True, lr=1.0)
    assert optimizer.skipped_steps == 0
    expected = -_gsam_reference(g, g_p, 0.5)
    torch.testing.assert_close(params[0].detach().double(), expected.to(dtype).double(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)


@pytest.mark.parametrize("make", [lambda: GSAM(0.05, alpha=2.0), lambda: LookSAM(0.05, alpha=0.7, k=2)], ids=["GSAM", "LookSAM"])
def test_the_inner_product_of_tiny_float32_gradients_is_not_lost_to_underflow(make):
    """Scaling the loss by 1e-24 and the learning rate by 1e24 leaves the update as it was (every
    quantity is scale-equivariant): <g, g_p> of float32 gradients near 1e-25 underflowed to 0
    in float32 products, which dropped GSAM's and LookSAM's parallel part."""
    x = torch.randn(32, 50, generator=torch.Generator().manual_seed(1))
    y = torch.randn(32, 1, generator=torch.Generator().manual_seed(2))

    def update(scale):
        torch.manual_seed(0)
        model = nn.Linear(50, 1)
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1 / scale, transforms=[make()])
        start = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

        def closure():
            optimizer.zero_grad()
            loss = (model(x) - y).pow(2).mean() * scale
            loss.backward()
            return loss

        for _ in range(2):
            optimizer.step(closure)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double() - start

    reference = update(1.0)
    tiny = update(1e-24)
    assert float((tiny - reference).norm() / reference.norm()) < 1e-5


@pytest.mark.parametrize("loop", ["closure", "two-call"])
def test_decoupled_wsam_sharpness_beyond_float16_is_applied_from_float32(loop):
    """g = -14000 and g_p = 56000 fit float16, g_p - g = 70000 does not: the decoupled sharpness
    step is taken from the float32 difference and rounded once, not -inf."""
    g, g_p = torch.tensor([-14000.0], dtype=_F64), torch.tensor([56000.0], dtype=_F64)
    lr = 2.0**-20
    params, optimizer = _step_with_fixed_gradients(WSAM(0.05, 0.9), [[g], [g_p]], torch.float16, loop, foreach=True, lr=lr)
    assert optimizer.skipped_steps == 0
    inner = (torch.zeros(1) - lr * g.float()).half()  # SGD's step, rounded once
    expected = (inner.float() - lr * (0.9 / (1 - 0.9)) * (g_p - g).float()).half()
    assert torch.isfinite(params[0]).all()
    assert torch.equal(params[0].detach(), expected)


@pytest.mark.parametrize("name", ["GSAM", "LookSAM", "FriendlySAM"])
def test_moves_left_registered_by_a_two_call_step_are_not_put_back_by_a_later_step(name):
    """_move_along registers its moves on the transform until perturb() returns, for pre_update
    to undo them after an interrupt; the two-call loop calls perturb() itself, so they stay
    registered after second_step(). A later step(closure) whose perturb() raises before moving
    anything must not restore them: for a parameter perturbed in place, that copied the two-call
    step's starting weights back over its update."""
    make = {"GSAM": lambda: GSAM(0.05), "LookSAM": lambda: LookSAM(0.05, k=1), "FriendlySAM": lambda: FriendlySAM(0.05)}
    model = make_model()
    flat = torch.zeros(model[0].bias.numel() + 1, dtype=model[0].bias.dtype)
    flat[1:] = model[0].bias.detach()
    model[0].bias.data = flat[1:]  # a view: perturbed in place, restored by a copy
    x, y = make_data()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[make[name]()])
    closure = make_closure(model, optimizer, x, y)
    closure()
    optimizer.first_step()
    closure()
    optimizer.second_step()
    before = params_of(model)

    def refuse(ctx):
        raise RuntimeError("injected before anything moved")

    optimizer.transforms[0]._collect = refuse
    with pytest.raises(RuntimeError, match="^injected before anything moved$"):
        optimizer.step(closure)
    assert_bitwise_equal(before, params_of(model))


# -- float64 gradients whose norm is tiny or huge --------------------------------------------------
def _family_with_tiny_norm():
    from samgria import MultiStepSAM

    return {
        "MultiStepSAM": lambda: MultiStepSAM(rho=0.05),
        "MultiStepSAM-adversary": lambda: MultiStepSAM(rho=0.05, adversary=lambda groups: torch.optim.SGD(groups, lr=0.05)),
        "GSAM": lambda: GSAM(rho=0.05),
        "WSAM": lambda: WSAM(rho=0.05),
        "FriendlySAM": lambda: FriendlySAM(rho=0.05),
        "ESAM": lambda: ESAM(rho=0.05, beta=1.0),
        "LookSAM": lambda: LookSAM(rho=0.05),
    }


def _move_with_float64_gradients(transform, passes, loop, size=7):
    """The move e (the weights at the second pass minus w = 1) of one step whose passes' float64
    gradients are ``passes[0]``, ``passes[1]``; and the parameter and optimizer after it."""
    param = nn.Parameter(torch.ones(size, dtype=torch.float64))
    optimizer = TransformingOptimizer(torch.optim.SGD([param], lr=1e-3), transforms=[transform])
    at_pass = []

    def install():
        at_pass.append(param.detach().clone())
        param.grad = passes[len(at_pass) - 1].clone()

    step_installing(optimizer, install, loop)
    return at_pass[1] - 1.0, param, optimizer


@pytest.mark.parametrize("loop", ["closure", "two-call"])
@pytest.mark.parametrize("name", list(_family_with_tiny_norm()))
def test_the_sam_family_moves_by_rho_along_a_float64_gradient_whose_norm_is_tiny(name, loop):
    """|g| = 1e-310 sqrt(7): rho / |g| is infinite in float64, and the step hung. e = rho g / |g|
    = rho / sqrt(7) per element, as for gradients of 1e-300 (the direction does not depend on the
    size)."""
    make = _family_with_tiny_norm()[name]
    tiny = [torch.full((7,), 1e-310, dtype=torch.float64)] * 2
    e, _, _ = _move_with_float64_gradients(make(), tiny, loop)
    torch.testing.assert_close(e, torch.full((7,), 0.05 / math.sqrt(7.0), dtype=torch.float64), rtol=1e-12, atol=0.0)
    small = [torch.full((7,), 1e-300, dtype=torch.float64)] * 2
    torch.testing.assert_close(e, _move_with_float64_gradients(make(), small, loop)[0], rtol=1e-12, atol=0.0)


def _scaled_down(tensor):
    return tensor * 2.0**-1000  # exact: 1e300-sized values to about 1e-1


@pytest.mark.parametrize("loop", ["closure", "two-call"])
def test_gsam_decomposes_float64_gradients_near_1e300(loop):
    """|g_p|^2 is beyond float64 (a bare OverflowError from the square). The reference: GSAM's
    formula with <g, g_p> / |g_p|^2 taken on both scaled by 2**-1000, the rest in float64."""
    g = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * 1e300
    g_p = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64) * 1e300
    _, param, _ = _move_with_float64_gradients(GSAM(rho=0.05, alpha=0.4), [g, g_p], loop, size=3)
    parallel = float(_scaled_down(g) @ _scaled_down(g_p)) / float(_scaled_down(g_p) @ _scaled_down(g_p))
    d = (1.0 + 0.4 * parallel) * g_p - 0.4 * g
    expected = torch.ones(3, dtype=torch.float64) - 1e-3 * d
    assert torch.isfinite(param).all()
    torch.testing.assert_close(param.detach(), expected, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("loop", ["closure", "two-call"])
def test_looksam_stores_its_direction_from_float64_gradients_near_1e300(loop):
    """|g|^2 is beyond float64 (a bare OverflowError). The reference: g_v = g_s - <g, g_s> / |g|^2 g
    with the quotient taken on both scaled by 2**-1000, normalised in float64."""
    g = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * 1e300
    g_s = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64) * 1e300
    _, param, optimizer = _move_with_float64_gradients(LookSAM(rho=0.05, alpha=0.7, k=5), [g, g_s], loop, size=3)
    parallel = float(_scaled_down(g) @ _scaled_down(g_s)) / float(_scaled_down(g) @ _scaled_down(g))
    g_v = _scaled_down(g_s - parallel * g)
    torch.testing.assert_close(optimizer.state[param]["look_sam.g_v"], g_v / g_v.norm(), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(param.detach(), torch.ones(3, dtype=torch.float64) - 1e-3 * g_s, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("loop", ["closure", "two-call"])
def test_looksam_stores_a_unit_direction_of_float32_gradients_whose_norm_is_subnormal(loop):
    """As below in float32: g = a u, g_s = a (u + v) with a = 1e-40, so |g_v| = a and 1 / |g_v|
    is beyond float32; g_v is scaled up by powers of two float32 holds, and stored as v."""
    u = torch.tensor([1.0, 0.0, 0.0])
    v = torch.tensor([0.0, 1.0, 0.0])
    scale = 1e-40
    param = nn.Parameter(torch.ones(3))
    optimizer = TransformingOptimizer(torch.optim.SGD([param], lr=1e-3), transforms=[LookSAM(rho=0.05, alpha=0.7, k=5)])
    passes = [scale * u, scale * (u + v)]
    seen = []

    def install():
        seen.append(None)
        param.grad = passes[len(seen) - 1].clone()

    step_installing(optimizer, install, loop)
    assert torch.equal(optimizer.state[param]["look_sam.g_v"], v)


@pytest.mark.parametrize("loop", ["closure", "two-call"])
def test_looksam_stores_a_unit_direction_when_its_norm_is_subnormal(loop):
    """g = a u and g_s = a (u + v) with u, v orthogonal unit vectors and a = 1e-310: g_v = a v,
    whose norm is subnormal, so 1 / |g_v| is infinite in float64; the stored g_v was infinite and
    LookSAM's next step was skipped as non-finite. It must be v, and the next step taken."""
    u = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    v = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    scale = 1e-310
    _, param, optimizer = _move_with_float64_gradients(LookSAM(rho=0.05, alpha=0.7, k=5), [scale * u, scale * (u + v)], loop, size=3)
    torch.testing.assert_close(optimizer.state[param]["look_sam.g_v"], v, rtol=1e-12, atol=0.0)

    def closure():
        optimizer.zero_grad()
        param.grad = scale * u
        return torch.zeros(())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not finite: the step is skipped"
        optimizer.step(closure)  # a step in between: the kept direction, no re-evaluation
    assert optimizer.skipped_steps == 0


def _bits(tensor):
    """The tensor's bits as integers (NaNs compare equal when their bits are)."""
    real = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    return real.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[real.element_size()])


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
def test_out_of_place_kernels_equal_a_copy_written_in_place_bitwise(foreach):
    """FriendlySAM's ``m`` and ``d`` come from ``_scaled`` and ``_added``, which multiply and add
    plain 32/64-bit tensors out of place (one pass instead of a copy and a pass over it): the
    values, dtypes and strides of a copy scaled with ``scale_`` / added with ``_add_scaled_``."""
    from samgria.functional.norms import scale_
    from samgria.transforms.sam_family import _add_scaled_, _added, _scaled

    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(5, 3, generator=generator),
        torch.randn(4, 3, 2, 2, generator=generator).to(memory_format=torch.channels_last),
        torch.randn(6, generator=generator, dtype=torch.float64),
        torch.randn(6, generator=generator).half(),
        torch.randn(3, generator=generator, dtype=torch.complex64),
        torch.tensor([-0.0, float("inf"), float("nan"), 3e38]),
        # a complex multiply by s + 0j is not the real pairs': (1 - 0j) s has +0 imaginary, (inf + 1j) s NaN real
        torch.complex(torch.tensor([1.0, -0.0, float("inf"), 2.0]), torch.tensor([-0.0, 1.0, 1.0, float("inf")])),
    ]
    scales = [0.3, -1.7, 1e-3, 70000.0, 0.9, 2.0, 0.5]
    expected = [t.clone(memory_format=torch.preserve_format) for t in tensors]
    scale_([torch.view_as_real(t) if t.is_complex() else t for t in expected], scales, foreach=foreach)
    got = _scaled(tensors, scales, foreach)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        assert torch.equal(_bits(a), _bits(b))

    reals = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
    sources = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(memory_format=torch.preserve_format) for t in reals]
    sources[0] = sources[0].double()  # another dtype than its target: through a copy, as before
    expected = [t.clone(memory_format=torch.preserve_format) for t in reals]
    _add_scaled_(expected, sources, scales, foreach)
    got = _added(reals, sources, scales, foreach)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        assert torch.equal(_bits(a), _bits(b))


def test_out_of_place_kernels_foreach_path_equals_per_tensor_path_bitwise():
    """``_scaled`` and ``_added`` on one list that mixes every path: float32 (two strides),
    float64, float16, bfloat16, complex, a source of another dtype, and scales 0.0 and -0.0 of
    one float32 group on -0.0 targets (where ``t + 0.0 u`` and ``t - 0.0 u`` differ in sign)."""
    from samgria.transforms.sam_family import _added, _scaled

    generator = torch.Generator().manual_seed(1)
    tensors = [
        torch.randn(5, 3, generator=generator),
        torch.randn(4, 3, 2, 2, generator=generator).to(memory_format=torch.channels_last),
        torch.randn(6, generator=generator, dtype=torch.float64),
        torch.randn(6, generator=generator).half(),
        torch.randn(6, generator=generator).bfloat16(),
        torch.randn(3, generator=generator, dtype=torch.complex128),
        torch.full((4,), -0.0),
        torch.full((4,), -0.0),
    ]
    scales = [0.3, -1.7, 1e-3, 70000.0, -3.5, 0.9, 0.0, -0.0]
    for fast, reference in zip(_scaled(tensors, scales, True), _scaled(tensors, scales, False)):
        assert fast.dtype == reference.dtype and fast.stride() == reference.stride()
        assert torch.equal(_bits(fast), _bits(reference))

    reals = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
    sources = [torch.randn(t.shape, generator=generator).to(t.dtype).to(memory_format=torch.preserve_format) for t in reals]
    sources[2] = sources[2].float()  # another dtype than its target: through a copy
    sources[6], sources[7] = torch.ones(4), torch.ones(4)
    for fast, reference in zip(_added(reals, sources, scales, True), _added(reals, sources, scales, False)):
        assert fast.dtype == reference.dtype and fast.stride() == reference.stride()
        assert torch.equal(_bits(fast), _bits(reference))


@pytest.mark.parametrize(
    "make", [lambda: FriendlySAM(0.05, sigma=0.5, lmbda=0.9), lambda: LookSAM(0.05, alpha=0.7, k=2)], ids=["FriendlySAM", "LookSAM"]
)
def test_out_of_place_kernels_in_a_mixed_dtype_group_foreach_equals_per_tensor_bitwise(make):
    """FriendlySAM's average (``_scaled``, ``_added``) and LookSAM's direction (``_scaled`` of a
    gradient missing at w + e) in one group of float32, float16, bfloat16, float64 and complex64
    parameters, one without a gradient and one whose gradient vanishes at w + e: the foreach path
    steps the weights and the state bit for bit as the per-tensor path."""

    def run(foreach):
        generator = torch.Generator().manual_seed(0)
        dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64, torch.float32, torch.float32]
        params = [nn.Parameter(torch.randn(3, 2, generator=generator, dtype=torch.complex64 if d.is_complex else torch.float32).to(d)) for d in dtypes]
        targets = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        without, vanishing = params[-2], params[-1]
        initial = [p.detach().clone() for p in params]
        optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=0.1, transforms=[make()], transform_foreach=foreach)
        calls = []

        def closure():
            optimizer.zero_grad()
            calls.append(None)
            terms = [((p - t).abs() ** 2).sum().double() for p, t in zip(params, targets) if p is not without and (p is not vanishing or len(calls) == 1)]
            loss = torch.stack(terms).sum()
            loss.backward()
            return loss

        for _ in range(4):
            calls.clear()
            optimizer.step(closure)
        moved = [not torch.equal(p, w) for p, w in zip(params, initial)]
        assert all(moved[:5]) and not moved[5]  # guards the comparison below
        return params, optimizer.state_dict()["state"]

    (fast, fast_state), (reference, reference_state) = run(True), run(False)
    for a, b in zip(fast, reference):
        assert a.dtype == b.dtype and torch.equal(_bits(a.detach()), _bits(b.detach()))
    assert fast_state.keys() == reference_state.keys() == {0, 1, 2, 3, 4, 6}
    for index, entry in fast_state.items():
        assert entry.keys() == reference_state[index].keys()
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == reference_state[index][key].dtype
                assert torch.equal(_bits(value), _bits(reference_state[index][key]))
            else:
                assert value == reference_state[index][key]


@pytest.mark.parametrize("where", ["subclass", "instance"])
def test_coupled_wsam_with_its_own_post_update_still_runs_it(where):
    """Coupled WSAM's own post_update does nothing, so the optimizer skips it; a post_update that
    a subclass (or the instance) puts in its place is called after every inner step, as for any
    transform, with the copy before the inner step that a post-step transform needs."""
    calls = []
    if where == "subclass":

        class Logged(WSAM):
            def post_update(self, ctx):
                calls.append(len(ctx.param_groups))
                super().post_update(ctx)

        transform = Logged(0.05, 0.8, decouple=False)
    else:
        transform = WSAM(0.05, 0.8, decouple=False)
        transform.post_update = lambda ctx: calls.append(len(ctx.param_groups))
    model, (x, y) = make_model(), make_data()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[transform])
    closure = make_closure(model, optimizer, x, y)
    optimizer.step(closure)
    optimizer.step(closure)
    assert calls == [1, 1]


def test_out_of_place_kernels_take_one_foreach_call_per_device_dtype_and_scale(monkeypatch):
    """The fast path is taken where claimed: with foreach, ``_scaled`` multiplies the plain 32/64-bit
    tensors in one ``torch._foreach_mul`` per dtype and ``_added`` in one ``torch._foreach_add``
    per dtype and scale (16-bit and complex ones go through a copy); without it, none."""
    from samgria.transforms.sam_family import _added, _scaled

    calls = []
    for name in ("_foreach_mul", "_foreach_add"):
        kernel = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *args, _kernel=kernel, _name=name, **kwargs: calls.append((_name, len(args[0]))) or _kernel(*args, **kwargs))
    tensors = [torch.ones(3), torch.ones(2), torch.ones(4, dtype=torch.float64), torch.ones(2).half(), torch.ones(2, dtype=torch.complex64)]
    _scaled(tensors, [2.0] * 5, True)
    assert calls == [("_foreach_mul", 2), ("_foreach_mul", 1)]
    calls.clear()
    _added(tensors[:3], [torch.ones(3), torch.ones(2), torch.ones(4, dtype=torch.float64)], [0.5, -1.0, 0.5], True)
    assert sorted(calls) == [("_foreach_add", 1)] * 3
    calls.clear()
    _added(tensors[:2], [torch.ones(3), torch.ones(2)], [0.5, 0.5], True)
    assert calls == [("_foreach_add", 2)]
    calls.clear()
    _scaled(tensors, [2.0] * 5, False)
    _added(tensors[:2], [torch.ones(3), torch.ones(2)], [0.5, 0.5], False)
    assert calls == []
