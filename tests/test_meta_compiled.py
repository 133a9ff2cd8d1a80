"""Tests for samgria.meta.compiled and ``MetaTrainer(compile=True)``.

The reference for the compiled meta-gradient is the uncompiled vmap path
(``meta.task_losses(tasks, loss_fn, vectorize=True).mean().backward()``), itself checked
against finite differences and hand-written loops in ``test_meta_vectorize.py``. The reference
for ``MetaTrainer(compile=True).fit`` is ``MetaTrainer(compile=False).fit`` from the same
initial weights.

``torch.compile`` with the inductor backend takes seconds per configuration on a CPU, so only
the four gradient tests compile with it (one program per algorithm, shared through a
module-scoped fixture; the trainer tests reuse the MAML program: ``torch.compile`` caches by
code and guards, not by instance). Everything else uses a counting eager backend.
"""

from __future__ import annotations

import gc
import inspect
import re
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from samgria.data import SinusoidTaskSampler, Task
from samgria.meta.anil import ANIL
from samgria.meta.base import MetaOptimizer
from samgria.meta.compiled import CompiledMetaLoss, check_compile_options, compiled_path_blocker
from samgria.meta.maml import FOMAML, MAML
from samgria.meta.metasgd import MetaSGD
from samgria.meta.reptile import Reptile
from samgria.meta.trainer import MetaTrainer
from samgria.optim import TransformingOptimizer
from samgria.transforms import SAM

DT = torch.float64
INNER_LR, STEPS = 0.05, 2


@pytest.fixture(scope="module", autouse=True)
def _dynamo_settings():
    """One intra-op thread (tiny models) and room for every program this file compiles."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    torch.set_num_threads(threads)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)


def make_meta(algorithm: str, model: nn.Module, outer=torch.optim.SGD, **outer_kwargs) -> MetaOptimizer:
    kwargs = {"inner_lr": INNER_LR, "inner_steps": STEPS, **outer_kwargs}
    if outer is torch.optim.SGD and "lr" not in kwargs:
        kwargs["lr"] = 0.1
    if algorithm == "maml":
        return MAML(model, outer, **kwargs)
    if algorithm == "fomaml":
        return FOMAML(model, outer, **kwargs)
    if algorithm == "metasgd":
        return MetaSGD(model, outer, **kwargs)
    if algorithm == "anil":
        return ANIL(model, outer, head=model[2], **kwargs)
    raise AssertionError(algorithm)


def sample_tasks(count: int, seed: int = 0, k: int = 5) -> list[Task]:
    return SinusoidTaskSampler(k_support=k, k_query=k, seed=seed, dtype=DT).sample(count)


class ListSampler:
    """Deterministic sampler: the i-th call returns ``batches[i]``."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def sample(self, n):
        batch = self.batches[self.position]
        self.position += 1
        assert len(batch) == n
        return batch


class CountingBackend:
    """A ``torch.compile`` backend that runs the captured graph eagerly and counts compilations."""

    def __init__(self):
        self.compilations = 0

    def __call__(self, graph_module, example_inputs):
        self.compilations += 1
        return graph_module.forward


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("backend exploded on purpose")


def vmap_reference(meta: MetaOptimizer, tasks: list[Task]) -> tuple[torch.Tensor, dict[torch.Tensor, torch.Tensor]]:
    meta.zero_grad()
    loss = meta.task_losses(tasks, F.mse_loss, vectorize=True).mean()
    loss.backward()
    params = [p for group in meta.param_groups for p in group["params"]]
    grads = {p: p.grad.clone() for p in params}
    meta.zero_grad()
    return loss.detach(), grads


@pytest.fixture(scope="module")
def inductor_programs():
    """``{algorithm: (meta, CompiledMetaLoss)}``, built on first use and shared by the tests."""
    return {}


def compiled_for(programs, algorithm):
    if algorithm not in programs:
        meta = make_meta(algorithm, make_model())
        programs[algorithm] = (meta, CompiledMetaLoss(meta, F.mse_loss))
    return programs[algorithm]


# ---------------------------------------------------------------- the compiled meta-gradient
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "anil"])
def test_compiled_meta_gradient_equals_vmap_meta_gradient(inductor_programs, algorithm):
    meta, compiled = compiled_for(inductor_programs, algorithm)
    tasks = sample_tasks(4, seed=1)
    loss, grads = compiled(tasks)
    ref_loss, ref_grads = vmap_reference(meta, tasks)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert set(grads) == set(ref_grads)  # every meta-parameter, nothing else
    for p, g in ref_grads.items():
        assert grads[p].dtype == DT and grads[p].shape == p.shape
        torch.testing.assert_close(grads[p], g, rtol=1e-9, atol=1e-12)
    if algorithm == "metasgd":  # the rates are meta-parameters with a real gradient
        assert set(meta.inner_lrs.values()) <= set(grads)
        assert all(float(grads[r].abs().sum()) > 0 for r in meta.inner_lrs.values())
    if algorithm == "anil":  # the body is not adapted but gets a meta-gradient
        assert meta._adapt_config()[0] == ["2.weight", "2.bias"]
        assert float(grads[meta.model[0].weight].abs().sum()) > 0
    # Different weights, same program: the result follows the current meta-parameters.
    with torch.no_grad():
        for p in meta.model.parameters():
            p.mul_(0.9)
    loss2, grads2 = compiled(tasks)
    ref_loss2, ref_grads2 = vmap_reference(meta, tasks)
    torch.testing.assert_close(loss2, ref_loss2, rtol=1e-10, atol=1e-12)
    for p, g in ref_grads2.items():
        torch.testing.assert_close(grads2[p], g, rtol=1e-9, atol=1e-12)
    assert compiled.num_programs == 1


