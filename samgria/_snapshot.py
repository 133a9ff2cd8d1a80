"""``StepSnapshot``: what a step may change, copied so that a failed step can be undone exactly."""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch

__all__ = ["GroupValues", "SlotValues", "StepSnapshot", "StateStructure", "is_entry"]


def is_entry(value: Any) -> bool:
    """Whether a value of an optimizer's ``state`` is a parameter's entry (a dict, or a view of
    one) rather than a value an optimizer keeps under a key of its own (torch's state takes any
    value: MADGRAD keeps a tensor counter under ``"k"``)."""
    return type(value) is dict or isinstance(value, Mapping)


class StateStructure:
    """The keys of every state entry and the objects under them: restorable without copies.

    Undoes what an optimizer that raises *before* it writes into a tensor may still have done: add
    entries or keys (torch's Adam initialises the state of the parameters before a bad one), or
    replace a value by a new object.
    """

    def __init__(self, state: MutableMapping[Any, dict[Any, Any]]) -> None:
        self._state = state
        # A list, not a dict by parameter: taken on every step, and hashing a tensor is a Python
        # call. A value that is not an entry (a driven optimizer's own counter under a key of its
        # own, which torch's state allows) is kept as the object itself (``None`` for its keys).
        self._entries = [
            (param, entry, dict(entry) if is_entry(entry) else None)
            for param, entry in state.items()
        ]

    def restore(self) -> None:
        _drop_new_entries(self._state, {id(param) for param, _, _ in self._entries})
        for param, original, saved in self._entries:
            if saved is None:
                self._state[param] = original
                continue
            entry = self._state[param]
            if not is_entry(entry):  # the step put a value where the entry was
                self._state[param] = entry = original
            entry.clear()
            entry.update(saved)


class SlotValues:
    """The objects under some transforms' slots (keys ``"<slot>.<key>"``) in every state entry:
    restorable without copies, slot by slot, leaving every other key as it is then.

    Undoes what transforms that assign new state objects before the inner step
    (``saves_state_before_step``) wrote, where the rest of the step's state writes must stay.
    """

    def __init__(self, state: MutableMapping[Any, dict[Any, Any]], slots: Sequence[str]) -> None:
        self._state = state
        self._prefixes = tuple(slot + "." for slot in slots)
        self._entries = [
            (param, {key: value for key, value in entry.items() if self._owned(key, self._prefixes)})
            for param, entry in state.items()
            if is_entry(entry)
        ]

    @staticmethod
    def _owned(key: Any, prefixes: tuple[str, ...]) -> bool:
        return isinstance(key, str) and key.startswith(prefixes)

    def restore(self, slots: Sequence[str]) -> None:
        """Put back what ``slots`` (a subset of those taken) held: their keys written since are
        removed (with an entry that holds nothing else and was not there), their values restored."""
        prefixes = tuple(slot + "." for slot in slots)
        if not prefixes:
            return
        saved = {id(param): values for param, values in self._entries}
        for param, entry in list(self._state.items()):
            if not is_entry(entry):
                continue
            for key in [key for key in entry if self._owned(key, prefixes)]:
                del entry[key]
            if not entry and id(param) not in saved:
                del self._state[param]
        for param, values in self._entries:
            self._state[param].update({key: value for key, value in values.items() if self._owned(key, prefixes)})


#: Wrapper subclasses (``__tensor_flatten__``) found to implement no ``clone``: quantized
#: optimizer states such as torchao's ``OptimState8bit`` (``AdamW8bit``'s), copied part by part.
_COPIED_BY_PARTS: set[type] = set()


def _copy_parts(value: torch.Tensor) -> torch.Tensor:
    names, context = value.__tensor_flatten__()  # type: ignore[attr-defined]
    inner = {name: copy_tensor(getattr(value, name)) for name in names}
    return type(value).__tensor_unflatten__(inner, context, value.size(), value.stride())  # type: ignore[attr-defined]


