"""Stable Diffusion + LoRA: the saved generator and its LightningModule.

Training recipe (as diffusers' ``train_text_to_image_lora.py`` /
``train_dreambooth_lora.py``): a pretrained Stable Diffusion (``model.pretrained``,
a folder written by ``save_pretrained`` or a Hub id in the local cache) with the VAE
and the text encoder frozen; LoRA adapters (peft ``LoraConfig``) are added to the
UNet's attention projections (and optionally to the text encoder), and only they are
trained: AdamW, epsilon- or v-prediction MSE (optionally Min-SNR weighted), optional
noise offset, gradient checkpointing, mixed precision with the frozen weights in
the half-precision ``weight_dtype`` and the LoRA weights in float32.

Each class is a prompt: ``prompt_template`` (``"a photo of a {class_name}"``),
optionally with a DreamBooth-style identifier ``{token}`` per class, or a per-class
override from ``class_prompts``. The generator records the prompt of every class
(:meth:`SDLoRAGenerator.prompt_for`).

Saved generator (``RUN/generator/``): ``config.json`` (the base model, prompts, LoRA
config) and ``pytorch_lora_weights.safetensors`` in the diffusers LoRA format, so
the folder also loads with plain diffusers::

    pipe = StableDiffusionPipeline.from_pretrained(config["pretrained"])
    pipe.load_lora_weights("RUN/generator")

Only the LoRA weights (and their optimiser state) go into the Lightning checkpoints;
the frozen base model is reloaded from ``model.pretrained`` on resume.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.base import ConditionalGenerator, register_generator
from imgaug_gen.generators.module import GeneratorModule

log = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name (load_lora_weights finds it)
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SAMPLE_KWARGS = ("num_inference_steps", "guidance_scale", "negative_prompt", "micro_batch")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_MIXED = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


# -- loading the base model --------------------------------------------------------------------
def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (checked at call time, not import time)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def _fix_hint(key: str) -> str:
    return (f"Set `{key}` to a local folder holding a Stable Diffusion pipeline saved with "
            "`StableDiffusionPipeline.save_pretrained(PATH)` (model_index.json, unet/, vae/, text_encoder/, "
            "tokenizer/, scheduler/), or pre-download the Hub model into the Hugging Face cache on a machine "
            "with internet (`hf download ID` / `huggingface-cli download ID`, then copy $HF_HOME over).")


def resolve_pretrained(pretrained: Any, revision: str | None = None, key: str = "model.pretrained",
                       cache_dir: str | None = None) -> str:
    """Check that ``pretrained`` can be loaded without network access where there is none;
    returns the absolute folder path (local) or the Hub id. Raises :class:`ConfigError`."""
    if pretrained in (None, "", "???"):
        raise ConfigError(f"`{key}` is not set; Stable Diffusion LoRA needs a base model. {_fix_hint(key)} "
                          f"Example: `{key}=/models/stable-diffusion-v1-5`.")
    value = str(pretrained)
    path = Path(value).expanduser()
    if path.is_dir():
        missing = [p for p in ("model_index.json", *COMPONENTS) if not (path / p).exists()]
        if missing:
            raise ConfigError(f"`{key}` = {value!r} is a folder but not a saved Stable Diffusion pipeline "
                              f"(missing {missing}). {_fix_hint(key)}")
        return str(path.resolve())
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
        is_repo_id = not value.startswith((".", "~")) and value.count("/") <= 1
    except ValueError:
        is_repo_id = False
    if not is_repo_id:
        raise ConfigError(f"`{key}` = {value!r}: no such folder. {_fix_hint(key)}")
    if hf_offline():
        cached = try_to_load_from_cache(value, "model_index.json", revision=revision, cache_dir=cache_dir)
        if not isinstance(cached, str):
            raise ConfigError(f"`{key}` = {value!r} is neither a local folder nor a model in the Hugging Face "
                              "cache, and HF_HUB_OFFLINE=1 forbids downloading it. " + _fix_hint(key))
    return value


@contextlib.contextmanager
def _load_errors(pretrained: str, key: str):
    """Turn a failed ``from_pretrained`` into a ConfigError naming the config key."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"`{key}` = {pretrained!r} could not be loaded as a Stable Diffusion pipeline "
                          f"({type(e).__name__}: {e}). {_fix_hint(key)}") from e


