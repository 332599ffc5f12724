"""Class-conditional diffusion (DDPM) trained from scratch: the saved generator and its LightningModule.

Training recipe: a diffusers ``UNet2DModel`` with a class embedding of
``num_classes + 1`` entries (the last one is the "null" class), the standard
noise-prediction MSE loss at uniformly drawn timesteps of ``train_scheduler``
(a diffusers ``DDPMScheduler``), labels replaced by the null class with
probability ``cond_drop_prob`` so that one network is both conditional and
unconditional (classifier-free guidance), AdamW with an optional linear LR
warmup, and an EMA copy of the UNet that is used for every sample, grid and
saved model. Automatic optimisation: ``trainer.max_steps`` counts iterations.

Sampling (:class:`DDPMGenerator`) runs ``sample_scheduler`` (DDIM by default,
DPM-Solver++ or DDPM by name) with ``guidance_scale``; every random number of
image ``i`` comes from a ``torch.Generator`` seeded with its own seed, so an
image depends only on its label and seed, never on its batch. img2img is
SDEdit: noise a real image to the sampling step matching ``strength`` and
denoise it with its label.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Annotated, Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from imgaug_gen.errors import ConfigError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from imgaug_gen.generators.base import (
    ConditionalGenerator,
    StrictGeneratorConfig,
    from_uint8_nhwc,
    register_generator,
    to_uint8_nhwc,
)
from imgaug_gen.generators.module import GeneratorModule
from imgaug_gen.generators.priors import (
    DiffusionPrior,
    FinetuneMode,
    InitMode,
    apply_finetune,
    check_prior_shape,
    ddpm_unet_from_prior,
    load_ddpm_prior,
    merged_copy,
)
from imgaug_gen.generators.schedulers import (
    build_scheduler,
    check_same_schedule,
    check_x0_clipping,
    SCHEDULE_KEYS,
    convert_scheduler,
    init_params,
    plain as _plain,
    scheduler_spec,
)
from imgaug_gen.nets.ema import ema_decay, ema_update

log = logging.getLogger(__name__)

# UNet2DModel arguments that come from the data, not from `model.unet`.
_DATA_UNET_KEYS = ("sample_size", "in_channels", "out_channels", "num_class_embeds", "class_embed_type")
# Samplers selectable by name at generation time (`sample_kwargs.scheduler=...`).
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddpm": ("DDPMScheduler", {}),
}
SAMPLE_KWARGS = ("num_inference_steps", "guidance_scale", "eta", "scheduler")


# -- the network -----------------------------------------------------------------------------
# -- non-leaking augmentation (EDM, Karras et al. 2022 section 5) ---------------------------------
#: Discrete geometric augmentations the UNet can be conditioned on: index 0 is the identity.
#: "flips": identity, x-flip, y-flip, both; "dihedral": the 8 rotations/reflections of a square.
AUGMENT_GROUPS = {"none": 1, "flips": 4, "dihedral": 8}


def augment_group_size(name: str, image_shape: Sequence[int]) -> int:
    if name not in AUGMENT_GROUPS:
        raise ConfigError(f"`model.augment.ops` = {name!r}; allowed: {sorted(AUGMENT_GROUPS)}.")
    if name == "dihedral" and int(image_shape[1]) != int(image_shape[2]):
        raise ConfigError(f"`model.augment.ops=dihedral` rotates by 90 degrees and needs square images; the data's "
                          f"are {image_shape[1]}x{image_shape[2]}. Use `model.augment.ops=flips`.")
    return AUGMENT_GROUPS[name]


def apply_group_element(x: torch.Tensor, k: int) -> torch.Tensor:
    """Element ``k`` of the dihedral group on NCHW images: ``k % 4`` quarter turns, then (k >= 4) a
    transpose. With the "flips" group (k < 4) the elements are identity, x-flip, y-flip, both."""
    if k == 0:
        return x
    if k == 1:
        return x.flip(-1)
    if k == 2:
        return x.flip(-2)
    if k == 3:
        return x.flip(-1, -2)
    y = x.transpose(-1, -2)  # k = 4..7: the transpose composed with the four flips
    return apply_group_element(y, k - 4)


def unet_config(num_classes: int, image_shape: Sequence[int], unet: Mapping[str, Any] | None = None,
                augment_classes: int = 1) -> dict:
    """Full ``UNet2DModel`` arguments: the data's facts plus ``model.unet`` (checked).

    The class embedding has ``(num_classes + 1) * augment_classes`` entries: label ``y`` (or the null
    class ``num_classes``) under augmentation ``k`` is entry ``y + (num_classes + 1) * k``, so the
    un-augmented entries (k = 0) are those of a UNet trained without augmentation conditioning."""
    unet = dict(unet or {})
    given = sorted(set(unet) & set(_DATA_UNET_KEYS))
    if given:
        raise ConfigError(f"`model.unet` sets {given}, which come from the data (image size, channels, "
                          "classes); remove them.")
    c, h, w = (int(v) for v in image_shape)
    widths = [int(v) for v in unet.get("block_out_channels", (32, 64, 64))]
    n = len(widths)
    unet.setdefault("block_out_channels", widths)
    unet.setdefault("down_block_types", ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D"])
    unet.setdefault("up_block_types", ["AttnUpBlock2D"] + ["UpBlock2D"] * (n - 1))
    unet.setdefault("layers_per_block", 1)
    unet.setdefault("norm_num_groups", 8)
    for k in ("down_block_types", "up_block_types"):
        if len(unet[k]) != n:
            raise ConfigError(f"`model.unet.{k}` has {len(unet[k])} entries but `model.unet.block_out_channels` "
                              f"= {widths} has {n}; give one block type per width.")
    groups = int(unet["norm_num_groups"])
    if any(wd % groups for wd in widths):
        raise ConfigError(f"`model.unet.block_out_channels` = {widths} must all be divisible by "
                          f"`model.unet.norm_num_groups` = {groups}; change one of them.")
    factor = 2 ** (n - 1)
    if h % factor or w % factor:
        raise ConfigError(f"image size {h}x{w} (`data.image_size`) must be divisible by {factor} for a UNet with "
                          f"{n} levels (`model.unet.block_out_channels` = {widths}); change either.")
    return _plain({**unet, "sample_size": h if h == w else [h, w], "in_channels": c, "out_channels": c,
                   "num_class_embeds": (num_classes + 1) * int(augment_classes)})


def build_unet(config: Mapping[str, Any]) -> UNet2DModel:
    try:
        return UNet2DModel.from_config(dict(config))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"`model.unet` does not make a valid diffusers UNet2DModel: {e}") from e


# -- starting from a prior -------------------------------------------------------------------
#: conf/model/ddpm.yaml's `unet` and `train_scheduler` (a test keeps them equal): with `model.pretrained`,
#: a value left at its default gives way to the prior's; one set to something else must agree with it.
DEFAULT_UNET = {"block_out_channels": [32, 64, 64], "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], "layers_per_block": 1,
                "norm_num_groups": 8, "attention_head_dim": 8}
DEFAULT_TRAIN_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001,
                           "beta_end": 0.02, "prediction_type": "epsilon", "clip_sample": True}


def _differs(given: Any, default: Any, prior: Any) -> bool:
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return norm(given) != norm(default) and norm(given) != norm(prior)


def check_prior_architecture(unet: Mapping[str, Any] | None, prior: DiffusionPrior) -> None:
    """With a prior the architecture is the prior's: a `model.unet` value other than the default must match it."""
    theirs = _plain(prior.unet.config)
    for key, value in dict(unet or {}).items():
        if _differs(value, DEFAULT_UNET.get(key), theirs.get(key)):
            raise ConfigError(f"`model.unet.{key}` = {value!r}, but the prior `model.pretrained` = {str(prior.path)!r} "
                              f"has {key} = {theirs.get(key)!r}. The architecture comes from the prior: remove the "
                              "override (or start from scratch without `model.pretrained`).")


