"""Hugging Face accelerate: SAM through prepared optimizers, and what is refused before it changes weights.

``SAMAccelerator`` gives prepared samgria optimizers the two-call loop and ``step(closure)`` under
a loss scaler, and so does ``sam_accelerated`` on what the stock ``Accelerator`` prepared (the
tests marked ``route`` run both); every run is checked against a hand-written SAM loop on the same batches (float64;
float32 with a power-of-two loss scale, which scales and unscales exactly). accelerate has no fp16
on the CPU, so the scaler that ``mixed_precision="fp16"`` creates on a GPU is set by hand.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

if not os.environ.get("SAMGRIA_REQUIRE_INTEGRATIONS"):
    pytest.importorskip("accelerate", reason="pip install 'samgria[integrations]'")
from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

from samgria import GSAM, SAM, WSAM, ClipGradNorm, LookSAM, TransformingOptimizer, sam_optimizer  # noqa: E402
from samgria.integrations.accelerate import SAMAccelerator, SAMAcceleratedOptimizer, sam_accelerated  # noqa: E402
from transform_infos import make_closure  # noqa: E402

LR, RHO = 0.1, 0.05
SCALE = 2.0**10
#: The two ways to a SAMAcceleratedOptimizer: SAMAccelerator's prepare, or the stock Accelerator's
#: prepare and then sam_accelerated on the optimizer it returned.
ROUTES = ["SAMAccelerator", "sam_accelerated"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; every test starts from none."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def model_and_optimizer(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    return model, sam_optimizer(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)


def batches(dtype=torch.float64, count=3, size=8):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 4, generator=generator, dtype=dtype), torch.randn(size, 1, generator=generator, dtype=dtype)) for _ in range(count)]


def reference(data, dtype=torch.float64):
    net, _ = model_and_optimizer(dtype)
    params = list(net.parameters())
    for x, y in data:
        grads = torch.autograd.grad(F.mse_loss(net(x), y), params)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        weights = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=RHO / norm)
        grads = torch.autograd.grad(F.mse_loss(net(x), y), params)
        with torch.no_grad():
            for p, w, g in zip(params, weights, grads):
                p.copy_(w - LR * g)
    return [p.detach() for p in params]


def assert_weights(model, expected, **tolerance):
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, **tolerance)


def with_loss_scaler(accelerator: Accelerator) -> torch.amp.GradScaler:
    """What ``mixed_precision="fp16"`` sets up on a GPU, on the CPU (float32 compute)."""
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    return accelerator.scaler


def make_accelerator(route: str, **kwargs) -> Accelerator:
    return (SAMAccelerator if route == "SAMAccelerator" else Accelerator)(cpu=True, **kwargs)


def prepare(route: str, accelerator: Accelerator, *objects):
    """``accelerator.prepare(*objects)``; on the stock route, then ``sam_accelerated`` on the optimizer."""
    prepared = list(accelerator.prepare(*objects))
    if route == "sam_accelerated":
        assert not any(isinstance(obj, SAMAcceleratedOptimizer) for obj in prepared)
        prepared = [sam_accelerated(obj) if isinstance(obj, AcceleratedOptimizer) else obj for obj in prepared]
    assert sum(isinstance(obj, SAMAcceleratedOptimizer) for obj in prepared) == 1
    return prepared


def accelerated_closure(accelerator, model, optimizer, x, y):
    """The closure of a prepared optimizer: its backward through ``accelerator.backward``."""

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        accelerator.backward(loss)
        return loss

    return closure


def two_call_step(accelerator, model, optimizer, x, y) -> None:
    accelerator.backward(F.mse_loss(model(x), y))
    optimizer.first_step(zero_grad=True)
    accelerator.backward(F.mse_loss(model(x), y))
    optimizer.second_step(zero_grad=True)


# -- what works ----------------------------------------------------------------------------------------
def test_step_closure_through_accelerates_own_prepared_optimizer() -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(*model_and_optimizer())
    data = batches()
    for x, y in data:
        optimizer.step(accelerated_closure(accelerator, model, optimizer, x, y))
    assert_weights(model, reference(data), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("route", ROUTES)
def test_two_call_loop_on_the_prepared_optimizer_with_a_prepared_scheduler(route: str) -> None:
    accelerator = make_accelerator(route)
    model, optimizer = model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=1.0)
    model, optimizer, scheduler = prepare(route, accelerator, model, optimizer, scheduler)
    assert isinstance(optimizer, SAMAcceleratedOptimizer)
    data = batches()
    for x, y in data:
        two_call_step(accelerator, model, optimizer, x, y)
        scheduler.step()
    assert not optimizer.step_was_skipped
    assert scheduler.scheduler.last_epoch == len(data)
    assert_weights(model, reference(data), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("route", ROUTES)
def test_step_closure_returns_the_first_loss(route: str) -> None:
    accelerator = make_accelerator(route)
    model, optimizer = prepare(route, accelerator, *model_and_optimizer())
    data = batches()
    for x, y in data:
        start = F.mse_loss(model(x), y).detach()
        loss = optimizer.step(accelerated_closure(accelerator, model, optimizer, x, y))
        assert torch.equal(loss, start) and not loss.requires_grad
    assert_weights(model, reference(data), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("route", ROUTES)
def test_micro_batches_in_both_passes_equal_sam_on_the_whole_batch(route: str) -> None:
    """The accumulation accelerate's accumulate() cannot do: both passes over every micro-batch."""
    accelerator = make_accelerator(route)
    model, optimizer = prepare(route, accelerator, *model_and_optimizer())
    data = batches()
    for x, y in data:
        chunks = list(zip(x.chunk(2), y.chunk(2)))
        for pass_ in ("first", "second"):
            for index, (cx, cy) in enumerate(chunks):
                last = index == len(chunks) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    accelerator.backward(F.mse_loss(model(cx), cy) / len(chunks))
            if pass_ == "first":
                optimizer.first_step(zero_grad=True)
        optimizer.second_step(zero_grad=True)
    assert_weights(model, reference(data), rtol=1e-12, atol=1e-14)


