"""TransformingOptimizer with the model features people train with: parametrizations, activation
checkpointing, memory formats and packed weights, lazy modules, weight averaging, progressive
unfreezing and model surgery between steps.

Each result is compared with an independent reference: a hand-written SAM loop in float64
(``sam_reference``), or torch's own optimizer where no transform applies.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from state_helpers import assert_state_dicts_equal, assert_states_equal
from torch import nn

from samgria import EMA, SAM, Lookahead, TransformingOptimizer


def sam_reference(model, loss_of, steps, *, lr=0.1, rho=0.05):
    """SAM by hand, on a float64 copy of ``model``: ``e = rho g / ||g||`` over every parameter
    with a gradient, the second gradient at ``w + e``, ``w`` put back, then ``torch.optim.SGD``."""
    model = copy.deepcopy(model).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(model).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.stack([p.grad.norm() for p in params]).norm()
        originals = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=rho / norm.item())
        optimizer.zero_grad()
        loss_of(model).backward()
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
        optimizer.step()
    return model


def sam_steps(model, loss_of, optimizer, steps, two_call):
    """``steps`` steps of ``optimizer`` by ``step(closure)`` or by the two-call loop."""
    for _ in range(steps):
        if two_call:
            optimizer.zero_grad()
            loss_of(model).backward()
            optimizer.first_step()
            loss_of(model).backward()
            optimizer.second_step()
        else:

            def closure():
                optimizer.zero_grad()
                loss = loss_of(model)
                loss.backward()
                return loss

            optimizer.step(closure)


def assert_close_to(model, reference):
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.double(), expected, rtol=1e-12, atol=1e-14, msg=name)


# -- model surgery: a parameter whose .data was replaced by a tensor of another shape ------------------
class _Rows(nn.Module):
    """One parameter of 3 rows, whose row count the tests change (an embedding resized)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(3, 4))

    def forward(self, x):
        return (x @ self.rows.t()).square().mean()


@pytest.mark.parametrize("rows", [1, 5], ids=["shrunk_to_one_row", "grown"])
@pytest.mark.parametrize("make", [lambda: EMA(0.5), lambda: Lookahead(k=1)], ids=["EMA", "Lookahead"])
def test_kept_weights_of_a_resized_parameter_are_refused_with_nothing_changed(make, rows):
    """``param.data = bigger`` (an embedding resized) after EMA or Lookahead kept weights of the old
    shape: an EMA whose parameter shrank to one row broadcast it into every row of its average
    (silently), and the other cases raised torch's 'The size of tensor a (3) must match ...' from
    inside the step → a ValueError naming the shapes and the remedy, weights and state as before
    (torch's momentum SGD refuses such a parameter too)."""
    x = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).reshape(2, 4)
    reference = _Rows()
    torch_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        torch_optimizer.zero_grad()
        reference(x).backward()
        torch_optimizer.step()
    reference.rows.data = torch.ones(rows, 4, dtype=torch.float64)
    torch_optimizer.zero_grad()
    reference(x).backward()
    with pytest.raises(RuntimeError):  # torch's own optimizer does not step it either
        torch_optimizer.step()

    model = _Rows()
    transform = make()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), transform])
    sam_steps(model, lambda m: m(x), optimizer, 2, two_call=False)
    model.rows.data = torch.ones(rows, 4, dtype=torch.float64)
    weights = model.rows.detach().clone()
    state = copy.deepcopy(optimizer.state_dict())
    key = f"{optimizer.slots[1]}.{transform._kept_key}"
    for two_call in (False, True):
        with pytest.raises(ValueError, match=rf"{type(transform).__name__}: .*shape \(3, 4\).*now of shape \({rows}, 4\).*del optimizer\.state\[param\]\['{key}'\]"):
            sam_steps(model, lambda m: m(x), optimizer, 1, two_call=two_call)
        assert torch.equal(model.rows, weights)
        assert_state_dicts_equal(optimizer.state_dict(), state)
        optimizer.cancel_step()  # the two-call loop's step stays pending on an error in second_step()

    del optimizer.state[model.rows][key]  # the remedy the message names: kept afresh from the weights
    sam_steps(model, lambda m: m(x), optimizer, 1, two_call=False)
    assert optimizer.state[model.rows][key].shape == (rows, 4)


