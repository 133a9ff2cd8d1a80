"""Sharded (``DTensor``) parameters in one process: a 1-rank gloo group, so the checks run in pytest.

The multi-rank behaviour (global norms, DCP, resharding) is in ``tests/test_optim_fsdp.py``;
here: what is refused with sharded parameters, and that a 1-rank sharding changes nothing.
"""

from __future__ import annotations

import re

import pytest
import torch
from distributed_harness import one_rank_gloo_group
from torch import nn

from samgria import ASAM, ESAM, GSAM, LAMP, SAM, WSAM, FriendlySAM, LookSAM, NormalizeGrad, TransformingOptimizer
from samgria.functional import all_finite, global_norm
from samgria.transforms.lamp import sharded_noise_seed

PINNED_SEED = 5576177639296541329  # sharded_noise_seed(7, 2, (1,)) as released


@pytest.fixture(scope="module")
def one_rank_group():
    with one_rank_gloo_group():
        yield


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def _sharded(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    return model


def _train(model: nn.Module, optimizer: TransformingOptimizer) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 4, dtype=torch.float64, generator=generator)
        y = torch.randn(8, 2, dtype=torch.float64, generator=generator)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def test_one_rank_sharding_gives_the_unsharded_sam_and_lamp(one_rank_group: None) -> None:
    def build(model: nn.Module) -> TransformingOptimizer:
        return TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(rho=0.05), LAMP(eps=0.0, rollback_len=1)]
        )

    sharded = _sharded(_model())
    assert all(type(p).__name__ == "DTensor" for p in sharded.parameters())
    plain = _model()
    for a, b in zip(_train(sharded, build(sharded)), _train(plain, build(plain))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("transform", [NormalizeGrad(), ESAM(rho=0.05)], ids=lambda t: type(t).__name__)
def test_a_transform_that_cannot_shard_is_refused_by_name(one_rank_group: None, transform) -> None:
    model = _sharded(_model())
    name = type(transform).__name__
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: {name} \(slot '\w+'\) does not support sharded \(DTensor\) parameters"):
        TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[transform])
    optimizer = TransformingOptimizer(_model().parameters(), torch.optim.SGD, lr=0.1, transforms=[transform])
    with pytest.raises(ValueError, match=r"param_groups\[1\]: .* does not support sharded"):
        optimizer.add_param_group({"params": list(model.parameters())})
    assert len(optimizer.param_groups) == 1, "nothing half-applied"


class _ClipByHand:
    """A seed-protocol object (apply + post_step)."""

    def apply(self, model, loss_fn, batch) -> None:
        pass

    def post_step(self, model) -> None:
        pass


def test_a_seed_protocol_object_that_cannot_shard_is_refused_by_its_own_name(one_rank_group: None) -> None:
    # The refusal named "ProtocolTransform", samgria's adapter, not the user's class.
    model = _sharded(_model())
    with pytest.raises(ValueError, match=r"param_groups\[0\]: _ClipByHand \(seed protocol\) \(slot '_clip_by_hand'\) does not support sharded"):
        TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[_ClipByHand()])


def test_m_sharpness_is_refused_with_sharded_params(one_rank_group: None) -> None:
    model = _sharded(_model())
    with pytest.raises(ValueError, match=re.escape("first_pass_context (m-sharpness) needs unsharded parameters")):
        TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM()], first_pass_context=lambda: torch.no_grad()
        )


def test_global_norm_accepts_dtensors_and_local_shards_with_like(one_rank_group: None) -> None:
    """The API on a 1-rank mesh (the reduction across ranks is checked in test_optim_fsdp.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    tensors = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    sharded = [distribute_tensor(t, mesh, [Shard(0)]) for t in tensors]
    expected = torch.sqrt(sum((t**2).sum() for t in tensors))
    for foreach in (True, False):
        torch.testing.assert_close(global_norm(sharded, foreach=foreach), expected)
        local = [t.to_local() * 2 for t in sharded]
        torch.testing.assert_close(global_norm(local, foreach=foreach, like=sharded), 2 * expected)


def test_all_finite_accepts_dtensors_and_local_shards_with_like(one_rank_group: None) -> None:
    """The API on a 1-rank mesh (every rank's verdict is combined by the sharded path)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    tensors = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    for foreach in (True, False):
        sharded = [distribute_tensor(t, mesh, [Shard(0)]) for t in tensors]
        assert all_finite(sharded, foreach=foreach)
        assert all_finite([t.to_local() for t in sharded], foreach=foreach, like=sharded)
        sharded[1].to_local()[6] = float("nan")
        assert not all_finite(sharded, foreach=foreach)
        assert not all_finite([t.to_local() for t in sharded], foreach=foreach, like=sharded)


def test_global_norm_rejects_a_like_of_another_length() -> None:
    with pytest.raises(ValueError, match="like must have one tensor per tensor, got 1 for 2"):
        global_norm([torch.ones(2), torch.ones(3)], like=[torch.ones(2)])


def test_sharded_noise_seed_is_a_stable_function_of_seed_draw_and_shard() -> None:
    seeds = {sharded_noise_seed(7, draw, (shard,)) for draw in range(3) for shard in range(4)}
    assert len(seeds) == 12
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert sharded_noise_seed(7, 2, (1,)) == sharded_noise_seed(7, 2, (1,))
    assert sharded_noise_seed(7, 2, (1,)) != sharded_noise_seed(8, 2, (1,))
    # Pinned: a resumed run draws the noise of its checkpoint's streams only if this never changes.
    assert sharded_noise_seed(7, 2, (1,)) == PINNED_SEED


def test_add_param_group_reads_a_generator_once_and_takes_a_single_tensor() -> None:
    model = nn.Linear(3, 2)
    optimizer = TransformingOptimizer([model.weight], torch.optim.SGD, lr=0.1, transforms=[SAM()])
    optimizer.add_param_group({"params": (p for p in [model.bias])})
    assert optimizer.param_groups[1]["params"] == [model.bias]
    extra = nn.Parameter(torch.zeros(()))
    optimizer.add_param_group({"params": extra})
    assert optimizer.param_groups[2]["params"] == [extra]


def test_m_sharpness_is_refused_when_sharded_params_are_added_later(one_rank_group: None) -> None:
    model = _sharded(_model())
    optimizer = TransformingOptimizer(
        [nn.Parameter(torch.zeros(2))], torch.optim.SGD, lr=0.1, transforms=[SAM()], first_pass_context=lambda: torch.no_grad()
    )
    with pytest.raises(ValueError, match=re.escape("first_pass_context (m-sharpness) needs unsharded parameters")):
        optimizer.add_param_group({"params": list(model.parameters())})
    assert len(optimizer.param_groups) == 1


def _lamp_run(sharded: bool, seed: int | None = 0) -> tuple[nn.Module, TransformingOptimizer]:
    model = _sharded(_model()) if sharded else _model()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), LAMP(1e-2, rollback_len=5, seed=seed)]
    )
    _train(model, optimizer)
    return model, optimizer


