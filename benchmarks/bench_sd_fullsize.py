"""Full-size SD-1.5 and SDXL architectures with random weights: build, one LoRA step, a 2-step sample.

Nothing is downloaded: every component is built from its published ``config.json`` values
(written below) with random weights. Per family, components are built one stage at a time and
freed as soon as the stage is done, so the peak is one UNet plus small things:

1. the text encoder(s) (SD-1.5: CLIP ViT-L; SDXL: CLIP ViT-L + OpenCLIP bigG with projection):
   encode the class prompt and the empty prompt with the family's encoding
   (``imgaug_gen.generators.sd.family``: SDXL = penultimate hidden states concatenated + pooled
   projection), then freed;
2. the VAE: encode the training images to latents (kept for decoding);
3. the UNet: LoRA on the attention projections (the ``sd_lora`` kind's ``make_lora_config`` and
   targets), one AdamW step of the epsilon MSE (SDXL: with pooled embeddings and ``add_time_ids``),
   then a 2-step sample through the family's diffusers pipeline with the cached prompt embeddings
   and classifier-free guidance, decoded by the VAE.

Prints a table: parameters per component, trainable LoRA parameters, time, peak RSS (CUDA: also
``torch.cuda.max_memory_allocated``). CPU default: 64 px images (8x8 latents), float32.

    python benchmarks/bench_sd_fullsize.py [--family sd15 sdxl] [--size 64] [--threads 2]
    python benchmarks/bench_sd_fullsize.py --device cuda --size 1024 --dtype bf16 --gradient-checkpointing

``--dtype`` is the dtype of the frozen weights (LoRA weights stay float32; bf16/fp16 run the step
under autocast, as ``trainer.precision=bf16-mixed`` does); SDXL's own VAE stays float32.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from _common import peak_rss_mib, print_table  # noqa: E402  (sets HF_HUB_OFFLINE=1)

TOKENIZER_DIR = ROOT / "tests" / "assets" / "tiny_clip_tokenizer"  # small BPE vocabulary; ids < 49408

# -- published configs (config.json of runwayml/stable-diffusion-v1-5 and
#    stabilityai/stable-diffusion-xl-base-1.0; keys that are the class defaults are left out) ---------
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 * 256 + 1280 (pooled bigG)
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
)
VAE = dict(  # SD-1.5 and SDXL share the architecture; SDXL's scaling factor is 0.13025
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    act_fn="silu",
)
CLIP_VIT_L = dict(  # SD-1.5 text_encoder, SDXL text_encoder
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
)
OPENCLIP_BIGG = dict(  # SDXL text_encoder_2 (CLIPTextModelWithProjection)
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
    layer_norm_eps=1e-5,
)
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
)

ARCH = {
    "sd15": {
        "family": "sd",
        "unet": SD15_UNET,
        "vae": dict(VAE, sample_size=512, scaling_factor=0.18215),
        "encoders": [("CLIPTextModel", CLIP_VIT_L)],
        "scheduler": "PNDMScheduler",
        "sched_extra": dict(skip_prk_steps=True, set_alpha_to_one=False, clip_sample=False),
    },
    "sdxl": {
        "family": "sdxl",
        "unet": SDXL_UNET,
        "vae": dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        "encoders": [("CLIPTextModel", CLIP_VIT_L), ("CLIPTextModelWithProjection", OPENCLIP_BIGG)],
        "scheduler": "EulerDiscreteScheduler",
        "sched_extra": dict(timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False),
    },
}
_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Bench:
    def __init__(self, args):
        self.args, self.rows = args, []
        self.device = torch.device(args.device)
        self.dtype = _DT[args.dtype]

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def autocast(self):
        """Half-precision frozen weights + float32 LoRA run under autocast, as trainer.precision=bf16-mixed."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def memory(self) -> str:
        text = f"{peak_rss_mib() / 1024:.1f} GiB"
        if self.device.type == "cuda":
            text += f" (cuda {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)"
        return text

    def row(self, family, what, params=None, seconds=None, note=""):
        self.rows.append(
            [
                family,
                what,
                "" if params is None else f"{params / 1e6:,.1f} M",
                "" if seconds is None else f"{seconds:.2f} s",
                self.memory(),
                note,
            ]
        )

    @contextlib.contextmanager
    def timed(self):
        self.sync()
        t0 = time.perf_counter()
        out = {}
        yield out
        self.sync()
        out["s"] = time.perf_counter() - t0

    def build(self, family, name, factory, dtype):
        """``factory()`` on the target device, cast to ``dtype``; one table row."""
        with self.timed() as t, torch.device(self.device):
            torch.manual_seed(0)
            module = factory().to(dtype=dtype).eval().requires_grad_(False)
        self.row(
            family,
            f"build {name}",
            sum(p.numel() for p in module.parameters()),
            t["s"],
            f"random init, {str(dtype).removeprefix('torch.')}",
        )
        return module


