"""Release 0.1.0's ``TransformingOptimizer`` checkpoints, converted into this release's layout.

samgria 0.1.0 saved the transforms' state beside torch's ``"state"`` and ``"param_groups"``:

* ``"transform_state"``: ``{param_index: {"lamp_sum": S, "lamp_count": n}}``, plus
  ``"lamp_step"`` (the position in LAMP's cycle) on the optimizer's first parameter;
* ``"transforms"``: one dict per transform of the chain, LAMP's
  ``{"generators": {str(device): generator_state}}`` (empty without a ``seed``), every other
  transform's ``{}``.

This release keeps each transform's state in its slot of ``optimizer.state``
(:mod:`samgria.transforms.base`). When the mapping is unambiguous -- the optimizer's chain has
exactly one :class:`~samgria.LAMP`, and ``"transforms"`` has one entry per transform of the chain,
every one but LAMP's empty -- a checkpoint converts, with ``s`` the LAMP's slot, as follows:

========================================  =========================================================
0.1.0                                     this release
========================================  =========================================================
``transform_state[i]["lamp_sum"]``        ``state[i]["s.sum"]``; for a 16-bit parameter
                                          ``LAMP.convert_loaded`` then turns 0.1.0's float32 sum
                                          into ``"s.mean"`` :math:`= S / n`
``transform_state[i]["lamp_count"]``      ``state[i]["s.count"]``
``transform_state[0]["lamp_step"]``       ``"s.cycle_step"`` on the first parameter that requires
                                          grad (0.1.0 kept it on the first parameter, also a
                                          frozen one)
``generators[device]``                    ``"s.rng_state"`` on the first parameter on ``device``
                                          that requires grad (else the first on ``device``)
each param group                          the group, recording this optimizer's chain; the
                                          transforms' keys it lacks come from the optimizer's
                                          group, as for a plain inner optimizer's checkpoint
a group's ``"normalize_eps"``             the ``eps`` of each :class:`~samgria.NormalizeGrad` of
                                          the chain (``"eps"``, or ``"<slot>.eps"`` beside another
                                          ``eps``), also where no transform held state
========================================  =========================================================

0.1.0 recorded none of LAMP's settings: ``rollback_len``, ``seed`` and ``eps`` are the
constructor's, so the checkpoint must be loaded into a LAMP built as the one that saved it. A
LAMP without a seed drew from PyTorch's default generator, whose state the checkpoint does not
hold: the resumed run continues bit for bit only where that generator is in the state it had
when the checkpoint was saved. 16-bit parameters continue with this release's 16-bit arithmetic:
its running mean and its addition of the noise round differently from 0.1.0's float32 sum and
noise step, so a 16-bit run resumes to within rounding of 0.1.0's continuation, not bit for bit
(as a fresh 16-bit run of the two releases differs). Everything else holding transform state is
refused, naming what does not map; a checkpoint whose transforms held nothing loads as a plain
inner optimizer's, and one whose groups record a chain is this release's (keys added beside are
ignored, as torch ignores them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch

from samgria.transforms.chain import CHAIN_KEY, Chain
from samgria.transforms.grad import NormalizeGrad
from samgria.transforms.lamp import LAMP

__all__ = ["from_release_0_1"]

#: The top-level keys release 0.1.0 added beside torch's.
_KEYS = ("transform_state", "transforms")
#: LAMP's per-parameter keys in 0.1.0 and the slot keys they become.
_LAMP_KEYS = {"lamp_sum": "sum", "lamp_count": "count"}
_STEP_KEY = "lamp_step"
#: Param-group keys of 0.1.0's transforms that this release names otherwise:
#: {class: {0.1.0's key: this release's hyperparameter}}.
_RENAMED_GROUP_KEYS: dict[type, dict[str, str]] = {NormalizeGrad: {"normalize_eps": "eps"}}


class _Refusal(ValueError):
    """What does not map (raised as the caller's ``ValueError`` with the remedy)."""


def _refusal(detail: str) -> ValueError:
    return ValueError(
        "the checkpoint has the layout of samgria 0.1.0 (top-level 'transform_state' and "
        f"'transforms'), whose transform state this release converts only unambiguously: {detail}. "
        "Resume it with 0.1.0, or start the transforms afresh by loading only the inner optimizer's "
        "part, optimizer.load_state_dict({'state': checkpoint['state'], 'param_groups': "
        "checkpoint['param_groups']}) (nothing was loaded)"
    )


def from_release_0_1(state_dict: Any, chain: Chain, param_groups: Sequence[Mapping[str, Any]]) -> Any:
    """A checkpoint of release 0.1.0's layout in this release's (see the module's docstring).

    Args:
        state_dict: The checkpoint being loaded (never changed).
        chain: The loading optimizer's chain.
        param_groups: The loading optimizer's param groups (parameters, and the transforms'
            hyperparameters a checkpoint's group lacks).

    Returns:
        ``state_dict`` itself when it lacks one of 0.1.0's two keys, or when its groups record a
        chain (this release's layout, whatever keys were added beside); else a new dict without them,
        the LAMP's state in its slot and every group recording ``chain`` (or the groups as they
        are when the transforms held nothing: then it loads as a plain optimizer's).

    Raises:
        ValueError: If the checkpoint holds transform state that does not map unambiguously
            (nothing was converted).
    """
    if not isinstance(state_dict, Mapping) or not all(key in state_dict for key in _KEYS):
        return state_dict  # 0.1.0 wrote both keys: one alone is some other key added beside
    groups = state_dict.get("param_groups")
    if isinstance(groups, (list, tuple)) and any(isinstance(g, Mapping) and CHAIN_KEY in g for g in groups):
        return state_dict  # this release's layout, with keys of its own beside (ignored, as torch does)
    per_param = state_dict.get("transform_state")
    per_transform = state_dict.get("transforms")
    rest = {key: value for key, value in state_dict.items() if key not in _KEYS}
    try:
        if isinstance(groups, (list, tuple)):
            rest["param_groups"] = _renamed_keys(groups, chain)
        if not (bool(per_param) or (isinstance(per_transform, (list, tuple)) and any(per_transform))):
            return rest  # SAM, ASAM, the gradient transforms: nothing to carry
        return _converted(rest, per_param, per_transform, chain, param_groups)
    except _Refusal as refusal:
        raise _refusal(str(refusal)) from None


def _renamed_keys(groups: Sequence[Any], chain: Chain) -> list[Any]:
    """0.1.0's groups with the keys this release names otherwise under this chain's names (new
    dicts where a key is renamed; a key of a transform the chain lacks stays, as torch keeps
    unknown keys)."""
    renamed = []
    for index, group in enumerate(groups):
        if isinstance(group, Mapping):
            group = _renamed_group(dict(group), index, chain)
        renamed.append(group)
    return renamed


def _renamed_group(group: dict[str, Any], index: int, chain: Chain) -> dict[str, Any]:
    for cls, names in _RENAMED_GROUP_KEYS.items():
        slots = [slot for slot, transform in chain if isinstance(transform, cls)]
        for old, new in names.items():
            if old not in group or not slots or old in chain.defaults:
                continue  # (a key of this chain under that name is its own)
            value = group.pop(old)
            for slot in slots:  # 0.1.0's transforms of one class shared the key
                stored = chain.keys[slot][new]
                if stored in group and group[stored] != value:
                    raise _Refusal(
                        f"its param_groups[{index}] sets {old!r}={value!r}, 0.1.0's name of {cls.__name__}'s "
                        f"{new}, and {stored!r}={group[stored]!r}, which this release reads as slot "
                        f"{slot!r}'s {new}"
                    )
                group[stored] = value
    return group


def _converted(
    rest: dict[str, Any], per_param: Any, per_transform: Any, chain: Chain, param_groups: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    lamps = [index for index, (_, transform) in enumerate(chain) if isinstance(transform, LAMP)]
    if not lamps:
        raise _Refusal("this optimizer's chain has no LAMP to take 0.1.0's LAMP state")
    if len(lamps) > 1:
        slots = ", ".join(repr(chain.slots[i]) for i in lamps)
        raise _Refusal(f"this optimizer's chain has {len(lamps)} LAMPs (slots {slots}): which one takes 0.1.0's LAMP state is ambiguous")
    position = lamps[0]
    slot, lamp = chain.slots[position], cast(LAMP, chain.transforms[position])  # cast: found as a LAMP above
    if not isinstance(per_transform, (list, tuple)) or not all(isinstance(entry, Mapping) for entry in per_transform):
        raise _Refusal(f"its 'transforms' is not a list of dicts ({_kind(per_transform)})")
    if len(per_transform) != len(chain):
        raise _Refusal(
            f"its 'transforms' holds {len(per_transform)} entries, but this optimizer's chain has "
            f"{len(chain)} transforms ({', '.join(chain.spec())})"
        )
    for index, entry in enumerate(per_transform):
        if index != position and entry:
            raise _Refusal(
                f"its 'transforms'[{index}] holds state {sorted(map(str, entry))}, but transform {index} of "
                f"this optimizer is {chain.spec()[index]}: only LAMP's state converts"
            )
    generators = _generators(per_transform[position], position)
    if generators and lamp.seed is None:
        raise _Refusal(
            f"its LAMP drew its noise from seeded generators (devices {sorted(generators)}), but this "
            f"optimizer's LAMP (slot {slot!r}) has seed=None: build it with the seed it was saved with"
        )
    if not isinstance(per_param, Mapping):
        raise _Refusal(f"its 'transform_state' is a {type(per_param).__name__}, not a dict")

    indices, params = _params(rest, param_groups)
    at = dict(zip(indices, params))
    step_at = indices[0] if indices else None
    for index, entry in per_param.items():
        if index not in at:
            raise _Refusal(f"its 'transform_state' refers to parameter index {index!r}, which its param_groups do not list")
        if not isinstance(entry, Mapping):
            raise _Refusal(f"its 'transform_state'[{index!r}] is a {type(entry).__name__}, not a dict")
        unknown = [key for key in entry if key not in _LAMP_KEYS and key != _STEP_KEY]
        if unknown:
            raise _Refusal(
                f"its 'transform_state'[{index!r}] holds {unknown}, which is not LAMP's state "
                "(lamp_sum, lamp_count, lamp_step): only LAMP's state converts"
            )
        if _STEP_KEY in entry and index != step_at:
            raise _Refusal(f"its 'transform_state'[{index!r}] holds lamp_step, which 0.1.0 kept on the first parameter only")

    saved = rest.get("state")
    if not isinstance(saved, Mapping):
        raise _Refusal(f"its 'state' is a {type(saved).__name__}, not a dict")
    state = {index: dict(entry) if isinstance(entry, Mapping) else entry for index, entry in saved.items()}
    prefix = slot + "."

    def entry_of(index: Any) -> dict[Any, Any]:
        entry = state.setdefault(index, {})
        if not isinstance(entry, dict):
            raise _Refusal(f"its 'state'[{index!r}] is a {type(entry).__name__}, not a dict")
        taken = [key for key in entry if isinstance(key, str) and key.startswith(prefix)]
        if taken:
            raise _Refusal(f"its 'state'[{index!r}] already holds this release's slot keys {taken}")
        return entry

    additions: dict[Any, dict[str, Any]] = {}
    for index, entry in per_param.items():
        moved = {prefix + _LAMP_KEYS[key]: value for key, value in entry.items() if key in _LAMP_KEYS}
        if moved:
            additions.setdefault(index, {}).update(moved)
    trainable = [index for index, param in zip(indices, params) if param.requires_grad]
    if step_at is not None and _STEP_KEY in per_param.get(step_at, {}):
        anchor = trainable[0] if trainable else step_at
        additions.setdefault(anchor, {})[prefix + "cycle_step"] = per_param[step_at][_STEP_KEY]
    for key, (device, generator_state) in generators.items():
        on_device = [index for index, param in zip(indices, params) if param.device == device]
        if not on_device:
            raise _Refusal(f"its LAMP holds a generator state for device {key!r}, but no parameter of this optimizer is on {device}")
        anchor = next((index for index in on_device if at[index].requires_grad), on_device[0])
        additions.setdefault(anchor, {})[prefix + "rng_state"] = generator_state
    for index, keys in additions.items():
        entry_of(index).update(keys)

    groups = [_group(group, index, chain, param_groups) for index, group in enumerate(rest["param_groups"])]
    return {**rest, "state": state, "param_groups": groups}


def _kind(value: Any) -> str:
    """``"a tuple of dict, int"``: a value's type and its items' types (a message names them)."""
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {', '.join(sorted({type(item).__name__ for item in value})) or 'nothing'}"
    return f"a {type(value).__name__}"


def _generators(entry: Mapping[str, Any], position: int) -> dict[str, tuple[torch.device, Any]]:
    """0.1.0's LAMP entry ``{"generators": {str(device): state}}`` as ``{key: (device, state)}``."""
    unknown = [key for key in entry if key != "generators"]
    if unknown:
        raise _Refusal(f"its 'transforms'[{position}] (LAMP's) holds {unknown}, not only 'generators'")
    generators = entry.get("generators", {})
    if not isinstance(generators, Mapping):
        raise _Refusal(f"its LAMP's 'generators' is a {type(generators).__name__}, not a dict")
    devices = {}
    for key, generator_state in generators.items():
        try:
            device = torch.device(key)
        except (RuntimeError, TypeError, ValueError):
            raise _Refusal(f"its LAMP's 'generators' has the key {key!r}, which names no device") from None
        if not isinstance(generator_state, torch.Tensor):
            raise _Refusal(f"its LAMP's generator state for device {key!r} is {type(generator_state).__name__}, not a tensor")
        devices[key] = (device, generator_state)
    return devices


def _params(rest: Mapping[str, Any], param_groups: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[torch.Tensor]]:
    """The checkpoint's parameter indices and this optimizer's parameters, paired in order."""
    try:
        indices = [index for group in rest["param_groups"] for index in group["params"]]
    except (KeyError, TypeError):
        raise _Refusal("its param_groups do not list the parameters' indices") from None
    params = [param for group in param_groups for param in group["params"]]
    saved_sizes = [len(group["params"]) for group in rest["param_groups"]]
    sizes = [len(group["params"]) for group in param_groups]
    if saved_sizes != sizes:
        raise _Refusal(f"its param groups hold {saved_sizes} parameters, this optimizer's {sizes}")
    return indices, params


def _group(saved: Any, index: int, chain: Chain, param_groups: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A 0.1.0 group recording ``chain``, completed as a plain inner optimizer's checkpoint's
    group is (:meth:`~samgria.transforms.chain.Chain.take_unrecorded_group`)."""
    if not isinstance(saved, Mapping):
        raise _Refusal(f"its param_groups[{index}] is a {type(saved).__name__}, not a dict")
    if CHAIN_KEY in saved:
        raise _Refusal(f"its param_groups[{index}] already records a chain ({CHAIN_KEY!r})")
    group = dict(saved)
    chain.take_unrecorded_group(group, index, param_groups)
    group[CHAIN_KEY] = chain.spec()
    return group