def test_backward_accumulates_like_autograd(inductor_programs):
    meta, compiled = compiled_for(inductor_programs, "maml")
    tasks = sample_tasks(4, seed=2)
    _, ref = vmap_reference(meta, tasks)
    weight = meta.model[0].weight
    weight.grad = torch.ones_like(weight)
    meta.model[0].bias.grad = None
    loss = compiled.backward(tasks)
    assert loss.dim() == 0 and not loss.requires_grad
    torch.testing.assert_close(weight.grad, ref[weight] + 1.0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(meta.model[0].bias.grad, ref[meta.model[0].bias], rtol=1e-9, atol=1e-12)
    meta.zero_grad()


# ---------------------------------------------------------------- MetaTrainer(compile=True)
def fit(algorithm, compile, batches, outer=torch.optim.Adam, iterations=3, **outer_kwargs):
    model = make_model()
    if outer is torch.optim.Adam:
        outer_kwargs.setdefault("lr", 1e-2)
    meta = make_meta(algorithm, model, outer, **outer_kwargs)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler(batches), compile=compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(iterations, len(batches[0]), progress=False)
    return model, meta, history, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def assert_same_training(a, b, rtol=1e-8, atol=1e-10, state_rtol=None, state_atol=None):
    """Same meta-losses and weights (within ``rtol``/``atol``) and the same outer-optimizer state
    (within ``state_rtol``/``state_atol``, by default the same)."""
    state_rtol = rtol if state_rtol is None else state_rtol
    state_atol = atol if state_atol is None else state_atol
    (model_a, meta_a, hist_a, _), (model_b, meta_b, hist_b, _) = a, b
    assert hist_a.meta_loss == pytest.approx(hist_b.meta_loss, rel=rtol, abs=atol)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
    assert not torch.equal(next(model_a.parameters()), next(make_model().parameters()))  # it trained
    state_a, state_b = meta_a.state_dict()["state"], meta_b.state_dict()["state"]  # the outer optimizer's too
    assert state_a.keys() == state_b.keys()
    for index, entry in state_a.items():
        assert entry.keys() == state_b[index].keys()
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, state_b[index][key], rtol=state_rtol, atol=state_atol)
            else:
                assert value == state_b[index][key]


def test_fit_compiled_equals_fit_uncompiled(inductor_programs):
    compiled_for(inductor_programs, "maml")  # the program these trainers reuse
    batches = [sample_tasks(4, seed=10 + i) for i in range(3)]
    graphs = counters["stats"]["unique_graphs"]
    compiled = fit("maml", True, batches)
    assert counters["stats"]["unique_graphs"] == graphs + 1  # compiled once, not run eagerly
    plain = fit("maml", False, batches)
    assert compiled[3] == []  # no fallback warning
    assert_same_training(compiled, plain)


def test_fit_compiled_with_sam_outer_reevaluates_at_the_perturbed_weights(inductor_programs):
    compiled_for(inductor_programs, "maml")
    batches = [sample_tasks(4, seed=20 + i) for i in range(2)]

    def run(compile):
        model = make_model()
        outer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(rho=0.05)])
        meta = MAML(model, outer, inner_lr=INNER_LR, inner_steps=STEPS)
        trainer = MetaTrainer(meta, F.mse_loss, ListSampler(batches), compile=compile)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback
            history = trainer.fit(2, 4, progress=False)
        return model, meta, history, []

    with_sam = run(True)
    assert_same_training(with_sam, run(False))
    # SAM's update differs from plain SGD's: the second evaluation really happened.
    plain_sgd = fit("maml", False, batches, outer=torch.optim.SGD, iterations=2, lr=0.1)
    assert not torch.allclose(with_sam[0][0].weight, plain_sgd[0][0].weight, rtol=0, atol=1e-8)


# ---------------------------------------------------------------- fallbacks (no compilation)
def test_reptile_falls_back_with_one_warning():
    batches = [sample_tasks(3, seed=30 + i) for i in range(3)]

    def run(compile):
        model = make_model()
        meta = Reptile(model, torch.optim.SGD, lr=0.5, inner_lr=INNER_LR, inner_steps=STEPS)
        trainer = MetaTrainer(meta, F.mse_loss, ListSampler(batches), compile=compile)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = trainer.fit(3, 3, progress=False)
        return model, meta, history, caught

    compiled, plain = run(True), run(False)
    assert [str(w.message) for w in compiled[3]] == [
        "MetaTrainer(compile=True): Reptile forms its outer update from the adapted weights "
        "(outer_update='pseudo_gradient'), not from a meta-gradient; using the uncompiled path"
    ]
    assert compiled[3][0].category is RuntimeWarning
    assert compiled[3][0].filename == __file__  # points at the caller of fit
    assert plain[3] == []
    assert_same_training(compiled, plain, rtol=0, atol=0)


def test_second_order_through_batchnorm_falls_back_with_one_warning():
    batches = [sample_tasks(4, seed=40 + i) for i in range(2)]

    def run(compile):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
        meta = MAML(model, torch.optim.SGD, lr=0.1, inner_lr=INNER_LR, inner_steps=STEPS)
        trainer = MetaTrainer(meta, F.mse_loss, ListSampler(batches), compile=compile)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(2, 4, progress=False)
        return model, caught

    (model_c, caught), (model_p, _) = run(True), run(False)
    assert len(caught) == 1
    assert "second-order gradients pass through 1 (BatchNorm1d), whose double backward torch.func.vmap gets wrong" in str(caught[0].message)
    for p, q in zip(model_c.parameters(), model_p.parameters()):
        assert torch.equal(p, q)


