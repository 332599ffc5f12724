"""What trains when a generator starts from a prior (``model.finetune``, ``model.lora``), and the one
peft ``LoraConfig`` builder the kinds share (the ``sd_lora`` adapters are built here too)."""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from imgaug_gen.errors import ConfigError

FinetuneMode = Literal["full", "lora", "embeddings"]
FINETUNE_MODES = ("full", "lora", "embeddings")


class AdapterOptions(BaseModel):
    """``model.lora`` of the ``ddpm`` and ``cgan`` kinds: peft LoRA on the named layers, the base frozen."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1, le=1024)
    alpha: Optional[float] = Field(None, gt=0)  # null: = rank (scale 1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # e.g. [to_q, to_k, to_v, to_out.0] (attention) and/or [conv1, conv2] (convolutions)
    target_modules: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(min_length=1)


def make_lora_config(
    rank: int, alpha: float | None, dropout: float, target_modules: Sequence[str], init: Any = "gaussian"
):
    """peft ``LoraConfig``; ``init``: ``"gaussian"`` (diffusers' scripts) or ``True`` (peft's default).
    Either way B starts at 0, so the adapted network equals its base at step 0."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(rank),
        lora_alpha=float(rank if alpha is None else alpha),
        lora_dropout=float(dropout),
        init_lora_weights=init,
        target_modules=list(target_modules),
    )


def adapter_options(lora: AdapterOptions | Mapping[str, Any] | None, key: str) -> AdapterOptions:
    """``model.lora`` as :class:`AdapterOptions`, errors naming ``key.<field>``."""
    from imgaug_gen.schemas import validate

    if isinstance(lora, AdapterOptions):
        return lora
    if lora is None:
        raise ConfigError(f"`{key}` is not set; `finetune=lora` needs e.g. `{key}.target_modules=[conv1,conv2]`.")
    return validate(dict(lora), AdapterOptions, "model", prefix=key)


def apply_finetune(
    net: nn.Module,
    mode: str,
    embeddings: Sequence[nn.Parameter],
    lora: AdapterOptions | Mapping[str, Any] | None = None,
    key: str = "model",
) -> nn.Module:
    """Choose what trains in ``net`` (in place; returns it): ``full`` every weight; ``lora`` peft LoRA
    adapters on ``lora.target_modules`` with the rest frozen; ``embeddings`` nothing but the class
    rows. In every mode the class rows (``embeddings``: parameters of ``net``) train: the new classes
    live there. LoRA starts at zero (B = 0), so the adapted network equals the prior at step 0."""
    if mode not in FINETUNE_MODES:
        raise ConfigError(f"`{key}.finetune` = {mode!r}; allowed: {list(FINETUNE_MODES)}.")
    if mode == "lora":
        from peft import inject_adapter_in_model

        opts = adapter_options(lora, f"{key}.lora")
        cfg = make_lora_config(opts.rank, opts.alpha, opts.dropout, opts.target_modules, init=True)
        try:
            inject_adapter_in_model(cfg, net)
        except ValueError as e:  # no layer matched
            raise ConfigError(f"`{key}.lora.target_modules` = {opts.target_modules}: {e}") from None
    keep = {id(p) for p in embeddings}
    for name, p in net.named_parameters():
        trains = mode == "full" or id(p) in keep or (mode == "lora" and "lora_" in name)
        p.requires_grad_(trains)
    return net


def merged_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every LoRA adapter merged into its base layer and the peft layers
    replaced by the plain ones (the same function, a plain module); ``net`` itself if it has none."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in net.modules()):
        return net
    out = copy.deepcopy(net)
    for name, module in list(out.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, child, module.get_base_layer())
    return out


def trainable(net: nn.Module) -> list[nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]
