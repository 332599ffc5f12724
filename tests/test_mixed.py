"""Consumption policies (imgaug_gen.data.mixed): batch composition, own-edit replacement, soft targets,
the folder dataset / DataModule a user trains with, and the same path inside train_and_test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from imgaug_gen.data.mixed import MixedBatchSampler, MixedDataModule, MixedFolderDataset, MixPolicy, mixed_loss
from imgaug_gen.errors import ConfigError

from conftest import gen_cfg

# 6 real images of 2 classes; 12 synthetic: 2 edits of each real image (groups 0..5) + 0 samples
REAL_Y = np.array([0, 0, 0, 1, 1, 1])
SYN_Y = np.repeat(REAL_Y, 2)
SYN_G = np.repeat(np.arange(6), 2)


def _epoch_items(sampler: MixedBatchSampler, n_batches: int) -> np.ndarray:
    return np.concatenate([sampler.batch(b) for b in range(n_batches)])


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_replace_keeps_the_real_epoch_size_and_swaps_own_edits(p):
    s = MixedBatchSampler(REAL_Y, SYN_Y, MixPolicy("replace", p=p), batch_size=6, syn_groups=SYN_G, seed=3)
    items = _epoch_items(s, 2000)  # 2000 epochs of the 6 real images
    syn = items[items >= 6]
    assert len(items) == 12000
    assert abs(len(syn) / len(items) - p) < 0.02  # the replacement probability
    # position-wise: a swapped slot holds an edit of the image that was drawn there
    plain = MixedBatchSampler(REAL_Y, SYN_Y, MixPolicy("replace", p=0.0), batch_size=6, syn_groups=SYN_G, seed=3)
    for e in range(50):
        drawn = plain._epoch(0, 6, e)
        got = s._epoch(0, 6, e)
        for d, g in zip(drawn, got):
            assert g == d or SYN_G[g - 6] == d


def test_replace_draws_same_class_samples_when_there_are_no_edits():
    syn_y = np.array([0, 0, 1, 1])
    s = MixedBatchSampler(REAL_Y, syn_y, MixPolicy("replace", p=1.0), batch_size=6, seed=0)
    for b in range(50):
        assert all(item >= 6 for item in s.global_batch(b))  # p=1: every slot swapped
    assert [set(syn_y[s.candidates(i) - 6]) for i in range(6)] == [{0}] * 3 + [{1}] * 3


@pytest.mark.parametrize("p, bs", [(0.25, 8), (0.5, 6), (0.0, 4)])
def test_weighted_batches_have_the_synthetic_share(p, bs):
    s = MixedBatchSampler(REAL_Y, SYN_Y, MixPolicy("weighted", p=p), batch_size=bs, syn_groups=SYN_G, seed=0)
    for b in range(30):
        batch = np.asarray(s.batch(b))
        assert (batch >= 6).sum() == round(p * bs) and len(batch) == bs
    # each stream runs through whole permutations: every synthetic image is seen equally often
    if p > 0:
        items = _epoch_items(s, 120)
        counts = np.bincount(items[items >= 6] - 6, minlength=12)
        assert counts.max() - counts.min() <= 1


def test_concat_is_uniform_over_real_and_synthetic():
    s = MixedBatchSampler(REAL_Y, SYN_Y, "concat", batch_size=9, seed=0)
    items = _epoch_items(s, 200)  # 1800 draws = 100 epochs of 18 items
    assert np.all(np.bincount(items, minlength=18) == 100)


def test_sampler_is_deterministic_resumable_and_splits_ranks():
    pol = MixPolicy("replace", p=0.5)
    a = MixedBatchSampler(REAL_Y, SYN_Y, pol, 4, syn_groups=SYN_G, seed=7)
    b = MixedBatchSampler(REAL_Y, SYN_Y, pol, 4, syn_groups=SYN_G, seed=7)
    c = MixedBatchSampler(REAL_Y, SYN_Y, pol, 4, syn_groups=SYN_G, seed=8)
    assert [a.batch(i) for i in range(20)] == [b.batch(i) for i in range(20)]
    assert [a.batch(i) for i in range(20)] != [c.batch(i) for i in range(20)]
    b.start_batch = 5  # what ResumableDataLoader sets on resume
    assert next(iter(b)) == a.batch(5)
    r0 = MixedBatchSampler(REAL_Y, SYN_Y, pol, 2, syn_groups=SYN_G, seed=7, rank=0, world_size=2)
    r1 = MixedBatchSampler(REAL_Y, SYN_Y, pol, 2, syn_groups=SYN_G, seed=7, rank=1, world_size=2)
    assert [r0.batch(i) + r1.batch(i) for i in range(10)] == [a.batch(i) for i in range(10)]


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"name": "swap"}, "policy.name"),
        ({"name": "replace", "p": 1.5}, r"policy.p.*\[0, 1\]"),
        ({"name": "replace", "p": -0.1}, "policy.p"),
        ({"name": "weighted", "synthetic_weight": -1}, "policy.synthetic_weight"),
        ({"name": "concat", "distill": 2}, "policy.distill"),
        ({"name": "concat", "temperature": 0}, "policy.temperature"),
        ({"name": "concat", "label_smoothing": 1.0}, "policy.label_smoothing"),
        ({"name": "concat", "q": 1}, r"unknown key\(s\) \['q'\]"),
        ("nope", "policy.name"),
    ],
)
def test_bad_policies_are_refused(cfg, match):
    with pytest.raises(ConfigError, match=match):
        MixPolicy.from_config(cfg)


def test_mixed_loss_weights_smoothing_and_distillation():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    syn = torch.tensor([False, False, True, True])
    plain = mixed_loss(logits, labels, syn, MixPolicy())
    assert plain == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    half = mixed_loss(logits, labels, syn, MixPolicy(synthetic_weight=0.5))
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert half == pytest.approx(float((ce * torch.tensor([1, 1, 0.5, 0.5])).mean()), rel=1e-6)
    smooth = mixed_loss(logits, labels, syn, MixPolicy(label_smoothing=0.2))
    expect = torch.cat(
        [ce[:2], torch.nn.functional.cross_entropy(logits[2:], labels[2:], reduction="none", label_smoothing=0.2)]
    ).mean()
    assert smooth == pytest.approx(float(expect), rel=1e-6)
    # distilling toward the student's own logits: the KD term is 0, what is left is (1 - a) CE on synthetic
    kd = mixed_loss(logits, labels, syn, MixPolicy(distill=0.5), teacher_logits=logits.clone())
    assert kd == pytest.approx(float(torch.cat([ce[:2], 0.5 * ce[2:]]).mean()), rel=1e-5)
    with pytest.raises(ConfigError, match="teacher"):
        mixed_loss(logits, labels, syn, MixPolicy(distill=0.5))


def test_train_and_test_consumes_synthetic_images_through_the_policy():
    from imgaug_gen.data import DigitsDataModule
    from imgaug_gen.metrics.downstream import predict_logits, train_and_test

    dm = DigitsDataModule(image_size=16, shots=3, seed=0, val_fraction=0.2)
    dm.setup()
    x, y = dm.train_arrays()
    tx, ty = dm.test_arrays()
    syn = (np.roll(x, 1, axis=2), y.copy(), np.arange(len(y)))  # one "edit" per real image
    small = dict(steps=12, input_size=16)
    a = train_and_test(
        x,
        y,
        tx,
        ty,
        10,
        0,
        synthetic=syn,
        policy={"name": "replace", "p": 0.5},
        eval_sets={"val": dm.val_arrays()},
        return_details=True,
        return_model=True,
        **small,
    )
    b = train_and_test(x, y, tx, ty, 10, 0, synthetic=syn, policy={"name": "replace", "p": 0.5}, **small)
    assert a["accuracy"] == b and 0 <= a["eval"]["val"] <= 1 and a["n_train"] == 2 * len(y)
    teacher = predict_logits(a["model"], syn[0], 16)
    assert teacher.shape == (len(y), 10)
    kd = train_and_test(
        x,
        y,
        tx,
        ty,
        10,
        0,
        synthetic=syn,
        policy={"name": "weighted", "p": 0.25, "distill": 0.5},
        teacher_logits=teacher,
        **small,
    )
    assert 0 <= kd <= 1
    with pytest.raises(ConfigError, match="teacher_logits"):
        train_and_test(x, y, tx, ty, 10, 0, synthetic=syn, policy={"name": "concat", "distill": 0.5}, **small)
    with pytest.raises(ConfigError, match="policy.p"):
        train_and_test(x, y, tx, ty, 10, 0, synthetic=syn, policy={"name": "replace", "p": 2}, **small)


@pytest.fixture(scope="module")
def edit_folder(tmp_path_factory):
    """A generate.py-layout folder with real images and two 'img2img edits' of each (written by hand,
    so the test needs no diffusion model): the manifest fields the dataset reads."""
    from PIL import Image

    from conftest import digits_images

    out = tmp_path_factory.mktemp("mixed_folder")
    x, y = digits_images(n_per_class=3, classes=(0, 1), size=16, channels=1)
    lines = []
    for i, (img, lab) in enumerate(zip(x, y)):
        rid = f"digits_{i:05d}"
        for kind, k in [("real", None), ("syn", 0), ("syn", 1)]:
            name = f"real_{rid}" if kind == "real" else f"img2img_{rid}_{k}"
            (out / "train" / str(lab)).mkdir(parents=True, exist_ok=True)
            gray = img.reshape(16, 16)
            arr = gray if kind == "real" else np.roll(gray, k + 1, axis=1)
            Image.fromarray(arr).save(out / "train" / str(lab) / f"{name}.png")
            rec = {
                "id": name,
                "file": f"train/{lab}/{name}.png",
                "label": int(lab),
                "source": "real" if kind == "real" else "synthetic",
                "mode": "real" if kind == "real" else "img2img",
                "source_id": rid,
            }
            lines.append(json.dumps(rec))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return out


def test_folder_dataset_groups_edits_with_their_real_image(edit_folder):
    ds = MixedFolderDataset(edit_folder)
    assert (ds.n_real, ds.n_syn) == (6, 12) and len(ds) == 18
    s = ds.sampler({"name": "replace", "p": 1.0}, batch_size=6, seed=0)
    for b in range(20):
        drawn_real = MixedBatchSampler(
            ds.labels[:6],
            ds.labels[6:],
            MixPolicy("replace", p=0.0),
            6,
            real_groups=ds.real_groups,
            syn_groups=ds.syn_groups,
            seed=0,
        ).batch(b)
        for r, item in zip(drawn_real, s.batch(b)):
            assert ds.records[item]["source_id"] == ds.records[r]["source_id"]  # its own edit
    item = ds[7]
    assert item["synthetic"] and item["image"].shape == (1, 16, 16) and item["image"].min() >= -1


def test_folder_errors_are_clear(tmp_path, edit_folder):
    with pytest.raises(ConfigError, match="no manifest.jsonl"):
        MixedFolderDataset(tmp_path)
    with pytest.raises(ConfigError, match="is not a folder"):
        MixedFolderDataset(tmp_path / "nope")
    with pytest.raises(ConfigError, match="already holds the real images"):
        MixedFolderDataset(edit_folder, real=(np.zeros((2, 16, 16, 1), np.uint8), np.zeros(2, int)))
    with pytest.raises(ConfigError, match="teacher"):
        MixedDataModule(edit_folder, {"name": "replace", "distill": 0.5})
    with pytest.raises(ConfigError, match="policy.p"):
        MixedDataModule(edit_folder, {"name": "replace", "p": 3})


def test_a_user_classifier_trains_with_lightning_and_resumes_exactly(edit_folder, tmp_path):
    """The README recipe: a LightningModule whose step calls mixed_loss, fed by MixedDataModule."""
    import pytorch_lightning as pl

    class Classifier(pl.LightningModule):
        def __init__(self, policy):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
            self.policy = policy
            self.seen: list[list[int]] = []

        def training_step(self, batch, _):
            self.seen.append(batch["index"].tolist())
            return mixed_loss(
                self.net(batch["image"]), batch["label"], batch["synthetic"], self.policy, batch.get("teacher_logits")
            )

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
    pol = MixPolicy("replace", p=0.5, distill=0.5)

    def fit(steps, ckpt=None, root=tmp_path / "a"):
        pl.seed_everything(0)
        dm = MixedDataModule(edit_folder, pol, batch_size=4, seed=1, teacher=teacher)
        model = Classifier(pol)
        trainer = pl.Trainer(
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            accelerator="cpu",
            enable_checkpointing=ckpt is None,
        )
        trainer.fit(model, dm, ckpt_path=ckpt)
        if ckpt is None:
            trainer.save_checkpoint(root / "mid.ckpt")
        return model, dm

    full, dm = fit(6, root=tmp_path / "full")
    half, _ = fit(3, root=tmp_path / "half")
    rest, _ = fit(6, ckpt=str(tmp_path / "half" / "mid.ckpt"), root=tmp_path / "half")
    assert half.seen + rest.seen == full.seen  # the policy's batches continue exactly
    sampler = dm.dataset.sampler(pol, 4, seed=1)
    assert full.seen == [sampler.batch(b) for b in range(6)]
    assert dm.teacher_logits.shape == (18, 2) and torch.all(dm.teacher_logits[:6] == 0)


def test_a_generate_folder_round_trips_into_the_dataset(trained_cgan, tmp_path):
    from imgaug_gen.jobs.generate import generate

    out = tmp_path / "gen"
    generate(gen_cfg(trained_cgan, out, "score=false", "n_per_class=3"))
    ds = MixedFolderDataset(out)
    assert ds.n_syn == 30 and ds.n_real == 60 and set(ds.syn_groups.tolist()) == {-1}
    s = ds.sampler({"name": "replace", "p": 0.5}, batch_size=8)
    plain = ds.sampler({"name": "replace", "p": 0.0}, batch_size=8)
    swapped = 0
    for b in range(40):  # a sampled image replaces a real image of its own class
        for r, item in zip(plain.batch(b), s.batch(b)):
            assert ds.labels[item] == ds.labels[r]
            swapped += item >= ds.n_real
    assert 0.4 < swapped / 320 < 0.6


def test_paired_gain_interval_and_significance():
    from imgaug_gen.metrics.stats import paired_gain

    rng = np.random.default_rng(0)
    base = {(d, s): 0.9 + 0.02 * d + rng.normal(0, 0.003) for d in range(3) for s in range(5)}
    up = {k: v + 0.01 + rng.normal(0, 0.003) for k, v in base.items()}
    same = {k: v + rng.normal(0, 0.003) for k, v in base.items()}
    g = paired_gain(up, base)
    assert g["mean"] == pytest.approx(np.mean([up[k] - base[k] for k in base]))
    assert g["lo"] < g["mean"] < g["hi"] and g["lo"] > 0 and g["significant"] and g["n_subsets"] == 3
    assert not paired_gain(same, base)["significant"]
    # one subset that disagrees widens the interval across 0 (subsets are resampled as clusters)
    mixed = {k: v + (0.02 if k[0] < 2 else -0.03) for k, v in base.items()}
    assert paired_gain(mixed, base)["lo"] < 0
    with pytest.raises(ConfigError, match="no \\(subset, seed\\) pair"):
        paired_gain({(0, 0): 1.0}, {(1, 0): 1.0})
