"""The manifest of a generate.py folder, read back: one JSON line per image (and per rejected
candidate). Written by :mod:`imgaug_gen.export`; read here so that the data layer (the
mixed datasets) can consume a folder without depending on the writer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

MANIFEST = "manifest.jsonl"


def is_kept(record: dict) -> bool:
    """False for the quality filter's rejected candidates (manifest lines with no file)."""
    return record.get("kept", True) is not False and bool(record.get("file"))


def read_manifest(out_dir: str | os.PathLike, include_rejected: bool = False) -> list[dict]:
    """The manifest's lines: the images in the folder (and, if asked, the rejected candidates)."""
    path = Path(out_dir) / MANIFEST
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records if include_rejected else [r for r in records if is_kept(r)]


def load_folder_images(out_dir: str | os.PathLike, records: list[dict]) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` of the records' image files (all the same size)."""
    from PIL import Image

    out_dir = Path(out_dir)
    arrays = [np.asarray(Image.open(out_dir / r["file"])) for r in records]
    if not arrays:
        return np.zeros((0, 1, 1, 1), np.uint8)
    a = np.stack(arrays)
    return a[..., None] if a.ndim == 3 else a
