"""``train(cfg)``: the whole training job behind ``train.py``, callable from tests
and notebooks with a composed config.

Steps (the headers in :func:`train` and :func:`_train` carry the same numbers): 1. check the config
(the schemas, the files, the checkpoint's paths, the model against the data's shape) and claim the run
folder, 2. build and validate the data (fails on bad input before anything heavy), 3. build the model with
the data's facts, 4. build callbacks, loggers and the Trainer, 5. fit (optionally resuming exactly from a
checkpoint, loaded with ``weights_only=True``), 6. report.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from imgaug_gen.config import instantiate_checked
from imgaug_gen.errors import ConfigError
from imgaug_gen.io import FolderLock, is_inside, overlaps
from imgaug_gen.loggers import TrimLogOnResume
from imgaug_gen.runtime import is_launch_rank_zero, prepare_process

log = logging.getLogger(__name__)


def check_train_config(cfg: DictConfig) -> None:
    """Checks that need no data or model (the schema :class:`imgaug_gen.schemas.Train`, then the files):
    run before anything heavy."""
    from imgaug_gen.schemas import Train, check_targets, validate

    if cfg.get("run_dir") in (None, ""):
        raise ConfigError("`run_dir` is not set; pass `run_dir=PATH` (train.py sets it to the Hydra run folder).")
    validate(cfg, Train, "train")
    check_targets(cfg, ("data", "model", "trainer", "callbacks", "logger"), "train")
    check_model_against_data(cfg)
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not Path(ckpt).is_file():
        raise ConfigError(
            f"`ckpt_path` = {ckpt!r} does not exist; pass the `checkpoints/last.ckpt` of a run "
            "to resume, or leave `ckpt_path` unset to start fresh."
        )
    root = (cfg.get("data") or {}).get("root")
    if root not in (None, "", "???") and overlaps(cfg.run_dir, os.path.expanduser(str(root))):
        raise ConfigError(
            f"`run_dir` = {str(cfg.run_dir)!r} and `data.root` = {str(root)!r} overlap (one is, contains "
            "or lies inside the other): the run's generator/, checkpoints/ and samples/ would land among "
            "your images, and be read as classes next time. Choose a `run_dir` outside `data.root`."
        )
    if ckpt is not None:
        check_checkpoint_paths(ckpt)


def model_accepts_unlabeled(model: dict) -> bool:
    """Whether the model a ``model`` block (``_target_`` and arguments) builds trains on unlabelled images in
    its batches (the DDPM's null class, the cGAN's unconditional head)."""
    from hydra.utils import get_class

    accepts = getattr(get_class(model["_target_"]), "accepts_unlabeled", None)
    return accepts is not None and bool(accepts(model))


def check_model_against_data(cfg: DictConfig) -> None:
    """The model class's own checks against the data's shape (``GeneratorModule.check_config``: a prior of
    another image size or channel count), from the config alone: before any image is read."""
    from hydra.utils import get_class

    model = OmegaConf.to_container(cfg.model, resolve=True)
    cls = get_class(model["_target_"])
    data = cfg.get("data") or {}
    pool = data.get("unlabeled") is not None or data.get("unlabeled_root") is not None
    share = data.get("unlabeled_share", 0.5)
    if pool and share and not model_accepts_unlabeled(model):
        raise ConfigError(
            f"`model` = {model['_target_']} trains on labelled images only, and `data.unlabeled_share` = {share} "
            "would put unlabelled images in its batches. Set `data.unlabeled_share=0` (with "
            "`pseudo_labels.enabled=true` it then trains on the images a teacher labels confidently), use "
            "model=ddpm, whose null class learns from unlabelled images, or, with model=cgan, set "
            "`model.unlabeled_weight` > 0 (its discriminator's unconditional head learns from them)."
        )
    if (cfg.get("pseudo_labels") or {}).get("enabled") and not pool:
        raise ConfigError(
            "`pseudo_labels.enabled=true` needs an unlabelled pool: set `data.unlabeled=rest` (the training "
            "images outside the shots) or `data.unlabeled_root=PATH`."
        )
    if hasattr(cls, "check_config") and data.get("image_size") is not None:
        size = int(data.image_size)
        cls.check_config(
            {k: v for k, v in model.items() if not k.startswith("_")}, (int(data.get("channels", 3)), size, size)
        )


#: ModelCheckpoint state entries that name files Lightning may delete on the next save.
_CKPT_PATH_KEYS = ("best_model_path", "last_model_path", "kth_best_model_path")


def check_checkpoint_paths(ckpt: str | os.PathLike) -> None:
    """Every file a checkpoint's callback state names must lie in the folder that state names as its
    ``dirpath``, with no ``..`` in it: Lightning's ModelCheckpoint deletes the previous ``last`` /
    ``best`` files on resume and checks only that they sit lexically under its folder, so a tampered
    ``<dirpath>/../../victim`` would be removed. Read with ``weights_only=True`` (no code runs)."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    for name, cb in (state.get("callbacks") or {}).items() if isinstance(state, dict) else ():
        if not isinstance(cb, dict) or not any(k in cb for k in _CKPT_PATH_KEYS):
            continue
        dirpath = cb.get("dirpath")
        paths = [(k, cb.get(k)) for k in _CKPT_PATH_KEYS] + [
            ("best_k_models", p) for p in (cb.get("best_k_models") or {})
        ]
        for key, p in paths:
            if not p:
                continue
            ok = isinstance(p, str) and isinstance(dirpath, str) and ".." not in Path(p).parts and is_inside(p, dirpath)
            if not ok:
                raise ConfigError(
                    f"`ckpt_path` = {str(ckpt)!r}: its {name} state names {key} = {str(p)[:300]!r}, which "
                    f"is not a file inside its checkpoint folder {dirpath!r}. Lightning would delete it on "
                    "resume; the checkpoint was edited or comes from an untrusted source. Resume from "
                    "a checkpoint this run wrote."
                )


