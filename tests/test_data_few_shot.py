"""Tests for samgria.data.few_shot.FewShotSampler."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samgria.data import FewShotSampler, Task, TaskSampler
from samgria.meta.maml import MAML
from samgria.meta.trainer import MetaTrainer


def make_data(num_classes: int = 6, per_class: int = 8, features: int = 3):
    """Inputs whose first feature encodes (label, example number), so tasks can be decoded."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    index = torch.arange(num_classes * per_class, dtype=torch.float32)
    inputs = torch.stack([index] + [torch.randn(num_classes * per_class) for _ in range(features - 1)], 1)
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))
    return inputs[perm], labels[perm]


def test_shapes_dtypes_and_protocol():
    inputs, labels = make_data()
    sampler = FewShotSampler(inputs, labels, n_way=3, k_shot=2, k_query=4, seed=0)
    assert isinstance(sampler, TaskSampler)
    tasks = sampler.sample(5)
    assert len(tasks) == 5
    for task in tasks:
        assert task.support_x.shape == (6, 3) and task.support_y.shape == (6,)
        assert task.query_x.shape == (12, 3) and task.query_y.shape == (12,)
        assert task.support_y.dtype == torch.long


def test_labels_are_remapped_consistently_and_examples_are_distinct():
    inputs, labels = make_data()
    label_of_index = {int(x): int(y) for x, y in zip(inputs[:, 0], labels)}
    sampler = FewShotSampler(inputs, labels, n_way=4, k_shot=3, k_query=2, seed=1)
    tasks, classes = sampler.sample_with_classes(20)
    assert classes.shape == (20, 4)
    for task, row in zip(tasks, classes.tolist()):
        assert len(set(row)) == 4  # distinct classes
        # Every remapped label counts k examples per split.
        assert torch.bincount(task.support_y, minlength=4).tolist() == [3] * 4
        assert torch.bincount(task.query_y, minlength=4).tolist() == [2] * 4
        # The example's original label is the class the remapped label stands for.
        for x, y in ((task.support_x, task.support_y), (task.query_x, task.query_y)):
            for index, new_label in zip(x[:, 0].tolist(), y.tolist()):
                assert label_of_index[int(index)] == row[new_label]
        # No example is used twice within a task.
        used = torch.cat([task.support_x[:, 0], task.query_x[:, 0]])
        assert used.unique().numel() == used.numel()


def test_label_assignment_is_random_across_tasks():
    inputs, labels = make_data()
    _, classes = FewShotSampler(inputs, labels, n_way=2, k_shot=1, k_query=1, seed=2).sample_with_classes(60)
    # Both orders of a pair occur, so label 0 is not always the smaller class.
    assert (classes[:, 0] < classes[:, 1]).any() and (classes[:, 0] > classes[:, 1]).any()


def test_all_classes_get_drawn():
    inputs, labels = make_data()
    _, classes = FewShotSampler(inputs, labels, n_way=2, k_shot=1, k_query=1, seed=3).sample_with_classes(100)
    assert set(classes.flatten().tolist()) == set(range(6))


def test_all_examples_of_a_class_get_drawn():
    # Each task draws its k_shot + k_query examples of a class at random from all of them, not
    # the same first ones every time.
    inputs, labels = make_data()  # 8 examples per class
    tasks = FewShotSampler(inputs, labels, n_way=6, k_shot=1, k_query=1, seed=5).sample(100)
    used = torch.cat([torch.cat([task.support_x[:, 0], task.query_x[:, 0]]) for task in tasks])
    assert set(used.long().tolist()) == set(range(48))


def test_class_subset_restricts_tasks():
    inputs, labels = make_data()
    sampler = FewShotSampler(inputs, labels, n_way=2, k_shot=1, k_query=1, classes=[1, 4, 5], seed=4)
    _, classes = sampler.sample_with_classes(30)
    assert set(classes.flatten().tolist()) <= {1, 4, 5}
    assert sampler.classes.tolist() == [1, 4, 5]


