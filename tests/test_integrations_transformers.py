"""Hugging Face ``transformers.Trainer``: ``SAMTrainer`` trains SAM exactly; the stock one refuses.

Every run records the batches the model sees and is checked against a hand-written SAM loop on
them: with ``gradient_accumulation_steps=2`` one step equals SAM on the concatenated batch (both
passes see both micro-batches), with the ``Trainer``'s linear LR schedule and gradient clipping, in
float64 — and for a two-layer BERT built from a config, under bf16 autocast, and with a loss
scaler (float16's path, simulated on the CPU), whose overflow skips the step and the LR schedule.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

if not os.environ.get("SAMGRIA_REQUIRE_INTEGRATIONS"):
    pytest.importorskip("transformers", reason="pip install 'samgria[integrations]'")
    pytest.importorskip("accelerate", reason="pip install 'samgria[integrations]'")
import transformers  # noqa: E402

from samgria import GSAM, SAM, WSAM, ClipGradNorm, LookSAM, MultiStepSAM, TransformingOptimizer, frozen_bn_stats, sam_optimizer  # noqa: E402
from samgria.integrations.accelerate import SAMAcceleratedOptimizer  # noqa: E402
from samgria.integrations.transformers import SAMTrainer  # noqa: E402

LR, RHO, K = 0.1, 0.05, 2


class Regression(nn.Module):
    """A plain module that returns a loss dict, as ``Trainer`` expects."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)

    def forward(self, x, labels):
        out = self.net(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, size: int = 16, dtype: torch.dtype = torch.float64) -> None:
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(size, 4, generator=generator, dtype=dtype)
        self.y = torch.randn(size, 1, generator=generator, dtype=dtype)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.y[index]}


def arguments(tmp_path, **kwargs) -> transformers.TrainingArguments:
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=K,
        num_train_epochs=1,
        learning_rate=LR,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    options.update(kwargs)
    return transformers.TrainingArguments(**options)


def record_batches(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    seen: list[dict[str, torch.Tensor]] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append({k: v.detach().clone() for k, v in kwargs.items()}),
        with_kwargs=True,
    )
    return seen


def windows(seen: list[dict[str, torch.Tensor]], k: int = K) -> list[list[dict[str, torch.Tensor]]]:
    """The first-pass micro-batches of each step; checks that the second pass saw the same ones."""
    assert len(seen) % (2 * k) == 0, len(seen)
    steps = []
    for start in range(0, len(seen), 2 * k):
        first, second = seen[start : start + k], seen[start + k : start + 2 * k]
        for a, b in zip(first, second):
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
        steps.append(first)
    return steps


