"""TransformingOptimizer as a torch.optim.Optimizer: construction, groups, hooks, checkpoints."""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import copy
import functools
import io
import pickle
import re
import types
import warnings

import pytest
import torch
from torch import nn
from state_helpers import assert_state_dicts_equal, assert_states_equal
from transform_infos import ToyScheduleFree, assert_bitwise_equal, make_closure, make_data, make_model, params_of

from samgria import ASAM, EMA, LAMP, SAM, FriendlySAM, GradientTransform, Lookahead, LookSAM, MultiStepSAM, Perturbation, PerturbationTransform, Transform, TransformingOptimizer, sam_optimizer


def sam_opt(model, **kwargs):
    kwargs = {"lr": 0.1, "momentum": 0.9, **kwargs}
    return TransformingOptimizer(model.parameters(), torch.optim.SGD, transforms=[SAM(0.05)], **kwargs)


# -- construction ---------------------------------------------------------------------------------
def test_is_an_optimizer_and_shares_param_groups_with_inner():
    model = make_model()
    optimizer = sam_opt(model)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups is optimizer.inner.param_groups
    assert optimizer.param_groups[0]["rho"] == 0.05
    optimizer.param_groups[0]["lr"] = 0.5
    assert optimizer.inner.param_groups[0]["lr"] == 0.5


_HOOK_REGISTRATIONS = (
    "register_step_pre_hook",
    "register_step_post_hook",
    "register_state_dict_pre_hook",
    "register_state_dict_post_hook",
    "register_load_state_dict_pre_hook",
    "register_load_state_dict_post_hook",
)


@pytest.mark.parametrize("register", _HOOK_REGISTRATIONS)
def test_wrapping_an_optimizer_with_hooks_of_its_own_warns_that_the_wrapper_does_not_run_them(register):
    # The wrapper steps, packs and loads with its own hooks (the inner step runs without torch's
    # hook wrapper, so global hooks fire once per step): a hook registered on the optimizer
    # before it was wrapped never ran again, and nothing said so.
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    getattr(inner, register)(lambda *args: calls.append(register))
    with pytest.warns(UserWarning, match=rf"params has hooks of its own \(1 {register}\), which .*register them on the TransformingOptimizer"):
        optimizer = TransformingOptimizer(inner, transforms=[SAM(0.05)])
    x, y = make_data()
    optimizer.step(make_closure(model, optimizer, x, y))
    optimizer.load_state_dict(optimizer.state_dict())
    assert calls == []  # as the warning says


@pytest.mark.parametrize("patch", ["function", "compiled"])
def test_wrapping_an_optimizer_whose_step_was_replaced_on_the_instance_warns_that_the_wrapper_does_not_call_it(patch):
    # The wrapper steps the inner optimizer with its class's step: a step replaced on the instance
    # (torch.compile(optimizer.step), a patch that logs or changes the step) never ran, silently.
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    original = inner.step

    def patched(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    inner.step = torch.compile(patched, backend="eager") if patch == "compiled" else patched
    with pytest.warns(UserWarning, match=r"^params has its step replaced on the instance \(optimizer.step = torch.compile\(optimizer.step\), a patch of the method\), which the TransformingOptimizer does not call: .*compile the TransformingOptimizer's step instead$"):
        optimizer = TransformingOptimizer(inner, transforms=[SAM(0.05)])
    x, y = make_data()
    optimizer.step(make_closure(model, optimizer, x, y))
    assert calls == []  # as the warning says


def test_wrapping_an_optimizer_an_lr_scheduler_was_built_on_does_not_warn():
    # The scheduler's record of step calls, patched on the instance, is kept by the wrapper.
    inner = torch.optim.SGD(make_model().parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(inner, step_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TransformingOptimizer(inner, transforms=[SAM(0.05)])


def test_the_step_warning_tells_a_patch_under_a_scheduler_from_the_class_step_bound_again():
    """An LR scheduler built after a patch wraps the patch (its record of the calls hid it: no
    warning, and the patch never ran); the class's own step bound on the instance again
    (accelerate puts back its saved ``optimizer.step`` after each scaled step) is no patch."""
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    original = inner.step

    def patched(self, *args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    inner.step = types.MethodType(patched, inner)
    torch.optim.lr_scheduler.StepLR(inner, step_size=1)
    with pytest.warns(UserWarning, match=r"^params has its step replaced on the instance"):
        optimizer = TransformingOptimizer(inner, transforms=[SAM(0.05)])
    x, y = make_data()
    optimizer.step(make_closure(model, optimizer, x, y))
    assert calls == []  # as the warning says
    for scheduler_too in (False, True):
        inner = torch.optim.SGD(make_model().parameters(), lr=0.1)
        inner.step = inner.step  # type: ignore[method-assign]
        if scheduler_too:
            torch.optim.lr_scheduler.StepLR(inner, step_size=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            TransformingOptimizer(inner, transforms=[SAM(0.05)])


class _OwnCheckpointSGD(torch.optim.SGD):
    """An inner optimizer whose class has its own state_dict / load_state_dict (as
    pytorch_optimizer's have): the wrapper calls them beside torch's."""

    def state_dict(self):
        return {**super().state_dict(), "own": 1}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        state_dict.pop("own", None)
        super().load_state_dict(state_dict)


@pytest.mark.parametrize("register", _HOOK_REGISTRATIONS)
@pytest.mark.parametrize("when", ["before wrapping", "after wrapping"])
def test_hooks_of_an_inner_optimizer_with_its_own_checkpoint_methods_do_not_run(register, when):
    # The guide: hooks of optimizer.inner do not run when the wrapper saves or loads. An inner
    # optimizer whose class has its own state_dict / load_state_dict had them run by those.
    model = make_model()
    calls = []
    inner = _OwnCheckpointSGD(model.parameters(), lr=0.1)
    if when == "before wrapping":
        getattr(inner, register)(lambda *args: calls.append(register))
        with pytest.warns(UserWarning, match="params has hooks of its own"):
            optimizer = TransformingOptimizer(inner, transforms=[SAM(0.05)])
    else:
        optimizer = TransformingOptimizer(inner, transforms=[SAM(0.05)])
        getattr(optimizer.inner, register)(lambda *args: calls.append(register))
    x, y = make_data()
    optimizer.step(make_closure(model, optimizer, x, y))
    checkpoint = optimizer.state_dict()
    assert checkpoint["own"] == 1  # the class's own state_dict ran
    optimizer.load_state_dict(checkpoint)
    optimizer.step(make_closure(model, optimizer, x, y))
    assert calls == []
    # The wrapper's machinery on the inner optimizer still works: a direct load is taken over.
    optimizer.base_optimizer.load_state_dict(optimizer.base_optimizer.state_dict())
    assert optimizer.state_dict()["param_groups"][0]["transform_chain"] == ("sam=SAM()",)


def test_wrapping_an_optimizer_whose_hooks_were_removed_does_not_warn():
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    handles = [getattr(inner, register)(lambda *args: None) for register in _HOOK_REGISTRATIONS]
    for handle in handles:
        handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TransformingOptimizer(inner, transforms=[SAM(0.05)])


def test_wraps_an_existing_optimizer_and_a_factory():
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wrapped = TransformingOptimizer(inner, transforms=[SAM(0.1)])
    assert wrapped.inner is inner and wrapped.param_groups is inner.param_groups
    factory = functools.partial(torch.optim.SGD, lr=0.01)
    built = TransformingOptimizer(model.parameters(), factory, transforms=SAM(0.1))
    assert isinstance(built.inner, torch.optim.SGD) and len(built.transforms) == 1


class _SeedProtocolSAM:
    """A seed-protocol object (apply + post_step) that re-evaluates the loss."""

    def apply(self, model, loss_fn, batch):
        loss_fn(*batch)

    def post_step(self, model):
        pass


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda m: TransformingOptimizer(m.parameters(), transforms=[SAM()]), TypeError, r"inner must be a torch\.optim\.Optimizer subclass .*got None"),
        (lambda m: TransformingOptimizer(m.parameters(), int), TypeError, r"inner must be a torch\.optim\.Optimizer subclass .*got <class 'int'>"),
        (lambda m: TransformingOptimizer(m.parameters(), "SGD"), TypeError, r"inner must be .*got 'SGD'"),
        (lambda m: TransformingOptimizer(m.parameters(), torch.optim.SGD(m.parameters(), lr=0.1)), TypeError, r"got the optimizer instance"),
        (lambda m: TransformingOptimizer(m.parameters(), lambda params: 3), TypeError, r"inner must build a torch\.optim\.Optimizer, but .* returned 3"),
        (lambda m: TransformingOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), torch.optim.SGD), TypeError, r"when wrapping an existing optimizer"),
        (lambda m: TransformingOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), lr=0.1), TypeError, r"when wrapping an existing optimizer.*\['lr'\]"),
        (lambda m: TransformingOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, transforms=[object()]), TypeError, r"transforms\[0\] must be a samgria Transform or an object with apply\(model, loss_fn, batch\) and post_step\(model\)"),
        (lambda m: TransformingOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM]), TypeError, r"transforms\[0\] must be a transform instance, got the class SAM \(e\.g\. SAM\(\)\)"),
        (lambda m: TransformingOptimizer([{"params": m.parameters(), "eps": 0.1}], torch.optim.SGD, lr=0.1, transforms=[LAMP(), LAMP()]), ValueError, r"param_groups\[0\]: the key 'eps' is a hyperparameter of several transforms; write 'lamp\.eps' or 'lamp_1\.eps'"),
        (lambda m: TransformingOptimizer([{"params": m.parameters(), "rho": 0.1}], torch.optim.SGD, lr=0.1, transforms=[SAM(0.1), ASAM(0.5)]), ValueError, r"the key 'rho' is a hyperparameter of several transforms; write 'sam\.rho' or 'asam\.rho'"),
        (lambda m: TransformingOptimizer([{"params": m.parameters(), "rho": 0.1, "sam.rho": 0.2}], torch.optim.SGD, lr=0.1, transforms=[SAM()]), ValueError, r"param_groups\[0\] sets 'sam\.rho'=0\.2 and 'rho'=0\.1, which name the same hyperparameter"),
        (lambda m: TransformingOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, transforms={"a.b": SAM()}), ValueError, r"transforms slot names must be identifiers, got 'a\.b'"),
        (lambda m: TransformingOptimizer([{"params": m.parameters(), "looksam.alpha": 0.5}], torch.optim.SGD, lr=0.1, transforms=[LookSAM(), Lookahead()]), ValueError, r"^param_groups\[0\]: the key 'looksam\.alpha' names no slot of the chain \(slots: 'look_sam', 'lookahead'\); write 'look_sam\.alpha' or 'lookahead\.alpha'$"),
        (lambda m: TransformingOptimizer([{"params": m.parameters(), "sma.rho": 0.5}], torch.optim.SGD, lr=0.1, transforms=[SAM()]), ValueError, r"^param_groups\[0\]: the key 'sma\.rho' names no slot of the chain \(slots: 'sam'\); write 'rho' or 'sam\.rho'$"),
        (lambda m: TransformingOptimizer([{"params": m.parameters(), "sam.lr": 0.5}], torch.optim.SGD, lr=0.1, transforms=[SAM()]), ValueError, r"^param_groups\[0\]: the key 'sam\.lr' names no hyperparameter of slot 'sam' \(SAM\), whose hyperparameters are: 'rho'$"),
        (lambda m: TransformingOptimizer([{"params": m.parameters(), "SAM.rho": 0.5}], torch.optim.SGD, lr=0.1, transforms=[SAM()]), ValueError, r"^param_groups\[0\]: the key 'SAM\.rho' names no slot of the chain \(slots: 'sam'\); write 'rho' or 'sam\.rho'$"),
        (lambda m: TransformingOptimizer([{"params": m.parameters(), "SAM.Rho": 0.5}], torch.optim.SGD, lr=0.1, transforms=[SAM()]), ValueError, r"^param_groups\[0\]: the key 'SAM\.Rho' names no slot of the chain \(slots: 'sam'\); write 'rho' or 'sam\.rho'$"),
        (lambda m: TransformingOptimizer([{"params": m.parameters(), "SAM.lr": 0.5}], torch.optim.SGD, lr=0.1, transforms=[SAM()]), ValueError, r"^param_groups\[0\]: the key 'SAM\.lr' names no hyperparameter of slot 'sam' \(SAM\), whose hyperparameters are: 'rho'$"),
        (lambda m: TransformingOptimizer([{"params": m.parameters(), "sam.RHO": 0.5}], torch.optim.SGD, lr=0.1, transforms=[SAM()]), ValueError, r"^param_groups\[0\]: the key 'sam\.RHO' names no hyperparameter of slot 'sam' \(SAM\), whose hyperparameters are: 'rho'$"),
        (lambda m: TransformingOptimizer([{"params": m.parameters(), "sam.rho": 0.5}], torch.optim.SGD, lr=0.1, transforms={"perturb": SAM()}), ValueError, r"^param_groups\[0\]: the key 'sam\.rho' names no slot of the chain \(slots: 'perturb'\); write 'rho' or 'perturb\.rho'$"),
        (lambda m: TransformingOptimizer([{"params": m.parameters(), "rho": -2.0}], torch.optim.SGD, lr=0.1, transforms=[SAM()]), ValueError, r"param_groups\[0\]: rho must be a finite number >= 0, got -2\.0"),
        (lambda m: TransformingOptimizer([{"params": m.parameters(), "sam.rho": -2.0}], torch.optim.Adadelta, transforms=[SAM()]), ValueError, r"param_groups\[0\]: sam\.rho must be a finite number >= 0, got -2\.0"),
        (lambda m: TransformingOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, non_finite="ignore"), ValueError, r"non_finite must be one of 'skip', 'raise', got 'ignore'"),
        (lambda m: TransformingOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, atomic=1), TypeError, r"atomic must be one of True, False, 'full', got 1"),
        (lambda m: TransformingOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, atomic="strict"), ValueError, r"atomic must be one of True, False, 'full', got 'strict'"),
        (lambda m: TransformingOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, model=3), TypeError, r"model must be an nn\.Module or None, got 3"),
        (lambda m: TransformingOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, first_pass_context=3), TypeError, r"first_pass_context must be a callable returning a context manager, got 3"),
        (lambda m: TransformingOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(), ASAM()], first_pass_context=contextlib.nullcontext), ValueError, r"^first_pass_context \(m-sharpness\) needs a chain that re-evaluates the loss at most once per step, got re-evaluations per step: SAM 1, ASAM 1; .*drop first_pass_context or keep one re-evaluation$"),
        (lambda m: TransformingOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, transforms=[MultiStepSAM(ascent_steps=3)], first_pass_context=contextlib.nullcontext), ValueError, r"at most once per step, got re-evaluations per step: MultiStepSAM 3; "),
        (lambda m: TransformingOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, transforms=[_SeedProtocolSAM()], first_pass_context=contextlib.nullcontext), ValueError, r"^first_pass_context \(m-sharpness\) cannot be used with _SeedProtocolSAM \(seed protocol\): the update mixes in \(for a seed-protocol object: may mix in\)"),
    ],
)
def test_bad_construction_names_argument_and_value(make, error, match):
    with pytest.raises(error, match=match):
        make(make_model())


def test_add_param_group_fills_and_validates_transform_keys_without_half_applying():
    model = make_model()
    optimizer = TransformingOptimizer(list(model[0].parameters()), torch.optim.SGD, lr=0.1, transforms=[ASAM(rho=0.5, eta=0.01)])
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 0, got -1"):
        optimizer.add_param_group({"params": list(model[4].parameters()), "eta": -1})
    assert len(optimizer.param_groups) == 1 and len(optimizer.inner.param_groups) == 1
    optimizer.add_param_group({"params": list(model[4].parameters()), "rho": 2.0})
    group = optimizer.inner.param_groups[1]
    assert (group["rho"], group["eta"], group["adaptive"], group["lr"]) == (2.0, 0.01, True, 0.1)


def test_qualified_keys_that_name_no_hyperparameter_are_refused_where_groups_come_in():
    """A misspelt qualified key ("looksam.alpha" for "look_sam.alpha", "sam.lr") was stored and
    never read: the transform kept its default. Refused in add_param_group and at the step after
    such an edit, before anything changes; keys that do not look like a transform's stay
    allowed, as torch allows keys it does not know."""
    x, y = make_data()
    model = make_model()
    from samgria import NormalizeGrad

    for transforms, key in (([LookSAM()], "lookahead.alpha"), ([ASAM(), NormalizeGrad()], "Adam.eps"), ([SAM()], "mylib.rho")):
        # another transform's or a torch optimizer's name, or another library's: kept and ignored
        kept = TransformingOptimizer([{"params": model.parameters(), key: 0.5}], torch.optim.Adam, lr=0.1, transforms=transforms)
        assert kept.param_groups[0][key] == 0.5
    optimizer = TransformingOptimizer(
        [{"params": model[0].parameters(), "note.kind": "body"}], torch.optim.SGD, lr=0.1, transforms=[LookSAM(), Lookahead()]
    )
    with pytest.raises(ValueError, match=r"^param_groups\[1\]: the key 'look_sam\.rhoo' names no hyperparameter of slot 'look_sam' \(LookSAM\), whose hyperparameters are: 'rho', 'alpha'$"):
        optimizer.add_param_group({"params": model[4].parameters(), "look_sam.rhoo": 0.1})
    assert len(optimizer.param_groups) == 1
    closure = make_closure(model, optimizer, x, y)
    optimizer.step(closure)
    before, state = params_of(model), copy.deepcopy(optimizer.state_dict())
    optimizer.param_groups[0]["lookahed.alpha"] = 0.9
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: the key 'lookahed\.alpha' names no slot of the chain"):
        optimizer.step(closure)
    assert_bitwise_equal(before, params_of(model))
    del optimizer.param_groups[0]["lookahed.alpha"]
    assert_state_dicts_equal(state, optimizer.state_dict())


def test_the_qualified_key_check_does_not_depend_on_the_classes_the_process_defined():
    """The check took the prefix of every transform or optimizer class defined in the process
    for another transform's name: a checkpoint saved where such a class existed ("lamb.eps"
    beside a LAMP, with timm imported) was refused where it did not. Its list is fixed:
    torch.optim's optimizers, samgria's transforms and the inner optimizer's class."""
    from samgria import LAMP, Transform

    model = make_model()
    build = lambda key, inner=torch.optim.SGD: TransformingOptimizer(  # noqa: E731
        [{"params": model.parameters(), key: 0.5}], inner, lr=0.1, transforms=[LAMP()]
    )
    message = r"^param_groups\[0\]: the key 'lamb\.eps' names no slot of the chain \(slots: 'lamp'\); write 'eps' or 'lamp\.eps'$"
    with pytest.raises(ValueError, match=message):
        build("lamb.eps")

    class Lamb(torch.optim.SGD):  # another library's optimizer, defined (imported) later
        pass

    class Lampe(Transform):
        pass

    with pytest.raises(ValueError, match=message):
        build("lamb.eps")
    with pytest.raises(ValueError, match=r"the key 'lampe\.eps' names no slot of the chain"):
        build("lampe.eps")
    assert build("lamb.eps", Lamb).param_groups[0]["lamb.eps"] == 0.5  # the inner optimizer's name
    assert build("adam.eps").param_groups[0]["adam.eps"] == 0.5  # a torch optimizer's
    assert build("lookahead.eps").param_groups[0]["lookahead.eps"] == 0.5  # another transform's
    assert Lampe


