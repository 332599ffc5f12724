"""SD-LoRA benchmarks (prints tables; no asserts).

1. CPU, always (``--skip-compare`` to leave out): the LoRA training step of ``SDLoRAModule``
   through a real Lightning ``Trainer`` vs the same step written as a plain diffusers + peft loop
   in the shape of diffusers' ``train_text_to_image_lora.py`` (SD-1.x) and
   ``train_dreambooth_lora_sdxl.py`` (SDXL), written here without imgaug_gen: components loaded
   with ``from_pretrained`` from the same tiny random pipeline folder (tests/tiny_sd.py: SD-1.x
   at 16 px, SDXL at 32 px), LoRA via ``unet.add_adapter``, AdamW + lr scheduler with
   ``conf/model/sd_lora.yaml``'s values, class prompt embeddings encoded once before the loop,
   and the same fixed list of digit batches (RGB, LoRA rank 4, ``32-true``) through
   the same ``DataLoader``. The contenders run in one process with their steps interleaved one by
   one: a callback at every Lightning batch start runs one iteration of the plain loop and one of the
   diagnostic loop below, so all three see the same seconds of machine load (on a shared machine the
   load drifts by more than the gap measured). Lightning's time per iteration runs from the end of
   that callback to its next call (Lightning's loop, its ``self.log`` of the interval's mean loss
   every ``trainer.log_every_n_steps`` = 20 steps as ``train.py`` runs it, the lr scheduler step and
   its fetch of the next batch are inside it); a plain loop's iteration is its fetch and its step.
   ``--compare-rounds`` rounds, each with fresh contenders, warm-up steps dropped; median ms/step of
   each, the ratio Lightning / plain (target <= 1.05) with a 95 % interval from resampling rounds,
   SD-1.x and SDXL side by side, at each batch size of ``--compare-batches``. The diagnostic
   contender is the same ``SDLoRAModule`` without a Trainer (its ``training_step``, backward, its own
   optimiser and lr scheduler from ``configure_optimizers``, in a plain loop): Lightning - module =
   the cost of Lightning's loop and hooks per step, module / plain = the module's own cost.
2. CPU, always (``--compare-only`` to leave out): the tiny random Stable Diffusion of the tests
   (tests/tiny_sd.py, 16 px) loaded through ``model.pretrained``: time per optimiser step of
   ``SDLoRAModule`` through a real Lightning ``Trainer`` (digits as RGB, batch 4 and 16, with
   and without gradient checkpointing), peak RSS, and sampling time per image with
   ``micro_batch`` 1 (the default: byte-exact batch independence) vs 8.
3. CUDA, only when ``torch.cuda.is_available()``: a Stable Diffusion 1.5 *architecture*
   (UNet 860M, VAE, CLIP ViT-L text encoder) built locally from configs with random weights
   (nothing is downloaded), saved with ``save_pretrained`` and loaded back like a real base
   model; training steps/s and ``torch.cuda.max_memory_allocated`` at 512 px under
   ``bf16-mixed`` (batch 1 and 4, gradient checkpointing off/on), and 25-step sampling.

    python benchmarks/bench_sd_lora.py [--threads 1] [--train-steps 8] [--skip-gpu]
        [--compare-rounds 4] [--compare-steps 20] [--compare-batches 4 16] [--skip-compare | --compare-only]
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import peak_rss_mib, print_table  # noqa: E402  (sets HF_HUB_OFFLINE=1)


@functools.cache
def _cuda() -> bool:
    return torch.cuda.is_available()  # not free without a GPU: asked once, not at every timestamp


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _timer_callback():
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        """``starts`` / ``ends``: perf_counter at every on_train_batch_start / on_train_batch_end."""

        def __init__(self):
            self.starts, self.ends = [], []

        @property
        def times(self) -> list[float]:  # training_step + backward + optimiser step
            return [e - s for s, e in zip(self.starts, self.ends)]

        @property
        def iterations(self) -> list[float]:  # one batch start to the next: everything the loop does per step
            return [b - a for a, b in zip(self.starts, self.starts[1:])]

        def on_train_batch_start(self, *a):
            _sync()
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, *a):
            _sync()
            self.ends.append(time.perf_counter())

    return StepTimer()


def _train_cfg(pretrained: Path, *, model: str, image_size: int, batch: int, checkpointing: bool, rank: int):
    from imgaug_gen.config import compose_config

    return compose_config(
        "train",
        [
            f"model={model}",
            f"model.pretrained={pretrained}",
            f"model.lora.rank={rank}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
            "data=digits",
            "data.channels=3",
            f"data.image_size={image_size}",
            f"data.batch_size={batch}",
            "run_dir=/tmp/bench_sd_lora",
        ],
    )


def lightning_run(
    pretrained: Path,
    *,
    image_size: int,
    batch: int,
    steps: int,
    accelerator: str,
    precision: str,
    checkpointing: bool,
    rank: int = 4,
    model: str = "sd_lora",
    batches: list | None = None,
    timer=None,
):
    """(timer, module) of a fresh SDLoRAModule trained ``steps`` steps through a real Trainer, on
    the datamodule's loader or, given ``batches``, on that fixed list of (pixels, labels); ``timer``:
    the timing callback (default a StepTimer)."""
    import pytorch_lightning as pl

    from imgaug_gen.jobs.train import build_datamodule, build_module

    cfg = _train_cfg(
        pretrained, model=model, image_size=image_size, batch=batch, checkpointing=checkpointing, rank=rank
    )
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    timer = timer or _timer_callback()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        log_every_n_steps=int(cfg.trainer.log_every_n_steps),  # train.py's default (20)
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    if batches is None:
        trainer.fit(module, datamodule=dm)
    else:
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return timer, module


def train_steps(
    pretrained: Path,
    *,
    image_size: int,
    batch: int,
    steps: int,
    accelerator: str,
    precision: str,
    checkpointing: bool,
    rank: int = 4,
    model: str = "sd_lora",
) -> tuple[float, object]:
    """Median seconds per optimiser step (warm-up steps skipped) of a fresh SDLoRAModule."""
    timer, module = lightning_run(
        pretrained,
        image_size=image_size,
        batch=batch,
        steps=steps,
        accelerator=accelerator,
        precision=precision,
        checkpointing=checkpointing,
        rank=rank,
        model=model,
    )
    return statistics.median(timer.times[2:] or timer.times), module


# -- the plain diffusers + peft reference loop -------------------------------------------------------
# Written the way diffusers' examples/text_to_image/train_text_to_image_lora.py and
# examples/dreambooth/train_dreambooth_lora_sdxl.py write it (minus accelerate, which adds nothing on
# one CPU process), with nothing from imgaug_gen: what a user would otherwise run by hand.
def _model_defaults() -> dict:
    """The optimiser / scheduler / prompt defaults of ``model=sd_lora`` (both loops use these)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "model" / "sd_lora.yaml")
    return {
        **{k: cfg.optim[k] for k in ("lr", "betas", "weight_decay", "eps", "lr_scheduler", "lr_warmup_steps")},
        "lora_target_modules": cfg.lora.target_modules,
        "prompt_template": cfg.prompts.template,
    }


