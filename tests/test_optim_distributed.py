"""SAM under DistributedDataParallel: 2 CPU processes, gloo backend.

The test starts this file twice as a script (one process per rank, through
``tests/distributed_harness.py``) and compares what the ranks save against single-process references:

* synced SAM (both passes all-reduced) equals one process on the global batch;
* ``first_pass_context=ddp_model.no_sync`` (the SAM paper's m-sharpness) keeps the replicas
  identical and equals a hand-written reference: each replica perturbs with its own local
  gradient, :math:`e_k = \\rho g_k / \\lVert g_k \\rVert`, and the update uses the average of the
  local gradients at :math:`w + e_k`;
* GSAM, WSAM and LookSAM, which keep the first pass's gradients past the second backward, give
  the same weights with ``gradient_as_bucket_view`` (both passes written into the same buckets)
  as without it, in both loops;
* with ``find_unused_parameters=True``, a branch that one rank uses and the other does not (a
  gradient on some ranks only), a frozen layer and a layer no rank uses: SAM, ASAM and SAM with
  a seeded LAMP equal one process on the global batch, in both loops.
"""

from __future__ import annotations

import argparse
import gc
import os
import warnings
from typing import TYPE_CHECKING

import pytest
import torch
from distributed_harness import run_ranks, skip_without_gloo
from torch import nn

if TYPE_CHECKING:
    from samgria.transforms.base import Transform

WORLD_SIZE = 2
STEPS = 3
LOCAL_BATCH = 8
LR, MOMENTUM, RHO = 0.1, 0.9, 0.05
#: How ``_train_ddp`` runs in each mode of the SAM tests.
MODES = {
    "synced": {},
    "two_call": {"two_call": True},
    "bucket_view": {"bucket_view": True},
    "no_sync": {"no_sync": True},
}
#: The transforms that mix the first pass's gradients into the update (LookSAM: a step in between).
FIRST_PASS_MIXERS = ("gsam", "wsam", "wsam_coupled", "looksam")
LOOPS = ("closure", "two_call")
#: The transforms whose state comes from each rank's own first pass under m-sharpness.
RESUMED = ("friendly_sam", "esam", "multi_step_sam")


#: The chains trained over a model with a branch used by rank 0 only (``_PartlyUsed``).
PARTLY_USED = ("sam", "asam", "sam_lamp")


def _first_pass_mixer(name: str) -> Transform:
    """A new transform of ``FIRST_PASS_MIXERS``."""
    from samgria import GSAM, WSAM, LookSAM

    return {
        "gsam": lambda: GSAM(rho=RHO),
        "wsam": lambda: WSAM(rho=RHO),
        "wsam_coupled": lambda: WSAM(rho=RHO, decouple=False),
        "looksam": lambda: LookSAM(rho=RHO, k=2),
    }[name]()


def _make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD_SIZE * LOCAL_BATCH, 5, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 3, (WORLD_SIZE * LOCAL_BATCH,), generator=generator)
    return x, y


def _local_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _global_batch(step)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return x[rows], y[rows]


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target)


