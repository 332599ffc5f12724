"""``make demo``'s training time and folder FID: the current recipe vs another, side by side.

Runs ``python -m imgaug_gen.demo`` once per recipe and round (alternating, so a machine whose load
changes during the run does not favour one), reads the training seconds and the folder FID from the
demo's own printout, and prints them with the ratio of training times. Default comparison: the
current ``experiment=digits_cgan`` vs the former recipe (3,000 optimiser steps at lr 2e-4).

    python benchmarks/bench_demo.py [--rounds 1] [--out bench_out/demo]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (offline environment variables)
from _common import print_table

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "current (experiment=digits_cgan)": [],
    "former (3,000 steps, lr 2e-4)": ["--steps", "3000", "model.lr_g=2e-4", "model.lr_d=2e-4",
                                      "callbacks.fidelity.every_n_steps=1000"],
}


def run_demo(out: Path, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imgaug_gen.demo", "--out", str(out), *extra], cwd=ROOT,
                          capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"demo failed ({extra}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    trained = re.search(r"trained in (\d+)s", proc.stdout)
    fid = re.search(r"FID=([0-9.]+)", proc.stdout)
    steps = re.search(r"for ([\d,]+) optimiser steps", proc.stdout)
    return {"train_s": float(trained.group(1)), "fid": float(fid.group(1)), "wall_s": wall,
            "steps": steps.group(1) if steps else "?"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default="bench_out/demo")
    args = p.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in RECIPES}
    for rnd in range(args.rounds):
        names = list(RECIPES) if rnd % 2 == 0 else list(reversed(RECIPES))
        for name in names:
            out = Path(args.out).resolve() / f"{'current' if name.startswith('current') else 'former'}_{rnd}"
            results[name].append(run_demo(out, RECIPES[name]))
            print(f"round {rnd}: {name}: {results[name][-1]}", flush=True)
    base = min(r["train_s"] for r in results["former (3,000 steps, lr 2e-4)"])
    rows = []
    for name, runs in results.items():
        best = min(runs, key=lambda r: r["train_s"])
        rows.append([name, best["steps"], best["train_s"], best["train_s"] / base,
                     " / ".join(f"{r['fid']:.2f}" for r in runs), best["wall_s"]])
    print_table(f"make demo, side by side ({args.rounds} round(s), fastest training kept)",
                ["recipe", "optimiser steps", "training s", "training / former", "folder FID", "demo wall s"], rows)


if __name__ == "__main__":
    main()