def reference(model, steps, *, lrs, max_grad_norm=0.0, autocast=None) -> list[torch.Tensor]:
    """SGD + SAM by hand: per step, both passes over every micro-batch (each loss / k)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(window):
        total = [torch.zeros_like(p) for p in params]
        for batch in window:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
                loss = model(**batch)["loss"]
            loss = loss.float() if autocast else loss
            if "num_items_in_batch" not in batch:  # else the model divided by the whole step's count
                loss = loss / len(window)
            grads = torch.autograd.grad(loss, params)
            for t, g in zip(total, grads):
                t += g
        return total

    for window, lr in zip(steps, lrs):
        grads = gradient(window)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        weights = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=RHO / norm)
        grads = gradient(window)
        with torch.no_grad():
            for p, w, g in zip(params, weights, grads):
                p.copy_(w)
                p.grad = g
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        with torch.no_grad():
            for p in params:
                p.sub_(lr * p.grad)
                p.grad = None
    return [p.detach() for p in params]


def linear_lrs(steps: int) -> list[float]:
    return [LR * (steps - t) / steps for t in range(steps)]


# -- what works ----------------------------------------------------------------------------------------
def test_gradient_accumulation_lr_schedule_and_clipping_equal_sam_on_the_whole_batch(tmp_path) -> None:
    model = Regression()
    start = copy.deepcopy(model)
    seen = record_batches(model)
    optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    trainer = SAMTrainer(model=model, args=arguments(tmp_path, max_grad_norm=0.5), train_dataset=Pairs(), optimizers=(optimizer, None))
    trainer.train()
    steps = windows(seen)
    assert trainer.state.global_step == len(steps) == 4
    assert isinstance(trainer.optimizer, SAMAcceleratedOptimizer) and trainer.optimizer.optimizer is optimizer
    assert optimizer._pending is None and optimizer.param_groups[0]["lr"] == 0.0, "linear decay to 0"
    expected = reference(start, steps, lrs=linear_lrs(4), max_grad_norm=0.5)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


def test_transforms_wrap_the_optimizer_the_trainer_creates(tmp_path) -> None:
    model = Regression()
    start = copy.deepcopy(model)
    seen = record_batches(model)
    args = arguments(tmp_path, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)
    trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), transforms=[SAM(rho=RHO)])
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, TransformingOptimizer) and isinstance(optimizer.inner, torch.optim.SGD)
    expected = reference(start, windows(seen), lrs=[LR] * 4)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


def test_evaluate_switches_a_schedule_free_inner_optimizer_to_its_averaged_weights(tmp_path) -> None:
    """The Trainer calls ``optimizer.eval()`` in ``evaluate()`` (and ``train()`` when training
    starts) where ``hasattr`` finds it: through SAMTrainer and accelerate's wrapper it must reach
    the schedule-free optimizer inside the TransformingOptimizer."""
    from transform_infos import ToyScheduleFree

    model = Regression()
    optimizer = TransformingOptimizer(model.parameters(), ToyScheduleFree, lr=LR, transforms=[SAM(rho=RHO)])
    args = arguments(tmp_path, lr_scheduler_type="constant", max_grad_norm=0.0)
    trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), eval_dataset=Pairs(), optimizers=(optimizer, None))
    trainer.train()
    assert optimizer.inner.param_groups[0]["train_mode"] is True
    trained = [p.detach().clone() for p in model.parameters()]
    averages = [optimizer.inner.state[p]["x"].clone() for p in model.parameters()]
    trainer.evaluate()
    assert optimizer.inner.param_groups[0]["train_mode"] is False
    for param, average in zip(model.parameters(), averages):
        assert torch.equal(param.detach(), average)
    trainer.optimizer.train()  # accelerate's wrapper, as the Trainer calls it when training resumes
    for param, weight in zip(model.parameters(), trained):
        assert torch.equal(param.detach(), weight)


class TokenPairs(torch.utils.data.Dataset):
    def __init__(self, size: int = 8) -> None:
        generator = torch.Generator().manual_seed(2)
        self.ids = torch.randint(0, 32, (size, 6), generator=generator)
        self.labels = torch.randint(0, 2, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "attention_mask": torch.ones(6, dtype=torch.long), "labels": self.labels[index]}


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_two_layer_bert_from_a_config(tmp_path, bf16: bool) -> None:
    model = tiny_bert()
    start = copy.deepcopy(model)
    seen = record_batches(model)
    optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    args = arguments(tmp_path, bf16=bf16, lr_scheduler_type="constant", max_grad_norm=0.0)
    trainer = SAMTrainer(model=model, args=args, train_dataset=TokenPairs(), optimizers=(optimizer, None))
    trainer.train()
    steps = windows(seen)
    assert trainer.state.global_step == len(steps) == 2
    expected = reference(start, steps, lrs=[LR] * 2, autocast=torch.bfloat16 if bf16 else None)
    tolerance = dict(rtol=1e-3, atol=1e-4) if bf16 else dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, **tolerance)
    assert not torch.equal(next(model.parameters()), next(start.parameters())), "it trained"


def _with_loss_scaler(trainer: SAMTrainer, scale: float) -> torch.amp.GradScaler:
    """What ``fp16=True`` sets up on a GPU, on the CPU: accelerate's loss scaler (float32 compute)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    trainer.accelerator.scaler = scaler
    return scaler


