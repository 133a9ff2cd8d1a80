"""The optimizer and a meta-learner on a CUDA device (skipped where there is none).

What the CPU suite cannot see: the CUDA kernels of the foreach and fused paths, CUDA generators
(LAMP's and ESAM's noise), ``torch.amp.GradScaler("cuda")`` with float16 autocast, and
checkpoints of CUDA state. References: the same run on the CPU (within float32 rounding), the
other loop on the same device (bit for bit), and a run never checkpointed (bit for bit).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from transform_infos import make_closure as closure_for

from samgria import ASAM, ESAM, GSAM, LAMP, SAM, WSAM, FriendlySAM, LookSAM, MultiStepSAM, Transform, TransformingOptimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CHAINS = {
    "SAM": lambda: [SAM(0.05)],
    "ASAM": lambda: [ASAM(0.5)],
    "GSAM": lambda: [GSAM(0.05, alpha=0.4)],
    "WSAM": lambda: [WSAM(0.05, 0.9)],
    "LookSAM": lambda: [LookSAM(0.05, k=2)],
    "FriendlySAM": lambda: [FriendlySAM(0.05)],
    "MultiStepSAM": lambda: [MultiStepSAM(0.05, 2)],
    "SAM+LAMP": lambda: [SAM(0.05), LAMP(1e-2, rollback_len=2, seed=0)],
}
INNERS = {
    "sgd-foreach": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, foreach=True),
    "adam-fused": lambda params: torch.optim.Adam(params, lr=1e-2, fused=True),
}


def make_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(device)


def make_data(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=generator).to(device), torch.randn(32, 1, generator=generator).to(device)


def build(device: str, chain: str, inner: str):
    model = make_model(device)
    optimizer = TransformingOptimizer(model.parameters(), INNERS[inner], transforms=CHAINS[chain]())
    return model, optimizer


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("chain", sorted(set(CHAINS) - {"SAM+LAMP"}))  # LAMP's noise: CUDA's own stream
def test_a_cuda_run_follows_the_cpu_run(chain, inner):
    runs = []
    for device in ("cpu", "cuda"):
        model, optimizer = build(device, chain, inner)
        x, y = make_data(device)
        for _ in range(4):
            optimizer.step(closure_for(model, optimizer, x, y))
        runs.append([w.cpu() for w in weights(model)])
    for cpu, cuda in zip(*runs):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chain", ["SAM", "ASAM", "GSAM", "WSAM", "FriendlySAM", "SAM+LAMP"])
def test_the_two_call_loop_equals_step_closure_on_cuda(chain):
    (model_a, closure_opt), (model_b, loop_opt) = build("cuda", chain, "adam-fused"), build("cuda", chain, "adam-fused")
    x, y = make_data("cuda")
    for _ in range(3):
        closure_opt.step(closure_for(model_a, closure_opt, x, y))
        loop_opt.zero_grad()
        nn.functional.mse_loss(model_b(x), y).backward()
        loop_opt.first_step()
        nn.functional.mse_loss(model_b(x), y).backward()
        loop_opt.second_step()
        for a, b in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_a_cuda_checkpoint_resumes_bit_for_bit(chain):
    x, y = make_data("cuda")
    model, optimizer = build("cuda", chain, "adam-fused")
    for _ in range(3):
        optimizer.step(closure_for(model, optimizer, x, y))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    for _ in range(3):
        optimizer.step(closure_for(model, optimizer, x, y))
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed_model, resumed = build("cuda", chain, "adam-fused")
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    for _ in range(3):
        resumed.step(closure_for(resumed_model, resumed, x, y))
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_a_seeded_noise_checkpoint_of_the_cpu_is_refused_on_cuda_naming_the_device():
    """LAMP's generator state is the device's own; a CPU one cannot seed a CUDA generator."""
    x, y = make_data("cpu")
    model = make_model("cpu")
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.05, transforms=[LAMP(1e-2, seed=0)])
    optimizer.step(closure_for(model, optimizer, x, y))
    saved = copy.deepcopy(optimizer.state_dict())
    cuda_model = make_model("cuda")
    cuda_optimizer = TransformingOptimizer(cuda_model.parameters(), torch.optim.SGD, lr=0.05, transforms=[LAMP(1e-2, seed=0)])
    before = copy.deepcopy(cuda_optimizer.state_dict())
    with pytest.raises(ValueError, match="invalid generator state for device cuda"):
        cuda_optimizer.load_state_dict(saved)
    assert cuda_optimizer.state_dict()["state"] == before["state"]


@pytest.mark.parametrize("chain", ["SAM", "GSAM", "LookSAM"])
def test_float16_autocast_with_gradscaler_trains_and_skips_an_overflow(chain):
    """The documented AMP recipe: the two-call loop, scaler.step finishes the step; an overflowing
    first pass skips the step (weights unchanged) and the scale backs off."""
    model, optimizer = build("cuda", chain, "sgd-foreach")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    x, y = make_data("cuda")

    def backward(poison: bool = False) -> None:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()

    start = weights(model)
    for _ in range(3):
        optimizer.zero_grad()
        backward()
        optimizer.first_step()
        backward()
        scaler.step(optimizer)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(start, weights(model)))
    before, scale = weights(model), scaler.get_scale()
    optimizer.zero_grad()
    backward(poison=True)
    optimizer.first_step()
    backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    assert scaler.get_scale() < scale


def test_esam_and_lamp_draw_their_noise_from_cuda_generators_reproducibly():
    runs = []
    for _ in range(2):
        model = make_model("cuda")
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.05, transforms=[ESAM(0.05, seed=3), LAMP(1e-2, seed=4)]
        )
        x, y = make_data("cuda")
        torch.cuda.manual_seed(123 + len(runs))  # the global CUDA stream must not matter
        for _ in range(3):
            optimizer.step(closure_for(model, optimizer, x, y))
        runs.append(weights(model))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_second_order_maml_on_cuda_follows_the_cpu():
    from samgria import MAML
    from samgria.data import Task

    losses = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(device)
        meta = MAML(model, torch.optim.Adam, lr=1e-3, inner_lr=0.05, inner_steps=2)
        generator = torch.Generator().manual_seed(2)
        tasks = [
            Task(*(torch.randn(5, 1, generator=generator).to(device) for _ in range(4))) for _ in range(3)
        ]

        def closure():
            meta.zero_grad()
            loss = meta.task_losses(tasks, nn.functional.mse_loss).mean()
            loss.backward()
            return loss

        for _ in range(3):
            meta.step(closure)
        losses.append(float(meta.task_losses(tasks, nn.functional.mse_loss).mean().detach()))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


class _CountingNoise(Transform):
    """Post-step noise from a CPU generator, with an int64 draw counter beside it."""

    slot_name = "counting_noise"

    def settings(self):
        return {}

    @torch.no_grad()
    def post_update(self, ctx):
        slot = ctx.slot_state(keys=("rng", "draws"))
        generator = torch.Generator()
        if "rng" in slot:
            generator.set_state(slot["rng"].cpu())
        else:
            generator.manual_seed(0)
        for group in ctx.param_groups:
            for param in group["params"]:
                param.add_(torch.randn(param.shape, generator=generator).to(param), alpha=1e-3)
        slot["rng"] = generator.get_state()
        slot["draws"] = slot.get("draws", torch.tensor(0, device=ctx.param_groups[0]["params"][0].device)) + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_slots_integer_tensors_keep_their_dtype_through_a_cpu_mapped_checkpoint(dtype):
    """Saved on CUDA, read with map_location="cpu", loaded into a CUDA model: the counter keeps
    int64 and moves to the parameter's device; the generator state stays a uint8 tensor."""
    x, y = make_data("cuda")
    model = make_model("cuda").to(dtype)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=1e-2, momentum=0.9, transforms=[SAM(0.05), _CountingNoise()])
    x = x.to(dtype)
    for _ in range(2):
        optimizer.step(closure_for(model, optimizer, x, y.to(dtype)))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu", weights_only=True)
    resumed_model = make_model("cuda").to(dtype)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = TransformingOptimizer(resumed_model.parameters(), torch.optim.SGD, lr=1e-2, momentum=0.9, transforms=[SAM(0.05), _CountingNoise()])
    resumed.load_state_dict(checkpoint["optimizer"])
    slot = next(entry for entry in resumed.state.values() if "counting_noise.draws" in entry)
    assert slot["counting_noise.draws"].dtype == torch.int64 and slot["counting_noise.draws"].device.type == "cuda"
    assert slot["counting_noise.rng"].dtype == torch.uint8 and slot["counting_noise.draws"].item() == 2
    for _ in range(2):
        optimizer.step(closure_for(model, optimizer, x, y.to(dtype)))
        resumed.step(closure_for(resumed_model, resumed, x, y.to(dtype)))
    assert slot["counting_noise.draws"].item() == 4
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_atomic_full_undoes_an_out_of_memory_inside_foreach_adam_on_cuda():
    x, y = make_data("cuda")

    def build_full():
        model = make_model("cuda")
        return model, TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=1e-2, foreach=True, transforms=[SAM(0.05)], atomic="full")

    model, optimizer = build_full()
    twin_model, twin = build_full()
    for _ in range(2):
        optimizer.step(closure_for(model, optimizer, x, y))
        twin.step(closure_for(twin_model, twin, x, y))
    before, saved = weights(model), copy.deepcopy(optimizer.state_dict())
    original = torch._foreach_sqrt

    def failing(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated CUDA out of memory")

    torch._foreach_sqrt = failing
    try:
        with pytest.raises(torch.OutOfMemoryError):
            optimizer.step(closure_for(model, optimizer, x, y))
    finally:
        torch._foreach_sqrt = original
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = optimizer.state_dict()["state"]
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(after[index][key], value), (index, key)
    for _ in range(2):
        optimizer.step(closure_for(model, optimizer, x, y))
        twin.step(closure_for(twin_model, twin, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))