def _plain_lora_training(unet, rank: int, num_steps: int):
    """LoRA on the UNet's attention projections (as the scripts), AdamW over the LoRA weights, lr scheduler."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    d = _model_defaults()
    unet_lora_config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
    )
    assert sorted(unet_lora_config.target_modules) == sorted(d["lora_target_modules"])
    unet.add_adapter(unet_lora_config)
    cast_training_params(unet, dtype=torch.float32)  # the trained weights in float32 (a no-op at 32-true)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        lora_layers, lr=d["lr"], betas=tuple(d["betas"]), weight_decay=d["weight_decay"], eps=d["eps"]
    )
    lr_scheduler = get_scheduler(
        d["lr_scheduler"], optimizer=optimizer, num_warmup_steps=d["lr_warmup_steps"], num_training_steps=num_steps
    )
    return optimizer, lr_scheduler


def _tokenize_prompt(tokenizer, prompt):
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _plain_step(
    unet,
    vae,
    noise_scheduler,
    optimizer,
    lr_scheduler,
    pixel_values,
    encoder_hidden_states,
    added_cond_kwargs=None,
    weight_dtype=torch.float32,
) -> float:
    """One step of the scripts' loop body: VAE encode, noise, timesteps, add_noise, UNet, MSE, step."""
    import torch.nn.functional as F

    latents = vae.encode(pixel_values.to(dtype=weight_dtype)).latent_dist.sample()
    latents = latents * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    model_pred = unet(
        noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, return_dict=False
    )[0]
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    loss.backward()
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()
    logs = {"step_loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}  # the scripts' per-step logs
    return logs["step_loss"]


def _interleaved_timer(loops: dict, batches: list):
    """A callback that runs one iteration of each plain loop in ``loops`` (name -> loop body) at every
    Lightning batch start, so all contenders' steps alternate one by one in the same seconds of
    machine load (a busy neighbour then slows all alike, instead of whichever ran in that minute).

    ``times[name]``: seconds per iteration of each plain loop (fetch from its own DataLoader over the
    same batches, then its step); ``times["lightning"]``: from the end of this hook to its next call
    (Lightning's step, backward, optimiser and scheduler steps, logging, its fetch of the next batch
    and its hooks: everything the Trainer does per iteration), the plain loops' time excluded."""
    import pytorch_lightning as pl

    class Interleaved(pl.Callback):
        def __init__(self):
            self.times = {"lightning": [], **{k: [] for k in loops}}
            self.fetch = {k: iter(torch.utils.data.DataLoader(batches, batch_size=None)) for k in loops}
            self.resumed = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync()
            now = time.perf_counter()
            if self.resumed is not None:
                self.times["lightning"].append(now - self.resumed)
            for k in list(loops) if batch_idx % 2 == 0 else list(reversed(loops)):
                t0 = time.perf_counter()
                loops[k](*next(self.fetch[k]))
                _sync()
                self.times[k].append(time.perf_counter() - t0)
            self.resumed = time.perf_counter()

    return Interleaved()


def plain_sd_lora(pretrained: Path, batches: list, class_names: list[str], *, rank: int = 4):
    """SD-1.x, train_text_to_image_lora.py's shape, set up for ``len(batches)`` steps; returns its
    loop body ``step(pixel_values, labels)``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = str(pretrained)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    optimizer, lr_scheduler = _plain_lora_training(unet, rank, len(batches))
    # The text encoder does not train, so the prompts are encoded once before the loop (the dreambooth
    # scripts' --pre_compute_text_embeddings; the module caches its class embeddings the same way):
    # one prompt per class, each batch picks its labels' rows.
    template = _model_defaults()["prompt_template"]
    prompts = [template.format(class_name=c.replace("_", " ")) for c in class_names]
    with torch.no_grad():
        prompt_embeds = text_encoder(_tokenize_prompt(tokenizer, prompts), return_dict=False)[0]
    unet.train()

    def step(pixel_values, labels):
        _plain_step(unet, vae, noise_scheduler, optimizer, lr_scheduler, pixel_values, prompt_embeds[labels])

    return step


def sdxl_encode_prompt(text_encoders, tokenizers, prompt):
    """train_dreambooth_lora_sdxl.py's encode_prompt: both encoders' penultimate hidden states
    concatenated, the pooled projection of the second."""
    prompt_embeds_list = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        out = text_encoder(_tokenize_prompt(tokenizer, prompt), output_hidden_states=True, return_dict=False)
        pooled_prompt_embeds = out[0]  # the last encoder's projection is the one kept
        prompt_embeds = out[-1][-2]  # penultimate hidden states
        bs_embed, seq_len, _ = prompt_embeds.shape
        prompt_embeds_list.append(prompt_embeds.view(bs_embed, seq_len, -1))
    return torch.concat(prompt_embeds_list, dim=-1), pooled_prompt_embeds.view(bs_embed, -1)


def plain_sdxl_lora(pretrained: Path, batches: list, class_names: list[str], *, rank: int = 4, resolution: int = 32):
    """SDXL, train_dreambooth_lora_sdxl.py's shape, set up for ``len(batches)`` steps; returns its loop
    body ``step(pixel_values, labels)``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = str(pretrained)
    tokenizer_one = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    tokenizer_two = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    text_encoder_one = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    text_encoder_two = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder_one.requires_grad_(False)
    text_encoder_two.requires_grad_(False)
    unet.requires_grad_(False)
    optimizer, lr_scheduler = _plain_lora_training(unet, rank, len(batches))

    def compute_time_ids(original_size, crops_coords_top_left):  # the script's compute_time_ids
        target_size = (resolution, resolution)
        add_time_ids = list(original_size + crops_coords_top_left + target_size)
        return torch.tensor([add_time_ids]).to(dtype=torch.float32)

    # Text encoders frozen: prompts encoded once before the loop (--pre_compute_text_embeddings), one per class.
    template = _model_defaults()["prompt_template"]
    prompts = [template.format(class_name=c.replace("_", " ")) for c in class_names]
    with torch.no_grad():
        prompt_embeds, unet_add_text_embeds = sdxl_encode_prompt(
            [text_encoder_one, text_encoder_two], [tokenizer_one, tokenizer_two], prompts
        )
    unet.train()

    def step(pixel_values, labels):
        # every image: original size = the resolution, no crop (the module's defaults)
        add_time_ids = torch.cat([compute_time_ids((resolution, resolution), (0, 0)) for _ in labels])
        unet_added_conditions = {"time_ids": add_time_ids, "text_embeds": unet_add_text_embeds[labels]}
        _plain_step(
            unet,
            vae,
            noise_scheduler,
            optimizer,
            lr_scheduler,
            pixel_values,
            prompt_embeds[labels],
            added_cond_kwargs=unet_added_conditions,
        )

    return step


def module_without_trainer(pretrained: Path, *, image_size: int, batch: int, rank: int, model: str):
    """The diagnostic contender: ``SDLoRAModule`` built as ``lightning_run`` builds it, trained in
    the plain loop without a Trainer (``training_step``, backward, the optimiser and lr scheduler
    of its ``configure_optimizers``, zero_grad); returns that loop body ``step(pixel_values, labels)``."""
    from imgaug_gen.jobs.train import build_datamodule, build_module

    cfg = _train_cfg(pretrained, model=model, image_size=image_size, batch=batch, checkpointing=False, rank=rank)
    module = build_module(cfg, build_datamodule(cfg))
    module.train()
    optimizers = module.configure_optimizers()
    optimizer, lr_scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]

    def step(pixel_values, labels):
        loss = module.training_step((pixel_values, labels), 0)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        loss.detach().item()  # as the plain loop's per-step log

    return step


