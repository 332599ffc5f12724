"""The output folder: ``OUT/train/<class_name>/<id>.png`` plus ``OUT/manifest.jsonl``.

The layout loads with ``torchvision.datasets.ImageFolder(OUT/"train")`` and with
the Hugging Face ``imagefolder`` builder (``load_dataset("imagefolder",
data_dir=OUT)``: split folder ``train``). A finished job also writes
``OUT/train/metadata.jsonl`` (:func:`write_hf_metadata`): one line per kept image with its
provenance, which the ``imagefolder`` builder turns into columns (``label``, ``source``,
``seed``, scores, ...); ImageFolder ignores it (it lists only the class folders).

Writes are atomic and resumable: each PNG goes to a temp name and is renamed,
then its manifest line is appended. On open, the manifest is read back, lines
whose file is missing (or a torn last line from a killed run) are dropped, and
orphan PNGs with no manifest line are removed, so a re-run of the same job
continues exactly where the last one stopped. A folder holding a different job's
output is refused unless ``overwrite=true``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from imgaug_gen.data.manifest import MANIFEST, SPLIT, is_kept, load_folder_images, read_manifest, record_path  # noqa: F401 (re-exported)
from imgaug_gen.errors import ConfigError
from imgaug_gen.hf_metadata import HF_COLUMNS, HF_METADATA, hf_metadata_rows, write_hf_metadata  # noqa: F401 (importable from here)
from imgaug_gen.io import (
    FolderLock,
    atomic_save_image,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    manifest_json,
    read_image_array,
    unique_class_dirs,
)
from imgaug_gen.io import is_durable as io_durable

log = logging.getLogger(__name__)

JOB_FILE = "job.json"


def manifest_shard_name(shard: int, num_shards: int) -> str:
    return MANIFEST if num_shards == 1 else f"manifest.shard{shard:03d}-of-{num_shards:03d}.jsonl"


#: Files a generate job writes at the top of its folder (besides its manifests and shard markers);
#: ``overwrite=true`` removes these and the image files a previous job's manifest lists, nothing else.
OWN_FILES = ("metrics.json", "config.yaml", "preview.png", "merged.json")
#: Entries of a folder that hold no output: Hydra's, the job log, the locks.
IGNORED = (".hydra", "generate.log", "multirun.yaml", "logs", ".submitit")
CLAIM_LOCK = "claim.lock"  # held briefly: reading / writing job.json, clearing, merging
#: an output file name of this project inside a class folder (a previous job's, possibly unlisted after a kill)
_OWN_IMAGE = re.compile(
    r"^(syn|edit)_\d{7}\.png$|^(real|aug)_.+\.png$|^\..+\.png\.[0-9a-f]{8}\.tmp$"
    r"|^\.?shard-(\d{3}of\d{3}-)?\d{5}\.(tar|parquet)(\.[0-9a-f]{8}\.tmp)?$"  # format=webdataset | parquet
)


def refuse_foreign_folder(out_dir: str | os.PathLike) -> None:
    """A non-empty folder without a generate job record holds the user's files: never an output folder."""
    out_dir = Path(out_dir)
    if (out_dir / JOB_FILE).is_file() or not out_dir.is_dir():
        return
    theirs = sorted(p.name for p in out_dir.iterdir() if not _ignorable(p.name))
    if theirs:
        raise ConfigError(
            f"`out_dir` = {str(out_dir)!r} is not empty and holds no generate.py job record ({JOB_FILE}): "
            f"its files ({theirs[:5]}) were not written by imgaug_gen, and nothing of them is deleted or "
            "overwritten. Choose an empty or new `out_dir`."
        )


def plan_record_name(shard: int, num_shards: int) -> str:
    return "plan.json" if num_shards == 1 else f"plan.shard{shard:03d}-of-{num_shards:03d}.json"


def writer_lock_name(shard: int, num_shards: int) -> str:
    return "generate.lock" if num_shards == 1 else f"generate.shard{shard:03d}-of-{num_shards:03d}.lock"


def _ignorable(name: str) -> bool:
    return name in IGNORED or name == JOB_FILE or name.endswith(".lock")


