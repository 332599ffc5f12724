"""A tiny random-init Stable Diffusion, saved with ``save_pretrained`` so the tests go
through the real ``from_pretrained`` loading code (nothing is downloaded).

``build_tiny_sd(path)`` follows diffusers' ``get_dummy_components``: every component is
built from a config after ``torch.manual_seed(0)``. Sizes: 16 px images, VAE scale
factor 2 (8x8 latents with 4 channels), a two-level UNet with cross-attention
(dim 16), a 2-layer CLIP text encoder (hidden 16) over the small BPE vocabulary in
``tests/assets/tiny_clip_tokenizer`` (all 256 byte symbols, so any prompt tokenizes).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_clip_tokenizer"
MAX_TOKENS = 32  # tokenizer.model_max_length == text encoder max_position_embeddings

# The SD-LoRA part of a tiny `train` override list (add data/run_dir/callbacks from conftest).
# `model.pretrained=` is appended by the caller (the tiny pipeline folder of the test session).
TINY_SD = [
    "model=sd_lora",
    "data.channels=3",
    "data.image_size=16",
    "data.batch_size=4",
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "model.sampling.num_inference_steps=3",
    "model.sampling.guidance_scale=2.0",
    "trainer.max_steps=4",
]


def build_tiny_sd(path: str | os.PathLike) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it into ``path``; returns ``path``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=MAX_TOKENS)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=(2, 4),
        norm_num_groups=4,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            layer_norm_eps=1e-5,
        )
    )
    # SD-1.x scheduler settings (scaled_linear betas, epsilon prediction); few training
    # timesteps keep the tiny model's noise levels meaningful.
    # (clip_sample is kept in the config, as in SD-1.5's scheduler_config.json, for the DDPMScheduler)
    scheduler = PNDMScheduler.from_config(
        dict(
            num_train_timesteps=100,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
            clip_sample=False,
        )
    )
    assert DDPMScheduler.from_config(scheduler.config).config.num_train_timesteps == 100
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        image_encoder=None,
    )
    pipe.save_pretrained(str(path))
    return path


# The SDXL part of a tiny `train` override list: the same kind (`model=sdxl_lora` = sd_lora with SDXL
# defaults; the family comes from the folder's model_index.json), 32 px images.
TINY_SDXL = [
    "model=sdxl_lora",
    "data.channels=3",
    "data.image_size=32",
    "data.batch_size=2",
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "model.sampling.num_inference_steps=2",
    "model.sampling.guidance_scale=2.0",
    "trainer.max_steps=2",
]


def _tiny_clip(tokenizer, cls, hidden: int, **extra):
    from transformers import CLIPTextConfig

    return cls(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            layer_norm_eps=1e-5,
            **extra,
        )
    )


def tiny_vae(sample_size: int = 32, scaling_factor: float = 0.18215):
    """A tiny AutoencoderKL (downscale factor 2), random init from the current torch seed."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def build_tiny_sdxl(path: str | os.PathLike) -> Path:
    """A tiny random SDXL, as diffusers' SDXL pipeline tests build it (``get_dummy_components``), saved
    with ``StableDiffusionXLPipeline.save_pretrained`` into ``path``; returns ``path``.

    32 px images, VAE factor 2 (16x16 latents); two CLIP text encoders of different widths
    (``CLIPTextModel`` hidden 16, ``CLIPTextModelWithProjection`` hidden 24 with projection 12), so
    the UNet's ``cross_attention_dim`` is 16 + 24 = 40 and its ``text_time`` added embedding takes
    ``6 * addition_time_embed_dim + projection_dim`` = 6 * 4 + 12 = 36 inputs.
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=MAX_TOKENS)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=MAX_TOKENS)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=36,
        cross_attention_dim=40,
        norm_num_groups=4,
    )
    torch.manual_seed(0)
    vae = tiny_vae(32, scaling_factor=0.13025)
    torch.manual_seed(0)
    text_encoder = _tiny_clip(tokenizer, CLIPTextModel, 16)
    torch.manual_seed(0)
    text_encoder_2 = _tiny_clip(tokenizer_2, CLIPTextModelWithProjection, 24, projection_dim=12)
    # SDXL's scheduler settings (Euler, scaled_linear betas, leading spacing), 100 training timesteps.
    scheduler = EulerDiscreteScheduler.from_config(
        dict(
            num_train_timesteps=100,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            steps_offset=1,
            timestep_spacing="leading",
            interpolation_type="linear",
            use_karras_sigmas=False,
        )
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(str(path))
    return path


_CACHE: dict[str, Path] = {}


def make_generator(tmp_path: str | os.PathLike | None = None):
    """A tiny SDLoRAGenerator (3 classes, 3x16x16) for the shared generator contract tests.

    The tiny pipeline is built once into ``tmp_path / "tiny_sd"`` (default: one temporary
    folder per process). The LoRA weights are moved off their zero init (``lora_B``
    starts at 0, which would make the adapter a no-op and the save/load round trip vacuous).
    """
    import tempfile

    import torch

    from imgaug_gen.generators.sd import SDLoRAModule

    if tmp_path is None:
        tmp_path = _CACHE.setdefault("dir", Path(tempfile.mkdtemp(prefix="imgaug_gen_tiny_sd_")))
    pretrained = Path(tmp_path) / "tiny_sd"
    if not (pretrained / "model_index.json").is_file():
        build_tiny_sd(pretrained)
    module = SDLoRAModule(
        num_classes=3,
        class_names=["a", "b", "c"],
        image_shape=[3, 16, 16],
        pretrained=str(pretrained),
        lora={"rank": 4, "alpha": 8},
        sampling={"num_inference_steps": 3, "guidance_scale": 2.0},
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.lora_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module.to_generator()
