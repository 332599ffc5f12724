"""Does the classifier get better? python evaluate.py out_dir=EVAL [shots=[5,10,20]] [generators.ddpm.enabled=true] ...

Thin front end: Hydra composes conf/evaluate.yaml, imgaug_gen.evaluation.evaluate does the work.
"""

import os
import sys

import hydra

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg) -> None:
    from imgaug_gen.errors import ConfigError
    from imgaug_gen.evaluation import evaluate

    try:
        ev = evaluate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print((open(ev["files"]["table"]).read().split("\n\n### ")[0]).strip())
    print(f"\neval.json: {ev['files']['eval_json']}\ntable:     {ev['files']['table']}\nchart:     {ev['files']['chart']}")


if __name__ == "__main__":
    main()
