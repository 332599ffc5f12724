"""Every diffusion kind trains and generates on a user image folder (RGB, odd class names)
through the same train()/generate() the front ends call: noise samples and img2img edits."""

from __future__ import annotations

import numpy as np
import pytest

from imgaug_gen.config import compose_config
from imgaug_gen.export import read_manifest
from imgaug_gen.jobs.generate import generate
from imgaug_gen.jobs.train import train

from conftest import TINY_CALLBACKS, TINY_METRICS, gen_cfg
from factories_ddpm import TINY_DDPM
from tiny_sd import TINY_SD, build_tiny_sd


@pytest.mark.parametrize("kind", ["ddpm", "sd_lora"])
def test_folder_train_sample_and_img2img(kind, tiny_folder, tmp_path):
    model = (
        [*TINY_DDPM, "model.num_inference_steps=2"]
        if kind == "ddpm"
        else [
            *TINY_SD,
            f"model.pretrained={build_tiny_sd(tmp_path / 'tiny_sd')}",
            "model.sampling.num_inference_steps=2",
        ]
    )
    run = tmp_path / "run"
    train(
        compose_config(
            "train",
            [
                *model,
                "data=folder",
                f"data.root={tiny_folder}",
                "data.image_size=16",
                "data.channels=3",
                "data.shots=4",
                "data.batch_size=4",
                "trainer.max_steps=2",
                *TINY_METRICS,
                *TINY_CALLBACKS,
                "callbacks.fidelity=null",
                "trainer.enable_progress_bar=false",
                f"run_dir={run}",
            ],
        )
    )
    classes = ["one one", "zero", "zwei_ü"]
    for mode in ("sample", "img2img"):
        out = tmp_path / mode
        generate(
            gen_cfg(
                run,
                out,
                f"mode={mode}",
                "n_per_class=2",
                "img2img.edits_per_image=1",
                "img2img.strengths=[0.5]",
                "include_real=false",
                "score=false",
            )
        )
        recs = read_manifest(out)
        assert sorted(p.name for p in (out / "train").iterdir() if p.is_dir()) == classes
        assert len(recs) == (6 if mode == "sample" else 12)  # 2 per class | one edit of each of 4 shots
        from PIL import Image

        img = np.asarray(Image.open(out / recs[0]["file"]))
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8
        if mode == "img2img":
            assert all(r["strength"] == 0.5 and r["source_id"] for r in recs)
