"""Pictures: class grids, contact sheets and training-progress plots."""

from __future__ import annotations

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
            out[y:y + h, x:x + w] = img
    return out


def class_grid(images: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
               path: str | Path | None = None, scale: int | None = None) -> np.ndarray:
    """One row per class (in label order). Saved to ``path`` if given."""
    labels = np.asarray(labels)
    rows = [[images[i] for i in np.flatnonzero(labels == c)] for c in range(len(class_names))]
    grid = tile([r for r in rows if r])
    if scale is None:
        scale = max(1, 64 // images.shape[1])
    grid = np.kron(grid, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else grid
    if path is not None:
        from imgaug_gen.io import atomic_save_image

        atomic_save_image(path, grid)
    return grid


def preview_sheet(out_dir: str | Path, records: list[dict], class_names: Sequence[str],
                  per_group: int = 6, path: str | Path | None = None) -> Path:
    """``OUT/preview.png``: one row per class; real | synthetic (sample) | synthetic (img2img)
    | augmented copies, ``per_group`` of each, separated by blank cells."""
    from PIL import Image

    out_dir = Path(out_dir)
    groups = [("real", lambda r: r["source"] == "real" and not r.get("augment")),
              ("sample", lambda r: r["source"] == "synthetic" and r.get("mode") == "sample" and not r.get("augment")),
              ("img2img", lambda r: r["source"] == "synthetic" and r.get("mode") == "img2img" and not r.get("augment")),
              ("augmented", lambda r: bool(r.get("augment")))]
    rows, blank = [], None
    for name in class_names:
        row: list[np.ndarray] = []
        for _, keep in groups:
            picked = [r for r in records if r["class_name"] == name and keep(r)][:per_group]
            imgs = [np.asarray(Image.open(out_dir / r["file"]).convert("RGB")) for r in picked]
            if imgs:
                if blank is None:
                    blank = np.full_like(imgs[0], 255)
                row += imgs + [blank]
        if row:
            rows.append(row[:-1])
    grid = tile(rows)
    scale = max(1, 64 // (blank.shape[0] if blank is not None else 64))
    grid = np.kron(grid, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else grid
    from imgaug_gen.io import atomic_save_image

    path = Path(path or out_dir / "preview.png")
    atomic_save_image(path, grid)
    return path


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
    require(metrics_csv.is_file(), f"`{metrics_csv}` does not exist; train with `logger=csv` (the default) "
                                   "to get the metrics a progress plot is drawn from.")
    series, per_batch = _csv_series(metrics_csv)
    losses = {k: v for k, v in series.items() if not k.startswith("val/")}
    scores = {k: v for k, v in series.items() if k.startswith("val/") and k != "val/kid"}
    kid = series.get("val/kid")
    xlabel = "optimiser step" if per_batch is not None else "step (logged batches)"

    # The object-oriented API: no pyplot state, and the caller's backend (e.g. a notebook's inline) stays.
    from matplotlib.figure import Figure

    def draw(ax, name, pts, **kw):
        return ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None,
                       markersize=3, label=name, **kw)

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
