"""Pictures a person can read without the README: named rows, titled columns, intervals on the chart."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgaug_gen.io import atomic_save_image
from imgaug_gen.visual import class_grid, preview_sheet, tile

from conftest import digits_images

DARK = 100  # a text pixel: every channel below this on the white margin


def _dark(region: np.ndarray) -> int:
    return int((np.asarray(region)[..., :3] < DARK).all(axis=-1).sum())


def _row_spans(n_rows: int, cell: int, scale: int, top: int = 0, pad: int = 2):
    return [
        (top + (pad + i * (cell + pad)) * scale, top + (pad + i * (cell + pad) + cell) * scale) for i in range(n_rows)
    ]


@pytest.mark.parametrize("channels", [1, 3])
def test_class_grid_names_every_row(channels):
    images, labels = digits_images(n_per_class=3, classes=(0, 1, 2), size=16, channels=channels)
    images = np.stack(images)
    bare = class_grid(images, labels, ["zero", "one one", "zwei_ü"], names=False)
    named = class_grid(images, labels, ["zero", "one one", "zwei_ü"])
    assert named.shape[0] == bare.shape[0] and named.shape[2] == 3
    margin = named.shape[1] - bare.shape[1]
    assert margin >= 30  # room for the names
    assert np.array_equal(named[:, margin:], bare)  # the images themselves are unchanged
    for y0, y1 in _row_spans(3, 16, 4):
        assert _dark(named[y0:y1, :margin]) > 20, "each class row has its name on the left"
    assert _dark(named[:8, :margin]) == 0  # the name sits on its row, not above it


def test_class_grid_many_classes_and_a_missing_one():
    rng = np.random.default_rng(0)
    names = [f"class_{i}" for i in range(40)]
    labels = np.repeat([c for c in range(40) if c != 7], 2)  # class 7 has no image: no row
    images = rng.integers(0, 255, (len(labels), 8, 8), dtype=np.uint8)  # HW (1 channel without an axis)
    grid = class_grid(images, labels, names, scale=8)
    bare = class_grid(images, labels, names, scale=8, names=False)
    margin = grid.shape[1] - bare.shape[1]
    assert grid.shape[0] == bare.shape[0] == (2 + 39 * 10) * 8
    assert all(_dark(grid[y0:y1, :margin]) > 20 for y0, y1 in _row_spans(39, 8, 8))


def test_long_class_names_are_shortened():
    images = np.zeros((2, 16, 16, 3), np.uint8)
    short = class_grid(images, [0, 1], ["a", "b"])
    long = class_grid(images, [0, 1], ["a" * 200, "b"])
    assert long.shape[1] - short.shape[1] < 300  # 24 characters at most, not 200


def _folder(tmp_path, kinds=("real", "sample", "img2img", "augment")):
    out = tmp_path / "out"
    names = ["zero", "one one", "zwei_ü"]
    imgs, labels = digits_images(n_per_class=8, classes=(0, 1, 2), size=16, channels=1)
    recs = []
    for k, (im, c) in enumerate(zip(imgs, labels)):
        kind = kinds[k % len(kinds)]
        rec = {
            "id": f"i{k}",
            "file": f"train/{names[c]}/i{k}.png",
            "class_name": names[c],
            "label": c,
            "source": "real" if kind == "real" else "synthetic",
            "mode": kind,
        }
        if kind == "augment":
            rec["augment"] = {"seed": k, "transforms": []}
        atomic_save_image(out / rec["file"], im)
        recs.append(rec)
    return out, names, recs


def test_preview_titles_its_columns_and_names_its_rows(tmp_path):
    out, names, recs = _folder(tmp_path)
    sheet = np.asarray(Image.open(preview_sheet(out, recs, names)).convert("RGB"))
    # 3 rows of 16 px cells scaled to 64, 2 images per group, 4 groups (+ separators): the bare tile is
    # (2 + 3 * 18) * 4 = 224 px high; the titles and names add margins on the top and the left.
    cols = 4 * 2 + 3
    bare_h, bare_w = (2 + 3 * 18) * 4, (2 + cols * 18) * 4
    top, left = sheet.shape[0] - bare_h, sheet.shape[1] - bare_w
    assert top >= 12 and left >= 30
    assert _dark(sheet[:top, left:]) > 50, "column titles above the images"
    for y0, y1 in _row_spans(3, 16, 4, top=top):
        assert _dark(sheet[y0:y1, :left]) > 20, "each class row has its name"
    # one title per group block: each block of 2 cells (+ its separator) has dark pixels above it
    for g in range(4):
        x0 = left + g * 3 * 18 * 4
        assert _dark(sheet[:top, x0 : x0 + 2 * 18 * 4]) > 10, f"group {g} has a title"


def test_preview_only_present_columns(tmp_path):
    out, names, recs = _folder(tmp_path, kinds=("real", "sample"))
    sheet = np.asarray(Image.open(preview_sheet(out, recs, names)).convert("RGB"))
    # real: 4 per class, synthetic: 4 per class -> 4 + 1 + 4 cells, no empty img2img / augmented blocks
    assert sheet.shape[1] < (2 + 10 * 18) * 4 + 200
    assert sheet.shape[0] > (2 + 3 * 18) * 4


def test_training_sample_grid_names_the_classes(trained_cgan):
    png = sorted((trained_cgan / "samples").glob("step_*.png"))[-1]
    grid = np.asarray(Image.open(png).convert("RGB"))
    bare_w = (2 + 2 * 18) * 4  # n_per_class=2 images of 16 px, scaled to 64
    left = grid.shape[1] - bare_w
    assert left >= 15 and grid.shape[0] == (2 + 10 * 18) * 4
    assert all(_dark(grid[y0:y1, :left]) > 10 for y0, y1 in _row_spans(10, 16, 4))


def test_accuracy_chart_draws_the_intervals(tmp_path):
    from imgaug_gen.metrics.downstream import plot_accuracy_vs_shots

    def chart(half_width, name):
        res = {
            s: {"real+classical": {"mean": m, "std": 0.01, "ci95": [m - half_width, m + half_width]}}
            for s, m in ((5, 0.6), (10, 0.8))
        }
        return np.asarray(Image.open(plot_accuracy_vs_shots(res, tmp_path / name)).convert("RGB")).astype(int)

    narrow, wide = chart(0.0, "narrow.png"), chart(0.1, "wide.png")
    blue = lambda a: int(((a[..., 2] - a[..., 0]) > 80).sum())  # noqa: E731 (the first line colour, C0)
    assert narrow.shape == wide.shape and blue(wide) > blue(narrow) + 100


def test_tile_still_takes_ragged_rows():
    a = np.zeros((4, 4, 3), np.uint8)
    assert tile([[a, a], [a]]).shape == (2 + 2 * 6, 2 + 2 * 6, 3)
