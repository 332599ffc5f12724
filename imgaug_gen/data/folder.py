"""A labelled image folder ``root/<class_name>/**/<image>`` as an :class:`ImageDataModule`.

The folder is validated and every image decoded once in :meth:`setup` (few-shot data
is small), converted to ``channels`` (any PIL mode, EXIF orientation applied) and
resized to a square ``image_size`` (``resize`` / ``center_crop`` / ``pad``).
"""

from __future__ import annotations

import logging
import os
import warnings
import zlib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args

import numpy as np
from PIL import Image, ImageOps
from pydantic import Field

from imgaug_gen.data.base import ImageDataModule, LoadedImages, sanitize_id
from imgaug_gen.data.kinds import register_data_kind
from imgaug_gen.errors import ConfigError, require

log = logging.getLogger("imgaug_gen.data")

ResizeMode = Literal["resize", "center_crop", "pad"]
OnCorrupt = Literal["error", "skip"]
RESIZE_MODES = get_args(ResizeMode)
ON_CORRUPT = get_args(OnCorrupt)

#: Files with these extensions must decode; a failure is a corrupt file. Files with any
#: other extension are included only if PIL can open them and are otherwise ignored.
IMAGE_EXTENSIONS = frozenset(
    ".png .apng .jpg .jpeg .jpe .jfif .bmp .dib .gif .tif .tiff .webp .ppm .pgm .pbm .pnm "
    ".tga .ico .avif .qoi .jp2 .j2k .jpx .pcx .psd .heic .heif".split()
)

_RESAMPLE = Image.Resampling.BICUBIC


class _Unreadable(Exception):
    """A file PIL cannot decode (internal; turned into ConfigError or a skip)."""


