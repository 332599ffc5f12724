"""Compose the project's Hydra configs from Python (notebooks, tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from imgaug_gen.errors import ConfigError

#: the configs, shipped inside the package (Hydra: ``pkg://imgaug_gen.conf``)
CONF_DIR = Path(__file__).resolve().parent / "conf"


def compose_config(
    name: str = "train", overrides: Sequence[str] = (), conf_dir: str | Path | None = None
) -> DictConfig:
    """The config ``train.py``/``generate.py`` would build for these overrides.

    ``run_dir``/``out_dir`` (Hydra's run folder) must be given as overrides, since no
    Hydra run is active: ``compose_config("train", ["run_dir=/tmp/run", "data.shots=10"])``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    conf_dir = Path(conf_dir or CONF_DIR).resolve()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def instantiate_checked(node, **kwargs):
    """``hydra.utils.instantiate`` that lets our own ``ConfigError`` through unwrapped
    (Hydra wraps constructor errors in ``InstantiationException``)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise
