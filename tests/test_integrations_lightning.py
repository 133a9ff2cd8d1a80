"""PyTorch Lightning: every route trains SAM exactly, or is refused before any weight changes.

Each run is checked against a hand-written SAM loop on the same batches (float64, or float32 under
float16 autocast to round-off): automatic optimization in 32-bit, manual optimization with the
two-call loop through ``self.optimizers()`` (also accumulating micro-batches inside
``training_step``, which equals SAM on the whole batch, and under ``"16-mixed"``), and
``SAMMixedPrecision`` for ``"16-mixed"`` under automatic optimization. Refused:
``accumulate_grad_batches > 1`` and the stock ``"16-mixed"`` plugin under automatic optimization.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

if not os.environ.get("SAMGRIA_REQUIRE_INTEGRATIONS"):
    pytest.importorskip("lightning", reason="pip install 'samgria[integrations]'")
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.core.optimizer import LightningOptimizer  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from samgria import GSAM, WSAM, ClipGradNorm, LookSAM, MultiStepSAM, TransformingOptimizer, frozen_bn_stats, sam_optimizer  # noqa: E402
from samgria.integrations.lightning import SAMCallback, SAMMixedPrecision  # noqa: E402
from state_helpers import assert_state_dicts_equal  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # lightning 2.6 uses a torch.utils._pytree API that torch 2.13 deprecates
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning",
)

LR, RHO = 0.1, 0.05
SCALE = 2.0**10  # a power of two: scaling and unscaling are exact


class Regression(pl.LightningModule):
    """A tiny MLP; manual optimization runs the documented two-call loop over ``micro_batches``."""

    def __init__(self, manual: bool = False, micro_batches: int = 1, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
        self.automatic_optimization = not manual
        self.micro_batches = micro_batches
        self.training_steps = 0
        self.before_optimizer_step_calls = 0

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        if self.automatic_optimization:
            return F.mse_loss(self.net(x), y)
        optimizer = self.optimizers()
        chunks = list(zip(x.chunk(self.micro_batches), y.chunk(self.micro_batches)))
        for cx, cy in chunks:
            self.manual_backward(F.mse_loss(self.net(cx), cy) / len(chunks))
        optimizer.first_step(zero_grad=True)
        for cx, cy in chunks:
            self.manual_backward(F.mse_loss(self.net(cx), cy) / len(chunks))
        optimizer.second_step(zero_grad=True)

    def on_before_optimizer_step(self, optimizer):
        self.before_optimizer_step_calls += 1

    def configure_optimizers(self):
        return sam_optimizer(self.parameters(), torch.optim.SGD, rho=RHO, lr=LR)


def batches(dtype: torch.dtype = torch.float64, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=generator, dtype=dtype), torch.randn(8, 1, generator=generator, dtype=dtype)) for _ in range(count)]


def loader(data: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.utils.data.DataLoader:
    x = torch.cat([x for x, _ in data])
    y = torch.cat([y for _, y in data])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(data[0][0]))


def trainer(**kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def reference(data, dtype=torch.float64, autocast: bool = False, autocast_dtype: torch.dtype = torch.float16) -> list[torch.Tensor]:
    """SGD + SAM by hand, from the same initial weights, one step per batch."""
    net = Regression(dtype=dtype).net
    params = list(net.parameters())

    def gradient(x, y):
        with torch.autocast("cpu", dtype=autocast_dtype, cache_enabled=False, enabled=autocast):
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


def assert_weights(module: Regression, expected: list[torch.Tensor], **tolerance) -> None:
    for got, want in zip(module.net.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, **tolerance)


def weights_of(module: Regression) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.net.parameters()]


# -- what works ----------------------------------------------------------------------------------------
def test_automatic_optimization_32_bit_equals_hand_written_sam() -> None:
    data = batches()
    module = Regression()
    fit = trainer(callbacks=[SAMCallback()])
    fit.fit(module, loader(data))
    assert fit.global_step == len(data)
    assert module.training_steps == 2 * len(data), "SAM evaluates training_step twice per step"
    assert_weights(module, reference(data), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("micro_batches", [1, 2], ids=["one-batch", "two-micro-batches"])
def test_manual_optimization_two_call_loop_through_self_optimizers(micro_batches: int) -> None:
    """Manual accumulation over micro-batches in both passes equals SAM on the whole batch."""
    data = batches()
    module = Regression(manual=True, micro_batches=micro_batches)
    fit = trainer(callbacks=[SAMCallback()])
    fit.fit(module, loader(data))
    assert fit.global_step == len(data), "second_step() went through LightningOptimizer.step"
    assert module.before_optimizer_step_calls == len(data)
    assert module.optimizers().optimizer._pending is None
    assert_weights(module, reference(data), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_bf16_mixed_equals_hand_written_sam_under_bfloat16_autocast(manual: bool) -> None:
    """``precision="bf16-mixed"`` as it is: Lightning's closure (or the two-call loop) under
    bfloat16 autocast, no loss scaler."""
    data = batches(torch.float32)
    module = Regression(manual=manual, dtype=torch.float32)
    fit = trainer(precision="bf16-mixed", callbacks=[SAMCallback()])
    fit.fit(module, loader(data))
    assert fit.global_step == len(data)
    assert module.training_steps == (1 if manual else 2) * len(data)
    assert_weights(module, reference(data, torch.float32, autocast=True, autocast_dtype=torch.bfloat16), rtol=1e-6, atol=1e-7)


def test_16_mixed_automatic_optimization_with_sam_mixed_precision() -> None:
    data = batches(torch.float32)
    module = Regression(dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    fit = trainer(plugins=[SAMMixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[SAMCallback()])
    fit.fit(module, loader(data))
    assert fit.global_step == len(data)
    assert module.before_optimizer_step_calls == len(data)
    assert scaler.get_scale() == SCALE, "no overflow"
    assert_weights(module, reference(data, torch.float32, autocast=True), rtol=1e-5, atol=1e-6)


class SkippingOddBatches(Regression):
    """``training_step`` returns None on odd batches: Lightning skips those steps."""

    def training_step(self, batch, batch_idx):
        if batch_idx % 2 == 1:
            self.training_steps += 1
            return None
        return super().training_step(batch, batch_idx)


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`:UserWarning")  # on purpose here
@pytest.mark.parametrize("gradient_clip_val", [None, 0.05], ids=["", "clipping"])
def test_sam_mixed_precision_runs_the_hooks_of_a_skipped_step_as_lightnings_plugin_does(gradient_clip_val) -> None:
    """Lightning's MixedPrecision calls on_before_optimizer_step (and clipping) also for a step
    whose training_step returned None; so does SAMMixedPrecision."""
    data = batches(torch.float32, count=4)
    counts = []
    for plugin, make in (
        (lambda: MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=SCALE)), lambda m: torch.optim.SGD(m.parameters(), lr=LR)),
        (lambda: SAMMixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=SCALE)), None),
    ):
        module = SkippingOddBatches(dtype=torch.float32)
        if make is not None:
            module.configure_optimizers = lambda module=module, make=make: make(module)
        trainer(plugins=[plugin()], gradient_clip_val=gradient_clip_val).fit(module, loader(data))
        counts.append(module.before_optimizer_step_calls)
    assert counts[0] == counts[1] == len(data)


def test_16_mixed_manual_optimization_two_call_loop_with_lightnings_plugin() -> None:
    data = batches(torch.float32)
    module = Regression(manual=True, dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    fit = trainer(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[SAMCallback()])
    fit.fit(module, loader(data))
    assert fit.global_step == len(data)
    assert scaler.get_scale() == SCALE
    assert_weights(module, reference(data, torch.float32, autocast=True), rtol=1e-5, atol=1e-6)


def test_16_mixed_gradient_clipping_sees_unscaled_gradients() -> None:
    """``gradient_clip_val`` clips the second pass's true gradients (the plugin unscales first)."""
    data = batches(torch.float32, count=1)
    module = Regression(dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    fit = trainer(plugins=[SAMMixedPrecision("16-mixed", "cpu", scaler=scaler)], gradient_clip_val=0.05)
    fit.fit(module, loader(data))

    net = Regression(dtype=torch.float32).net
    params = list(net.parameters())
    (x, y), weights = data[0], [p.detach().clone() for p in params]
    with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
        grads = torch.autograd.grad(F.mse_loss(net(x), y), params)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(g, alpha=RHO / norm)
    with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
        grads = torch.autograd.grad(F.mse_loss(net(x), y), params)
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    assert total > 0.05, "the clipping is active"
    for got, w, g in zip(module.net.parameters(), weights, grads):
        torch.testing.assert_close(got.detach(), w - LR * g * (0.05 / total), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overflow_pass", [0, 1], ids=["first-pass", "second-pass"])
def test_16_mixed_overflow_skips_the_step_and_backs_off(overflow_pass: int) -> None:
    data = batches(torch.float32, count=1)
    module = Regression(dtype=torch.float32)
    before = weights_of(module)
    calls = []

    def overflow(grad):
        calls.append(None)
        return torch.full_like(grad, math.inf) if len(calls) - 1 == overflow_pass else grad

    module.net[2].weight.register_hook(overflow)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    fit = trainer(plugins=[SAMMixedPrecision("16-mixed", "cpu", scaler=scaler)])
    fit.fit(module, loader(data))
    assert len(calls) == (1 if overflow_pass == 0 else 2), "no second pass after a first-pass overflow"
    assert scaler.get_scale() == SCALE / 2
    for got, want in zip(weights_of(module), before):
        assert torch.equal(got, want)
    assert module.optimizers().optimizer.skipped_steps == 0, "the scaler's verdict rules"


# -- what is refused, before any weight changes ----------------------------------------------------------
class NormRegression(Regression):
    """Linear -> BatchNorm -> Tanh -> Linear; its optimizer wraps SAM's second pass in
    ``frozen_bn_stats``."""

    def __init__(self, first_pass_context=None) -> None:
        super().__init__(dtype=torch.float32)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        self.first_pass_context = first_pass_context

    def configure_optimizers(self):
        return sam_optimizer(
            self.parameters(), torch.optim.SGD, rho=RHO, lr=LR,
            first_pass_context=self.first_pass_context, reevaluation_context=lambda: frozen_bn_stats(self.net),
        )


@pytest.mark.parametrize("plugin", ["sam-mixed-precision", "32-true"])
def test_the_reevaluation_context_wraps_the_second_pass_and_batchnorm_updates_once_per_step(plugin) -> None:
    """``SAMMixedPrecision`` drives the two passes itself: it enters ``reevaluation_context``, as
    ``step(closure)`` does under 32-true (one BatchNorm update per step, not two)."""
    data = batches(torch.float32)
    module = NormRegression()
    plugins = [SAMMixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=SCALE))] if plugin != "32-true" else []
    fit = trainer(plugins=plugins)
    fit.fit(module, loader(data))
    assert fit.global_step == len(data)
    assert int(module.net[1].num_batches_tracked) == len(data)


