"""Path choice (loop / vmap) by the one PathPolicy: measurement, fallback, the trainer's use of
it in training and evaluation, and the memory behaviour of the loop path."""

from __future__ import annotations

import re
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from meta_helpers import ItemModel, ListSampler
from samgria import MAML, InnerLoop, MetaTrainer, PathPolicy
from samgria.data.task import Task

DT = torch.float64


def make_tasks(n, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Task(*(torch.randn(k, s, generator=g, dtype=DT) for s in (2, 1, 2, 1))) for _ in range(n)]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).to(DT)



def test_decided_agrees_with_choose_when_every_candidate_has_failed_and_both_refuse_none():
    """choose falls back to the last candidate when all have failed; decided, which says what
    choose settles on, raised Python's bare 'min() arg is an empty sequence' there, and both did
    for an empty candidate list."""
    policy = PathPolicy("M")
    policy.failed["vmap"] = "RuntimeError: no batching rule"
    assert policy.choose("key", ["vmap"]) == policy.decided("key", ["vmap"]) == "vmap"
    for method in (policy.choose, policy.decided):
        with pytest.raises(ValueError, match=r"^candidates must name at least one path, got \[\]$"):
            method("key", [])

def test_choose_measures_each_candidate_then_keeps_the_fastest():
    policy = PathPolicy("M", trials=2)
    seen = []
    durations = {"loop": [3.0, 2.0], "vmap": [1.5, 1.0]}
    for _ in range(4):
        path = policy.choose("key", ["loop", "vmap"])
        seen.append(path)
        policy.timings.setdefault("key", {}).setdefault(path, []).append(durations[path][len(policy.timings["key"].get(path, []))])
    assert sorted(seen) == ["loop", "loop", "vmap", "vmap"]  # interleaved trials, two each
    assert policy.choose("key", ["loop", "vmap"]) == "vmap"
    assert policy.decided("key", ["loop", "vmap"]) == "vmap"
    assert policy.decided("other", ["loop", "vmap"]) is None  # each key is measured on its own
    assert policy.choose("key", ["loop"]) == "loop"  # a single candidate is never measured


def test_timed_records_the_duration_of_each_use():
    policy = PathPolicy("M")
    assert policy.timed("k", "loop", lambda: 7) == 7
    assert len(policy.timings["k"]["loop"]) == 1 and policy.timings["k"]["loop"][0] >= 0


@pytest.mark.parametrize("vectorize", [None, True, False])
def test_timings_stop_growing_once_the_choice_is_measured(vectorize):
    """Every iteration appended a float to the timings, also on a fixed path: they grew without
    bound, in memory and in every checkpoint (300 entries after 300 iterations)."""
    meta = MAML(mlp(), torch.optim.SGD, lr=0.05, inner_lr=0.1)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler(make_tasks(40)), vectorize=vectorize)
    for i in range(8):
        trainer.train_step(make_tasks(2, seed=i))
        trainer.evaluate(make_tasks(2, seed=100 + i))
    policy = meta.path_policy
    assert policy.timings  # measured
    for per_path in policy.timings.values():
        assert all(len(times) <= policy.trials for times in per_path.values()), policy.timings
    saved = trainer.state_dict()["paths"]
    trainer.train_step(make_tasks(2, seed=99))
    assert trainer.state_dict()["paths"] == saved
    policy = PathPolicy("M", trials=3)
    for _ in range(5):
        policy.timed("k", "loop", lambda: None)
    assert len(policy.timings["k"]["loop"]) == 3


MAX_KEYS = 32  # PathPolicy's default max_keys


def test_timings_keep_the_most_recently_used_keys_up_to_max_keys():
    """The timings kept every key ever timed: with a key that changes at every iteration
    (variable-shot episodes, sizes drawn at random) they grew by one entry per iteration, in
    memory and in every checkpoint. They now keep the max_keys most recently used keys, in the
    order of a hand-written least-recently-used list."""
    default = PathPolicy("M")
    for i in range(3 * MAX_KEYS):
        default.timed(("shape", i), "loop", lambda: None)
    assert list(default.timings) == [("shape", i) for i in range(2 * MAX_KEYS, 3 * MAX_KEYS)]
    assert default.max_keys == MAX_KEYS

    policy = PathPolicy("M", trials=1, max_keys=3)
    recent = []  # the reference: least recently used first
    for key in ["a", "b", "c", "a", "d", "e", "a", "c", "f", "f", "b"]:
        path = policy.choose(key, ["loop", "vmap"])
        policy.timed(key, path, lambda: None)
        recent = [k for k in recent if k != key][-2:] + [key]
        assert list(policy.timings) == recent
        assert all(len(times) <= 1 for per_path in policy.timings.values() for times in per_path.values())
    assert policy.decided("a", ["loop", "vmap"]) is None  # forgotten, measured again if it comes back
    assert policy.choose("a", ["loop", "vmap"]) == "loop"


