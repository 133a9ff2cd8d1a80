"""Tests for samgria.data.sharding and the samplers' shares and states (one process)."""

from __future__ import annotations

import pytest
import torch

from samgria import DistributedTaskSampler, FewShotSampler, SinusoidTaskSampler, Task, TaskSampler
from samgria.data.sharding import sample_shard, shard_bounds
from samgria.data.task import load_sampler_state_dict, sampler_state_dict

FIELDS = ("support_x", "support_y", "query_x", "query_y")


def same_tasks(a: list[Task], b: list[Task]) -> bool:
    return len(a) == len(b) and all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b) for f in FIELDS)


def few_shot_data() -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.randn(80, 2, generator=torch.Generator().manual_seed(0))
    return inputs, torch.arange(80) % 8


def few_shot(seed: int | None = 3, **kwargs) -> FewShotSampler:
    return FewShotSampler(*few_shot_data(), 3, 2, 2, seed=seed, **kwargs)


def sinusoid(seed: int | None = 3) -> SinusoidTaskSampler:
    return SinusoidTaskSampler(k_support=4, k_query=3, seed=seed, dtype=torch.float64)


class PlainSampler:
    """A sampler with only ``sample(n)`` (no sample_shard, no state)."""

    def __init__(self, seed: int) -> None:
        self.inner = sinusoid(seed)

    def sample(self, n: int) -> list[Task]:
        return self.inner.sample(n)


class NoisySinusoid(SinusoidTaskSampler):
    """Draws its tasks in ``sample`` differently from the class that wrote ``sample_shard``."""

    def sample(self, n: int) -> list[Task]:
        noise = lambda t: 0.1 * torch.randn(t.shape, generator=self.generator, dtype=t.dtype)  # noqa: E731
        return [Task(t.support_x, t.support_y + noise(t.support_y), t.query_x, t.query_y) for t in super().sample(n)]


class RelabelledFewShot(FewShotSampler):
    def sample_with_classes(self, n: int) -> tuple[list[Task], torch.Tensor]:
        tasks, classes = super().sample_with_classes(n)
        flipped = [Task(t.support_x, t.support_y.flip(0), t.query_x, t.query_y.flip(0)) for t in tasks]
        return flipped, classes


def noisy_sinusoid(seed: int = 3) -> NoisySinusoid:
    return NoisySinusoid(k_support=4, k_query=3, seed=seed, dtype=torch.float64)


def relabelled_few_shot(seed: int = 3) -> RelabelledFewShot:
    inputs = torch.randn(80, 2, generator=torch.Generator().manual_seed(0))
    return RelabelledFewShot(inputs, torch.arange(80) % 8, 3, 2, 2, seed=seed)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 4, 5, 7, 12])
def test_shares_are_torch_tensor_split(n: int, world_size: int) -> None:
    expected = torch.tensor_split(torch.arange(n), world_size)
    for rank in range(world_size):
        start, stop = shard_bounds(n, rank, world_size)
        assert list(range(start, stop)) == expected[rank].tolist()


@pytest.mark.parametrize(
    "make",
    [few_shot, sinusoid, lambda: PlainSampler(3), noisy_sinusoid, relabelled_few_shot],
    ids=["few_shot", "sinusoid", "plain", "subclass-sample", "subclass-sample_with_classes"],
)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shares_concatenate_to_the_one_process_batch_and_advance_the_stream_alike(make, world_size: int) -> None:
    """Also for a subclass that draws its own way: the parent's sample_shard (built from its
    private helpers) took the shares, so the ranks trained on the parent's tasks."""
    whole = make()
    batches = [whole.sample(5), whole.sample(3)]
    for rank in range(world_size):
        sampler = DistributedTaskSampler(make(), rank=rank, world_size=world_size)
        for batch in batches:
            start, stop = shard_bounds(len(batch), rank, world_size)
            assert same_tasks(sampler.sample(len(batch)), batch[start:stop])


@pytest.mark.parametrize("make", [few_shot, sinusoid], ids=["few_shot", "sinusoid"])
def test_sample_shard_equals_slicing_sample_bit_for_bit(make) -> None:
    reference, sharded = make(), make()
    tasks = reference.sample(7)
    assert same_tasks(sharded.sample_shard(7, 1, 3), tasks[3:5])
    assert same_tasks(sharded.sample(2), reference.sample(2))  # the stream advanced alike


