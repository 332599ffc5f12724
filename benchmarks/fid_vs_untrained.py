"""FID/KID of a trained run's generator vs the same architecture untrained (random init).

Both are scored the same way (domain features, same real reference images, same label
counts and seeds). Works for every generator kind (the untrained model is rebuilt
from the run's own config.yaml).

python benchmarks/fid_vs_untrained.py RUN [--n-per-class 100]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _common  # noqa: F401
from _common import print_table


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=4321)
    args = p.parse_args()

    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from imgaug_gen.generators.base import load_generator
    from imgaug_gen.jobs.train import build_datamodule, build_module
    from imgaug_gen.metrics import FidelityEvaluator, build_feature_extractor

    run = Path(args.run_dir)
    cfg = OmegaConf.load(run / "config.yaml")
    dm = build_datamodule(cfg)
    ref, ref_labels = dm.reference_arrays()
    extractor = build_feature_extractor(cfg.metrics, ref, ref_labels, dm.num_classes)
    evaluator = FidelityEvaluator(extractor, ref)
    labels = np.repeat(np.arange(dm.num_classes), args.n_per_class)
    torch.manual_seed(cfg.seed)
    untrained = build_module(cfg, dm).to_generator()
    trained = load_generator(run / "generator")
    rows = []
    for name, gen in (("untrained (random init)", untrained), (f"trained ({run.name})", trained)):
        s = evaluator.evaluate(gen.sample(labels, seeds=args.seed))
        rows.append([name, gen.kind, s["n_fake"], s["n_real"], s["fid"], s["kid_mean"]])
    print_table(
        f"FID/KID vs real reference ({extractor.name} features, {args.n_per_class} per class)",
        ["generator", "kind", "n_fake", "n_real", "FID", "KID"],
        rows,
    )
    print(f"\nuntrained FID / trained FID = {rows[0][4] / rows[1][4]:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