@pytest.mark.parametrize("rows", [5, 2], ids=["broadcast", "not_broadcastable"])
def test_averaged_weights_of_a_resized_parameter_refused_before_anything_is_written(rows):
    """``ema.averaged_weights(optimizer)`` after a parameter was resized since its last step: an
    average of 1 row was broadcast into the 5 rows of the parameter (silently), and one of 3 rows
    raised torch's error for 2 rows after an earlier parameter already held its average, which
    the block left there → ValueError before any parameter is written."""
    first = nn.Parameter(torch.ones(2, dtype=torch.float64))
    second = nn.Parameter(torch.ones(1 if rows == 5 else 3, 4, dtype=torch.float64))
    ema = EMA(0.5)
    optimizer = TransformingOptimizer([first, second], torch.optim.SGD, lr=0.1, transforms=[ema])
    for _ in range(2):
        optimizer.zero_grad()
        (first.square().sum() + second.square().sum()).backward()
        optimizer.step()
    old_shape = tuple(second.shape)
    second.data = torch.full((rows, 4), 3.0, dtype=torch.float64)
    before = [first.detach().clone(), second.detach().clone()]
    with pytest.raises(ValueError, match=rf"EMA: .*shape {re.escape(str(old_shape))}.*now of shape \({rows}, 4\)"):
        with ema.averaged_weights(optimizer):
            pass
    assert torch.equal(first, before[0]) and torch.equal(second, before[1])



class _TwoParams(nn.Module):
    """``first`` (2,), in the loss from when ``use_first`` is set, and ``rows`` (3, 4), the
    parameter the tests resize."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
        self.rows = nn.Parameter(torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(3, 4))
        self.use_first = False

    def forward(self, x):
        loss = (x @ self.rows.t()).square().mean()
        return loss + self.first.square().sum() if self.use_first else loss


@pytest.mark.parametrize("make", [lambda: EMA(0.5), lambda: Lookahead(k=2)], ids=["EMA", "Lookahead"])
def test_seed_protocol_refusing_a_resized_parameter_changes_no_state(make):
    """Through the seed protocol (``apply`` / ``post_step`` beside a plain optimizer) the refusal
    of a resized parameter came after ``post_step`` had counted the step (EMA; Lookahead refuses
    in ``apply``) and an earlier parameter stepping for the first time had got its kept weights:
    after the ValueError the transform's state was a step ahead and held that copy, and the
    message named an optimizer's state, which the seed protocol does not use → nothing changed,
    the remedy a new object, and the run goes on as a twin's that never saw the refused call."""
    x = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).reshape(2, 4)
    model, twin = _TwoParams(), _TwoParams()
    transform, twin_transform = make(), make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)

    def seed_step(model, transform, optimizer):
        optimizer.zero_grad()
        model(x).backward()
        transform.apply(model, lambda: model(x), ())
        optimizer.step()
        transform.post_step(model)

    for _ in range(3):
        seed_step(model, transform, optimizer)
        seed_step(twin, twin_transform, twin_optimizer)
    state = copy.deepcopy(transform.state_dict())
    model.use_first = twin.use_first = True  # a parameter stepping for the first time, before rows
    model.rows.data = torch.ones(5, 4, dtype=torch.float64)
    name = type(transform).__name__
    with pytest.raises(ValueError, match=rf"{name}: .*shape \(3, 4\).*now of shape \(5, 4\).*use a new {name} for the resized model"):
        seed_step(model, transform, optimizer)
    assert transform.state_dict().keys() == {"state"}
    assert_states_equal(transform.state_dict()["state"], state["state"])

    with torch.no_grad():  # the surgery undone: the run goes on as the twin's
        model.rows.data = twin.rows.detach().clone()
        model.first.copy_(twin.first)
    for _ in range(2):
        seed_step(model, transform, optimizer)
        seed_step(twin, twin_transform, twin_optimizer)
    assert torch.equal(model.rows, twin.rows) and torch.equal(model.first, twin.first)
    assert_states_equal(transform.state_dict()["state"], twin_transform.state_dict()["state"])

