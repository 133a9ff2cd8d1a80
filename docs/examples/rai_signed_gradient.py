"""rai-toolbox's first ParamTransformingOptimizer example: the sign of the gradient, then AdamW.

A ``ParamTransform`` subclass only writes the per-parameter hook; ``GradSign`` is the built-in
equivalent. rai's page builds its optimizer with ``lr=0.1`` but prints ``[-10.9, 8.9]``, which is
what AdamW gives with ``lr=1.0`` (weight decay 0.01, then a step of ``lr`` against the sign): we
use ``lr=1.0`` and show what ``lr=0.1`` really gives.
"""

import torch

from samgria import GradSign, ParamTransform, TransformingOptimizer


class SignedGradient(ParamTransform):
    def pre_step_transform_(self, param, group):
        torch.sign(param.grad, out=param.grad)  # operates in place


def signed_adamw_step(transform, lr):
    x = torch.tensor([-10.0, 10.0], requires_grad=True)
    optimizer = TransformingOptimizer([x], torch.optim.AdamW, transforms=[transform], lr=lr)
    (10_000 * x).sum().backward()
    optimizer.step()
    return x


x = signed_adamw_step(SignedGradient(), lr=1.0)
print(x)
assert repr(x) == "tensor([-10.9000,   8.9000], requires_grad=True)"  # rai's printed result
# AdamW: x <- x * (1 - lr * 0.01) - lr * sign(g) (the first Adam step of a constant gradient).
assert torch.allclose(x, torch.tensor([-10.0 * 0.99 - 1.0, 10.0 * 0.99 - 1.0]))

# The built-in transform does the same.
assert torch.equal(signed_adamw_step(GradSign(), lr=1.0), x)

# With rai's stated lr=0.1 the step is ten times smaller.
x_small = signed_adamw_step(SignedGradient(), lr=0.1)
print(x_small)
assert torch.allclose(x_small, torch.tensor([-10.0 * 0.999 - 0.1, 10.0 * 0.999 - 0.1]))  # [-10.09, 9.89]
