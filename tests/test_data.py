"""imgaug_gen.data: digits and folder DataModules, validation errors, resumable sampling."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgaug_gen.data import (
    DigitsDataModule,
    ImageDataModule,
    LabeledFolderDataModule,
    ResumableDataLoader,
    StepBatchSampler,
)
from imgaug_gen.errors import ConfigError

# --------------------------------------------------------------------------- helpers


def _rgb(seed: int, size=(12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_folder(root: Path, classes: dict[str, int], size=(12, 10), ext=".png") -> Path:
    """root/<class>/img_<i><ext> with `n` random RGB images per class."""
    for c, (name, n) in enumerate(classes.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _rgb(100 * c + i, size).save(d / f"img_{i:02d}{ext}")
    return root


def folder_dm(root, **kw) -> LabeledFolderDataModule:
    kw.setdefault("image_size", 8)
    return LabeledFolderDataModule(root=str(root), **kw)


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(image_size=16, shots=5, seed=0)
    dm.setup()
    return dm


# --------------------------------------------------------------------------- digits


def test_digits_shapes_labels_and_shots(digits):
    dm = digits
    assert isinstance(dm, ImageDataModule)
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]
    assert dm.image_shape == (1, 16, 16)
    x, y = dm.train_arrays()
    assert x.shape == (50, 16, 16, 1) and x.dtype == np.uint8
    assert y.dtype == np.int64 and np.bincount(y, minlength=10).tolist() == [5] * 10
    assert x.max() > 200 and x.min() == 0  # scaled from 0..16 to the uint8 range

    ref_x, ref_y = dm.reference_arrays()
    test_x, test_y = dm.test_arrays()
    assert len(ref_y) + len(test_y) == 1797
    # stratified floor(n * 0.2) per class
    counts = np.bincount(np.concatenate([ref_y, test_y]), minlength=10)
    assert np.bincount(test_y, minlength=10).tolist() == [int(n * 0.2) for n in counts]
    assert ref_x.shape[1:] == test_x.shape[1:] == (16, 16, 1)

    recs = dm.train_records()
    assert len(recs) == 50
    assert [r["label"] for r in recs] == y.tolist()
    assert all(re.fullmatch(r"digits_\d{5}", r["id"]) and r["path"] is None for r in recs)
    assert all(r["class_name"] == str(r["label"]) for r in recs)
    assert len({r["id"] for r in recs}) == 50

    dm.setup()  # idempotent
    np.testing.assert_array_equal(dm.train_arrays()[0], x)


def test_digits_all_shots_three_channels_and_size_8():
    dm = DigitsDataModule(image_size=8, channels=3)
    dm.setup()
    x, y = dm.train_arrays()
    assert dm.image_shape == (3, 8, 8) and x.shape[1:] == (8, 8, 3)
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    ref_x, _ = dm.reference_arrays()
    assert len(x) == len(ref_x) == 1797 - len(dm.test_arrays()[1])


def test_digits_read_without_sklearn_equals_load_digits(monkeypatch):
    from sklearn.datasets import load_digits

    from imgaug_gen.data import digits as digits_mod

    ref = load_digits()
    images, labels = digits_mod.load_digits_arrays()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(labels, ref.target)
    assert labels.dtype == np.int64
    # the fallback (the CSV not where it was) goes through load_digits and gives the same arrays
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    images2, labels2 = digits_mod.load_digits_arrays()
    np.testing.assert_array_equal(images2, ref.images)
    np.testing.assert_array_equal(labels2, labels)


def _ids(dm):
    return [r["id"] for r in dm.train_records()]


def test_shots_deterministic_per_seed_and_test_split_fixed(digits):
    same = DigitsDataModule(image_size=16, shots=5, seed=0)
    same.setup()
    other = DigitsDataModule(image_size=16, shots=5, seed=1)
    other.setup()
    assert _ids(same) == _ids(digits)
    np.testing.assert_array_equal(same.train_arrays()[0], digits.train_arrays()[0])
    assert _ids(other) != _ids(digits)

    # the test split depends on split_seed only, and never overlaps the training data
    np.testing.assert_array_equal(other.test_arrays()[1], digits.test_arrays()[1])
    np.testing.assert_array_equal(other.test_arrays()[0], digits.test_arrays()[0])
    test_ids = {f"digits_{i:05d}" for i in digits._test_idx.tolist()}
    ref_ids = {f"digits_{i:05d}" for i in digits._ref_idx.tolist()}
    assert not test_ids & ref_ids and len(test_ids | ref_ids) == 1797
    assert not test_ids & set(_ids(digits)) and not test_ids & set(_ids(other))
    assert set(_ids(digits)) <= ref_ids

    moved = DigitsDataModule(image_size=16, shots=5, seed=0, split_seed=1)
    moved.setup()
    assert set(moved._test_idx.tolist()) != set(digits._test_idx.tolist())

    # with one seed, fewer shots are a subset of more shots
    more = DigitsDataModule(image_size=16, shots=10, seed=0)
    more.setup()
    assert set(_ids(digits)) < set(_ids(more))


def test_digits_dataloaders(digits):
    dl = digits.train_dataloader()
    assert isinstance(dl, ResumableDataLoader)
    x, y = next(iter(dl))
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1
    assert set(y.tolist()) <= set(range(10))
    assert dl.state_dict() == {"batches_done": 1}

    vx, vy = next(iter(digits.val_dataloader()))
    tx, ty = digits.test_arrays()
    np.testing.assert_array_equal(vy.numpy(), ty[: len(vy)])
    expected = torch.from_numpy(tx[: len(vy)]).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(vx, expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shots": 0}, r"`data.shots` = 0: input should be greater than or equal to 1"),
        ({"shots": 500}, r"`data.shots`=500 but class '0' has only \d+ training image"),
        ({"channels": 2}, r"`data.channels` = 2: input should be 1 or 3"),
        ({"image_size": 4}, r"`data.image_size` = 4: input should be greater than or equal to 8"),
        ({"test_fraction": 1.0}, r"`data.test_fraction` = 1.0: input should be less than 1"),
        ({"batch_size": 0}, r"`data.batch_size` = 0: input should be greater than or equal to 1"),
        ({"batch_size": "x"}, r"`data.batch_size` = 'x': input should be a valid integer"),
        (
            {"test_fraction": 0.5, "val_fraction": 0.5},
            r"`data.val_fraction` \+ `data.test_fraction` = 0.5 \+ 0.5 leaves no",
        ),
    ],
)
def test_digits_argument_errors(kwargs, match):
    dm = DigitsDataModule(**kwargs)
    with pytest.raises(ConfigError, match=match):
        dm.setup()


def test_image_size_need_not_be_multiple_of_8():
    dm = DigitsDataModule(image_size=12, shots=1)
    dm.setup()
    assert dm.train_arrays()[0].shape == (10, 12, 12, 1)


# --------------------------------------------------------------------------- folder: modes


def _save_16bit_png(path: Path, value: int) -> None:
    arr = np.full((6, 5), value, dtype=np.uint16)
    Image.fromarray(arr).save(path)


def test_folder_converts_every_mode(tmp_path):
    a = tmp_path / "cat alpha"  # space in the class name
    b = tmp_path / "chat é 猫.v2"  # unicode and a dot
    a.mkdir()
    b.mkdir()
    _rgb(0).convert("L").save(a / "gray.png")
    _rgb(1).save(a / "rgb.jpg", quality=90)
    rgba = _rgb(2).convert("RGBA")
    rgba.putalpha(0)  # fully transparent -> composited on black
    rgba.save(a / "rgba.png")
    _rgb(3).convert("P", palette=Image.Palette.ADAPTIVE).save(a / "pal.png")
    _save_16bit_png(a / "sixteen.png", 65535)
    _rgb(4).save(b / "bmp.bmp")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(b / "one.png")
    _rgb(5).convert("1").save(b / "bw.png")
    _rgb(6).convert("CMYK").save(b / "cmyk.jpg")
    _rgb(7).convert("LA").save(b / "la.png")
    (b / "notes.txt").write_text("not an image")
    (b / "meta.json").write_text("{}")
    (b / ".DS_Store").write_bytes(b"\x00\x01junk")
    (tmp_path / "README.md").write_text("loose files in root are ignored")
    (tmp_path / ".hidden_class").mkdir()

    for channels in (3, 1):
        dm = folder_dm(tmp_path, channels=channels, image_size=8, test_fraction=0.0)
        dm.setup()
        assert dm.class_names == ["cat alpha", "chat é 猫.v2"] and dm.num_classes == 2
        x, y = dm.train_arrays()
        assert x.shape == (10, 8, 8, channels) and x.dtype == np.uint8
        assert y.tolist() == [0] * 5 + [1] * 5
        recs = dm.train_records()
        names = [Path(r["path"]).name for r in recs]
        assert names == ["gray.png", "pal.png", "rgb.jpg", "rgba.png", "sixteen.png"] + [
            "bmp.bmp",
            "bw.png",
            "cmyk.jpg",
            "la.png",
            "one.png",
        ]
        by_name = dict(zip(names, x))
        assert by_name["rgba.png"].max() == 0  # transparent on black
        assert by_name["sixteen.png"].min() == 255  # 16-bit max -> 8-bit max
        if channels == 3:
            np.testing.assert_array_equal(by_name["one.png"][..., 0], 255)  # red 1x1, upscaled
            np.testing.assert_array_equal(by_name["one.png"][..., 1:], 0)
            assert len(np.unique(by_name["gray.png"].reshape(-1, 3), axis=0)) > 1
        ids = [r["id"] for r in recs]
        assert len(set(ids)) == 10
        assert all("/" not in i and " " not in i for i in ids)
        assert ids[0] == "cat_alpha__gray"
        assert [r["class_name"] for r in recs] == [dm.class_names[i] for i in y]


def test_folder_ids_unique_on_same_stem(tmp_path):
    make_folder(tmp_path, {"a": 2, "b": 2})
    _rgb(9).save(tmp_path / "a" / "img_00.jpg")
    sub = tmp_path / "b" / "nested"
    sub.mkdir()
    _rgb(10).save(sub / "deep.png")
    dm = folder_dm(tmp_path, test_fraction=0.0)
    dm.setup()
    ids = [r["id"] for r in dm.train_records()]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert "b__nested__deep" in ids


@pytest.mark.parametrize("how", ["resize", "center_crop", "pad"])
def test_folder_resize_modes(tmp_path, how):
    # a wide image: left half white, right half black
    arr = np.zeros((8, 32, 3), np.uint8)
    arr[:, :16] = 255
    for c in ("x", "y"):
        (tmp_path / c).mkdir()
        Image.fromarray(arr).save(tmp_path / c / "wide.png")
    dm = folder_dm(tmp_path, image_size=8, resize=how, test_fraction=0.0)
    dm.setup()
    im = dm.train_arrays()[0][0, ..., 0].astype(int)
    assert im.shape == (8, 8)
    if how == "resize":  # squashed: still half white, half black
        assert im[:, 0].min() == 255 and im[:, -1].max() == 0
    elif how == "center_crop":  # the centre 8x8 of the 32x8 image after scaling: the boundary
        assert im[:, 0].min() == 255 and im[:, -1].max() == 0
        assert np.abs(im[:, 3] - im[:, 4]).max() > 100
    else:  # letterbox: 8x2 band in the middle, black above and below
        assert im[0].max() == 0 and im[-1].max() == 0 and im[4, 0] == 255


def test_folder_applies_exif_orientation(tmp_path):
    wide = np.full((8, 16, 3), 255, np.uint8)  # 16 wide, 8 high, white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": displayed 8 wide, 16 high
    for c in ("x", "y"):
        (tmp_path / c).mkdir()
        Image.fromarray(wide).save(tmp_path / c / "rot.jpg", exif=exif.tobytes(), quality=95)
    dm = folder_dm(tmp_path, image_size=8, resize="pad", channels=1, test_fraction=0.0)
    dm.setup()
    im = dm.train_arrays()[0][0, ..., 0]
    assert im[:, 0].max() < 30 and im[:, -1].max() < 30  # letterboxed left/right: now tall
    assert im[:, 3:5].min() > 220


def test_folder_split_shots_and_extensions(tmp_path):
    make_folder(tmp_path, {"a": 10, "b": 6, "c": 3})
    (tmp_path / "c" / "skipme.gif").write_bytes(b"GIF89a broken")  # ignored by `extensions`
    dm = folder_dm(tmp_path, test_fraction=0.3, shots=2, seed=3, extensions=["png"])
    dm.setup()
    _, test_y = dm.test_arrays()
    assert np.bincount(test_y, minlength=3).tolist() == [3, 1, 0]  # floor(n * 0.3)
    _, ref_y = dm.reference_arrays()
    assert np.bincount(ref_y, minlength=3).tolist() == [7, 5, 3]
    x, y = dm.train_arrays()
    assert np.bincount(y).tolist() == [2, 2, 2]
    test_paths = {dm._data.paths[i] for i in dm._test_idx}
    assert not test_paths & {r["path"] for r in dm.train_records()}

    dm2 = folder_dm(tmp_path, test_fraction=0.3, shots=2, seed=4, extensions=[".png"])
    dm2.setup()
    assert {dm2._data.paths[i] for i in dm2._test_idx} == test_paths

    with pytest.raises(ConfigError, match=r"`data.shots`=4 but class 'c' has only 3 training image.*`data.shots`"):
        folder_dm(tmp_path, test_fraction=0.3, shots=4, extensions=[".png"]).setup()


def test_folder_dataloaders_small_n(tmp_path):
    make_folder(tmp_path, {"a": 2, "b": 1})
    dm = folder_dm(tmp_path, batch_size=5, test_fraction=0.0)
    dm.setup()
    dl = dm.train_dataloader()
    x, y = next(iter(dl))
    assert x.shape == (5, 3, 8, 8) and y.shape == (5,)  # wraps across epochs of 3 images
    assert len(dm.val_dataloader().dataset) == 0


# --------------------------------------------------------------------------- folder: errors


def _truncated_png(path: Path) -> None:
    _rgb(0, (64, 64)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make_bad",
    [
        lambda p: (p / "bad.png").write_bytes(b""),  # zero bytes
        lambda p: (p / "bad.png").write_bytes(b"this is not a png"),
        lambda p: _truncated_png(p / "bad.png"),
        lambda p: (p / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20),
    ],
    ids=["zero_byte", "garbage", "truncated_png", "broken_jpeg"],
)
def test_corrupt_file_error_and_skip(tmp_path, make_bad, caplog):
    make_folder(tmp_path, {"a": 3, "b": 3})
    make_bad(tmp_path / "b")
    bad = next((tmp_path / "b").glob("bad.*"))
    with pytest.raises(ConfigError, match=re.escape(str(bad)) + r".*`data.on_corrupt=skip`"):
        folder_dm(tmp_path).setup()

    caplog.set_level(logging.WARNING, logger="imgaug_gen.data")
    dm = folder_dm(tmp_path, on_corrupt="skip", test_fraction=0.0)
    dm.setup()
    assert len(dm.train_records()) == 6
    msgs = [r.getMessage() for r in caplog.records if r.name == "imgaug_gen.data"]
    assert any("skipping unreadable image" in m and str(bad) in m for m in msgs)
    assert any("skipped 1 unreadable image file(s)" in m for m in msgs)


def test_skip_counts_several_and_empty_after_skip(tmp_path, caplog):
    make_folder(tmp_path, {"a": 3, "b": 0})
    (tmp_path / "a" / "x.png").write_bytes(b"")
    (tmp_path / "a" / "y.jpg").write_bytes(b"junk")
    (tmp_path / "b" / "z.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"Class folder .*/b' has no images \(1 unreadable file\(s\) were skipped\)"):
        folder_dm(tmp_path, on_corrupt="skip").setup()
    _rgb(1).save(tmp_path / "b" / "ok.png")
    caplog.set_level(logging.WARNING, logger="imgaug_gen.data")
    dm = folder_dm(tmp_path, on_corrupt="skip", test_fraction=0.0)
    dm.setup()
    assert np.bincount(dm.train_arrays()[1]).tolist() == [3, 1]
    assert any("skipped 3 unreadable image file(s)" in r.getMessage() for r in caplog.records)


def test_decompression_bomb_is_a_corrupt_file(tmp_path, monkeypatch):
    make_folder(tmp_path, {"a": 2, "b": 2}, size=(4, 4))
    _rgb(0, (40, 40)).save(tmp_path / "b" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 40*40 > 200: warning; > 2x: error
    with pytest.raises(ConfigError, match=r"big\.png.*over the limit of"):
        folder_dm(tmp_path).setup()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 > 1000 only warns: still refused
    with pytest.raises(ConfigError, match=r"big\.png.*over the limit of.*`data.on_corrupt=skip`"):
        folder_dm(tmp_path).setup()


def test_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"`data.root` does not exist: .*nope"):
        folder_dm(missing).setup()
    with pytest.raises(ConfigError, match=r"`data.root` is not set"):
        LabeledFolderDataModule().setup()

    afile = tmp_path / "file.png"
    _rgb(0).save(afile)
    with pytest.raises(ConfigError, match=r"`data.root` is not a directory: .*file\.png"):
        folder_dm(afile).setup()

    flat = tmp_path / "flat"
    flat.mkdir()
    _rgb(0).save(flat / "loose.png")
    with pytest.raises(ConfigError, match=r"has no class sub-folders.*loose\.png.*root/<class_name>/<image>"):
        folder_dm(flat).setup()

    one = make_folder(tmp_path / "one", {"only": 3})
    with pytest.raises(ConfigError, match=r"Found 1 class\(es\) \['only'\]; at least 2"):
        folder_dm(one).setup()

    empty = make_folder(tmp_path / "empty", {"a": 3, "b": 0})
    (empty / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match=r"Class folder .*b' has no images"):
        folder_dm(empty).setup()

    ok = make_folder(tmp_path / "ok", {"a": 3, "b": 3})
    with pytest.raises(
        ConfigError, match=r"`data.resize` = 'stretch': input should be 'resize', 'center_crop' or 'pad'"
    ):
        folder_dm(ok, resize="stretch").setup()
    with pytest.raises(ConfigError, match=r"`data.on_corrupt` = 'ignore': input should be 'error' or 'skip'"):
        folder_dm(ok, on_corrupt="ignore").setup()
    with pytest.raises(ConfigError, match=r"`data.channels` = 4: input should be 1 or 3"):
        folder_dm(ok, channels=4).setup()
    with pytest.raises(ConfigError, match=r"`data.shots` = -1: input should be greater than or equal to 1"):
        folder_dm(ok, shots=-1).setup()
    with pytest.raises(ConfigError, match=r"`data.shots`=3 but class 'a' has only 2 training image"):
        folder_dm(ok, shots=3, test_fraction=0.34).setup()
    with pytest.raises(ConfigError, match=r"`data.extensions` = '.png': input should be a valid list"):
        folder_dm(ok, extensions=".png").setup()
    with pytest.raises(ConfigError, match=r"Class folder .* has no images with extension in `data.extensions`"):
        folder_dm(ok, extensions=[".jpg"]).setup()


# --------------------------------------------------------------------------- sampling


def test_step_batch_sampler_deterministic_and_covering():
    s = StepBatchSampler(10, 4, seed=7, num_batches=10, rank=0, world_size=1)
    batches = list(s)
    assert len(s) == 10 and len(batches) == 10 and all(len(b) == 4 for b in batches)
    assert batches == list(StepBatchSampler(10, 4, seed=7, num_batches=10, rank=0, world_size=1))
    assert batches != list(StepBatchSampler(10, 4, seed=8, num_batches=10, rank=0, world_size=1))
    flat = np.concatenate(batches)
    for e in range(4):  # every epoch (10 consecutive stream positions) is a permutation
        assert sorted(flat[10 * e : 10 * (e + 1)].tolist()) == list(range(10))
    expected = np.random.default_rng([7, 0]).permutation(10)
    assert flat[:10].tolist() == expected.tolist()

    big = StepBatchSampler(3, 7, seed=0, num_batches=3, rank=0, world_size=1)  # batch > n_items
    assert [sorted(np.bincount(b, minlength=3).tolist()) for b in big][0] == [2, 2, 3]


def test_step_batch_sampler_resume_matches_uninterrupted():
    full = list(StepBatchSampler(13, 5, seed=1, num_batches=20, rank=0, world_size=1))
    for k in (0, 1, 7, 19):
        s = StepBatchSampler(13, 5, seed=1, num_batches=20, rank=0, world_size=1)
        s.start_batch = k
        assert list(s) == full[k:]
    s.start_batch = 20  # the next pass continues the stream
    nxt = list(s)
    assert len(nxt) == 20 and nxt[0] == s.batch(20) and nxt[0] != full[0]


def test_step_batch_sampler_ranks_are_disjoint_slices():
    single = StepBatchSampler(12, 6, seed=2, num_batches=4, rank=0, world_size=1)
    r0 = list(StepBatchSampler(12, 3, seed=2, num_batches=4, rank=0, world_size=2))
    r1 = list(StepBatchSampler(12, 3, seed=2, num_batches=4, rank=1, world_size=2))
    for b, (a0, a1) in enumerate(zip(r0, r1)):
        assert a0 + a1 == single.batch(b)
        assert not set(a0) & set(a1)
    with pytest.raises(ValueError, match="rank"):
        StepBatchSampler(12, 3, rank=2, world_size=2)

    class FakeDistributed:  # what Lightning injects under DDP
        rank, num_replicas = 1, 2

    assert StepBatchSampler(12, 3, seed=2, num_batches=4, sampler=FakeDistributed()).batch(0) == r1[0]


def _loader(**kw):
    ds = torch.utils.data.TensorDataset(torch.arange(11))
    return ResumableDataLoader(
        ds, batch_sampler=StepBatchSampler(11, 4, seed=5, num_batches=50, rank=0, world_size=1), **kw
    )


def test_resumable_dataloader_state_round_trip():
    ref = [b[0].tolist() for b in _loader()]
    assert len(ref) == 50

    dl = _loader()
    it = iter(dl)
    got = [next(it)[0].tolist() for _ in range(7)]
    state = dl.state_dict()
    assert state == {"batches_done": 7} and got == ref[:7]

    fresh = _loader()
    fresh.load_state_dict(state)
    assert fresh.batch_sampler.start_batch == 7
    assert [b[0].tolist() for b in fresh] == ref[7:]
    assert fresh.state_dict() == {"batches_done": 50}
    # a new iter() on the same loader continues where the last one stopped
    it = iter(dl)
    assert next(it)[0].tolist() == ref[7]

    from lightning_fabric.utilities.types import _Stateful

    assert isinstance(dl, _Stateful)  # what Lightning checks to store it in checkpoints


def test_resumable_dataloader_with_workers():
    ref = [b[0].tolist() for b in _loader()][:6]
    dl = _loader(num_workers=1)
    it = iter(dl)
    got = [next(it)[0].tolist() for _ in range(3)]
    assert dl.state_dict() == {"batches_done": 3}  # worker prefetch is not counted
    del it
    fresh = _loader(num_workers=1)
    fresh.load_state_dict(dl.state_dict())
    it = iter(fresh)
    assert got + [next(it)[0].tolist() for _ in range(3)] == ref


def test_lightning_injects_distributed_sampler(digits):
    """Under DDP Lightning re-creates the loader with a DistributedSampler: keep our sampler."""
    from lightning_fabric.utilities.data import _replace_dunder_methods
    from pytorch_lightning.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        dl = digits.train_dataloader()
    new = _update_dataloader(dl, DistributedSampler(dl.dataset, num_replicas=2, rank=1, shuffle=True))
    assert isinstance(new, ResumableDataLoader) and isinstance(new.batch_sampler, StepBatchSampler)
    assert (new.batch_sampler.rank, new.batch_sampler.world_size) == (1, 2)
    assert new.batch_sampler.seed == dl.batch_sampler.seed and len(new) == len(dl)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
def test_lightning_checkpoint_resume_sees_the_same_batches(tmp_path):
    import pytorch_lightning as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append(y.tolist())
            return (self.w * x.mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def trainer(ckpt_cb=None):
        return pl.Trainer(
            accelerator="cpu",
            max_steps=6,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[ckpt_cb] if ckpt_cb else [],
            enable_checkpointing=ckpt_cb is not None,
            default_root_dir=tmp_path,
        )

    def dm():
        return DigitsDataModule(image_size=8, shots=2, batch_size=3, seed=4)

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    full = Recorder()
    trainer(ckpt).fit(full, datamodule=dm())
    assert len(full.seen) == 6
    path = tmp_path / "ck" / "epoch=0-step=3.ckpt"
    saved = torch.load(path, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert saved == [{"batches_done": 3}]

    resumed = Recorder()
    trainer().fit(resumed, datamodule=dm(), ckpt_path=path)
    assert resumed.seen == full.seen[3:]
