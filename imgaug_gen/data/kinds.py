"""Data kinds: how a run records the data it trained on, as data.

A generator folder records its training data as ``{"kind": "folder", "args": {...}}``: a registered
data kind (the built-in ``digits`` and ``folder``, or a plug-in's, declared under the entry-point
group ``imgaug_gen.data`` as generator kinds are) and its constructor arguments. ``generate.py``
rebuilds the data from that record with :func:`build_data`: the kind is looked up by name, the
arguments are checked against the class's annotated constructor, and nothing named in the file is
ever imported or called (a generator folder is untrusted input). Hydra's ``_target_`` stays a
feature of the user's own command-line configs.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from imgaug_gen.errors import ConfigError
from imgaug_gen.registry import KindRegistry

log = logging.getLogger(__name__)

#: Package entry-point group naming each data kind's class (``kind = "module:Class"``).
ENTRY_POINT_GROUP = "imgaug_gen.data"
KINDS = KindRegistry(ENTRY_POINT_GROUP, "data_kind", "data kind", "register_data_kind")


def register_data_kind(kind: str):
    """Class decorator: the data module class recorded (and rebuilt) as ``kind``."""
    return KINDS.register(kind)


def data_kind_class(kind: Any, key: str = "data.kind") -> type:
    """The class of data kind ``kind``: registered in this process or declared by an installed package."""
    if isinstance(kind, str) and kind not in KINDS.classes:
        import imgaug_gen.data  # noqa: F401  (registers the built-in kinds)
    return KINDS.get(kind, key)


def data_record(dm) -> dict | None:
    """What a run records of its data module: ``{"kind", "args"}``, or None for a class that is not
    a registered data kind (then ``generate.py`` needs ``data=...`` on its command line)."""
    kind = getattr(type(dm), "data_kind", None)
    if kind is None or KINDS.classes.get(kind) is not type(dm):
        log.warning(
            "%s is not a registered data kind (@register_data_kind): the generator records no data, so "
            "generate.py will need `data=...`.",
            type(dm).__name__,
        )
        return None
    return {"kind": kind, "args": dm.record_args()}


def build_data(record: Any, key: str = "data"):
    """A data module from a recorded ``{"kind", "args"}`` (checked; never a call target)."""
    from imgaug_gen.schemas import check_args

    if not isinstance(record, Mapping) or set(record) != {"kind", "args"} or not isinstance(record["args"], Mapping):
        raise ConfigError(
            f"`{key}` = {record!r}; expected {{'kind': <data kind>, 'args': {{...}}}} as written by "
            "train.py. Pass `data=...` to generate.py to give the data explicitly."
        )
    cls = data_kind_class(record["kind"], f"{key}.kind")
    args = dict(record["args"])
    check_args(cls, f"{key}.args", args)
    return cls(**args)
