"""Out-of-tree registration of petl's adapter methods with peft.

peft's own ``register_peft_method`` only accepts names that already exist in peft's ``PeftType``
enum, so a third-party method cannot use it (INTEGRATION.md §1). peft >= 0.21 resolves a method
through four plain dicts keyed by the peft type; a ``str``-valued Enum member hashes like its
string, so ``"peft_type": "SOKA"`` in ``adapter_config.json`` finds the entry on load. This module
writes those entries and fails loudly on any clash, so two packages can never silently overwrite
each other's method.
"""
from __future__ import annotations

import enum

from peft import mapping as _peft_mapping
from peft.utils.peft_types import PeftType


class PetlType(str, enum.Enum):
    """peft types contributed by petl. Each member's value equals its name (peft looks up both)."""

    SOKA = "SOKA"
    AUDIO_ADAPTER = "AUDIO_ADAPTER"
    LAWCAT = "LAWCAT"


class RegistrationError(RuntimeError):
    """A petl method could not be registered with peft (name or prefix already taken)."""


def register_petl_method(peft_type: PetlType, config_cls: type, model_cls: type,
                         prefix: str | None = None) -> None:
    """Make ``peft_type`` usable by ``get_peft_model``, ``save_pretrained`` and ``from_pretrained``.

    Idempotent for the same classes (re-importing petl is harmless); raises
    :class:`RegistrationError` when the name, or the parameter prefix, belongs to another method.

    Args:
        peft_type (PetlType): the method's enum member.
        config_cls (type): its ``PeftConfig`` subclass.
        model_cls (type): its ``BaseTuner`` subclass; ``model_cls.prefix`` must equal ``prefix``.
        prefix (str, Optional): prefix of its parameter names. Default: ``name.lower() + "_"``.
    """
    if not isinstance(peft_type, PetlType):
        raise RegistrationError(f"peft type {peft_type!r} is not a PetlType member; add it to "
                                "petl.adapters.registration.PetlType first")
    prefix = prefix or peft_type.value.lower() + "_"
    if getattr(model_cls, "prefix", None) != prefix:
        raise RegistrationError(f"{model_cls.__name__}.prefix is {getattr(model_cls, 'prefix', None)!r}"
                                f" but {peft_type.value} registers prefix {prefix!r}; make them equal")
    if peft_type.value in PeftType.__members__:
        raise RegistrationError(f"peft itself now defines {peft_type.value}; petl's out-of-tree "
                                "method of that name would shadow it: rename petl's method")
    tables = {
        "config": (_peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING, config_cls),
        "tuner": (_peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING, model_cls),
        "prefix": (_peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING, prefix),
    }
    for what, (table, value) in tables.items():
        existing = table.get(peft_type)
        if existing is not None and existing != value and _qualname(existing) != _qualname(value):
            raise RegistrationError(f"peft type {peft_type.value} already has a {what} "
                                    f"{existing!r}; refusing to replace it with {value!r}")
    for other_type, other_prefix in _peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_prefix == prefix and other_type != peft_type:
            raise RegistrationError(f"parameter prefix {prefix!r} of {peft_type.value} is already "
                                    f"used by {other_type}; choose another prefix")
    for table, value in tables.values():
        table[peft_type] = value


def _qualname(obj: object) -> str:
    # Reloading a module (e.g. in a notebook) creates new class objects with the same name; treat
    # those as the same registration rather than a clash.
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    return repr(obj)
