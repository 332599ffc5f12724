"""Atomic file writes: everything goes to a temp name in the same folder, then
``os.replace`` renames it, so a reader (or a killed run) never sees half a file;
and the one rule for turning a class name into a folder name."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
import unicodedata
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from imgaug_gen.errors import ConfigError


_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _create_beside(path: str) -> tuple[int, str]:
    """Create ``.<name>.<random>.tmp`` beside ``path``, exclusively, with mode 0666 less the umask.

    Hand-written rather than ``tempfile.mkstemp``: mkstemp makes 0600 files, and giving them the
    usual mode means reading the umask, which can only be done by setting it (process-wide, racing
    with the writer threads); here the kernel applies the umask, as for a plain ``open``. One
    create call per file, the parent folder made only when missing. Plain ``str`` paths: a
    generation job calls this once per image, and ``pathlib`` objects cost more than the create."""
    folder, name = os.path.split(path)
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
        except FileNotFoundError:
            os.makedirs(folder or ".", exist_ok=True)
    raise FileExistsError(f"no free temporary name beside {path} after 100 tries")


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[tuple[BinaryIO, Path]]:
    """Yield an open binary file at a temp name beside ``path`` (and that name); on success close
    it and rename it onto ``path``, on failure close and remove it."""
    fd, tmp = _create_beside(os.fspath(path))
    tmp = Path(tmp)
    f = open(fd, "wb")
    try:
        yield f, tmp
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (an empty file, for writers that open a path themselves);
    on success rename it onto ``path``."""
    with _atomic_file(path) as (f, tmp):
        f.close()
        yield tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``data`` to ``path`` atomically (temp name beside it, then rename).

    The same steps as :func:`_atomic_file` on bare file descriptors, without a file object or a
    context manager: a generation job writes every image through here, and on small PNGs that
    Python scaffolding cost about as much CPU as the create, write and rename themselves."""
    path = os.fspath(path)
    fd, tmp = _create_beside(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def encode_png(array, compress_level: int = 1) -> bytes:
    """A uint8 HW or HWC (C = 1, 2, 3 or 4) array as PNG bytes (8-bit grey / grey+alpha / RGB / RGBA).

    Hand-written (the PNG chunk layout over ``zlib``, filter 0 on every row) rather than PIL's
    writer: for the small images a generation job writes by the thousand, PIL's per-image set-up
    (image object, plugin dispatch, chunk writer) costs several times the compression itself.
    The bytes are a standard PNG; ``tests/test_io.py`` reads them back bit-exact with PIL."""
    import numpy as np

    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    h, w, c = a.shape
    raw = np.zeros((h, 1 + w * c), np.uint8)  # each row: filter byte 0, then the row's bytes
    raw[:, 1:] = a.reshape(h, w * c)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOUR_TYPE[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), int(compress_level))) + chunk(b"IEND", b""))


_PNG_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}


def _small_png(array) -> bool:
    """What :func:`encode_png` writes: uint8, at most 64 x 64 pixels, 1-4 channels."""
    import numpy as np

    return (array.dtype == np.uint8 and array.ndim in (2, 3) and array.shape[0] * array.shape[1] <= 64 * 64
            and (array.ndim == 2 or array.shape[2] in _PNG_COLOUR_TYPE))


def atomic_save_image(path: str | os.PathLike, array, format: str = "PNG", compress_level: int = 1) -> None:
    """Save a uint8 HWC (C = 1 or 3) or HW array as an image, atomically.

    PNG is lossless at every ``compress_level``: 1 gives the same pixels as PIL's default 6 at a
    fraction of the encoding time (files somewhat larger), which is what a generation job waits on.
    Small uint8 PNGs (up to 64 x 64 pixels, where PIL's per-image set-up outweighs the compression)
    go through :func:`encode_png`; larger ones through PIL, whose adaptive row filters make photos'
    files smaller; other formats and dtypes through PIL too."""
    import numpy as np

    array = np.asarray(array)
    if format.upper() == "PNG" and _small_png(array):
        atomic_write_bytes(path, encode_png(array, compress_level))
        return
    from PIL import Image

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    kwargs = {"compress_level": int(compress_level)} if format.upper() == "PNG" else {}
    with _atomic_file(path) as (f, _):
        Image.fromarray(array).save(f, format=format, **kwargs)


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
