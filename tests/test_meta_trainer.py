"""Tests for samgria.meta.trainer: MetaTrainer.fit / evaluate / History against reference loops."""

from __future__ import annotations

import io
import math
import pickle
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from meta_helpers import ListSampler
from samgria.data import SinusoidTaskSampler, Task
from samgria.meta.maml import FOMAML, MAML
from samgria.meta.reptile import Reptile
from samgria.meta.trainer import History, MetaTrainer

DT = torch.float64


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)


def fixed_tasks(count: int, seed: int = 3):
    return SinusoidTaskSampler(k_support=5, k_query=7, seed=seed, dtype=DT).sample(count)


def adapted(model, params, task, lr, steps, first_order=False):
    fast = dict(params)
    for _ in range(steps):
        loss = F.mse_loss(functional_call(model, fast, (task.support_x,)), task.support_y)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
        fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
    return fast


def query_loss(model, params, task, lr, steps, first_order=False):
    fast = adapted(model, params, task, lr, steps, first_order)
    return F.mse_loss(functional_call(model, fast, (task.query_x,)), task.query_y)


@pytest.mark.parametrize("vectorize", [None, False])
def test_fit_matches_hand_written_maml_loop(vectorize):
    tasks = fixed_tasks(6)
    model, reference = make_model(), make_model()
    meta = MAML(model, torch.optim.SGD, lr=0.2, inner_lr=0.05, inner_steps=2)
    history = MetaTrainer(meta, F.mse_loss, ListSampler(tasks), vectorize=vectorize).fit(3, 2, progress=False)

    expected_losses = []
    for it in range(3):
        params = dict(reference.named_parameters())
        batch = tasks[2 * it : 2 * it + 2]
        loss = torch.stack([query_loss(reference, params, t, 0.05, 2) for t in batch]).mean()
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                p.sub_(0.2 * g)
        expected_losses.append(loss.item())
    assert isinstance(history, History)
    assert history.meta_loss == pytest.approx(expected_losses, rel=1e-10)
    assert history.eval_loss == [] and history.eval_iterations == []
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_fit_with_reptile_matches_interpolation_update():
    tasks = fixed_tasks(4)
    model, reference = make_model(), make_model()
    beta = 0.5
    meta = Reptile(model, torch.optim.SGD, lr=beta, inner_lr=0.05, inner_steps=3)
    MetaTrainer(meta, F.mse_loss, ListSampler(tasks)).fit(2, 2, progress=False)
    for it in range(2):
        params = {n: p.detach() for n, p in reference.named_parameters()}
        fast = [adapted(reference, {n: p.requires_grad_(True) for n, p in ((n, p.clone()) for n, p in params.items())}, t, 0.05, 3, True)
                for t in tasks[2 * it : 2 * it + 2]]
        with torch.no_grad():
            for n, p in reference.named_parameters():
                p.add_(beta * ((fast[0][n] + fast[1][n]) / 2 - p))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vectorize", [None, False])
def test_fit_with_reptile_and_no_query_set_steps_every_iteration(vectorize):
    """k_query=0: every meta-step is taken (none skipped) and the history holds the mean
    post-adaptation support loss, the monitoring loss of a task without a query set."""
    tasks = SinusoidTaskSampler(k_support=5, k_query=0, seed=3, dtype=DT).sample(6)
    model, reference = make_model(), make_model()
    beta = 0.5
    meta = Reptile(model, torch.optim.SGD, lr=beta, inner_lr=0.05, inner_steps=3)
    history = MetaTrainer(meta, F.mse_loss, ListSampler(tasks), vectorize=vectorize).fit(3, 2, progress=False)
    expected_losses = []
    for it in range(3):
        params = {n: p.detach().clone().requires_grad_(True) for n, p in reference.named_parameters()}
        batch = tasks[2 * it : 2 * it + 2]
        fast = [adapted(reference, params, t, 0.05, 3, True) for t in batch]
        with torch.no_grad():
            support_losses = [F.mse_loss(functional_call(reference, f, (t.support_x,)), t.support_y) for f, t in zip(fast, batch)]
            expected_losses.append(torch.stack(support_losses).mean().item())
            for n, p in reference.named_parameters():
                p.add_(beta * ((fast[0][n] + fast[1][n]) / 2 - p))
    assert meta.skipped_steps == 0
    assert history.meta_loss == pytest.approx(expected_losses, rel=1e-10)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_evaluate_is_first_order_post_adaptation_loss_and_leaves_model_untouched():
    tasks = fixed_tasks(3)
    model = make_model()
    meta = MAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.05, inner_steps=4)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler([]))
    before = [p.detach().clone() for p in model.parameters()]
    params = dict(model.named_parameters())
    for steps in (0, 1, None):
        n = 4 if steps is None else steps
        expected = sum(query_loss(model, params, t, 0.05, n, first_order=True).item() for t in tasks) / 3
        assert trainer.evaluate(tasks, steps=steps) == pytest.approx(expected, rel=1e-10)
    expected_unadapted = sum(F.mse_loss(model(t.query_x), t.query_y).item() for t in tasks) / 3
    assert trainer.evaluate(tasks, steps=0) == pytest.approx(expected_unadapted, rel=1e-12)
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0) and p.grad is None


def test_eval_every_records_evaluations_at_the_right_iterations():
    model = make_model()
    meta = MAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.05)
    eval_tasks = fixed_tasks(2, seed=9)
    trainer = MetaTrainer(meta, F.mse_loss, SinusoidTaskSampler(k_support=5, k_query=5, seed=0, dtype=DT))
    seen = []

    def callback(iteration, loss):
        if iteration % 2 == 0:
            seen.append(trainer.evaluate(eval_tasks))

    history = trainer.fit(5, 3, eval_every=2, eval_tasks=eval_tasks, callback=callback, progress=False)
    assert len(history.meta_loss) == 5
    assert history.eval_iterations == [2, 4]
    assert history.eval_loss == pytest.approx(seen, rel=1e-12)


def test_eval_tasks_without_eval_every_evaluate_once_at_the_end():
    model = make_model()
    meta = MAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.05)
    eval_tasks = fixed_tasks(2, seed=9)
    trainer = MetaTrainer(meta, F.mse_loss, SinusoidTaskSampler(k_support=5, k_query=5, seed=0, dtype=DT))
    history = trainer.fit(3, 2, eval_tasks=eval_tasks, progress=False)
    assert history.eval_iterations == [3]
    assert history.eval_loss == [pytest.approx(trainer.evaluate(eval_tasks), rel=1e-12)]


def test_callback_gets_iteration_and_loss_and_can_stop_early():
    model = make_model()
    meta = MAML(model, torch.optim.SGD, lr=0.1)
    trainer = MetaTrainer(meta, F.mse_loss, SinusoidTaskSampler(k_support=5, k_query=5, seed=0, dtype=DT))
    calls = []

    def callback(iteration, loss):
        calls.append((iteration, loss))
        return iteration == 3

    history = trainer.fit(10, 2, callback=callback, progress=False)
    assert [i for i, _ in calls] == [1, 2, 3]
    assert [loss for _, loss in calls] == history.meta_loss
    assert len(history.meta_loss) == 3


def test_early_stopped_fit_still_evaluates_eval_tasks_once_at_the_end():
    meta = MAML(make_model(), torch.optim.SGD, lr=0.01)
    sampler = SinusoidTaskSampler(k_support=5, k_query=5, seed=1, dtype=DT)
    trainer = MetaTrainer(meta, F.mse_loss, sampler)
    history = trainer.fit(5, 2, eval_tasks=fixed_tasks(2), callback=lambda i, loss: i == 2, progress=False)
    assert len(history.meta_loss) == 2
    assert history.eval_iterations == [2] and len(history.eval_loss) == 1
    assert history.eval_loss == [pytest.approx(trainer.evaluate(fixed_tasks(2)), rel=1e-12)]


def test_meta_training_reduces_the_post_adaptation_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 20), nn.ReLU(), nn.Linear(20, 1))
    meta = MAML(model, torch.optim.Adam, lr=1e-2, inner_lr=0.01)
    trainer = MetaTrainer(meta, F.mse_loss, SinusoidTaskSampler(amp_range=(1.0, 2.0), seed=0))
    eval_tasks = SinusoidTaskSampler(amp_range=(1.0, 2.0), seed=1).sample(20)
    before = trainer.evaluate(eval_tasks)
    trainer.fit(60, 5, progress=False)
    assert trainer.evaluate(eval_tasks) < 0.7 * before


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(
    ("progress", "tty", "shown"),
    [(None, False, False), (None, True, True), (True, False, True), (False, True, False), (np.True_, False, True), (np.False_, True, False)],
)
def test_progress_bar_only_on_terminals_unless_forced(monkeypatch, progress, tty, shown):
    stream = FakeTTY() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    meta = MAML(make_model(), torch.optim.SGD, lr=0.1)
    trainer = MetaTrainer(meta, F.mse_loss, SinusoidTaskSampler(k_support=5, k_query=5, seed=0, dtype=DT))
    history = trainer.fit(4, 2, eval_tasks=fixed_tasks(1), progress=progress)
    text = stream.getvalue()
    if shown:
        assert "meta-train 100%" in text and "4/4" in text
        assert "loss=" in text and f"eval={history.eval_loss[-1]:.4g}" in text
    else:
        assert text == ""