# -- the features, against the hand-written float64 SAM -----------------------------------------------
def _data(*shape, outputs=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    y = torch.randn(shape[0], outputs, generator=generator, dtype=torch.float64)
    return x, y


def _check_against_reference(model, loss_of, steps=2):
    """``steps`` SAM steps by each loop on copies of ``model`` equal the hand-written SAM's, and
    the parameters keep their strides (a channels_last or transposed layout)."""
    reference = sam_reference(model, loss_of, steps)
    strides = [p.stride() for p in model.parameters()]
    for two_call in (False, True):
        trained = copy.deepcopy(model)
        optimizer = TransformingOptimizer(trained.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
        sam_steps(trained, loss_of, optimizer, steps, two_call)
        assert_close_to(trained, reference)
        assert [p.stride() for p in trained.parameters()] == strides


@pytest.mark.parametrize("parametrize", ["weight_norm", "spectral_norm", "orthogonal"])
def test_parametrized_weights_are_perturbed_through_their_originals(parametrize):
    """torch.nn.utils.parametrizations: SAM moves ``parametrizations.weight.original*``, the
    forward of the second pass computes the weight from the moved originals, and the step equals
    the hand-written SAM's (spectral_norm in eval mode: no power iteration between the passes)."""
    torch.manual_seed(0)
    model = getattr(torch.nn.utils.parametrizations, parametrize)(nn.Linear(4, 4).double()).eval()
    x, y = _data(6, 4, outputs=4)
    _check_against_reference(model, lambda m: (m(x) - y).square().mean())

    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(module.weight.detach().clone()))
    originals = [p.detach().clone() for p in model.parameters()]
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.0, transforms=[SAM(0.05)])
    sam_steps(model, lambda m: (m(x) - y).square().mean(), optimizer, 1, two_call=True)
    assert not torch.equal(seen[0], seen[1])  # the second pass ran at w + e
    assert all(torch.equal(p, original) for p, original in zip(model.parameters(), originals))  # lr 0: w, bit for bit


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_at_the_moved_weights(use_reentrant):
    """torch.utils.checkpoint inside the closure (and in the two-call loop's passes): the forward
    recomputed in each backward runs at the weights of its pass, so the step equals the
    hand-written SAM's without checkpointing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = _data(6, 4)
    inputs = x.clone().requires_grad_(use_reentrant)  # reentrant: an input must require grad
    reference = sam_reference(model, lambda m: (m(x) - y).square().mean(), 2)
    for two_call in (False, True):
        trained = copy.deepcopy(model)
        optimizer = TransformingOptimizer(trained.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])

        def loss_of(m):
            return (torch.utils.checkpoint.checkpoint(m, inputs, use_reentrant=use_reentrant) - y).square().mean()

        sam_steps(trained, loss_of, optimizer, 2, two_call)
        assert_close_to(trained, reference)


class _Transposed(nn.Module):
    """A parameter stored transposed (strides (1, 4)), as a weight converted from another layout."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64).t())

    def forward(self, x):
        return x @ self.weight.t()


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attention(x, x, x)[0].mean(1))


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _channels_last_conv():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 3))
    return model.double().to(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "make, shape",
    [(_channels_last_conv, (4, 2, 4, 4)), (_Transposed, (6, 4)), (_Attention, (2, 5, 4)), (_Recurrent, (3, 4, 4))],
    ids=["channels_last_conv", "transposed_parameter", "multihead_attention", "lstm"],
)
def test_layouts_and_packed_weights(make, shape):
    """A channels_last Conv2d, a parameter with transposed strides, nn.MultiheadAttention's packed
    in_proj_weight and nn.LSTM's weights (read through its _flat_weights): the step equals the
    hand-written SAM's, and every parameter keeps its strides."""
    torch.manual_seed(0)
    model = make().double()
    x, y = _data(*shape)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    assert make is not _channels_last_conv or model[0].weight.is_contiguous(memory_format=torch.channels_last)
    _check_against_reference(model, lambda m: (m(x) - y).square().mean())


