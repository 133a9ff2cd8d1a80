"""Contracts every meta-learner keeps, in every configuration of the MetaInfo registry.

Each registry test runs over the entries of ``meta_infos.META_INFOS`` (MAML, FOMAML, Reptile,
MetaSGD and ANIL with 1-3 inner steps, per-group ``inner_lr`` and ``adapt=False`` groups,
frozen parameters, momentum / Adam inner rules, ``InnerSAM``, an inner regulariser, checkpointed
second-order steps, BatchNorm, outer SGD / Adam / an already built SAM ``TransformingOptimizer``):

* every path (loop, vmap, compiled, the ``adapt`` closure API, ``MetaTrainer``) gives the same
  losses, meta-gradients and outer steps, and the loop equals independent hand-written
  references (``torch.autograd.grad`` per task; Reptile's pseudo-gradient by hand);
* inner options act the same on every path;
* ``state_dict`` round trips continue bit for bit; step hooks fire once per step; pickling and
  ``copy.deepcopy`` work as in ``torch.optim``;
* bad inputs fail with the project's messages;
* a non-finite meta-step changes nothing (weights, outer state), on every path and with an
  outer SAM ``TransformingOptimizer``.

Then a small transformer encoder with second-order MAML (the loop path with the math attention
backend), against finite differences and with checkpointed inner steps.

Everything is float64 and tiny; the compiled path uses the ``aot_eager`` backend (Dynamo and
AOTAutograd tracing of the same program, seconds instead of inductor's tens of seconds;
inductor itself is covered by ``test_meta_compiled.py``).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import io
import pickle
import math
import re
import warnings
from typing import Any

import pytest
import torch
from meta_infos import ALGORITHMS, DT, META_INFOS, MODELS, MetaInfo, info_id, make_tasks, mse, proximal
from torch import nn
from torch.func import functional_call
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from samgria.data import Task
from samgria.meta import (
    ANIL,
    FOMAML,
    MAML,
    AdamInnerStep,
    InnerSAM,
    MetaSGD,
    MetaTrainer,
    MomentumInnerStep,
    Reptile,
)
from samgria.meta import engine
from samgria.meta.base import MetaOptimizer
from samgria.meta.compiled import CompiledMetaLoss, compiled_path_blocker
from samgria.optim import TransformingOptimizer
from samgria.transforms import SAM

COMPILE_BACKEND = "aot_eager"


def _params(infos: list[MetaInfo]) -> Any:
    return pytest.mark.parametrize("info", infos, ids=[info_id(i) for i in infos])


all_infos = _params(META_INFOS)
vmap_infos = _params([i for i in META_INFOS if "vmap" in i.paths])
compiled_infos = _params([i for i in META_INFOS if "compiled" in i.paths])
checkpoint_infos = _params([i for i in META_INFOS if i.checkpoint and i.second_order])
reference_infos = _params(
    [i for i in META_INFOS if i.meta_gradient and i.plain_sgd_inner and i.outer != "sam"]
)
reptile_reference_infos = _params(
    [i for i in META_INFOS if i.algorithm == "Reptile" and i.plain_sgd_inner and i.outer != "sam"]
)
sam_outer_infos = _params([i for i in META_INFOS if i.outer == "sam"])


# ============================================================================ helpers
def all_model_tensors(meta) -> dict[str, torch.Tensor]:
    """Every parameter of the model (frozen ones included) and Meta-SGD's rates."""
    tensors = dict(meta.model.named_parameters())
    tensors.update({f"inner_lrs[{n}]": r for n, r in getattr(meta, "inner_lrs", {}).items()})
    return tensors


@dataclasses.dataclass
class Outcome:
    """What one outer step produced: the meta-loss (and per-task losses), the gradients the
    outer optimizer saw, and the weights after the step."""

    loss: torch.Tensor
    losses: torch.Tensor | None
    grads: dict[str, torch.Tensor | None]
    weights: dict[str, torch.Tensor]


def snapshot_grads(meta) -> dict[str, torch.Tensor | None]:
    return {n: None if t.grad is None else t.grad.detach().clone() for n, t in all_model_tensors(meta).items()}


def snapshot_weights(meta) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in all_model_tensors(meta).items()}


def task_losses_closure(info: MetaInfo, meta, tasks, path: str, record: dict, compiled=None):
    """The closure of one outer step on ``path`` (``"loop"``, ``"vmap"``, ``"default"`` for
    ``vectorize=None``, ``"compiled"`` or ``"adapt"`` for the per-task ``meta.adapt`` API)."""

    def closure():
        meta.zero_grad()
        losses = None
        if path == "compiled":
            loss = compiled.backward(tasks)
        elif path == "adapt":
            per_task = []
            for t in tasks:
                learner = meta.adapt(lambda f, t=t: mse(f(t.support_x), t.support_y), **info.inner_options)
                per_task.append(mse(learner(t.query_x), t.query_y))
            losses = torch.stack(per_task)
            loss = losses.mean()
        else:
            vectorize = {"loop": False, "vmap": True, "default": None}[path]
            losses = meta.task_losses(tasks, mse, vectorize=vectorize, **info.inner_options)
            loss = losses.mean()
        if path != "compiled" and meta.outer_update == "meta_gradient":
            loss.backward()
        record.setdefault("loss", loss.detach().clone())
        if losses is not None:
            record.setdefault("losses", losses.detach().clone())
        return loss.detach()

    return closure


def one_step(info: MetaInfo, meta, tasks, path: str = "loop", compiled=None) -> Outcome:
    record: dict[str, Any] = {}
    meta.step(task_losses_closure(info, meta, tasks, path, record, compiled))
    return Outcome(record["loss"], record.get("losses"), snapshot_grads(meta), snapshot_weights(meta))


def fresh(info: MetaInfo, seed: int = 0, **meta_kwargs):
    model = info.make_model(seed)
    return model, info.build(model, **meta_kwargs)


def assert_tensors(actual, expected, rtol: float, atol: float, what: str, none_is_zero: bool = False) -> None:
    if none_is_zero:
        if actual is None and expected is not None:
            actual = torch.zeros_like(expected)
        if expected is None and actual is not None:
            expected = torch.zeros_like(actual)
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: one gradient is None, the other is not"
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if rtol == 0 and atol == 0:
        assert torch.equal(actual, expected), f"{what}: not bitwise equal, max diff {(actual - expected).abs().max()}"
    else:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_outcomes(actual: Outcome, expected: Outcome, rtol: float, atol: float, none_is_zero: bool = False) -> None:
    assert_tensors(actual.loss, expected.loss, rtol, atol, "meta-loss")
    if actual.losses is not None and expected.losses is not None:
        assert_tensors(actual.losses, expected.losses, rtol, atol, "task losses")
    assert actual.grads.keys() == expected.grads.keys()
    for n in expected.grads:
        assert_tensors(actual.grads[n], expected.grads[n], rtol, atol, f"grad of {n}", none_is_zero)
    for n in expected.weights:
        assert_tensors(actual.weights[n], expected.weights[n], rtol, atol, f"weight {n} after the step")


def assert_state_equal(actual: Any, expected: Any, where: str = "state_dict") -> None:
    """Nested dicts/lists equal, tensors bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_state_equal(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, b) in enumerate(zip(actual, expected)):
            assert_state_equal(a, b, f"{where}[{i}]")
    else:
        assert actual == expected, where


def poisoned(tasks: list[Task], field: str) -> list[Task]:
    """A copy of ``tasks`` whose second task has a NaN in ``field``."""
    out = [copy.deepcopy(t) for t in tasks]
    value = getattr(out[1], field).clone()
    value[0, 0] = float("nan")
    setattr(out[1], field, value)
    return out


class ListSampler:
    """A task sampler returning fixed batches."""

    def __init__(self, tasks):
        self.tasks = tasks

    def sample(self, n):
        return list(self.tasks[:n])


TASKS = make_tasks()
TASKS_2 = make_tasks(seed=2)


# ============================================================================ the registry
def test_registry_has_several_configurations_of_every_algorithm():
    for algorithm in ALGORITHMS:
        infos = [i for i in META_INFOS if i.algorithm == algorithm]
        assert len(infos) >= 5, algorithm
        assert {i.inner_steps for i in infos} >= {1, 2, 3} or algorithm == "MetaSGD", algorithm
        assert any(not i.plain_sgd_inner for i in infos), algorithm
        assert any(i.outer == "sam" for i in infos), algorithm
    assert len([i for i in META_INFOS if "compiled" in i.paths]) == 2
    assert any("compiled" in i.paths and i.inner_step_fn is not None for i in META_INFOS)


@all_infos
def test_declared_paths_match_the_engine_vmap_and_compiled_blockers(info):
    model, meta = fresh(info)
    loop = meta.inner_loop(**info.inner_options)
    blocker = engine.vmap_blocker(model, loop, TASKS)
    assert (blocker is None) == ("vmap" in info.paths), blocker
    if info.vmap_blocker is not None:
        assert info.vmap_blocker in blocker
    compiled_blocker = compiled_path_blocker(meta, TASKS, loop)
    assert (compiled_blocker is None) == (blocker is None and info.meta_gradient), compiled_blocker
    # the loop describes what the registry declares
    assert dict(loop.lrs).keys() == info.adapted_lrs(model).keys()
    assert loop.inner_steps == info.inner_steps
    assert loop.second_order == info.second_order
    assert meta.default_path(loop, TASKS) == ("vmap" if blocker is None else "loop")
    assert type(meta).outer_update == ("meta_gradient" if info.meta_gradient else "pseudo_gradient")
    assert type(meta).needs_query is info.meta_gradient


# ============================================================================ paths agree
@vmap_infos
def test_loop_and_vmap_give_the_same_losses_meta_gradients_and_step(info):
    _, loop_meta = fresh(info)
    _, vmap_meta = fresh(info)
    loop = one_step(info, loop_meta, TASKS, "loop")
    vmap = one_step(info, vmap_meta, TASKS, "vmap")
    assert any(g is not None and g.abs().sum() > 0 for g in loop.grads.values())
    assert_outcomes(vmap, loop, rtol=1e-10, atol=1e-12)
    # evaluation (no graph, plain SGD inner steps) agrees too
    assert vmap_meta.evaluate(TASKS_2, mse, vectorize=True) == pytest.approx(
        loop_meta.evaluate(TASKS_2, mse, vectorize=False), rel=1e-12, abs=1e-14
    )


@all_infos
def test_default_path_is_bitwise_the_path_it_chooses(info):
    _, default_meta = fresh(info)
    _, explicit_meta = fresh(info)
    chosen = info.paths[1] if "vmap" in info.paths else "loop"
    default = one_step(info, default_meta, TASKS, "default")
    explicit = one_step(info, explicit_meta, TASKS, chosen)
    assert_outcomes(default, explicit, rtol=0, atol=0)


@compiled_infos
def test_compiled_path_equals_the_loop(info):
    _, loop_meta = fresh(info)
    _, compiled_meta = fresh(info)
    compiled = CompiledMetaLoss(compiled_meta, mse, backend=COMPILE_BACKEND, **info.inner_options)
    loop = one_step(info, loop_meta, TASKS, "loop")
    result = one_step(info, compiled_meta, TASKS, "compiled", compiled)
    assert compiled.num_programs == 1
    assert_outcomes(result, loop, rtol=1e-10, atol=1e-12, none_is_zero=True)
    # a second meta-batch runs the same program from the updated weights
    loop = one_step(info, loop_meta, TASKS_2, "loop")
    result = one_step(info, compiled_meta, TASKS_2, "compiled", compiled)
    assert compiled.num_programs == 1
    assert_outcomes(result, loop, rtol=1e-10, atol=1e-12, none_is_zero=True)


@checkpoint_infos
def test_checkpointed_inner_steps_equal_the_plain_loop_bitwise(info):
    plain_info = dataclasses.replace(info, checkpoint=False)
    _, plain_meta = fresh(plain_info)
    _, checkpointed_meta = fresh(info)
    assert checkpointed_meta.checkpoint_inner_steps and not plain_meta.checkpoint_inner_steps
    for tasks in (TASKS, TASKS_2):
        plain = one_step(plain_info, plain_meta, tasks, "loop")
        checkpointed = one_step(info, checkpointed_meta, tasks, "loop")
        assert_outcomes(checkpointed, plain, rtol=0, atol=0)
    # the per-task adapt API checkpoints the same way
    assert_outcomes(one_step(info, checkpointed_meta, TASKS, "adapt"), one_step(plain_info, plain_meta, TASKS, "adapt"), 0, 0)


@all_infos
def test_adapt_closure_api_equals_task_losses_on_the_loop_bitwise(info):
    _, adapt_meta = fresh(info)
    _, loop_meta = fresh(info)
    assert_outcomes(one_step(info, adapt_meta, TASKS, "adapt"), one_step(info, loop_meta, TASKS, "loop"), rtol=0, atol=0)


@all_infos
def test_meta_trainer_steps_and_evaluates_like_the_meta_optimizer(info):
    for path in info.paths:
        if path == "compiled":
            continue
        _, trainer_meta = fresh(info)
        _, meta = fresh(info)
        trainer = MetaTrainer(
            trainer_meta, mse, ListSampler(TASKS), vectorize=path == "vmap", **info.inner_options
        )
        loss = trainer.train_step(TASKS)
        assert trainer.path == path
        expected = one_step(info, meta, TASKS, path)
        # the trainer back-propagates sum_i loss_i / n (per task on the loop): other rounding
        assert loss == pytest.approx(float(expected.loss), rel=1e-12)
        assert_outcomes(
            Outcome(expected.loss, None, snapshot_grads(trainer_meta), snapshot_weights(trainer_meta)),
            expected, rtol=1e-10, atol=1e-12,
        )
        evaluated = trainer.evaluate(TASKS_2)  # with the trainer's inner loop (its options)
        assert evaluated == trainer_meta.evaluate(TASKS_2, mse, vectorize=path == "vmap", **info.inner_options)
        assert evaluated == pytest.approx(
            meta.evaluate(TASKS_2, mse, vectorize=path == "vmap", **info.inner_options), rel=1e-12
        )


# ============================================================================ references
def reference_maml_family(info: MetaInfo, model: nn.Module, tasks: list[Task]):
    """Per-task inner loop by hand: plain SGD steps with ``torch.autograd.grad`` on
    ``functional_call``, the step sizes of the declaration (learnable tensors for Meta-SGD),
    second order unless declared first order; returns the per-task query losses and the
    gradient of their mean w.r.t. every trainable meta-parameter (and Meta-SGD's rates)."""
    theta = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    lrs = info.adapted_lrs(model)
    if info.algorithm == "MetaSGD":
        rates = {n: torch.full_like(theta[n], lr).requires_grad_(True) for n, lr in lrs.items()}
    else:
        rates = dict(lrs)

    def forward(weights, x):
        return functional_call(model, ({**theta, **weights}, {n: b.clone() for n, b in buffers.items()}), (x,))

    losses = []
    for task in tasks:
        fast = {n: theta[n] for n in lrs}
        for _ in range(info.inner_steps):
            loss = mse(forward(fast, task.support_x), task.support_y)
            if info.inner_reg_fn is not None:
                loss = loss + info.inner_reg_fn({**theta, **fast}, theta)
            names = list(fast)
            grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=info.second_order)
            fast = {n: fast[n] - rates[n] * g for n, g in zip(names, grads)}
        losses.append(mse(forward(fast, task.query_x), task.query_y))
    losses = torch.stack(losses)
    wrt = {n: t for n, t in theta.items() if t.requires_grad}
    if info.algorithm == "MetaSGD":
        wrt.update({f"inner_lrs[{n}]": r for n, r in rates.items()})
    grads = torch.autograd.grad(losses.mean(), list(wrt.values()), allow_unused=True)
    return losses.detach(), dict(zip(wrt, grads))