def test_non_finite_meta_steps_are_skipped_and_fit_stops_after_max_skipped_steps():
    tasks = fixed_tasks(10)
    for t in tasks:
        t.query_y[0] = float("nan")
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    meta = MAML(model, torch.optim.SGD, lr=0.1)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler(tasks), max_skipped_steps=3)
    with pytest.warns(RuntimeWarning, match=r"MAML: the meta-loss is nan; the meta-step is skipped"):
        with pytest.raises(RuntimeError, match=r"3 consecutive meta-steps were skipped .*max_skipped_steps=3"):
            trainer.fit(5, 2, progress=False)
    assert meta.skipped_steps == 3
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # nothing non-finite reached the weights


def test_a_finite_step_resets_the_count_of_consecutive_skipped_steps():
    good, bad = fixed_tasks(2, seed=1), fixed_tasks(2, seed=2)
    for t in bad:
        t.query_y[0] = float("inf")
    batches = [bad, good, bad, good]
    meta = MAML(make_model(), torch.optim.SGD, lr=0.1)
    with pytest.warns(RuntimeWarning, match="the meta-step is skipped"):
        history = MetaTrainer(meta, F.mse_loss, ListSampler([t for b in batches for t in b]), max_skipped_steps=2).fit(
            4, 2, progress=False
        )
    assert meta.skipped_steps == 2 and len(history.meta_loss) == 4


@pytest.mark.parametrize("how", ["same trainer", "checkpoint"])
def test_consecutive_skipped_steps_are_counted_over_fit_calls_and_checkpoints(tmp_path, how):
    """fit(2) then fit(2) must stop where fit(4) stops: the count of skipped meta-steps in a row
    went back to 0 at every fit call and was not in the checkpoint, so a resumed run took steps
    an uninterrupted one refused. Batches: good, bad, bad, bad with max_skipped_steps=3."""
    good, bad = fixed_tasks(2, seed=1), [t for seed in (2, 3, 4) for t in fixed_tasks(2, seed=seed)]
    for t in bad:
        t.query_y[0] = float("nan")
    batches = good + bad

    def trainer(tasks):
        meta = MAML(make_model(), torch.optim.SGD, lr=0.1)
        return MetaTrainer(meta, F.mse_loss, ListSampler(tasks), max_skipped_steps=3)

    whole = trainer(batches)
    with pytest.warns(RuntimeWarning, match="the meta-step is skipped"):
        with pytest.raises(RuntimeError, match=r"^MetaTrainer\.fit: 3 consecutive meta-steps were skipped .* at iteration 4\)"):
            whole.fit(4, 2, progress=False)

    first = trainer(batches)
    with pytest.warns(RuntimeWarning, match="the meta-step is skipped"):
        first.fit(2, 2, progress=False)
    if how == "checkpoint":
        torch.save(first.state_dict(), tmp_path / "trainer.pt")
        second = trainer(batches[4:])  # the sampler goes on where the first one stopped
        second.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=True))
    else:
        second = first
    with pytest.warns(RuntimeWarning, match="the meta-step is skipped"):
        with pytest.raises(RuntimeError, match=r"^MetaTrainer\.fit: 3 consecutive meta-steps were skipped .* at iteration 4\)"):
            second.fit(2, 2, progress=False)
    assert second.meta.skipped_steps == whole.meta.skipped_steps == 3


def test_max_skipped_steps_is_checked():
    meta = MAML(make_model(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"max_skipped_steps must be an integer >= 1, got 0"):
        MetaTrainer(meta, F.mse_loss, ListSampler(fixed_tasks(2)), max_skipped_steps=0)


def test_exception_mid_training_keeps_the_last_completed_update():
    tasks = fixed_tasks(4)
    model = make_model()
    meta = MAML(model, torch.optim.SGD, lr=0.1)
    calls = {"n": 0}

    def flaky_loss(prediction, target):
        calls["n"] += 1
        if calls["n"] > 4:  # iteration 1 (2 tasks x (1 support + 1 query)) succeeds, then fail
            raise RuntimeError("loss exploded")
        return F.mse_loss(prediction, target)

    snapshots = []
    trainer = MetaTrainer(meta, flaky_loss, ListSampler(tasks), vectorize=False)
    with pytest.raises(RuntimeError, match="loss exploded"):
        trainer.fit(2, 2, callback=lambda i, l: snapshots.append([p.detach().clone() for p in model.parameters()]), progress=False)
    assert len(snapshots) == 1
    for p, p0 in zip(model.parameters(), snapshots[0]):
        assert torch.equal(p, p0)


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_a_meta_iteration_that_raises_leaves_the_sampler_and_the_random_state_as_they_were(interruption):
    """A meta-iteration that raises (an error, or Ctrl-C) is not counted, and the tasks it drew
    and the dropout masks it drew are not consumed: continuing (or saving a checkpoint then)
    gives the uninterrupted run, bit for bit. The sampler's stream used to stay one meta-batch
    ahead, and torch's random state past the failed step's dropout masks."""

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1)).to(DT)
        meta = MAML(model, torch.optim.SGD, lr=0.05, inner_lr=0.1)
        return model, meta

    model, meta = build()
    reference = MetaTrainer(meta, F.mse_loss, SinusoidTaskSampler(seed=1, dtype=DT), vectorize=False)
    reference.fit(3, 2, progress=False)

    failing = {"on": False, "calls": 0}

    def loss_fn(prediction, target):
        if failing["on"]:
            failing["calls"] += 1
            if failing["calls"] == 3:  # after a support and a query pass with dropout
                raise interruption("stopped in the middle of a meta-iteration")
        return F.mse_loss(prediction, target)

    resumed_model, resumed_meta = build()
    trainer = MetaTrainer(resumed_meta, loss_fn, SinusoidTaskSampler(seed=1, dtype=DT), vectorize=False)
    trainer.fit(1, 2, progress=False)
    failing["on"] = True
    with pytest.raises(interruption, match="stopped in the middle"):
        trainer.fit(2, 2, progress=False)
    assert trainer.iteration == 1
    failing["on"] = False
    checkpoint = trainer.state_dict()
    trainer.fit(2, 2, progress=False)
    assert trainer.history == reference.history
    for p, q in zip(resumed_model.parameters(), model.parameters()):
        assert torch.equal(p, q)

    _, fresh_meta = build()
    fresh = MetaTrainer(fresh_meta, F.mse_loss, SinusoidTaskSampler(seed=2, dtype=DT), vectorize=False)
    fresh.load_state_dict(checkpoint)
    fresh.fit(2, 2, progress=False)
    assert fresh.history == reference.history
    for p, q in zip(fresh_meta.model.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_meta_step_and_evaluate_reject_empty_task_lists():
    trainer = MetaTrainer(MAML(make_model(), torch.optim.SGD, lr=0.1), F.mse_loss, ListSampler([]))
    with pytest.raises(ValueError, match=r"tasks must not be empty, got 0 tasks"):
        trainer.meta_step([])
    with pytest.raises(ValueError, match=r"tasks must not be empty, got 0 tasks"):
        trainer.evaluate([])


@pytest.mark.parametrize("vectorize", [False, True])
def test_evaluating_with_dropout_does_not_change_the_training_run(vectorize):
    """Monitoring is not part of training: ``fit`` with ``eval_every`` ends at the same weights
    as without, bit for bit, though dropout (train mode) draws random numbers in evaluate; and
    two evaluations of the same tasks agree."""

    def run(eval_every):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1)).to(DT)
        meta = MAML(model, torch.optim.SGD, lr=0.05, inner_lr=0.1)
        trainer = MetaTrainer(meta, F.mse_loss, ListSampler(fixed_tasks(12)), vectorize=vectorize)
        eval_tasks = fixed_tasks(3, seed=7)
        kwargs = {"eval_every": eval_every, "eval_tasks": eval_tasks} if eval_every else {}
        trainer.fit(4, 2, progress=False, **kwargs)
        return [p.detach().clone() for p in model.parameters()], trainer, eval_tasks

    plain, _, _ = run(None)
    monitored, trainer, eval_tasks = run(1)
    assert all(torch.equal(a, b) for a, b in zip(plain, monitored))
    assert trainer.evaluate(eval_tasks) == trainer.evaluate(eval_tasks)
    meta = trainer.meta
    before = torch.get_rng_state()
    meta.evaluate(eval_tasks, F.mse_loss, vectorize=vectorize)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("vectorize", [None, False, True])