def _inf_in_the_second_pass_of_the_second_step(tmp_path, dtype: torch.dtype) -> tuple[SAMTrainer, Any, nn.Module, list, list[float]]:
    """A SAMTrainer over four steps of a linear schedule whose second step's second pass has an
    inf gradient: the trainer, its samgria optimizer, the model before training, the batches
    each step saw, and the lr after each step."""
    model = Regression(dtype)
    start = copy.deepcopy(model)
    seen = record_batches(model)
    calls = []

    def inf_in_the_second_pass_of_the_second_step(grad):
        calls.append(None)
        return torch.full_like(grad, math.inf) if len(calls) == 7 else grad  # 4 backwards per step

    model.net[2].weight.register_hook(inf_in_the_second_pass_of_the_second_step)
    optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    lrs: list[float] = []

    class RecordLR(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            lrs.append(optimizer.param_groups[0]["lr"])

    args = arguments(tmp_path, max_grad_norm=0.0, lr_scheduler_type="linear")
    trainer = SAMTrainer(
        model=model, args=args, train_dataset=Pairs(dtype=dtype), optimizers=(optimizer, None), callbacks=[RecordLR()]
    )
    return trainer, optimizer, start, seen, lrs


def test_loss_scaler_path_equals_sam_and_an_overflow_skips_the_step_and_the_schedule(tmp_path) -> None:
    trainer, _, start, seen, lrs = _inf_in_the_second_pass_of_the_second_step(tmp_path, torch.float32)
    model = trainer.model
    scaler = _with_loss_scaler(trainer, 2.0**10)
    trainer.train()
    assert scaler.get_scale() == 2.0**9, "one overflow: the scaler backed off once"
    steps = windows(seen)
    # Step 0 at lr 0.1; step 1 skipped (the schedule does not advance); steps 2 and 3 at 0.075, 0.05.
    assert lrs == pytest.approx([0.075, 0.075, 0.05, 0.025])
    expected = reference(start, [steps[0], steps[2], steps[3]], lrs=[0.1, 0.075, 0.05])
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


# -- what is refused, before any weight changes ----------------------------------------------------------
def test_the_stock_trainer_refuses_a_sam_optimizer_at_its_first_step(tmp_path) -> None:
    model = Regression()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path), train_dataset=Pairs(), optimizers=(optimizer, None))
    with pytest.raises(RuntimeError, match=r"needs a closure.*samgria\.integrations.*SAMTrainer"):
        trainer.train()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_transforms_and_an_optimizer_together_are_refused_before_the_trainer_is_set_up(tmp_path) -> None:
    """Refused before ``Trainer.__init__`` runs, which seeds torch's generator (``args.seed``)
    and places the model: a refused construction leaves both as they were."""
    model = Regression()
    optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    torch.manual_seed(12345)
    generator = torch.get_rng_state()
    with pytest.raises(TypeError, match=r"transforms=.*configure the optimizer the Trainer creates"):
        SAMTrainer(model=model, args=arguments(tmp_path), train_dataset=Pairs(), optimizers=(optimizer, None), transforms=[SAM()])
    with pytest.raises(TypeError, match=r"TransformingOptimizer built with them instead$"):
        SAMTrainer(
            model=model, args=arguments(tmp_path), train_dataset=Pairs(), optimizers=(optimizer, None),
            reevaluation_context=lambda: frozen_bn_stats(model),
        )
    with pytest.raises(TypeError, match=r"transforms=.*configure the optimizer the Trainer creates"):  # positional
        SAMTrainer(model, arguments(tmp_path), None, Pairs(), None, None, None, None, None, None, (optimizer, None), transforms=[SAM()])
    assert torch.equal(torch.get_rng_state(), generator), "Trainer.__init__ ran: it seeded torch's generator"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"transforms": [SAM]}, TypeError, r"^transforms\[0\] must be a transform instance, got the class SAM \(e\.g\. SAM\(\)\)$"),
        ({"transforms": 3}, TypeError, r"^transforms must be a sequence or mapping of transforms, got 3$"),
        ({"transforms": {"a.b": SAM()}}, ValueError, r"^transforms slot names must be identifiers, got 'a\.b'"),
        (
            {"transforms": [SAM()], "reevaluation_context": 3},
            TypeError,
            r"^reevaluation_context must be a callable returning a context manager, got 3$",
        ),
    ],
    ids=["class", "int", "slot-name", "reevaluation-context"],
)
def test_transforms_and_reevaluation_context_are_checked_at_construction(tmp_path, kwargs, error, message) -> None:
    """As TransformingOptimizer checks them, before the Trainer is set up: they were accepted, and
    the first train() raised only after the Trainer had created its plain optimizer."""
    with pytest.raises(error, match=message):
        SAMTrainer(model=Regression(), args=arguments(tmp_path), train_dataset=Pairs(), **kwargs)


