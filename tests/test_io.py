"""imgaug_gen.io directly: atomic writes leave the old file or the new one, never a half or a temp."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imgaug_gen.errors import ConfigError
from imgaug_gen.io import atomic_path, atomic_save_image, atomic_write_json, atomic_write_text, safe_class_dir


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"v": 1})
    assert json.loads(target.read_text()) == {"v": 1}
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) != oct(0o600)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3)])
def test_images_round_trip_losslessly_at_any_compression(tmp_path, shape):
    a = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    for level in (1, 9):
        atomic_save_image(tmp_path / f"{level}.png", a, compress_level=level)
        back = np.asarray(Image.open(tmp_path / f"{level}.png"))
        assert np.array_equal(back, a.reshape(back.shape))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", ".hidden", "nul\x00"])
def test_class_names_that_cannot_be_folders(name):
    with pytest.raises(ConfigError, match="cannot be a folder name inside `out_dir`"):
        safe_class_dir(name)
    assert safe_class_dir("cat 7") == "cat 7"
