"""generate(): classical augmentation, the mixing policy, quality filtering and the extra metrics."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from PIL import Image

from imgaug_gen.config import compose_config
from imgaug_gen.errors import ConfigError
from imgaug_gen.export import is_kept, read_manifest
from imgaug_gen.jobs.generate import generate, plan_items, split_counts, synthetic_counts

from conftest import class_counts, files_bytes, gen_cfg


def png(out_dir, rec):
    a = np.asarray(Image.open(out_dir / rec["file"]))
    return a[..., None] if a.ndim == 2 else a


def test_augment_light_is_recorded_and_replayable(trained_cgan, tmp_path):
    from imgaug_gen.augment.classical import Augmenter
    from imgaug_gen.generators.base import per_image_seeds

    raw, aug = tmp_path / "raw", tmp_path / "aug"
    common = ["n_per_class=2", "include_real=false", "score=false"]
    generate(gen_cfg(trained_cgan, raw, *common))
    generate(gen_cfg(trained_cgan, aug, *common, "augment=light"))
    raw_recs = {r["id"]: r for r in read_manifest(raw)}
    recs = read_manifest(aug)
    assert len(recs) == 20 and all("augment" not in r for r in raw_recs.values())
    augmenter = Augmenter.from_dict(json.loads((aug / "job.json").read_text())["augment"])
    changed = 0
    for g, r in enumerate(sorted(recs, key=lambda r: r["id"])):
        assert r["augment"]["seed"] == per_image_seeds(0 + 1_000_003, g, 1)[0]
        assert isinstance(r["augment"]["transforms"], list)
        source = png(raw, raw_recs[r["id"]])
        assert np.array_equal(augmenter.replay(source, r["augment"]), png(aug, r))
        changed += not np.array_equal(source, png(aug, r))
    assert changed > 0
    assert "augment_resolved" in (aug / "config.yaml").read_text()
    # a changed augment config is a different job
    with pytest.raises(ConfigError, match="different job"):
        generate(gen_cfg(trained_cgan, aug, *common, "augment=strong"))


def test_augment_apply_to_all_adds_real_copies(trained_cgan, tmp_path):
    out = tmp_path / "out"
    generate(
        gen_cfg(
            trained_cgan,
            out,
            "n_per_class=1",
            "score=false",
            "augment=light",
            "augment.apply_to=all",
            "augment.copies_per_image=2",
        )
    )
    recs = read_manifest(out)
    copies = [r for r in recs if r["mode"] == "augment"]
    reals = [r for r in recs if r["mode"] == "real"]
    assert len(reals) == 60 and len(copies) == 120
    assert all(
        r["source"] == "real" and r["id"] == f"aug_{r['source_id']}_{r['id'][-1]}" and "augment" in r for r in copies
    )
    assert {r["id"] for r in copies} == {f"aug_{r['id'][5:]}_{k}" for r in reals for k in (0, 1)}
    m = json.loads((out / "metrics.json").read_text())
    assert m["counts_by_mode"]["0"] == {"sample": 1, "real": 6, "augment": 12}


def test_bad_transform_fails_before_any_file(trained_cgan, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=r"`augment\.transforms\[0\]\.name` = 'HorizontalFlipp'"):
        generate(gen_cfg(trained_cgan, out, "augment=custom_example", "augment.transforms.0.name=HorizontalFlipp"))
    with pytest.raises(ConfigError, match=r"`augment\.transforms\[1\]` \(RandomResizedCrop\) changes the image shape"):
        generate(gen_cfg(trained_cgan, out, "augment=custom_example"))  # size 32 on 16 px images
    assert not out.exists()


@pytest.mark.parametrize(
    "override, per_class",
    [("mix.synthetic_ratio=0.5", 3), ("mix.target_per_class=10", 4), ("mix.target_per_class=5", 0)],
)
def test_mix_policy_exact_counts(trained_cgan, tmp_path, override, per_class):
    out = tmp_path / "out"
    generate(gen_cfg(trained_cgan, out, "score=false", override))
    recs = read_manifest(out)
    by_class = collections.Counter((r["class_name"], r["source"]) for r in recs)
    m = json.loads((out / "metrics.json").read_text())
    for c in map(str, range(10)):
        assert by_class[(c, "synthetic")] == per_class and by_class[(c, "real")] == 6
        assert m["counts"][c] == {"real": 6, "synthetic": per_class}
        assert class_counts(out)[c] == 6 + per_class
        assert m["planned"][c] == {"real": 6, "sample": per_class}


def test_split_counts_and_sources_plan():
    assert split_counts(7, [0.5, 0.5]) == [4, 3]
    assert split_counts(10, [0.3, 0.7]) == [3, 7]
    assert split_counts(5, [1 / 3, 1 / 3, 1 / 3]) == [2, 2, 1]
    assert split_counts(0, [0.2, 0.8]) == [0, 0]
    for n in range(30):
        assert sum(split_counts(n, [0.15, 0.6, 0.25])) == n
    with pytest.raises(ConfigError, match="cannot split"):
        split_counts(3, [-1.0, 2.0])

    labels = np.repeat(np.arange(3), [4, 5, 2])
    ids = [f"r{i}" for i in range(len(labels))]
    cfg = compose_config(
        "generate",
        [
            "run_dir=x",
            "out_dir=y",
            "include_real=false",
            "mix.synthetic_ratio=1.5",
            "mix.sources=[{mode: sample, fraction: 0.5}, {mode: img2img, fraction: 0.5}]",
        ],
    )
    counts = synthetic_counts(cfg, 3, labels)
    assert counts == {0: {"sample": 3, "img2img": 3}, 1: {"sample": 4, "img2img": 4}, 2: {"sample": 2, "img2img": 1}}
    items = plan_items(cfg, 3, labels, ids)
    assert len({it.id for it in items}) == len(items) == 17
    edits = [it for it in items if it.mode == "img2img"]
    assert all(it.id.startswith("edit_") and labels[it.real_index] == it.label for it in edits)
    assert collections.Counter(it.label for it in edits) == {0: 3, 1: 4, 2: 1}
    assert plan_items(cfg, 3, labels, ids)[5].seed == items[5].seed  # deterministic
    # mode=img2img with the default policy keeps the ids and seeds of edits_per_image edits of each real image
    legacy = compose_config("generate", ["run_dir=x", "out_dir=y", "include_real=false", "mode=img2img"])
    from imgaug_gen.generators.base import per_image_seeds

    edits = plan_items(legacy, 3, labels, ids)
    assert [it.id for it in edits] == [f"edit_{i:07d}" for i in range(22)]
    assert [it.real_index for it in edits] == [i // 2 for i in range(22)]
    assert [it.seed for it in edits] == per_image_seeds(0, 0, 22)


# tau=0.99 rejects every image of the barely trained cGAN; 0.1 keeps roughly one in ten
FILTER = ["filter.enabled=true", "filter.tau=0.1", "n_per_class=3", "include_real=false", "score=false", "batch_size=8"]


def test_filter_writes_exactly_the_accepted(trained_cgan, tmp_path):
    out = tmp_path / "out"
    m = generate(gen_cfg(trained_cgan, out, *FILTER))
    recs = read_manifest(out, include_rejected=True)
    rejected = [r for r in recs if r.get("kept") is False]
    kept = [r for r in recs if is_kept(r)]
    assert rejected and kept, "tau=0.1 on a barely trained cGAN should keep some and reject some"
    assert all("file" not in r for r in rejected)
    assert sorted(files_bytes(out)) == sorted(r["file"] for r in kept)
    for r in recs:
        assert set(r["scores"]) >= {"confidence", "nearest_real_distance", "nearest_real_index"}
    for r in kept:
        assert r["kept"] is True and r["scores"]["confidence"] >= 0.1
    per_class = collections.Counter(r["class_name"] for r in kept)
    assert all(v <= 3 for v in per_class.values())
    assert len(recs) <= 10 * 9  # ceil(3 * 3.0) candidates per class at most
    f = json.loads((out / "metrics.json").read_text())["filter"]
    assert f == m["filter"] and f["tau"] == 0.1 and f["delta"] is not None
    # the filter's classifier saw only the run's 6-shot training images, not the whole reference set
    assert f["classifier_data"] == "train" and f["classifier_images"] == 60
    assert f["n"] == len(recs) and f["kept"] == len(kept)
    assert 0 <= f["acceptance_rate"] < 1 and "memorisation_rate" in f
    assert set(f["per_class"]) == {str(i) for i in range(10)}
    assert {c for c, s in f["short"].items()} == {str(i) for i in range(10) if per_class[str(i)] < 3}
    assert m["counts"] == {str(i): {"real": 0, "synthetic": per_class[str(i)]} for i in range(10)}
    # within a class, the kept images are the first accepted candidates in plan order
    for c in range(10):
        lines = sorted((r for r in recs if r["label"] == c), key=lambda r: r["id"])
        flags = [r["kept"] for r in lines]
        assert sum(flags) == per_class[str(c)] and (sum(flags) < 3 or flags[-1])


def test_filter_tau_099_rejects_all_and_warns(trained_cgan, tmp_path, caplog):
    out = tmp_path / "out"
    m = generate(gen_cfg(trained_cgan, out, *FILTER, "filter.tau=0.99", "n_per_class=1"))
    assert m["filter"]["kept"] < m["filter"]["n"] and m["filter"]["short"]
    assert sorted(files_bytes(out)) == sorted(r["file"] for r in read_manifest(out))
    assert "filter: class" in caplog.text


def test_filter_resume_after_kill(trained_cgan, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    generate(gen_cfg(trained_cgan, full, *FILTER))
    generate(gen_cfg(trained_cgan, part, *FILTER))
    lines = (part / "manifest.jsonl").read_text().splitlines()
    cut = len(lines) // 2
    (part / "manifest.jsonl").write_text("\n".join(lines[:cut]) + "\n" + lines[cut][:17])
    (part / "metrics.json").unlink()
    generate(gen_cfg(trained_cgan, part, *FILTER))
    assert files_bytes(part) == files_bytes(full)
    a = sorted(json.dumps(r, sort_keys=True) for r in read_manifest(part, include_rejected=True))
    b = sorted(json.dumps(r, sort_keys=True) for r in read_manifest(full, include_rejected=True))
    assert a == b
    assert (
        json.loads((part / "metrics.json").read_text())["filter"]
        == json.loads((full / "metrics.json").read_text())["filter"]
    )


def test_metrics_precision_recall_per_class(trained_cgan, tmp_path):
    out = tmp_path / "out"
    m = generate(gen_cfg(trained_cgan, out, "include_real=false"))
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("fid", "kid_mean", "kid_std", "features", "counts", "n_synthetic", "n_real", "mean_confidence"):
        assert key in saved
    assert 0 <= saved["precision"] <= 1 and 0 <= saved["recall"] <= 1 and saved["precision_recall_k"] == 3
    assert 0 <= saved["coverage"] <= 1 and saved["density"] >= 0
    assert set(saved["per_class"]) == {str(i) for i in range(10)}
    entry = saved["per_class"]["3"]
    assert entry["n_fake"] == 4 and np.isfinite(entry["fid"]) and entry["kid_mean"] is not None
    assert all(entry[key] is not None for key in ("precision", "recall", "density", "coverage"))
    assert m["per_class"]["3"]["n_fake"] == 4


def test_generate_scores_in_a_pretrained_feature_space_from_a_local_folder(trained_cgan, tmp_path):
    """metrics.features=clip through generate.py's config: a tiny random CLIP saved locally."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    clip = tmp_path / "tiny-clip"
    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=8,
            image_size=32,
            projection_dim=16,
        )
    ).save_pretrained(clip)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"`metrics.features` = 'clip' needs `metrics.clip_weights`"):
        generate(gen_cfg(trained_cgan, out, "include_real=false", "metrics.features=clip"))
    assert not out.exists()  # refused before any work
    m = generate(
        gen_cfg(trained_cgan, out, "include_real=false", "metrics.features=clip", f"metrics.clip_weights={clip}")
    )
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["features"] == "clip-tiny-clip-image-embeds" and saved["num_features"] == 16
    assert np.isfinite(saved["fid"]) and 0 <= saved["coverage"] <= 1 and m["features"] == saved["features"]


