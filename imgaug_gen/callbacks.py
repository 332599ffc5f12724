"""Lightning callbacks shared by every generator kind.

They talk to the LightningModule only through ``pl_module.to_generator()`` (the
generator contract) and to the data only through ``trainer.datamodule``, so a
new kind gets sample grids, validation FID/KID, generator export and exact
resume for free. Only global rank 0 writes files.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pydantic import Field
from pytorch_lightning.callbacks import TQDMProgressBar

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
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
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

    def __init__(
        self,
        every_n_steps: int = 1000,
        n_per_class: int = 50,
        seed: int = 4321,
        metrics=None,
        at_end: str | bool = "auto",
    ):
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
        # Under DDP with a feature cache, rank 0 fits (or loads) the feature network and the other ranks
        # then load it from the cache, instead of each training the same network at once.
        wait = int(trainer.world_size) > 1 and self.metrics_cfg.get("cache_dir") is not None
        if wait and not trainer.is_global_zero:
            trainer.strategy.barrier("fidelity_features")
        # Fitting (or loading) the feature network must not move the global RNG: training
        # randomness must not depend on whether the feature cache was warm.
        with torch.random.fork_rng(devices=[]):
            extractor = build_feature_extractor(self.metrics_cfg, images, labels, dm.num_classes)
            self.evaluator = FidelityEvaluator(extractor, images)
        if wait and trainer.is_global_zero:
            trainer.strategy.barrier("fidelity_features")

    def evaluate(self, trainer, pl_module) -> dict:
        """Every process makes and featurises its share of the images (image i: its own seed, on
        rank i % world_size); the features are gathered, so FID/KID equal the one-process value."""
        from imgaug_gen.generators.seeds import per_image_seeds

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
        log.info(
            "validation FID %.2f at step %d: %d samples in %.1f s",
            scores["fid"],
            trainer.global_step,
            len(labels),
            time.perf_counter() - t0,
        )
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
            log.info(
                "no end-of-training FID: the run (%d steps) is shorter than callbacks.fidelity.every_n_steps=%d "
                "(set callbacks.fidelity.at_end=true to score it)",
                trainer.global_step,
                self.every,
            )
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
                log.info(
                    "No CSV logger (logger=%s): %s is not drawn.",
                    type(trainer.logger).__name__ if trainer.logger is not None else "none",
                    self.path,
                )
            return None
        for logger in trainer.loggers:  # flush the rows logged so far into metrics.csv
            logger.save()
        return progress_plot(csv_path, self.path) if csv_path.is_file() else None

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if _due(trainer, self.every, self._last):
            self.write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer)


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressLogCallback(pl.Callback):
    """Plain progress lines a log file can hold (CI logs, SLURM ``.out``, ``make demo | tee``), one every
    ``every_n_steps`` optimiser steps and one at the end, on stdout (flushed), rank 0 only::

        step 200/3000 (7%)  train/d_loss=0.8123  train/g_loss=1.204  11.3 it/s  ETA 4m08s

    ``it/s`` counts optimiser steps since the previous line; the ETA uses the rate since training started.
    ``enabled``: ``auto`` prints only when stdout is not a terminal, and then stands in for the progress bar
    (whose redrawn line would fill the file); ``true`` always prints (beside the bar); ``false`` never.
    ``every_n_steps=0`` turns it off."""

    def __init__(
        self, every_n_steps: Annotated[int, Field(ge=0)] = 100, enabled: Union[Literal["auto"], bool] = "auto"
    ):
        if enabled not in ("auto", True, False):
            raise ConfigError(f"`callbacks.progress_log.enabled` = {enabled!r}; allowed: auto, true, false.")
        self.every, self.enabled = int(every_n_steps), enabled
        self.active = self.every > 0 and (enabled is True or (enabled == "auto" and not _stdout_is_terminal()))
        self._last = -1
        self._start: tuple[float, int] | None = None
        self._prev: tuple[float, int] | None = None

    @property
    def replaces_progress_bar(self) -> bool:
        """True when these lines stand in for the bar (``enabled=auto`` and stdout is not a terminal)."""
        return self.active and self.enabled == "auto"

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._prev = (time.perf_counter(), trainer.global_step)

    def line(self, trainer) -> str:
        """The progress line at the trainer's current step."""
        now, step, max_steps = time.perf_counter(), trainer.global_step, trainer.max_steps
        start = self._start or (now, step)
        prev = self._prev or start
        parts = [
            f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%)"
            if max_steps and max_steps > 0
            else f"step {step} (epoch {trainer.current_epoch})"
        ]
        for k, v in sorted(trainer.callback_metrics.items()):
            if torch.is_tensor(v) and v.numel() == 1:
                parts.append(f"{k}={float(v):.4g}")
        rate = (step - prev[1]) / (now - prev[0]) if now > prev[0] and step > prev[1] else None
        parts.append(f"{rate:.3g} it/s" if rate else "- it/s")
        total_rate = (step - start[1]) / (now - start[0]) if now > start[0] and step > start[1] else None
        if max_steps and max_steps > 0 and total_rate:
            parts.append(f"ETA {_duration((max_steps - step) / total_rate)}")
        parts.append(f"elapsed {_duration(now - start[0])}")
        self._prev = (now, step)
        return "  ".join(parts)

    def _print(self, trainer) -> None:
        self._last = trainer.global_step
        if trainer.is_global_zero:
            print(self.line(trainer), flush=True)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.active and _due(trainer, self.every, self._last):
            self._print(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.active and trainer.global_step != self._last:
            self._print(trainer)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counted in optimiser steps for a step-budgeted run (``trainer.max_steps``):
    ``step 120/3000  4%|▍   | [00:10<03:52, 12.4it/s, train/d_loss=...]``. (Lightning's own bar counts
    batches of the epoch and, with ``max_epochs=-1``, is titled ``Epoch 0/-2``.) Runs without
    ``max_steps`` keep Lightning's epoch bar."""

    STEP_BAR_FORMAT = "{desc}  {percentage:3.0f}%|{bar:20}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    @staticmethod
    def _max_steps(trainer) -> int | None:
        return int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else None

    @property
    def train_description(self) -> str:
        max_steps = self._max_steps(self.trainer)
        return f"step {self.trainer.global_step}/{max_steps}" if max_steps else super().train_description

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        if self._max_steps(self.trainer):
            bar.bar_format = self.STEP_BAR_FORMAT
            bar.unit = "step"
        return bar

    def on_train_epoch_start(self, trainer, *args) -> None:
        max_steps = self._max_steps(trainer)
        if not max_steps:
            return super().on_train_epoch_start(trainer, *args)
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset(total=max_steps)
        bar.initial = bar.n = trainer.global_step
        bar.set_description(self.train_description)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        max_steps = self._max_steps(trainer)
        if not max_steps:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable or not (self._should_update(batch_idx + 1, None) or step >= max_steps):
            return
        bar.set_description(f"step {step}/{max_steps}", refresh=False)
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes
