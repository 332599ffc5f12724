"""Load: generate >= 50,000 images with a small cGAN into one folder.

Reports, each job in its own process (so peak RSS is its own):
  * images/s and peak RSS for 10,000 and 50,000 images (score=true: per-image confidence and a
    streamed FID/KID over the whole folder), and their ratio: RSS must stay flat as the count grows;
  * kill at 50 %: the 50,000-image job SIGKILLed once half its manifest lines exist, then re-run with
    the same command: time to finish (vs the uninterrupted job), and a consistency check of the
    folder (every manifest line has its file and vice versa, no temp file, no duplicated id).

python benchmarks/bench_load.py [--n-per-class 5000] [--out bench_out/load]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench_generate import make_run

import _common  # noqa: F401
from _common import peak_rss_mib, print_table

HERE = Path(__file__).resolve().parent


def child(run_dir: str, out_dir: str, n_per_class: int) -> None:
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.generate import generate

    t = time.perf_counter()
    m = generate(
        compose_config(
            "generate",
            [
                f"run_dir={run_dir}",
                f"out_dir={out_dir}",
                f"n_per_class={n_per_class}",
                "include_real=false",
                "progress=false",
                "score=true",
            ],
        )
    )
    print(
        json.dumps(
            {"seconds": time.perf_counter() - t, "rss_mib": peak_rss_mib(), "n": m["n_synthetic"], "fid": m.get("fid")}
        )
    )


def _cmd(run_dir, out_dir, n):
    return [sys.executable, str(HERE / "bench_load.py"), "--child", str(run_dir), str(out_dir), str(n)]


def run_child(run_dir, out_dir, n) -> dict:
    out = subprocess.run(_cmd(run_dir, out_dir, n), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def consistent(out_dir: Path) -> bool:
    from imgaug_gen.export import read_manifest

    recs = read_manifest(out_dir)
    ids = [r["id"] for r in recs]
    files = sorted(p.relative_to(out_dir).as_posix() for p in (out_dir / "train").rglob("*") if p.is_file())
    return (
        len(ids) == len(set(ids))
        and files == sorted(r["file"] for r in recs)
        and not any(".tmp" in p.name for p in out_dir.rglob("*"))
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-per-class", type=int, default=5000)
    p.add_argument("--out", default="bench_out/load")
    p.add_argument("--child", nargs=3)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    root = Path(args.out).resolve()
    shutil.rmtree(root, ignore_errors=True)
    run_dir = root / "run"
    make_run(run_dir, 16)
    n_big = args.n_per_class
    rows = []
    small = run_child(run_dir, root / "small", n_big // 5)
    big = run_child(run_dir, root / "big", n_big)
    for name, r in (("generate 1/5", small), ("generate full", big)):
        rows.append([name, r["n"], round(r["seconds"], 1), round(r["n"] / r["seconds"]), round(r["rss_mib"])])
    print_table(
        "generate.py, 16 px cGAN, score=true (streamed FID/KID)",
        ["job", "images", "seconds", "images/s", "peak RSS MiB"],
        rows,
    )
    print(f"peak RSS ratio full / (1/5): {big['rss_mib'] / small['rss_mib']:.2f} (flat = ~1; 5x the images)")

    killed = root / "killed"
    proc = subprocess.Popen(_cmd(run_dir, killed, n_big), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest, half = killed / "manifest.jsonl", 10 * n_big // 2
    while proc.poll() is None:
        if manifest.is_file() and manifest.read_bytes().count(b"\n") >= half:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    done_before = manifest.read_bytes().count(b"\n")
    resumed = run_child(run_dir, killed, n_big)
    same = sorted((big_dir := root / "big").joinpath("manifest.jsonl").read_text().splitlines()) == sorted(
        manifest.read_text().splitlines()
    )
    print_table(
        "kill at 50 % (SIGKILL), then the same command again",
        [
            "lines at kill",
            "resume seconds",
            "uninterrupted seconds",
            "resume / uninterrupted",
            "folder consistent",
            "manifest = uninterrupted",
        ],
        [
            [
                done_before,
                round(resumed["seconds"], 1),
                round(big["seconds"], 1),
                round(resumed["seconds"] / big["seconds"], 2),
                consistent(killed),
                same,
            ]
        ],
    )
    del big_dir


if __name__ == "__main__":
    main()
