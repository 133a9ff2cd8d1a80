"""PyTorch Lightning: automatic optimization, the two-call loop under manual optimization, and
float16 mixed precision (``SAMMixedPrecision``); ``SAMCallback`` refuses what would be wrong.

Needs ``lightning`` (``pip install 'samgria[integrations]'``).
"""

import importlib.util
import os
import unittest
import warnings

if importlib.util.find_spec("lightning") is None and not os.environ.get("SAMGRIA_REQUIRE_INTEGRATIONS"):
    raise unittest.SkipTest("needs lightning: pip install 'samgria[integrations]'")

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from samgria import sam_optimizer
from samgria.integrations.lightning import SAMCallback, SAMMixedPrecision

# lightning 2.6 calls a torch.utils._pytree API that torch 2.13 deprecates
warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)


class Regression(pl.LightningModule):
    def __init__(self, manual: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:
            return F.mse_loss(self.net(x), y)  # Lightning's closure: SAM evaluates it twice
        # Manual optimization: the two-call loop through self.optimizers(). Accumulating two
        # micro-batches in *both* passes is SAM on the whole batch.
        optimizer = self.optimizers()
        micro_batches = list(zip(x.chunk(2), y.chunk(2)))
        for mx, my in micro_batches:
            self.manual_backward(F.mse_loss(self.net(mx), my) / len(micro_batches))
        optimizer.first_step(zero_grad=True)  # w -> w + e
        for mx, my in micro_batches:
            self.manual_backward(F.mse_loss(self.net(mx), my) / len(micro_batches))
        optimizer.second_step(zero_grad=True)  # through Lightning's step: hooks, global_step

    def configure_optimizers(self):
        return sam_optimizer(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)


torch.manual_seed(1)
x = torch.randn(256, 8)
y = x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def fit(module, **options):
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SAMCallback()],  # checks the settings when fit starts
        **options,
    )
    trainer.fit(module, loader)
    return trainer


def loss(module):
    with torch.no_grad():
        return F.mse_loss(module.net(x), y).item()


runs = {
    "automatic, 32-bit": (Regression(), {}),
    "automatic, bf16-mixed": (Regression(), {"precision": "bf16-mixed"}),
    "manual, two-call loop": (Regression(manual=True), {}),
    # float16 with a loss scaler: this plugin instead of precision="16-mixed" (on a GPU: "cuda")
    "automatic, 16-mixed": (Regression(), {"plugins": [SAMMixedPrecision("16-mixed", "cpu")]}),
}
for name, (module, options) in runs.items():
    before = loss(module)
    trainer = fit(module, **options)
    assert trainer.global_step == 3 * len(loader), name
    assert loss(module) < 0.5 * before, (name, before, loss(module))
    print(f"{name}: loss {before:.3f} -> {loss(module):.3f}")

# Refused when fit starts, before any weight changes: Lightning would run all micro-batches but
# the last outside the optimizer, so SAM's second pass would see one micro-batch only.
module = Regression()
start = [p.detach().clone() for p in module.parameters()]
try:
    fit(module, accumulate_grad_batches=2)
except ValueError as error:
    print("refused:", str(error).split(":")[0])
else:
    raise AssertionError("accumulate_grad_batches=2 was not refused")
assert all(torch.equal(p, s) for p, s in zip(module.parameters(), start))
