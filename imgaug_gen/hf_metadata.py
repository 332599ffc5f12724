"""The Hugging Face ``imagefolder`` metadata of a finished output folder: ``OUT/train/metadata.jsonl``, one
line per kept image with its provenance, which the ``imagefolder`` builder turns into columns (``label``,
``source``, ``seed``, scores, ...); ``torchvision``'s ImageFolder ignores it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from imgaug_gen.data.manifest import SPLIT, is_kept
from imgaug_gen.errors import ConfigError
from imgaug_gen.io import atomic_write_text

#: The Hugging Face ``imagefolder`` metadata file, in ``OUT/train``.
HF_METADATA = "metadata.jsonl"

#: metadata.jsonl's columns, in this order on every line (then the manifest's score names).
HF_COLUMNS = (
    "file_name",
    "id",
    "label",
    "label_id",
    "source",
    "mode",
    "seed",
    "generator",
    "source_id",
    "partner_id",
    "strength",
    "blend",
    "prompt",
    "augmented",
)


def _score_columns(records: list[dict]) -> dict[str, type]:
    """Every score name of the records, as int where every value is an int, else float."""
    kinds: dict[str, set[type]] = {}
    for r in records:
        for k, v in (r.get("scores") or {}).items():
            kinds.setdefault(k, set()).add(int if isinstance(v, int) and not isinstance(v, bool) else float)
    return {k: (int if t == {int} else float) for k, t in sorted(kinds.items())}


def provenance_columns(r: dict) -> dict:
    """A manifest line's provenance as flat columns (:data:`HF_COLUMNS` after ``file_name``), shared by
    ``metadata.jsonl`` and the Parquet shards."""
    gen = r.get("generator")
    return {
        "id": r["id"],
        "label": r["class_name"],
        "label_id": int(r["label"]),
        "source": r["source"],
        "mode": r.get("mode"),
        "seed": r.get("seed"),
        "generator": gen.get("kind") if isinstance(gen, dict) else gen,
        **{k: r.get(k) for k in ("source_id", "partner_id", "strength", "blend", "prompt")},
        "augmented": bool(r.get("augment")),
    }


def hf_metadata_rows(records: Iterable[dict]) -> list[dict]:
    """The ``imagefolder`` metadata of the kept records: one dict per image, every dict with the same
    keys (:data:`HF_COLUMNS`, then the score names; ``None`` where a record has no value), so Arrow
    reads one schema. ``file_name`` is relative to ``OUT/train``; ``label`` is the class name (the
    folder name) and ``label_id`` the generator's class index (the manifest's ``label``); ``generator``
    is the generator kind (``None`` for real images); ``augmented`` tells classically augmented images."""
    kept = [r for r in records if is_kept(r)]
    scores = _score_columns(kept)
    rows = []
    for r in kept:
        file = str(r["file"])
        if not file.startswith(f"{SPLIT}/"):
            raise ConfigError(f"manifest line {r.get('id')!r}: file {file!r} is not under {SPLIT}/.")
        row = {"file_name": file[len(SPLIT) + 1 :], **provenance_columns(r)}
        for k, kind in scores.items():
            v = (r.get("scores") or {}).get(k)
            row[k if k not in HF_COLUMNS else f"score_{k}"] = None if v is None else kind(v)
        rows.append(row)
    return rows


def write_hf_metadata(out_dir: str | os.PathLike, records: Iterable[dict]) -> Path:
    """``OUT/train/metadata.jsonl`` from the (final) manifest's records, atomically; returns its path.

    ``datasets.load_dataset("imagefolder", data_dir=OUT)`` then yields one row per image with these
    columns besides ``image`` (see :func:`hf_metadata_rows`)."""
    path = Path(out_dir) / SPLIT / HF_METADATA
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in hf_metadata_rows(records)))
    return path
