"""rai-toolbox's parameter-constraining example: clamp every parameter into [-1, 1] after the step."""

import torch

from samgria import ClampParams, ParamTransform, TransformingOptimizer


class ClampedParams(ParamTransform):
    def post_step_transform_(self, param, group):
        param.clamp_(min=-1.0, max=1.0)  # in place


for transform in [ClampedParams(), ClampParams(-1.0, 1.0)]:  # the hook, and the built-in transform
    x = torch.tensor([-10.0, 1.0], requires_grad=True)
    optimizer = TransformingOptimizer([x], torch.optim.SGD, transforms=[transform], lr=0.1)
    x.backward(gradient=torch.tensor([-1.0, 1.0]))
    optimizer.step()  # SGD's step to [-9.9, 0.9], then the clamp
    print(x)
    assert repr(x) == "tensor([-1.0000,  0.9000], requires_grad=True)"