@reference_infos
def test_loop_meta_gradient_equals_a_hand_written_per_task_reference(info):
    model, meta = fresh(info)
    expected_losses, expected = reference_maml_family(info, model, TASKS)
    meta.zero_grad()
    losses = meta.task_losses(TASKS, mse, vectorize=False, **info.inner_options)
    losses.mean().backward()
    torch.testing.assert_close(losses.detach(), expected_losses, rtol=1e-12, atol=1e-14)
    tensors = all_model_tensors(meta)
    for name, tensor in tensors.items():
        if name not in expected:
            assert tensor.grad is None, f"{name} is frozen and must get no gradient"
            continue
        ref = expected[name] if expected[name] is not None else torch.zeros_like(tensor)
        got = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13, msg=lambda m, n=name: f"{n}: {m}")
    # the reference distinguishes the orders: it is not the first-order gradient when second order
    if info.second_order:
        _, first_order = reference_maml_family(dataclasses.replace(info, first_order=True), model, TASKS)
        assert any(
            g is not None and not torch.allclose(g, expected[n], rtol=1e-6, atol=1e-9) for n, g in first_order.items()
        )


def reference_reptile_pseudo_gradient(info: MetaInfo, model: nn.Module, tasks: list[Task]) -> dict[str, torch.Tensor]:
    """theta - mean_i(theta'_i) with theta'_i from ``inner_steps`` plain SGD steps by hand."""
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    lrs = info.adapted_lrs(model)
    mean = {n: torch.zeros_like(theta[n]) for n in lrs}
    for task in tasks:
        fast = {n: theta[n].clone() for n in lrs}
        for _ in range(info.inner_steps):
            leaves = {n: v.requires_grad_(True) for n, v in fast.items()}
            current = {**theta, **leaves}
            out = functional_call(model, (current, {n: b.clone() for n, b in buffers.items()}), (task.support_x,))
            loss = mse(out, task.support_y)
            if info.inner_reg_fn is not None:
                loss = loss + info.inner_reg_fn(current, theta)
            grads = torch.autograd.grad(loss, list(leaves.values()))
            fast = {n: (leaves[n] - lrs[n] * g).detach() for n, g in zip(leaves, grads)}
        for n in lrs:
            mean[n] += fast[n] / len(tasks)
    return {n: theta[n] - mean[n] for n in lrs}


@reptile_reference_infos
@pytest.mark.parametrize("path", ["loop", "vmap", "adapt"])
def test_reptile_pseudo_gradient_equals_the_hand_written_formula(info, path):
    model, meta = fresh(info)
    theta = snapshot_weights(meta)
    expected = reference_reptile_pseudo_gradient(info, model, TASKS)
    outcome = one_step(info, meta, TASKS, path)
    for name, weight in theta.items():
        if name not in expected:
            assert outcome.grads[name] is None, f"{name} is not adapted and must get no pseudo-gradient"
            assert torch.equal(outcome.weights[name], weight)
            continue
        torch.testing.assert_close(outcome.grads[name], expected[name], rtol=1e-10, atol=1e-13)
        if info.outer == "sgd":  # theta <- theta - beta * (theta - mean theta')
            lr = meta.param_groups[0]["lr"]
            torch.testing.assert_close(outcome.weights[name], weight - lr * expected[name], rtol=1e-12, atol=1e-14)