def _instantiate_all(node, **kwargs) -> list:
    if node is None:
        return []
    return [instantiate_checked(c, **kwargs) for c in node.values() if c is not None and "_target_" in c]


def _build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, c in (cfg.get("logger") or {}).items():
        if c is None:
            continue
        if name == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                log.warning("logger=wandb asked for but wandb is not installed; logging to CSV only.")
                continue
        loggers.extend(_instantiate_all({name: c}))
    return loggers


def build_datamodule(cfg: DictConfig):
    dm = instantiate_checked(cfg.data)
    dm.setup("fit")
    return dm


def build_module(cfg: DictConfig, dm) -> Any:
    from imgaug_gen.generators.module import GeneratorModule

    module = instantiate_checked(
        cfg.model,
        num_classes=dm.num_classes,
        class_names=list(dm.class_names),
        image_shape=list(dm.image_shape),
        _convert_="all",
    )
    if not isinstance(module, GeneratorModule):
        raise ConfigError(
            f"`model._target_` = {cfg.model.get('_target_')!r} builds a {type(module).__name__}, not an "
            "imgaug_gen.generators.GeneratorModule; subclass it (README: Add a generator kind)."
        )
    return module


def pseudo_label_pool(opts: DictConfig, dm, run_dir: Path) -> None:
    """Step 2b: the fixed-recipe classifier trained on the shots labels the unlabelled pool; the images it is
    at least ``threshold`` sure of join the labelled training batches, each recorded as a pseudo-label with
    its confidence in ``RUN/pseudo_labels.jsonl``."""
    from imgaug_gen.io import atomic_write_text
    from imgaug_gen.metrics.downstream import train_and_test
    from imgaug_gen.metrics.pseudo_labels import pseudo_label

    x, y = dm.train_arrays()
    val = dm.val_arrays()
    check, where = (val, "validation") if len(val[1]) else ((x, y), "training")  # never the test split
    d = train_and_test(
        x, y, *check, dm.num_classes, int(opts.seed), steps=int(opts.steps), return_details=True, return_model=True
    )
    labels = pseudo_label(d["model"], dm.unlabeled_arrays(), float(opts.threshold))
    pool = dm.unlabeled_records()
    ids = [r["id"] for r in pool]
    teacher = f"downstream recipe on the {len(y)} shots, {int(opts.steps)} steps, {where} accuracy {d['accuracy']:.3f}"
    rows = labels.records(ids, list(dm.class_names), teacher)
    for r, i in zip(rows, labels.index):
        r["path"] = pool[int(i)]["path"]
        r["threshold"] = labels.threshold
    if is_launch_rank_zero():
        import json

        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "pseudo_labels.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    log.info(
        "pseudo-labels: kept %d of %d unlabelled images at confidence >= %.2f (per class %s); teacher %s",
        len(labels),
        labels.pool_size,
        labels.threshold,
        labels.per_class(dm.num_classes),
        teacher,
    )
    dm.add_pseudo_labels(labels.index, labels.labels)


