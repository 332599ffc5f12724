"""The ``sd_lora`` kind's saved generator: a Stable Diffusion pipeline (1.x/2.x or SDXL) loaded from its
recorded base model, plus the folder's LoRA weights, class adapters and learned class tokens.

Saved generator (``RUN/generator/``): ``config.json`` (the base model, family, prompts, LoRA config; checked
by :class:`SDConfig` before anything is loaded) and, in the diffusers formats,
``pytorch_lora_weights.safetensors`` (shared LoRA), ``class_adapters/class_XXX.safetensors`` (per-class
adapters) and ``textual_inversion/class_XXX.safetensors`` (learned embeddings), so the folder also loads
with plain diffusers::

    pipe = StableDiffusionPipeline.from_pretrained(config["pretrained"])   # or StableDiffusionXLPipeline
    pipe.load_lora_weights("RUN/generator")
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.base import ConditionalGenerator, StrictGeneratorConfig, register_generator
from imgaug_gen.generators.schedulers import NOT_A_SCHEDULER, convert_scheduler, find_scheduler_class
from imgaug_gen.generators.sd import textual_inversion as ti
from imgaug_gen.generators.sd.family import (
    FAMILIES,
    Family,
    hf_offline,
    load_errors,
    load_vae,
    resolve_pretrained,
    resolve_vae,
    save_lora_weights,
)
from imgaug_gen.generators.sd.lora import (
    activate_adapter,
    adapters,
    class_adapter_name,
    lora_state_dict,
    quiet_diffusers,
    weights_file,
)
from imgaug_gen.io import canonical_safetensors_header

log = logging.getLogger(__name__)

SAMPLE_KWARGS = ("num_inference_steps", "guidance_scale", "negative_prompt", "micro_batch")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class LoRARecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(ge=1, le=4096)
    alpha: float = Field(ge=0, le=1e6, allow_inf_nan=False)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[Annotated[str, Field(max_length=200)]] = Field(max_length=1000)


class TextualInversionRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[Annotated[str, Field(min_length=1, max_length=200)]]
    init: Optional[str] = None
    files: list[str]


class SDConfig(StrictGeneratorConfig):
    """An sd_lora generator's config.json."""

    pretrained: str = Field(min_length=1, max_length=4096)
    revision: Optional[str] = None
    variant: Optional[str] = None
    cache_dir: Optional[str] = None
    family: Literal["sd", "sdxl"] = "sd"
    vae: Optional[str] = None
    original_size: Optional[tuple[Annotated[int, Field(ge=1, le=16384)], Annotated[int, Field(ge=1, le=16384)]]] = None
    crops_coords_top_left: Optional[
        tuple[Annotated[int, Field(ge=0, le=16384)], Annotated[int, Field(ge=0, le=16384)]]
    ] = None
    force_zeros_for_empty_prompt: bool = True
    prompts: list[Annotated[str, Field(max_length=10_000)]]
    prompt_template: Optional[str] = None
    class_prompts: dict[str, str] = {}
    identifier_tokens: Union[None, str, list[Optional[str]], dict[str, str]] = None
    negative_prompt: Optional[str] = None
    num_inference_steps: int = Field(ge=1, le=10_000)
    guidance_scale: float = Field(ge=0, le=1000, allow_inf_nan=False)
    sample_scheduler: Optional[str] = None
    micro_batch: int = Field(default=1, ge=1, le=4096)
    inference_dtype: Optional[Literal["auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16"]] = "auto"
    lora: Optional[dict[str, Optional[LoRARecord]]] = None
    lora_weights: Optional[str] = None
    class_adapters: Optional[list[str]] = None
    textual_inversion: Optional[TextualInversionRecord] = None
    prior: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _per_class(self):
        for key in ("prompts", "class_adapters"):
            v = getattr(self, key)
            if v is not None and len(v) != self.num_classes:
                raise ValueError(f"`{key}` has {len(v)} entries for num_classes={self.num_classes}")
        if self.textual_inversion is not None and len(self.textual_inversion.tokens) != self.num_classes:
            raise ValueError(
                f"`textual_inversion.tokens` has {len(self.textual_inversion.tokens)} entries for "
                f"num_classes={self.num_classes}"
            )
        if self.sample_scheduler is not None and find_scheduler_class(self.sample_scheduler) is None:
            raise ValueError(f"`sample_scheduler` = {str(self.sample_scheduler)[:100]!r} {NOT_A_SCHEDULER}")
        return self


