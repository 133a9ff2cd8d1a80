"""Write golden.pt.gz: checkpoints saved by samgria 0.1.0 and 0.1.0's own continuation of each run.

Run with release 0.1.0 (commit f31c715) on the path, from the repository root::

    git worktree add /tmp/samgria-0.1.0 f31c715
    PYTHONPATH=/tmp/samgria-0.1.0 python tests/data/release_0_1/make_golden.py

Each run: a tiny MLP, SGD with momentum wrapped in TransformingOptimizer, one fixed batch; the
checkpoint (model and optimizer state_dict) after ``saved_after`` steps, the weights after
``saved_after + continued_for`` steps of the same run.
"""

from __future__ import annotations

import copy
import gzip
import io
import pathlib

import torch
from torch import nn

import samgria
from samgria import LAMP, SAM, TransformingOptimizer

assert not hasattr(TransformingOptimizer, "chain") and not hasattr(TransformingOptimizer, "_before_cast"), (
    f"run this with samgria 0.1.0 (commit f31c715) on PYTHONPATH, not {samgria.__file__}"
)

#: name: (dtype, transforms, saved_after, continued_for, frozen first parameter)
RUNS = {
    # Checkpoint in the middle of a 4-step cycle (count 2); the continuation rolls back.
    "float64_lamp": (torch.float64, lambda: [LAMP(1e-2, rollback_len=3, seed=0)], 6, 5, False),
    "float64_sam_lamp": (torch.float64, lambda: [SAM(0.05), LAMP(1e-2, rollback_len=3, seed=0)], 6, 5, False),
    # 0.1.0 kept the cycle position on the first parameter, also a frozen one.
    "float64_lamp_frozen_first": (torch.float64, lambda: [LAMP(1e-2, rollback_len=3, seed=0)], 6, 5, True),
    # Without a seed 0.1.0 drew from the default generator: seeded with 2024 at the checkpoint.
    "float64_lamp_unseeded": (torch.float64, lambda: [LAMP(1e-2, rollback_len=3)], 6, 5, False),
    # bfloat16: 0.1.0 kept a float32 sum, this release a running mean rounded at every step; over
    # 2-step cycles both give the once-rounded mean of two iterates, so the runs agree bit for bit.
    "bfloat16_lamp": (torch.bfloat16, lambda: [LAMP(1e-2, rollback_len=1, seed=0)], 5, 4, False),
    # A float32 sum of two iterates (checkpoint only: longer cycles round differently today).
    "bfloat16_lamp_count2": (torch.bfloat16, lambda: [LAMP(1e-2, rollback_len=3, seed=0)], 6, 0, False),
}
UNSEEDED_GLOBAL_SEED = 2024


def main() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(8, 1, generator=generator, dtype=torch.float64)
    golden = {"x": x, "y": y, "global_seed": UNSEEDED_GLOBAL_SEED}
    for name, (dtype, transforms, saved_after, continued_for, frozen_first) in RUNS.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)
        if frozen_first:
            model[0].weight.requires_grad_(False)
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=transforms())

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))
            loss.backward()
            return loss

        for _ in range(saved_after):
            optimizer.step(closure)
        # Copies: state_dict() shares the live tensors, which the continuation changes in place.
        checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        if name == "float64_lamp_unseeded":
            torch.manual_seed(UNSEEDED_GLOBAL_SEED)
        for _ in range(continued_for):
            optimizer.step(closure)
        checkpoint["continued_for"] = continued_for
        checkpoint["continued"] = {key: value.clone() for key, value in model.state_dict().items()}
        golden[name] = checkpoint
    buffer = io.BytesIO()
    torch.save(golden, buffer)
    # gzip: the Mersenne Twister states of the generators make most of the bytes (about 13 KB).
    with gzip.GzipFile(pathlib.Path(__file__).with_name("golden.pt.gz"), "wb", compresslevel=9, mtime=0) as file:
        file.write(buffer.getvalue())


if __name__ == "__main__":
    main()