def prior_schedulers(prior: DiffusionPrior, train: SchedulerMixin, sample: SchedulerMixin):
    """The prior's noise schedule and prediction type for training and sampling; the configured sampler
    class and its options (spacing, thresholding, ...) are kept. A schedule setting set to something
    other than the default that disagrees with the prior is an error."""
    if prior.train_scheduler is None:
        log.warning("the prior %s holds no scheduler: training with `model.train_scheduler` as configured; it must "
                    "be the schedule the prior was trained with", prior.path)
        return train, sample
    theirs = build_scheduler(prior.train_scheduler, f"the scheduler of {prior.path}")
    given, mine = _plain(train.config), _plain(theirs.config)
    for key in (*SCHEDULE_KEYS, "clip_sample"):
        if key in given and key in mine and _differs(given[key], DEFAULT_TRAIN_SCHEDULER.get(key), mine[key]):
            raise ConfigError(f"`model.train_scheduler.{key}` = {given[key]!r}, but the prior `model.pretrained` = "
                              f"{str(prior.path)!r} was trained with {key} = {mine[key]!r}. The noise schedule comes "
                              "with the prior: remove the override.")
    options = {k: v for k, v in _plain(sample.config).items() if k not in SCHEDULE_KEYS and k in init_params(type(sample))}
    return theirs, convert_scheduler(theirs, type(sample).__name__, **options)


