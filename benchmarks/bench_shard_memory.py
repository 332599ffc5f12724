"""Peak memory of generate.py into shards, against the number of images: flat is the target.

Each job runs in its own process (so its peak RSS is its own): the demo's cGAN (16 px, random weights),
``include_real=false``, ``format=webdataset`` and ``format=parquet`` at ``--small`` and ``--large`` images,
and the same job with ``score=true`` (FID/KID over ``score_max_images`` = 20,000 evenly spaced images, read
back from the shards). Target: peak RSS of the large job <= 1.1x the small one's.

python benchmarks/bench_shard_memory.py [--small 20000] [--large 200000] [--formats webdataset parquet] [--score]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_generate import make_run

import _common  # noqa: F401
from _common import peak_rss_mib, print_table

HERE = Path(__file__).resolve().parent


def worker(run_dir: str, out_dir: str, n: int, fmt: str, score: bool) -> dict:
    import imgaug_gen.data  # noqa: F401
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.generate import generate

    cfg = compose_config(
        "generate",
        [f"run_dir={run_dir}", f"out_dir={out_dir}", f"n_per_class={n // 10}", "include_real=false",
         "progress=false", f"format={fmt}", f"score={str(score).lower()}"],
    )  # fmt: skip
    t = time.perf_counter()
    generate(cfg)
    return {"seconds": time.perf_counter() - t, "peak_rss_mib": peak_rss_mib()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--small", type=int, default=20_000)
    p.add_argument("--large", type=int, default=200_000)
    p.add_argument("--formats", nargs="+", default=["webdataset", "parquet"])
    p.add_argument("--score", action="store_true", help="also the jobs with score=true")
    p.add_argument("--dir", type=Path, default=HERE.parent / "bench_out" / "bench_shard_memory")
    p.add_argument("--worker", nargs=5, metavar=("RUN", "OUT", "N", "FORMAT", "SCORE"))
    args = p.parse_args()
    if args.worker:
        run, out, n, fmt, score = args.worker
        print("RESULT " + json.dumps(worker(run, out, int(n), fmt, score == "true")))
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    rows, ratios = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        make_run(tmp / "run", 16)
        for fmt in args.formats:
            for score in [False, True] if args.score else [False]:
                peak = {}
                for n in (args.small, args.large):
                    out = tmp / f"out_{fmt}_{score}_{n}"
                    r = subprocess.run(
                        [sys.executable, __file__, "--worker", str(tmp / "run"), str(out), str(n), fmt,
                         str(score).lower()],
                        capture_output=True, text=True, cwd=HERE.parent,
                    )  # fmt: skip
                    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
                    if not line:
                        sys.exit(f"{fmt} n={n} failed:\n{r.stderr[-3000:]}")
                    res = json.loads(line[0][7:])
                    peak[n] = res["peak_rss_mib"]
                    shards = len(list((out / "train").iterdir()))
                    rows.append([fmt, "yes" if score else "no", n, shards, res["seconds"], n / res["seconds"],
                                 res["peak_rss_mib"]])  # fmt: skip
                ratios.append((fmt, score, peak[args.large] / peak[args.small]))
    print_table(
        "Peak RSS of generate.py into shards (16px cGAN, CPU, shard_size=10000)",
        ["format", "score", "images", "shards", "job s", "images/s", "peak RSS MiB"],
        rows,
    )
    for fmt, score, ratio in ratios:
        print(
            f"{fmt}{' + score' if score else ''}: peak RSS at {args.large} / at {args.small} images = {ratio:.3f} "
            "(target <= 1.1)"
        )


if __name__ == "__main__":
    main()
