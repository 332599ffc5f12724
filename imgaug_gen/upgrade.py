"""``python -m imgaug_gen.upgrade RUN [RUN ...]``: rewrite generator folders of format 1 as format 2.

Format 1 recorded a run's training data as a Hydra node naming a class (``data._target_``); a loaded
file never names code to run, so format 2 records a data kind instead (``{"kind": "folder", "args":
{...}}``). Only the built-in data classes are rewritten (their names are compared as strings, nothing
is imported); a folder naming any other ``_target_`` is left unchanged and reported. The old file is
kept as ``config.json.v1``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from imgaug_gen.errors import ConfigError


def upgrade_folder(path: str | Path) -> Path:
    """Upgrade one generator folder (or a run folder holding ``generator/``); returns the config file written."""
    from imgaug_gen.generators.base import CONFIG_NAME, FORMAT_VERSION, LEGACY_DATA_TARGETS, _find_targets
    from imgaug_gen.io import atomic_write_json, atomic_write_text

    path = Path(path)
    if not (path / CONFIG_NAME).is_file() and (path / "generator" / CONFIG_NAME).is_file():
        path = path / "generator"
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise ConfigError(f"`{path}` holds no {CONFIG_NAME}; pass a run folder written by train.py.")
    text = cfg_file.read_text(encoding="utf-8")
    config = json.loads(text)
    if config.get("format_version") != 1:
        raise ConfigError(
            f"`{cfg_file}` has format_version={config.get('format_version')!r}; only format 1 is upgraded."
        )
    data = config.get("data")
    if isinstance(data, dict) and "_target_" in data:
        target = data["_target_"]
        if target not in LEGACY_DATA_TARGETS:
            raise ConfigError(
                f"`{cfg_file}`: `data._target_` = {target!r} is not a built-in data class; register it as a "
                'data kind (@register_data_kind) and write `data` as {"kind", "args"} by hand.'
            )
        args = {k: v for k, v in data.items() if not (k.startswith("_") and k.endswith("_"))}
        config["data"] = {"kind": LEGACY_DATA_TARGETS[target], "args": args}
    rest = _find_targets(config)
    if rest:
        raise ConfigError(f"`{cfg_file}`: `{rest[0][0]}` = {rest[0][1]!r} names code to run; it is not upgraded.")
    config["format_version"] = FORMAT_VERSION
    atomic_write_text(path / f"{CONFIG_NAME}.v1", text)
    atomic_write_json(cfg_file, config)
    return cfg_file


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    status = 0
    for p in argv:
        try:
            print(f"upgraded: {upgrade_folder(p)}")
        except (ConfigError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
