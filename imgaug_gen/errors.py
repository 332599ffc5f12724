"""The one user-facing error type.

Every check of user input (config keys, paths, images, run folders) raises
:class:`ConfigError` before any heavy work starts. The message names the
offending key or path, shows the value and says how to fix it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input: a config value, a path, an image or a run folder."""


#: What building an object from a loaded file's values can raise when a value passed its schema but the
#: library refuses it; loaders turn these into a ConfigError naming the file.
BUILD_ERRORS = (
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    RuntimeError,
    OverflowError,
    ZeroDivisionError,
    NotImplementedError,
)


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