def test_unequal_task_shapes_fall_back_with_one_warning():
    ragged = [sample_tasks(1, seed=50, k=3)[0], sample_tasks(1, seed=51, k=5)[0]]
    batches = [ragged, list(reversed(ragged))]
    compiled = fit("maml", True, batches, iterations=2)
    plain = fit("maml", False, batches, iterations=2)
    assert [str(w.message) for w in compiled[3]] == [
        "MetaTrainer(compile=True): the tasks do not all have equal shapes, dtypes and devices; "
        "using the uncompiled path"
    ]
    assert_same_training(compiled, plain, rtol=0, atol=0)


def test_compilation_error_falls_back_once_and_stays_off():
    batches = [sample_tasks(4, seed=60 + i) for i in range(3)]
    model = make_model()
    meta = make_meta("maml", model, torch.optim.Adam, lr=1e-2)
    trainer = MetaTrainer(
        meta, F.mse_loss, ListSampler(batches), compile=True, compile_options={"backend": failing_backend}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(3, 4, progress=False)
    assert trainer.compiled_loss is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "the compiled path failed" in messages[0] and "backend exploded on purpose" in messages[0]
    assert "this step ran on the loop path, and the compiled path is not tried again" in messages[0]
    plain = fit("maml", False, batches)
    # The weights match bit for bit. Adam's moments match to rounding only: the failed compiled
    # iteration ran the loop path outside the loop/vmap measurement, so the next two iterations
    # take the paths in the other order (loop, vmap against vmap, loop: equal up to rounding).
    assert_same_training((model, meta, history, []), plain, rtol=0, atol=0, state_rtol=1e-12, state_atol=1e-15)


def test_error_of_the_users_loss_fn_propagates_and_keeps_compile_on():
    state = {"broken": True}

    def sometimes_broken_mse(prediction, target):
        if state["broken"]:
            raise KeyError("user bug")
        return F.mse_loss(prediction, target)

    backend = CountingBackend()
    meta = make_meta("maml", make_model(), lr=0.1)
    before = [p.detach().clone() for p in meta.model.parameters()]
    trainer = MetaTrainer(
        meta, sometimes_broken_mse, ListSampler([]), compile=True, compile_options={"backend": backend}
    )
    tasks = sample_tasks(4, seed=70)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the failure is not blamed on compile
        with pytest.raises(KeyError, match="user bug"):  # the uncompiled path's error
            trainer.meta_step(tasks)
        for p, q in zip(meta.model.parameters(), before):
            assert torch.equal(p, q)  # untouched by the failed step
        state["broken"] = False
        trainer.meta_step(tasks)  # compile still on
    assert backend.compilations == 1
    assert trainer.compiled_loss is not None and trainer.compiled_loss.num_programs == 1


# ---------------------------------------------------------------- caching
def test_recompiles_only_when_configuration_or_shapes_change():
    backend = CountingBackend()
    meta = make_meta("maml", make_model())
    compiled = CompiledMetaLoss(meta, F.mse_loss, backend=backend)
    compiled(sample_tasks(4, seed=80))
    compiled(sample_tasks(4, seed=81))  # new values, same shapes
    meta.param_groups[0]["inner_lr"] = 0.02  # a step size is a tensor input, not a constant
    tasks = sample_tasks(4, seed=82)
    loss, grads = compiled(tasks)
    assert (backend.compilations, compiled.num_programs) == (1, 1)
    ref_loss, ref_grads = vmap_reference(meta, tasks)  # the new inner_lr was used
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    for p, g in ref_grads.items():
        torch.testing.assert_close(grads[p], g, rtol=1e-12, atol=1e-14)

    meta.inner_steps = 3  # a new configuration: a new program
    compiled(tasks)
    assert (backend.compilations, compiled.num_programs) == (2, 2)
    compiled(sample_tasks(6, seed=83))  # a new meta-batch size: recompiled by torch.compile
    assert (backend.compilations, compiled.num_programs) == (3, 2)
    meta.inner_steps = STEPS
    compiled(sample_tasks(4, seed=84))  # back to the first configuration: cached
    assert (backend.compilations, compiled.num_programs) == (3, 2)


def test_a_scheduled_inner_lr_keeps_one_program_and_no_growing_cache_of_rates():
    """Each distinct inner_lr value stayed cached as a tensor for good: a schedule that sets a new
    rate at every step grew the cache by one tensor per step."""
    backend = CountingBackend()
    meta = make_meta("maml", make_model())
    compiled = CompiledMetaLoss(meta, F.mse_loss, backend=backend)
    tasks = sample_tasks(4, seed=85)
    for step in range(12):
        meta.param_groups[0]["inner_lr"] = INNER_LR * 0.9**step
        loss, grads = compiled(tasks)
    assert backend.compilations == 1
    assert len(compiled._lr_tensors) == 1  # the rate of the last call only
    ref_loss, ref_grads = vmap_reference(meta, tasks)  # the last rate was used
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    for p, g in ref_grads.items():
        torch.testing.assert_close(grads[p], g, rtol=1e-12, atol=1e-14)


def test_a_deleted_compiled_meta_loss_releases_its_compiled_graphs():
    """Each CompiledMetaLoss kept its compiled graph for the rest of the process: Dynamo installed
    it (``__compiled_fn_<n>_<uuid>``) in the globals of the program's function, which were
    samgria.meta.compiled's own, and the cache entries on the program's code object stayed
    alive through Dynamo's map from compiled to original code. Four instances built and
    deleted in turn now leave the module's globals as they were, the code object without cache
    entries, and the graph and guards of each collected with it; each still compiles once (no
    extra recompiles) and matches the vmap path."""
    import samgria.meta.compiled as module
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    tasks = sample_tasks(2, seed=86)
    module_globals = set(vars(module))
    for trial in range(4):
        meta = make_meta("maml", make_model(trial), torch.optim.Adam, lr=1e-3)
        compiled = CompiledMetaLoss(meta, F.mse_loss, backend="eager")
        ref_loss, ref_grads = vmap_reference(make_meta("maml", make_model(trial)), tasks)
        graphs = counters["stats"]["unique_graphs"]
        for step in range(2):
            meta.zero_grad()
            loss = compiled.backward(tasks)
            if step == 0:
                torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
                for p, g in zip(meta.model.parameters(), ref_grads.values()):
                    torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
            meta.step()
        assert counters["stats"]["unique_graphs"] == graphs + 1  # compiled once, then reused
        (program,) = compiled._programs.values()
        function = program.__wrapped__
        installed = [value for name, value in function.__globals__.items() if name.startswith("__compiled_fn")]
        assert installed  # the observable is there while the instance lives
        code = function.__code__
        refs = [*map(weakref.ref, installed)]
        refs += [weakref.ref(entry.guard_manager) for entry in _debug_get_cache_entry_list(code)]
        del meta, compiled, program, function, installed
        gc.collect()
        assert set(vars(module)) == module_globals, f"trial {trial}"
        assert [ref for ref in refs if ref() is not None] == [], f"trial {trial}"
        assert _debug_get_cache_entry_list(code) == [], f"trial {trial}"
        del code


def test_fixed_steps_and_frozen_parameters():
    backend = CountingBackend()
    model = make_model()
    model[0].bias.requires_grad_(False)
    meta = make_meta("maml", model)
    compiled = CompiledMetaLoss(meta, F.mse_loss, steps=1, backend=backend)
    tasks = sample_tasks(3, seed=90)
    loss, grads = compiled(tasks)
    assert model[0].bias not in grads and set(grads) == {model[0].weight, model[2].weight, model[2].bias}
    meta.zero_grad()
    ref = meta.task_losses(tasks, F.mse_loss, steps=1, vectorize=True).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-14)
    for p in grads:
        torch.testing.assert_close(grads[p], p.grad, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- blockers and bad input
@pytest.mark.parametrize(
    "version, blocked",
    [
        ("2.4.1", True),
        ("2.6.0+cu124", True),
        ("2.7.1", False),
        ("2.7.0a0+git1234", False),
        ("2.10.0.dev20260101+cpu", False),
        ("2.13.0", False),
        ("3.0.0.dev20270101", False),
        ("parrots", False),  # a build's own naming: not judged
        ("", False),
    ],
)
def test_the_compiled_path_is_refused_on_a_torch_that_compiles_no_program(monkeypatch, version, blocked):
    """On torch 2.4-2.6 Dynamo breaks the graph inside grad_and_value and runs the compiled
    meta-loss eagerly without an error (measured): the trainer reported the compiled path while
    nothing was compiled. The blocker names the torch version, so CompiledMetaLoss refuses and
    the trainer warns and takes the uncompiled path."""
    monkeypatch.setattr(torch, "__version__", version)
    reason = compiled_path_blocker(make_meta("maml", make_model()))
    if not blocked:
        assert reason is None
        return
    assert reason == (
        f"torch {version} compiles no program for it (its graph breaks inside "
        "torch.func.grad_and_value and it runs eagerly); the compiled path needs torch 2.7 or later"
    )
    with pytest.raises(ValueError, match=r"^meta cannot use the compiled path: torch .* needs torch 2\.7 or later$"):
        CompiledMetaLoss(make_meta("maml", make_model()), F.mse_loss)


def test_compiled_path_blocker():
    assert compiled_path_blocker(make_meta("maml", make_model())) is None
    assert compiled_path_blocker(make_meta("metasgd", make_model()), sample_tasks(2)) is None
    reptile = Reptile(make_model(), torch.optim.SGD, lr=0.1)
    assert "Reptile forms its outer update from the adapted weights (outer_update='pseudo_gradient')" in compiled_path_blocker(reptile)

    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DT)
    assert "1 (BatchNorm1d)" in compiled_path_blocker(MAML(bn, torch.optim.SGD, lr=0.1))
    assert compiled_path_blocker(FOMAML(bn, torch.optim.SGD, lr=0.1)) is None  # first order is exact
    bn.eval()
    assert compiled_path_blocker(MAML(bn, torch.optim.SGD, lr=0.1)) is None  # running statistics
    ragged = [sample_tasks(1, k=3)[0], sample_tasks(1, k=4)[0]]
    assert "equal shapes" in compiled_path_blocker(make_meta("maml", make_model()), ragged)
    with pytest.raises(TypeError, match="meta must be a samgria MetaOptimizer, got SGD"):
        compiled_path_blocker(torch.optim.SGD(make_model().parameters(), lr=0.1))


