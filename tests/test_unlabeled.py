"""The unlabelled pool: `data.unlabeled=rest` / `data.unlabeled_root`, no labelled image in it, the DDPM's null
class, pseudo-labels recorded with their confidence, and bad pools refused before any work."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from imgaug_gen.data import DigitsDataModule, LabeledFolderDataModule
from imgaug_gen.data.unlabeled import UNLABELED, content_hash, pool_batch_sampler
from imgaug_gen.errors import ConfigError

from conftest import digits_images, train_overrides, write_digit_folder
from factories_ddpm import TINY_UNET

pytestmark = pytest.mark.usefixtures("one_thread")


def hashes(images) -> set[str]:
    return {content_hash(a) for a in images}


def test_the_rest_pool_never_holds_a_labelled_validation_or_test_image():
    dm = DigitsDataModule(image_size=8, shots=3, unlabeled="rest", val_fraction=0.2)
    dm.setup()
    pool = hashes(dm.unlabeled_arrays())
    labelled = hashes(dm.train_arrays()[0]) | hashes(dm.val_arrays()[0]) | hashes(dm.test_arrays()[0])
    assert len(pool) == len(dm.unlabeled_arrays()) > 1000  # no repeats either
    assert not pool & labelled
    ids = {r["id"] for r in dm.unlabeled_records()}
    assert not ids & {r["id"] for r in dm.train_records()}
    # without a pool nothing changes
    plain = DigitsDataModule(image_size=8, shots=3, val_fraction=0.2)
    plain.setup()
    assert plain.unlabeled_arrays().shape == (0, 8, 8, 1) and plain.unlabeled_records() == []
    np.testing.assert_array_equal(plain.train_arrays()[0], dm.train_arrays()[0])


def test_a_folder_pool_drops_copies_of_labelled_images_and_says_so(tmp_path, caplog):
    root = write_digit_folder(tmp_path / "images", ["a", "b"], n_per_class=10)
    pool_dir = tmp_path / "pool" / "any" / "layout"
    pool_dir.mkdir(parents=True)
    fresh, _ = digits_images(n_per_class=6, classes=(2,), seed=5)  # digits of another class: new images
    for k, img in enumerate(fresh):
        Image.fromarray(img).save(pool_dir / f"new_{k}.png")
    copied = sorted((root / "a").glob("*.png"))[:4]
    for k, src in enumerate(copied):  # the same pixels in another lossless format count as a copy
        Image.open(src).save(pool_dir / f"copy_{k}.bmp")
    (tmp_path / "pool" / "notes.txt").write_text("not an image")
    dm = LabeledFolderDataModule(
        root=str(root), image_size=20, shots=2, val_fraction=0.2, unlabeled_root=str(tmp_path / "pool")
    )
    with caplog.at_level(logging.WARNING, logger="imgaug_gen.data"):
        dm.setup()
    assert len(dm.unlabeled_arrays()) == 6
    assert "dropped 4 image(s)" in caplog.text
    labelled = hashes(dm.train_arrays()[0]) | hashes(dm.val_arrays()[0]) | hashes(dm.test_arrays()[0])
    assert not hashes(dm.unlabeled_arrays()) & labelled
    assert all(r["path"].endswith(".png") and "new_" in r["path"] for r in dm.unlabeled_records())


def folder_dm(root, **kw):
    return LabeledFolderDataModule(root=str(root), image_size=20, shots=2, **kw)


def test_a_bad_unlabeled_root_is_refused_before_any_work(tmp_path):
    root = write_digit_folder(tmp_path / "images", ["a", "b"], n_per_class=6)
    with pytest.raises(ConfigError, match="`data.unlabeled_root` = .*missing.* is not an existing folder"):
        folder_dm(root, unlabeled_root=str(tmp_path / "missing")).setup()
    for same in (root, root / "a", tmp_path):
        with pytest.raises(ConfigError, match="`data.unlabeled_root` = .* and `data.root` = .* are the same folder"):
            folder_dm(root, unlabeled_root=str(same)).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="`data.unlabeled_root` = .*empty.* holds no images"):
        folder_dm(root, unlabeled_root=str(tmp_path / "empty")).setup()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ConfigError, match="Cannot read image file .*broken.png.*`data.on_corrupt=skip`"):
        folder_dm(root, unlabeled_root=str(tmp_path / "bad")).setup()
    with pytest.raises(ConfigError, match="`data.unlabeled` = 'rest' and `data.unlabeled_root` = .* are both set"):
        folder_dm(root, unlabeled="rest", unlabeled_root=str(tmp_path / "bad")).setup()
    with pytest.raises(ConfigError, match="`data.unlabeled`"):
        folder_dm(root, unlabeled="all").setup()


def test_pool_batches_hold_the_share_and_are_a_function_of_the_index():
    s = pool_batch_sampler(10, 50, batch_size=8, share=0.25, seed=3, num_batches=6, rank=0, world_size=1)
    batches = list(s)
    assert all(len(b) == 8 and sum(i >= 10 for i in b) == 2 for b in batches)
    assert batches == list(pool_batch_sampler(10, 50, 8, 0.25, seed=3, num_batches=6, rank=0, world_size=1))
    s.start_batch = 4
    assert list(s) == batches[4:]
    only_pool = pool_batch_sampler(10, 50, 8, 1.0, seed=3, num_batches=2, rank=0, world_size=1)
    assert all(min(b) >= 10 for b in only_pool)
    dm = DigitsDataModule(image_size=8, shots=2, unlabeled="rest", unlabeled_share=0.5, batch_size=8)
    dm.setup()
    _, y = next(iter(dm.train_dataloader()))
    assert (y == UNLABELED).sum() == 4 and set(y[y >= 0].tolist()) <= set(range(10))


def test_the_ddpm_trains_unlabelled_images_as_the_null_class_only():
    from imgaug_gen.generators.ddpm import DDPMModule

    torch.manual_seed(0)
    m = DDPMModule(
        num_classes=3,
        class_names=["a", "b", "c"],
        image_shape=[1, 16, 16],
        unet=TINY_UNET,
        train_scheduler={"_target_": "diffusers.DDPMScheduler", "num_train_timesteps": 10},
        num_inference_steps=4,
        cond_drop_prob=0.5,
    )
    seen = []
    forward = m.unet.forward
    m.unet.forward = lambda x, t, class_labels=None, **kw: (
        seen.append(class_labels.clone()) or forward(x, t, class_labels=class_labels, **kw)
    )
    labels = torch.tensor([UNLABELED] * 8 + [0, 1, 2, 0] * 4)
    for _ in range(3):
        m.training_step((torch.zeros(len(labels), 1, 16, 16), labels), 0)
    got = torch.stack(seen)
    assert (got[:, :8] == 3).all()  # the null class, whatever the label dropout drew
    kept = got[:, 8:] != 3
    assert kept.any() and (~kept).any()  # labelled images keep their class or drop to null (CFG)
    assert (got[:, 8:][kept] == labels[8:].expand_as(got[:, 8:])[kept]).all()


def test_the_cgan_reads_pool_images_with_its_unconditional_head_only():
    from imgaug_gen.generators.gan import CGANModule, semi_d_losses

    torch.manual_seed(0)
    m = CGANModule(num_classes=3, class_names=["a", "b", "c"], image_shape=[1, 16, 16], d_width=8, unlabeled_weight=1)
    d = m.discriminator
    real, fake = torch.rand(8, 1, 16, 16) * 2 - 1, torch.rand(8, 1, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])  # the fakes' labels; the real images' own where labelled
    with torch.no_grad():  # spectral norm's power iteration converged, then held still (eval) between the calls
        for _ in range(30):
            d(real, labels)
    d.eval()
    labelled = torch.tensor([True] * 4 + [False] * 4)

    def losses(real):
        with torch.no_grad():
            return semi_d_losses(d, torch.cat([real, fake]), labels, labelled)

    cond, unc, real_logits, _ = losses(real)
    assert real_logits.shape == (4,)  # only the labelled real images' conditional logits
    other_pool = real.clone()
    other_pool[4:] = torch.rand(4, 1, 16, 16)
    cond2, unc2, _, _ = losses(other_pool)
    assert torch.equal(cond, cond2) and not torch.equal(unc, unc2)  # the pool reaches the unconditional head only
    other_shot = real.clone()
    other_shot[0] = -real[0]
    assert not torch.equal(losses(other_shot)[2][0], real_logits[0])  # a shot reaches the conditional term
    none_labelled = semi_d_losses(d, torch.cat([real, fake]), labels, torch.zeros(8, dtype=torch.bool))[0]
    assert torch.isfinite(none_labelled)  # a batch of pool images only still gives a loss


def test_a_cgan_with_an_unconditional_head_trains_on_pool_batches(tmp_path):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import train
    from imgaug_gen.nets.cgan import ProjectionDiscriminator

    run_dir = tmp_path / "run"
    pool = ["data.unlabeled=rest", "data.shots=2", "data.unlabeled_share=0.5"]
    with pytest.raises(ConfigError, match="`model.unlabeled_weight` > 0"):
        train(compose_config("train", train_overrides("cgan", run_dir, *pool)))
    _, objects = train(compose_config("train", train_overrides("cgan", run_dir, *pool, "model.unlabeled_weight=1")))
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    d = objects["module"].discriminator
    assert isinstance(d, ProjectionDiscriminator) and d.uncond is not None
    assert torch.equal(state["discriminator.uncond.weight_orig"], d.uncond.weight_orig.detach())
    assert objects["module"].batches_seen > 0 and (run_dir / "generator" / "config.json").is_file()


def test_kinds_without_a_null_class_refuse_pool_batches_and_take_pseudo_labels(tmp_path):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import train

    run_dir = tmp_path / "run"
    pool = ["data.unlabeled=rest", "data.shots=2", "pseudo_labels.steps=40", "pseudo_labels.threshold=0.3"]
    with pytest.raises(ConfigError, match="trains on labelled images only, and `data.unlabeled_share` = 0.5"):
        train(compose_config("train", train_overrides("cgan", run_dir, *pool)))
    with pytest.raises(ConfigError, match="`pseudo_labels.enabled=true` needs an unlabelled pool"):
        train(compose_config("train", train_overrides("cgan", run_dir, "pseudo_labels.enabled=true")))
    assert not run_dir.exists()
    train(
        compose_config(
            "train", train_overrides("cgan", run_dir, *pool, "data.unlabeled_share=0", "pseudo_labels.enabled=true")
        )
    )
    rows = [json.loads(line) for line in (run_dir / "pseudo_labels.jsonl").read_text().splitlines()]
    assert rows and all(r["source"] == "pseudo" and 0.3 <= r["confidence"] <= 1.0 for r in rows)
    assert all(r["class_name"] == str(r["label"]) and r["threshold"] == 0.3 for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert (run_dir / "generator" / "config.json").is_file()


def test_evaluate_keeps_the_pool_out_of_the_batches_of_kinds_without_a_null_class(tmp_path, monkeypatch):
    import imgaug_gen.jobs.train as train_job
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.evaluate.sources import train_entry

    seen = {}
    monkeypatch.setattr(train_job, "train", lambda cfg: seen.setdefault("data", dict(cfg.data)) and ({}, {}))
    data = dict(compose_config("evaluate", ["out_dir=x", "data.unlabeled=rest"]).data)
    for kind, own, share in (
        ("cgan", [], 0.0),
        ("ddpm", [], 0.5),
        ("cgan", ["data.unlabeled_share=0.25"], 0.25),
        ("cgan", ["model.unlabeled_weight=1"], 0.5),  # its unconditional head learns from the pool
    ):
        seen.clear()
        train_entry(None, kind, {"train": [f"model={kind}", *own]}, 2, data, tmp_path / f"{kind}{share}", 0)
        assert seen["data"]["unlabeled"] == "rest" and seen["data"]["unlabeled_share"] == share
