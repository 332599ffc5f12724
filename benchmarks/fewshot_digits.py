"""The headline table: does synthetic data help a few-shot digits classifier?

    python benchmarks/fewshot_digits.py [--out bench_out/fewshot_digits] [--shots 5 10 20] [--seeds 0 1 2]

Runs the real evaluation job (imgaug_gen.evaluation.evaluate, as ``python evaluate.py``) on the
digits default for shots = 5, 10, 20 with (a) real only, (b) real + classical, (c) real +
synthetic + classical for a cGAN, a DDPM (sampled from noise) and the same DDPM's img2img edits
of the real images, each generator trained on exactly the few-shot subset it is evaluated on.
Prints the table (also in OUT/results.md, OUT/eval.json, OUT/accuracy_vs_shots.png) and the
wall time. Budget: 60 minutes on 2 CPU cores. Re-running the same command reuses finished work.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common  # noqa: F401  (offline environment variables)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/fewshot_digits")
    p.add_argument("--shots", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--classifier-steps", type=int, default=600)
    p.add_argument("overrides", nargs="*", help="extra evaluate.py overrides (key=value)")
    args = p.parse_args(argv)

    from imgaug_gen.config import compose_config
    from imgaug_gen.evaluation import evaluate

    overrides = [f"out_dir={Path(args.out).resolve()}", f"shots=[{','.join(map(str, args.shots))}]",
                 f"seeds=[{','.join(map(str, args.seeds))}]", f"classifier.steps={args.classifier_steps}",
                 "generators.cgan.enabled=true", "generators.ddpm.enabled=true",
                 "generators.ddpm_img2img.enabled=true", *args.overrides]
    t0 = time.perf_counter()
    ev = evaluate(compose_config("evaluate", overrides))
    minutes = (time.perf_counter() - t0) / 60
    print()
    print(Path(ev["files"]["table"]).read_text().split("\n\n### ")[0])
    print(f"\nwall time: {minutes:.1f} min (budget 60 min on 2 CPU cores)")
    print(f"files: {ev['files']}")
    if 10 in args.shots:
        r = ev["results"]["10"]
        gains = {m: 100 * (v["mean"] - r["real+classical"]["mean"]) for m, v in r.items()
                 if m.endswith("+classical") and m != "real+classical"}
        best = max(gains, key=gains.get)
        print(f"goal (>= +2.0 points over real+classical at 10 shots): best {best} {gains[best]:+.1f} -> "
              f"{'met' if gains[best] >= 2.0 else 'NOT met'}")
    return ev


if __name__ == "__main__":
    main()
