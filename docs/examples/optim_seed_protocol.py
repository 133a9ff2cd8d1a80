"""The seed protocol: ``apply(model, loss_fn, batch)`` before descent and ``post_step(model)``
after it, beside any plain optimizer -- and the same objects inside ``TransformingOptimizer``."""

import copy

import torch
from torch import nn

from samgria import SAM, GradientTransform, LAMPRollback, TransformingOptimizer

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
twin = copy.deepcopy(model)
x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))


def loss_fn(x, y):
    return nn.functional.cross_entropy(model(x), y)


# 1. Beside a plain optimizer, exactly as in the seed library's README.
optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
sam = SAM(rho=0.05)
for _ in range(3):
    loss = loss_fn(x, y)  # forward
    loss.backward()  # backward
    sam.apply(model, loss_fn, (x, y))  # pre-descent: perturb, re-evaluate, restore
    optimizer.step()  # descent with the gradient at w + e
    optimizer.zero_grad()
    sam.post_step(model)  # post-descent (a no-op for SAM)

# 2. The same update through TransformingOptimizer: the closure replaces loss_fn and batch.
twin_optimizer = TransformingOptimizer(twin.parameters(), torch.optim.SGD, lr=1e-2, transforms=[SAM(rho=0.05)])


def closure():
    twin_optimizer.zero_grad()
    loss = nn.functional.cross_entropy(twin(x), y)
    loss.backward()
    return loss


for _ in range(3):
    twin_optimizer.step(closure)
for p, q in zip(model.parameters(), twin.parameters()):
    torch.testing.assert_close(p, q)


# 3. Any object with ``apply`` and ``post_step`` is a GradientTransform -- no base class needed.
class GradientClip:
    """Clip the gradient norm before descent."""

    def __init__(self, max_norm=1.0):
        self.max_norm = max_norm

    def apply(self, model, loss_fn, batch):
        nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)

    def post_step(self, model):
        pass


clip = GradientClip(max_norm=0.01)
assert isinstance(clip, GradientTransform)  # the protocol is runtime-checkable

# It works inside the optimizer too, chained with SAM and the seed's LAMPRollback (= LAMP).
optimizer = TransformingOptimizer(
    model.parameters(),
    torch.optim.SGD,
    lr=1e-2,
    transforms=[SAM(rho=0.05), clip, LAMPRollback(eps=5e-3, rollback_len=10)],
    model=model,  # handed to protocol objects as their ``model`` argument
)


def clipped_closure():
    optimizer.zero_grad()
    loss = loss_fn(x, y)
    loss.backward()
    return loss


optimizer.step(clipped_closure)
grad_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
assert grad_norm <= 0.01 * (1 + 1e-5)  # the inner step saw the clipped gradient at w + e