def fixed_batches(*, image_size: int, batch: int, n: int) -> tuple[list, list[str]]:
    """The first ``n`` batches of the digits (RGB) datamodule's training loader, and its class names."""
    from imgaug_gen.jobs.train import build_datamodule

    cfg = _train_cfg(Path("unused"), model="sd_lora", image_size=image_size, batch=batch, checkpointing=False, rank=4)
    dm = build_datamodule(cfg)
    batches = []
    while len(batches) < n:
        for pixels, labels in dm.train_dataloader():
            batches.append((pixels, labels))
            if len(batches) == n:
                break
    return batches, list(dm.class_names)


def _ratio_ci(num: list[list[float]], den: list[list[float]], n_boot: int = 2000) -> tuple[float, float, float]:
    """median(num) / median(den) over all steps, and its 95 % interval from resampling whole rounds
    (the steps of one round share its load, so rounds, not steps, are the independent units)."""
    ratio = lambda idx: (
        statistics.median(x for i in idx for x in num[i])  # noqa: E731
        / statistics.median(x for i in idx for x in den[i])
    )
    rng = np.random.default_rng(0)
    boots = sorted(ratio(rng.integers(0, len(num), len(num))) for _ in range(n_boot))
    return ratio(range(len(num))), boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]


def bench_compare(
    steps: int, rounds: int, warmup: int = 3, batch_sizes: tuple[int, ...] = (4,), rank: int = 4
) -> list[list]:
    """Lightning SDLoRAModule vs the plain loop (and the module without a Trainer), SD-1.x and SDXL, at
    each batch size: in each of ``rounds`` rounds, fresh contenders whose steps alternate one by one."""
    from tiny_sd import build_tiny_sd, build_tiny_sdxl

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build, model, size, plain_fn in (
            ("SD-1.x", build_tiny_sd, "sd_lora", 16, plain_sd_lora),
            ("SDXL", build_tiny_sdxl, "sdxl_lora", 32, plain_sdxl_lora),
        ):
            pretrained = build(Path(tmp) / model)
            for batch in batch_sizes:
                # warm-up + timed steps + 1: Lightning's iterations are timed from one batch start to the next
                batches, class_names = fixed_batches(image_size=size, batch=batch, n=warmup + steps + 1)
                kw = {"image_size": size, "batch": batch, "rank": rank, "model": model}
                extra = {"resolution": size} if model == "sdxl_lora" else {}
                times: dict[str, list[list[float]]] = {"lightning": [], "plain": [], "module": []}
                for _ in range(rounds):
                    torch.manual_seed(0)
                    loops = {
                        "plain": plain_fn(pretrained, batches, class_names, rank=rank, **extra),
                        "module": module_without_trainer(pretrained, **kw),
                    }
                    timer, _ = lightning_run(
                        pretrained,
                        steps=len(batches),
                        accelerator="cpu",
                        precision="32-true",
                        checkpointing=False,
                        batches=batches,
                        timer=_interleaved_timer(loops, batches),
                        **kw,
                    )
                    for k, t in timer.times.items():
                        times[k].append(t[warmup : warmup + steps])
                ml, mp, mm = (statistics.median(x for r in times[k] for x in r) for k in times)
                ratio, lo, hi = _ratio_ci(times["lightning"], times["plain"])
                rows.append(
                    [
                        f"{name}, tiny, {size} px, batch {batch}, LoRA r{rank}, 32-true",
                        f"{ml * 1000:.1f}",
                        f"{mp * 1000:.1f}",
                        f"{ratio:.3f} [{lo:.3f}, {hi:.3f}]",
                        f"{'yes' if ratio <= 1.05 else 'NO'} / {'yes' if hi <= 1.05 else 'no'}",
                        f"{mm * 1000:.1f}",
                        f"{mm / mp:.3f}",
                        f"{(ml - mm) * 1000:.2f}",
                        f"{sum(map(len, times['lightning']))} each",
                    ]
                )
    return rows