# ============================================================================ inner options
INNER_OPTIONS = {
    "inner_step_fn": MomentumInnerStep(0.9),
    "inner_reg_fn": proximal,
    "grad_transforms": (InnerSAM(0.05),),
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("option", ["inner_step_fn", "inner_reg_fn", "grad_transforms", "all"])
def test_inner_options_act_the_same_on_the_loop_vmap_and_adapt_paths(algorithm, option):
    base = MetaInfo(f"{algorithm}-options", algorithm, inner_steps=2)
    chosen = INNER_OPTIONS if option == "all" else {option: INNER_OPTIONS[option]}
    info = dataclasses.replace(base, **chosen)
    outcomes = {path: one_step(info, fresh(info)[1], TASKS, path) for path in ("loop", "vmap", "adapt")}
    assert_outcomes(outcomes["vmap"], outcomes["loop"], rtol=1e-10, atol=1e-12)
    assert_outcomes(outcomes["adapt"], outcomes["loop"], rtol=0, atol=0)
    # the option is applied on every path: without it, every path gives something else
    plain = one_step(base, fresh(base)[1], TASKS, "vmap")
    for path, outcome in outcomes.items():
        differs = [
            n for n, g in outcome.grads.items()
            if g is not None and not torch.allclose(g, plain.grads[n], rtol=1e-8, atol=1e-10)
        ]
        assert differs, f"{option} changed nothing on the {path} path"
    # MetaTrainer hands them to both paths as well
    for path in ("loop", "vmap"):
        _, meta = fresh(info)
        trainer = MetaTrainer(meta, mse, ListSampler(TASKS), vectorize=path == "vmap", **chosen)
        trainer.train_step(TASKS)
        for n, w in snapshot_weights(meta).items():
            torch.testing.assert_close(w, outcomes[path].weights[n], rtol=1e-10, atol=1e-12)


# ============================================================================ state dicts
def state_dict_via_torch_save(meta) -> dict:
    buffer = io.BytesIO()
    torch.save(meta.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


@all_infos
def test_state_dict_round_trip_into_a_fresh_meta_optimizer_continues_bit_for_bit(info):
    model, meta = fresh(info)
    one_step(info, meta, TASKS)
    one_step(info, meta, TASKS_2)
    saved = state_dict_via_torch_save(meta)
    if info.algorithm == "MetaSGD":
        assert saved["inner_lrs"].keys() == meta.inner_lrs.keys()
        assert any(not torch.equal(v, torch.full_like(v, info.inner_lr)) for v in saved["inner_lrs"].values())

    twin_model = info.make_model(seed=123)  # other initial weights, overwritten below
    twin_model.load_state_dict(model.state_dict())
    twin = info.build(twin_model)
    twin.load_state_dict(saved)
    assert_state_equal(twin.state_dict(), meta.state_dict())
    if info.algorithm == "MetaSGD":
        for n, rate in meta.inner_lrs.items():
            assert torch.equal(twin.inner_lrs[n], rate)
            assert twin.inner_lrs[n] is not rate
    if info.algorithm == "ANIL":
        assert twin.head_names == meta.head_names

    continued = one_step(info, meta, TASKS)
    resumed = one_step(info, twin, TASKS)
    assert_outcomes(resumed, continued, rtol=0, atol=0)
    assert_state_equal(twin.state_dict(), meta.state_dict())


# ============================================================================ hooks, pickling
@all_infos
def test_step_pre_and_post_hooks_fire_once_per_step(info):
    _, meta = fresh(info)
    seen = []
    handles = [
        meta.register_step_pre_hook(lambda opt, args, kwargs: seen.append(("pre", opt))),
        meta.register_step_post_hook(lambda opt, args, kwargs: seen.append(("post", opt))),
        register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(("global-pre", opt))),
        register_optimizer_step_post_hook(lambda opt, args, kwargs: seen.append(("global-post", opt))),
    ]
    try:
        one_step(info, meta, TASKS)
        one_step(info, meta, TASKS_2)
    finally:
        for handle in handles:
            handle.remove()
    kinds = [kind for kind, _ in seen]
    assert kinds == ["global-pre", "pre", "post", "global-post"] * 2
    assert all(opt is meta for _, opt in seen)


def plain_torch_optimizer_with_hooks():
    model = nn.Linear(2, 1).to(DT)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    opt.register_step_pre_hook(lambda *a: None)
    opt.register_step_post_hook(lambda *a: None)
    opt.register_state_dict_pre_hook(lambda *a: None)
    return opt


@all_infos
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_give_an_independent_twin_that_continues_identically(info, how):
    clone = (lambda obj: pickle.loads(pickle.dumps(obj))) if how == "pickle" else copy.deepcopy
    _, meta = fresh(info)
    one_step(info, meta, TASKS)
    for register in (meta.register_step_pre_hook, meta.register_step_post_hook, meta.register_state_dict_pre_hook):
        register(lambda *a: None)

    twin = clone(meta)
    # hooks are dropped, as torch.optim drops them
    torch_twin = clone(plain_torch_optimizer_with_hooks())
    for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks"):
        assert len(getattr(torch_twin, attr)) == 0
        assert len(getattr(twin, attr)) == 0
        assert len(getattr(meta, attr)) == 1
    # the twin's groups are its outer optimizer's and hold its own model's tensors
    assert twin.param_groups is twin.outer.param_groups
    assert type(twin.outer) is type(meta.outer)
    twin_tensors = {id(t) for t in all_model_tensors(twin).values()}
    assert all(id(p) in twin_tensors for g in twin.param_groups for p in g["params"])
    assert not twin_tensors & {id(t) for t in all_model_tensors(meta).values()}
    if info.algorithm == "ANIL":
        assert twin.head is twin.model[-1]
    assert_state_equal(twin.state_dict(), meta.state_dict())

    assert_outcomes(one_step(info, twin, TASKS_2), one_step(info, meta, TASKS_2), rtol=0, atol=0)


# ============================================================================ bad inputs
def _model() -> nn.Module:
    return META_INFOS[0].make_model()


def _maml(**kw) -> MAML:
    return MAML(_model(), torch.optim.SGD, lr=0.1, **kw)


class NoTransform:
    def __repr__(self) -> str:
        return "NoTransform()"


CONSTRUCTORS = {
    "MAML": lambda m, **kw: MAML(m, torch.optim.SGD, lr=0.1, **kw),
    "FOMAML": lambda m, **kw: FOMAML(m, torch.optim.SGD, lr=0.1, **kw),
    "Reptile": lambda m, **kw: Reptile(m, torch.optim.SGD, lr=0.1, **kw),
    "MetaSGD": lambda m, **kw: MetaSGD(m, torch.optim.SGD, lr=0.1, **kw),
    "ANIL": lambda m, **kw: ANIL(m, torch.optim.SGD, head=m[-1], lr=0.1, **kw),
}

CONSTRUCTOR_ERRORS = [
    ({"inner_lr": -0.1}, ValueError, r"^inner_lr must be a finite number >= 0, got -0\.1$"),
    ({"inner_lr": float("nan")}, ValueError, r"^inner_lr must be a finite number >= 0, got nan$"),
    ({"inner_lr": True}, TypeError, r"^inner_lr must be a finite number >= 0, got True$"),
    ({"inner_steps": True}, TypeError, r"^inner_steps must be an integer >= 0, got True$"),
    ({"inner_steps": 2.0}, TypeError, r"^inner_steps must be an integer >= 0, got 2\.0$"),
    ({"inner_steps": -1}, ValueError, r"^inner_steps must be an integer >= 0, got -1$"),
    ({"non_finite": "maybe"}, ValueError, r"^non_finite must be one of 'skip', 'raise', got 'maybe'$"),
    ({"checkpoint_inner_steps": "yes"}, TypeError, r"^checkpoint_inner_steps must be a bool, got 'yes'$"),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "kwargs,error,match", CONSTRUCTOR_ERRORS, ids=[f"{k}={v!r}" for kw, _, _ in CONSTRUCTOR_ERRORS for k, v in kw.items()]
)
def test_constructors_reject_bad_arguments_with_the_project_message(algorithm, kwargs, error, match):
    with pytest.raises(error, match=match):
        CONSTRUCTORS[algorithm](_model(), **kwargs)


BUILT_CONSTRUCTORS = {
    "MAML": lambda m, outer, **kw: MAML(m, outer, **kw),
    "FOMAML": lambda m, outer, **kw: FOMAML(m, outer, **kw),
    "Reptile": lambda m, outer, **kw: Reptile(m, outer, **kw),
    "MetaSGD": lambda m, outer, **kw: MetaSGD(m, outer, **kw),
    "ANIL": lambda m, outer, **kw: ANIL(m, outer, head=m[-1], **kw),
}

def foreign_groups(model: nn.Module) -> list[dict[str, Any]]:
    return [{"params": model.parameters()}, {"params": [nn.Parameter(torch.zeros(3, dtype=DT))]}]


REJECTED_OUTERS = [
    # (id, model -> param groups of the built optimizer, error, match)
    ("foreign-tensor", foreign_groups, ValueError,
     r"^param_groups\[1\] holds a tensor of shape \(3,\) that is not a parameter of model \(Sequential\)$"),
    ("group-inner-lr", lambda m: [{"params": m.parameters(), "inner_lr": -1.0}], ValueError,
     r"^param_groups\[0\]: inner_lr must be a finite number >= 0, got -1\.0$"),
    ("group-adapt", lambda m: [{"params": m.parameters(), "adapt": "yes"}], TypeError,
     r"^param_groups\[0\]: adapt must be a bool, got 'yes'$"),
]


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One step of ``optimizer`` on a loss of ``model`` and of every tensor it optimizes."""
    optimizer.zero_grad()
    loss = model(x).sum() + sum((p**2).sum() for g in optimizer.param_groups for p in g["params"])
    loss.backward()
    optimizer.step()


def group_options(optimizer: torch.optim.Optimizer) -> list[tuple[dict[str, Any], list[int]]]:
    """Each group's options and the ids of its tensors."""
    groups = optimizer.param_groups
    return [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]]) for g in groups]


def assert_optimizer_as_before(optimizer, state_type, options, state) -> None:
    assert type(optimizer.state) is state_type
    assert group_options(optimizer) == options
    assert_state_equal(optimizer.state_dict(), state)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("groups,error,match", [r[1:] for r in REJECTED_OUTERS], ids=[r[0] for r in REJECTED_OUTERS])
def test_a_constructor_that_rejects_a_built_optimizer_leaves_it_as_it_was(algorithm, groups, error, match):
    model = _model()
    outer = torch.optim.Adam(groups(model), lr=0.01)
    plain_step(model, outer, TASKS[0].support_x)  # the optimizer holds state to lose
    twin_model, twin_outer = copy.deepcopy((model, outer))  # a copy no constructor sees
    before = type(outer.state), group_options(outer), copy.deepcopy(outer.state_dict())
    with pytest.raises(error, match=match):
        BUILT_CONSTRUCTORS[algorithm](model, outer)
    assert_optimizer_as_before(outer, *before)
    for x in (TASKS[1].support_x, TASKS[2].support_x):  # and it steps on like the copy
        plain_step(model, outer, x)
        plain_step(twin_model, twin_outer, x)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
    assert_state_equal(outer.state_dict(), twin_outer.state_dict())


def test_metasgd_checks_lrs_group_before_taking_over_a_built_optimizer():
    model = _model()
    outer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain_step(model, outer, TASKS[0].support_x)
    before = type(outer.state), group_options(outer), copy.deepcopy(outer.state_dict())
    with pytest.raises(ValueError, match=r"^lrs_group\['inner_lr'\] must be a finite number >= 0, got -1\.0$"):
        MetaSGD(model, outer, lrs_group={"inner_lr": -1.0})
    assert_optimizer_as_before(outer, *before)


def test_numpy_integer_inner_steps_are_accepted():
    np = pytest.importorskip("numpy")
    meta = _maml(inner_steps=np.int64(2))
    assert meta.inner_steps == 2 and type(meta.inner_steps) is int
    assert meta.inner_loop(np.int32(3)).inner_steps == 3


@pytest.mark.parametrize("algorithm", ["MAML", "MetaSGD", "ANIL"])
def test_numpy_bool_flags_are_accepted_and_kept_as_bools(algorithm):
    """check_bool accepts a NumPy bool; first_order refused it (a hand-written isinstance check),
    and checkpoint_inner_steps, create_graph and track_graph kept np.True_ instead of True."""
    np = pytest.importorskip("numpy")
    meta = CONSTRUCTORS[algorithm](_model(), first_order=np.True_, checkpoint_inner_steps=np.True_)
    assert meta.first_order is True and meta.checkpoint_inner_steps is True
    loop = meta.inner_loop(create_graph=np.True_, track_graph=np.False_)
    assert loop.first_order is False and loop.track_graph is False and loop.checkpoint is True
    assert type(loop.checkpoint) is bool
    with pytest.raises(TypeError, match=r"^first_order must be a bool, got 1$"):
        CONSTRUCTORS[algorithm](_model(), first_order=1)
    with pytest.raises(TypeError, match=r"^first_order must be a bool, got np\.float64\(1\.0\)$"):
        CONSTRUCTORS[algorithm](_model(), first_order=np.float64(1.0))


def _body_and_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    head = list(model[-1].parameters())
    return [p for p in model.parameters() if all(p is not h for h in head)], head


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("built", [False, True], ids=["params", "built"])
def test_a_numpy_bool_adapt_key_is_accepted_and_stored_as_a_bool(algorithm, built):
    """``{"adapt": np.False_}`` adapts as ``{"adapt": False}`` (was refused: 'must be a bool')."""
    np = pytest.importorskip("numpy")
    adapted = []
    for flags in ((np.False_, np.True_), (False, True)):
        model = _model()
        body, head = _body_and_head(model)
        groups = [{"params": body, "adapt": flags[0]}, {"params": head, "adapt": flags[1]}]
        if built:
            meta = BUILT_CONSTRUCTORS[algorithm](model, torch.optim.SGD(groups, lr=0.1))
        else:
            meta = CONSTRUCTORS[algorithm](model, params=groups)
        assert [g["adapt"] for g in meta.param_groups[:2]] == [False, True]
        assert all(type(g["adapt"]) is bool for g in meta.param_groups)
        adapted.append(meta.inner_loop().adapt_names)
    names = {id(p): n for n, p in model.named_parameters()}
    assert adapted[0] == adapted[1] == tuple(names[id(p)] for p in head)


def test_a_numpy_bool_adapt_key_set_later_and_in_an_added_group_is_accepted():
    np = pytest.importorskip("numpy")
    model = _model()
    body, head = _body_and_head(model)
    meta = MAML(model, torch.optim.SGD, lr=0.1, params=[{"params": head}])
    meta.add_param_group({"params": body, "adapt": np.False_})
    assert meta.param_groups[1]["adapt"] is False
    names = {id(p): n for n, p in model.named_parameters()}
    assert meta.inner_loop().adapt_names == tuple(names[id(p)] for p in head)
    meta.param_groups[1]["adapt"] = np.True_  # edited after construction: read at each call
    assert meta.inner_loop().adapt_names == tuple(names[id(p)] for p in head + body)
    meta.param_groups[1]["adapt"] = 1
    with pytest.raises(TypeError, match=r"^param_groups\[1\]: adapt must be a bool, got 1$"):
        meta.inner_loop()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_numpy_bool_vectorize_takes_the_path_of_the_bool(algorithm):
    np = pytest.importorskip("numpy")
    model = _model()
    meta = CONSTRUCTORS[algorithm](model)
    for flag in (True, False):
        with torch.no_grad():
            want = meta.task_losses(TASKS, mse, vectorize=flag)
            got = meta.task_losses(TASKS, mse, vectorize=np.bool_(flag))
        assert torch.equal(got, want)
        assert meta.evaluate(TASKS, mse, vectorize=np.bool_(flag)) == meta.evaluate(TASKS, mse, vectorize=flag)
    with pytest.raises(TypeError, match=r"^vectorize must be None or a bool, got 0$"):
        meta.evaluate(TASKS, mse, vectorize=0)


