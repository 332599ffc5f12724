"""generate.py format=webdataset | parquet: determinism, SIGKILL and resume, the shard union (explicit shards
and a Hydra multirun on submitit's local launcher), the readers (datasets, webdataset, the mixed datasets,
evaluate.py), errors."""

from __future__ import annotations

import glob
import hashlib
import json
import pickle
import signal
import subprocess
import sys

import fastcli
import numpy as np
import pytest

from imgaug_gen.data.manifest import RecordImages, read_manifest
from imgaug_gen.errors import ConfigError

from conftest import ROOT, cli_env, gen_cfg, kill_when

FORMATS = ["webdataset", "parquet"]


def shard_bytes(out_dir) -> dict[str, str]:
    """{shard name: sha256} of every shard under out_dir/train."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out_dir / "train").iterdir())}


def images_by_id(out_dir) -> dict[str, bytes]:
    """{id: decoded pixels} of every image the manifest lists (any format)."""
    reader = RecordImages(out_dir)
    return {r["id"]: reader.array(r).tobytes() for r in read_manifest(out_dir)}


def rows(out_dir) -> list[str]:
    """The manifest's lines without where each image lies (format-independent), sorted."""
    drop = ("file", "offset", "size", "row")
    return sorted(
        json.dumps({k: v for k, v in r.items() if k not in drop}, sort_keys=True)
        for r in read_manifest(out_dir, include_rejected=True)
    )