def test_maml_refuses_tasks_without_a_query_set_before_touching_the_model(vectorize):
    """MAML's meta-loss is the query loss: an empty query set (``k_query=0``) is an error that
    names the task, not a NaN meta-loss that skips every step; Reptile takes such tasks."""
    model = make_model()
    meta = MAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    tasks = SinusoidTaskSampler(k_support=5, k_query=0, seed=3, dtype=DT).sample(3)
    trainer = MetaTrainer(meta, F.mse_loss, SinusoidTaskSampler(k_support=5, k_query=0, seed=3, dtype=DT), vectorize=vectorize)
    match = (
        r"^tasks\[0\] has an empty query set \(query_x of shape \(0, 1\)\): MAML's meta-loss is the "
        r"query loss; only Reptile can do without a query set$"
    )
    for call in (
        lambda: trainer.fit(2, 3, progress=False),
        lambda: trainer.evaluate(tasks),
        lambda: meta.task_losses(tasks, F.mse_loss, vectorize=vectorize),
        lambda: meta.evaluate(tasks, F.mse_loss, vectorize=vectorize),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    mixed = fixed_tasks(2) + tasks[:1]
    with pytest.raises(ValueError, match=r"^tasks\[2\] has an empty query set"):
        meta.task_losses(mixed, F.mse_loss)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert trainer.iteration == 0 and meta.skipped_steps == 0
    reptile = Reptile(make_model(), torch.optim.SGD, lr=0.1, inner_lr=0.1)
    assert math.isfinite(reptile.evaluate(tasks, F.mse_loss))


@pytest.mark.parametrize("vectorize", [True, False])
def test_the_loss_functions_errors_keep_their_type_on_the_path_asked_for(vectorize):
    """A user's exception (here a KeyError, and torch's OutOfMemoryError, a RuntimeError
    subclass that code catches to shrink the batch) comes out of ``fit`` as raised, whichever
    path was asked for; with ``vectorize=True`` a note (Python 3.11+) says where, once."""
    for error in (KeyError("label"), torch.OutOfMemoryError("out of memory (simulated)")):

        def broken_loss(prediction, target):
            raise error

        meta = MAML(make_model(), torch.optim.SGD, lr=0.1, inner_lr=0.1)
        trainer = MetaTrainer(meta, broken_loss, ListSampler(fixed_tasks(4)), vectorize=vectorize)
        with pytest.raises(type(error)) as raised:
            trainer.fit(1, 2, progress=False)
        assert raised.value is error
        notes = getattr(raised.value, "__notes__", [])
        expected = ["MAML: raised on the vmap path, which was asked for"] if vectorize and hasattr(error, "add_note") else []
        assert notes == expected
        error.__notes__ = []


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((0, 2), {}, ValueError, r"num_iterations must be an integer >= 1, got 0"),
        ((-3, 2), {}, ValueError, r"num_iterations must be an integer >= 1, got -3"),
        ((1.5, 2), {}, TypeError, r"num_iterations must be an integer >= 1, got 1.5"),
        ((True, 2), {}, TypeError, r"num_iterations must be an integer >= 1, got True"),
        ((2, 0), {}, ValueError, r"meta_batch_size must be an integer >= 1, got 0"),
        ((2, "4"), {}, TypeError, r"meta_batch_size must be an integer >= 1, got '4'"),
        ((2, 2), {"eval_every": 1}, ValueError, r"eval_every=1 needs eval_tasks, got eval_tasks=None"),
        ((2, 2), {"eval_every": 0, "eval_tasks": "T"}, ValueError, r"eval_every must be an integer >= 1, got 0"),
        ((2, 2), {"eval_tasks": []}, ValueError, r"eval_tasks must not be empty, got 0 tasks"),
        ((2, 2), {"callback": 5}, TypeError, r"callback must be callable, got int"),
        ((2, 2), {"progress": "yes"}, TypeError, r"progress must be None or a bool, got 'yes'"),
        ((2, 2), {"progress": 1}, TypeError, r"^progress must be None or a bool, got 1$"),
        ((2, 2), {"eval_tasks": 3}, TypeError, r"^eval_tasks must be a sequence of Task, got 3$"),
        ((2, 2), {"eval_tasks": "T0"}, TypeError, r"^eval_tasks must be a sequence of Task, got Task\("),
    ],
)
def test_fit_rejects_bad_arguments_before_touching_the_model(args, kwargs, error, match):
    if kwargs.get("eval_tasks") == "T":
        kwargs["eval_tasks"] = fixed_tasks(1)
    if kwargs.get("eval_tasks") == "T0":  # one task, not a sequence of them
        kwargs["eval_tasks"] = fixed_tasks(1)[0]
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = MetaTrainer(MAML(model, torch.optim.SGD, lr=0.1), F.mse_loss, ListSampler(fixed_tasks(4)))
    with pytest.raises(error, match=match):
        trainer.fit(*args, **kwargs)
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)


@pytest.mark.parametrize("tasks", [3, "tasks", None], ids=["int", "str", "None"])
def test_evaluate_and_train_step_refuse_what_is_not_a_sequence_of_tasks(tasks):
    """``list(3)`` raised ``'int' object is not iterable``, naming no argument."""
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = MetaTrainer(MAML(model, torch.optim.SGD, lr=0.1), F.mse_loss, ListSampler(fixed_tasks(4)))
    message = rf"^tasks must be a sequence of Task, got {re.escape(repr(tasks))}$"
    with pytest.raises(TypeError, match=message):
        trainer.evaluate(tasks)
    with pytest.raises(TypeError, match=message):
        trainer.train_step(tasks)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("flag", [True, False])
def test_numpy_bool_vectorize_and_compile_train_as_the_bool(flag):
    """A NumPy bool was refused ('must be None, True or False'); it is the bool it holds, and is
    stored as that bool (``vectorize is True`` decides the path)."""
    tasks = fixed_tasks(4)
    runs = []
    for vectorize, compile_ in ((np.bool_(flag), np.False_), (flag, False)):
        model = make_model()
        trainer = MetaTrainer(
            MAML(model, torch.optim.SGD, lr=0.2, inner_lr=0.05), F.mse_loss, ListSampler(tasks),
            vectorize=vectorize, compile=compile_,
        )
        assert trainer.vectorize is flag and trainer.compile is False
        history = trainer.fit(2, 2, progress=False)
        runs.append((history.meta_loss, trainer.path, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][1] == runs[1][1] == ("vmap" if flag else "loop")
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(p, q) for p, q in zip(runs[0][2], runs[1][2]))


def test_sampler_returning_wrong_count_is_an_error():
    trainer = MetaTrainer(MAML(make_model(), torch.optim.SGD, lr=0.1), F.mse_loss, ListSampler(fixed_tasks(3)))
    with pytest.raises(ValueError, match=r"sampler.sample\(2\) returned 1 tasks"):
        trainer.fit(2, 2, progress=False)


def test_constructor_validation():
    model = make_model()
    meta = MAML(model, torch.optim.SGD, lr=0.1)
    sampler = ListSampler([])
    with pytest.raises(TypeError, match=r"meta must be a samgria MetaOptimizer, got SGD"):
        MetaTrainer(torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, sampler)
    with pytest.raises(TypeError, match=r"loss_fn must be callable, got str"):
        MetaTrainer(meta, "mse", sampler)
    with pytest.raises(TypeError, match=r"sampler must have a sample\(n\) -> list\[Task\] method, got list$"):
        MetaTrainer(meta, F.mse_loss, [Task(*(torch.zeros(1, 1),) * 4)])
    with pytest.raises(TypeError, match=r"vectorize must be None or a bool, got 1"):
        MetaTrainer(meta, F.mse_loss, sampler, vectorize=1)


@pytest.mark.parametrize(
    "make_model_for, checkpoint_inner_steps, match",
    [
        (make_model, True, r"checkpointed inner steps need the loop path"),
        (lambda: nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)), False,
         r"second-order gradients pass through 1 \(BatchNorm1d\)"),
    ],
    ids=["checkpointed-steps", "batch-norm"],
)
def test_vectorize_true_that_the_model_or_the_inner_loop_rules_out_is_refused_at_construction(
    make_model_for, checkpoint_inner_steps, match
):
    # It was accepted, and the first fit raised (after warning, with compile=True, that it used
    # the uncompiled path): what the model and the inner loop alone decide is known now.
    meta = MAML(make_model_for(), torch.optim.SGD, lr=0.1, checkpoint_inner_steps=checkpoint_inner_steps)
    sampler = SinusoidTaskSampler(k_support=5, k_query=5, seed=0, dtype=DT)
    for compile_ in (False, True):
        with pytest.raises(ValueError, match=rf"^vectorize=True cannot be honoured: {match}"):
            MetaTrainer(meta, F.mse_loss, sampler, vectorize=True, compile=compile_)
    MetaTrainer(meta, F.mse_loss, sampler, vectorize=None)  # the loop stays open to it
    MetaTrainer(meta, F.mse_loss, sampler, vectorize=False)


# -- checkpoints: resume bit for bit ------------------------------------------------------------
def _algorithm(name, model):
    from samgria.meta.metasgd import MetaSGD

    if name == "maml":
        return MAML(model, torch.optim.Adam, lr=0.01, inner_lr=0.05, inner_steps=2)
    if name == "metasgd":
        return MetaSGD(model, torch.optim.Adam, lr=0.01, inner_lr=0.05)
    return Reptile(model, torch.optim.SGD, lr=0.5, momentum=0.9, inner_lr=0.05, inner_steps=3)


def _trainer(name, seed, vectorize, sampler_seed=None):
    sampler = SinusoidTaskSampler(k_support=5, k_query=5, seed=seed if sampler_seed is None else sampler_seed, dtype=DT)
    return MetaTrainer(_algorithm(name, make_model(seed)), F.mse_loss, sampler, vectorize=vectorize)


def _meta_weights(trainer):
    return [p.detach().clone() for group in trainer.meta.param_groups for p in group["params"]]