def load_components(pretrained: str, revision: str | None = None, variant: str | None = None,
                    key: str = "model.pretrained", cache_dir: str | None = None) -> dict[str, Any]:
    """Load the base model component by component (as diffusers' training scripts do):
    tokenizer, text_encoder, vae, unet, the noise scheduler (``DDPMScheduler``) and the
    sampling scheduler (the pipeline's own class), all from ``pretrained``'s subfolders."""
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = {"revision": revision, "cache_dir": cache_dir, "local_files_only": hf_offline()}
    with _load_errors(pretrained, key):
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
        sched_cfg = DDPMScheduler.load_config(pretrained, subfolder="scheduler", **kw)  # names the pipeline's class
        sched_cls = getattr(diffusers, sched_cfg.get("_class_name") or "", None) or diffusers.PNDMScheduler
        scheduler = sched_cls.from_config(sched_cfg)
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", variant=variant, **kw)
        text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", variant=variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", variant=variant, **kw)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet,
            "scheduler": scheduler, "noise_scheduler": noise_scheduler}


def scheduler_class(name: str | None, key: str = "model.sample_scheduler"):
    """The diffusers scheduler class called ``name`` (None: None); ConfigError if there is none."""
    if not name:
        return None
    import diffusers

    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ConfigError(f"`{key}` = {name!r} is not a diffusers scheduler class; use e.g. DDIMScheduler, "
                          "DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler or null (the "
                          "base model's own).")
    return cls


def swap_scheduler(scheduler, name: str | None, key: str = "model.sample_scheduler"):
    """``scheduler`` rebuilt as diffusers class ``name`` from the same config (None: unchanged)."""
    cls = scheduler_class(name, key)
    return scheduler if cls is None else cls.from_config(scheduler.config)


def _check_lr_scheduler(name: str) -> None:
    from diffusers.optimization import SchedulerType

    try:
        SchedulerType(name)
    except ValueError:
        raise ConfigError(f"`model.lr_scheduler` = {name!r}; allowed: {[t.value for t in SchedulerType]}.") from None


# -- prompts -----------------------------------------------------------------------------------
def build_prompts(class_names: Sequence[str], template: str = "a photo of a {class_name}",
                  class_prompts: Mapping[str, str] | None = None,
                  identifier_tokens: str | Sequence[str] | Mapping[str, str] | None = None,
                  humanize_class_names: bool = True) -> list[str]:
    """One prompt per class.

    ``template`` (and each ``class_prompts`` override) may use ``{class_name}`` and
    ``{token}``. ``identifier_tokens``: null; one string used for every class (a
    DreamBooth identifier such as ``"sks"``, the class name tells classes apart); a
    list with one rare token per class; or a ``{class_name: token}`` mapping.
    ``humanize_class_names`` turns ``golden_retriever`` into ``golden retriever``.
    """
    class_names = [str(c) for c in class_names]
    class_prompts = dict(class_prompts or {})
    unknown = sorted(set(class_prompts) - set(class_names))
    if unknown:
        raise ConfigError(f"`model.class_prompts` names unknown classes {unknown}; the classes are {class_names}.")
    if identifier_tokens is None:
        tokens = [None] * len(class_names)
    elif isinstance(identifier_tokens, str):
        tokens = [identifier_tokens] * len(class_names)
    elif isinstance(identifier_tokens, Mapping):
        missing = [c for c in class_names if c not in identifier_tokens]
        extra = sorted(set(identifier_tokens) - set(class_names))
        if missing or extra:
            raise ConfigError(f"`model.identifier_tokens` must map every class to a token; missing {missing}, "
                              f"unknown {extra} (classes: {class_names}).")
        tokens = [str(identifier_tokens[c]) for c in class_names]
    else:
        tokens = [str(t) for t in identifier_tokens]
        if len(tokens) != len(class_names):
            raise ConfigError(f"`model.identifier_tokens` has {len(tokens)} tokens for {len(class_names)} classes "
                              f"{class_names}; give one per class, one string for all, or null.")
    prompts = []
    for name, token in zip(class_names, tokens):
        text = class_prompts.get(name, template)
        key = f"model.class_prompts.{name}" if name in class_prompts else "model.prompt_template"
        if "{token}" in text and token is None:
            raise ConfigError(f"`{key}` = {text!r} uses {{token}} but `model.identifier_tokens` is null; set "
                              "`model.identifier_tokens=sks` (or one rare token per class), or drop {token}.")
        if token is not None and "{token}" not in text and name not in class_prompts:
            raise ConfigError(f"`model.identifier_tokens` is set but `{key}` = {text!r} has no {{token}}; use e.g. "
                              "`model.prompt_template='a photo of {token} {class_name}'`.")
        shown = name.replace("_", " ").strip() if humanize_class_names else name
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


