"""generate(): the folder, the manifest, metrics.json, determinism, resumption, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgaug_gen.errors import ConfigError
from imgaug_gen.export import read_manifest
from imgaug_gen.jobs.generate import generate

from conftest import files_bytes, gen_cfg


def test_generate_writes_a_ready_to_train_folder(trained_cgan, tmp_path):
    import torchvision

    out = tmp_path / "out"
    metrics = generate(gen_cfg(trained_cgan, out))
    records = read_manifest(out)
    syn = [r for r in records if r["source"] == "synthetic"]
    real = [r for r in records if r["source"] == "real"]
    assert len(syn) == 40 and len(real) == 60  # 4 x 10 classes synthetic, 6 shots x 10 real
    for r in records:
        assert (out / r["file"]).is_file()
        assert r["file"] == f"train/{r['class_name']}/{r['id']}.png"
        assert set(r) >= {"file", "class_name", "label", "source", "seed", "generator", "scores", "id"}
    assert all(r["generator"]["kind"] == "cgan" and 0 <= r["scores"]["confidence"] <= 1 for r in syn)
    assert len({r["id"] for r in records}) == len(records)
    # torchvision ImageFolder and the HF imagefolder layout (split folder / class folder / file)
    ds = torchvision.datasets.ImageFolder(out / "train")
    assert len(ds) == 100 and ds.classes == [str(i) for i in range(10)]
    img, label = ds[0]
    assert img.size == (16, 16)
    m = json.loads((out / "metrics.json").read_text())
    assert m["features"].startswith("domain") and m["n_synthetic"] == 40 and m["n_real"] == 60
    assert np.isfinite(m["fid"]) and m["fid"] > 0 and m["kid_mean"] == pytest.approx(metrics["kid_mean"])
    assert m["counts"]["3"] == {"real": 6, "synthetic": 4}
    assert (out / "config.yaml").is_file() and (out / "preview.png").is_file()
    assert not list(out.rglob("*.tmp"))


def test_same_seed_same_bytes_other_seed_differs(trained_cgan, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(gen_cfg(trained_cgan, a, "score=false", "include_real=false"))
    generate(gen_cfg(trained_cgan, b, "score=false", "include_real=false"))
    generate(gen_cfg(trained_cgan, c, "score=false", "include_real=false", "seed=1"))
    assert files_bytes(a) == files_bytes(b)
    assert files_bytes(a).keys() == files_bytes(c).keys() and files_bytes(a) != files_bytes(c)


def test_resume_after_interrupted_run(trained_cgan, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    generate(gen_cfg(trained_cgan, full, "score=false"))
    generate(gen_cfg(trained_cgan, part, "score=false"))
    # Simulate a kill: last manifest lines lost / torn, one PNG without a manifest line, one temp file.
    lines = (part / "manifest.jsonl").read_text().splitlines()
    (part / "manifest.jsonl").write_text("\n".join(lines[:30]) + "\n" + lines[30][:17])
    (part / "train" / "0" / ".syn_0000000.png.x.tmp").write_bytes(b"half")
    (part / "metrics.json").unlink()
    generate(gen_cfg(trained_cgan, part, "score=false"))
    assert files_bytes(part) == files_bytes(full)
    ids = [r["id"] for r in read_manifest(part)]
    assert len(ids) == len(set(ids)) == 100
    assert sorted(ids) == sorted(r["id"] for r in read_manifest(full))


def test_refuses_other_jobs_folder_unless_overwrite(trained_cgan, tmp_path):
    out = tmp_path / "out"
    generate(gen_cfg(trained_cgan, out, "score=false"))
    with pytest.raises(ConfigError, match="already holds the output of a different job.*overwrite=true"):
        generate(gen_cfg(trained_cgan, out, "score=false", "seed=5"))
    generate(gen_cfg(trained_cgan, out, "score=false", "seed=5", "overwrite=true"))
    assert all(r["seed"] is None or r["source"] == "synthetic" for r in read_manifest(out))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("keep me")
    for extra in ([], ["overwrite=true"]):  # a folder of the user's files: refused either way, nothing deleted
        with pytest.raises(ConfigError, match="is not empty and holds no generate.py job record") as e:
            generate(gen_cfg(trained_cgan, tmp_path / "foreign", *extra))
        assert "overwrite" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["thesis.tex"]
    assert (tmp_path / "foreign" / "thesis.tex").read_text() == "keep me"


@pytest.mark.parametrize(
    "override, match",
    [
        ("mode=paint", r"`mode` = 'paint': input should be 'sample' or 'img2img' \(conf/generate.yaml\)"),
        ("+n_per_clas=5", r"`n_per_clas` is not a key of the generate config .* allowed here: \[.*'n_per_class'"),
        ("filter.max_factor=0.5", r"`filter.max_factor` = 0.5: input should be greater than or equal to 1"),
        ("mix.target_per_class=-2", r"`mix.target_per_class` = -2: input should be greater than or equal to 0"),
        ("n_per_class=-1", "`n_per_class` = -1"),
        ("shard=3", "need 0 <= shard < num_shards"),
        ("mode=img2img", "`mode=img2img` needs a generator that can edit"),
    ],
)
def test_bad_generate_config(trained_cgan, tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        generate(gen_cfg(trained_cgan, tmp_path / "o", override))
    assert not (tmp_path / "o" / "manifest.jsonl").exists()


def test_run_dir_errors(tmp_path):
    with pytest.raises(ConfigError, match="`run_dir` = .* is not a folder"):
        generate(gen_cfg(tmp_path / "missing", tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no saved generator"):
        generate(gen_cfg(tmp_path / "empty", tmp_path / "o"))


def test_retrained_generator_is_another_job(trained_cgan, tmp_path):
    """Same command, new generator weights (the run was trained again): the old images are not kept."""
    import shutil

    import torch

    from imgaug_gen.generators.base import load_generator

    run = tmp_path / "run"
    shutil.copytree(trained_cgan / "generator", run / "generator")
    out = tmp_path / "out"
    generate(gen_cfg(run, out, "score=false"))
    before = files_bytes(out)
    gen = load_generator(run / "generator")
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.1)
    gen.save_pretrained(run / "generator")
    with pytest.raises(ConfigError, match="different job"):
        generate(gen_cfg(run, out, "score=false"))
    generate(gen_cfg(run, out, "score=false", "overwrite=true"))
    after = files_bytes(out)
    assert sorted(after) == sorted(before) and after != before
