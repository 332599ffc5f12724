"""Noise schedulers as data, shared by the diffusion kinds (``ddpm`` and ``sd_lora``).

A saved generator records a scheduler as ``{"class_name": "DDIMScheduler", "config": {...}}``. The
class name is checked to be a diffusers scheduler class before anything is constructed, and its
config may hold only plain values (numbers, strings, lists of them), bounded: a generator folder is
untrusted input. Hydra nodes with ``_target_`` are accepted only where the value comes from the
user's own command-line config (``allow_target=True``: ``model.train_scheduler`` of ``train.py``).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Mapping

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from imgaug_gen.errors import BUILD_ERRORS, ConfigError
from imgaug_gen.io import jsonable as plain

#: Settings that define the noise schedule: sampling must use the one it was trained with.
SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)
#: the most training timesteps a loaded scheduler may have (the schedules are arrays of this length)
MAX_TRAIN_TIMESTEPS = 100_000
_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*Scheduler$")


def scheduler_spec(scheduler: SchedulerMixin) -> dict[str, Any]:
    """What config.json (and the checkpoint's hparams) hold for a scheduler."""
    return {"class_name": type(scheduler).__name__, "config": plain(scheduler.config)}


#: why a name is refused as a scheduler (the config schemas and :func:`scheduler_class` say the same)
NOT_A_SCHEDULER = (
    "is not a diffusers scheduler class; use e.g. DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, "
    "EulerDiscreteScheduler or PNDMScheduler."
)


def find_scheduler_class(name: Any) -> type | None:
    """The diffusers scheduler class called ``name``, or None (checked by name first, so nothing but a
    diffusers scheduler class is ever looked up)."""
    import diffusers

    cls = getattr(diffusers, name, None) if isinstance(name, str) and _NAME.match(name) else None
    return cls if isinstance(cls, type) and issubclass(cls, SchedulerMixin) else None


def scheduler_class(name: Any, key: str) -> type:
    """The diffusers scheduler class called ``name``; a ConfigError naming ``key`` unless it is one."""
    cls = find_scheduler_class(name)
    if cls is None:
        raise ConfigError(f"`{key}` = {str(name)[:100]!r} {NOT_A_SCHEDULER}")
    return cls


def init_params(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}


def _kind(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return "str" if isinstance(v, str) else "list" if isinstance(v, (list, tuple)) else "other"


def _check_values(config: Mapping[str, Any], key: str, cls: type | None = None) -> None:
    defaults = (
        {
            n: p.default
            for n, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        if cls is not None
        else {}
    )
    for k, v in config.items():
        want = _kind(defaults.get(k))
        if want not in ("none", "other") and _kind(v) != want and not (want == "number" and _kind(v) == "none"):
            raise ConfigError(
                f"`{key}.config.{k}` = {str(v)[:100]!r}; {cls.__name__} takes a {want} there (default {defaults[k]!r})."
            )
        items = v if isinstance(v, list) else [v]
        if len(items) > MAX_TRAIN_TIMESTEPS or not all(
            x is None or isinstance(x, (bool, str, int, float)) for x in items
        ):
            raise ConfigError(
                f"`{key}.config.{k}` = {str(v)[:100]!r}; a scheduler setting is a number, a string, a "
                f"boolean or a list of at most {MAX_TRAIN_TIMESTEPS} of them."
            )
    n = config.get("num_train_timesteps", 1000)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TRAIN_TIMESTEPS:
        raise ConfigError(f"`{key}.config.num_train_timesteps` = {n!r}; give an integer in [1, {MAX_TRAIN_TIMESTEPS}].")


def build_scheduler(value: Any, key: str, allow_target: bool = False) -> SchedulerMixin:
    """A scheduler from a saved spec ``{"class_name": ..., "config": {...}}``, an instance, or (only with
    ``allow_target``: the user's own config) a Hydra node with ``_target_``."""
    if isinstance(value, SchedulerMixin):
        return value
    if allow_target and isinstance(value, Mapping) and "_target_" in value:
        from hydra.utils import instantiate

        try:
            value = instantiate(dict(value))
        except Exception as e:  # Hydra wraps the constructor's error
            raise ConfigError(
                f"`{key}` could not be built ({e}); give a diffusers scheduler "
                "`_target_` and only arguments it accepts."
            ) from e
        if not isinstance(value, SchedulerMixin):
            raise ConfigError(f"`{key}._target_` built a {type(value).__name__}, not a diffusers scheduler.")
        return value
    if isinstance(value, Mapping) and set(value) <= {"class_name", "config"} and "class_name" in value:
        cls = scheduler_class(value["class_name"], f"{key}.class_name")
        config = value.get("config") or {}
        if not isinstance(config, Mapping):
            raise ConfigError(f"`{key}.config` = {str(config)[:100]!r}; give a mapping of scheduler settings.")
        config = {k: v for k, v in dict(config).items() if k in init_params(cls)}
        _check_values(config, key, cls)
        try:
            with torch.device("cpu"):  # schedulers hold CPU tensors, also while a network is built on meta
                scheduler = cls.from_config(config)
                probe = scheduler.__class__.from_config(scheduler.config)  # one step on a tiny tensor: it runs
                probe.set_timesteps(min(2, int(probe.config.num_train_timesteps)))
                x = torch.zeros(1, 1, 2, 2)
                probe.step(x, probe.timesteps[0], x)
            return scheduler
        except BUILD_ERRORS as e:
            raise ConfigError(f"`{key}` does not make a {cls.__name__} ({type(e).__name__}: {str(e)[:200]}).") from None
    shown = (
        "{_target_: diffusers.DDIMScheduler, num_train_timesteps: 1000}"
        if allow_target
        else "{class_name: DDIMScheduler, config: {...}}"
    )
    raise ConfigError(f"`{key}` = {str(value)[:200]!r} is not a scheduler; give {shown}.")


def clips_x0(scheduler: SchedulerMixin) -> bool:
    """Whether the sampler keeps its x0 predictions in the data range (clip or threshold)."""
    return bool(scheduler.config.get("clip_sample", False) or scheduler.config.get("thresholding", False))


def convert_scheduler(
    scheduler: SchedulerMixin, class_name: str | None, key: str = "scheduler", **overrides
) -> SchedulerMixin:
    """The same noise schedule run by another scheduler class (None: ``scheduler`` unchanged; unknown
    settings dropped; x0 clipping carried over as thresholding where the target has no ``clip_sample``)."""
    if class_name is None:
        return scheduler
    cls = scheduler_class(class_name, key)
    allowed = init_params(cls)
    config = {k: v for k, v in plain(scheduler.config).items() if k in allowed}
    if clips_x0(scheduler) and "clip_sample" not in allowed and "thresholding" in allowed:
        limit = (
            scheduler.config.get("sample_max_value", 1.0)
            if scheduler.config.get("thresholding")
            else scheduler.config.get("clip_sample_range", 1.0)
        )
        config.update(thresholding=True, sample_max_value=float(limit))
    return cls.from_config({**config, **overrides})


def check_same_schedule(
    train: SchedulerMixin,
    sample: SchedulerMixin,
    keys: tuple[str, str] = ("model.train_scheduler", "model.sample_scheduler"),
) -> None:
    """Sampling must integrate the noise schedule the network was trained on."""
    a, b = plain(train.config), plain(sample.config)
    diff = {k: (a.get(k), b.get(k)) for k in SCHEDULE_KEYS if k in a and k in b and a.get(k) != b.get(k)}
    same_alphas = train.alphas_cumprod.shape == sample.alphas_cumprod.shape and torch.allclose(
        train.alphas_cumprod, sample.alphas_cumprod
    )
    if diff or not same_alphas:
        shown = ", ".join(f"{k}: {x!r} vs {y!r}" for k, (x, y) in diff.items()) or "alphas_cumprod differ"
        raise ConfigError(
            f"`{keys[1]}` uses a different noise schedule than `{keys[0]}` ({shown}). Give both the same "
            f"{', '.join(SCHEDULE_KEYS[:4])} and prediction_type (conf/model/ddpm.yaml interpolates them "
            f"from `{keys[0]}`)."
        )


def check_x0_clipping(
    train: SchedulerMixin,
    sample: SchedulerMixin,
    keys: tuple[str, str] = ("model.train_scheduler", "model.sample_scheduler"),
) -> None:
    """A pixel-space model trained with clipped x0 needs a sampler that clips too (without it,
    DPM-Solver++ on the cosine schedule diverges from the first step)."""
    if clips_x0(train) and not clips_x0(sample):
        raise ConfigError(
            f"`{keys[1]}` ({type(sample).__name__}) does not keep its x0 predictions in [-1, 1], but "
            f"`{keys[0]}.clip_sample` is true. Set `{keys[1]}.thresholding=true` (with "
            f"`{keys[1]}.sample_max_value=1.0`), or `{keys[1]}.clip_sample=true` where the scheduler has it."
        )