def test_transforms_given_as_an_iterator_wrap_the_optimizer(tmp_path) -> None:
    """Checking the transforms at construction must not use up an iterator of them."""
    model = Regression()
    args = arguments(tmp_path, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, max_steps=1)
    trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), transforms=iter([SAM(rho=RHO)]))
    trainer.train()
    assert [type(t).__name__ for t in trainer.optimizer.optimizer.transforms] == ["SAM"]


def test_a_failed_wrapping_leaves_no_plain_optimizer_behind(tmp_path) -> None:
    """When wrapping the Trainer's optimizer fails in create_optimizer, ``trainer.optimizer`` is
    left as it was (None): it held the plain optimizer, and a second train() trained without SAM."""
    model = Regression()
    before = [p.detach().clone() for p in model.parameters()]
    args = arguments(tmp_path, optim="sgd", max_grad_norm=0.0)
    trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), transforms=[SAM(rho=RHO)])
    trainer.sam_transforms = [SAM]  # changed after the construction-time check
    for _ in range(2):  # the retry fails the same way: it does not train without SAM
        with pytest.raises(TypeError, match=r"^transforms\[0\] must be a transform instance, got the class SAM"):
            trainer.train()
        assert trainer.optimizer is None
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_refused_chain_leaves_no_optimizer_behind_and_a_fixed_retry_trains_sam(tmp_path) -> None:
    """A chain refused after wrapping (LookSAM with max_grad_norm > 0) leaves ``trainer.optimizer``
    None; once the cause is fixed the retry wraps a fresh optimizer and trains SAM exactly."""
    model = Regression()
    start = copy.deepcopy(model)
    args = arguments(tmp_path, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0)
    trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), transforms=[SAM(rho=RHO)])
    trainer.sam_transforms = [LookSAM(RHO, k=2)]
    with pytest.raises(ValueError, match=r"with LookSAM in the chain"):
        trainer.train()
    assert trainer.optimizer is None
    trainer.sam_transforms = [SAM(rho=RHO)]
    trainer.args.max_grad_norm = 0.0
    seen = record_batches(model)
    trainer.train()
    assert [type(t).__name__ for t in trainer.optimizer.optimizer.transforms] == ["SAM"]
    expected = reference(start, windows(seen), lrs=[LR] * 4)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


class OutOfMemoryOnce(Regression):
    """Raises the CPU allocator's out-of-memory error on its second forward (the second
    micro-batch of the first step), and forgets the batches recorded up to then."""

    def __init__(self) -> None:
        super().__init__()
        self.forwards = 0
        self.seen = record_batches(self)

    def forward(self, x, labels):
        self.forwards += 1
        if self.forwards == 2:
            self.seen.clear()
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return super().forward(x, labels)


def test_a_step_retried_after_an_out_of_memory_error_runs_its_second_pass_over_its_own_micro_batches(tmp_path) -> None:
    """``auto_find_batch_size`` runs the training loop again after an out-of-memory error, not
    ``train()``: the micro-batches of the abandoned step must not stay in the window (the retried
    step's second pass also ran them, SAM on other batches than the first pass's)."""
    model, start = OutOfMemoryOnce(), Regression()  # the same initial weights
    args = arguments(tmp_path, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, auto_find_batch_size=True)
    trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), transforms=[SAM(rho=RHO)])
    trainer.train()
    assert model.forwards > 2 and trainer._train_batch_size == 1, "the retry ran with a smaller batch"
    steps = windows(model.seen)
    assert trainer.state.global_step == len(steps) == len(Pairs()) // K  # one sample per micro-batch
    expected = reference(start, steps, lrs=[LR] * len(steps))
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


