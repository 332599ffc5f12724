"""``make demo``: train a small cGAN on the digits default, generate a scored folder, print where.

python -m imgaug_gen.demo [--out demo_out] [--steps N] [--shots K] [--n-per-class N] [train.py overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

#: ``python -m imgaug_gen.demo`` timed on the reference machine (2 CPU cores shared with another job):
#: seconds spent in training for ``steps`` optimiser steps (280 s), and in everything else (start-up,
#: the domain feature network for the scores when not cached, generating and scoring ``n_per_class``
#: images per class).
MEASURED = {"steps": 2000, "train_s": 280.0, "other_s": 40.0, "n_per_class": 100, "cores": 2}


def estimate_seconds(steps: int, n_per_class: int = 100) -> float:
    """The demo's expected wall time: the measured training time scaled by the step count, the rest by
    the images generated."""
    m = MEASURED
    return m["train_s"] * steps / m["steps"] + m["other_s"] * max(n_per_class, 1) / m["n_per_class"]


def _about(seconds: float) -> str:
    if seconds < 60:
        return "under a minute"
    minutes = seconds / 60
    return f"about {round(minutes)} min" if minutes < 10 else f"about {5 * round(minutes / 5)} min"


def plan_message(cfg, n_per_class: int = 100) -> str:
    """What the demo is about to do and roughly how long it takes, from its composed train config."""
    steps, shots = int(cfg.trainer.max_steps), cfg.data.get("shots")
    data = "sklearn digits" if str(cfg.data._target_).endswith("DigitsDataModule") else f"{cfg.data.get('root')}"
    per_class = "all images" if shots is None else f"{int(shots)} images/class"
    model = {"CGANModule": "a conditional GAN", "DDPMModule": "a conditional DDPM"}.get(
        str(cfg.model._target_).rsplit(".", 1)[-1], str(cfg.model._target_).rsplit(".", 1)[-1]
    )
    return (
        f"Training {model} on {data} ({per_class}, {int(cfg.data.image_size)} px) for {steps:,} optimiser "
        f"steps, then generating and scoring a folder ({n_per_class} synthetic images/class): "
        f"{_about(estimate_seconds(steps, n_per_class))} on {MEASURED['cores']} CPU cores."
    )


def main(argv=None) -> dict:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="folder for the run and the generated data")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (2 per GAN iteration)")
    p.add_argument("--shots", type=int, default=None, help="real images per class")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (key=value), e.g. model.lr_g=2e-4")
    args = p.parse_args(argv)

    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.generate import generate
    from imgaug_gen.jobs.train import train

    out = Path(args.out).resolve()
    run_dir, data_dir = out / "run", out / "data"
    overrides = ["experiment=digits_cgan", f"run_dir={run_dir}"]
    if args.steps:
        overrides.append(f"trainer.max_steps={args.steps}")
    if args.shots:
        overrides.append(f"data.shots={args.shots}")
    overrides += args.overrides
    train_cfg = compose_config("train", overrides)
    print(plan_message(train_cfg, args.n_per_class), flush=True)
    t0 = time.perf_counter()
    train_metrics, _ = train(train_cfg)
    t1 = time.perf_counter()
    metrics = generate(
        compose_config(
            "generate",
            [f"run_dir={run_dir}", f"out_dir={data_dir}", f"n_per_class={args.n_per_class}", "overwrite=true"],
        )
    )
    t2 = time.perf_counter()
    print()
    print(f"run:      {run_dir}  (generator/, samples/, metrics.csv; trained in {t1 - t0:.0f}s)")
    print(f"folder:   {data_dir / 'train'}  ({metrics['n_synthetic']} synthetic + {metrics['n_real']} real images)")
    print(f"manifest: {data_dir / 'manifest.jsonl'}")
    print(
        f"scores:   {data_dir / 'metrics.json'}  FID={metrics['fid']:.3f}  KID={metrics['kid_mean']:.4f}  "
        f"({metrics['features']} features; generated in {t2 - t1:.0f}s)"
    )
    print(f"preview:  {data_dir / 'preview.png'}  (one row per class, named; columns titled real | synthetic | ...)")
    print(
        f"progress: {run_dir / 'progress.png'}  (losses and FID/KID over steps; class grids in {run_dir / 'samples'})"
    )
    (out / "demo_summary.json").write_text(
        json.dumps({"train": train_metrics, "generate": metrics}, indent=2, default=str)
    )
    return metrics


if __name__ == "__main__":
    main()
