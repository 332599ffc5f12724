"""Stable Diffusion families: what differs between SD-1.x/2.x and SDXL, in small pieces.

The ``sd_lora`` kind trains and samples both families with one code path
(:mod:`imgaug_gen.generators.sd`); the family (read from the pretrained folder's
``model_index.json``: ``_class_name`` ``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline``) supplies only what differs:

* the components: one text encoder + tokenizer (SD) or two (SDXL: ``CLIPTextModel`` and
  ``CLIPTextModelWithProjection``), loaded from the folder's subfolders, the VAE optionally
  from a separate folder (e.g. the fp16-fix VAE users pair with SDXL);
* the text encoding: the last hidden state (SD), or the penultimate hidden states of both
  encoders concatenated plus the second encoder's pooled projection (SDXL), as diffusers'
  ``train_dreambooth_lora_sdxl.py`` ``encode_prompt`` computes them;
* the added conditioning (SDXL only): pooled text embeddings and the ``add_time_ids``
  micro-conditioning ``original_size + crops_coords_top_left + target_size``
  (:func:`compute_time_ids`, as the SDXL script's ``compute_time_ids``);
* the pipeline classes (text-to-image and img2img) and their constructor arguments;
* the LoRA file (:func:`save_lora_weights`: the family pipeline's ``save_lora_weights``, with a
  ``text_encoder_2`` part for SDXL).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.schedulers import scheduler_class

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class Family:
    """One Stable Diffusion family: its pipeline classes and component slots."""

    name: str  # "sd" | "sdxl"
    pipeline: str  # diffusers class names
    img2img: str
    text_encoders: tuple[str, ...]  # component names (= LoRA file prefixes)
    tokenizers: tuple[str, ...]
    encoder_classes: tuple[str, ...]  # transformers class of each text encoder

    def pipeline_class(self, img2img: bool = False):
        import diffusers

        return getattr(diffusers, self.img2img if img2img else self.pipeline)

    def pipeline_kwargs(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor / ``from_pretrained`` arguments besides the components."""
        if self.name == "sd":
            return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        return {
            "add_watermarker": False,
            "force_zeros_for_empty_prompt": bool(config.get("force_zeros_for_empty_prompt", True)),
        }

    def call_kwargs(self, config: Mapping[str, Any], height: int, width: int) -> dict[str, Any]:
        """Pipeline call arguments besides the prompt: SDXL's micro-conditioning (the training values)."""
        if self.name == "sd":
            return {}
        return {
            "original_size": tuple(config.get("original_size") or (height, width)),
            "crops_coords_top_left": tuple(config.get("crops_coords_top_left") or (0, 0)),
            "target_size": (height, width),
        }

    def encode(self, text_encoders: Sequence[Any], ids: Sequence[torch.Tensor]):
        """(hidden states, pooled embeddings or None) of tokenised prompts (one id tensor per encoder)."""
        if self.name == "sd":
            return text_encoders[0](ids[0], return_dict=False)[0], None
        # SDXL, as train_dreambooth_lora_sdxl.py's encode_prompt: penultimate hidden states of both
        # encoders, concatenated; the pooled output of the last one.
        hidden, pooled = [], None
        for encoder, token_ids in zip(text_encoders, ids):
            out = encoder(token_ids, output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def added_cond(
        self, pooled: torch.Tensor | None, config: Mapping[str, Any], height: int, width: int
    ) -> dict | None:
        """The UNet's ``added_cond_kwargs``: None (SD); SDXL: the pooled text embeddings and the
        ``add_time_ids`` of every image (original size, crop top-left, target size)."""
        if self.name == "sd":
            return None
        kw = self.call_kwargs(config, height, width)
        time_ids = compute_time_ids(
            kw["original_size"],
            kw["crops_coords_top_left"],
            kw["target_size"],
            len(pooled),
            device=pooled.device,
            dtype=pooled.dtype,
        )
        return {"text_embeds": pooled, "time_ids": time_ids}


SD = Family(
    "sd",
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    ("text_encoder",),
    ("tokenizer",),
    ("CLIPTextModel",),
)
SDXL = Family(
    "sdxl",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    ("text_encoder", "text_encoder_2"),
    ("tokenizer", "tokenizer_2"),
    ("CLIPTextModel", "CLIPTextModelWithProjection"),
)
FAMILIES = {"sd": SD, "sdxl": SDXL}
_PIPELINES = {
    "StableDiffusionPipeline": SD,
    "StableDiffusionImg2ImgPipeline": SD,
    "StableDiffusionXLPipeline": SDXL,
    "StableDiffusionXLImg2ImgPipeline": SDXL,
}


def compute_time_ids(
    original_size: Sequence[int],
    crops_coords_top_left: Sequence[int],
    target_size: Sequence[int],
    n: int,
    device=None,
    dtype=None,
) -> torch.Tensor:
    """SDXL's ``add_time_ids`` for ``n`` images, as ``train_dreambooth_lora_sdxl.py``'s
    ``compute_time_ids`` (adapted from ``StableDiffusionXLPipeline._get_add_time_ids``)."""
    add_time_ids = list(tuple(original_size) + tuple(crops_coords_top_left) + tuple(target_size))
    return torch.tensor([add_time_ids] * n, device=device, dtype=dtype)


# -- where the base model comes from -------------------------------------------------------------
def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (checked at call time, not import time)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def fix_hint(key: str) -> str:
    return (
        f"Set `{key}` to a local folder holding a Stable Diffusion pipeline saved with "
        "`StableDiffusionPipeline.save_pretrained(PATH)` or `StableDiffusionXLPipeline.save_pretrained(PATH)` "
        "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL also text_encoder_2/, "
        "tokenizer_2/), or pre-download the Hub model into the Hugging Face cache on a machine with internet "
        "(`hf download ID` / `huggingface-cli download ID`, then copy $HF_HOME over)."
    )


def _as_repo_id(value: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except ValueError:
        return False
    return not value.startswith((".", "~")) and value.count("/") <= 1


def resolve_pretrained(
    pretrained: Any, revision: str | None = None, key: str = "model.pretrained", cache_dir: str | None = None
) -> str:
    """Check that ``pretrained`` can be loaded without network access where there is none;
    returns the absolute folder path (local) or the Hub id. Raises :class:`ConfigError`."""
    if pretrained in (None, "", "???"):
        raise ConfigError(
            f"`{key}` is not set; Stable Diffusion LoRA needs a base model. {fix_hint(key)} "
            f"Example: `{key}=/models/stable-diffusion-v1-5`."
        )
    value = str(pretrained)
    path = Path(value).expanduser()
    if path.is_dir():
        missing = [p for p in ("model_index.json", *COMPONENTS) if not (path / p).exists()]
        if missing:
            raise ConfigError(
                f"`{key}` = {value!r} is a folder but not a saved Stable Diffusion pipeline "
                f"(missing {missing}). {fix_hint(key)}"
            )
        return str(path.resolve())
    if not _as_repo_id(value):
        raise ConfigError(f"`{key}` = {value!r}: no such folder. {fix_hint(key)}")
    if hf_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(value, "model_index.json", revision=revision, cache_dir=cache_dir)
        if not isinstance(cached, str):
            raise ConfigError(
                f"`{key}` = {value!r} is neither a local folder nor a model in the Hugging Face "
                "cache, and HF_HUB_OFFLINE=1 forbids downloading it. " + fix_hint(key)
            )
    return value


def resolve_vae(vae: Any, key: str = "model.vae", cache_dir: str | None = None) -> str | None:
    """A separate VAE: a folder written by ``AutoencoderKL.save_pretrained`` (config.json + weights) or
    a Hub id in the cache (e.g. ``madebyollin/sdxl-vae-fp16-fix``); None: the base model's own."""
    if vae in (None, ""):
        return None
    value = str(vae)
    path = Path(value).expanduser()
    hint = (
        "give a folder written by `AutoencoderKL.save_pretrained(PATH)` (config.json + "
        "diffusion_pytorch_model.safetensors), a Hub id already in the Hugging Face cache, or null "
        "(the base model's VAE)"
    )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"`{key}` = {value!r} is a folder without config.json; {hint}.")
        return str(path.resolve())
    if not _as_repo_id(value):
        raise ConfigError(f"`{key}` = {value!r}: no such folder; {hint}.")
    if hf_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(value, "config.json", cache_dir=cache_dir), str):
            raise ConfigError(
                f"`{key}` = {value!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                f"downloading it; {hint}."
            )
    return value