def closure_over_micro_batches(accelerator, model, optimizer, x, y, count):
    """A closure that accumulates ``count`` equal micro-batches of ``(x, y)`` itself: each loss
    through ``accelerator.backward`` (which divides it by ``gradient_accumulation_steps``)."""

    def closure():
        optimizer.zero_grad()
        total = 0.0
        for cx, cy in zip(x.chunk(count), y.chunk(count)):
            loss = F.mse_loss(model(cx), cy)
            accelerator.backward(loss)
            total = total + loss.detach() / count
        return total

    return closure


@pytest.mark.parametrize("route", ROUTES)
def test_gradient_accumulation_without_accumulate_steps_a_closure_over_every_micro_batch(route: str) -> None:
    """gradient_accumulation_steps=k with accumulate() unused: the closure runs all k micro-batches
    in both passes, each loss divided by k by accelerator.backward, so the step is SAM on the mean
    loss of the whole batch (the hand-written reference), not refused."""
    k = 4
    accelerator = make_accelerator(route, gradient_accumulation_steps=k)
    model, optimizer = prepare(route, accelerator, *model_and_optimizer())
    data = batches()
    for x, y in data:
        start = F.mse_loss(model(x), y).detach()
        loss = optimizer.step(closure_over_micro_batches(accelerator, model, optimizer, x, y, k))
        torch.testing.assert_close(loss, start, rtol=1e-12, atol=1e-14)
    assert_weights(model, reference(data), rtol=1e-12, atol=1e-14)


def test_sam_accelerated_two_call_loop_equals_step_closure_of_the_unprepared_optimizer_bit_for_bit() -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(*model_and_optimizer())
    assert type(optimizer) is AcceleratedOptimizer and not hasattr(optimizer, "first_step")
    prepared = optimizer
    optimizer = sam_accelerated(optimizer)
    assert optimizer is prepared and isinstance(optimizer, SAMAcceleratedOptimizer)
    assert accelerator._optimizers == [optimizer] and accelerator._optimizers[0] is optimizer
    plain_model, plain_optimizer = model_and_optimizer()
    for x, y in batches():
        two_call_step(accelerator, model, optimizer, x, y)
        plain_optimizer.step(make_closure(plain_model, plain_optimizer, x, y))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain_model.parameters()))
    assert not optimizer.step_was_skipped


def test_sam_accelerated_is_idempotent_and_leaves_sam_accelerators_optimizer_as_it_is() -> None:
    optimizer = sam_accelerated(Accelerator(cpu=True).prepare(model_and_optimizer()[1]))
    state = dict(optimizer.__dict__)
    assert sam_accelerated(optimizer) is optimizer and sam_accelerated(sam_accelerated(optimizer)) is optimizer
    assert type(optimizer) is SAMAcceleratedOptimizer and optimizer.__dict__ == state
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    prepared = SAMAccelerator(cpu=True).prepare(model_and_optimizer()[1])
    assert sam_accelerated(prepared) is prepared and type(prepared) is SAMAcceleratedOptimizer


def test_sam_accelerated_refuses_what_has_no_two_call_loop() -> None:
    accelerator = Accelerator(cpu=True)
    model, sam = model_and_optimizer()
    with pytest.raises(TypeError, match=r"^sam_accelerated\(prepared_optimizer\) takes the accelerate\.optimizer\.AcceleratedOptimizer that Accelerator\.prepare returns, got samgria\.optim\.TransformingOptimizer: prepare it first, sam_accelerated\(accelerator\.prepare\(optimizer\)\)$"):
        sam_accelerated(sam)
    with pytest.raises(TypeError, match=r"^sam_accelerated\(prepared_optimizer\) takes .*, got torch\.optim\.sgd\.SGD$"):
        sam_accelerated(torch.optim.SGD(model.parameters(), lr=LR))
    with pytest.raises(TypeError, match=r"got builtins\.NoneType$"):
        sam_accelerated(None)

    from accelerate.utils.deepspeed import DeepSpeedOptimizerWrapper

    with pytest.raises(TypeError, match=r"^sam_accelerated\(prepared_optimizer\) takes accelerate's AcceleratedOptimizer itself, got its subclass accelerate\.utils\.deepspeed\.DeepSpeedOptimizerWrapper: under DeepSpeed the engine runs the optimizer step itself"):
        sam_accelerated(DeepSpeedOptimizerWrapper(sam))

    class OwnWrapper(AcceleratedOptimizer):
        pass

    with pytest.raises(TypeError, match=r"got its subclass .*OwnWrapper: its methods would be replaced; subclass SAMAcceleratedOptimizer instead$"):
        sam_accelerated(OwnWrapper(sam, device_placement=False))

    plain = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=LR))
    with pytest.raises(ValueError, match=r"^sam_accelerated\(prepared_optimizer\) needs a prepared samgria optimizer, got an AcceleratedOptimizer around torch\.optim\.sgd\.SGD"):
        sam_accelerated(plain)
    clipping = accelerator.prepare(TransformingOptimizer(model.parameters(), torch.optim.SGD, transforms=[ClipGradNorm(1.0)], lr=LR))
    with pytest.raises(ValueError, match=r"^sam_accelerated\(prepared_optimizer\) needs a samgria optimizer whose chain re-evaluates the loss \(SAM, ASAM\), got .*\[ClipGradNorm\]: there is no second pass"):
        sam_accelerated(clipping)
    assert type(plain) is AcceleratedOptimizer and type(clipping) is AcceleratedOptimizer


