"""Tiny DDPM pieces for the tests: config overrides and an untrained-but-perturbed generator."""

from __future__ import annotations

import torch

# A 2-level UNet (8, 16) with attention at the lowest resolution, 10 training timesteps,
# 4 DDIM steps: a few seconds of training on 2 CPU cores.
TINY_UNET = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
TINY_DDPM = [
    "model=ddpm",
    "model.unet.block_out_channels=[8,16]",
    "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D]",
    "model.unet.up_block_types=[AttnUpBlock2D,UpBlock2D]",
    "model.train_scheduler.num_train_timesteps=10",
    "model.num_inference_steps=4",
    "model.lr_warmup_steps=2",
    "trainer.max_steps=8",
]


def make_generator():
    """3 classes, 1x16x16, built directly (no training); weights moved off their init values."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from imgaug_gen.generators.ddpm import DDPMGenerator, build_unet, unet_config

    torch.manual_seed(0)
    unet = build_unet(unet_config(3, [1, 16, 16], TINY_UNET))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    train = DDPMScheduler(num_train_timesteps=10, beta_schedule="squaredcos_cap_v2")
    sample = DDIMScheduler.from_config(train.config, timestep_spacing="trailing")
    return DDPMGenerator.from_unet(
        unet,
        num_classes=3,
        class_names=["a", "b", "c"],
        image_shape=[1, 16, 16],
        train_scheduler=train,
        sample_scheduler=sample,
        num_inference_steps=4,
        guidance_scale=2.0,
    )
