"""model=sd_lora on a tiny random Stable Diffusion (tests/tiny_sd.py), loaded with the real
from_pretrained code: training through the real config, the diffusers LoRA save/load format,
sampling and img2img, prompts, the training options, exact resume with the LoRA weights,
config errors, and train.py -> generate.py end to end. Nothing is downloaded."""

from __future__ import annotations

import json
import shutil
import sys

import fastcli
import numpy as np
import pytest
import torch

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.base import load_generator, per_image_seeds

from conftest import ROOT, TINY_METRICS, class_counts, cli_env
from tiny_sd import TINY_SD, build_tiny_sd

CALLBACKS = [
    "callbacks.fidelity=null",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.samples.every_n_steps=2",
    "callbacks.samples.n_per_class=1",
    "callbacks.export.every_n_steps=0",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def sd_overrides(pretrained, run_dir, *extra: str) -> list[str]:
    return [
        *TINY_SD,
        "data=digits",
        "data.shots=4",
        *CALLBACKS,
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"model.pretrained={pretrained}",
        f"run_dir={run_dir}",
        *extra,
    ]


def _train(pretrained, run_dir, *extra: str):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import train

    return train(compose_config("train", sd_overrides(pretrained, run_dir, *extra)))


def _lora(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    """A 4-step SD-LoRA run on digits (10 classes, RGB 16 px): (run_dir, metrics, objects)."""
    run_dir = tmp_path_factory.mktemp("sd_run")
    metrics, objects = _train(tiny_sd, run_dir)
    return run_dir, metrics, objects


@pytest.fixture(scope="module")
def gen(trained):
    return load_generator(trained[0] / "generator")


def test_train_writes_run_in_diffusers_lora_format(trained, gen, tiny_sd):
    from safetensors import safe_open

    from imgaug_gen.generators.sd import SDLoRAGenerator

    run_dir, metrics, objects = trained
    module = objects["module"]
    assert metrics["global_step"] == 4 and np.isfinite(metrics["train/loss"])
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]
    files = sorted(p.name for p in (run_dir / "generator").iterdir())
    assert files == ["config.json", "pytorch_lora_weights.safetensors"]
    cfg = json.loads((run_dir / "generator" / "config.json").read_text())
    assert cfg["kind"] == "sd_lora" and cfg["format_version"] == 2 and cfg["pretrained"] == str(tiny_sd.resolve())
    assert cfg["prompts"][3] == "a photo of a 3" and cfg["image_shape"] == [3, 16, 16]
    assert cfg["lora"]["unet"] == {
        "rank": 4,
        "alpha": 8.0,
        "dropout": 0.0,
        "target_modules": ["to_k", "to_out.0", "to_q", "to_v"],
    }
    assert cfg["lora"]["text_encoder"] is None and cfg["trained_steps"] == 4
    with safe_open(str(run_dir / "generator" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8.0
    # only the LoRA weights trained: lora_B moved off its zero init, the base UNet is untouched
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    assert all(v.abs().max() > 0 for k, v in _lora(module).items() if "lora_B" in k)
    sd = module.unet.state_dict()
    assert torch.equal(sd["conv_in.weight"], base["conv_in.weight"])
    assert torch.equal(
        sd["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.base_layer.weight"],
        base["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
    )
    # the loaded generator (base pipeline + load_lora_weights) reproduces the trained one exactly
    assert isinstance(gen, SDLoRAGenerator) and gen.supports_edit and gen.prompt_for(7) == "a photo of a 7"
    seeds = per_image_seeds(3, 0, 3)
    a = gen.sample([0, 5, 9], seeds=seeds)
    assert a.dtype == np.uint8 and a.shape == (3, 16, 16, 3)
    assert np.array_equal(a, module.to_generator().sample([0, 5, 9], seeds=seeds))
    assert module.unet.training and not module.vae.training  # sampling kept each module's mode


def test_checkpoint_holds_only_lora_and_its_optimizer_state(trained):
    run_dir, _, objects = trained
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    lora = _lora(objects["module"])
    assert set(ckpt["state_dict"]) == set(lora) and len(lora) == 4 * 2 * 8  # 4 projections x (A, B) x 8 attentions
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in lora.items())
    state = ckpt["optimizer_states"][0]["state"]
    assert len(state) == len(lora) and all(s["exp_avg"].abs().sum() > 0 for s in state.values())
    assert ckpt["global_step"] == 4 and ckpt["training_noise"]["batches_seen"] == 4


def test_exact_resume_restores_lora_weights(trained, tiny_sd, tmp_path):
    """4 steps in one go == 2 steps + resume from last.ckpt for 2 more: identical LoRA weights."""
    _, first = _train(tiny_sd, tmp_path / "a", "trainer.max_steps=2", "callbacks.samples=null")
    _, resumed = _train(
        tiny_sd, tmp_path / "b", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}", "callbacks.samples=null"
    )
    assert resumed["trainer"].global_step == 4 and resumed["module"].batches_seen == 4
    a, b, half = _lora(trained[2]["module"]), _lora(resumed["module"]), _lora(first["module"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], half[k]) for k in a)  # the last 2 steps did move the weights
    # a checkpoint without (some of) the LoRA weights is refused, not silently resumed from the init
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["state_dict"].pop(next(iter(ckpt["state_dict"])))
    torch.save(ckpt, tmp_path / "partial.ckpt")
    with pytest.raises(ConfigError, match=r"`ckpt_path`: the checkpoint lacks 1 of this model's 64 LoRA tensors"):
        _train(tiny_sd, tmp_path / "d", f"ckpt_path={tmp_path / 'partial.ckpt'}", "callbacks.samples=null")
    # a checkpoint of another LoRA shape is refused with the fix
    with pytest.raises(
        ConfigError,
        match=r"`ckpt_path`: LoRA tensor .* has shape \(4, 8\), this model's has "
        r"\(8, 8\); resume with the run's own `model.lora.rank`",
    ):
        _train(
            tiny_sd,
            tmp_path / "c",
            f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
            "model.lora.rank=8",
            "callbacks.samples=null",
        )


def test_sample_and_img2img_per_image(gen):
    seeds = per_image_seeds(11, 0, 4)
    labels = [0, 1, 2, 0]
    a = gen.sample(labels, seeds=seeds, batch_size=4)
    assert np.array_equal(a[1:3], gen.sample(labels[1:3], seeds=seeds[1:3], batch_size=1))
    assert np.array_equal(a, gen.sample(labels, seeds=seeds, micro_batch=4))  # batched calls agree on CPU
    assert not np.array_equal(a, gen.sample(labels, seeds=seeds, guidance_scale=5.0))
    e = gen.edit(a, labels, strength=[0.25, 0.5, 1.0, 0.5], seeds=seeds, batch_size=4)
    assert e.shape == a.shape and e.dtype == np.uint8
    assert np.array_equal(e[1:3], gen.edit(a[1:3], labels[1:3], strength=[0.5, 1.0], seeds=seeds[1:3]))
    # weak edits stay closer to the source than strong ones
    d = np.abs(e.astype(int) - a).mean(axis=(1, 2, 3))
    assert d[0] < d[2]
    # grayscale or off-size images are converted to the model's RGB size
    gray = gen.edit(a[:1, :8, :8, :1], [0], strength=0.5, seeds=[1])
    assert gray.shape == (1, 16, 16, 3)
    with pytest.raises(ConfigError, match=r"`sample_kwargs` has unknown keys \['steps'\]"):
        gen.sample([0], steps=3)
    with pytest.raises(ConfigError, match=r"`sample_kwargs.num_inference_steps` = 0; give an integer >= 1"):
        gen.edit(a[:1], [0], num_inference_steps=0)
    with pytest.raises(ConfigError, match=r"`sample_kwargs.guidance_scale` = -1"):
        gen.sample([0], guidance_scale=-1)


def test_training_step_feeds_the_vae_its_weight_dtype(tiny_sd):
    """The training step casts the pixels to the VAE's weight dtype (read off its first conv, not
    through ``ModelMixin.dtype``'s walk over every submodule): float32 by default, bfloat16 with
    ``weight_dtype=bf16``; the loss stays finite and float32."""
    from imgaug_gen.generators.sd import SDLoRAModule

    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 2])
    for weight_dtype, expected in (("auto", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        module = SDLoRAModule(
            num_classes=3,
            class_names=["a", "b", "c"],
            image_shape=[3, 16, 16],
            pretrained=str(tiny_sd),
            sampling={"num_inference_steps": 2},
            weight_dtype=weight_dtype,
        )
        module.setup("fit")
        seen = []
        module.vae.encoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        loss = module.training_step((x, y), 0)
        assert module.vae.dtype == module.vae.encoder.conv_in.weight.dtype == expected
        assert seen == [expected] and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_prompts():
    from imgaug_gen.generators.sd.prompts import build_prompts

    names = ["golden_retriever", "cat"]
    assert build_prompts(names) == ["a photo of a golden retriever", "a photo of a cat"]
    assert build_prompts(names, class_prompts={"cat": "a {class_name} on a sofa"}) == [
        "a photo of a golden retriever",
        "a cat on a sofa",
    ]
    tpl = "a photo of {token} {class_name}"
    assert build_prompts(names, tpl, identifier_tokens="sks") == [
        "a photo of sks golden retriever",
        "a photo of sks cat",
    ]
    assert build_prompts(names, tpl, identifier_tokens=["sks", "ohwx"], humanize_class_names=False) == [
        "a photo of sks golden_retriever",
        "a photo of ohwx cat",
    ]
    assert (
        build_prompts(names, tpl, identifier_tokens={"cat": "zwx", "golden_retriever": "sks"})[1]
        == "a photo of zwx cat"
    )
    with pytest.raises(ConfigError, match=r"`model.prompts.class_prompts` names unknown classes \['dog'\]"):
        build_prompts(names, class_prompts={"dog": "x"})
    with pytest.raises(ConfigError, match="`model.prompts.identifier_tokens` has 1 tokens for 2 classes"):
        build_prompts(names, tpl, identifier_tokens=["sks"])
    with pytest.raises(
        ConfigError,
        match=r"`model.prompts.template` = .* uses \{token\} but "
        "`model.prompts.identifier_tokens` is null",
    ):
        build_prompts(names, tpl)
    with pytest.raises(ConfigError, match=r"`model.prompts.identifier_tokens` is set but `model.prompts.template`"):
        build_prompts(names, identifier_tokens="sks")
    with pytest.raises(ConfigError, match=r"`model.prompts.template` = 'a \{kind\}' is not a valid template"):
        build_prompts(names, "a {kind}")


def test_training_options_and_text_encoder_lora(tiny_sd, tmp_path):
    """Min-SNR, noise offset, v-prediction, gradient checkpointing and text-encoder LoRA train;
    checkpointing changes no gradient; a text-encoder LoRA survives save/load."""
    from imgaug_gen.generators.sd import SDLoRAModule

    def build(**kw):
        torch.manual_seed(0)
        return SDLoRAModule(
            num_classes=3,
            class_names=["a", "b", "c"],
            image_shape=[3, 16, 16],
            pretrained=str(tiny_sd),
            sampling={"num_inference_steps": 2},
            **kw,
        )

    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 2])

    def grads(module):
        module.batches_seen = 0
        loss = module.training_step((x, y), 0)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in module.named_parameters() if p.requires_grad}

    loss0, g0 = grads(build(snr_gamma=5.0, noise_offset=0.1, lora={"text_encoder": True}))
    loss1, g1 = grads(build(snr_gamma=5.0, noise_offset=0.1, lora={"text_encoder": True}, gradient_checkpointing=True))
    assert torch.isfinite(loss0) and torch.allclose(loss0, loss1)
    assert g0.keys() == g1.keys() and any("text_encoder" in k for k in g0)
    assert all(torch.allclose(g0[k], g1[k], atol=1e-6) for k in g0)
    assert all(g.abs().sum() > 0 for k, g in g0.items() if "lora_B" in k)  # lora_B starts at 0, so A's grads are 0
    loss_v, _ = grads(build(prediction_type="v_prediction"))
    assert torch.isfinite(loss_v) and not torch.allclose(loss_v, loss0)

    module = build(lora={"text_encoder": True})
    with torch.no_grad():
        for p in module.lora_parameters():
            p.add_(0.3 * torch.randn_like(p))
    gen = module.to_generator()
    gen.save_pretrained(tmp_path / "g")
    assert json.loads((tmp_path / "g" / "config.json").read_text())["lora"]["text_encoder"]["rank"] == 4
    loaded = load_generator(tmp_path / "g")
    assert any("lora" in k for k in loaded.text_encoder.state_dict())
    assert np.array_equal(loaded.sample([0, 2], seeds=5), gen.sample([0, 2], seeds=5))