def test_seed_reproducible():
    inputs, labels = make_data()
    a = FewShotSampler(inputs, labels, 3, 1, 2, seed=5).sample(2)
    b = FewShotSampler(inputs, labels, 3, 1, 2, generator=torch.Generator().manual_seed(5)).sample(2)
    for ta, tb in zip(a, b):
        assert torch.equal(ta.support_x, tb.support_x) and torch.equal(ta.query_y, tb.query_y)


def test_small_classes_error_or_are_dropped_with_warning():
    inputs, labels = make_data(num_classes=4, per_class=5)
    keep = ~((labels == 2) & (torch.arange(labels.numel()) % 2 == 0))  # class 2 loses examples
    inputs, labels = inputs[keep], labels[keep]
    small = int((labels == 2).sum())
    with pytest.raises(ValueError, match=rf"fewer than k_shot \+ k_query = 5 examples: 2 \({small}\)"):
        FewShotSampler(inputs, labels, n_way=2, k_shot=2, k_query=3)
    with pytest.warns(UserWarning, match=r"they are skipped"):
        sampler = FewShotSampler(inputs, labels, n_way=2, k_shot=2, k_query=3, drop_small_classes=True, seed=0)
    assert 2 not in sampler.classes.tolist()
    _, classes = sampler.sample_with_classes(20)
    assert 2 not in classes.flatten().tolist()


def test_classes_may_be_label_tensors_and_drop_small_classes_a_numpy_bool():
    inputs, labels = make_data()
    picked = [labels[0], labels[1], labels[2]]  # one-element tensors, as indexing labels gives
    sampler = FewShotSampler(inputs, labels, 2, 1, 1, classes=picked, seed=0)
    assert sampler.classes.tolist() == sorted({int(label) for label in picked})
    assert FewShotSampler(inputs, labels, 2, 1, 1, drop_small_classes=np.True_).classes.tolist() == list(range(6))