def test_the_qualified_key_check_works_out_each_prefix_once_per_chain(monkeypatch):
    """A kept dotted key whose suffix is a transform's hyperparameter ("mylib.rho") was compared
    with the chain's names anew at every step, in every group (a walk over the transforms'
    classes and a fuzzy match: a step 10% slower with 100 groups); the verdict cannot change
    for a chain, so each prefix is worked out once."""
    import difflib

    calls = []
    matcher = difflib.get_close_matches
    monkeypatch.setattr(difflib, "get_close_matches", lambda *a, **k: calls.append(a[0]) or matcher(*a, **k))
    model = make_model()
    groups = [{"params": list(model[i].parameters()), "mylib.rho": 1, "other.rho": 2} for i in (0, 2, 4)]
    optimizer = TransformingOptimizer(groups, torch.optim.SGD, lr=0.1, transforms=[SAM()])
    closure = make_closure(model, optimizer, *make_data())
    for _ in range(3):
        optimizer.step(closure)
    assert sorted(calls) == ["mylib", "other"]
    with pytest.raises(ValueError, match=r"the key 'sma\.rho' names no slot of the chain"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "sma.rho": 1})


def test_the_qualified_key_check_compares_a_prefix_with_the_transforms_that_have_the_hyperparameter():
    """"swa.decay" beside a SAM and an EMA was refused, with advice to write "ema.decay": the
    prefix was compared with every transform's names ("swa" is close to "sam"), although SAM has
    no ``decay``. A prefix is compared with the names of the transforms that have the
    hyperparameter; one that names another transform of the chain is still refused."""
    from samgria import EMA

    model = make_model()

    def build(key, transforms):
        return TransformingOptimizer([{"params": model.parameters(), key: 0.5}], torch.optim.SGD, lr=0.1, transforms=transforms)

    assert build("swa.decay", [SAM(), EMA()]).param_groups[0]["swa.decay"] == 0.5
    for key, transforms in (("emma.decay", [SAM(), EMA()]), ("sam.decay", {"perturb": SAM(), "average": EMA()})):
        with pytest.raises(ValueError, match=rf"the key '{key}' names no slot of the chain"):
            build(key, transforms)


def test_the_qualified_key_check_counts_a_transform_class_s_bases_as_its_names():
    """A subclass of SAM sits in slot "my_sam"; "sam.rho" was taken for another transform's key,
    kept and never read (the transform used its default rho). Refused, as for a SAM in a slot
    of another name."""
    model = make_model()

    class MySAM(SAM):
        pass

    with pytest.raises(ValueError, match=r"^param_groups\[0\]: the key 'sam\.rho' names no slot of the chain \(slots: 'my_sam'\); write 'rho' or 'my_sam\.rho'$"):
        TransformingOptimizer([{"params": model.parameters(), "sam.rho": 0.5}], torch.optim.SGD, lr=0.1, transforms=[MySAM()])


def test_the_qualified_key_check_takes_a_slot_name_that_is_no_string_in_a_named_chain():
    """A transform in a mapping needs no slot_name; one that is no string crashed the check
    (AttributeError: 'int' object has no attribute 'lower') for any dotted key."""

    class Odd(SAM):
        slot_name = 5

    model = make_model()
    optimizer = TransformingOptimizer(
        [{"params": model.parameters(), "mylib.rho": 1}], torch.optim.SGD, lr=0.1, transforms={"perturb": Odd()}
    )
    optimizer.param_groups[0]["perturb.rho"] = 0.25
    optimizer.step(make_closure(model, optimizer, *make_data()))
    assert optimizer.param_groups[0]["rho"] == 0.25 and optimizer.param_groups[0]["mylib.rho"] == 1


def test_a_checkpoint_is_refused_for_a_qualified_key_that_names_no_hyperparameter():
    """Such a key in a checkpoint's group (saved before a step refused it, or by an earlier
    release, which ignored it) loaded and then made every step raise; it is refused at the load,
    nothing changed. A key of another library ("mylib.rho") stays allowed, and an edit pending
    under a qualified key when the checkpoint was saved is loaded as the next step takes it."""
    x, y = make_data()
    model = make_model()

    def build():
        return TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])

    optimizer = build()
    optimizer.step(make_closure(model, optimizer, x, y))
    saved = copy.deepcopy(optimizer.state_dict())
    target = build()
    before = copy.deepcopy(target.state_dict())
    for key, message in (
        ("sam.lr", r"^the checkpoint's param_groups\[0\]: the key 'sam\.lr' names no hyperparameter of slot 'sam' \(SAM\)"),
        ("sma.rho", r"^the checkpoint's param_groups\[0\]: the key 'sma\.rho' names no slot of the chain \(slots: 'sam'\); write 'rho' or 'sam\.rho'$"),
    ):
        checkpoint = copy.deepcopy(saved)
        checkpoint["param_groups"][0][key] = 0.5
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(checkpoint)
        assert_state_dicts_equal(target.state_dict(), before)

    other_library = copy.deepcopy(saved)
    other_library["param_groups"][0]["mylib.rho"] = 0.5
    target.load_state_dict(other_library)
    assert target.param_groups[0]["mylib.rho"] == 0.5 and target.param_groups[0]["rho"] == 0.05
    target.step(make_closure(model, target, x, y))

    optimizer.param_groups[0]["sam.rho"] = 0.0  # pending until the next step, and saved so
    pending = copy.deepcopy(optimizer.state_dict())
    resumed = build()
    resumed.load_state_dict(pending)
    assert resumed.param_groups[0]["rho"] == 0.0 and "sam.rho" not in resumed.param_groups[0]


@pytest.mark.parametrize("loop", ["closure", "two_call", "no_closure"])
def test_a_step_refuses_an_edit_of_a_short_key_that_several_transforms_share(loop):
    """``group["rho"] = 0.0`` with SAM and ASAM in the chain names neither: refused at the next
    step as in the constructor, before anything changes, not stored and never read."""
    from samgria import NormalizeGrad, SparsifyGrad

    x, y = make_data()
    model = make_model()
    if loop == "closure":
        transforms, key, qualified = [SAM(0.05), ASAM(0.5)], "rho", ("sam.rho", "asam.rho")
    else:  # one re-evaluating transform at most, so that first_step() can run the chain
        transforms = [NormalizeGrad(), SparsifyGrad(q=1.0)] + ([SAM(0.05)] if loop == "two_call" else [])
        key, qualified = "param_ndim", ("normalize_grad.param_ndim", "sparsify_grad.param_ndim")
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=transforms)
    closure = make_closure(model, optimizer, x, y)
    if loop == "no_closure":
        closure()
        optimizer.step()
    else:
        optimizer.step(closure)
    optimizer.param_groups[0][key] = -1 if key == "param_ndim" else 0.0
    closure()
    with_grad = [p for p in model.parameters() if p.grad is not None]
    before, grads, state = params_of(model), [p.grad.clone() for p in with_grad], copy.deepcopy(optimizer.state_dict())
    message = (
        rf"^param_groups\[0\]: the key '{key}' is a hyperparameter of several transforms; write "
        + " or ".join(re.escape(repr(name)) for name in qualified)
        + "$"
    )
    with pytest.raises(ValueError, match=message):
        if loop == "two_call":
            optimizer.first_step()
        elif loop == "closure":
            optimizer.step(closure)
        else:
            optimizer.step()
    assert_bitwise_equal(before, params_of(model))
    assert_bitwise_equal(grads, [p.grad for p in with_grad])
    assert_states_equal(state["state"], optimizer.state_dict()["state"])
    del optimizer.param_groups[0][key]
    optimizer.param_groups[0][qualified[0]] = -1 if key == "param_ndim" else 0.0  # the way to say it
    if loop == "closure":
        optimizer.step(closure)
    elif loop == "no_closure":
        optimizer.step()
    else:
        optimizer.first_step()
        closure()
        optimizer.second_step()
    assert optimizer.param_groups[0][qualified[0]] == (-1 if key == "param_ndim" else 0.0)


def test_validate_group_of_a_users_transform_sees_its_own_short_keys_only():
    """The documented contract: ``group`` maps the transform's short names (a subclass may iterate
    it or unpack it); only a transform with ``param_ndim`` also finds ``params`` there."""
    from samgria import NormalizeGrad, Transform

    seen = []

    class Weighted(Transform):
        def group_defaults(self):
            return {"a": 0.5, "b": 0.5}

        def validate_group(self, group):
            seen.append(dict(group))
            for key, value in group.items():
                if not 0 <= value <= 1:
                    raise ValueError(f"{key} must be in [0, 1], got {value!r}")

    class NormalizedWeighted(NormalizeGrad):
        def validate_group(self, group):
            seen.append(sorted(group))
            super().validate_group(group)

    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[Weighted(), NormalizedWeighted()])
    assert seen[0] == {"a": 0.5, "b": 0.5}
    assert seen[1] == ["eps", "p", "param_ndim", "params"]
    optimizer.param_groups[0]["a"] = 2.0
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: a must be in \[0, 1\], got 2\.0$"):
        optimizer.step()


def test_a_message_about_a_qualified_key_names_every_key_by_its_group_name():
    """With two ClampGrads every key is qualified: a message relating two keys names both as the
    group stores them."""
    from samgria import ClampGrad

    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[ClampGrad(-1.0, 1.0), ClampGrad(-2.0, 2.0)])
    optimizer.param_groups[0]["clamp_grad_1.grad_min"] = 5.0
    with pytest.raises(
        ValueError,
        match=r"^param_groups\[0\]: clamp_grad_1\.grad_max must be a finite number >= clamp_grad_1\.grad_min = 5, got 2\.0$",
    ):
        optimizer.step()


def test_repr_shows_inner_optimizer_and_transforms():
    text = repr(TransformingOptimizer(make_model().parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), LAMP(eps=1e-3, rollback_len=4)]))
    assert "inner=SGD" in text and "sam=SAM(rho=0.05)" in text and "lamp=LAMP(eps=0.001, rollback_len=4, seed=None)" in text


# -- the step ---------------------------------------------------------------------------------------
def test_step_without_closure_names_both_remedies():
    model = make_model()
    optimizer = sam_opt(model)
    x, y = make_data()
    nn.functional.mse_loss(model(x), y).backward()
    before = params_of(model)
    with pytest.raises(RuntimeError, match=r"step\(closure\).*first_step\(\).*second_step\(\)"):
        optimizer.step()
    assert_bitwise_equal(before, params_of(model))


def test_step_without_closure_works_for_post_step_transforms_only():
    x, y = make_data()
    model_a, model_b = make_model(), make_model()
    opt_a = TransformingOptimizer(model_a.parameters(), torch.optim.SGD, lr=0.1, transforms=[LAMP(eps=0.0, rollback_len=50)])
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    for model, opt in ((model_a, opt_a), (model_b, opt_b)):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            assert opt.step() is None
    assert_bitwise_equal(params_of(model_a), params_of(model_b))


def test_order_closure_pre_transforms_inner_post_transforms():
    events = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def apply(self, model, loss_fn, batch):
            events.append(f"{self.name}.apply")

        def post_step(self, model):
            events.append(f"{self.name}.post_step")

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            events.append("inner.step")
            return super().step(closure)

    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), RecordingSGD, lr=0.1, transforms=[Recorder("a"), Recorder("b")])
    optimizer.register_step_pre_hook(lambda *a: events.append("outer.pre_hook"))
    optimizer.register_step_post_hook(lambda *a: events.append("outer.post_hook"))
    x, y = make_data()
    closure = make_closure(model, optimizer, x, y)
    optimizer.step(lambda: (events.append("closure"), closure())[1])
    assert events == ["outer.pre_hook", "closure", "a.apply", "b.apply", "inner.step", "a.post_step", "b.post_step", "outer.post_hook"]


def test_protocol_object_works_inside_optimizer_and_standalone():
    class GradientClip:
        def __init__(self, max_norm):
            self.max_norm = max_norm

        def apply(self, model, loss_fn, batch):
            nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)

        def post_step(self, model):
            pass

    clip = GradientClip(0.05)
    assert isinstance(clip, GradientTransform)
    x, y = make_data()
    model_a, model_b = make_model(), make_model()
    opt_a = TransformingOptimizer(model_a.parameters(), torch.optim.SGD, lr=0.1, transforms=[clip])
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    closure = make_closure(model_a, opt_a, x, y)
    for _ in range(3):
        opt_a.step(closure)
        opt_b.zero_grad()
        nn.functional.mse_loss(model_b(x), y).backward()
        clip.apply(model_b, None, ())
        opt_b.step()
        clip.post_step(model_b)
    assert_bitwise_equal(params_of(model_a), params_of(model_b))


def test_protocol_object_can_reevaluate_through_loss_fn():
    class ReEvaluate:
        """Replaces the gradient by the one at the same weights (re-evaluated)."""

        def apply(self, model, loss_fn, batch):
            loss = loss_fn(*batch)
            loss.backward()  # harmless: the closure already back-propagated

        def post_step(self, model):
            pass

    x, y = make_data()
    model_a, model_b = make_model(), make_model()
    calls = {"n": 0}
    opt_a = TransformingOptimizer(model_a.parameters(), torch.optim.SGD, lr=0.1, transforms=[ReEvaluate()], model=model_a)
    closure = make_closure(model_a, opt_a, x, y)

    def counting():
        calls["n"] += 1
        return closure()

    opt_a.step(counting)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    opt_b.step(make_closure(model_b, opt_b, x, y))
    assert calls["n"] == 2
    assert_bitwise_equal(params_of(model_a), params_of(model_b))


def test_a_profiled_sam_step_records_the_users_zero_grad_calls_and_one_step():
    """A profiler trace of ``step(closure)`` with SAM showed three ``Optimizer.zero_grad`` records
    for the closure's two calls (the optimizer released the first pass's gradients through
    ``zero_grad()``): it shows the user's own calls, and the one step, as a plain optimizer's
    trace does."""
    model = make_model()
    optimizer = sam_opt(model)
    x, y = make_data()
    calls = [0]

    def closure():
        calls[0] += 1
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        optimizer.step(closure)
    records = collections.Counter(event.name for event in profile.events() if event.name.startswith("Optimizer."))
    assert calls[0] == 2
    assert records == {
        "Optimizer.zero_grad#TransformingOptimizer.zero_grad": calls[0],
        "Optimizer.step#TransformingOptimizer.step": 1,
    }


def test_two_call_zero_grad_must_be_a_bool():
    """``first_step(zero_grad=1)`` / ``second_step(zero_grad="yes")`` were taken as truthy flags:
    refused with the argument named, before anything changes (the step stays pending)."""
    model = make_model()
    optimizer = sam_opt(model)
    x, y = make_data()
    nn.functional.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    with pytest.raises(TypeError, match=r"^zero_grad must be a bool, got 1$"):
        optimizer.first_step(zero_grad=1)
    assert_bitwise_equal(params_of(model), before)
    assert_bitwise_equal([p.grad for p in model.parameters() if p.grad is not None], grads)
    optimizer.first_step()
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(TypeError, match=r"^zero_grad must be a bool, got 'yes'$"):
        optimizer.second_step(zero_grad="yes")
    optimizer.second_step(zero_grad=True)  # still pending: finishes
    assert all(p.grad is None for p in model.parameters())


def test_two_call_protocol_errors():
    model = make_model()
    optimizer = sam_opt(model)
    x, y = make_data()
    with pytest.raises(RuntimeError, match=r"second_step\(\) called without first_step\(\)"):
        optimizer.second_step()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match=r"first_step\(\) was called twice"):
        optimizer.first_step()
    with pytest.raises(RuntimeError, match=r"finish this step with second_step\(\)"):
        optimizer.step(make_closure(model, optimizer, x, y))
    with pytest.raises(RuntimeError, match=r"state_dict\(\) between first_step\(\) and second_step\(\): finish the step"):
        optimizer.state_dict()
    perturbed = [p.detach().clone() for p in model.parameters()]
    for copying in (copy.copy, copy.deepcopy, pickle.dumps):
        message = "pickling or copying (copy.copy, copy.deepcopy) between first_step() and second_step(): finish the step"
        with pytest.raises(RuntimeError, match=re.escape(message)):
            copying(optimizer)  # the copy could not put the weights back
    assert_bitwise_equal(params_of(model), perturbed)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
    assert all(p.grad is None for p in model.parameters())
    two_sams = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.1), SAM(0.1)])
    with pytest.raises(RuntimeError, match="support one re-evaluating transform"):
        two_sams.first_step()


def test_first_step_moves_weights_and_second_step_restores_before_stepping():
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.0, transforms=[SAM(0.05)])
    before = params_of(model)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    assert any(not torch.equal(a, b) for a, b in zip(before, params_of(model)))
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.second_step()
    assert_bitwise_equal(before, params_of(model))


# -- schedulers, hooks ----------------------------------------------------------------------------
@pytest.mark.parametrize("two_call", [False, True])
def test_lr_scheduler_reaches_inner_and_does_not_warn(two_call):
    x, y = make_data()
    model = make_model()
    optimizer = sam_opt(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    closure = make_closure(model, optimizer, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            if two_call:
                nn.functional.mse_loss(model(x), y).backward()
                optimizer.first_step(zero_grad=True)
                nn.functional.mse_loss(model(x), y).backward()
                optimizer.second_step(zero_grad=True)
            else:
                optimizer.step(closure)
            scheduler.step()
    assert optimizer.inner.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_scheduled_lr_matches_bare_optimizer_with_rho_zero():
    x, y = make_data()
    model_a, model_b = make_model(), make_model()
    opt_a = TransformingOptimizer(model_a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(0.0)])
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=5)
    sched_b = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=5)
    for model, opt, sched in ((model_a, opt_a, sched_a), (model_b, opt_b, sched_b)):
        closure = make_closure(model, opt, x, y)
        for _ in range(5):
            opt.step(closure)
            sched.step()
    assert_bitwise_equal(params_of(model_a), params_of(model_b))


