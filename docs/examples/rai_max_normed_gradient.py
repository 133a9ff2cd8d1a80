"""rai-toolbox's param_ndim example: normalise each gradient by its max over sub-tensors.

The hook treats the gradient as shape ``(N, d1, ..., dm)`` and normalises each of the ``N``
sub-tensors; samgria reshapes the parameter and its gradient according to ``param_ndim``.
"""

import math

import torch

from samgria import NormalizeGrad, ParamTransform, TransformingOptimizer


class MaxNormedGradient(ParamTransform):
    def pre_step_transform_(self, param, group):
        g = param.grad.flatten(1)  # (N, d1, ..., dm) -> (N, d1 * ... * dm)
        max_norms = torch.max(g, dim=1).values
        max_norms = max_norms.view(-1, *([1] * (param.ndim - 1)))  # reshape to have dimensionality m
        param.grad /= torch.clamp(max_norms, 1e-20, None)  # clamp to prevent division by 0


expected = {
    0: torch.tensor([[1.0, 1.0], [1.0, 1.0]]),  # elementwise
    1: torch.tensor([[0.5, 1.0], [1.0, 0.5]]),  # each row
    2: torch.tensor([[0.05, 0.1], [1.0, 0.5]]),  # the whole 2-D gradient
}

x = torch.tensor([[1.0, 2.0], [20.0, 10.0]], requires_grad=True)
for param_ndim in [0, 1, 2]:
    optimizer = TransformingOptimizer([x], torch.optim.SGD, transforms=[MaxNormedGradient(param_ndim=param_ndim)], lr=0.0)

    loss = (x * x).sum()
    loss.backward()
    optimizer.step()
    print(f"param_ndim: {param_ndim}, normed grad:\n{x.grad}\n..")
    assert torch.allclose(x.grad, expected[param_ndim], rtol=0, atol=1e-7)
    optimizer.zero_grad()

# param_ndim is also a per-group key, and NormalizeGrad(p=inf) is the built-in version (it divides
# by the largest magnitude, which for this positive gradient is the maximum).
optimizer = TransformingOptimizer(
    [{"params": [x], "param_ndim": 1}], torch.optim.SGD, transforms=[NormalizeGrad(eps=0.0, p=math.inf)], lr=0.0
)
(x * x).sum().backward()
optimizer.step()
assert torch.equal(x.grad, expected[1])