def _state_snapshot(optimizer: TransformingOptimizer) -> list[dict]:
    return [
        {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in optimizer.state[p].items()}
        for group in optimizer.param_groups
        for p in group["params"]
    ]


def _same_snapshot(a: list[dict], b: list[dict]) -> bool:
    return all(
        x.keys() == y.keys()
        and all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x)
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("route", ["load_state_dict", "set_optimizer_state_dict"])
@pytest.mark.parametrize(
    "source_sharded, message",
    [
        (True, "holds a draw counter (noise_draws) of sharded parameters, and none of these is sharded"),
        (False, "holds a generator state (rng_state) of unsharded parameters, and all of these are sharded"),
    ],
    ids=["sharded-into-unsharded", "unsharded-into-sharded"],
)
def test_a_seeded_lamp_checkpoint_does_not_load_into_the_other_layout(one_rank_group: None, route, source_sharded, message) -> None:
    """A seeded LAMP keeps a generator state for unsharded parameters and a draw counter for
    sharded ones. An in-memory checkpoint of one layout loaded into the other (load_state_dict,
    set_optimizer_state_dict) was taken silently: the run went on with noise of another stream
    and kept the other layout's state beside it (a DTensor sum for a plain parameter). Refused
    naming it, nothing changed."""
    import copy

    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    source_model, source = _lamp_run(source_sharded)
    target_model, target = _lamp_run(not source_sharded)
    before = _state_snapshot(target)
    weights = [p.detach().clone() for p in target_model.parameters()]
    with pytest.raises(ValueError, match=re.escape(f"the checkpoint's LAMP slot 'lamp' {message}")):
        if route == "load_state_dict":
            target.load_state_dict(copy.deepcopy(source.state_dict()))
        else:
            set_optimizer_state_dict(target_model, target, copy.deepcopy(get_optimizer_state_dict(source_model, source)))
    assert _same_snapshot(_state_snapshot(target), before)
    assert all(torch.equal(a, b) for a, b in zip(weights, target_model.parameters()))


def test_a_sharded_state_tensor_for_a_plain_parameter_is_refused(one_rank_group: None) -> None:
    """An unseeded LAMP keeps no noise state, but an in-memory checkpoint of sharded parameters
    holds DTensor sums: loaded into unsharded parameters they were taken as they were."""
    import copy

    _, source = _lamp_run(True, seed=None)
    _, target = _lamp_run(False, seed=None)
    with pytest.raises(ValueError, match=re.escape("holds 'sum' as a DTensor for a parameter that is a plain tensor")):
        target.load_state_dict(copy.deepcopy(source.state_dict()))


@pytest.mark.parametrize(
    "make",
    [
        lambda: SAM(0.05),
        lambda: ASAM(0.5),
        lambda: FriendlySAM(0.05),
        lambda: GSAM(0.05),
        lambda: WSAM(0.05),
        lambda: WSAM(0.05, decouple=False),
        lambda: LookSAM(0.05, k=2),
    ],
    ids=["SAM", "ASAM", "FriendlySAM", "GSAM", "WSAM", "WSAM-coupled", "LookSAM"],
)
def test_a_partly_sharded_model_steps_as_the_unsharded_one(one_rank_group: None, make) -> None:
    """One layer sharded, the others plain: FriendlySAM's average update mixed DTensors and plain
    tensors in one foreach call and raised at the second step."""

    def run(shard: bool) -> list[torch.Tensor]:
        model = _model()
        if shard:
            _sharded(model[0])
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[make()])
        return _train(model, optimizer)

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("unscale_first", [False, True])
def test_decoupled_wsam_on_sharded_params_under_grad_scaler_steps_like_the_unsharded_run(one_rank_group, unscale_first):
    """GradScaler's step of decoupled WSAM over FSDP2 parameters multiplied the DTensor gradients
    and WSAM's kept local gradients in one list call: torch's "got mixed torch.Tensor and
    DTensor". The sharded run now equals the unsharded one."""
    from torch.distributed.fsdp import fully_shard

    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 2, generator=generator)

    def run(sharded):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        if sharded:
            fully_shard(model)
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[WSAM(0.05, 0.8)])
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for _ in range(2):
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            optimizer.first_step(zero_grad=True)
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            if unscale_first:
                scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