def test_a_key_in_use_keeps_its_measured_choice_among_many_one_off_keys():
    """The common case -- a fixed training shape, evaluations (or episodes) of other shapes --
    is measured once, as before the bound, and keeps its choice however many other keys come
    and go."""
    policy = PathPolicy("M", trials=2)
    durations = {"loop": [3.0, 2.0], "vmap": [1.5, 1.0]}
    seen = []
    for i in range(3 * MAX_KEYS):
        path = policy.choose("fixed", ["loop", "vmap"])
        seen.append(path)
        times = policy.timings["fixed"].setdefault(path, [])
        if len(times) < policy.trials:
            times.append(durations[path][len(times)])
        one_off = ("episode", i)
        policy.timed(one_off, policy.choose(one_off, ["loop", "vmap"]), lambda: None)
        assert len(policy.timings) <= MAX_KEYS
    assert sorted(seen[:4]) == ["loop", "loop", "vmap", "vmap"] and set(seen[4:]) == {"vmap"}
    assert policy.timings["fixed"] == durations
    assert policy.decided("fixed", ["loop", "vmap"]) == "vmap"


def test_run_falls_back_and_blames_the_path_only_when_the_fallback_works():
    policy = PathPolicy("M")

    def broken_vmap(path):
        if path == "vmap":
            raise RuntimeError("cannot vmap this")
        return path

    with pytest.warns(RuntimeWarning, match=r"M: the vmap path failed \(RuntimeError: cannot vmap this\); this step ran on the loop path, and the vmap path is not tried again"):
        assert policy.run("vmap", "loop", broken_vmap, explicit=False) == ("loop", "loop")
    assert policy.failed == {"vmap": "RuntimeError: cannot vmap this"}
    assert policy.usable(["loop", "vmap"]) == ["loop"]
    with pytest.raises(RuntimeError, match=r"M: the vmap path failed earlier \(RuntimeError: cannot vmap this\)"):
        policy.run("vmap", "loop", broken_vmap, explicit=True)

    def always_broken(path):
        raise KeyError("user bug")

    fresh = PathPolicy("M")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KeyError, match="user bug"):
            fresh.run("vmap", "loop", always_broken, explicit=False)
    assert fresh.failed == {}  # the loop failed too: the error was the user's, not vmap's


def test_run_raises_when_the_path_was_asked_for():
    policy = PathPolicy("M")
    with pytest.raises(RuntimeError, match=r"^boom") as raised:
        policy.run("vmap", "loop", lambda path: (_ for _ in ()).throw(RuntimeError("boom")), explicit=True)
    assert getattr(raised.value, "__notes__", ["M: raised on the vmap path, which was asked for"]) == [
        "M: raised on the vmap path, which was asked for"
    ]
    # The error keeps its type (code that catches an out-of-memory error still does) and, raised
    # through two nested runs of the same path, carries the note once.
    inner = PathPolicy("M")

    def out_of_memory(path):
        raise torch.OutOfMemoryError("out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError, match=r"^out of memory \(simulated\)") as raised:
        policy.run("vmap", "loop", lambda path: inner.run(path, "loop", out_of_memory, explicit=True), explicit=True)
    assert getattr(raised.value, "__notes__", ["M: raised on the vmap path, which was asked for"]) == [
        "M: raised on the vmap path, which was asked for"
    ]
    with pytest.raises(ValueError, match="bad input"):  # ValueError is never a path failure
        policy.run("vmap", "loop", lambda path: (_ for _ in ()).throw(ValueError("bad input")), explicit=False)
    assert policy.failed == {}


# ---------------------------------------------------------------------- the trainer
def test_trainer_measures_both_paths_then_uses_the_faster_one():
    meta = MAML(mlp(), torch.optim.SGD, lr=0.05, inner_lr=0.1)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler(make_tasks(12)))
    used = []
    for i in range(6):
        trainer.train_step(make_tasks(2, seed=i))
        used.append(trainer.path)
    assert sorted(used[:4]) == ["loop", "loop", "vmap", "vmap"]
    (key,) = [k for k in meta.path_policy.timings if k[0] is False]
    fastest = meta.path_policy.decided(key, ["loop", "vmap"])
    assert fastest in ("loop", "vmap") and used[4:] == [fastest, fastest]


