"""Pictures: class grids, contact sheets and training-progress plots."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np


def _as_rgb(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    return np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images


def tile(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile a ragged list of rows of HWC uint8 images (same size) into one image."""
    cells = [_as_rgb(np.stack(r)) for r in rows if len(r)]
    h, w = cells[0].shape[1:3]
    ncol = max(len(r) for r in cells)
    out = np.full((len(cells) * (h + pad) + pad, ncol * (w + pad) + pad, 3), fill, np.uint8)
    for i, row in enumerate(cells):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = img
    return out


@functools.lru_cache(maxsize=8)
def _font(size: int):
    """An offline font: matplotlib's bundled DejaVu Sans (Latin, Greek, Cyrillic, ...), else PIL's
    bundled default (FreeType when Pillow has it, else its bitmap font)."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=True), size)
    except Exception:  # noqa: BLE001 (no matplotlib font or no FreeType: PIL's own)
        pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()


def _short(name, limit: int = 24) -> str:
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def font_size_for(cell: int) -> int:
    """A label size that reads beside a cell of ``cell`` pixels (13 to 28 px)."""
    return int(min(28, max(13, cell // 5)))


def add_labels(
    grid: np.ndarray,
    rows: Sequence[tuple[str, float, float]] = (),
    cols: Sequence[tuple[str, float, float]] = (),
    font_size: int = 14,
) -> np.ndarray:
    """``grid`` (HWC or HW uint8) with white margins holding dark text: each row name left of the
    grid, right-aligned and centred on its ``[y0, y1)``; each column title above, centred on its
    ``[x0, x1)`` (grid pixel coordinates). Returns the larger RGB image."""
    from PIL import Image, ImageDraw

    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    gap = max(4, font_size // 3)
    box = lambda t: probe.textbbox((0, 0), t, font=font)  # noqa: E731
    left = max((box(t)[2] for t, _, _ in rows), default=0) + 2 * gap if rows else 0
    line = box("Ag")
    top = line[3] + 2 * gap if cols else 0
    grid = _as_rgb(np.asarray(grid)[None])[0]
    h, w = grid.shape[:2]
    img = Image.new("RGB", (w + left, h + top), "white")
    img.paste(Image.fromarray(grid), (left, top))
    draw = ImageDraw.Draw(img)
    mid = (line[1] + line[3]) / 2  # the text's vertical centre below its drawing origin
    for text, y0, y1 in rows:
        draw.text((left - gap - box(text)[2], top + (y0 + y1) / 2 - mid), text, fill=(0, 0, 0), font=font)
    for text, x0, x1 in cols:
        b = box(text)
        draw.text((left + (x0 + x1) / 2 - (b[0] + b[2]) / 2, gap), text, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def _row_spans(n: int, cell: int, pad: int, scale: int) -> list[tuple[float, float]]:
    """Pixel ``[y0, y1)`` of row ``i`` of a :func:`tile` grid scaled by ``scale`` (same for columns)."""
    return [((pad + i * (cell + pad)) * scale, (pad + i * (cell + pad) + cell) * scale) for i in range(n)]


def class_grid(
    images: np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    path: str | Path | None = None,
    scale: int | None = None,
    names: bool = True,
) -> np.ndarray:
    """One row per class (in label order), each row named on the left (``names=False``: the bare
    grid). Saved to ``path`` if given."""
    labels = np.asarray(labels)
    present = [c for c in range(len(class_names)) if np.any(labels == c)]
    rows = [[images[i] for i in np.flatnonzero(labels == c)] for c in present]
    grid = tile(rows)
    if scale is None:
        scale = max(1, 64 // images.shape[1])
    grid = np.kron(grid, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else grid
    if names:
        spans = _row_spans(len(present), images.shape[1], 2, scale)
        grid = add_labels(
            grid,
            rows=[(_short(class_names[c]), *span) for c, span in zip(present, spans)],
            font_size=font_size_for(images.shape[1] * scale),
        )
    if path is not None:
        from imgaug_gen.io import atomic_save_image

        atomic_save_image(path, grid)
    return grid


#: The contact sheet's columns: title, and which manifest records go there.
PREVIEW_GROUPS = (
    ("real", lambda r: r["source"] == "real" and not r.get("augment")),
    ("synthetic", lambda r: r["source"] == "synthetic" and r.get("mode") == "sample" and not r.get("augment")),
    ("img2img", lambda r: r["source"] == "synthetic" and r.get("mode") == "img2img" and not r.get("augment")),
    ("augmented", lambda r: bool(r.get("augment"))),
)


class PreviewPicks:
    """The records :func:`preview_sheet` shows (the first ``per_group`` of each class and group), picked from
    a stream of any length one record at a time (:meth:`add`): only these are kept (``.records``)."""

    def __init__(self, class_names: Sequence[str], per_group: int = 6):
        self.left = {(str(n), g): per_group for n in class_names for g, _ in PREVIEW_GROUPS}
        self.full: set[tuple] = set()  # (class, source, mode, augmented): every group such a record joins is full
        self.records: list[dict] = []

    def add(self, r: dict) -> None:
        key = (str(r["class_name"]), r["source"], r.get("mode"), bool(r.get("augment")))
        if key in self.full:
            return  # the usual case in a large job, at the cost of one set lookup
        hit = [g for g, keep in PREVIEW_GROUPS if self.left.get((key[0], g), 0) > 0 and keep(r)]
        for g in hit:
            self.left[(key[0], g)] -= 1
        if hit:
            self.records.append(r)
        else:  # the groups depend on these four fields only, and a full group stays full
            self.full.add(key)


def preview_sheet(
    out_dir: str | Path,
    records: list[dict],
    class_names: Sequence[str],
    per_group: int = 6,
    path: str | Path | None = None,
) -> Path:
    """``OUT/preview.png``: one row per class, named on the left; columns titled real | synthetic
    (sample) | img2img | augmented copies (those present), ``per_group`` of each, blocks separated by
    a blank cell."""
    from imgaug_gen.data.manifest import load_folder_images

    out_dir = Path(out_dir)
    picked = {
        (name, g): [r for r in records if r["class_name"] == name and keep(r)][:per_group]
        for name in class_names
        for g, keep in PREVIEW_GROUPS
    }
    groups = [g for g, _ in PREVIEW_GROUPS if any(picked[(n, g)] for n in class_names)]
    names = [n for n in class_names if any(picked[(n, g)] for g in groups)]
    if not names:
        raise ValueError("no images to preview")
    loaded = {k: [_as_rgb(load_folder_images(out_dir, [r]))[0] for r in v] for k, v in picked.items()}
    cell = next(imgs[0] for imgs in loaded.values() if imgs)
    blank = np.full_like(cell, 255)
    scale = max(1, 64 // cell.shape[0])
    probe_font = font_size_for(cell.shape[0] * scale)
    # Each column block is as wide as its fullest class (wide enough for its title), so columns line up.
    widths = {
        g: max(max(len(loaded[(n, g)]) for n in names), _title_cells(g, cell.shape[1] * scale, probe_font))
        for g in groups
    }
    rows, cols, x = [], [], 0
    for g in groups:
        cols.append((g, *_col_span(x, widths[g], cell.shape[1], scale)))
        x += widths[g] + 1
    for n in names:
        row: list[np.ndarray] = []
        for g in groups:
            row += loaded[(n, g)] + [blank] * (widths[g] - len(loaded[(n, g)])) + [blank]
        rows.append(row[:-1])
    grid = tile(rows)
    grid = np.kron(grid, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else grid
    spans = _row_spans(len(names), cell.shape[0], 2, scale)
    grid = add_labels(grid, rows=[(_short(n), *s) for n, s in zip(names, spans)], cols=cols, font_size=probe_font)
    from imgaug_gen.io import atomic_save_image

    path = Path(path or out_dir / "preview.png")
    atomic_save_image(path, grid)
    return path


def _col_span(first: int, n: int, cell: int, scale: int, pad: int = 2) -> tuple[float, float]:
    """Pixel ``[x0, x1)`` of ``n`` cells of a :func:`tile` grid starting at cell ``first``, scaled."""
    return (pad + first * (cell + pad)) * scale, (pad + (first + n) * (cell + pad) - pad) * scale


def _title_cells(title: str, cell: int, font_size: int) -> int:
    """How many cells of ``cell`` pixels a column title needs."""
    from PIL import Image, ImageDraw

    width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), title, font=_font(font_size))[2]
    return max(1, -(-(width + 4) // cell))


def _optimiser_steps_per_batch(rows: list[dict]) -> int | None:
    """Optimiser steps per logged batch (2 for a GAN's D + G steps, 1 otherwise), read from the
    rows that carry both ``step`` (Lightning's logged batch index) and ``global_step`` (optimiser
    steps, written with FID/KID); None when no row has both."""
    from collections import Counter

    exact, at_end = Counter(), Counter()
    for r in rows:
        try:
            s, g = float(r.get("step") or "nan"), float(r.get("global_step") or "nan")
        except ValueError:
            continue
        if not (s >= 0 and g > 0):
            continue
        # Mid-training rows are logged before Lightning counts the batch (g = k * (s + 1)),
        # the train-end row after it (g = k * s).
        if (g / (s + 1)).is_integer():
            exact[int(g / (s + 1))] += 1
        elif s > 0 and (g / s).is_integer():
            at_end[int(g / s)] += 1
    found = exact or at_end
    return found.most_common(1)[0][0] if found else None


def _csv_series(metrics_csv: Path) -> tuple[dict[str, list[tuple[float, float]]], float | None]:
    """Every logged column of ``metrics.csv`` as sorted ``(x, value)`` points, x in optimiser steps where
    the rows allow (see :func:`_optimiser_steps_per_batch`), and the steps-per-batch factor."""
    import csv

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    per_batch = _optimiser_steps_per_batch(rows)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        try:
            x = float(r.get("step") or "nan")
            g = float(r.get("global_step") or "nan")
        except ValueError:
            continue
        if per_batch is not None:
            # Optimiser steps: exact where the row has them, else from the logged batch index.
            x = g if g == g else (x + 1) * per_batch
        if x != x:
            continue
        for k, v in r.items():
            if k in ("epoch", "step", "global_step") or k is None or v in (None, ""):
                continue
            try:
                series.setdefault(k, []).append((x, float(v)))
            except ValueError:
                continue
    for pts in series.values():
        pts.sort()
    return series, per_batch


def progress_plot(metrics_csv: str | Path, path: str | Path) -> Path:
    """``RUN/progress.png``: training losses (left) and validation FID/KID (right; FID on a log
    axis when it spans more than 10x, KID on its own right-hand axis) over optimiser steps, read
    from a run's ``metrics.csv`` (sparse rows and missing columns are fine). Written atomically."""
    from imgaug_gen.errors import require
    from imgaug_gen.io import atomic_path

    metrics_csv, path = Path(metrics_csv), Path(path)
    require(
        metrics_csv.is_file(),
        f"`{metrics_csv}` does not exist; train with `logger=csv` (the default) "
        "to get the metrics a progress plot is drawn from.",
    )
    series, per_batch = _csv_series(metrics_csv)
    losses = {k: v for k, v in series.items() if not k.startswith("val/")}
    scores = {k: v for k, v in series.items() if k.startswith("val/") and k != "val/kid"}
    kid = series.get("val/kid")
    xlabel = "optimiser step" if per_batch is not None else "step (logged batches)"

    # The object-oriented API: no pyplot state, and the caller's backend (e.g. a notebook's inline) stays.
    from matplotlib.figure import Figure

    def draw(ax, name, pts, **kw):
        return ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o" if len(pts) < 30 else None,
            markersize=3,
            label=name,
            **kw,
        )

    fig = Figure(figsize=(10, 3.6), dpi=100)
    ax_loss, ax_fid = fig.subplots(1, 2)
    try:
        for k, pts in sorted(losses.items()):
            draw(ax_loss, k, pts)
        ax_loss.set_title("training losses" if losses else "training losses: none logged yet")
        if losses:
            ax_loss.legend(fontsize=8)

        handles = [h for k, pts in sorted(scores.items()) for h in draw(ax_fid, k, pts)]
        fid = [p[1] for p in series.get("val/fid", [])]
        if fid and min(fid) > 0 and max(fid) / min(fid) > 10:
            ax_fid.set_yscale("log")
        ax_fid.set_ylabel("FID" if "val/fid" in scores else "")
        if kid:
            ax_kid = ax_fid.twinx()
            handles += draw(ax_kid, "val/kid", kid, color="tab:red", linestyle="--")
            ax_kid.set_ylabel("KID")
        ax_fid.set_title("validation FID / KID" if scores or kid else "validation FID / KID: none logged yet")
        if handles:
            ax_fid.legend(handles, [h.get_label() for h in handles], fontsize=8)
        for ax in (ax_loss, ax_fid):
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        fig.clear()
    return path