def consistent(out_dir, fmt):
    """Every listed image in a listed shard, every shard listed, no temp file, no id twice."""
    recs = read_manifest(out_dir)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids))
    suffix = ".tar" if fmt == "webdataset" else ".parquet"
    on_disk = sorted(p.relative_to(out_dir).as_posix() for p in (out_dir / "train").iterdir())
    assert on_disk == sorted({r["file"] for r in recs}) and all(f.endswith(suffix) for f in on_disk)
    assert not [p for p in out_dir.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def folder_ref(trained_cgan, tmp_path_factory):
    """The same job as image files: every shard format must hold the same images and rows."""
    from imgaug_gen.jobs.generate import generate

    out = tmp_path_factory.mktemp("ref") / "folder"
    generate(gen_cfg(trained_cgan, out, "score=false", "augment=light"))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_shards_are_deterministic_hold_the_folder_job_and_load_everywhere(trained_cgan, folder_ref, tmp_path, fmt):
    import datasets
    import webdataset as wds

    from imgaug_gen.jobs.generate import generate

    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        generate(gen_cfg(trained_cgan, out, "score=false", "augment=light", f"format={fmt}", "shard_size=7"))
    n = len(read_manifest(folder_ref))
    assert shard_bytes(a) == shard_bytes(b) and len(shard_bytes(a)) == -(-n // 7)  # byte-identical, 7 per shard
    assert images_by_id(a) == images_by_id(folder_ref)  # the same pixels as the PNG files
    assert rows(a) == rows(folder_ref)  # the same provenance, augmentation included
    consistent(a, fmt)
    assert (a / "preview.png").is_file() and not (a / "train" / "metadata.jsonl").exists()
    datasets.disable_progress_bars()
    kw = {"data_files": {"train": sorted(glob.glob(str(a / "train" / "*")))}, "cache_dir": str(tmp_path / "hf")}
    ds = datasets.load_dataset(fmt, split="train", **kw)
    assert len(ds) == n
    by_id = {r["id"]: r for r in read_manifest(a)}
    if fmt == "webdataset":
        first = ds[0]
        assert first["json"]["id"] in by_id and first["cls"] == by_id[first["json"]["id"]]["label"]
        assert first["png"].size == (16, 16)
        stream = (
            wds.WebDataset(kw["data_files"]["train"], shardshuffle=False).decode("rgb8").to_tuple("png", "cls", "json")
        )
        seen = [(js["id"], cls) for _, cls, js in stream]
        assert sorted(seen) == sorted((i, r["label"]) for i, r in by_id.items())
    else:
        assert ds.features["label_id"].names == sorted(ds.unique("label"), key=int)
        row = ds[len(ds) - 1]
        rec = by_id[row["id"]]
        assert row["label_id"] == rec["label"] and row["source"] == rec["source"]
        assert np.asarray(row["image"]).tobytes() == images_by_id(a)[row["id"]]
        assert json.loads(row["json"])["seed"] == rec.get("seed")


def test_webdataset_job_killed_with_sigkill_then_rerun_writes_the_same_shards(trained_cgan, tmp_path):
    from imgaug_gen.jobs.generate import generate

    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["n_per_class=150", "progress=false", "score=false", "batch_size=16", "format=webdataset", "shard_size=100"]
    generate(gen_cfg(trained_cgan, ref, *args))
    cmd = [sys.executable, str(ROOT / "generate.py"), f"run_dir={trained_cgan}", f"out_dir={out}", *args]
    proc = fastcli.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    manifest = out / "manifest.jsonl"
    kill_when(proc, lambda: manifest.is_file() and manifest.stat().st_size > 60_000)  # >= 2 shards listed
    assert proc.returncode == -signal.SIGKILL
    assert 0 < len(read_manifest(out)) < 1500 and not (out / "metrics.json").exists()
    rerun = fastcli.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert shard_bytes(out) == shard_bytes(ref)
    assert (out / "manifest.jsonl").read_bytes() == (ref / "manifest.jsonl").read_bytes()
    consistent(out, "webdataset")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_shard_renamed_but_not_yet_listed_and_a_half_shard_are_made_again(trained_cgan, tmp_path, fmt):
    """The kill points a timed SIGKILL rarely hits: after a shard's rename, before its manifest lines;
    and mid-shard (its temp file)."""
    from imgaug_gen.jobs.generate import generate

    out = tmp_path / "out"
    cfg = gen_cfg(trained_cgan, out, "score=false", f"format={fmt}", "shard_size=9")
    generate(cfg)
    whole, manifest = shard_bytes(out), (out / "manifest.jsonl").read_bytes()
    lines = manifest.decode().splitlines(keepends=True)
    last = json.loads(lines[-1])["file"]
    kept = [ln for ln in lines if json.loads(ln)["file"] != last]
    (out / "manifest.jsonl").write_text("".join(kept[:-9]))  # the last two shards unlisted: one stays on disk
    (out / last).unlink()
    (out / f"{last[: -len(last.split('/')[-1])]}.{last.split('/')[-1]}.0123abcd.tmp").write_bytes(b"half a shard")
    (out / "metrics.json").unlink()
    generate(cfg)
    assert shard_bytes(out) == whole and (out / "manifest.jsonl").read_bytes() == manifest
    consistent(out, fmt)


def test_shards_of_a_multirun_on_submitit_local_equal_one_process(trained_cgan, tmp_path):
    """python generate.py -m 'shard=range(0,3)' num_shards=3 hydra/launcher=submitit_local (the same
    command as on SLURM with hydra/launcher=submitit_slurm): disjoint shards whose union is the
    one-process job; the progress is read from the shards' records."""
    from imgaug_gen.jobs.generate import generate
    from imgaug_gen.progress import job_progress

    one, many = tmp_path / "one", tmp_path / "many"
    common = ["score=false", "format=webdataset", "shard_size=5", "progress=false", "n_per_class=4"]
    generate(gen_cfg(trained_cgan, one, *common))
    out = fastcli.run(
        [sys.executable, str(ROOT / "generate.py"), "-m", "shard=range(0,2)", "num_shards=2",
         "hydra/launcher=submitit_local", f"run_dir={trained_cgan}", f"out_dir={many}", *common],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    names = sorted(shard_bytes(many))
    assert {n.split("-")[1] for n in names} == {"000of002", "001of002"}  # disjoint files per shard
    assert images_by_id(many) == images_by_id(one) and rows(many) == rows(one)
    prog = job_progress(many)
    assert prog["num_shards"] == 2 and prog["done_shards"] == 2 and prog["merged"]
    assert prog["written"] == prog["planned"] == len(read_manifest(one))
    assert sorted(p.name for p in (many / "logs").iterdir()) == [f"shard{s}-of-2" for s in range(2)]


def test_progress_of_a_job_still_running(trained_cgan, tmp_path):
    from imgaug_gen.jobs.generate import generate
    from imgaug_gen.progress import job_progress, main

    out = tmp_path / "out"
    generate(gen_cfg(trained_cgan, out, "score=false", "format=parquet", "shard=1", "num_shards=2"))
    prog = job_progress(out)
    assert [s["done"] for s in prog["shards"]] == [False, True] and not prog["merged"]
    assert prog["shards"][0]["planned"] is None and prog["shards"][1]["written"] == prog["shards"][1]["planned"] > 0
    assert main([str(out)]) == 0
    with pytest.raises(ConfigError, match="job record"):
        job_progress(tmp_path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_consumption_policies_read_shards(trained_cgan, folder_ref, tmp_path, fmt):
    from imgaug_gen.data.mixed import MixedDataModule, MixedFolderDataset
    from imgaug_gen.jobs.generate import generate

    out = tmp_path / "out"
    generate(gen_cfg(trained_cgan, out, "score=false", "augment=light", f"format={fmt}", "shard_size=10"))
    ds, ref = MixedFolderDataset(out), MixedFolderDataset(folder_ref)
    assert (ds.n_real, ds.n_syn) == (ref.n_real, ref.n_syn)
    ids = [r["id"] for r in ds.records]
    where = {r["id"]: i for i, r in enumerate(ref.records)}
    for i in np.random.default_rng(0).permutation(len(ds))[:40]:  # random access, any order
        assert np.array_equal(ds.image(int(i)), ref.image(where[ids[i]]))
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers get a copy
    assert np.array_equal(clone.image(len(ds) - 1), ds.image(len(ds) - 1))
    dm = MixedDataModule(out, {"name": "replace", "p": 0.5}, batch_size=8, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 1, 16, 16) and batch["synthetic"].any() and not batch["synthetic"].all()


def test_evaluate_consumes_a_shard_folder(trained_cgan, tmp_path):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.evaluate import evaluate
    from imgaug_gen.jobs.generate import generate

    folder = tmp_path / "gen"
    generate(gen_cfg(trained_cgan, folder, "score=false", "include_real=false", "format=webdataset"))
    ev = evaluate(
        compose_config(
            "evaluate",
            [
                f"out_dir={tmp_path / 'ev'}",
                "seeds=[0]",
                "classifier.steps=15",
                "metrics.domain_steps=30",
                "augment.copies_per_image=2",
                "synthetic_copies=1",
                "shots=[6]",
                "generators.cgan.enabled=false",
                "data.val_fraction=0",
                "selection=none",
                f"+generators.made.folder={folder}",
                "+generators.made.policies=[concat]",
                "policies={concat:{name:concat}}",
                "methods=[real,real+made+classical@concat]",
            ],
        )  # fmt: skip
    )
    assert ev["results"]["6"]["real+made+classical@concat"]["n_train"] == 180 + 80


@pytest.mark.parametrize(
    "extra, match",
    [(["format=zip"], r"`format` = 'zip'"), (["format=webdataset", "shard_size=0"], r"`shard_size` = 0")],
)
def test_bad_format_or_shard_size_fail_before_any_work(trained_cgan, tmp_path, extra, match):
    from imgaug_gen.jobs.generate import generate

    with pytest.raises(ConfigError, match=match):
        generate(gen_cfg(trained_cgan, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_parquet_without_pyarrow_names_the_install(trained_cgan, tmp_path, monkeypatch):
    from imgaug_gen.jobs.generate import generate

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"imgaug_gen\[shards\]"):
        generate(gen_cfg(trained_cgan, tmp_path / "out", "format=parquet"))


def test_changing_format_is_another_job_and_overwrite_removes_only_its_shards(trained_cgan, tmp_path):
    from imgaug_gen.jobs.generate import generate

    out = tmp_path / "out"
    generate(gen_cfg(trained_cgan, out, "score=false", "format=webdataset"))
    (out / "train" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="different job"):
        generate(gen_cfg(trained_cgan, out, "score=false", "format=parquet"))
    generate(gen_cfg(trained_cgan, out, "score=false", "format=parquet", "overwrite=true"))
    assert sorted(p.suffix for p in (out / "train").iterdir()) == [".parquet", ".txt"]
    assert (out / "train" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"offset": -1}, "`offset` = -1"),
        ({"size": 1 << 40}, "`size`"),
        ({"offset": 1 << 30}, "ends before its member"),
        ({"file": "train/../../x.tar"}, "file"),
    ],
)
def test_a_tampered_shard_line_is_refused_with_its_key(trained_cgan, tmp_path, edit, match):
    from imgaug_gen.data.mixed import MixedFolderDataset
    from imgaug_gen.jobs.generate import generate

    out = tmp_path / "out"
    generate(gen_cfg(trained_cgan, out, "score=false", "format=webdataset"))
    recs = [{**r, **edit} for r in read_manifest(out)]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ConfigError, match=match):
        MixedFolderDataset(out).image(0)


def test_the_filter_and_the_scores_on_shards_match_the_folder_job(trained_cgan, tmp_path):
    from imgaug_gen.jobs.generate import generate

    opts = ["filter.enabled=true", "filter.tau=0.3", "shard_size=6", "n_per_class=5"]
    metrics = {}
    for fmt in ("folder", "webdataset"):
        metrics[fmt] = generate(gen_cfg(trained_cgan, tmp_path / fmt, f"format={fmt}", *opts))
    assert rows(tmp_path / "webdataset") == rows(tmp_path / "folder")  # kept and rejected candidates alike
    assert any(not r.get("kept", True) for r in read_manifest(tmp_path / "webdataset", include_rejected=True))
    for key in ("fid", "kid_mean", "counts", "filter", "n_scored"):
        assert metrics["webdataset"][key] == metrics["folder"][key], key
    assert images_by_id(tmp_path / "webdataset") == images_by_id(tmp_path / "folder")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_listed_shard_cut_short_is_made_again(trained_cgan, tmp_path, fmt):
    """A listed shard that lost its end (a copy cut short, a disk without fsync): its lines are dropped on
    resume and its images written again, whole, into a shard of the same bytes (under the next free name)."""
    from imgaug_gen.jobs.generate import generate

    out = tmp_path / "out"
    cfg = gen_cfg(trained_cgan, out, "score=false", f"format={fmt}", "shard_size=9")
    generate(cfg)
    whole, manifest = shard_bytes(out), (out / "manifest.jsonl").read_bytes()
    first = sorted((out / "train").iterdir())[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    (out / "metrics.json").unlink()
    generate(cfg)
    # the same shard bytes; the remade one takes the next free name, so no listed name ever changes meaning
    assert sorted(shard_bytes(out).values()) == sorted(whole.values()) and "shard-00000" not in str(shard_bytes(out))
    consistent(out, fmt)
    before = [json.loads(ln) for ln in manifest.decode().splitlines()]
    assert rows(out) == sorted(
        json.dumps({k: v for k, v in r.items() if k not in ("file", "offset", "size", "row")}, sort_keys=True)
        for r in before
    )


@pytest.mark.parametrize("fmt", ["folder", *FORMATS])
def test_the_reports_counts_and_preview_are_the_manifests_fresh_or_resumed(trained_cgan, tmp_path, fmt):
    """A fresh one-process job counts its kept lines and picks the preview's as it writes them; a resumed one
    counts the whole manifest again. Both equal a pass over the finished manifest (real copies, augmented
    copies and the filter's rejected candidates included)."""
    from imgaug_gen.jobs.generate import generate
    from imgaug_gen.jobs.scoring import tally_manifest
    from imgaug_gen.visual import preview_sheet

    out = tmp_path / fmt
    opts = [f"format={fmt}", "shard_size=5", "include_real=true", "augment=light", "score=false"]
    opts += ["filter.enabled=true", "filter.tau=0.3"]

    def check(metrics):
        tally = tally_manifest(out, list(metrics["counts"]), preview=True)
        assert {k: metrics[k] for k in ("counts", "counts_by_mode", "n_synthetic", "n_real")} == tally.summary()
        assert metrics["n_real"] > 0 and metrics["n_synthetic"] > 0
        preview_sheet(out, tally.picks.records, list(metrics["counts"]), path=tmp_path / "again.png")
        assert (tmp_path / "again.png").read_bytes() == (out / "preview.png").read_bytes()

    check(generate(gen_cfg(trained_cgan, out, *opts)))
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[: len(lines) // 2]))  # a run killed half-way through its lines
    metrics = generate(gen_cfg(trained_cgan, out, *opts))
    assert 0 < metrics["images_written_now"] < sum(v["synthetic"] + v["real"] for v in metrics["counts"].values())
    check(metrics)


def test_a_tar_members_png_is_stored_only_where_it_fits_in_one_block():
    """Tar members take whole 512-byte blocks: a PNG that fits in one uncompressed is stored (zlib level 0),
    larger ones are compressed; both decode to the same pixels."""
    import io
    import tarfile

    from PIL import Image

    from imgaug_gen.io import png_bytes, stored_png_size
    from imgaug_gen.shards import member_png

    rng = np.random.default_rng(0)
    blocks = lambda n, size, c: np.repeat(np.repeat(rng.integers(0, 256, (n, n, c), dtype=np.uint8), size, 0), size, 1)
    small, large = blocks(4, 4, 1), blocks(4, 8, 3)  # 16 px grey, 32 px RGB, both compressible
    for image, stored in ((small, True), (large, False)):
        png = member_png(image)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))).reshape(image.shape), image)
        assert (len(png) == stored_png_size(image.shape)) is stored
        assert (stored_png_size(image.shape) <= tarfile.BLOCKSIZE) is stored
    assert len(png_bytes(small)) < stored_png_size(small.shape)  # level 1 would have compressed it, for nothing


