"""Writing a transform: subclass ``Transform``, declare per-group hyperparameters, keep state in
``ctx.state[p]`` and ``ctx.slot_state()`` (the transform's slot of the optimizer's ``state``, so
it is checkpointed), and create all of it in ``init_state`` (so that
``torch.distributed.checkpoint`` restores it into a fresh optimizer)."""

import tempfile
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from samgria import SAM, Transform, TransformingOptimizer


class GradientCentralization(Transform):
    """Pre-step: subtract from each weight's gradient its mean over all but the first dimension.

    :math:`g_i \\leftarrow g_i - \\operatorname{mean}(g_i)` for every output row :math:`i` of a
    weight with ``ndim > 1`` (Yong et al., "Gradient Centralization", ECCV 2020).
    """

    @torch.no_grad()
    def pre_update(self, ctx):
        for group in ctx.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.ndim > 1:
                    dims = tuple(range(1, p.ndim))
                    p.grad.sub_(p.grad.mean(dim=dims, keepdim=True))

    def init_state(self, ctx):
        pass  # it keeps no state (without this, a checkpoint's state initialisation warns)


class WeightEMA(Transform):
    """Post-step: an exponential moving average of the weights, :math:`m \\leftarrow d\\,m + (1-d)\\,w`."""

    slot_name = "ema"  # its state is stored as optimizer.state[p]["ema.<key>"]

    def __init__(self, decay=0.9):
        self.decay = decay
        self.validate_group({"decay": decay})

    def group_defaults(self):
        return {"decay": self.decay}  # a param-group key ("decay", or "ema.decay"); a group may override it

    def validate_group(self, group):
        decay = group["decay"]
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")

    @torch.no_grad()
    def init_state(self, ctx):
        # Every key, with its final shape and dtype: torch.distributed.checkpoint restores into a
        # fresh optimizer only the keys this creates (it calls it before loading).
        slot = ctx.slot_state(keys=("updates",))  # object-level state, on the first parameter
        if slot is not None and "updates" not in slot:
            slot["updates"] = 0
        for group in ctx.param_groups:
            for p in group["params"]:
                if "ema_weight" not in ctx.state[p]:
                    ctx.state[p]["ema_weight"] = p.detach().clone()

    @torch.no_grad()
    def post_update(self, ctx):
        self.init_state(ctx)  # the first step creates the state too
        slot = ctx.slot_state(keys=("updates",))
        if slot is None:  # no parameter requires grad (a frozen model): nothing stepped
            return
        for group in ctx.param_groups:
            for p in group["params"]:
                average = ctx.state[p]["ema_weight"]
                if slot["updates"] == 0:
                    average.copy_(p)  # the first average is the weights after the first step
                else:
                    average.lerp_(p, 1.0 - group["decay"])
        slot["updates"] += 1


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
x, y = torch.randn(32, 4), torch.randn(32, 1)
optimizer = TransformingOptimizer(
    model.parameters(),
    torch.optim.SGD,
    lr=0.1,
    transforms=[SAM(rho=0.05), GradientCentralization(), WeightEMA(decay=0.5)],
)


def closure():
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss


expected_ema = None
for _ in range(3):
    before = model[0].weight.detach().clone()
    optimizer.step(closure)
    after = model[0].weight.detach()
    # Plain SGD moved the weight by -lr * (centralised gradient): every row's mean change is 0.
    assert torch.allclose((after - before).mean(dim=1), torch.zeros(8), atol=1e-7)
    expected_ema = after.clone() if expected_ema is None else 0.5 * expected_ema + 0.5 * after

assert torch.allclose(optimizer.state[model[0].weight]["ema.ema_weight"], expected_ema)
assert "ema.ema_weight" in optimizer.state_dict()["state"][0]  # checkpointed

# torch.distributed.checkpoint resumes into a fresh optimizer: get_optimizer_state_dict() has it
# create its state (init_state), and dcp.load fills those keys -- only those.
optimizer.zero_grad(set_to_none=True)  # as in a fresh process: no gradients yet
with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
    warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process here
    dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=directory)
    fresh = TransformingOptimizer(
        model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        transforms=[SAM(rho=0.05), GradientCentralization(), WeightEMA(decay=0.5)],
    )
    loaded = {"optim": get_optimizer_state_dict(model, fresh)}
    dcp.load(loaded, checkpoint_id=directory)
    set_optimizer_state_dict(model, fresh, optim_state_dict=loaded["optim"])
for p in model.parameters():
    assert torch.equal(fresh.state[p]["ema.ema_weight"], optimizer.state[p]["ema.ema_weight"])
assert fresh.state[model[0].weight]["ema.updates"] == 3

# Bad values are rejected at construction, also when a param group overrides the default.
try:
    TransformingOptimizer(
        [{"params": model.parameters(), "decay": 1.5}], torch.optim.SGD, lr=0.1, transforms=[WeightEMA()]
    )
except ValueError as error:
    assert "param_groups[0]: decay must be in [0, 1), got 1.5" in str(error)
else:
    raise AssertionError("decay=1.5 was accepted")

# A frozen model (a sub-model kept fixed for a phase): no parameter requires grad, so
# slot_state() is None and the step, as torch's SGD's, changes nothing.
frozen = nn.Linear(4, 1).requires_grad_(False)
weights = frozen.weight.clone()
idle = TransformingOptimizer(frozen.parameters(), torch.optim.SGD, lr=0.1, transforms=[WeightEMA()])
idle.step()
assert torch.equal(frozen.weight, weights)
