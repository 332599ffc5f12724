"""LoRA helpers of the ``sd_lora`` kind: peft configs, named per-class adapters, the diffusers-format
state dicts, and the one rule for the weight files a generator folder may name."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Sequence

import torch

from imgaug_gen.errors import ConfigError

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name (load_lora_weights finds it)
CLASS_ADAPTER_DIR = "class_adapters"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def class_adapter_name(label: int) -> str:
    """The peft adapter name of class ``label`` (``per_class_adapters``)."""
    return f"class_{int(label):03d}"


def class_adapter_file(label: int) -> str:
    return f"{CLASS_ADAPTER_DIR}/{class_adapter_name(label)}.safetensors"


def adapters(model) -> dict:
    return dict(getattr(model, "peft_config", None) or {})


def lora_state_dict(model, adapter_name: str | None = None) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """(diffusers-format LoRA weights, adapter metadata) of ``model``'s adapter ``adapter_name``
    (None: its first), or (None, None) when it has no such adapter."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    name = adapter_name or next(iter(adapters(model)), None)
    if model is None or name not in adapters(model):
        return None, None
    # save_embedding_layers=False: no embedding is adapted, and "auto" would query the Hub
    sd = convert_state_dict_to_diffusers(
        get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    )
    meta = model.peft_config[name].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    return sd, meta


def activate_adapter(models: Sequence[Any], name: str) -> None:
    """Make ``name`` the one active LoRA adapter of every peft layer in ``models`` (what diffusers'
    ``set_adapters`` does per layer); peft also makes only its weights require grad."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in models:
        if model is None or name not in adapters(model):
            continue
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter(name)


@contextlib.contextmanager
def quiet_diffusers(quiet: bool = True):
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


def weights_file(folder: Path, name: Any, key: str) -> Path:
    """A weight file a generator's config.json names: a relative ``.safetensors`` path inside the
    folder (never a pickled ``.bin``, never outside), present."""
    from imgaug_gen.io import confined

    where = f"`{folder / 'config.json'}`: `{key}`"
    path = confined(folder, name, where)
    if not str(name).endswith(".safetensors"):
        raise ConfigError(
            f"{where} = {name!r}: weights are read from .safetensors files only (no pickled .bin); "
            "the folder was edited or comes from an untrusted source."
        )
    if not path.is_file():
        raise ConfigError(f"`{path}` is missing; the generator folder is incomplete.")
    return path