def ddpm_prior_shape(pretrained: Any) -> tuple[int, int, int]:
    """(C, H, W) a ddpm prior makes, from its config files alone (no weights read)."""
    import json
    from pathlib import Path

    from imgaug_gen.generators.priors import resolve_prior

    path = resolve_prior(pretrained)
    for cfg in (path / "generator" / "config.json", path / "config.json", path / "unet" / "config.json"):
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
            except ValueError:
                continue
            if isinstance(data.get("image_shape"), list):
                return tuple(int(v) for v in data["image_shape"])
            if data.get("_class_name") == "UNet2DModel":
                size = data.get("sample_size")
                h, w = (size, size) if isinstance(size, int) else tuple(size)
                return int(data.get("in_channels", 3)), int(h), int(w)
    return load_ddpm_prior(pretrained).image_shape


# -- the generator ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleOptions:
    num_inference_steps: int
    guidance_scale: float
    eta: float
    scheduler: str | None  # None: the saved sample_scheduler


class SchedulerRecord(BaseModel):
    """A scheduler in config.json: a diffusers scheduler class name and its settings (checked by
    :func:`~imgaug_gen.generators.schedulers.build_scheduler`)."""

    model_config = ConfigDict(extra="forbid")
    class_name: str = Field(min_length=1, max_length=100)
    config: dict[str, Any] = {}


class DDPMConfig(StrictGeneratorConfig):
    """A ddpm generator's config.json."""

    unet: dict[str, Any]
    train_scheduler: SchedulerRecord
    sample_scheduler: SchedulerRecord
    num_inference_steps: int = Field(default=20, ge=1, le=100_000)
    guidance_scale: float = Field(default=1.0, ge=0, le=1000, allow_inf_nan=False)
    eta: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    prior: Optional[dict[str, Any]] = None

    @field_validator("unet")
    @classmethod
    def _bounded(cls, v: dict) -> dict:
        widths = v.get("block_out_channels", [])
        if not (isinstance(widths, list) and 1 <= len(widths) <= 8
                and all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 4096 for w in widths)):
            raise ValueError(f"`unet.block_out_channels` = {str(widths)[:100]}: give 1 to 8 widths of 1 to 4096")
        layers = v.get("layers_per_block", 1)
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= 16:
            raise ValueError(f"`unet.layers_per_block` = {layers!r}: give an integer in [1, 16]")
        return v