def _checkpoint_round_trip(trainer):
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only: the checkpoint holds only tensors and plain data


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("name", ["maml", "metasgd", "reptile"])
def test_fit_resumed_from_a_checkpoint_continues_bit_for_bit(name, vectorize):
    eval_tasks = fixed_tasks(3, seed=9)
    whole = _trainer(name, 0, vectorize)
    expected = whole.fit(6, 3, eval_every=2, eval_tasks=eval_tasks, progress=False)

    first = _trainer(name, 0, vectorize)
    first.fit(3, 3, eval_every=2, eval_tasks=eval_tasks, progress=False)
    state = _checkpoint_round_trip(first)
    resumed = _trainer(name, 5, vectorize)  # other weights, another sampler seed: all from the checkpoint
    resumed.load_state_dict(state)
    calls = []
    second = resumed.fit(
        3, 3, eval_every=2, eval_tasks=eval_tasks, progress=False, callback=lambda i, loss: calls.append(i)
    )

    assert resumed.iteration == whole.iteration == 6 and calls == [4, 5, 6]
    assert second.meta_loss == expected.meta_loss[3:] and second.eval_iterations == [4, 6]
    assert resumed.history == whole.history == expected
    for p, q in zip(_meta_weights(resumed), _meta_weights(whole)):
        assert torch.equal(p, q)
    torch.testing.assert_close(resumed.meta.state_dict(), whole.meta.state_dict(), rtol=0, atol=0)
    assert state["iteration"] == 3 and state["history"]["eval_iterations"] == [2]


def test_a_checkpoint_saved_by_the_callback_holds_that_iterations_evaluation():
    """The callback is fit's one hook, so it is where a run checkpoints every few iterations. It
    ran before the evaluation eval_every schedules at the same iteration, so the checkpoint lacked
    it and the resumed history missed an entry ([2, 6] instead of [2, 4, 6])."""
    eval_tasks = fixed_tasks(2, seed=9)
    whole = _trainer("maml", 0, False)
    saved = {}

    def save_at_4(iteration, loss):
        if iteration == 4:
            saved["state"] = _checkpoint_round_trip(whole)
            saved["eval_iterations"] = list(whole.history.eval_iterations)

    whole.fit(6, 3, eval_every=2, eval_tasks=eval_tasks, callback=save_at_4, progress=False)
    assert saved["eval_iterations"] == [2, 4]  # the callback sees this iteration's evaluation
    resumed = _trainer("maml", 5, False)
    resumed.load_state_dict(saved["state"])
    resumed.fit(2, 3, eval_every=2, eval_tasks=eval_tasks, progress=False)
    assert resumed.history == whole.history and whole.history.eval_iterations == [2, 4, 6]
    for p, q in zip(_meta_weights(resumed), _meta_weights(whole)):
        assert torch.equal(p, q)


def test_resume_with_torchs_global_generator_restores_its_state():
    def trainer(seed):
        sampler = SinusoidTaskSampler(k_support=5, k_query=5, dtype=DT)  # draws from torch's global generator
        return MetaTrainer(MAML(make_model(seed), torch.optim.SGD, lr=0.1), F.mse_loss, sampler, vectorize=True)

    whole = trainer(0)
    torch.manual_seed(11)
    whole.fit(4, 2, progress=False)
    first = trainer(0)
    torch.manual_seed(11)
    first.fit(2, 2, progress=False)
    state = _checkpoint_round_trip(first)
    resumed = trainer(3)
    torch.manual_seed(12345)  # whatever the global generator did meanwhile
    resumed.load_state_dict(state)
    resumed.fit(2, 2, progress=False)
    assert resumed.history == whole.history
    for p, q in zip(_meta_weights(resumed), _meta_weights(whole)):
        assert torch.equal(p, q)


def test_state_dict_is_a_snapshot_and_restores_the_path_choice():
    trainer = _trainer("maml", 0, None)
    trainer.fit(5, 3, progress=False)  # the measured default: loop and vmap twice each, then the faster
    state = trainer.state_dict()
    snapshot = {name: value.clone() for name, value in state["model"].items()}
    trainer.fit(2, 3, progress=False)
    assert all(torch.equal(state["model"][name], value) for name, value in snapshot.items())

    resumed = _trainer("maml", 1, None)
    resumed.load_state_dict(state)
    policy, restored = trainer.meta.path_policy, resumed.meta.path_policy
    (key,) = [k for k in restored.timings if not k[0]]  # the training key
    assert restored.timings[key] == {p: t[: len(restored.timings[key][p])] for p, t in policy.timings[key].items()}
    assert resumed.path == state["paths"]["path"] in ("loop", "vmap")
    assert restored.decided(key, ["loop", "vmap"]) == policy.decided(key, ["loop", "vmap"]) is not None


MAX_KEYS = 32  # PathPolicy's default max_keys


class VariableShotSampler:
    """Variable-shot episodes: every meta-batch draws its support and query sizes from
    1..max_size (the tasks of one meta-batch share them)."""

    def __init__(self, seed=0, max_size=40):
        self.generator, self.max_size = torch.Generator().manual_seed(seed), max_size

    def sample(self, n):
        k, q = (int(torch.randint(1, self.max_size + 1, (1,), generator=self.generator)) for _ in range(2))
        return [Task(*(torch.randn(size, 1, generator=self.generator, dtype=DT) for size in (k, k, q, q))) for _ in range(n)]


def _paths_bound(paths):
    """The pickled size of ``paths`` with MAX_KEYS timing keys, each larger than any key of the
    tests (numbers >= 256 take more bytes) and with ``trials`` durations on both paths."""
    worst = {
        (False, 1000 + i, ((1000 + i, 1), (1000 + i, 1)), 1000, True): {"loop": [0.5, 0.5], "vmap": [0.5, 0.5]}
        for i in range(MAX_KEYS)
    }
    return len(pickle.dumps({**paths, "timings": worst}))


def test_variable_shot_training_keeps_the_path_timings_and_checkpoints_bounded():
    """The path policy kept the timings of every (meta-batch size, task shapes) key: with sizes
    drawn at random per episode it grew by one key per iteration, in memory and in every
    checkpoint (499 keys after 500 iterations). The timings, and the checkpoint's "paths", now
    stay within MAX_KEYS keys (the history grows by one loss per iteration, by design); a
    checkpoint restores them as saved."""
    meta = FOMAML(make_model(), torch.optim.Adam, lr=1e-3, inner_lr=0.01)
    trainer = MetaTrainer(meta, F.mse_loss, VariableShotSampler())
    episodes = VariableShotSampler(seed=1)
    for i in range(3 * MAX_KEYS + 8):
        trainer.fit(1, 2, progress=False)
        if i % 4 == 0:
            trainer.evaluate(episodes.sample(2))
        assert len(meta.path_policy.timings) <= MAX_KEYS, f"iteration {trainer.iteration}"
    paths = trainer.state_dict()["paths"]
    assert len(paths["timings"]) == MAX_KEYS
    assert len(pickle.dumps(paths)) <= _paths_bound(paths)

    resumed = MetaTrainer(FOMAML(make_model(1), torch.optim.Adam, lr=1e-3, inner_lr=0.01), F.mse_loss, VariableShotSampler())
    resumed.load_state_dict(_checkpoint_round_trip(trainer))
    restored = resumed.meta.path_policy.timings
    assert list(restored.items()) == list(meta.path_policy.timings.items())  # same keys, same order
    resumed.fit(3, 2, progress=False)
    assert len(resumed.meta.path_policy.timings) == MAX_KEYS


def test_a_checkpoint_with_more_keys_than_the_bound_loads_its_most_recent_ones():
    """A checkpoint of a run without the bound held every key it had seen: it loads the last
    MAX_KEYS of them (its timings are kept least recently used first)."""
    trainer = _trainer("maml", 0, None)
    trainer.fit(1, 2, progress=False)
    state = trainer.state_dict()
    state["paths"]["timings"] = {(False, 2, ((k, 1), (k, 1)), 2, True): {"loop": [float(k)]} for k in range(1, 101)}
    resumed = _trainer("maml", 1, None)
    resumed.load_state_dict(state)
    expected = {(False, 2, ((k, 1), (k, 1)), 2, True): {"loop": [float(k)]} for k in range(101 - MAX_KEYS, 101)}
    assert list(resumed.meta.path_policy.timings.items()) == list(expected.items())


def test_fixed_shape_training_keeps_its_measured_path_while_evaluation_shapes_vary():
    """The common case keeps the policy's behaviour: a fixed training shape is measured (loop
    and vmap twice each) and its fastest path kept, while evaluations on episodes of random
    sizes bring more keys than the bound holds."""
    meta = MAML(make_model(), torch.optim.SGD, lr=0.05, inner_lr=0.05)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler(fixed_tasks(2 * (MAX_KEYS + 8))))
    episodes = VariableShotSampler(seed=2)
    used, sizes = [], set()
    for _ in range(MAX_KEYS + 8):
        trainer.fit(1, 2, progress=False)
        used.append(trainer.path)
        tasks = episodes.sample(2)
        sizes.add((len(tasks[0].support_x), len(tasks[0].query_x)))
        trainer.evaluate(tasks)
    assert len(sizes) > MAX_KEYS  # more evaluation keys than the bound holds
    policy = meta.path_policy
    assert len(policy.timings) <= MAX_KEYS
    (key,) = [k for k in policy.timings if not k[0]]  # the training key, measured once
    assert {path: len(times) for path, times in policy.timings[key].items()} == {"loop": 2, "vmap": 2}
    fastest = policy.decided(key, ["loop", "vmap"])
    assert sorted(used[:4]) == ["loop", "loop", "vmap", "vmap"] and used[4:] == [fastest] * (len(used) - 4)


