"""Console scripts: ``imgaug-gen train|generate|evaluate [key=value ...]`` (also ``imgaug-gen-train``,
``imgaug-gen-generate``, ``imgaug-gen-evaluate``), the same jobs and overrides as the repository's
``train.py`` / ``generate.py`` / ``evaluate.py``, which are thin wrappers around these functions.

The configs ship inside the package (``pkg://imgaug_gen.conf``); add your own config folders with
``hydra.searchpath=[file:///path/to/conf]`` (e.g. ``conf/model/mine.yaml`` for a plug-in kind).
"""

from __future__ import annotations

import os
import sys

import hydra

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
CONF = "pkg://imgaug_gen.conf"


def _fail(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def train_main(cfg) -> float | None:
    """``imgaug-gen train``: train a generator (returns validation FID for Hydra sweepers)."""
    from imgaug_gen.errors import ConfigError
    from imgaug_gen.jobs.train import train

    try:
        metrics, objects = train(cfg)
    except ConfigError as e:
        _fail(e)
    if objects["trainer"].is_global_zero:
        print(f"generator: {objects['generator_dir']}")
        print("metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics.get("val/fid")


@hydra.main(version_base="1.3", config_path=CONF, config_name="generate")
def generate_main(cfg) -> None:
    """``imgaug-gen generate``: write a ready-to-train folder from a trained generator."""
    from imgaug_gen.errors import ConfigError
    from imgaug_gen.jobs.generate import generate

    try:
        metrics = generate(cfg)
    except ConfigError as e:
        _fail(e)
    print(f"folder: {os.path.join(cfg.out_dir, 'train')}")
    if "fid" in metrics:
        print(
            f"scores: {os.path.join(cfg.out_dir, 'metrics.json')}  (FID={metrics['fid']:.3f}, "
            f"KID={metrics['kid_mean']:.4f}, features={metrics['features']}, "
            f"synthetic={metrics['n_synthetic']}, real={metrics['n_real']})"
        )


@hydra.main(version_base="1.3", config_path=CONF, config_name="evaluate")
def evaluate_main(cfg) -> None:
    """``imgaug-gen evaluate``: does the classifier get better with the generated data?"""
    from imgaug_gen.errors import ConfigError
    from imgaug_gen.jobs.evaluate import evaluate

    try:
        ev = evaluate(cfg)
    except ConfigError as e:
        _fail(e)
    print((open(ev["files"]["table"]).read().split("\n\n### ")[0]).strip())
    print(
        f"\neval.json: {ev['files']['eval_json']}\ntable:     {ev['files']['table']}\nchart:     {ev['files']['chart']}"
    )


JOBS = {"train": train_main, "generate": generate_main, "evaluate": evaluate_main}


def main(argv: list[str] | None = None) -> None:
    """``imgaug-gen JOB [key=value ...]``: JOB is train, generate or evaluate; the rest are Hydra overrides."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in JOBS:
        print(
            "usage: imgaug-gen {train,generate,evaluate} [key=value ...]   (--help after the job: its config)",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.argv = [f"imgaug-gen-{argv[0]}", *argv[1:]]
    JOBS[argv[0]]()


if __name__ == "__main__":
    main()
