"""A fully annotated user script over samgria's public API, as the documentation uses it.

``tests/test_typing.py`` type-checks it with mypy (no error may be reported: each one would be a
wrong annotation in samgria, which ships ``py.typed``) and runs it (tiny models, a step or two).
The integrations with Lightning and the Hugging Face Trainer are left out (checking their typed
frameworks takes mypy half a minute); accelerate's runs where accelerate is installed.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.functional import mse_loss

import samgria
from samgria import (
    ANIL,
    ASAM,
    EMA,
    ESAM,
    FOMAML,
    GSAM,
    LAMP,
    MAML,
    SAM,
    WSAM,
    AdamInnerStep,
    ClampGrad,
    ClampParams,
    ClipGradNorm,
    CompiledMetaLoss,
    DistributedTaskSampler,
    FewShotSampler,
    FriendlySAM,
    GradientTransform,
    GradSign,
    History,
    InnerGradTransform,
    InnerLoop,
    InnerSAM,
    InnerStepFn,
    LAMPRollback,
    Learner,
    Lookahead,
    LookSAM,
    MetaOptimizer,
    MetaSGD,
    MetaStep,
    MetaTrainer,
    MomentumInnerStep,
    MultiStepSAM,
    NormalizeGrad,
    ParameterSnapshot,
    ParamTransform,
    PathPolicy,
    Perturbation,
    PerturbationTransform,
    ProjectParams,
    Reptile,
    ScaleGrad,
    SinusoidTaskSampler,
    SparsifyGrad,
    Task,
    TaskSampler,
    Transform,
    TransformContext,
    TransformingOptimizer,
    adam_inner_step,
    adapt_params,
    compiled_path_blocker,
    frozen_bn_stats,
    functional_forward,
    get_grad,
    head_names,
    inner_step,
    meta_step,
    momentum_inner_step,
    named_buffers,
    named_params,
    restore_state,
    sam_optimizer,
    save_state,
    set_grad,
    sgd_inner_step,
)
from samgria.data import sinusoid
from samgria.data.task import load_sampler_state_dict, sampler_state_dict
from samgria.functional import (
    accumulate_,
    adaptive_scaling,
    add_directions_,
    add_scaled_,
    all_finite,
    assign_mean_,
    global_norm,
    magnitude_noise,
    mul,
    mul_,
    perturbed_into_,
)
from samgria.functional.norms import scale_
from samgria.integrations.accelerate import SAMAcceleratedOptimizer, SAMAccelerator, sam_accelerated
from samgria.meta import can_vectorize, stack_tasks, vmap_task_losses


class MLP(nn.Module):
    def __init__(self, n_in: int = 4, width: int = 8) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_in, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def make_model(n_in: int = 4) -> MLP:
    torch.manual_seed(0)
    return MLP(n_in)


x, y = torch.randn(16, 4), torch.randn(16, 1)


def closure_for(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


# -- the optimizer -------------------------------------------------------------------------------
def closure_loop() -> None:
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(rho=0.05)])
    closure = closure_for(model, optimizer)
    first_loss = optimizer.step(closure)
    loss: torch.Tensor = optimizer.step(closure)
    assert math.isfinite(float(loss)) and math.isfinite(float(first_loss))
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    wrapped = TransformingOptimizer(adamw, transforms=[SAM(rho=0.05)])
    assert wrapped.param_groups is adamw.param_groups
    inner: torch.optim.Optimizer = wrapped.inner
    base: torch.optim.Optimizer = wrapped.base_optimizer
    assert inner is adamw and base is adamw
    transforms: list[Transform] = wrapped.transforms
    slots: list[str] = wrapped.slots
    skipped: int = wrapped.skipped_steps
    assert isinstance(transforms[0], SAM) and slots == ["sam"] and skipped == 0


def two_call_loop() -> None:
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[ASAM(rho=0.5, eta=0.01)])
    mse_loss(model(x), y).backward()
    optimizer.first_step(zero_grad=True)  # w -> w + e
    mse_loss(model(x), y).backward()
    optimizer.second_step(zero_grad=True)  # restore w, step
    mse_loss(model(x), y).backward()
    optimizer.first_step()
    optimizer.cancel_step()
    davda54 = sam_optimizer(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=False, lr=0.1, momentum=0.9)
    assert davda54.param_groups[0]["rho"] == 0.05
    adaptive = sam_optimizer(model.parameters(), torch.optim.AdamW, adaptive=True, lr=1e-3)
    assert isinstance(adaptive.transforms[0], ASAM)


def schedulers_and_groups() -> None:
    model = make_model()
    optimizer = TransformingOptimizer(
        [{"params": model.hidden.parameters()}, {"params": model.out.parameters(), "rho": 0.1, "lr": 0.01}],
        torch.optim.SGD,
        lr=0.1,
        transforms=[SAM(rho=0.05), LAMP(eps=5e-3, rollback_len=2, seed=0)],
    )
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    closure = closure_for(model, optimizer)
    for _ in range(2):
        optimizer.param_groups[0]["rho"] = 0.06  # any key can be scheduled by hand
        loss = optimizer.step(closure)
        cosine.step()
        plateau.step(float(loss))
    assert optimizer.inner.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": 0.5})
    defaults: dict[str, Any] = optimizer.defaults
    assert defaults["rho"] == 0.05
    if hasattr(optimizer, "train"):  # a schedule-free inner optimizer's modes
        optimizer.train()
        optimizer.eval()


def checkpoints() -> None:
    model = make_model()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9,
        transforms=[SAM(rho=0.05), LAMP(eps=5e-3, rollback_len=3, seed=0)],
    )
    optimizer.step(closure_for(model, optimizer))
    state: dict[str, Any] = optimizer.state_dict()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": state}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = make_model()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = TransformingOptimizer(
        resumed.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9,
        transforms=[SAM(rho=0.05), LAMPRollback(eps=5e-3, rollback_len=3, seed=0)],
    )
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert "lamp.sum" in resumed_optimizer.state[resumed.hidden.weight]
    copy.deepcopy(resumed_optimizer)


def amp_sam_step(
    model: nn.Module,
    optimizer: TransformingOptimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model(inputs), targets)
    scaler.scale(loss).backward()
    optimizer.first_step(zero_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        perturbed_loss = loss_fn(model(inputs), targets)
    scaler.scale(perturbed_loss).backward()
    scaler.step(optimizer)  # restores w, then unscales and steps -- or skips on inf/NaN
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def mixed_precision() -> None:
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(rho=0.1)])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert torch.isfinite(amp_sam_step(model, optimizer, scaler, mse_loss, x, y))


class GradientCentralization(Transform):
    @torch.no_grad()
    def pre_update(self, ctx: TransformContext) -> None:
        for group in ctx.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.ndim > 1:
                    p.grad.sub_(p.grad.mean(dim=tuple(range(1, p.ndim)), keepdim=True))


class WeightEMA(Transform):
    slot_name = "weight_ema"

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.validate_group({"decay": decay})

    def group_defaults(self) -> dict[str, Any]:
        return {"decay": self.decay}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        if not 0.0 <= group["decay"] < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {group['decay']!r}")

    def scales_with_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        return True

    @torch.no_grad()
    def post_update(self, ctx: TransformContext) -> None:
        if not self.active(ctx.param_groups):
            return
        for group in ctx.param_groups:
            for p in group["params"]:
                state = ctx.state[p]
                if "weight" not in state:
                    state["weight"] = p.detach().clone()
                else:
                    state["weight"].lerp_(p, 1.0 - group["decay"])
        counter = ctx.slot_state(keys=("t",))
        if counter is not None:
            counter["t"] = counter.get("t", 0) + 1


class RandomPerturbation(PerturbationTransform):
    """Moves the weights along a random direction of length rho, in place."""

    def __init__(self, rho: float = 0.05) -> None:
        self.rho = rho

    def group_defaults(self) -> dict[str, Any]:
        return {"rho": self.rho}

    @torch.no_grad()
    def perturb(self, ctx: TransformContext) -> Perturbation | None:
        moves: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = []
        for group in ctx.param_groups:
            for p in group["params"]:
                backup = p.detach().clone()
                direction = torch.randn_like(p)
                p.add_(direction, alpha=group["rho"] / float(direction.norm()))
                moves.append((p, backup, backup, False))
        return Perturbation(moves) if moves else None


class GradientClip:
    """The seed protocol: any object with apply() and post_step()."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def apply(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], batch: tuple[Any, ...]) -> None:
        nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)

    def post_step(self, model: nn.Module) -> None:
        pass


class ClampedParams(ParamTransform):
    def post_step_transform_(self, param: torch.Tensor, group: Mapping[str, Any]) -> None:
        param.clamp_(min=-1.0, max=1.0)


def custom_transforms() -> None:
    model = make_model()
    clip: GradientTransform = GradientClip(max_norm=0.01)
    assert isinstance(clip, GradientTransform)
    ema = EMA(decay=0.9)
    optimizer = TransformingOptimizer(
        model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        transforms=[SAM(rho=0.05), RandomPerturbation(), GradientCentralization(), WeightEMA(decay=0.5), clip, ema],
        model=model,
        reevaluation_context=lambda: frozen_bn_stats(model),
    )
    optimizer.step(closure_for(model, optimizer))
    assert optimizer.state[model.hidden.weight]["weight_ema.t"] == 1
    with ema.averaged_weights(optimizer):
        pass
    sam = SAM(rho=0.05)
    sam_only = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[sam])
    active: bool = sam.active(sam_only.param_groups)
    scale_equivariant: bool = sam.scales_with_gradients(sam_only.param_groups)
    assert active and scale_equivariant in (True, False)
    ctx = TransformContext(optimizer.param_groups, optimizer.state, slot="weight_ema")
    assert WeightEMA().active(ctx.param_groups)
    lookahead = Lookahead(alpha=0.5, k=2)
    other = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(), lookahead])
    other.step(closure_for(model, other))
    with lookahead.slow_weights(other):
        pass
    for transform in [ClampedParams(), ClampParams(-1.0, 1.0)]:
        param = torch.tensor([-10.0, 1.0], requires_grad=True)
        clamped = TransformingOptimizer([param], torch.optim.SGD, transforms=[transform], lr=0.1)
        param.backward(gradient=torch.tensor([-1.0, 1.0]))
        clamped.step()
        assert float(param.detach().min()) == -1.0
    chain: list[Transform] = [
        GSAM(rho=0.04, alpha=0.3),
        WSAM(rho=0.05, gamma=0.9),
        FriendlySAM(rho=0.05, sigma=1.0, lmbda=0.9),
        LookSAM(rho=0.05, alpha=0.7, k=5),
        ESAM(rho=0.05, beta=0.5, seed=0),
        MultiStepSAM(rho=0.05, ascent_steps=2, adversary=functools.partial(torch.optim.SGD, momentum=0.9)),
        ClipGradNorm(max_grad_norm=1.0),
        GradSign(),
        NormalizeGrad(eps=0.0, p=math.inf),
        ScaleGrad(scale=2.0),
        ClampGrad(-1.0, 1.0),
        SparsifyGrad(q=0.5),
        ProjectParams(radius=1.0, param_ndim=-1),
    ]
    for transform in chain:
        single = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[transform])
        assert single.transforms[0] is transform