def test_fit_counts_iterations_across_calls_and_keeps_the_whole_history():
    trainer = _trainer("maml", 0, True)
    first = trainer.fit(2, 2, eval_tasks=fixed_tasks(1), progress=False)
    second = trainer.fit(3, 2, eval_every=2, eval_tasks=fixed_tasks(1), progress=False)
    assert first.eval_iterations == [2] and second.eval_iterations == [4]
    assert trainer.iteration == 5
    assert trainer.history.meta_loss == first.meta_loss + second.meta_loss
    assert trainer.history.eval_iterations == [2, 4]


def test_a_sampler_without_state_is_not_saved_and_loading_leaves_it_alone():
    tasks = fixed_tasks(8)
    trainer = MetaTrainer(MAML(make_model(), torch.optim.SGD, lr=0.1), F.mse_loss, ListSampler(tasks))
    trainer.fit(2, 2, progress=False)
    state = trainer.state_dict()
    assert state["sampler"] is None
    fresh = MetaTrainer(MAML(make_model(1), torch.optim.SGD, lr=0.1), F.mse_loss, ListSampler(tasks))
    fresh.load_state_dict(state)
    assert fresh.sampler.position == 0 and fresh.iteration == 2


def test_load_state_dict_rejects_what_is_not_a_trainer_checkpoint():
    trainer = _trainer("maml", 0, True)
    state = trainer.state_dict()
    with pytest.raises(TypeError, match=r"state_dict must be a dict from MetaTrainer.state_dict\(\), got list"):
        trainer.load_state_dict([])
    with pytest.raises(ValueError, match=r"missing \['history', 'rng'\]"):
        trainer.load_state_dict({k: v for k, v in state.items() if k not in ("history", "rng")})
    with pytest.raises(ValueError, match=r"state_dict\['version'\] must be 1, got 7"):
        trainer.load_state_dict({**state, "version": 7})
    with pytest.raises(ValueError, match=r"state_dict\['iteration'\] must be an integer >= 0, got -1"):
        trainer.load_state_dict({**state, "iteration": -1})