@register_generator("sd_lora")
class SDLoRAGenerator(ConditionalGenerator):
    """Stable Diffusion (1.x/2.x or SDXL) with LoRA adapters and/or learned class tokens behind the
    generator contract.

    ``sample`` runs the family's text-to-image pipeline (``StableDiffusionPipeline`` /
    ``StableDiffusionXLPipeline``) with each image's class prompt and its own ``torch.Generator``
    seed; ``edit`` runs the family's img2img pipeline on the same components (SDEdit at the given
    strength). With per-class adapters each class's adapter is loaded (from the generator folder,
    on first use) and activated for that class's images. Keyword arguments of both
    (``generate.py sample_kwargs=...``): ``num_inference_steps``, ``guidance_scale``,
    ``negative_prompt``, ``micro_batch`` (images per pipeline call; 1, the default,
    makes every image independent of its batch byte for byte; larger is faster on GPU
    but lets batch neighbours change the last bits).
    """

    supports_edit = True
    sample_kwargs = SAMPLE_KWARGS
    config_schema = SDConfig

    def __init__(
        self,
        config: dict[str, Any],
        *,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        text_encoder_2=None,
        tokenizer_2=None,
        autocast_dtype: torch.dtype | None = None,
        folder: str | os.PathLike | None = None,
    ):
        super().__init__(config)
        self.unet, self.vae, self.text_encoder, self.text_encoder_2 = unet, vae, text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2, self.scheduler = tokenizer, tokenizer_2, scheduler
        self.autocast_dtype = autocast_dtype
        self._folder = None if folder is None else Path(folder)  # where class adapters load from

    # -- facts ------------------------------------------------------------------------------
    @property
    def family(self) -> Family:
        return FAMILIES[self.config.get("family") or "sd"]

    def prompt_for(self, label: int) -> str:
        """The text prompt that conditions images of class ``label`` (recorded in the manifest)."""
        return self.config["prompts"][int(label)]

    def _components(self) -> dict[str, Any]:
        fam = self.family
        return {slot: getattr(self, slot) for slot in ("unet", "vae", *fam.text_encoders, *fam.tokenizers)}

    def pipeline(self, img2img: bool = False):
        """A diffusers pipeline of this generator's family over its (shared) components."""
        pipe = self.family.pipeline_class(img2img)(
            scheduler=self.scheduler, **self._components(), **self.family.pipeline_kwargs(self.config)
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- per-class adapters -------------------------------------------------------------------
    def _class_groups(self, labels: torch.Tensor) -> list[tuple[int | None, list[int]]]:
        """(class or None, image indices): one group of all images, or one per class with per-class adapters."""
        if not self.config.get("class_adapters"):
            return [(None, list(range(len(labels))))]
        groups: dict[int, list[int]] = {}
        for i, label in enumerate(labels.tolist()):
            groups.setdefault(int(label), []).append(i)
        return list(groups.items())

    def _lora_models(self) -> list:
        return [self.unet, *(getattr(self, s) for s in self.family.text_encoders)]

    def _load_class_adapter(self, label: int) -> None:
        """Load class ``label``'s adapter from the generator folder with diffusers' ``load_lora_weights``."""
        name = class_adapter_name(label)
        if self._folder is None:
            raise RuntimeError(f"the class adapter {name!r} is neither loaded nor in a generator folder")
        file = self.config["class_adapters"][int(label)]
        weights_file(self._folder, file, f"class_adapters[{int(label)}]")
        with quiet_diffusers():
            self.pipeline().load_lora_weights(
                str(self._folder), weight_name=file, adapter_name=name, use_safetensors=True
            )
        self.to(self.vae.dtype)  # peft keeps a new adapter in float32
        self.eval()  # the new adapter's modules (dropout) start in train mode

    def _use_class(self, label: int | None) -> None:
        if label is None:
            return
        name = class_adapter_name(label)
        if name not in adapters(self.unet):
            self._load_class_adapter(label)
        activate_adapter(self._lora_models(), name)

    # -- sampling ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _keep_modes(self):
        """sample()/edit() switch to eval mode and back; keep every shared submodule's own mode
        (during training the frozen VAE stays in eval mode, the LoRA UNet in train mode) and every
        weight's ``requires_grad`` (activating a class adapter switches the others' off)."""
        modes = [(m, m.training) for m in self.modules()]
        grads = [(p, p.requires_grad) for p in self.parameters()]
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode
            for p, flag in grads:
                p.requires_grad_(flag)

    def sample(self, labels, seeds=0, batch_size: int = 64, **kwargs) -> np.ndarray:
        with self._keep_modes():
            return super().sample(labels, seeds=seeds, batch_size=batch_size, **kwargs)

    def edit(self, images, labels, strength=0.5, seeds=0, batch_size: int = 32, **kwargs) -> np.ndarray:
        with self._keep_modes():
            return super().edit(images, labels, strength=strength, seeds=seeds, batch_size=batch_size, **kwargs)

    def _options(self, kwargs: dict) -> dict:
        self._check_sample_kwargs(kwargs)
        opts = {k: kwargs.get(k, self.config.get(k)) for k in SAMPLE_KWARGS}
        opts["micro_batch"] = 1 if opts["micro_batch"] is None else opts["micro_batch"]
        for k in ("num_inference_steps", "micro_batch"):
            v = opts[k]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"`sample_kwargs.{k}` = {v!r}; give an integer >= 1.")
            opts[k] = int(v)
        g = opts["guidance_scale"]
        if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0:
            raise ConfigError(
                f"`sample_kwargs.guidance_scale` = {g!r}; give a number >= 0 (<= 1 turns classifier-free guidance off)."
            )
        return opts

    def _autocast(self):
        """Training-time sampling with half-precision frozen weights runs under autocast (on CUDA; on CPU
        for bfloat16 too, where SDXL's float32 VAE would otherwise meet bfloat16 latents)."""
        dev, dtype = self.device, self.autocast_dtype
        if dtype is not None and dtype != torch.float32 and (dev.type == "cuda" or dtype == torch.bfloat16):
            return torch.autocast(dev.type, dtype=dtype)
        return contextlib.nullcontext()

    @staticmethod
    def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
        # CPU generators: the starting noise is the same on every device.
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    @staticmethod
    def _to_uint8(images: np.ndarray) -> np.ndarray:
        return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)

    def _sample_batch(self, labels: torch.Tensor, seeds: list[int], **kwargs) -> np.ndarray:
        opts = self._options(kwargs)
        _, h, w = self.image_shape
        prompts = [self.prompt_for(int(l)) for l in labels]
        pipe, mb = self.pipeline(), opts["micro_batch"]
        call = self.family.call_kwargs(self.config, h, w)
        out = np.zeros((len(prompts), h, w, 3), np.uint8)
        with self._autocast():
            for label, idx in self._class_groups(labels):
                self._use_class(label)
                for j in range(0, len(idx), mb):
                    part = idx[j : j + mb]
                    images = pipe(
                        prompt=[prompts[k] for k in part],
                        negative_prompt=self._negative(opts, part),
                        height=h,
                        width=w,
                        num_inference_steps=opts["num_inference_steps"],
                        guidance_scale=float(opts["guidance_scale"]),
                        generator=self._generators([seeds[k] for k in part]),
                        output_type="np",
                        **call,
                    ).images
                    out[part] = self._to_uint8(images)
        return out

    @staticmethod
    def _negative(opts: dict, prompts: list):
        neg = opts.get("negative_prompt")
        return None if not neg else [str(neg)] * len(prompts)

    def _edit_groups(self, labels: torch.Tensor, strengths: list[float]):
        """(class or None, strength, image indices): the img2img pipeline takes one strength per call."""
        for label, idx in self._class_groups(labels):
            groups: dict[float, list[int]] = {}
            for i in idx:
                groups.setdefault(float(strengths[i]), []).append(i)
            for strength, part in groups.items():
                yield label, strength, part

    def _edit_batch(
        self, images: np.ndarray, labels: torch.Tensor, strengths: list[float], seeds: list[int], **kwargs
    ) -> np.ndarray:
        opts = self._options(kwargs)
        _, h, w = self.image_shape
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[1] != 3:
            raise ConfigError(f"`images` must have 1 or 3 channels for an `sd_lora` edit; got {x.shape[1]}.")
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        prompts = [self.prompt_for(int(l)) for l in labels]
        pipe, mb = self.pipeline(img2img=True), opts["micro_batch"]
        call = self.family.call_kwargs(self.config, h, w)
        out = np.zeros((len(prompts), h, w, 3), np.uint8)
        # _quiet_diffusers: SDXL's img2img moves a force_upcast VAE to float32 and back at every call, with a notice
        with self._autocast(), quiet_diffusers():
            for label, strength, idx in self._edit_groups(labels, strengths):
                self._use_class(label)
                # at least one denoising step is always run (diffusers refuses int(steps * strength) == 0)
                steps = max(opts["num_inference_steps"], math.ceil(1.0 / strength))
                for j in range(0, len(idx), mb):
                    part = idx[j : j + mb]
                    res = pipe(
                        prompt=[prompts[k] for k in part],
                        image=x[part].to(self.device),
                        negative_prompt=self._negative(opts, part),
                        strength=strength,
                        num_inference_steps=steps,
                        guidance_scale=float(opts["guidance_scale"]),
                        generator=self._generators([seeds[k] for k in part]),
                        output_type="np",
                        **call,
                    ).images
                    out[part] = self._to_uint8(res)
        return out

    # -- persistence -------------------------------------------------------------------------
    def _write_lora(self, path: Path, file: str, adapter: str | None = None) -> None:
        """``path / file``: the LoRA weights of ``adapter`` (None: the only one) of the UNet and text
        encoder(s), through the family pipeline's ``save_lora_weights`` (atomically)."""
        layers = {slot: lora_state_dict(getattr(self, slot), adapter) for slot in ("unet", *self.family.text_encoders)}
        if layers["unet"][0] is None:
            raise RuntimeError(f"the UNet carries no LoRA adapter {adapter or ''}; nothing to save")
        target = path / file
        target.parent.mkdir(parents=True, exist_ok=True)
        # diffusers' LoRA writer takes a folder, not a file: write into a temp folder, then rename the file
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".lora.") as tmp:
            save_lora_weights(self.family, tmp, target.name, layers)
            canonical_safetensors_header(Path(tmp) / target.name)  # equal weights, equal bytes
            os.replace(Path(tmp) / target.name, target)

    def _save_weights(self, path: Path) -> None:
        """The shared LoRA file, each class adapter's file and each class's learned embeddings."""
        if self.config.get("lora_weights"):
            self._write_lora(path, self.config["lora_weights"])
        for label, file in enumerate(self.config.get("class_adapters") or []):
            if class_adapter_name(label) not in adapters(self.unet):
                self._load_class_adapter(label)
            self._write_lora(path, file, class_adapter_name(label))
        cfg = self.config.get("textual_inversion")
        if cfg:
            fam = self.family
            vectors = [
                ti.current_vectors(getattr(self, tok), getattr(self, enc), cfg["tokens"])
                for enc, tok in zip(fam.text_encoders, fam.tokenizers)
            ]
            ti.save_embeddings(path, fam.name, cfg["tokens"], vectors)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu"):
        """Base pipeline from ``config["pretrained"]`` + the LoRA weights / embeddings in ``path``.
        On CUDA the weights are cast to ``inference_dtype`` (``auto``: float16)."""
        gen = super().from_pretrained(path, device=device)
        name = gen.config.get("inference_dtype") or "auto"
        dtype = (torch.float16 if gen.device.type == "cuda" else torch.float32) if name == "auto" else DTYPES.get(name)
        if dtype is None:
            raise ConfigError(
                f"`inference_dtype` = {name!r} in {Path(path) / 'config.json'}; allowed: auto, {sorted(DTYPES)}."
            )
        return gen.to(dtype)

    @classmethod
    def _build(cls, config: dict[str, Any], path: Path) -> "SDLoRAGenerator":
        fam = FAMILIES[config.get("family") or "sd"]
        lora_file = config.get("lora_weights")
        if lora_file:
            weights_file(path, lora_file, "lora_weights")
        for label, file in enumerate(config.get("class_adapters") or []):
            weights_file(path, file, f"class_adapters[{label}]")
        key = f"pretrained` in `{path / 'config.json'}"
        pretrained = resolve_pretrained(
            config.get("pretrained"), config.get("revision"), key=key, cache_dir=config.get("cache_dir")
        )
        extra = {}
        if config.get("vae"):
            vae_key = f"vae` in `{path / 'config.json'}"
            extra["vae"] = load_vae(
                resolve_vae(config["vae"], vae_key, config.get("cache_dir")), config.get("cache_dir"), vae_key
            )
        with load_errors(pretrained, key):
            pipe = fam.pipeline_class().from_pretrained(
                pretrained,
                revision=config.get("revision"),
                variant=config.get("variant"),
                cache_dir=config.get("cache_dir"),
                local_files_only=hf_offline(),
                use_safetensors=True,
                **fam.pipeline_kwargs(config),
                **extra,
            )
        pipe.scheduler = convert_scheduler(pipe.scheduler, config.get("sample_scheduler"), "sample_scheduler")
        if lora_file:
            with quiet_diffusers(not (config.get("lora") or {}).get("text_encoder")):
                pipe.load_lora_weights(str(path), weight_name=lora_file, use_safetensors=True)
        if config.get("textual_inversion"):
            ti.load_embeddings(pipe, path, fam.name, config["textual_inversion"]["tokens"])
        comps = {slot: getattr(pipe, slot) for slot in ("unet", "vae", *fam.text_encoders, *fam.tokenizers)}
        return cls(config, scheduler=pipe.scheduler, folder=path, **comps)
