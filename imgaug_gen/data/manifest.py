"""The manifest of a generate.py folder, read back: one JSON line per image (and per rejected
candidate), whatever the output format (:class:`RecordImages`: an image file, a WebDataset ``.tar`` member,
a Parquet row). Written by :mod:`imgaug_gen.export`; read here so that the data layer (the
mixed datasets) can consume a folder without depending on the writer.

A folder is untrusted input (folders are shared and downloaded): every ``file`` a line names must
be a relative path under ``train/`` inside the folder (:func:`record_path`), and every image is
checked from its header (pixel limit, size) before it is decoded (:func:`load_folder_images`)."""

from __future__ import annotations

import collections
import io
import json
import os
from pathlib import Path
from typing import Any

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


def iter_manifest(out_dir: str | os.PathLike, include_rejected: bool = False, name: str = MANIFEST):
    """The manifest's lines one at a time (memory flat in the folder's size): the images in the folder
    (and, if asked, the rejected candidates)."""
    path = Path(out_dir) / name
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
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
            if include_rejected or is_kept(rec):
                yield rec


def read_manifest(out_dir: str | os.PathLike, include_rejected: bool = False) -> list[dict]:
    """The manifest's lines: the images in the folder (and, if asked, the rejected candidates)."""
    return list(iter_manifest(out_dir, include_rejected))


#: The largest image a shard member may hold (a manifest line naming more is refused before reading).
MAX_MEMBER_BYTES = 1 << 30


def _location(rec: dict, key: str, where: str) -> int:
    v = rec.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= (1 << 50):
        raise ConfigError(f"{where}: `{key}` = {v!r} is not a byte offset / count / row; re-run generate.py.")
    return v


class RecordImages:
    """The images of manifest lines, in each output format ``generate.py`` writes:

    * ``format=folder``: ``file`` is the image file (``train/<class>/<id>.png``);
    * ``format=webdataset``: ``file`` is a ``.tar`` shard and ``offset`` / ``size`` the PNG member's bytes
      (read with one seek: random access without an index pass);
    * ``format=parquet``: ``file`` is a ``.parquet`` shard and ``row`` the row (its row group is read and
      kept in a small cache, so neighbouring rows cost one read).

    Every ``file`` must lie under ``out_dir/train/`` (:func:`record_path`) and every image is checked from
    its header (the pixel limit, ``expect_size``) before it is decoded. Picklable (for DataLoader workers):
    open Parquet files and the cache are not carried over."""

    def __init__(self, out_dir: str | os.PathLike, cached_row_groups: int = 16):
        self.out_dir = Path(out_dir)
        self.cached_row_groups = int(cached_row_groups)
        self._parquet: dict[str, Any] = {}
        self._groups: collections.OrderedDict = collections.OrderedDict()

    def __getstate__(self):
        return {"out_dir": self.out_dir, "cached_row_groups": self.cached_row_groups}

    def __setstate__(self, state):
        self.__init__(state["out_dir"], state["cached_row_groups"])

    def where(self, rec: dict) -> str:
        return f"`{self.out_dir / str(rec.get('file'))}` (manifest line {rec.get('id')!r})"

    def source(self, rec: dict):
        """A path (an image file) or a binary file object (a shard member) holding the record's image."""
        path = record_path(self.out_dir, rec)
        if path.suffix == ".tar":
            where = self.where(rec)
            offset, size = _location(rec, "offset", where), _location(rec, "size", where)
            if size > MAX_MEMBER_BYTES:
                raise ConfigError(f"{where}: `size` = {size} is over {MAX_MEMBER_BYTES} bytes; re-run generate.py.")
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
            if len(data) != size:
                raise ConfigError(
                    f"{where}: the shard ends before its member ({offset} + {size} bytes); re-run generate.py."
                )
            return io.BytesIO(data)
        if path.suffix == ".parquet":
            return io.BytesIO(self._parquet_row(path, _location(rec, "row", self.where(rec)), rec))
        return path

    def _parquet_row(self, path: Path, row: int, rec: dict) -> bytes:
        key = str(path)
        if key not in self._parquet:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            self._parquet[key] = (pf, starts)
        pf, starts = self._parquet[key]
        if row >= starts[-1]:
            raise ConfigError(f"{self.where(rec)}: `row` = {row}, the shard has {starts[-1]} rows; re-run generate.py.")
        g = int(np.searchsorted(starts, row, side="right") - 1)
        if (key, g) not in self._groups:
            column = pf.read_row_group(g, columns=["image"]).column("image").combine_chunks()
            self._groups[(key, g)] = column.field("bytes").to_pylist()
            while len(self._groups) > self.cached_row_groups:
                self._groups.popitem(last=False)
        self._groups.move_to_end((key, g))
        return self._groups[(key, g)][row - starts[g]]

    def array(self, rec: dict, expect_size: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 ``[H, W]`` / ``[H, W, C]`` of the record's image, checked from its header first."""
        where = self.where(rec)
        im = open_image(self.source(rec), where, expect_size=expect_size)
        try:
            return np.asarray(im)
        except (OSError, ValueError, SyntaxError) as e:
            raise ConfigError(
                f"{where} cannot be decoded ({type(e).__name__}: {e}); re-run generate.py to repair the folder."
            ) from None
        finally:
            im.close()


def load_folder_images(out_dir: str | os.PathLike, records: list[dict]) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` of the records' images (any output format: :class:`RecordImages`). Each file
    must lie in the folder (:func:`record_path`) and is checked from its header before decoding: the
    pixel limit, and the size of the first image (so a huge file listed many times costs nothing)."""
    arrays, size, reader = [], None, RecordImages(out_dir)
    for r in records:
        a = reader.array(r, expect_size=size)
        size = (a.shape[1], a.shape[0])
        arrays.append(a)
    if not arrays:
        return np.zeros((0, 1, 1, 1), np.uint8)
    if len({a.shape for a in arrays}) > 1:
        raise ConfigError(
            f"the images listed in `{Path(out_dir) / MANIFEST}` have different shapes "
            f"{sorted({a.shape for a in arrays})[:3]}; every image of a folder must have the same."
        )
    a = np.stack(arrays)
    return a[..., None] if a.ndim == 3 else a