def _same(a, b) -> bool:
    """Equal, bit for bit, as nested dicts/lists of tensors and plain data."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("damage", ["iteration", "model", "sampler", "rng", "path"])
def test_a_load_that_fails_leaves_the_trainer_and_the_random_state_as_they_were(damage):
    source = _trainer("maml", 0, True)
    source.fit(2, 2, progress=False)
    state = source.state_dict()
    if damage == "iteration":
        state["iteration"] = -1
    elif damage == "model":
        state["model"]["0.weight"] = torch.zeros(3, 3)  # another architecture: torch refuses after copying the rest
    elif damage == "sampler":
        state["sampler"] = {"generator": None}  # saved with torch's global generator: this sampler has its own
    elif damage == "rng":
        state["rng"] = torch.zeros(3, dtype=torch.uint8)
    else:
        state["paths"]["path"] = "jit"
    target = _trainer("maml", 5, True)
    target.fit(1, 2, progress=False)
    torch.manual_seed(77)
    before = target.state_dict()  # also torch's global random state
    with pytest.raises((ValueError, RuntimeError)):
        target.load_state_dict(state)
    assert _same(target.state_dict(), before)


def test_a_sampler_class_or_a_sample_attribute_that_is_not_a_method_is_refused():
    meta = MAML(make_model(), torch.optim.SGD, lr=0.1)

    class NotCallable:
        sample = 5

    with pytest.raises(TypeError, match=r"sampler must have a sample\(n\) -> list\[Task\] method, got the class SinusoidTaskSampler$"):
        MetaTrainer(meta, F.mse_loss, SinusoidTaskSampler)
    with pytest.raises(TypeError, match=r"sampler must have a sample\(n\) -> list\[Task\] method, got NotCallable$"):
        MetaTrainer(meta, F.mse_loss, NotCallable())


def test_a_distributed_task_sampler_must_match_the_meta_optimizers_ranks():
    from samgria import DistributedTaskSampler

    sampler = DistributedTaskSampler(SinusoidTaskSampler(seed=0), rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"sampler must be sharded like meta \(rank 0 of 1\), got a DistributedTaskSampler for rank 1 of 2"):
        MetaTrainer(MAML(make_model(), torch.optim.SGD, lr=0.1), F.mse_loss, sampler)


# ---------------------------------------------------------------- compile=True with vectorize=True
def _fixed_batches_trainer(algorithm, tasks, **kwargs):
    model = make_model()
    if algorithm == "maml":
        meta = MAML(model, torch.optim.SGD, lr=0.2, inner_lr=0.05, inner_steps=2)
    else:
        meta = Reptile(model, torch.optim.SGD, lr=0.5, inner_lr=0.05, inner_steps=2)
    return MetaTrainer(meta, F.mse_loss, ListSampler(tasks), **kwargs)


def _fit_recording_warnings(trainer, iterations, batch):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(iterations, batch, progress=False)
    return history, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_compile_with_vectorize_true_compiles_and_equals_the_vmap_path():
    tasks = fixed_tasks(4)
    compiled = _fixed_batches_trainer("maml", tasks, vectorize=True, compile=True, compile_options={"backend": "eager"})
    history, warned = _fit_recording_warnings(compiled, 2, 2)
    vmap = _fixed_batches_trainer("maml", tasks, vectorize=True)
    expected = vmap.fit(2, 2, progress=False)
    assert compiled.compiled_loss is not None and compiled.compiled_loss.num_programs == 1
    assert compiled.path == "compiled" and warned == []
    assert history.meta_loss == pytest.approx(expected.meta_loss, rel=1e-12)
    for p, q in zip(compiled.meta.model.parameters(), vmap.meta.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("algorithm", "torch_version", "reason"),
    [
        ("reptile", None, "Reptile forms its outer update from the adapted weights (outer_update='pseudo_gradient'), not from a meta-gradient"),
        # torch 2.4-2.6 run the compiled meta-loss eagerly without an error: the trainer said
        # path == "compiled" while nothing was compiled
        ("maml", "2.6.0", "torch 2.6.0 compiles no program for it (its graph breaks inside torch.func.grad_and_value and it runs eagerly); the compiled path needs torch 2.7 or later"),
    ],
    ids=["reptile", "torch-2.6"],
)
def test_compile_with_vectorize_true_falls_back_to_vmap_with_one_warning(monkeypatch, algorithm, torch_version, reason):
    if torch_version is not None:
        monkeypatch.setattr(torch, "__version__", torch_version)
    tasks = fixed_tasks(6)
    compiled = _fixed_batches_trainer(algorithm, tasks, vectorize=True, compile=True)
    history, warned = _fit_recording_warnings(compiled, 3, 2)
    vmap = _fixed_batches_trainer(algorithm, tasks, vectorize=True)
    expected = vmap.fit(3, 2, progress=False)
    assert warned == [f"MetaTrainer(compile=True): {reason}; using the uncompiled path"]
    assert compiled.path == "vmap" and compiled.compiled_loss is None
    assert history.meta_loss == expected.meta_loss  # the vmap path, bit for bit
    assert all(torch.equal(p, q) for p, q in zip(compiled.meta.model.parameters(), vmap.meta.model.parameters()))


def test_compile_with_vectorize_true_falls_back_to_vmap_after_a_compilation_error():
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("backend exploded on purpose")

    tasks = fixed_tasks(6)
    compiled = _fixed_batches_trainer("maml", tasks, vectorize=True, compile=True, compile_options={"backend": failing_backend})
    history, warned = _fit_recording_warnings(compiled, 3, 2)
    vmap = _fixed_batches_trainer("maml", tasks, vectorize=True)
    expected = vmap.fit(3, 2, progress=False)
    assert len(warned) == 1 and "backend exploded on purpose" in warned[0]
    assert "this step ran on the vmap path, and the compiled path is not tried again" in warned[0]
    assert compiled.path == "vmap" and compiled.compiled_loss is None
    assert history.meta_loss == expected.meta_loss
    assert all(torch.equal(p, q) for p, q in zip(compiled.meta.model.parameters(), vmap.meta.model.parameters()))


# ---------------------------------------------------------------- callback: any true value stops
@pytest.mark.parametrize(
    ("stop", "keep_going"),
    [
        (np.True_, np.False_),
        (torch.tensor(True), torch.tensor(False)),
        (True, None),  # a callback without a return value never stops
    ],
    ids=["numpy", "tensor", "none"],
)
def test_a_callback_returning_any_true_value_stops_training(stop, keep_going):
    trainer = _trainer("maml", 0, True)
    calls = []

    def callback(iteration, loss):
        calls.append(iteration)
        return stop if iteration == 3 else keep_going

    history = trainer.fit(6, 2, callback=callback, progress=False)
    assert calls == [1, 2, 3] and len(history.meta_loss) == 3 and trainer.iteration == 3


# ---------------------------------------------------------------- checkpoints of several ranks
def test_a_checkpoint_of_several_ranks_is_refused_by_one_process_before_anything_changes():
    source = _trainer("maml", 0, True)
    source.fit(2, 2, progress=False)
    state = source.state_dict()
    assert isinstance(state["rng"], torch.Tensor)  # one process: torch's random state, as it was
    state["rng"] = [state["rng"], state["rng"].clone()]  # what rank 0 of a 2-rank run saves
    target = _trainer("maml", 5, True)
    target.fit(1, 2, progress=False)
    before = target.state_dict()
    with pytest.raises(
        ValueError,
        match=r"^state_dict\['rng'\] holds the random states of 2 ranks, but this run has 1: a checkpoint "
        r"of a distributed run resumes on the same number of ranks$",
    ):
        target.load_state_dict(state)
    assert _same(target.state_dict(), before)
    with pytest.raises(TypeError, match=r"state_dict\['rng'\] must be torch's random state .* got str"):
        target.load_state_dict({**state, "rng": "seed"})
    assert _same(target.state_dict(), before)


@pytest.mark.parametrize(
    ("history", "error", "match"),
    [
        (3, TypeError, r"^state_dict\['history'\] must be a dict of History's fields \['meta_loss', 'eval_loss', 'eval_iterations'\], got 3$"),
        (
            {"meta_loss": 3},
            ValueError,
            r"^state_dict\['history'\] must hold exactly History's fields \['meta_loss', 'eval_loss', 'eval_iterations'\], got \['meta_loss'\]$",
        ),
        (
            {"meta_loss": [1.0], "eval_loss": [], "eval_iterations": [], "lr": []},
            ValueError,
            r"must hold exactly History's fields .*, got \['eval_iterations', 'eval_loss', 'lr', 'meta_loss'\]$",
        ),
        ({"meta_loss": 3, "eval_loss": [], "eval_iterations": []}, TypeError, r"^state_dict\['history'\]\['meta_loss'\] must be a list, got 3$"),
        ({"meta_loss": "0.5", "eval_loss": [], "eval_iterations": []}, TypeError, r"\['meta_loss'\] must be a list, got '0.5'$"),
        ({"meta_loss": [0.5, "x"], "eval_loss": [], "eval_iterations": []}, TypeError, r"^state_dict\['history'\]\['meta_loss'\]\[1\] must be a real number, got 'x'$"),
        ({"meta_loss": [True], "eval_loss": [], "eval_iterations": []}, TypeError, r"\['meta_loss'\]\[0\] must be a real number, got True$"),
        ({"meta_loss": [], "eval_loss": [0.5], "eval_iterations": [0]}, ValueError, r"^state_dict\['history'\]\['eval_iterations'\]\[0\] must be an integer >= 1, got 0$"),
        ({"meta_loss": [], "eval_loss": [0.5], "eval_iterations": [1.5]}, TypeError, r"\['eval_iterations'\]\[0\] must be an integer >= 1, got 1\.5$"),
        ({"meta_loss": [], "eval_loss": [0.5, 0.4], "eval_iterations": [1]}, ValueError, r"one eval_iterations entry per eval_loss entry, got 2 and 1$"),
    ],
    ids=["int", "fields-missing", "field-unknown", "int-field", "str-field", "str-loss", "bool-loss", "iteration-0", "float-iteration", "lengths"],
)
def test_a_checkpoint_whose_history_is_not_a_history_is_refused_before_anything_changes(history, error, match):
    """History(**state['history']) was built unchecked: {'meta_loss': 3} was loaded and fit()
    raised AttributeError after its meta-step had changed the weights and the iteration; 3 gave
    "History() argument after ** must be a mapping", naming no entry."""
    source = _trainer("maml", 0, True)
    source.fit(2, 2, eval_tasks=fixed_tasks(1), progress=False)
    state = source.state_dict()
    state["history"] = history
    target = _trainer("maml", 5, True)
    target.fit(1, 2, progress=False)
    torch.manual_seed(77)
    before = target.state_dict()
    with pytest.raises(error, match=match):
        target.load_state_dict(state)
    assert _same(target.state_dict(), before)
    target.fit(1, 2, progress=False)  # still trains, with its own history
    assert target.iteration == 2 and len(target.history.meta_loss) == 2


def test_a_history_with_non_finite_losses_and_tuples_loads_as_saved():
    """What a trainer records loads back: a skipped step's non-finite meta-loss, NumPy numbers
    (kept as floats and ints), tuples (kept as lists)."""
    trainer = _trainer("maml", 0, True)
    trainer.fit(1, 2, progress=False)
    state = trainer.state_dict()
    state["history"] = {
        "meta_loss": (float("nan"), np.float32(0.5), 2, float("inf")),
        "eval_loss": [np.float64(0.25)],
        "eval_iterations": [np.int64(3)],
    }
    fresh = _trainer("maml", 1, True)
    fresh.load_state_dict(state)
    history = fresh.history
    assert history.meta_loss[1:] == [0.5, 2.0, float("inf")] and math.isnan(history.meta_loss[0])
    assert history.eval_loss == [0.25] and history.eval_iterations == [3]
    assert all(type(v) is float for v in history.meta_loss + history.eval_loss)
    assert type(history.eval_iterations[0]) is int


class _TaskDataset(torch.utils.data.Dataset):
    """Map-style dataset of tasks: ``__len__`` and ``__getitem__`` only, as ``list()`` takes it."""

    def __init__(self, tasks):
        self.tasks = list(tasks)

    def __len__(self):
        return len(self.tasks)

    def __getitem__(self, index):
        return self.tasks[index]


def test_a_map_style_dataset_of_tasks_is_a_sequence_of_tasks():
    """``evaluate``, ``train_step`` and ``fit(eval_tasks=...)`` refused a map-style
    ``torch.utils.data.Dataset`` (no ``__iter__``, so not an ``Iterable``) that ``list()`` takes."""
    tasks = fixed_tasks(3)
    model = make_model()
    meta = MAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.05, inner_steps=2)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler(fixed_tasks(2, seed=5)), vectorize=False)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    expected_eval = sum(query_loss(model, params, t, 0.05, 2, first_order=True).item() for t in tasks) / 3
    assert trainer.evaluate(_TaskDataset(tasks)) == pytest.approx(expected_eval, rel=1e-10)
    # train_step: the loss before the update and one SGD step on the second-order meta-gradient
    meta_loss = sum(query_loss(model, params, t, 0.05, 2) for t in tasks) / 3
    grads = torch.autograd.grad(meta_loss, list(params.values()))
    assert trainer.train_step(_TaskDataset(tasks)) == pytest.approx(meta_loss.item(), rel=1e-10)
    for (name, p), g in zip(params.items(), grads):
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), p.detach() - 0.1 * g, rtol=1e-10, atol=1e-12)
    history = trainer.fit(1, 2, eval_tasks=_TaskDataset(tasks), progress=False)
    assert history.eval_loss == [pytest.approx(trainer.evaluate(tasks), rel=1e-12)]


class _EndlessTaskDataset(torch.utils.data.Dataset):
    """Map-style and of length 3, with a __getitem__ that answers past the end (torch's samplers
    read only range(len)), and one that raises KeyError there (a dict behind it)."""

    def __init__(self, tasks, endless: bool):
        self.tasks, self.endless = {index: task for index, task in enumerate(tasks)}, endless

    def __len__(self):
        return len(self.tasks)

    def __getitem__(self, index):
        return self.tasks[index % len(self.tasks)] if self.endless else self.tasks[index]


@pytest.mark.parametrize("endless", [True, False], ids=["answers-past-the-end", "dict-backed"])
def test_a_map_style_dataset_is_read_at_range_of_its_length(endless):
    """Read by the old index-until-IndexError protocol, the first hung (memory growing) and the
    second raised KeyError 3: both hold 3 tasks, as torch's DataLoader reads them."""
    tasks = fixed_tasks(3)
    meta = MAML(make_model(), torch.optim.SGD, lr=0.1, inner_lr=0.05, inner_steps=2)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler(fixed_tasks(2, seed=5)), vectorize=False)
    assert trainer.evaluate(_EndlessTaskDataset(tasks, endless)) == trainer.evaluate(tasks)


def test_train_step_keeps_the_count_of_consecutive_skipped_steps():
    """Only fit counted skipped meta-steps in a row: after fit(2) skipped both, a taken
    train_step did not reset the count and fit(1) skipping once raised '3 consecutive'; a
    skipped train_step did not count. max_skipped_steps=3 throughout."""
    good = fixed_tasks(2, seed=1)
    bad = [t for seed in (2, 3, 4, 5) for t in fixed_tasks(2, seed=seed)]
    for t in bad:
        t.query_y[0] = float("nan")

    def trainer():
        return MetaTrainer(MAML(make_model(), torch.optim.SGD, lr=0.1), F.mse_loss, ListSampler(bad), max_skipped_steps=3)

    first = trainer()
    with pytest.warns(RuntimeWarning, match="the meta-step is skipped"):
        first.fit(2, 2, progress=False)
        assert first.meta.skipped_steps == 2
        first.train_step(good)  # taken: the count starts again
        assert first.meta.skipped_steps == 2
        first.fit(1, 2, progress=False)  # one skipped step in a row, below the bound
    assert first.meta.skipped_steps == 3 and first.iteration == 3

    second = trainer()
    with pytest.warns(RuntimeWarning, match="the meta-step is skipped"):
        second.fit(1, 2, progress=False)
        second.train_step(bad[6:])  # skipped: the second in a row
        with pytest.raises(RuntimeError, match=r"^MetaTrainer\.fit: 3 consecutive meta-steps were skipped .* at iteration 2\)"):
            second.fit(1, 2, progress=False)
    assert second.meta.skipped_steps == 3


