"""Train a class-conditional generator: python train.py [model=cgan|ddpm|sd_lora] [data=digits|folder] ...

Thin front end: Hydra composes conf/train.yaml, imgaug_gen.training.train does the work.
"""

import os
import sys

import hydra

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg) -> float | None:
    from imgaug_gen.errors import ConfigError
    from imgaug_gen.training import train

    try:
        metrics, objects = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if objects["trainer"].is_global_zero:
        print(f"generator: {objects['generator_dir']}")
        print("metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics.get("val/fid")  # for Hydra sweepers


if __name__ == "__main__":
    main()
