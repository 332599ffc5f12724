"""DDPM benchmarks, measured side by side in one run (prints a table; no asserts).

1. DDIM sampling: our ``DDPMGenerator.sample`` vs diffusers' own ``DDIMPipeline`` on the same
   UNet, scheduler config, steps, batch and per-image ``torch.Generator``s. ``DDIMPipeline`` is
   unconditional, so it gets the UNet wrapped with the same class labels fixed, and ours runs
   with ``guidance_scale=1`` (no CFG): both do exactly one UNet call per step on the same batch.
   The outputs are compared too (same noise -> same images). Ratio = ours / pipeline (target <= 1).
   Also shown: ours with CFG (``guidance_scale=2``: the batch is doubled), for reference.
2. Training: time per optimiser step of ``DDPMModule`` through a real Lightning ``Trainer``
   (digits data, batch 64, the default ``conf/model/ddpm.yaml`` UNet) at 16 and 32 px, and
   peak memory (``torch.cuda.max_memory_allocated`` on GPU, else the process's peak RSS).

    python benchmarks/bench_ddpm.py [--device cpu|cuda] [--threads N (default 1 on CPU)] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_module(image_size: int):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import build_datamodule
    from imgaug_gen.jobs.train import build_module as _build

    cfg = compose_config(
        "train",
        [
            "model=ddpm",
            f"data.image_size={image_size}",
            "data.batch_size=64",
            "run_dir=/tmp/bench_ddpm",
            "trainer.accelerator=cpu",
        ],
    )
    dm = build_datamodule(cfg)
    return _build(cfg, dm), dm, cfg


class FixedLabelUNet(torch.nn.Module):
    """The class-conditional UNet seen by an unconditional pipeline: labels fixed per call."""

    def __init__(self, unet, labels: torch.Tensor):
        super().__init__()
        self.unet, self.labels = unet, labels
        self.config = unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    def forward(self, sample, timestep, return_dict: bool = True):
        return self.unet(sample, timestep, class_labels=self.labels, return_dict=return_dict)


def bench_sampling(device: str, batch: int, steps: int, repeats: int) -> list[tuple]:
    from diffusers import DDIMPipeline

    from imgaug_gen.generators.base import per_image_seeds

    module, _, _ = build_module(16)
    gen = module.to_generator().to(device).eval()
    labels = np.arange(batch) % gen.num_classes
    seeds = per_image_seeds(0, 0, batch)
    scheduler = gen.make_scheduler(gen.sample_options({}))  # the saved DDIM config (trailing spacing)
    pipe = DDIMPipeline(unet=FixedLabelUNet(gen.unet, torch.as_tensor(labels, device=device)), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def ours(scale: float):
        out = gen.sample(labels, seeds=seeds, batch_size=batch, num_inference_steps=steps, guidance_scale=scale)
        _sync(device)
        return out

    def reference():
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.no_grad():
            out = pipe(
                batch_size=batch, generator=generators, num_inference_steps=steps, eta=0.0, output_type="np"
            ).images
        _sync(device)
        return out

    a, b = ours(1.0), reference()  # warm-up, and the same work check
    b_uint8 = np.round(b * 255).astype(np.uint8)
    max_diff = int(np.abs(a.astype(int) - b_uint8.astype(int)).max())
    times = {"ours": [], "pipe": [], "cfg": []}
    for _ in range(repeats):  # interleaved, so background load hits both alike
        for name, fn in (("ours", lambda: ours(1.0)), ("pipe", reference), ("cfg", lambda: ours(2.0))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    what = f"{batch} imgs, 16px, {steps} DDIM steps"
    return [
        ("sample", f"diffusers DDIMPipeline (UNet with labels fixed), {what}", f"{med['pipe']:.3f} s", "1.00"),
        (
            "sample",
            f"ours, guidance_scale=1 (same work), {what}",
            f"{med['ours']:.3f} s",
            f"{med['ours'] / med['pipe']:.2f}",
        ),
        (
            "sample",
            f"ours, guidance_scale=2 (CFG: 2x batch), {what}",
            f"{med['cfg']:.3f} s",
            f"{med['cfg'] / med['pipe']:.2f}",
        ),
        ("sample", "max |ours - pipeline| (uint8 levels, same noise)", str(max_diff), ""),
    ]


def _train_one(device: str, size: int, steps: int, threads: int | None) -> tuple[float, str, int]:
    """One training measurement, in a fresh process so that its peak memory is its own."""
    import logging

    import pytorch_lightning as pl

    if threads:
        torch.set_num_threads(threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    times: list[float] = []

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, trainer, *a):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, *a):
            _sync(device)
            times.append(time.perf_counter() - self.t0)

    module, dm, _ = build_module(size)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer = pl.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StepTimer()],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    if device.startswith("cuda"):
        mem = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB cuda max allocated"
    else:
        mem = f"{_peak_rss_mib():.0f} MiB peak RSS (whole process)"
    return statistics.median(times[2:]), mem, sum(p.numel() for p in module.unet.parameters())


def bench_training(device: str, sizes: tuple[int, ...], steps: int, threads: int | None) -> list[tuple]:
    import multiprocessing as mp

    rows = []
    ctx = mp.get_context("spawn")
    for size in sizes:
        with ctx.Pool(1) as pool:
            step, mem, n_params = pool.apply(_train_one, (device, size, steps, threads))
        rows.append(
            (
                "train",
                f"DDPMModule step (Lightning), {size}px, batch 64, UNet {n_params / 1e6:.2f}M params",
                f"{step * 1000:.0f} ms/step",
                mem,
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; default 1 on CPU (these small nets gain nothing from intra-op threads, "
        "and on a shared 2-core machine extra threads stall), 0 = torch's own default",
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=12)
    args = p.parse_args()
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = bench_sampling(args.device, args.batch, args.steps, args.repeats)
    rows += bench_training(args.device, (16, 32), args.train_steps, args.threads)
    print(
        f"\nbench_ddpm  device={args.device}  torch threads={torch.get_num_threads()}  "
        f"torch {torch.__version__}  (median of {args.repeats} interleaved runs)"
    )
    widths = [max(len(str(r[i])) for r in rows + [("part", "what", "time", "ratio / memory")]) for i in range(4)]
    header = ("part", "what", "time", "ratio / memory")
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
