"""A CSV logger that appends: a resumed run (``ckpt_path=``) keeps the rows the
interrupted run already wrote in ``RUN/metrics.csv`` (Lightning's own CSVLogger
deletes that file when the folder is not empty)."""

from __future__ import annotations

import csv
import os

from lightning_fabric.loggers.csv_logs import _ExperimentWriter as _FabricWriter
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Keep an existing metrics.csv, and continue its columns.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(self.metrics_keys) | set(header))


class AppendingCSVLogger(CSVLogger):
    """``pytorch_lightning.loggers.CSVLogger`` that appends to an existing metrics.csv."""

    @property
    def experiment(self) -> _FabricWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