def _adapter_name(model) -> str | None:
    cfg = getattr(model, "peft_config", None) or {}
    return next(iter(cfg), None)


def lora_state_dict(model) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """(diffusers-format LoRA weights, adapter metadata) of ``model``, or (None, None)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    name = _adapter_name(model)
    if name is None:
        return None, None
    # save_embedding_layers=False: no embedding is adapted, and "auto" would query the Hub
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=name,
                                                                   save_embedding_layers=False))
    meta = model.peft_config[name].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    return sd, meta


@contextlib.contextmanager
def _quiet_diffusers(quiet: bool = True):
    """Hide diffusers' warnings (e.g. "no LoRA keys for CLIPTextModel" when only the UNet has LoRA)."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    if quiet:
        dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


# -- the generator ---------------------------------------------------------------------------
@register_generator("sd_lora")
class SDLoRAGenerator(ConditionalGenerator):
    """Stable Diffusion with LoRA adapters behind the generator contract.

    ``sample`` runs ``StableDiffusionPipeline`` with each image's class prompt and its
    own ``torch.Generator`` seed; ``edit`` runs ``StableDiffusionImg2ImgPipeline`` on the
    same components (SDEdit at the given strength). Keyword arguments of both
    (``generate.py sample_kwargs=...``): ``num_inference_steps``, ``guidance_scale``,
    ``negative_prompt``, ``micro_batch`` (images per pipeline call; 1, the default,
    makes every image independent of its batch byte for byte; larger is faster on GPU
    but lets batch neighbours change the last bits).
    """

    supports_edit = True
    sample_kwargs = SAMPLE_KWARGS

    def __init__(self, config: dict[str, Any], *, unet, vae, text_encoder, tokenizer, scheduler,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__(config)
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.autocast_dtype = autocast_dtype

    # -- facts ------------------------------------------------------------------------------
    def prompt_for(self, label: int) -> str:
        """The text prompt that conditions images of class ``label`` (recorded in the manifest)."""
        return self.config["prompts"][int(label)]

    def pipeline(self, img2img: bool = False):
        """A diffusers pipeline over this generator's (shared) components."""
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
        pipe = cls(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                   scheduler=self.scheduler, safety_checker=None, feature_extractor=None,
                   requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- sampling ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _keep_modes(self):
        """sample()/edit() switch to eval mode and back; keep every shared submodule's own mode
        (during training the frozen VAE stays in eval mode, the LoRA UNet in train mode)."""
        modes = [(m, m.training) for m in self.modules()]
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode

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
        dev = self.device
        if self.autocast_dtype is not None and self.autocast_dtype != torch.float32 and dev.type == "cuda":
            return torch.autocast(dev.type, dtype=self.autocast_dtype)
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
        pipe = self.pipeline()
        out = []
        with self._autocast():
            for i in range(0, len(prompts), opts["micro_batch"]):
                sl = slice(i, i + opts["micro_batch"])
                images = pipe(prompt=prompts[sl], negative_prompt=self._negative(opts, prompts[sl]),
                              height=h, width=w, num_inference_steps=opts["num_inference_steps"],
                              guidance_scale=float(opts["guidance_scale"]), generator=self._generators(seeds[sl]),
                              output_type="np").images
                out.append(self._to_uint8(images))
        return np.concatenate(out)

    @staticmethod
    def _negative(opts: dict, prompts: list[str]):
        neg = opts.get("negative_prompt")
        return None if not neg else [str(neg)] * len(prompts)

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
        pipe = self.pipeline(img2img=True)
        out = np.zeros((len(prompts), h, w, 3), np.uint8)
        # The pipeline takes one strength per call: group by strength, then by micro-batch.
        groups: dict[float, list[int]] = {}
        for i, s in enumerate(strengths):
            groups.setdefault(float(s), []).append(i)
        with self._autocast():
            for strength, idx in groups.items():
                # at least one denoising step is always run (diffusers refuses int(steps * strength) == 0)
                steps = max(opts["num_inference_steps"], math.ceil(1.0 / strength))
                for j in range(0, len(idx), opts["micro_batch"]):
                    part = idx[j:j + opts["micro_batch"]]
                    res = pipe(prompt=[prompts[k] for k in part], image=x[part].to(self.device),
                               negative_prompt=self._negative(opts, part), strength=strength,
                               num_inference_steps=steps, guidance_scale=float(opts["guidance_scale"]),
                               generator=self._generators([seeds[k] for k in part]), output_type="np").images
                    out[part] = self._to_uint8(res)
        return out

    # -- persistence -------------------------------------------------------------------------
    def _save_weights(self, path: Path) -> None:
        """``pytorch_lora_weights.safetensors`` via diffusers' LoRA API (atomically)."""
        from diffusers import StableDiffusionPipeline

        unet_sd, unet_meta = lora_state_dict(self.unet)
        te_sd, te_meta = lora_state_dict(self.text_encoder)
        if unet_sd is None:
            raise RuntimeError("the UNet carries no LoRA adapter; nothing to save")
        # diffusers' LoRA writer takes a folder, not a file: write into a temp folder, then rename the file
        with tempfile.TemporaryDirectory(dir=path, prefix=".lora.") as tmp:
            StableDiffusionPipeline.save_lora_weights(
                tmp, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, safe_serialization=True,
                unet_lora_adapter_metadata=unet_meta, text_encoder_lora_adapter_metadata=te_meta)
            os.replace(Path(tmp) / LORA_WEIGHTS_NAME, path / LORA_WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu"):
        """Base pipeline from ``config["pretrained"]`` + the LoRA weights in ``path``.
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
        from diffusers import StableDiffusionPipeline

        weights = path / LORA_WEIGHTS_NAME
        if not weights.is_file():
            raise ConfigError(f"`{weights}` is missing; the generator folder is incomplete.")
        key = f"pretrained` in `{path / 'config.json'}"
        pretrained = resolve_pretrained(config.get("pretrained"), config.get("revision"), key=key,
                                        cache_dir=config.get("cache_dir"))
        with _load_errors(pretrained, key):
            pipe = StableDiffusionPipeline.from_pretrained(
                pretrained, revision=config.get("revision"), variant=config.get("variant"),
                cache_dir=config.get("cache_dir"),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                local_files_only=hf_offline())
        pipe.scheduler = swap_scheduler(pipe.scheduler, config.get("sample_scheduler"))
        with _quiet_diffusers(not (config.get("lora") or {}).get("text_encoder")):
            pipe.load_lora_weights(str(path), weight_name=LORA_WEIGHTS_NAME)
        return cls(config, unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                   tokenizer=pipe.tokenizer, scheduler=pipe.scheduler)


# -- the LightningModule ---------------------------------------------------------------------
class SDLoRAModule(GeneratorModule):
    """LoRA fine-tuning of a pretrained Stable Diffusion, one prompt per class.

    Only the LoRA weights are trainable, optimised and checkpointed. ``weight_dtype``
    (``auto``: float16 / bfloat16 under ``trainer.precision=16-mixed`` / ``bf16-mixed``,
    else float32) is the dtype of the frozen weights; LoRA weights stay float32.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str], image_shape: Sequence[int],
                 pretrained: str | None = None, revision: str | None = None, variant: str | None = None,
                 cache_dir: str | None = None,
                 prompt_template: str = "a photo of a {class_name}",
                 class_prompts: Mapping[str, str] | None = None,
                 identifier_tokens: str | Sequence[str] | Mapping[str, str] | None = None,
                 humanize_class_names: bool = True, negative_prompt: str | None = None,
                 lora_rank: int = 4, lora_alpha: float | None = None, lora_dropout: float = 0.0,
                 lora_target_modules: Sequence[str] = UNET_TARGETS, train_text_encoder: bool = False,
                 text_encoder_target_modules: Sequence[str] = TEXT_ENCODER_TARGETS,
                 lr: float = 1e-4, lr_text_encoder: float | None = None, betas: Sequence[float] = (0.9, 0.999),
                 weight_decay: float = 1e-2, eps: float = 1e-8, lr_scheduler: str = "constant",
                 lr_warmup_steps: int = 0, gradient_checkpointing: bool = False, snr_gamma: float | None = None,
                 noise_offset: float = 0.0, prediction_type: str | None = None, weight_dtype: str = "auto",
                 num_inference_steps: int = 25, guidance_scale: float = 7.5, sample_scheduler: str | None = None,
                 micro_batch: int = 1, inference_dtype: str = "auto", seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        # 1. Checks that need no model: data facts, options, prompts, the base model's location.
        c, h, w = (int(v) for v in image_shape)
        if c != 3:
            raise ConfigError(f"`data.channels` = {c}, but Stable Diffusion works on RGB images; set "
                              "`data.channels=3` (grayscale images are then replicated to 3 channels).")
        if weight_dtype != "auto" and weight_dtype not in _DTYPES:
            raise ConfigError(f"`model.weight_dtype` = {weight_dtype!r}; allowed: auto, {sorted(_DTYPES)}.")
        if snr_gamma is not None and not float(snr_gamma) > 0:
            raise ConfigError(f"`model.snr_gamma` = {snr_gamma!r}; give a positive value (5.0 is usual) or null.")
        if prediction_type not in (None, "epsilon", "v_prediction"):
            raise ConfigError(f"`model.prediction_type` = {prediction_type!r}; allowed: null (the scheduler's), "
                              "epsilon, v_prediction.")
        self.prompts = build_prompts(class_names, prompt_template, class_prompts, identifier_tokens,
                                     humanize_class_names)
        self.unet_lora_config = make_lora_config(lora_rank, lora_alpha, lora_dropout, lora_target_modules)
        self.text_lora_config = (make_lora_config(lora_rank, lora_alpha, lora_dropout, text_encoder_target_modules,
                                                  "model.text_encoder_target_modules")
                                 if train_text_encoder else None)
        scheduler_class(sample_scheduler)
        _check_lr_scheduler(lr_scheduler)
        self.pretrained = resolve_pretrained(pretrained, revision, cache_dir=cache_dir)

        # 2. Load the base model (the real from_pretrained code) and check it against the data.
        comps = load_components(self.pretrained, revision, variant, cache_dir=cache_dir)
        self.tokenizer, self.noise_scheduler = comps["tokenizer"], comps["noise_scheduler"]
        self.sample_scheduler = swap_scheduler(comps["scheduler"], sample_scheduler)
        if prediction_type is not None:
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        self.vae, self.text_encoder, self.unet = comps["vae"], comps["text_encoder"], comps["unet"]
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if h % factor or w % factor:
            raise ConfigError(f"`data.image_size` = {h} is not a multiple of the VAE's downscale factor {factor}; "
                              f"use e.g. `data.image_size={max(factor, h // factor * factor)}`.")
        native = int(self.unet.config.sample_size) * factor
        if h < native // 2:
            log.warning("data.image_size=%d is far below the base model's native %d px; expect poor images.", h,
                        native)
        self._check_prompt_lengths()

        # 3. Freeze everything, then add the trainable LoRA adapters.
        self._add_adapters(gradient_checkpointing, train_text_encoder)
        self.weight_dtype = torch.float32
        # Only the LoRA weights are checkpointed; on_load_checkpoint checks that they are all there.
        self.strict_loading = False
        self._class_embeds: torch.Tensor | None = None
        self.batches_seen = 0

    def _add_adapters(self, gradient_checkpointing: bool, train_text_encoder: bool) -> None:
        """Freeze the base model, add the LoRA adapters (float32), set train/eval modes."""
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.unet.requires_grad_(False)
        self.unet.add_adapter(self.unet_lora_config)
        if self.text_lora_config is not None:
            self.text_encoder.add_adapter(self.text_lora_config)
        from diffusers.training_utils import cast_training_params

        cast_training_params([self.unet, self.text_encoder], dtype=torch.float32)  # LoRA in fp32, always
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if train_text_encoder:
                ckpt_kwargs = {"use_reentrant": False}  # the frozen embeddings' output needs no grad
                if hasattr(self.text_encoder, "activation_checkpointing_enable"):  # transformers >= 5.x
                    self.text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
                else:
                    self.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        # Train mode only where there is something to train (from_pretrained leaves all in eval mode).
        self.unet.train()
        self.text_encoder.train(bool(train_text_encoder))
        self.vae.eval()

    # -- helpers -----------------------------------------------------------------------------
    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def lora_state_keys(self) -> list[str]:
        return [k for k, p in self.named_parameters() if p.requires_grad]

    def _check_prompt_lengths(self) -> None:
        limit = self.tokenizer.model_max_length
        for name, prompt in zip(self.hparams.class_names, self.prompts):
            n = len(self.tokenizer(prompt).input_ids)
            if n > limit:
                log.warning("The prompt of class %r (%r) has %d tokens; the text encoder keeps only %d.", name,
                            prompt, n, limit)

    def _tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def _encode_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Text-encoder hidden states of each label's prompt (cached while the encoder is frozen)."""
        if self.hparams.train_text_encoder:
            ids = self._tokenize(self.prompts).to(self.device)
            return self.text_encoder(ids[labels], return_dict=False)[0]
        if self._class_embeds is None or self._class_embeds.device != self.device:
            with torch.no_grad():
                ids = self._tokenize(self.prompts).to(self.device)
                self._class_embeds = self.text_encoder(ids, return_dict=False)[0]
        return self._class_embeds[labels]

    def _generator_config(self) -> dict[str, Any]:
        hp = self.hparams

        def lora(cfg):
            return None if cfg is None else {"rank": cfg.r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                                             "target_modules": sorted(cfg.target_modules)}

        return {"num_classes": hp.num_classes, "class_names": list(hp.class_names),
                "image_shape": list(hp.image_shape), "pretrained": self.pretrained, "revision": hp.revision,
                "variant": hp.variant, "cache_dir": hp.cache_dir, "prompts": list(self.prompts),
                "prompt_template": hp.prompt_template,
                "class_prompts": dict(hp.class_prompts or {}), "identifier_tokens": hp.identifier_tokens,
                "negative_prompt": hp.negative_prompt, "num_inference_steps": hp.num_inference_steps,
                "guidance_scale": hp.guidance_scale, "sample_scheduler": hp.sample_scheduler,
                "micro_batch": hp.micro_batch, "inference_dtype": hp.inference_dtype,
                "lora": {"unet": lora(self.unet_lora_config), "text_encoder": lora(self.text_lora_config)},
                "lora_weights": LORA_WEIGHTS_NAME}

    # -- what the rest of the framework needs ------------------------------------------------------
    def to_generator(self) -> SDLoRAGenerator:
        """The generator over this module's (shared, not copied) components."""
        gen = SDLoRAGenerator(self._generator_config(), unet=self.unet, vae=self.vae,
                              text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                              scheduler=self.sample_scheduler, autocast_dtype=self.weight_dtype)
        return gen

    # -- precision ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Frozen weights to ``weight_dtype`` (from ``trainer.precision`` when ``auto``), LoRA to float32."""
        from diffusers.training_utils import cast_training_params

        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if precision in ("16-true", "bf16-true", "16", "bf16"):
            raise ConfigError(f"`trainer.precision` = {precision!r} would train the LoRA weights in half precision; "
                              "use `trainer.precision=bf16-mixed` (or 16-mixed): frozen weights in half, LoRA "
                              "in float32, as diffusers' training scripts do.")
        name = self.hparams.weight_dtype
        self.weight_dtype = _MIXED.get(precision, torch.float32) if name == "auto" else _DTYPES[name]
        if self.weight_dtype != self.vae.dtype:  # the VAE has no LoRA: its dtype is the frozen one
            with _quiet_diffusers():  # "modules that should be kept in float32: []"
                for module in (self.vae, self.text_encoder, self.unet):
                    module.to(dtype=self.weight_dtype)
        cast_training_params([self.unet, self.text_encoder], dtype=torch.float32)
        self._class_embeds = None

    # -- training ------------------------------------------------------------------------------
    def configure_optimizers(self):
        from diffusers.optimization import get_scheduler

        hp = self.hparams
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": hp.lr}]
        if hp.train_text_encoder:
            groups.append({"params": [p for p in self.text_encoder.parameters() if p.requires_grad],
                           "lr": hp.lr if hp.lr_text_encoder is None else hp.lr_text_encoder})
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay, eps=hp.eps)
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
            dist = self.vae.encode(pixels.to(self.weight_dtype)).latent_dist
            latents = dist.sample(generator=g) * self.vae.config.scaling_factor
        # 2. Noise (with the optional offset) at random timesteps.
        noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
        if self.hparams.noise_offset:
            noise = noise + self.hparams.noise_offset * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=g, device=latents.device, dtype=latents.dtype)
        sched = self.noise_scheduler
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g,
                                  device=latents.device).long()
        noisy = sched.add_noise(latents, noise, timesteps)
        # 3. Condition on each image's class prompt.
        encoder_hidden_states = self._encode_labels(labels)
        # 4. Predict the noise (or v) and regress it.
        if sched.config.prediction_type == "epsilon":
            target = noise
        elif sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            raise ConfigError(f"the scheduler of `model.pretrained` predicts {sched.config.prediction_type!r}; "
                              "set `model.prediction_type` to epsilon or v_prediction.")
        pred = self.unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = self._loss(pred, target, timesteps)
        if self._trainer is not None:
            self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    # -- checkpoints: LoRA weights only ------------------------------------------------------------
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