class NormRegression(nn.Module):
    """Linear -> BatchNorm -> Tanh -> Linear, returning a loss dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()

    def forward(self, x, labels):
        out = self.net(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


@pytest.mark.parametrize("route", ["optimizers", "transforms"])
def test_the_reevaluation_context_wraps_the_second_pass_and_batchnorm_updates_once_per_micro_batch(tmp_path, route) -> None:
    """``reevaluation_context=lambda: frozen_bn_stats(model)`` keeps BatchNorm to one update per
    first-pass forward (per micro-batch), as ``step(closure)`` does."""
    model = NormRegression()
    args = arguments(tmp_path, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)

    def context():
        return frozen_bn_stats(model)

    if route == "optimizers":
        optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, reevaluation_context=context)
        trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), optimizers=(optimizer, None))
    else:
        trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), transforms=[SAM(rho=RHO)], reevaluation_context=context)
    trainer.train()
    micro_batches = len(Pairs()) // 2
    assert trainer.state.global_step == micro_batches // K
    assert int(model.net[1].num_batches_tracked) == micro_batches  # not twice that


@pytest.mark.parametrize("route", ["optimizers", "transforms", "m-sharpness"])
def test_what_the_two_call_loop_cannot_run_is_refused_before_training(tmp_path, route) -> None:
    model = Regression()
    before = [p.detach().clone() for p in model.parameters()]
    args = arguments(tmp_path, optim="sgd")
    refusal = r"MultiStepSAM\(ascent_steps=2, .*\) re-evaluates the loss 2 times per step"
    if route == "optimizers":
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=LR, transforms=[MultiStepSAM(RHO, ascent_steps=2)])
        trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), optimizers=(optimizer, None))
    elif route == "transforms":
        trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), transforms=[MultiStepSAM(RHO, ascent_steps=2)])
    else:  # a rank whose local first pass overflowed would skip its second pass alone
        optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, first_pass_context=contextlib.nullcontext)
        trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), optimizers=(optimizer, None))
        refusal = r"first_pass_context \(m-sharpness\) needs step\(closure\)"
    forwards = record_batches(model)
    with pytest.raises(
        ValueError,
        match=r"^SAMTrainer \(the Trainer calls optimizer\.step\(\) without a closure\) runs SAM through "
        r"first_step\(\)/second_step\(\), and this optimizer cannot: " + refusal,
    ):
        trainer.train()
    assert forwards == []
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_deepspeed_is_refused_when_training_starts(tmp_path) -> None:
    model = Regression()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    trainer = SAMTrainer(model=model, args=arguments(tmp_path), train_dataset=Pairs(), optimizers=(optimizer, None))
    trainer.is_deepspeed_enabled = True  # what a DeepSpeed config sets (deepspeed is not installed here)
    with pytest.raises(ValueError, match=r"^SAMTrainer under DeepSpeed: .*second pass cannot run"):
        trainer.train()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_step_the_non_finite_policy_skips_does_not_advance_the_lr_schedule(tmp_path) -> None:
    """Without a loss scaler an inf gradient makes the optimizer skip the step (``skipped_steps``);
    the Trainer reads ``accelerator.optimizer_step_was_skipped`` and must not advance the schedule,
    as for a step the loss scaler skips."""
    trainer, optimizer, start, seen, lrs = _inf_in_the_second_pass_of_the_second_step(tmp_path, torch.float64)
    model = trainer.model
    with pytest.warns(RuntimeWarning, match="not finite: the step is skipped"):
        trainer.train()
    assert optimizer.skipped_steps == 1 and trainer.state.global_step == 4
    # Linear decay over 4 steps from 0.1: step 0 at 0.1; step 1 skipped (the schedule stays);
    # steps 2 and 3 at 0.075 and 0.05.
    assert lrs == pytest.approx([0.075, 0.075, 0.05, 0.025], rel=1e-12)
    assert trainer.lr_scheduler.last_epoch == 3
    steps = windows(seen)
    expected = reference(start, [steps[0], steps[2], steps[3]], lrs=[0.1, 0.075, 0.05])
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


# -- gradient clipping and the transforms whose update takes in the first pass's gradient -------------
FIRST_PASS_IN_UPDATE = {
    "GSAM": lambda: GSAM(RHO, alpha=0.4),
    "WSAM": lambda: WSAM(RHO, gamma=0.3),
    "WSAM-coupled": lambda: WSAM(RHO, gamma=0.3, decouple=False),
    "LookSAM": lambda: LookSAM(RHO, k=2),
}


@pytest.mark.parametrize("route", ["optimizers", "transforms"])
@pytest.mark.parametrize("name", list(FIRST_PASS_IN_UPDATE))
def test_max_grad_norm_with_a_transform_that_takes_the_first_pass_into_the_update_is_refused(tmp_path, name, route) -> None:
    """The Trainer clips after the second backward only; GSAM, WSAM and LookSAM mix the first
    pass's gradient, taken before that, into the update, which max_grad_norm then does not bound."""
    model = Regression()
    before = [p.detach().clone() for p in model.parameters()]
    args = arguments(tmp_path, optim="sgd")  # the Trainer's default max_grad_norm=1.0
    assert args.max_grad_norm == 1.0
    transform = FIRST_PASS_IN_UPDATE[name]()
    if route == "optimizers":
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=LR, transforms=[transform])
        trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), optimizers=(optimizer, None))
    else:
        trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), transforms=[transform])
    forwards = record_batches(model)
    kind = type(transform).__name__
    decoupled = (
        r"; WSAM\(decouple=True\) adds its sharpness term after the inner step, beyond any clipping in the "
        r"chain: use WSAM\(decouple=False\) \(the same update with plain SGD\) to clip it too"
        if name == "WSAM"
        else ""
    )
    with pytest.raises(
        ValueError,
        match=rf"^SAMTrainer\(args=TrainingArguments\(max_grad_norm=1\.0\)\) with {kind} in the chain: the "
        r"Trainer clips the gradients once, after the second backward, but "
        rf"{kind} takes the first pass's gradient \(kept since first_step\(\), before that clipping\) into "
        r"the update, so the clipping does not bound the update\. Set max_grad_norm=0 and clip in the chain "
        rf"after {kind}: transforms=\[\.\.\., {kind}\(\.\.\.\), samgria\.ClipGradNorm\(1\.0\)\] clips the "
        r"gradient the inner optimizer steps with to a norm of at most 1\.0 in each parameter group"
        + decoupled
        + "$",
    ):
        trainer.train()
    assert forwards == []
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class Steep(Regression):
    """Large gradients (a scaled loss, large targets): clipping to norm 1 is active every step."""

    def forward(self, x, labels):
        out = self.net(x)
        return {"loss": 100 * F.mse_loss(out, 5 * labels), "logits": out}