@pytest.mark.parametrize(
    "weights", [["a", "b", "c"], [None, 1.0, 1.0], [1j, 1.0, 1.0]], ids=["str", "None", "complex"]
)
def test_meta_loss_weights_that_are_not_numbers_are_a_type_error_naming_weights(weights):
    """``torch.as_tensor`` raised ``ValueError: too many dimensions 'str'`` (or its own TypeError)."""
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=DT)
    message = rf"^weights must be a 1-D sequence of finite numbers >= 0, one per task loss, got {re.escape(repr(weights))}$"
    with pytest.raises(TypeError, match=message):
        MetaOptimizer.meta_loss(losses, weights)
    assert MetaOptimizer.meta_loss(losses, [1.0, 0.0, 1.0]).item() == pytest.approx((1.0 + 4.0) / 2)


def test_meta_loss_takes_subnormal_weights_as_their_ratios():
    """The power-of-two scale of the weights was formed as ``2**shift`` on its own, which
    overflows a float when the largest weight is subnormal: ``OverflowError: math range error``."""
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=DT)
    tiny = math.ldexp(1.0, -1070)  # subnormal in float64
    got = MetaOptimizer.meta_loss(losses, [tiny, 3 * tiny, 0.0])
    assert got.item() == (1.0 + 3 * 2.0) / 4
    assert torch.equal(got, MetaOptimizer.meta_loss(losses, [1.0, 3.0, 0.0]))


def unequal_tasks() -> list[Task]:
    return make_tasks(n=3, sizes=[5, 5, 6])


CALL_ERRORS = [
    # (id, call(meta), error, match)
    ("tasks-empty", lambda m: m.task_losses([], mse), ValueError,
     r"^tasks must be a non-empty sequence of Task, got 0 tasks$"),
    ("tasks-a-task", lambda m: m.task_losses(TASKS[0], mse), TypeError,
     r"^tasks must be a sequence of Task, got Task$"),
    ("tasks-not-tasks", lambda m: m.task_losses([TASKS[0], (1, 2)], mse), TypeError,
     r"^tasks\[1\] must be a Task, got tuple$"),
    ("evaluate-empty", lambda m: m.evaluate([], mse), ValueError,
     r"^tasks must be a non-empty sequence of Task, got 0 tasks$"),
    ("loss-fn", lambda m: m.task_losses(TASKS, "mse"), TypeError, r"^loss_fn must be callable, got 'mse'$"),
    ("vectorize-not-bool", lambda m: m.task_losses(TASKS, mse, vectorize="yes"), TypeError,
     r"^vectorize must be None or a bool, got 'yes'$"),
    ("vectorize-unequal-shapes", lambda m: m.task_losses(unequal_tasks(), mse, vectorize=True), ValueError,
     r"^vectorize=True cannot be honoured: the tasks do not all have equal shapes, dtypes and devices; "
     r"use vectorize=None/False$"),
    ("evaluate-vectorize-unequal-shapes", lambda m: m.evaluate(unequal_tasks(), mse, vectorize=True), ValueError,
     r"^vectorize=True cannot be honoured: the tasks do not all have equal shapes"),
    ("inner-steps-bool", lambda m: m.task_losses(TASKS, mse, inner_steps=True), TypeError,
     r"^inner_steps must be an integer >= 0, got True$"),
    ("inner-steps-negative", lambda m: m.task_losses(TASKS, mse, inner_steps=-2), ValueError,
     r"^inner_steps must be an integer >= 0, got -2$"),
    ("adapt-inner-steps-float", lambda m: m.adapt(lambda f: f(TASKS[0].support_x).sum(), 1.5), TypeError,
     r"^inner_steps must be an integer >= 0, got 1\.5$"),
    ("inner-step-fn", lambda m: m.task_losses(TASKS, mse, inner_step_fn=3), TypeError,
     r"^inner_step_fn must be callable, got 3$"),
    ("inner-reg-fn", lambda m: m.task_losses(TASKS, mse, inner_reg_fn="l2"), TypeError,
     r"^inner_reg_fn must be callable, got 'l2'$"),
    ("grad-transforms-entry", lambda m: m.task_losses(TASKS, mse, grad_transforms=[NoTransform()]), TypeError,
     r"^grad_transforms entries must have a transform_inner_grads method, got NoTransform\(\)$"),
    ("grad-transforms-not-a-sequence", lambda m: m.task_losses(TASKS, mse, grad_transforms=InnerSAM()), TypeError,
     r"^grad_transforms must be a sequence of inner-loop gradient transforms, got InnerSAM\(rho=0\.05\)$"),
    ("adapt-inner-step-fn", lambda m: m.adapt(lambda f: f(TASKS[0].support_x).sum(), inner_step_fn=3), TypeError,
     r"^inner_step_fn must be callable, got 3$"),
    ("adapt-grad-transforms-entry",
     lambda m: m.adapt(lambda f: f(TASKS[0].support_x).sum(), grad_transforms=[NoTransform()]), TypeError,
     r"^grad_transforms entries must have a transform_inner_grads method, got NoTransform\(\)$"),
    ("adapt-closure", lambda m: m.adapt(3), TypeError, r"^support_closure must be callable, got 3$"),
    ("adapt-weight", lambda m: m.adapt(lambda f: f(TASKS[0].support_x).sum(), weight=-1.0), ValueError,
     r"^weight must be a finite number >= 0, got -1\.0$"),
    ("step-closure", lambda m: m.step(3), TypeError, r"^closure must be callable, got 3$"),
    ("create-graph", lambda m: m.task_losses(TASKS, mse, create_graph="yes"), TypeError,
     r"^create_graph must be a bool, got 'yes'$"),
    ("group-inner-lr-edited", lambda m: (m.param_groups[0].__setitem__("inner_lr", -1.0), m.task_losses(TASKS, mse)),
     ValueError, r"^param_groups\[0\]: inner_lr must be a finite number >= 0, got -1\.0$"),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("call,error,match", [c[1:] for c in CALL_ERRORS], ids=[c[0] for c in CALL_ERRORS])
def test_calls_reject_bad_arguments_with_the_project_message_and_change_nothing(algorithm, call, error, match):
    model = _model()
    meta = CONSTRUCTORS[algorithm](model)
    before = snapshot_weights(meta)
    with pytest.raises(error, match=match):
        call(meta)
    for n, w in before.items():
        assert torch.equal(all_model_tensors(meta)[n], w)


def test_vectorize_true_names_why_vmap_cannot_run_second_order_loops():
    checkpointed = _maml(checkpoint_inner_steps=True, inner_steps=2)
    with pytest.raises(ValueError, match=r"^vectorize=True cannot be honoured: checkpointed inner steps need the loop path"):
        checkpointed.task_losses(TASKS, mse, vectorize=True)
    bn = MAML(MODELS["bn_mlp"](0), torch.optim.SGD, lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"^vectorize=True cannot be honoured: second-order gradients pass through 1 \(BatchNorm1d\), whose double "
        r"backward torch\.func\.vmap gets wrong \(pytorch/functorch#534\); use vectorize=None/False$",
    ):
        bn.task_losses(TASKS, mse, vectorize=True)


def test_other_constructor_and_trainer_errors():
    model = _model()
    with pytest.raises(TypeError, match=r"^Reptile is always first order; got first_order=True$"):
        Reptile(model, torch.optim.SGD, first_order=True, lr=0.1)
    with pytest.raises(TypeError, match=r"^FOMAML is always first order; got first_order=False"):
        FOMAML(model, torch.optim.SGD, first_order=False, lr=0.1)
    with pytest.raises(ValueError, match=r"^head must be a submodule of model"):
        ANIL(model, torch.optim.SGD, head=nn.Linear(5, 1), lr=0.1)
    with pytest.raises(TypeError, match=r"^lrs_group must be a dict of param-group options, got 3$"):
        MetaSGD(model, torch.optim.SGD, lrs_group=3, lr=0.1)
    with pytest.raises(ValueError, match=r"^meta cannot use the compiled path: Reptile forms its outer update"):
        CompiledMetaLoss(Reptile(model, torch.optim.SGD, lr=0.1), mse)
    meta = MAML(model, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"^max_skipped_steps must be an integer >= 1, got 0$"):
        MetaTrainer(meta, mse, ListSampler(TASKS), max_skipped_steps=0)
    with pytest.raises(TypeError, match=r"^inner_step_fn must be callable, got 3$"):
        MetaTrainer(meta, mse, ListSampler(TASKS), inner_step_fn=3)
    with pytest.raises(TypeError, match=r"^grad_transforms entries must have a transform_inner_grads method"):
        MetaTrainer(meta, mse, ListSampler(TASKS), grad_transforms=[NoTransform()])
    trainer = MetaTrainer(meta, mse, ListSampler(TASKS), vectorize=True)
    with pytest.raises(ValueError, match=r"^tasks must not be empty, got 0 tasks$"):
        trainer.train_step([])
    with pytest.raises(ValueError, match=r"^tasks must not be empty, got 0 tasks$"):
        trainer.evaluate([])
    with pytest.raises(ValueError, match=r"vectorize=True cannot be honoured: the tasks do not all have equal shapes"):
        trainer.train_step(unequal_tasks())


def _task_fields(k: int = 5, q: int = 4) -> dict[str, Any]:
    t = make_tasks(n=1, k=k, q=q)[0]
    return {f.name: getattr(t, f.name) for f in dataclasses.fields(Task)}


TASK_ERRORS = [
    # (id, fields replaced in a task of 5 support and 4 query rows, error, match)
    ("list", {"support_x": [[1.0, 2.0]] * 5}, TypeError, r"^support_x must be a torch\.Tensor, got list$"),
    ("tuple", {"support_y": (1.0,) * 5}, TypeError, r"^support_y must be a torch\.Tensor, got tuple$"),
    ("none", {"query_x": None}, TypeError, r"^query_x must be a torch\.Tensor, got NoneType$"),
    ("0-dim", {"query_y": torch.tensor(1.0, dtype=DT)}, ValueError,
     r"^query_y must have a leading dimension of examples, got a 0-dim tensor$"),
    ("support-rows", {"support_y": torch.zeros(3, 1, dtype=DT)}, ValueError,
     r"^support_x and support_y must have the same number of examples \(first dimension\), got 5 and 3 "
     r"\(shapes \(5, 2\) and \(3, 1\)\)$"),
    ("query-rows", {"query_x": torch.zeros(6, 2, dtype=DT)}, ValueError,
     r"^query_x and query_y must have the same number of examples \(first dimension\), got 6 and 4 "
     r"\(shapes \(6, 2\) and \(4, 1\)\)$"),
    ("devices", {"query_y": torch.zeros(4, 1, dtype=DT, device="meta")}, ValueError,
     r"^support_x and query_y must be on the same device, got cpu and meta$"),
]


@pytest.mark.parametrize("fields,error,match", [e[1:] for e in TASK_ERRORS], ids=[e[0] for e in TASK_ERRORS])
def test_a_task_is_checked_when_it_is_built(fields, error, match):
    """Lists were accepted and failed deep inside with AttributeError; a support_y of 3 rows for a
    support_x of 5 failed deep inside with a broadcasting warning and a size error naming nothing."""
    with pytest.raises(error, match=match):
        Task(**{**_task_fields(), **fields})
    with pytest.raises(error, match=match):
        dataclasses.replace(make_tasks(n=1)[0], **fields)


def test_a_task_given_a_numpy_array_is_refused_naming_the_field():
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"^support_x must be a torch\.Tensor, got ndarray$"):
        Task(**{**_task_fields(), "support_x": np.zeros((5, 2))})


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("fields,error,match", [e[1:] for e in TASK_ERRORS], ids=[e[0] for e in TASK_ERRORS])
def test_a_task_whose_field_was_reassigned_is_named_by_its_index(algorithm, fields, error, match):
    """A field set after the task was built is checked by task_losses and evaluate before any
    work, and the message names the task by its index; nothing changes."""
    meta = CONSTRUCTORS[algorithm](_model())
    bad = make_tasks(n=1)[0]
    for name, value in fields.items():
        setattr(bad, name, value)
    match = match.replace("^", r"^tasks\[2\]\.", 1).replace(" and ", r" and tasks\[2\]\.", 1)
    before = snapshot_weights(meta)
    with pytest.raises(error, match=match):
        meta.task_losses([TASKS[0], TASKS[1], bad], mse)
    with pytest.raises(error, match=match):
        meta.evaluate([TASKS[0], TASKS[1], bad], mse)
    for n, w in before.items():
        assert torch.equal(all_model_tensors(meta)[n], w)