def copy_tensor(value: torch.Tensor) -> torch.Tensor:
    """A copy of ``value`` that :func:`write_back` restores bit for bit: ``clone()``, or for a
    wrapper subclass that implements no ``clone`` (a quantized optimizer state: torchao's
    ``OptimState8bit``) one rebuilt around copies of its inner tensors."""
    if type(value) in _COPIED_BY_PARTS:
        return _copy_parts(value)
    try:
        return value.detach().clone()
    except NotImplementedError:
        # A wrapper subclass (the public __tensor_flatten__ / __tensor_unflatten__ protocol of
        # torch's subclasses, not torch's private is_traceable_wrapper_subclass) whose inner
        # parts are all tensors (not a DTensor, whose parts hold a DeviceMesh).
        wrapper = callable(getattr(type(value), "__tensor_flatten__", None)) and callable(
            getattr(type(value), "__tensor_unflatten__", None)
        )
        if not (wrapper and all(
            isinstance(getattr(value, name), torch.Tensor) for name in value.__tensor_flatten__()[0]  # type: ignore[attr-defined]
        )):
            raise
        _COPIED_BY_PARTS.add(type(value))
        return _copy_parts(value)


def _fits(original: torch.Tensor, kept: torch.Tensor) -> bool:
    if type(original) in _COPIED_BY_PARTS:
        names = original.__tensor_flatten__()[0]  # type: ignore[attr-defined]
        return (
            type(kept) is type(original)
            and names == kept.__tensor_flatten__()[0]  # type: ignore[attr-defined]
            and all(_fits(getattr(original, name), getattr(kept, name)) for name in names)
        )
    return original.shape == kept.shape


def _write(original: torch.Tensor, kept: torch.Tensor) -> None:
    if type(original) in _COPIED_BY_PARTS:
        for name in original.__tensor_flatten__()[0]:  # type: ignore[attr-defined]
            _write(getattr(original, name), getattr(kept, name))
    else:
        original.copy_(kept)


@torch.no_grad()
def write_back(original: torch.Tensor, kept: torch.Tensor) -> bool:
    """Write ``kept`` (from :func:`copy_tensor`) back into ``original`` in place (a tensor copied
    part by part: its inner tensors one by one); ``False``, writing nothing, when ``original`` no
    longer fits it (resized out of place)."""
    if not _fits(original, kept):
        return False
    _write(original, kept)
    return True


class GroupValues:
    """Every param group's values but ``params``, restorable: an optimizer may keep counters in
    its groups (``group["step"] += 1``, as timm's and pytorch-optimizer's do) and fail after."""

    def __init__(self, groups: Sequence[dict[str, Any]]) -> None:
        self._saved = [
            (group, {key: (value, copy_tensor(value) if isinstance(value, torch.Tensor) else value)
                     for key, value in group.items() if key != "params"})
            for group in groups
        ]

    def restore(self) -> None:
        for group, saved in self._saved:
            for key in [key for key in group if key != "params" and key not in saved]:
                del group[key]
            for key, (original, kept) in saved.items():
                if isinstance(original, torch.Tensor):
                    write_back(original, kept)  # a tensor counter raised in place
                group[key] = original


