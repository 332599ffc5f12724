"""``make demo``: train a small cGAN on the digits default, generate a scored folder, print where.

python -m imgaug_gen.demo [--out demo_out] [--steps N] [--shots K]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv=None) -> dict:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="folder for the run and the generated data")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (2 per GAN iteration)")
    p.add_argument("--shots", type=int, default=None, help="real images per class")
    p.add_argument("--n-per-class", type=int, default=100)
    args = p.parse_args(argv)

    from imgaug_gen.config import compose_config
    from imgaug_gen.pipeline import generate
    from imgaug_gen.training import train

    out = Path(args.out).resolve()
    run_dir, data_dir = out / "run", out / "data"
    overrides = ["experiment=digits_cgan", f"run_dir={run_dir}"]
    if args.steps:
        overrides.append(f"trainer.max_steps={args.steps}")
    if args.shots:
        overrides.append(f"data.shots={args.shots}")
    t0 = time.perf_counter()
    train_metrics, _ = train(compose_config("train", overrides))
    t1 = time.perf_counter()
    metrics = generate(compose_config("generate", [f"run_dir={run_dir}", f"out_dir={data_dir}",
                                                   f"n_per_class={args.n_per_class}", "overwrite=true"]))
    t2 = time.perf_counter()
    print()
    print(f"run:      {run_dir}  (generator/, samples/, metrics.csv; trained in {t1 - t0:.0f}s)")
    print(f"folder:   {data_dir / 'train'}  ({metrics['n_synthetic']} synthetic + {metrics['n_real']} real images)")
    print(f"manifest: {data_dir / 'manifest.jsonl'}")
    print(f"scores:   {data_dir / 'metrics.json'}  FID={metrics['fid']:.3f}  KID={metrics['kid_mean']:.4f}  "
          f"({metrics['features']} features; generated in {t2 - t1:.0f}s)")
    print(f"preview:  {data_dir / 'preview.png'}  (rows = classes: real | synthetic | augmented)")
    print(f"progress: {run_dir / 'progress.png'}  (losses and FID/KID over steps; class grids in {run_dir / 'samples'})")
    (out / "demo_summary.json").write_text(json.dumps({"train": train_metrics, "generate": metrics}, indent=2,
                                                      default=str))
    return metrics


if __name__ == "__main__":
    main()
