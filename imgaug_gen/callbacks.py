"""Lightning callbacks shared by every generator kind.

They talk to the LightningModule only through ``pl_module.to_generator()`` (the
generator contract) and to the data only through ``trainer.datamodule``, so a
new kind gets sample grids, validation FID/KID, generator export and exact
resume for free. Only global rank 0 writes files.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from imgaug_gen.errors import ConfigError

log = logging.getLogger(__name__)


def _due(trainer: pl.Trainer, every: int, last: int) -> bool:
    step = trainer.global_step
    return every > 0 and step != last and step % every == 0


class RNGStateCallback(pl.Callback):
    """Save and restore the Python, NumPy and torch (CPU and CUDA) RNG states in
    the checkpoint, so a resumed run draws the same noise and augmentations as an
    uninterrupted one. States are stored as tensors and lists (loadable with
    ``weights_only=True``)."""

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        state = {
            "python": list(random.getstate()[1]),
            "python_pos": random.getstate()[2],
            "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate((3, tuple(int(v) for v in state["python"]), state["python_pos"]))
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                             int(state["numpy_pos"]), 0, 0.0))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class SampleGridCallback(pl.Callback):
    """Fixed-seed class grids (rows = classes) saved as ``samples/step_XXXXXXX.png``
    so progress is comparable across steps and runs."""

    def __init__(self, dirpath: str, every_n_steps: int = 500, n_per_class: int = 8, seed: int = 1234):
        self.dirpath, self.every, self.n_per_class, self.seed = Path(dirpath), every_n_steps, n_per_class, seed
        self._last = -1

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        from imgaug_gen.visual import class_grid

        self._last = trainer.global_step
        if not trainer.is_global_zero:
            return None
        gen = pl_module.to_generator()
        labels = np.repeat(np.arange(gen.num_classes), self.n_per_class)
        images = gen.sample(labels, seeds=self.seed)
        path = self.dirpath / f"step_{trainer.global_step:07d}.png"
        class_grid(images, labels, gen.class_names, path)
        return path

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if _due(trainer, self.every, self._last):
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last:
            self.write(trainer, pl_module)


class FidelityCallback(pl.Callback):
    """Validation FID/KID of the (EMA) generator against the real reference images,
    logged as ``val/fid``, ``val/kid`` every ``every_n_steps`` and at the end.

    ``at_end``: ``auto`` scores the final generator only when the run was at least one interval
    long (or ``every_n_steps=0``: only at the end), so a short smoke run does not spend minutes on a
    FID nobody asked for; ``true`` always, ``false`` never."""

    def __init__(self, every_n_steps: int = 1000, n_per_class: int = 50, seed: int = 4321, metrics=None,
                 at_end: str | bool = "auto"):
        if at_end not in ("auto", True, False):
            raise ConfigError(f"`callbacks.fidelity.at_end` = {at_end!r}; allowed: auto, true, false.")
        self.every, self.n_per_class, self.seed, self.at_end = every_n_steps, n_per_class, seed, at_end
        self.metrics_cfg = metrics or {}
        self.evaluator = None
        self._last = -1
        self.history: list[dict] = []

    def setup(self, trainer, pl_module, stage=None) -> None:
        if self.evaluator is not None or trainer.datamodule is None:
            return
        from imgaug_gen.metrics import FidelityEvaluator, build_feature_extractor

        dm = trainer.datamodule
        images, labels = dm.reference_arrays()
        # Fitting (or loading) the feature network must not move the global RNG: training
        # randomness must not depend on whether the feature cache was warm.
        with torch.random.fork_rng(devices=[]):
            extractor = build_feature_extractor(self.metrics_cfg, images, labels, dm.num_classes)
            self.evaluator = FidelityEvaluator(extractor, images)

    def evaluate(self, trainer, pl_module) -> dict:
        """Every process makes and featurises its share of the images (image i: its own seed, on
        rank i % world_size); the features are gathered, so FID/KID equal the one-process value."""
        from imgaug_gen.generators.base import per_image_seeds

        self._last = trainer.global_step
        t0 = time.perf_counter()
        gen = pl_module.to_generator()
        labels = np.repeat(np.arange(gen.num_classes), self.n_per_class)
        seeds = per_image_seeds(self.seed, 0, len(labels))
        world, rank = max(int(trainer.world_size), 1), int(trainer.global_rank)
        distributed = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            # BatchNorm statistics are per process: score the generator rank 0 exports.
            state = [gen.state_dict() if rank == 0 else None]
            torch.distributed.broadcast_object_list(state, src=0)
            gen.load_state_dict(state[0])
        mine = np.arange(rank, len(labels), world)
        with torch.random.fork_rng(devices=[]):
            images = gen.sample(labels[mine], [seeds[i] for i in mine])
            feats = self.evaluator.extractor.features(images, batch_size=self.evaluator.batch_size).cpu()
        if distributed:
            parts: list = [None] * world
            torch.distributed.all_gather_object(parts, (mine, feats))
            order = np.concatenate([p[0] for p in parts])
            feats = torch.cat([p[1] for p in parts])[torch.from_numpy(np.argsort(order, kind="stable"))]
        scores = self.evaluator.evaluate_features(feats)
        log.info("validation FID %.2f at step %d: %d samples in %.1f s", scores["fid"], trainer.global_step,
                 len(labels), time.perf_counter() - t0)
        values = {"val/fid": scores["fid"], "val/kid": scores["kid_mean"]}
        self.history.append({"step": trainer.global_step, **values})
        # Lightning logs with the count of batches (not optimiser steps): keep one step axis.
        log_step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics({**values, "global_step": float(trainer.global_step)}, step=log_step)
        return scores

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.evaluator is not None and _due(trainer, self.every, self._last):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.evaluator is None or trainer.global_step == self._last or self.at_end is False:
            return
        if self.at_end == "auto" and 0 < self.every and trainer.global_step < self.every:
            log.info("no end-of-training FID: the run (%d steps) is shorter than callbacks.fidelity.every_n_steps=%d "
                     "(set callbacks.fidelity.at_end=true to score it)", trainer.global_step, self.every)
            return
        self.evaluate(trainer, pl_module)


class ExportGeneratorCallback(pl.Callback):
    """Save ``RUN/generator/`` (config.json + safetensors) every ``every_n_steps``
    and at the end of training, so a run killed late still leaves a usable generator."""

    def __init__(self, dirpath: str, every_n_steps: int = 1000, extra_config: dict | None = None):
        self.dirpath, self.every, self.extra = Path(dirpath), every_n_steps, extra_config or {}
        self._last = -1

    def export(self, trainer, pl_module) -> None:
        self._last = trainer.global_step
        if trainer.is_global_zero:
            gen = pl_module.to_generator()
            gen.config.update({"trained_steps": trainer.global_step, **self.extra})
            gen.save_pretrained(self.dirpath)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if _due(trainer, self.every, self._last):
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module)


class ProgressPlotCallback(pl.Callback):
    """``RUN/progress.png`` (losses and FID/KID over steps, from ``RUN/metrics.csv``) every
    ``every_n_steps`` optimiser steps and at the end; rank 0 only; nothing without a CSV log."""

    def __init__(self, path: str, every_n_steps: int = 500):
        self.path, self.every = Path(path), every_n_steps
        self._last = -1
        self._told = False

    def _csv(self, trainer) -> Path | None:
        from pytorch_lightning.loggers import CSVLogger

        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                return Path(logger.log_dir) / "metrics.csv"
        return None

    def write(self, trainer) -> Path | None:
        from imgaug_gen.visual import progress_plot

        self._last = trainer.global_step
        if not trainer.is_global_zero:
            return None
        csv_path = self._csv(trainer)
        if csv_path is None:
            if not self._told:
                self._told = True
                log.info("No CSV logger (logger=%s): %s is not drawn.", type(trainer.logger).__name__
                         if trainer.logger is not None else "none", self.path)
            return None
        for logger in trainer.loggers:  # flush the rows logged so far into metrics.csv
            logger.save()
        return progress_plot(csv_path, self.path) if csv_path.is_file() else None

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if _due(trainer, self.every, self._last):
            self.write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer)
