"""Small helpers shared by the meta-learning tests."""

from __future__ import annotations

import torch
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


@torch.no_grad()
def central_differences(flat: torch.Tensor, value, h: float = 1e-6) -> list[float]:
    """``(value(x + h e_i) - value(x - h e_i)) / 2h`` for each element ``i`` of the view ``flat``
    (moved in place and put back); ``value()`` returns a number or a one-element tensor."""
    estimates = []
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + h
        up = float(value())
        flat[i] = old - h
        down = float(value())
        flat[i] = old
        estimates.append((up - down) / (2 * h))
    return estimates


def finite_difference_grad(value, tensors, h: float = 1e-6) -> list[torch.Tensor]:
    """The central-difference gradient of ``value()`` with respect to each of ``tensors``."""
    return [
        torch.tensor(central_differences(p.view(-1), value, h), dtype=p.dtype).view_as(p)
        for p in tensors
    ]