@pytest.mark.parametrize("built", ["after_dry_run", "before_dry_run"])
def test_lazy_modules(built):
    """nn.LazyLinear: an optimizer built after the dry run (torch's documented practice) or before
    it (the uninitialised parameters become the parameters it holds) steps as the hand-written SAM."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(5), nn.Tanh(), nn.LazyLinear(3)).double()
    x, y = _data(6, 4)
    optimizer = None
    if built == "before_dry_run":
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    model(x)
    reference = sam_reference(model, lambda m: (m(x) - y).square().mean(), 2)
    if optimizer is None:
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    sam_steps(model, lambda m: (m(x) - y).square().mean(), optimizer, 2, two_call=False)
    assert_close_to(model, reference)


def test_swa_and_an_ema_model_average_the_stepped_weights():
    """torch.optim.swa_utils around SAM: SWALR schedules the shared param groups, AveragedModel (a
    plain average and an EMA) updated after each step sees the restored, stepped weights (never
    w + e), and update_bn recomputes the statistics: all equal to the hand-written SAM's."""
    from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = _data(6, 4)

    def loss_of(m):
        return (m(x) - y).square().mean()

    def train(two_call):
        trained = copy.deepcopy(model)
        if two_call is None:  # by hand
            optimizer = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
        else:
            optimizer = TransformingOptimizer(
                trained.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(0.05)]
            )
        scheduler = SWALR(optimizer, swa_lr=0.05, anneal_epochs=2)
        averages = [AveragedModel(trained), AveragedModel(trained, multi_avg_fn=get_ema_multi_avg_fn(0.9))]
        for _ in range(3):
            if two_call is None:
                optimizer.zero_grad()
                loss_of(trained).backward()
                norm = torch.stack([p.grad.norm() for p in trained.parameters()]).norm().item()
                originals = [p.detach().clone() for p in trained.parameters()]
                with torch.no_grad():
                    for p in trained.parameters():
                        p.add_(p.grad, alpha=0.05 / norm)
                optimizer.zero_grad()
                loss_of(trained).backward()
                with torch.no_grad():
                    for p, original in zip(trained.parameters(), originals):
                        p.copy_(original)
                optimizer.step()
            else:
                sam_steps(trained, loss_of, optimizer, 1, two_call)
            scheduler.step()
            for average in averages:
                average.update_parameters(trained)
        update_bn([(x,)], averages[0])
        return [trained, *averages]

    expected = train(None)
    for two_call in (False, True):
        for got, want in zip(train(two_call), expected):
            for key, value in want.state_dict().items():
                torch.testing.assert_close(got.state_dict()[key], value, rtol=1e-12, atol=1e-14, msg=key)