@pytest.mark.parametrize("loop", ["two-call", "closure"])
@pytest.mark.parametrize("route", ROUTES)
def test_loss_scaler_equals_sam_and_an_overflow_skips_the_step(route: str, loop: str) -> None:
    accelerator = make_accelerator(route)
    scaler = with_loss_scaler(accelerator)
    model, optimizer = prepare(route, accelerator, *model_and_optimizer(torch.float32))
    data = batches(torch.float32)

    def step(x, y):
        if loop == "two-call":
            two_call_step(accelerator, model, optimizer, x, y)
            return
        optimizer.step(accelerated_closure(accelerator, model, optimizer, x, y))

    for x, y in data:
        step(x, y)
        assert not optimizer.step_was_skipped
    assert scaler.get_scale() == SCALE
    assert_weights(model, reference(data, torch.float32), rtol=1e-5, atol=1e-6)

    for overflow_pass in (0, 1):
        before = [p.detach().clone() for p in model.parameters()]
        calls = []

        def overflow(grad, overflow_pass=overflow_pass):
            calls.append(None)
            return torch.full_like(grad, math.inf) if len(calls) - 1 == overflow_pass else grad

        handle = model[2].weight.register_hook(overflow)
        step(*data[0])
        handle.remove()
        assert optimizer.step_was_skipped
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == SCALE / 4


# -- what is refused, before any weight changes ----------------------------------------------------------
def test_a_scaler_driving_step_closure_is_refused_before_anything_changes() -> None:
    """accelerate's own fp16 step(closure) calls scaler.step(optimizer, closure)."""
    accelerator = Accelerator(cpu=True)
    with_loss_scaler(accelerator)
    model, optimizer = accelerator.prepare(*model_and_optimizer(torch.float32))
    x, y = batches(torch.float32)[0]
    accelerator.backward(F.mse_loss(model(x), y))  # the scaler has scaled a loss: it will call step()
    optimizer.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    closure = accelerated_closure(accelerator, model, optimizer, x, y)
    with pytest.raises(
        RuntimeError,
        match=r"^torch\.amp\.GradScaler\.step\(optimizer, closure\) cannot drive step\(closure\).*SAMAccelerator.*"
        r"optimizer = samgria\.integrations\.accelerate\.sam_accelerated\(accelerator\.prepare\(optimizer\)\)",
    ):
        optimizer.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not hasattr(optimizer.optimizer, "found_inf") and not hasattr(optimizer.optimizer, "grad_scale")


@pytest.mark.parametrize("kind", ["clip", "maml"])
def test_step_closure_of_an_optimizer_the_loss_scaler_unscales_for_is_refused_before_anything_changes(kind) -> None:
    """accelerate's own fp16 ``step(closure)`` hands the closure to the scaler, which unscales the
    gradients and then lets the closure compute them anew, scaled (an update ``SCALE`` times too
    large before): a chain that does not re-evaluate the loss (which SAMAccelerator leaves to
    accelerate) and a meta-optimizer refuse it; the closure-free loop steps as the unscaled one."""
    from samgria import MAML

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    twin = copy.deepcopy(net)

    def build(module):
        if kind == "maml":
            return MAML(module, torch.optim.SGD, lr=0.1)
        return TransformingOptimizer(module.parameters(), torch.optim.SGD, lr=0.1, transforms=[ClipGradNorm(100.0)])

    accelerator = SAMAccelerator(cpu=True)
    with_loss_scaler(accelerator)
    model, optimizer = accelerator.prepare(net, build(net))
    assert type(optimizer) is AcceleratedOptimizer  # nothing to run twice: accelerate's own
    x, y = batches(torch.float32)[0]
    closure = accelerated_closure(accelerator, model, optimizer, x, y)
    closure()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"^torch\.amp\.GradScaler\.step\(optimizer, closure\) cannot drive "):
        optimizer.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    accelerator.scaler.update()  # the scaler had unscaled for the refused step: its state starts anew
    closure()
    optimizer.step()
    twin_optimizer = build(twin)
    F.mse_loss(twin(x), y).backward()
    twin_optimizer.step()
    for got, want in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("route", ROUTES)
def test_step_closure_under_a_loss_scaler_refuses_m_sharpness_before_the_closure_runs(route: str) -> None:
    """Under a loss scaler step(closure) runs the two-call loop, in which a rank whose local first
    pass overflowed would skip its second pass alone: ``first_pass_context`` is refused."""
    accelerator = make_accelerator(route)
    with_loss_scaler(accelerator)
    net, sam = model_and_optimizer(torch.float32)
    sam.first_pass_context = contextlib.nullcontext
    model, optimizer = prepare(route, accelerator, net, sam)
    x, y = batches(torch.float32)[0]
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(None)
        return accelerated_closure(accelerator, model, optimizer, x, y)()

    with pytest.raises(
        RuntimeError,
        match=r"^SAMAcceleratedOptimizer\.step\(closure\) under a loss scaler runs SAM through "
        r"first_step\(\)/second_step\(\), and this optimizer cannot: first_pass_context \(m-sharpness\)",
    ):
        optimizer.step(closure)
    assert calls == []
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("route", ROUTES)
def test_accumulate_is_refused_on_a_micro_batch_that_does_not_step(route: str) -> None:
    accelerator = make_accelerator(route, gradient_accumulation_steps=2)
    model, optimizer = prepare(route, accelerator, *model_and_optimizer())
    x, y = batches()[0]
    before = [p.detach().clone() for p in model.parameters()]
    with accelerator.accumulate(model):
        accelerator.backward(F.mse_loss(model(x), y))
        with pytest.raises(RuntimeError, match=r"^first_step\(\) on a micro-batch that accelerate does not synchronise"):
            optimizer.first_step()
        with pytest.raises(RuntimeError, match=r"^step\(closure\) on a micro-batch that accelerate does not synchronise"):
            optimizer.step(lambda: F.mse_loss(model(x), y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))

    # A step begun on the micro-batch that steps and finished on one that does not: put back, refused.
    with accelerator.accumulate(model):
        accelerator.backward(F.mse_loss(model(x), y))
        optimizer.first_step(zero_grad=True)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "perturbed"
    with accelerator.accumulate(model):
        accelerator.backward(F.mse_loss(model(x), y))
        with pytest.raises(RuntimeError, match=r"^second_step\(\) on a micro-batch that accelerate does not synchronise"):
            optimizer.second_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert optimizer.optimizer._pending is None