def _model_index(pretrained: str, revision: str | None, cache_dir: str | None) -> dict:
    path = Path(pretrained)
    if path.is_dir():
        return json.loads((path / "model_index.json").read_text())
    from huggingface_hub import hf_hub_download

    file = hf_hub_download(
        pretrained, "model_index.json", revision=revision, cache_dir=cache_dir, local_files_only=hf_offline()
    )
    return json.loads(Path(file).read_text())


def detect_family(
    pretrained: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    key: str = "model.pretrained",
    expect: str = "auto",
) -> tuple[Family, dict]:
    """(family, model_index.json) of a resolved ``pretrained``; ConfigError for another pipeline
    class, an SDXL refiner (no first text encoder), or a family other than ``expect``."""
    with load_errors(pretrained, key):
        index = _model_index(pretrained, revision, cache_dir)
    name = index.get("_class_name")
    family = _PIPELINES.get(name)
    if family is None:
        raise ConfigError(
            f"`{key}` = {pretrained!r} is a {name} pipeline; the sd_lora kind trains "
            f"{sorted(_PIPELINES)} (Stable Diffusion 1.x/2.x and SDXL base)."
        )
    missing = [c for c in (*family.text_encoders, *family.tokenizers) if (index.get(c) or [None])[0] is None]
    if missing:
        raise ConfigError(
            f"`{key}` = {pretrained!r} ({name}) has no {missing}: an SDXL refiner cannot be trained "
            "from text prompts; use the SDXL base model."
        )
    if Path(pretrained).is_dir():
        absent = [c for c in (*family.text_encoders, *family.tokenizers) if not (Path(pretrained) / c).exists()]
        if absent:
            raise ConfigError(f"`{key}` = {pretrained!r} is a {name} folder without {absent}. {fix_hint(key)}")
    if expect not in ("auto", family.name):
        raise ConfigError(
            f"`model.family` = {expect!r} but `{key}` = {pretrained!r} is a {name} ({family.name}); "
            f"set `model.family=auto` (or {family.name}), or point `{key}` at a {expect} model."
        )
    return family, index