def test_progressive_unfreezing_and_accumulated_micro_batches():
    """A layer frozen (requires_grad=False) for the first steps, then unfrozen into a param group of
    its own with add_param_group (ULMFiT-style), micro-batches accumulated in each pass, Adam state
    kept for the head meanwhile: both loops equal SAM by hand, with the group's own rho."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = _data(4, 6, 4)  # 4 micro-batches of 6
    y = y[:, None].expand(4, 6, 3)

    def loss_of(m):  # accumulates the micro-batches' gradients
        total = 0.0
        for i in range(4):
            loss = (m(x[i]) - y[i]).square().mean() / 4
            loss.backward()
            total = total + loss.detach()
        return total

    def train(two_call):
        trained = copy.deepcopy(model)
        body, head = list(trained[0].parameters()), list(trained[2].parameters())
        for p in body:
            p.requires_grad_(False)
        if two_call is None:
            optimizer = torch.optim.Adam(head, lr=0.05)
        else:
            optimizer = TransformingOptimizer(head, torch.optim.Adam, lr=0.05, transforms=[SAM(0.05)])
        for step in range(4):
            if step == 2:
                for p in body:
                    p.requires_grad_(True)
                optimizer.add_param_group({"params": body, "lr": 0.01, **({} if two_call is None else {"rho": 0.1})})
            if two_call is None:
                optimizer.zero_grad()
                loss_of(trained)
                params = [p for p in trained.parameters() if p.grad is not None]
                norm = torch.stack([p.grad.norm() for p in params]).norm().item()
                originals = [p.detach().clone() for p in params]
                with torch.no_grad():
                    for p in params:
                        p.add_(p.grad, alpha=(0.1 if any(p is q for q in body) else 0.05) / norm)
                optimizer.zero_grad()
                loss_of(trained)
                with torch.no_grad():
                    for p, original in zip(params, originals):
                        p.copy_(original)
                optimizer.step()
            elif two_call:
                optimizer.zero_grad()
                loss_of(trained)
                optimizer.first_step()
                loss_of(trained)
                optimizer.second_step()
            else:

                def closure():
                    optimizer.zero_grad()
                    return loss_of(trained)

                optimizer.step(closure)
        return trained

    expected = train(None)
    for two_call in (False, True):
        assert_close_to(train(two_call), expected)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_two_call_loop_with_frozen_bn_stats_around_the_second_forward_and_backward(use_reentrant):
    """The guide's two-call recipe for BatchNorm under activation checkpointing: frozen_bn_stats
    around the second forward and its backward (which recomputes the forward) gives step(closure)
    with reevaluation_context, bit for bit, running statistics included. (Around the forward
    alone, as the guide said before, the non-reentrant recomputation raised CheckpointError and
    the reentrant one updated the statistics once more, at w + e.)"""
    from samgria import frozen_bn_stats

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    inputs = x.clone().requires_grad_(use_reentrant)

    def loss_of(m):
        return (torch.utils.checkpoint.checkpoint(m, inputs, use_reentrant=use_reentrant) - y).square().mean()

    by_closure, by_two_calls = copy.deepcopy(model), copy.deepcopy(model)
    optimizer = TransformingOptimizer(
        by_closure.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)],
        reevaluation_context=lambda: frozen_bn_stats(by_closure),
    )  # fmt: skip
    sam_steps(by_closure, loss_of, optimizer, 2, two_call=False)
    optimizer = TransformingOptimizer(by_two_calls.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    for _ in range(2):
        optimizer.zero_grad()
        loss_of(by_two_calls).backward()
        optimizer.first_step()
        with frozen_bn_stats(by_two_calls):
            loss_of(by_two_calls).backward()
        optimizer.second_step()
    for key, value in by_closure.state_dict().items():
        assert torch.equal(by_two_calls.state_dict()[key], value), key


@pytest.mark.parametrize("chain", ["SAM", "SAM+EMA"])
def test_model_cast_to_double_between_steps(chain):
    """model.double() after the optimizer was built (module._apply replaces each parameter's .data):
    SAM's buffers and EMA's averages follow the new dtype, and the steps that follow equal the
    hand-written SAM continued in float64."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = _data(6, 4)

    def loss_of(m):
        return (m(x.to(m.weight.dtype)) - y.to(m.weight.dtype)).square().mean()

    transforms = [SAM(0.05)] + ([EMA(0.5)] if chain == "SAM+EMA" else [])
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=transforms)
    sam_steps(model, loss_of, optimizer, 1, two_call=False)
    reference = sam_reference(model, loss_of, 2)
    model.double()
    sam_steps(model, loss_of, optimizer, 1, two_call=False)
    sam_steps(model, loss_of, optimizer, 1, two_call=True)
    assert model.weight.dtype == torch.float64
    assert_close_to(model, reference)
    if chain == "SAM+EMA":
        assert optimizer.state[model.weight]["ema.average"].dtype == torch.float64


