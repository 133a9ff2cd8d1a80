r"""LAMP: local averaging over multiple perturbations (post-step transform).

After every inner step the weights get magnitude-scaled uniform noise of fixed global size,

.. math::

    u = |w| \odot r,\ r \sim U(-1, 1), \qquad w \leftarrow w + \varepsilon\,\frac{u}{\lVert u \rVert_2},

(drawn as :math:`w \odot r`, which has the same distribution because :math:`r` is symmetric;
for weights so small that :math:`\varepsilon / \lVert u \rVert_2` is beyond the range of the
dtype the noise is added in, :math:`u` is first scaled by a power of two, exactly, as
:class:`~samgria.SAM` scales its direction),

the noisy weights are added to a running sum, and after ``rollback_len + 1`` steps the weights
are set to the mean of those iterates and a new cycle starts — the seed library's
``LAMPRollback``. With ``eps = 0`` this is tail averaging of the plain iterates.

Hyperparameters: ``eps`` per param group (a group with ``eps=0`` gets no noise); the cycle
length ``rollback_len`` and the noise ``seed`` are settings of the transform (a checkpoint must
have been made with the same ones).

State, all in the transform's slot of ``optimizer.state`` (so ``state_dict()`` and
``torch.distributed.checkpoint`` carry it): per parameter ``"sum"`` (the running sum, in the
parameter's dtype, as torch keeps its own state) and ``"count"`` (iterates summed); a 16-bit
parameter keeps ``"mean"`` instead of ``"sum"``, the running mean
:math:`\bar w_n = \bar w_{n-1} + (w_n - \bar w_{n-1}) / n` computed in float32 and rounded once
(as ``torch.optim.swa_utils`` averages): a sum in float16 overflows at 65504 and one in bfloat16
keeps about three significant digits (a checkpoint's ``"sum"`` or ``"mean"`` is converted to what
the parameter's dtype keeps by ``load_state_dict`` and ``set_optimizer_state_dict``; ``dcp.load``
and ``set_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`` read the keys of the
state they load into, so across the 16-bit boundary they find no such key and raise); on the first
parameter ``"cycle_step"`` (the position in the cycle); with a ``seed``, on the first parameter
of each device ``"rng_state"`` (that device's generator state). A parameter converted mid-cycle
(``model.half()``, ``.double()``, ``.to(device)``) keeps its cycle: at its next step, or the
rollback, its sum or mean becomes what the new dtype keeps (:math:`S = n \bar w` or
:math:`\bar w = S / n`), in that dtype on that device. A resumed run draws the same
noise and rolls back at the same steps, bit for bit. Only parameters that have a gradient at a
step are perturbed and summed at that step (frozen parameters are left alone); a step at which
no parameter has a gradient is no step of the cycle (as for :class:`~samgria.EMA` and
:class:`~samgria.Lookahead`). The rollback at the
end of a cycle sets every parameter summed during the cycle to its mean, also one without a
gradient at the rollback step (an expert a router skipped, a layer frozen mid-cycle): its last
iterate is a noisy one, and its mean is what the cycle computed for it. Complex
parameters are treated as pairs of reals: each real component gets its own uniform factor.

Sharded parameters (``DTensor``, e.g. FSDP2's ``fully_shard``): each rank draws the noise of its
own shards and keeps the sums of its own shards; only :math:`\lVert u \rVert_2` is summed across
ranks. With a ``seed``, the noise of a step's :math:`n`-th draw on the shard at mesh coordinates
:math:`c` (the rank's position along the sharded mesh dimensions; replicas share it) comes from a
generator seeded with a hash of ``(seed, n, c)``, tensor by tensor in parameter order (see
:func:`sharded_noise_seed`). The state is then the draw counter ``"noise_draws"`` (the same on
every rank, so a distributed checkpoint carries it whole): a run is reproducible for a given
world size and resumes bit for bit on the same number of ranks; on another number of ranks it
resumes with other (equally distributed) noise.

Without a seed, each rank draws from its own default generator. A parameter other ranks hold a
copy of (``DistributedDataParallel``'s replicas, a ``DTensor`` replicated along a mesh dimension,
e.g. HSDP's) then stays identical across ranks only while their generators are in the same
state; LAMP warns once (a ``RuntimeWarning``, at its first noise draw, without communicating)
when it perturbs such a parameter in a process group of several ranks -- any plain tensor counts
(it cannot tell DDP's replicas from parameters no other rank holds).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

import torch

from samgria._checks import check_int, check_loaded_tensor, check_real, check_seed
from samgria._frameworks import stacklevel_outside
from samgria.functional._sharding import is_sharded, may_have_replicas, shard_coordinates
from samgria.functional._views import LOW_PRECISION, as_real, widened_dtype
from samgria.functional import accumulate_, add_scaled_, assign_mean_, global_norm, magnitude_noise
from samgria.transforms.base import Transform, TransformContext
from samgria.transforms.sam import _scales_within_range

__all__ = ["LAMP", "LAMPRollback", "sharded_noise_seed"]


#: LAMP's object-level keys (on the first parameter that requires grad, per device for rng_state).
_OBJECT_KEYS = ("cycle_step", "rng_state", "noise_draws")


def sharded_noise_seed(seed: int, draw: int, coordinates: tuple[int, ...]) -> int:
    """The seed of the generator that draws LAMP's noise for one shard.

    Args:
        seed: LAMP's ``seed``.
        draw: How many noise draws came before (``"noise_draws"`` in LAMP's slot).
        coordinates: The shard's coordinates along the sharded mesh dimensions.

    Returns:
        A 63-bit seed, the same on every platform.
    """
    text = f"samgria.LAMP/{seed}/{draw}/{','.join(map(str, coordinates))}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


class LAMP(Transform):
    r"""Noise injection, running mean of the weights and periodic rollback to that mean.

    Args:
        eps: Default size :math:`\varepsilon \ge 0` of the noise added after every step (global
            L2 norm; per-group key ``"eps"``).
        rollback_len: Steps per cycle minus one: after ``rollback_len + 1`` steps the weights are
            replaced by the mean of the iterates of the cycle. An integer ``>= 1``.
        seed: When given, the noise comes from generators of this transform seeded with it, whose
            states are checkpointed with the optimizer (a resumed run draws the same noise).
            ``None``: PyTorch's default generator (under ``torch.distributed``, each rank's own:
            LAMP warns once when it perturbs plain or replicated parameters there).

    Raises:
        ValueError: If ``eps`` is negative or not finite, ``rollback_len < 1``, or ``seed`` is
            outside :math:`[-2^{63}, 2^{64} - 1]` (what ``torch.Generator.manual_seed`` takes).
        TypeError: If ``eps`` is not a real number (a bool included), or ``rollback_len`` or
            ``seed`` is not an integer.
    """

    def __init__(self, eps: float = 5e-3, rollback_len: int = 10, *, seed: int | None = None) -> None:
        self.eps = check_real("eps", eps, low=0.0)
        self.rollback_len = check_int("rollback_len", rollback_len, low=1)
        self.seed = check_seed("seed", seed)
        self._had_grad: set[int] | None = None
        self._warned_unseeded = False

    def group_defaults(self) -> dict[str, Any]:
        return {"eps": self.eps}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("eps", group["eps"], low=0.0)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle. Release 0.1.0's LAMP kept its generators in the attribute ``_generators``,
        which would hide the method of that name (the first step raised ``'dict' object is not
        callable``); this release keeps them in the optimizer's slot, where loading a 0.1.0
        checkpoint (its ``"transforms"``) puts them, so the attribute is dropped: the object is
        then the LAMP that its settings build."""
        self.__dict__.update({key: value for key, value in state.items() if key != "_generators"})

    def settings(self) -> dict[str, Any]:
        return {"rollback_len": self.rollback_len, "seed": self.seed}

    def scales_with_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        return True  # its pre_update leaves the gradients alone

    def pre_update(self, ctx: TransformContext) -> None:
        if ctx.standalone:  # apply() runs before the step: remember which parameters had a gradient
            self._had_grad = {id(p) for g in ctx.param_groups for p in g["params"] if p.grad is not None}

    # -- random numbers --------------------------------------------------------------------------
    def _generators(self, ctx: TransformContext) -> _GeneratorCache | None:
        """This step's generators, one per device, from the states in the slot (or the seed)."""
        if self.seed is None:
            return None
        return _GeneratorCache(ctx, self.seed)

    def convert_loaded(self, entry: dict[str, Any], param: torch.Tensor) -> None:
        """A checkpoint's ``"sum"`` for a 16-bit parameter becomes ``sum / count`` (a float32 run's
        sum may exceed float16's range, a mean of weights does not), its ``"mean"`` for another
        parameter ``mean * count``, computed in the checkpoint's dtype, before torch casts it."""
        key = _accumulator_key(param)
        other = "mean" if key == "sum" else "sum"
        value, count = entry.get(other), entry.get("count")
        if not isinstance(value, torch.Tensor) or not _is_count(count, None):
            return  # nothing to convert, or check_loaded_state refuses it
        current = entry.get(key)
        if current is not None and not (isinstance(current, torch.Tensor) and not bool(current.any())):
            return  # both hold values: check_loaded_state refuses the checkpoint
        # This dtype's key holds the zeros a fresh optimizer's state starts with:
        # torch.distributed.checkpoint merged the checkpoint into that state. The other is real.
        if not (value.is_floating_point() or value.is_complex()):
            return
        del entry[other]
        entry[key] = _as_accumulator(key, value, count)

    def check_loaded_state(self, ctx: TransformContext) -> None:
        """Raise ``ValueError`` unless the slot holds valid generator states, sums with their
        counts and counters."""
        where = f"the checkpoint's LAMP slot {ctx.slot!r} holds"
        cycle = ctx.slot_state(keys=_OBJECT_KEYS)
        if cycle is not None:
            for key, high in (("cycle_step", self.rollback_len), ("noise_draws", None)):
                if key not in cycle:  # a None there is refused: the step counts on from it
                    continue
                value = cycle[key]
                if not _is_count(value, high):
                    rule = "an integer >= 0" if high is None else f"an integer in [0, {high}]"
                    raise ValueError(f"{where} {key}={value!r}, not {rule}")
        if cycle is not None and self.seed is not None:
            self._check_noise_layout(ctx, cycle, where)
        for group in ctx.param_groups:
            for param in group["params"]:
                if param not in ctx.state:
                    continue
                entry = ctx.state[param]
                kept = [key for key in ("sum", "mean") if key in entry]
                for key in kept:
                    check_loaded_tensor("LAMP", ctx.slot, key, entry[key], param)
                if len(kept) > 1:
                    raise ValueError(f"{where} both a sum and a mean for one parameter")
                if bool(kept) != ("count" in entry):
                    raise ValueError(
                        f"{where} a parameter's {kept[0]} without its count" if kept else f"{where} a count without its sum"
                    )
                if "count" in entry and not _is_count(entry["count"], None):
                    raise ValueError(f"{where} count={entry['count']!r}, not an integer >= 0")
        for group in ctx.param_groups:  # checked: convert to what each parameter's dtype keeps
            for param in group["params"]:
                if param not in ctx.state:
                    continue
                entry = ctx.state[param]
                key = _accumulator_key(param)
                other = "mean" if key == "sum" else "sum"
                if other in entry:
                    value = entry.pop(other)
                    entry[key] = _as_accumulator(key, value, entry["count"]).to(param.dtype)
                if "rng_state" in entry:  # a None there too: the step would draw from it
                    rng_state = entry["rng_state"]
                    # Loaded as bytes on the parameter's device (a slot's non-floating tensors are
                    # shielded from torch's cast, TransformingOptimizer._before_cast); a generator
                    # takes a CPU byte tensor.
                    try:
                        restored = _as_generator_state(rng_state)
                        torch.Generator(device=param.device).set_state(restored)
                    except (RuntimeError, TypeError, ValueError, AttributeError) as error:
                        raise ValueError(
                            f"the checkpoint's LAMP slot {ctx.slot!r} holds an invalid generator "
                            f"state for device {param.device}: {error}"
                        ) from None
                    entry["rng_state"] = restored

    @staticmethod
    def _check_noise_layout(ctx: TransformContext, cycle: Any, where: str) -> None:
        """Raise ``ValueError`` when a seeded LAMP's checkpoint keeps the noise state of the other
        layout: a generator state (``rng_state``) is kept for unsharded parameters only, a draw
        counter (``noise_draws``) for sharded ones. Loaded into the other layout, the run would go
        on with noise of another stream, the loaded state of the wrong kind kept beside it."""
        params = [param for group in ctx.param_groups for param in group["params"]]
        if "noise_draws" in cycle and not any(is_sharded(p) for p in params):
            problem = "a draw counter (noise_draws) of sharded parameters, and none of these is sharded"
        elif any("rng_state" in ctx.state[p] for p in params if p in ctx.state) and all(is_sharded(p) for p in params):
            problem = "a generator state (rng_state) of unsharded parameters, and all of these are sharded"
        else:
            return
        raise ValueError(
            f"{where} {problem}: a seeded LAMP's checkpoint does not move between sharded and "
            "unsharded parameters; an unseeded LAMP's does"
        )

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def init_state(self, ctx: TransformContext) -> None:
        params = [p for g in ctx.param_groups for p in g["params"] if p.grad is not None]
        for param in params:
            self._ensure_accumulator(ctx, param)
        cycle = ctx.slot_state(keys=_OBJECT_KEYS)
        if cycle is not None:
            cycle.setdefault("cycle_step", 0)
        generators = self._generators(ctx)
        if generators is not None:
            for param in params:
                if not is_sharded(param):
                    generators.get(param.device)
            generators.save()
        if cycle is not None and self.seed is not None and any(is_sharded(p) for p in params):
            cycle.setdefault("noise_draws", 0)

    @staticmethod
    def _ensure_accumulator(ctx: TransformContext, param: torch.Tensor) -> Any:
        """``param``'s entry, with the accumulator its dtype keeps, in its dtype on its device.

        A parameter converted since its last step (``model.half()``, ``.double()``, ``.to(device)``)
        keeps the cycle: its sum or mean of ``count`` iterates is converted (a new tensor, so that
        a failed step's restore puts the old one back), as ``load_state_dict`` converts a
        checkpoint's. One whose ``.data`` was replaced by a tensor of another shape (an embedding
        resized) raises ``ValueError``, as EMA's averages do.
        """
        state = ctx.state[param]
        key = _accumulator_key(param)
        other = "mean" if key == "sum" else "sum"
        for held in (key, other):
            value = state.get(held)
            if isinstance(value, torch.Tensor) and value.shape != param.shape:
                remedy = (
                    # The seed protocol: no optimizer holds the sum (as EMA says).
                    "use a new LAMP for the resized model (through apply/post_step the LAMP keeps "
                    "it itself)"
                    if ctx.standalone
                    else f"del optimizer.state[param]['{ctx.slot}.{held}'] to start its average afresh"
                )
                raise ValueError(
                    f"LAMP: the running {held} of a parameter is of shape {tuple(value.shape)}, but "
                    f"it is now of shape {tuple(param.shape)} (its .data was replaced since its last "
                    f"step): it no longer fits it, as torch's optimizer state would not; {remedy}"
                )
        if other in state:
            state[key] = _accumulator_like(param, key, state.pop(other), other, state["count"])
        elif key not in state:
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["count"] = 0
        elif state[key].dtype != param.dtype or state[key].device != param.device:
            state[key] = _accumulator_like(param, key, state[key], key, state["count"])
        return state

    @torch.no_grad()
    def post_update(self, ctx: TransformContext) -> None:
        all_params = list({id(p): p for group in ctx.param_groups for p in group["params"]}.values())
        if not all_params:
            return
        # As floats: a NumPy scalar would carry its own precision (float16's range) into eps / ||u||.
        eps_of = {id(p): float(group["eps"]) for group in reversed(ctx.param_groups) for p in group["params"]}
        if ctx.standalone and self._had_grad is not None:
            # Seed protocol: optimizer.zero_grad() may run between step() and post_step(), so the
            # parameters that had a gradient at apply() count too.
            params = [p for p in all_params if p.grad is not None or id(p) in self._had_grad]
            self._had_grad = None
        else:
            params = [p for p in all_params if p.grad is not None]
        if not params:  # no weight moved: not an iterate, and not a step of the cycle (as EMA, Lookahead)
            return
        cycle = ctx.slot_state(keys=_OBJECT_KEYS)
        if cycle is None:  # no parameter requires grad: nothing to perturb, sum or count
            return
        step = cycle.get("cycle_step", 0) + 1
        if self.seed is not None and any(is_sharded(p) for p in params):
            # Also without noise (eps=0): the same keys in every checkpoint of a seeded run. An
            # unseeded run keeps no counter, so its checkpoints load across the sharded and the
            # unsharded layouts.
            cycle.setdefault("noise_draws", 0)

        noisy = [p for p in params if eps_of[id(p)] > 0]
        if noisy:
            real = [as_real(p) for p in noisy]
            noise = self._noise(ctx, noisy, real, cycle)
            noise_norm = float(global_norm(noise, foreach=ctx.foreach, like=noisy))
            if math.isfinite(noise_norm) and noise_norm > 0:
                # eps / noise_norm beyond the range of the dtype the noise is added in (weights so
                # small that the norm is below about eps / 3.4e38 in float32) is never formed: the
                # noise is scaled by a power of two first, exactly, as SAM scales its direction.
                directions, scales = _scales_within_range(
                    noise, [eps_of[id(p)] for p in noisy], [noise_norm] * len(noisy)
                )
                for scale in sorted(set(scales)):
                    chosen = [i for i, value in enumerate(scales) if value == scale]
                    add_scaled_([real[i] for i in chosen], [directions[i] for i in chosen], scale, foreach=ctx.foreach)
                del directions
            del noise

        summing: list[torch.Tensor] = []
        averaging: list[torch.Tensor] = []
        for param in params:
            state = self._ensure_accumulator(ctx, param)
            state["count"] += 1
            (averaging if "mean" in state else summing).append(param)
        accumulate_(
            [as_real(ctx.state[p]["sum"]) for p in summing], [as_real(p) for p in summing], foreach=ctx.foreach
        )
        for param in averaging:
            _update_mean_(as_real(ctx.state[param]["mean"]), as_real(param), ctx.state[param]["count"])

        if step >= self.rollback_len + 1:
            counted = [p for p in all_params if p in ctx.state and ctx.state[p].get("count", 0) > 0]
            for param in counted:  # also those without a gradient now, converted since their last step
                self._ensure_accumulator(ctx, param)
            summed = [p for p in counted if "sum" in ctx.state[p]]
            assign_mean_(
                [as_real(p) for p in summed],
                [as_real(ctx.state[p]["sum"]) for p in summed],
                [ctx.state[p]["count"] for p in summed],
                foreach=ctx.foreach,
            )
            for param in counted:
                if "mean" in ctx.state[param]:
                    param.copy_(ctx.state[param]["mean"])
                    ctx.state[param]["mean"].zero_()
                ctx.state[param]["count"] = 0
            step = 0
        cycle["cycle_step"] = step


    def _noise(
        self, ctx: TransformContext, params: list[torch.Tensor], real: list[torch.Tensor], cycle: Any
    ) -> list[torch.Tensor]:
        r""":math:`w \odot r` for each parameter (on this rank's shard of a sharded one)."""
        if self.seed is None and not getattr(self, "_warned_unseeded", False):
            self._warn_if_replicas_draw_apart(params)
        noise: list[torch.Tensor] = [torch.empty(0)] * len(params)
        plain = [i for i, p in enumerate(params) if not is_sharded(p)]
        if plain:
            generators = self._generators(ctx)
            drawn = magnitude_noise(
                [real[i] for i in plain],
                generators.get if generators is not None else (lambda _d: None),
                foreach=ctx.foreach,
            )
            if generators is not None:
                generators.save()
            for i, sample in zip(plain, drawn):
                noise[i] = sample
        by_shard: dict[tuple[int, ...], list[int]] = {}
        for i, param in enumerate(params):
            if is_sharded(param):
                by_shard.setdefault(shard_coordinates(param), []).append(i)
        if by_shard:
            draw = cycle.get("noise_draws", 0)
            for coordinates, indices in by_shard.items():
                seeded: dict[torch.device, torch.Generator] = {}

                def generator_for(device: torch.device) -> torch.Generator | None:
                    if self.seed is None:
                        return None
                    if device not in seeded:
                        seed = sharded_noise_seed(self.seed, draw, coordinates)
                        seeded[device] = torch.Generator(device=device).manual_seed(seed)
                    return seeded[device]

                drawn = magnitude_noise([real[i] for i in indices], generator_for, foreach=ctx.foreach)
                for i, sample in zip(indices, drawn):
                    noise[i] = sample
            if self.seed is not None:
                cycle["noise_draws"] = draw + 1
        return noise

    def _warn_if_replicas_draw_apart(self, params: list[torch.Tensor]) -> None:
        """Warn (once) when unseeded noise lands on parameters that other ranks hold copies of."""
        world_size = _world_size()
        if world_size > 1 and any(map(may_have_replicas, params)):
            self._warned_unseeded = True
            warnings.warn(
                f"LAMP: seed=None in a process group of {world_size} ranks: each rank draws the noise "
                "from its own default generator, so replicas of a parameter (DistributedDataParallel, "
                "HSDP) stay identical only while every rank's generator is in the same state; pass "
                "seed= (the same on every rank) to make the noise identical (parameters no other rank "
                "holds a copy of, as in pipeline parallelism, need no seed: a plain tensor cannot say)",
                RuntimeWarning,
                stacklevel=stacklevel_outside(),
            )