class _UpdateNorms(transformers.TrainerCallback):
    """Records the norm of each optimizer step's change of ``params`` (from the weights at
    ``on_step_begin`` to those at ``on_step_end``)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params, self.norms = params, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.before = [p.detach().clone() for p in self.params]

    def on_step_end(self, args, state, control, **kwargs):
        moves = (float((p.detach() - b).double().pow(2).sum()) for p, b in zip(self.params, self.before))
        self.norms.append(math.sqrt(sum(moves)))


@pytest.mark.parametrize("name", ["GSAM", "WSAM-coupled", "LookSAM"])
def test_clip_grad_norm_after_the_transform_bounds_the_update(tmp_path, name) -> None:
    """The remedy the refusal names: max_grad_norm=0 and ClipGradNorm after the transform. The
    update of plain SGD is then lr times a gradient of norm 1 (measured from the weights)."""
    model = Steep()
    params = list(model.parameters())
    optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=LR, transforms=[FIRST_PASS_IN_UPDATE[name](), ClipGradNorm(1.0)])
    update_norms = _UpdateNorms(params)

    args = arguments(tmp_path, max_grad_norm=0.0, lr_scheduler_type="constant")
    SAMTrainer(model=model, args=args, train_dataset=Pairs(), optimizers=(optimizer, None), callbacks=[update_norms]).train()
    assert len(update_norms.norms) == 4
    assert update_norms.norms == pytest.approx([LR * 1.0] * 4, rel=1e-5)  # ClipGradNorm's 1e-6 in its divisor


class _ClipAfterTheStep:
    """A seed-protocol object (apply/post_step) that clips the gradients it is given, as the
    docs' optim_seed_protocol example does; placed after SAM it sees the second pass only."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def apply(self, model, loss_fn, batch) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)

    def post_step(self, model) -> None:
        pass