class TiedModel(nn.Module):
    """An embedding whose weight is also the output layer's (``head.weight = emb.weight``)."""

    def __init__(self, tied: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(7, 5).to(DT), nn.Linear(5, 7).to(DT)
        self.head.weight = self.emb.weight if tied else nn.Parameter(self.emb.weight.detach().clone())

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


def token_batches(count: int, tasks: int) -> list[list[Task]]:
    g = torch.Generator().manual_seed(1)
    return [[Task(*(torch.randint(0, 7, (6,), generator=g) for _ in range(4))) for _ in range(tasks)] for _ in range(count)]


TIED_REASON = (
    "the model registers one parameter as 'emb.weight' and as 'head.weight' (tied weights), and "
    "torch.compile's inductor backend miscompiles the meta-gradient of such a parameter"
)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "anil"])
def test_compiled_path_blocker_refuses_tied_parameters(algorithm):
    def meta_of(model):
        if algorithm == "anil":
            return ANIL(model, torch.optim.SGD, head=model.head, lr=0.1)
        return {"maml": MAML, "fomaml": FOMAML, "metasgd": MetaSGD}[algorithm](model, torch.optim.SGD, lr=0.1)

    assert compiled_path_blocker(meta_of(TiedModel())) == TIED_REASON
    assert compiled_path_blocker(meta_of(TiedModel(tied=False))) is None
    with pytest.raises(ValueError, match=r"^meta cannot use the compiled path: the model registers one parameter"):
        CompiledMetaLoss(meta_of(TiedModel()), F.cross_entropy)


