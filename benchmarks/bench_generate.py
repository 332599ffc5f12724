"""generate.py end to end vs the bare generator forward, for the same image count.

Each variant runs in its own process (so peak RSS is its own):
  bare-forward  the generator network alone on noise, batches of 64 (no seeds, no uint8, no files)
  bare-forward, streams  the same batches rendered one per torch thread at once, each on one thread (as
                generate renders them on a CPU device: ``render_streams``); the floor under generate's time
  sample()      the generator contract: per-image seeds -> uint8 images, no files (one stream)
  files only    the folder writer alone: the same count of PNGs + manifest lines, no generator
                (the floor set by this machine's filesystem: each file costs a create and a rename)
  generate      the whole job (plan, generate, write PNGs + manifest atomically and durably:
                each PNG fsynced before its rename, the class folders and the manifest at each
                flush; the folder lock taken once per job), score=false
  generate, durable=false  the same without any fsync (``generate.py durable=false``): the cost of
                durability, side by side
  generate, webdataset / parquet  the same job into shards (``format=webdataset`` / ``parquet``,
                ``shard_size=10000``): one file per 10,000 images, fsynced once (target: webdataset <= 1.2x
                the bare forward; sample() alone is about 1.15x); on a CPU device they write inline
  generate, webdataset, writer thread  the same with ``io_workers=1`` (the writing on its own thread)
  files only, durable=false  the writer alone without fsync
  generate+score  the same plus per-image confidence and FID/KID of the folder (metrics.json)
Every variant runs with the process settings the jobs make (``imgaug_gen.runtime.prepare_process``:
denormals flushed, glibc malloc keeping freed blocks), so the bare forward is the same forward the job
runs. "job s" times the work after each variant's imports (a process that has imported the package, as a
notebook that calls ``generate()`` has); "process wall s" is the whole process, imports and start-up
included. Target: generate / bare-forward <= 1.5 in time. The generator is the demo's cGAN
(16 px, width 32); weights are random (speed does not depend on them). The variants run in
alternating rounds and each keeps its fastest round, so a machine whose load changes during the
run does not favour the variants that happened to run in a quiet moment.

A second table probes the file system the folders were written to (the floor under any writer):
per file, the wall and kernel CPU time (``os.times``) of a bare create, a write, a rename and an
unlink. ``--dir`` chooses where the folders go (default ``bench_out/bench_generate``, beside the
project's other outputs, as a user's ``out_dir`` would be). The per-file create cost is a fact of
the disk, not of the writer, and it decides how far generate can be from the bare forward: on the
machine these figures come from it ranged from 0.03 to 0.95 ms on the same ext4 device, high for the
first few thousand creates after the disk had been idle for tens of seconds and low within a long
burst. Run it with ``--dir`` on the disk your folders go to, and read the probe beside the ratio.

``--before REV`` adds "bare-forward", "files only" and "generate" as the package was at git revision REV (run from a
temporary ``git worktree``, its package first on the path), in the same alternating rounds: the
before/after of a writer change, measured side by side.

python benchmarks/bench_generate.py [--n-per-class 500] [--size 16] [--rounds 3] [--before REV] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
from _common import peak_rss_mib, print_table, worktree

HERE = Path(__file__).resolve().parent


def make_run(run_dir: Path, size: int) -> None:
    import torch

    from imgaug_gen.generators.gan import CGANModule

    torch.manual_seed(0)
    m = CGANModule(num_classes=10, class_names=[str(i) for i in range(10)], image_shape=[1, size, size])
    gen = m.to_generator()
    gen.config["data"] = {"kind": "digits", "args": {"image_size": size, "shots": 50}}
    gen.save_pretrained(run_dir / "generator")
    # the same generator in the format a --before revision of format 1 reads
    legacy = run_dir.with_name(run_dir.name + "_v1") / "generator"
    legacy.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((run_dir / "generator" / "config.json").read_text())
    cfg.update(format_version=1, data={"_target_": "imgaug_gen.data.DigitsDataModule", "image_size": size, "shots": 50})
    (legacy / "config.json").write_text(json.dumps(cfg))
    (legacy / "model.safetensors").write_bytes((run_dir / "generator" / "model.safetensors").read_bytes())


#: The modules a generate job imports lazily (all of them imported by a process that has run one job).
JOB_MODULES = (
    "imgaug_gen.data",
    "imgaug_gen.data.unlabeled",
    "imgaug_gen.generators.gan",
    "imgaug_gen.augment.classical",
    "imgaug_gen.export",
    "imgaug_gen.shards",
    "imgaug_gen.filtering",
    "imgaug_gen.hf_metadata",
    "imgaug_gen.visual",
)


def worker(mode: str, run_dir: str, out_dir: str, n_per_class: int) -> dict:
    import torch

    from imgaug_gen.generators.base import load_generator

    try:
        from imgaug_gen.runtime import prepare_process
    except ImportError:  # a --before revision predating it: its jobs ran without it
        pass
    else:
        prepare_process()  # the process settings generate.py makes, for every variant (a fair bare forward)
    n = 10 * n_per_class
    durable = not mode.endswith("durable=false")
    if not durable:
        from imgaug_gen.io import set_durable

        set_durable(False)
    if mode.startswith("files only"):
        import numpy as np

        from imgaug_gen.export import FolderWriter

        images = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)
        t = time.perf_counter()
        with FolderWriter(out_dir, [str(i) for i in range(10)], {"bench": True}) as w:
            for i, img in enumerate(images):
                w.write({"id": f"f_{i:07d}", "label": i % 10, "source": "synthetic"}, img)
        seconds = time.perf_counter() - t
    elif mode in ("bare-forward", "bare-forward, streams", "sample()"):
        gen = load_generator(Path(run_dir) / "generator")
        labels = torch.arange(n) % 10

        from imgaug_gen.jobs.render import render_pool, rendered  # before the clock, as the job's imports are

        @torch.no_grad()
        def forward(i):
            return gen.net(torch.randn(len(labels[i : i + 64]), gen.config["z_dim"]), labels[i : i + 64])

        t = time.perf_counter()
        if mode == "bare-forward":
            for i in range(0, n, 64):
                forward(i)
        elif mode == "bare-forward, streams":  # the job's render pool: one batch per torch thread, each on one
            streams = torch.get_num_threads()
            with render_pool(gen, streams) as pool:
                for _ in rendered(forward, range(0, n, 64), pool, streams):
                    pass
        else:
            gen.sample(labels.numpy(), seeds=0, batch_size=64)
        seconds = time.perf_counter() - t
    else:
        import importlib

        from imgaug_gen.config import compose_config
        from imgaug_gen.jobs.generate import generate

        # The job's imports, done before the clock starts as the other variants' are (the bare forward loads
        # its generator before its clock too): the kind's module, which load_generator imports, and the
        # modules generate() imports where it first needs them (under PYTHONDONTWRITEBYTECODE each would be
        # compiled from source inside the clock). The "process wall s" column counts every import.
        for name in JOB_MODULES:
            with contextlib.suppress(ModuleNotFoundError):  # a --before revision may lack one
                importlib.import_module(name)
        from PIL import Image

        Image.init()  # PIL's format plugins, which the preview's save loads

        cfg = compose_config(
            "generate",
            [
                f"run_dir={run_dir}",
                f"out_dir={out_dir}",
                f"n_per_class={n_per_class}",
                "include_real=false",
                "progress=false",
                *([] if durable else ["durable=false"]),
                *[f"format={f}" for f in ("webdataset", "parquet") if f in mode],
                *(["io_workers=1"] if "writer thread" in mode else []),
                f"score={'true' if mode == 'generate+score' else 'false'}",
            ],
        )
        t = time.perf_counter()
        generate(cfg)
        seconds = time.perf_counter() - t
    return {"mode": mode, "images": n, "seconds": seconds, "peak_rss_mib": peak_rss_mib()}


def fs_costs(folder: Path, n: int = 2000) -> list[list]:
    """Per-file wall ms and kernel CPU ms of the file operations a folder writer makes."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [str(folder / f"f{i}") for i in range(n)]

    def write(p):
        fd = os.open(p, os.O_WRONLY)
        os.write(fd, b"x" * 300)
        os.close(fd)

    ops = [
        ("create (O_CREAT|O_EXCL) + close", lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL))),
        ("open + write 300 B + close", write),
        ("rename", lambda p: os.replace(p, p + ".png")),
        ("unlink", lambda p: os.unlink(p + ".png")),
    ]
    rows = []
    for label, op in ops:
        t, k = time.perf_counter(), os.times().system
        for p in names:
            op(p)
        rows.append([label, (time.perf_counter() - t) / n * 1e3, (os.times().system - k) / n * 1e3])
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n-per-class", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--before", metavar="REV", help="also run the writer and generate as at this git revision")
    p.add_argument(
        "--dir",
        type=Path,
        default=HERE.parent / "bench_out" / "bench_generate",
        help="where the generated folders (and the file-system probe) go, in a fresh temporary "
        "subfolder removed afterwards; default: bench_out/bench_generate",
    )
    p.add_argument(
        "--only", nargs="+", metavar="VARIANT", help="run only these variants (the two bare forwards always run)"
    )
    p.add_argument("--worker", nargs=4, metavar=("MODE", "RUN", "OUT", "N"))
    args = p.parse_args()
    if args.worker:
        mode, run_dir, out_dir, n = args.worker
        print("RESULT " + json.dumps(worker(mode, run_dir, out_dir, int(n))))
        return
    rows, results, per_round, per_round_wds, per_round_streamed = [], {}, [], [], []
    args.dir.mkdir(parents=True, exist_ok=True)
    variants = [
        (m, m, None)
        for m in (
            "bare-forward",
            "bare-forward, streams",
            "sample()",
            "files only",
            "files only, durable=false",
            "generate",
            "generate, durable=false",
            "generate, webdataset",
            "generate, webdataset, writer thread",
            "generate, parquet",
            "generate+score",
        )
    ]
    if args.only:
        variants = [v for v in variants if v[0].startswith("bare-forward") or v[0] in args.only]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        make_run(tmp / "run", args.size)
        env = {**os.environ, "IMGAUG_GEN_CACHE": str(tmp / "cache")}
        if args.before:
            old_tree = stack.enter_context(worktree(args.before))
            variants += [(f"{m} (git {args.before})", m, old_tree) for m in ("bare-forward", "files only", "generate")]
        for rnd in range(args.rounds):
            this_round = {}
            for i, (name, mode, tree) in enumerate(variants):
                run_env = (
                    env
                    if tree is None
                    else {**env, "PYTHONPATH": os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])}
                )
                t = time.perf_counter()
                run = tmp / ("run" if tree is None else "run_v1")
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        mode,
                        str(run),
                        str(tmp / f"out_{rnd}_{i}"),
                        str(args.n_per_class),
                    ],
                    capture_output=True,
                    text=True,
                    env=run_env,
                    cwd=tree or HERE.parent,
                )
                wall = time.perf_counter() - t
                line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
                if not line:
                    sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
                r = json.loads(line[0][7:])
                r["wall"] = wall
                this_round[name] = r["seconds"]
                if name not in results or r["seconds"] < results[name]["seconds"]:
                    results[name] = r
            if "generate" in this_round:
                per_round.append(this_round["generate"] / this_round["bare-forward"])
            if "generate, webdataset" in this_round:
                per_round_wds.append(this_round["generate, webdataset"] / this_round["bare-forward"])
                if "bare-forward, streams" in this_round:
                    per_round_streamed.append(this_round["generate, webdataset"] / this_round["bare-forward, streams"])
    for mode, r in results.items():
        rows.append([mode, r["images"], r["seconds"], r["images"] / r["seconds"], r["wall"], r["peak_rss_mib"]])
    base = results["bare-forward"]["seconds"]
    for row in rows:
        row.insert(4, row[2] / base)
    print_table(
        f"Generation of {10 * args.n_per_class} images ({args.size}px cGAN, CPU; fastest of "
        f"{args.rounds} alternating rounds)",
        ["variant", "images", "job s", "images/s", "time / bare", "process wall s", "peak RSS MiB"],
        rows,
    )
    has = set(results)
    if {"generate", "generate, durable=false", "files only", "files only, durable=false", "generate+score"} <= has:
        print(
            "\ndurability (fsync of every file, folder and manifest flush): "
            f"generate {results['generate']['seconds']:.2f} s "
            f"vs {results['generate, durable=false']['seconds']:.2f} s without, "
            f"{results['generate']['seconds'] / results['generate, durable=false']['seconds']:.2f}x; writer alone "
            f"{results['files only']['seconds'] / results['files only, durable=false']['seconds']:.2f}x"
        )
        print(
            f"generate (files + manifest) / bare forward = {results['generate']['seconds'] / base:.2f} "
            f"(target <= 1.5); with scoring: {results['generate+score']['seconds'] / base:.2f}; "
            f"generate / bare forward of each round (same round, side by side): "
            f"{', '.join(f'{x:.2f}' for x in per_round)}"
        )
    if {"generate, webdataset", "sample()"} <= has:
        print(
            f"generate into WebDataset shards / bare forward = {results['generate, webdataset']['seconds'] / base:.2f} "
            f"(target <= 1.2; sample() alone {results['sample()']['seconds'] / base:.2f}); each round: "
            f"{', '.join(f'{x:.2f}' for x in per_round_wds)} (median {statistics.median(per_round_wds):.2f})"
            + (f"; Parquet {results['generate, parquet']['seconds'] / base:.2f}" if "generate, parquet" in has else "")
        )
        if "bare-forward, streams" in has:  # the job renders as the streamed forward does: its own floor
            floor = results["bare-forward, streams"]["seconds"]
            print(
                f"the streamed bare forward / bare forward = {floor / base:.2f}; generate into WebDataset / the "
                f"streamed bare forward = {results['generate, webdataset']['seconds'] / floor:.2f} (what the job adds "
                f"to the forward it runs); each round: {', '.join(f'{x:.2f}' for x in per_round_streamed)}"
            )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print_table(
            f"\nThe file system under {args.dir}, per file (2,000 files)",
            ["operation", "wall ms", "kernel CPU ms"],
            fs_costs(Path(tmp)),
        )
    if args.before:
        then = {m: results[f"{m} (git {args.before})"]["seconds"] for m in ("bare-forward", "files only", "generate")}
        print(
            f"at git {args.before}: generate / its bare forward = {then['generate'] / then['bare-forward']:.2f}; "
            f"now / then: bare forward {base / then['bare-forward']:.2f}, files only "
            f"{results['files only']['seconds'] / then['files only']:.2f}, generate "
            f"{results['generate']['seconds'] / then['generate']:.2f}"
        )


if __name__ == "__main__":
    main()