class FolderWriter:
    """Atomic, resumable writer of one job's images and manifest lines.

    One writer per (folder, shard): :class:`~imgaug_gen.locks.FolderLock` ``generate[.shardXXX-of-YYY].lock``
    is held for the writer's life, so a second copy of the same job (two terminals, a re-queued
    cluster job) stops at once with an error naming the holder; shards of one job never block each
    other. The job record (``job.json``) is read and written under a short ``claim.lock``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        class_names: list[str],
        job: dict[str, Any],
        overwrite: bool = False,
        shard: int = 0,
        num_shards: int = 1,
        io_workers: int = 1,
        max_pending: int = 256,
        chunk: int = 64,
        flush_every: int = 4096,
        lock: FolderLock | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.class_dirs = unique_class_dirs(class_names, "the generator's `class_names`")
        self.class_names = list(class_names)
        self.job = job
        self.shard, self.num_shards = int(shard), int(num_shards)
        self.manifest_path = self.out_dir / manifest_shard_name(shard, num_shards)
        # the job's lock: held by the caller for the job's life (generate), or here for the writer's
        self._own_lock = lock is None
        self.lock = lock or FolderLock(self.out_dir, writer_lock_name(shard, num_shards), "generate.py job").acquire()
        try:
            with FolderLock(self.out_dir, CLAIM_LOCK, "generate.py job").acquire(blocking=True):
                self._claim(overwrite)
            self.records: dict[str, dict] = self._recover()
            self.resumed = bool(self.records)  # the manifest held lines of an earlier run of the job
        except BaseException:
            if self._own_lock:
                self.lock.release()
            raise
        self._fh = None
        #: Called with each kept manifest record as its line is written, in manifest order (the report's
        #: counts and preview picks, made as the job writes instead of by a pass over the manifest after it).
        self.watch: Callable[[dict], Any] | None = None
        # PNG encoding and file writes run on a writer thread, overlapping the generator (whose
        # tensor ops, zlib and the file system calls release the GIL); a manifest line is appended
        # only once its file is in place. Images go to the thread ``chunk`` at a time, and one thread by
        # default: the writing is mostly Python under the GIL (why: benchmarks/README.md).
        self._pool = ThreadPoolExecutor(max_workers=io_workers) if io_workers > 0 else None
        self._batch: list[tuple[dict, str | None, np.ndarray | None]] = []  # (record, path, image) not yet sent
        self._pending: collections.deque = collections.deque()  # (records, future) of chunks being written
        self._pending_records = 0
        self.max_pending = max_pending
        self.chunk = max(int(chunk), 1)
        self.flush_every = max(int(flush_every), 1)
        self._unflushed = 0
        self._dirty_dirs: set[str] = set()

    # -- opening -------------------------------------------------------------------
    def _claim(self, overwrite: bool) -> None:
        job_file = self.out_dir / JOB_FILE
        if job_file.is_file():
            try:
                previous = json.loads(job_file.read_text())
            except json.JSONDecodeError:
                previous = None
            if previous != self.job:
                if not overwrite:
                    raise ConfigError(
                        f"`out_dir` = {str(self.out_dir)!r} already holds the output of a different job "
                        f"(a generate.py job; see {job_file}). Choose another `out_dir`, or pass `overwrite=true` to "
                        "replace that job's output (only the files its manifests list are removed)."
                    )
                self._refuse_if_other_writers()
                self._clear()
        else:
            refuse_foreign_folder(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(job_file, self.job)
        # metadata.jsonl describes a finished folder: until this job finishes again, none (the
        # ``imagefolder`` builder silently drops images a stale one does not list).
        (self.out_dir / SPLIT / HF_METADATA).unlink(missing_ok=True)
        (self.out_dir / "merged.json").unlink(missing_ok=True)

    def _refuse_if_other_writers(self) -> None:
        for p in sorted(self.out_dir.glob("generate*.lock")):
            if p.name != self.lock.name and FolderLock(self.out_dir, p.name).is_held_elsewhere():
                h = FolderLock(self.out_dir, p.name).holder()
                raise ConfigError(
                    f"`overwrite=true` on `out_dir` = {str(self.out_dir)!r}, but another generate.py job "
                    f"is writing there ({p.name}: pid {h.get('pid', '?')} on {h.get('host', '?')}). "
                    "Wait for it to finish or stop it first."
                )

    def _clear(self) -> None:
        """Remove a previous job's output: the files its manifests list (each checked to lie in the folder),
        this project's files in its class folders and at the top; nothing else. Empty folders go too."""
        removed, class_dirs = 0, set()
        for manifest in sorted(self.out_dir.glob("manifest*.jsonl")):
            for line in manifest.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and is_kept(rec):
                    path = record_path(self.out_dir, rec)
                    class_dirs.add(path.parent)
                    if path.is_file():
                        path.unlink()
                        removed += 1
            manifest.unlink()
        for folder in class_dirs:
            if folder.is_dir():
                for entry in os.scandir(folder):
                    if entry.is_file(follow_symlinks=False) and _OWN_IMAGE.match(entry.name):
                        os.unlink(entry.path)
                        removed += 1
        for name in (*OWN_FILES, f"{SPLIT}/{HF_METADATA}"):
            (self.out_dir / name).unlink(missing_ok=True)
        for p in [*self.out_dir.glob("shard*.done"), *self.out_dir.glob("plan*.json")]:
            p.unlink()
        for folder in sorted(class_dirs, reverse=True) + [self.out_dir / SPLIT]:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: files we did not write stay
        left = sorted(p.name for p in self.out_dir.iterdir() if not _ignorable(p.name))
        log.info(
            "overwrite: removed %d files of the previous job in %s%s",
            removed,
            self.out_dir,
            f"; left in place (not written by it): {left[:5]}" if left else "",
        )

    def _recover(self) -> dict[str, dict]:
        """This shard's manifest read back: a line stays only if its file lies in the folder and decodes
        (a killed run's torn last line, a file lost with the page cache in a power cut, or a line edited to
        point elsewhere are dropped, and the image made again)."""
        records: dict[str, dict] = {}
        if self.manifest_path.is_file():
            for line in self.manifest_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed run
                if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                    continue
                # a rejected candidate has no file; any other line needs its file in place, whole
                if not is_kept(rec) or self._file_ok(rec):
                    records[rec["id"]] = rec
        # Rewrite the manifest cleanly (atomically); orphan files are dropped by remove_orphans.
        atomic_write_text(self.manifest_path, "".join(manifest_json(r) + "\n" for r in records.values()))
        return records

    def _file_ok(self, rec: dict) -> bool:
        try:
            read_image_array(record_path(self.out_dir, rec))
        except ConfigError as e:
            if os.path.exists(os.path.join(self.out_dir, str(rec.get("file")))):
                log.warning("dropping manifest line %r: %s", rec.get("id"), e)
            return False
        return True

    def remove_orphans(self, planned_ids: Iterable[str]) -> int:
        """Delete PNGs of planned ids that have no manifest line (written, then killed), and the
        temp files of planned ids a killed run left half-written (only this job's ids: another
        shard may be writing its own right now)."""
        removed = 0
        by_dir: dict[str, set[str]] = collections.defaultdict(set)
        for rec_id, cls_dir in planned_ids:
            by_dir[cls_dir].add(rec_id)
        for cls_dir, ids in by_dir.items():
            folder = self.out_dir / SPLIT / cls_dir
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):  # one listing per class folder
                name = entry.name
                if name.startswith(".") and name.endswith(".tmp"):
                    stale = name[1:].split(".png.", 1)[0] in ids  # .<id>.png.<random>.tmp
                else:
                    stale = name.endswith(".png") and name[:-4] in ids and name[:-4] not in self.records
                if stale:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    # -- state -------------------------------------------------------------------
    def has(self, rec_id: str) -> bool:
        """Whether ``rec_id`` is in the folder already (written, or rejected by the filter)."""
        return rec_id in self.records

    def is_kept(self, rec_id: str) -> bool:
        """Whether ``rec_id`` is in the folder as an image (a filter-rejected candidate is not)."""
        rec = self.records.get(rec_id)
        return rec is not None and is_kept(rec)

    # -- writing -------------------------------------------------------------------
    def relpath(self, rec_id: str, label: int) -> str:
        return f"{SPLIT}/{self.class_dirs[label]}/{rec_id}.png"

    def write(self, record: dict[str, Any], image: np.ndarray) -> dict:
        """Write one image, then append its manifest line (``record`` needs ``id`` and ``label``).

        The file is written in the background; its manifest line follows once it is in
        place (at the latest on :meth:`flush` / :meth:`close`)."""
        rec_id = _checked_id(record)
        rel = self.relpath(rec_id, int(record["label"]))
        path = os.path.join(self.out_dir, rel)
        self._dirty_dirs.add(os.path.dirname(path))
        record = {"file": rel, "class_name": self.class_names[int(record["label"])], **record}
        if self._pool is None:
            atomic_save_image(path, image)
            self._append(record)
        else:
            self._queue(record, path, np.array(image))
        return record

    def write_many(self, records: list[dict[str, Any]], images) -> list[dict]:
        """:meth:`write` of each record and its image, in order (a shard writer encodes them together)."""
        return [self.write(record, image) for record, image in zip(records, images)]

    def write_rejected(self, record: dict[str, Any]) -> dict:
        """A manifest line with no file (a candidate the quality filter rejected), kept in
        order after the pending writes so a resumed run skips it."""
        record = {"class_name": self.class_names[int(record["label"])], **record, "kept": False}
        if self._pool is None:
            self._append(record)
        else:
            self._queue(record, None, None)
        return record

    def _queue(self, record: dict, path: str | None, image: np.ndarray | None) -> None:
        self._batch.append((record, path, image))
        if len(self._batch) >= self.chunk:
            self._send()
            self._drain(self.max_pending)

    def _send(self) -> None:
        """Hand the queued images to a writer thread as one task."""
        if self._batch:
            batch, self._batch = self._batch, []
            self._pending.append(([record for record, _, _ in batch], self._submit(batch)))
            self._pending_records += len(batch)

    def _submit(self, batch: list[tuple[dict, str | None, np.ndarray | None]]):
        """The writer thread's task for a chunk (its future): the image files."""
        return self._pool.submit(_save_images, [(path, image) for _, path, image in batch if path is not None])

    def _append(self, record: dict) -> None:
        if self._fh is None:
            self._fh = open(self.manifest_path, "a", encoding="utf-8")
        self._fh.write(manifest_json(record) + "\n")
        self.records[record["id"]] = record
        if self.watch is not None and is_kept(record):
            self.watch(record)
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self._sync()

    def _sync(self) -> None:
        """Make the lines written so far durable: the class folders first (the renamed files' names),
        then the manifest (fsync), so a line that survives a power cut names a file that survived."""
        for d in sorted(self._dirty_dirs):
            fsync_dir(d)
        self._dirty_dirs.clear()
        if self._fh is not None:
            self._fh.flush()
            if io_durable():
                os.fsync(self._fh.fileno())
        self._unflushed = 0

    def _drain(self, keep: int) -> None:
        while self._pending_records > keep:
            records, future = self._pending.popleft()
            future.result()  # re-raises a failed write
            self._pending_records -= len(records)
            self._written(records)

    def _written(self, records: list[dict]) -> None:
        """A chunk's files are in place: their manifest lines follow."""
        for record in records:
            self._append(record)

    def flush(self) -> None:
        """Wait for every pending file and write out its manifest line."""
        if self._pool is not None:
            self._send()
        self._drain(0)
        self._sync()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._close_manifest()
            if self._own_lock:
                self.lock.release()

    def _close_manifest(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _checked_id(record: dict) -> str:
    """A record's id, refused if it could name a path (an id is a file name, or a shard member's key)."""
    rec_id = str(record["id"])
    if "/" in rec_id or "\\" in rec_id or "\x00" in rec_id:  # class folders are safe_class_dir names
        raise ConfigError(
            f"refusing to write image id {rec_id!r}: an id is a file name inside "
            f"`out_dir`/{SPLIT}/<class>, without path separators."
        )
    return rec_id


def _save_images(items: list[tuple[str, np.ndarray]]) -> None:
    """One writer-thread task: ``atomic_save_image`` for each (path, image), in order."""
    for path, image in items:
        atomic_save_image(path, image)


def finish_shard(out_dir: str | os.PathLike, shard: int, num_shards: int, items: int) -> bool:
    """Mark shard ``shard`` done; True for exactly one shard of the job: the one that finds every shard
    done and no merge made yet, which then merges the manifests (and the caller scores the folder and
    calls :func:`mark_merged`). Shards finishing together wait for each other's check here only (a
    short ``claim.lock``); a merger killed before :func:`mark_merged` is followed by whichever shard
    is re-run."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / f"shard{shard:03d}-of-{num_shards:03d}.done", {"items": int(items)})
    with FolderLock(out_dir, CLAIM_LOCK, "generate.py job").acquire(blocking=True):
        done = all((out_dir / f"shard{s:03d}-of-{num_shards:03d}.done").is_file() for s in range(num_shards))
        if not done or (out_dir / "merged.json").is_file():
            return False
        merging = FolderLock(out_dir, "merge.lock", "generate.py merge")
        try:
            merging.acquire()
        except ConfigError:
            return False  # another shard is merging right now
    try:
        if (out_dir / "merged.json").is_file():
            merging.release()
            return False
        log.info("shard %d of %d: every shard is done; merging the manifests", shard, num_shards)
        merge_manifests(out_dir, num_shards)
    except BaseException:
        merging.release()
        raise
    _MERGE_LOCKS[str(out_dir)] = merging
    return True


_MERGE_LOCKS: dict[str, FolderLock] = {}


def mark_merged(out_dir: str | os.PathLike, num_shards: int) -> None:
    """The merge (and report) of a sharded job is complete: no later shard merges again."""
    atomic_write_json(Path(out_dir) / "merged.json", {"num_shards": int(num_shards)})
    lock = _MERGE_LOCKS.pop(str(Path(out_dir)), None)
    if lock is not None:
        lock.release()


def merge_manifests(out_dir: str | os.PathLike, num_shards: int) -> list[dict]:
    """Merge shard manifests into ``manifest.jsonl`` (sorted by id), once all shards are done."""
    out_dir = Path(out_dir)
    records = []
    for s in range(num_shards):
        p = out_dir / manifest_shard_name(s, num_shards)
        if not p.is_file():
            raise ConfigError(f"shard manifest {p} is missing; run `shard={s} num_shards={num_shards}` first.")
        records += [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    records.sort(key=lambda r: r["id"])
    atomic_write_text(out_dir / MANIFEST, "".join(manifest_json(r) + "\n" for r in records))
    return records
