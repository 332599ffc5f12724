"""Stable Diffusion (1.x/2.x and SDXL) + LoRA / textual inversion: the saved generator and its LightningModule.

Training recipe (as diffusers' ``train_text_to_image_lora.py`` / ``train_dreambooth_lora.py``
and, for SDXL, ``train_dreambooth_lora_sdxl.py``): a pretrained Stable Diffusion
(``model.pretrained``, a folder written by ``save_pretrained`` or a Hub id in the local cache)
with the VAE and the text encoder(s) frozen; LoRA adapters (peft ``LoraConfig``) are added to the
UNet's attention projections (and optionally to the text encoder(s)), and only they are trained:
AdamW, epsilon- or v-prediction MSE (optionally Min-SNR weighted), optional noise offset,
gradient checkpointing, mixed precision with the frozen weights in the half-precision
``weight_dtype`` and the trained weights in float32.

The family (SD-1.x/2.x or SDXL) is read from the folder's ``model_index.json``; what differs
(two text encoders, pooled embeddings and ``add_time_ids`` for SDXL, the pipeline classes, the
LoRA file's parts) lives in :mod:`imgaug_gen.generators.sd_family`. Options on top of the shared
LoRA: ``textual_inversion`` (one learned token per class, DA-Fusion;
:mod:`imgaug_gen.generators.sd_textual_inversion`), alone (``lora=false``) or with LoRA, and
``per_class_adapters`` (one named LoRA adapter per class, DataDream).

Each class is a prompt: ``prompt_template`` (``"a photo of a {class_name}"``), optionally with a
DreamBooth-style identifier ``{token}`` per class, or a per-class override from ``class_prompts``;
with textual inversion ``{class_name}`` is the class's placeholder token (``<golden_retriever>``).
The generator records the prompt of every class (:meth:`SDLoRAGenerator.prompt_for`).

Saved generator (``RUN/generator/``): ``config.json`` (the base model, family, prompts, LoRA
config) and, in the diffusers formats, ``pytorch_lora_weights.safetensors`` (shared LoRA),
``class_adapters/class_XXX.safetensors`` (per-class adapters) and
``textual_inversion/class_XXX.safetensors`` (learned embeddings), so the folder also loads with
plain diffusers::

    pipe = StableDiffusionPipeline.from_pretrained(config["pretrained"])   # or StableDiffusionXLPipeline
    pipe.load_lora_weights("RUN/generator")

Only the trained weights (and their optimiser state) go into the Lightning checkpoints; the
frozen base model is reloaded from ``model.pretrained`` on resume.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators import sd_textual_inversion as ti
from imgaug_gen.generators.base import ConditionalGenerator, StrictGeneratorConfig, register_generator
from imgaug_gen.generators.module import GeneratorModule
from imgaug_gen.generators.schedulers import convert_scheduler, scheduler_class
from imgaug_gen.io import canonical_safetensors_header
from imgaug_gen.generators.sd_family import (  # noqa: F401  (re-exported: the loading helpers' old home)
    COMPONENTS,
    FAMILIES,
    Family,
    detect_family,
    hf_offline,
    load_components,
    load_errors,
    load_vae,
    resolve_pretrained,
    resolve_vae,
    save_lora_weights,
)

log = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name (load_lora_weights finds it)
CLASS_ADAPTER_DIR = "class_adapters"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
SAMPLE_KWARGS = ("num_inference_steps", "guidance_scale", "negative_prompt", "micro_batch")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_MIXED = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def _check_lr_scheduler(name: str) -> None:
    from diffusers.optimization import SchedulerType

    try:
        SchedulerType(name)
    except ValueError:
        raise ConfigError(f"`model.lr_scheduler` = {name!r}; allowed: {[t.value for t in SchedulerType]}.") from None



# -- prompts -----------------------------------------------------------------------------------
def _identifier_list(class_names: list[str], identifier_tokens) -> list[str | None]:
    """``model.identifier_tokens`` as one entry per class (None: no identifier)."""
    if identifier_tokens is None:
        return [None] * len(class_names)
    if isinstance(identifier_tokens, str):
        return [identifier_tokens] * len(class_names)
    if isinstance(identifier_tokens, Mapping):
        missing = [c for c in class_names if c not in identifier_tokens]
        extra = sorted(set(identifier_tokens) - set(class_names))
        if missing or extra:
            raise ConfigError(f"`model.identifier_tokens` must map every class to a token; missing {missing}, "
                              f"unknown {extra} (classes: {class_names}).")
        return [str(identifier_tokens[c]) for c in class_names]
    tokens = [str(t) for t in identifier_tokens]
    if len(tokens) != len(class_names):
        raise ConfigError(f"`model.identifier_tokens` has {len(tokens)} tokens for {len(class_names)} classes "
                          f"{class_names}; give one per class, one string for all, or null.")
    return tokens


def build_prompts(class_names: Sequence[str], template: str = "a photo of a {class_name}",
                  class_prompts: Mapping[str, str] | None = None,
                  identifier_tokens: str | Sequence[str] | Mapping[str, str] | None = None,
                  humanize_class_names: bool = True,
                  placeholder_tokens: Sequence[str] | None = None) -> list[str]:
    """One prompt per class.

    ``template`` (and each ``class_prompts`` override) may use ``{class_name}`` and
    ``{token}``. ``identifier_tokens``: null; one string used for every class (a
    DreamBooth identifier such as ``"sks"``, the class name tells classes apart); a
    list with one rare token per class; or a ``{class_name: token}`` mapping.
    ``humanize_class_names`` turns ``golden_retriever`` into ``golden retriever``.
    ``placeholder_tokens`` (textual inversion): ``{class_name}`` becomes the class's placeholder
    token, and every prompt must contain it.
    """
    class_names = [str(c) for c in class_names]
    class_prompts = dict(class_prompts or {})
    unknown = sorted(set(class_prompts) - set(class_names))
    if unknown:
        raise ConfigError(f"`model.class_prompts` names unknown classes {unknown}; the classes are {class_names}.")
    tokens = _identifier_list(class_names, identifier_tokens)
    prompts = []
    for i, (name, token) in enumerate(zip(class_names, tokens)):
        text = class_prompts.get(name, template)
        key = f"model.class_prompts.{name}" if name in class_prompts else "model.prompt_template"
        if "{token}" in text and token is None:
            raise ConfigError(f"`{key}` = {text!r} uses {{token}} but `model.identifier_tokens` is null; set "
                              "`model.identifier_tokens=sks` (or one rare token per class), or drop {token}.")
        if token is not None and "{token}" not in text and name not in class_prompts:
            raise ConfigError(f"`model.identifier_tokens` is set but `{key}` = {text!r} has no {{token}}; use e.g. "
                              "`model.prompt_template='a photo of {token} {class_name}'`.")
        if placeholder_tokens is not None and "{class_name}" not in text:
            raise ConfigError(f"`model.textual_inversion=true` puts each class's learned token where the prompt says "
                              f"{{class_name}}, but `{key}` = {text!r} has none; add {{class_name}}.")
        shown = name.replace("_", " ").strip() if humanize_class_names else name
        if placeholder_tokens is not None:
            shown = placeholder_tokens[i]
        try:
            prompts.append(" ".join(text.format(class_name=shown, token=token or "").split()))
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"`{key}` = {text!r} is not a valid template ({e}); the only fields are "
                              "{class_name} and {token}.") from e
    return prompts


# -- LoRA --------------------------------------------------------------------------------------
def make_lora_config(rank: int, alpha: float | None, dropout: float, target_modules: Sequence[str],
                     targets_key: str = "model.lora_target_modules"):
    """peft ``LoraConfig`` as diffusers' scripts build it (gaussian init: the adapter starts as a no-op)."""
    from peft import LoraConfig

    if isinstance(rank, bool) or not (isinstance(rank, int) and rank >= 1):
        raise ConfigError(f"`model.lora_rank` = {rank!r}; give a positive integer (4-128 is usual).")
    alpha = rank if alpha is None else alpha
    if not float(alpha) > 0:
        raise ConfigError(f"`model.lora_alpha` = {alpha!r}; give a positive number or null (= lora_rank).")
    if not (0.0 <= float(dropout) < 1.0):
        raise ConfigError(f"`model.lora_dropout` = {dropout!r}; give a value in [0, 1).")
    if not target_modules:
        raise ConfigError(f"`{targets_key}` is empty; name the projections to adapt, e.g. "
                          f"{list(UNET_TARGETS)} for the UNet.")
    return LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                      init_lora_weights="gaussian", target_modules=list(target_modules))


