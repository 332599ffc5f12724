"""OUT/train/metadata.jsonl: the folder loads with Hugging Face ``imagefolder`` with its provenance columns."""

from __future__ import annotations

import collections
import json

import pytest

from imgaug_gen.export import HF_COLUMNS, hf_metadata_rows, is_kept, read_manifest
from imgaug_gen.jobs.generate import generate

from conftest import files_bytes, gen_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

FILTER = [
    "filter.enabled=true",
    "filter.tau=0.1",
    "n_per_class=3",
    "include_real=false",
    "score=false",
    "batch_size=8",
    "augment=light",
]


def _metadata(out):
    return [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]


def _load_hf(out, cache):
    import datasets  # a dev extra

    return datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(cache))


def test_folder_loads_with_hf_imagefolder_and_provenance(trained_cgan, tmp_path):
    import torchvision

    out = tmp_path / "out"
    generate(gen_cfg(trained_cgan, out))
    records = read_manifest(out)
    rows = _metadata(out)
    assert len(rows) == len(records) == 100
    assert all(list(r) == [*HF_COLUMNS, "confidence"] for r in rows)  # one schema on every line
    by_id = {r["id"]: r for r in records}
    for row in rows:
        rec = by_id[row["id"]]
        assert f"train/{row['file_name']}" == rec["file"] and (out / "train" / row["file_name"]).is_file()
        assert row["label"] == rec["class_name"] and row["label_id"] == rec["label"]
        assert (row["source"], row["mode"], row["seed"]) == (rec["source"], rec["mode"], rec["seed"])
        syn = rec["source"] == "synthetic"
        assert row["generator"] == ("cgan" if syn else None)
        assert row["confidence"] == rec["scores"]["confidence"]  # real copies are scored too
        assert row["source_id"] == rec.get("source_id") and row["augmented"] is False
    assert not list((out / "train").glob(".metadata*"))  # written atomically: no temp file left

    ds = _load_hf(out, tmp_path / "hf")
    assert len(ds) == 100
    assert {"image", "label", "label_id", "source", "seed", "mode", "generator", "confidence"} <= set(ds.column_names)
    got = collections.Counter(zip(ds["label"], ds["source"]))
    assert got == {**{(str(c), "real"): 6 for c in range(10)}, **{(str(c), "synthetic"): 4 for c in range(10)}}
    syn_seeds = sorted(s for s, src in zip(ds["seed"], ds["source"]) if src == "synthetic")
    assert syn_seeds == sorted(r["seed"] for r in records if r["source"] == "synthetic")
    assert all(s is None for s, src in zip(ds["seed"], ds["source"]) if src == "real")
    row = ds[0]
    assert row["image"].size == (16, 16) and row["label"] == str(row["label_id"])
    # the string label becomes a ClassLabel in the generator's class order
    from datasets import ClassLabel

    names = [str(c) for c in range(10)]
    enc = ds.cast_column("label", ClassLabel(names=names))
    assert enc.features["label"].names == names and enc["label"] == ds["label_id"]

    # torchvision's ImageFolder still sees only the images (metadata.jsonl sits beside the class folders)
    tv = torchvision.datasets.ImageFolder(out / "train")
    assert len(tv) == 100 and tv.classes == names


def test_shards_and_filter_metadata_lists_only_kept_images(trained_cgan, tmp_path):
    out = tmp_path / "two"
    generate(gen_cfg(trained_cgan, out, *FILTER, "shard=0", "num_shards=2"))
    assert not (out / "train" / "metadata.jsonl").exists()  # not before the manifests are merged
    generate(gen_cfg(trained_cgan, out, *FILTER, "shard=1", "num_shards=2"))
    recs = read_manifest(out, include_rejected=True)
    kept = [r for r in recs if is_kept(r)]
    assert kept and len(kept) < len(recs)  # some candidates rejected
    rows = _metadata(out)
    assert (
        sorted(f"train/{r['file_name']}" for r in rows) == sorted(files_bytes(out)) == sorted(r["file"] for r in kept)
    )
    assert {r["id"] for r in rows} == {r["id"] for r in kept}
    score_names = sorted({k for r in kept for k in r["scores"]})
    assert {"confidence", "nearest_real_distance", "nearest_real_index"} <= set(score_names)
    assert all(list(r) == [*HF_COLUMNS, *score_names] for r in rows)
    assert all(r["augmented"] is True and isinstance(r["nearest_real_index"], int) for r in rows)
    ds = _load_hf(out, tmp_path / "hf")
    assert len(ds) == len(kept) and set(ds["source"]) == {"synthetic"}
    assert sorted(ds["seed"]) == sorted(r["seed"] for r in kept)

    # a re-run opens the folder: the finished job's metadata is dropped until the job finishes again
    lines = (out / "manifest.shard001-of-002.jsonl").read_text().splitlines()
    (out / "manifest.shard001-of-002.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    (out / "shard001-of-002.done").unlink()
    generate(gen_cfg(trained_cgan, out, *FILTER, "shard=0", "num_shards=2"))
    assert not (out / "train" / "metadata.jsonl").exists()
    generate(gen_cfg(trained_cgan, out, *FILTER, "shard=1", "num_shards=2"))
    assert sorted(r["id"] for r in _metadata(out)) == sorted(r["id"] for r in kept)


def test_metadata_rows_one_schema_and_refusals():
    recs = [
        {
            "id": "a",
            "file": "train/x/a.png",
            "class_name": "x",
            "label": 0,
            "source": "real",
            "mode": "real",
            "seed": None,
            "generator": None,
            "scores": {},
        },
        {
            "id": "b",
            "file": "train/y/b.png",
            "class_name": "y",
            "label": 1,
            "source": "synthetic",
            "mode": "img2img",
            "seed": 7,
            "generator": {"kind": "ddpm", "run_dir": "/r"},
            "strength": 0.5,
            "source_id": "a",
            "scores": {"confidence": 1, "id": 0.25},
            "augment": {"seed": 1, "transforms": []},
        },
        {"id": "c", "class_name": "y", "label": 1, "source": "synthetic", "kept": False, "scores": {}},
    ]
    rows = hf_metadata_rows(recs)
    assert [r["id"] for r in rows] == ["a", "b"]  # the rejected candidate has no file: not listed
    assert list(rows[0]) == list(rows[1]) == [*HF_COLUMNS, "confidence", "score_id"]
    assert rows[1]["confidence"] == 1 and type(rows[1]["confidence"]) is int  # all-int scores stay ints
    assert rows[0]["confidence"] is None and rows[1]["score_id"] == 0.25
    assert (rows[1]["generator"], rows[1]["strength"], rows[1]["source_id"]) == ("ddpm", 0.5, "a")
    assert rows[1]["augmented"] is True and rows[0]["augmented"] is False
    assert rows[1]["file_name"] == "y/b.png"
    from imgaug_gen.errors import ConfigError

    with pytest.raises(ConfigError, match="not under train/"):
        hf_metadata_rows([{**recs[0], "file": "elsewhere/a.png"}])