def test_stock_accelerator_accumulation_with_step_closure_is_refused_before_anything_changes() -> None:
    """accelerate's own AcceleratedOptimizer.step skips the micro-batches accumulate() does not step,
    so a SAM step(closure) would see the last one only: the optimizer refuses it on the one that
    steps, before any weight changes."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(*model_and_optimizer())
    assert not isinstance(optimizer, SAMAcceleratedOptimizer)
    before = [p.detach().clone() for p in model.parameters()]
    ran = []
    data = batches()[:2]
    with pytest.raises(RuntimeError, match=r"^SAM re-evaluate\(s\) the loss, but accelerate's gradient_accumulation_steps=2 \(accumulate\(\) steps the optimizer on the last micro-batch only\)"):
        for index, (x, y) in enumerate(data):
            with accelerator.accumulate(model):
                closure = accelerated_closure(accelerator, model, optimizer, x, y)
                optimizer.step(lambda: (ran.append(index), closure())[1])
    assert ran == []  # micro-batch 0 was never run by accelerate, micro-batch 1 was refused
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))

    # One micro-batch per step through the same stock route is not refused.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(*model_and_optimizer())
    x, y = data[0]
    optimizer.step(accelerated_closure(accelerator, model, optimizer, x, y))
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("route", [*ROUTES, "Accelerator"])
def test_accumulate_with_a_closure_over_every_micro_batch_is_still_refused(route: str) -> None:
    """The closure that steps without accumulate() is refused inside accumulate() with k > 1: on a
    SAMAcceleratedOptimizer on the first micro-batch (which accumulate() does not step), on
    accelerate's own AcceleratedOptimizer on the one that steps (the first is never run)."""
    k = 2
    accelerator = make_accelerator(route, gradient_accumulation_steps=k)
    if route == "Accelerator":
        model, optimizer = accelerator.prepare(*model_and_optimizer())
        assert type(optimizer) is AcceleratedOptimizer
        message = (
            r"^SAM re-evaluate\(s\) the loss, but accelerate's gradient_accumulation_steps=2 "
            r"\(accumulate\(\) steps the optimizer on the last micro-batch only\)"
        )
    else:
        model, optimizer = prepare(route, accelerator, *model_and_optimizer())
        message = r"^step\(closure\) on a micro-batch that accelerate does not synchronise"
    before = [p.detach().clone() for p in model.parameters()]
    ran = []
    with pytest.raises(RuntimeError, match=message):
        for index, (x, y) in enumerate(batches()[:k]):
            with accelerator.accumulate(model):
                closure = closure_over_micro_batches(accelerator, model, optimizer, x, y, k)
                optimizer.step(lambda: (ran.append(index), closure())[1])
    assert ran == []
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class _Stepping(TransformingOptimizer):
    def step(self, closure=None):
        return super().step(closure)


class _SteppingAgain(_Stepping):
    def step(self, closure=None):
        return super().step(closure)