def class_adapter_name(label: int) -> str:
    """The peft adapter name of class ``label`` (``per_class_adapters``)."""
    return f"class_{int(label):03d}"


def class_adapter_file(label: int) -> str:
    return f"{CLASS_ADAPTER_DIR}/{class_adapter_name(label)}.safetensors"


def _adapters(model) -> dict:
    return dict(getattr(model, "peft_config", None) or {})


def lora_state_dict(model, adapter_name: str | None = None) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """(diffusers-format LoRA weights, adapter metadata) of ``model``'s adapter ``adapter_name``
    (None: its first), or (None, None) when it has no such adapter."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    name = adapter_name or next(iter(_adapters(model)), None)
    if model is None or name not in _adapters(model):
        return None, None
    # save_embedding_layers=False: no embedding is adapted, and "auto" would query the Hub
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=name,
                                                                   save_embedding_layers=False))
    meta = model.peft_config[name].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    return sd, meta


def activate_adapter(models: Sequence[Any], name: str) -> None:
    """Make ``name`` the one active LoRA adapter of every peft layer in ``models`` (what diffusers'
    ``set_adapters`` does per layer); peft also makes only its weights require grad."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in models:
        if model is None or name not in _adapters(model):
            continue
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter(name)


@contextlib.contextmanager
def _quiet_diffusers(quiet: bool = True):
    """Hide diffusers' and transformers' loading notices (e.g. "no LoRA keys for CLIPTextModel" when only
    the UNet has LoRA; transformers' load report of a text encoder holding several named adapters)."""
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    levels = dlogging.get_verbosity(), tlogging.get_verbosity()
    if quiet:
        dlogging.set_verbosity_error()
        tlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(levels[0])
        tlogging.set_verbosity(levels[1])


