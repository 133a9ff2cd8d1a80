"""Gradient-based meta-learning: MAML, FOMAML, Reptile, MetaSGD, ANIL."""

from __future__ import annotations

from samgria.meta.anil import ANIL, head_names
from samgria.meta.base import MetaOptimizer
from samgria.meta.engine import InnerLoop
from samgria.meta.functional import (
    adapt,
    adapt_params,
    functional_forward,
    inner_step,
    named_buffers,
    named_params,
)
from samgria.meta.inner_optim import (
    AdamInnerStep,
    InnerGradTransform,
    InnerSAM,
    InnerStepFn,
    MomentumInnerStep,
    adam_inner_step,
    momentum_inner_step,
    sgd_inner_step,
)
from samgria.meta.learner import Learner
from samgria.meta.maml import FOMAML, MAML
from samgria.meta.paths import PathPolicy
from samgria.meta.metasgd import MetaSGD
from samgria.meta.reptile import Reptile
from samgria.meta.step import MetaStep, meta_step
from samgria.meta.trainer import History, MetaTrainer
from samgria.meta.vectorize import (
    batched_task_losses,
    can_vectorize,
    second_order_vmap_blocker,
    stack_tasks,
    vmap_task_losses,
)

__all__ = [
    "ANIL",
    "AdamInnerStep",
    "FOMAML",
    "History",
    "InnerGradTransform",
    "InnerLoop",
    "InnerSAM",
    "InnerStepFn",
    "Learner",
    "MAML",
    "MetaOptimizer",
    "MetaSGD",
    "MetaStep",
    "MetaTrainer",
    "MomentumInnerStep",
    "PathPolicy",
    "Reptile",
    "adam_inner_step",
    "adapt",
    "adapt_params",
    "batched_task_losses",
    "can_vectorize",
    "functional_forward",
    "head_names",
    "inner_step",
    "meta_step",
    "momentum_inner_step",
    "named_buffers",
    "named_params",
    "second_order_vmap_blocker",
    "sgd_inner_step",
    "stack_tasks",
    "vmap_task_losses",
]
