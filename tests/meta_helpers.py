"""Small helpers shared by the meta-learning tests."""

from __future__ import annotations

from torch import nn


class ListSampler:
    """Deterministic sampler: call i returns ``tasks[i * n : (i + 1) * n]`` of a fixed list."""

    def __init__(self, tasks):
        self.tasks, self.position = tasks, 0

    def sample(self, n):
        out = self.tasks[self.position : self.position + n]
        self.position += n
        return out


class ItemModel(nn.Module):
    """A model that cannot be vmapped: it calls ``.item()`` in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def forward(self, x):
        scale = 1.0 if x.abs().max().item() < 1e6 else 0.0
        return self.lin(x) * scale
