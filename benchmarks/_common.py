"""Helpers shared by the benchmark scripts (tables, timing, memory)."""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux: ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


@contextlib.contextmanager
def worktree(rev: str):
    """A temporary detached ``git worktree`` of ``rev`` (the code as it was: the "before" of a speed
    change, run side by side with the current code), removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_before_"))
    path = tmp / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)
        tmp.rmdir()


def hydra_value(v) -> str:
    """A Hydra override value for a str / list / dict (strings quoted)."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    return "'" + str(v) + "'" if isinstance(v, str) else str(v)


def run_units(script: str, args, argv: list[str]) -> None:
    """The (shots, subset) units of an evaluation benchmark, each in its own single-threaded process
    (``script argv --shots S --subsets D --workers 0 --unit``), ``args.workers`` at a time; logs in
    ``args.out/logs``. The small networks here use one core about as well as two."""
    import sys

    units = [(s, d) for s in args.shots for d in args.subsets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: list = []
    log_dir = Path(args.out) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    while units or running:
        while units and len(running) < args.workers:
            s, d = units.pop(0)
            cmd = [sys.executable, script, *argv, "--shots", str(s), "--subsets", str(d), "--workers", "0", "--unit"]
            log = open(log_dir / f"shots{s}_d{d}.log", "w")
            running.append(((s, d), subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for unit, proc in list(running):
            if proc.poll() is not None:
                running.remove((unit, proc))
                print(f"unit shots={unit[0]} subset={unit[1]} finished (exit {proc.returncode})", flush=True)
                if proc.returncode:
                    raise SystemExit(f"unit {unit} failed; see {log_dir}/shots{unit[0]}_d{unit[1]}.log")


def add_evaluation_args(parser, out: str, shots: list[int], classifier_steps: int) -> None:
    """The arguments every evaluation benchmark takes (the grid's size, the workers, the grid's entries)."""
    import argparse

    parser.add_argument("--out", default=out)
    parser.add_argument("--shots", type=int, nargs="+", default=shots)
    parser.add_argument("--subsets", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--classifier-steps", type=int, default=classifier_steps)
    parser.add_argument(
        "--generators",
        type=lambda v: v.split(","),
        default=None,
        help="comma-separated grid entries to run (default: all; name an entry's run_of source too)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="parallel single-threaded (shots, subset) units; 0: inline"
    )
    parser.add_argument("--unit", action="store_true", help=argparse.SUPPRESS)  # one unit of a --workers run
    parser.add_argument("overrides", nargs="*", help="extra evaluate.py overrides (key=value)")


def unit_argv(args, *extra: str) -> list[str]:
    """The command line of one unit of ``args`` (``run_units`` adds its shots and subset)."""
    return [
        "--out",
        args.out,
        "--seeds",
        *map(str, args.seeds),
        "--classifier-steps",
        str(args.classifier_steps),
        *extra,
        *(["--generators", ",".join(args.generators)] if args.generators else []),
        *args.overrides,
    ]