def test_too_many_ways():
    inputs, labels = make_data(num_classes=3)
    with pytest.raises(ValueError, match=r"n_way must be <= the number of usable classes \(3\), got 4"):
        FewShotSampler(inputs, labels, n_way=4, k_shot=1, k_query=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_way": 0}, ValueError, r"n_way must be an integer >= 1, got 0"),
        ({"k_shot": 0}, ValueError, r"k_shot must be an integer >= 1, got 0"),
        ({"k_query": -1}, ValueError, r"k_query must be an integer >= 0, got -1"),
        ({"n_way": 2.0}, TypeError, r"n_way must be an integer >= 1, got 2\.0"),
        ({"classes": [0, 99]}, ValueError, r"classes contains labels that do not occur in labels: \[99\]"),
        ({"seed": 0, "generator": torch.Generator()}, ValueError, r"either generator or seed"),
        ({"seed": 2**64}, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\], got 18446744073709551616$"),
        ({"drop_small_classes": "no"}, TypeError, r"drop_small_classes must be a bool, got 'no'$"),
        ({"drop_small_classes": 0}, TypeError, r"drop_small_classes must be a bool, got 0$"),
        ({"classes": [True, 2]}, TypeError, r"classes\[0\] must be an integer, got True$"),
        ({"classes": [1, 2.0]}, TypeError, r"classes\[1\] must be an integer, got 2\.0$"),
        ({"classes": {1, 2}}, TypeError, r"classes must be a sequence or tensor of integer labels, got \{1, 2\}$"),
        ({"classes": "12"}, TypeError, r"classes must be a sequence or tensor of integer labels, got '12'$"),
        ({"classes": torch.tensor([1.0, 2.0])}, TypeError, r"classes must hold integer labels, got a tensor of dtype torch\.float32$"),
        ({"classes": torch.tensor([True, False])}, TypeError, r"classes must hold integer labels, got a tensor of dtype torch\.bool$"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    inputs, labels = make_data()
    args = {"n_way": 2, "k_shot": 1, "k_query": 1, **kwargs}
    with pytest.raises(error, match=match):
        FewShotSampler(inputs, labels, **args)


def test_bad_data():
    inputs, labels = make_data()
    with pytest.raises(TypeError, match=r"labels must be an integer tensor, got dtype torch.float32"):
        FewShotSampler(inputs, labels.float(), 2, 1, 1)
    with pytest.raises(TypeError, match=r"inputs must be a torch.Tensor, got list"):
        FewShotSampler([1, 2], labels, 2, 1, 1)
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor, got list"):
        FewShotSampler(inputs, [1, 2], 2, 1, 1)
    with pytest.raises(ValueError, match=r"labels must be 1-D, got shape \(48, 1\)"):
        FewShotSampler(inputs, labels[:, None], 2, 1, 1)
    with pytest.raises(ValueError, match=r"same number of examples, got inputs of shape \(47, 3\) and labels of shape \(48,\)"):
        FewShotSampler(inputs[:-1], labels, 2, 1, 1)
    sampler = FewShotSampler(inputs, labels, 2, 1, 1)
    with pytest.raises(ValueError, match=r"n must be an integer >= 0, got -1"):
        sampler.sample(-1)


def test_zero_tasks_and_no_warning_when_all_classes_fit():
    inputs, labels = make_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tasks, classes = FewShotSampler(inputs, labels, 2, 1, 1, seed=0).sample_with_classes(0)
    assert tasks == [] and classes.shape == (0, 2)
    assert "n_way=2" in repr(FewShotSampler(inputs, labels, 2, 1, 1))


def test_tasks_drive_a_meta_learner_with_cross_entropy():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 4, generator=g) * 3
    labels = torch.arange(8).repeat_interleave(10)
    inputs = centers[labels] + 0.3 * torch.randn(80, 4, generator=g)
    sampler = FewShotSampler(inputs, labels, n_way=3, k_shot=2, k_query=3, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    trainer = MetaTrainer(MAML(model, torch.optim.Adam, lr=1e-2, inner_lr=0.5), F.cross_entropy, sampler)
    tasks = sampler.sample(10)
    expected = sum(F.cross_entropy(model(t.query_x), t.query_y).item() for t in tasks) / 10
    assert trainer.evaluate(tasks, steps=0) == pytest.approx(expected, rel=1e-5)
    # Labels are remapped per task, so only adaptation can separate the classes.
    before = trainer.evaluate(tasks)
    trainer.fit(10, 4, progress=False)
    assert trainer.evaluate(tasks) < before


# ------------------------------------------------------------------ NumPy integers
np = pytest.importorskip("numpy")


@pytest.mark.parametrize("integer", [np.int64, np.int32, np.uint16])
def test_numpy_integers_are_accepted_wherever_an_int_is_and_give_the_same_tasks(integer):
    inputs, labels = make_data()
    reference = FewShotSampler(inputs, labels, n_way=3, k_shot=2, k_query=1, seed=5)
    sampler = FewShotSampler(
        inputs, labels, n_way=integer(3), k_shot=integer(2), k_query=integer(1), seed=integer(5)
    )
    assert (type(sampler.n_way), type(sampler.k_shot), type(sampler.k_query)) == (int, int, int)
    assert repr(sampler) == repr(reference)
    tasks, classes = sampler.sample_with_classes(integer(4))
    expected, expected_classes = reference.sample_with_classes(4)
    assert len(tasks) == 4 and classes.shape == (4, 3)
    assert torch.equal(classes, expected_classes)
    for task, ref in zip(tasks, expected):
        for field in ("support_x", "support_y", "query_x", "query_y"):
            assert torch.equal(getattr(task, field), getattr(ref, field))
    assert len(sampler.sample(integer(2))) == 2
    assert sampler.sample(integer(0)) == []
    empty_tasks, empty_classes = sampler.sample_with_classes(integer(0))
    assert empty_tasks == [] and empty_classes.shape == (0, 3)


def test_numpy_classes_array_and_zero_query_points():
    inputs, labels = make_data()
    sampler = FewShotSampler(
        inputs, labels, n_way=np.int64(2), k_shot=np.int64(1), k_query=np.int64(0),
        classes=np.array([1, 3, 4], dtype=np.int64), seed=np.int64(0),
    )
    assert sampler.classes.tolist() == [1, 3, 4]
    task = sampler.sample(np.int64(1))[0]
    assert task.support_x.shape == (2, 3) and task.query_x.shape == (0, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_way": np.int64(0)}, ValueError, r"n_way must be an integer >= 1, got (np\.int64\()?0"),
        ({"k_shot": np.int32(0)}, ValueError, r"k_shot must be an integer >= 1, got (np\.int32\()?0"),
        ({"k_query": np.int64(-1)}, ValueError, r"k_query must be an integer >= 0, got (np\.int64\()?-1"),
        ({"n_way": np.float64(2.0)}, TypeError, r"n_way must be an integer >= 1, got (np\.float64\()?2\.0"),
        ({"n_way": True}, TypeError, r"n_way must be an integer >= 1, got True"),
        ({"k_shot": np.bool_(True)}, TypeError, r"k_shot must be an integer >= 1, got (np\.)?True"),
        ({"k_query": 1.0}, TypeError, r"k_query must be an integer >= 0, got 1\.0"),
        ({"seed": np.float64(0.0)}, TypeError, r"seed must be an integer, got (np\.float64\()?0\.0"),
        ({"seed": False}, TypeError, r"seed must be an integer, got False"),
        ({"n_way": np.int64(7)}, ValueError, r"n_way must be <= the number of usable classes \(6\), got 7"),
    ],
)
def test_numpy_bools_floats_and_out_of_range_integers_are_rejected(kwargs, error, match):
    inputs, labels = make_data()
    args = {"n_way": 2, "k_shot": 1, "k_query": 1, **kwargs}
    with pytest.raises(error, match=match):
        FewShotSampler(inputs, labels, **args)


@pytest.mark.parametrize(
    ("n", "error", "match"),
    [
        (np.int64(-1), ValueError, r"n must be an integer >= 0, got (np\.int64\()?-1"),
        (np.float32(1.0), TypeError, r"n must be an integer >= 0, got (np\.float32\()?1\.0"),
        (np.bool_(True), TypeError, r"n must be an integer >= 0, got (np\.)?True"),
        (False, TypeError, r"n must be an integer >= 0, got False"),
    ],
)
def test_bad_numpy_task_counts_are_rejected(n, error, match):
    inputs, labels = make_data()
    sampler = FewShotSampler(inputs, labels, 2, 1, 1, seed=0)
    with pytest.raises(error, match=match):
        sampler.sample(n)
    with pytest.raises(error, match=match):
        sampler.sample_with_classes(n)


def test_labels_beyond_torch_long_are_refused_naming_them() -> None:
    """uint64 labels of 2**63 or more cannot be returned as torch.long class labels: refused with
    a message naming the label (torch's bare 'Overflow when unpacking long long' before)."""
    labels = torch.tensor([2**63 + 5] * 5 + [1] * 5, dtype=torch.uint64)
    with pytest.raises(ValueError, match=r"^labels must fit in torch\.long \(below 2\*\*63\), got 9223372036854775813$"):
        FewShotSampler(torch.randn(10, 2), labels, 2, 1, 1)
    below = torch.tensor([2**63 - 1] * 5 + [1] * 5, dtype=torch.uint64)
    sampler = FewShotSampler(torch.randn(10, 2), below, 2, 1, 1, seed=0)
    assert sorted(sampler.classes.tolist()) == [1, 2**63 - 1]


@pytest.mark.parametrize(
    ("device", "error", "match"),
    [
        ("0.5", ValueError, r"^device must be a torch\.device, a device string such as 'cuda:0' or a device index, got '0\.5' \(torch: Invalid device string: '0\.5'\)$"),
        (1.5, TypeError, r"^device must be a torch\.device, a device string such as 'cuda:0' or a device index, got 1\.5$"),
        (np.float64(0.0), TypeError, r"^device must be .*, got np\.float64\(0\.0\)$"),
        (10**400, ValueError, r"^device must be .*, got 1000+ \(torch: "),
    ],
    ids=["string", "float", "numpy-float", "huge"],
)
def test_a_device_that_torch_device_refuses_is_refused_naming_device(device, error, match):
    """torch's own errors ("Invalid device string", a long argument-list TypeError, "Overflow when
    unpacking long long") named no argument."""
    inputs, labels = make_data()
    with pytest.raises(error, match=match):
        FewShotSampler(inputs, labels, 2, 2, 1, device=device)


def test_a_device_is_taken_as_torch_device_takes_it_and_refused_where_its_backend_is_missing():
    inputs, labels = make_data()
    for device in ("cpu", torch.device("cpu"), "meta"):
        sampler = FewShotSampler(inputs, labels, 2, 2, 1, device=device, seed=0)
        assert sampler.device == torch.device(device)
        assert sampler.sample(1)[0].support_x.device == torch.device(device)
    if not torch.cuda.is_available():  # accepted before, then the first sample raised
        with pytest.raises(ValueError, match=r"^device must be a device available here, got 'cuda:9' \(CUDA is not available\)$"):
            FewShotSampler(inputs, labels, 2, 2, 1, device="cuda:9")


# ------------------------------------------------------------------ Task.to
FIELDS = ("support_x", "support_y", "query_x", "query_y")


def _as_module(task: Task) -> nn.Module:
    """The reference: the task's tensors as the buffers of a module, which nn.Module.to moves."""
    module = nn.Module()
    for field in FIELDS:
        module.register_buffer(field, getattr(task, field))
    return module


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((torch.float64,), {}),
        ((torch.float16,), {}),
        ((torch.complex64,), {}),
        (("cpu", torch.float64), {}),
        (("meta",), {}),
        ((), {"dtype": torch.bfloat16, "non_blocking": True}),
        ((torch.zeros(1, dtype=torch.float64),), {}),  # to(tensor): its dtype and device
        ((), {"memory_format": torch.channels_last}),
        ((torch.float64,), {"memory_format": torch.channels_last}),
    ],
    ids=["float64", "float16", "complex64", "device-dtype", "meta", "keywords", "like-tensor",
         "channels-last", "float64-channels-last"],
)
def test_task_to_casts_and_moves_as_module_to_does_keeping_integer_labels(args, kwargs):
    """A few-shot task's labels are class indices: task.to(torch.float64) made them float64 too,
    and cross_entropy refused them ('expected target dtype to be Long'). Task.to moves and casts
    as nn.Module.to does (dtype to the floating and complex tensors, memory_format to the 4-D and
    5-D ones, the device to all), checked against a module holding the same tensors as buffers."""
    images = torch.randn(48, 3, 4, 5)  # 4-D inputs, so memory_format has a tensor to apply to
    _, labels = make_data()
    task = FewShotSampler(images, labels, n_way=3, k_shot=2, k_query=4, seed=0).sample(1)[0]
    moved = task.to(*args, **kwargs)
    with warnings.catch_warnings():  # Module.to's note that complex modules are a new feature
        warnings.simplefilter("ignore", UserWarning)
        reference = _as_module(task).to(*args, **kwargs)
    for field in FIELDS:
        got, expected = getattr(moved, field), getattr(reference, field)
        assert (got.dtype, got.device, got.shape, got.stride()) == (
            expected.dtype, expected.device, expected.shape, expected.stride()
        ), field
        if got.device.type != "meta":
            assert torch.equal(got, expected), field
    assert moved.support_y.dtype == torch.long and moved.query_y.dtype == torch.long