def test_few_shot_shard_gathers_only_its_own_examples() -> None:
    class CountingInputs(torch.Tensor):
        gathered = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.__getitem__:
                cls.gathered += 1
            return super().__torch_function__(func, types, args, kwargs or {})

    sampler = few_shot()
    sampler.inputs = sampler.inputs.as_subclass(CountingInputs)
    sampler.sample_shard(6, 0, 3)
    assert CountingInputs.gathered == 2 * 2  # 2 tasks of the share, support and query each


def test_distributed_task_sampler_shards_any_sequence_and_is_a_task_sampler() -> None:
    sampler = DistributedTaskSampler(sinusoid(), rank=1, world_size=3)
    assert isinstance(sampler, TaskSampler)
    assert sampler.shard(list("abcdefg")) == ["d", "e"]
    assert sampler.bounds(7) == (3, 5)
    assert "rank=1, world_size=3" in repr(sampler)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 2, "world_size": 2}, ValueError, r"rank must be an integer in \[0, 1\] \(world_size=2\), got 2"),
        ({"rank": -1, "world_size": 2}, ValueError, r"rank must be an integer >= 0, got -1"),
        ({"rank": 0, "world_size": 0}, ValueError, r"world_size must be an integer >= 1, got 0"),
        ({"rank": 0.0, "world_size": 2}, TypeError, r"rank must be an integer >= 0, got 0.0"),
        ({"rank": 0, "world_size": True}, TypeError, r"world_size must be an integer >= 1, got True"),
        ({"rank": None, "world_size": 2}, ValueError, r"rank=None and world_size=None are read from torch.distributed"),
    ],
)
def test_distributed_task_sampler_rejects_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        DistributedTaskSampler(sinusoid(), **kwargs)


def test_distributed_task_sampler_needs_a_sampler() -> None:
    with pytest.raises(TypeError, match=r"sampler must have a sample\(n\) -> list\[Task\] method, got list$"):
        DistributedTaskSampler([], rank=0, world_size=1)
    with pytest.raises(TypeError, match=r"sampler must have a sample\(n\) -> list\[Task\] method, got the class SinusoidTaskSampler$"):
        DistributedTaskSampler(SinusoidTaskSampler, rank=0, world_size=1)


def test_a_sampler_returning_the_wrong_count_is_named() -> None:
    class Short:
        def sample(self, n):
            return sinusoid().sample(n - 1)

    class ShortShard(Short):
        def sample_shard(self, n, rank, world_size):
            return sinusoid().sample(n)

    with pytest.raises(ValueError, match=r"sampler.sample\(4\) returned 3 tasks"):
        sample_shard(Short(), 4, 0, 2)
    with pytest.raises(ValueError, match=r"sampler.sample_shard\(4, 0, 2\) returned 4 tasks, expected 2"):
        sample_shard(ShortShard(), 4, 0, 2)


@pytest.mark.parametrize("make", [few_shot, sinusoid], ids=["few_shot", "sinusoid"])
def test_sampler_state_round_trips_through_torch_save(make, tmp_path) -> None:
    sampler = make()
    sampler.sample(3)
    torch.save(sampler.state_dict(), tmp_path / "state.pt")
    ahead = sampler.sample(4)
    resumed = make(seed=99)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert same_tasks(resumed.sample(4), ahead)


@pytest.mark.parametrize("make", [few_shot, sinusoid], ids=["few_shot", "sinusoid"])
def test_sampler_state_must_match_the_kind_of_generator(make) -> None:
    with_generator, global_generator = make(), make(seed=None)
    assert global_generator.state_dict() == {"generator": None}
    with pytest.raises(ValueError, match=r"state\['generator'\] must match the sampler, which uses torch's global generator"):
        global_generator.load_state_dict(with_generator.state_dict())
    with pytest.raises(ValueError, match=r"which uses a generator of its own; got None"):
        with_generator.load_state_dict(global_generator.state_dict())
    with pytest.raises(TypeError, match=r"state must be a dict with a 'generator' entry"):
        with_generator.load_state_dict({"seed": 3})


