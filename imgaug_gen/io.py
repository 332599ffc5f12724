"""The file-system rules every job follows.

* Atomic, durable writes: everything goes to a temp name in the same folder, is fsynced, then
  ``os.replace`` renames it, so a reader (or a killed run, or a power loss) never sees half a file.
* Confinement: a path read from a folder's own files (a manifest line, a checkpoint, a
  generator's config.json) must resolve inside that folder (:func:`confined`).
* One writer per folder: :class:`FolderLock`, an OS lock held for a job's life.
* Hostile images: :func:`open_image` checks the pixel count from the header before decoding.
* The one rule for turning a class name into a folder name (:func:`safe_class_dir`)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import secrets
import struct
import unicodedata
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from imgaug_gen.errors import ConfigError
from imgaug_gen.locks import FolderLock  # noqa: F401  (importable from here, as before)

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


#: fsync every file before its rename (and the manifests at each flush). A job may turn it off for
#: scratch output (``generate.py durable=false``); see :func:`set_durable`.
_DURABLE = True


def set_durable(durable: bool) -> bool:
    """Whether atomic writes fsync before renaming (process-wide, default True); returns the old value."""
    global _DURABLE
    old, _DURABLE = _DURABLE, bool(durable)
    return old


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so the names renamed into it survive a power loss (no-op where unsupported)."""
    if not _DURABLE:
        return
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[tuple[BinaryIO, Path]]:
    """Yield an open binary file at a temp name beside ``path`` (and that name); on success fsync,
    close it and rename it onto ``path``, on failure close and remove it."""
    fd, tmp = _create_beside(os.fspath(path))
    tmp = Path(tmp)
    f = open(fd, "wb")
    try:
        yield f, tmp
        if _DURABLE and f.closed:  # a writer that reopened the temp path by name (atomic_path)
            _fsync_path(tmp)
        elif _DURABLE:
            f.flush()
            os.fsync(f.fileno())
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