SHAPES = [(5, 16, 16, 1), (3, 16, 16), (4, 8, 8, 3), (2, 1, 1, 1), (6, 13, 7, 4), (3, 5, 9, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_a_batch_of_stored_pngs_is_the_bytes_of_each_image_encoded_alone(shape):
    """The whole-batch encoder (its rows and Adler-32 sums made in numpy) writes each image's PNG exactly as
    the one-image encoder does, and PIL reads the pixels back; the tar members' batch path equals
    member_png image by image, stored or not."""
    import io

    from PIL import Image

    from imgaug_gen.io import encode_png, stored_pngs
    from imgaug_gen.shards import member_png, member_pngs

    batch = np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8)
    pngs = stored_pngs(batch)
    assert pngs == [encode_png(a, 0) for a in batch]
    for png, a in zip(pngs, batch):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))).reshape(a.shape), a)
    assert member_pngs(list(batch)) == [member_png(a) for a in batch]
    mixed = [batch[0], np.zeros((40, 40, 3), np.uint8), batch[-1]]  # one too large to store: each alone
    assert member_pngs(mixed) == [member_png(a) for a in mixed]


def test_the_writer_thread_by_default_but_inline_for_shards_on_a_cpu():
    from omegaconf import OmegaConf

    from imgaug_gen.jobs.generate import io_workers_for

    cfg = lambda fmt, n=None: OmegaConf.create({"format": fmt, "io_workers": n})
    assert [io_workers_for(cfg("folder"), d) for d in ("cpu", "cuda")] == [1, 1]
    assert [io_workers_for(cfg(f), "cpu") for f in FORMATS] == [0, 0]
    assert [io_workers_for(cfg(f), "cuda") for f in FORMATS] == [1, 1]
    assert io_workers_for(cfg("webdataset", 2), "cpu") == 2 and io_workers_for(cfg("folder", 0), "cuda") == 0


