"""Atomic file writes: everything goes to a temp name in the same folder, then
``os.replace`` renames it, so a reader (or a killed run) never sees half a file;
and the one rule for turning a class name into a folder name."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Iterator

from imgaug_gen.errors import ConfigError


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        canonical_safetensors_header(tmp)


def canonical_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrite ``path``'s header with its ``__metadata__`` keys sorted (tensor data untouched).

    safetensors writes the metadata map in hash order, so a file with two metadata entries (a
    diffusers LoRA file: ``format`` and ``lora_adapter_metadata``) got different bytes for equal
    content; sorted, equal content gives equal bytes. Not atomic: use it on a file not yet in place."""
    import struct

    path = Path(path)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    if not meta or len(meta) < 2:
        return
    text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def atomic_save_image(path: str | os.PathLike, array, format: str = "PNG", compress_level: int = 1) -> None:
    """Save a uint8 HWC (C = 1 or 3) or HW array as an image, atomically.

    PNG is lossless at every ``compress_level``: 1 gives the same pixels as PIL's default 6 at a
    fraction of the encoding time (files somewhat larger), which is what a generation job waits on."""
    from PIL import Image

    import numpy as np

    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    with atomic_path(path) as tmp:
        kwargs = {"compress_level": int(compress_level)} if format.upper() == "PNG" else {}
        Image.fromarray(array).save(tmp, format=format, **kwargs)


def safe_class_dir(name: str) -> str:
    """A class name as a folder name: refuse anything that could leave ``out_dir``."""
    name = unicodedata.normalize("NFC", str(name))
    bad = (not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
           or name.startswith("."))
    if bad:
        raise ConfigError(
            f"class name {name!r} cannot be a folder name inside `out_dir` (empty, '.', '..', a path "
            "separator or a leading dot). Rename the class (e.g. in `class_names`) to a plain name."
        )
    return name
