r"""LAMP: local averaging over multiple perturbations (post-step transform).

After every inner step the weights get magnitude-scaled uniform noise of fixed global size,

.. math::

    u = |w| \odot r,\ r \sim U(-1, 1), \qquad w \leftarrow w + \varepsilon\,\frac{u}{\lVert u \rVert_2},

(drawn as :math:`w \odot r`, which has the same distribution because :math:`r` is symmetric),

the noisy weights are added to a running sum, and after ``rollback_len + 1`` steps the weights
are set to the mean of those iterates and a new cycle starts — the seed library's
``LAMPRollback``. With ``eps = 0`` this is tail averaging of the plain iterates.

State: ``state[p]["lamp_sum"]`` (the running sum; float32 for 16-bit parameters) and
``state[p]["lamp_count"]`` (iterates summed for ``p``) per parameter, and the cycle position
``state[first_param]["lamp_step"]`` on the optimizer's first parameter, so the whole cycle is
checkpointed by ``optimizer.state_dict()``. Only parameters that have a gradient at a step are
perturbed and summed at that step (frozen parameters are left alone).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from samgria.functional import accumulate_, add_scaled_, assign_mean_, global_norm, magnitude_noise
from samgria.transforms.base import Transform, TransformContext, check_non_negative

__all__ = ["LAMP", "LAMPRollback"]


class LAMP(Transform):
    r"""Noise injection, running mean of the weights and periodic rollback to that mean.

    Args:
        eps: Size :math:`\varepsilon \ge 0` of the noise added after every step (global L2 norm).
        rollback_len: Steps per cycle minus one: after ``rollback_len + 1`` steps the weights are
            replaced by the mean of the iterates of the cycle. An integer ``>= 1``.
        seed: When given, the noise comes from a generator of this transform seeded with it, and
            its state is checkpointed with the optimizer (a resumed run draws the same noise).
            ``None``: PyTorch's default generator.

    Raises:
        ValueError: If ``eps < 0`` or ``rollback_len < 1``.
        TypeError: If ``rollback_len`` is not an integer.
    """

    state_prefix = "lamp"

    def __init__(self, eps: float = 5e-3, rollback_len: int = 10, *, seed: int | None = None) -> None:
        check_non_negative("eps", eps)
        if isinstance(rollback_len, bool) or not isinstance(rollback_len, int):
            raise TypeError(f"rollback_len must be an integer, got {rollback_len!r}")
        if rollback_len < 1:
            raise ValueError(f"rollback_len must be >= 1, got {rollback_len!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an integer or None, got {seed!r}")
        self.eps = float(eps)
        self.rollback_len = rollback_len
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._had_grad: set[int] | None = None

    def pre_update(self, ctx: TransformContext) -> None:
        if ctx.standalone:  # apply() runs before the step: remember which parameters had a gradient
            self._had_grad = {id(p) for g in ctx.param_groups for p in g["params"] if p.grad is not None}

    def _repr_items(self) -> list[tuple[str, Any]]:
        items: list[tuple[str, Any]] = [("eps", self.eps), ("rollback_len", self.rollback_len)]
        if self.seed is not None:
            items.append(("seed", self.seed))
        return items

    # -- random numbers --------------------------------------------------------------------------
    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def state_dict(self) -> dict[str, Any]:
        return {"generators": {key: gen.get_state() for key, gen in self._generators.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._generators = {}
        for key, generator_state in state_dict.get("generators", {}).items():
            generator = torch.Generator(device=torch.device(key))
            generator.set_state(generator_state)
            self._generators[key] = generator

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def post_update(self, ctx: TransformContext) -> None:
        all_params = list({id(p): p for group in ctx.param_groups for p in group["params"]}.values())
        if not all_params:
            return
        if ctx.standalone and self._had_grad is not None:
            # Seed protocol: optimizer.zero_grad() may run between step() and post_step(), so the
            # parameters that had a gradient at apply() count too.
            params = [p for p in all_params if p.grad is not None or id(p) in self._had_grad]
            self._had_grad = None
        else:
            params = [p for p in all_params if p.grad is not None]
        cycle_state = ctx.state[all_params[0]]
        step = cycle_state.get("lamp_step", 0) + 1

        if params and self.eps > 0:
            noise = magnitude_noise(params, self._generator_for, foreach=ctx.foreach)
            noise_norm = float(global_norm(noise, foreach=ctx.foreach))
            if math.isfinite(noise_norm) and noise_norm > 0:
                add_scaled_(params, noise, self.eps / noise_norm, foreach=ctx.foreach)
            del noise

        sums = []
        for param in params:
            state = ctx.state[param]
            if "lamp_sum" not in state:
                sum_dtype = torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype
                state["lamp_sum"] = torch.zeros_like(param, dtype=sum_dtype, memory_format=torch.preserve_format)
                state["lamp_count"] = 0
            state["lamp_count"] += 1
            sums.append(state["lamp_sum"])
        accumulate_(sums, params, foreach=ctx.foreach)

        if step >= self.rollback_len + 1:
            summed = [p for p in all_params if ctx.state[p].get("lamp_count", 0) > 0]
            assign_mean_(
                summed,
                [ctx.state[p]["lamp_sum"] for p in summed],
                [ctx.state[p]["lamp_count"] for p in summed],
                foreach=ctx.foreach,
            )
            for param in summed:
                ctx.state[param]["lamp_count"] = 0
            step = 0
        cycle_state["lamp_step"] = step


#: The seed library's name for :class:`LAMP`.
LAMPRollback = LAMP