def test_valid_tasks_an_empty_query_set_a_parameter_field_and_to_still_work():
    fields = _task_fields()
    fields["query_x"], fields["query_y"] = fields["query_x"][:0], fields["query_y"][:0]  # k_query=0
    no_query = Task(**fields)
    # Reptile scores a task without a query set on its support set: as if the support were the query.
    as_query = Task(no_query.support_x, no_query.support_y, no_query.support_x, no_query.support_y)
    losses = [CONSTRUCTORS["Reptile"](_model()).task_losses([t], mse) for t in (no_query, as_query)]
    assert torch.equal(losses[0], losses[1])
    with pytest.raises(ValueError, match=r"^tasks\[0\] has an empty query set \(query_x of shape \(0, 2\)\)"):
        _maml().task_losses([no_query], mse)
    moved = Task(nn.Parameter(fields["support_x"]), *list(fields.values())[1:]).to(torch.float32)
    assert moved.support_x.dtype == torch.float32 and moved.query_x.shape == (0, 2)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_meta_optimizer_that_adapts_nothing_is_refused_at_use_until_a_group_adapts(algorithm):
    """With every group adapt=False the inner loop silently adapted nothing (task_losses returned
    the un-adapted losses). The groups are read at each use and add_param_group can add adapted
    parameters later, so the refusal is at use -- every entry point, before anything runs."""
    model = _model()
    meta = CONSTRUCTORS[algorithm](model, params=[{"params": model[0].parameters(), "adapt": False}])
    before = snapshot_weights(meta)
    match = (
        rf"^{algorithm} adapts no parameter in the inner loop: every param group has adapt=False; give the "
        r"parameters to adapt a param group with adapt=True \(add_param_group adds one\); to train without "
        r"adaptation, keep such a group and use inner_steps=0$"
    )
    t = TASKS[0]

    def closure():
        meta.zero_grad()
        loss = meta.task_losses(TASKS, mse).mean()
        loss.backward()
        return loss

    calls = [
        lambda: meta.task_losses(TASKS, mse),
        lambda: meta.task_losses(TASKS, mse, inner_steps=0),
        lambda: meta.evaluate(TASKS, mse),
        lambda: meta.adapt(lambda f: mse(f(t.support_x), t.support_y)),
        lambda: meta.clone(),
        lambda: meta.step(closure),
        lambda: MetaTrainer(meta, mse, ListSampler(TASKS)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()
    for n, w in before.items():
        assert torch.equal(all_model_tensors(meta)[n], w)
    # Once a group adapts, it runs as one built with that group from the start.
    rest = [p for i, layer in enumerate(model) if i > 0 for p in layer.parameters()]
    meta.add_param_group({"params": rest})
    twin_model = _model()
    twin = CONSTRUCTORS[algorithm](
        twin_model,
        params=[{"params": twin_model[0].parameters(), "adapt": False},
                {"params": [p for i, layer in enumerate(twin_model) if i > 0 for p in layer.parameters()]}],
    )
    assert meta.inner_loop().adapt_names == twin.inner_loop().adapt_names != ()
    assert torch.equal(meta.task_losses(TASKS, mse), twin.task_losses(TASKS, mse))


def test_metasgd_rates_driven_negative_still_adapt_and_train():
    """Meta-SGD's learned rates may take either sign (Li et al., 2017): negative rates are not
    refused like a negative fixed rate. Reference: phi = theta - alpha * g by hand, and one outer
    SGD step moves every rate by -lr times its meta-gradient."""
    model = _model()
    meta = MetaSGD(model, torch.optim.SGD, lr=0.1, inner_lr=0.05)
    with torch.no_grad():
        for rate in meta.inner_lrs.values():
            rate.copy_(-torch.linspace(0.01, 0.1, rate.numel(), dtype=DT).view_as(rate))
    t = TASKS[0]
    learner = meta.adapt(lambda f: mse(f(t.support_x), t.support_y))
    grads = torch.autograd.grad(mse(model(t.support_x), t.support_y), list(model.parameters()))
    for (n, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(learner.params[n], p - meta.inner_lrs[n] * g, rtol=0, atol=1e-14)
    before = {n: r.detach().clone() for n, r in meta.inner_lrs.items()}

    def closure():
        meta.zero_grad()
        loss = meta.task_losses(TASKS, mse).mean()
        loss.backward()
        return loss

    meta.step(closure)
    assert meta.skipped_steps == 0
    for n, rate in meta.inner_lrs.items():
        assert rate.grad.abs().sum() > 0
        torch.testing.assert_close(rate.detach(), before[n] - 0.1 * rate.grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: InnerSAM(rho=-0.1), ValueError, r"^rho must be a finite number >= 0, got -0\.1$"),
        (lambda: InnerSAM(rho=float("inf")), ValueError, r"^rho must be a finite number >= 0, got inf$"),
        (lambda: InnerSAM(rho=True), TypeError, r"^rho must be a finite number >= 0, got True$"),
        (lambda: AdamInnerStep(eps=0.0), ValueError, r"^eps must be a finite number > 0, got 0\.0$"),
        (lambda: AdamInnerStep(eps=float("inf")), ValueError, r"^eps must be a finite number > 0, got inf$"),
        (lambda: AdamInnerStep(eps="1e-8"), TypeError, r"^eps must be a finite number > 0, got '1e-8'$"),
        (lambda: AdamInnerStep(betas=(0.9, 1.0)), ValueError, r"^betas\[1\] must be a finite number in \[0, 1\), got 1\.0$"),
        (lambda: MomentumInnerStep(momentum=1.0), ValueError, r"^momentum must be a finite number in \[0, 1\), got 1\.0$"),
        (lambda: MomentumInnerStep(momentum=True), TypeError, r"^momentum must be a finite number in \[0, 1\), got True$"),
        (lambda: MomentumInnerStep(dampening=-0.5), ValueError, r"^dampening must be a finite number in \[0, 1\), got -0\.5$"),
        (lambda: MomentumInnerStep(nesterov=1), TypeError, r"^nesterov must be a bool, got 1$"),
    ],
    ids=[
        "sam-rho-negative", "sam-rho-inf", "sam-rho-bool", "adam-eps-zero", "adam-eps-inf", "adam-eps-str",
        "adam-beta2-one", "momentum-one", "momentum-bool", "dampening-negative", "nesterov-int",
    ],
)
def test_inner_rules_reject_bad_hyperparameters_with_the_project_message(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ============================================================================ non-finite steps
def skip_problem(meta) -> str:
    """What a NaN in the update's task field (``MetaInfo.update_field``) makes non-finite."""
    return "the meta-loss is nan" if meta.outer_update == "meta_gradient" else "the pseudo-gradient is not finite"


def skip_warning(meta):
    return pytest.warns(
        RuntimeWarning,
        match=rf"^{type(meta).__name__}: {skip_problem(meta)}; the meta-step is skipped \(weights and outer state unchanged\)$",
    )


def assert_nothing_changed(meta, weights, state):
    for n, w in snapshot_weights(meta).items():
        assert torch.equal(w, weights[n]), f"{n} changed in a skipped step"
    assert_state_equal(meta.state_dict(), state)


#: The first entry of each algorithm, for the checks that need not run over the whole registry.
REPRESENTATIVES = [next(i for i in META_INFOS if i.algorithm == a) for a in ALGORITHMS]
# A NaN in what the update uses on every path of every entry (the query target of the MAML
# family; the support target of Reptile: NaN adapted weights, so a NaN pseudo-gradient); a NaN
# support target also on the loop of one MAML-family entry per algorithm.
NAN_CASES = [(info, path, info.update_field) for info in META_INFOS for path in info.paths if path != "compiled"] + [
    (info, "loop", "support_y") for info in REPRESENTATIVES if info.meta_gradient
]


@pytest.mark.parametrize(
    "info,path,field", NAN_CASES, ids=[f"{i.name}-{p}-{f}" for i, p, f in NAN_CASES]
)
def test_a_nan_task_skips_the_whole_meta_step_and_the_next_step_is_unaffected(info, path, field):
    _, meta = fresh(info)
    one_step(info, meta, TASKS, path)  # the outer optimizer has state now (Adam's moments)
    weights, state = snapshot_weights(meta), copy.deepcopy(meta.state_dict())
    with skip_warning(meta):
        one_step(info, meta, poisoned(TASKS_2, field), path)
    assert meta.skipped_steps == 1
    assert_nothing_changed(meta, weights, state)
    # the next good step is the one of a twin that never saw the bad batch
    _, twin = fresh(info)
    one_step(info, twin, TASKS, path)
    assert_outcomes(one_step(info, meta, TASKS_2, path), one_step(info, twin, TASKS_2, path), rtol=0, atol=0)
    assert meta.skipped_steps == 1 and twin.skipped_steps == 0


@pytest.mark.parametrize("info", [i for i in REPRESENTATIVES if i.meta_gradient], ids=info_id)
def test_a_finite_meta_loss_with_a_nan_meta_gradient_is_skipped(info):
    _, meta = fresh(info)
    one_step(info, meta, TASKS)
    weights, state = snapshot_weights(meta), copy.deepcopy(meta.state_dict())

    def closure():
        meta.zero_grad()
        losses = meta.task_losses(TASKS_2, mse, vectorize=False, **info.inner_options)
        loss = losses.mean() + torch.sqrt(0.0 * losses.sum())  # value + 0, gradient inf * 0 = nan
        loss.backward()
        return loss

    with pytest.warns(
        RuntimeWarning,
        match=rf"^{type(meta).__name__}: a meta-gradient is not finite; the meta-step is skipped",
    ):
        loss = meta.step(closure)
    assert torch.isfinite(loss)
    assert meta.skipped_steps == 1
    assert_nothing_changed(meta, weights, state)


@all_infos
def test_non_finite_raise_raises_floating_point_error_and_changes_nothing(info):
    _, meta = fresh(info, non_finite="raise")
    one_step(info, meta, TASKS)
    weights, state = snapshot_weights(meta), copy.deepcopy(meta.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            FloatingPointError,
            match=rf"^{type(meta).__name__}: {skip_problem(meta)}; the meta-step is skipped .*non_finite='raise' was set$",
        ):
            one_step(info, meta, poisoned(TASKS_2, info.update_field))
    assert meta.skipped_steps == 0
    assert_nothing_changed(meta, weights, state)


@sam_outer_infos
@pytest.mark.parametrize("non_finite", ["skip", "raise"])
def test_outer_sam_nan_at_the_perturbed_point_is_rolled_back(info, non_finite):
    """The SAM outer optimizer evaluates the closure twice; a NaN only in the second evaluation
    (at the perturbed weights) must undo the perturbation too."""
    _, meta = fresh(info, non_finite=non_finite)
    assert isinstance(meta.outer, TransformingOptimizer)
    one_step(info, meta, TASKS)
    weights, state = snapshot_weights(meta), copy.deepcopy(meta.state_dict())
    calls = []
    good = task_losses_closure(info, meta, TASKS_2, "loop", {})
    bad = task_losses_closure(info, meta, poisoned(TASKS_2, info.update_field), "loop", {})

    def closure():
        calls.append(len(calls))
        return good() if len(calls) == 1 else bad()

    if non_finite == "skip":
        with skip_warning(meta):
            meta.step(closure)
        assert meta.skipped_steps == 1
    else:
        with pytest.raises(FloatingPointError, match="non_finite='raise' was set"):
            meta.step(closure)
        assert meta.skipped_steps == 0
    assert calls == [0, 1]
    assert_nothing_changed(meta, weights, state)
    # and a good step afterwards is the one of a twin that never saw the bad evaluation
    _, twin = fresh(info)
    one_step(info, twin, TASKS)
    assert_outcomes(one_step(info, meta, TASKS_2), one_step(info, twin, TASKS_2), rtol=0, atol=0)


reptile_infos = _params([i for i in META_INFOS if not i.meta_gradient])


@pytest.mark.parametrize("path", ["loop", "vmap"])
@reptile_infos
def test_a_nan_in_reptiles_monitoring_query_loss_does_not_skip_its_finite_pseudo_gradient(info, path):
    if path not in info.paths:
        pytest.skip(f"{info.name} has no {path} path")
    _, meta = fresh(info)
    _, twin = fresh(info)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outcome = one_step(info, meta, poisoned(TASKS_2, "query_y"), path)
    assert torch.isnan(outcome.loss) and meta.skipped_steps == 0
    reference = one_step(info, twin, TASKS_2, path)  # the update never reads the query set
    for n in reference.grads:
        assert_tensors(outcome.grads[n], reference.grads[n], 0, 0, f"pseudo-gradient of {n}")
    for n in reference.weights:
        assert_tensors(outcome.weights[n], reference.weights[n], 0, 0, f"weight {n} after the step")
    assert_state_equal(meta.state_dict(), twin.state_dict())


def lbfgs_meta(non_finite: str) -> MAML:
    meta = MAML(MODELS["mlp"](0), torch.optim.LBFGS, inner_lr=0.1, lr=0.5, max_iter=4, non_finite=non_finite)
    meta.step(task_losses_closure(REPRESENTATIVES[0], meta, TASKS, "loop", {}))  # LBFGS has state now
    return meta


@pytest.mark.parametrize(
    "non_finite,failure", [("skip", "nan"), ("raise", "nan"), ("skip", "error")], ids=["skip-nan", "raise-nan", "error"]
)
def test_outer_lbfgs_failing_in_a_later_closure_evaluation_leaves_weights_and_outer_state_unchanged(non_finite, failure):
    """LBFGS moves the weights between its evaluations of the closure: a NaN or an exception in a
    later one must put back the weights and LBFGS's state (its history, counters) exactly."""
    meta = lbfgs_meta(non_finite)
    weights, state = snapshot_weights(meta), copy.deepcopy(meta.state_dict())
    assert state["state"], "LBFGS keeps its state under the first parameter"
    good = task_losses_closure(REPRESENTATIVES[0], meta, TASKS_2, "loop", {})
    bad = task_losses_closure(REPRESENTATIVES[0], meta, poisoned(TASKS_2, "query_y"), "loop", {})
    calls = []

    def closure():
        calls.append(len(calls))
        if len(calls) < 3:
            return good()
        if failure == "error":
            raise RuntimeError("closure failed")
        return bad()

    if failure == "error":
        with pytest.raises(RuntimeError, match="^closure failed$"):
            meta.step(closure)
    elif non_finite == "skip":
        with skip_warning(meta):
            meta.step(closure)
    else:
        with pytest.raises(FloatingPointError, match="non_finite='raise' was set$"):
            meta.step(closure)
    assert len(calls) == 3, "LBFGS stepped between the evaluations"
    assert meta.skipped_steps == (1 if (non_finite, failure) == ("skip", "nan") else 0)
    assert_nothing_changed(meta, weights, state)
    # the next step is the one of a twin that never saw the failed step
    twin = lbfgs_meta(non_finite)
    meta.step(task_losses_closure(REPRESENTATIVES[0], meta, TASKS_2, "loop", {}))
    twin.step(task_losses_closure(REPRESENTATIVES[0], twin, TASKS_2, "loop", {}))
    for n, w in snapshot_weights(twin).items():
        assert_tensors(snapshot_weights(meta)[n], w, 0, 0, f"weight {n} after the next step")
    assert_state_equal(meta.state_dict(), twin.state_dict())


@pytest.mark.parametrize(
    "outer,copies",
    [
        (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), False),
        (lambda params: torch.optim.Adam(params, lr=0.01), False),
        (lambda params: TransformingOptimizer(params, torch.optim.SGD, transforms=[SAM(rho=0.05)], lr=0.1), False),
        (lambda params: TransformingOptimizer(
            params, torch.optim.SGD, transforms=[SAM(rho=0.05)], lr=0.1, atomic=False), True),
        (lambda params: torch.optim.LBFGS(params, lr=0.5, max_iter=2), True),
        (lambda params: OwnSGD(params, lr=0.1), True),
    ],
    ids=["sgd", "adam", "sam", "sam-not-atomic", "lbfgs", "not-torchs"],
)
def test_the_weights_and_outer_state_are_copied_only_when_the_outer_step_is_not_atomic(monkeypatch, outer, copies):
    """torch's optimizers but LBFGS evaluate the closure once, before they write, and an atomic
    TransformingOptimizer undoes its own passes: no copy. LBFGS, a non-atomic
    TransformingOptimizer and unknown optimizers get one."""
    import samgria.meta.base as base

    taken = []

    class CountingSnapshot(base.StepSnapshot):
        def __init__(self, *args, **kwargs):
            taken.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(base, "StepSnapshot", CountingSnapshot)
    model = MODELS["mlp"](0)
    meta = MAML(model, outer(model.parameters()), inner_lr=0.1)
    for _ in range(2):
        meta.step(task_losses_closure(REPRESENTATIVES[0], meta, TASKS, "loop", {}))
    assert len(taken) == (2 if copies else 0)


class OwnSGD(torch.optim.SGD):
    """torch's SGD, defined outside torch.optim: not known to evaluate the closure once."""


# ============================================================================ a transformer
class TinyTransformer(nn.Module):
    """One encoder layer (d_model 8, 2 heads, no dropout) and a linear read-out of the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def transformer_and_tasks():
    torch.manual_seed(0)
    model = TinyTransformer().to(DT)
    g = torch.Generator().manual_seed(3)
    tasks = [
        Task(*(torch.randn(*shape, generator=g, dtype=DT) for shape in ((4, 3, 8), (4, 1), (4, 3, 8), (4, 1))))
        for _ in range(2)
    ]
    return model, tasks


TRANSFORMER_COORDINATES = [
    ("encoder.self_attn.in_proj_weight", (1, 2)),
    ("encoder.self_attn.in_proj_weight", (17, 5)),  # a value projection entry
    ("encoder.linear1.weight", (3, 4)),
    ("encoder.norm1.weight", (2,)),
]


def transformer_meta_gradient(model, tasks, **kwargs):
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, inner_steps=2, lr=0.1, **kwargs)
    meta.zero_grad()
    losses = meta.task_losses(tasks, mse, vectorize=False)
    losses.mean().backward()
    return meta, losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_transformer_second_order_maml_matches_finite_differences_on_the_loop_path():
    model, tasks = transformer_and_tasks()
    meta, _, grads = transformer_meta_gradient(model, tasks)
    first_order_meta, _, first_order = transformer_meta_gradient(model, tasks, first_order=True)
    params = dict(model.named_parameters())

    def meta_loss() -> float:
        return meta.task_losses(tasks, mse, vectorize=False).mean().item()

    h = 1e-5
    for name, index in TRANSFORMER_COORDINATES:
        p = params[name]
        with torch.no_grad():
            original = p[index].item()
            p[index] = original + h
        plus = meta_loss()
        with torch.no_grad():
            p[index] = original - h
        minus = meta_loss()
        with torch.no_grad():
            p[index] = original
        numeric = (plus - minus) / (2 * h)
        assert grads[name][index].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9), name
        # the check can tell second from first order at this coordinate
        assert abs(first_order[name][index].item() - numeric) > 1e-6, name
    # LayerNorm blocks second order under vmap: the default path is the loop, with the same result
    with pytest.raises(ValueError, match=r"second-order gradients may pass through encoder\.norm1 \(LayerNorm\)"):
        meta.task_losses(tasks, mse, vectorize=True)
    meta.zero_grad()
    meta.task_losses(tasks, mse).mean().backward()
    for n, p in params.items():
        assert torch.equal(p.grad, grads[n]), n


def test_transformer_second_order_through_a_learner_runs_attention_twice_differentiably():
    # learn2learn style: the support loss comes from learner(x), outside the engine's inner loop
    model, tasks = transformer_and_tasks()
    _, _, grads = transformer_meta_gradient(model, tasks)
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, inner_steps=2, lr=0.1)
    meta.zero_grad()
    for task in tasks:
        learner = meta.clone()
        for _ in range(2):
            learner.adapt(mse(learner(task.support_x), task.support_y))
        (mse(learner(task.query_x), task.query_y) / len(tasks)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-10, atol=1e-12, msg=n)
    # in float32 too, where torch's default backend is the fused flash kernel on the CPU
    model32 = model.float()
    meta32 = MAML(model32, torch.optim.SGD, inner_lr=0.1, inner_steps=1, lr=0.1)
    learner = meta32.clone()
    task = tasks[0]
    learner.adapt(mse(learner(task.support_x.float()), task.support_y.float()))
    mse(learner(task.query_x.float()), task.query_y.float()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model32.parameters())


def test_transformer_checkpointed_second_order_maml_equals_the_plain_one_exactly():
    model, tasks = transformer_and_tasks()
    _, losses, grads = transformer_meta_gradient(model, tasks)
    _, checkpointed_losses, checkpointed = transformer_meta_gradient(model, tasks, checkpoint_inner_steps=True)
    assert torch.equal(checkpointed_losses, losses)
    for n in grads:
        assert torch.equal(checkpointed[n], grads[n]), n
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("encoder.self_attn"))


def _run_outer_steps(model: nn.Module, meta: Any, steps: int, *, adapt: bool) -> None:
    """``steps`` meta-steps on one fixed regression batch (3 -> 2 features, float64): the query
    loss after adapting on the same batch (``adapt=True``), or the plain loss."""
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def closure():
        meta.zero_grad()
        loss = mse(meta.adapt(lambda f: mse(f(x), y))(x), y) if adapt else ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(steps):
        meta.step(closure)


def test_a_transforming_outer_optimizer_checks_and_restores_its_chain_through_the_meta_checkpoint():
    """The meta-optimizer's state_dict/load_state_dict run the outer TransformingOptimizer's own
    checkpoint steps: another chain is refused naming it, the same chain resumes bit for bit."""
    from samgria.transforms import LAMP

    def build(transforms):
        torch.manual_seed(0)
        model = nn.Linear(3, 2).double()
        outer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=transforms)
        return model, MAML(model, outer, inner_lr=0.1)

    def run(model, meta, steps):
        _run_outer_steps(model, meta, steps, adapt=False)

    model, meta = build([LAMP(1e-2, rollback_len=2, seed=0)])
    run(model, meta, 3)
    saved = copy.deepcopy(meta.state_dict())
    _, other = build([SAM(0.05)])
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"made with the transform chain \['lamp=LAMP\(rollback_len=2, seed=0\)'\], but this optimizer has \['sam=SAM\(\)'\]"):
        other.load_state_dict(saved)
    assert other.state_dict() == before
    resumed_model, resumed = build([LAMP(1e-2, rollback_len=2, seed=0)])
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved)
    run(model, meta, 3)
    run(resumed_model, resumed, 3)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chain", ["lamp", "sam"])
def test_distributed_checkpoint_through_a_meta_optimizer_with_a_transforming_outer_resumes_bit_for_bit(chain):
    """torch.distributed.checkpoint initialises a fresh optimizer's state by a step with lr 0 and
    zero gradients; through a meta-optimizer that step reaches the outer TransformingOptimizer
    from further up the stack, and must still only create state (no weight moves, no closure
    needed), so that a run resumed through get/set_optimizer_state_dict continues bit for bit."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from samgria.transforms import LAMP

    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        transforms = [LAMP(1e-2, rollback_len=2, seed=0)] if chain == "lamp" else [SAM(0.05)]
        outer = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=0.01, transforms=transforms)
        return model, MAML(model, outer, inner_lr=0.1)

    def run(model, meta, steps):
        _run_outer_steps(model, meta, steps, adapt=True)

    fresh_model, fresh_meta = build(0)
    weights = [p.detach().clone() for p in fresh_model.parameters()]
    get_optimizer_state_dict(fresh_model, fresh_meta)
    assert all(torch.equal(p, w) for p, w in zip(fresh_model.parameters(), weights)), "the state-init step moved a weight"

    model, meta = build(0)
    run(model, meta, 2)
    saved = copy.deepcopy(get_optimizer_state_dict(model, meta))
    resumed_model, resumed = build(5)
    resumed_model.load_state_dict(model.state_dict())
    set_optimizer_state_dict(resumed_model, resumed, optim_state_dict=saved)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
    run(model, meta, 3)
    run(resumed_model, resumed, 3)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("outer", ["sgd", "adam"])
