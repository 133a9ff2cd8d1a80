"""What the framework integrations rely on in plain torch (no framework needed).

* ``torch.amp.GradScaler`` with float16 ``autocast``: the two-call loop trains SAM; every
  combination that cannot work raises before any weight changes and leaves no scaler attribute
  behind (``scaler.step(optimizer, closure)``, ``scaler.step(optimizer)`` without ``first_step``).
* The two-call loop through a wrapper that forwards to the optimizer, as Lightning's
  ``LightningOptimizer`` does (a subclass of the optimizer's class whose ``step`` calls the
  optimizer's with a closure of its own).
* ``torch.compile``: a compiled model trains as the eager one, and SAM's perturbation (swapped
  or moved in place) does not recompile it; a compiled training step runs a meta-optimizer's
  step eagerly.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from samgria import ASAM, LAMP, MAML, ClipGradNorm, Task, TransformingOptimizer, frozen_bn_stats, sam_optimizer
from state_helpers import assert_state_dicts_equal

LR, RHO = 0.1, 0.05
SCALE = 2.0**10


def model_and_optimizer(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    return model, sam_optimizer(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)


def batches(dtype=torch.float32, count=3):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=generator, dtype=dtype), torch.randn(8, 1, generator=generator, dtype=dtype)) for _ in range(count)]


def reference(data, dtype=torch.float32, autocast=False):
    net, _ = model_and_optimizer(dtype)
    params = list(net.parameters())

    def gradient(x, y):
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            loss = F.mse_loss(net(x), y)
        return torch.autograd.grad(loss, params)

    for x, y in data:
        grads = gradient(x, y)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        weights = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=RHO / norm)
        grads = gradient(x, y)
        with torch.no_grad():
            for p, w, g in zip(params, weights, grads):
                p.copy_(w - LR * g)
    return [p.detach() for p in params]


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model, before) -> bool:
    return all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# -- GradScaler with float16 autocast --------------------------------------------------------------------
def test_float16_autocast_two_call_loop_with_grad_scaler() -> None:
    model, optimizer = model_and_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    data = batches()
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        optimizer.first_step(zero_grad=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert scaler.get_scale() == SCALE
    for got, want in zip(model.parameters(), reference(data, autocast=True)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def _scaled_backward(model, scaler, x, y):
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.mse_loss(model(x), y)
    scaler.scale(loss).backward()


def _scaled_closure(optimizer, model, scaler, x, y, autocast=True):
    """The closure a user hands ``scaler.step``: zero, forward, scaled backward."""

    def closure():
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        return loss

    return closure


def test_scaler_step_with_a_positional_closure_is_refused_before_anything_changes() -> None:
    """What accelerate's fp16 ``step(closure)`` does; the scaler has seen a scaled loss before."""
    model, optimizer = model_and_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, y = batches()[0]
    _scaled_backward(model, scaler, x, y)
    before = snapshot(model)
    inner_state = copy.deepcopy(optimizer.inner.state_dict())
    closure = _scaled_closure(optimizer, model, scaler, x, y)
    with pytest.raises(
        RuntimeError,
        match=r"^torch\.amp\.GradScaler\.step\(optimizer, closure\) cannot drive step\(closure\): .*would apply "
        r"scaled gradients\. Use the two-call loop: .*first_step\(\).*scaler\.step\(optimizer\)",
    ):
        scaler.step(optimizer, closure)
    assert unchanged(model, before)
    assert optimizer.inner.state_dict() == inner_state
    assert not hasattr(optimizer, "found_inf") and not hasattr(optimizer, "grad_scale")
    # Nothing stale is left: a plain step(closure) afterwards is an ordinary SAM step.
    optimizer.step(lambda: (optimizer.zero_grad(), F.mse_loss(model(x), y).backward())[1])
    assert not unchanged(model, before)