@register_generator("ddpm")
class DDPMGenerator(ConditionalGenerator):
    """The EMA UNet of a DDPM run plus its schedulers, behind the generator contract.

    ``config`` holds ``unet`` (the full UNet2DModel config), ``train_scheduler`` and
    ``sample_scheduler`` (``{"class_name", "config"}``), and the sampling defaults
    ``num_inference_steps``, ``guidance_scale`` and ``eta``; each can be overridden per
    call (``sample(..., num_inference_steps=10, guidance_scale=3, scheduler="dpmsolver++")``).
    """

    supports_edit = True
    sample_kwargs = SAMPLE_KWARGS
    config_schema = DDPMConfig

    def __init__(self, config: dict[str, Any], unet: UNet2DModel | None = None):
        super().__init__(config)
        for key in ("unet", "train_scheduler", "sample_scheduler"):
            if key not in self.config:
                raise ConfigError(f"the ddpm generator config has no `{key}`; the generator folder is damaged.")
        self.config.setdefault("num_inference_steps", 20)
        self.config.setdefault("guidance_scale", 1.0)
        self.config.setdefault("eta", 0.0)
        self.unet = unet if unet is not None else build_unet(self.config["unet"])
        self._templates: dict[str | None, SchedulerMixin] = {
            None: build_scheduler(self.config["sample_scheduler"], "sample_scheduler")}
        build_scheduler(self.config["train_scheduler"], "train_scheduler")  # checked like the sampler
        self._step_params: dict[type, set[str]] = {}
        self._warned: set[tuple[float, int]] = set()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def check_runs(self) -> None:
        c, h, w = self.image_shape
        self.unet(torch.zeros(1, c, h, w), torch.zeros(1, dtype=torch.long),
                  class_labels=torch.full((1,), self.null_class), return_dict=False)

    # 1. Check the sampling options.
    def sample_options(self, kwargs: Mapping[str, Any], prefix: str = "sample_kwargs") -> SampleOptions:
        """Per-call options over the saved defaults; errors name ``prefix.key`` (generate.py's keys)."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: the saved default
        unknown = sorted(set(kwargs) - set(SAMPLE_KWARGS))
        if unknown:
            raise ConfigError(f"`{prefix}` has unknown keys {unknown} for a ddpm generator; allowed: "
                              f"{list(SAMPLE_KWARGS)}.")
        cfg = {**{k: self.config[k] for k in ("num_inference_steps", "guidance_scale", "eta")}, **kwargs}
        steps, scale, eta = cfg["num_inference_steps"], cfg["guidance_scale"], cfg["eta"]
        max_steps = int(self._templates[None].config.num_train_timesteps)
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= max_steps:
            raise ConfigError(f"`{prefix}.num_inference_steps` = {steps!r}; give an integer in "
                              f"[1, {max_steps}] (the training timesteps).")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ConfigError(f"`{prefix}.guidance_scale` = {scale!r}; give a number >= 0 (1 = no guidance, "
                              "0 = unconditional, > 1 = stronger class guidance).")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise ConfigError(f"`{prefix}.eta` = {eta!r}; give a number in [0, 1] (DDIM only: 0 deterministic, "
                              "1 = DDPM-like).")
        name = kwargs.get("scheduler")
        if name is not None and name not in SAMPLERS:
            raise ConfigError(f"`{prefix}.scheduler` = {name!r}; allowed: {list(SAMPLERS)} (or leave it "
                              "unset for the scheduler the model was trained with).")
        return SampleOptions(int(steps), float(scale), float(eta), name)

    # 2. A fresh scheduler (they hold per-run state) with its timesteps set.
    def make_scheduler(self, options: SampleOptions) -> SchedulerMixin:
        if options.scheduler not in self._templates:
            class_name, extra = SAMPLERS[options.scheduler]
            self._templates[options.scheduler] = convert_scheduler(self._templates[None], class_name, **extra)
        scheduler = copy.deepcopy(self._templates[options.scheduler])
        scheduler.set_timesteps(options.num_inference_steps)
        return scheduler

    def _step_kwargs(self, scheduler: SchedulerMixin, generators: list[torch.Generator],
                     options: SampleOptions) -> dict[str, Any]:
        cls = type(scheduler)
        if cls not in self._step_params:
            self._step_params[cls] = set(inspect.signature(scheduler.step).parameters)
        params = self._step_params[cls]
        kwargs: dict[str, Any] = {"return_dict": False}
        if "generator" in params:
            kwargs["generator"] = generators  # diffusers draws image i's noise from generators[i]
        if "eta" in params:
            kwargs["eta"] = options.eta
        return kwargs

    # 3. Per-image noise.
    def initial_noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        shape = self.image_shape
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

    # 4. The denoising loop (classifier-free guidance: conditional and null class in one batch).
    def denoise(self, x: torch.Tensor, labels: torch.Tensor, scheduler: SchedulerMixin, timesteps: torch.Tensor,
                generators: list[torch.Generator], options: SampleOptions) -> torch.Tensor:
        step_kwargs = self._step_kwargs(scheduler, generators, options)
        scale = options.guidance_scale
        if scale == 1.0:
            class_labels = labels
        elif scale == 0.0:
            class_labels = torch.full_like(labels, self.null_class)
        else:
            class_labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        guided = class_labels.shape[0] != labels.shape[0]
        for t in timesteps:
            model_in = scheduler.scale_model_input(x, t)
            if guided:
                model_in = torch.cat([model_in, model_in])
            out = self.unet(model_in, t, class_labels=class_labels, return_dict=False)[0]
            if guided:
                cond, uncond = out.chunk(2)
                out = uncond + scale * (cond - uncond)
            x = scheduler.step(out, t, x, **step_kwargs)[0]
        return x

    def _sample_batch(self, labels: torch.Tensor, seeds: list[int], **kwargs) -> np.ndarray:
        options = self.sample_options(kwargs)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        scheduler = self.make_scheduler(options)
        x = self.initial_noise(generators) * scheduler.init_noise_sigma
        x = self.denoise(x, labels, scheduler, scheduler.timesteps, generators, options)
        return to_uint8_nhwc(x)

    # -- img2img (SDEdit) -------------------------------------------------------------------
    @staticmethod
    def edit_start(num_inference_steps: int, strength: float) -> int:
        """Index of the first sampling step for ``strength`` (diffusers img2img): the last
        ``int(strength * num_inference_steps)`` steps are run; 0 steps leaves the image as is."""
        run = min(int(num_inference_steps * strength + 1e-6), num_inference_steps)
        return num_inference_steps - run

    def _edit_batch(self, images: np.ndarray, labels: torch.Tensor, strengths: list[float],
                    seeds: list[int], **kwargs) -> np.ndarray:
        options = self.sample_options(kwargs)
        c, h, w = self.image_shape
        if images.shape[1:] != (h, w, c):
            raise ConfigError(f"`images` are {images.shape[1]}x{images.shape[2]}x{images.shape[3]} (HxWxC); this "
                              f"generator edits {h}x{w}x{c} images. Resize them (generate.py uses the run's data).")
        x0 = from_uint8_nhwc(images, device=self.device)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        noise = self.initial_noise(generators)  # first draw of every image, whatever its strength
        out = x0.clone()
        for strength in sorted(set(strengths)):
            idx = [i for i, s in enumerate(strengths) if s == strength]
            scheduler = self.make_scheduler(options)
            start = self.edit_start(options.num_inference_steps, strength) * scheduler.order
            timesteps = scheduler.timesteps[start:]
            if len(timesteps) == 0:
                if (strength, options.num_inference_steps) not in self._warned:
                    self._warned.add((strength, options.num_inference_steps))
                    log.warning("img2img strength %s runs 0 of %d steps: the images are returned unchanged; raise "
                                "`img2img.strengths` or `sample_kwargs.num_inference_steps`.", strength,
                                options.num_inference_steps)
                continue
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)
            sel = torch.as_tensor(idx, device=self.device)
            x = scheduler.add_noise(x0[sel], noise[sel], timesteps[:1].repeat(len(idx)))
            out[sel] = self.denoise(x, labels[sel], scheduler, timesteps, [generators[i] for i in idx], options)
        return to_uint8_nhwc(out)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_unet(cls, unet: UNet2DModel, *, num_classes: int, class_names: Sequence[str],
                  image_shape: Sequence[int], train_scheduler: SchedulerMixin, sample_scheduler: SchedulerMixin,
                  num_inference_steps: int = 20, guidance_scale: float = 1.0, eta: float = 0.0,
                  extra: dict | None = None) -> "DDPMGenerator":
        """A generator around ``unet`` (weights shared, not copied)."""
        config = {"num_classes": int(num_classes), "class_names": list(class_names),
                  "image_shape": [int(v) for v in image_shape], "unet": _plain(unet.config),
                  "train_scheduler": scheduler_spec(train_scheduler),
                  "sample_scheduler": scheduler_spec(sample_scheduler),
                  "num_inference_steps": int(num_inference_steps), "guidance_scale": float(guidance_scale),
                  "eta": float(eta), **(extra or {})}
        return cls(config, unet=unet)


# -- training -----------------------------------------------------------------------------------
class DDPMModule(GeneratorModule):
    """Training logic only: epsilon (or v) prediction MSE, label dropout for CFG, EMA."""

    def __init__(self, num_classes: int, class_names: Sequence[str], image_shape: Sequence[int],
                 unet: Mapping[str, Any] | None = None, train_scheduler: Any = None, sample_scheduler: Any = None,
                 num_inference_steps: int = 20, guidance_scale: float = 1.5, eta: float = 0.0,
                 cond_drop_prob: float = 0.1, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 weight_decay: float = 0.0, lr_warmup_steps: int = 0, ema_decay: float = 0.999,
                 noise_seed: int | None = None, augment: Mapping[str, Any] | None = None,
                 pretrained: Optional[str] = None, finetune: FinetuneMode = "full",
                 init_class_embeddings: InitMode = "null_class", lora: Optional[dict[str, Any]] = None,
                 embedding_lr: Optional[Annotated[float, Field(gt=0)]] = None):
        super().__init__()
        # The schedulers are stored as plain specs, so that hparams (and the checkpoint) hold no objects.
        train = build_scheduler(train_scheduler if train_scheduler is not None else
                                {"class_name": "DDPMScheduler", "config": {}}, "model.train_scheduler",
                                allow_target=True)
        sample = build_scheduler(sample_scheduler if sample_scheduler is not None else
                                 {"class_name": "DDIMScheduler", "config": _plain(train.config)},
                                 "model.sample_scheduler", allow_target=True)
        prior = None
        if pretrained is not None:  # 0. Start from a prior: its schedule, architecture and weights
            prior = load_ddpm_prior(pretrained)
            check_prior_shape(prior.image_shape, image_shape, pretrained)
            check_prior_architecture(unet, prior)
            train, sample = prior_schedulers(prior, train, sample)
        elif finetune != "full":
            raise ConfigError(f"`model.finetune` = {finetune!r} adapts a prior; set `model.pretrained=PATH` (a ddpm run "
                              "or a diffusers UNet2DModel / DDPMPipeline folder), or `model.finetune=full`.")
        check_same_schedule(train, sample)
        check_x0_clipping(train, sample)
        train_scheduler, sample_scheduler = scheduler_spec(train), scheduler_spec(sample)
        if not 0 <= cond_drop_prob < 1:
            raise ConfigError(f"`model.cond_drop_prob` = {cond_drop_prob}; give a probability in [0, 1) "
                              "(0.1 is usual; 0 disables classifier-free guidance).")
        if cond_drop_prob == 0 and guidance_scale != 1:
            raise ConfigError(f"`model.guidance_scale` = {guidance_scale} needs `model.cond_drop_prob` > 0 (the null "
                              "class is never trained otherwise); set `model.guidance_scale=1` or "
                              "`model.cond_drop_prob=0.1`.")
        if not 0 <= ema_decay < 1:
            raise ConfigError(f"`model.ema_decay` = {ema_decay}; give a number in [0, 1) (e.g. 0.999).")
        if lr_warmup_steps < 0:
            raise ConfigError(f"`model.lr_warmup_steps` = {lr_warmup_steps}; give a count >= 0.")
        augment = dict(augment or {})
        unknown = sorted(set(augment) - {"p", "ops"})
        if unknown:
            raise ConfigError(f"`model.augment` has unknown keys {unknown}; allowed: p, ops.")
        aug_p, aug_ops = augment.get("p", 0.0), augment.get("ops", "flips")
        if not isinstance(aug_p, (int, float)) or isinstance(aug_p, bool) or not 0 <= aug_p <= 1:
            raise ConfigError(f"`model.augment.p` = {aug_p!r}; give a probability in [0, 1] (0 disables).")
        self._aug_classes = augment_group_size(aug_ops, image_shape) if aug_p > 0 else 1
        self.save_hyperparameters()
        if prior is None:
            self.unet = build_unet(unet_config(num_classes, image_shape, unet, self._aug_classes))
            self.prior = None
        else:
            self.unet = ddpm_unet_from_prior(prior, num_classes, self._aug_classes, init_class_embeddings)
            self.prior = {**prior.record(), "finetune": finetune}
        apply_finetune(self.unet, finetune, [self.unet.class_embedding.weight], lora)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)
        self.noise_scheduler = train
        self.sample_scheduler = sample
        # validate the sampling defaults now, not at the first sample grid
        defaults = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "eta": eta}
        self.to_generator().sample_options(defaults, prefix="model")
        self.ema_updates = 0
        # Training noise, timesteps and label dropout come from the module's own generator, saved in
        # the checkpoint: resume is exact whatever else draws from torch's global RNG (a DataLoader's
        # iter() does). Default seed: the run's (`seed`, set by seed_everything before the build).
        self._noise_seed = int(torch.initial_seed() if noise_seed is None else noise_seed)
        self._noise_rng: torch.Generator | None = None
        self._noise_rng_state: dict | None = None  # from a checkpoint, until noise_rng() applies it

    # -- what the rest of the framework needs ------------------------------------------
    def to_generator(self) -> DDPMGenerator:
        hp = self.hparams
        return DDPMGenerator.from_unet(
            merged_copy(self.ema), num_classes=hp.num_classes, class_names=hp.class_names, image_shape=hp.image_shape,
            train_scheduler=self.noise_scheduler, sample_scheduler=self.sample_scheduler,
            num_inference_steps=hp.num_inference_steps, guidance_scale=hp.guidance_scale, eta=hp.eta,
            extra=None if self.prior is None else {"prior": self.prior})

    @classmethod
    def check_config(cls, args: Mapping[str, Any], image_shape: Sequence[int]) -> None:
        """Before any data is read: a prior's image size and channels against the data's."""
        if args.get("pretrained") is not None:
            check_prior_shape(ddpm_prior_shape(args["pretrained"]), image_shape, args["pretrained"])

    # -- training ------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        emb = self.unet.class_embedding.weight
        rest = [p for p in self.unet.parameters() if p.requires_grad and p is not emb]
        groups = [{"params": [emb], "lr": hp.embedding_lr or hp.lr}] + ([{"params": rest}] if rest else [])
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        if hp.lr_warmup_steps <= 0:
            return opt
        warmup = int(hp.lr_warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def noise_rng(self) -> torch.Generator:
        """The training-noise generator on this module's device (one stream per DDP rank)."""
        if self._noise_rng is None or self._noise_rng.device.type != self.device.type:
            rng = torch.Generator(device=self.device)
            rng.manual_seed(self._noise_seed + 1_000_003 * self.global_rank)
            saved, self._noise_rng_state = self._noise_rng_state, None
            if saved is not None and saved["device"] == self.device.type:
                rng.set_state(saved["state"])
            elif saved is not None:  # resumed on another device type: the stream cannot continue
                log.warning("resuming a run trained on %s on %s: the training noise restarts from its seed, so "
                            "the run will not match an uninterrupted one exactly.", saved["device"],
                            self.device.type)
            self._noise_rng = rng
        return self._noise_rng

    def training_step(self, batch, batch_idx):
        x0, labels = batch
        n, rng = x0.shape[0], self.noise_rng()
        # 1. Drop labels to the null class (classifier-free guidance).
        if self.hparams.cond_drop_prob > 0:
            drop = torch.rand(n, device=self.device, generator=rng) < self.hparams.cond_drop_prob
            labels = torch.where(drop, torch.full_like(labels, self.hparams.num_classes), labels)
        # 1b. Non-leaking augmentation: transform some images and tell the UNet which transform
        # (its own class-embedding entry); sampling uses the identity, so transforms never leak.
        if self._aug_classes > 1:
            p = float(self.hparams.augment["p"])
            k = torch.randint(1, self._aug_classes, (n,), device=self.device, generator=rng)
            k = torch.where(torch.rand(n, device=self.device, generator=rng) < p, k, torch.zeros_like(k))
            x0 = x0.clone()
            for g in k.unique().tolist():
                if g:
                    idx = (k == g).nonzero().squeeze(1)
                    x0[idx] = apply_group_element(x0[idx], g)
            labels = labels + (self.hparams.num_classes + 1) * k
        # 2. Noise the images at random timesteps.
        noise = torch.randn(x0.shape, device=self.device, dtype=x0.dtype, generator=rng)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), device=self.device,
                          generator=rng)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        # 3. Predict the noise (or v) and regress it.
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        pred = self.unet(x_t, t, class_labels=labels, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float())
        self.log_interval_mean("train/loss", loss)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self._update_ema()  # after every real optimiser step (also under gradient accumulation)

    def _update_ema(self) -> None:
        self.ema_updates += 1
        ema_update(self.ema, self.unet, ema_decay(self.ema_updates, self.hparams.ema_decay))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema_updates"] = self.ema_updates
        checkpoint["ddpm_noise_rng"] = {"device": self.device.type, "state": self.noise_rng().get_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.ema_updates = int(checkpoint.get("ema_updates", 0))
        # applied when the generator is made on the training device (the module may not be there yet)
        self._noise_rng, self._noise_rng_state = None, checkpoint.get("ddpm_noise_rng")