def encode_prompts(b: Bench, name: str, spec: dict, fam, n: int):
    """Stage 1: (hidden, pooled) of the class prompt and of the empty prompt; the encoders are freed."""
    import transformers

    tok = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)
    encoders = [
        b.build(
            name,
            f"text encoder {i + 1} ({cls}, {cfg['hidden_size']} wide)",
            lambda cls=cls, cfg=cfg: getattr(transformers, cls)(
                transformers.CLIPTextConfig(
                    **cfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
                )
            ),
            b.dtype,
        )
        for i, (cls, cfg) in enumerate(spec["encoders"])
    ]

    def ids(text):
        return tok([text] * n, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(
            b.device
        )

    with b.timed() as t, torch.no_grad():
        cond = fam.encode(encoders, [ids("a photo of a golden retriever")] * len(encoders))
        uncond = fam.encode(encoders, [ids("")] * len(encoders))
    b.row(
        name,
        "encode prompt + empty prompt",
        None,
        t["s"],
        f"hidden {tuple(cond[0].shape)}" + ("" if cond[1] is None else f", pooled {tuple(cond[1].shape)}"),
    )
    del encoders
    gc.collect()
    return cond, uncond


def lora_step(b: Bench, name: str, unet, latents, cond, fam, noise_scheduler):
    """Stage 3a: LoRA on the UNet and one AdamW step of the epsilon MSE."""
    from diffusers.training_utils import cast_training_params

    from imgaug_gen.generators.finetune import make_lora_config
    from imgaug_gen.generators.sd.lora import UNET_TARGETS

    unet.add_adapter(make_lora_config(b.args.rank, b.args.rank, 0.0, UNET_TARGETS))
    cast_training_params(unet, dtype=torch.float32)
    if b.args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    b.row(
        name,
        f"LoRA r{b.args.rank} on {'/'.join(UNET_TARGETS)}",
        sum(p.numel() for p in params),
        None,
        "trainable, float32",
    )
    opt = torch.optim.AdamW(params, lr=1e-4)
    size = b.args.size
    for step in range(b.args.steps):
        g = torch.Generator(device=b.device).manual_seed(step)
        with b.timed() as t:
            noise = torch.randn(latents.shape, generator=g, device=b.device, dtype=latents.dtype)
            timesteps = torch.randint(0, 1000, (len(latents),), generator=g, device=b.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            with b.autocast():
                added = fam.added_cond(cond[1], {}, size, size)
                pred = unet(noisy, timesteps, cond[0], added_cond_kwargs=added, return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        b.row(
            name,
            f"train step {step + 1} (batch {len(latents)}, {size} px, latents {latents.shape[-1]}x{latents.shape[-1]})",
            None,
            t["s"],
            f"loss {loss.item():.3f}" + (", grad ckpt" if b.args.gradient_checkpointing else ""),
        )
    unet.eval()


def sample(b: Bench, name: str, spec: dict, fam, unet, vae, cond, uncond, scheduler):
    """Stage 3b: a 2-step sample through the family's pipeline (cached embeddings, CFG), VAE-decoded."""
    kw = {"prompt_embeds": cond[0][:1], "negative_prompt_embeds": uncond[0][:1]}
    if cond[1] is not None:
        kw.update(pooled_prompt_embeds=cond[1][:1], negative_pooled_prompt_embeds=uncond[1][:1])
    slots = {s: None for s in (*fam.text_encoders, *fam.tokenizers)}
    pipe = fam.pipeline_class()(vae=vae, unet=unet, scheduler=scheduler, **slots, **fam.pipeline_kwargs({}))
    pipe.set_progress_bar_config(disable=True)
    with b.timed() as t, torch.no_grad(), b.autocast():  # SDXL: a float32 VAE decodes half-precision latents
        image = pipe(
            height=b.args.size,
            width=b.args.size,
            num_inference_steps=2,
            guidance_scale=5.0,
            generator=torch.Generator(device=b.device).manual_seed(0),
            output_type="np",
            **kw,
        ).images
    b.row(
        name,
        f"sample: 2 {spec['scheduler']} steps, CFG, VAE decode",
        None,
        t["s"],
        f"image {tuple(image.shape[1:])}, finite {bool(torch.isfinite(torch.from_numpy(image)).all())}",
    )


def run_family(b: Bench, name: str) -> None:
    import diffusers

    from imgaug_gen.generators.sd.family import FAMILIES

    spec, n = ARCH[name], b.args.batch
    fam = FAMILIES[spec["family"]]
    cond, uncond = encode_prompts(b, name, spec, fam, n)
    # SDXL's own VAE stays float32 (it overflows in half precision), as in diffusers' SDXL scripts
    vae_dtype = torch.float32 if name == "sdxl" else b.dtype
    vae = b.build(name, "VAE (AutoencoderKL)", lambda: diffusers.AutoencoderKL(**spec["vae"]), vae_dtype)
    with b.timed() as t, torch.no_grad():
        torch.manual_seed(0)
        pixels = torch.rand(n, 3, b.args.size, b.args.size, device=b.device, dtype=vae_dtype) * 2 - 1
        latents = (vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor).to(b.dtype)
    b.row(name, "VAE encode", None, t["s"], f"latents {tuple(latents.shape)}")
    unet = b.build(name, "UNet (UNet2DConditionModel)", lambda: diffusers.UNet2DConditionModel(**spec["unet"]), b.dtype)
    sched_cfg = dict(SCHEDULER, **spec["sched_extra"])
    lora_step(b, name, unet, latents, cond, fam, diffusers.DDPMScheduler.from_config(SCHEDULER))
    sample(b, name, spec, fam, unet, vae, cond, uncond, getattr(diffusers, spec["scheduler"]).from_config(sched_cfg))
    del unet, vae
    gc.collect()
    if b.device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", nargs="+", choices=sorted(ARCH), default=["sd15", "sdxl"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=64, help="image size in px (latents: size / 8)")
    p.add_argument("--dtype", choices=sorted(_DT), default="fp32", help="dtype of the frozen weights")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="training steps (each timed)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    b = Bench(args)
    t0 = time.perf_counter()
    for name in args.family:
        run_family(b, name)
    where = torch.cuda.get_device_name() if b.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print_table(
        f"Full-size SD architectures, random weights ({where}, torch {torch.__version__}, frozen "
        f"{args.dtype}, {args.size} px)",
        ["model", "what", "parameters", "time", "peak RSS so far", "note"],
        b.rows,
    )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