def test_trainer_paths_give_the_same_update():
    weights = []
    for vectorize in (False, True):
        model = mlp()
        meta = MAML(model, torch.optim.SGD, lr=0.05, inner_lr=0.1, inner_steps=2)
        trainer = MetaTrainer(meta, F.mse_loss, ListSampler([]), vectorize=vectorize)
        trainer.train_step(make_tasks(4))
        assert trainer.path == ("vmap" if vectorize else "loop")
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_second_order_through_batchnorm_trains_on_the_loop_without_measuring():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).to(DT)
    meta = MAML(model, torch.optim.SGD, lr=0.05)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler([]))
    for i in range(3):
        trainer.train_step(make_tasks(2, seed=i))
        assert trainer.path == "loop"
    assert all(set(times) == {"loop"} for times in meta.path_policy.timings.values())


def test_vectorize_reaches_evaluate():
    torch.manual_seed(0)
    meta = MAML(ItemModel().to(DT), torch.optim.SGD, lr=0.1, inner_lr=0.1)
    tasks = make_tasks(3)
    with pytest.raises(RuntimeError, match=r"\.item\(\)") as raised:  # torch.func's own error
        MetaTrainer(meta, F.mse_loss, ListSampler([]), vectorize=True).evaluate(tasks)
    if hasattr(raised.value, "add_note"):  # Python 3.11+: once, though two path policies ran it
        assert raised.value.__notes__ == ["MAML: raised on the vmap path, which was asked for"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loop was asked for: vmap is not even tried
        value = MetaTrainer(meta, F.mse_loss, ListSampler([]), vectorize=False).evaluate(tasks)
    assert value == pytest.approx(meta.evaluate(tasks, F.mse_loss, vectorize=False), rel=0, abs=0)


def first_order_eval_loss(model, tasks, lr):
    """Reference: the mean query loss after one plain SGD step on each support set."""
    params = dict(model.named_parameters())
    total = 0.0
    for t in tasks:
        support_loss = F.mse_loss(functional_call(model, params, (t.support_x,)), t.support_y)
        grads = torch.autograd.grad(support_loss, list(params.values()))
        fast = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        total += F.mse_loss(functional_call(model, fast, (t.query_x,)), t.query_y).item()
    return total / len(tasks)


def test_trainer_evaluate_falls_back_to_the_loop_once_with_a_warning_and_remembers():
    """vectorize=None: evaluation measures loop and vmap; vmap fails on this model, so it falls
    back to the loop once, with one warning, and every later evaluation takes the loop."""
    torch.manual_seed(0)
    model = ItemModel().to(DT)
    meta = MAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.1)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler([]))
    tasks = make_tasks(3)
    expected = first_order_eval_loss(model, tasks, 0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = [trainer.evaluate(tasks) for _ in range(4)]
    assert values == pytest.approx([expected] * 4, rel=1e-12)
    fallbacks = [w for w in caught if "path failed" in str(w.message)]
    assert len(fallbacks) == 1 and issubclass(fallbacks[0].category, RuntimeWarning)
    message = str(fallbacks[0].message)
    assert message.startswith("MAML: the vmap path failed") and message.endswith("this step ran on the loop path, and the vmap path is not tried again")
    assert "vmap" in meta.path_policy.failed


def test_fit_evaluating_every_iteration_survives_a_model_vmap_cannot_run():
    """Training on the loop only (checkpointed steps) never tries vmap; evaluation does, and its
    fallback must not end fit at the second evaluation."""
    torch.manual_seed(0)
    meta = MAML(ItemModel().to(DT), torch.optim.SGD, lr=0.1, inner_lr=0.1, checkpoint_inner_steps=True)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler(make_tasks(8, seed=1)))
    eval_tasks = make_tasks(2, seed=2)
    with pytest.warns(RuntimeWarning, match=r"^MAML: the vmap path failed"):
        history = trainer.fit(4, 2, eval_every=1, eval_tasks=eval_tasks, progress=False)
    assert history.eval_iterations == [1, 2, 3, 4]
    assert history.eval_loss[-1] == pytest.approx(first_order_eval_loss(meta.model, eval_tasks, 0.1), rel=1e-12)


def test_evaluate_accepts_inner_steps_and_its_former_name():
    meta = MAML(mlp(), torch.optim.SGD, lr=0.1, inner_lr=0.1)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler([]), vectorize=False)
    tasks = make_tasks(2)
    assert trainer.evaluate(tasks, inner_steps=3) == trainer.evaluate(tasks, steps=3)
    assert trainer.evaluate(tasks, inner_steps=3) != trainer.evaluate(tasks, inner_steps=0)
    with pytest.raises(TypeError, match=r"give inner_steps or its former name steps, not both; got inner_steps=1, steps=2"):
        trainer.evaluate(tasks, inner_steps=1, steps=2)