def test_fit_compiled_on_tied_parameters_equals_fit_uncompiled():
    """The inductor program gave Meta-SGD's meta-gradient of a tied weight off by about 1e-2
    (torch 2.13, CPU, code generated for two threads or more; one thread, eager and aot_eager
    were right): the trainer falls back to the eager path."""
    batches = token_batches(1, 3)

    def run(compile):
        model = TiedModel()
        meta = MetaSGD(model, torch.optim.SGD, lr=1.0, inner_lr=0.3, inner_steps=2)
        trainer = MetaTrainer(meta, F.cross_entropy, ListSampler(batches), vectorize=True, compile=compile)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)  # the module's one thread hid the miscompile
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                history = trainer.fit(1, 3, progress=False)
        finally:
            torch.set_num_threads(threads)
        return model, meta, history, [w for w in caught if issubclass(w.category, RuntimeWarning)]

    compiled, plain = run(True), run(False)
    for p, q in zip(compiled[0].parameters(), plain[0].parameters()):  # one step of lr 1: the meta-gradient
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert compiled[1].inner_lrs.keys() == plain[1].inner_lrs.keys()
    for name, rate in compiled[1].inner_lrs.items():
        torch.testing.assert_close(rate, plain[1].inner_lrs[name], rtol=1e-12, atol=1e-14)
    assert [str(w.message) for w in compiled[3]] == [
        f"MetaTrainer(compile=True): {TIED_REASON}; using the uncompiled path"
    ]


def weight_norm_model() -> nn.Module:
    model = make_model()
    nn.utils.parametrizations.weight_norm(model[0])
    return model


def test_compiled_path_blocker_refuses_second_order_weight_norm():
    """torch._weight_norm's fused kernel has a wrong double backward; the eager paths compute it
    by its composite formula through a TorchFunctionMode, which Dynamo does not apply to that
    function: a second-order loop through weight normalisation is refused."""
    reason = (
        "second-order gradients pass through the weight normalisation of 0 (ParametrizedLinear), whose "
        "double backward torch gets wrong (torch._weight_norm's fused kernel); the eager paths compute "
        "it by its composite formula, which the compiled program cannot"
    )
    assert compiled_path_blocker(make_meta("maml", weight_norm_model())) == reason
    assert compiled_path_blocker(make_meta("metasgd", weight_norm_model())) == reason
    assert compiled_path_blocker(make_meta("fomaml", weight_norm_model())) is None  # first backward only
    assert compiled_path_blocker(make_meta("anil", weight_norm_model())) is None  # before the head
    head_normalised = make_model()
    nn.utils.parametrizations.weight_norm(head_normalised[2])
    assert "weight normalisation of 2 (ParametrizedLinear)" in compiled_path_blocker(make_meta("anil", head_normalised))
    hooked = make_model()
    with pytest.warns(FutureWarning, match="deprecated"):
        nn.utils.weight_norm(hooked[0])
    assert compiled_path_blocker(make_meta("maml", hooked)) == reason.replace(
        "pass through the weight normalisation of 0 (ParametrizedLinear)",
        "may pass through the weight normalisation of 0 (Linear)",
    )


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap of torch._weight_norm
def test_fit_compiled_through_weight_norm_falls_back_with_one_warning():
    batches = [sample_tasks(3, seed=70 + i) for i in range(2)]

    def run(compile):
        model = weight_norm_model()
        meta = make_meta("metasgd", model)
        trainer = MetaTrainer(
            meta, F.mse_loss, ListSampler(batches), vectorize=True, compile=compile,
            compile_options={"backend": CountingBackend()} if compile else None,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(2, 3, progress=False)
        return model, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]

    (model_c, caught), (model_p, _) = run(True), run(False)
    assert len(caught) == 1
    assert "weight normalisation of 0 (ParametrizedLinear), whose double backward torch gets wrong" in caught[0]
    for p, q in zip(model_c.parameters(), model_p.parameters()):
        assert torch.equal(p, q)


