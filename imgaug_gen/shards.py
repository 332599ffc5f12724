"""``generate.py format=webdataset | parquet``: the job's images as shards instead of one file each.

* ``webdataset``: ``OUT/train/shard-00000.tar``, ... Each sample is ``{key}.png`` (the image), ``{key}.json``
  (its manifest row) and ``{key}.cls`` (the class index as text), in the layout WebDataset, OpenCLIP and
  ``datasets.load_dataset("webdataset")`` read. ``key`` is the image id (dots, which WebDataset reads as
  the start of the extension, become ``_``).
* ``parquet``: ``OUT/train/shard-00000.parquet``, ... One row per image: an ``image`` column
  (``{bytes, path}``, the Hugging Face ``Image`` feature), the provenance columns of the ``imagefolder``
  metadata (:data:`imgaug_gen.hf_metadata.HF_COLUMNS` less ``file_name``; ``label_id`` a ``ClassLabel``),
  the score columns and ``json`` (the whole manifest row). ``datasets.load_dataset("parquet")`` reads the
  features from the file.

``shard_size`` images go to a shard (the last one holds the rest). A shard is written under a temp name
and renamed once whole; only then are its manifest lines appended (with the shard's path and the image's
``offset`` / ``size`` in the tar, or its ``row``), so after a SIGKILL anywhere the manifest lists whole
shards only, a half-written or unlisted shard is removed, and the same command writes the rest. The
images go to the shards in the job's deterministic order, so a resumed job writes the same bytes as an
uninterrupted one. ``shard=i num_shards=n`` processes name their shards ``shard-iiiofnnn-00000.*``.

The writer keeps one bit per image in memory (done, kept) and streams the shards, so its memory does not
grow with the number of images. The tar is written with the standard library's ``tarfile`` rather than
``webdataset.TarWriter``: the writer needs each member's byte offset (for random access from the
manifest) and fixed headers (mtime 0, uid 0) for byte-identical shards, which ``TarWriter`` does not
expose.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from imgaug_gen.data.manifest import SPLIT, is_kept, record_path
from imgaug_gen.errors import ConfigError
from imgaug_gen.export import FolderWriter, _checked_id
from imgaug_gen.hf_metadata import provenance_columns
from imgaug_gen.io import (
    _create_beside,
    _small_png,
    atomic_write_text,
    encode_png,
    fsync_dir,
    is_durable,
    manifest_json,
    png_bytes,
    stored_png_size,
    stored_pngs,
)

log = logging.getLogger(__name__)

#: The output formats of generate.py (``format=``).
FORMATS = ("folder", "webdataset", "parquet")
SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
#: Parquet rows per row group: the unit a random read of one row decodes (RecordImages caches a few).
ROW_GROUP = 256
#: The typed score columns of a Parquet shard (every score also stays in the ``json`` column).
SCORE_COLUMNS = {"confidence": "float64", "predicted": "int64", "nearest_real_distance": "float64",
                 "nearest_real_index": "int64"}  # fmt: skip


def require_format(fmt: str) -> None:
    """A clear error when a shard format's library is missing (before any work)."""
    if fmt == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ConfigError(
                "`format` = 'parquet' needs pyarrow: pip install 'imgaug_gen[shards]' (or pyarrow)."
            ) from None


def shard_prefix(shard: int, num_shards: int) -> str:
    return "shard-" if num_shards == 1 else f"shard-{shard:03d}of{num_shards:03d}-"


def sample_key(rec_id: str) -> str:
    """The WebDataset key of an image id (a key holds no dot: the first dot starts the extension)."""
    return rec_id.replace(".", "_")


_ZEROS = bytes(tarfile.BLOCKSIZE)
#: A sample's member extensions, as bytes with their byte sums.
_MEMBERS = tuple((ext.encode(), sum(ext.encode())) for ext in (".png", ".json", ".cls"))