class _PartlyUsed(nn.Module):
    """A branch that only rank 0's forward uses, a frozen layer and a layer no forward uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.branch, self.frozen = nn.Linear(5, 12), nn.Linear(5, 12), nn.Linear(5, 12)
        self.head, self.unused = nn.Linear(12, 3), nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.double()

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        hidden = self.body(x) + self.frozen(x)
        return self.head(torch.tanh(hidden + self.branch(x) if use_branch else hidden))


def _partly_used_chain(name: str) -> list[Transform]:
    from samgria import ASAM, LAMP, SAM

    return {
        "sam": lambda: [SAM(rho=RHO)],
        "asam": lambda: [ASAM(rho=0.5, eta=0.01)],
        "sam_lamp": lambda: [SAM(rho=RHO), LAMP(eps=0.01, rollback_len=2, seed=3)],
    }[name]()


def _train_partly_used(rank: int | None, name: str, loop: str) -> list[torch.Tensor]:
    """Train ``_PartlyUsed`` with ``name``'s chain: over DDP (``find_unused_parameters``) on
    ``rank``'s batch, or (``rank=None``) in one process on the mean of both ranks' losses."""
    from torch.nn.parallel import DistributedDataParallel

    from samgria import TransformingOptimizer

    model = _PartlyUsed()
    module = model if rank is None else DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = TransformingOptimizer(
        module.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, transforms=_partly_used_chain(name)
    )
    ranks = range(WORLD_SIZE) if rank is None else [rank]
    for step in range(STEPS):
        batches = [(r, *_local_batch(step, r)) for r in ranks]

        def loss() -> torch.Tensor:
            return sum(_loss(module(x, r == 0), y) for r, x, y in batches) / len(batches)

        if loop == "two_call":
            loss().backward()
            optimizer.first_step(zero_grad=True)
            loss().backward()
            optimizer.second_step(zero_grad=True)
            continue

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = loss()
            value.backward()
            return value

        optimizer.step(closure)
    return [p.detach().clone() for p in model.parameters()]


# -- the worker (runs in a child process) ----------------------------------------------------------
def _train_ddp(
    rank: int, transform: Transform | None = None, *, two_call: bool = False, bucket_view: bool = False, no_sync: bool = False
) -> list[torch.Tensor]:
    """Train with ``transform`` (SAM by default) over DDP; return the weights."""
    from torch.nn.parallel import DistributedDataParallel

    from samgria import SAM, TransformingOptimizer

    model = _make_model()
    ddp_model = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    optimizer = TransformingOptimizer(
        ddp_model.parameters(),
        torch.optim.SGD,
        lr=LR,
        momentum=MOMENTUM,
        transforms=[SAM(rho=RHO) if transform is None else transform],
        first_pass_context=ddp_model.no_sync if no_sync else None,
    )
    for step in range(STEPS):
        x, y = _local_batch(step, rank)
        if two_call:
            _loss(ddp_model(x), y).backward()
            optimizer.first_step(zero_grad=True)
            _loss(ddp_model(x), y).backward()
            optimizer.second_step(zero_grad=True)
            continue

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = _loss(ddp_model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def _closure_with_a_rank_0_fault(optimizer, ddp_model: nn.Module, step: int, rank: int, factor: float):
    """The closure of ``step``; at step 0 rank 0's first evaluation multiplies its loss by
    ``factor`` (NaN: a non-finite local gradient; 0: a zero one)."""
    x, y = _local_batch(step, rank)
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        optimizer.zero_grad()
        loss = _loss(ddp_model(x), y)
        if step == 0 and rank == 0 and calls[0] == 1:
            loss = loss * factor
        loss.backward()
        return loss

    return closure


def _train_m_sharpness_with_a_local_fault(rank: int, fault: str) -> tuple[list[torch.Tensor], int]:
    """m-sharpness where rank 0's first-pass gradient is not like the others' at step 0: NaN
    (``"non_finite"``: every rank must skip) or zero, so that only rank 1 perturbs, with
    ``ClipGradNorm`` before SAM (``"zero"``: every replica must apply the same update) or two
    ``ScaleGrad`` after it that overflow the synchronised gradients at step 0 (``"overflow"``:
    every rank must skip, rank 1 without leaving rank 0 waiting in the ranks' agreement)."""
    from torch.nn.parallel import DistributedDataParallel

    from samgria import SAM, ClipGradNorm, ScaleGrad, TransformingOptimizer

    model = _make_model()
    ddp_model = DistributedDataParallel(model)
    transforms = {
        "zero": lambda: [ClipGradNorm(0.05), SAM(rho=RHO)],
        "overflow": lambda: [SAM(rho=RHO), ScaleGrad(1e300), ScaleGrad(1e300)],
    }.get(fault, lambda: [SAM(rho=RHO)])()
    optimizer = TransformingOptimizer(
        ddp_model.parameters(), torch.optim.SGD, lr=LR, transforms=transforms, first_pass_context=ddp_model.no_sync
    )
    for step in range(STEPS):
        if fault == "overflow":  # 1e600 times the gradients at step 0 only
            for key in ("scale_grad.grad_scale", "scale_grad_1.grad_scale"):
                optimizer.param_groups[0][key] = 1e300 if step == 0 else 1.0
        closure = _closure_with_a_rank_0_fault(optimizer, ddp_model, step, rank, float("nan") if fault == "non_finite" else 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            optimizer.step(closure)
    return [p.detach().clone() for p in model.parameters()], optimizer.skipped_steps


def _resume_m_sharpness_from_this_ranks_checkpoint(rank: int, name: str) -> tuple[bool, dict]:
    """m-sharpness with a transform whose state comes from each rank's own first pass: save this
    rank's ``state_dict()`` after 2 steps, train 2 more, then load it into a fresh optimizer and
    train the same 2 steps. Returns (bit-equal weights, the saved state)."""
    import copy

    from torch.nn.parallel import DistributedDataParallel

    from samgria import ESAM, FriendlySAM, MultiStepSAM, TransformingOptimizer

    make = {
        "friendly_sam": lambda: FriendlySAM(rho=RHO),
        "esam": lambda: ESAM(rho=RHO, seed=1),
        "multi_step_sam": lambda: MultiStepSAM(rho=RHO, adversary=torch.optim.Adam, normalize=False, reset_state=False),
    }[name]

    def build() -> tuple[nn.Module, nn.Module, TransformingOptimizer]:
        model = _make_model()
        ddp_model = DistributedDataParallel(model)
        optimizer = TransformingOptimizer(
            ddp_model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, transforms=[make()],
            first_pass_context=ddp_model.no_sync,
        )
        return model, ddp_model, optimizer

    def train(ddp_model: nn.Module, optimizer: TransformingOptimizer, steps: range) -> None:
        for step in steps:  # rank 0 perturbs nothing at step 0: ESAM draws no mask there
            optimizer.step(_closure_with_a_rank_0_fault(optimizer, ddp_model, step, rank, 0.0))

    model, ddp_model, optimizer = build()
    train(ddp_model, optimizer, range(2))
    weights, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train(ddp_model, optimizer, range(2, 4))
    resumed_model, resumed_ddp_model, resumed = build()
    resumed_model.load_state_dict(weights)
    resumed.load_state_dict(saved)
    train(resumed_ddp_model, resumed, range(2, 4))
    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))
    return same, saved