class _StateOnAnotherDevice(torch.Tensor):
    """A random state as ``torch.load(path, map_location="cuda")`` leaves it, on a CPU-only
    machine: a ``uint8`` tensor that reports another device (``torch.set_rng_state`` and
    ``Generator.set_state`` refuse it) and whose ``.cpu()``/``.to("cpu")`` gives its bytes back."""

    @staticmethod
    def __new__(cls, data, device="cuda"):
        state = torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, device=device, strides=data.stride())
        state.data_on_cpu = data
        return state

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        (state,) = args[:1]
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu"):
            return state.data_on_cpu.clone()
        if func in (torch.ops.aten.clone.default, torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return cls(state.data_on_cpu.clone(), state.device)
        raise NotImplementedError(f"{func} on a state held on {state.device}")


def _as_if_mapped_to_cuda(state):
    """``state`` with every random state moved off the CPU, as map_location="cuda" moves them."""
    mapped = dict(state)
    mapped["rng"] = _StateOnAnotherDevice(state["rng"])
    mapped["sampler"] = {"generator": _StateOnAnotherDevice(state["sampler"]["generator"])}
    return mapped


def test_a_checkpoint_whose_random_states_were_mapped_off_the_cpu_resumes_bit_for_bit():
    """torch.load(path, map_location="cuda") moves every tensor of a checkpoint to the GPU,
    the random states too: the model and the outer optimizer load from there (torch's optimizers
    take their state to the parameters' device), but torch.set_rng_state and Generator.set_state
    refused the states ("RNG state must be a torch.ByteTensor"). They are moved back to the CPU."""
    whole = _trainer("maml", 0, False)
    whole.fit(4, 3, progress=False)
    first = _trainer("maml", 0, False)
    first.fit(2, 3, progress=False)
    state = _as_if_mapped_to_cuda(_checkpoint_round_trip(first))
    assert state["rng"].device.type == "cuda" and state["sampler"]["generator"].device.type == "cuda"
    with pytest.raises(TypeError, match="RNG state must be a torch.ByteTensor"):
        torch.set_rng_state(state["rng"])  # what torch itself does with such a state
    resumed = _trainer("maml", 5, False)
    resumed.load_state_dict(state)
    resumed.fit(2, 3, progress=False)
    assert resumed.history == whole.history
    for p, q in zip(_meta_weights(resumed), _meta_weights(whole)):
        assert torch.equal(p, q)
    assert resumed.state_dict()["sampler"]["generator"].device.type == "cpu"

    sampler = SinusoidTaskSampler(seed=5)  # a sampler restored on its own takes it as well
    sampler.load_state_dict({"generator": _StateOnAnotherDevice(first.sampler.state_dict()["generator"])})
    assert torch.equal(sampler.state_dict()["generator"], first.sampler.state_dict()["generator"])


@pytest.mark.parametrize(
    "rng, error, match",
    [
        (torch.zeros(5056, dtype=torch.float32), TypeError, r"state_dict\['rng'\] must be a random state \(a 1-D torch.uint8 tensor\), got a tensor of dtype torch.float32"),
        (torch.zeros(2, 5056, dtype=torch.uint8), TypeError, r"state_dict\['rng'\] must be a random state \(a 1-D torch.uint8 tensor\), got a tensor of shape \(2, 5056\)"),
        ([torch.zeros(5056, dtype=torch.int64)], TypeError, r"state_dict\['rng'\]\[0\] must be a random state \(a 1-D torch.uint8 tensor\), got a tensor of dtype torch.int64"),
    ],
)
def test_a_checkpoint_whose_random_state_is_no_byte_tensor_is_refused_by_name(rng, error, match):
    source = _trainer("maml", 0, False)
    source.fit(1, 2, progress=False)
    state = source.state_dict()
    state["rng"] = rng
    target = _trainer("maml", 5, False)
    before = target.state_dict()
    with pytest.raises(error, match=match):
        target.load_state_dict(state)
    assert _same(target.state_dict(), before)


def _training_key(paths):
    (key,) = [k for k in paths["timings"] if not k[0]]
    return key


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (lambda paths: paths.pop("failed"), ValueError, r"state_dict\['paths'\] must hold exactly \['path', 'failed', 'timings', 'fallback_reasons'\], got \['fallback_reasons', 'path', 'timings'\]"),
        (lambda paths: paths.update(failed=["vmap"]), TypeError, r"state_dict\['paths'\]\['failed'\] must be a dict of \{path: reason\}, got \['vmap'\]"),
        (lambda paths: paths.update(failed={"jit": "boom"}), ValueError, r"state_dict\['paths'\]\['failed'\] keys must be one of \['loop', 'vmap', 'compiled'\], got 'jit'"),
        (lambda paths: paths.update(timings=[1.0]), TypeError, r"state_dict\['paths'\]\['timings'\] must be a dict of \{key: \{path: \[seconds, \.\.\.\]\}\}, got \[1.0\]"),
        (lambda paths: paths["timings"].update({_training_key(paths): {"loop": ["fast", "slow"]}}), TypeError, r"state_dict\['paths'\]\['timings'\]\[.*\]\['loop'\]\[0\] must be a finite number >= 0, got 'fast'"),
        (lambda paths: paths["timings"].update({_training_key(paths): {"loop": [-1.0]}}), ValueError, r"\['loop'\]\[0\] must be a finite number >= 0, got -1.0"),
        (lambda paths: paths.update(fallback_reasons="unequal task shapes"), TypeError, r"state_dict\['paths'\]\['fallback_reasons'\] must be a list of str, got 'unequal task shapes'"),
    ],
    ids=["missing", "failed-list", "failed-unknown-path", "timings-list", "duration-str", "duration-negative", "reasons-str"],
)
def test_a_checkpoint_whose_paths_are_not_the_trainers_is_refused_before_anything_changes(damage, error, match):
    """The path measurements were taken as they came: a damaged "paths" raised KeyError or
    AttributeError without naming it, a string of fallback reasons loaded as a set of its
    characters, and non-numeric durations loaded and broke the next fit in the middle of an
    iteration ("'<' not supported between instances of 'float' and 'str'")."""
    source = _trainer("maml", 0, None)
    source.fit(5, 2, progress=False)
    state = source.state_dict()
    damage(state["paths"])
    target = _trainer("maml", 5, None)
    target.fit(1, 2, progress=False)
    before = target.state_dict()
    with pytest.raises(error, match=match):
        target.load_state_dict(state)
    assert _same(target.state_dict(), before)


def test_a_sampler_may_return_any_iterable_of_tasks_and_is_named_when_it_returns_none():
    """train_step takes any iterable of tasks, and so did fit with several processes
    (sample_shard lists what sample returns), but fit with one process took len() of what
    sample returned: a generator failed with "object of type 'generator' has no len()", None
    with "object of type 'NoneType' has no len()", neither naming the sampler."""

    class GeneratorSampler(ListSampler):
        def sample(self, n):
            return (task for task in super().sample(n))

    class NoneSampler:
        def sample(self, n):
            return None

    tasks = fixed_tasks(6)
    expected = MetaTrainer(MAML(make_model(), torch.optim.SGD, lr=0.1), F.mse_loss, ListSampler(tasks), vectorize=False)
    expected.fit(3, 2, progress=False)
    trainer = MetaTrainer(MAML(make_model(), torch.optim.SGD, lr=0.1), F.mse_loss, GeneratorSampler(tasks), vectorize=False)
    trainer.fit(3, 2, progress=False)
    assert trainer.history == expected.history
    assert all(torch.equal(p, q) for p, q in zip(_meta_weights(trainer), _meta_weights(expected)))

    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = MetaTrainer(MAML(model, torch.optim.SGD, lr=0.1), F.mse_loss, NoneSampler())
    with pytest.raises(TypeError, match=r"^sampler.sample\(2\) must be a sequence of Task, got None$"):
        trainer.fit(1, 2, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and trainer.iteration == 0


def test_the_progress_bars_running_loss_leaves_out_a_skipped_steps_non_finite_loss(monkeypatch):
    """The bar shows an exponential moving average of the meta-loss: one skipped step's inf made
    it inf (or NaN) for the rest of the run, however well training went on."""
    good, bad = fixed_tasks(6, seed=1), fixed_tasks(2, seed=2)
    for t in bad:
        t.query_y[0] = float("inf")
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    meta = MAML(make_model(), torch.optim.SGD, lr=0.1)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler(good[:2] + bad + good[2:]))
    with pytest.warns(RuntimeWarning, match="the meta-step is skipped"):
        history = trainer.fit(4, 2, progress=True)
    assert meta.skipped_steps == 1 and not math.isfinite(history.meta_loss[1])
    first, _, third, fourth = history.meta_loss
    running = 0.95 * (0.95 * first + 0.05 * third) + 0.05 * fourth
    final = stream.getvalue().rstrip("\n").split("\r")[-1]
    assert final.startswith("meta-train 100%") and final.endswith(f"loss={running:.4g}")


# -- schedule-free outer optimizers: evaluated in eval mode, trained in train mode -----------------


def _schedule_free_trainer(tasks, loss_fn=F.mse_loss):
    schedule_free = pytest.importorskip("pytorch_optimizer").ScheduleFreeAdamW
    meta = MAML(make_model(), schedule_free, lr=0.05, inner_lr=0.05, inner_steps=1)
    return MetaTrainer(meta, loss_fn, ListSampler(tasks), vectorize=False)


def _train_modes(trainer):
    return [group["train_mode"] for group in trainer.meta.outer.param_groups]