@contextlib.contextmanager
def load_errors(pretrained: str, key: str):
    """Turn a failed ``from_pretrained`` into a ConfigError naming the config key."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"`{key}` = {pretrained!r} could not be loaded as a Stable Diffusion pipeline "
            f"({type(e).__name__}: {e}). {fix_hint(key)}"
        ) from e


def load_vae(vae: str, cache_dir: str | None = None, key: str = "model.vae", **kw):
    from diffusers import AutoencoderKL

    with load_errors(vae, key):
        return AutoencoderKL.from_pretrained(
            vae, cache_dir=cache_dir, local_files_only=hf_offline(), use_safetensors=True, **kw
        )


def load_components(
    family: Family,
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
    key: str = "model.pretrained",
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Load the base model component by component (as diffusers' training scripts do): the
    tokenizer(s), text encoder(s), vae (or the separate ``vae``), unet, the noise scheduler
    (``DDPMScheduler``) and the sampling scheduler (the pipeline's own class)."""
    import diffusers
    import transformers
    from diffusers import DDPMScheduler, UNet2DConditionModel

    kw = {"revision": revision, "cache_dir": cache_dir, "local_files_only": hf_offline()}
    comps: dict[str, Any] = {}
    with load_errors(pretrained, key):
        for slot in family.tokenizers:
            comps[slot] = transformers.CLIPTokenizer.from_pretrained(pretrained, subfolder=slot, **kw)
        comps["noise_scheduler"] = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
        sched_cfg = DDPMScheduler.load_config(pretrained, subfolder="scheduler", **kw)  # names the pipeline's class
        name = sched_cfg.get("_class_name")
        sched_cls = scheduler_class(name, f"{key}: scheduler/_class_name") if name else diffusers.PNDMScheduler
        comps["scheduler"] = sched_cls.from_config(sched_cfg)
        if vae is None:
            comps["vae"] = diffusers.AutoencoderKL.from_pretrained(
                pretrained, subfolder="vae", variant=variant, use_safetensors=True, **kw
            )
        for slot, cls_name in zip(family.text_encoders, family.encoder_classes):
            comps[slot] = getattr(transformers, cls_name).from_pretrained(
                pretrained, subfolder=slot, variant=variant, use_safetensors=True, **kw
            )
        comps["unet"] = UNet2DConditionModel.from_pretrained(
            pretrained, subfolder="unet", variant=variant, use_safetensors=True, **kw
        )
    if vae is not None:
        comps["vae"] = load_vae(vae, cache_dir)
    return comps


def save_lora_weights(
    family: Family,
    directory: str | os.PathLike,
    weight_name: str,
    layers: Mapping[str, tuple[dict | None, dict | None]],
) -> None:
    """One diffusers LoRA file from ``{component: (state dict, adapter metadata)}`` through the family
    pipeline's ``save_lora_weights`` (SD: unet + text_encoder; SDXL: + text_encoder_2)."""
    kwargs: dict[str, Any] = {}
    for slot, (sd, meta) in layers.items():
        if sd:
            kwargs[f"{slot}_lora_layers"] = sd
            kwargs[f"{slot}_lora_adapter_metadata"] = meta
    family.pipeline_class().save_lora_weights(directory, weight_name=weight_name, safe_serialization=True, **kwargs)