@pytest.mark.parametrize("algorithm", ["MAML", "FOMAML", "Reptile", "ANIL"])
def test_distributed_checkpoint_helpers_save_and_resume_every_meta_optimizer_but_metasgd(algorithm, outer):
    """get/set_optimizer_state_dict first create a fresh optimizer's state by a step with lr 0
    and zero gradients (and put lr back only when it returns). Reptile's step refused it (no
    adapted task): the save or resume raised and left lr at 0.0. Every algorithm the guide lists
    saves with no gradients present, resumes into a fresh optimizer and continues bit for bit."""
    import samgria
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        kind, kwargs = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}) if outer == "sgd" else (torch.optim.Adam, {"lr": 0.01})
        extra = {"head": model[2]} if algorithm == "ANIL" else {}
        return model, getattr(samgria, algorithm)(model, kind, inner_lr=0.1, **extra, **kwargs)

    fresh_model, fresh_meta = build(0)
    weights = [p.detach().clone() for p in fresh_model.parameters()]
    get_optimizer_state_dict(fresh_model, fresh_meta)
    assert all(torch.equal(p, w) for p, w in zip(fresh_model.parameters(), weights))
    assert fresh_meta.param_groups[0]["lr"] == (0.1 if outer == "sgd" else 0.01)

    model, meta = build(0)
    _run_outer_steps(model, meta, 2, adapt=True)
    meta.zero_grad()
    saved = copy.deepcopy(get_optimizer_state_dict(model, meta))
    assert meta.param_groups[0]["lr"] == (0.1 if outer == "sgd" else 0.01)
    resumed_model, resumed = build(5)
    resumed_model.load_state_dict(model.state_dict())
    set_optimizer_state_dict(resumed_model, resumed, optim_state_dict=saved)
    assert resumed.param_groups[0]["lr"] == meta.param_groups[0]["lr"]
    _run_outer_steps(model, meta, 3, adapt=True)
    _run_outer_steps(resumed_model, resumed, 3, adapt=True)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "key, value, error",
    [("inner_lr", -1.0, ValueError), ("inner_lr", "0.1", TypeError), ("adapt", "no", TypeError)],
)
@pytest.mark.parametrize("algorithm", ["MAML", "FOMAML", "Reptile", "MetaSGD", "ANIL"])
def test_a_checkpoint_with_an_invalid_group_value_is_refused_at_load_and_changes_nothing(algorithm, key, value, error):
    """The load promises to check everything before anything changes; a checkpoint's inner_lr or
    adapt that the constructor refuses was installed and failed only at the next step."""
    import samgria

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        extra = {"head": model[2]} if algorithm == "ANIL" else {}
        return model, getattr(samgria, algorithm)(model, torch.optim.Adam, inner_lr=0.1, lr=0.01, **extra)

    model, meta = build()
    _run_outer_steps(model, meta, 1, adapt=True)
    saved = copy.deepcopy(meta.state_dict())
    saved["param_groups"][0][key] = value
    before = copy.deepcopy(meta.state_dict())
    with pytest.raises(error, match=rf"^the checkpoint's param_groups\[0\]: {key} must be"):
        meta.load_state_dict(saved)
    after = meta.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, entry in before["state"].items():
        for name, value_before in entry.items():
            assert torch.equal(torch.as_tensor(after["state"][index][name]), torch.as_tensor(value_before))


