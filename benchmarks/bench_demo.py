"""``make demo``'s training time and folder FID: the current recipe vs others, side by side.

Runs ``python -m imgaug_gen.demo`` once per recipe and round (alternating, so a machine whose load
changes during the run does not favour one), reads the training seconds and the folder FID from the
demo's own printout, and prints them with the ratio of training times to the first comparison row.
Default comparison: the current ``experiment=digits_cgan`` vs the former recipe (3,000 optimiser
steps at lr 2e-4) on the current code.

``--before REV`` adds the demo as it was at git revision REV (code, configs and recipe), run from a
temporary ``git worktree`` of that revision: the "before" of a speed change, measured in the same
session as the "after". That row is the ratio base. Before the timed rounds, each code version runs
an untimed 2-step demo so that no timed run pays for a cold cache (the domain feature network its
validation FID needs). Each demo's printout scores its folder with its
own code; ``--rescore`` (on by default) also scores every folder's synthetic images with the current
code's scorer (domain features, same real reference), so the FIDs compare on one feature space.

    python benchmarks/bench_demo.py [--rounds 1] [--out bench_out/demo] [--before c1c7c0c] [--no-former] [--no-warmup]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (offline environment variables)
from _common import ROOT, print_table, worktree

CURRENT = "current (experiment=digits_cgan)"
FORMER = "former recipe (3,000 steps, lr 2e-4)"
FORMER_ARGS = ["--steps", "3000", "model.lr_g=2e-4", "model.lr_d=2e-4", "callbacks.fidelity.every_n_steps=1000"]


def run_demo(out: Path, extra: list[str], root: Path = ROOT) -> dict:
    """One ``python -m imgaug_gen.demo`` from ``root`` (its package first on the path)."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh run every time (no earlier checkpoints or folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "imgaug_gen.demo", "--out", str(out), *extra],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"demo failed ({root}, {extra}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    trained = re.search(r"trained in (\d+)s", proc.stdout)
    fid = re.search(r"FID=([0-9.]+)", proc.stdout)
    steps = re.search(r"^trainer:\n(?:  .*\n)*?  max_steps: (\d+)", (out / "run" / "config.yaml").read_text(), re.M)
    return {
        "train_s": float(trained.group(1)),
        "fid": float(fid.group(1)),
        "wall_s": wall,
        "steps": f"{int(steps.group(1)):,}" if steps else "?",
        "folder": out / "data",
    }


def rescore(folders: list[Path]) -> list[float]:
    """FID of each folder's synthetic images against the digits demo's real reference, all with the
    current code's domain features (one extractor, one reference)."""
    from imgaug_gen.config import compose_config
    from imgaug_gen.data.manifest import load_folder_images, read_manifest
    from imgaug_gen.jobs.train import build_datamodule
    from imgaug_gen.metrics import FidelityEvaluator, build_feature_extractor

    cfg = compose_config("train", ["experiment=digits_cgan", "run_dir=/tmp/unused"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    ref, ref_labels = dm.reference_arrays()
    evaluator = FidelityEvaluator(build_feature_extractor(cfg.metrics, ref, ref_labels, dm.num_classes), ref)
    fids = []
    for folder in folders:
        records = [r for r in read_manifest(folder) if r.get("source") == "synthetic"]
        fids.append(float(evaluator.evaluate(load_folder_images(folder, records))["fid"]))
    return fids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default="bench_out/demo")
    p.add_argument("--before", metavar="REV", help="also run the demo as it was at this git revision (ratio base)")
    p.add_argument("--no-former", action="store_true", help="leave out the former-recipe row")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed 2-step demo per code version")
    p.add_argument("--no-rescore", action="store_true", help="only the FID each demo printed")
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        recipes: dict[str, tuple[list[str], Path]] = {}
        if args.before:
            recipes[f"before (git {args.before}, its demo)"] = ([], stack.enter_context(worktree(args.before)))
        if not args.no_former:
            recipes[FORMER] = (FORMER_ARGS, ROOT)
        recipes[CURRENT] = ([], ROOT)
        if not args.no_warmup:  # caches (domain features, real statistics) filled before any clock runs
            for i, root in enumerate(dict.fromkeys(root for _, root in recipes.values())):
                run_demo(Path(args.out).resolve() / f"warmup_{i}", ["--steps", "2", "--n-per-class", "10"], root)
        results: dict[str, list[dict]] = {name: [] for name in recipes}
        for rnd in range(args.rounds):
            names = list(recipes) if rnd % 2 == 0 else list(reversed(recipes))
            for name in names:
                extra, root = recipes[name]
                out = Path(args.out).resolve() / f"{list(recipes).index(name)}_{rnd}"
                results[name].append(run_demo(out, extra, root))
                print(f"round {rnd}: {name}: {results[name][-1]}", flush=True)
    base_name = next(iter(results))
    base = min(r["train_s"] for r in results[base_name])
    best = {name: min(runs, key=lambda r: r["train_s"]) for name, runs in results.items()}
    rescored = dict(zip(best, rescore([b["folder"] for b in best.values()]))) if not args.no_rescore else {}
    rows = []
    for name, runs in results.items():
        b = best[name]
        rows.append(
            [
                name,
                b["steps"],
                b["train_s"],
                b["train_s"] / base,
                " / ".join(f"{r['fid']:.2f}" for r in runs),
                f"{rescored[name]:.2f}" if name in rescored else "-",
                b["wall_s"],
            ]
        )
    print_table(
        f"make demo, side by side ({args.rounds} round(s), fastest training kept)",
        [
            "recipe",
            "optimiser steps",
            "training s",
            f"training / {base_name.split(' (')[0]}",
            "folder FID (its printout)",
            "folder FID (current features)",
            "demo wall s",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