def bench_cpu(steps: int) -> list[list]:
    from tiny_sd import build_tiny_sd

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = build_tiny_sd(Path(tmp) / "tiny_sd")
        module = None
        for batch, ckpt in ((4, False), (16, False), (16, True)):
            t, module = train_steps(
                pretrained,
                image_size=16,
                batch=batch,
                steps=steps,
                accelerator="cpu",
                precision="32-true",
                checkpointing=ckpt,
            )
            n_lora = sum(p.numel() for p in module.lora_parameters())
            rows.append(
                [
                    f"train step, tiny SD, 16 px, batch {batch}, grad ckpt {'on' if ckpt else 'off'}",
                    f"{t * 1000:.0f} ms/step",
                    f"{1 / t:.1f} steps/s",
                    f"{peak_rss_mib():.0f} MiB peak RSS",
                    f"{n_lora} LoRA params",
                ]
            )
        gen = module.to_generator()
        labels = np.arange(16) % gen.num_classes
        for mb in (1, 8):
            gen.sample(labels[:2], seeds=0, num_inference_steps=10, micro_batch=mb)  # warm-up
            t0 = time.perf_counter()
            gen.sample(labels, seeds=0, num_inference_steps=10, micro_batch=mb)
            t = (time.perf_counter() - t0) / len(labels)
            rows.append(
                [
                    f"sample, tiny SD, 16 px, 10 steps, CFG, micro_batch {mb}",
                    f"{t * 1000:.0f} ms/image",
                    f"{1 / t:.1f} images/s",
                    "",
                    "",
                ]
            )
    return rows