class Ascending(Regression):
    def configure_optimizers(self):
        return TransformingOptimizer(self.parameters(), torch.optim.SGD, lr=LR, transforms=[MultiStepSAM(RHO, ascent_steps=2)])


@pytest.mark.parametrize(
    "module, refusal",
    [
        # A rank whose local first pass overflowed would skip its second pass alone (the others
        # wait in its all-reduce): first_pass_context needs step(closure).
        (lambda: NormRegression(first_pass_context=contextlib.nullcontext), r"first_pass_context \(m-sharpness\) needs step\(closure\)"),
        (lambda: Ascending(dtype=torch.float32), r"MultiStepSAM\(ascent_steps=2, .*\) re-evaluates the loss 2 times per step"),
    ],
    ids=["m-sharpness", "two-ascent-steps"],
)
def test_sam_mixed_precision_refuses_what_the_two_call_loop_cannot_run_before_training(module, refusal) -> None:
    module = module()
    fit = trainer(plugins=[SAMMixedPrecision("16-mixed", "cpu")])
    _refused(
        fit,
        module,
        ValueError,
        r"^SAMMixedPrecision \(under automatic optimization\) runs SAM through first_step\(\)/second_step\(\), "
        r"and this optimizer cannot: " + refusal + r'.*Or train in "bf16-mixed" or "32-true" precision',
    )
    assert module.training_steps == 0