def seed_protocol() -> None:
    model = make_model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    sam = SAM(rho=0.05)

    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return mse_loss(model(inputs), targets)

    plain.zero_grad()
    loss_fn(x, y).backward()
    sam.apply(model, loss_fn, (x, y))  # perturb, re-evaluate, restore
    plain.step()
    sam.post_step(model)
    assert sam.state_dict() == {"state": {}}


def kernels_and_utilities() -> None:
    params = [torch.randn(3), torch.randn(2, 2)]
    directions = [torch.randn(3), torch.randn(2, 2)]
    norm: torch.Tensor = global_norm(params)
    finite: bool = all_finite(params, foreach=False)
    assert float(norm) > 0 and finite
    perturbed_into_([torch.empty(3), torch.empty(2, 2)], params, directions, [0.1, 0.2])
    add_directions_(params, directions, [0.1, 0.1])
    scales: list[torch.Tensor] = adaptive_scaling(params, [0.01, 0.01])
    mul_(mul(params, scales), scales)
    scale_(params, [0.5, 0.5])
    sums = [torch.zeros(3), torch.zeros(2, 2)]
    accumulate_(sums, params)
    add_scaled_(params, directions, 0.5)
    assign_mean_(params, sums, [1, 1])
    generator = torch.Generator().manual_seed(0)
    assert len(magnitude_noise(params, lambda device: generator)) == 2
    model = make_model()
    mse_loss(model(x), y).backward()
    flat: torch.Tensor = get_grad(model.parameters())
    set_grad(2 * flat, model.parameters())
    with frozen_bn_stats(model):
        model(x)
    snapshot: ParameterSnapshot = save_state(model)
    with torch.no_grad():
        model.out.bias.add_(1.0)
    restore_state(model, snapshot)
    with ParameterSnapshot(model):
        with torch.no_grad():
            model.out.bias.add_(1.0)
    snapshot.restore(model)


