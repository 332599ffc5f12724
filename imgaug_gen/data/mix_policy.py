"""The consumption policy of synthetic images (:class:`MixPolicy`): how real and synthetic images are
drawn into batches and what synthetic images are trained toward (see :mod:`imgaug_gen.data.mixed`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgaug_gen.errors import ConfigError, require

POLICIES = ("concat", "replace", "weighted")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclass(frozen=True)
class MixPolicy:
    """How real and synthetic images are drawn and what synthetic images are trained toward.

    ``name``: ``concat`` | ``replace`` | ``weighted``. ``p``: the replacement probability
    (``replace``) or the synthetic share of every batch (``weighted``); unused by ``concat``.
    ``synthetic_weight``: loss weight of synthetic images (any policy). ``label_smoothing``:
    label smoothing of synthetic targets (real images keep the trainer's own). ``distill``: weight
    of the teacher's soft targets on synthetic images (0 = off; needs teacher logits).
    ``temperature``: the distillation temperature.
    """

    name: str = "concat"
    p: float = 0.5
    synthetic_weight: float = 1.0
    label_smoothing: float = 0.0
    distill: float = 0.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        self.check()

    def check(self, key: str = "policy") -> None:
        require(self.name in POLICIES, f"`{key}.name` = {self.name!r}; allowed: {list(POLICIES)}.")
        require(
            _is_number(self.p) and 0.0 <= float(self.p) <= 1.0,
            f"`{key}.p` = {self.p!r}; give a probability in [0, 1] (replace: chance a drawn real image is "
            "swapped for a synthetic one; weighted: synthetic share of each batch).",
        )
        require(
            _is_number(self.synthetic_weight) and float(self.synthetic_weight) >= 0.0,
            f"`{key}.synthetic_weight` = {self.synthetic_weight!r}; give a number >= 0.",
        )
        require(
            _is_number(self.label_smoothing) and 0.0 <= float(self.label_smoothing) < 1.0,
            f"`{key}.label_smoothing` = {self.label_smoothing!r}; give a number in [0, 1).",
        )
        require(
            _is_number(self.distill) and 0.0 <= float(self.distill) <= 1.0,
            f"`{key}.distill` = {self.distill!r}; give a weight in [0, 1] (0 = no teacher).",
        )
        require(
            _is_number(self.temperature) and float(self.temperature) > 0.0,
            f"`{key}.temperature` = {self.temperature!r}; give a number > 0 (2 is usual).",
        )

    @classmethod
    def from_config(cls, cfg: "MixPolicy | Mapping[str, Any] | str | None", key: str = "policy") -> "MixPolicy":
        """A policy from a mapping (Hydra node, dict), a policy name, or a policy; errors name ``key``."""
        if isinstance(cfg, MixPolicy):
            return cfg
        if cfg is None:
            return cls()
        if isinstance(cfg, str):
            cfg = {"name": cfg}
        require(isinstance(cfg, Mapping), f"`{key}` = {cfg!r}; give a mapping like {{name: replace, p: 0.5}}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - fields)
        require(not unknown, f"`{key}` has unknown key(s) {unknown}; allowed: {sorted(fields)}.")
        try:
            return cls(**{k: cfg[k] for k in cfg})
        except ConfigError as e:
            raise ConfigError(str(e).replace("`policy.", f"`{key}.")) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tag(self) -> str:
        """A short name for tables: ``replace(p=0.3)+kd0.5``."""
        s = self.name if self.name == "concat" else f"{self.name}(p={self.p:g})"
        if self.synthetic_weight != 1.0:
            s += f"+w{self.synthetic_weight:g}"
        if self.label_smoothing:
            s += f"+ls{self.label_smoothing:g}"
        if self.distill:
            s += f"+kd{self.distill:g}"
        return s