def test_max_grad_norm_with_a_seed_protocol_object_after_sam_is_not_refused(tmp_path) -> None:
    """Only a transform that re-evaluates and mixes the first pass into the update escapes the
    Trainer's clip; a seed-protocol object (which does not declare supports_local_first_pass)
    after SAM sees the second pass's gradients only. Reference: the update of plain SGD is lr
    times a gradient of norm at most max_grad_norm (the Trainer's clip, after the object's)."""
    model = Steep()
    params = list(model.parameters())
    optimizer = TransformingOptimizer(
        params, torch.optim.SGD, lr=LR, transforms=[SAM(rho=0.05), _ClipAfterTheStep(5.0)], model=model
    )
    update_norms = _UpdateNorms(params)

    args = arguments(tmp_path, optim="sgd", lr_scheduler_type="constant")  # max_grad_norm=1.0
    SAMTrainer(model=model, args=args, train_dataset=Pairs(), optimizers=(optimizer, None), callbacks=[update_norms]).train()
    assert len(update_norms.norms) == 4
    assert update_norms.norms == pytest.approx([LR * 1.0] * 4, rel=1e-5)


def test_resume_from_checkpoint_continues_bit_for_bit(tmp_path) -> None:
    """``train(resume_from_checkpoint=...)`` from a checkpoint after 6 of 8 steps ends where the
    uninterrupted run ends (the samgria optimizer's state, FriendlySAM's running average and Adam's
    moments, and the LR schedule are restored)."""
    from samgria import FriendlySAM

    def run(output_dir, resume=None) -> list[torch.Tensor]:
        model = Regression()
        args = arguments(output_dir, optim="adamw_torch", learning_rate=0.01, max_grad_norm=0.0, num_train_epochs=2, save_strategy="steps", save_steps=6)
        trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), transforms=[FriendlySAM(rho=RHO)])
        trainer.train(resume_from_checkpoint=resume)
        assert trainer.state.global_step == 8
        return [p.detach().clone() for p in model.parameters()]

    uninterrupted = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-6"))
    assert all(torch.equal(p, q) for p, q in zip(resumed, uninterrupted))


def test_the_logged_training_loss_is_the_first_pass_loss(tmp_path) -> None:
    """As the docstring says: the loss the Trainer logs each step is the mean of the step's
    micro-batch losses at w (not at w + e), and ``train()``'s ``training_loss`` their mean."""
    model = Regression()
    losses: list[float] = []
    model.register_forward_hook(lambda module, args, out: losses.append(float(out["loss"].detach())))
    optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    args = arguments(tmp_path, max_grad_norm=0.0, logging_strategy="steps", logging_steps=1)
    trainer = SAMTrainer(model=model, args=args, train_dataset=Pairs(), optimizers=(optimizer, None))
    output = trainer.train()
    per_step = [losses[start : start + 2 * K] for start in range(0, len(losses), 2 * K)]
    at_w = [sum(step[:K]) / K for step in per_step]
    assert [entry["loss"] for entry in trainer.state.log_history if "loss" in entry] == pytest.approx(at_w, rel=1e-6)
    assert at_w != pytest.approx([sum(step[K:]) / K for step in per_step], rel=1e-6), "the passes differ"
    assert output.training_loss == pytest.approx(sum(at_w) / len(at_w), rel=1e-6)
