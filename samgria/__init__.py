"""samgria: sharpness-aware training and gradient-based meta-learning in torch.optim style."""

from samgria.data import Task, TaskSampler

__version__ = "0.1.0"

__all__ = ["Task", "TaskSampler"]
