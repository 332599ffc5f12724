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


def benchmark_args(doc: str, out: str, docs_page: str, grid_names, argv=None, extra=None):
    """The parsed command line of an evaluation benchmark (:func:`add_evaluation_args`, ``extra(parser)``'s own
    arguments, ``--docs`` defaulting to ``docs/results/<docs_page>``); unknown ``--generators`` are an error."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_args(p, out, [1, 2, 5, 10], 300)
    if extra is not None:
        extra(p)
    p.add_argument(
        "--docs",
        type=Path,
        default=ROOT / "docs" / "results" / docs_page,
        help="where the result tables are written as markdown (the docs site's results page)",
    )
    args = p.parse_args(argv)
    unknown = sorted(set(args.generators or ()) - set(grid_names))
    if unknown:
        p.error(f"--generators: unknown entries {unknown}; choose from {sorted(grid_names)}")
    return args


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


def markdown_table(header: list[str], rows: list[list]) -> str:
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    )


def generator_rows(ev: dict, since: float | None = None) -> list[list]:
    """One row per (shots, generator); a training time is marked "(earlier run)" when the run was reused
    from before ``since`` (the benchmark's start, as time.time(); None: whenever evaluate reused it)."""

    def earlier(info: dict) -> bool:
        return bool(info.get("reused_run")) if since is None else _trained_before(info, since)

    rows = []
    for shots, gens in ev["generators"].items():
        for g, info in gens.items():
            cas = info.get("cas") or {}
            fmt = lambda v, f=".3f": "—" if v is None else format(v, f)  # noqa: E731
            rows.append(
                [
                    shots,
                    g,
                    fmt(info.get("fid"), ".2f"),
                    fmt(100 * cas["mean"] if cas else None, ".1f"),
                    fmt(info.get("copy_rate")),
                    fmt(info.get("memorisation")),
                    fmt(info.get("train_seconds"), ".0f")
                    if not earlier(info)
                    else fmt(info.get("train_seconds"), ".0f") + " (earlier run)",
                ]
            )
    return rows


def _trained_before(info: dict, since: float) -> bool:
    """Whether a generator run was trained before ``since`` (or before runs recorded when: no ``trained_at``)."""
    return info.get("trained_at") is None or info["trained_at"] < since


def reuse_note(ev: dict, since: float) -> str:
    """How many of the evaluation's generator runs this benchmark run trained (the rest were reused from an
    earlier run of the same command), for a results page's by-line: its wall time depends on it."""
    runs = [
        sub
        for gens in ev["generators"].values()
        for info in gens.values()
        for sub in (info.get("subsets") or {}).values()
        if "train_seconds" in sub
    ]
    fresh = sum(1 for sub in runs if not _trained_before(sub, since))
    rest = "" if fresh == len(runs) else ", the others reused from an earlier run"
    return f"{fresh} of {len(runs)} generator runs trained in this run{rest}"


def fmt_gain(g: dict | None) -> str:
    """A gain in points with its 95 % interval: ``+1.2 [+0.3, +2.0]``."""
    return "—" if not g else f"{100 * g['mean']:+.1f} [{100 * g['lo']:+.1f}, {100 * g['hi']:+.1f}]"


def gain_verdict(label: str, g: dict, target: float) -> str:
    """One acceptance line: the gain, the target, and met only when the mean reaches it and the interval excludes 0."""
    met = g["mean"] >= target and g["lo"] > 0
    verdict = "met" if met else "NOT met"
    return f"  {label}: {fmt_gain(g)} (target >= +{100 * target:.1f}, interval excluding 0) -> {verdict}"


def evaluation_overrides(args, shots, subsets, grid: dict, policies: dict, *extra: str) -> list[str]:
    """The ``evaluate.py`` overrides of one benchmark run: its output folder, the grid's size, the classifier
    steps, the policies and the chosen ``grid`` entries (``--generators``), then ``extra`` and the user's own."""
    join = lambda v: ",".join(map(str, v))  # noqa: E731
    chosen = {k: v for k, v in grid.items() if not args.generators or k in args.generators}
    return [
        f"out_dir={Path(args.out).resolve()}",
        f"shots=[{join(shots)}]",
        f"data_seeds=[{join(subsets)}]",
        f"seeds=[{join(args.seeds)}]",
        f"classifier.steps={args.classifier_steps}",
        "~policies",
        "+policies={" + ",".join(f"{k}:{v}" for k, v in policies.items()) + "}",
        "~generators",
        "+generators={" + ",".join(f"{k}:{hydra_value(v)}" for k, v in chosen.items()) + "}",
        *extra,
        *args.overrides,
    ]


GENERATOR_COLUMNS = ["shots", "generator", "FID", "CAS %", "copy rate", "memorisation", "train s"]


def write_results_page(
    path: Path, title: str, written_by: str, table: str, gen_rows: list, lines: list[str], more: tuple = ()
) -> None:
    """A docs/results/ page, written by its benchmark, never by hand: the accuracy table (evaluate's
    results.md), the generators' facts (:func:`generator_rows`), ``more`` ``(heading, markdown)`` sections
    and the verdict lines."""
    text = [
        f"# {title}",
        "",
        written_by,
        "",
        "## Accuracy",
        "",
        table,
        "",
        "## Generators",
        "",
        markdown_table(GENERATOR_COLUMNS, gen_rows),
        "",
    ]
    for heading, body in more:
        text += [f"## {heading}", "", body, ""]
    text += ["## Verdict", "", *[f"- {line.strip()}" for line in lines], ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
