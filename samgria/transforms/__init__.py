"""Transforms that run around the inner optimizer's step: SAM, ASAM, LAMP and the protocol."""

from samgria.transforms.base import GradientTransform, ProtocolTransform, Transform, TransformContext
from samgria.transforms.grad import ClampGrad, ClipGradNorm, GradSign, NormalizeGrad, ScaleGrad
from samgria.transforms.lamp import LAMP, LAMPRollback
from samgria.transforms.sam import ASAM, SAM, Perturbation, PerturbationTransform
from samgria.transforms.sam_family import ESAM, GSAM, WSAM, FriendlySAM, LookSAM
from samgria.transforms.grad import SparsifyGrad
from samgria.transforms.constraints import ClampParams, ProjectParams
from samgria.transforms.param_ndim import ParamTransform
from samgria.transforms.averaging import EMA, Lookahead
from samgria.transforms.ascent import MultiStepSAM

__all__ = [
    "ASAM",
    "ClampGrad",
    "ClipGradNorm",
    "GradSign",
    "NormalizeGrad",
    "ScaleGrad",
    "GradientTransform",
    "LAMP",
    "LAMPRollback",
    "Perturbation",
    "PerturbationTransform",
    "ProtocolTransform",
    "SAM",
    "Transform",
    "TransformContext",
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
]
