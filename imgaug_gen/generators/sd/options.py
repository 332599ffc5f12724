"""The typed blocks of the ``sd_lora`` kind's config (``model.lora.*``, ``model.optim.*``, ...).

Types, ranges and choices live here once: the config schema (``imgaug_gen.schemas.check_args``) reads them
from :class:`~imgaug_gen.generators.sd.module.SDLoRAModule`'s signature before anything is built, and the
module validates them again when it is built from Python. Rules across blocks stay in the module.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from imgaug_gen.generators.sd.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS

Name = Annotated[str, Field(min_length=1, max_length=200)]
Size = Annotated[int, Field(ge=1, le=16384)]
Offset = Annotated[int, Field(ge=0, le=16384)]


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoRAOptions(_Block):
    """``model.lora``: peft LoRA adapters on the UNet (and optionally the text encoder(s))."""

    enabled: bool = True  # false: train only the textual-inversion tokens
    rank: int = Field(4, ge=1, le=1024)
    alpha: Optional[float] = Field(None, gt=0)  # null: = rank (scale 1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[Name] = Field(default_factory=lambda: list(UNET_TARGETS), min_length=1)
    text_encoder: bool = False  # also adapt the text encoder(s)
    text_encoder_target_modules: list[Name] = Field(default_factory=lambda: list(TEXT_ENCODER_TARGETS), min_length=1)
    per_class: bool = False  # one adapter per class (DataDream), each trained on its class's images only


class TextualInversionOptions(_Block):
    """``model.textual_inversion``: a learned placeholder token per class (DA-Fusion)."""

    enabled: bool = False
    init: Optional[Name] = None  # null: the class name's words' mean embedding; or a word
    lr: float = Field(5e-4, gt=0)


class PromptOptions(_Block):
    """``model.prompts``: one prompt per class."""

    template: str = Field("a photo of a {class_name}", min_length=1)
    class_prompts: dict[str, str] = {}
    identifier_tokens: Union[None, str, list[str], dict[str, str]] = None  # DreamBooth identifiers
    humanize_class_names: bool = True  # golden_retriever -> golden retriever
    negative_prompt: Optional[str] = None


class OptimOptions(_Block):
    """``model.optim``: AdamW over the trained tensors and the learning-rate schedule."""

    lr: float = Field(1e-4, gt=0)
    lr_text_encoder: Optional[float] = Field(None, gt=0)  # null: = lr
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    weight_decay: float = Field(1e-2, ge=0)
    eps: float = Field(1e-8, gt=0)
    lr_scheduler: str = "constant"  # diffusers.optimization names
    lr_warmup_steps: int = Field(0, ge=0)

    @field_validator("lr_scheduler")
    @classmethod
    def _known(cls, v: str) -> str:
        from diffusers.optimization import SchedulerType

        allowed = [t.value for t in SchedulerType]
        if v not in allowed:
            raise ValueError(f"allowed: {allowed}")
        return v


class SamplingOptions(_Block):
    """``model.sampling``: the defaults of sample grids, validation FID and generate.py (``sample_kwargs``)."""

    num_inference_steps: int = Field(25, ge=1, le=10_000)
    guidance_scale: float = Field(7.5, ge=0, le=1000)
    scheduler: Optional[str] = None  # null: the base model's; or a diffusers scheduler class name
    micro_batch: int = Field(1, ge=1, le=4096)  # images per pipeline call; 1: every image independent of its batch
    inference_dtype: Literal["auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16"] = "auto"

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: Optional[str]) -> Optional[str]:
        from imgaug_gen.generators.schedulers import NOT_A_SCHEDULER, find_scheduler_class

        if v is not None and find_scheduler_class(v) is None:
            raise ValueError(NOT_A_SCHEDULER)
        return v


class SDXLOptions(_Block):
    """``model.sdxl``: SDXL's add_time_ids micro-conditioning (original size + crop corner + target size)."""

    original_size: Optional[tuple[Size, Size]] = None  # [height, width]; null: the image size
    crops_coords_top_left: tuple[Offset, Offset] = (0, 0)
