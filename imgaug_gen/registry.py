"""Kinds by name: one registry per extension point (generator kinds, data kinds), filled by a class
decorator in this process or by an installed package's entry point, imported only when a kind is asked
for, so ``import imgaug_gen`` stays cheap and a folder naming a kind never names code to import."""

from __future__ import annotations

from typing import Any

from imgaug_gen.errors import ConfigError


class KindRegistry:
    """``register(kind)`` decorates a class; ``get(kind)`` returns it, loading the entry point
    ``group: kind = "module:Class"`` of an installed package when the kind is not registered yet."""

    def __init__(self, group: str, attribute: str, what: str, decorator: str):
        self.group, self.attribute, self.what, self.decorator = group, attribute, what, decorator
        self.classes: dict[str, type] = {}

    def register(self, kind: str):
        def wrap(cls):
            setattr(cls, self.attribute, kind)
            self.classes[kind] = cls
            return cls

        return wrap

    def entry_points(self) -> dict[str, Any]:
        from importlib.metadata import entry_points

        return {ep.name: ep for ep in entry_points(group=self.group)}

    def get(self, kind: Any, key: str | None = None) -> type:
        where = f"`{key}` = {kind!r}" if key else f"{self.what} `{kind}`"
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"{where}: give a {self.what} name.")
        if kind not in self.classes:
            eps = self.entry_points()
            if kind not in eps:
                known = sorted(set(self.classes) | set(eps))
                unknown = f"{where} is not a known {self.what}" if key else f"Unknown {self.what} `{kind}`"
                raise ConfigError(
                    f"{unknown}; known kinds: {known}. A plug-in {self.what} must be "
                    f"installed with an entry point in the `{self.group}` group."
                )
            cls = eps[kind].load()
            if self.classes.get(kind) is not cls:
                raise ConfigError(
                    f"the entry point `{kind} = {eps[kind].value}` ({self.group}) does not name a class "
                    f"registered as `{kind}`; decorate it with @{self.decorator}({kind!r})."
                )
        return self.classes[kind]