def test_compiled_meta_loss_rejects_bad_input():
    meta = make_meta("maml", make_model())
    with pytest.raises(TypeError, match="meta must be a samgria MetaOptimizer, got Sequential"):
        CompiledMetaLoss(make_model(), F.mse_loss)
    with pytest.raises(ValueError, match=r"meta cannot use the compiled path: Reptile forms its outer update from the adapted weights"):
        CompiledMetaLoss(Reptile(make_model(), torch.optim.SGD, lr=0.1), F.mse_loss)
    with pytest.raises(TypeError, match="loss_fn must be callable, got str"):
        CompiledMetaLoss(meta, "mse")
    with pytest.raises(ValueError, match=r"^steps must be an integer >= 0, got -1$"):
        CompiledMetaLoss(meta, F.mse_loss, steps=-1)
    compiled = CompiledMetaLoss(meta, F.mse_loss, backend=CountingBackend())
    with pytest.raises(ValueError, match="got 0 tasks"):
        compiled([])
    with pytest.raises(TypeError, match=r"tasks\[1\] must be a Task, got int"):
        compiled([sample_tasks(1)[0], 3])
    with pytest.raises(ValueError, match="the compiled path cannot be used: the tasks do not all have equal shapes"):
        compiled([sample_tasks(1, k=3)[0], sample_tasks(1, k=4)[0]])
    assert compiled.num_programs == 0


def test_trainer_rejects_bad_compile_arguments():
    meta = make_meta("maml", make_model())
    sampler = ListSampler([])
    with pytest.raises(TypeError, match="compile must be a bool, got 1"):
        MetaTrainer(meta, F.mse_loss, sampler, compile=1)
    with pytest.raises(ValueError, match="compile=True .* cannot be combined with vectorize=False"):
        MetaTrainer(meta, F.mse_loss, sampler, compile=True, vectorize=False)
    with pytest.raises(ValueError, match="compile_options need compile=True, got compile=False"):
        MetaTrainer(meta, F.mse_loss, sampler, compile_options={"mode": "max-autotune"})
    with pytest.raises(TypeError, match="compile_options must be a dict, got list"):
        MetaTrainer(meta, F.mse_loss, sampler, compile=True, compile_options=["mode"])
    trainer = MetaTrainer(meta, F.mse_loss, sampler, compile=True, vectorize=True)
    assert trainer.compile is True and trainer.compile_options == {} and trainer.compiled_loss is None


#: torch.compile's keyword arguments but ``model`` (torch 2.13: backend, disable, dynamic, fullgraph,
#: isolate_recompiles, mode, name, options, recompile_limit, shapes_spec).
_COMPILE_KEYWORDS = ", ".join(sorted(set(inspect.signature(torch.compile).parameters) - {"model"}))


@pytest.mark.parametrize(
    "options",
    [{"inner_steps": 0}, {"steps": 3}, {"inner_step_fn": None}, {"bogus_kw": 1}, {"model": make_model}, {1: 2}],
    ids=["inner_steps", "steps", "inner_step_fn", "bogus", "model", "int-key"],
)
def test_compile_options_that_are_not_torch_compile_arguments_are_refused(options):
    """They were passed on into CompiledMetaLoss's own keyword arguments: ``{"inner_steps": 0}``
    trained the compiled path with 0 inner steps (the meta-optimizer's are 2), silently; an
    unknown key failed on the first step and the run fell back to the uncompiled path."""
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    meta = make_meta("maml", model)
    (key,) = options
    message = rf"^compile_options must name keyword arguments of torch\.compile \({_COMPILE_KEYWORDS}\), got {key!r}$"
    with pytest.raises(TypeError, match=message):
        MetaTrainer(meta, F.mse_loss, ListSampler([sample_tasks(2)]), compile=True, compile_options=options)
    if isinstance(key, str) and key not in ("inner_steps", "steps", "inner_step_fn"):  # CompiledMetaLoss's own
        with pytest.raises(TypeError, match=message):
            CompiledMetaLoss(meta, F.mse_loss, **options)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize(
    "options, refusal",
    [
        ({"mode": "max-autotune-no-cudagraph"}, r"RuntimeError: Unrecognized mode=max-autotune-no-cudagraph"),
        ({"backend": "no-such-backend"}, r"InvalidBackend: .*'no-such-backend'"),
        ({"mode": "max-autotune", "options": {}}, r"RuntimeError: Either mode or options can be specified"),
    ],
    ids=["mode-typo", "backend", "mode-and-options"],
)
def test_compile_option_values_torch_compile_refuses_are_refused_at_construction(options, refusal):
    """torch.compile refused them only when the program was built, at the first meta-step, and
    the trainer then trained on the uncompiled path after one warning."""
    meta = make_meta("maml", make_model())
    message = rf"^compile_options must be keyword arguments that torch\.compile accepts, got {re.escape(repr(options))} \({refusal}"
    with pytest.raises(ValueError, match=message):
        MetaTrainer(meta, F.mse_loss, ListSampler([sample_tasks(2)]), compile=True, compile_options=options)
    with pytest.raises(ValueError, match=message):
        CompiledMetaLoss(meta, F.mse_loss, **options)