def _refused(fit: pl.Trainer, module: Regression, error: type[Exception], match: str) -> None:
    before = weights_of(module)
    with pytest.raises(error, match=match):
        fit.fit(module, loader(batches(module.net[0].weight.dtype)))
    for got, want in zip(weights_of(module), before):
        assert torch.equal(got, want), "a refused run changed the weights"


@pytest.mark.parametrize("plugin", [None, "sam-mixed-precision"])
def test_accumulate_grad_batches_is_refused_before_the_first_training_step(plugin) -> None:
    module = Regression(dtype=torch.float32)
    if plugin is None:  # the callback refuses it when fit starts
        fit = trainer(accumulate_grad_batches=2, callbacks=[SAMCallback()])
    else:  # the plugin refuses it when it is connected, right after configure_optimizers
        fit = trainer(accumulate_grad_batches=2, plugins=[SAMMixedPrecision("16-mixed", "cpu")])
    _refused(
        fit,
        module,
        ValueError,
        r"^Trainer\(accumulate_grad_batches=2\) with SAM under automatic optimization: .*second pass of "
        r"SAM would see the last micro-batch only.*accumulate_grad_batches=1.*manual optimization",
    )
    assert module.training_steps == 0


def test_a_gradient_accumulation_scheduler_that_accumulates_later_is_refused_when_fit_starts() -> None:
    """Accumulation from epoch 1 on would be refused only after a whole epoch: the callback
    reads the schedule when fit starts."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    module = Regression(dtype=torch.float32)
    fit = trainer(max_epochs=2, callbacks=[SAMCallback(), GradientAccumulationScheduler(scheduling={1: 2})])
    _refused(
        fit,
        module,
        ValueError,
        r"^GradientAccumulationScheduler\(scheduling=\{.*1: 2.*\}\) with SAM under automatic optimization: "
        r".*second pass of SAM would see the last micro-batch only",
    )
    assert module.training_steps == 0


def test_accumulate_grad_batches_without_the_callback_is_refused_at_the_first_step() -> None:
    """The net under the callback: the optimizer recognises Lightning's accumulating closure."""
    module = Regression(dtype=torch.float32)
    fit = trainer(accumulate_grad_batches=2)
    _refused(
        fit,
        module,
        RuntimeError,
        r"^SAM re-evaluate\(s\) the loss, but Lightning's Trainer\(accumulate_grad_batches > 1\) under "
        r"automatic optimization ran the earlier micro-batches .*last micro-batch only.*SAMCallback",
    )
    assert module.training_steps == 1  # the first micro-batch ran; the step was refused before the second


