"""Pure tensor kernels on lists of tensors: a ``foreach`` fast path and a per-tensor reference path."""

from samgria.functional.norms import all_finite, global_norm
from samgria.functional.perturb import adaptive_scaling, add_directions_, mul, mul_, perturbed_into_

__all__ = ["global_norm", "all_finite", "adaptive_scaling", "add_directions_", "perturbed_into_", "mul", "mul_"]
from samgria.functional.lamp import accumulate_, add_scaled_, assign_mean_, magnitude_noise

__all__ += ["accumulate_", "add_scaled_", "assign_mean_", "magnitude_noise"]
