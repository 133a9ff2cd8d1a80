"""Mixed precision: SAM with ``torch.autocast`` (bfloat16 on the CPU) and ``torch.amp.GradScaler``.

``amp_sam_step`` is the recipe exactly as ``tests/test_optim_amp.py`` tests it (``tests/test_docs.py``
checks that the two copies are identical).
"""

from collections.abc import Callable

import torch
from torch import nn

from samgria import SAM, TransformingOptimizer


def amp_sam_step(
    model: nn.Module,
    optimizer: TransformingOptimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """One SAM step with mixed precision: the recipe as the docs show it."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model(inputs), targets)
    scaler.scale(loss).backward()
    optimizer.first_step(zero_grad=True)  # w -> w + e; the loss scale cancels in e

    with torch.autocast("cpu", dtype=torch.bfloat16):
        perturbed_loss = loss_fn(model(inputs), targets)
    scaler.scale(perturbed_loss).backward()
    scaler.step(optimizer)  # restores w, then unscales and steps -- or skips on inf/NaN
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
optimizer = TransformingOptimizer(
    model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(rho=0.1)]
)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
inputs, targets = torch.randn(64, 6), torch.randint(0, 3, (64,))

losses = [amp_sam_step(model, optimizer, scaler, nn.functional.cross_entropy, inputs, targets) for _ in range(20)]
assert losses[-1] < losses[0], losses
assert all(torch.isfinite(p).all() for p in model.parameters())

# An overflow (an inf in the second backward) skips the step: the weights stay exactly as they were.
before = [p.detach().clone() for p in model.parameters()]
calls = []


def overflow_in_second_pass(grad):
    calls.append(grad)
    return grad if len(calls) == 1 else torch.full_like(grad, float("inf"))


hook = model[2].weight.register_hook(overflow_in_second_pass)
amp_sam_step(model, optimizer, scaler, nn.functional.cross_entropy, inputs, targets)
hook.remove()
assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
assert scaler.get_scale() == 2.0**9  # the scaler backed off
