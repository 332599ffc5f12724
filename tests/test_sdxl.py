"""Stable Diffusion XL through the `sd_lora` kind (`model=sdxl_lora`) on a tiny random SDXL saved
with `StableDiffusionXLPipeline.save_pretrained` (tests/tiny_sd.py `build_tiny_sdxl`), loaded with
the real from_pretrained code: the two text encoders' encoding and the add_time_ids checked against
diffusers' own pipeline, LoRA + textual inversion through `train.py` / `generate.py` (sample and
img2img), exact resume keeping LoRA and learned embeddings, per-class adapters, a separate VAE, and
the saved files loaded with plain diffusers. Nothing is downloaded."""

from __future__ import annotations

import json
import sys

import fastcli
import numpy as np
import pytest
import torch

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.base import load_generator

from conftest import ROOT, cli_env, gen_cfg, train_killed_and_resumed, write_digit_folder
from tiny_sd import TINY_SDXL, build_tiny_sdxl, tiny_vae

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["one one", "zero", "zwei_ü"]  # sorted, as data=folder orders them
TOKENS = ["<one_one>", "<zero>", "<zwei_ü>"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/<class>/*.png: 3 classes x 4 RGB digits (class names with a space and unicode)."""
    return write_digit_folder(tmp_path_factory.mktemp("sdxl_data") / "images", CLASSES, n_per_class=4)


def overrides(pretrained, folder, run_dir, *extra: str) -> list[str]:
    samples = [] if any(e.startswith("callbacks.samples") for e in extra) else ["callbacks.samples=null"]
    return [
        *TINY_SDXL,
        f"model.pretrained={pretrained}",
        "data=folder",
        f"data.root={folder}",
        "data.shots=2",
        "callbacks.fidelity=null",
        "callbacks.checkpoint.every_n_train_steps=2",
        *samples,
        "callbacks.export.every_n_steps=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"run_dir={run_dir}",
        *extra,
    ]


def _train(pretrained, folder, run_dir, *extra: str):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import train

    return train(compose_config("train", overrides(pretrained, folder, run_dir, *extra)))


def _trained(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in zip(module.lora_state_keys(), module.lora_parameters())}


def _module(pretrained, **kw):
    from imgaug_gen.generators.sd import SDLoRAModule

    torch.manual_seed(0)
    return SDLoRAModule(
        num_classes=3,
        class_names=CLASSES,
        image_shape=[3, 32, 32],
        pretrained=str(pretrained),
        sampling={"num_inference_steps": 2, "guidance_scale": 2.0},
        **kw,
    )


def _perturb(module, scale: float = 0.3) -> None:
    """Move the trained tensors off their init (lora_B starts at 0: the adapter would be a no-op)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.lora_parameters():
            p.add_(scale * torch.randn_like(p))


def test_sdxl_encoding_and_time_ids_match_diffusers(tiny_sdxl):
    """The module's text encoding (two encoders, penultimate hidden states, pooled projection) and
    add_time_ids are what StableDiffusionXLPipeline computes for the same prompt and size."""
    from diffusers import StableDiffusionXLPipeline

    module = _module(tiny_sdxl, sdxl={"original_size": [64, 48], "crops_coords_top_left": [2, 1]})
    assert module.family.name == "sdxl" and module.text_encoder_2 is not None
    hidden, pooled = module._encode(torch.tensor([1, 2]))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    ref, _, ref_pooled, _ = pipe.encode_prompt(module.prompts[1:], device="cpu", do_classifier_free_guidance=False)
    assert hidden.shape == (2, 32, 40) and pooled.shape == (2, 12)
    assert torch.allclose(hidden, ref, atol=1e-6) and torch.allclose(pooled, ref_pooled, atol=1e-6)
    added = module.family.added_cond(pooled, module._family_config(), 32, 32)
    ref_ids = pipe._get_add_time_ids((64, 48), (2, 1), (32, 32), dtype=torch.float32, text_encoder_projection_dim=12)
    assert torch.equal(added["time_ids"], ref_ids.repeat(2, 1)) and added["text_embeds"] is pooled
    gen = module.to_generator()
    assert gen.config["family"] == "sdxl" and gen.config["original_size"] == [64, 48]


def test_sdxl_training_options_and_text_encoder_lora(tiny_sdxl, tmp_path):
    """The SD-1.x options hold for SDXL: Min-SNR, noise offset, gradient checkpointing (no gradient
    changes) and LoRA on both text encoders (saved with a text_encoder_2 part, loaded back);
    identifier tokens and per-class prompts."""
    from safetensors import safe_open

    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([0, 2])

    def grads(module):
        module.batches_seen = 0
        loss = module.training_step((x, y), 0)
        loss.backward()
        pairs = zip(module.lora_state_keys(), module.lora_parameters())
        return loss.detach(), {k: None if p.grad is None else p.grad.clone() for k, p in pairs}

    opts = dict(snr_gamma=5.0, noise_offset=0.1, lora={"text_encoder": True}, textual_inversion={"enabled": True})
    loss0, g0 = grads(_module(tiny_sdxl, **opts))
    loss1, g1 = grads(_module(tiny_sdxl, gradient_checkpointing=True, **opts))
    assert torch.isfinite(loss0) and torch.allclose(loss0, loss1) and g0.keys() == g1.keys()
    # SDXL reads text encoder 1's penultimate layer: its last layer's LoRA gets no gradient (module sets
    # ddp_find_unused_parameters for that), every other trained tensor does
    unused = {k for k, g in g0.items() if g is None}
    assert unused and all(k.startswith("text_encoder.encoder.layers.1.") for k in unused)
    assert {k for k, g in g1.items() if g is None} == unused
    g0, g1 = ({k: g for k, g in d.items() if g is not None} for d in (g0, g1))
    assert any(k.startswith("text_encoder_2.") for k in g0) and any(k.startswith("text_encoder.") for k in g0)
    assert all(torch.allclose(g0[k], g1[k], atol=1e-6) for k in g0)
    assert all(g.abs().sum() > 0 for k, g in g0.items() if "lora_B" in k or k.startswith("ti."))
    module = _module(
        tiny_sdxl,
        lora={"text_encoder": True},
        prompts={
            "template": "a photo of {token} {class_name}",
            "identifier_tokens": "sks",
            "class_prompts": {"zero": "a {token} zero digit"},
        },
    )
    assert module.prompts == ["a photo of sks one one", "a sks zero digit", "a photo of sks zwei ü"]
    _perturb(module)
    gen = module.to_generator()
    gen.save_pretrained(tmp_path / "g")
    with safe_open(str(tmp_path / "g" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "text_encoder", "text_encoder_2"}
    loaded = load_generator(tmp_path / "g")
    assert any("lora" in k for k in loaded.text_encoder_2.state_dict())
    assert np.array_equal(loaded.sample([0, 2], seeds=5), gen.sample([0, 2], seeds=5))


@pytest.fixture(scope="module")
def trained(tiny_sdxl, folder, tmp_path_factory):
    """A 4-step SDXL LoRA + textual-inversion run (sample grids on): (run_dir, metrics, objects)."""
    run_dir = tmp_path_factory.mktemp("sdxl_run")
    metrics, objects = _train(
        tiny_sdxl,
        folder,
        run_dir,
        "trainer.max_steps=4",
        "model.textual_inversion.enabled=true",
        "callbacks.samples.every_n_steps=4",
        "callbacks.samples.n_per_class=1",
    )
    return run_dir, metrics, objects


def test_lora_and_textual_inversion_train_save_and_load(trained, tiny_sdxl):
    from safetensors import safe_open

    run_dir, metrics, objects = trained
    module = objects["module"]
    assert metrics["global_step"] == 4 and np.isfinite(metrics["train/loss"])
    assert (run_dir / "samples" / "step_0000004.png").is_file()
    gdir = run_dir / "generator"
    cfg = json.loads((gdir / "config.json").read_text())
    assert cfg["family"] == "sdxl" and cfg["prompts"] == [f"a photo of a {t}" for t in TOKENS]
    assert cfg["textual_inversion"]["tokens"] == TOKENS and cfg["lora_weights"] == "pytorch_lora_weights.safetensors"
    with safe_open(str(gdir / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet"}
    # SDXL embeddings: one file per class, {clip_l: [1, 16], clip_g: [1, 24]} = the learned vectors
    for i in range(3):
        with safe_open(str(gdir / f"textual_inversion/class_{i:03d}.safetensors"), "pt") as f:
            emb = {k: f.get_tensor(k) for k in f.keys()}
        assert {k: tuple(v.shape) for k, v in emb.items()} == {"clip_l": (1, 16), "clip_g": (1, 24)}
        assert torch.equal(emb["clip_l"][0], module.ti[0].vectors[i].detach())
        assert torch.equal(emb["clip_g"][0], module.ti[1].vectors[i].detach())
    # only the placeholder vectors trained: the embedding matrices' other rows are the base model's
    from transformers import CLIPTextModel

    base = CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder").get_input_embeddings().weight
    now = module.text_encoder.get_input_embeddings().weight
    assert torch.equal(now[: len(base)], base) and not torch.equal(module.ti[0].vectors[0], now[len(base)])
    # the loaded generator (base pipeline + load_lora_weights + load_textual_inversion) reproduces the trained one
    gen = load_generator(gdir)
    assert gen.prompt_for(2) == "a photo of a <zwei_ü>" and gen.tokenizer_2.convert_tokens_to_ids("<zwei_ü>") > 0
    a = gen.sample([0, 1, 2], seeds=[5, 6, 7])
    assert a.shape == (3, 32, 32, 3) and np.array_equal(a, module.to_generator().sample([0, 1, 2], seeds=[5, 6, 7]))
    e = gen.edit(a, [0, 1, 2], strength=[0.5, 0.5, 1.0], seeds=[1, 2, 3])
    assert e.shape == a.shape and np.array_equal(e[:2], gen.edit(a[:2], [0, 1], strength=0.5, seeds=[1, 2]))


def test_saved_files_load_with_plain_diffusers(trained):
    """The generator folder is what diffusers' SDXL API reads: load_lora_weights + load_textual_inversion
    (clip_l / clip_g) on a plain StableDiffusionXLPipeline give the same images as load_generator."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    gdir = trained[0] / "generator"
    cfg = json.loads((gdir / "config.json").read_text())
    pipe = StableDiffusionXLPipeline.from_pretrained(cfg["pretrained"], add_watermarker=False)
    pipe.load_lora_weights(str(gdir))
    sd = load_file(str(gdir / "textual_inversion/class_001.safetensors"))
    pipe.load_textual_inversion(sd["clip_l"], token="<zero>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(
        sd["clip_g"], token="<zero>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=["a photo of a <zero>"],
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=[torch.Generator().manual_seed(9)],
        output_type="np",
    ).images
    ours = load_generator(gdir).sample([1], seeds=[9])
    assert np.array_equal((np.clip(out, 0, 1) * 255).round().astype(np.uint8), ours)


def test_exact_resume_keeps_lora_and_embeddings(trained, tiny_sdxl, folder, tmp_path):
    """4 steps in one go == 2 steps + resume from last.ckpt for 2 more: the same LoRA weights and learned
    embeddings, and a byte-identical generator (weights files)."""
    common = ("model.textual_inversion.enabled=true",)
    _, first = _train(tiny_sdxl, folder, tmp_path / "a", "trainer.max_steps=2", *common)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert {k for k in state["state_dict"] if k.startswith("ti.")} == {"ti.0.vectors", "ti.1.vectors"}
    assert len(state["optimizer_states"][0]["param_groups"]) == 2  # unet LoRA | embeddings (no weight decay)
    _, resumed = _train(tiny_sdxl, folder, tmp_path / "b", "trainer.max_steps=4", f"ckpt_path={ckpt}", *common)
    assert resumed["trainer"].global_step == 4 and resumed["module"].batches_seen == 4
    a, b, half = _trained(trained[2]["module"]), _trained(resumed["module"]), _trained(first["module"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["ti.0.vectors"], half["ti.0.vectors"])  # the last 2 steps did move them
    ga, gb = trained[0] / "generator", tmp_path / "b" / "generator"
    files = sorted(p.relative_to(ga).as_posix() for p in ga.rglob("*.safetensors"))
    assert len(files) == 4 and files == sorted(p.relative_to(gb).as_posix() for p in gb.rglob("*.safetensors"))
    assert [f for f in files if (ga / f).read_bytes() != (gb / f).read_bytes()] == []
    ca, cb = (json.loads((g / "config.json").read_text()) for g in (ga, gb))
    assert ca.pop("run_dir") != cb.pop("run_dir") and ca == cb  # the config differs only by the run folder


def test_per_class_adapters(tiny_sdxl, folder, tmp_path):
    """One LoRA adapter per class: a batch trains only its classes' adapters; one diffusers LoRA file per
    class; the loaded generator loads each class's adapter when it first generates that class."""
    from imgaug_gen.export import read_manifest
    from imgaug_gen.jobs.generate import generate

    run = tmp_path / "run"
    _, objects = _train(tiny_sdxl, folder, run, "model.lora.per_class=true", "data.batch_size=1", "trainer.max_steps=2")
    module = objects["module"]
    names = sorted(module.unet.peft_config)
    assert (
        names == ["class_000", "class_001", "class_002"] and len(module.lora_state_keys()) == 3 * 2 * 64
    )  # 64 projections
    moved = {n for n in names if any(v.abs().sum() > 0 for k, v in _trained(module).items() if f"B.{n}." in k)}
    assert 1 <= len(moved) <= 2  # two single-image batches: only those images' classes learned
    gdir = run / "generator"
    assert sorted(p.name for p in (gdir / "class_adapters").iterdir()) == [f"{n}.safetensors" for n in names]
    assert not (gdir / "pytorch_lora_weights.safetensors").exists()
    _perturb(module)  # every adapter different from its init (and from the others)
    gen_t = module.to_generator()
    gen_t.save_pretrained(tmp_path / "g")
    gen = load_generator(tmp_path / "g")
    assert not getattr(gen.unet, "peft_config", None)  # nothing loaded yet
    a = gen.sample([2, 0, 2], seeds=[1, 2, 3])
    assert sorted(gen.unet.peft_config) == ["class_000", "class_002"]  # loaded on first use
    assert np.array_equal(a, gen_t.sample([2, 0, 2], seeds=[1, 2, 3]))
    # the same seed under another class's adapter gives another image
    assert not np.array_equal(gen.sample([1], seeds=[1]), a[:1])
    assert module.lora_parameters()[0].requires_grad and all(p.requires_grad for p in module.lora_parameters())
    # generate.py's job, sample and img2img
    for mode in ("sample", "img2img"):
        out = tmp_path / mode
        generate(
            gen_cfg(
                run,
                out,
                f"mode={mode}",
                "n_per_class=1",
                "img2img.edits_per_image=1",
                "img2img.strengths=[0.5]",
                "include_real=false",
                "score=false",
                "device=cpu",
            )
        )
        recs = read_manifest(out)
        assert len(recs) == (3 if mode == "sample" else 6) and all(r["mode"] == mode for r in recs)


def test_separate_vae_and_family_checks(tiny_sdxl, tmp_path):
    """`model.vae=` (e.g. the fp16-fix VAE) replaces the base model's VAE in training and in the saved
    generator; SDXL's own VAE stays float32 under mixed precision; family mismatches are refused."""
    torch.manual_seed(5)
    tiny_vae(32, scaling_factor=0.13025).save_pretrained(tmp_path / "vae")
    module = _module(tiny_sdxl, vae=str(tmp_path / "vae"))
    gen = module.to_generator()
    gen.save_pretrained(tmp_path / "g")
    loaded = load_generator(tmp_path / "g")
    assert loaded.config["vae"] == str((tmp_path / "vae").resolve())
    ref = tiny_vae(32).state_dict()
    assert not torch.equal(loaded.vae.state_dict()["encoder.conv_in.weight"], ref["encoder.conv_in.weight"])
    assert torch.equal(
        loaded.vae.state_dict()["encoder.conv_in.weight"], module.vae.state_dict()["encoder.conv_in.weight"]
    )
    # mixed precision: the separate VAE follows weight_dtype, SDXL's own one stays float32
    module.hparams.weight_dtype = "bf16"
    module.setup("fit")
    assert module.vae.dtype == torch.bfloat16 and module.unet.conv_in.weight.dtype == torch.bfloat16
    own = _module(tiny_sdxl, weight_dtype="bf16")
    own.setup("fit")
    assert own.vae.dtype == torch.float32 and own.text_encoder_2.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in own.lora_parameters())
    assert own.to_generator().sample([0], seeds=[1]).shape == (1, 32, 32, 3)  # bf16 latents, float32 VAE
    with pytest.raises(ConfigError, match=r"`model.vae` = .* is a folder without config.json"):
        _module(tiny_sdxl, vae=str(tmp_path))
    with pytest.raises(
        ConfigError,
        match=r"`model.family` = 'sd' but `model.pretrained` = .* is a "
        r"StableDiffusionXLPipeline \(sdxl\)",
    ):
        _module(tiny_sdxl, family="sd")


def test_config_errors_of_the_new_options(tiny_sdxl):
    with pytest.raises(
        ConfigError,
        match=r"`model.lora.enabled=false` and `model.textual_inversion.enabled=false` "
        r"leave nothing",
    ):
        _module(tiny_sdxl, lora={"enabled": False})
    with pytest.raises(ConfigError, match=r"`model.lora.per_class=true` needs LoRA adapters"):
        _module(tiny_sdxl, lora={"enabled": False, "per_class": True}, textual_inversion={"enabled": True})
    with pytest.raises(
        ConfigError,
        match=r"`model.textual_inversion.enabled=true` puts each class's learned token .* "
        r"`model.prompts.template` = 'a photo' has none",
    ):
        _module(tiny_sdxl, textual_inversion={"enabled": True}, prompts={"template": "a photo"})
    with pytest.raises(
        ConfigError, match=r"`model.sdxl.original_size` = \[1, 2, 3\]: tuple should have at most 2 items"
    ):
        _module(tiny_sdxl, sdxl={"original_size": [1, 2, 3]})


def test_train_then_generate_cli(tiny_sdxl, folder, tmp_path):
    """python train.py model=sdxl_lora (LoRA + textual inversion) data=folder ... then one generate.py
    job that both samples and edits (mix.sources: sample + img2img): the learned tokens in the prompts."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    env = cli_env()

    def run(script, *args):
        r = fastcli.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]

    run(
        "train.py",
        *TINY_SDXL,
        f"model.pretrained={tiny_sdxl}",
        "model.textual_inversion.enabled=true",
        "data=folder",
        f"data.root={folder}",
        "data.shots=2",
        "callbacks=none",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    )
    assert (run_dir / "generator" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((run_dir / "generator" / "textual_inversion").glob("*.safetensors"))) == 3
    run(
        "generate.py",
        f"run_dir={run_dir}",
        f"out_dir={out}",
        "progress=false",
        "device=cpu",
        "include_real=false",
        "score=false",
        "n_per_class=2",
        "mix.sources=[{mode:sample,fraction:0.5},{mode:img2img,fraction:0.5}]",
        "img2img.strengths=[0.5]",
    )
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted((r["class_name"], r["mode"]) for r in records) == sorted(
        (c, m) for c in CLASSES for m in ("img2img", "sample")
    )
    for rec in records:
        assert rec["generator"]["kind"] == "sd_lora" and (out / rec["file"]).is_file()
        assert rec["prompt"] == f"a photo of a {TOKENS[CLASSES.index(rec['class_name'])]}"
        assert rec["mode"] == "sample" or (rec["strength"] == 0.5 and rec["source_id"])


# fast variants: test_exact_resume_keeps_lora_and_embeddings (SDXL), test_reliability's SIGKILL resume (train.py)
@pytest.mark.slow
def test_train_killed_with_sigkill_resumes_to_the_same_generator(tiny_sdxl, folder, tmp_path):
    """SIGKILL a real `train.py model=sdxl_lora` (LoRA + textual inversion) once it has written a
    checkpoint, resume with ckpt_path=: the generator's weight files (LoRA, both encoders' learned
    embeddings) equal the uninterrupted run's, byte for byte."""

    def cmd(run, *extra):
        over = [
            o
            for o in overrides(tiny_sdxl, folder, run, "model.textual_inversion.enabled=true", "trainer.max_steps=60")
            if not o.startswith("run_dir")
        ]
        return [sys.executable, str(ROOT / "train.py"), *over, f"hydra.run.dir={run}", *extra]

    full, killed = train_killed_and_resumed(cmd, tmp_path, first_step=2, max_steps=60)
    files = sorted(p.relative_to(full / "generator").as_posix() for p in (full / "generator").rglob("*.safetensors"))
    assert len(files) == 4  # the LoRA weights and one embedding file per class
    assert [f for f in files if (full / "generator" / f).read_bytes() != (killed / "generator" / f).read_bytes()] == []