class AttributeValues:
    """A driven optimizer's instance attributes (a TransformingOptimizer's inner one, a
    MetaOptimizer's outer one), restorable: one that is not torch's may keep a counter there
    (pytorch_optimizer's StableSPAM ``total_step``, Ranger21 ``lookahead_step``, both in its
    checkpoints) and change it in a step that fails after. References are put back, attributes
    added since deleted, and a tensor's values written back in place."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._attributes = vars(optimizer)
        self._saved = {
            key: (value, copy_tensor(value) if isinstance(value, torch.Tensor) and value.layout == torch.strided else None)
            for key, value in self._attributes.items()
        }

    def restore(self) -> None:
        for key in [key for key in self._attributes if key not in self._saved]:
            del self._attributes[key]
        for key, (original, kept) in self._saved.items():
            if kept is not None:
                write_back(original, kept)
            self._attributes[key] = original


class ValuesOutsideState:
    """What a driven optimizer that is not one of torch.optim's own may change outside its state
    in a step that fails after: its param groups' values (:class:`GroupValues`) and its instance
    attributes (:class:`AttributeValues`), restorable together (torch's keep nothing there)."""

    def __init__(self, groups: Sequence[dict[str, Any]], optimizer: torch.optim.Optimizer) -> None:
        self._groups = GroupValues(groups)
        self._attributes = AttributeValues(optimizer)

    def restore(self) -> None:
        self._groups.restore()
        self._attributes.restore()


def _drop_new_entries(state: MutableMapping[Any, dict[Any, Any]], kept_ids: set[int]) -> None:
    """Delete the entries of parameters whose ``id`` is not in ``kept_ids``."""
    for param in list(state):
        if id(param) not in kept_ids:
            del state[param]


def _same_layout(buffer: torch.Tensor, param: torch.Tensor) -> bool:
    return (
        buffer.dtype == param.dtype
        and buffer.device == param.device
        and buffer.shape == param.shape
        and buffer.stride() == param.stride()
    )


class StepSnapshot:
    """Copies of the weights and of every optimizer-state entry, restorable bit for bit.

    :meth:`restore` writes the copies back *in place* into the original tensors (so references
    held elsewhere stay valid), removes state entries created since, and puts back the original
    keys and non-tensor values (counters).

    Args:
        params: The parameters whose values may change.
        state: The optimizer's ``state`` (parameter -> dict).
        spare_buffers: Free memory laid out like a parameter, by ``id(param)`` (e.g. the buffer
            that held SAM's perturbed weights): the weights are copied into it, not into new memory.
        only_params_state: Copy the state entries of ``params`` only; of every other entry keep
            the keys and objects (as :class:`StateStructure`): for a step that can write into
            nothing else before it raises.
        copy_state: ``False`` copies no state tensor (every entry as :class:`StateStructure`):
            for a phase that writes into the weights but only assigns new state objects.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        state: MutableMapping[Any, dict[Any, Any]],
        spare_buffers: Mapping[int, torch.Tensor] | None = None,
        *,
        only_params_state: bool = False,
        copy_state: bool = True,
    ) -> None:
        self._params = list(params)
        self._state = state
        spare_buffers = spare_buffers or {}
        copied = {id(param) for param in self._params} if only_params_state else None
        if not copy_state:
            copied = set()
        self._structure = StateStructure(state)  # every entry's keys and objects; new entries dropped
        with torch.no_grad():
            self._weights = []
            for param in self._params:
                buffer = spare_buffers.get(id(param))
                if buffer is not None and _same_layout(buffer, param):
                    self._weights.append(buffer.copy_(param))  # free memory: no allocation
                else:
                    self._weights.append(param.detach().clone())
            self._entries: dict[Any, dict[Any, tuple[Any, Any]]] = {}
            self._values: list[tuple[Any, Any, Any]] = []  # values under keys of their own
            for param, entry in state.items():
                if not is_entry(entry):
                    # A value the driven optimizer keeps beside the entries (a tensor counter, a
                    # list it appends to): small, and any step of it may change it in place.
                    if copy_state:
                        kept = copy_tensor(entry) if isinstance(entry, torch.Tensor) else copy.deepcopy(entry)
                        self._values.append((param, entry, kept))
                    continue
                if copied is not None and id(param) not in copied:
                    continue
                saved = {}
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor):
                        saved[key] = (value, copy_tensor(value))
                    else:
                        saved[key] = (value, copy.deepcopy(value))
                self._entries[param] = saved

    @torch.no_grad()
    def restore(self) -> None:
        """Put the weights and the state back as they were when the snapshot was taken."""
        for param, weight in zip(self._params, self._weights):
            param.copy_(weight)
        self._structure.restore()
        # A tensor is written back into the original object, which the structure put back; a
        # value, or a tensor the step resized out of place, is replaced by the kept copy.
        for key, original, kept in self._values:
            if not (isinstance(original, torch.Tensor) and write_back(original, kept)):
                self._state[key] = kept
        for param, saved in self._entries.items():
            entry = self._state[param]
            for key, (original, kept) in saved.items():
                if not (isinstance(original, torch.Tensor) and write_back(original, kept)):
                    entry[key] = kept