def test_task_to_casts_complex_inputs_as_module_to_does():
    generator = torch.Generator().manual_seed(0)
    support_x, query_x = (torch.randn(k, 3, dtype=torch.complex64, generator=generator) for k in (6, 4))
    task = Task(support_x, torch.arange(6) % 3, query_x, torch.arange(4) % 3)
    moved = task.to(torch.complex128)
    with warnings.catch_warnings():  # Module.to's note that complex modules are a new feature
        warnings.simplefilter("ignore", UserWarning)
        reference = _as_module(task).to(torch.complex128)
    for field in FIELDS:
        got, expected = getattr(moved, field), getattr(reference, field)
        assert got.dtype == expected.dtype and torch.equal(got, expected), field
    assert moved.support_x.dtype == torch.complex128 and moved.support_y.dtype == torch.long


def test_task_to_applies_a_memory_format_to_5_d_inputs_as_module_to_does():
    generator = torch.Generator().manual_seed(0)
    support_x, query_x = (torch.randn(k, 2, 3, 4, 5, generator=generator) for k in (6, 4))  # videos, volumes
    task = Task(support_x, torch.arange(6) % 3, query_x, torch.arange(4) % 3)
    moved = task.to(torch.float64, memory_format=torch.channels_last_3d)
    reference = _as_module(task).to(torch.float64, memory_format=torch.channels_last_3d)
    for field in FIELDS:
        got, expected = getattr(moved, field), getattr(reference, field)
        assert (got.dtype, got.stride()) == (expected.dtype, expected.stride()) and torch.equal(got, expected), field
    assert moved.support_x.is_contiguous(memory_format=torch.channels_last_3d)