def _worker(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        results = {mode: _train_ddp(rank, **flags) for mode, flags in MODES.items()}
        results["first_pass_mixers"] = {
            (name, loop, bucket_view): _train_ddp(
                rank, _first_pass_mixer(name), two_call=loop == "two_call", bucket_view=bucket_view
            )
            for name in FIRST_PASS_MIXERS
            for loop in LOOPS
            for bucket_view in (False, True)
        }
        results["partly_used"] = {(name, loop): _train_partly_used(rank, name, loop) for name in PARTLY_USED for loop in LOOPS}
        results["faults"] = {fault: _train_m_sharpness_with_a_local_fault(rank, fault) for fault in ("non_finite", "zero", "overflow")}
        results["resume"] = {name: _resume_m_sharpness_from_this_ranks_checkpoint(rank, name) for name in RESUMED}
        # Free reference cycles (optimizers, DDP/FSDP modules) that still hold the process group
        # while it is alive: destroyed at interpreter exit instead, gloo's threads can abort a rank
        # that has finished (as benchmarks/distributed.py does).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


# -- single-process references ---------------------------------------------------------------------
def _reference_global_batch(transform: Transform | None = None) -> list[torch.Tensor]:
    """One process, the global batch, the same optimizer (with ``transform``, SAM by default)."""
    from samgria import SAM, TransformingOptimizer

    model = _make_model()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM,
        transforms=[SAM(rho=RHO) if transform is None else transform],
    )
    for step in range(STEPS):
        x, y = _global_batch(step)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = _loss(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def _reference_m_sharpness() -> list[torch.Tensor]:
    """Hand-written m-sharpness SAM with momentum SGD (float64, no samgria code)."""
    model = _make_model()
    weights = [p.detach().clone() for p in model.parameters()]
    names = [name for name, _ in model.named_parameters()]
    buffers: list[torch.Tensor] | None = None

    def local_grad(at: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        params = {name: w.clone().requires_grad_(True) for name, w in zip(names, at)}
        loss = _loss(torch.func.functional_call(model, params, (x,)), y)
        return list(torch.autograd.grad(loss, list(params.values())))

    for step in range(STEPS):
        averaged = [torch.zeros_like(w) for w in weights]
        for rank in range(WORLD_SIZE):
            x, y = _local_batch(step, rank)
            g = local_grad(weights, x, y)
            norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
            perturbed = [w + RHO * gi / norm for w, gi in zip(weights, g)]
            for total, h in zip(averaged, local_grad(perturbed, x, y)):
                total += h / WORLD_SIZE
        if buffers is None:
            buffers = [g.clone() for g in averaged]
        else:
            buffers = [MOMENTUM * b + g for b, g in zip(buffers, averaged)]
        weights = [w - LR * b for w, b in zip(weights, buffers)]
    return weights


# -- the test --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, list[torch.Tensor]]]:
    skip_without_gloo()
    out_dir = tmp_path_factory.mktemp("ddp")
    run_ranks(__file__, WORLD_SIZE, ["--out", str(out_dir)])
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_replicas_stay_identical(ddp_results: list[dict], mode: str) -> None:
    for rank0, rank1 in zip(ddp_results[0][mode], ddp_results[1][mode]):
        assert torch.equal(rank0, rank1)


@pytest.mark.parametrize("mode", ["synced", "two_call", "bucket_view"])
def test_ddp_sam_equals_one_process_on_the_global_batch(ddp_results: list[dict], mode: str) -> None:
    reference = _reference_global_batch()
    _assert_all_close(ddp_results[0][mode], reference)
    assert not torch.equal(reference[0], _make_model()[0].weight), "it trained"


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name", FIRST_PASS_MIXERS)
def test_first_pass_mixers_under_gradient_as_bucket_view_equal_the_run_without(
    ddp_results: list[dict], name: str, loop: str
) -> None:
    """With ``gradient_as_bucket_view`` the second backward writes into the buckets that hold the
    first pass's gradients (and ``.grad`` points there): GSAM, WSAM and LookSAM, which use those
    gradients after it, must give the weights of the run without bucket views and of one process
    on the global batch (to rounding: reductions over a bucket's unaligned views may round
    otherwise), the same on every rank. LookSAM(k=2) also takes a step in between, whose
    gradients the two-call loop puts back after the second backward."""
    reference = _reference_global_batch(_first_pass_mixer(name))
    for rank in range(WORLD_SIZE):
        results = ddp_results[rank]["first_pass_mixers"]
        bucketed = results[name, loop, True]
        _assert_all_close(bucketed, results[name, loop, False])
        _assert_all_close(bucketed, reference)
        for a, b in zip(bucketed, ddp_results[0]["first_pass_mixers"][name, loop, True]):
            assert torch.equal(a, b), f"rank {rank} differs from rank 0"
    assert not torch.equal(reference[0], _make_model()[0].weight), "it trained"


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name", PARTLY_USED)
def test_parameters_with_a_gradient_on_some_ranks_only_train_as_one_process(
    ddp_results: list[dict], name: str, loop: str
) -> None:
    """``find_unused_parameters=True``: rank 1 does not use the branch (DDP averages its gradient
    with rank 1's zero), the frozen layer has no gradient and the unused layer none on any rank.
    The replicas stay identical and equal one process on the mean of both ranks' losses; the
    branch trains, the frozen and unused layers keep their weights."""
    reference = _train_partly_used(None, name, loop)
    for rank in range(WORLD_SIZE):
        weights = ddp_results[rank]["partly_used"][name, loop]
        _assert_all_close(weights, reference)
        for a, b in zip(weights, ddp_results[0]["partly_used"][name, loop]):
            assert torch.equal(a, b), f"rank {rank} differs from rank 0"
    initial = dict(_PartlyUsed().named_parameters())
    trained = dict(zip(initial, reference))
    assert not torch.equal(trained["branch.weight"], initial["branch.weight"]), "the branch trained"
    for key in ("frozen.weight", "frozen.bias", "unused.weight", "unused.bias"):
        assert torch.equal(trained[key], initial[key]), key


def test_no_sync_first_pass_is_m_sharpness(ddp_results: list[dict]) -> None:
    _assert_all_close(ddp_results[0]["no_sync"], _reference_m_sharpness())
    # ... which is not the synced update: each replica perturbed with its own gradient.
    differences = [(a - b).abs().max() for a, b in zip(ddp_results[0]["no_sync"], ddp_results[0]["synced"])]
    assert max(differences) > 1e-6


def test_m_sharpness_with_a_non_finite_local_gradient_on_one_rank_skips_on_every_rank(ddp_results: list[dict]) -> None:
    """Each rank judges its own first-pass gradient; all must skip together (one rank running the
    second pass alone would pair its all-reduce with the next step's)."""
    for rank in range(WORLD_SIZE):
        weights, skipped = ddp_results[rank]["faults"]["non_finite"]
        assert skipped == 1, f"rank {rank} skipped {skipped} steps"
    for rank0, rank1 in zip(ddp_results[0]["faults"]["non_finite"][0], ddp_results[1]["faults"]["non_finite"][0]):
        assert torch.equal(rank0, rank1)


def test_m_sharpness_where_a_transform_overflows_the_synchronised_gradients_skips_on_every_rank(ddp_results: list[dict]) -> None:
    """Rank 0 perturbs nothing at step 0, rank 1 perturbs; ScaleGrad after SAM overflows the
    synchronised gradients. Rank 1 judged them right after ScaleGrad and skipped, while rank 0
    waited in the ranks' agreement that follows its own synchronised backward: the collectives
    paired wrongly (a hang or a mismatch). Every rank now judges them after the agreement."""
    for rank in range(WORLD_SIZE):
        skipped = ddp_results[rank]["faults"]["overflow"][1]
        assert skipped == 1, f"rank {rank} skipped {skipped} steps"
    for rank0, rank1 in zip(ddp_results[0]["faults"]["overflow"][0], ddp_results[1]["faults"]["overflow"][0]):
        assert torch.equal(rank0, rank1)


def test_m_sharpness_where_one_rank_perturbs_nothing_keeps_the_replicas_identical(ddp_results: list[dict]) -> None:
    """Rank 0's zero local gradient perturbs nothing, rank 1 perturbs: ClipGradNorm (before SAM)
    must not be applied to the synchronised gradient on rank 0 only."""
    weights = [ddp_results[rank]["faults"]["zero"][0] for rank in range(WORLD_SIZE)]
    assert all(ddp_results[rank]["faults"]["zero"][1] == 0 for rank in range(WORLD_SIZE))
    for rank0, rank1 in zip(*weights):
        assert torch.equal(rank0, rank1)


def _tensors(tree: object) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in _tensors(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


@pytest.mark.parametrize("name", RESUMED)
def test_m_sharpness_resumes_bitwise_from_each_ranks_own_checkpoint(ddp_results: list[dict], name: str) -> None:
    """FriendlySAM's average of the first-pass gradients, ESAM's random stream on a rank that
    perturbed nothing, and the state of MultiStepSAM's adversary with ``reset_state=False``
    (its moments of the first-pass gradients) are each rank's own under m-sharpness
    (documented): the ranks' saved states differ, and each rank resumes bit for bit from its own."""
    for rank in range(WORLD_SIZE):
        assert ddp_results[rank]["resume"][name][0], f"rank {rank} did not resume bit for bit"
    states = [_tensors(ddp_results[rank]["resume"][name][1]["state"]) for rank in range(WORLD_SIZE)]
    assert len(states[0]) == len(states[1]) > 0
    assert not all(torch.equal(a, b) for a, b in zip(*states))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one DDP rank of tests/test_optim_distributed.py")
    parser.add_argument("--out", required=True)
    _worker(parser.parse_args().out)
