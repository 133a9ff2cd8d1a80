"""Few-shot tasks and the task-sampler protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Task", "TaskSampler"]


@dataclass
class Task:
    """One few-shot task: a support split to adapt on and a query split to evaluate on.

    Attributes:
        support_x: Support inputs, shape ``(K, ...)``.
        support_y: Support targets, shape ``(K, ...)``.
        query_x: Query inputs, shape ``(Q, ...)``.
        query_y: Query targets, shape ``(Q, ...)``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, *args, **kwargs) -> "Task":
        """Return a copy with every tensor moved/cast with ``Tensor.to(*args, **kwargs)``."""
        return Task(
            self.support_x.to(*args, **kwargs),
            self.support_y.to(*args, **kwargs),
            self.query_x.to(*args, **kwargs),
            self.query_y.to(*args, **kwargs),
        )


@runtime_checkable
class TaskSampler(Protocol):
    """Anything with ``sample(n) -> list[Task]`` that draws ``n`` tasks from p(T)."""

    def sample(self, n: int) -> list[Task]:
        """Return ``n`` freshly sampled tasks."""
        ...