def test_batches_rendered_on_several_streams_are_the_bytes_of_one_stream(trained_cgan, tmp_path):
    """render_streams=3 (three batches at once, one torch thread each) writes the shards, the manifest and the
    images of render_streams=1, real copies and augmentation included; the process's thread count comes back."""
    import torch

    from imgaug_gen.jobs.generate import generate

    threads = torch.get_num_threads()
    a, b = tmp_path / "one", tmp_path / "three"
    for out, n in ((a, 1), (b, 3)):
        extra = ("score=false", "augment=light", "format=webdataset", "shard_size=9", "batch_size=4")
        generate(gen_cfg(trained_cgan, out, *extra, f"render_streams={n}"))
    assert torch.get_num_threads() == threads
    assert shard_bytes(a) == shard_bytes(b) and len(shard_bytes(a)) > 1
    assert (a / "manifest.jsonl").read_bytes() == (b / "manifest.jsonl").read_bytes()
    assert {r["source"] for r in read_manifest(a)} == {"real", "synthetic"}


@pytest.mark.parametrize("kind", ["cgan", "ddpm"])
def test_concurrent_sampling_gives_each_batch_its_own_images(trained_cgan, kind):
    """Batches rendered on a pool, ahead of the consumer, come back in order with the images of sample() run
    alone on one thread, from a generator left in training mode (the pool holds it in eval mode, and puts it
    back); the process's thread count comes back."""
    import torch
    from omegaconf import OmegaConf

    from imgaug_gen.generators.base import load_generator
    from imgaug_gen.jobs.generate import _render
    from imgaug_gen.jobs.plan import Item
    from imgaug_gen.jobs.render import render_pool, render_streams_for, rendered

    from factories_ddpm import make_generator

    gen = load_generator(trained_cgan / "generator") if kind == "cgan" else make_generator()
    assert gen.concurrent_sampling
    gen.train()
    cfg = OmegaConf.create({"sample_kwargs": {"guidance_scale": None}, "render_streams": None})
    items = [Item(id=f"s{i}", label=i % 3, source="synthetic", mode="sample", seed=100 + i) for i in range(10)]
    groups = [items[i : i + 3] for i in range(0, 10, 3)]
    threads_before = torch.get_num_threads()
    with render_pool(gen, 2) as pool:
        got = [(g, x) for g, x in rendered(lambda g: _render(gen, g, None, cfg), groups, pool, 2)]
    assert torch.get_num_threads() == threads_before
    assert gen.training and all(m.training for m in gen.modules())
    gen.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each stream computes on one thread (a DDPM's sums round by the thread count)
    want = gen.sample([it.label for it in items], seeds=[it.seed for it in items], batch_size=3)
    torch.set_num_threads(threads)
    assert [g for g, _ in got] == groups
    assert np.array_equal(np.concatenate([x for _, x in got]), want)
    assert render_streams_for(OmegaConf.create({"render_streams": 4}), gen) == 4
    gen.concurrent_sampling = False  # a kind whose calls share state (sd_lora's pipeline): one stream always
    assert render_streams_for(OmegaConf.create({"render_streams": 4}), gen) == 1
