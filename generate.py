"""Generate a ready-to-train image folder: python generate.py run_dir=RUN out_dir=OUT [n_per_class=200] ...

Thin front end: Hydra composes conf/generate.yaml, imgaug_gen.pipeline.generate does the work.
"""

import os
import sys

import hydra

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg) -> None:
    from imgaug_gen.errors import ConfigError
    from imgaug_gen.pipeline import generate

    try:
        metrics = generate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"folder: {os.path.join(cfg.out_dir, 'train')}")
    if "fid" in metrics:
        print(f"scores: {os.path.join(cfg.out_dir, 'metrics.json')}  (FID={metrics['fid']:.3f}, "
              f"KID={metrics['kid_mean']:.4f}, features={metrics['features']}, "
              f"synthetic={metrics['n_synthetic']}, real={metrics['n_real']})")


if __name__ == "__main__":
    main()