# -- a MetaOptimizer with checkpointed inner steps -----------------------------------------------------
def _maml_meta_gradient(checkpoint_inner_steps, bind):
    """One MAML meta-gradient through the closure API, the support closure made in a loop over
    the tasks as the guide writes it (``bind=False``: it reads the loop variable)."""
    from samgria import MAML

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    generator = torch.Generator().manual_seed(3)
    tasks = [torch.randn(4, 5, 1, generator=generator, dtype=torch.float64).unbind() for _ in range(2)]
    meta = MAML(model, torch.optim.SGD, lr=0.05, inner_lr=0.1, inner_steps=2, checkpoint_inner_steps=checkpoint_inner_steps)
    meta.zero_grad()
    losses = []
    for task in tasks:
        if bind:
            learner = meta.adapt(lambda f, task=task: (f(task[0]) - task[1]).square().mean())
        else:
            learner = meta.adapt(lambda f: (f(task[0]) - task[1]).square().mean())
        losses.append((learner(task[2]) - task[3]).square().mean())
    torch.stack(losses).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_checkpointed_inner_steps_refuse_a_support_closure_that_reads_a_changed_loop_variable():
    """MAML(checkpoint_inner_steps=True) recomputes each inner step in the backward pass by calling
    the support closure again: one that reads the loop variable ('for task in tasks:
    meta.adapt(lambda f: mse(f(task.support_x), ...))', the guide's pattern) then saw the last task
    and the meta-gradient silently differed from checkpoint_inner_steps=False → RuntimeError naming
    the cause and the remedy; with the task bound in the closure, the same meta-gradient bit for bit."""
    expected = _maml_meta_gradient(False, bind=False)
    assert all(torch.equal(g, e) for g, e in zip(_maml_meta_gradient(True, bind=True), expected))
    with pytest.raises(RuntimeError, match=r"checkpoint_inner_steps=True recomputes .* support loss again, which now gives .*lambda f, task=task"):
        _maml_meta_gradient(True, bind=False)


class _LoRALinear(nn.Module):
    """What PEFT's LoRA builds around a layer: the frozen layer plus a trainable low-rank pair,
    with dropout on the adapter's input."""

    def __init__(self, base: nn.Linear, r: int = 2) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Linear(base.in_features, r, bias=False)
        self.b = nn.Linear(r, base.out_features, bias=False)
        self.dropout = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.b(self.a(self.dropout(x)))


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_over_low_rank_adapters_leaves_the_frozen_base_alone(adaptive):
    """SAM / ASAM over the trainable parameters of a LoRA-style model (docs/integrations.rst,
    PEFT): equal to a float64 hand loop over the adapter pair, with the random state restored
    at each closure call so both passes draw the same dropout masks; the frozen base weights are
    bitwise unchanged, in the same memory, and have no state entry."""
    from samgria import sam_optimizer

    torch.manual_seed(0)
    model = _LoRALinear(nn.Linear(6, 3)).double()
    reference = copy.deepcopy(model)
    base = [p.detach().clone() for p in model.base.parameters()]
    pointers = [p.data_ptr() for p in model.base.parameters()]
    x, y = torch.randn(4, 8, 6, dtype=torch.float64), torch.randn(4, 8, 3, dtype=torch.float64)
    rho, eta = 0.05, 0.01

    optimizer = sam_optimizer(
        [p for p in model.parameters() if p.requires_grad], torch.optim.AdamW, rho=rho, adaptive=adaptive, lr=0.01
    )
    torch.manual_seed(1)
    for i in range(4):
        rng = torch.get_rng_state()

        def closure():
            torch.set_rng_state(rng)
            optimizer.zero_grad()
            loss = (model(x[i]) - y[i]).square().mean()
            loss.backward()
            return loss

        optimizer.step(closure)

    params = [reference.a.weight, reference.b.weight]
    hand = torch.optim.AdamW(params, lr=0.01)
    torch.manual_seed(1)
    for i in range(4):
        rng = torch.get_rng_state()
        grads = torch.autograd.grad((reference(x[i]) - y[i]).square().mean(), params)
        scales = [p.detach().abs() + eta if adaptive else torch.ones_like(p) for p in params]
        norm = torch.stack([(t * g).norm() for t, g in zip(scales, grads)]).norm()
        originals = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, t, g in zip(params, scales, grads):
                p.add_(rho * t * t * g / norm)
        torch.set_rng_state(rng)
        grads = torch.autograd.grad((reference(x[i]) - y[i]).square().mean(), params)
        with torch.no_grad():
            for p, original, g in zip(params, originals, grads):
                p.copy_(original)
                p.grad = g
        hand.step()

    torch.testing.assert_close([model.a.weight, model.b.weight], params, rtol=1e-12, atol=1e-14)
    assert all(torch.equal(p, q) for p, q in zip(model.base.parameters(), base))
    assert [p.data_ptr() for p in model.base.parameters()] == pointers
    assert not any(p in optimizer.state for p in model.base.parameters())