class _NoAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines (pytorch_lightning 2.6 logs
    them through ``rank_zero_info`` on every fit; there is no switch for them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def quiet_lightning_tips() -> None:
    """Install :class:`_NoAdverts` on the loggers Lightning's tips come through (idempotent)."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdverts) for f in logger.filters):
            logger.addFilter(_NoAdverts())


def progress_reporting(cfg: DictConfig, callbacks: list) -> dict[str, Any]:
    """The Trainer's progress bar: Lightning's bar counted in optimiser steps (:class:`StepProgressBar`)
    where the bar is on; off where the plain progress lines stand in for it (``callbacks.progress_log``
    with ``enabled=auto`` and stdout not a terminal). Returns the Trainer arguments to override."""
    from pytorch_lightning.callbacks import ProgressBar

    from imgaug_gen.callbacks import ProgressLogCallback, StepProgressBar

    if any(isinstance(c, ProgressLogCallback) and c.replaces_progress_bar for c in callbacks):
        return {"enable_progress_bar": False}
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(StepProgressBar())
    return {}


# Lightning notices that are expected here and only add noise to every run's log.
_QUIET = (
    ".*ModelCheckpoint with manual optimization.*",
    ".*You passed in a `val_dataloader` but have no.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
)


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train a generator as configured; returns (metrics, objects)."""
    # 1. Check the config.
    check_train_config(cfg)
    quiet_lightning_tips()
    import warnings

    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    run_dir = Path(cfg.run_dir)
    # One job per run folder: a second train.py on it (two terminals, a re-queued cluster job) stops here.
    # Under DDP only the launching rank claims it; the kernel drops the lock when the process dies.
    lock = FolderLock(run_dir, "train.lock", "train.py job").acquire() if is_launch_rank_zero() else None
    ok = False
    try:
        out = _train(cfg, run_dir)
        ok = True
        return out
    finally:
        if lock is not None:
            lock.release(failed=not ok)


def _train(cfg: DictConfig, run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from imgaug_gen.callbacks import ExportGeneratorCallback, FidelityCallback
    from imgaug_gen.data.kinds import data_record
    from imgaug_gen.io import atomic_write_text

    prepare_process()  # denormals flushed, freed tensor memory reused (runtime.py)
    pl.seed_everything(cfg.seed, workers=True)

    # 2. Data: validated here, before any network is built.
    dm = build_datamodule(cfg)
    if cfg.pseudo_labels.enabled:
        pseudo_label_pool(cfg.pseudo_labels, dm, run_dir)

    # 3. Model, with the data's facts.
    module = build_module(cfg, dm)

    # 4. Callbacks, loggers, trainer.
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not any(isinstance(c, ExportGeneratorCallback) for c in callbacks):
        callbacks.append(ExportGeneratorCallback(str(run_dir / "generator"), every_n_steps=0))
    callbacks.append(TrimLogOnResume())
    extra = {"run_dir": str(run_dir.resolve()), "data": data_record(dm)}
    for c in callbacks:
        if isinstance(c, ExportGeneratorCallback):
            c.extra.update(extra)
    extra_trainer: dict[str, Any] = progress_reporting(cfg, callbacks)
    if cfg.trainer.get("strategy") == "ddp" and module.ddp_find_unused_parameters:
        extra_trainer["strategy"] = "ddp_find_unused_parameters_true"
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=_build_loggers(cfg) or False, **extra_trainer
    )
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    # 5. Fit (exact resume from a checkpoint if given).
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)

    # 6. Report.
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    for c in callbacks:
        if isinstance(c, FidelityCallback) and c.history:
            metrics.update({k: v for k, v in c.history[-1].items() if k != "step"})
    metrics["global_step"] = trainer.global_step
    return metrics, {"trainer": trainer, "module": module, "datamodule": dm, "generator_dir": run_dir / "generator"}