def test_meta_step_is_the_former_name_of_train_step():
    assert MetaTrainer.meta_step is MetaTrainer.train_step


# ---------------------------------------------------------------------- memory of the loop path
def _peak_saved_bytes(run):
    """Peak bytes of tensors saved for backward that are alive at once while ``run()`` runs."""
    alive = {"now": 0, "peak": 0}

    class Held:
        def __init__(self, tensor):
            self.tensor = tensor

    def release(nbytes):
        alive["now"] -= nbytes

    def pack(tensor):
        held = Held(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        alive["now"] += nbytes
        alive["peak"] = max(alive["peak"], alive["now"])
        weakref.finalize(held, release, nbytes)
        return held

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.tensor):
        run()
    return alive["peak"]


def test_loop_path_memory_does_not_grow_with_the_meta_batch():
    def peak(n_tasks):
        meta = MAML(mlp(), torch.optim.SGD, lr=0.05, inner_lr=0.1, inner_steps=2)
        trainer = MetaTrainer(meta, F.mse_loss, ListSampler([]), vectorize=False)
        return _peak_saved_bytes(lambda: trainer.train_step(make_tasks(n_tasks, k=64)))

    one, sixteen = peak(1), peak(16)
    assert one > 0
    assert sixteen < 1.5 * one  # one task's second-order graph at a time, not sixteen


def test_checkpointed_inner_steps_keep_less_saved_memory_and_the_same_gradient():
    def run(checkpoint):
        model = mlp()
        meta = MAML(model, torch.optim.SGD, lr=0.05, inner_lr=0.1, inner_steps=8, checkpoint_inner_steps=checkpoint)
        tasks = make_tasks(1, k=64)

        def meta_backward():
            meta.zero_grad()
            meta.task_losses(tasks, F.mse_loss, vectorize=False).sum().backward()

        peak = _peak_saved_bytes(meta_backward)
        return peak, [p.grad.clone() for p in model.parameters()]

    (plain_peak, plain), (ckpt_peak, ckpt) = run(False), run(True)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ckpt_peak < 0.5 * plain_peak


def test_checkpointed_inner_steps_cannot_be_vmapped():
    meta = MAML(mlp(), torch.optim.SGD, lr=0.05, checkpoint_inner_steps=True)
    with pytest.raises(ValueError, match=r"vectorize=True cannot be honoured: checkpointed inner steps need the loop path"):
        meta.task_losses(make_tasks(2), F.mse_loss, vectorize=True)
    with pytest.raises(TypeError, match=r"checkpoint_inner_steps must be a bool, got 1"):
        MAML(mlp(), torch.optim.SGD, lr=0.05, checkpoint_inner_steps=1)


def test_trainer_evaluates_with_its_own_inner_loop():
    from samgria import AdamInnerStep

    meta = MAML(mlp(), torch.optim.SGD, lr=0.1, inner_lr=0.1, inner_steps=2)
    tasks = make_tasks(2)
    rule = AdamInnerStep()
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler([]), vectorize=False, inner_step_fn=rule)
    with_rule = meta.evaluate(tasks, F.mse_loss, vectorize=False, inner_step_fn=rule)
    assert trainer.evaluate(tasks) == with_rule
    assert with_rule != meta.evaluate(tasks, F.mse_loss, vectorize=False)  # the rule matters


def test_fit_accepts_numpy_integers():
    np = pytest.importorskip("numpy")
    meta = MAML(mlp(), torch.optim.SGD, lr=0.1, inner_lr=0.1)
    trainer = MetaTrainer(meta, F.mse_loss, ListSampler(make_tasks(4)), vectorize=False)
    history = trainer.fit(np.int64(2), np.int32(2), progress=False)
    assert len(history.meta_loss) == 2
    with pytest.raises(TypeError, match=r"num_iterations must be an integer >= 1, got True"):
        trainer.fit(True, 2, progress=False)
    with pytest.raises(ValueError, match=r"meta_batch_size must be an integer >= 1, got 0"):
        trainer.fit(1, 0, progress=False)


@pytest.mark.parametrize(
    "trials, error, match",
    [
        (0, ValueError, r"^trials must be an integer >= 1, got 0$"),
        (float("nan"), ValueError, r"^trials must be an integer >= 1, got nan$"),
        ("x", TypeError, r"^trials must be an integer >= 1, got 'x'$"),
    ],
    ids=["zero", "nan", "str"],
)
def test_path_policy_checks_trials(trials, error, match):
    """trials is compared with the number of timings; NaN or 0 would fix the choice untimed."""
    with pytest.raises(error, match=match):
        PathPolicy("M", trials=trials)


@pytest.mark.parametrize(
    "max_keys, error, match",
    [
        (0, ValueError, r"^max_keys must be an integer >= 1, got 0$"),
        (2.5, TypeError, r"^max_keys must be an integer >= 1, got 2.5$"),
    ],
    ids=["zero", "float"],
)
def test_path_policy_checks_max_keys(max_keys, error, match):
    with pytest.raises(error, match=match):
        PathPolicy("M", max_keys=max_keys)


@pytest.mark.parametrize("owner", [1, None, b"MAML"], ids=["int", "none", "bytes"])
def test_path_policy_checks_owner(owner):
    """owner names the optimizer in warnings and errors; a non-str was kept and shown as is."""
    with pytest.raises(TypeError, match=rf"^owner must be a str, got {re.escape(repr(owner))}$"):
        PathPolicy(owner)
    assert PathPolicy("MAML").owner == "MAML"


# ---------------------------------------------------------------- InnerLoop checks its fields
def _linear_meta(**kwargs):
    torch.manual_seed(0)
    return MAML(nn.Linear(1, 1).to(DT), torch.optim.SGD, lr=0.1, **{"inner_lr": 0.1, **kwargs})


def _constructor_error(**kwargs):
    """The exception the MetaOptimizer constructor raises for a bad ``inner_steps``,
    ``inner_lr`` or ``first_order`` (the reference: the same rule, the same message)."""
    with pytest.raises((TypeError, ValueError)) as info:
        _linear_meta(**kwargs)
    return info.type, str(info.value)


def _rate_error(name, value):
    """The constructor's exception for ``inner_lr=value``, naming the rate ``lrs[name]``."""
    error, message = _constructor_error(inner_lr=value)
    assert message.startswith("inner_lr must be a finite number >= 0, got ")
    return error, message.replace("inner_lr", f"lrs[{name!r}]", 1)


_BAD_FIELDS = [
    ({"inner_steps": -3}, *_constructor_error(inner_steps=-3)),
    ({"inner_steps": True}, *_constructor_error(inner_steps=True)),
    ({"inner_steps": 1.5}, *_constructor_error(inner_steps=1.5)),
    ({"inner_steps": float("nan")}, *_constructor_error(inner_steps=float("nan"))),
    ({"first_order": "no"}, *_constructor_error(first_order="no")),
    ({"first_order": 0}, *_constructor_error(first_order=0)),
    ({"lrs": {"weight": -1.0, "bias": 0.1}}, *_rate_error("weight", -1.0)),
    ({"lrs": {"weight": 0.1, "bias": float("nan")}}, *_rate_error("bias", float("nan"))),
    ({"lrs": {"weight": float("inf"), "bias": 0.1}}, *_rate_error("weight", float("inf"))),
    ({"lrs": {"weight": True, "bias": 0.1}}, *_rate_error("weight", True)),
    ({"lrs": {"weight": "0.1", "bias": 0.1}}, *_rate_error("weight", "0.1")),
    (
        {"lrs": {"weight": torch.tensor(True), "bias": 0.1}},
        TypeError,
        "lrs['weight'] must be a real number or a real tensor, got a tensor of dtype torch.bool",
    ),
    ({"lrs": {"weight": 0.1}}, ValueError, "lrs has no entry for the adapted parameters ['bias']"),
    ({"lrs": 0.1}, TypeError, "lrs must be a mapping from every adapted name to its step size, got 0.1"),
    ({"adapt_names": "weight"}, TypeError, "adapt_names must be a sequence of parameter names, got 'weight'"),
    ({"adapt_names": ("weight", 3)}, TypeError, "adapt_names must be a sequence of parameter names (str), got ('weight', 3)"),
    ({"track_graph": "no"}, TypeError, "track_graph must be a bool, got 'no'"),
    ({"track_graph": 1}, TypeError, "track_graph must be a bool, got 1"),
    ({"checkpoint": 1}, TypeError, "checkpoint must be a bool, got 1"),
    ({"inner_step_fn": None}, TypeError, "inner_step_fn must be callable, got None"),
    ({"inner_reg_fn": 3}, TypeError, "inner_reg_fn must be callable, got 3"),
    ({"grad_transforms": "sam"}, TypeError, "grad_transforms must be a sequence of inner-loop gradient transforms, got 'sam'"),
]