# -- the generator ---------------------------------------------------------------------------
def weights_file(folder: Path, name: Any, key: str) -> Path:
    """A weight file a generator's config.json names: a relative ``.safetensors`` path inside the
    folder (never a pickled ``.bin``, never outside), present."""
    from imgaug_gen.io import confined

    where = f"`{folder / 'config.json'}`: `{key}`"
    path = confined(folder, name, where)
    if not str(name).endswith(".safetensors"):
        raise ConfigError(f"{where} = {name!r}: weights are read from .safetensors files only (no pickled .bin); "
                          "the folder was edited or comes from an untrusted source.")
    if not path.is_file():
        raise ConfigError(f"`{path}` is missing; the generator folder is incomplete.")
    return path


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
    crops_coords_top_left: Optional[tuple[Annotated[int, Field(ge=0, le=16384)],
                                          Annotated[int, Field(ge=0, le=16384)]]] = None
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
            raise ValueError(f"`textual_inversion.tokens` has {len(self.textual_inversion.tokens)} entries for "
                             f"num_classes={self.num_classes}")
        if self.sample_scheduler is not None:
            try:
                scheduler_class(self.sample_scheduler, "sample_scheduler")
            except ConfigError as e:
                raise ValueError(str(e)) from None
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

    def __init__(self, config: dict[str, Any], *, unet, vae, text_encoder, tokenizer, scheduler,
                 text_encoder_2=None, tokenizer_2=None, autocast_dtype: torch.dtype | None = None,
                 folder: str | os.PathLike | None = None):
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
        pipe = self.family.pipeline_class(img2img)(scheduler=self.scheduler, **self._components(),
                                                   **self.family.pipeline_kwargs(self.config))
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
        with _quiet_diffusers():
            self.pipeline().load_lora_weights(str(self._folder), weight_name=file, adapter_name=name,
                                              use_safetensors=True)
        self.to(self.vae.dtype)  # peft keeps a new adapter in float32
        self.eval()  # the new adapter's modules (dropout) start in train mode

    def _use_class(self, label: int | None) -> None:
        if label is None:
            return
        name = class_adapter_name(label)
        if name not in _adapters(self.unet):
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
            raise ConfigError(f"`sample_kwargs.guidance_scale` = {g!r}; give a number >= 0 (<= 1 turns "
                              "classifier-free guidance off).")
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
                    part = idx[j:j + mb]
                    images = pipe(prompt=[prompts[k] for k in part], negative_prompt=self._negative(opts, part),
                                  height=h, width=w, num_inference_steps=opts["num_inference_steps"],
                                  guidance_scale=float(opts["guidance_scale"]),
                                  generator=self._generators([seeds[k] for k in part]), output_type="np",
                                  **call).images
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

    def _edit_batch(self, images: np.ndarray, labels: torch.Tensor, strengths: list[float],
                    seeds: list[int], **kwargs) -> np.ndarray:
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
        with self._autocast(), _quiet_diffusers():
            for label, strength, idx in self._edit_groups(labels, strengths):
                self._use_class(label)
                # at least one denoising step is always run (diffusers refuses int(steps * strength) == 0)
                steps = max(opts["num_inference_steps"], math.ceil(1.0 / strength))
                for j in range(0, len(idx), mb):
                    part = idx[j:j + mb]
                    res = pipe(prompt=[prompts[k] for k in part], image=x[part].to(self.device),
                               negative_prompt=self._negative(opts, part), strength=strength,
                               num_inference_steps=steps, guidance_scale=float(opts["guidance_scale"]),
                               generator=self._generators([seeds[k] for k in part]), output_type="np",
                               **call).images
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
            if class_adapter_name(label) not in _adapters(self.unet):
                self._load_class_adapter(label)
            self._write_lora(path, file, class_adapter_name(label))
        cfg = self.config.get("textual_inversion")
        if cfg:
            fam = self.family
            vectors = [ti.current_vectors(getattr(self, tok), getattr(self, enc), cfg["tokens"])
                       for enc, tok in zip(fam.text_encoders, fam.tokenizers)]
            ti.save_embeddings(path, fam.name, cfg["tokens"], vectors)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu"):
        """Base pipeline from ``config["pretrained"]`` + the LoRA weights / embeddings in ``path``.
        On CUDA the weights are cast to ``inference_dtype`` (``auto``: float16)."""
        gen = super().from_pretrained(path, device=device)
        name = gen.config.get("inference_dtype") or "auto"
        dtype = (torch.float16 if gen.device.type == "cuda" else torch.float32) if name == "auto" else _DTYPES.get(name)
        if dtype is None:
            raise ConfigError(f"`inference_dtype` = {name!r} in {Path(path) / 'config.json'}; allowed: auto, "
                              f"{sorted(_DTYPES)}.")
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
        pretrained = resolve_pretrained(config.get("pretrained"), config.get("revision"), key=key,
                                        cache_dir=config.get("cache_dir"))
        extra = {}
        if config.get("vae"):
            vae_key = f"vae` in `{path / 'config.json'}"
            extra["vae"] = load_vae(resolve_vae(config["vae"], vae_key, config.get("cache_dir")),
                                    config.get("cache_dir"), vae_key)
        with load_errors(pretrained, key):
            pipe = fam.pipeline_class().from_pretrained(
                pretrained, revision=config.get("revision"), variant=config.get("variant"),
                cache_dir=config.get("cache_dir"), local_files_only=hf_offline(), use_safetensors=True,
                **fam.pipeline_kwargs(config), **extra)
        pipe.scheduler = convert_scheduler(pipe.scheduler, config.get("sample_scheduler"), "sample_scheduler")
        if lora_file:
            with _quiet_diffusers(not (config.get("lora") or {}).get("text_encoder")):
                pipe.load_lora_weights(str(path), weight_name=lora_file, use_safetensors=True)
        if config.get("textual_inversion"):
            ti.load_embeddings(pipe, path, fam.name, config["textual_inversion"]["tokens"])
        comps = {slot: getattr(pipe, slot) for slot in ("unet", "vae", *fam.text_encoders, *fam.tokenizers)}
        return cls(config, scheduler=pipe.scheduler, folder=path, **comps)