def _tar_header(name: str, size: int) -> bytes:
    """The tar header of a regular file ``name`` of ``size`` bytes: mode 0644, uid/gid 0, mtime 0 (the same
    bytes on every run). Hand-written for the usual short ASCII name (a plain ustar block, as ``tarfile``
    writes it, assembled from fixed parts with the checksum summed over the two that vary):
    ``tarfile.addfile`` costs about 0.4 ms per sample in copies and pax checks, as much as the generator's
    forward of a small image; other names go through ``tarfile``'s own (pax) header."""
    raw = name.encode("utf-8")
    if len(raw) >= 100 or not name.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return _ustar_header(raw, sum(raw), size)


def _ustar_header(raw: bytes, name_sum: int, size: int) -> bytes:
    """The ustar block of an ASCII name of under 100 bytes whose byte sum is ``name_sum``."""
    field, field_sum = _size_field(size)
    return b"".join(
        (raw, _ZEROS[: 100 - len(raw)], _HEADER_IDS, field, b"%06o\x00 " % (name_sum + field_sum), _HEADER_TAIL)
    )


@functools.lru_cache(maxsize=4096)
def _size_field(size: int) -> tuple[bytes, int]:
    """A header's bytes 124-148 for a member of ``size`` bytes (the size in octal, then mtime 0), and the
    checksum of every header byte but the name's (a job's members have few distinct sizes)."""
    octal = b"%011o" % size
    return octal + _HEADER_MTIME, _HEADER_SUM + sum(octal)


_HEADER_IDS = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid (bytes 100-124)
_HEADER_MTIME = b"\x0000000000000\x00"  # the size's NUL, then mtime 0 (bytes 135-148)
_HEADER_TAIL = (  # type "0" (a regular file), no link name, "ustar 00", no user/group names, devices 0, padding
    b"0" + bytes(100) + b"ustar\x0000" + bytes(64) + b"0000000\x000000000\x00" + bytes(167)
)
#: Every header byte's sum but the name's and the size digits' (the checksum field counts as 8 spaces).
_HEADER_SUM = sum(_HEADER_IDS) + sum(_HEADER_MTIME) + 8 * 0x20 + sum(_HEADER_TAIL)


def member_png(image: np.ndarray) -> bytes:
    """A tar member's PNG. One that fits in one 512-byte tar block uncompressed is stored (zlib level 0):
    a member takes whole blocks, so compressing it could not make the shard any smaller, and storing costs
    about a quarter of level 1's time (16 px grey digits: 340 bytes either way). Larger ones as
    :func:`~imgaug_gen.io.png_bytes` (level 1)."""
    a = np.asarray(image)
    return encode_png(a, 0) if _stored_fits(a) else png_bytes(a)


def _stored_fits(image: np.ndarray) -> bool:
    """Whether an image's stored PNG fits in one 512-byte tar block (and :func:`encode_png` can write it)."""
    return _small_png(image) and stored_png_size(image.shape) <= tarfile.BLOCKSIZE


def member_pngs(images) -> list[bytes]:
    """:func:`member_png` of each image of a batch: a batch of one shape whose stored PNG fits one tar block
    is encoded at once (:func:`~imgaug_gen.io.stored_pngs`), others image by image."""
    if len(images) > 1 and len({np.shape(a) for a in images}) == 1:
        a = np.stack([np.asarray(x) for x in images])
        if _stored_fits(a[0]):
            return stored_pngs(a)
    return [member_png(a) for a in images]