def test_checkpoints_of_a_driven_transforming_optimizer_register_no_hooks():
    """Reading the state of a TransformingOptimizer driven by a meta-optimizer (its state_dict(),
    DCP's get_optimizer_state_dict) registered its packing hook once more per call: the hooks,
    and the time of every later call, grew with the number of checkpoints."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    outer = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=1e-3, transforms=[SAM(0.05)])
    meta = MAML(model, outer, inner_lr=0.01)
    _run_outer_steps(model, meta, 1, adapt=True)

    def hook_counts():
        return [
            len(getattr(optimizer, name))
            for optimizer in (meta, outer, outer.inner)
            for name in ("_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_post_hooks")
        ]

    before = hook_counts()
    for _ in range(3):
        outer.state_dict()
        get_optimizer_state_dict(model, outer)
        outer.load_state_dict(outer.state_dict())
        meta.load_state_dict(meta.state_dict())
    assert hook_counts() == before


def test_an_outer_optimizer_already_driven_by_a_wrapper_is_refused():
    model = nn.Linear(3, 2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = TransformingOptimizer(base, transforms=[SAM(0.05)])  # alive: it drives base
    with pytest.raises(ValueError, match=r"outer is already driven by a TransformingOptimizer"):
        MAML(model, base, inner_lr=0.1)
    assert "inner_lr" not in base.param_groups[0]
    assert base.state._owner is wrapper


class _TimmStyleLookahead(torch.optim.Optimizer):
    """timm's ``Lookahead``'s construction: the base optimizer's defaults and param groups
    shared, ``self.state`` left empty, every state kept in the base optimizer it holds."""

    def __init__(self, base_optimizer, alpha=0.5, k=6):
        self._base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self.defaults.update(lookahead_alpha=alpha, lookahead_k=k, lookahead_step=0)
        self.state = collections.defaultdict(dict)
        self._optimizer_step_pre_hooks = collections.OrderedDict()
        self._optimizer_step_post_hooks = collections.OrderedDict()
        for group in base_optimizer.param_groups:
            group.update(lookahead_alpha=alpha, lookahead_k=k, lookahead_step=0)

    def step(self, closure=None):
        return self._base_optimizer.step(closure)

    def state_dict(self):
        return self._base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self._base_optimizer.load_state_dict(state_dict)
        self.param_groups = self._base_optimizer.param_groups


def test_an_outer_optimizer_that_keeps_its_state_in_another_optimizer_is_refused_unchanged():
    """The meta-optimizer's checkpoints and atomic outer step see the outer optimizer's state:
    one that keeps it in an optimizer it holds (timm's Lookahead) is refused at construction, and
    left as it was (no inner_lr in its groups, its state not taken over)."""
    model = nn.Linear(3, 2)
    lookahead = _TimmStyleLookahead(torch.optim.Adam(model.parameters(), lr=0.1), k=2)
    groups = copy.deepcopy([{k: v for k, v in group.items() if k != "params"} for group in lookahead.param_groups])
    message = (
        r"^outer must be an optimizer that keeps its own state, got a _TimmStyleLookahead, which holds "
        r"another optimizer \(its attribute '_base_optimizer', an Adam\) and keeps its state there, where "
        r"the wrapper's checkpoints and atomic steps cannot see it: wrap the optimizer it holds instead$"
    )
    with pytest.raises(TypeError, match=message):
        MAML(model, lookahead, inner_lr=0.1)
    assert [{k: v for k, v in group.items() if k != "params"} for group in lookahead.param_groups] == groups
    assert type(lookahead._base_optimizer.state) is collections.defaultdict and not lookahead._base_optimizer.state

    class BuiltLookahead(_TimmStyleLookahead):
        def __init__(self, params, lr=0.1):
            super().__init__(torch.optim.Adam(params, lr=lr), k=2)

    with pytest.raises(TypeError, match=message.replace("_TimmStyleLookahead", "BuiltLookahead")):
        MAML(model, BuiltLookahead, lr=0.1, inner_lr=0.1)


def test_an_outer_optimizer_whose_step_requires_other_arguments_is_refused_unchanged():
    """The meta-optimizer calls the outer step with a closure at most: a step that requires more
    is refused at construction (it failed at the first meta-step), the optimizer left as it was;
    one that only requires the closure (LBFGS-like) stays accepted."""

    class NeedsScale(torch.optim.SGD):
        def step(self, closure=None, *, scale):
            return super().step(closure)

    class NeedsClosure(torch.optim.SGD):
        def step(self, closure):
            return super().step(closure)

    model = nn.Linear(3, 2)
    outer = NeedsScale(model.parameters(), lr=0.1)
    message = (
        r"^outer must be an optimizer whose step\(\) takes no arguments but a closure, got NeedsScale, "
        r"whose step\(\) requires 'scale', which the wrapper cannot pass: use it on its own$"
    )
    with pytest.raises(TypeError, match=message):
        MAML(model, outer, inner_lr=0.1)
    assert "inner_lr" not in outer.param_groups[0] and type(outer.state) is collections.defaultdict
    with pytest.raises(TypeError, match=message):
        MAML(model, NeedsScale, lr=0.1, inner_lr=0.1)
    MAML(nn.Linear(3, 2), NeedsClosure, lr=0.1, inner_lr=0.1)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_meta_optimizer_with_a_scheduler_steps_its_own_model(how):
    """An LR scheduler patches ``meta.step`` on the instance; the copy (torch.save/load or
    deepcopy, with its model) must step its own parameters, not the original's."""
    from samgria import FOMAML

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(DT)
    meta = FOMAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(meta, step_size=1, gamma=0.5)
    tasks = make_tasks()
    meta.step(lambda: _meta_loss_backward(meta, tasks))
    scheduler.step()
    if how == "deepcopy":
        model_copy, meta_copy = copy.deepcopy((model, meta))
    else:
        buffer = io.BytesIO()
        torch.save((model, meta), buffer)
        buffer.seek(0)
        model_copy, meta_copy = torch.load(buffer, weights_only=False)
    original = [p.detach().clone() for p in model.parameters()]
    copied = [p.detach().clone() for p in model_copy.parameters()]
    meta_copy.step(lambda: _meta_loss_backward(meta_copy, tasks))
    assert all(torch.equal(a, b) for a, b in zip(original, model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(copied, model_copy.parameters()))


def _meta_loss_backward(meta, tasks):
    meta.zero_grad()
    loss = meta.task_losses(tasks, mse).mean()
    loss.backward()
    return loss


@pytest.mark.parametrize("algorithm", ["MAML", "Reptile", "ANIL"])
def test_add_param_group_takes_edited_defaults_as_torch_does(algorithm):
    """torch's add_param_group fills a new group from ``optimizer.defaults``; an edit of a
    meta-optimizer's defaults (the outer lr, inner_lr) was ignored."""
    import samgria

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    extra = {"head": model[2]} if algorithm == "ANIL" else {}
    meta = getattr(samgria, algorithm)(
        model, torch.optim.SGD, inner_lr=0.05, lr=0.1, momentum=0.9, params=model[0].parameters(), **extra
    )
    meta.defaults["lr"] = 0.5
    meta.defaults["inner_lr"] = 0.3
    meta.add_param_group({"params": model[2].parameters()})
    group = meta.param_groups[1]
    assert (group["lr"], group["inner_lr"], group["momentum"], group["adapt"]) == (0.5, 0.3, 0.9, True)
    assert meta.param_groups[0]["inner_lr"] == 0.05 and meta.inner_lr == 0.05


@pytest.mark.parametrize("vectorize", [False, True])
def test_evaluation_inside_inference_mode_adapts_as_under_no_grad(vectorize):
    """An evaluation inside torch.inference_mode worked on the vmap path but raised on the loop
    path, blaming the user's loss ("the support loss does not depend on any parameter that
    requires grad"): the inner loop leaves inference mode, as the torch.func paths do, and both
    paths give the evaluation outside it; so does a learner's adapt_on."""
    from samgria import MAML, SinusoidTaskSampler

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    meta = MAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.05, inner_steps=2)
    tasks = SinusoidTaskSampler(k_support=5, k_query=5, seed=0).sample(3)
    expected = meta.evaluate(tasks, mse, vectorize=vectorize)
    with torch.inference_mode():
        assert meta.evaluate(tasks, mse, vectorize=vectorize) == expected
    task = tasks[0]
    learner = meta.clone().adapt_on(mse, task.support_x, task.support_y)
    with torch.inference_mode():
        inferred = meta.clone().adapt_on(mse, task.support_x, task.support_y)
        assert torch.equal(inferred(task.query_x), learner(task.query_x).detach())


# -- an outer step torch's optimizer fails half-way ----------------------------------------------------
def _shaped_meta(algorithm: str, outputs: int, groups: bool = False):
    """A meta-optimizer over Adam for a 3 -> 4 -> ``outputs`` MLP (as many parameters for any
    ``outputs``, of other shapes); ``groups``: one param group per layer."""
    import samgria

    torch.manual_seed(outputs)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs)).double()
    params = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}] if groups else None
    extra = {"params": params} if params is not None else {}
    return model, getattr(samgria, algorithm)(model, torch.optim.Adam, lr=1e-2, inner_lr=0.1, **extra)