def test_the_stock_route_refuses_a_subclass_of_a_subclass_with_its_own_steps() -> None:
    """Each subclass whose step calls super().step() puts frames between accelerate's step and
    the check: the refusal must still find accelerate's AcceleratedOptimizer.step."""
    accelerator = make_accelerator("Accelerator", gradient_accumulation_steps=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(torch.float64)
    built = _SteppingAgain(net.parameters(), torch.optim.SGD, lr=LR, transforms=[SAM(RHO)])
    model, optimizer = accelerator.prepare(net, built)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches()[0]
    with pytest.raises(RuntimeError, match=r"^SAM re-evaluate\(s\) the loss, but accelerate's gradient_accumulation_steps=2"):
        optimizer.step(closure_over_micro_batches(accelerator, model, optimizer, x, y, 2))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_deepspeed_and_megatron_are_refused_at_prepare() -> None:
    class UnderDeepSpeed(SAMAccelerator):
        distributed_type = DistributedType.DEEPSPEED  # what a DeepSpeed plugin sets (not installed)

    accelerator = UnderDeepSpeed(cpu=True)
    model, optimizer = model_and_optimizer()
    with pytest.raises(ValueError, match=r"^SAM under DEEPSPEED: its engine runs the optimizer step itself"):
        accelerator.prepare(model, optimizer)


# -- meta-learners under accelerate ------------------------------------------------------------------
def _meta(kind: str):
    from samgria import MAML, Reptile

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    cls = MAML if kind == "maml" else Reptile
    return net, cls(net, torch.optim.Adam, lr=1e-2, inner_lr=0.05, inner_steps=2)


def _adapt_all(meta, tasks, backward) -> None:
    from samgria import Reptile

    losses = [F.mse_loss(meta.adapt(lambda f, t=t: F.mse_loss(f(t.support_x), t.support_y))(t.query_x), t.query_y) for t in tasks]
    if not isinstance(meta, Reptile):
        backward(torch.stack(losses).mean() / 2)


@pytest.mark.parametrize("kind", ["maml", "reptile"])
def test_a_meta_step_with_a_closure_under_accumulate_is_refused_and_the_closure_free_loop_trains(kind) -> None:
    """accumulate() calls the optimizer on the last micro-batch only, so a closure covers that
    micro-batch's tasks alone and the earlier ones were never run: refused on the step, with
    nothing changed. The documented closure-free pattern (adapt and back-propagate each
    micro-batch, then step()) equals one step over every task."""
    from samgria.data import SinusoidTaskSampler

    sampler = SinusoidTaskSampler(k_support=5, k_query=5, seed=1, dtype=torch.float64)
    micro_batches = [sampler.sample(2) for _ in range(2)]

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    net, meta = _meta(kind)
    net, meta = accelerator.prepare(net, meta)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"step got a closure under accelerate's gradient_accumulation_steps=2"):
        for tasks in micro_batches:
            with accelerator.accumulate(net):
                meta.step(lambda tasks=tasks: _adapt_all(meta.optimizer, tasks, accelerator.backward))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    net, meta = _meta(kind)
    net, meta = accelerator.prepare(net, meta)
    meta.zero_grad()
    for tasks in micro_batches:
        with accelerator.accumulate(net):
            _adapt_all(meta.optimizer, tasks, accelerator.backward)
            meta.step()

    reference_net, reference = _meta(kind)
    _adapt_all(reference, micro_batches[0] + micro_batches[1], lambda loss: (loss * 2 / 2).backward())
    reference.step()
    for a, b in zip(net.parameters(), reference_net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


# -- steps the optimizer's non-finite policy skips ------------------------------------------------------
@pytest.mark.parametrize("nan_pass", ["both", "second"])
@pytest.mark.parametrize("loop", ["two-call", "closure"])
@pytest.mark.parametrize("route", [*ROUTES, "scheduler-before-sam_accelerated"])
def test_a_step_the_non_finite_policy_skips_does_not_advance_the_prepared_scheduler(route: str, loop: str, nan_pass: str) -> None:
    """Without a loss scaler a NaN loss makes the optimizer skip the step (``skipped_steps``):
    ``step_was_skipped`` and ``accelerator.optimizer_step_was_skipped`` say so, and accelerate's
    prepared scheduler does not advance, as after a step the loss scaler skips."""
    model, sam = model_and_optimizer()
    data = batches(count=4)
    if route == "scheduler-before-sam_accelerated":  # torch's scheduler pins the prepared optimizer's step
        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, sam)
        scheduler = accelerator.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s)))
        assert getattr(optimizer.__dict__.get("step"), "_wrapped_by_lr_sched", False)
        optimizer = sam_accelerated(optimizer)
    else:
        accelerator = make_accelerator(route)
        scheduler = torch.optim.lr_scheduler.LambdaLR(sam, lambda s: 1.0 / (1 + s))
        model, optimizer, scheduler = prepare(route, accelerator, model, sam, scheduler)
    seen = []
    for index, (x, y) in enumerate(data):
        passes = []

        def loss_of(x=x, y=y, index=index, passes=passes):
            passes.append(None)
            loss = F.mse_loss(model(x), y)
            bad = index == 1 and (nan_pass == "both" or len(passes) == 2)
            return loss * float("nan") if bad else loss

        def closure():
            optimizer.zero_grad()
            loss = loss_of()
            accelerator.backward(loss)
            return loss

        with pytest.warns(RuntimeWarning, match="not finite: the step is skipped") if index == 1 else contextlib.nullcontext():
            if loop == "two-call":
                accelerator.backward(loss_of())
                optimizer.first_step(zero_grad=True)
                accelerator.backward(loss_of())
                optimizer.second_step(zero_grad=True)
            else:
                optimizer.step(closure)
        scheduler.step()
        seen.append((optimizer.step_was_skipped, accelerator.optimizer_step_was_skipped, scheduler.scheduler.last_epoch, optimizer.param_groups[0]["lr"]))
    assert sam.skipped_steps == 1
    # LambdaLR(1 / (1 + s)) from LR: advanced after steps 0, 2 and 3, not after the skipped step 1.
    assert seen == [(False, False, 1, LR / 2), (True, True, 1, LR / 2), (False, False, 2, LR / 3), (False, False, 3, LR / 4)]


def pin_as_torch_2_4_does(optimizer: torch.optim.Optimizer) -> None:
    """Pin ``optimizer.step`` as torch 2.4's ``LRScheduler.__init__`` does: its wrapper has no
    ``__wrapped__`` (torch 2.5 added ``functools.wraps``); the class's step is in its closure."""
    owner = weakref.ref(optimizer)
    function = type(optimizer).step

    def wrapper(*args, **kwargs):
        instance = owner()
        instance._opt_called = True
        return function.__get__(instance, type(instance))(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper


@pytest.mark.parametrize("pinned_by", ["this torch", "torch 2.4"])
def test_a_scheduler_built_on_the_prepared_optimizer_before_sam_accelerated_lets_step_closure_run_under_a_scaler(pinned_by: str) -> None:
    """torch's scheduler pins the prepared optimizer's step on the instance; sam_accelerated pins
    SAMAcceleratedOptimizer.step in its place, so step(closure) under a loss scaler is SAM's."""
    accelerator = Accelerator(cpu=True)
    with_loss_scaler(accelerator)
    model, optimizer = accelerator.prepare(*model_and_optimizer(torch.float32))
    scheduler = accelerator.prepare(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=1.0))
    if pinned_by == "torch 2.4":
        pin_as_torch_2_4_does(optimizer)
    optimizer = sam_accelerated(optimizer)
    data = batches(torch.float32)
    for x, y in data:
        optimizer.step(accelerated_closure(accelerator, model, optimizer, x, y))
        scheduler.step()
    assert scheduler.scheduler.last_epoch == len(data) and optimizer.__dict__["_opt_called"]
    assert_weights(model, reference(data, torch.float32), rtol=1e-5, atol=1e-6)