def _plain_chain(kind: str, model: nn.Module):
    params = model.parameters()
    if kind == "maml":
        from samgria import MAML

        return MAML(model, torch.optim.SGD, lr=LR)
    transforms = {"empty": [], "lamp": [LAMP(seed=0)], "clip": [ClipGradNorm(100.0)]}[kind]
    return TransformingOptimizer(params, torch.optim.SGD, lr=LR, momentum=0.9, transforms=transforms)


@pytest.mark.parametrize("kind", ["empty", "lamp", "clip", "maml"])
def test_scaler_step_with_a_positional_closure_is_refused_for_an_optimizer_the_scaler_unscales_for(kind) -> None:
    """A chain that does not re-evaluate, and a meta-optimizer, leave the unscaling to the scaler:
    it unscales the gradients, then calls ``step(closure)``, whose closure computed them anew,
    scaled -- an update ``SCALE`` times too large (what accelerate's fp16 ``step(closure)`` did).
    Refused before anything changes; ``scaler.step(optimizer)`` after the scaled backward steps
    as the unscaled loop does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    twin = copy.deepcopy(model)
    optimizer, twin_optimizer = _plain_chain(kind, model), _plain_chain(kind, twin)
    name = type(optimizer).__name__
    for index, (x, y) in enumerate(batches()):
        # The supported loop, the scaled backward then scaler.step(optimizer), is the unscaled step.
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        closure = _scaled_closure(optimizer, model, scaler, x, y, autocast=False)
        closure()
        if index == 1:  # with state from a step before: the scaler checks and unscales, then steps
            before, state = snapshot(model), copy.deepcopy(optimizer.state_dict())
            with pytest.raises(
                RuntimeError,
                match=rf"^torch\.amp\.GradScaler\.step\(optimizer, closure\) cannot drive {name}\.step\(closure\): "
                r"the scaler unscaled the gradients .* would apply scaled gradients .*then step without a closure",
            ):
                scaler.step(optimizer, closure)
            assert unchanged(model, before)
            assert_state_dicts_equal(optimizer.state_dict(), state)
            scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
            closure = _scaled_closure(optimizer, model, scaler, x, y, autocast=False)
            closure()
        scaler.step(optimizer)
        twin_optimizer.zero_grad()
        F.mse_loss(twin(x), y).backward()
        twin_optimizer.step()
        for got, want in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_scaler_step_with_a_keyword_closure_is_refused_by_torch() -> None:
    model, optimizer = model_and_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, y = batches()[0]
    _scaled_backward(model, scaler, x, y)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="Closure use is not currently supported if GradScaler is enabled"):
        scaler.step(optimizer, closure=lambda: None)
    assert unchanged(model, before)


def test_scaler_step_without_first_step_is_refused_before_anything_changes() -> None:
    """What Lightning's stock ``"16-mixed"`` plugin does under automatic optimization."""
    model, optimizer = model_and_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, y = batches()[0]
    _scaled_backward(model, scaler, x, y)
    before = snapshot(model)
    with pytest.raises(
        RuntimeError,
        match=r"^SAM re-evaluate\(s\) the loss, but torch\.amp\.GradScaler\.step\(optimizer\) called step\(\) "
        r"without first_step\(\).*SAMMixedPrecision.*SAMTrainer.*SAMAccelerator",
    ):
        scaler.step(optimizer)
    assert unchanged(model, before)
    assert not hasattr(optimizer, "found_inf") and not hasattr(optimizer, "grad_scale")


def test_step_without_a_closure_names_the_integrations() -> None:
    model, optimizer = model_and_optimizer()
    x, y = batches()[0]
    F.mse_loss(model(x), y).backward()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"needs a closure.*samgria\.integrations.*SAMTrainer.*SAMAccelerator"):
        optimizer.step()
    assert unchanged(model, before)


