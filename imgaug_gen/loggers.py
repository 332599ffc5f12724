"""A CSV logger that appends: a resumed run (``ckpt_path=``) keeps the rows the
interrupted run wrote in ``RUN/metrics.csv`` up to the checkpoint it resumes from, and
drops the rows it wrote after it (those steps are trained, and logged, again), so every
step appears once. Lightning's own CSVLogger deletes that file when the folder is not empty.

The writer subclass is the smallest change that keeps Lightning's CSV format and its
header rewriting; Lightning has no public hook for "continue this file".
"""

from __future__ import annotations

import csv
import io

import pytorch_lightning as pl
from lightning_fabric.loggers.csv_logs import _ExperimentWriter as _FabricWriter
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from imgaug_gen.io import atomic_write_text


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Keep an existing metrics.csv, and continue its columns.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(self.metrics_keys) | set(header))

    def drop_rows_after(self, step: int) -> int:
        """Remove the rows logged after ``step`` (atomically); returns how many were removed."""
        if not self._fs.isfile(self.metrics_file_path):
            return 0
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], list(reader)
        keep = [r for r in rows if not (r.get("step") not in (None, "") and int(float(r["step"])) > step)]
        if len(keep) != len(rows):
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(keep)
            atomic_write_text(self.metrics_file_path, out.getvalue())
        return len(rows) - len(keep)


class AppendingCSVLogger(CSVLogger):
    """``pytorch_lightning.loggers.CSVLogger`` that appends to an existing metrics.csv."""

    @property
    def experiment(self) -> _FabricWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class TrimLogOnResume(pl.Callback):
    """On a resumed fit, drop the CSV rows the interrupted run logged after its checkpoint."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.ckpt_path or not trainer.is_global_zero:
            return
        # The step axis Lightning logs with (batches that stepped) as restored from the checkpoint: rows
        # at this step were logged with the batch that saved it; rows after it are about to be redone.
        step = int(trainer.fit_loop.epoch_loop._batches_that_stepped)
        for logger in trainer.loggers:
            if isinstance(logger, AppendingCSVLogger):
                logger.save()
                logger.experiment.drop_rows_after(step)