@pytest.mark.parametrize(
    "changes, error, message", _BAD_FIELDS, ids=[f"{next(iter(c))}-{i}" for i, (c, _, _) in enumerate(_BAD_FIELDS)]
)
def test_inner_loop_checks_every_field_with_the_constructors_rules(changes, error, message):
    """InnerLoop checked nothing: inner_steps=-3 ran like 0 steps, negative or NaN rates ran
    (gradient ascent), first_order='no' made a first-order loop second order, each silently.
    Its checks are the MetaOptimizer constructor's: the same exception and message."""
    base = _linear_meta().inner_loop()
    with pytest.raises(error) as info:
        base.replace(**changes)
    assert str(info.value) == message
    with pytest.raises(error) as built:
        InnerLoop(**{**{f: getattr(base, f) for f in ("adapt_names", "lrs", "inner_steps")}, **changes})
    assert str(built.value) == message


def test_a_refused_inner_loop_runs_nothing():
    """The repro: run_tasks with a replaced loop of -3 steps ran as 0 steps."""
    meta = _linear_meta()
    tasks = make_tasks(2, k=4)
    tasks = [Task(t.support_x[:, :1], t.support_y, t.query_x[:, :1], t.query_y) for t in tasks]
    weight = meta.model.weight.detach().clone()
    with pytest.raises(ValueError, match=r"^inner_steps must be an integer >= 0, got -3$"):
        meta.run_tasks(tasks, F.mse_loss, meta.inner_loop().replace(inner_steps=-3), path="loop", record=False)
    assert meta.model.weight.grad is None and torch.equal(meta.model.weight, weight)


def test_inner_loop_accepts_what_the_engine_builds_and_replace_runs_the_changed_loop():
    """What is accepted: a list of names (kept as a tuple), NumPy bools and integers (kept as
    Python's), a Meta-SGD rate that requires grad whatever its value (training can drive it
    negative), a real tensor rate; and a replaced loop runs what it says (a hand-written SGD
    reference)."""
    from samgria import MetaSGD

    np = pytest.importorskip("numpy")
    meta = _linear_meta()
    base = meta.inner_loop()
    loop = base.replace(adapt_names=["weight", "bias"], first_order=np.bool_(True), track_graph=np.True_)
    assert loop.adapt_names == ("weight", "bias")
    assert type(loop.first_order) is bool and loop.first_order and type(loop.track_graph) is bool
    assert type(base.replace(inner_steps=np.int64(2)).inner_steps) is int
    assert base.replace(lrs={"weight": torch.tensor(0.2, dtype=DT), "bias": 0}).lrs["bias"] == 0

    torch.manual_seed(0)
    sgd_meta = MetaSGD(nn.Linear(1, 1).to(DT), torch.optim.SGD, lr=0.1, inner_lr=0.1)
    with torch.no_grad():
        sgd_meta.inner_lrs["weight"].fill_(-0.5)  # a learned rate's values are not read
    rates = sgd_meta.inner_loop().lrs
    assert rates["weight"] is sgd_meta.inner_lrs["weight"] and rates["weight"].requires_grad

    task = Task(*(torch.randn(5, 1, generator=torch.Generator().manual_seed(s), dtype=DT) for s in range(4)))
    changed = base.replace(inner_steps=3, lrs={"weight": 0.3, "bias": 0.2})
    losses, _ = meta.run_tasks([task], F.mse_loss, changed, path="loop", record=False)
    fast = {n: p.detach() for n, p in meta.model.named_parameters()}
    for _ in range(3):
        fast = {n: v.requires_grad_(True) for n, v in fast.items()}
        loss = F.mse_loss(functional_call(meta.model, fast, (task.support_x,)), task.support_y)
        grads = dict(zip(fast, torch.autograd.grad(loss, list(fast.values()))))
        fast = {n: (v - {"weight": 0.3, "bias": 0.2}[n] * grads[n]).detach() for n, v in fast.items()}
    expected = F.mse_loss(functional_call(meta.model, fast, (task.query_x,)), task.query_y)
    torch.testing.assert_close(losses[0].detach(), expected, rtol=1e-12, atol=1e-14)