def test_config_errors(tiny_sd, tmp_path):
    from hydra.errors import InstantiationException

    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import train

    def run(*extra):
        over = [o for o in sd_overrides(tiny_sd, tmp_path / "r") if not o.startswith("model.pretrained")]
        try:
            return train(compose_config("train", [*over, *extra]))
        except InstantiationException as e:  # until training.build_module unwraps Hydra's wrapper itself
            if isinstance(e.__cause__, ConfigError):
                raise e.__cause__ from None
            raise

    with pytest.raises(ConfigError, match=r"`model.pretrained` is not set.*save_pretrained.*pre-download"):
        run()
    with pytest.raises(
        ConfigError,
        match=r"`model.pretrained` = '/nowhere/sd': no such folder\. Set "
        r"`model.pretrained` to a local folder .*save_pretrained",
    ):
        run("model.pretrained=/nowhere/sd")
    with pytest.raises(
        ConfigError,
        match=r"`model.pretrained` = 'someone/not-cached-sd' is neither a local folder "
        r"nor a model in the Hugging Face cache.*HF_HUB_OFFLINE=1.*hf download",
    ):
        run("model.pretrained=someone/not-cached-sd")
    with pytest.raises(
        ConfigError,
        match=r"`model.pretrained` = .* is a folder but not a saved Stable Diffusion "
        r"pipeline \(missing \['model_index.json'",
    ):
        run(f"model.pretrained={tmp_path}")
    with pytest.raises(
        ConfigError,
        match=r"`data.channels` = 1, but Stable Diffusion works on RGB images; set "
        r"`data.channels=3`",
    ):
        run(f"model.pretrained={tiny_sd}", "data.channels=1")
    with pytest.raises(
        ConfigError,
        match=r"`data.image_size` = 17 is not a multiple of the VAE's downscale "
        r"factor 2; use e.g. `data.image_size=16`",
    ):
        run(f"model.pretrained={tiny_sd}", "data.image_size=17")
    with pytest.raises(ConfigError, match=r"`trainer.precision` = '16-true' would train the LoRA weights in half"):
        run(f"model.pretrained={tiny_sd}", "trainer.precision=16-true")
    with pytest.raises(ConfigError, match=r"`model.sampling.scheduler` = 'Nope'.* not a diffusers scheduler"):
        run(f"model.pretrained={tiny_sd}", "model.sampling.scheduler=Nope")
    with pytest.raises(ConfigError, match=r"`model.optim.lr_scheduler` = 'fast': allowed: \['linear', 'cosine'"):
        run(f"model.pretrained={tiny_sd}", "model.optim.lr_scheduler=fast")
    with pytest.raises(ConfigError, match=r"`model.lora.rank` = 0: input should be greater than or equal to 1"):
        run(f"model.pretrained={tiny_sd}", "model.lora.rank=0")


