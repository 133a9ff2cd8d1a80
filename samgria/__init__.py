"""samgria: sharpness-aware training and gradient-based meta-learning in torch.optim style."""

from samgria.data import Task, TaskSampler
from samgria.optim import TransformingOptimizer, sam_optimizer
from samgria.transforms import (
    ASAM,
    LAMP,
    SAM,
    GradientTransform,
    LAMPRollback,
    PerturbationTransform,
    Transform,
    TransformContext,
)
from samgria.utils import frozen_bn_stats, get_grad, set_grad

__version__ = "0.1.0"

__all__ = [
    "ASAM",
    "GradientTransform",
    "LAMP",
    "LAMPRollback",
    "PerturbationTransform",
    "SAM",
    "Task",
    "TaskSampler",
    "Transform",
    "TransformContext",
    "TransformingOptimizer",
    "frozen_bn_stats",
    "get_grad",
    "sam_optimizer",
    "set_grad",
]