def test_state_helpers_cover_samplers_with_a_generator_attribute_or_nothing() -> None:
    class WithGenerator:
        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(1)

        def sample(self, n):
            return [torch.rand(1, generator=self.generator) for _ in range(n)]

    sampler = WithGenerator()
    state = sampler_state_dict(sampler)
    ahead = sampler.sample(2)
    load_sampler_state_dict(sampler, state)
    assert sampler.sample(2) == ahead
    assert sampler_state_dict(PlainSampler(0)) is None
    load_sampler_state_dict(PlainSampler(0), None)  # nothing to restore
    with pytest.raises(ValueError, match=r"sampler must have load_state_dict or a torch.Generator 'generator'"):
        load_sampler_state_dict(PlainSampler(0), {"generator": None})
    wrapped = DistributedTaskSampler(sinusoid(), rank=0, world_size=2)
    saved = wrapped.state_dict()
    ahead = wrapped.sample(4)
    wrapped.load_state_dict(saved)
    assert same_tasks(wrapped.sample(4), ahead)


@pytest.mark.parametrize("make", [few_shot, sinusoid], ids=["few_shot", "sinusoid"])
def test_a_sampler_on_the_global_generator_is_refused_for_several_ranks(make) -> None:
    """torch's DistributedSampler always has a seed: the ranks' global random streams drift apart
    (dropout draws per task), so their shares would come from different batches. One rank is fine."""
    message = (
        r"^sampler must draw from a generator of its own when it is shared by 2 ranks, got a "
        r"(FewShotSampler|SinusoidTaskSampler) that draws from torch's global generator \(generator=None\)"
    )
    with pytest.raises(ValueError, match=message):
        DistributedTaskSampler(make(seed=None), rank=1, world_size=2)
    DistributedTaskSampler(make(seed=None), rank=0, world_size=1)
    DistributedTaskSampler(PlainSampler(0), rank=1, world_size=2)  # no generator attribute: not asked



def test_a_sampler_given_torchs_global_generator_itself_is_refused_for_several_ranks() -> None:
    """generator=torch.default_generator is torch's global stream under another name: the ranks'
    copies drift apart as with generator=None, and each rank took its share of another batch."""
    inputs, labels = torch.randn(80, 2), torch.arange(80) % 8
    for sampler in (
        FewShotSampler(inputs, labels, 3, 2, 2, generator=torch.default_generator),
        SinusoidTaskSampler(generator=torch.default_generator),
    ):
        message = (
            rf"^sampler must draw from a generator of its own when it is shared by 2 ranks, got a "
            rf"{type(sampler).__name__} that draws from torch's global generator "
            r"\(generator=torch.default_generator\)"
        )
        with pytest.raises(ValueError, match=message):
            DistributedTaskSampler(sampler, rank=1, world_size=2)
        DistributedTaskSampler(sampler, rank=0, world_size=1)


def test_a_distributed_task_sampler_of_several_ranks_is_refused_as_the_sampler_naming_the_fix() -> None:
    """Its sample(n) returns a share of n tasks, so a second one wrapped around it (the ranks, then
    DataLoader workers in each) failed at its first sample with 'sampler.sample(8) returned 4 tasks'."""
    inner = DistributedTaskSampler(sinusoid(), rank=1, world_size=2)
    message = (
        r"^sampler must not be a DistributedTaskSampler of several ranks \(rank 1 of 2\), whose sample\(n\) "
        r"returns a share of n tasks, got DistributedTaskSampler\(SinusoidTaskSampler\(.*rank=1, world_size=2\); "
        r"wrap its sampler once, with rank=rank \* K \+ k and world_size=world_size \* K for K shares of each rank's"
    )
    with pytest.raises(ValueError, match=message):
        DistributedTaskSampler(inner, rank=0, world_size=2)
    one = DistributedTaskSampler(sinusoid(), rank=0, world_size=1)  # sample(n) is all n tasks: fine
    assert same_tasks(DistributedTaskSampler(one, rank=1, world_size=2).sample(4), sinusoid().sample(4)[2:])