def _world_size() -> int:
    """The default process group's size; 1 without ``torch.distributed`` or an initialised group."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _as_accumulator(key: str, value: torch.Tensor, count: int) -> torch.Tensor:
    """A checkpoint's sum (``key="mean"``) or mean (``key="sum"``) of ``count`` iterates as the
    other, computed in float32 (or wider) from ``value``'s dtype."""
    wide = value.to(widened_dtype(value.dtype))
    if key == "mean":
        return wide / count if count else torch.zeros_like(wide)
    return wide * count


def _accumulator_like(param: torch.Tensor, key: str, value: torch.Tensor, kept_as: str, count: int) -> torch.Tensor:
    r"""``value``, the ``kept_as`` (``"sum"`` or ``"mean"``) of ``count`` iterates, as ``param``'s
    ``key``: :math:`S = n\,\bar w` or :math:`\bar w = S / n` computed in the wider of the two
    dtypes (float32 at least), rounded once to ``param``'s dtype, on its device."""
    wide = value.to(torch.promote_types(widened_dtype(value.dtype), widened_dtype(param.dtype)))
    if kept_as != key:
        wide = _as_accumulator(key, wide, count)  # already wide: computed in that dtype
    return wide.to(device=param.device, dtype=param.dtype)


def _accumulator_key(param: torch.Tensor) -> str:
    """``"mean"`` for a 16-bit (or complex-of-16-bit) parameter, ``"sum"`` for the others."""
    return "mean" if as_real(param).dtype in LOW_PRECISION else "sum"