def build_sd15_architecture(path: Path) -> Path:
    """SD-1.5's component configs with random weights (fp16 on disk), saved with save_pretrained."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tiny_sd import TOKENIZER_DIR

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    # the tests' small BPE vocabulary padded to CLIP's 49408 ids; prompts use only the first few hundred
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler.from_config(
        dict(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
            clip_sample=False,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(str(path))
    return path


def bench_gpu(steps: int) -> list[list]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = build_sd15_architecture(Path(tmp) / "sd15_random")
        module = None
        for batch, ckpt in ((1, False), (4, False), (4, True)):
            del module
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t, module = train_steps(
                pretrained,
                image_size=512,
                batch=batch,
                steps=steps,
                accelerator="gpu",
                precision="bf16-mixed",
                checkpointing=ckpt,
                rank=16,
            )
            rows.append(
                [
                    f"train step, SD-1.5 arch, 512 px, batch {batch}, bf16-mixed, LoRA r16, grad ckpt "
                    f"{'on' if ckpt else 'off'}",
                    f"{t * 1000:.0f} ms/step",
                    f"{1 / t:.2f} steps/s",
                    f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB cuda max allocated",
                    f"{batch / t:.1f} images/s",
                ]
            )
        gen = module.to_generator()
        labels = np.arange(4) % gen.num_classes
        for mb in (1, 4):
            gen.sample(labels[:1], seeds=0, num_inference_steps=2, micro_batch=mb)  # warm-up
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            gen.sample(labels, seeds=0, num_inference_steps=25, micro_batch=mb)
            _sync()
            t = (time.perf_counter() - t0) / len(labels)
            rows.append(
                [
                    f"sample, SD-1.5 arch, 512 px, 25 PNDM steps, CFG, micro_batch {mb} (training dtypes)",
                    f"{t:.2f} s/image",
                    f"{1 / t:.2f} images/s",
                    f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB cuda max allocated",
                    "",
                ]
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the tiny model's ops are too small to gain from more, and "
        "on a shared machine two threads per op can be 100x slower; 0 = torch's choice)",
    )
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--skip-gpu", action="store_true")
    p.add_argument(
        "--compare-rounds",
        type=int,
        default=4,
        help="rounds of the Lightning vs plain diffusers + peft comparison (each runs both, alternating)",
    )
    p.add_argument("--compare-steps", type=int, default=20, help="timed steps per contender and round")
    p.add_argument("--compare-warmup", type=int, default=3, help="steps dropped at the start of every run")
    p.add_argument(
        "--compare-batches",
        type=int,
        nargs="+",
        default=[4, 16],
        help="batch sizes of the comparison (Lightning's loop costs the same per step at any size)",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--skip-compare", action="store_true", help="only the CPU (and GPU) tables")
    what.add_argument("--compare-only", action="store_true", help="only the Lightning vs plain comparison")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "lightning_fabric", "imgaug_gen"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")  # Lightning's "no validation_step" etc.: not what is measured
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars at every from_pretrained
    diffusers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    if not args.skip_compare:
        print_table(
            f"SD-LoRA training step, Lightning SDLoRAModule vs plain diffusers + peft loop, CPU "
            f"({torch.get_num_threads()} threads; medians over {args.compare_rounds} rounds x "
            f"{args.compare_steps} steps, the contenders' steps interleaved one by one, "
            f"{args.compare_warmup} warm-up steps dropped per round; interval: rounds resampled)",
            [
                "model, image size, batch",
                "Lightning ms/step",
                "plain ms/step",
                "ratio L/plain [95 % CI]",
                "<= 1.05: ratio / interval",
                "module, no Trainer ms",
                "module / plain",
                "Lightning - module ms",
                "steps timed",
            ],
            bench_compare(args.compare_steps, args.compare_rounds, args.compare_warmup, tuple(args.compare_batches)),
        )
        if args.compare_only:
            print(f"\ntotal {time.perf_counter() - t0:.0f} s")
            return
    header = ["what", "time", "rate", "memory", "note"]
    print_table(
        f"SD-LoRA, CPU (torch {torch.__version__}, {torch.get_num_threads()} threads)",
        header,
        bench_cpu(args.train_steps),
    )
    if torch.cuda.is_available() and not args.skip_gpu:
        print_table(
            f"SD-LoRA, {torch.cuda.get_device_name()} (random SD-1.5 weights, no download)",
            header,
            bench_gpu(max(args.train_steps, 6)),
        )
    else:
        print("\n(no CUDA device: the 512 px SD-1.5-architecture rows are skipped)")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
