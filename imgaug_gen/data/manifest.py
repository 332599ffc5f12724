"""The manifest of a generate.py folder, read back: one JSON line per image (and per rejected
candidate). Written by :mod:`imgaug_gen.export`; read here so that the data layer (the
mixed datasets) can consume a folder without depending on the writer.

A folder is untrusted input (folders are shared and downloaded): every ``file`` a line names must
be a relative path under ``train/`` inside the folder (:func:`record_path`), and every image is
checked from its header (pixel limit, size) before it is decoded (:func:`load_folder_images`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from imgaug_gen.errors import ConfigError
from imgaug_gen.io import confined, open_image

MANIFEST = "manifest.jsonl"
SPLIT = "train"


def is_kept(record: dict) -> bool:
    """False for the quality filter's rejected candidates (manifest lines with no file)."""
    return record.get("kept", True) is not False and bool(record.get("file"))


def record_path(out_dir: str | os.PathLike, record: dict) -> Path:
    """The image file of a manifest line, refused unless it lies under ``out_dir/train/``."""
    return confined(
        out_dir, record.get("file"), f"`{Path(out_dir) / MANIFEST}` line {record.get('id')!r}: `file`", prefix=SPLIT
    )


def read_manifest(out_dir: str | os.PathLike, include_rejected: bool = False) -> list[dict]:
    """The manifest's lines: the images in the folder (and, if asked, the rejected candidates)."""
    path = Path(out_dir) / MANIFEST
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"`{path}` line {n} is not valid JSON ({e}); re-run generate.py to repair the folder."
            ) from None
        if not isinstance(rec, dict):
            raise ConfigError(f"`{path}` line {n} is {type(rec).__name__}, not a JSON object.")
        records.append(rec)
    return records if include_rejected else [r for r in records if is_kept(r)]


def load_folder_images(out_dir: str | os.PathLike, records: list[dict]) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` of the records' image files. Each file must lie in the folder
    (:func:`record_path`) and is checked from its header before decoding: the pixel limit, and the
    size of the first image (so a huge file listed many times costs nothing)."""
    arrays, size = [], None
    for r in records:
        path = record_path(out_dir, r)
        im = open_image(path, f"`{path}` (manifest line {r.get('id')!r})", expect_size=size)
        try:
            size = im.size
            arrays.append(np.asarray(im))
        except (OSError, ValueError, SyntaxError) as e:
            raise ConfigError(
                f"`{path}` (manifest line {r.get('id')!r}) cannot be decoded ({type(e).__name__}: "
                f"{e}); re-run generate.py to repair the folder."
            ) from None
        finally:
            im.close()
    if not arrays:
        return np.zeros((0, 1, 1, 1), np.uint8)
    if len({a.shape for a in arrays}) > 1:
        raise ConfigError(
            f"the images listed in `{Path(out_dir) / MANIFEST}` have different shapes "
            f"{sorted({a.shape for a in arrays})[:3]}; every image of a folder must have the same."
        )
    a = np.stack(arrays)
    return a[..., None] if a.ndim == 3 else a
