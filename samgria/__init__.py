"""samgria: sharpness-aware training and gradient-based meta-learning in torch.optim style.

Everything public is re-exported here; nothing else lives in this module.
"""

from samgria.data import DistributedTaskSampler, FewShotSampler, SinusoidTaskSampler, Task, TaskSampler
from samgria.meta import (
    ANIL,
    FOMAML,
    MAML,
    AdamInnerStep,
    InnerGradTransform,
    InnerLoop,
    InnerSAM,
    InnerStepFn,
    Learner,
    MetaOptimizer,
    MetaSGD,
    MomentumInnerStep,
    PathPolicy,
    Reptile,
    adam_inner_step,
    adapt,
    adapt_params,
    functional_forward,
    head_names,
    inner_step,
    momentum_inner_step,
    named_buffers,
    named_params,
    sgd_inner_step,
)
from samgria.meta.compiled import CompiledMetaLoss, compiled_path_blocker
from samgria.meta.step import MetaStep, meta_step
from samgria.meta.trainer import History, MetaTrainer
from samgria.optim import TransformingOptimizer, sam_optimizer
from samgria.state import ParameterSnapshot, restore_state, save_state
from samgria.transforms import (
    ASAM,
    ClampGrad,
    ClipGradNorm,
    GradSign,
    NormalizeGrad,
    ScaleGrad,
    LAMP,
    SAM,
    GradientTransform,
    LAMPRollback,
    Perturbation,
    PerturbationTransform,
    ProtocolTransform,
    Transform,
    TransformContext,
)
from samgria.transforms import ESAM, GSAM, WSAM, FriendlySAM, LookSAM
from samgria.transforms import ClampParams, ParamTransform, ProjectParams, SparsifyGrad
from samgria.transforms import EMA, Lookahead
from samgria.transforms import MultiStepSAM
from samgria.utils import frozen_bn_stats, get_grad, set_grad

__version__ = "0.2.0.dev0"

__all__ = [
    # the optimizer half
    "TransformingOptimizer",
    "sam_optimizer",
    "SAM",
    "ASAM",
    "LAMP",
    "LAMPRollback",
    "GradientTransform",
    "Transform",
    "TransformContext",
    "PerturbationTransform",
    "Perturbation",
    "ProtocolTransform",
    "ClipGradNorm",
    "GradSign",
    "NormalizeGrad",
    "ScaleGrad",
    "ClampGrad",
    "GSAM",
    "WSAM",
    "FriendlySAM",
    "LookSAM",
    "ESAM",
    "SparsifyGrad",
    "ClampParams",
    "ProjectParams",
    "ParamTransform",
    "Lookahead",
    "EMA",
    "MultiStepSAM",
    "get_grad",
    "set_grad",
    "frozen_bn_stats",
    # the meta-learning half
    "MetaOptimizer",
    "MAML",
    "FOMAML",
    "Reptile",
    "MetaSGD",
    "ANIL",
    "head_names",
    "Learner",
    "meta_step",
    "MetaStep",
    "MetaTrainer",
    "History",
    "CompiledMetaLoss",
    "compiled_path_blocker",
    "functional_forward",
    "inner_step",
    "adapt",
    "adapt_params",
    "InnerLoop",
    "PathPolicy",
    "named_params",
    "named_buffers",
    "InnerStepFn",
    "sgd_inner_step",
    "momentum_inner_step",
    "MomentumInnerStep",
    "adam_inner_step",
    "AdamInnerStep",
    "InnerGradTransform",
    "InnerSAM",
    "save_state",
    "restore_state",
    "ParameterSnapshot",
    # data
    "Task",
    "TaskSampler",
    "SinusoidTaskSampler",
    "FewShotSampler",
    "DistributedTaskSampler",
]
