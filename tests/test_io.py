"""imgaug_gen.io directly: atomic writes leave the old file or the new one, never a half or a temp."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imgaug_gen.errors import ConfigError
from imgaug_gen.io import (
    atomic_path,
    atomic_save_image,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    safe_class_dir,
)


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


def test_bytes_written_through_descriptors_keep_the_old_file_when_the_disk_fills(tmp_path, monkeypatch):
    """atomic_write_bytes (the per-image path, on bare descriptors): a write that fails after the
    temp file exists leaves the old file, no temp file and no open descriptor; relative paths and
    missing folders work."""
    import errno
    import os

    target = tmp_path / "deep" / "er" / "a.bin"
    atomic_write_bytes(str(target), b"old")
    real_write, closed = os.write, []
    real_close = os.close

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new" * 1000)
    monkeypatch.setattr(os, "write", real_write)
    assert target.read_bytes() == b"old" and len(closed) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]
    monkeypatch.chdir(target.parent)
    atomic_write_bytes("b.bin", bytes(range(256)) * 300)
    assert (target.parent / "b.bin").read_bytes() == bytes(range(256)) * 300
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin", "b.bin"]


def test_files_get_the_umask_mode_without_the_umask_being_touched(tmp_path, monkeypatch):
    """Writer threads must not read the umask (reading it means setting it, process-wide): the
    kernel applies it to the create call; every kind of write gets 0666 less the umask."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("os.umask called while writing"))
        img = np.zeros((4, 4), np.uint8)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: atomic_save_image(tmp_path / "new_dir" / f"{i}.png", img), range(64)))
        atomic_write_text(tmp_path / "t.txt", "x")
        with atomic_path(tmp_path / "p.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        monkeypatch.undo()
        os.umask(old)
    files = [tmp_path / "t.txt", tmp_path / "p.bin", *(tmp_path / "new_dir").iterdir()]
    assert len(files) == 66
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o640)}


@pytest.mark.parametrize(
    "shape,mode",
    [
        ((5, 7), "L"),
        ((5, 7, 1), "L"),
        ((5, 7, 2), "LA"),
        ((5, 7, 3), "RGB"),
        ((5, 7, 4), "RGBA"),
        ((1, 300, 3), "RGB"),
        ((70, 70, 3), "RGB"),
    ],
)
def test_images_round_trip_losslessly_at_any_compression(tmp_path, shape, mode):
    a = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    for level in (0, 1, 9):
        atomic_save_image(tmp_path / f"{level}.png", a, compress_level=level)
        with Image.open(tmp_path / f"{level}.png") as im:
            im.load()  # PIL checks every chunk's CRC on load
            assert (im.format, im.mode, im.size) == ("PNG", mode, (shape[1], shape[0]))
            back = np.asarray(im)
        assert np.array_equal(back, a.reshape(back.shape))
    # other formats go through PIL's writer
    grey = a if a.ndim == 2 else a[:, :, 0]
    atomic_save_image(tmp_path / "b.bmp", grey, format="BMP")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.bmp")), grey)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", ".hidden", "nul\x00"])
def test_class_names_that_cannot_be_folders(name):
    with pytest.raises(ConfigError, match="cannot be a folder name inside `out_dir`"):
        safe_class_dir(name)
    assert safe_class_dir("cat 7") == "cat 7"


@pytest.mark.parametrize("bad_id", ["../x", "a/b", "..\\x", "a\x00"])
def test_folder_writer_refuses_ids_that_are_not_file_names(tmp_path, bad_id):
    from imgaug_gen.export import FolderWriter

    with FolderWriter(tmp_path / "out", ["a", "b"], {"job": 1}) as w:
        w.write({"id": "ok", "label": 1}, np.zeros((3, 3), np.uint8))
        with pytest.raises(ConfigError, match="without path separators"):
            w.write({"id": bad_id, "label": 0}, np.zeros((3, 3), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["train/b/ok.png"]
    assert [json.loads(l)["id"] for l in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()] == ["ok"]


@pytest.mark.parametrize("io_workers", [0, 1, 2])
def test_folder_writer_chunks_keep_order_and_lines_follow_files(tmp_path, io_workers):
    """Images go to the writer threads ``chunk`` at a time; manifest lines (kept and rejected) come
    out in the order written, each kept one only once its file is in place, whatever the threads."""
    from imgaug_gen.export import FolderWriter

    out = tmp_path / "out"
    order = []
    with FolderWriter(out, ["a", "b"], {"job": 1}, io_workers=io_workers, chunk=4, max_pending=5) as w:
        for i in range(23):
            rec = {"id": f"x{i:02d}", "label": i % 2}
            if i % 7 == 3:
                w.write_rejected(rec)
            else:
                w.write(rec, np.full((4, 4), i, np.uint8))
            order.append(rec["id"])
            for line in (out / "manifest.jsonl").read_text().splitlines() if (out / "manifest.jsonl").exists() else []:
                r = json.loads(line)  # every line already written names a file in place (or none)
                assert r.get("kept", True) is False or (out / r["file"]).is_file()
    lines = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == order
    assert sum(r.get("kept", True) is False for r in lines) == 3
    for r in lines:
        if r.get("kept", True):
            assert np.asarray(Image.open(out / r["file"])).max() == int(r["id"][1:])


def test_folder_writer_a_failed_chunk_raises_and_writes_no_lines_for_it(tmp_path):
    from imgaug_gen.export import FolderWriter

    out = tmp_path / "out"
    w = FolderWriter(out, ["a", "b"], {"job": 1}, io_workers=1, chunk=4)
    for i in range(4):
        w.write({"id": f"ok{i}", "label": 0}, np.zeros((3, 3), np.uint8))
    w.flush()
    (out / "train").mkdir(exist_ok=True)
    (out / "train" / "b").write_text("a file where the class folder should be")
    w.write({"id": "bad", "label": 1}, np.zeros((3, 3), np.uint8))
    with pytest.raises(OSError):
        w.close()
    ids = [json.loads(l)["id"] for l in (out / "manifest.jsonl").read_text().splitlines()]
    assert ids == ["ok0", "ok1", "ok2", "ok3"]