# -- meta-learning -------------------------------------------------------------------------------
tasks: list[Task] = SinusoidTaskSampler(k_support=5, k_query=5, seed=0).sample(2)


def maml_closure(meta: MetaOptimizer) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        meta.zero_grad()
        losses: list[torch.Tensor] = []
        for task in tasks:
            learner = meta.adapt(lambda f: mse_loss(f(task.support_x), task.support_y))
            losses.append(mse_loss(learner(task.query_x), task.query_y))
        loss = torch.stack(losses).mean()
        loss.backward()
        return loss

    return closure


def meta_learners() -> None:
    metas: list[MetaOptimizer] = [
        MAML(make_model(1), torch.optim.Adam, lr=1e-3, inner_lr=0.01, inner_steps=2),
        FOMAML(make_model(1), torch.optim.Adam, lr=1e-3, inner_lr=0.01, inner_steps=2),
    ]
    for meta in metas:
        assert torch.isfinite(meta.step(maml_closure(meta)))
        outer: torch.optim.Optimizer = meta.outer
        assert outer.param_groups is meta.param_groups
        loop: InnerLoop = meta.inner_loop()
        policy: PathPolicy = meta.path_policy
        assert loop.inner_steps == meta.inner_steps == 2 and meta.skipped_steps == 0 and policy is not None

    model = make_model(1)
    metasgd = MetaSGD(model, torch.optim.Adam, lr=1e-3, inner_lr=0.01)
    rates: dict[str, nn.Parameter] = metasgd.inner_lrs
    assert rates["hidden.weight"].shape == model.hidden.weight.shape
    metasgd.step(maml_closure(metasgd))
    metasgd.load_state_dict(metasgd.state_dict())

    model = make_model(1)
    anil = ANIL(model, torch.optim.Adam, head=model.out, lr=1e-3, inner_lr=0.1)
    assert anil.head_names == head_names(model, model.out)
    learner = anil.adapt(lambda f: mse_loss(f(tasks[0].support_x), tasks[0].support_y))
    assert learner.params["hidden.weight"] is model.hidden.weight

    model = make_model(1)
    reptile = Reptile(model, torch.optim.SGD, lr=0.5, inner_lr=0.01, inner_steps=2)

    def reptile_closure() -> torch.Tensor:
        losses: list[torch.Tensor] = []
        for task in tasks:
            learner = reptile.adapt(lambda f: mse_loss(f(task.support_x), task.support_y))
            losses.append(mse_loss(learner(task.query_x), task.query_y))
        return torch.stack(losses).mean()  # for monitoring only

    reptile.step(reptile_closure)
    reptile.record_adaptation(named_params(model))
    assert reptile.num_recorded == 1
    reptile.clear_records()

    model = make_model(1)
    grouped = MAML(
        model,
        torch.optim.Adam,
        params=[{"params": model.hidden.parameters(), "adapt": False}, {"params": model.out.parameters(), "inner_lr": 0.1}],
        lr=1e-3,
        inner_lr=0.01,
    )
    assert [group["adapt"] for group in grouped.param_groups] == [False, True]

    model = make_model(1)  # SAM on the outer loop
    sam_outer = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=1e-3, transforms=[SAM(rho=0.05)])
    outer_sam = MAML(model, sam_outer, inner_lr=0.01, inner_steps=1)
    scheduler = torch.optim.lr_scheduler.StepLR(outer_sam, step_size=1)

    def closure() -> torch.Tensor:
        outer_sam.zero_grad()
        loss = outer_sam.task_losses(tasks, mse_loss).mean()
        loss.backward()
        return loss

    outer_sam.step(closure)
    scheduler.step()
    before: float = outer_sam.evaluate(tasks, mse_loss)
    assert math.isfinite(before) and math.isfinite(outer_sam.evaluate(tasks, mse_loss, steps=1))

    model = make_model(1)  # learners
    meta = MAML(model, torch.optim.SGD, lr=1e-3, inner_lr=0.05, inner_steps=2)
    sx, sy = tasks[0].support_x, tasks[0].support_y
    chained: Learner = meta.clone()
    chained.adapt(mse_loss(chained(sx), sy)).adapt(mse_loss(chained(sx), sy))
    assert chained.steps_taken == 2
    assert meta.clone(inner_step_fn=MomentumInnerStep(momentum=0.9)).adapt_on(mse_loss, sx, sy).steps_taken == 2
    own = Learner(model, inner_lr=0.1).adapt_closure(lambda f: mse_loss(f(sx), sy))
    fast: dict[str, torch.Tensor] = own.params
    assert torch.equal(own.forward_with(fast)(sx), own(sx))