def test_task_to_float64_gives_tasks_that_cross_entropy_takes():
    inputs, labels = make_data()
    task = FewShotSampler(inputs, labels, n_way=3, k_shot=2, k_query=4, seed=0).sample(1)[0].to(torch.float64)
    assert task.query_x.dtype == torch.float64 and task.query_y.dtype == torch.long
    model = nn.Linear(3, 3).double()
    loss = F.cross_entropy(model(task.query_x), task.query_y)
    expected = -torch.log_softmax(model(task.query_x), 1)[torch.arange(12), task.query_y].mean()
    torch.testing.assert_close(loss, expected)


def test_task_to_copies_on_request_and_refuses_an_integer_dtype_as_module_to_does():
    inputs, labels = make_data()
    task = FewShotSampler(inputs, labels, n_way=3, k_shot=2, k_query=4, seed=0).sample(1)[0]
    same = task.to("cpu")
    assert all(getattr(same, field) is getattr(task, field) for field in FIELDS)  # as Tensor.to
    copied = task.to("cpu", copy=True)
    for field in FIELDS:
        assert torch.equal(getattr(copied, field), getattr(task, field))
        assert getattr(copied, field).data_ptr() != getattr(task, field).data_ptr()
    with pytest.raises(TypeError, match=r"^dtype must be a floating point or complex dtype .*, got torch\.int32$"):
        task.to(torch.int32)
    with pytest.raises(TypeError, match=r"^copy must be a bool, got 1$"):
        task.to("cpu", copy=1)