def test_step_hooks_run_once_per_step_also_in_two_call_mode():
    x, y = make_data()
    model = make_model()
    optimizer = sam_opt(model)
    counts = {"pre": 0, "post": 0}
    optimizer.register_step_pre_hook(lambda *a: counts.__setitem__("pre", counts["pre"] + 1))
    optimizer.register_step_post_hook(lambda *a: counts.__setitem__("post", counts["post"] + 1))
    optimizer.step(make_closure(model, optimizer, x, y))
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.second_step()
    assert counts == {"pre": 2, "post": 2}


def test_zero_grad():
    model = make_model()
    optimizer = sam_opt(model)
    x, y = make_data()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("loop", ["plain step()", "step(closure)", "two-call"])
def test_a_compiled_training_step_that_calls_the_optimizer_runs_it_eagerly_as_the_eager_loop(loop):
    # torch.compile around a whole training step (forward, backward, optimizer.step()) is torch's
    # recipe for its own optimizers; the wrapper's step is run eagerly inside it (a graph break),
    # as torch runs its state_dict() and zero_grad(). Dynamo used to trace into it and fail while
    # building its guards on the inner optimizer's view of the state (InternalTorchDynamoError).
    torch._dynamo.reset()
    x, y = make_data()
    transforms = [] if loop == "plain step()" else [SAM(0.05)]
    models, finals = [make_model(), make_model()], []
    for model, compiled in zip(models, (False, True)):
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=0.01, transforms=transforms)
        closure = make_closure(model, optimizer, x, y)

        def train_step():
            if loop == "step(closure)":
                return optimizer.step(closure)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if loop == "two-call":
                optimizer.first_step(zero_grad=True)
                nn.functional.mse_loss(model(x), y).backward()
                optimizer.second_step()
            else:
                optimizer.step()
            return None

        step = torch.compile(train_step, backend="eager") if compiled else train_step
        for _ in range(3):
            step()
        finals.append((params_of(model), optimizer.state_dict()))
    assert_bitwise_equal(finals[1][0], finals[0][0])
    assert_state_dicts_equal(finals[1][1], finals[0][1])
    torch._dynamo.reset()


# -- checkpoints ----------------------------------------------------------------------------------
def test_state_dict_is_torchs_layout_with_every_slot_in_state():
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=1e-2, transforms=[SAM(0.05), LAMP(eps=1e-3, rollback_len=5, seed=0)])
    closure = make_closure(model, optimizer, x, y)
    for _ in range(2):
        optimizer.step(closure)
    state = optimizer.state_dict()
    assert set(state) == {"state", "param_groups"}
    group = state["param_groups"][0]
    # Adam has its own "eps", so LAMP's is qualified; SAM's "rho" is not ambiguous.
    assert (group["rho"], group["lamp.eps"], group["eps"]) == (0.05, 1e-3, 1e-8)
    assert group["transform_chain"] == ("sam=SAM()", "lamp=LAMP(rollback_len=5, seed=0)")
    # Index 0 is the unused parameter (no gradient): it carries only LAMP's object-level state.
    assert set(state["state"][0]) == {"lamp.cycle_step", "lamp.rng_state"} and state["state"][0]["lamp.cycle_step"] == 2
    first = state["state"][1]
    assert {"exp_avg", "exp_avg_sq", "step", "lamp.sum", "lamp.count"} <= set(first) and first["lamp.count"] == 2
    # optimizer.state is what state_dict packs: the same live entries, keys written by a user included.
    weight = model[0].weight
    optimizer.state[weight]["user_key"] = 7
    assert optimizer.state_dict()["state"][1]["user_key"] == 7
    assert optimizer.state_dict()["state"][1]["exp_avg"] is optimizer.state[weight]["exp_avg"]
    # The inner optimizer sees its own keys only (so lazily initialising optimizers still do).
    assert set(optimizer.inner.state[weight]) == {"exp_avg", "exp_avg_sq", "step", "user_key"}


class _CountingSGD(torch.optim.SGD):
    """Writes a new key into every entry while it iterates ``self.state.items()``."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for _, entry in self.state.items():
            entry["seen"] = entry.get("seen", 0) + 1
        return loss


class _AssignThenFill(torch.optim.Optimizer):
    """Assigns a new dict to ``self.state[p]`` and then fills it (``p not in self.state``)."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p not in self.state:
                    entry = {}
                    self.state[p] = entry
                    entry["buf"], entry["step"] = p.grad.clone(), 1
                else:
                    entry = self.state[p]
                    entry["buf"].mul_(0.9).add_(p.grad)
                    entry["step"] += 1
                p.add_(entry["buf"], alpha=-group["lr"])
        return loss


@pytest.mark.parametrize("chain", ["none", "rho0", "friendly_sam", "lamp"])
@pytest.mark.parametrize("inner", [_CountingSGD, _AssignThenFill])
def test_the_inner_optimizer_sees_its_state_as_torch_gives_it(inner, chain):
    """What an inner optimizer writes lands in the state, whatever hidden keys a transform keeps
    in the same entries; an entry holding only hidden keys is absent to it; ``del`` and ``clear``
    remove its keys and leave the transforms'."""
    transforms = {"none": [], "rho0": [SAM(0.0)], "friendly_sam": [FriendlySAM(0.05)], "lamp": [LAMP(seed=1)]}[chain]
    kwargs = {"momentum": 0.9} if inner is _CountingSGD else {}
    x, y = make_data()
    model, bare_model = make_model(), make_model()
    optimizer = TransformingOptimizer(model.parameters(), inner, lr=0.1, transforms=transforms, **kwargs)
    bare = inner(bare_model.parameters(), lr=0.1, **kwargs)
    for _ in range(3):
        optimizer.step(make_closure(model, optimizer, x, y))
        bare.step(make_closure(bare_model, bare, x, y))
    stepped = [p for p in model.parameters() if p.grad is not None]
    key = "seen" if inner is _CountingSGD else "step"
    assert [optimizer.state[p][key] for p in stepped] == [3] * len(stepped)
    assert len(optimizer.inner.state) == len(bare.state) == len(stepped)
    if chain in ("none", "rho0"):  # the same algorithm as the bare optimizer
        assert_bitwise_equal(params_of(model), params_of(bare_model))
    packed = optimizer.inner.state_dict()["state"]  # plain dicts, loadable like torch's
    assert all(type(entry) is dict and not any("." in str(k) for k in entry) for entry in packed.values())
    buffer = io.BytesIO()
    torch.save(optimizer.inner.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["state"].keys() == packed.keys()
    hidden_before = {id(p): {k: v for k, v in optimizer.state.get(p, {}).items() if "." in k} for p in model.parameters()}
    del optimizer.inner.state[stepped[0]]
    assert stepped[0] not in optimizer.inner.state and len(optimizer.inner.state) == len(stepped) - 1
    optimizer.inner.state.clear()
    assert len(optimizer.inner.state) == 0 and list(optimizer.inner.state) == []
    hidden_after = {id(p): dict(optimizer.state[p]) for p in model.parameters() if p in optimizer.state}
    assert hidden_after == {i: kept for i, kept in hidden_before.items() if kept}


@pytest.mark.parametrize("copier", ["deepcopy", "pickle", "pickle-inner-first"])
def test_the_inner_optimizer_of_a_copy_packs_plain_dicts(copier):
    """The hook that packs plain dicts survives unpickling (torch's
    __setstate__ gives the inner optimizer empty hook dicts; the hook was lost there before)."""
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=0.1, transforms=[SAM(0.05), LAMP(eps=1e-3, rollback_len=3)])
    optimizer.step(make_closure(model, optimizer, x, y))
    if copier == "deepcopy":
        copied = copy.deepcopy(optimizer)
    elif copier == "pickle":
        copied = pickle.loads(pickle.dumps(optimizer))
    else:  # the inner optimizer first in the pickled graph: unpickled after its wrapper
        _, copied = pickle.loads(pickle.dumps((optimizer.inner, optimizer)))
    packed = copied.inner.state_dict()
    assert packed["state"] and all(type(entry) is dict for entry in packed["state"].values())
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["state"].keys() == packed["state"].keys()


class _LazyGetSGD(torch.optim.Optimizer):
    """Momentum SGD that finds its state with ``state.get(p)`` and keeps two values under keys of
    its own, as torch's ``state`` allows: a step count (an int) and a tensor counter raised in place
    (MADGRAD keeps one under ``"k"``)."""

    def __init__(self, params, lr=0.1, fail_after_counting=False):
        super().__init__(params, {"lr": lr})
        self.fail_after_counting = fail_after_counting

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        self.state["steps"] = self.state.get("steps", 0) + 1
        if "k" not in self.state:
            self.state["k"] = torch.zeros(1, dtype=torch.int64)
        self.state["k"] += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                entry = self.state.get(p)
                if entry is None:
                    self.state[p] = entry = {"buf": torch.zeros_like(p)}
                entry["buf"].mul_(0.9).add_(p.grad)
                p.add_(entry["buf"], alpha=-group["lr"])
        if self.fail_after_counting:
            raise RuntimeError("inner step failed")


def _full_state(optimizer):
    """``optimizer.state`` as plain data: every entry (by parameter position), and the values under
    other keys."""
    position = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    return {
        (key if isinstance(key, str) else position[id(key)]): (
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in value.items()}
            if isinstance(value, dict) else value.clone() if isinstance(value, torch.Tensor) else value
        )
        for key, value in optimizer.state.items()
    }


def _assert_same_state(first, second):
    assert first.keys() == second.keys()
    for key in first:
        a, b = first[key], second[key]
        if isinstance(a, dict):
            assert a.keys() == b.keys(), key
            for k in a:
                assert type(a[k]) is type(b[k]) and (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]), (key, k)
        else:
            assert type(a) is type(b) and (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), key


@pytest.mark.parametrize("chain", ["none", "rho0", "sam", "lamp"])
def test_an_inner_optimizer_keeps_values_under_keys_of_its_own_and_reads_state_with_get(chain):
    """torch's ``state`` is a ``defaultdict(dict)``: ``state.get(p)`` gives ``None`` for a
    parameter without state (and creates nothing), and any key may hold any value. The wrapper
    raised ``KeyError: 'buf'`` (``get`` created an empty entry) and ``TypeError`` (a non-dict value)
    for such inner optimizers (pytorch_optimizer's MADGRAD and SPAM among them)."""
    transforms = {"none": [], "rho0": [SAM(0.0)], "sam": [SAM(0.05)], "lamp": [LAMP(seed=1)]}[chain]
    x, y = make_data()
    model, bare_model, resumed_model = make_model(), make_model(), make_model()
    optimizer = TransformingOptimizer(model.parameters(), _LazyGetSGD, lr=0.1, transforms=transforms)
    assert optimizer.inner.state.get(next(model.parameters())) is None and len(optimizer.state) == 0
    bare = _LazyGetSGD(bare_model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.step(make_closure(model, optimizer, x, y))
        bare.step(make_closure(bare_model, bare, x, y))
    assert optimizer.state["steps"] == 3 and torch.equal(optimizer.state["k"], torch.tensor([3]))
    if chain in ("none", "rho0"):
        assert_bitwise_equal(params_of(model), params_of(bare_model))
    # Through a weights_only checkpoint into a fresh optimizer: the values under the inner
    # optimizer's own keys come along, and the resumed run continues bit for bit.
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed_model.load_state_dict(model.state_dict())
    transforms = {"none": [], "rho0": [SAM(0.0)], "sam": [SAM(0.05)], "lamp": [LAMP(seed=1)]}[chain]
    resumed = TransformingOptimizer(resumed_model.parameters(), _LazyGetSGD, lr=0.1, transforms=transforms)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.state["steps"] == 3 and torch.equal(resumed.state["k"], torch.tensor([3]))
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer, x, y))
        resumed.step(make_closure(resumed_model, resumed, x, y))
    assert_bitwise_equal(params_of(model), params_of(resumed_model))
    _assert_same_state(_full_state(optimizer), _full_state(resumed))
    # A step whose inner step raises after counting leaves everything as it was.
    before, weights = _full_state(optimizer), params_of(model)
    optimizer.inner.fail_after_counting = True
    with pytest.raises(RuntimeError, match="inner step failed"):
        optimizer.step(make_closure(model, optimizer, x, y))
    assert_bitwise_equal(params_of(model), weights)
    _assert_same_state(_full_state(optimizer), before)
    assert optimizer.state["steps"] == 5 and torch.equal(optimizer.state["k"], torch.tensor([5]))
    del optimizer.inner.state["steps"]
    assert "steps" not in optimizer.state and "steps" not in optimizer.inner.state


@pytest.mark.parametrize("chain", ["none", "lookahead"])
def test_the_inner_state_answers_setdefault_pop_popitem_copy_as_torchs_defaultdict(chain):
    """``MutableMapping``'s methods rely on ``KeyError``, which a view reading through a
    ``defaultdict`` never raised: ``setdefault`` stored nothing, ``pop`` returned an emptied dict,
    ``del`` emptied a dict its caller still held. Every answer is compared with torch's own
    ``defaultdict(dict)`` fed the same calls; a transform's keys stay where they were."""
    from collections import OrderedDict, defaultdict

    from samgria import Lookahead

    def exercise(state, params):
        first, second = params
        results = [state.setdefault(first, {"step": 0}), state.setdefault("k", torch.zeros(1)).add_(1)]
        results.append(state.pop("missing", None))
        with pytest.raises(KeyError):
            state.pop("missing")
        state["e"] = {"buf": 1}
        held = state["e"]
        results += [state.pop("e"), held, "e" in state]
        counts = defaultdict(int)
        state["counts"] = counts
        counts["a"] += 1
        results += [type(state["counts"]).__name__, state["counts"]["never_seen"], dict(counts)]
        state["ordered"] = OrderedDict(b=2)
        results.append(type(state["ordered"]).__name__)
        state[second] = {"step": 5}
        held = state[second]
        del state[second]
        results += [dict(held), second in state, state.get(second)]
        copied = state.copy()
        results += [type(copied).__name__, sorted(map(str, (k if isinstance(k, str) else "param" for k in copied)))]
        popped = []
        while len(state):
            key, value = state.popitem()
            # (a parameter's entry that holds a transform's keys comes as a view without them)
            kind = "a mapping" if isinstance(value, collections.abc.Mapping) and type(value).__name__ in ("dict", "_VisibleEntry") else type(value).__name__
            popped.append((key if isinstance(key, str) else "param", kind))
        results += [popped, len(state)]  # the last entry first, as dict.popitem
        with pytest.raises(KeyError):
            state.popitem()
        return results

    plain_params = [nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))]
    expected = exercise(defaultdict(dict), plain_params)
    params = [nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))]
    transforms = [Lookahead(k=2)] if chain == "lookahead" else []
    optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=0.1, transforms=transforms)
    if transforms:  # give both parameters a transform's hidden keys first
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    hidden = {id(p): {k: v for k, v in optimizer.state.get(p, {}).items() if "." in str(k)} for p in params}
    got = exercise(optimizer.inner.state, params)
    assert repr(got) == repr(expected)
    for p in params:  # the transform's keys stay
        assert {k: v for k, v in optimizer.state.get(p, {}).items() if "." in str(k)} == hidden[id(p)]


def test_a_failed_step_restores_a_value_the_inner_changes_in_place_under_its_own_key():
    """A list the inner optimizer appends to under a key of its own was put back as the same,
    already changed object; it is now restored as it was (as an entry's values are)."""

    class _Recording(torch.optim.SGD):
        fail = False

        @torch.no_grad()
        def step(self, closure=None):
            self.state.setdefault("losses", []).append(len(self.state["losses"]))
            super().step()
            if self.fail:
                raise RuntimeError("inner step failed")

    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), _Recording, lr=0.1, transforms=[SAM(0.05)])
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer, x, y))
    weights = params_of(model)
    optimizer.inner.fail = True
    with pytest.raises(RuntimeError, match="inner step failed"):
        optimizer.step(make_closure(model, optimizer, x, y))
    assert optimizer.state["losses"] == [0, 1]
    assert_bitwise_equal(params_of(model), weights)


def _meta_closure(meta, x, y):
    """A closure for ``meta.step``: one inner step on (x, y) and the query loss on the same."""

    def closure():
        meta.zero_grad()
        learner = meta.adapt(lambda f: nn.functional.mse_loss(f(x), y))
        loss = nn.functional.mse_loss(learner(x), y)
        loss.backward()
        return loss

    return closure


