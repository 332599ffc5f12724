"""SD-LoRA benchmarks (prints tables; no asserts).

1. CPU, always: the tiny random Stable Diffusion of the tests (tests/tiny_sd.py, 16 px) loaded
   through ``model.pretrained``: time per optimiser step of ``SDLoRAModule`` through a real
   Lightning ``Trainer`` (digits as RGB, batch 4 and 16, with and without gradient
   checkpointing), peak RSS, and sampling time per image with ``micro_batch`` 1 (the default:
   byte-exact batch independence) vs 8.
2. CUDA, only when ``torch.cuda.is_available()``: a Stable Diffusion 1.5 *architecture*
   (UNet 860M, VAE, CLIP ViT-L text encoder) built locally from configs with random weights
   (nothing is downloaded), saved with ``save_pretrained`` and loaded back like a real base
   model; training steps/s and ``torch.cuda.max_memory_allocated`` at 512 px under
   ``bf16-mixed`` (batch 1 and 4, gradient checkpointing off/on), and 25-step sampling.

    python benchmarks/bench_sd_lora.py [--threads 1] [--train-steps 8] [--skip-gpu]
"""

from __future__ import annotations

import argparse
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

from _common import peak_rss_mib, print_table  # noqa: E402  (sets HF_HUB_OFFLINE=1)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timer_callback():
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_train_batch_start(self, *a):
            _sync()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *a):
            _sync()
            self.times.append(time.perf_counter() - self.t0)

    return StepTimer()


def train_steps(pretrained: Path, *, image_size: int, batch: int, steps: int, accelerator: str, precision: str,
                checkpointing: bool, rank: int = 4) -> tuple[float, object]:
    """Median seconds per optimiser step (warm-up steps skipped) of a fresh SDLoRAModule."""
    import pytorch_lightning as pl

    from imgaug_gen.config import compose_config
    from imgaug_gen.training import build_datamodule, build_module

    cfg = compose_config("train", [
        "model=sd_lora", f"model.pretrained={pretrained}", f"model.lora_rank={rank}",
        f"model.gradient_checkpointing={str(checkpointing).lower()}", "data=digits", "data.channels=3",
        f"data.image_size={image_size}", f"data.batch_size={batch}", "run_dir=/tmp/bench_sd_lora"])
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    timer = _timer_callback()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer], limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return statistics.median(timer.times[2:] or timer.times), module


def bench_cpu(steps: int) -> list[list]:
    from tiny_sd import build_tiny_sd

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = build_tiny_sd(Path(tmp) / "tiny_sd")
        module = None
        for batch, ckpt in ((4, False), (16, False), (16, True)):
            t, module = train_steps(pretrained, image_size=16, batch=batch, steps=steps, accelerator="cpu",
                                    precision="32-true", checkpointing=ckpt)
            n_lora = sum(p.numel() for p in module.lora_parameters())
            rows.append([f"train step, tiny SD, 16 px, batch {batch}, grad ckpt {'on' if ckpt else 'off'}",
                         f"{t * 1000:.0f} ms/step", f"{1 / t:.1f} steps/s",
                         f"{peak_rss_mib():.0f} MiB peak RSS", f"{n_lora} LoRA params"])
        gen = module.to_generator()
        labels = np.arange(16) % gen.num_classes
        for mb in (1, 8):
            gen.sample(labels[:2], seeds=0, num_inference_steps=10, micro_batch=mb)  # warm-up
            t0 = time.perf_counter()
            gen.sample(labels, seeds=0, num_inference_steps=10, micro_batch=mb)
            t = (time.perf_counter() - t0) / len(labels)
            rows.append([f"sample, tiny SD, 16 px, 10 steps, CFG, micro_batch {mb}", f"{t * 1000:.0f} ms/image",
                         f"{1 / t:.1f} images/s", "", ""])
    return rows


def build_sd15_architecture(path: Path) -> Path:
    """SD-1.5's component configs with random weights (fp16 on disk), saved with save_pretrained."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tiny_sd import TOKENIZER_DIR

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    # the tests' small BPE vocabulary padded to CLIP's 49408 ids; prompts use only the first few hundred
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler.from_config(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, clip_sample=False))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
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
            t, module = train_steps(pretrained, image_size=512, batch=batch, steps=steps, accelerator="gpu",
                                    precision="bf16-mixed", checkpointing=ckpt, rank=16)
            rows.append([f"train step, SD-1.5 arch, 512 px, batch {batch}, bf16-mixed, LoRA r16, grad ckpt "
                         f"{'on' if ckpt else 'off'}", f"{t * 1000:.0f} ms/step", f"{1 / t:.2f} steps/s",
                         f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB cuda max allocated",
                         f"{batch / t:.1f} images/s"])
        gen = module.to_generator()
        labels = np.arange(4) % gen.num_classes
        for mb in (1, 4):
            gen.sample(labels[:1], seeds=0, num_inference_steps=2, micro_batch=mb)  # warm-up
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            gen.sample(labels, seeds=0, num_inference_steps=25, micro_batch=mb)
            _sync()
            t = (time.perf_counter() - t0) / len(labels)
            rows.append([f"sample, SD-1.5 arch, 512 px, 25 PNDM steps, CFG, micro_batch {mb} (training dtypes)",
                         f"{t:.2f} s/image", f"{1 / t:.2f} images/s",
                         f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB cuda max allocated", ""])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny model's ops are too small to gain from more, and "
                        "on a shared machine two threads per op can be 100x slower; 0 = torch's choice)")
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--skip-gpu", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "lightning_fabric", "imgaug_gen"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")  # Lightning's "no validation_step" etc.: not what is measured
    t0 = time.perf_counter()
    header = ["what", "time", "rate", "memory", "note"]
    print_table(f"SD-LoRA, CPU (torch {torch.__version__}, {torch.get_num_threads()} threads)", header,
                bench_cpu(args.train_steps))
    if torch.cuda.is_available() and not args.skip_gpu:
        print_table(f"SD-LoRA, {torch.cuda.get_device_name()} (random SD-1.5 weights, no download)", header,
                    bench_gpu(max(args.train_steps, 6)))
    else:
        print("\n(no CUDA device: the 512 px SD-1.5-architecture rows are skipped)")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