# -- gradient clipping and the transforms whose update takes in the first pass's gradient -------------
FIRST_PASS_IN_UPDATE = {
    "GSAM": lambda: GSAM(RHO, alpha=0.4),
    "WSAM": lambda: WSAM(RHO, gamma=0.3),
    "WSAM-coupled": lambda: WSAM(RHO, gamma=0.3, decouple=False),
    "LookSAM": lambda: LookSAM(RHO, k=2),
}


def steep_batches(count=4):
    """Large gradients (large targets): clipping to norm 1 is active every step."""
    return [(x, 50 * y) for x, y in batches(count=count)]


@pytest.mark.parametrize("clip", ["norm", "value"])
@pytest.mark.parametrize("name", list(FIRST_PASS_IN_UPDATE))
def test_sam_accelerators_clipping_between_the_passes_is_refused_and_the_step_cancelled(name: str, clip: str) -> None:
    accelerator = SAMAccelerator(cpu=True)
    model, _ = model_and_optimizer()
    transform = FIRST_PASS_IN_UPDATE[name]()
    sam = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=LR, transforms=[transform])
    model, optimizer = accelerator.prepare(model, sam)
    x, y = steep_batches()[0]
    before = [p.detach().clone() for p in model.parameters()]
    accelerator.backward(F.mse_loss(model(x), y))
    optimizer.first_step(zero_grad=True)
    accelerator.backward(F.mse_loss(model(x), y))
    grads = [p.grad.clone() for p in model.parameters()]
    kind = type(transform).__name__
    if clip == "norm":
        call = r"accelerator\.clip_grad_norm_\(parameters, max_norm=1\.0\)"
        chain = r"samgria\.ClipGradNorm\(1\.0\)\] clips the gradient the inner optimizer steps with to a norm of at most 1\.0 in each parameter group"
    else:
        call = r"accelerator\.clip_grad_value_\(parameters, clip_value=1\.0\)"
        chain = r"samgria\.ClampGrad\(-1\.0, 1\.0\)\] clamps every element of the gradient the inner optimizer steps with to \[-1\.0, 1\.0\]"
    decoupled = r"; WSAM\(decouple=True\) adds its sharpness term after the inner step.*" if name == "WSAM" else ""
    with pytest.raises(
        RuntimeError,
        match=rf"^{call} between first_step\(\) and second_step\(\) with {kind} in the chain: "
        rf"{call.split('(')[0]} clips the gradients once, after the second backward, but {kind} takes the "
        r"first pass's gradient \(kept since first_step\(\), before that clipping\) into the update, so the "
        rf"clipping does not bound the update\. Do not clip between the passes and clip in the chain after "
        rf"{kind}: transforms=\[\.\.\., {kind}\(\.\.\.\), {chain}{decoupled}\. The step was cancelled: the "
        r"weights are back as before first_step\(\)$",
    ):
        if clip == "norm":
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
        else:
            accelerator.clip_grad_value_(model.parameters(), 1.0)
    assert sam._pending is None
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "the weights are back at w"
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads)), "nothing was clipped"


def test_sam_accelerators_clipping_inside_step_closure_clips_both_passes_and_is_not_refused() -> None:
    """Inside the closure of step(closure) the clipping reaches both passes: not refused, and the
    step is the unprepared optimizer's step(closure) with the same clipping, bit for bit."""
    accelerator = SAMAccelerator(cpu=True)
    model, _ = model_and_optimizer()
    sam = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=LR, transforms=[GSAM(RHO, alpha=0.4)])
    model, optimizer = accelerator.prepare(model, sam)
    plain_model, _ = model_and_optimizer()
    plain = TransformingOptimizer(plain_model.parameters(), torch.optim.SGD, lr=LR, transforms=[GSAM(RHO, alpha=0.4)])
    for x, y in steep_batches(count=2):

        def closure():
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), y)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            return loss

        def plain_closure():
            plain.zero_grad()
            loss = F.mse_loss(plain_model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
            return loss

        optimizer.step(closure)
        plain.step(plain_closure)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain_model.parameters()))


def test_sam_accelerators_clipping_between_the_passes_clips_sams_update() -> None:
    """SAM steps with the second pass's gradient alone: clipping it is not refused."""
    accelerator = SAMAccelerator(cpu=True)
    model, optimizer = accelerator.prepare(*model_and_optimizer())
    x, y = steep_batches()[0]
    before = [p.detach().clone() for p in model.parameters()]
    accelerator.backward(F.mse_loss(model(x), y))
    optimizer.first_step(zero_grad=True)
    accelerator.backward(F.mse_loss(model(x), y))
    assert float(accelerator.clip_grad_norm_(model.parameters(), 1.0)) > 1.0
    optimizer.second_step(zero_grad=True)
    update = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before)))
    assert update == pytest.approx(LR, rel=1e-5)  # torch's 1e-6 in its divisor


@pytest.mark.parametrize("loop", ["two-call", "closure"])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", ["GSAM", "WSAM-coupled", "LookSAM"])
def test_clip_grad_norm_after_the_transform_bounds_the_update(name: str, route: str, loop: str) -> None:
    """The remedy the refusal names: ClipGradNorm after the transform, in the chain. The update of
    plain SGD is then lr times a gradient of norm 1 (measured from the weights)."""
    accelerator = make_accelerator(route)
    model, _ = model_and_optimizer()
    sam = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=LR, transforms=[FIRST_PASS_IN_UPDATE[name](), ClipGradNorm(1.0)])
    model, optimizer = prepare(route, accelerator, model, sam)
    norms = []
    for x, y in steep_batches():
        before = [p.detach().clone() for p in model.parameters()]
        if loop == "two-call":
            two_call_step(accelerator, model, optimizer, x, y)
        else:
            optimizer.step(accelerated_closure(accelerator, model, optimizer, x, y))
        norms.append(math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before))))
    assert norms == pytest.approx([LR * 1.0] * 4, rel=1e-5)  # ClipGradNorm's 1e-6 in its divisor