def test_one_micro_batch_per_step_is_not_mistaken_for_accumulation() -> None:
    module = Regression()
    data = batches()
    fit = trainer()
    fit.fit(module, loader(data))
    assert fit.global_step == len(data)
    for got, want in zip(weights_of(module), reference(data)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_lightnings_16_mixed_plugin_is_refused_when_fit_starts() -> None:
    module = Regression(dtype=torch.float32)
    fit = trainer(plugins=[MixedPrecision("16-mixed", "cpu")], callbacks=[SAMCallback()])
    _refused(
        fit,
        module,
        ValueError,
        r"^Trainer\(precision='16-mixed'\) with SAM under automatic optimization: .*cannot re-evaluate.*"
        r"plugins=\[samgria\.integrations\.lightning\.SAMMixedPrecision\('16-mixed', 'cpu'\)\].*bf16-mixed",
    )
    assert module.training_steps == 0


def test_lightnings_16_mixed_plugin_without_the_callback_fails_at_the_first_step() -> None:
    module = Regression(dtype=torch.float32)
    fit = trainer(plugins=[MixedPrecision("16-mixed", "cpu")])
    _refused(
        fit,
        module,
        RuntimeError,
        r"^SAM re-evaluate\(s\) the loss, but torch\.amp\.GradScaler\.step\(optimizer\) called step\(\) "
        r"without first_step\(\).*SAMMixedPrecision",
    )
    assert module.training_steps == 1
    optimizer = fit.optimizers[0]
    assert not hasattr(optimizer, "found_inf") and not hasattr(optimizer, "grad_scale")


def test_manual_step_closure_under_16_mixed_is_refused_at_the_step() -> None:
    """Lightning's plugin runs a manual closure itself, once: SAM could not re-evaluate it."""

    class ClosureStep(Regression):
        def training_step(self, batch, batch_idx):
            self.training_steps += 1
            x, y = batch
            optimizer = self.optimizers()

            def closure():
                optimizer.zero_grad()
                loss = F.mse_loss(self.net(x), y)
                self.manual_backward(loss)
                return loss

            optimizer.step(closure)

    module = ClosureStep(manual=True, dtype=torch.float32)
    fit = trainer(plugins=[MixedPrecision("16-mixed", "cpu")], callbacks=[SAMCallback()])
    _refused(fit, module, RuntimeError, r"GradScaler\.step\(optimizer\) called step\(\) without first_step\(\)")
    assert fit.global_step == 0


def test_callback_leaves_plain_optimizers_alone() -> None:
    class Plain(Regression):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    module = Plain()
    fit = trainer(accumulate_grad_batches=2, callbacks=[SAMCallback()])
    fit.fit(module, loader(batches()))
    assert fit.global_step == 2  # 3 batches: a step after the second and after the last


def test_a_chain_without_a_second_pass_clips_under_bf16_mixed_as_a_plain_optimizer() -> None:
    """Only a chain that re-evaluates unscales inside step(); with Lookahead alone Lightning's
    MixedPrecision clips (it refuses clipping for an optimizer that unscales itself) and trains."""
    from samgria import Lookahead

    class WithLookahead(Regression):
        def configure_optimizers(self):
            return TransformingOptimizer(self.parameters(), torch.optim.SGD, lr=LR, transforms=[Lookahead(alpha=0.5, k=2)])

    module = WithLookahead(dtype=torch.float32)
    assert not module.configure_optimizers()._step_supports_amp_scaling
    assert sam_optimizer(module.parameters(), torch.optim.SGD, rho=RHO, lr=LR)._step_supports_amp_scaling
    before = weights_of(module)
    trainer(precision="bf16-mixed", gradient_clip_val=0.05).fit(module, loader(batches(torch.float32)))
    assert module.training_steps == 3
    assert any(not torch.equal(got, want) for got, want in zip(weights_of(module), before))


# -- meta-learners under Lightning ---------------------------------------------------------------
class MetaRegression(pl.LightningModule):
    """Reptile over sinusoid tasks: one meta-batch of tasks per batch index; automatic optimization
    returns the mean query loss, manual optimization adapts and then calls ``step()`` (the
    no-closure pattern, which Lightning hands a closure that adapts nothing)."""

    def __init__(self, tasks, manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        self.tasks = tasks
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        from samgria import Reptile

        meta = self.optimizers().optimizer if not self.automatic_optimization else self.trainer.optimizers[0]
        assert isinstance(meta, Reptile)
        losses = []
        for task in self.tasks[int(batch)]:
            learner = meta.adapt(lambda f, task=task: F.mse_loss(f(task.support_x), task.support_y))
            with torch.no_grad():
                losses.append(F.mse_loss(learner(task.query_x), task.query_y))
        loss = torch.stack(losses).mean().requires_grad_()
        if self.automatic_optimization:
            return loss
        self.optimizers().step()

    def configure_optimizers(self):
        from samgria import Reptile

        return Reptile(self.net, torch.optim.Adam, lr=1e-2, inner_lr=0.05, inner_steps=3)


@pytest.mark.parametrize("how", ["accumulate_grad_batches", "manual_step_without_closure"])
def test_reptile_updates_over_every_task_lightning_adapted(how) -> None:
    """With accumulate_grad_batches=2 Lightning adapts the first micro-batch's tasks outside the
    optimizer: Reptile's update used the last micro-batch only. In manual optimization
    optimizers().step() hands Reptile a closure that adapts nothing: step() raised "found no
    adapted tasks". Both equal a hand-written loop over the same tasks."""
    from samgria import Reptile
    from samgria.data import SinusoidTaskSampler

    sampler = SinusoidTaskSampler(k_support=5, k_query=5, seed=1, dtype=torch.float64)
    tasks = [sampler.sample(3) for _ in range(4)]
    module = MetaRegression(tasks, manual=how != "accumulate_grad_batches")
    fit = trainer(accumulate_grad_batches=2) if how == "accumulate_grad_batches" else trainer()
    fit.fit(module, torch.utils.data.DataLoader(list(range(len(tasks))), batch_size=None))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    meta = Reptile(net, torch.optim.Adam, lr=1e-2, inner_lr=0.05, inner_steps=3)
    groups = [tasks[0] + tasks[1], tasks[2] + tasks[3]] if how == "accumulate_grad_batches" else tasks
    for group in groups:
        for task in group:
            meta.adapt(lambda f, task=task: F.mse_loss(f(task.support_x), task.support_y))
        meta.step()
    for a, b in zip(module.net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_checkpoints_through_lightnings_optimizer_wrapper_are_the_optimizers() -> None:
    """``self.optimizers()`` gives a ``LightningOptimizer``, a subclass of the optimizer's class made
    on the fly whose ``__dict__`` holds none of its attributes: ``state_dict()`` and
    ``load_state_dict()`` through it are the optimizer's own (they raised KeyError)."""
    def stepped(seed: int) -> tuple[nn.Module, TransformingOptimizer]:
        torch.manual_seed(seed)
        model = nn.Linear(3, 2).double()
        optimizer = sam_optimizer(model.parameters(), torch.optim.Adam, lr=LR, rho=RHO)
        x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        for _ in range(seed + 1):
            optimizer.step(closure)
        return model, optimizer

    _, optimizer = stepped(0)
    wrapped = LightningOptimizer(optimizer)
    assert_state_dicts_equal(wrapped.state_dict(), optimizer.state_dict())
    _, other = stepped(1)
    wrapped.load_state_dict(other.state_dict())
    assert_state_dicts_equal(optimizer.state_dict(), other.state_dict())


class MetaSAMRegression(pl.LightningModule):
    """MAML whose outer optimizer runs SAM: Lightning's closure adapts one meta-batch of tasks."""

    def __init__(self, tasks) -> None:
        super().__init__()
        self.net = _meta_net()
        self.tasks = tasks
        self.training_steps = 0

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        return self.trainer.optimizers[0].task_losses(self.tasks[int(batch)], F.mse_loss).mean()

    def configure_optimizers(self):
        return _maml_with_outer_sam(self.net)


def _meta_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _maml_with_outer_sam(net: nn.Module):
    from samgria import MAML, SAM

    outer = TransformingOptimizer(net.parameters(), torch.optim.Adam, lr=1e-2, transforms=[SAM(rho=0.05)])
    return MAML(net, outer, inner_lr=0.05, inner_steps=1)


def _sinusoid_meta_batches(count: int = 4):
    from samgria.data import SinusoidTaskSampler

    sampler = SinusoidTaskSampler(k_support=5, k_query=5, seed=1, dtype=torch.float64)
    return [sampler.sample(2) for _ in range(count)]


def _fit_meta(module: MetaSAMRegression, fit: pl.Trainer) -> None:
    fit.fit(module, torch.utils.data.DataLoader(list(range(len(module.tasks))), batch_size=None))


def test_a_meta_optimizer_with_an_outer_sam_trains_as_the_hand_written_loop() -> None:
    tasks = _sinusoid_meta_batches()
    module = MetaSAMRegression(tasks)
    _fit_meta(module, trainer(callbacks=[SAMCallback()]))
    net = _meta_net()
    meta = _maml_with_outer_sam(net)
    for batch in tasks:

        def closure(batch=batch):
            meta.zero_grad()
            loss = meta.task_losses(batch, F.mse_loss).mean()
            loss.backward()
            return loss

        meta.step(closure)
    for got, want in zip(module.net.parameters(), net.parameters()):
        assert torch.equal(got.detach(), want.detach())


@pytest.mark.parametrize("callback", [True, False])
def test_a_meta_optimizer_with_an_outer_sam_is_refused_under_accumulate_grad_batches(callback) -> None:
    """SAM in MAML's outer optimizer saw every micro-batch in its first pass and the last one in
    its second: a different algorithm, trained without a word (the checks did not look inside the
    meta-optimizer, whose outer optimizer is handed MAML's own closure)."""
    module = MetaSAMRegression(_sinusoid_meta_batches())
    before = [p.detach().clone() for p in module.net.parameters()]
    fit = trainer(accumulate_grad_batches=2, callbacks=[SAMCallback()] if callback else [])
    if callback:
        expected = (ValueError, r"^Trainer\(accumulate_grad_batches=2\) with SAM under automatic optimization")
    else:
        expected = (RuntimeError, r"^SAM re-evaluate\(s\) the loss, but Lightning's Trainer\(accumulate_grad_batches > 1\)")
    with pytest.raises(expected[0], match=expected[1]):
        _fit_meta(module, fit)
    assert module.training_steps == (0 if callback else 1)
    for got, want in zip(module.net.parameters(), before):
        assert torch.equal(got.detach(), want)


@pytest.mark.parametrize("plugin", ["sam-mixed-precision", "mixed-precision"])
def test_a_meta_optimizer_with_an_outer_sam_under_a_loss_scaler_is_refused_when_fit_starts(plugin) -> None:
    """The scaler steps the meta-optimizer without a closure: the outer SAM failed at the first
    step, with a message that sent the user to SAMMixedPrecision, the plugin in use."""
    module = MetaSAMRegression(_sinusoid_meta_batches())
    before = [p.detach().clone() for p in module.net.parameters()]
    if plugin == "sam-mixed-precision":
        fit = trainer(plugins=[SAMMixedPrecision("16-mixed", "cpu")])
        name = "SAMMixedPrecision"
    else:
        fit = trainer(plugins=[MixedPrecision("16-mixed", "cpu")], callbacks=[SAMCallback()])
        name = "MixedPrecision"
    with pytest.raises(ValueError, match=rf"^{name} with a meta-optimizer whose outer optimizer runs SAM .*"
                       r"steps the meta-optimizer without a closure.*bf16-mixed"):
        _fit_meta(module, fit)
    assert module.training_steps == 0
    for got, want in zip(module.net.parameters(), before):
        assert torch.equal(got.detach(), want)


# -- gradient clipping -----------------------------------------------------------------------------------
FIRST_PASS_IN_UPDATE = {
    "GSAM": lambda: GSAM(RHO, alpha=0.4),
    "WSAM": lambda: WSAM(RHO, gamma=0.3),
    "WSAM-coupled": lambda: WSAM(RHO, gamma=0.3, decouple=False),
    "LookSAM": lambda: LookSAM(RHO, k=2),
}


class Chained(Regression):
    """SGD through a given chain, on a steep loss (clipping to norm 1 is active every step);
    records the norm of each step's update."""

    def __init__(self, transforms, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(dtype=dtype)
        self.transforms = transforms
        self.update_norms: list[float] = []

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        return F.mse_loss(self.net(x), 50 * y)

    def on_train_batch_start(self, batch, batch_idx):
        self.before = weights_of(self)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.update_norms.append(math.sqrt(sum(float((p - b).double().pow(2).sum()) for p, b in zip(weights_of(self), self.before))))

    def configure_optimizers(self):
        return TransformingOptimizer(self.parameters(), torch.optim.SGD, lr=LR, transforms=self.transforms)


@pytest.mark.parametrize("where", ["callback", "plugin"])
@pytest.mark.parametrize("name", list(FIRST_PASS_IN_UPDATE))
def test_gradient_clip_val_under_sam_mixed_precision_is_refused_for_a_transform_that_takes_the_first_pass_into_the_update(name, where) -> None:
    """SAMMixedPrecision clips once, after the second pass; GSAM, WSAM and LookSAM mix the first
    pass's gradient, taken before that, into the update, which gradient_clip_val then does not bound."""
    transform = FIRST_PASS_IN_UPDATE[name]()
    module = Chained([transform])
    plugin = SAMMixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=SCALE))
    callbacks = [SAMCallback()] if where == "callback" else []
    fit = trainer(plugins=[plugin], gradient_clip_val=1.0, callbacks=callbacks)
    kind = type(transform).__name__
    decoupled = r"; WSAM\(decouple=True\) adds its sharpness term after the inner step.*" if name == "WSAM" else ""
    _refused(
        fit,
        module,
        ValueError,
        rf"^Trainer\(gradient_clip_val=1\.0, plugins=\[SAMMixedPrecision\(\.\.\.\)\]\) with {kind} in the chain: "
        rf"SAMMixedPrecision clips the gradients once, after the second backward, but {kind} takes the first "
        r"pass's gradient \(kept since first_step\(\), before that clipping\) into the update, so the clipping "
        rf"does not bound the update\. Remove gradient_clip_val and clip in the chain after {kind}: "
        rf"transforms=\[\.\.\., {kind}\(\.\.\.\), samgria\.ClipGradNorm\(1\.0\)\] clips the gradient the "
        r"inner optimizer steps with to a norm of at most 1\.0 in each parameter group" + decoupled + "$",
    )
    assert module.training_steps == 0


@pytest.mark.parametrize("name", ["GSAM", "WSAM-coupled", "LookSAM"])
def test_clip_grad_norm_after_the_transform_bounds_the_update_under_sam_mixed_precision(name) -> None:
    """The remedy the refusal names: no gradient_clip_val, ClipGradNorm after the transform. The
    update of plain SGD is then lr times a gradient of norm 1 (measured from the weights): the
    chain clips the unscaled gradients."""
    module = Chained([FIRST_PASS_IN_UPDATE[name](), ClipGradNorm(1.0)])
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    trainer(plugins=[SAMMixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[SAMCallback()]).fit(module, loader(batches(torch.float32, count=4)))
    assert scaler.get_scale() == SCALE, "no overflow"
    assert module.update_norms == pytest.approx([LR * 1.0] * 4, rel=1e-5)  # ClipGradNorm's 1e-6 in its divisor


def test_gradient_clip_val_in_32_true_clips_both_passes_and_is_not_refused() -> None:
    """Lightning's closure clips in each of SAM's evaluations: the first pass's gradient that GSAM
    mixes in is clipped too (its update's norm may exceed gradient_clip_val: GSAM's combination)."""
    module = Chained([GSAM(RHO, alpha=0.4)], dtype=torch.float64)
    data = batches(count=2)
    trainer(gradient_clip_val=1.0, callbacks=[SAMCallback()]).fit(module, loader(data))
    assert module.training_steps == 2 * len(data)

    net = Chained([], dtype=torch.float64).net  # GSAM by hand on the clipped gradients
    params = list(net.parameters())

    def clipped_gradient(x, y):
        grads = torch.autograd.grad(F.mse_loss(net(x), 50 * y), params)
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        return [g * min(1.0, 1.0 / (norm + 1e-6)) for g in grads], norm

    for x, y in data:
        g, _ = clipped_gradient(x, y)
        g_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
        weights = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, t in zip(params, g):
                p.add_(t, alpha=RHO / g_norm)
        g_p, _ = clipped_gradient(x, y)
        c = sum(float((a * b).sum()) for a, b in zip(g, g_p)) / sum(float(b.pow(2).sum()) for b in g_p)
        with torch.no_grad():
            for p, w, a, b in zip(params, weights, g, g_p):
                p.copy_(w - LR * ((1 + 0.4 * c) * b - 0.4 * a))
    assert_weights(module, [p.detach() for p in params], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("plugin", ["callback", "sam-mixed-precision"])
def test_gradient_clip_val_under_bf16_mixed_is_refused_when_fit_starts(plugin) -> None:
    """Lightning's MixedPrecision refuses to clip for an optimizer that unscales its gradients in
    step() (SAM's chains declare it), at the first step and with a hint about fused optimizers:
    refused when fit starts instead, naming the remedy."""
    module = Regression(dtype=torch.float32)
    if plugin == "callback":
        fit = trainer(precision="bf16-mixed", gradient_clip_val=0.5, callbacks=[SAMCallback()])
    else:
        fit = trainer(plugins=[SAMMixedPrecision("bf16-mixed", "cpu")], gradient_clip_val=0.5)
    _refused(
        fit,
        module,
        ValueError,
        r"^Trainer\(precision='bf16-mixed', gradient_clip_val=0\.5\) with SAM under automatic optimization: "
        r"Lightning's (SAM)?MixedPrecision refuses to clip the gradients of an optimizer that unscales them in "
        r"its step\(\), which a TransformingOptimizer whose chain re-evaluates the loss declares \(so that a "
        r"GradScaler can finish its two-call step\); it would raise at the first step\. Remove gradient_clip_val "
        r"and clip in the chain: transforms=\[\.\.\., SAM\(\.\.\.\), samgria\.ClipGradNorm\(0\.5\)\] clips the "
        r"gradient the inner optimizer steps with$",
    )
    assert module.training_steps == 0


def test_gradient_clip_val_under_bf16_mixed_with_configure_gradient_clipping_overridden_is_not_refused() -> None:
    """A module that clips in its own configure_gradient_clipping (torch's clip_grad_norm_, inside
    the closure: both passes) never reaches Lightning's MixedPrecision clipping, which refuses:
    the setting trains, as it does without SAMCallback, and the clip is the module's."""
    clips = []

    class ClipsItself(Regression):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            clips.append(float(torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)))

    module = ClipsItself(dtype=torch.float32)
    fit = trainer(precision="bf16-mixed", gradient_clip_val=0.5, callbacks=[SAMCallback()])
    fit.fit(module, loader(batches(torch.float32)))
    assert module.training_steps == 3 * 2  # two closure calls per step
    assert len(clips) == 6 and fit.global_step == 3


class ManualStepClosure(Regression):
    """Manual optimization with ``self.optimizers().step(closure)``: records what the step returned
    and the closure's first loss of each step."""

    def __init__(self) -> None:
        super().__init__(manual=True)
        self.returned: list[torch.Tensor] = []
        self.first_losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()
        losses = []

        def closure():
            optimizer.zero_grad()
            loss = F.mse_loss(self.net(x), y)
            losses.append(loss.detach().clone())
            self.manual_backward(loss)
            return loss

        self.returned.append(optimizer.step(closure))
        self.first_losses.append(losses[0])


def test_manual_step_closure_returns_the_loss_at_w_and_runs_the_hooks_for_both_passes() -> None:
    """As the module docstring says: the loss at w, SAM's update, and Lightning's
    ``on_before_optimizer_step`` hooks after each of the two evaluations."""
    data = batches()
    module = ManualStepClosure()
    fit = trainer(callbacks=[SAMCallback()])
    fit.fit(module, loader(data))
    assert fit.global_step == len(data)
    assert module.before_optimizer_step_calls == 2 * len(data)
    assert all(torch.equal(got, want) for got, want in zip(module.returned, module.first_losses))
    assert_weights(module, reference(data), rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
def test_ckpt_path_from_an_epoch_end_continues_bit_for_bit(tmp_path) -> None:
    """``fit(ckpt_path=...)`` from the checkpoint at the end of the first of two epochs ends where
    the uninterrupted run ends: FriendlySAM's running average, Adam's moments and a per-step LR
    schedule (stepped once per SAM step, not per evaluation) are restored."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from samgria import FriendlySAM

    class Scheduled(Regression):
        def configure_optimizers(self):
            sam = TransformingOptimizer(self.parameters(), torch.optim.Adam, lr=0.01, transforms=[FriendlySAM(rho=RHO)])
            schedule = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
            return {"optimizer": sam, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    data = batches()
    module = Scheduled()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=len(data), save_top_k=-1)
    trainer(max_epochs=2, callbacks=[SAMCallback(), checkpoints], enable_checkpointing=True).fit(module, loader(data))
    assert module.optimizers().param_groups[0]["lr"] == 0.01 * 0.5 ** (2 * len(data))
    resumed = Scheduled()
    (checkpoint,) = tmp_path.glob(f"*step={len(data)}.ckpt")
    trainer(max_epochs=2, callbacks=[SAMCallback()]).fit(resumed, loader(data), ckpt_path=str(checkpoint))
    assert all(torch.equal(p, q) for p, q in zip(weights_of(resumed), weights_of(module)))
    assert resumed.optimizers().param_groups[0]["lr"] == 0.01 * 0.5 ** (2 * len(data))
