"""The saved generator of the ddpm kind: its config.json, the sampling options and the samplers.

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
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from diffusers import UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from pydantic import BaseModel, ConfigDict, Field, field_validator

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.base import (
    ConditionalGenerator,
    StrictGeneratorConfig,
    from_uint8_nhwc,
    register_generator,
    to_uint8_nhwc,
)
from imgaug_gen.generators.schedulers import build_scheduler, convert_scheduler, scheduler_spec
from imgaug_gen.generators.schedulers import plain as _plain
from imgaug_gen.nets.unet import build_unet

log = logging.getLogger(__name__)

# Samplers selectable by name at generation time (`sample_kwargs.scheduler=...`).
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddpm": ("DDPMScheduler", {}),
}
SAMPLE_KWARGS = ("num_inference_steps", "guidance_scale", "eta", "scheduler")


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
        if not (
            isinstance(widths, list)
            and 1 <= len(widths) <= 8
            and all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 4096 for w in widths)
        ):
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
    concurrent_sampling = True  # a scheduler copied per batch (make_scheduler), generators made per call
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
            None: build_scheduler(self.config["sample_scheduler"], "sample_scheduler")
        }
        build_scheduler(self.config["train_scheduler"], "train_scheduler")  # checked like the sampler
        self._step_params: dict[type, set[str]] = {}
        self._warned: set[tuple[float, int]] = set()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def check_runs(self) -> None:
        c, h, w = self.image_shape
        self.unet(
            torch.zeros(1, c, h, w),
            torch.zeros(1, dtype=torch.long),
            class_labels=torch.full((1,), self.null_class),
            return_dict=False,
        )

    # 1. Check the sampling options.
    def sample_options(self, kwargs: Mapping[str, Any], prefix: str = "sample_kwargs") -> SampleOptions:
        """Per-call options over the saved defaults; errors name ``prefix.key`` (generate.py's keys)."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: the saved default
        unknown = sorted(set(kwargs) - set(SAMPLE_KWARGS))
        if unknown:
            raise ConfigError(
                f"`{prefix}` has unknown keys {unknown} for a ddpm generator; allowed: {list(SAMPLE_KWARGS)}."
            )
        cfg = {**{k: self.config[k] for k in ("num_inference_steps", "guidance_scale", "eta")}, **kwargs}
        steps, scale, eta = cfg["num_inference_steps"], cfg["guidance_scale"], cfg["eta"]
        max_steps = int(self._templates[None].config.num_train_timesteps)
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= max_steps:
            raise ConfigError(
                f"`{prefix}.num_inference_steps` = {steps!r}; give an integer in "
                f"[1, {max_steps}] (the training timesteps)."
            )
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ConfigError(
                f"`{prefix}.guidance_scale` = {scale!r}; give a number >= 0 (1 = no guidance, "
                "0 = unconditional, > 1 = stronger class guidance)."
            )
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise ConfigError(
                f"`{prefix}.eta` = {eta!r}; give a number in [0, 1] (DDIM only: 0 deterministic, 1 = DDPM-like)."
            )
        name = kwargs.get("scheduler")
        if name is not None and name not in SAMPLERS:
            raise ConfigError(
                f"`{prefix}.scheduler` = {name!r}; allowed: {list(SAMPLERS)} (or leave it "
                "unset for the scheduler the model was trained with)."
            )
        return SampleOptions(int(steps), float(scale), float(eta), name)

    # 2. A fresh scheduler (they hold per-run state) with its timesteps set.
    def make_scheduler(self, options: SampleOptions) -> SchedulerMixin:
        if options.scheduler not in self._templates:
            class_name, extra = SAMPLERS[options.scheduler]
            self._templates[options.scheduler] = convert_scheduler(self._templates[None], class_name, **extra)
        scheduler = copy.deepcopy(self._templates[options.scheduler])
        scheduler.set_timesteps(options.num_inference_steps)
        return scheduler

    def _step_kwargs(
        self, scheduler: SchedulerMixin, generators: list[torch.Generator], options: SampleOptions
    ) -> dict[str, Any]:
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
    def denoise(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        scheduler: SchedulerMixin,
        timesteps: torch.Tensor,
        generators: list[torch.Generator],
        options: SampleOptions,
    ) -> torch.Tensor:
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

    def _edit_batch(
        self, images: np.ndarray, labels: torch.Tensor, strengths: list[float], seeds: list[int], **kwargs
    ) -> np.ndarray:
        options = self.sample_options(kwargs)
        c, h, w = self.image_shape
        if images.shape[1:] != (h, w, c):
            raise ConfigError(
                f"`images` are {images.shape[1]}x{images.shape[2]}x{images.shape[3]} (HxWxC); this "
                f"generator edits {h}x{w}x{c} images. Resize them (generate.py uses the run's data)."
            )
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
                    log.warning(
                        "img2img strength %s runs 0 of %d steps: the images are returned unchanged; raise "
                        "`img2img.strengths` or `sample_kwargs.num_inference_steps`.",
                        strength,
                        options.num_inference_steps,
                    )
                continue
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)
            sel = torch.as_tensor(idx, device=self.device)
            x = scheduler.add_noise(x0[sel], noise[sel], timesteps[:1].repeat(len(idx)))
            out[sel] = self.denoise(x, labels[sel], scheduler, timesteps, [generators[i] for i in idx], options)
        return to_uint8_nhwc(out)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_unet(
        cls,
        unet: UNet2DModel,
        *,
        num_classes: int,
        class_names: Sequence[str],
        image_shape: Sequence[int],
        train_scheduler: SchedulerMixin,
        sample_scheduler: SchedulerMixin,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        extra: dict | None = None,
    ) -> "DDPMGenerator":
        """A generator around ``unet`` (weights shared, not copied)."""
        config = {
            "num_classes": int(num_classes),
            "class_names": list(class_names),
            "image_shape": [int(v) for v in image_shape],
            "unet": _plain(unet.config),
            "train_scheduler": scheduler_spec(train_scheduler),
            "sample_scheduler": scheduler_spec(sample_scheduler),
            "num_inference_steps": int(num_inference_steps),
            "guidance_scale": float(guidance_scale),
            "eta": float(eta),
            **(extra or {}),
        }
        return cls(config, unet=unet)