# -- the LightningModule ---------------------------------------------------------------------
class SDLoRAModule(GeneratorModule):
    """LoRA fine-tuning (and/or textual inversion) of a pretrained Stable Diffusion 1.x/2.x or SDXL,
    one prompt per class.

    Only the LoRA weights and the learned token vectors are trainable, optimised and checkpointed.
    ``weight_dtype`` (``auto``: float16 / bfloat16 under ``trainer.precision=16-mixed`` /
    ``bf16-mixed``, else float32) is the dtype of the frozen weights; trained weights stay float32.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str], image_shape: Sequence[int],
                 pretrained: str | None = None, revision: str | None = None, variant: str | None = None,
                 cache_dir: str | None = None, family: Literal["auto", "sd", "sdxl"] = "auto",
                 vae: str | None = None,
                 prompt_template: str = "a photo of a {class_name}",
                 class_prompts: Mapping[str, str] | None = None,
                 identifier_tokens: str | Sequence[str] | Mapping[str, str] | None = None,
                 humanize_class_names: bool = True, negative_prompt: str | None = None,
                 lora: bool = True, lora_rank: int = 4, lora_alpha: float | None = None, lora_dropout: float = 0.0,
                 lora_target_modules: Sequence[str] = UNET_TARGETS, train_text_encoder: bool = False,
                 text_encoder_target_modules: Sequence[str] = TEXT_ENCODER_TARGETS,
                 per_class_adapters: bool = False, textual_inversion: bool = False,
                 textual_inversion_init: str | None = None, textual_inversion_lr: float = 5e-4,
                 original_size: Sequence[int] | None = None, crops_coords_top_left: Sequence[int] = (0, 0),
                 lr: float = 1e-4, lr_text_encoder: float | None = None, betas: Sequence[float] = (0.9, 0.999),
                 weight_decay: float = 1e-2, eps: float = 1e-8, lr_scheduler: str = "constant",
                 lr_warmup_steps: int = 0, gradient_checkpointing: bool = False, snr_gamma: float | None = None,
                 noise_offset: float = 0.0, prediction_type: str | None = None, weight_dtype: str = "auto",
                 num_inference_steps: int = 25, guidance_scale: float = 7.5, sample_scheduler: str | None = None,
                 micro_batch: int = 1, inference_dtype: str = "auto", seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        # 1. Checks that need no model: data facts, options, prompts, where the base model and VAE are.
        h, w = self._check_options()
        self.pretrained = resolve_pretrained(pretrained, revision, cache_dir=cache_dir)
        self.vae_path = resolve_vae(vae, cache_dir=cache_dir)
        self.family, index = detect_family(self.pretrained, revision, cache_dir, expect=family)
        self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))

        # 2. Load the base model (the real from_pretrained code) and check it against the data.
        comps = load_components(self.family, self.pretrained, revision, variant, self.vae_path, cache_dir=cache_dir)
        self._set_components(comps)
        self._check_image_size(h, w)

        # 3. Learned class tokens, frozen base model, trainable LoRA adapters.
        self.ti = torch.nn.ModuleList(self._add_placeholders() if textual_inversion else [])
        self._check_prompt_lengths()
        self._add_adapters(gradient_checkpointing, train_text_encoder)
        # a batch trains only the adapters of its classes; SDXL reads text encoder 1's penultimate layer,
        # so LoRA on its last layer gets no gradient
        if per_class_adapters or (train_text_encoder and self.family.name == "sdxl"):
            self.ddp_find_unused_parameters = True
        self.weight_dtype = torch.float32
        # Only the trained weights are checkpointed; on_load_checkpoint checks that they are all there.
        self.strict_loading = False
        self._class_embeds: tuple | None = None
        self.batches_seen = 0

    # -- construction steps ----------------------------------------------------------------------
    def _check_options(self) -> tuple[int, int]:
        """Option checks, prompts and LoRA configs; returns the image (height, width)."""
        hp = self.hparams
        c, h, w = (int(v) for v in hp.image_shape)
        if c != 3:
            raise ConfigError(f"`data.channels` = {c}, but Stable Diffusion works on RGB images; set "
                              "`data.channels=3` (grayscale images are then replicated to 3 channels).")
        if hp.weight_dtype != "auto" and hp.weight_dtype not in _DTYPES:
            raise ConfigError(f"`model.weight_dtype` = {hp.weight_dtype!r}; allowed: auto, {sorted(_DTYPES)}.")
        if hp.snr_gamma is not None and not float(hp.snr_gamma) > 0:
            raise ConfigError(f"`model.snr_gamma` = {hp.snr_gamma!r}; give a positive value (5.0 is usual) or null.")
        if hp.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ConfigError(f"`model.prediction_type` = {hp.prediction_type!r}; allowed: null (the scheduler's), "
                              "epsilon, v_prediction.")
        self._check_what_trains()
        self.placeholders = ti.placeholder_tokens(hp.class_names) if hp.textual_inversion else None
        self.prompts = build_prompts(hp.class_names, hp.prompt_template, hp.class_prompts, hp.identifier_tokens,
                                     hp.humanize_class_names, self.placeholders)
        self.unet_lora_config = (make_lora_config(hp.lora_rank, hp.lora_alpha, hp.lora_dropout,
                                                  hp.lora_target_modules) if hp.lora else None)
        self.text_lora_config = (make_lora_config(hp.lora_rank, hp.lora_alpha, hp.lora_dropout,
                                                  hp.text_encoder_target_modules, "model.text_encoder_target_modules")
                                 if hp.lora and hp.train_text_encoder else None)
        if hp.sample_scheduler is not None:
            scheduler_class(hp.sample_scheduler, "model.sample_scheduler")
        _check_lr_scheduler(hp.lr_scheduler)
        return h, w

    def _check_what_trains(self) -> None:
        hp = self.hparams
        if not (hp.lora or hp.textual_inversion):
            raise ConfigError("`model.lora=false` and `model.textual_inversion=false` leave nothing to train; set "
                              "`model.lora=true` (LoRA adapters), `model.textual_inversion=true` (a learned token "
                              "per class), or both.")
        if not hp.lora and (hp.per_class_adapters or hp.train_text_encoder):
            key = "per_class_adapters" if hp.per_class_adapters else "train_text_encoder"
            raise ConfigError(f"`model.{key}=true` needs LoRA adapters, but `model.lora=false`; set `model.lora=true`.")
        if not float(hp.textual_inversion_lr) > 0:
            raise ConfigError(f"`model.textual_inversion_lr` = {hp.textual_inversion_lr!r}; give a positive value "
                              "(5e-4 is usual).")
        for key in ("original_size", "crops_coords_top_left"):
            v = hp.get(key)
            if v is not None and (len(v) != 2 or any(int(x) < 0 for x in v)):
                raise ConfigError(f"`model.{key}` = {list(v)!r}; give [height, width] (SDXL micro-conditioning)"
                                  f"{' or null (= the image size)' if key == 'original_size' else ''}.")

    def _set_components(self, comps: dict[str, Any]) -> None:
        hp = self.hparams
        self.noise_scheduler = comps["noise_scheduler"]
        self.sample_scheduler = convert_scheduler(comps["scheduler"], hp.sample_scheduler, "model.sample_scheduler")
        if hp.prediction_type is not None:
            self.noise_scheduler.register_to_config(prediction_type=hp.prediction_type)
        self.vae, self.unet = comps["vae"], comps["unet"]
        self.tokenizer, self.tokenizer_2 = comps["tokenizer"], comps.get("tokenizer_2")
        self.text_encoder, self.text_encoder_2 = comps["text_encoder"], comps.get("text_encoder_2")

    def _check_image_size(self, h: int, w: int) -> None:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if h % factor or w % factor:
            raise ConfigError(f"`data.image_size` = {h} is not a multiple of the VAE's downscale factor {factor}; "
                              f"use e.g. `data.image_size={max(factor, h // factor * factor)}`.")
        native = int(self.unet.config.sample_size) * factor
        if h < native // 2:
            log.warning("data.image_size=%d is far below the base model's native %d px; expect poor images.", h,
                        native)

    @property
    def text_encoders(self) -> list:
        return [getattr(self, s) for s in self.family.text_encoders]

    @property
    def tokenizers(self) -> list:
        return [getattr(self, s) for s in self.family.tokenizers]

    def _add_placeholders(self) -> list[ti.TokenVectors]:
        """One placeholder token per class in every tokenizer / text encoder (textual inversion)."""
        hp = self.hparams
        init = hp.textual_inversion_init
        texts = [init if init else str(c).replace("_", " ") for c in hp.class_names]
        return [ti.add_placeholder_tokens(tok, enc, self.placeholders, texts)
                for tok, enc in zip(self.tokenizers, self.text_encoders)]

    def _add_adapters(self, gradient_checkpointing: bool, train_text_encoder: bool) -> None:
        """Freeze the base model, add the LoRA adapter(s) (float32: one, or one per class), set train/eval modes."""
        from diffusers.training_utils import cast_training_params

        for module in (self.vae, self.unet, *self.text_encoders):
            module.requires_grad_(False)
        names = ([class_adapter_name(c) for c in range(self.hparams.num_classes)] if self.hparams.per_class_adapters
                 else ["default"])
        with warnings.catch_warnings():  # peft warns at every named adapter after the first
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
            for name in names if self.unet_lora_config is not None else []:
                self.unet.add_adapter(copy.deepcopy(self.unet_lora_config), adapter_name=name)
                for encoder in self.text_encoders if self.text_lora_config is not None else []:
                    encoder.add_adapter(copy.deepcopy(self.text_lora_config), adapter_name=name)
        self._trainable = [n for n, p in self.named_parameters() if "lora_" in n or n.startswith("ti.")]
        self._restore_requires_grad()  # peft leaves only the last added adapter trainable
        cast_training_params([self.unet, *self.text_encoders], dtype=torch.float32)  # LoRA in fp32, always
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for encoder in self.text_encoders if train_text_encoder else []:
                ckpt_kwargs = {"use_reentrant": False}  # the frozen embeddings' output needs no grad
                if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5.x
                    encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
                else:
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        # Train mode only where there is something to train (from_pretrained leaves all in eval mode).
        self.unet.train()
        for encoder in self.text_encoders:
            encoder.train(bool(train_text_encoder))
        self.vae.eval()

    # -- helpers -----------------------------------------------------------------------------
    def _restore_requires_grad(self) -> None:
        """Every trained tensor requires grad (activating one class adapter switches the others off)."""
        params = dict(self.named_parameters())
        for name in self._trainable:
            params[name].requires_grad_(True)

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The trained tensors: LoRA weights and learned token vectors."""
        params = dict(self.named_parameters())
        return [params[n] for n in self._trainable]

    def lora_state_keys(self) -> list[str]:
        return list(self._trainable)

    def _check_prompt_lengths(self) -> None:
        for tokenizer in self.tokenizers:
            limit = tokenizer.model_max_length
            for name, prompt in zip(self.hparams.class_names, self.prompts):
                n = len(tokenizer(prompt).input_ids)
                if n > limit:
                    log.warning("The prompt of class %r (%r) has %d tokens; the text encoder keeps only %d.", name,
                                prompt, n, limit)

    @staticmethod
    def _tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    def _encode(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = [self._tokenize(tok, self.prompts).to(self.device)[labels] for tok in self.tokenizers]
        return self.family.encode(self.text_encoders, ids)

    def _encode_labels(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled embeddings or None) of each label's prompt; cached while nothing in
        the text path trains."""
        if self.hparams.train_text_encoder or self.hparams.textual_inversion:
            return self._encode(labels)
        if self._class_embeds is None or self._class_embeds[0].device != self.device:
            with torch.no_grad():
                self._class_embeds = self._encode(torch.arange(len(self.prompts), device=self.device))
        hidden, pooled = self._class_embeds
        return hidden[labels], None if pooled is None else pooled[labels]

    def _unet_pred(self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden, pooled = self._encode_labels(labels)
        _, h, w = self.hparams.image_shape
        added = self.family.added_cond(pooled, self._family_config(), int(h), int(w))
        return self.unet(noisy, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]

    def _predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction; with per-class adapters one forward per class in the batch, each with
        that class's adapter active (so each adapter learns only from its class's images)."""
        if not self.hparams.per_class_adapters:
            return self._unet_pred(noisy, timesteps, labels)
        parts, order = [], []
        try:
            for label in labels.unique().tolist():
                idx = (labels == label).nonzero().squeeze(1)
                activate_adapter([self.unet, *self.text_encoders], class_adapter_name(label))
                parts.append(self._unet_pred(noisy[idx], timesteps[idx], labels[idx]))
                order.append(idx)
        finally:
            self._restore_requires_grad()
        order = torch.cat(order)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return torch.cat(parts)[inverse]

    def _family_config(self) -> dict[str, Any]:
        hp = self.hparams
        cfg = {"family": self.family.name, "vae": self.vae_path}
        if self.family.name == "sdxl":
            cfg.update({"original_size": None if hp.original_size is None else list(hp.original_size),
                        "crops_coords_top_left": list(hp.crops_coords_top_left),
                        "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt})
        return cfg

    def _generator_config(self) -> dict[str, Any]:
        hp = self.hparams

        def lora(cfg):
            return None if cfg is None else {"rank": cfg.r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                                             "target_modules": sorted(cfg.target_modules)}

        per_class = [class_adapter_file(c) for c in range(hp.num_classes)] if hp.per_class_adapters else None
        shared = hp.lora and not hp.per_class_adapters
        return {"num_classes": hp.num_classes, "class_names": list(hp.class_names),
                "image_shape": list(hp.image_shape), "pretrained": self.pretrained, "revision": hp.revision,
                "variant": hp.variant, "cache_dir": hp.cache_dir, **self._family_config(),
                "prompts": list(self.prompts), "prompt_template": hp.prompt_template,
                "class_prompts": dict(hp.class_prompts or {}), "identifier_tokens": hp.identifier_tokens,
                "negative_prompt": hp.negative_prompt, "num_inference_steps": hp.num_inference_steps,
                "guidance_scale": hp.guidance_scale, "sample_scheduler": hp.sample_scheduler,
                "micro_batch": hp.micro_batch, "inference_dtype": hp.inference_dtype,
                "lora": {"unet": lora(self.unet_lora_config), "text_encoder": lora(self.text_lora_config)}
                if hp.lora else None,
                "lora_weights": LORA_WEIGHTS_NAME if shared else None, "class_adapters": per_class,
                "textual_inversion": ti.textual_inversion_config(self.placeholders, hp.textual_inversion_init)}

    # -- what the rest of the framework needs ------------------------------------------------------
    def to_generator(self) -> SDLoRAGenerator:
        """The generator over this module's (shared, not copied) components."""
        comps = {slot: getattr(self, slot) for slot in ("unet", "vae", *self.family.text_encoders,
                                                         *self.family.tokenizers)}
        return SDLoRAGenerator(self._generator_config(), scheduler=self.sample_scheduler,
                               autocast_dtype=self.weight_dtype, **comps)

    # -- precision ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Frozen weights to ``weight_dtype`` (from ``trainer.precision`` when ``auto``), trained ones to
        float32. SDXL's own VAE stays float32 (it overflows in float16), as in diffusers' SDXL scripts."""
        from diffusers.training_utils import cast_training_params

        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if precision in ("16-true", "bf16-true", "16", "bf16"):
            raise ConfigError(f"`trainer.precision` = {precision!r} would train the LoRA weights in half precision; "
                              "use `trainer.precision=bf16-mixed` (or 16-mixed): frozen weights in half, LoRA "
                              "in float32, as diffusers' training scripts do.")
        name = self.hparams.weight_dtype
        self.weight_dtype = _MIXED.get(precision, torch.float32) if name == "auto" else _DTYPES[name]
        vae_dtype = torch.float32 if self.family.name == "sdxl" and self.vae_path is None else self.weight_dtype
        self._restore_requires_grad()
        if self.weight_dtype != self.unet.conv_in.weight.dtype or vae_dtype != self.vae.dtype:
            with _quiet_diffusers():  # "modules that should be kept in float32: []"
                self.vae.to(dtype=vae_dtype)
                for module in (*self.text_encoders, self.unet):
                    module.to(dtype=self.weight_dtype)
        cast_training_params([self.unet, *self.text_encoders], dtype=torch.float32)
        self._class_embeds = None

    # -- training ------------------------------------------------------------------------------
    def configure_optimizers(self):
        from diffusers.optimization import get_scheduler

        hp = self.hparams
        params = dict(self.named_parameters())
        groups = [{"params": [params[n] for n in self._trainable if n.startswith(prefix)], "lr": lr, **extra}
                  for prefix, lr, extra in (
                      ("unet.", hp.lr, {}),
                      ("text_encoder", hp.lr if hp.lr_text_encoder is None else hp.lr_text_encoder, {}),
                      ("ti.", hp.textual_inversion_lr, {"weight_decay": 0.0}))]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas),
                                weight_decay=hp.weight_decay, eps=hp.eps)
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        try:
            sched = get_scheduler(hp.lr_scheduler, opt, num_warmup_steps=hp.lr_warmup_steps,
                                  num_training_steps=max_steps if max_steps and max_steps > 0 else None)
        except ValueError as e:
            raise ConfigError(f"`model.lr_scheduler` = {hp.lr_scheduler!r}: {e}") from e
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _step_generator(self) -> torch.Generator:
        """The RNG of one training batch: a function of (seed, batches seen, rank) only, so a
        resumed run draws exactly the noise an uninterrupted one would."""
        seed = np.random.SeedSequence([int(self.hparams.seed), self.batches_seen, self.global_rank])
        return torch.Generator(device=self.device).manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))

    def _loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        gamma = self.hparams.snr_gamma
        if gamma is None:
            return F.mse_loss(pred.float(), target.float(), reduction="mean")
        # Min-SNR weighting (Hang et al. 2023), as in diffusers' training scripts.
        snr = compute_snr(self.noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=float(gamma))  # min(SNR, gamma)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            weights = weights / (snr + 1)
        else:
            weights = weights / snr
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (loss * weights).mean()


    def training_step(self, batch, batch_idx):
        pixels, labels = batch
        g = self._step_generator()
        self.batches_seen += 1
        # 1. Encode the images to latents with the frozen VAE.
        with torch.no_grad():
            # the VAE's weight dtype (= vae.dtype; ModelMixin.dtype walks every submodule, ~0.3 ms a step)
            dist = self.vae.encode(pixels.to(self.vae.encoder.conv_in.weight.dtype)).latent_dist
            latents = (dist.sample(generator=g) * self.vae.config.scaling_factor).to(self.weight_dtype)
        # 2. Noise (with the optional offset) at random timesteps.
        noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
        if self.hparams.noise_offset:
            noise = noise + self.hparams.noise_offset * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=g, device=latents.device, dtype=latents.dtype)
        sched = self.noise_scheduler
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g,
                                  device=latents.device).long()
        noisy = sched.add_noise(latents, noise, timesteps)
        # 3. The regression target.
        if sched.config.prediction_type == "epsilon":
            target = noise
        elif sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            raise ConfigError(f"the scheduler of `model.pretrained` predicts {sched.config.prediction_type!r}; "
                              "set `model.prediction_type` to epsilon or v_prediction.")
        # 4. Predict the noise (or v) conditioned on each image's class prompt (SDXL: + pooled text and
        #    time ids), and regress it.
        pred = self._predict(noisy, timesteps, labels)
        loss = self._loss(pred, target, timesteps)
        self.log_interval_mean("train/loss", loss)
        return loss

    # -- checkpoints: trained weights only ---------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keys = set(self.lora_state_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint["sd_lora"] = {"batches_seen": self.batches_seen, "pretrained": self.pretrained}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        missing = [k for k in self.lora_state_keys() if k not in state]
        if missing:
            raise ConfigError(
                f"`ckpt_path`: the checkpoint lacks {len(missing)} of this model's {len(self.lora_state_keys())} "
                f"LoRA tensors (e.g. {missing[0]!r}); it was written with a different `model.lora_*` / "
                "`model.train_text_encoder` config or a different base model. Resume with the run's own config.")
        params = dict(self.named_parameters())
        for k, v in state.items():
            if k in params and tuple(v.shape) != tuple(params[k].shape):
                raise ConfigError(f"`ckpt_path`: LoRA tensor {k!r} has shape {tuple(v.shape)}, this model's has "
                                  f"{tuple(params[k].shape)}; resume with the run's own `model.lora_rank`.")
        info = checkpoint.get("sd_lora", {})
        self.batches_seen = int(info.get("batches_seen", 0))
        if info.get("pretrained") not in (None, self.pretrained):
            log.warning("Resuming LoRA weights trained on %s on top of %s.", info["pretrained"], self.pretrained)