# -- the two-call loop through a forwarding wrapper (Lightning's LightningOptimizer) ---------------------
class ForwardingWrapper:
    """What Lightning 2.x does: a subclass of the optimizer's class that forwards what it lacks,
    and whose ``step`` calls the optimizer's with a closure of its own (the framework's hooks)."""

    def __init__(self, optimizer):
        self._optimizer = optimizer
        self.hook_calls = 0
        self.steps = 0
        self.__class__ = type("Wrapped" + type(optimizer).__name__, (type(self), type(optimizer)), {})

    def __getattr__(self, name):
        return getattr(self._optimizer, name)

    def step(self, closure=None):
        def framework_closure():
            self.hook_calls += 1  # e.g. on_before_optimizer_step

        result = self._optimizer.step(closure=framework_closure)
        self.steps += 1
        return result


def test_two_call_loop_through_a_forwarding_wrapper() -> None:
    model, optimizer = model_and_optimizer(torch.float64)
    wrapper = ForwardingWrapper(optimizer)
    data = batches(torch.float64)
    for x, y in data:
        F.mse_loss(model(x), y).backward()
        wrapper.first_step(zero_grad=True)
        assert optimizer._pending is not None, "the pending step lives on the optimizer"
        F.mse_loss(model(x), y).backward()
        wrapper.second_step(zero_grad=True)
        assert optimizer._pending is None
    assert wrapper.steps == wrapper.hook_calls == len(data)
    assert "_pending" not in wrapper.__dict__ and "_progress" not in wrapper.__dict__
    for got, want in zip(model.parameters(), reference(data, torch.float64)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


def test_step_with_a_closure_after_first_step_is_still_refused() -> None:
    model, optimizer = model_and_optimizer()
    x, y = batches()[0]
    F.mse_loss(model(x), y).backward()
    optimizer.first_step()
    with pytest.raises(RuntimeError, match=r"first_step\(\) was called: finish this step with second_step\(\)"):
        optimizer.step(lambda: None)
    optimizer.cancel_step()


def test_copies_do_not_share_the_step_in_progress() -> None:
    model, optimizer = model_and_optimizer()
    copied, unpickled = copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))
    x, y = batches()[0]
    F.mse_loss(model(x), y).backward()
    optimizer.first_step()
    assert copied._pending is None and unpickled._pending is None
    assert copied._progress is not optimizer._progress is not unpickled._progress
    optimizer.cancel_step()


# -- torch.compile -------------------------------------------------------------------------------------
class CountingBackend:
    """A ``torch.compile`` backend that runs the captured graph eagerly and counts compilations."""

    def __init__(self) -> None:
        self.compilations = 0

    def __call__(self, graph_module, example_inputs):
        self.compilations += 1
        return graph_module.forward


