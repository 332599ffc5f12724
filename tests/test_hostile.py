"""Hostile class names: dots, spaces, unicode in folders; `data.class_names` that try to leave out_dir."""

from __future__ import annotations

import pytest

from imgaug_gen.errors import ConfigError

from conftest import gen_cfg, train_overrides, write_digit_folder


def _folder(root, names):
    return write_digit_folder(root, names, n_per_class=8)


def _train(tmp_path, root, *extra):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import train

    run = tmp_path / "run"
    over = [o for o in train_overrides("cgan", run) if not o.startswith("data.shots")]
    train(
        compose_config(
            "train", [*over, "data=folder", f"data.root={root}", "data.image_size=16", "data.shots=4", *extra]
        )
    )
    return run


def test_dots_spaces_unicode_class_folders_round_trip(tmp_path):
    from imgaug_gen.export import read_manifest
    from imgaug_gen.jobs.generate import generate

    names = ["v1.0", "two words", "ünï cødé"]
    run = _train(tmp_path, _folder(tmp_path / "img", names))
    out = tmp_path / "out"
    generate(gen_cfg(run, out, "score=false"))
    assert sorted(p.name for p in (out / "train").iterdir() if p.is_dir()) == sorted(names)
    for r in read_manifest(out):
        assert r["file"].startswith(f"train/{r['class_name']}/") and (out / r["file"]).is_file()


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", ".hidden", "", "x\\y"])
def test_class_names_override_cannot_leave_out_dir(tmp_path, bad):
    root = _folder(tmp_path / "img", ["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"data.class_names\[1\]"):
        _train(tmp_path, root, f"data.class_names=[ok,'{bad}',fine]")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert not (tmp_path / "evil").exists()


def test_class_names_override_renames_output_folders(tmp_path):
    from imgaug_gen.jobs.generate import generate

    root = _folder(tmp_path / "img", ["a", "b", "c"])
    with pytest.raises(ConfigError, match="2 names for the 3 classes"):
        _train(tmp_path, root, "data.class_names=[x,y]")
    run = _train(tmp_path, root, "data.class_names=[cat,dog,fox]")
    out = tmp_path / "out"
    generate(gen_cfg(run, out, "score=false"))
    assert sorted(p.name for p in (out / "train").iterdir() if p.is_dir()) == ["cat", "dog", "fox"]
