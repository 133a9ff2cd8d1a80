"""``torch.compile``: compile the model (or the loss function), not the optimizer step.

Between the two evaluations SAM points each parameter at a buffer of perturbed weights (or moves
the weights in place where other tensors share the parameter's memory); a compiled module reads
its parameters as inputs, so the perturbed weights reuse the same compiled code (no
recompilation) and the result equals the eager model's to round-off.
"""

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from samgria import sam_optimizer

# raised inside torch.compile's own imports (torch 2.13), not by this code
warnings.filterwarnings("ignore", "`torch.jit.script_method` is deprecated", DeprecationWarning)

torch.manual_seed(0)
# float64, so that "equal to round-off" is a tight check (float32's round-off, amplified by SAM's
# division by the gradient norm over 20 steps, depends on the kernels inductor generates)
model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).double()
eager = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).double()
eager.load_state_dict(model.state_dict())
compiled = torch.compile(model)

x = torch.randn(64, 8, dtype=torch.float64)
y = x @ torch.randn(8, 1, dtype=torch.float64)
runs = [(compiled, sam_optimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1))]
runs.append((eager, sam_optimizer(eager.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)))

for step in range(20):
    for net, optimizer in runs:

        def closure(net=net, optimizer=optimizer):
            optimizer.zero_grad()
            loss = F.mse_loss(net(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)

for a, b in zip(model.parameters(), eager.parameters()):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
print("compiled SAM equals eager SAM; loss", F.mse_loss(compiled(x), y).item())