def _switchable_mse(message):
    """An MSE loss that raises ``RuntimeError(message)`` while ``failing[0]`` is true: (loss, failing)."""
    failing = [False]

    def loss_fn(prediction, target):
        if failing[0]:
            raise RuntimeError(message)
        return F.mse_loss(prediction, target)

    return loss_fn, failing


def test_a_schedule_free_outer_optimizer_is_evaluated_at_its_averaged_weights():
    """fit's evaluations (and evaluate) were taken at the training-sequence weights of a
    ScheduleFreeAdamW outer optimizer, not at the averaged ones it evaluates at; now they equal a
    hand-written loop's outer.eval() / evaluate / outer.train(), and eval_every changes neither the
    training run nor the mode fit ends in."""
    tasks, eval_tasks = fixed_tasks(8), fixed_tasks(2, seed=9)
    trainer = _schedule_free_trainer(tasks)
    history = trainer.fit(4, 2, eval_every=2, eval_tasks=eval_tasks, progress=False)

    reference = _schedule_free_trainer(tasks)
    meta, outer = reference.meta, reference.meta.outer
    params = list(meta.model.parameters())
    meta_losses, eval_losses, at_training_weights = [], [], []
    for it in range(1, 5):
        meta_losses.append(reference.train_step(tasks[2 * it - 2 : 2 * it]))
        if it % 2 == 0:
            at_training_weights.append(meta.evaluate(eval_tasks, F.mse_loss, vectorize=False))
            training = [p.detach().clone() for p in params]
            outer.eval()
            eval_losses.append(meta.evaluate(eval_tasks, F.mse_loss, vectorize=False))
            outer.train()
            with torch.no_grad():  # the round trip rounds: the training weights, exactly
                for p, t in zip(params, training):
                    p.copy_(t)
    assert history.meta_loss == meta_losses and history.eval_iterations == [2, 4]
    assert history.eval_loss == eval_losses
    assert all(a != b for a, b in zip(eval_losses, at_training_weights))  # the test can tell
    assert trainer.evaluate(eval_tasks) == eval_losses[-1]
    # Nothing of the evaluations stays behind: the weights of a run without them, in train mode.
    unevaluated = _schedule_free_trainer(tasks)
    unevaluated.fit(4, 2, progress=False)
    assert _train_modes(trainer) == _train_modes(unevaluated) == [True]
    assert all(torch.equal(p, q) for p, q in zip(_meta_weights(trainer), _meta_weights(unevaluated)))
    assert all(torch.equal(p, q) for p, q in zip(_meta_weights(trainer), _meta_weights(reference)))


def test_a_schedule_free_evaluation_that_raises_leaves_train_mode_and_the_weights():
    tasks, eval_tasks = fixed_tasks(4), fixed_tasks(2, seed=9)
    loss_fn, failing = _switchable_mse("evaluation failed")
    trainer = _schedule_free_trainer(tasks, loss_fn)
    trainer.fit(2, 2, progress=False)
    before = [p.detach().clone() for p in _meta_weights(trainer)]
    expected = trainer.evaluate(eval_tasks)
    failing[0] = True
    with pytest.raises(RuntimeError, match="^evaluation failed$"):
        trainer.evaluate(eval_tasks)
    assert _train_modes(trainer) == [True]
    assert all(torch.equal(p, q) for p, q in zip(_meta_weights(trainer), before))
    failing[0] = False
    assert trainer.evaluate(eval_tasks) == expected


def test_train_step_switches_a_schedule_free_outer_optimizer_in_eval_mode_to_train_mode():
    """After meta.eval() (to use the averaged weights), evaluate takes them as they are, and
    train_step stepped from them in eval mode; now it switches to train mode first, as the hand
    loop does, and a meta-step that raises leaves eval mode and the averaged weights, bit for bit."""
    tasks, eval_tasks = fixed_tasks(6), fixed_tasks(2, seed=9)
    loss_fn, failing = _switchable_mse("meta-step failed")
    trainer, reference = _schedule_free_trainer(tasks, loss_fn), _schedule_free_trainer(tasks)
    for t in (trainer, reference):
        t.fit(2, 2, progress=False)
    trainer.meta.eval()
    averaged = [p.detach().clone() for p in _meta_weights(trainer)]
    expected = trainer.meta.evaluate(eval_tasks, F.mse_loss, vectorize=False)
    assert trainer.evaluate(eval_tasks) == expected and _train_modes(trainer) == [False]
    failing[0] = True
    with pytest.raises(RuntimeError, match="^meta-step failed$"):
        trainer.train_step(tasks[4:])
    assert _train_modes(trainer) == [False]
    assert all(torch.equal(p, q) for p, q in zip(_meta_weights(trainer), averaged))
    failing[0] = False
    reference.meta.outer.eval()
    reference.meta.outer.train()
    assert trainer.train_step(tasks[4:]) == reference.train_step(tasks[4:])
    assert _train_modes(trainer) == [True]
    assert all(torch.equal(p, q) for p, q in zip(_meta_weights(trainer), _meta_weights(reference)))


def test_a_resumed_schedule_free_run_matches_the_uninterrupted_one():
    tasks, eval_tasks = fixed_tasks(8), fixed_tasks(2, seed=9)
    uninterrupted = _schedule_free_trainer(tasks)
    uninterrupted.fit(4, 2, eval_every=1, eval_tasks=eval_tasks, progress=False)
    first = _schedule_free_trainer(tasks)
    saved = []
    first.fit(2, 2, eval_every=1, eval_tasks=eval_tasks, callback=lambda i, loss: saved.append(first.state_dict()), progress=False)
    resumed = _schedule_free_trainer(tasks)
    resumed.sampler.position = 4
    resumed.load_state_dict(saved[-1])
    assert _train_modes(resumed) == _train_modes(uninterrupted) == [True]
    resumed.fit(2, 2, eval_every=1, eval_tasks=eval_tasks, progress=False)
    assert resumed.history == uninterrupted.history and _train_modes(resumed) == [True]
    assert all(torch.equal(p, q) for p, q in zip(_meta_weights(resumed), _meta_weights(uninterrupted)))


def _splus_trainer(model, tasks):
    splus = pytest.importorskip("pytorch_optimizer").SPlus
    return MetaTrainer(MAML(model, splus, lr=0.05, inner_lr=0.05, inner_steps=1), F.mse_loss, ListSampler(tasks), vectorize=False)


def test_a_baseline_evaluation_before_the_first_step_leaves_a_schedule_free_run_as_without_it():
    """SPlus (train()/eval(), its mode in its groups) has nothing to average before its first
    step: evaluate() there raised its KeyError from eval() and left a key in its state that made
    every later step raise; now it evaluates the weights as they are and fit runs as without it."""
    tasks, eval_tasks = fixed_tasks(4), fixed_tasks(2, seed=9)
    trainer, unevaluated = _splus_trainer(make_model(), tasks), _splus_trainer(make_model(), tasks)
    assert trainer.evaluate(eval_tasks) == unevaluated.meta.evaluate(eval_tasks, F.mse_loss, vectorize=False)
    assert trainer.fit(2, 2, progress=False).meta_loss == unevaluated.fit(2, 2, progress=False).meta_loss
    assert all(torch.equal(p, q) for p, q in zip(_meta_weights(trainer), _meta_weights(unevaluated)))


def test_a_schedule_free_eval_that_raises_leaves_the_outer_state_as_it_was():
    """SPlus's eval() keeps each parameter's training weights in its state, then raises at a
    parameter that never had a gradient (no average): the keys it added stayed in the state
    (and its checkpoints); now the state, the modes and the weights are as before."""

    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.unused = make_model(), nn.Linear(1, 1).to(DT)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    tasks = fixed_tasks(4)
    trainer = _splus_trainer(WithUnused(), tasks)
    trainer.fit(2, 2, progress=False)
    meta = trainer.meta
    keys, weights = [sorted(entry) for entry in meta.state.values()], _meta_weights(trainer)
    with pytest.raises(KeyError, match="ema"):
        trainer.evaluate(fixed_tasks(2, seed=9))
    assert [sorted(entry) for entry in meta.state.values()] == keys
    assert [group["train_mode"] for group in meta.param_groups] == [True]
    assert all(torch.equal(p, q) for p, q in zip(_meta_weights(trainer), weights))


def test_an_outer_optimizer_without_train_and_eval_is_evaluated_as_before():
    """Adam has no train()/eval(): fit's evaluations and steps are the hand loop's, bit for bit."""
    tasks, eval_tasks = fixed_tasks(8), fixed_tasks(2, seed=9)
    trainer = MetaTrainer(MAML(make_model(), torch.optim.Adam, lr=0.05), F.mse_loss, ListSampler(tasks), vectorize=False)
    assert not hasattr(trainer.meta, "train") and not hasattr(trainer.meta, "eval")
    history = trainer.fit(4, 2, eval_every=2, eval_tasks=eval_tasks, progress=False)
    reference = MetaTrainer(MAML(make_model(), torch.optim.Adam, lr=0.05), F.mse_loss, ListSampler([]), vectorize=False)
    meta_losses, eval_losses = [], []
    for it in range(1, 5):
        meta_losses.append(reference.train_step(tasks[2 * it - 2 : 2 * it]))
        if it % 2 == 0:
            eval_losses.append(reference.meta.evaluate(eval_tasks, F.mse_loss, vectorize=False))
    assert history.meta_loss == meta_losses and history.eval_loss == eval_losses
    assert all(torch.equal(p, q) for p, q in zip(_meta_weights(trainer), _meta_weights(reference)))