@register_data_kind("folder")
class LabeledFolderDataModule(ImageDataModule):
    """Images in ``root/<class_name>/...``; classes are the sorted sub-folder names.

    Args (besides the common ones, see :class:`ImageDataModule`):
        root: the folder holding one sub-folder per class.
        resize: ``resize`` (squash to a square), ``center_crop`` (scale the short side,
            crop the centre) or ``pad`` (letterbox on black).
        on_corrupt: ``error`` (default) stops at the first unreadable image file;
            ``skip`` logs and skips it.
        extensions: only files with these extensions are read (e.g. ``[".png", "jpg"]``);
            by default every file PIL can open. Hidden files and folders are ignored.

    Record ids are ``<class>__<path inside the class folder, without extension>``,
    sanitized to one file name (unique; a short hash is appended on collisions).
    """

    def __init__(
        self,
        *,
        root: Optional[str] = None,
        channels: Literal[1, 3] = 3,
        resize: ResizeMode = "resize",
        on_corrupt: OnCorrupt = "error",
        extensions: Optional[Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]] = None,
        **kwargs: Any,
    ) -> None:
        """``root/<class_name>/*``; other arguments as :class:`ImageDataModule`."""
        super().__init__(channels=channels, **kwargs)
        self._args.update(root=root, resize=resize, on_corrupt=on_corrupt, extensions=extensions)
        self.root = root
        self.resize = resize
        self.on_corrupt = on_corrupt
        self.extensions = extensions

    def record_args(self) -> dict[str, Any]:
        """As :meth:`ImageDataModule.record_args`, with ``root`` made absolute (a run is read from anywhere)."""
        args = super().record_args()
        if args.get("root") is not None:
            args["root"] = os.path.abspath(os.path.expanduser(str(args["root"])))
        return args

    # ---- 1. arguments -------------------------------------------------------------
    def _check_args(self) -> None:
        require(
            self.root is not None and str(self.root).strip() != "",
            "`data.root` is not set; pass the image folder, e.g. `data.root=/path/to/images` "
            "(one sub-folder per class).",
        )
        root = Path(os.path.expanduser(str(self.root)))
        require(
            root.exists(),
            f"`data.root` does not exist: {str(self.root)!r} (resolved to {str(root.absolute())!r}); "
            "pass an existing folder with one sub-folder per class.",
        )
        require(
            root.is_dir(),
            f"`data.root` is not a directory: {str(root)!r}; pass the folder that holds one "
            "sub-folder per class (root/<class_name>/<image>).",
        )

    # ---- 2. listing ---------------------------------------------------------------
    def _wanted_exts(self) -> Optional[set[str]]:
        if self.extensions is None:
            return None
        return {"." + e.strip().lstrip(".").lower() for e in self.extensions}

    def _class_files(self, class_dir: Path, seen: dict[str, Path]) -> list[tuple[Path, bool]]:
        return walk_image_files(class_dir, seen, self._wanted_exts())

    # ---- 3. decoding --------------------------------------------------------------
    def _decode(self, path: Path) -> np.ndarray:
        return decode_image(path, int(self.channels), int(self.image_size), self.resize)

    def _load(self) -> LoadedImages:
        root = Path(os.path.expanduser(str(self.root))).absolute()  # records keep absolute paths
        class_dirs = sorted(
            (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
        )
        if not class_dirs:
            loose = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
            hint = f" It holds {len(loose)} loose file(s) (e.g. {loose[0]!r})." if loose else ""
            raise ConfigError(
                f"`data.root` {str(root)!r} has no class sub-folders.{hint} Put each class's images "
                "in its own folder: root/<class_name>/<image>."
            )

        from imgaug_gen.io import unique_class_dirs

        unique_class_dirs([p.name for p in class_dirs], f"`data.root` {str(root)!r}: class folders")
        seen: dict[str, Path] = {}
        for class_dir in class_dirs:
            real = os.path.realpath(class_dir)
            if real in seen:
                raise ConfigError(
                    f"class folders {str(seen[real])!r} and {str(class_dir)!r} are the same folder "
                    "(a symlink): their images would be listed under two classes. Remove one of them."
                )
            seen[real] = class_dir
        images: list[np.ndarray] = []
        labels: list[int] = []
        ids: list[str] = []
        paths: list[Optional[str]] = []
        used_ids: set[str] = set()
        skipped: list[str] = []
        for c, class_dir in enumerate(class_dirs):
            n_before = len(labels)
            n_skipped_before = len(skipped)
            files = self._class_files(class_dir, seen)
            for path, arr in decode_files(files, self._decode, self.on_corrupt, skipped, "data.on_corrupt"):
                images.append(arr)
                labels.append(c)
                paths.append(str(path))
                rel = path.relative_to(class_dir).with_suffix("").as_posix()
                ids.append(self._unique_id(class_dir.name, rel, path, used_ids))
            if len(labels) == n_before:
                n_skip = len(skipped) - n_skipped_before
                why = f" ({n_skip} unreadable file(s) were skipped)" if n_skip else ""
                exts = (
                    "" if self.extensions is None else f" with extension in `data.extensions`={list(self.extensions)}"
                )
                raise ConfigError(
                    f"Class folder {str(class_dir)!r} has no images{exts}{why}. Add images to it or "
                    f"remove the folder from `data.root`."
                )
        if skipped:
            log.warning("skipped %d unreadable image file(s) under %s (`data.on_corrupt=skip`)", len(skipped), root)
        return LoadedImages(
            images=np.stack(images).astype(np.uint8, copy=False),
            labels=np.asarray(labels, dtype=np.int64),
            class_names=[p.name for p in class_dirs],
            ids=ids,
            paths=paths,
        )

    @staticmethod
    def _unique_id(class_name: str, rel: str, path: Path, used: set[str]) -> str:
        base = f"{sanitize_id(class_name)}__{sanitize_id(rel.replace('/', '__'))}"
        uid = base
        if uid in used:
            uid = f"{base}-{zlib.crc32(str(path).encode('utf-8')):08x}"
            k = 1
            while uid in used:
                uid = f"{base}-{k}"
                k += 1
        used.add(uid)
        return uid


# --------------------------------------------------------------------------- image helpers


def walk_image_files(top: Path, seen: dict[str, Path], wanted: Optional[set[str]] = None) -> list[tuple[Path, bool]]:
    """(file, must_decode) for every candidate image file under ``top``, sorted; ``wanted``: only these
    extensions (each must decode), else every file, those with an image extension marked must-decode.

    Symlinked folders are followed, each real folder at most once (``seen``: real path -> the folder it
    was first listed as, shared by all the walks of one data set): a link back to a folder already listed
    (``loop -> .``) or a second link to the same folder is skipped and logged, so no image is listed twice
    and a loop cannot make the walk explode. Hidden files and folders are ignored."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        kept = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            sub = Path(dirpath) / d
            real = os.path.realpath(sub)
            if real in seen:
                log.info("not following %s: it is the folder %s, already listed", sub, seen[real])
                continue
            seen[real] = sub
            kept.append(d)
        dirnames[:] = kept
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            ext = os.path.splitext(fn)[1].lower()
            if wanted is None:
                out.append((Path(dirpath) / fn, ext in IMAGE_EXTENSIONS))
            elif ext in wanted:
                out.append((Path(dirpath) / fn, True))
    return out


def decode_files(files, decode, on_corrupt: str, skipped: list[str], key: str):
    """Yield ``(path, array)`` for each ``(path, must_decode)`` in ``files`` that ``decode`` reads. A file
    that does not decode is ignored when it need not be an image; a must-decode one is an error naming it
    and ``key`` (or, with ``on_corrupt="skip"``, logged and appended to ``skipped``)."""
    for path, must_decode in files:
        try:
            arr = decode(path)
        except _Unreadable as e:
            if not must_decode:
                log.debug("ignoring non-image file %s (%s)", path, e)
                continue
            if on_corrupt == "skip":
                log.warning("skipping unreadable image %s (%s)", path, e)
                skipped.append(str(path))
                continue
            raise ConfigError(
                f"Cannot read image file {str(path)!r} ({e}). Fix or remove it, or set `{key}=skip` to skip such files."
            ) from None
        yield path, arr


def decode_image(path: Path, channels: int, size: int, resize: str = "resize") -> np.ndarray:
    """One file -> uint8 ``[size, size, channels]`` (EXIF orientation applied, any PIL mode converted);
    raises :class:`_Unreadable`. PIL's decompression-bomb limit is checked from the header before any
    pixel is decoded."""
    from imgaug_gen.io import open_image

    try:
        with open_image(path) as im:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
                im = ImageOps.exif_transpose(im)
                im = to_mode(im, "L" if channels == 1 else "RGB")
                im = fit_square(im, int(size), resize)
                arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for bad files; all mean "unreadable"
        raise _Unreadable(f"{type(e).__name__}: {e}") from e
    return arr[..., None] if arr.ndim == 2 else arr


def to_mode(im: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image to 8-bit ``mode`` (``"L"`` or ``"RGB"``).

    16/32-bit integer images are scaled by 65535 (what PIL produces for 16-bit PNG/TIFF),
    float images are clipped to [0, 255], transparency is composited on black.
    """
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        a = np.clip(a, 0, 65535) * (255.0 / 65535.0)
        im = Image.fromarray(np.round(a).astype(np.uint8))
    elif im.mode == "F":
        im = Image.fromarray(np.round(np.clip(np.asarray(im), 0, 255)).astype(np.uint8))
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    elif im.mode in ("LA", "La", "RGBa") or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, im).convert("RGB")
    if im.mode != mode:
        im = im.convert(mode)
    return im


def fit_square(im: Image.Image, size: int, how: str) -> Image.Image:
    """Make ``im`` a ``size`` x ``size`` image: ``resize`` (squash), ``center_crop`` or ``pad``."""
    if im.size == (size, size):
        return im
    if how == "resize":
        return im.resize((size, size), _RESAMPLE)
    if how == "center_crop":
        return ImageOps.fit(im, (size, size), method=_RESAMPLE, centering=(0.5, 0.5))
    if how == "pad":
        return ImageOps.pad(im, (size, size), method=_RESAMPLE, color=0, centering=(0.5, 0.5))
    raise ValueError(f"unknown resize mode {how!r}")