def test_hub_id_from_the_offline_cache(tiny_sd, tmp_path):
    """A Hub id is read from the HF cache (HF_HUB_OFFLINE=1), for training and for the saved generator."""
    import shutil

    from imgaug_gen.generators.sd import SDLoRAModule

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny_sd, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    module = SDLoRAModule(
        num_classes=2,
        class_names=["a", "b"],
        image_shape=[3, 16, 16],
        sampling={"num_inference_steps": 2},
        pretrained="someone/tiny-sd",
        cache_dir=str(tmp_path / "hub"),
    )
    gen = module.to_generator()
    gen.save_pretrained(tmp_path / "g")
    loaded = load_generator(tmp_path / "g")
    assert loaded.config["pretrained"] == "someone/tiny-sd"
    assert np.array_equal(loaded.sample([0, 1], seeds=2), gen.sample([0, 1], seeds=2))


# fast variants: test_sdxl.py::test_train_then_generate_cli (same CLI path), test_folder_kinds[sd_lora]
@pytest.mark.slow
def test_train_then_generate_end_to_end(tiny_sd, tmp_path):
    """python train.py model=sd_lora ... then generate.py mode=img2img and mode=sample."""
    run_dir = tmp_path / "run"
    env = cli_env()

    def run(script, *args):
        r = fastcli.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    train_args = [
        *TINY_SD,
        "data=digits",
        "data.shots=3",
        "trainer.max_steps=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "callbacks=none",
        f"model.pretrained={tiny_sd}",
        f"hydra.run.dir={run_dir}",
    ]
    run("train.py", *train_args)
    assert (run_dir / "generator" / "pytorch_lora_weights.safetensors").is_file()
    common = [
        f"run_dir={run_dir}",
        *TINY_METRICS,
        "progress=false",
        "device=cpu",
        "batch_size=16",
        "+sample_kwargs.num_inference_steps=2",
    ]
    out = tmp_path / "edits"
    run(
        "generate.py",
        *common,
        f"out_dir={out}",
        "mode=img2img",
        "img2img.edits_per_image=1",
        "img2img.strengths=[0.5,1.0]",
        "include_real=false",
    )
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 30 and len({r["source_id"] for r in records}) == 30
    assert class_counts(out) == {str(c): 3 for c in range(10)}
    for rec in records:
        assert rec["mode"] == "img2img" and rec["generator"]["kind"] == "sd_lora" and rec["strength"] in (0.5, 1.0)
        assert rec["prompt"] == f"a photo of a {rec['class_name']}"  # the generator's prompt_for(label)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_synthetic"] == 30 and np.isfinite(metrics["fid"]) and metrics["features"]
    out = tmp_path / "samples"
    run("generate.py", *common, f"out_dir={out}", "mode=sample", "n_per_class=2", "include_real=true", "score=false")
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["source"], r["mode"]) for r in records].count(("synthetic", "sample")) == 20
    assert all(r["prompt"] == f"a photo of a {r['class_name']}" for r in records if r["source"] == "synthetic")
    assert not any("prompt" in r for r in records if r["source"] == "real")
    assert sum(r["source"] == "real" for r in records) == 30
    assert class_counts(out) == {str(c): 5 for c in range(10)}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_synthetic"] == 20 and metrics["n_real"] == 30 and "fid" not in metrics  # score=false