def _meta_closure(model, meta):
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, model[2].out_features, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def closure():
        meta.zero_grad()
        learner = meta.adapt(lambda f: mse(f(x), y))
        loss = mse(learner(x), y)
        if not isinstance(meta, Reptile):
            loss.backward()
        return loss

    return closure


def _meta_snapshot(model, meta):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(meta.state_dict())


def _assert_meta_unchanged(model, meta, snapshot):
    weights, state_dict = snapshot
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    from state_helpers import assert_state_dicts_equal

    assert_state_dicts_equal(meta.state_dict(), state_dict)


@pytest.mark.parametrize("with_closure", [True, False])
@pytest.mark.parametrize("algorithm", ["MAML", "FOMAML", "Reptile"])
def test_an_outer_step_failing_on_a_loaded_state_of_other_shapes_changes_nothing(algorithm, with_closure):
    """torch accepts a checkpoint of a model with as many parameters of other shapes and its Adam
    finds the misfit while it writes: the first tensors stepped, and stayed stepped (a
    TransformingOptimizer undid it; the meta-optimizers took no copy for torch's optimizers)."""
    model, meta = _shaped_meta(algorithm, 1)
    meta.step(_meta_closure(model, meta))
    checkpoint = copy.deepcopy(meta.state_dict())
    model, meta = _shaped_meta(algorithm, 2)
    meta.step(_meta_closure(model, meta))
    meta.load_state_dict(checkpoint)
    snapshot = _meta_snapshot(model, meta)
    with pytest.raises(RuntimeError, match="shape"):
        if with_closure:
            meta.step(_meta_closure(model, meta))
        else:
            closure = _meta_closure(model, meta)
            closure()
            meta.step()
    _assert_meta_unchanged(model, meta, snapshot)


@pytest.mark.parametrize("with_closure", [True, False])
@pytest.mark.parametrize("algorithm", ["MAML", "Reptile"])
def test_an_outer_group_value_torch_would_use_only_as_it_writes_is_refused_before_the_step(algorithm, with_closure):
    model, meta = _shaped_meta(algorithm, 2, groups=True)
    meta.step(_meta_closure(model, meta))
    meta.param_groups[1]["eps"] = "1e-8"
    snapshot = _meta_snapshot(model, meta)
    with pytest.raises(TypeError, match=r"^param_groups\[1\]: eps must be a real number \(Python or a NumPy scalar\) or a one-element real tensor, got '1e-8'$"):
        if with_closure:
            meta.step(_meta_closure(model, meta))
        else:
            _meta_closure(model, meta)()
            meta.step()
    _assert_meta_unchanged(model, meta, snapshot)


@pytest.mark.parametrize("route", ["task_losses", "evaluate", "trainer.train_step", "trainer.evaluate"])
@pytest.mark.parametrize("algorithm", ["MAML", "Reptile"])
def test_a_task_with_an_empty_support_set_is_refused_where_it_would_be_adapted(algorithm, route):
    """An empty support loss has a zero gradient: nothing adapted, without a word, and on the vmap
    path torch's mse_loss backward divided by zero, which turned the vmap path off for the run."""
    import samgria

    torch.manual_seed(0)
    model = nn.Linear(1, 1).double()
    meta = getattr(samgria, algorithm)(model, torch.optim.SGD, lr=0.1, inner_lr=0.5)
    x = torch.randn(4, 1, dtype=torch.float64)
    tasks = [Task(x, 3 * x, x, 3 * x), Task(x[:0], 3 * x[:0], x, 3 * x)]
    trainer = MetaTrainer(meta, mse, ListSampler(tasks))
    weights = [p.detach().clone() for p in model.parameters()]
    run = {
        "task_losses": lambda: meta.task_losses(tasks, mse),
        "evaluate": lambda: meta.evaluate(tasks, mse),
        "trainer.train_step": lambda: trainer.train_step(tasks),
        "trainer.evaluate": lambda: trainer.evaluate(tasks),
    }[route]
    with pytest.raises(
        ValueError,
        match=rf"^tasks\[1\] has an empty support set \(support_x of shape \(0, 1\)\), on which {algorithm} would "
        r"take 1 inner step\(s\): .*use inner_steps=0 to score tasks without adapting",
    ):
        run()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert meta.path_policy.failed == {}
    with torch.no_grad():
        unadapted = float(mse(model(x), 3 * x))
    assert meta.evaluate(tasks, mse, inner_steps=0) == pytest.approx(unadapted)


@pytest.mark.parametrize("algorithm", ["MAML", "Reptile"])
def test_the_meta_step_builder_refuses_a_support_set_without_examples_where_it_would_adapt(algorithm):
    """As a Task with an empty support set: MAML's query loss was the unadapted one and Reptile's
    reported loss NaN, without a word and without a skipped step."""
    import samgria
    from samgria.meta import meta_step

    torch.manual_seed(0)
    model = nn.Linear(1, 1).double()
    meta = getattr(samgria, algorithm)(model, torch.optim.SGD, lr=0.1, inner_lr=0.5)
    x = torch.randn(4, 1, dtype=torch.float64)
    empty = (x[:0], 3 * x[:0])
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        ValueError,
        match=rf"^support has no examples \(inputs of shape \(0, 1\)\), on which {algorithm} would take 1 inner step",
    ):
        with meta_step(meta, loss_fn=mse) as builder:
            builder.task(support=empty, query=(x, 3 * x))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    with meta_step(meta, loss_fn=mse) as builder:  # nothing to adapt: scored as it is
        loss = builder.task(support=empty, query=(x, 3 * x), inner_steps=0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("built", [False, True], ids=["class", "built"])
def test_named_parameters_are_taken_as_torch_takes_them(algorithm, built):
    """torch's optimizers take ``(name, tensor)`` pairs (``model.named_parameters()``) and keep
    the names in ``param_names``: MetaSGD raised torch's 'all optimizer param groups should be
    with/without names' for its rates group (an already built optimizer was left with inner_lr
    and adapt in its groups), and add_param_group with pairs raised AttributeError ('tuple'
    object has no attribute 'shape'). Named and unnamed twins train bit for bit alike."""
    import samgria

    def build(named):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
        extra = {"head": model[2]} if algorithm == "ANIL" else {}
        if algorithm != "FOMAML" and algorithm != "Reptile":
            extra["first_order"] = False
        first = model[0].named_parameters(prefix="0") if named else model[0].parameters()
        if built:
            outer = torch.optim.Adam(first, lr=0.05)
            meta = getattr(samgria, algorithm)(model, outer, inner_lr=0.1, **extra)
        else:
            meta = getattr(samgria, algorithm)(model, torch.optim.Adam, inner_lr=0.1, lr=0.05, params=first, **extra)
        rest = list(model[2].named_parameters(prefix="2")) if named else list(model[2].parameters())
        meta.add_param_group({"params": rest, "inner_lr": 0.2})
        return model, meta

    tasks = make_tasks(3, seed=1)
    runs = []
    for named in (False, True):
        model, meta = build(named)
        for _ in range(2):
            def closure():
                meta.zero_grad()
                loss = meta.task_losses(tasks, mse).mean()
                if meta.outer_update == "meta_gradient":
                    loss.backward()
                return loss

            meta.step(closure)
        runs.append((model, meta))
    (plain, plain_meta), (named_model, named_meta) = runs
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), named_model.parameters()))
    names = [group.get("param_names") for group in named_meta.state_dict()["param_groups"]]
    assert names[0] == ["0.weight", "0.bias"] and names[-1] == ["2.weight", "2.bias"]
    if algorithm == "MetaSGD":
        assert names[1] == ["inner_lrs.0.weight", "inner_lrs.0.bias", "inner_lrs.2.weight", "inner_lrs.2.bias"]
        assert all(torch.equal(plain_meta.inner_lrs[n], named_meta.inner_lrs[n]) for n in plain_meta.inner_lrs)
    _, twin = build(True)
    twin.load_state_dict(named_meta.state_dict())  # a named checkpoint loads into a named twin
    assert all("param_names" not in group for group in plain_meta.param_groups)
    count = len(named_meta.param_groups)
    refusal = rf"^param_groups\[{count}\]: params must hold tensors \(or \(name, tensor\) pairs\), got 1\.0$"
    with pytest.raises(TypeError, match=refusal):  # was AttributeError: 'float' object has no attribute 'shape'
        named_meta.add_param_group({"params": [1.0]})
    assert len(named_meta.param_groups) == count


@pytest.mark.parametrize("register", ["register_step_post_hook", "register_state_dict_pre_hook", "register_load_state_dict_post_hook"])
def test_taking_over_an_outer_optimizer_with_hooks_of_its_own_warns_that_they_do_not_run(register):
    # The meta-optimizer steps, packs and loads its outer optimizer with its own hooks: a hook
    # registered on the outer optimizer before never ran again, and nothing said so.
    info = META_INFOS[0]
    assert info.algorithm == "MAML" and info.outer == "sgd"
    model = info.make_model(0)
    outer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    getattr(outer, register)(lambda *args: calls.append(register))
    with pytest.warns(UserWarning, match=rf"^outer has hooks of its own \(1 {register}\), which the MAML does not run: .*register them on the MAML instead$"):
        meta = MAML(model, outer, inner_lr=info.inner_lr)
    one_step(info, meta, TASKS)
    meta.load_state_dict(meta.state_dict())
    assert calls == []  # as the warning says


def test_taking_over_an_outer_optimizer_whose_hooks_were_removed_does_not_warn():
    model = nn.Linear(2, 1).to(DT)
    outer = torch.optim.Adam(model.parameters(), lr=0.1)
    outer.register_step_post_hook(lambda *args: None).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MAML(model, outer, inner_lr=0.1)