def proximal(current: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return 0.1 * torch.stack([((current[n] - base[n]) ** 2).sum() for n in current]).sum()


class HalvedInnerGrads:
    """A user's inner-loop gradient transform (the InnerGradTransform protocol)."""

    def transform_inner_grads(
        self,
        params: Mapping[str, torch.Tensor],
        grads: Mapping[str, torch.Tensor],
        grad_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        return {name: 0.5 * grad for name, grad in grads.items()}


def plain_inner_step(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    lrs: Mapping[str, float | torch.Tensor],
    state: dict[str, Any],
) -> dict[str, torch.Tensor]:
    return {name: params[name] - lrs[name] * grad for name, grad in grads.items()}


def meta_steps() -> None:
    meta = MAML(make_model(1), torch.optim.Adam, lr=1e-3, inner_lr=0.01, inner_steps=1)
    query_losses: list[torch.Tensor] = []
    with meta_step(meta, loss_fn=mse_loss, inner_steps=2) as ms:
        for task, weight in zip(tasks, [1.0, 2.0]):
            query_losses.append(ms.task(support=(task.support_x, task.support_y), query=(task.query_x, task.query_y), weight=weight))
    assert ms.loss is not None and torch.isfinite(ms.loss)  # set when the block ends
    inner_sam: InnerGradTransform = InnerSAM(rho=0.05)
    rules: list[InnerStepFn] = [
        MomentumInnerStep(momentum=0.9),
        AdamInnerStep(betas=(0.9, 0.999)),
        momentum_inner_step,
        adam_inner_step,
        sgd_inner_step,
        plain_inner_step,
    ]
    for rule in rules:
        with meta_step(
            meta, loss_fn=mse_loss, inner_steps=2, inner_step_fn=rule, inner_reg_fn=proximal,
            grad_transforms=[inner_sam, HalvedInnerGrads()],
        ) as ms:
            for task in tasks:
                ms.task(support=(task.support_x, task.support_y), query=(task.query_x, task.query_y))
    builder = MetaStep(meta, loss_fn=mse_loss)
    builder.task(support=(tasks[0].support_x, tasks[0].support_y), query=(tasks[0].query_x, tasks[0].query_y))
    assert torch.isfinite(builder.step())
    blocker: str | None = compiled_path_blocker(meta, tasks)
    assert blocker is None or blocker
    assert CompiledMetaLoss(meta, mse_loss, inner_steps=1) is not None  # compiled when called


def trainer_and_samplers() -> None:
    meta = FOMAML(make_model(1), torch.optim.Adam, lr=1e-2, inner_lr=0.01, inner_steps=1)
    trainer = MetaTrainer(meta, mse_loss, SinusoidTaskSampler(k_support=5, k_query=5, seed=0))
    held_out = SinusoidTaskSampler(k_query=5, seed=1).sample(2)
    seen: list[tuple[int, float]] = []
    history: History = trainer.fit(
        num_iterations=2,
        meta_batch_size=2,
        eval_every=1,
        eval_tasks=held_out,
        callback=lambda iteration, loss: seen.append((iteration, loss)),
        progress=False,
    )
    assert len(history.meta_loss) == 2 and history.eval_iterations == [1, 2] and len(seen) == 2
    loss: float = trainer.train_step(held_out)
    trainer.load_state_dict(trainer.state_dict())
    assert math.isfinite(loss) and trainer.evaluate(held_out, steps=0) > 0

    sampler = SinusoidTaskSampler(amp_range=(0.1, 5.0), phase_range=(0.0, torch.pi), k_support=5, k_query=5, seed=0)
    as_protocol: TaskSampler = sampler
    assert isinstance(as_protocol, TaskSampler)
    drawn, amplitudes, phases = sampler.sample_with_params(2)
    torch.testing.assert_close(drawn[0].support_y, sinusoid(drawn[0].support_x, amplitudes[0], phases[0]))
    load_sampler_state_dict(sampler, sampler_state_dict(sampler))
    sampler.load_state_dict(sampler.state_dict())
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(30)
    inputs = torch.randn(300, 2, generator=generator) + 3.0 * labels[:, None].float()
    few_shot = FewShotSampler(inputs, labels, n_way=5, k_shot=1, k_query=5, classes=range(7), seed=0)
    split, original_classes = few_shot.sample_with_classes(4)
    assert original_classes.shape == (4, 5) and split[0].support_x.shape == (5, 2)
    sharded = DistributedTaskSampler(sampler, rank=0, world_size=1)
    task: Task = sharded.sample(1)[0].to(torch.float64)
    assert task.query_y.dtype == torch.float64
    made = Task(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1))
    assert can_vectorize([made, made]) and stack_tasks([made, made])[0].shape == (2, 2, 1)


def functional_core() -> None:
    model = make_model(1)
    fx, fy = torch.randn(5, 1), torch.randn(5, 1)
    params = named_params(model)
    assert named_buffers(model) == {}
    stepped: dict[str, torch.Tensor] = inner_step(params, mse_loss(functional_forward(model, params, fx), fy), lr=0.1)
    assert set(stepped) == set(params)
    adapted = adapt_params(model, params, lambda p: mse_loss(functional_forward(model, p, fx), fy), inner_lr=0.1, inner_steps=2)
    mse_loss(functional_forward(model, adapted, fx), fy).backward()
    rates = {name: 0.1 for name in params}
    head_only = adapt_params(
        model, params, lambda p: mse_loss(functional_forward(model, p, fx), fy), inner_lr=rates, adapt_names=["out.weight", "out.bias"]
    )
    assert head_only["hidden.weight"] is params["hidden.weight"]
    losses, _ = vmap_task_losses(model, params, list(params), rates, tasks, mse_loss, 1)
    assert losses.shape == (2,)


# -- integrations --------------------------------------------------------------------------------
def accelerate_loop() -> None:
    model = make_model()
    optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    accelerator = SAMAccelerator(cpu=True)
    model, prepared = accelerator.prepare(model, optimizer)
    accelerator.backward(mse_loss(model(x), y))
    prepared.first_step(zero_grad=True)
    accelerator.backward(mse_loss(model(x), y))
    prepared.second_step(zero_grad=True)
    same: SAMAcceleratedOptimizer = sam_accelerated(prepared)
    inner: TransformingOptimizer = same.sam
    assert inner is optimizer

    def closure() -> torch.Tensor:
        same.zero_grad()
        loss = mse_loss(model(x), y)
        accelerator.backward(loss)
        return loss

    same.step(closure)
    assert not same.step_was_skipped


def main() -> None:
    assert samgria.__version__
    closure_loop()
    two_call_loop()
    schedulers_and_groups()
    checkpoints()
    mixed_precision()
    custom_transforms()
    seed_protocol()
    kernels_and_utilities()
    meta_learners()
    meta_steps()
    trainer_and_samplers()
    functional_core()
    if importlib.util.find_spec("accelerate") is not None:
        accelerate_loop()


if __name__ == "__main__":
    main()