class _TarShard:
    """One ``.tar`` being written under its temp name: per member a header, the data, zeros to 512 bytes;
    at the end two zero blocks and zeros to a 10,240-byte record (``tarfile``'s layout)."""

    encode = staticmethod(member_pngs)  # a batch's PNG bytes

    def __init__(self, path: str, class_names: list[str]):
        self.path = path
        fd, self.tmp = _create_beside(path)
        self._f = open(fd, "wb", buffering=1 << 20)
        self.offset = 0

    def add(self, record: dict, png: bytes, row_json: bytes) -> dict:
        """The sample's three members (``.png``, ``.json``, ``.cls``) in one write; where its PNG lies."""
        key = sample_key(str(record["id"]))
        raw = key.encode()
        short = len(raw) < 95 and key.isascii()  # every member's name under 100 bytes: a plain ustar block
        key_sum = sum(raw) if short else 0
        parts = []
        for (ext, ext_sum), data in zip(_MEMBERS, (png, row_json, b"%d" % int(record["label"]))):
            n = len(data)
            head = _ustar_header(raw + ext, key_sum + ext_sum, n) if short else _tar_header(key + ext.decode(), n)
            parts += (head, data, _ZEROS[: -n % tarfile.BLOCKSIZE])
        png_at = self.offset + len(parts[0])
        blob = b"".join(parts)
        self._f.write(blob)
        self.offset += len(blob)
        return {"offset": png_at, "size": len(png)}

    @staticmethod
    def where(at: dict) -> str:
        """The manifest line's end after its shard's file, as ``json.dumps`` writes it."""
        return f', "offset": {at["offset"]}, "size": {at["size"]}}}'

    def close(self) -> None:
        end = self.offset + 2 * tarfile.BLOCKSIZE
        self._f.write(b"\x00" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        _finish_file(self._f, self.tmp, self.path)

    def abandon(self) -> None:
        self._f.close()
        os.unlink(self.tmp)


class _ParquetShard:
    """One ``.parquet`` being written under its temp name, a row group at a time."""

    encode = staticmethod(lambda images: [png_bytes(a) for a in images])  # a batch's PNG bytes

    def __init__(self, path: str, class_names: list[str]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self._pa = path, pa
        fd, self.tmp = _create_beside(path)
        self._f = open(fd, "wb")
        self.schema = parquet_schema(class_names)
        self._writer = pq.ParquetWriter(self._f, self.schema, compression="zstd")
        self._rows: list[dict] = []
        self.n = 0

    def add(self, record: dict, png: bytes, row_json: bytes) -> dict:
        row = parquet_row(record, png, row_json.decode())
        self._rows.append(row)
        if len(self._rows) >= ROW_GROUP:
            self._flush()
        self.n += 1
        return {"row": self.n - 1}

    @staticmethod
    def where(at: dict) -> str:
        """The manifest line's end after its shard's file, as ``json.dumps`` writes it."""
        return f', "row": {at["row"]}}}'

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(self._pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        _finish_file(self._f, self.tmp, self.path)

    def abandon(self) -> None:
        self._writer.close()
        self._f.close()
        os.unlink(self.tmp)


#: The shard kind of each format.
_SHARD_KINDS = {"webdataset": _TarShard, "parquet": _ParquetShard}


def _finish_file(f, tmp: str, path: str) -> None:
    f.flush()
    if is_durable():
        os.fsync(f.fileno())
    f.close()
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


_STRING_COLUMNS = ("id", "label", "source", "mode", "generator", "source_id", "partner_id", "prompt", "json")


def parquet_schema(class_names: list[str]):
    """The Parquet shards' Arrow schema, with the Hugging Face features in its metadata (``image`` an
    ``Image``, ``label_id`` a ``ClassLabel`` of the class names)."""
    import pyarrow as pa

    types = {"id": pa.string(), "label": pa.string(), "label_id": pa.int64(), "source": pa.string(),
             "mode": pa.string(), "seed": pa.int64(), "generator": pa.string(), "source_id": pa.string(),
             "partner_id": pa.string(), "strength": pa.float64(), "blend": pa.float64(), "prompt": pa.string(),
             "augmented": pa.bool_(), **{k: getattr(pa, v)() for k, v in SCORE_COLUMNS.items()},
             "json": pa.string()}  # fmt: skip
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    dtype = {"string": "string", "int64": "int64", "double": "float64", "bool": "bool"}
    features: dict[str, Any] = {"image": {"_type": "Image"}}
    features.update({name: {"dtype": dtype[str(t)], "_type": "Value"} for name, t in types.items()})
    features["label_id"] = {"names": [str(n) for n in class_names], "_type": "ClassLabel"}
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema([("image", image), *types.items()], metadata=meta)


def parquet_row(record: dict, png: bytes, row_json: str) -> dict:
    scores = record.get("scores") or {}
    row = {
        "image": {"bytes": png, "path": f"{sample_key(str(record['id']))}.png"},
        **provenance_columns(record),
        **{k: scores.get(k) for k in SCORE_COLUMNS},
        "json": row_json,
    }
    return row


class ShardWriter(FolderWriter):
    """The writer of ``format=webdataset | parquet``: the :class:`~imgaug_gen.export.FolderWriter` contract
    (the folder lock, the job record, ``overwrite``, ``write`` / ``write_rejected`` / ``close``, ``has`` /
    ``is_kept``), with images streamed into shards of ``shard_size``. The encoding and the shard writes run
    on one writer thread (``io_workers=1``), overlapping the generator; ``io_workers=0`` writes inline."""

    def __init__(self, out_dir, class_names, job, *, format: str, shard_size: int, **kwargs):
        if format not in SUFFIX:
            raise ConfigError(f"`format` = {format!r}: a shard format is one of {sorted(SUFFIX)}.")
        self.format, self.shard_size = format, int(shard_size)
        self.prefix = shard_prefix(kwargs.get("shard", 0), kwargs.get("num_shards", 1))
        self._name = re.compile(rf"^{re.escape(self.prefix)}(\d{{5}}){re.escape(SUFFIX[format])}$")
        self._next = 0
        super().__init__(out_dir, class_names, job, **kwargs)
        self._open: _TarShard | _ParquetShard | None = None
        self._in_shard = 0
        self._lines: list[str] = []  # manifest lines of the shard being written (and rejected candidates)

    # -- opening ---------------------------------------------------------------------
    def _recover(self) -> dict[str, bool]:
        """The manifest's lines whose shard is whole; unlisted and half-written shards of this writer are
        removed (their images are made again, into the same bytes). Returns id -> kept. Holds each line as
        text, not as a parsed record, so resuming a large job costs no more memory than running it."""
        lines: list[tuple[str, bool, str | None, str]] = []  # (id, kept, shard file, the line as written)
        ends: dict[str, int | None] = {}  # shard file -> the end its lines need (bytes or rows); None: a bad line
        if self.manifest_path.is_file():
            for line in self.manifest_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                    continue
                kept = is_kept(rec)
                file = str(rec["file"]) if kept else None
                lines.append((rec["id"], kept, file, line))
                if kept:
                    try:
                        end = (
                            int(rec["offset"]) + int(rec["size"])
                            if self.format == "webdataset"
                            else int(rec["row"]) + 1
                        )
                    except (KeyError, TypeError, ValueError):
                        end = None
                    ends[file] = (
                        None if end is None or (file in ends and ends[file] is None) else max(ends.get(file, 0), end)
                    )
        whole = {f for f, end in ends.items() if self._shard_ok(f, end)}
        lines = [x for x in lines if not x[1] or x[2] in whole]
        folder = self.out_dir / SPLIT
        if folder.is_dir():
            for entry in os.scandir(folder):
                name = entry.name
                own_tmp = name.startswith("." + self.prefix) and name.endswith(".tmp")
                if own_tmp or (self._name.match(name) and f"{SPLIT}/{name}" not in whole):
                    os.unlink(entry.path)
        indices = [int(m.group(1)) for m in (self._name.match(Path(f).name) for f in whole) if m]
        self._next = max(indices) + 1 if indices else 0
        atomic_write_text(self.manifest_path, "".join(x[3] + "\n" for x in lines))  # the lines as written
        return {rec_id: kept for rec_id, kept, _, _ in lines}

    def _shard_ok(self, file: str, end: int | None) -> bool:
        """The shard is this writer's, in place, and long enough for every line that names it."""
        try:
            path = record_path(self.out_dir, {"file": file, "id": file})
            if end is None or not self._name.match(path.name) or not path.is_file():
                return False
            if self.format == "webdataset":
                return end <= path.stat().st_size
            import pyarrow.parquet as pq

            return end <= pq.read_metadata(path).num_rows
        except (ConfigError, OSError, ValueError) as e:
            log.warning("dropping shard %s of the manifest: %s", file, e)
            return False

    def remove_orphans(self, planned_ids) -> int:
        return 0  # done on open: unlisted shards of this writer are removed by _recover

    # -- state -----------------------------------------------------------------------
    def is_kept(self, rec_id: str) -> bool:
        return bool(self.records.get(rec_id, False))

    # -- writing ---------------------------------------------------------------------
    def write(self, record: dict[str, Any], image: np.ndarray) -> dict:
        return self.write_many([record], [image])[0]

    def write_many(self, records: list[dict[str, Any]], images) -> list[dict]:
        """:meth:`write` of each record and its image, in order (their PNGs are encoded together)."""
        out = []
        for record in records:
            self.records[_checked_id(record)] = True
            out.append({"class_name": self.class_names[int(record["label"])], **record})
        images = [np.asarray(a) for a in images]  # the job never reuses an image array it has written
        if self._pool is None:
            self._write_chunk(list(zip(out, images)))
        else:
            for record, image in zip(out, images):
                super()._queue(record, None, image)
        return out

    def write_rejected(self, record: dict[str, Any]) -> dict:
        record = {"class_name": self.class_names[int(record["label"])], **record, "kept": False}
        self.records[str(record["id"])] = False
        self._queue(record, None, None)
        return record

    def _queue(self, record: dict, path, image) -> None:
        if self._pool is None:
            self._write_chunk([(record, image)])
        else:
            super()._queue(record, path, image)

    def _submit(self, batch):
        return self._pool.submit(self._write_chunk, [(rec, img) for rec, _, img in batch])

    def _written(self, records: list[dict]) -> None:
        pass  # the writer thread appends a shard's lines once the shard is whole

    def _write_chunk(self, items: list[tuple[dict, np.ndarray | None]]) -> None:
        """On the writer thread: encode and add each image to the open shard; a full shard is finished."""
        pngs = iter(_SHARD_KINDS[self.format].encode([image for _, image in items if image is not None]))
        for record, image in items:
            if image is not None:
                if self._open is None:
                    self._start_shard()
                row = manifest_json(record)  # the sample's row: where it lies is added below
                at = self._open.add(record, next(pngs), row.encode())
                where = self._where + self._open.where(at)
                self._lines.append(f"{row[:-1]}, {where[1:]}" if len(row) > 2 else where)
                if self.watch is not None:
                    self.watch({**record, "file": self._rel, **at})  # the line as the manifest will hold it
                self._in_shard += 1
            else:
                self._lines.append(manifest_json(record))
            if self._in_shard >= self.shard_size:
                self._finish_shard()

    def _start_shard(self) -> None:
        rel = f"{SPLIT}/{self.prefix}{self._next:05d}{SUFFIX[self.format]}"
        path = os.path.join(self.out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._open = _SHARD_KINDS[self.format](path, self.class_names)
        self._where, self._rel = '{"file": ' + json.dumps(rel), rel
        self._next += 1

    def _finish_shard(self) -> None:
        """Close and rename the open shard, then append its manifest lines (and any rejected candidates)."""
        if self._open is not None:
            self._open.close()
            self._open, self._in_shard = None, 0
        if self._lines:
            if self._fh is None:
                self._fh = open(self.manifest_path, "a", encoding="utf-8")
            self._fh.write("".join(line + "\n" for line in self._lines))
            self._fh.flush()
            if is_durable():
                os.fsync(self._fh.fileno())
            self._lines = []

    def flush(self) -> None:
        """Wait for the queued images to be in the open shard (a shard is finished only when full, or
        at :meth:`close`: shard boundaries do not depend on when flush is called)."""
        if self._pool is not None:
            self._send()
        self._drain(0)

    def close(self, failed: bool = False) -> None:
        """Finish the job's last shard; ``failed`` (an exception left the ``with`` block): abandon the
        open shard instead, so the next run writes it whole, with the same bytes."""
        try:
            if not failed:
                self.flush()
                self._run(self._finish_shard)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._open is not None:  # a failed write: the half shard goes (the next run makes it again)
                self._open.abandon()
                self._open = None
            self._close_manifest()
            if self._own_lock:
                self.lock.release()

    def __exit__(self, *exc):
        self.close(failed=exc[0] is not None)

    def _run(self, fn) -> None:
        """``fn`` on the writer thread (after every queued chunk), or inline."""
        if self._pool is None:
            fn()
        else:
            self._pool.submit(fn).result()