class _MaskedSGD(torch.optim.Optimizer):
    """SGD that keeps a bool mask per parameter and a step count as an attribute, with its own
    ``state_dict`` (adds ``"total_step"``) and ``load_state_dict`` (restores the mask's dtype,
    which torch's cast turns into the parameter's, and the count; refuses a checkpoint without
    it), as pytorch_optimizer's SPAM and StableSPAM do."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})
        self.total_step = 0

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        self.total_step += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "mask" not in state:
                    state["mask"] = torch.ones_like(p, dtype=torch.bool)
                state["mask"] ^= p.grad > 0
                p.add_(torch.where(state["mask"], p.grad, 0.5 * p.grad), alpha=-group["lr"] / self.total_step)

    def state_dict(self):
        packed = super().state_dict()
        packed["total_step"] = self.total_step
        return packed

    def load_state_dict(self, state_dict):
        if "total_step" not in state_dict:
            raise KeyError("total_step")
        super().load_state_dict(state_dict)
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, index in zip(group["params"], saved_group["params"]):
                if index in state_dict["state"]:
                    self.state[p]["mask"] = self.state[p]["mask"].to(state_dict["state"][index]["mask"].dtype)
        self.total_step = state_dict["total_step"]


@pytest.mark.parametrize("chain", ["none", "sam", "lamp"])
def test_an_inner_optimizers_own_state_dict_and_load_state_dict_run(chain):
    """The wrapper packed and loaded with torch's methods only: an inner optimizer's own additions
    (a step count) were lost and its own load (restoring a bool state's dtype) never ran, so the
    resumed run differed or failed (pytorch_optimizer's SPAM, StableSPAM, AdaFactor, Kron)."""

    def build(model):
        transforms = {"none": [], "sam": [SAM(0.05)], "lamp": [SAM(0.05), LAMP(seed=2)]}[chain]
        return TransformingOptimizer(model.parameters(), _MaskedSGD, lr=0.1, transforms=transforms)

    x, y = make_data()
    model, resumed_model, bare_model = make_model(), make_model(), make_model()
    optimizer, bare = build(model), _MaskedSGD(bare_model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.step(make_closure(model, optimizer, x, y))
        bare.step(make_closure(bare_model, bare, x, y))
    if chain == "none":
        assert_bitwise_equal(params_of(model), params_of(bare_model))
        assert optimizer.state_dict().keys() == bare.state_dict().keys()
    saved = optimizer.state_dict()
    assert saved["total_step"] == 3
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    resumed_model.load_state_dict(model.state_dict())
    resumed = build(resumed_model)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.inner.total_step == 3
    assert all(resumed.state[p]["mask"].dtype == torch.bool for p in resumed_model.parameters() if p.grad is not None)
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer, x, y))
        resumed.step(make_closure(resumed_model, resumed, x, y))
    assert_bitwise_equal(params_of(model), params_of(resumed_model))
    # The inner optimizer's own load refuses a checkpoint: nothing changes.
    before, weights = copy.deepcopy(resumed.state_dict()), params_of(resumed_model)
    broken = copy.deepcopy(saved)
    del broken["total_step"]
    with pytest.raises(KeyError, match="total_step"):
        resumed.load_state_dict(broken)
    assert_bitwise_equal(params_of(resumed_model), weights)
    after = resumed.state_dict()
    assert after["total_step"] == before["total_step"] == 5
    assert_states_equal(after["state"], before["state"])


class _GroupEditingSGD(torch.optim.SGD):
    """SGD whose own load halves each group's lr and adds a key (as FlashAdamW sets
    ``initial_lr``), and clears its state and refuses a checkpoint marked ``"refuse"``."""

    def load_state_dict(self, state_dict):
        if state_dict.get("refuse"):
            self.state.clear()
            for group in self.param_groups:
                group["lr"] = 123.0
            raise ValueError("refused after clearing its state")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["lr"] *= 0.5
            group.setdefault("warm", 0)


@pytest.mark.parametrize("chain", ["none", "lamp"])
def test_what_an_inner_optimizers_own_load_does_to_its_groups_stays_and_a_refusal_changes_nothing(chain):
    """The groups an inner optimizer's own load_state_dict edits were replaced by the wrapper's
    (lr not halved, the added key gone: a scheduler could not resume); a load that cleared the
    state before it raised left it cleared."""
    transforms = {"none": [], "lamp": [LAMP(seed=1)]}[chain]
    x, y = make_data()
    model, plain_model = make_model(), make_model()
    optimizer = TransformingOptimizer(model.parameters(), _GroupEditingSGD, lr=0.1, momentum=0.9, transforms=transforms)
    plain = _GroupEditingSGD(plain_model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer, x, y))
        plain.step(make_closure(plain_model, plain, x, y))
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    plain.load_state_dict(copy.deepcopy(plain.state_dict()))
    for group, plain_group in zip(optimizer.param_groups, plain.param_groups):
        assert group["lr"] == plain_group["lr"] == 0.05 and group["warm"] == plain_group["warm"] == 0
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match="refused after clearing its state"):
        optimizer.load_state_dict({**copy.deepcopy(before), "refuse": True})
    after = optimizer.state_dict()
    assert [g["lr"] for g in after["param_groups"]] == [0.05]
    assert_states_equal(after["state"], before["state"])
    assert type(optimizer.inner.state).__name__ == "_DrivenState"
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer, x, y))
        plain.step(make_closure(plain_model, plain, x, y))
    if chain == "none":
        assert_bitwise_equal(params_of(model), params_of(plain_model))


def test_a_checkpoint_of_an_older_torch_loads_as_into_torchs_own_optimizer():
    """Adam's __setstate__ fills in the group keys an older torch did not save (amsgrad, foreach,
    ...) and turns a number step into a tensor; the wrapper's load never ran it, and the next step
    failed with KeyError 'amsgrad'."""
    x, y = make_data()
    model, plain_model = make_model(), make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=0.01, transforms=[])
    plain = torch.optim.Adam(plain_model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer, x, y))
        plain.step(make_closure(plain_model, plain, x, y))
    old = copy.deepcopy(plain.state_dict())
    for group in old["param_groups"]:
        for key in ("amsgrad", "foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"):
            group.pop(key, None)
    for entry in old["state"].values():
        entry["step"] = float(entry["step"])
    optimizer.load_state_dict(copy.deepcopy(old))
    plain.load_state_dict(copy.deepcopy(old))
    assert optimizer.param_groups[0]["amsgrad"] is False and torch.is_tensor(optimizer.state[next(iter(optimizer.state))]["step"])
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer, x, y))
        plain.step(make_closure(plain_model, plain, x, y))
    assert_bitwise_equal(params_of(model), params_of(plain_model))


def test_a_meta_optimizers_outer_optimizer_runs_its_own_state_dict_and_load_state_dict():
    from samgria import MAML

    def build():
        model = nn.Linear(3, 1)
        return model, MAML(model, _MaskedSGD, lr=0.1, inner_lr=0.1)

    x, y = torch.randn(8, 3), torch.randn(8, 1)

    torch.manual_seed(0)
    model, meta = build()
    torch.manual_seed(0)
    resumed_model, resumed = build()
    for _ in range(2):
        meta.step(_meta_closure(meta, x, y))
    saved = meta.state_dict()
    assert saved["total_step"] == 2
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(copy.deepcopy(saved))
    assert resumed.outer.total_step == 2
    meta.step(_meta_closure(meta, x, y))
    resumed.step(_meta_closure(resumed, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


class _ReadOnlyState(torch.optim.Optimizer):
    """An optimizer that wraps another and answers with its state (as pytorch_optimizer's Magma)."""

    def __init__(self, params, lr=0.1):
        self.optimizer = torch.optim.SGD(params, lr=lr)
        self.defaults = self.optimizer.defaults

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        return self.optimizer.step(closure)


class _ReadOnlyGroups(_ReadOnlyState):
    """Only its param groups are another optimizer's (as pytorch_optimizer's Lookahead)."""

    state = None  # an attribute of each instance, set below

    def __init__(self, params, lr=0.1):
        super().__init__(params, lr)
        self.state = collections.defaultdict(dict)


@pytest.mark.parametrize("kind, attribute", [(_ReadOnlyState, "state"), (_ReadOnlyGroups, "param_groups")])
def test_an_optimizer_whose_state_or_param_groups_are_read_only_properties_is_refused_clearly(kind, attribute):
    """The wrapper gives the driven optimizer a view of its own state, and a load installs new
    param groups: one whose ``state`` could not be set failed with ``AttributeError`` from inside
    the wrapper; one whose ``param_groups`` could not was accepted, and a later load_state_dict
    raised after it had replaced the state (half applied)."""
    from samgria import MAML

    model = nn.Linear(2, 1)
    message = (
        f"must be an optimizer whose {attribute} can be set, got a {kind.__name__}, whose {attribute} "
        "is a read-only property"
    )
    with pytest.raises(TypeError, match="^inner " + message):
        TransformingOptimizer(model.parameters(), kind, lr=0.1, transforms=[SAM(0.05)])
    existing = kind(model.parameters())
    state_before = existing.state
    with pytest.raises(TypeError, match="^params " + message):
        TransformingOptimizer(existing, transforms=[SAM(0.05)])
    assert existing.state is state_before and type(existing.state) is collections.defaultdict
    with pytest.raises(TypeError, match="^outer " + message):
        MAML(model, existing, inner_lr=0.1)
    with pytest.raises(TypeError, match="^outer " + message):
        MAML(model, kind, lr=0.1, inner_lr=0.1)


def test_membership_in_a_driven_wrappers_inner_state_creates_no_entry():
    """A MetaOptimizer driving a TransformingOptimizer: the inner optimizer's ``p in state`` must
    not create an entry (it did before, through the view's defaultdict, so custom
    optimizers' 'if p not in self.state' broke and the meta checkpoint failed)."""
    from samgria import MAML

    model = nn.Linear(3, 1)
    outer = TransformingOptimizer(model.parameters(), _AssignThenFill, lr=0.1, transforms=[SAM(0.05)])
    meta = MAML(model, outer, inner_lr=0.1)
    stranger = torch.zeros(1, requires_grad=True)
    assert stranger not in outer.inner.state and len(meta.state) == 0
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    for _ in range(2):
        meta.step(_meta_closure(meta, x, y))
    assert [outer.state[p]["step"] for p in model.parameters()] == [2, 2]
    assert stranger not in outer.inner.state and len(meta.state) == 2
    assert set(meta.state_dict()["state"]) == {0, 1}


def test_a_seed_protocol_object_may_declare_that_m_sharpness_suits_it():
    """Undeclared, a seed-protocol object refuses first_pass_context (see the construction
    errors); one that declares supports_local_first_pass = True and reevaluations = 0 (a
    gradient clip after SAM) is accepted, and its reevaluations count."""

    class Clip:
        supports_local_first_pass = True
        reevaluations = 0

        def apply(self, model, loss_fn, batch):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

        def post_step(self, model):
            pass

    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), Clip()], first_pass_context=contextlib.nullcontext)
    assert [t.reevaluations for t in optimizer.transforms] == [1, 0]
    Clip.reevaluations = 1  # declares a re-evaluation: two in the chain
    with pytest.raises(ValueError, match=r"re-evaluations per step: SAM 1, .*Clip \(seed protocol\) 1"):
        TransformingOptimizer(make_model().parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), Clip()], first_pass_context=contextlib.nullcontext)


class _CountingPreStep(Transform):
    """Counts its pre_update calls in its slot (a new object each time: saves_state_before_step)."""

    saves_state_before_step = True

    def init_state(self, ctx):
        slot = ctx.slot_state(keys=("calls",))
        if slot is not None and "calls" not in slot:
            slot["calls"] = 0

    def pre_update(self, ctx):
        self.init_state(ctx)
        slot = ctx.slot_state(keys=("calls",))
        slot["calls"] = slot["calls"] + 1


@pytest.mark.parametrize("rho", [0.0, 0.05])
@pytest.mark.parametrize("counter_first", [True, False])
def test_first_pass_context_runs_each_transforms_state_update_once_per_step(rho, counter_first):
    """When nothing is perturbed under first_pass_context (rho=0, a warm-up), the transforms run
    again on the synchronised gradients: a transform that updates its state before the step
    updated it twice per step (6 calls in 3 steps). Its first run's state is put back first, so
    the optimizer's state equals a run without first_pass_context (one process: the same
    gradients), bit for bit."""
    runs = []
    for first_pass_context in (None, contextlib.nullcontext):
        model = make_model()
        chain = [_CountingPreStep(), SAM(rho)] if counter_first else [SAM(rho), _CountingPreStep()]
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=chain, first_pass_context=first_pass_context
        )
        x, y = make_data()
        for _ in range(3):
            optimizer.step(make_closure(model, optimizer, x, y))
        runs.append((model, optimizer))
    (model, optimizer), (model_m, optimizer_m) = runs
    calls = [value for entry in optimizer_m.state.values() for key, value in entry.items() if key.endswith(".calls")]
    assert calls == [3]
    assert_bitwise_equal(params_of(model), params_of(model_m))
    assert_state_dicts_equal(optimizer.state_dict(), optimizer_m.state_dict())


class _LocalFirstPass:
    """A first_pass_context standing in for DDP's no_sync: inside it, the closure's loss is
    multiplied by ``factor`` (this rank's own gradients, which the synchronised ones are not)."""

    def __init__(self, factor: float) -> None:
        self.factor, self.active = factor, False

    @contextlib.contextmanager
    def __call__(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False


@pytest.mark.parametrize("first_pass_factor,synced_factor", [(1e300, 1.0), (1e-300, 1e10)])
def test_first_pass_context_checks_scale_grad_on_the_synchronised_gradients(first_pass_factor, synced_factor):
    """With nothing perturbed under first_pass_context (rho=0), ScaleGrad's overflow check ran
    on the first pass's local gradients only: local ones that overflow skipped the step on that
    rank alone (another rank, re-evaluating, waited in its synchronised backward), and
    synchronised ones that overflow in the rerun went unchecked (NaN weights, nothing skipped).
    Now the synchronised gradients decide, as without first_pass_context."""
    from samgria import ClipGradNorm, ScaleGrad

    runs = []
    for context in (None, _LocalFirstPass(first_pass_factor)):
        model = make_model().double()
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.0), ScaleGrad(1e300), ClipGradNorm(1.0)], first_pass_context=context
        )
        x, y = (t.double() for t in make_data())

        def closure():
            optimizer.zero_grad()
            factor = first_pass_factor if context is not None and context.active else synced_factor
            loss = nn.functional.mse_loss(model(x), y) * factor
            loss.backward()
            return loss

        before = params_of(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.step(closure)
        runs.append((before, params_of(model), optimizer.skipped_steps, [str(w.message) for w in caught if w.category is RuntimeWarning]))
    (_, reference, reference_skipped, reference_warnings), (before, weights, skipped, caught) = runs
    assert skipped == reference_skipped == (0 if synced_factor == 1.0 else 1)
    if skipped:
        assert_bitwise_equal(weights, before)
        assert len(caught) == 1 and re.match(r"TransformingOptimizer: the gradients of the second evaluation, as ScaleGrad computed them, are not finite", caught[0])
    else:
        assert caught == reference_warnings == []
        assert all(torch.isfinite(w).all() for w in weights)
    assert_bitwise_equal(weights, reference)


class _BiasedSAM(SAM):
    """A re-evaluating transform that hands on gradients it computed from the re-evaluation's
    (combines_gradients) and keeps every replica's update the same (supports_local_first_pass)."""

    combines_gradients = True

    def pre_update(self, ctx):
        super().pre_update(ctx)
        for group in ctx.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.add_(1e308).add_(1e308)  # beyond float64's range


def test_first_pass_context_checks_what_a_combining_reevaluating_transform_handed_on():
    """Under first_pass_context the check after a transform that combines gradients waited for the
    ranks' agreement, but was then made only after the transforms after the re-evaluating one:
    its own combination went to the inner step unchecked (inf weights, nothing skipped), where
    the run without first_pass_context skips the step."""
    runs = []
    for context in (None, contextlib.nullcontext):
        model = make_model().double()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[_BiasedSAM(0.05)], first_pass_context=context)
        x, y = (t.double() for t in make_data())
        before = params_of(model)
        with pytest.warns(RuntimeWarning, match=r"^TransformingOptimizer: the gradients of the second evaluation, as _BiasedSAM combined them, are not finite"):
            optimizer.step(make_closure(model, optimizer, x, y))
        assert optimizer.skipped_steps == 1
        assert_bitwise_equal(params_of(model), before)
        runs.append(params_of(model))
    assert_bitwise_equal(*runs)


def test_first_pass_context_reads_the_gradients_as_often_on_a_rank_that_perturbed_nothing(monkeypatch):
    """The one check after the ranks' agreement took in the re-evaluating transform only on a rank
    that re-evaluated: a rank that perturbed nothing (rho=0 here) read the gradients one time
    fewer. Over sharded gradients each read is a collective: the ranks would pair them wrongly.
    Every rank now reads them as often, whatever it perturbed."""
    import samgria.optim

    reads = []
    counted = samgria.optim.all_finite

    def counting(*args, **kwargs):
        reads[-1] += 1
        return counted(*args, **kwargs)

    monkeypatch.setattr(samgria.optim, "all_finite", counting)
    for rho in (0.05, 0.0):
        model = make_model().double()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[_BiasedSAM(rho)], first_pass_context=contextlib.nullcontext)
        x, y = (t.double() for t in make_data())
        reads.append(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            optimizer.step(make_closure(model, optimizer, x, y))
    assert reads[0] == reads[1] == 2  # the re-evaluation's own check, and the one after the agreement


def test_loads_a_plain_inner_optimizer_checkpoint_and_rejects_mismatches():
    x, y = make_data()
    model = make_model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain.step(make_closure(model, plain, x, y))
    optimizer = sam_opt(model)
    optimizer.load_state_dict(plain.state_dict())
    assert optimizer.param_groups[0]["rho"] == 0.05  # filled in from the transform's default
    assert optimizer.param_groups[0]["transform_chain"] == ("sam=SAM()",)
    assert len(optimizer.inner.state) == len(plain.state)
    bad = plain.state_dict()
    bad["state"][1]["sam.direction"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"records no transform chain, but its state has the transform keys \['sam\.direction'\]"):
        optimizer.load_state_dict(bad)
    lamp = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[LAMP(rollback_len=3)])
    with pytest.raises(ValueError, match=r"transform 0 is lamp=LAMP\(rollback_len=3, seed=None\) in the checkpoint and sam=SAM\(\) here"):
        optimizer.load_state_dict(lamp.state_dict())


def test_deepcopy_and_pickle_round_trip():
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), LAMP(seed=0, rollback_len=3)])
    optimizer.step(make_closure(model, optimizer, x, y))
    clone = copy.deepcopy(optimizer)
    assert clone.param_groups is clone.inner.param_groups
    assert repr(clone) == repr(optimizer)
    restored = pickle.loads(pickle.dumps(optimizer))
    assert [type(t) for t in restored.transforms] == [SAM, LAMP]
    # The copies are usable optimizers: they checkpoint and step exactly like the original.
    def quadratic_closure(opt):
        def closure():
            opt.zero_grad()
            loss = sum((p * p).sum() for group in opt.param_groups for p in group["params"] if p.requires_grad)
            loss.backward()
            return loss

        return closure

    for copied in (clone, restored):
        assert copied.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for opt in (optimizer, clone, restored):
        for _ in range(3):
            opt.step(quadratic_closure(opt))
    for copied in (clone, restored):
        for p, q in zip(optimizer.param_groups[0]["params"], copied.param_groups[0]["params"]):
            assert torch.equal(p, q)
    assert restored.param_groups is restored.inner.param_groups
    for p, q in zip(optimizer.param_groups[0]["params"], restored.param_groups[0]["params"]):
        assert set(optimizer.state[p]) == set(restored.state[q])
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, restored.state[q][key]) if isinstance(value, torch.Tensor) else value == restored.state[q][key]


# -- the davda54-style convenience constructor ----------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_optimizer_convenience_matches_transforming_optimizer(adaptive):
    x, y = make_data()
    model_a, model_b = make_model(), make_model()
    opt_a = sam_optimizer(model_a.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.1, momentum=0.9)
    transform = ASAM(rho=0.1, eta=0.01) if adaptive else SAM(rho=0.1)
    opt_b = TransformingOptimizer(model_b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[transform])
    for _ in range(3):
        nn.functional.mse_loss(model_a(x), y).backward()
        opt_a.first_step(zero_grad=True)
        nn.functional.mse_loss(model_a(x), y).backward()
        opt_a.second_step(zero_grad=True)
        opt_b.step(make_closure(model_b, opt_b, x, y))
    assert_bitwise_equal(params_of(model_a), params_of(model_b))