def _closure_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """``optimizer.step(closure)`` with the closure of an MSE loss of ``net`` on ``(x, y)``."""

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(net(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)


@pytest.mark.parametrize("route", ["closure", "two-call"])
def test_compiled_model_trains_as_the_eager_one_without_recompiling(route: str) -> None:
    torch._dynamo.reset()
    model, optimizer = model_and_optimizer(torch.float64)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    data = batches(torch.float64)
    for x, y in data:
        if route == "closure":
            _closure_step(compiled, optimizer, x, y)
        else:
            F.mse_loss(compiled(x), y).backward()
            optimizer.first_step(zero_grad=True)
            F.mse_loss(compiled(x), y).backward()
            optimizer.second_step(zero_grad=True)
    assert backend.compilations == 1, "SAM's perturbation changes no guard"
    for got, want in zip(model.parameters(), reference(data, torch.float64)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


def test_compiled_model_with_asam_matches_the_eager_one() -> None:
    """ASAM's element-wise scaling reads the weights too; still one compilation."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=LR, transforms=[ASAM(rho=0.5)])
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    eager = copy.deepcopy(model)
    eager_optimizer = TransformingOptimizer(eager.parameters(), torch.optim.SGD, lr=LR, transforms=[ASAM(rho=0.5)])
    for x, y in batches(torch.float64):
        for net, opt in ((compiled, optimizer), (eager, eager_optimizer)):
            _closure_step(net, opt, x, y)
    assert backend.compilations == 1
    for got, want in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


class _TiedLayers(nn.Module):
    """Two layers whose weights, two Parameters, share one memory: SAM moves them in place."""

    def __init__(self) -> None:
        super().__init__()
        kind = {"dtype": torch.float64}
        self.a, self.b, self.head = nn.Linear(4, 4, **kind), nn.Linear(4, 4, **kind), nn.Linear(4, 1, **kind)
        self.b.weight.data = self.a.weight.data

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize(
    "case, graphs",
    [("tied, closure", 1), ("tied, two-call", 1), ("batchnorm, frozen_bn_stats", 2)],
)
def test_compiled_model_moved_in_place_or_with_frozen_bn_stats_matches_the_eager_one(case: str, graphs: int) -> None:
    """SAM's in-place move (weights that share memory) changes no guard either; frozen_bn_stats switches the
    BatchNorm's ``track_running_stats``, a guard of the graph: one more graph in all, not one per
    step. Weights and running statistics equal the uncompiled model's bit for bit."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def build():
        torch.manual_seed(0)
        if case.startswith("tied"):
            return _TiedLayers()
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()

    model, eager = build(), build()
    compiled = torch.compile(model, backend="aot_eager")

    def optimizer_for(net):
        frozen = None if case.startswith("tied") else (lambda: frozen_bn_stats(net))
        return sam_optimizer(net.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, reevaluation_context=frozen)

    runs = [(compiled, optimizer_for(model)), (eager, optimizer_for(eager))]
    for x, y in batches(torch.float64, count=4):
        for net, optimizer in runs:
            if case.endswith("two-call"):
                F.mse_loss(net(x), y).backward()
                optimizer.first_step(zero_grad=True)
                F.mse_loss(net(x), y).backward()
                optimizer.second_step(zero_grad=True)
            else:
                _closure_step(net, optimizer, x, y)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    if case.startswith("tied"):
        assert model.a.weight.data_ptr() == model.b.weight.data_ptr()  # still one memory
    for (name, got), want in zip(model.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(got, want), name
    torch._dynamo.reset()


def test_compiled_training_step_runs_a_meta_optimizers_step_eagerly_as_the_eager_loop() -> None:
    """A whole MAML step compiled (``meta.step(closure)`` inside): the step, closure included, runs
    eagerly (its second-order inner steps could not run in a graph), bit for bit the eager step;
    with ``fullgraph=True`` Dynamo refuses it before anything runs."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(2)
    tasks = [Task(*(torch.randn(5, 1, generator=generator, dtype=torch.float64) for _ in range(4))) for _ in range(2)]
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double())
    metas = [MAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.05) for model in models]

    def train_step(meta):
        def closure():
            meta.zero_grad()
            losses = []
            for task in tasks:
                learner = meta.adapt(lambda f, task=task: F.mse_loss(f(task.support_x), task.support_y))
                losses.append(F.mse_loss(learner(task.query_x), task.query_y))
            loss = torch.stack(losses).mean()
            loss.backward()
            return loss

        return meta.step(closure)

    compiled_step = torch.compile(train_step, backend="aot_eager")
    for _ in range(2):
        assert torch.equal(compiled_step(metas[0]), train_step(metas[1]))
    for got, want in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(got, want)
    before = snapshot(models[0])
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="marked as skipped"):
        torch.compile(train_step, backend="aot_eager", fullgraph=True)(metas[0])
    assert unchanged(models[0], before)
    torch._dynamo.reset()


@pytest.mark.parametrize("inner", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("chain", ["none", "clip"])
def test_compiled_optimizer_step_with_a_tensor_lr_and_a_scheduler_equals_the_eager_loop(inner, chain) -> None:
    """torch's recipe for compiling the optimizer: a compiled function calls ``optimizer.step()``
    and ``scheduler.step()``, ``lr`` a 0-dim tensor the scheduler writes in place. The wrapper's
    step runs eagerly there: weights and ``lr`` bit for bit the eager loop's (without transforms,
    the bare optimizer's), no compilation as ``lr`` changes, and a ``torch.save`` round trip
    (``weights_only=True``) with the tensor ``lr`` continues bit for bit."""
    torch._dynamo.reset()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    backend = CountingBackend()
    runs = []
    for how in ("compiled", "eager", "bare"):
        if how == "bare" and chain == "clip":
            continue
        torch.manual_seed(0)
        model = nn.Linear(4, 3).double()
        lr = torch.tensor(0.01, dtype=torch.float64)
        if how == "bare":
            optimizer = inner(model.parameters(), lr=lr)
        else:
            transforms = [ClipGradNorm(0.1)] if chain == "clip" else []
            optimizer = TransformingOptimizer(model.parameters(), inner, lr=lr, transforms=transforms)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)

        def opt_step(optimizer=optimizer, scheduler=scheduler):
            optimizer.step()
            scheduler.step()

        step = torch.compile(opt_step, backend=backend) if how == "compiled" else opt_step
        for index in range(4):
            optimizer.zero_grad()
            model(x).pow(2).sum().backward()
            step()
            if index == 1:
                compilations = backend.compilations
        runs.append((model, optimizer, scheduler))
        assert optimizer.param_groups[0]["lr"] is lr  # written in place: 0.01 / 2**4
        assert lr.item() == 0.01 / 16
    assert backend.compilations == compilations, "a new lr recompiled"
    for model, _, _ in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0][0].parameters(), model.parameters()))
    model, optimizer, scheduler = runs[0]
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = copy.deepcopy(model)
    resumed = TransformingOptimizer(resumed_model.parameters(), inner, lr=0.5, transforms=[ClipGradNorm(0.1)] if chain == "clip" else [])
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert isinstance(resumed.param_groups[0]["lr"], torch.Tensor) and resumed.param_groups[0]["lr"].item() == 0.01 / 16
    for net, opt in ((model, optimizer), (resumed_model, resumed)):
        for _ in range(2):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
    torch._dynamo.reset()


# -- without the frameworks ------------------------------------------------------------------------------
_WITHOUT_FRAMEWORKS = r"""
import runpy, sys, unittest
import samgria, samgria.integrations
assert not {"lightning", "transformers", "accelerate"} & set(sys.modules), "import samgria imports a framework"
for name in ("lightning", "transformers", "accelerate"):
    sys.modules[name] = None  # what an environment without them gives: ImportError
from samgria.integrations import accelerate, lightning, transformers
for cls in (lightning.SAMCallback, lightning.SAMMixedPrecision, transformers.SAMTrainer, accelerate.SAMAccelerator):
    try:
        cls()
    except ImportError as error:
        print(cls.__name__, "|", error)
for example in sys.argv[1:]:
    try:
        runpy.run_path(example, run_name="__main__")
    except unittest.SkipTest as skip:
        print("skipped |", skip)
"""


def test_without_the_frameworks_the_integrations_explain_and_the_examples_skip() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    examples = [str(root / "docs" / "examples" / f"integration_{name}.py") for name in ("lightning", "transformers", "accelerate")]
    env = {k: v for k, v in os.environ.items() if k != "SAMGRIA_REQUIRE_INTEGRATIONS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_FRAMEWORKS, *examples], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name, package in (("SAMCallback", "lightning"), ("SAMMixedPrecision", "lightning"), ("SAMTrainer", "transformers"), ("SAMAccelerator", "accelerate")):
        assert any(line.startswith(f"{name} | {name} needs {package}: pip install {package} (or pip install 'samgria[integrations]')") for line in lines), lines
    assert sum(line.startswith("skipped | needs") for line in lines) == 3, lines
