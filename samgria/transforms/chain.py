"""``Chain``: the transforms of one optimizer, each in its own slot, and their param-group keys.

Like optax's ``chain``/``named_chain``, each transform owns one slot, named after it (``"sam"``,
``"lamp"``; a second transform of the same kind gets ``"lamp_1"``) or by you
(``transforms={"fast": LAMP(...), "slow": LAMP(...)}``). The same transform class can therefore
appear more than once, and nothing collides.

Param-group keys of a transform's hyperparameter ``h`` in slot ``s``:

* The *qualified* key ``"s.h"`` (``"sam.rho"``) always names it, in constructor groups,
  ``add_param_group`` and ``param_groups`` edits alike.
* The *short* key ``"h"`` (``"rho"``) names it too when it is unambiguous: no other transform of
  the chain has a hyperparameter ``h`` and the inner optimizer has no key ``h``. The groups then
  store it under the short key, as before — ``{"params": ..., "rho": 0.0}`` and
  ``group["rho"] = ...`` from a scheduler keep working.
* Otherwise the groups store it under the qualified key only: with ``torch.optim.Adadelta``
  (whose ``rho`` is its own), ``"rho"`` is Adadelta's and SAM's is ``"sam.rho"``; with two LAMPs,
  ``"lamp.eps"`` and ``"lamp_1.eps"``. A short key that two transforms share is refused with a
  message naming the qualified keys.

Every group also records the chain under ``"transform_chain"`` (slot names, transform types and
their constructor-only settings), the one piece of metadata that travels with a checkpoint
through ``torch.distributed.checkpoint``; loading a checkpoint made by another chain raises.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from samgria.functional._sharding import is_fsdp1_flattened, is_sharded
from samgria.transforms.base import (
    GradientTransform,
    ProtocolTransform,
    Transform,
    default_slot_name,
    transform_name,
)

__all__: list[str] = []

#: The param-group key recording the chain that the group's hyperparameters belong to.
CHAIN_KEY = "transform_chain"

_SLOT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: "$" would let a trailing newline in
#: What ``_SLOT_NAME`` accepts, in words (``str.isidentifier`` also takes non-ASCII letters).
_SLOT_RULE = "ASCII letters, digits and underscores, not starting with a digit"


def _as_transform(where: str, transform: Any) -> Transform:
    if isinstance(transform, Transform):
        return transform
    if isinstance(transform, type):
        raise TypeError(
            f"{where} must be a transform instance, got the class {transform.__name__} "
            f"(e.g. {transform.__name__}())"
        )
    if isinstance(transform, GradientTransform):
        return ProtocolTransform(transform)
    raise TypeError(
        f"{where} must be a samgria Transform or an object with apply(model, loss_fn, batch) and "
        f"post_step(model) methods, got {transform!r}"
    )


def _class_names(cls: type, below: type) -> set[str]:
    """The lowercase names of ``cls`` and of its public bases that are subclasses of ``below``
    (not ``below`` itself), with a transform class's slot name (snake case, or its own ``slot_name``
    when that is a string)."""
    names = set()
    for klass in cls.__mro__:
        if klass is below or not issubclass(klass, below) or klass.__name__.startswith("_"):
            continue
        names.add(klass.__name__.lower())
        if issubclass(klass, Transform):
            slot_name = klass.__dict__.get("slot_name")
            names.add(slot_name.lower() if isinstance(slot_name, str) else default_slot_name(klass))
    return names


_LIBRARY_NAMES: frozenset[str] | None = None


def _library_names() -> frozenset[str]:
    """The names (:func:`_class_names`) of ``torch.optim``'s optimizers and samgria's transforms.

    A fixed list, not the classes the process happens to have defined: a checkpoint accepted
    where it was saved must load wherever the same chain is built.
    """
    global _LIBRARY_NAMES
    if _LIBRARY_NAMES is None:
        import samgria.transforms as transforms  # the package imports this module

        names: set[str] = set()
        for module, base in ((torch.optim, torch.optim.Optimizer), (transforms, Transform)):
            for attribute in getattr(module, "__all__", ()):
                cls = getattr(module, attribute, None)
                if isinstance(cls, type) and issubclass(cls, base):
                    names |= _class_names(cls, base)
        _LIBRARY_NAMES = frozenset(names)
    return _LIBRARY_NAMES


def _renamed(error: TypeError | ValueError, message: str) -> TypeError | ValueError:
    """``error``'s class with ``message``; a plain ``TypeError`` / ``ValueError`` when that class
    cannot be built from a message alone (a user's ``HyperparameterError(key, value)``) or would
    show another."""
    plain = TypeError if isinstance(error, TypeError) else ValueError
    try:
        renamed = type(error)(message)
    except Exception:  # noqa: BLE001 - any constructor that does not take one message
        return plain(message)
    return renamed if str(renamed) == message else plain(message)


#: The words torch's, timm's and AllenNLP's schedulers put before a key they record beside the one
#: they schedule ("initial_lr", OneCycleLR's "max_lr"/"min_lr"/"base_momentum", CyclicLR's "base_lr").
_SCHEDULER_WORDS = ("initial", "base", "max", "min")


class Chain:
    """The slots of one optimizer and how their hyperparameters map onto param-group keys.

    Args:
        transforms: A transform, a sequence of transforms (slots named automatically) or a
            mapping ``{slot_name: transform}``.
        inner_keys: The inner optimizer's param-group keys (its ``defaults``).
        inner_type: The inner optimizer's class: its name, like a ``torch.optim`` optimizer's,
            is no misspelt slot (``"lamb.eps"`` beside a LAMP, with a ``Lamb`` inner optimizer).

    Raises:
        TypeError: A transform is neither a :class:`Transform` nor a ``GradientTransform``.
        ValueError: A slot name (given, or a transform's ``slot_name``) is not an identifier of
            ASCII letters, digits and underscores, or is used twice.
    """

    #: The names of the inner optimizer's class and bases (:func:`_class_names`); empty for a
    #: chain pickled before they were recorded.
    inner_names: frozenset[str] = frozenset()

    def __init__(self, transforms: Any, inner_keys: Iterable[str], inner_type: type | None = None) -> None:
        self.slots: list[str] = []
        self.transforms: list[Transform] = []
        if isinstance(transforms, Mapping):
            for name, transform in transforms.items():
                if not isinstance(name, str) or not _SLOT_NAME.fullmatch(name):
                    raise ValueError(f"transforms slot names must be identifiers, got {name!r} ({_SLOT_RULE})")
                self._add(name, _as_transform(f"transforms[{name!r}]", transform))
        else:
            if isinstance(transforms, (Transform, GradientTransform)) and not isinstance(transforms, (list, tuple)):
                transforms = [transforms]
            if isinstance(transforms, (str, bytes)) or not isinstance(transforms, Iterable):
                raise TypeError(f"transforms must be a sequence or mapping of transforms, got {transforms!r}")
            for index, transform in enumerate(transforms):
                transform = _as_transform(f"transforms[{index}]", transform)
                base = transform.default_slot()
                if not isinstance(base, str) or not _SLOT_NAME.fullmatch(base):
                    owner = transform.transform if isinstance(transform, ProtocolTransform) else transform
                    raise ValueError(
                        f"transforms slot names must be identifiers, got {base!r}, the slot name of "
                        f"transforms[{index}] ({type(owner).__name__}): set its slot_name to {_SLOT_RULE}, "
                        "or name its slot with transforms={'name': ...}"
                    )
                name, suffix = base, 0
                while name in self.slots:
                    suffix += 1
                    name = f"{base}_{suffix}"
                self._add(name, transform)
        self._slot_set = frozenset(self.slots)
        self._hidden_keys: dict[Any, bool] = {}
        self._visible_keys: set[Any] = set()  # keys hides() answered False for
        self._spec: tuple[str, ...] | None = None
        self.inner_keys = frozenset(inner_keys)
        if inner_type is not None:
            self.record_inner_type(inner_type)
        self._resolve_keys()

    def _add(self, name: str, transform: Transform) -> None:
        if name in self.slots:
            raise ValueError(f"transforms slot name {name!r} is used twice")
        self.slots.append(name)
        self.transforms.append(transform)

    def _resolve_keys(self) -> None:
        owners: dict[str, list[str]] = {}
        for slot, transform in zip(self.slots, self.transforms):
            for short in transform.group_defaults():
                owners.setdefault(short, []).append(slot)
        #: slot -> {short name: stored group key}
        self.keys: dict[str, dict[str, str]] = {}
        #: stored group key -> default value
        self.defaults: dict[str, Any] = {}
        #: qualified key -> stored key (for input normalisation)
        self._qualified: dict[str, str] = {}
        #: short key shared by several transforms -> their qualified keys
        self._ambiguous: dict[str, list[str]] = {}
        #: qualified keys whose hyperparameter the groups store under the short key
        self._aliases: set[str] = set()
        for slot, transform in zip(self.slots, self.transforms):
            keys = {}
            for short, value in transform.group_defaults().items():
                qualified = f"{slot}.{short}"
                unambiguous = len(owners[short]) == 1 and short not in self.inner_keys and short != "params"
                stored = short if unambiguous else qualified
                keys[short] = stored
                self.defaults[stored] = value
                self._qualified[qualified] = stored
                if stored != qualified:
                    self._aliases.add(qualified)
                if len(owners[short]) > 1 and short not in self.inner_keys:
                    self._ambiguous[short] = [f"{s}.{short}" for s in owners[short]]
            self.keys[slot] = keys
        #: hyperparameter name -> the slots that have it
        self._owners = owners

    # -- what the optimizer asks -----------------------------------------------------------------
    def __iter__(self):
        return iter(zip(self.slots, self.transforms))

    def __len__(self) -> int:
        return len(self.slots)

    def spec(self) -> tuple[str, ...]:
        """``("sam=SAM()", "lamp=LAMP(rollback_len=10, seed=0)")``: what a checkpoint records.

        Fixed when the chain is built (settings are constructor-only).
        """
        if self._spec is None:
            self._spec = tuple(f"{slot}={transform.describe()}" for slot, transform in self)
        return self._spec

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_visible_keys", set())  # a Chain pickled by an earlier release

    def hides(self, key: Any) -> bool:
        """Whether a ``state[p]`` key belongs to a slot (``"<slot>.<key>"``)."""
        try:
            return self._hidden_keys[key]
        except KeyError:
            hidden = isinstance(key, str) and "." in key and key.partition(".")[0] in self._slot_set
            self._hidden_keys[key] = hidden
            if not hidden:
                self._visible_keys.add(key)
            return hidden
        except TypeError:  # an unhashable key
            return False

    @property
    def visible_keys(self) -> set[Any]:
        """The keys :meth:`hides` answered ``False`` for so far (a live set, grown by :meth:`hides`)."""
        return self._visible_keys

    def hides_any(self, keys: Iterable[Any]) -> bool:
        """Whether any of ``keys`` (e.g. a ``state[p]`` entry) belongs to a slot.

        The inner optimizer reads ``state[p]`` for every parameter on every step: an entry with
        only keys seen before as the inner optimizer's (``momentum_buffer``, ``exp_avg``) is
        answered by one set comparison.
        """
        try:
            if self._visible_keys.issuperset(keys):
                return False
        except TypeError:  # an unhashable key
            pass
        return any(map(self.hides, keys))

    def normalize_group(self, group: dict[str, Any], where: str) -> None:
        """Rewrite a user's group in place: qualified keys to stored keys; refuse ambiguous keys.

        Raises:
            ValueError: A short key is shared by two transforms, or a key is given both short and
                qualified with different values.
        """
        self._refuse_ambiguous(group, where)
        for key in list(group):
            stored = self._qualified.get(key)
            if stored is not None and stored != key:
                value = group.pop(key)
                if stored in group and group[stored] != value:
                    raise ValueError(
                        f"{where} sets {key!r}={value!r} and {stored!r}={group[stored]!r}, which "
                        "name the same hyperparameter"
                    )
                group[stored] = value

    def record_inner_type(self, inner_type: type) -> None:
        """Record the inner optimizer's class: its names are no misspelt slot (:attr:`inner_names`)."""
        self.inner_names = frozenset(_class_names(inner_type, torch.optim.Optimizer))
        self.__dict__.pop("_slot_verdicts", None)

    def stored_key(self, key: Any) -> Any:
        """The key under which the groups store what ``key`` names (``"rho"`` for ``"sam.rho"``
        when that is unambiguous); any other key as it is."""
        return self._qualified.get(key, key) if isinstance(key, str) else key

    def _refuse_ambiguous(self, group: Mapping[str, Any], where: str) -> None:
        """Raise ``ValueError`` if ``group`` has a short key that several transforms share, or a
        qualified key that names no hyperparameter of the chain (:meth:`_refuse_unknown_qualified`)."""
        self._refuse_unknown_qualified(group, where)
        if not self._ambiguous or self._ambiguous.keys().isdisjoint(group):
            return
        key = next(key for key in group if key in self._ambiguous)
        raise ValueError(
            f"{where}: the key {key!r} is a hyperparameter of several transforms; write "
            + " or ".join(repr(k) for k in self._ambiguous[key])
        )

    def _refuse_unknown_qualified(self, group: Mapping[str, Any], where: str) -> None:
        """Raise ``ValueError`` for a key ``"s.h"`` that names no hyperparameter of the chain
        although it looks like one: ``s`` is a slot (case aside) without a hyperparameter ``h``
        (``"sam.lr"``, ``"SAM.Rho"``), or ``h`` is, case aside, a transform's hyperparameter and
        ``s`` names one of the chain's transforms by another name than its slot, or is close to
        a name of one that has ``h`` (its slot, default slot or class name: ``"looksam.alpha"``
        for ``"look_sam.alpha"``, ``"sam.rho"`` for a slot named ``perturb``;
        :func:`difflib.get_close_matches`) and names no other of samgria's transforms or
        torch.optim's optimizers, nor the inner optimizer's class (``"lookahead.alpha"`` beside
        a LookSAM, ``"adam.eps"``). Such a key would be
        stored and never read, the transform keeping its default. Other keys (``"mylib.rho"``)
        are left alone, as torch leaves keys it does not know, and so is a key a scheduler builds
        from a qualified one (``"initial_grad_ema.beta"``, see :meth:`_close_to_own_name`)."""
        for key in group:
            if type(key) is not str or "." not in key or key in self._qualified:
                continue
            prefix, _, short = key.partition(".")
            slot = self._slot_named(prefix)
            owned = next((name for name in self._owners if name.lower() == short.lower()), None)
            if slot is not None and (slot == prefix or owned is None):
                transform = self.transforms[self.slots.index(slot)]
                known = ", ".join(repr(name) for name in self.keys[slot]) or "none"
                raise ValueError(
                    f"{where}: the key {key!r} names no hyperparameter of slot {slot!r} "
                    f"({type(transform).__name__}), whose hyperparameters are: {known}"
                )
            if owned is not None and (slot is not None or self._names_a_slot(prefix, owned)):
                spellings = [f"{owner}.{owned}" for owner in self._owners[owned]]
                if owned in self.defaults:  # stored under the short key: unambiguous
                    spellings.insert(0, owned)
                raise ValueError(
                    f"{where}: the key {key!r} names no slot of the chain (slots: "
                    f"{', '.join(repr(slot) for slot in self.slots)}); write "
                    + " or ".join(repr(spelling) for spelling in spellings)
                )

    def _slot_named(self, prefix: str) -> str | None:
        """The slot ``prefix`` names, case aside, or ``None``."""
        return next((slot for slot in self.slots if slot.lower() == prefix.lower()), None)

    def _names_a_slot(self, prefix: str, hyperparameter: str) -> bool:
        """Whether ``prefix`` names, case aside, one of the chain's transforms (its default slot,
        class name or a base class's), or is close to a name of one that has ``hyperparameter``
        and names no other of ``torch.optim``'s optimizers or samgria's transforms, nor the
        inner optimizer's class (``"swa.decay"`` beside a SAM and an EMA is kept: close to
        "sam", whose transform has no ``decay``)."""
        verdicts = self.__dict__.setdefault("_slot_verdicts", {})  # fixed per chain: see below
        lowered = prefix.lower()
        if (lowered, hyperparameter) not in verdicts:
            verdicts[lowered, hyperparameter] = self._close_to_own_name(lowered, hyperparameter)
        return verdicts[lowered, hyperparameter]

    @staticmethod
    def _names_of(transform: Transform) -> set[str]:
        """The lowercase names of a transform of the chain: its class's and bases', its default
        slot and (seed protocol) the wrapped object's class name."""
        names = _class_names(type(transform), Transform)
        if isinstance(transform, ProtocolTransform):  # the seed-protocol object's class
            names.add(type(transform.transform).__name__.lower())
        slot = transform.default_slot()
        if isinstance(slot, str):  # a seed-protocol object's slot_name may be anything
            names.add(slot.lower())
        return names

    def _close_to_own_name(self, lowered: str, hyperparameter: str) -> bool:
        """:meth:`_names_a_slot`, worked out (the names it compares are the chain's and a fixed
        list, so the verdict holds for the chain's life)."""
        every: set[str] = set()
        owning = {slot.lower() for slot in self._owners[hyperparameter]}
        for slot, transform in zip(self.slots, self.transforms):
            names = self._names_of(transform)
            every |= names
            if slot in self._owners[hyperparameter]:
                owning |= names
        if lowered in every:  # a transform of the chain, by a name that is not its slot
            return True
        if lowered in _library_names() or lowered in self.inner_names:
            return False
        if any(f"{word}_{slot.lower()}" == lowered for word in _SCHEDULER_WORDS for slot in self._owners[hyperparameter]):
            # a scheduler's record of the qualified key it schedules (timm's and AllenNLP's
            # "initial_grad_ema.beta", as torch's "initial_lr"), not a misspelt slot
            return False
        return bool(difflib.get_close_matches(lowered, sorted(owning), n=1, cutoff=0.6))

    def take_qualified_edits(self, group: dict[str, Any], where: str) -> None:
        """Apply ``param_groups`` edits made under a qualified key to a filled group.

        A group stores a hyperparameter under its short key when that is unambiguous; a value
        written since under the qualified key (``group["sam.rho"] = 0.0`` beside the stored
        ``"rho"``) is the newer one: it replaces the stored value and the qualified key is
        removed. Checked before the group changes. A short key that several transforms share
        (``group["rho"] = 0.0`` with SAM and ASAM in the chain) is refused, as in the
        constructor, rather than stored and never read.

        Raises:
            ValueError: If an edited value is invalid, or a short key names the hyperparameters
                of several transforms (the group is left as it was).
        """
        self._refuse_ambiguous(group, where)
        if self._aliases.isdisjoint(group):
            return
        candidate = dict(group)
        for key in self._aliases.intersection(group):
            candidate[self._qualified[key]] = candidate.pop(key)
        self.validate_group(candidate, where)
        group.clear()
        group.update(candidate)

    def checked_group(self, group: Mapping[str, Any], where: str) -> dict[str, Any]:
        """A user's group normalised (see :meth:`normalize_group`) and checked as it will be once
        the defaults are filled in; the group itself is not changed."""
        candidate = dict(group)
        params = candidate.get("params")
        if isinstance(params, torch.Tensor):  # as torch's add_param_group: one tensor, or an iterable
            candidate["params"] = [params]
        elif params is not None and not isinstance(params, (list, tuple, set)):
            candidate["params"] = list(params)  # a generator is read once, here
        self.normalize_group(candidate, where)
        self.validate_group({**self.defaults, **candidate}, where)
        self.check_sharding(candidate.get("params", ()), where)
        return candidate

    def check_sharding(self, params: Any, where: str) -> None:
        """Raise ``ValueError`` when sharded (``DTensor``) parameters meet a transform that would
        compute a per-tensor quantity on one shard only, and any transform with FSDP1's flattened
        parameters (:meth:`check_fsdp1`)."""
        self.check_fsdp1(params, where)
        if not any(is_sharded(param) for param in params):
            return
        for slot, transform in self:
            if not transform.supports_sharded_params:
                raise ValueError(
                    f"{where}: {transform_name(transform)} (slot {slot!r}) does not support sharded "
                    "(DTensor) parameters such as FSDP2's: it would take per-tensor quantities of each "
                    "rank's shard alone or keep per-rank state (Transform.supports_sharded_params); "
                    "use it on unsharded parameters (DDP)"
                )

    def check_fsdp1(self, params: Any, where: str) -> None:
        """Raise ``ValueError`` when FSDP1's flattened parameters meet any transform: no sharding
        metadata to reduce over, and weights gathered from the flat parameter. FSDP1 flattens the
        same parameters in place when it wraps the model after the optimizer was built, so the
        optimizer asks again at every step."""
        if self.transforms and any(is_fsdp1_flattened(param) for param in params):
            raise ValueError(
                f"{where}: the parameters are flattened by FSDP1 (FullyShardedDataParallel), whose "
                "per-rank pieces carry no sharding metadata: a transform would take norms of one "
                "rank's piece and SAM's perturbation would not reach the forward pass. Shard with "
                "FSDP2 (torch.distributed.fsdp.fully_shard), whose DTensor parameters the "
                "transforms support, or use DDP; with FSDP1 only transforms=() works"
            )

    def take_unrecorded_group(self, group: dict[str, Any], index: int, param_groups: Sequence[Mapping[str, Any]]) -> None:
        """Complete a checkpoint's group ``index`` that records no chain (a plain inner
        optimizer's, or release 0.1.0's): it keeps the transforms' hyperparameters it has, and
        takes those it lacks from the optimizer's group at its position (torch pairs groups by
        position), edits since the last step included -- a checkpoint without them says nothing
        about them (a group's ``rho=0`` stays 0). The optimizer's group is checked as its own.
        """
        self.normalize_group(group, f"the checkpoint's param_groups[{index}]")
        if index < len(param_groups):
            own = f"param_groups[{index}]"
            current = dict(param_groups[index])
            self.take_qualified_edits(current, own)
            self.validate_group({**self.defaults, **current}, own)
            for key in self.defaults:
                if key not in group and key in current:
                    group[key] = current[key]

    def fill_group(self, group: dict[str, Any]) -> None:
        """Give a group every hyperparameter it does not set (the constructor's values) and the chain."""
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        group[CHAIN_KEY] = self.spec()

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        """Check every transform's hyperparameters in a (filled) group; messages name the key."""
        for slot, transform in self:
            keys = self.keys[slot]
            view = {short: group[stored] for short, stored in keys.items()}
            if "param_ndim" in keys and "params" in group:  # its range depends on the parameters
                view["params"] = group["params"]
            try:
                transform.validate_group(view)
            except (TypeError, ValueError) as error:
                renamed = str(error)
                for short, stored in keys.items():
                    if stored != short:  # every mention of the key, not only the leading one
                        renamed = re.sub(rf"(?<![\w.'\"]){re.escape(short)}(?![\w.'\"])", stored, renamed)
                raise _renamed(error, f"{where}: {renamed}") from None

    def check_saved_spec(self, saved: Any) -> None:
        """Raise ``ValueError`` naming the first difference between a checkpoint's chain and this one."""
        ours = self.spec()
        saved = tuple(saved)
        if saved == ours:
            return
        for index in range(max(len(saved), len(ours))):
            theirs = saved[index] if index < len(saved) else "nothing"
            mine = ours[index] if index < len(ours) else "nothing"
            if theirs != mine:
                break
        raise ValueError(
            f"the checkpoint was made with the transform chain {list(saved)}, but this optimizer "
            f"has {list(ours)}: transform {index} is {theirs} in the checkpoint and {mine} here"
        )