def test_sam_optimizer_names_its_own_base_optimizer_argument_in_errors():
    """The message named TransformingOptimizer's ``inner``, an argument the caller never passed."""
    model = nn.Linear(2, 1)
    built = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"^base_optimizer must be an optimizer class or factory, got the optimizer instance SGD"):
        sam_optimizer(model.parameters(), built)
    with pytest.raises(TypeError, match=r"^base_optimizer must be a torch.optim.Optimizer subclass or a callable returning one, got 3$"):
        sam_optimizer(model.parameters(), 3, lr=0.1)
    with pytest.raises(TypeError, match=r"^base_optimizer must be an optimizer whose step\(\) works without a closure, got LBFGS"):
        sam_optimizer(model.parameters(), torch.optim.LBFGS)
    with pytest.raises(TypeError, match=r"^base_optimizer must build a torch.optim.Optimizer, but <function .*> returned 3$"):
        sam_optimizer(model.parameters(), lambda params, **kwargs: 3)
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1"):  # the inner optimizer's own, as it is
        sam_optimizer(model.parameters(), torch.optim.SGD, lr=-1.0)
    assert sam_optimizer(model.parameters(), torch.optim.SGD, lr=0.1, non_finite="raise").non_finite == "raise"
    with pytest.raises(TypeError, match=r"^adaptive must be a bool, got 1$"):
        sam_optimizer(model.parameters(), torch.optim.SGD, adaptive=1, lr=0.1)
    with pytest.raises(ValueError, match=r"^rho must be a finite number >= 0, got -1.0$"):
        sam_optimizer(model.parameters(), torch.optim.SGD, rho=-1.0, lr=0.1)
    with pytest.raises(TypeError, match=r"^rho must be a finite number >= 0, got 'x'$"):
        sam_optimizer(model.parameters(), torch.optim.SGD, rho="x", lr=0.1)


def test_sam_optimizer_honours_a_groups_own_adaptive_key_as_that_library_does():
    """The widely used PyTorch SAM reads ``adaptive`` per group; a per-group loop of its move
    (``T_w = |w| + eta`` for adaptive groups, ``1`` elsewhere, one global norm) is the reference."""
    x, y = make_data()
    rho, eta, lr = 0.1, 0.01, 0.1
    model = make_model()
    groups = [
        {"params": list(model[0].parameters()), "adaptive": True},
        {"params": list(model[2].parameters()) + list(model[4].parameters())},  # the default: False
    ]
    optimizer = sam_optimizer(iter(groups), torch.optim.SGD, rho=rho, lr=lr)
    assert [group["adaptive"] for group in optimizer.param_groups] == [True, False]
    reference = make_model()
    ref_groups = [(list(reference[0].parameters()), True), (list(reference[2].parameters()) + list(reference[4].parameters()), False)]
    for _ in range(3):
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.second_step(zero_grad=True)

        nn.functional.mse_loss(reference(x), y).backward()
        with torch.no_grad():
            moving = [(p, (p.abs() + eta) if adaptive else torch.ones_like(p)) for params, adaptive in ref_groups for p in params if p.grad is not None]
            norm = torch.sqrt(sum(((t * p.grad) ** 2).sum() for p, t in moving))
            moves = [(p, rho * t * t * p.grad / norm) for p, t in moving]
            for p, e in moves:
                p.add_(e)
        for p in reference.parameters():
            p.grad = None
        nn.functional.mse_loss(reference(x), y).backward()
        with torch.no_grad():
            for p, e in moves:
                p.sub_(e)
                p.sub_(lr * p.grad)
        for p in reference.parameters():
            p.grad = None
    for ours, theirs in zip(params_of(model), params_of(reference)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    # Without a group's own key, the constructor's choice stands (SAM, as before).
    assert type(sam_optimizer(make_model().parameters(), torch.optim.SGD, rho=rho, lr=lr).transforms[0]) is SAM
    with pytest.raises(TypeError, match=r"adaptive must be a bool, got 'yes'"):
        sam_optimizer(make_model().parameters(), torch.optim.SGD, rho=rho, adaptive="yes", lr=lr)
    for falsy in (0, None):  # refused as the truthy ones are, not read as False
        with pytest.raises(TypeError, match=rf"^adaptive must be a bool, got {falsy!r}$"):
            sam_optimizer(make_model().parameters(), torch.optim.SGD, rho=rho, adaptive=falsy, lr=lr)


def test_the_two_call_loop_keeps_batchnorm_to_one_update_with_frozen_bn_stats_around_its_second_forward():
    """The guide's recipe: ``reevaluation_context`` serves ``step(closure)``; in the two-call loop
    the user wraps the second forward, and the two loops agree bit for bit (weights, statistics)."""
    from samgria import frozen_bn_stats

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(0.05)],
            reevaluation_context=lambda: frozen_bn_stats(model),
        )
        return model, optimizer

    torch.manual_seed(1)
    batches = [(torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)) for _ in range(3)]
    model_a, opt_a = build()
    model_b, opt_b = build()
    for x, y in batches:
        opt_a.step(make_closure(model_a, opt_a, x, y))
        nn.functional.mse_loss(model_b(x), y).backward()
        opt_b.first_step(zero_grad=True)
        with frozen_bn_stats(model_b):
            nn.functional.mse_loss(model_b(x), y).backward()
        opt_b.second_step(zero_grad=True)
    assert int(model_b[1].num_batches_tracked) == len(batches)
    assert_bitwise_equal(params_of(model_a), params_of(model_b))
    assert_bitwise_equal(list(model_a.buffers()), list(model_b.buffers()))


# -- edge cases: duplicate and view parameters, hooks, cancelled steps, pickling, refused inners ------
def test_duplicate_parameter_in_a_group_is_restored_bit_for_bit():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "optimizer contains a parameter group with duplicate parameters"
        optimizer = TransformingOptimizer([weight, weight], torch.optim.SGD, lr=0.0, transforms=[SAM(rho=0.1)])
    before = weight.detach().clone()
    evaluated_at = []

    def closure():
        optimizer.zero_grad()
        evaluated_at.append(weight.detach().clone())
        loss = weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)  # lr=0: the weights must come back exactly
    assert len(evaluated_at) == 2 and not torch.equal(evaluated_at[1], before)  # it was perturbed
    torch.testing.assert_close(evaluated_at[1], before + 0.1 * before / before.norm())  # once, not twice
    assert torch.equal(weight.detach(), before)


@pytest.mark.parametrize("rhos", [(0.1, 0.0), (0.0, 0.0)], ids=["one_group_unperturbed", "nothing_perturbed"])
def test_two_call_loop_equals_step_closure_with_unperturbed_groups(rhos):
    # With nothing perturbed step(closure) does not re-evaluate: first_step keeps the first pass's
    # gradients and second_step discards the second pass's.
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
        groups = [{"params": model[0].parameters(), "rho": rhos[0]}, {"params": model[1].parameters(), "rho": rhos[1]}]
        return model, TransformingOptimizer(groups, torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(rho=0.1)])

    torch.manual_seed(1)
    batches = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(3)]
    model_a, opt_a = build()
    model_b, opt_b = build()
    for x, y in batches:
        opt_a.step(make_closure(model_a, opt_a, x, y))
        nn.functional.mse_loss(model_b(x), y).backward()
        opt_b.first_step()
        nn.functional.mse_loss(model_b(x), y).backward()
        opt_b.second_step(zero_grad=True)
    assert_bitwise_equal(params_of(model_a), params_of(model_b))


def test_state_dict_and_load_state_dict_hooks_run():
    optimizer = TransformingOptimizer([nn.Parameter(torch.randn(3))], torch.optim.SGD, lr=0.1, transforms=[SAM()])
    called = []
    optimizer.register_state_dict_pre_hook(lambda opt: called.append("pre"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: called.append("post"))
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: called.append("load_pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: called.append("load_post"))
    optimizer.load_state_dict(optimizer.state_dict())
    assert called == ["pre", "post", "load_pre", "load_post"]


class _CountingTransform:
    """A user GradientTransform with object state and the usual state_dict protocol."""

    def __init__(self) -> None:
        self.calls = 0

    def apply(self, model, loss_fn, batch) -> None:
        self.calls += 1

    def post_step(self, model) -> None:
        pass

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state_dict) -> None:
        self.calls = state_dict["calls"]


def test_protocol_object_state_round_trips_through_the_optimizer_checkpoint():
    param = nn.Parameter(torch.randn(3))
    user = _CountingTransform()
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.1, transforms=[user])
    for _ in range(3):
        param.grad = torch.ones(3)
        optimizer.step()
    resumed = _CountingTransform()
    TransformingOptimizer([param], torch.optim.SGD, lr=0.1, transforms=[resumed]).load_state_dict(optimizer.state_dict())
    assert resumed.calls == user.calls == 3


class _StrictCountingTransform(_CountingTransform):
    def load_state_dict(self, state_dict) -> None:
        if state_dict["calls"] < 0:
            raise ValueError(f"calls must be >= 0, got {state_dict['calls']}")
        super().load_state_dict(state_dict)


def test_a_protocol_object_refusing_its_state_fails_the_load_before_anything_changes():
    param = nn.Parameter(torch.randn(3))
    user = _StrictCountingTransform()
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[user])
    for _ in range(3):
        param.grad = torch.ones(3)
        optimizer.step()
    damaged = copy.deepcopy(optimizer.state_dict())
    for entry in damaged["state"].values():
        for key in [k for k in entry if k.endswith(".calls")]:
            entry[key] = -1
    for entry in damaged["state"].values():
        entry["momentum_buffer"] = entry["momentum_buffer"] * 0 + 7.0  # would change the inner state
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=r"^calls must be >= 0, got -1$"):
        optimizer.load_state_dict(damaged)
    assert user.calls == 3
    after = optimizer.state_dict()
    assert_states_equal(after["state"], before["state"])
    assert after["param_groups"] == before["param_groups"]


def test_two_call_step_can_be_cancelled_after_a_failing_second_pass():
    torch.manual_seed(0)
    model, twin = nn.Linear(3, 1), nn.Linear(3, 1)
    twin.load_state_dict(model.state_dict())
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(rho=0.1)])
    twin_optimizer = TransformingOptimizer(twin.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(rho=0.1)])
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    before = params_of(model)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    assert any(not torch.equal(a, b) for a, b in zip(before, params_of(model)))  # at w + e
    # The second forward raises (e.g. OOM, caught by the trainer, which skips the batch):
    optimizer.cancel_step()  # restores w exactly and clears the pending step
    assert_bitwise_equal(before, params_of(model))
    assert not any(optimizer.state.values())  # the inner optimizer did not step
    copy.deepcopy(optimizer.state_dict())  # usable again (state_dict() refuses a pending step)
    optimizer.step(make_closure(model, optimizer, x, y))
    twin_optimizer.step(make_closure(twin, twin_optimizer, x, y))
    assert_bitwise_equal(params_of(model), params_of(twin))


class _InPlaceMove(Perturbation):
    """A user's perturbation that moves the weights in place and undoes that in ``restore``."""

    def __init__(self, params, deltas):
        super().__init__([])
        self._moved, self._deltas = params, deltas

    @property
    def params(self):
        return self._moved

    @torch.no_grad()
    def restore(self):
        for param, delta in zip(self._moved, self._deltas):
            param.sub_(delta)
        self._moved = []
        return {}


class _UsersPerturbation(PerturbationTransform):
    @torch.no_grad()
    def perturb(self, ctx):
        params = [p for group in ctx.param_groups for p in group["params"] if p.grad is not None]
        deltas = [torch.full_like(p, 0.5) for p in params]  # exact in float32, so sub_ undoes add_
        for param, delta in zip(params, deltas):
            param.add_(delta)
        return _InPlaceMove(params, deltas)


def test_cancel_step_restores_the_weights_through_a_users_perturbation_restore():
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[_UsersPerturbation()])
    before = params_of(model)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    assert any(not torch.equal(a, b) for a, b in zip(before, params_of(model)))
    optimizer.cancel_step()
    assert_bitwise_equal(before, params_of(model))


def test_a_chain_pickled_without_the_state_key_cache_unpickles_with_an_empty_one():
    """The previous release's pickles have no ``_visible_keys``; lookups work after loading."""
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), LAMP(seed=0)])
    chain = copy.deepcopy(optimizer.chain)
    del chain.__dict__["_visible_keys"]
    restored = pickle.loads(pickle.dumps(chain))
    assert restored._visible_keys == set()
    lamp_key = f"{restored.slots[1]}.sum"
    assert restored.hides_any(["momentum_buffer", lamp_key]) and not restored.hides_any(["momentum_buffer"])
    assert restored.hides(lamp_key) and not restored.hides("exp_avg")


def test_pickle_drops_hooks_and_context_callables_like_torch():
    """torch drops hooks when pickling; samgria also drops the context callables (lambdas)."""
    from samgria import frozen_bn_stats

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)],
        reevaluation_context=lambda: frozen_bn_stats(model), first_pass_context=lambda: contextlib.nullcontext(),
    )
    optimizer.register_step_pre_hook(lambda *args: None)
    restored = pickle.loads(pickle.dumps(optimizer))
    assert restored.reevaluation_context is None and restored.first_pass_context is None
    assert len(restored._optimizer_step_pre_hooks) == 0
    assert optimizer.reevaluation_context is not None and len(optimizer._optimizer_step_pre_hooks) == 1
    copied = copy.deepcopy(optimizer)
    assert copied.reevaluation_context is None and len(copied._optimizer_step_pre_hooks) == 0


@pytest.mark.parametrize("chain", [(), ("sam",)], ids=["plain", "sam"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_an_optimizer_with_a_scheduler_steps_its_own_parameters(how, chain):
    """Every LR scheduler patches ``optimizer.step`` on the instance; torch's pickling carries
    only defaults, state and groups, so a copy (with its model) steps its own parameters, and
    torch.save works. A copy that kept the patch stepped the original's weights instead."""
    x, y = make_data()
    model = make_model()
    transforms = [SAM(0.05)] if chain else []
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=transforms)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step(make_closure(model, optimizer, x, y))
    scheduler.step()
    if how == "deepcopy":
        model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    else:
        buffer = io.BytesIO()
        torch.save((model, optimizer), buffer)
        buffer.seek(0)
        model_copy, optimizer_copy = torch.load(buffer, weights_only=False)
    original, copied = params_of(model), params_of(model_copy)
    optimizer_copy.step(make_closure(model_copy, optimizer_copy, x, y))
    assert_bitwise_equal(params_of(model), original)
    assert any(not torch.equal(a, b) for a, b in zip(params_of(model_copy), copied))
    assert "step" not in optimizer_copy.__dict__ and "_opt_called" not in optimizer_copy.__dict__


def test_a_scheduler_built_on_the_optimizer_before_it_was_wrapped_sees_its_steps():
    """A scheduler built on a torch optimizer that is then wrapped: as with the bare optimizer,
    no warning that the scheduler stepped before the optimizer, and the same learning rates."""
    x, y = make_data()
    lrs = []
    for wrap in (False, True):
        model = make_model()
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)
        optimizer = TransformingOptimizer(base, transforms=[SAM(0.05)]) if wrap else base
        closure = make_closure(model, optimizer, x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                optimizer.step(closure)
                scheduler.step()
        lrs.append(base.param_groups[0]["lr"])
    assert lrs[0] == lrs[1] == 0.1 * 0.5**3


@pytest.mark.parametrize("where", ["before_wrapping", "inner", "meta_outer"])
def test_a_scheduler_on_a_driven_optimizer_does_not_warn_after_a_skipped_step(where):
    """A step skipped for non-finite gradients never reaches the driven optimizer: a scheduler
    built on it (before it was wrapped, on ``opt.inner``, on a meta-optimizer's outer optimizer)
    warned that it stepped before the optimizer although the user called ``step()``. The
    scheduler on the wrapper stays quiet, as torch's does for any call of ``step``."""
    from samgria import MAML

    model = make_model()
    x, _ = make_data()
    if where == "meta_outer":
        outer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(outer, step_size=1)
        optimizer = MAML(model, outer, inner_lr=0.1)
    else:
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        if where == "before_wrapping":
            scheduler = torch.optim.lr_scheduler.StepLR(base, step_size=1)
            optimizer = TransformingOptimizer(base, transforms=[SAM(0.05)])
        else:
            optimizer = TransformingOptimizer(base, transforms=[SAM(0.05)])
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer.inner, step_size=1)

    def closure():
        optimizer.zero_grad()
        loss = model(x).sum() * float("nan")
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if where == "meta_outer":  # without a closure: the step is judged before the outer step
            closure()
            optimizer.step()
        else:
            optimizer.step(closure)
        scheduler.step()
    assert optimizer.skipped_steps == 1
    assert [str(w.message) for w in caught if "lr_scheduler.step()" in str(w.message)] == []


@pytest.mark.parametrize("how", ["built", "deepcopy", "pickle"])
def test_add_param_group_takes_edited_defaults_as_torch_does(how):
    """torch's add_param_group fills a new group from ``optimizer.defaults``; an edit of the
    wrapper's defaults (lr, a transform's rho) was ignored: the group got the inner optimizer's
    and the transform's construction values. An edit of the inner optimizer's own defaults
    still reaches the groups, and unedited entries change nothing."""
    model = make_model()
    first, second, third = (list(model[i].parameters()) for i in (0, 2, 4))
    plain = torch.optim.SGD(first, lr=0.1, momentum=0.9)
    plain.defaults["lr"] = 0.5
    plain.add_param_group({"params": second})
    optimizer = TransformingOptimizer(first, torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(0.05)])
    if how == "deepcopy":
        optimizer = copy.deepcopy(optimizer)
    elif how == "pickle":
        optimizer = pickle.loads(pickle.dumps(optimizer))
    optimizer.defaults["lr"] = 0.5
    optimizer.defaults["rho"] = 0.2
    optimizer.add_param_group({"params": second})
    group = optimizer.param_groups[1]
    assert (group["lr"], group["rho"], group["momentum"]) == (plain.param_groups[1]["lr"], 0.2, 0.9)
    optimizer.inner.defaults["momentum"] = 0.5
    optimizer.add_param_group({"params": third, "rho": 0.0})
    group = optimizer.param_groups[2]
    assert (group["lr"], group["rho"], group["momentum"]) == (0.5, 0.0, 0.5)