def _fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``data`` to ``path`` atomically (temp name beside it, then rename).

    The same steps as :func:`_atomic_file` on bare file descriptors, without a file object or a
    context manager: a generation job writes every image through here, and on small PNGs that
    Python scaffolding cost about as much CPU as the create, write and rename themselves. The
    bytes are fsynced before the rename (unless :func:`set_durable` turned that off), so after a
    power loss a name is either the old file or the whole new one."""
    path = os.fspath(path)
    fd, tmp = _create_beside(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if _DURABLE:
            os.fsync(fd)
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


#: A manifest line's JSON, as ``json.dumps(record, sort_keys=True)`` (one encoder for every line, not one per call).
manifest_json = json.JSONEncoder(sort_keys=True).encode


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
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    if not meta or len(meta) < 2:
        return
    text = json.dumps(
        {"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


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
    raw = np.empty((h, 1 + w * c), np.uint8)  # each row: filter byte 0, then the row's bytes
    raw[:, 0] = 0
    raw[:, 1:] = a.reshape(h, w * c)
    data = zlib.compress(raw, int(compress_level), _window_bits(raw.nbytes))
    return b"".join((_png_head(w, h, c), _U32(len(data)), b"IDAT", data, _U32(zlib.crc32(data, _IDAT_CRC)), _IEND))


def stored_pngs(batch) -> list[bytes]:
    """Each image of a uint8 NHW / NHWC batch as the bytes :func:`encode_png` writes at
    ``compress_level=0``, for images of up to 65,535 raw bytes (one stored zlib block). Hand-written in
    numpy: the fixed parts, the rows and the Adler-32 checksums are made for the whole batch at once,
    leaving one CRC-32 per image (a per-image encoder's set-up costs more than a small image's bytes)."""
    import numpy as np

    a = np.asarray(batch, np.uint8)
    if a.ndim == 3:
        a = a[..., None]
    n, h, w, c = a.shape
    size = h * (1 + w * c)  # the raw rows, each with its filter byte
    if size > 65535:
        raise ValueError(f"stored_pngs: {size} raw bytes per image is more than one stored block")
    head = _png_head(w, h, c)
    zhead = zlib.compress(b"", 0, _window_bits(size))[:2] + b"\x01" + struct.pack("<HH", size, size ^ 0xFFFF)
    idat = 4 + len(zhead)  # where the raw rows start, counted from the IDAT tag
    total = len(head) + 8 + len(zhead) + size + 8 + len(_IEND)
    out = np.zeros((n, total), np.uint8)
    at = len(head) + 4  # the IDAT tag
    out[:, : len(head)] = np.frombuffer(head, np.uint8)
    out[:, at - 4 : at] = np.frombuffer(_U32(len(zhead) + size + 4), np.uint8)
    out[:, at : at + idat] = np.frombuffer(b"IDAT" + zhead, np.uint8)
    rows = out[:, at + idat : at + idat + size].reshape(n, h, 1 + w * c)
    rows[:, :, 1:] = a.reshape(n, h, w * c)  # filter bytes stay 0
    raw = a.reshape(n, h * w * c).astype(np.int64)  # Adler-32 of the rows (the zero filter bytes add nothing
    pos = (size - np.arange(size)).reshape(h, 1 + w * c)[:, 1:].reshape(-1)  # to s1, and count in s2 by position)
    s1 = (1 + raw.sum(1)) % 65521
    s2 = (size + raw @ pos) % 65521
    adler = ((s2 << 16) | s1).astype(">u4")
    end = at + idat + size
    out[:, end : end + 4] = adler.view(np.uint8).reshape(n, 4)
    out[:, -len(_IEND) :] = np.frombuffer(_IEND, np.uint8)
    view = memoryview(out.tobytes())
    crcs = [zlib.crc32(view[i + at : i + end + 4]) for i in range(0, n * total, total)]
    out[:, end + 4 : end + 8] = np.asarray(crcs, ">u4").view(np.uint8).reshape(n, 4)
    blob = out.tobytes()
    return [blob[i : i + total] for i in range(0, n * total, total)]


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


@functools.lru_cache(maxsize=64)
def _png_head(w: int, h: int, c: int) -> bytes:
    """The PNG signature and IHDR chunk of an 8-bit image of this size (the same for every image of it)."""
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOUR_TYPE[c], 0, 0, 0))


_PNG_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}
_IEND = _png_chunk(b"IEND", b"")
_IDAT_CRC = zlib.crc32(b"IDAT")
_U32 = struct.Struct(">I").pack


def stored_png_size(shape) -> int:
    """The bytes :func:`encode_png` writes at ``compress_level=0`` (zlib's stored blocks) for an image of
    ``shape`` (HW or HWC): signature and chunks (57), zlib's header and checksum (6), each row with its
    filter byte, 5 bytes per stored block of up to 65,535 bytes."""
    h, w = shape[:2]
    raw = h * (1 + w * (shape[2] if len(shape) == 3 else 1))
    return 63 + raw + 5 * max(1, -(-raw // 65535))


def _window_bits(n: int) -> int:
    """The smallest zlib window (9-15 bits) that spans ``n`` bytes: the same matches as the default 32 KiB
    window, at a third less set-up time per small image."""
    return min(max(9, (n + 262).bit_length()), 15)


def _small_png(array) -> bool:
    """What :func:`encode_png` writes: uint8, at most 64 x 64 pixels, 1-4 channels."""
    import numpy as np

    return (
        array.dtype == np.uint8
        and array.ndim in (2, 3)
        and array.shape[0] * array.shape[1] <= 64 * 64
        and (array.ndim == 2 or array.shape[2] in _PNG_COLOUR_TYPE)
    )


def png_bytes(array, compress_level: int = 1) -> bytes:
    """A uint8 HW / HWC image as PNG bytes: :func:`encode_png` for small images, PIL for larger ones."""
    import numpy as np

    array = np.asarray(array)
    if _small_png(array):
        return encode_png(array, compress_level)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array).save(
        buf, format="PNG", compress_level=int(compress_level)
    )
    return buf.getvalue()


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
    bad = (
        not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or name.startswith(".")
    )
    if bad:
        raise ConfigError(
            f"class name {name!r} cannot be a folder name inside `out_dir` (empty, '.', '..', a path "
            "separator or a leading dot). Rename the class (e.g. in `class_names`) to a plain name."
        )
    return name


def unique_class_dirs(names, where: str = "class names") -> list[str]:
    """``safe_class_dir`` of each name, refusing two that would share a folder: equal after NFC
    normalisation and case-folding (``café`` typed two ways; ``Cat`` / ``cat`` on a case-insensitive
    file system)."""
    dirs = [safe_class_dir(n) for n in names]
    seen: dict[str, str] = {}
    for original, d in zip(names, dirs):
        key = d.casefold()
        if key in seen:
            raise ConfigError(
                f"{where}: {seen[key]!r} and {original!r} name the same folder once Unicode-normalised (NFC) and "
                "case-folded, so their images would merge into one class folder on some file systems. Rename one "
                "of them."
            )
        seen[key] = original
    return dirs


# -- confinement -------------------------------------------------------------------------------
def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` resolves (symlinks and ``..`` followed) to ``root`` or below it."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether one of the two folders is, contains or lies inside the other (resolved)."""
    return is_inside(a, b) or is_inside(b, a)


def confined(root: str | os.PathLike, name: Any, key: str, prefix: str | None = None) -> Path:
    """``root/name`` for a relative path ``name`` read from one of ``root``'s own files, refusing
    anything that could leave ``root``: a non-string, an absolute path, a ``..`` component, a
    backslash or NUL, a name outside ``prefix/`` (when given), or a symlink that resolves outside.
    ``key`` names where the value was read (``manifest.jsonl line 'syn_0000001': file``)."""
    ok = isinstance(name, str) and name.strip() != "" and "\\" not in name and "\x00" not in name
    parts = name.split("/") if ok else []
    ok = ok and not name.startswith("/") and ".." not in parts and not (len(name) > 1 and name[1] == ":")
    if ok and prefix is not None:
        ok = len(parts) > 1 and parts[0] == prefix
    path = Path(root) / name if ok else None
    if path is None or not is_inside(path, root):
        inside = f"under `{prefix}/` " if prefix else ""
        raise ConfigError(
            f"{key} = {name!r} is not a relative path {inside}inside {str(root)!r}: a folder's files may name only "
            "files of that folder. The folder was edited or comes from an untrusted source; fix that value or "
            "regenerate the folder."
        )
    return path


# -- hostile images ----------------------------------------------------------------------------
def max_image_pixels() -> int | None:
    """The pixel limit of every image read: PIL's ``Image.MAX_IMAGE_PIXELS`` (its decompression-bomb
    limit, about 89 million pixels unless the user changed it; None = no limit)."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def open_image(path: str | os.PathLike, key: str | None = None, expect_size: tuple[int, int] | None = None):
    """Open an image lazily and check its header before any pixel is decoded: at most
    :func:`max_image_pixels` pixels, and ``expect_size`` = (width, height) when given. Returns the
    (not yet decoded) PIL image; the caller decodes it (``np.asarray``, ``.load()``) and closes it.
    Raises :class:`ConfigError` naming ``key`` (default: the path)."""
    import warnings

    from PIL import Image

    where = key or f"image {str(path)!r}"
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, with the file named
            im = Image.open(path)
    except Image.DecompressionBombError as e:  # over twice the limit: PIL refuses it at open
        raise ConfigError(
            f"{where} is too large: {e} It is over the limit of {limit} pixels (PIL's "
            "`Image.MAX_IMAGE_PIXELS`, its decompression-bomb guard). Remove it."
        ) from None
    except OSError as e:
        raise ConfigError(f"{where} cannot be read as an image ({type(e).__name__}: {e}).") from None
    w, h = im.size
    if limit is not None and w * h > limit:
        im.close()
        raise ConfigError(
            f"{where} is {w}x{h} = {w * h} pixels, over the limit of {limit} "
            "(PIL's `Image.MAX_IMAGE_PIXELS`, its decompression-bomb guard). Remove it."
        )
    if expect_size is not None and (w, h) != tuple(expect_size):
        im.close()
        raise ConfigError(
            f"{where} is {w}x{h} pixels; the other images here are "
            f"{expect_size[0]}x{expect_size[1]}. Every image of a folder must have the same size."
        )
    return im


def read_image_array(path: str | os.PathLike, key: str | None = None, expect_size: tuple[int, int] | None = None):
    """uint8 ``[H, W]`` / ``[H, W, C]`` pixels of an image, checked by :func:`open_image` first."""
    import numpy as np

    im = open_image(path, key, expect_size)
    try:
        return np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:  # truncated / corrupt data after a valid header
        raise ConfigError(f"{key or f'image {str(path)!r}'} cannot be decoded ({type(e).__name__}: {e}).") from None
    finally:
        im.close()


def is_durable() -> bool:
    """Whether atomic writes fsync (see :func:`set_durable`)."""
    return _DURABLE


def tree_hash(path: str | os.PathLike) -> str:
    """sha256 (16 hex digits) of every file under ``path``, subfolders included, with their relative
    names (hidden files, such as temp files of a write in progress, are left out); of the file itself
    for a file. A generator folder's identity (``generate`` keeps no image of another generator) and a
    prior's (recorded with every generator started from it)."""
    import hashlib

    root = Path(path)
    h = hashlib.sha256()
    files = [root] if root.is_file() else []
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    for p in files:
        h.update((p.relative_to(root).as_posix() if root.is_dir() else p.name).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def jsonable(value: Any) -> Any:
    """Config values (diffusers' FrozenDicts, tuples, numpy scalars) as JSON-able plain Python; keys
    starting with ``_`` (diffusers' bookkeeping) are left out."""
    from collections.abc import Mapping

    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return value.item()
    return value