@pytest.mark.parametrize("make", [few_shot, sinusoid], ids=["few_shot", "sinusoid"])
def test_a_default_device_other_than_the_cpu_draws_the_same_tasks_on_the_cpu(make) -> None:
    """Under ``with torch.device(...)`` (or set_default_device) torch's factories build on that
    device: the few-shot sampler drew its indices there from its CPU generator (torch refuses that
    generator on CUDA, "Expected a 'cuda' device type for generator"; "meta", the stand-in here,
    has no numbers at all), and a range check built its probe there. Both draw on the CPU."""
    data = few_shot_data()  # the data set stays on the CPU: only the sampler is built under "meta"
    build = (lambda: FewShotSampler(*data, 3, 2, 2, seed=3)) if make is few_shot else make
    reference = build()
    expected, expected_classes = reference.sample(3), getattr(reference, "classes", None)
    with torch.device("meta"):
        sampler = build()
        tasks = sampler.sample(3)
        empty = sampler.sample_with_classes(0)[1] if expected_classes is not None else None
    assert same_tasks(tasks, expected)
    assert all(getattr(t, f).device.type == "cpu" for t in tasks for f in FIELDS)
    if expected_classes is not None:  # the class labels, and those of no task, stay on the CPU too
        assert torch.equal(sampler.classes, expected_classes) and sampler.classes.device.type == "cpu"
        assert empty.device.type == "cpu" and empty.shape == (0, 3)

class TaskStream(torch.utils.data.IterableDataset):
    """The meta guide's recipe: each DataLoader worker keeps its share of every global meta-batch."""

    def __init__(self, sampler: TaskSampler, meta_batch_size: int, batches: int) -> None:
        self.sampler, self.meta_batch_size, self.batches = sampler, meta_batch_size, batches

    def __iter__(self):
        sampler, info = self.sampler, torch.utils.data.get_worker_info()
        if info is not None:
            sampler = DistributedTaskSampler(sampler, rank=info.id, world_size=info.num_workers)
        for _ in range(self.batches):
            yield from sampler.sample(self.meta_batch_size)


@pytest.mark.parametrize("make", [sinusoid, few_shot], ids=["sinusoid", "few-shot"])
def test_dataloader_workers_sharing_a_seeded_sampler_draw_the_one_process_stream_disjointly(make) -> None:
    """Worker processes hold copies of one seeded generator, so each drew the same tasks; with the
    documented recipe (the worker id as DistributedTaskSampler's rank) they draw disjoint shares
    that together are the one-process stream."""
    loader = torch.utils.data.DataLoader(TaskStream(make(), 4, 3), batch_size=None, num_workers=2)
    drawn = list(loader)
    reference = make()
    expected = [task for _ in range(3) for task in reference.sample(4)]
    key = lambda task: tuple(task.support_x.flatten().tolist() + task.query_x.flatten().tolist())  # noqa: E731
    assert len(drawn) == 12 and len({key(task) for task in drawn}) == 12
    assert sorted(map(key, drawn)) == sorted(map(key, expected))
    by_key = {key(task): task for task in expected}
    assert all(same_tasks([task], [by_key[key(task)]]) for task in drawn)


@pytest.mark.parametrize("make", [few_shot, sinusoid], ids=["few_shot", "sinusoid"])
def test_a_state_torch_refuses_is_refused_naming_it_and_the_stream_is_kept(make) -> None:
    """A 1-D uint8 tensor that is no state of the sampler's generator (another kind of
    generator's, a corrupt one) raised torch's bare RuntimeError."""
    sampler = make()
    reference = make()
    for bad, reason in ((torch.zeros(16, dtype=torch.uint8), "size"), (torch.zeros(5056, dtype=torch.uint8), "mt19937")):
        with pytest.raises(ValueError, match=rf"^state\['generator'\] must be a state of the sampler's cpu generator, "
                           rf"got a state torch refuses \(torch: .*{reason}"):
            sampler.load_state_dict({"generator": bad})
    assert same_tasks(sampler.sample(3), reference.sample(3))


def test_shard_refuses_items_that_are_not_a_sequence_naming_items() -> None:
    sampler = DistributedTaskSampler(sinusoid(), rank=0, world_size=2)
    with pytest.raises(TypeError, match=r"^items must be a sequence, got int$"):
        sampler.shard(5)
    assert sampler.shard(range(5)) == [0, 1, 2]