def test_textual_inversion_alone(tiny_sd, tmp_path):
    """model.lora.enabled=false model.textual_inversion.enabled=true on SD-1.x: one learned token per class, only its
    vector trains (the embedding matrix is untouched), saved as diffusers' {token: [1, dim]} files that
    plain `load_textual_inversion` reads."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from imgaug_gen.generators.sd import SDLoRAModule

    torch.manual_seed(0)
    module = SDLoRAModule(
        num_classes=2,
        class_names=["golden_retriever", "cat"],
        image_shape=[3, 16, 16],
        pretrained=str(tiny_sd),
        sampling={"num_inference_steps": 2},
        lora={"enabled": False},
        textual_inversion={"enabled": True, "lr": 0.1},
    )
    assert module.prompts == ["a photo of a <golden_retriever>", "a photo of a <cat>"]
    assert module.lora_state_keys() == ["ti.0.vectors"] and not any("lora" in k for k in module.unet.state_dict())
    emb = module.text_encoder.get_input_embeddings().weight
    first = module.tokenizer.convert_tokens_to_ids("<golden_retriever>")
    ids = module.tokenizer("golden retriever", add_special_tokens=False).input_ids
    assert torch.allclose(module.ti[0].vectors[0], emb[ids].mean(0))  # initialised from the class name's words
    before = emb.detach().clone()
    opt = module.configure_optimizers()["optimizer"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0] and opt.param_groups[0]["lr"] == 0.1
    module.training_step((torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 1])), 0).backward()
    opt.step()
    assert torch.equal(emb, before)  # no row of the matrix moved ...
    assert not torch.allclose(module.ti[0].vectors, before[first : first + 2])  # ... the learned vectors did
    gen = module.to_generator()
    gen.save_pretrained(tmp_path / "g")
    assert sorted(p.relative_to(tmp_path / "g").as_posix() for p in (tmp_path / "g").rglob("*.*")) == [
        "config.json",
        "textual_inversion/class_000.safetensors",
        "textual_inversion/class_001.safetensors",
    ]
    sd = load_file(str(tmp_path / "g" / "textual_inversion" / "class_001.safetensors"))
    assert list(sd) == ["<cat>"] and torch.equal(sd["<cat>"][0], module.ti[0].vectors[1].detach())
    loaded = load_generator(tmp_path / "g")
    a = loaded.sample([1, 0], seeds=[3, 4])
    assert np.array_equal(a, gen.sample([1, 0], seeds=[3, 4]))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(tmp_path / "g" / "textual_inversion" / "class_001.safetensors"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=["a photo of a <cat>"],
        height=16,
        width=16,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
    ).images
    assert np.array_equal((np.clip(out, 0, 1) * 255).round().astype(np.uint8), a[:1])


@pytest.mark.parametrize(
    "field, bad",
    [
        ("lora_weights", "../outside.safetensors"),
        ("lora_weights", "/tmp/abs.safetensors"),
        ("lora_weights", "pytorch_lora_weights.bin"),
        ("lora_weights", "sub/../../outside.safetensors"),
        ("class_adapters", ["../outside.safetensors"] * 10),
        ("sample_scheduler", "UNet2DConditionModel"),
    ],
)
def test_a_shared_folder_names_only_its_own_safetensors(trained, tmp_path, field, bad):
    """A shared generator's config.json may name only .safetensors files inside its folder (never a
    pickled .bin that diffusers would unpickle, never a path outside), and only diffusers schedulers."""
    g = tmp_path / "g"
    shutil.copytree(trained[0] / "generator", g)
    (tmp_path / "outside.safetensors").write_bytes((g / "pytorch_lora_weights.safetensors").read_bytes())
    (g / "pytorch_lora_weights.bin").write_bytes(b"pickle")
    cfg = json.loads((g / "config.json").read_text())
    cfg[field] = bad
    (g / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=field):
        load_generator(g)


def test_a_retrained_generator_with_an_unchanged_config_is_another_job(tiny_sd, tmp_path):
    """Textual inversion lives in a subfolder: retraining changes it while config.json stays the same;
    the old images must not be kept as the new generator's."""
    from safetensors.torch import load_file, save_file

    from imgaug_gen.jobs.generate import generate

    from conftest import gen_cfg

    run = tmp_path / "run"
    _train(tiny_sd, run, "model.textual_inversion.enabled=true", "model.lora.enabled=false")
    config = (run / "generator" / "config.json").read_bytes()
    generate(
        gen_cfg(
            run,
            tmp_path / "out",
            "score=false",
            "n_per_class=1",
            "include_real=false",
            "+sample_kwargs.num_inference_steps=1",
        )
    )
    ti = run / "generator" / "textual_inversion" / "class_000.safetensors"
    save_file({k: v + 0.1 for k, v in load_file(str(ti)).items()}, str(ti))  # "retrained": new embeddings
    assert (run / "generator" / "config.json").read_bytes() == config
    with pytest.raises(ConfigError, match="different job"):
        generate(
            gen_cfg(
                run,
                tmp_path / "out",
                "score=false",
                "n_per_class=1",
                "include_real=false",
                "+sample_kwargs.num_inference_steps=1",
            )
        )