def test_an_edited_default_gives_way_to_the_group_s_own_value_under_either_spelling():
    """With defaults["rho"] edited, a new group giving "sam.rho" was refused as setting both keys
    (the user never wrote "rho"); a key the group sets, under either spelling, wins over a default,
    as in torch. An edit under the qualified spelling fills the group too."""
    model = make_model()
    optimizer = TransformingOptimizer(list(model[0].parameters()), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    optimizer.defaults["rho"] = 0.2
    optimizer.add_param_group({"params": list(model[2].parameters()), "sam.rho": 0.3})
    assert optimizer.param_groups[1]["rho"] == 0.3
    del optimizer.defaults["rho"]
    optimizer.defaults["sam.rho"] = 0.4
    optimizer.add_param_group({"params": [model[4].weight], "rho": 0.0})
    optimizer.add_param_group({"params": [model[4].bias]})
    assert (optimizer.param_groups[2]["rho"], optimizer.param_groups[3]["rho"]) == (0.0, 0.4)
    assert all("sam.rho" not in group for group in optimizer.param_groups)


def test_a_chain_pickled_before_it_recorded_the_inner_optimizer_s_class_learns_it_when_loaded():
    """A key naming the inner optimizer's class ("lamb.eps" beside a LAMP, with an inner Lamb) is
    kept; a chain pickled before chains recorded that class refused it at its first step."""
    from samgria import LAMP

    optimizer = TransformingOptimizer(
        [{"params": make_model().parameters(), "lamb.eps": 1e-6}], Lamb, lr=0.1, transforms=[LAMP(rollback_len=2)]
    )
    optimizer.step()
    del optimizer.chain.__dict__["inner_names"]  # as a chain pickled before it had them
    optimizer.chain.__dict__.pop("_slot_verdicts", None)
    loaded = pickle.loads(pickle.dumps(optimizer))
    loaded.step()
    assert loaded.param_groups[0]["lamb.eps"] == 1e-6 and "lamb" in loaded.chain.inner_names


class Lamb(torch.optim.SGD):
    """Another library's optimizer named like LAMP (timm's Lamb)."""


def test_an_inner_optimizer_that_needs_a_closure_is_refused_with_the_reason():
    with pytest.raises(TypeError, match=r"inner must be an optimizer whose step\(\) works without a closure, got LBFGS"):
        TransformingOptimizer(make_model().parameters(), torch.optim.LBFGS, lr=0.1)

    class NeedsClosure(torch.optim.Optimizer):
        def __init__(self, params, lr=0.1):
            super().__init__(params, {"lr": lr})

        def step(self, closure):  # no default: the wrapper's closure-less call failed inside step()
            loss = closure()
            return loss

    message = r"^inner must be an optimizer whose step\(\) works without a closure, got NeedsClosure, whose step\(\) requires one"
    with pytest.raises(TypeError, match=message):
        TransformingOptimizer(make_model().parameters(), NeedsClosure, transforms=[SAM()])
    with pytest.raises(TypeError, match=message):
        TransformingOptimizer(NeedsClosure(make_model().parameters()), transforms=())


class _LossScaledSGD(torch.optim.Optimizer):
    """An optimizer whose update uses the closure's loss when it is given one, as
    pytorch_optimizer's EmoNavi (a loss trend) and AliG (a Polyak step) do: ``lr * loss``."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = 1.0 if loss is None else float(loss)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad, alpha=-group["lr"] * scale)
        return loss


def test_an_inner_optimizer_that_uses_the_closures_loss_steps_as_on_its_own():
    # step(closure) evaluated the closure itself and stepped the inner optimizer without one:
    # its update silently took the path without a loss (EmoNavi's loss trend read 0.0).
    x, y = make_data()
    bare_model, model = make_model(), make_model()
    bare = _LossScaledSGD(bare_model.parameters())
    optimizer = TransformingOptimizer(model.parameters(), _LossScaledSGD, transforms=())
    for _ in range(3):
        bare.step(make_closure(bare_model, bare, x, y))
        optimizer.step(make_closure(model, optimizer, x, y))
    assert_bitwise_equal(params_of(model), params_of(bare_model))


def test_an_inner_optimizer_that_uses_the_closures_loss_gets_the_first_evaluations_under_sam():
    # The loss at w (what step(closure) returns), the gradients at w + e: as SGD at lr * loss(w)
    # around the same SAM.
    x, y = make_data()
    reference_model, model = make_model(), make_model()
    reference = TransformingOptimizer(reference_model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    optimizer = TransformingOptimizer(model.parameters(), _LossScaledSGD, lr=0.1, transforms=[SAM(0.05)])
    evaluations = [0]

    def reference_closure():
        reference.zero_grad()
        loss = nn.functional.mse_loss(reference_model(x), y)
        loss.backward()
        evaluations[0] += 1
        if evaluations[0] % 2 == 1:  # the first evaluation of a step, at w
            reference.param_groups[0]["lr"] = 0.1 * float(loss.detach())
        return loss

    for _ in range(3):
        assert torch.equal(optimizer.step(make_closure(model, optimizer, x, y)), reference.step(reference_closure))
    assert_bitwise_equal(params_of(model), params_of(reference_model))


def test_an_inner_optimizer_that_evaluates_the_closure_after_moving_the_weights_is_refused_unchanged():
    class MovesThenEvaluates(torch.optim.Optimizer):  # as pytorch_optimizer's BSAM
        def __init__(self, params, lr=0.1):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            if closure is None:
                raise RuntimeError("MovesThenEvaluates needs a closure")
            for group in self.param_groups:
                for param in group["params"]:
                    self.state[param]["moved"] = torch.ones(())
                    param.add_(0.5)
            with torch.enable_grad():
                closure()

    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), MovesThenEvaluates, transforms=())
    weights = params_of(model)
    with pytest.raises(RuntimeError, match=r"MovesThenEvaluates changed the weights and then called the closure"):
        optimizer.step(make_closure(model, optimizer, x, y))
    assert_bitwise_equal(params_of(model), weights)
    assert len(optimizer.state) == 0


def test_an_optimizer_that_drives_another_without_defaults_is_refused_with_the_reason():
    """Like torch.distributed.optim.PostLocalSGDOptimizer: an Optimizer that never called
    ``Optimizer.__init__`` and forwards to the optimizer it holds."""

    class Forwarding(torch.optim.Optimizer):
        def __init__(self, optim):  # no super().__init__: no defaults of its own
            self.optim = optim
            self.param_groups = optim.param_groups
            self.state = optim.state

        def step(self, closure=None):
            return self.optim.step(closure)

    forwarding = Forwarding(torch.optim.SGD(make_model().parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"inner must be a torch\.optim\.Optimizer with defaults .*got a Forwarding without defaults"):
        TransformingOptimizer(forwarding, transforms=[SAM(0.05)])


class TimmLookahead(torch.optim.Optimizer):
    """timm's ``Lookahead`` as it is (``timm/optim/lookahead.py``): it shares the base optimizer's
    defaults and param groups, keeps ``self.state`` empty, writes its slow weights into the base
    optimizer's state and forwards ``state_dict``/``load_state_dict`` to it."""

    def __init__(self, base_optimizer, alpha=0.5, k=6):
        defaults = dict(lookahead_alpha=alpha, lookahead_k=k, lookahead_step=0)
        self._base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self.defaults.update(defaults)
        self.state = collections.defaultdict(dict)
        self._optimizer_step_pre_hooks = collections.OrderedDict()  # for torch's step wrapper
        self._optimizer_step_post_hooks = collections.OrderedDict()
        for name, default in defaults.items():
            for group in self._base_optimizer.param_groups:
                group.setdefault(name, default)

    @torch.no_grad()
    def update_slow(self, group):
        for fast in group["params"]:
            if fast.grad is None:
                continue
            param_state = self._base_optimizer.state[fast]
            if "lookahead_slow_buff" not in param_state:
                param_state["lookahead_slow_buff"] = fast.detach().clone()
            slow = param_state["lookahead_slow_buff"]
            slow.add_(fast - slow, alpha=group["lookahead_alpha"])
            fast.copy_(slow)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._base_optimizer.step(closure)
        for group in self._base_optimizer.param_groups:
            group["lookahead_step"] += 1
            if group["lookahead_step"] % group["lookahead_k"] == 0:
                self.update_slow(group)
        return loss

    def state_dict(self):
        return self._base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self._base_optimizer.load_state_dict(state_dict)
        self.param_groups = self._base_optimizer.param_groups


HOLDS_ANOTHER = (
    r"^{name} must be an optimizer that keeps its own state, got a TimmLookahead, which holds another "
    r"optimizer \(its attribute '_base_optimizer', an Adam\) and keeps its state there, where the "
    r"wrapper's checkpoints and atomic steps cannot see it: wrap the optimizer it holds instead$"
)


def test_an_inner_optimizer_that_keeps_its_state_in_another_optimizer_is_refused_unchanged():
    """timm's Lookahead keeps Adam's moments and its slow weights in the Adam it holds: the
    wrapper's state_dict() came back with an empty state and its atomic step could not roll them
    back. Refused at construction; the optimizer passed is left as it was (bit for bit)."""
    model = make_model()
    x, y = make_data()
    lookahead = TimmLookahead(torch.optim.Adam(model.parameters(), lr=0.01), k=2)
    for _ in range(2):  # Adam's moments and the slow weights in the base optimizer's state
        lookahead.step(make_closure(model, lookahead, x, y))
    assert lookahead.state_dict()["state"] and not lookahead.state
    before = copy.deepcopy(lookahead.state_dict())
    groups = [{k: v for k, v in group.items() if k != "params"} for group in lookahead.param_groups]
    defaults = dict(lookahead.defaults)
    with pytest.raises(TypeError, match=HOLDS_ANOTHER.format(name="params")):
        TransformingOptimizer(lookahead, transforms=[SAM(0.05)])
    assert_state_dicts_equal(lookahead.state_dict(), before)
    assert [{k: v for k, v in group.items() if k != "params"} for group in lookahead.param_groups] == groups
    assert lookahead.defaults == defaults and not lookahead.state
    assert type(lookahead._base_optimizer.state) is collections.defaultdict  # no wrapper's view
    factory = lambda params, **kwargs: TimmLookahead(torch.optim.Adam(params, **kwargs), k=2)  # noqa: E731
    with pytest.raises(TypeError, match=HOLDS_ANOTHER.format(name="inner")):
        TransformingOptimizer(make_model().parameters(), factory, transforms=[SAM(0.05)], lr=0.01)


@pytest.fixture
def one_rank_gloo_group():
    from distributed_harness import one_rank_gloo_group as group

    with group():
        yield


def _zero_redundancy_optimizer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script in torch's own import
        from torch.distributed.optim import ZeroRedundancyOptimizer
    return ZeroRedundancyOptimizer


def test_zero_redundancy_optimizer_is_refused_as_inner_unchanged(one_rank_gloo_group):
    """ZeroRedundancyOptimizer keeps its state in the local optimizer it holds (``.optim``), over
    this rank's shard of the parameters only: as the inner optimizer it is refused (the wrapper
    could not see the state), naming FSDP2, and left as it was."""
    ZeroRedundancyOptimizer = _zero_redundancy_optimizer()
    model = make_model()
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=0.01)
    with pytest.raises(
        TypeError,
        match=(
            r"^params must be an optimizer that keeps its own state, got a ZeroRedundancyOptimizer, which "
            r"holds another optimizer \(its attribute 'optim', an Adam\) .* shard the parameters with "
            r"FSDP2 \(torch\.distributed\.fsdp\.fully_shard\) instead$"
        ),
    ):
        TransformingOptimizer(zero, transforms=[SAM(0.05)])
    assert type(zero.optim.state) is collections.defaultdict and "rho" not in zero.param_groups[0]


def test_zero_redundancy_optimizer_cannot_build_a_transforming_optimizer_with_transforms(one_rank_gloo_group):
    """Built by ZeRO as its local optimizer, a TransformingOptimizer has only this rank's shard
    of the parameters: SAM's norm and perturbation would cover the shard alone. Refused, naming
    FSDP2. Without transforms it is a pass-through and steps as the plain optimizer does under
    ZeRO, bit for bit."""
    ZeroRedundancyOptimizer = _zero_redundancy_optimizer()
    with pytest.raises(
        TypeError,
        match=(
            r"^TransformingOptimizer with transforms cannot be ZeroRedundancyOptimizer's local optimizer: "
            r"each rank's local optimizer has only its shard of the parameters, and the transforms \(SAM\) "
            r"need every parameter .*FSDP2 \(torch\.distributed\.fsdp\.fully_shard\)"
        ),
    ):
        ZeroRedundancyOptimizer(
            make_model().parameters(), optimizer_class=TransformingOptimizer, inner=torch.optim.Adam,
            transforms=[SAM(0.05)], lr=0.01,
        )

    # transforms=(): a pass-through, as the plain Adam under ZeRO, bit for bit.
    x, y = make_data()
    models = [make_model(), make_model()]
    optimizers = [
        ZeroRedundancyOptimizer(models[0].parameters(), optimizer_class=torch.optim.Adam, lr=0.01),
        ZeroRedundancyOptimizer(
            models[1].parameters(), optimizer_class=TransformingOptimizer, inner=torch.optim.Adam, transforms=(), lr=0.01
        ),
    ]
    for model, optimizer in zip(models, optimizers):
        for _ in range(3):
            optimizer.step(make_closure(model, optimizer, x, y))
    assert_bitwise_equal(params_of(models[1]), params_of(models[0]))


def test_an_inner_optimizer_whose_step_requires_other_arguments_is_refused_naming_them():
    """The wrapper calls the inner step with at most a closure: a required keyword-only argument
    (or a second required positional one) failed at the first step with torch's bare TypeError."""

    class ExtraKw(torch.optim.Optimizer):
        def __init__(self, params, lr=0.1):
            super().__init__(params, {"lr": lr})

        def step(self, closure=None, *, scale):
            return None

    class ExtraPositional(ExtraKw):
        def step(self, closure, scale):
            return None

    class OptionalExtras(ExtraKw):
        def step(self, closure=None, *args, scale=1.0, **kwargs):
            return None

    message = r"^{argument} must be an optimizer whose step\(\) takes no arguments but a closure, got {name}, whose step\(\) requires 'scale'"
    with pytest.raises(TypeError, match=message.format(argument="inner", name="ExtraKw")):
        TransformingOptimizer(make_model().parameters(), ExtraKw, transforms=[SAM()])
    existing = ExtraKw(make_model().parameters())
    with pytest.raises(TypeError, match=message.format(argument="params", name="ExtraKw")):  # as given
        TransformingOptimizer(existing, transforms=())
    assert existing.param_groups[0].keys() == {"params", "lr"} and type(existing.state) is collections.defaultdict
    with pytest.raises(TypeError, match=message.format(argument="inner", name="ExtraPositional")):
        TransformingOptimizer(make_model().parameters(), ExtraPositional, transforms=[SAM()])
    TransformingOptimizer(make_model().parameters(), OptionalExtras, transforms=[SAM()])  # accepted


def test_a_load_inside_a_load_pre_hook_does_not_skip_validation():
    model = make_model()
    optimizer = sam_opt(model)
    good = copy.deepcopy(optimizer.state_dict())
    inside = []

    def load_good_first(opt, sd):
        if not inside:
            inside.append(True)
            opt.load_state_dict(good)

    optimizer.register_load_state_dict_pre_hook(load_good_first)
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["rho"] = -1.0
    with pytest.raises(ValueError, match=r"rho must be a finite number >= 0, got -1\.0"):
        optimizer.load_state_dict(bad)
    assert optimizer.param_groups[0]["rho"] == 0.05


def test_view_parameters_of_a_flat_buffer_are_perturbed_where_the_forward_reads_them():
    torch.manual_seed(0)
    flat = torch.randn(6, dtype=torch.float64)
    first, second = nn.Parameter(torch.empty(3, dtype=torch.float64)), nn.Parameter(torch.empty(3, dtype=torch.float64))
    first.data, second.data = flat[:3], flat[3:]
    seen = []

    def closure():
        optimizer.zero_grad()
        seen.append(flat.clone())  # a forward that reads the weights through the flat buffer
        loss = (flat * torch.arange(6.0, dtype=torch.float64)).sum() + (first * second).sum()
        loss.backward()
        return loss

    optimizer = TransformingOptimizer([first, second], torch.optim.SGD, lr=0.0, transforms=[SAM(rho=0.5)])
    before = flat.clone()
    optimizer.step(closure)
    assert not torch.equal(seen[1], before), "the re-evaluation saw the perturbed weights"
    assert torch.equal(flat, before), "and they are restored bit for bit, in the same storage"
    assert first.data_ptr() == flat.data_ptr()


def test_the_wrapped_optimizers_own_checkpoints_keep_working():
    """Wrapping an existing optimizer: its own state_dict()/load_state_dict() still behave."""
    x, y = make_data()
    model = make_model()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    optimizer = TransformingOptimizer(adam, transforms=[SAM(0.05), LAMP(eps=1e-3, rollback_len=3, seed=0)])
    closure = make_closure(model, optimizer, x, y)
    optimizer.step(closure)
    buffer = io.BytesIO()
    torch.save(adam.state_dict(), buffer)
    buffer.seek(0)
    inner_checkpoint = torch.load(buffer, weights_only=True)
    assert not any(key.startswith("lamp.") for entry in inner_checkpoint["state"].values() for key in entry)
    optimizer.step(closure)
    adam.load_state_dict(inner_checkpoint)  # back to the inner state after one step
    weight = model[0].weight
    assert int(optimizer.state_dict()["state"][1]["step"]) == 1
    assert "lamp.sum" in optimizer.state[weight]  # the transforms' slots are kept
    optimizer.step(closure)
    assert int(optimizer.state[weight]["step"]) == 2 and int(adam.state[weight]["step"]) == 2


# ---------------------------------------------------------------------- coming from the PyTorch SAM
@pytest.mark.parametrize("transform", [SAM, ASAM])
def test_a_transform_called_like_the_pytorch_sam_points_to_sam_optimizer(transform):
    model = nn.Linear(2, 1)
    name = transform.__name__
    expected = (
        rf"samgria\.{name} is a transform, not an optimizer: {name}\(params, base_optimizer, \.\.\.\) is the "
        r"constructor of the widely used PyTorch SAM\. Use samgria\.sam_optimizer\(params, base_optimizer"
    )
    with pytest.raises(TypeError, match=expected):
        transform(model.parameters(), torch.optim.SGD, rho=0.05)
    with pytest.raises(TypeError, match=expected):
        transform(list(model.parameters()))
    assert transform(0.1).rho == 0.1 and transform(rho=0.2).rho == 0.2  # the transform's own call
    assert pickle.loads(pickle.dumps(transform(0.3))).rho == 0.3


def test_asam_takes_its_own_arguments_by_position_and_both_show_their_signature():
    """ASAM(0.5, 0.01) -- rho and eta by position, as its signature says -- was refused as the
    PyTorch SAM's (params, base_optimizer) call, with a message saying so; and the signature that
    help(), IDEs and the API reference show for SAM and ASAM was ``(*args, **kwargs)`` (their
    ``__new__``'s), so SAM's default rho was written nowhere a user reads."""
    import inspect

    asam = ASAM(0.5, 0.01, False)
    assert (asam.rho, asam.eta, asam.adaptive) == (0.5, 0.01, False)
    assert str(inspect.signature(SAM)) == "(rho: 'float' = 0.01)"
    assert str(inspect.signature(ASAM)) == "(rho: 'float' = 0.5, eta: 'float' = 0.01, adaptive: 'bool' = True)"

    class WiderSAM(SAM):
        def __init__(self, rho=0.1, width=2):
            super().__init__(rho)

    assert str(inspect.signature(WiderSAM)) == "(rho=0.1, width=2)"  # a subclass's own
    with pytest.raises(TypeError, match=r"^samgria\.SAM is a transform, not an optimizer"):
        SAM(0.1, torch.optim.SGD)