def test_accepted_compile_options_are_kept_and_the_inner_loop_is_the_trainers():
    """Valid options reach torch.compile; the compiled path runs the meta-optimizer's inner
    steps, as the uncompiled trainer from the same weights does."""
    tasks = sample_tasks(2)
    backend = CountingBackend()
    compiled_model, reference_model = make_model(), make_model()
    compiled = MetaTrainer(
        make_meta("maml", compiled_model), F.mse_loss, ListSampler([tasks]), compile=True,
        compile_options={"backend": backend, "fullgraph": True},
    )
    assert compiled.compile_options == {"backend": backend, "fullgraph": True}
    reference = MetaTrainer(make_meta("maml", reference_model), F.mse_loss, ListSampler([tasks]), vectorize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the uncompiled path
        compiled.fit(1, 2, progress=False)
    reference.fit(1, 2, progress=False)
    assert compiled.path == "compiled" and backend.compilations >= 1
    assert compiled.compiled_loss.compile_options == {"dynamic": False, "backend": backend, "fullgraph": True}
    for got, want in zip(compiled_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- a model wrapped in torch.compile
def make_compiled_meta(algorithm: str, seed: int = 0) -> MetaOptimizer:
    """``make_meta`` on ``torch.compile(make_model(seed))`` (an ``OptimizedModule``: its
    parameters are named ``_orig_mod.0.weight``, ...)."""
    model = make_model(seed)
    compiled_model = torch.compile(model)
    if algorithm == "anil":
        return ANIL(compiled_model, torch.optim.SGD, head=model[2], lr=0.1, inner_lr=INNER_LR, inner_steps=STEPS)
    return make_meta(algorithm, compiled_model)


@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "anil"])
def test_a_model_wrapped_in_torch_compile_is_compiled_with_the_meta_loss(algorithm):
    """On torch.compile(model) the compiled meta-loss compiled nothing: Dynamo skipped its frames
    and the program ran eagerly, without a warning. It now traces the wrapped module, and every
    gradient reaches the meta-parameter of the same name (the reference: the vmap path on the
    unwrapped model, same weights)."""
    meta = make_compiled_meta(algorithm)
    assert next(iter(dict(meta.model.named_parameters()))) == "_orig_mod.0.weight"
    reference = make_meta(algorithm, make_model()) if algorithm != "anil" else None
    if reference is None:
        plain = make_model()
        reference = ANIL(plain, torch.optim.SGD, head=plain[2], lr=0.1, inner_lr=INNER_LR, inner_steps=STEPS)
    backend = CountingBackend()
    compiled = CompiledMetaLoss(meta, F.mse_loss, backend=backend)
    tasks = sample_tasks(4, seed=3)
    graphs = counters["stats"]["unique_graphs"]
    loss, grads = compiled(tasks)
    assert backend.compilations >= 1 and counters["stats"]["unique_graphs"] >= graphs + 1
    ref_loss, ref_grads = vmap_reference(reference, tasks)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    ours = [p for group in meta.param_groups for p in group["params"]]
    theirs = [p for group in reference.param_groups for p in group["params"]]
    assert set(grads) == set(ours) and len(ours) == len(theirs)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(grads[p], ref_grads[q], rtol=1e-9, atol=1e-12)


def test_fit_compiled_on_a_model_wrapped_in_torch_compile_equals_fit_uncompiled():
    """The repro: MetaTrainer(compile=True) on torch.compile(model) reported path 'compiled'
    while it ran eagerly (unique_graphs stayed 0). Now one program is compiled and the
    trajectory is that of the uncompiled trainer on the unwrapped model."""
    batches = [sample_tasks(4, seed=40 + i) for i in range(3)]
    model = make_model()
    meta = MAML(torch.compile(model), torch.optim.Adam, lr=1e-2, inner_lr=INNER_LR, inner_steps=STEPS)
    backend = CountingBackend()
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler(batches), compile=True, compile_options={"backend": backend})
    graphs = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(3, 4, progress=False)
    assert backend.compilations == 1 and counters["stats"]["unique_graphs"] == graphs + 1
    assert trainer.path == "compiled" and trainer.compiled_loss.num_programs == 1
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert_same_training((model, meta, history, []), fit("maml", False, batches))


def _second_order_run(algorithm: str, route: str, compiled: bool) -> list[torch.Tensor]:
    """Two meta-steps of ``algorithm`` on ``route``; the meta-parameters after them."""
    model = make_model()
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    checkpointed = route == "checkpointed"
    if algorithm == "anil":  # the head is a submodule of the module torch.compile wraps
        meta = ANIL(forward, torch.optim.SGD, head=model[2], inner_lr=INNER_LR, inner_steps=STEPS, lr=0.1,
                    checkpoint_inner_steps=checkpointed)  # fmt: skip
    else:
        meta = make_meta(algorithm, forward, checkpoint_inner_steps=checkpointed)
    if route == "learner":
        for _ in range(2):
            meta.zero_grad()
            for task in sample_tasks(2):
                learner = meta.clone()
                for _ in range(STEPS):
                    learner.adapt(F.mse_loss(learner(task.support_x), task.support_y))
                F.mse_loss(learner(task.query_x), task.query_y).backward()
            meta.step()
    else:
        vectorize = None if route == "trainer-default" else False
        sampler = SinusoidTaskSampler(k_support=5, k_query=5, seed=0, dtype=DT)
        MetaTrainer(meta, F.mse_loss, sampler, vectorize=vectorize).fit(2, 3, progress=False)
    return [p.detach().clone() for group in meta.param_groups for p in group["params"]]


@pytest.mark.parametrize("route", ["trainer-default", "trainer-loop", "checkpointed", "learner"])
@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "anil"])
def test_a_compiled_model_takes_second_order_inner_steps_as_the_eager_one(algorithm, route):
    """AOTAutograd's graphs have no double backward: a model wrapped in torch.compile failed
    every second-order inner step on the loop path ("torch.compile with aot_autograd does not
    currently support double backward"), also under MetaTrainer's default path choice. Its
    second-order inner steps now run the model's own code; the eager model is the reference."""
    eager = _second_order_run(algorithm, route, compiled=False)
    compiled = _second_order_run(algorithm, route, compiled=True)
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)


