"""The checks of the ``sd_lora`` training module (:class:`~imgaug_gen.generators.sd.module.SDLoRAModule`):
its options across the typed blocks, the images against the loaded base model, the prompts against the
tokenizers, and a checkpoint's trained tensors against the model's."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from imgaug_gen.errors import ConfigError

log = logging.getLogger("imgaug_gen.generators.sd.module")  # the training module's logger, as before


def check_options(image_shape: Sequence[int], lora: Any, ti_options: Any) -> tuple[int, int]:
    """Rules across the ``model.lora`` and ``model.textual_inversion`` blocks; returns the image (height, width)."""
    c, h, w = (int(v) for v in image_shape)
    if c != 3:
        raise ConfigError(
            f"`data.channels` = {c}, but Stable Diffusion works on RGB images; set "
            "`data.channels=3` (grayscale images are then replicated to 3 channels)."
        )
    if not (lora.enabled or ti_options.enabled):
        raise ConfigError(
            "`model.lora.enabled=false` and `model.textual_inversion.enabled=false` leave nothing "
            "to train; enable LoRA adapters, a learned token per class, or both."
        )
    if not lora.enabled and (lora.per_class or lora.text_encoder):
        key = "per_class" if lora.per_class else "text_encoder"
        raise ConfigError(
            f"`model.lora.{key}=true` needs LoRA adapters, but `model.lora.enabled=false`; set "
            "`model.lora.enabled=true`."
        )
    return h, w


def check_image_size(vae: Any, unet: Any, h: int, w: int) -> None:
    """The image size: a multiple of the VAE's downscale factor, and a warning far below the UNet's native size."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if h % factor or w % factor:
        raise ConfigError(
            f"`data.image_size` = {h} is not a multiple of the VAE's downscale factor {factor}; "
            f"use e.g. `data.image_size={max(factor, h // factor * factor)}`."
        )
    native = int(unet.config.sample_size) * factor
    if h < native // 2:
        log.warning("data.image_size=%d is far below the base model's native %d px; expect poor images.", h, native)


def warn_long_prompts(tokenizers: Sequence[Any], class_names: Sequence[str], prompts: Sequence[str]) -> None:
    """A warning for each class prompt longer than a tokenizer keeps."""
    for tokenizer in tokenizers:
        limit = tokenizer.model_max_length
        for name, prompt in zip(class_names, prompts):
            n = len(tokenizer(prompt).input_ids)
            if n > limit:
                log.warning(
                    "The prompt of class %r (%r) has %d tokens; the text encoder keeps only %d.", name, prompt, n, limit
                )


def check_checkpoint_state(state: Mapping[str, Any], keys: Sequence[str], params: Mapping[str, Any]) -> None:
    """A checkpoint's ``state_dict`` holds every trained tensor (``keys``), each of the model's shape (``params``)."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise ConfigError(
            f"`ckpt_path`: the checkpoint lacks {len(missing)} of this model's {len(keys)} "
            f"LoRA tensors (e.g. {missing[0]!r}); it was written with a different `model.lora.*` config or a "
            "different base model. Resume with the run's own config."
        )
    for k, v in state.items():
        if k in params and tuple(v.shape) != tuple(params[k].shape):
            raise ConfigError(
                f"`ckpt_path`: LoRA tensor {k!r} has shape {tuple(v.shape)}, this model's has "
                f"{tuple(params[k].shape)}; resume with the run's own `model.lora.rank`."
            )