@torch.no_grad()
def _update_mean_(mean: torch.Tensor, value: torch.Tensor, count: int) -> None:
    r"""In place: :math:`\bar w \leftarrow \bar w + (w - \bar w) / n`, in float32, rounded once."""
    wide = mean.to(widened_dtype(mean.dtype))
    mean.copy_(wide.add_(torch.sub(value.to(wide.dtype), wide), alpha=1.0 / count))


def _is_count(value: Any, high: int | None) -> TypeGuard[int]:
    """Whether ``value`` is a Python integer in ``[0, high]`` (no bool; ``high=None``: no bound)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0 and (high is None or value <= high)


def _as_generator_state(value: torch.Tensor) -> torch.Tensor:
    """A generator state as ``set_state`` takes it: a CPU byte tensor (one moved to another
    device, or holding byte values in another dtype, is taken back)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(value).__name__}")
    if value.dtype != torch.uint8:
        as_bytes = value.to(torch.uint8)
        if not torch.equal(as_bytes.to(value.dtype), value):
            raise ValueError("the values are not bytes")
        value = as_bytes
    return value.cpu()


class _GeneratorCache:
    """One generator per device for one step, loaded from and saved to the slot's ``rng_state``."""

    def __init__(self, ctx: TransformContext, seed: int) -> None:
        self._ctx = ctx
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def get(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            slot = self._ctx.slot_state(device, keys=_OBJECT_KEYS)
            if slot is not None and "rng_state" in slot:
                generator.set_state(_as_generator_state(slot["rng_state"]))
            else:
                generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator

    def save(self) -> None:
        for device, generator in self._generators.items():
            slot = self._ctx.slot_state(device)
            if slot is not None:
                slot["rng_state"] = generator.get_state()


#: The seed library's name for :class:`LAMP`.
LAMPRollback = LAMP