def test_a_step_finished_on_the_prepared_optimizer_after_a_skipped_one_is_not_reported_skipped() -> None:
    """``first_step()`` on the samgria optimizer itself and ``second_step()`` on the prepared one
    (as ``first_step()`` then ``scaler.step(optimizer)`` in plain torch), right after a step the
    non-finite policy skipped: the applied step must read as not skipped (a count kept from the
    earlier step's ``first_step()`` made it read as skipped, and the schedule stalled)."""
    model, sam = model_and_optimizer()
    accelerator = SAMAccelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, sam)
    (x0, y0), (x1, y1) = batches(count=2)
    accelerator.backward(F.mse_loss(model(x0), y0))
    optimizer.first_step(zero_grad=True)
    accelerator.backward(F.mse_loss(model(x0), y0) * float("nan"))
    with pytest.warns(RuntimeWarning, match="not finite: the step is skipped"):
        optimizer.second_step(zero_grad=True)
    assert optimizer.step_was_skipped and sam.skipped_steps == 1
    before = [p.detach().clone() for p in model.parameters()]
    accelerator.backward(F.mse_loss(model(x1), y1))
    sam.first_step(zero_grad=True)
    accelerator.backward(F.mse_loss(model(x1), y1))
    optimizer.second_step(zero_grad=True)
    assert sam.skipped_steps == 1 and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not optimizer.step_was_skipped and not accelerator.optimizer_step_was_skipped


# -- clipping under fp16, where accelerate's clipping unscales through the loss scaler ---------------------
def unscaling_as_under_fp16(accelerator: Accelerator) -> None:
    """After ``prepare``: ``accelerator.clip_grad_norm_`` and ``clip_grad_value_`` unscale the
    gradients through the loss scaler first, as under ``mixed_precision="fp16"`` on a GPU (on the
    CPU accelerate leaves ``native_amp`` off; the fixture resets the shared state)."""
    accelerator.native_amp = True
    accelerator.state._mixed_precision = "fp16"


def _clip(accelerator, model, how: str) -> None:
    if how == "value":
        accelerator.clip_grad_value_(model.parameters(), 0.5)
    else:
        accelerator.clip_grad_norm_(model.parameters(), 1.0)