def test_meta_inner_loop_checks_track_graph_like_create_graph():
    """track_graph='no' gave a second-order loop; track_graph=0 failed later inside
    torch.set_grad_enabled without naming the argument."""
    np = pytest.importorskip("numpy")
    meta = _linear_meta()
    for bad in ("no", 0, 1.0):
        with pytest.raises(TypeError) as info:
            meta.inner_loop(track_graph=bad)
        assert str(info.value) == f"track_graph must be a bool, got {bad!r}"
        with pytest.raises(TypeError) as reference:
            meta.inner_loop(create_graph=bad)
        assert str(reference.value) == f"create_graph must be a bool, got {bad!r}"
    assert meta.inner_loop(track_graph=np.False_).second_order is False
    assert meta.inner_loop(track_graph=True).second_order is True


def _layer_applied_twice(seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(2, 2).to(DT)
    return nn.Sequential(layer, nn.Tanh(), layer), layer


def _twice_layer_maml_gradient(weight, bias, tasks, inner_lr, inner_steps):
    """Second-order MAML's meta-gradient, by hand, for ``layer(tanh(layer(x)))``."""
    w, b = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()

    def forward(w_, b_, x):
        return torch.tanh(x @ w_.T + b_) @ w_.T + b_

    total = 0
    for task in tasks:
        fw, fb = w, b
        for _ in range(inner_steps):
            support = F.mse_loss(forward(fw, fb, task.support_x), task.support_y)
            gw, gb = torch.autograd.grad(support, (fw, fb), create_graph=True)
            fw, fb = fw - inner_lr * gw, fb - inner_lr * gb
        total = total + F.mse_loss(forward(fw, fb, task.query_x), task.query_y)
    return torch.autograd.grad(total / len(tasks), (w, b))


def _tasks_of_width_2(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Task(*(torch.randn(5, 2, generator=g, dtype=DT) for _ in range(4))) for _ in range(n)]


@pytest.mark.parametrize("vectorize", [False, True])
def test_a_layer_applied_twice_keeps_its_parameters_and_gets_maml_s_gradient(vectorize):
    """A module registered under two names (nn.Sequential(layer, act, layer)) was left holding the
    inner loop's fast weights after every task: the optimizer's parameters were cut off from the
    model, which stopped training."""
    model, layer = _layer_applied_twice()
    weight, bias = layer.weight, layer.bias
    tasks = _tasks_of_width_2(3)
    expected = _twice_layer_maml_gradient(weight, bias, tasks, 0.1, 2)
    meta = MAML(model, torch.optim.SGD, lr=0.5, inner_lr=0.1, inner_steps=2)
    meta.task_losses(tasks, F.mse_loss, vectorize=vectorize).mean().backward()
    assert layer.weight is weight and layer.bias is bias
    assert meta.param_groups[0]["params"] == [weight, bias]
    torch.testing.assert_close((weight.grad, bias.grad), expected, rtol=1e-12, atol=1e-14)
    moved = [(p - 0.5 * p.grad).detach() for p in (weight, bias)]
    meta.step()
    assert torch.equal(weight.detach(), moved[0]) and torch.equal(bias.detach(), moved[1])  # the model moved


@pytest.mark.parametrize("route", ["evaluate", "adapt", "reptile", "trainer"])
def test_every_route_leaves_a_layer_applied_twice_in_its_model(route):
    model, layer = _layer_applied_twice()
    weight, bias = layer.weight, layer.bias
    saved = [weight.detach().clone(), bias.detach().clone()]
    tasks = _tasks_of_width_2(2)
    task = tasks[0]
    if route == "reptile":
        from samgria import Reptile

        meta = Reptile(model, torch.optim.SGD, lr=0.0, inner_lr=0.1, inner_steps=2)
    else:
        meta = MAML(model, torch.optim.SGD, lr=0.0, inner_lr=0.1, inner_steps=2)
    if route == "evaluate":
        meta.evaluate(tasks, F.mse_loss)
    elif route == "trainer":
        MetaTrainer(meta, F.mse_loss, ListSampler(tasks), vectorize=False).train_step(tasks)
    else:
        meta.adapt(lambda forward: F.mse_loss(forward(task.support_x), task.support_y))
        if route == "reptile":
            meta.step()
    assert layer.weight is weight and layer.bias is bias
    assert [p is q for p, q in zip(model.parameters(), meta.param_groups[0]["params"])] == [True, True]
    assert torch.equal(weight.detach(), saved[0]) and torch.equal(bias.detach(), saved[1])  # lr=0


def test_the_loop_path_does_not_back_propagate_a_task_of_weight_zero():
    """``backward_weights`` on the loop path: a task of weight 0 is not back-propagated, so its
    non-finite query loss leaves the meta-gradient as the other tasks make it (0 * nan is nan);
    the losses come back detached."""
    from samgria.meta import engine

    tasks = make_tasks(2)
    bad = Task(tasks[0].support_x, tasks[0].support_y, tasks[0].query_x, torch.full_like(tasks[0].query_y, float("nan")))
    model = mlp()
    loop = InnerLoop(tuple(n for n, _ in model.named_parameters()), {n: 0.1 for n, _ in model.named_parameters()}, 1)
    params = dict(model.named_parameters())
    losses, _ = engine.task_losses(model, loop, params, [bad, tasks[1]], F.mse_loss, backward_weights=[0.0, 0.5])
    assert torch.isnan(losses[0]) and not losses.requires_grad
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    alone, _ = engine.task_losses(model, loop, params, [tasks[1]], F.mse_loss)
    (0.5 * alone[0]).backward()
    for g, p in zip(got, model.parameters()):
        assert torch.equal(g, p.grad)


def test_an_untracked_inner_loop_starts_from_detached_weights():
    """``InnerLoop(track_graph=False)`` (Reptile, evaluation): every returned weight, adapted or
    not, is detached from the meta-parameters, and the steps are plain SGD."""
    from samgria.meta import engine

    model = mlp()
    task = make_tasks(1)[0]
    names = ("2.weight", "2.bias")
    loop = InnerLoop(names, {n: 0.1 for n in names}, 2, track_graph=False)
    params = dict(model.named_parameters())
    out = engine.run_inner_loop(loop, params, lambda w: F.mse_loss(functional_call(model, w, (task.support_x,)), task.support_y))
    assert not any(v.requires_grad for v in out.values())
    fast = {n: p.detach().clone().requires_grad_(True) for n, p in params.items() if n in names}
    for _ in range(2):
        weights = {**{n: p.detach() for n, p in params.items()}, **fast}
        grads = torch.autograd.grad(F.mse_loss(functional_call(model, weights, (task.support_x,)), task.support_y), list(fast.values()))
        fast = {n: (v - 0.1 * g).detach().requires_grad_(True) for (n, v), g in zip(fast.items(), grads)}
    for n, p in params.items():
        torch.testing.assert_close(out[n], fast[n].detach() if n in fast else p.detach(), rtol=0, atol=1e-14)


def test_the_vmap_path_returns_detached_losses_after_its_backward():
    """``backward_weights`` on the vmap path: ``sum_i w_i * loss_i`` is back-propagated there and
    the losses come back detached, with the meta-gradient of the loop path."""
    from samgria.meta import engine

    tasks = make_tasks(2)
    grads = {}
    for path in ("loop", "vmap"):
        model = mlp()
        loop = InnerLoop(tuple(n for n, _ in model.named_parameters()), {n: 0.1 for n, _ in model.named_parameters()}, 1)
        losses, _ = engine.task_losses(model, loop, dict(model.named_parameters()), tasks, F.mse_loss, path=path, backward_weights=[0.25, 0.5])
        assert not losses.requires_grad
        grads[path] = [p.grad.clone() for p in model.parameters()]
    for g, h in zip(grads["vmap"], grads["loop"]):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


class _ShiftedLinear(nn.Linear):
    """A linear layer plus a buffer added to its output."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.register_buffer("shift", torch.full((2,), 0.25))

    def forward(self, x):
        return super().forward(x) + self.shift


@pytest.mark.parametrize("vectorize", [False, True])
def test_a_layer_applied_twice_keeps_its_buffers(vectorize):
    """A module registered under two names keeps its own buffer objects after the inner loop
    (torch's functional_call left it holding the call's copies, as it did the parameters)."""
    torch.manual_seed(0)
    layer = _ShiftedLinear().to(DT)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    shift = layer.shift
    meta = MAML(model, torch.optim.SGD, lr=0.5, inner_lr=0.1, inner_steps=1)
    meta.task_losses(_tasks_of_width_2(2), F.mse_loss, vectorize=vectorize).mean().backward()
    assert layer.shift is shift and dict(model.named_buffers())["0.shift"] is shift
    assert torch.equal(shift, torch.full((2,), 0.25, dtype=DT))


def test_the_engine_dispatcher_refuses_the_vmap_path_for_tasks_of_unequal_shapes():
    from samgria.meta import engine

    model = mlp()
    tasks = [make_tasks(1, k=6)[0], make_tasks(1, k=5)[0]]
    loop = InnerLoop(("2.weight",), {"2.weight": 0.1}, 1)
    with pytest.raises(ValueError, match=r"^the vmap path cannot be used: the tasks do not all have equal shapes, dtypes and devices$"):
        engine.task_losses(model, loop, dict(model.named_parameters()), tasks, F.mse_loss, path="vmap")