class _Shifted(nn.Module):
    """An MLP whose input is shifted by a buffer (a buffer the compiled program reads)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
        self.register_buffer("shift", torch.zeros(1, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.shift)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_compiled_meta_loss_computes_with_its_own_model(how):
    """A built program is a closure over the meta-optimizer's model: a deep copy shared it and
    computed with the original's buffers (1e-2 off after one step), and a pickle failed. The
    copy must equal the uncompiled meta-loss of its own state."""
    import copy
    import io

    meta = make_meta("maml", _Shifted())
    tasks = SinusoidTaskSampler(k_support=5, k_query=5, seed=3, dtype=DT).sample(4)
    compiled = CompiledMetaLoss(meta, F.mse_loss)
    compiled(tasks)
    assert compiled.num_programs == 1
    if how == "deepcopy":
        twin = copy.deepcopy(compiled)
    else:
        buffer = io.BytesIO()
        torch.save(compiled, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert twin.num_programs == 0 and twin.meta is not meta
    with torch.no_grad():
        twin.meta.model.shift.fill_(3.0)
    loss, grads = twin(tasks)
    expected = twin.meta.task_losses(tasks, F.mse_loss, vectorize=True).mean()
    expected_grads = torch.autograd.grad(expected, list(grads))
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads.values(), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert float(meta.model.shift) == 0.0 and compiled.num_programs == 1


@pytest.mark.parametrize(
    "options, message",
    [
        ({"backend": 5}, r"compile_options\['backend'\] must be a backend's name \(a str\) or a callable backend, got 5"),
        ({"fullgraph": "no"}, r"compile_options\['fullgraph'\] must be a bool, got 'no'"),
        ({"disable": 1}, r"compile_options\['disable'\] must be a bool, got 1"),
        ({"dynamic": "yes"}, r"compile_options\['dynamic'\] must be None or a bool, got 'yes'"),
        ({"mode": 3}, r"compile_options\['mode'\] must be None or a str, got 3"),
    ],
    ids=["backend-int", "fullgraph-str", "disable-int", "dynamic-str", "mode-int"],
)
def test_compile_option_values_of_the_wrong_kind_are_refused_at_construction(options, message):
    """torch.compile takes these as they come: backend=5 failed only when the program was first
    built, and the trainer then trained on the uncompiled path after one warning; fullgraph="no"
    and disable=1 were true."""
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    meta = make_meta("maml", model)
    with pytest.raises(TypeError, match=rf"^{message}$"):
        MetaTrainer(meta, F.mse_loss, ListSampler([sample_tasks(2)]), compile=True, compile_options=options)
    with pytest.raises(TypeError, match=rf"^{message}$"):
        CompiledMetaLoss(meta, F.mse_loss, **options)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_numpy_bool_compile_flags_are_taken_as_bools():
    options = check_compile_options({"fullgraph": np.True_, "dynamic": np.False_, "backend": "eager"})
    assert options == {"fullgraph": True, "dynamic": False, "backend": "eager"}
    assert type(options["fullgraph"]) is bool and type(options["dynamic"]) is bool


@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "anil"])
def test_a_compiled_closure_adapts_eagerly_as_the_eager_loop(algorithm):
    """``meta.step(torch.compile(closure))`` with a second-order inner loop raised torch's
    "attempted to set_stance in a torch.compile region": the inner loop asks for the
    ``force_eager`` stance (compiled graphs have no double backward), which torch refuses inside a
    compiled function. ``adapt``, the learner's forward and ``adapt``, and ``adapt_params`` now run
    eagerly there; the run equals the eager one bit for bit."""
    from samgria.meta import adapt_params, functional_forward, named_params

    task = sample_tasks(1)[0]
    models = [make_model(), make_model()]
    metas = [make_meta(algorithm, model) for model in models]

    def closure_of(meta):
        def closure():
            meta.zero_grad()
            learner = meta.adapt(lambda forward: F.mse_loss(forward(task.support_x), task.support_y))
            learner = learner.adapt(F.mse_loss(learner(task.support_x), task.support_y))
            adapted = adapt_params(
                meta.model,
                named_params(meta.model),
                lambda params: F.mse_loss(functional_forward(meta.model, params, task.support_x), task.support_y),
                inner_lr=0.1,
            )
            query = functional_forward(meta.model, adapted, task.query_x)
            loss = F.mse_loss(learner(task.query_x), task.query_y) + F.mse_loss(query, task.query_y)
            loss.backward()
            return loss
        return closure

    for _ in range(2):
        metas[0].step(closure_of(metas[0]))
        metas[1].step(torch.compile(closure_of(metas[1]), backend="eager"))
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


def test_a_meta_parameter_that_does_not_influence_the_loss_gets_a_zero_gradient():
    """Meta guide: CompiledMetaLoss gives a meta-parameter that does not influence the loss a zero
    gradient where ``task_losses(...).mean().backward()`` leaves ``None``; the others equal it."""

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_model()
            self.unused = nn.Parameter(torch.ones(3, dtype=DT))

        def forward(self, x):
            return self.body(x)

    model = WithUnused()
    meta = make_meta("maml", model)
    compiled = CompiledMetaLoss(meta, F.mse_loss, backend=CountingBackend())
    tasks = sample_tasks(3, seed=91)
    loss, grads = compiled(tasks)
    assert torch.equal(grads[model.unused], torch.zeros(3, dtype=DT))
    compiled.backward(tasks)
    assert torch.equal(model.unused.grad, torch.zeros(3, dtype=DT))
    meta.zero_grad()
    meta.task_losses(tasks, F.mse_loss, vectorize=True).mean().backward()
    assert model.unused.grad is None
    for p in model.body.parameters():
        torch.testing.assert_close(grads[p], p.grad, rtol=1e-12, atol=1e-14)