@pytest.mark.parametrize(
    "classes",
    [torch.tensor([[0, 1], [2, 3]]), torch.tensor(2), np.array([[0, 1], [2, 3]])],
    ids=["2-D tensor", "0-dim tensor", "2-D array"],
)
def test_classes_that_are_not_a_1d_tensor_or_array_are_refused_naming_classes(classes):
    """A tensor or array of labels was flattened: a 2-D one taken as its elements, a 0-dim one as
    a single class, where a nested list (or a bare integer) is refused."""
    inputs, labels = make_data()
    with pytest.raises(ValueError, match=rf"^classes must be a 1-D tensor or array of labels, got one of shape "
                       rf"{re.escape(str(tuple(classes.shape)))}$"):
        FewShotSampler(inputs, labels, 1, 1, 1, classes=classes)


@pytest.mark.parametrize(
    "classes, repeated",
    [([1, 4, 1, 5], 1), (torch.tensor([3, 0, 0]), 0), (np.array([2, 5, 5, 2]), 5)],
    ids=["list", "tensor", "array"],
)
def test_classes_that_repeat_a_label_are_refused_naming_it(classes, repeated):
    """A repeated label was merged silently: listing a class twice did not make it drawn twice."""
    inputs, labels = make_data()
    with pytest.raises(ValueError, match=rf"^classes must hold distinct labels, got {repeated} more than once$"):
        FewShotSampler(inputs, labels, n_way=2, k_shot=1, k_query=1, classes=classes)
    assert FewShotSampler(inputs, labels, 2, 1, 1, classes=[5, 1, 4]).classes.tolist() == [1, 4, 5]