def test_base_optimizer_is_the_inner_optimizer():
    model = nn.Linear(2, 1)
    optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert optimizer.base_optimizer is optimizer.inner
    assert optimizer.base_optimizer.param_groups is optimizer.param_groups


# ---------------------------------------------------------------------- gradient accumulation
def _sam_by_hand(weights, loss_of, rho, lr):
    """One SAM step with SGD on the whole batch, written out (the reference)."""
    w = [t.detach().clone().requires_grad_(True) for t in weights]
    grads = torch.autograd.grad(loss_of(w), w)
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    perturbed = [(t + rho * g / norm).detach().requires_grad_(True) for t, g in zip(w, grads)]
    grads_at_perturbed = torch.autograd.grad(loss_of(perturbed), perturbed)
    return [t.detach() - lr * g for t, g in zip(w, grads_at_perturbed)]


def _accumulation_problem(micro_batches=4, size=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    xs = torch.randn(micro_batches, size, 3, dtype=torch.float64)
    ys = torch.randn(micro_batches, size, 1, dtype=torch.float64)
    return model, xs, ys


def _whole_batch_loss(model, xs, ys):
    def loss_of(weights):
        names = [n for n, _ in model.named_parameters()]
        out = torch.func.functional_call(model, dict(zip(names, weights)), (xs.flatten(0, 1),))
        return nn.functional.mse_loss(out, ys.flatten(0, 1))

    return loss_of


def test_gradient_accumulation_in_a_closure_equals_sam_on_the_concatenated_batch():
    model, xs, ys = _accumulation_problem()
    expected = _sam_by_hand(list(model.parameters()), _whole_batch_loss(model, xs, ys), rho=0.05, lr=0.1)
    optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

    def closure():
        optimizer.zero_grad()
        total = 0.0
        for x, y in zip(xs, ys):  # micro-batches of equal size: the mean of means is the mean
            loss = nn.functional.mse_loss(model(x), y) / len(xs)
            loss.backward()
            total += loss.detach()
        return total

    optimizer.step(closure)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-13, atol=1e-15)


def test_gradient_accumulation_in_the_two_call_loop_equals_sam_on_the_concatenated_batch():
    model, xs, ys = _accumulation_problem()
    expected = _sam_by_hand(list(model.parameters()), _whole_batch_loss(model, xs, ys), rho=0.05, lr=0.1)
    optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    for x, y in zip(xs, ys):  # first pass over every micro-batch
        (nn.functional.mse_loss(model(x), y) / len(xs)).backward()
    optimizer.first_step(zero_grad=True)
    for x, y in zip(xs, ys):  # second pass, at the perturbed weights
        (nn.functional.mse_loss(model(x), y) / len(xs)).backward()
    optimizer.second_step(zero_grad=True)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-13, atol=1e-15)


def test_an_optimizer_already_driven_by_a_wrapper_is_refused_before_anything_changes():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    first = TransformingOptimizer(base, transforms=[SAM(0.05)])
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in base.param_groups])
    with pytest.raises(ValueError, match=r"params is already driven by a TransformingOptimizer, which holds its state and param groups: build a new SGD"):
        TransformingOptimizer(base, transforms=[SAM(rho=0.5)])
    assert [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups] == groups
    assert first.param_groups[0]["rho"] == 0.05


def test_first_step_refuses_first_pass_context_before_anything_changes():
    """m-sharpness needs step(closure), which agrees the ranks' decisions; in the two-call loop a
    rank that perturbed nothing re-ran the transforms before SAM alone and the replicas drifted."""
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)], first_pass_context=contextlib.nullcontext
    )
    nn.functional.mse_loss(model(x), y).backward()
    weights = params_of(model)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"^first_pass_context \(m-sharpness\) needs step\(closure\), which agrees the ranks' decisions"):
        optimizer.first_step()
    assert_bitwise_equal(params_of(model), weights)
    assert all((p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g)) for p, g in zip(model.parameters(), grads))
    assert optimizer._pending is None
    optimizer.step(make_closure(model, optimizer, x, y))  # step(closure) works


def test_a_load_pre_hook_that_removes_itself_runs_once_as_with_torchs_optimizers():
    """A one-shot hook (it removes its own handle) works with torch's optimizers; the wrapper's
    own step between the user's pre-hooks and torch's cast must not make that fail."""
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), LAMP(1e-2)])
    optimizer.step(make_closure(model, optimizer, x, y))
    calls = []

    def once(_optimizer, state_dict):
        calls.append(1)
        handle.remove()
        state_dict["param_groups"] = copy.deepcopy(state_dict["param_groups"])  # in place, on torch's shallow copy

    handle = optimizer.register_load_state_dict_pre_hook(once)
    saved = optimizer.state_dict()
    groups = saved["param_groups"]
    optimizer.load_state_dict(saved)
    optimizer.load_state_dict(saved)
    assert calls == [1]
    assert saved["param_groups"] is groups  # the caller's dict is not changed


@pytest.mark.parametrize("make", [lambda params: torch.optim.Adam(params, lr=0.1), lambda params: TransformingOptimizer(params, torch.optim.Adam, lr=0.1, transforms=[SAM(0.05)])], ids=["torch", "wrapper"])
def test_load_post_hooks_see_the_real_pre_hooks_as_with_torch(make):
    """A pre-hook registered by a post-hook runs at the next load (its handle stays valid), and a
    load from a post-hook runs the pre-hooks: the wrapper's own handling of pre-hooks ends before
    torch runs the post-hooks."""
    model = make_model()
    optimizer = make(model.parameters())
    x, y = make_data()
    optimizer.step(make_closure(model, optimizer, x, y))
    ran, handles, depth = [], [], [0]
    optimizer.register_load_state_dict_pre_hook(lambda _o, _sd: ran.append("pre"))

    def post(opt):
        if not handles:
            handles.append(opt.register_load_state_dict_pre_hook(lambda _o, _sd: ran.append("late")))
        if depth[0] == 0:
            depth[0] = 1
            opt.load_state_dict(opt.state_dict())  # a load from a post-hook runs the pre-hooks

    optimizer.register_load_state_dict_post_hook(post)
    optimizer.load_state_dict(optimizer.state_dict())
    assert ran == ["pre", "pre", "late"]
    optimizer.load_state_dict(optimizer.state_dict())
    assert ran == ["pre", "pre", "late", "pre", "late"]
    handles[0].remove()
    optimizer.load_state_dict(optimizer.state_dict())
    assert ran[-1] == "pre"


@pytest.mark.parametrize("inner", [torch.optim.SGD, torch.optim.Adam, torch.optim.NAdam])
@pytest.mark.parametrize("copier", ["deepcopy-outer", "deepcopy-inner", "pickle-outer"])
def test_a_transforming_optimizer_driven_by_a_meta_optimizer_copies_alone(copier, inner):
    """Copying a meta-optimizer's outer TransformingOptimizer (or its inner) reaches the
    meta-optimizer through the state's view; unpickling it set the groups of the outer before
    the outer had its attributes (AttributeError: no attribute 'inner'), and Adam's own
    __setstate__ read its state's view before the outer had its chain."""
    from samgria import MAML

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    outer = TransformingOptimizer(model.parameters(), inner, lr=0.1, transforms=[SAM(0.05), LAMP(seed=1)])
    meta = MAML(model, outer, inner_lr=0.05)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    meta.step(_meta_closure(meta, x, y))
    if copier == "deepcopy-outer":
        copied = copy.deepcopy(meta.outer)
    elif copier == "deepcopy-inner":
        copied = copy.deepcopy(meta.outer.inner)
    else:
        copied = pickle.loads(pickle.dumps(meta.outer))
    original = meta.outer if copier != "deepcopy-inner" else meta.outer.inner
    saved, copied_saved = original.state_dict(), copied.state_dict()
    assert_states_equal(copied_saved["state"], saved["state"])
    assert [len(g["params"]) for g in copied.param_groups] == [len(g["params"]) for g in original.param_groups]
    assert all(p is not q for p, q in zip(copied.param_groups[0]["params"], original.param_groups[0]["params"]))


# -- a schedule-free inner optimizer's train()/eval() ---------------------------------------------------
def test_train_and_eval_reach_a_schedule_free_inner_optimizer_and_exist_only_where_it_has_them():
    """Frameworks (the Hugging Face Trainer, accelerate) switch schedule-free optimizers with
    ``optimizer.eval()``/``train()`` when ``hasattr`` finds them: the wrapper must forward them
    (the weights become the averaged sequence and come back bit for bit), and not offer them
    over an optimizer that has none."""
    model = make_model()
    bare_model = copy.deepcopy(model)
    optimizer = TransformingOptimizer(model.parameters(), ToyScheduleFree, lr=0.1, transforms=[SAM(0.0)])
    bare = ToyScheduleFree(bare_model.parameters(), lr=0.1)
    x, y = make_data()
    closure, bare_closure = make_closure(model, optimizer, x, y), make_closure(bare_model, bare, x, y)
    for _ in range(3):
        optimizer.step(closure)
        bare.step(bare_closure)
    assert hasattr(optimizer, "train") and hasattr(optimizer, "eval")
    assert not hasattr(TransformingOptimizer(make_model().parameters(), torch.optim.SGD, lr=0.1), "eval")
    trained = [p.detach().clone() for p in model.parameters()]
    optimizer.eval()
    bare.eval()
    assert optimizer.inner.param_groups[0]["train_mode"] is False
    assert_bitwise_equal(list(model.parameters()), list(bare_model.parameters()))
    assert not all(torch.equal(p, t) for p, t in zip(model.parameters(), trained)), "eval() changed no weight"
    optimizer.train()
    assert_bitwise_equal(list(model.parameters()), trained)
    optimizer.step(closure)  # in train mode again

    # Between first_step() and second_step() the weights are perturbed: eval() is refused.
    model_b = make_model()
    two_call = TransformingOptimizer(model_b.parameters(), ToyScheduleFree, lr=0.1, transforms=[SAM(0.05)])
    make_closure(model_b, two_call, x, y)()
    two_call.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match=r"^eval\(\) between first_step\(\) and second_step\(\)"):
        two_call.eval()
    assert two_call.inner.param_groups[0]["train_mode"] is True
    two_call.train()  # what the Hugging Face Trainer calls at every training step: passed on
    two_call.cancel_step()


def test_a_meta_optimizer_forwards_train_and_eval_to_its_outer_optimizer():
    from samgria import FOMAML

    model = make_model()
    meta = FOMAML(model, ToyScheduleFree, lr=0.1, inner_lr=0.05)
    assert hasattr(meta, "eval")
    meta.eval()
    assert meta.param_groups[0]["train_mode"] is False
    meta.train()
    assert meta.param_groups[0]["train_mode"] is True
    assert not hasattr(FOMAML(make_model(), torch.optim.SGD, lr=0.1, inner_lr=0.05), "train")


# -- step hooks in the two-call loop -------------------------------------------------------------------
@pytest.mark.parametrize(
    "transform, finish",
    [(t, f) for t in ("SAM", "GSAM", "MultiStepSAM") for f in ("second_step", "step")] + [("SAM", "GradScaler.step")],
)
def test_two_call_step_pre_hooks_see_the_weights_the_step_updates_and_keep_their_writes(finish, transform):
    """As step(closure)'s, the pre-hooks (global and the optimizer's) of the call that finishes a
    two-call step see w, not w + e, and what they write into the weights is what the inner
    optimizer updates (with lr=0: the weights stay as the hook left them)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from samgria import GSAM

    make = {"SAM": lambda: SAM(0.5), "GSAM": lambda: GSAM(0.5, alpha=0.3), "MultiStepSAM": lambda: MultiStepSAM(0.5)}
    model = make_model()
    x, y = make_data()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.0, momentum=0.9, transforms=[make[transform]()])
    params = [p for p in model.parameters() if p.requires_grad]
    seen: dict[str, list[torch.Tensor]] = {}

    def instance_hook(opt, args, kwargs):
        seen["instance"] = [p.detach().clone() for p in params]
        with torch.no_grad():
            for param in params:
                param.clamp_(-0.1, 0.1)

    def global_hook(opt, args, kwargs):
        if opt is optimizer:
            seen["global"] = [p.detach().clone() for p in params]

    optimizer.register_step_pre_hook(instance_hook)
    handle = register_optimizer_step_pre_hook(global_hook)
    try:
        start = [p.detach().clone() for p in params]
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0) if finish == "GradScaler.step" else None
        for half in ("first", "second"):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
            if half == "first":
                optimizer.first_step(zero_grad=True)
                assert not all(torch.equal(p, s) for p, s in zip(params, start)), "first_step moved nothing"
        if finish == "second_step":
            optimizer.second_step(zero_grad=True)
        elif finish == "step":
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
    finally:
        handle.remove()
    assert_bitwise_equal(seen["global"], start)
    assert_bitwise_equal(seen["instance"], start)
    assert_bitwise_equal(params, [s.clamp(-0.1, 0.1) for s in start])


def test_a_perturbation_restored_early_still_hands_on_its_buffers():
    """restore() after restore_weights() (the weights went back before the step hooks) returns
    the backup buffers of the first call: the optimizer copies its snapshot into them."""
    param = torch.nn.Parameter(torch.ones(3))
    original, buffer = param.data, torch.full((3,), 2.0)
    param.data = buffer
    perturbation = Perturbation([(param, original, buffer, True)])
    first = perturbation.restore_weights()
    assert param.data_ptr() == original.data_ptr() and first == {id(param): buffer}
    assert perturbation.restore() == {id(param): buffer}
    assert param.data_ptr() == original.data_ptr()


class _StepOverridingOptimizer(TransformingOptimizer):
    """A subclass whose own ``step`` calls ``super().step()`` (and counts its calls)."""

    calls = 0

    def step(self, closure=None):
        type(self).calls += 1
        return super().step(closure)


class _StepMixin:
    """A mixin whose ``step`` calls ``super().step()`` (torch would wrap it as the class's step)."""

    def step(self, closure=None, *, note=None):
        _StepOverridingOptimizer.calls += 1
        return super().step(closure)


class _MixedInOptimizer(_StepMixin, TransformingOptimizer):
    pass


@pytest.mark.parametrize("cls", [_StepOverridingOptimizer, _MixedInOptimizer], ids=["subclass", "mixin"])
@pytest.mark.parametrize("loop", ["closure", "two-call", "meta"])
def test_a_subclass_overriding_step_runs_the_hooks_once_and_they_see_w(loop, cls):
    """torch would wrap the subclass's step in a second hook wrapper, which ran the hooks twice
    (the first time at w + e in the two-call loop); through a meta-optimizer, none may run."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from samgria import FOMAML

    model = make_model()
    x, y = make_data()
    optimizer = cls(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.5)])
    params = [p for p in model.parameters() if p.requires_grad]
    seen, global_seen = [], []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append([p.detach().clone() for p in params]))
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: global_seen.append(type(opt).__name__))
    start = [p.detach().clone() for p in params]
    calls_before = _StepOverridingOptimizer.calls
    try:
        if loop == "closure":
            optimizer.step(make_closure(model, optimizer, x, y))
        elif loop == "two-call":
            make_closure(model, optimizer, x, y)()
            optimizer.first_step(zero_grad=True)
            make_closure(model, optimizer, x, y)()
            optimizer.second_step(zero_grad=True)
        else:
            with pytest.warns(UserWarning, match=r"^outer has hooks of its own \(1 register_step_pre_hook\), which the FOMAML does not run"):
                meta = FOMAML(model, optimizer, inner_lr=0.05)
            meta.step(make_closure(model, meta, x, y))
    finally:
        handle.remove()
    assert _StepOverridingOptimizer.calls == calls_before + 1, "the subclass's step runs once"
    if loop == "meta":
        assert global_seen == ["FOMAML"] and seen == [], "the driven optimizer's hooks do not run"
    else:
        assert global_seen == [cls.__name__] and len(seen) == 1
        assert_bitwise_equal(seen[0], start)
    assert not all(torch.equal(p, s) for p, s in zip(params, start)), "the step moved nothing"


def test_a_step_hook_raising_under_grad_scaler_leaves_no_scale_behind():
    """GradScaler.step deletes what it set on the optimizer only after the step returns: a pre-hook
    that raises must not leave it for the next step without a scaler (which would divide the
    gradients by the old scale), and cancel_step() abandons the step exactly."""
    model = make_model()
    reference_model = copy.deepcopy(model)
    x, y = make_data()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    reference = TransformingOptimizer(reference_model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def refuse(opt, args, kwargs):
        raise ValueError("hook refuses")

    handle = optimizer.register_step_pre_hook(refuse)
    start = [p.detach().clone() for p in model.parameters()]
    for half in ("first", "second"):
        optimizer.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if half == "first":
            optimizer.first_step(zero_grad=True)
    with pytest.raises(ValueError, match="hook refuses"):
        scaler.step(optimizer)
    handle.remove()
    assert not hasattr(optimizer, "found_inf") and not hasattr(optimizer, "grad_scale")
    optimizer.cancel_step()
    assert_bitwise_equal(list(model.parameters()), start)
    # The next steps, without a scaler, equal an optimizer that never saw the failed one.
    for opt, net in ((optimizer, model), (reference, reference_model)):
        for half in ("first", "second"):
            make_closure(net, opt, x, y)()
            opt.first_step(zero_grad=True) if half == "first" else opt.second_step(zero_grad=True)
        opt.step(make_closure(net, opt, x, y))
    assert_bitwise_equal(list(model.parameters()), list(reference_model.parameters()))


def test_step_hooks_get_the_calls_arguments_and_may_replace_them():
    """As torch's wrapper does: a closure passed by keyword reaches the pre-hooks in ``kwargs``,
    and the (args, kwargs) a pre-hook returns are what the step runs with; a subclass's own step
    keeps its signature (GradScaler and users inspect it)."""
    import inspect

    model = make_model()
    x, y = make_data()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    closure = make_closure(model, optimizer, x, y)
    received, evaluations = [], []

    def hook(opt, args, kwargs):
        received.append((len(args), sorted(kwargs)))

        def counted():
            evaluations.append(1)
            return kwargs["closure"]()

        return args, {**kwargs, "closure": counted}

    optimizer.register_step_pre_hook(hook)
    optimizer.step(closure=closure)
    assert received == [(1, ["closure"])] and len(evaluations) == 2, "SAM evaluates the hook's closure twice"
    assert list(inspect.signature(optimizer.step).parameters) == ["closure"]
    mixed = _MixedInOptimizer(make_model().parameters(), torch.optim.SGD, lr=0.1, transforms=())
    assert list(inspect.signature(mixed.step).parameters) == ["closure", "note"]


def test_a_copy_taken_inside_a_step_hook_runs_its_own_hooks():
    """Whatever marks a step in progress is not copied: a checkpoint of the optimizer taken in a
    post-hook (deepcopy, torch.save) steps with its hooks like the original."""
    model = make_model()
    x, y = make_data()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    copies = []
    handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: copies.append(copy.deepcopy(opt)))
    optimizer.step(make_closure(model, optimizer, x, y))
    handle.remove()
    twin = copies[0]
    ran = []
    twin.register_step_pre_hook(lambda opt, args, kwargs: ran.append("pre"))
    twin.step(make_closure(model, twin, x, y))
    assert ran == ["pre"]


def test_a_meta_optimizer_subclass_overriding_step_runs_the_hooks_once():
    """The same wrapper serves meta-optimizers: a subclass's step calling super().step() runs the
    step hooks once, whether or not a plain instance of the parent class was built first."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from samgria import MAML

    class CountingMAML(MAML):
        def step(self, closure=None):
            return super().step(closure)

    x, y = make_data()
    for _ in range(2):  # the second time, MAML.step has been wrapped by a plain MAML as well
        model = make_model()
        MAML(make_model(), torch.optim.SGD, lr=0.1, inner_lr=0.05)
        meta = CountingMAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.05)
        names = []
        handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: names.append(type(opt).__name__))
        own = []
        meta.register_step_pre_hook(lambda opt, args, kwargs: own.append(1))
        try:
            meta.step(make_closure(model, meta, x, y))
        finally:
            handle.remove()
        assert names == ["CountingMAML"] and own == [1]