def test_filter_with_shards_gives_the_unsharded_folder(trained_cgan, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    generate(gen_cfg(trained_cgan, one, *FILTER, "augment=light"))
    for s in (0, 1):
        generate(gen_cfg(trained_cgan, two, *FILTER, "augment=light", f"shard={s}", "num_shards=2"))
    assert files_bytes(two) == files_bytes(one)
    assert {r["id"]: r["kept"] for r in read_manifest(two, include_rejected=True)} == {
        r["id"]: r["kept"] for r in read_manifest(one, include_rejected=True)
    }
    assert json.loads((two / "metrics.json").read_text())["filter"]["kept"] == len(files_bytes(one))


def test_img2img_blend_plans_in_class_partners_and_renders_the_blend():
    from imgaug_gen.jobs.generate import _render

    labels = np.repeat(np.arange(3), [4, 5, 1])
    ids = [f"r{i}" for i in range(len(labels))]
    cfg = compose_config(
        "generate",
        [
            "run_dir=x",
            "out_dir=y",
            "include_real=false",
            "mode=img2img",
            "img2img.edits_per_image=3",
            "img2img.blend=[0.3,0.7]",
        ],
    )
    items = plan_items(cfg, 3, labels, ids)
    assert len(items) == 30
    for it in items:
        assert labels[it.partner_index] == labels[it.real_index] == it.label and 0.3 <= it.blend <= 0.7
        assert it.partner_index != it.real_index or it.label == 2  # class 2 has one image: its own partner
    assert [(it.partner_index, it.blend) for it in plan_items(cfg, 3, labels, ids)] == [
        (it.partner_index, it.blend) for it in items
    ]  # from the edits' seeds
    plain = plan_items(
        compose_config(
            "generate", ["run_dir=x", "out_dir=y", "include_real=false", "mode=img2img", "img2img.edits_per_image=3"]
        ),
        3,
        labels,
        ids,
    )
    assert [(it.id, it.seed, it.strength) for it in plain] == [(it.id, it.seed, it.strength) for it in items]

    class Identity:  # an "editor" that returns its input, to see the blended source
        def edit(self, images, labels, **kw):
            return images

    real = np.random.default_rng(0).integers(0, 256, (len(labels), 4, 4, 1)).astype(np.uint8)
    out = _render(Identity(), items[:4], real, cfg)
    for img, it in zip(out, items[:4]):
        want = it.blend * real[it.real_index].astype(float) + (1 - it.blend) * real[it.partner_index]
        assert np.abs(img.astype(float) - want).max() <= 0.5 + 1e-6
    for bad, why in (
        ("[0.7,0.3]", r"give null \(plain edits\) or \[lo, hi\]"),
        ("[0.2]", r"too few items \(item 1 is missing\)"),
        ("[0,2]", r"give null \(plain edits\) or \[lo, hi\]"),
    ):
        with pytest.raises(ConfigError, match=rf"`img2img.blend` = .*: .*{why}"):
            from imgaug_gen.jobs.generate import check_generate_config

            check_generate_config(
                compose_config("generate", ["run_dir=.", "out_dir=y", "mode=img2img", f"img2img.blend={bad}"])
            )
