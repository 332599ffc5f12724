"""Lightning cGAN training step vs a plain PyTorch loop of the same networks and batch.

Both run the same recipe (D step with DiffAugment + hinge loss, G step, EMA update) on the
same networks, batch and optimisers; rounds alternate so both see the same machine load.
Target: Lightning / plain <= 1.05.

python benchmarks/bench_cgan_step.py [--size 16] [--width 32] [--batch 64] [--iters 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import _common  # noqa: F401  (environment)
from _common import print_table


def make_module(args):
    from imgaug_gen.generators.gan import CGANModule

    torch.manual_seed(0)
    return CGANModule(
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        image_shape=[1, args.size, args.size],
        g_width=args.width,
        d_width=args.width,
    )


def plain_loop(args, batches) -> list[float]:
    """The same step written by hand, no Lightning."""
    from imgaug_gen.generators.gan import hinge_d_loss, hinge_g_loss

    m = make_module(args)
    m.setup("fit")  # the module's training layout (model.channels_last), as the Trainer sets it
    opt_d, opt_g = m.configure_optimizers()
    times = []
    for real, labels in batches:
        t = time.perf_counter()
        if m.hparams.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        z = torch.randn(real.shape[0], m.hparams.z_dim)
        m.generator.requires_grad_(False)
        with torch.no_grad():
            fake = m.generator(z, labels)
        d_loss = hinge_d_loss(m.discriminator(m._augment(real), labels), m.discriminator(m._augment(fake), labels))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        m.generator.requires_grad_(True)
        m.discriminator.requires_grad_(False)
        g_loss = hinge_g_loss(m.discriminator(m._augment(m.generator(z, labels)), labels))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        m.discriminator.requires_grad_(True)
        m.iteration += 1
        m._update_ema()
        float(d_loss), float(g_loss)  # the values Lightning logs
        times.append(time.perf_counter() - t)
    return times


def lightning_loop(args, batches) -> list[float]:
    import pytorch_lightning as pl

    times: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, *a):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a):
            times.append(time.perf_counter() - self.t)

    m = make_module(args)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2 * len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=20,
    )
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.rand(args.batch, 1, args.size, args.size, generator=g) * 2 - 1,
            torch.randint(0, 10, (args.batch,), generator=g),
        )
        for _ in range(args.iters)
    ]
    plain, light = [], []
    for _ in range(args.rounds):  # alternate so both see the same load
        plain += plain_loop(args, batches)[5:]
        light += lightning_loop(args, batches)[5:]
    mp, ml = statistics.median(plain), statistics.median(light)
    rows = [
        ["plain PyTorch loop", len(plain), mp * 1e3, statistics.mean(plain) * 1e3, 1.0],
        ["Lightning CGANModule", len(light), ml * 1e3, statistics.mean(light) * 1e3, ml / mp],
    ]
    print_table(
        f"cGAN training iteration (D+G step, EMA), {args.size}px, width {args.width}, batch {args.batch}, "
        f"CPU threads {torch.get_num_threads()}",
        ["loop", "iterations", "median ms", "mean ms", "ratio (median)"],
        rows,
    )
    print(f"\nLightning / plain = {ml / mp:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