@pytest.mark.parametrize("transforms", [(), ("EMA",)], ids=["plain", "EMA"])
def test_a_first_step_at_lr_zero_with_sparse_gradients_steps_as_torch_does(transforms):
    """A warm-up from lr 0 with sparse gradients: the check that tells torch.distributed.checkpoint's
    state initialisation (every lr 0, every gradient 0) from a user's step compared sparse
    gradients with != (not implemented for them) and raised. The weights must follow plain SGD."""
    from samgria import EMA

    torch.manual_seed(0)
    embedding = nn.Embedding(10, 4, sparse=True)
    reference = copy.deepcopy(embedding)
    initial = embedding.weight.detach().clone()
    optimizer = TransformingOptimizer(
        embedding.parameters(), torch.optim.SGD, transforms=[EMA(0.9)] if transforms else [], lr=0.1
    )
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: step / 10) for o in (optimizer, plain)]
    index = torch.tensor([1, 3, 3, 7])
    for _ in range(3):
        for module, opt in ((embedding, optimizer), (reference, plain)):
            opt.zero_grad()
            module(index).square().sum().backward()
            opt.step()
        for scheduler in schedulers:
            scheduler.step()
        assert torch.equal(embedding.weight, reference.weight)
    assert not torch.equal(embedding.weight, initial), "the later steps (lr > 0) moved the weights"


def test_differentiable_true_differentiates_the_inner_step_alone_at_the_values_the_transforms_wrote():
    """Guide, Guarantees: ``differentiable=True`` differentiates the inner step only; the transforms
    write under ``torch.no_grad``, so the derivative leaves out ClipGradNorm's scaling and Lookahead's
    interpolation, while the weights take the values they wrote. Reference: the derivative of torch's
    bare ``SGD(differentiable=True)`` step, and the clipped, interpolated step written out."""
    from samgria import ClipGradNorm

    torch.manual_seed(0)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = (3 * torch.randn(3, dtype=torch.float64)).requires_grad_()
    param = w.clone()
    param.grad = g.clone()
    transforms = [ClipGradNorm(0.1), Lookahead(alpha=0.5, k=1)]
    TransformingOptimizer([param], torch.optim.SGD, lr=0.1, differentiable=True, transforms=transforms).step()
    bare = w.clone()
    bare.grad = g.clone()
    torch.optim.SGD([bare], lr=0.1, differentiable=True).step()
    ours, theirs = torch.autograd.grad(param.sum(), (w, g)), torch.autograd.grad(bare.sum(), (w, g))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))  # d/dw = 1, d/dg = -lr: the inner step's
    coefficient = 0.1 / (g.detach().norm() + 1e-6)  # torch.nn.utils.clip_grad_norm_'s
    assert coefficient < 0.1  # the clip and the interpolation change the values, not the derivative
    expected = w.detach() + 0.5 * (-0.1 * coefficient * g.detach())  # phi + alpha (theta - phi), phi = w
    torch.testing.assert_close(param.detach(), expected, rtol=1e-15, atol=0)


def test_a_pytorch_optimizer_sam_checkpoint_loads_whole_into_sam_optimizer_and_continues_its_run():
    """Migration guide: pytorch_optimizer's SAM (the widely used constructor and loop) keeps its base
    optimizer's state as its own and drops ``"old_p"`` in ``second_step``, so its checkpoint holds the
    momentum buffers and loads whole. Reference: pytorch_optimizer's own continuation, to its
    rounding (a float32 gradient norm plus perturb_eps); the groups alone would restart the momentum."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).double()

    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=generator, dtype=torch.float64), torch.randn(16, 1, generator=generator, dtype=torch.float64)) for _ in range(5)]

    def two_call(model, optimizer, x, y):
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.second_step(zero_grad=True)

    theirs_model = make()
    theirs = pytorch_optimizer.SAM(theirs_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for x, y in batches[:2]:
        two_call(theirs_model, theirs, x, y)
    buffer = io.BytesIO()
    torch.save({"model": theirs_model.state_dict(), "optimizer": theirs.state_dict()}, buffer)
    for x, y in batches[2:]:
        two_call(theirs_model, theirs, x, y)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert {key for entry in checkpoint["optimizer"]["state"].values() for key in entry} == {"momentum_buffer"}
    model = make()
    model.load_state_dict(checkpoint["model"])
    optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    optimizer.load_state_dict(checkpoint["optimizer"])
    for x, y in batches[2:]:
        two_call(model, optimizer, x, y)
    for ours, reference in zip(model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(ours, reference, rtol=1e-7, atol=1e-9)


def test_an_inner_optimizer_whose_step_takes_only_a_required_keyword_is_refused_naming_it():
    """A step without a closure parameter whose first argument is a required keyword-only one:
    that argument is no closure, so it is named as one the wrapper cannot pass."""

    class OnlyKeyword(torch.optim.SGD):
        def step(self, *, scale):
            return None

    with pytest.raises(TypeError, match=r"^inner must be an optimizer whose step\(\) takes no arguments but a closure, got OnlyKeyword, whose step\(\) requires 'scale', which"):
        TransformingOptimizer(make_model().parameters(), OnlyKeyword, transforms=[SAM()], lr=0.1)


def test_an_inner_optimizer_holding_another_optimizer_in_a_dict_is_refused_naming_the_attribute():
    """The other optimizer may sit in a dict attribute (optimizers by name), not only directly
    or in a list: its state would be out of the wrapper's sight all the same."""

    class HoldsByName(torch.optim.SGD):
        def __init__(self, params, lr=0.1):
            params = list(params)
            super().__init__(params, lr=lr)
            self.others = {"slow": torch.optim.Adam(params, lr=lr)}

    inner = HoldsByName(make_model().parameters())
    with pytest.raises(TypeError, match=r"^params must be an optimizer that keeps its own state, got a HoldsByName, which holds another optimizer \(its attribute 'others', an Adam\)"):
        TransformingOptimizer(inner, transforms=[SAM()])
    assert type(inner.state) is collections.defaultdict


def test_wrapping_an_optimizer_whose_step_is_another_instances_bound_step_warns():
    """The class's step bound to *another* optimizer (``inner.step = other.step``) is a patch: the
    wrapper steps ``inner`` with its class's step, never the other's."""
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(make_model().parameters(), lr=0.1)
    inner.step = other.step  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match=r"^params has its step replaced on the instance"):
        TransformingOptimizer(inner, transforms=[SAM(0.05)])


def test_the_inner_optimizers_view_of_an_entry_hides_a_transforms_slot_keys_and_refuses_writes_to_them():
    """``inner.state[p]`` shows the inner optimizer's keys only: a slot's key is absent from it
    (reading raises ``KeyError``, as for any absent key) and writing it is refused, the slot's
    value left as it was."""
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.Adam, transforms=[EMA(0.9)], lr=0.1)
    x, y = make_data()
    optimizer.step(make_closure(model, optimizer, x, y))
    param = next(p for p in model.parameters() if p.grad is not None)
    average = optimizer.state[param]["ema.average"]
    kept = average.clone()
    view = optimizer.inner.state[param]
    assert sorted(view) == ["exp_avg", "exp_avg_sq", "step"] and len(view) == 3
    assert "ema.average" not in view and view.get("ema.average") is None
    with pytest.raises(KeyError):
        view["ema.average"]
    with pytest.raises(KeyError, match=r"state key 'ema.average' is reserved by the wrapping optimizer"):
        view["ema.average"] = torch.zeros_like(kept)
    with pytest.raises(KeyError):
        del view["ema.average"]
    assert optimizer.state[param]["ema.average"] is average
    assert_bitwise_equal([average], [kept])


def test_an_inner_optimizer_with_its_own_state_dict_keeps_its_hooks_for_direct_calls_after_the_wrapper_packs():
    """The wrapper runs the inner optimizer's own ``state_dict`` without the hooks registered on
    it, for that call only: a direct ``inner.state_dict()`` afterwards runs them, as torch's."""
    model = make_model()
    optimizer = TransformingOptimizer(_OwnCheckpointSGD(model.parameters(), lr=0.1), transforms=[SAM(0.05)])
    calls = []
    optimizer.inner.register_state_dict_post_hook(lambda opt, sd: calls.append("post"))
    optimizer.inner.register_state_dict_pre_hook(lambda opt: calls.append("pre"))
    assert optimizer.state_dict()["own"] == 1 and calls == []
    assert optimizer.inner.state_dict()["own"] == 1
    assert calls == ["pre", "post"]


def test_a_shallow_copy_s_inner_optimizer_has_hooks_of_its_own_as_torchs_copy():
    """``copy.copy`` of a wrapper drives a shallow copy of the inner optimizer with hooks of its
    own (none of the original's, as torch's copy has none): a hook registered on either inner
    optimizer runs for that one only."""
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    calls = []
    optimizer.inner.register_state_dict_post_hook(lambda opt, sd: calls.append("original"))
    copied = copy.copy(optimizer)
    copied.inner.state_dict()
    assert calls == []
    copied.inner.register_state_dict_post_hook(lambda opt, sd: calls.append("copy"))
    optimizer.inner.state_dict()
    assert calls == ["original"]
    plain = torch.optim.SGD(make_model().parameters(), lr=0.1)
    plain.register_state_dict_post_hook(lambda opt, sd: calls.append("plain"))
    copy.copy(plain).state_dict()
    assert calls == ["original"]  # torch's copy.copy has none of the hooks either


@pytest.mark.parametrize("built, edited", [(1, 1.0), (torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.5))])
def test_add_param_group_takes_an_edited_default_equal_in_value_but_of_another_type_as_torch_does(built, edited):
    """An edit of ``defaults["lr"]`` to an equal value of another type (an int to a float, a
    float64 tensor to a float32 one) is an edit: the new group gets the edited value, as torch's."""
    model = make_model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    plain = torch.optim.SGD(first, lr=built)
    plain.defaults["lr"] = edited
    plain.add_param_group({"params": second})
    optimizer = TransformingOptimizer(list(model[0].parameters()), torch.optim.SGD, lr=built, transforms=[SAM(0.05)])
    optimizer.defaults["lr"] = edited
    optimizer.add_param_group({"params": second})
    assert plain.param_groups[1]["lr"] is edited
    assert optimizer.param_groups[1]["lr"] is edited


def test_wrapping_an_optimizer_that_already_stepped_keeps_its_state_and_steps_on_as_the_bare_one():
    """An inner optimizer built and stepped before it is wrapped keeps its state: the wrapper
    takes its entries over, and the next steps equal the bare optimizer's bitwise."""
    models = [make_model(), make_model()]
    x, y = make_data()
    bare, inner = (torch.optim.Adam(model.parameters(), lr=0.01) for model in models)
    for model, opt in zip(models, (bare, inner)):
        make_closure(model, opt, x, y)()
        opt.step()
    buffers = {p: inner.state[p]["exp_avg"] for p in inner.state}
    optimizer = TransformingOptimizer(inner, transforms=())
    assert buffers and all(optimizer.state[p]["exp_avg"] is buffer for p, buffer in buffers.items())
    for _ in range(2):
        make_closure(models[0], bare, x, y)()
        bare.step()
        optimizer.step(make_closure(models[1], optimizer, x, y))
    assert_bitwise_equal(params_of(models[1]), params_of(models[0]))
    assert_states_equal(optimizer.state_dict()["state"], bare.state_dict()["state"])


def test_an_empty_state_entry_survives_a_round_trip_through_an_inner_optimizer_with_its_own_load():
    """An entry created by an access (``state[p]``, empty) is packed as ``{}`` and loaded back as an
    entry, by torch's optimizers; through an inner optimizer whose class has its own
    ``load_state_dict`` too."""
    lengths = []
    for wrapped in (False, True):
        model = make_model()
        params = list(model.parameters())
        if wrapped:
            optimizer = TransformingOptimizer(_OwnCheckpointSGD(params, lr=0.1), transforms=[SAM(0.05)])
        else:
            optimizer = _OwnCheckpointSGD(params, lr=0.1)
        optimizer.state[params[0]]
        checkpoint = optimizer.state_dict()
        assert checkpoint["state"] == {0: {}}
        fresh_params = list(make_model().parameters())
        fresh = TransformingOptimizer(_OwnCheckpointSGD(fresh_params, lr=0.1), transforms=[SAM(0.05)]) if wrapped else _OwnCheckpointSGD(fresh_params, lr=0.1)
        fresh.load_state_dict(checkpoint)
        lengths.append((len(fresh.state), fresh_params[0] in fresh.state, fresh.state_dict()["state"]))
    assert lengths[1] == lengths[0] == (1, True, {0: {}})


@pytest.mark.parametrize("foreach", [False, True])
def test_sam_perturbs_a_complex_parameter_as_its_real_view_bitwise(foreach):
    """Complex gradients count as pairs of reals in the global gradient norm SAM scales by: the
    weights the second evaluation sees are exactly those of the ``view_as_real`` twin (torch's
    SGD itself steps complex and real tensors a rounding apart, so the evaluations are compared)."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(8, 5, dtype=torch.complex64, generator=generator)
    target = torch.randn(8, 5, 2, generator=generator)
    other = torch.randn(7, generator=generator)
    complex_params = [nn.Parameter(start.clone()), nn.Parameter(other.clone())]
    real_params = [nn.Parameter(torch.view_as_real(start).clone()), nn.Parameter(other.clone())]

    def run(params, as_real):
        optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=0.1, transforms=[SAM(0.5)], transform_foreach=foreach)
        seen = []

        def closure():
            optimizer.zero_grad()
            seen.extend(p.detach().clone() for p in (as_real(params[0]), params[1]))
            loss = ((as_real(params[0]) - target) ** 3).abs().sum() + (params[1] ** 3).abs().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return seen

    seen = run(complex_params, torch.view_as_real)
    assert len(seen) == 4 and not torch.equal(seen[0], seen[2])  # perturbed
    assert_bitwise_equal(seen, run(real_params, lambda p: p))


def test_an_inner_optimizer_with_its_own_load_keeps_its_hooks_for_direct_calls_after_the_wrapper_loads():
    """The wrapper runs the inner optimizer's own ``load_state_dict`` on a copy without the hooks
    registered on it; what it takes from that copy leaves the inner optimizer's hooks in place."""
    model = make_model()
    optimizer = TransformingOptimizer(_OwnCheckpointSGD(model.parameters(), lr=0.1), transforms=[SAM(0.05)])
    calls = []
    optimizer.inner.register_state_dict_post_hook(lambda opt, sd: calls.append("save"))
    optimizer.inner.register_load_state_dict_post_hook(lambda opt: calls.append("load"))
    optimizer.load_state_dict(optimizer.state_dict())
    assert calls == []
    optimizer.inner.load_state_dict(optimizer.inner.state_dict())
    assert calls == ["save", "load"]


def test_three_transforms_of_one_kind_get_numbered_slots():
    """A third transform of the same kind gets the next free number (``lamp_2``), as the second
    got ``lamp_1``; its keys are qualified by that slot."""
    model = make_model()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1,
        transforms=[LAMP(1e-2, rollback_len=2, seed=0), LAMP(2e-2, rollback_len=2, seed=1), LAMP(3e-2, rollback_len=2, seed=2)],
    )
    assert list(optimizer.chain.slots) == ["lamp", "lamp_1", "lamp_2"]
    group = optimizer.param_groups[0]
    assert (group["lamp.eps"], group["lamp_1.eps"], group["lamp_2.eps"]) == (1e-2, 2e-2, 3e-2)


def test_a_state_key_with_dots_after_a_slot_name_is_hidden_from_the_inner_optimizer():
    """A key ``"<slot>.<name>"`` belongs to the slot whatever ``<name>`` holds (dots too)."""
    model = make_model()
    optimizer = sam_opt(model)
    x, y = make_data()
    optimizer.step(make_closure(model, optimizer, x, y))
    param = next(p for p in model.parameters() if p.grad is not None)
    optimizer.state[param]["sam.extra.part"] = torch.zeros(1)
    optimizer.state[param]["other.sam"] = torch.zeros(1)
    assert sorted(optimizer.inner.state[param]) == ["momentum_buffer", "other.sam"]


def test_a_param_group_given_one_tensor_holds_that_tensor_as_torchs():
    """``{"params": tensor}`` names one parameter, as in torch's ``add_param_group`` (not its rows)."""
    model = make_model()
    weight, bias = model[0].weight, model[0].bias
    optimizer = TransformingOptimizer([{"params": weight}], torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    optimizer.add_param_group({"params": bias, "lr": 0.2})
    assert [group["params"] for group in optimizer.param_groups] == [[weight], [bias]]


def test_a_chain_that_learns_its_inner_optimizer_s_class_forgets_the_verdicts_it_gave_without_it():
    """``Chain.record_inner_type`` changes which prefixes are no misspelt slot: a verdict worked
    out before it ("lamb.eps" beside a LAMP: a misspelt "lamp") no longer holds once the inner
    optimizer is known to be a Lamb."""
    from samgria.transforms.chain import Chain

    chain = Chain([LAMP(1e-2, rollback_len=2)], inner_keys=("lr",))
    with pytest.raises(ValueError, match=r"^g: the key 'lamb.eps' names no slot of the chain \(slots: 'lamp'\); write 'eps' or 'lamp.eps'$"):
        chain.normalize_group({"lamb.eps": 1e-6}, "g")
    chain.record_inner_type(Lamb)
    group = {"lamb.eps": 1e-6}
    chain.normalize_group(group, "g")
    assert group == {"lamb.eps": 1e-6}