def _plain_clip(model, how: str) -> None:
    if how == "value":
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.5)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "name, loop, clipped",
    # GSAM: SAMAccelerator refuses clipping between the passes (it would not bound the update)
    [("SAM", "closure", "both"), ("SAM", "two-call", "both"), ("SAM", "two-call", "first"), ("GSAM", "closure", "both"), ("GSAM", "two-call", "first")],
)
def test_clipping_a_pass_under_fp16_steps_as_the_same_clipping_without_a_scaler(name, loop, clipped, route) -> None:
    """accelerate's clipping after the first backward unscales the first pass's gradients: the
    second pass's clipping raised torch's "unscale_() has already been called on this optimizer",
    and without it the scaler stepped with the second pass's gradients still scaled (an update
    SCALE times too large). Equal to the same clipping in the unscaled optimizer's step(closure)."""
    transforms = {"SAM": lambda: [SAM(RHO)], "GSAM": lambda: [GSAM(RHO, alpha=0.4)]}[name]
    accelerator = make_accelerator(route)
    scaler = with_loss_scaler(accelerator)
    model, _ = model_and_optimizer(torch.float32)
    plain_model = copy.deepcopy(model)
    model, optimizer = prepare(route, accelerator, model, TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=LR, transforms=transforms()))
    plain = TransformingOptimizer(plain_model.parameters(), torch.optim.SGD, lr=LR, transforms=transforms())
    unscaling_as_under_fp16(accelerator)
    for x, y in [(x, 50 * y) for x, y in batches(torch.float32, count=2)]:  # clipping active
        passes = []

        def closure():
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), y)
            accelerator.backward(loss)
            _clip(accelerator, model, "norm")
            return loss

        def plain_closure():
            plain.zero_grad()
            loss = F.mse_loss(plain_model(x), y)
            loss.backward()
            passes.append(None)
            if clipped == "both" or len(passes) == 1:
                _plain_clip(plain_model, "norm")
            return loss

        if loop == "closure":
            optimizer.step(closure)
        else:
            accelerator.backward(F.mse_loss(model(x), y))
            _clip(accelerator, model, "norm")
            optimizer.first_step(zero_grad=True)
            accelerator.backward(F.mse_loss(model(x), y))
            if clipped == "both":
                _clip(accelerator, model, "norm")
            optimizer.second_step(zero_grad=True)
        plain.step(plain_closure)
        assert not optimizer.step_was_skipped
        for got, want in zip(model.parameters(), plain_model.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == SCALE



def test_two_call_zero_grad_must_be_a_bool_before_anything_changes() -> None:
    """``first_step(zero_grad=1)`` put the gradients that accelerate's clipping had unscaled under
    fp16 back into the loss scale (and made the scaler forget it) before the samgria optimizer's
    TypeError, and ``second_step(zero_grad='yes')`` was taken as a truthy flag → TypeError naming
    the argument first: the gradients as they were, the step still pending, and the run then
    equals the hand-written SAM."""
    accelerator = SAMAccelerator(cpu=True)
    with_loss_scaler(accelerator)
    model, optimizer = accelerator.prepare(*model_and_optimizer(torch.float32))
    unscaling_as_under_fp16(accelerator)
    data = batches(torch.float32, count=1)
    x, y = data[0]
    accelerator.backward(F.mse_loss(model(x), y))
    accelerator.clip_grad_norm_(model.parameters(), 1e9)  # unscales, clips nothing
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"^zero_grad must be a bool, got 1$"):
        optimizer.first_step(zero_grad=1)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    optimizer.first_step(zero_grad=True)
    accelerator.backward(F.mse_loss(model(x), y))
    perturbed = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"^zero_grad must be a bool, got 'yes'$"):
        optimizer.second_step(zero_grad="yes")
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), perturbed))  # still at w + e
    optimizer.second_step(zero_grad=True)
    assert all(p.grad is None for p in model.parameters())
    assert_weights(model, reference(data, torch.float32), rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize("loop", ["two-call", "closure"])
@pytest.mark.parametrize("how", ["norm", "value"])
def test_an_overflow_in_a_first_pass_clipped_under_fp16_skips_the_step(how, loop) -> None:
    """Clipping by value turns the overflow's inf into finite values after the scaler recorded it:
    the step is skipped and the scale backs off, as without clipping."""
    accelerator = SAMAccelerator(cpu=True)
    scaler = with_loss_scaler(accelerator)
    model, optimizer = accelerator.prepare(*model_and_optimizer(torch.float32))
    unscaling_as_under_fp16(accelerator)
    x, y = batches(torch.float32)[0]
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    model[2].weight.register_hook(lambda grad: (calls.append(None), grad * (math.inf if len(calls) == 1 else 1.0))[1])

    def backward_and_clip():
        loss = F.mse_loss(model(x), y)
        accelerator.backward(loss)
        _clip(accelerator, model, how)
        return loss

    if loop == "closure":
        optimizer.step(lambda: (optimizer.zero_grad(), backward_and_clip())[1])
    else:
        backward_and_clip()
        optimizer.first_step(zero_grad=True)  # keeps the non-finite gradients: the second pass adds to them
        backward_and_clip()
        optimizer.second_step(zero_grad=True)
    assert optimizer.step_was_skipped and accelerator.optimizer_step_was_skipped
    assert scaler.get_scale() == SCALE / 2
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("abandon", ["closure-raises", "cancel_step"])
def test_a_step_abandoned_after_the_scaler_unscaled_leaves_the_next_step_scaled_as_usual(abandon) -> None:
    """A step abandoned after accelerate's clipping unscaled the second pass (the closure raised,
    or ``cancel_step()``) left the scaler marking the optimizer unscaled: the next step was applied
    with its gradients still scaled (SCALE times SAM's update)."""
    accelerator = SAMAccelerator(cpu=True)
    with_loss_scaler(accelerator)
    model, optimizer = accelerator.prepare(*model_and_optimizer(torch.float32))
    unscaling_as_under_fp16(accelerator)
    data = batches(torch.float32)
    x, y = data[0]
    before = [p.detach().clone() for p in model.parameters()]
    if abandon == "cancel_step":
        accelerator.backward(F.mse_loss(model(x), y))
        optimizer.first_step(zero_grad=True)
        accelerator.backward(F.mse_loss(model(x), y))
        accelerator.clip_grad_norm_(model.parameters(), 1e9)
        optimizer.cancel_step()
    else:
        passes = []

        def closure():
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), y)
            accelerator.backward(loss)
            passes.append(None)
            if len(passes) == 2:
                accelerator.clip_grad_norm_(model.parameters(), 1e9)
                raise KeyboardInterrupt
            return loss

        with pytest.raises(KeyboardInterrupt):
            optimizer.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    optimizer.zero_grad()
    for x, y in data:
        two_call_step(accelerator, model, optimizer, x, y)
    assert_weights(model, reference(data, torch.float32), rtol=1e-5, atol=1e-6)


# -- checkpoints ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES)
def test_save_state_and_load_state_mid_training_continue_bit_for_bit(route: str, tmp_path) -> None:
    """``accelerator.save_state`` after three steps, ``load_state`` into a fresh setup, three more
    steps: the weights, the loss scale and the LR of the uninterrupted run (FriendlySAM's running
    average, Adam's moments, the scaler's growth tracker and the schedule restored)."""
    from samgria import FriendlySAM

    def setup():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = make_accelerator(route)
        scaler = with_loss_scaler(accelerator)
        scaler.set_growth_interval(2)
        model, _ = model_and_optimizer(torch.float32)
        sam = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=0.01, transforms=[FriendlySAM(RHO)])
        schedule = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
        return accelerator, *prepare(route, accelerator, model, sam, schedule)

    def train(accelerator, model, optimizer, schedule, data):
        for x, y in data:
            two_call_step(accelerator, model, optimizer, x, y)
            schedule.step()

    data = batches(torch.float32, count=6)
    accelerator, model, optimizer, schedule = setup()
    train(accelerator, model, optimizer, schedule, data)
    uninterrupted = [p.detach().clone() for p in model.parameters()], accelerator.scaler.get_scale()
    accelerator, model, optimizer, schedule = setup()
    train(accelerator, model, optimizer, schedule, data[:3])
    accelerator.save_state(str(tmp_path))
    accelerator, model, optimizer, schedule = setup()
    accelerator.load_state(str(tmp_path))
    train(accelerator, model, optimizer, schedule, data[3:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), uninterrupted[0]))
    assert accelerator.scaler.get_scale() == uninterrupted[1] == SCALE * 8
    assert optimizer.param_groups[0]["lr"] == 0.01 * 0.5**6
