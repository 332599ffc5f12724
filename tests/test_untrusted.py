"""Folders are untrusted input and users' data is never lost: each test reproduces one way a shared or
edited folder (a generator, a run, an output, a checkpoint) or a second launch used to run code, read
outside its folder, delete what it did not write, or corrupt an output."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import unicodedata
import zlib

import fastcli
import numpy as np
import pytest
import torch

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.base import load_generator

from conftest import ROOT, cli_env, files_bytes, gen_cfg, train_overrides, write_digit_folder
from factories_ddpm import make_generator

pytestmark = pytest.mark.usefixtures("one_thread")


def _ddpm_run(root, data):
    """A run folder holding a tiny (untrained) 3-class ddpm generator that records ``data``."""
    gen = make_generator()
    gen.config.update(class_names=["0", "1", "2"], data=copy.deepcopy(data))
    gen.save_pretrained(root / "generator")
    return root


def _digits10():
    return {"kind": "digits", "args": {"image_size": 16, "channels": 1, "shots": 6, "seed": 0}}


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    """A 10-class tiny untrained ddpm run on 16 px digits (generate.py can rebuild its data)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from imgaug_gen.generators.ddpm import DDPMGenerator, build_unet, unet_config

    from factories_ddpm import TINY_UNET

    torch.manual_seed(0)
    unet = build_unet(unet_config(10, [1, 16, 16], TINY_UNET))
    train = DDPMScheduler(num_train_timesteps=10, beta_schedule="squaredcos_cap_v2")
    sample = DDIMScheduler.from_config(train.config, timestep_spacing="trailing")
    gen = DDPMGenerator.from_unet(
        unet,
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        image_shape=[1, 16, 16],
        train_scheduler=train,
        sample_scheduler=sample,
        num_inference_steps=2,
        extra={"data": _digits10()},
    )
    root = tmp_path_factory.mktemp("ddpm_run")
    gen.save_pretrained(root / "generator")
    return root


def _edit_config(gen_dir, **changes):
    cfg = json.loads((gen_dir / "config.json").read_text())
    for key, value in changes.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    (gen_dir / "config.json").write_text(json.dumps(cfg))
    return cfg


# -- 1. loading is data only -----------------------------------------------------------------------
@pytest.mark.parametrize("key", ["sample_scheduler", "train_scheduler", "data", "unet.extra", "class_names"])
def test_a_target_in_config_json_never_runs(ddpm_run, tmp_path, key):
    run = tmp_path / "run"
    shutil.copytree(ddpm_run, run)
    sentinel = tmp_path / "sentinel"
    payload = {"_target_": "pathlib.Path.touch", "_args_": [str(sentinel)]}
    _edit_config(run / "generator", **{key: payload if key != "class_names" else [payload] * 10})
    with pytest.raises(ConfigError, match=r"_target_` = .pathlib.Path.touch.*never allowed to name code to run"):
        load_generator(run / "generator")
    from imgaug_gen.jobs.generate import generate

    with pytest.raises(ConfigError, match="never allowed to name code"):
        generate(gen_cfg(run, tmp_path / "out", "score=false"))
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_generate_and_evaluate_front_ends_refuse_a_target(ddpm_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ddpm_run, run)
    sentinel = tmp_path / "sentinel"
    _edit_config(run / "generator", data={"_target_": "os.system", "command": f"touch {sentinel}"})
    done = fastcli.run(
        [sys.executable, str(ROOT / "generate.py"), f"run_dir={run}", f"out_dir={tmp_path / 'o'}"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "never allowed to name code to run" in done.stderr
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.evaluate import evaluate

    cfg = compose_config(
        "evaluate",
        [
            f"out_dir={tmp_path / 'ev'}",
            "shots=[6]",
            "seeds=[0]",
            "generators.cgan.enabled=false",
            f"+generators.shared.run_dir={run}",
        ],
    )
    with pytest.raises(ConfigError, match="never allowed to name code to run"):
        evaluate(cfg)
    assert not sentinel.exists()


@pytest.mark.parametrize("name", ["UNet2DModel", "os", "__class__", "DiffusionPipeline", "utils", 7, None])
def test_a_scheduler_is_a_diffusers_scheduler_class(ddpm_run, tmp_path, name):
    shutil.copytree(ddpm_run, tmp_path / "run")
    _edit_config(tmp_path / "run" / "generator", **{"sample_scheduler.class_name": name})
    with pytest.raises(ConfigError, match="sample_scheduler"):
        load_generator(tmp_path / "run" / "generator")


_JUNK = [
    "x",
    -1,
    0,
    1e308,
    10**30,
    -(10**30),
    2.5,
    True,
    None,
    [],
    {},
    [1, "a", None],
    {"a": {"b": [{"c": 1}]}},
    [10**9] * 3,
]


def _mutations(cfg: dict):
    """(name, config) pairs: every key deleted, set to junk values, unknown keys added, nested keys junked."""
    for key in cfg:
        yield f"-{key}", {k: v for k, v in cfg.items() if k != key}
        for j, junk in enumerate(_JUNK):
            yield f"{key}={j}", {**cfg, key: junk}
    yield "+unknown", {**cfg, "unknown": 1}
    yield "+nested", {**cfg, "deep": {"a": [{"b": {"c": [1, 2, {"d": None}]}}]}}
    for block in ("unet", "train_scheduler", "sample_scheduler"):
        if block not in cfg:
            continue
        inner = cfg[block] if block == "unet" else cfg[block]["config"]
        for key in list(inner)[:12] + ["block_out_channels", "num_train_timesteps", "trained_betas", "sample_size"]:
            for j, junk in enumerate(_JUNK):
                changed = copy.deepcopy(cfg)
                (changed[block] if block == "unet" else changed[block]["config"])[key] = junk
                yield f"{block}.{key}={j}", changed


@pytest.mark.parametrize("kind", ["ddpm", "cgan"])
def test_config_json_fuzz_gives_only_config_errors(trained_cgan, tmp_path, kind):
    """Wrong types, missing keys, unknown or nested junk keys and huge numbers: loading (and sampling
    what loaded) either works or raises ConfigError, nothing else; a huge network is never allocated."""
    folder = tmp_path / "g"
    if kind == "ddpm":
        make_generator().save_pretrained(folder)
    else:
        shutil.copytree(trained_cgan / "generator", folder)
    base = json.loads((folder / "config.json").read_text())
    outcomes = {"loaded": 0, "refused": 0}
    every = list(_mutations(base))
    picked = np.random.default_rng(0).choice(len(every), min(len(every), 160), replace=False)  # a fixed sample
    for name, cfg in [every[i] for i in sorted(picked)] + [m for m in every if m[0].startswith("-")]:
        (folder / "config.json").write_text(json.dumps(cfg))
        try:
            gen = load_generator(folder)
            gen.sample([0], seeds=0)
            outcomes["loaded"] += 1
        except ConfigError:
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{kind} config mutation {name}: {type(e).__name__}: {e}")
    for raw in (b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe", b"null", b"1e999", b'{"kind": "ddpm"'):
        (folder / "config.json").write_bytes(raw)
        with pytest.raises(ConfigError):
            load_generator(folder)
    assert outcomes["refused"] > 80 and outcomes["loaded"] > 0


def test_a_huge_network_in_config_json_is_refused_before_allocation(tmp_path):
    make_generator().save_pretrained(tmp_path / "g")
    _edit_config(tmp_path / "g", **{"unet.block_out_channels": [4096, 4096]})
    with pytest.raises(ConfigError, match="does not match"):
        load_generator(tmp_path / "g")


def test_legacy_folder_gets_a_one_line_upgrade(ddpm_run, tmp_path):
    from imgaug_gen.upgrade import main

    run = tmp_path / "run"
    shutil.copytree(ddpm_run, run)
    cfg = json.loads((run / "generator" / "config.json").read_text())
    cfg["format_version"] = 1
    cfg["data"] = {"_target_": "imgaug_gen.data.DigitsDataModule", **cfg["data"]["args"]}
    (run / "generator" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"python -m imgaug_gen.upgrade"):
        load_generator(run / "generator")
    assert main([str(run)]) == 0
    assert load_generator(run / "generator").config["data"] == _digits10()
    assert (run / "generator" / "config.json.v1").is_file()
    cfg["data"]["_target_"] = "os.system"
    (run / "generator" / "config.json").write_text(json.dumps(cfg))
    assert main([str(run)]) == 2  # anything but the built-in data classes stays refused


# -- 2. deletion only of what the job wrote --------------------------------------------------------
def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_the_data_or_the_run(tmp_path):
    from imgaug_gen.jobs.generate import generate

    data = write_digit_folder(tmp_path / "images", ["a", "b", "c"], n_per_class=8)
    (data / "notes.txt").write_text("my notes")
    run = _ddpm_run(
        tmp_path / "run",
        {"kind": "folder", "args": {"root": str(data), "image_size": 16, "channels": 1, "shots": 4, "seed": 0}},
    )
    before_data, before_run = _snapshot(data), _snapshot(run)
    for out in (data, data / "a", tmp_path, run, run / "generator", run / "out"):
        with pytest.raises(ConfigError, match="overlap") as e:
            generate(gen_cfg(run, out, "score=false", "overwrite=true"))
        assert "overwrite=true" not in str(e.value).split("overlap")[1]
    assert _snapshot(data) == before_data and _snapshot(run) == before_run


def test_overwrite_removes_only_the_previous_jobs_files(ddpm_run, tmp_path):
    from imgaug_gen.export import read_manifest
    from imgaug_gen.jobs.generate import generate

    out = tmp_path / "out"
    generate(gen_cfg(ddpm_run, out, "score=false", "n_per_class=2", "include_real=false"))
    (out / "mine.txt").write_text("keep")
    (out / "train" / "0" / "my_photo.jpg").write_bytes(b"not ours")
    generate(gen_cfg(ddpm_run, out, "score=false", "n_per_class=3", "include_real=false", "overwrite=true"))
    assert (out / "mine.txt").read_text() == "keep" and (
        out / "train" / "0" / "my_photo.jpg"
    ).read_bytes() == b"not ours"
    rows = read_manifest(out)
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if p.name != "preview.png")
    assert len(rows) == 30 and sorted(r["file"] for r in rows) == pngs


def test_a_tampered_checkpoint_cannot_delete_outside_the_run(trained_cgan, tmp_path):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import train

    run = tmp_path / "run"
    shutil.copytree(trained_cgan, run)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    key = next(k for k in state["callbacks"] if k.startswith("ModelCheckpoint"))
    state["callbacks"][key]["dirpath"] = str(run / "checkpoints")
    state["callbacks"][key]["last_model_path"] = f"{run / 'checkpoints'}/../../victim"
    torch.save(state, ckpt)
    cfg = compose_config("train", train_overrides("cgan", run, "trainer.max_steps=12", f"ckpt_path={ckpt}"))
    with pytest.raises(ConfigError, match=r"last_model_path = .*victim.*not a file inside its checkpoint folder"):
        train(cfg)
    assert (victim / "thesis.tex").read_text() == "years of work"


# -- 3. paths stay inside; hostile images ---------------------------------------------------------
@pytest.fixture(scope="module")
def out_folder(ddpm_run, tmp_path_factory):
    from imgaug_gen.jobs.generate import generate

    out = tmp_path_factory.mktemp("out") / "o"
    generate(gen_cfg(ddpm_run, out, "score=false", "n_per_class=2"))
    return out


def _with_line(out_folder, tmp_path, change):
    out = tmp_path / "o"
    shutil.copytree(out_folder, out, ignore=shutil.ignore_patterns("*.lock"))
    lines = (out / "manifest.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    change(rec, out)
    lines[0] = json.dumps(rec)
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.parametrize(
    "file",
    ["../secret/x.png", "/SECRET/x.png", "train/../../secret/x.png", "train/../x.png", "train\\..\\x.png", 3, None],
)
def test_manifest_files_stay_inside_the_folder(out_folder, tmp_path, file):
    from imgaug_gen.data.manifest import load_folder_images, read_manifest
    from imgaug_gen.data.mixed import MixedFolderDataset
    from imgaug_gen.visual import preview_sheet

    secret = tmp_path / "secret"
    secret.mkdir()
    from PIL import Image

    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(secret / "x.png")
    target = str(secret / "x.png") if file == "/SECRET/x.png" else file

    def change(rec, out):
        rec["file"] = target

    out = _with_line(out_folder, tmp_path, change)
    if file is None:  # a line with no file reads as a rejected candidate: skipped by the readers
        assert len(read_manifest(out)) == len(read_manifest(out_folder)) - 1
        return
    with pytest.raises(ConfigError, match="is not a relative path under `train/` inside"):
        MixedFolderDataset(out)
    with pytest.raises(ConfigError, match="is not a relative path"):
        load_folder_images(out, read_manifest(out))
    with pytest.raises(ConfigError, match="is not a relative path"):
        preview_sheet(out, read_manifest(out)[:1], ["0"])


def test_resume_drops_an_outside_line_and_remakes_the_image(out_folder, ddpm_run, tmp_path):
    from imgaug_gen.export import read_manifest
    from imgaug_gen.jobs.generate import generate

    (tmp_path / "secret.png").write_bytes(b"secret")
    out = _with_line(out_folder, tmp_path, lambda rec, out: rec.update(file="train/../../secret.png"))
    generate(gen_cfg(ddpm_run, out, "score=false", "n_per_class=2"))
    assert (tmp_path / "secret.png").read_bytes() == b"secret"
    assert files_bytes(out) == files_bytes(out_folder)
    assert sorted(r["id"] for r in read_manifest(out)) == sorted(r["id"] for r in read_manifest(out_folder))


def _bomb_png(path, side: int = 12_000):
    """A valid PNG header announcing side x side grey pixels, with almost no data (decoding would need
    side**2 bytes; 12,000 px = 144 M pixels, over PIL's limit of 89 M but under its hard error at 2x)."""

    def chunk(tag, data):
        return len(data).to_bytes(4, "big") + tag + data + zlib.crc32(tag + data).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    )


def test_decompression_bombs_in_a_manifest_are_refused_from_the_header(out_folder, tmp_path):
    import resource

    from imgaug_gen.data.manifest import load_folder_images, read_manifest
    from imgaug_gen.data.mixed import MixedFolderDataset

    out = tmp_path / "o"
    shutil.copytree(out_folder, out, ignore=shutil.ignore_patterns("*.lock"))
    records = read_manifest(out)
    for r in records[:4]:
        _bomb_png(out / r["file"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError, match="pixels, over the limit of"):
        load_folder_images(out, records[:4])
    ds = MixedFolderDataset(out)
    with pytest.raises(ConfigError, match="pixels, over the limit of"):
        [ds.image(i) for i in range(len(ds))]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000  # KiB: nothing was decoded


def test_an_image_of_another_size_is_refused_before_decoding(out_folder, tmp_path):
    from PIL import Image

    from imgaug_gen.data.manifest import load_folder_images, read_manifest

    out = tmp_path / "o"
    shutil.copytree(out_folder, out, ignore=shutil.ignore_patterns("*.lock"))
    records = read_manifest(out)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(out / records[1]["file"])
    with pytest.raises(ConfigError, match="is 40x40 pixels; the other images here are 16x16"):
        load_folder_images(out, records)


# -- 4. class names and symlinks in data folders ---------------------------------------------------
@pytest.mark.parametrize(
    "names", [[unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")], ["Cat", "cat"]]
)
def test_class_folders_that_would_merge_are_refused(tmp_path, names):
    from imgaug_gen.data import LabeledFolderDataModule

    root = write_digit_folder(tmp_path / "img", [*names, "dog"], n_per_class=4)
    if len({p.name for p in root.iterdir()}) < 3:
        pytest.skip("this file system already merges these names")
    dm = LabeledFolderDataModule(root=str(root), image_size=16, channels=1, test_fraction=0.0)
    with pytest.raises(ConfigError, match="name the same folder once Unicode-normalised"):
        dm.setup()
    with pytest.raises(ConfigError, match="name the same folder"):
        LabeledFolderDataModule(root=str(root), image_size=16, class_names=["x", "X", "y"]).setup()


def test_symlinked_folders_are_listed_once(tmp_path):
    from imgaug_gen.data import LabeledFolderDataModule

    root = write_digit_folder(tmp_path / "img", ["a", "b"], n_per_class=10)
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)
    (root / "a" / "loop2").symlink_to(root, target_is_directory=True)
    (root / "b" / "again").symlink_to(root / "a", target_is_directory=True)
    dm = LabeledFolderDataModule(root=str(root), image_size=16, channels=1, test_fraction=0.2)
    dm.setup()
    paths = [r["path"] for r in dm.train_records()]
    assert len(dm.train_arrays()[1]) + len(dm.test_arrays()[1]) == 20 and len(set(paths)) == len(paths)
    (root / "c").symlink_to(root / "b", target_is_directory=True)
    with pytest.raises(ConfigError, match="are the same folder"):
        LabeledFolderDataModule(root=str(root), image_size=16, channels=1).setup()


# -- 5. stale work ---------------------------------------------------------------------------------
def test_a_generator_changed_in_a_subfolder_is_another_job(ddpm_run, tmp_path):
    from imgaug_gen.jobs.generate import generate, generator_fingerprint

    run = tmp_path / "run"
    shutil.copytree(ddpm_run, run)
    (run / "generator" / "class_adapters").mkdir()
    (run / "generator" / "class_adapters" / "class_000.safetensors").write_bytes(b"one")
    before = generator_fingerprint(run / "generator")
    generate(gen_cfg(run, tmp_path / "out", "score=false", "n_per_class=1"))
    (run / "generator" / "class_adapters" / "class_000.safetensors").write_bytes(b"two")
    assert generator_fingerprint(run / "generator") != before
    with pytest.raises(ConfigError, match="different job"):
        generate(gen_cfg(run, tmp_path / "out", "score=false", "n_per_class=1"))


def test_evaluate_clears_the_done_marker_before_retraining(tmp_path, monkeypatch):
    import imgaug_gen.jobs.train
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.evaluate.sources import train_entry as _train_entry

    run = tmp_path / "run"
    (run / "generator").mkdir(parents=True)
    (run / "generator" / "config.json").write_text("{}")
    (run / "evaluation_done.json").write_text(json.dumps({"fingerprint": "an older config"}))

    def killed(cfg):
        raise KeyboardInterrupt  # the retrain dies part-way

    monkeypatch.setattr(imgaug_gen.jobs.train, "train", killed)
    cfg = compose_config("evaluate", [f"out_dir={tmp_path / 'ev'}"])
    with pytest.raises(KeyboardInterrupt):
        _train_entry(cfg, "cgan", {"train": ["experiment=digits_cgan"]}, 5, {"image_size": 16}, run, 0)
    assert not (run / "evaluation_done.json").exists()


# -- 6. one writer per folder ----------------------------------------------------------------------
def _wait_for_lock(path, proc, timeout=300):
    import time

    t0 = time.time()
    while True:
        try:
            if json.loads(path.read_text() or "{}").get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, "the first job ended before it was seen running: " + proc.stdout.read()[-2000:]
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def _second_launch(argv, lock_file, cwd):
    """Start ``argv``; once it holds ``lock_file``, pause it (SIGSTOP, so it cannot finish first) and
    launch the same command again: the second must stop at once, naming the holder. Then the first
    goes on and must finish normally. Returns the first's log."""
    import signal

    env = cli_env()
    first = fastcli.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_lock(lock_file, first)
        first.send_signal(signal.SIGSTOP)
        second = fastcli.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    log, _ = first.communicate(timeout=600)
    assert first.returncode == 0, log[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert "is in use by another" in second.stderr and f"pid {first.pid}" in second.stderr
    return log


def test_two_generate_jobs_on_one_folder(ddpm_run, tmp_path):
    from imgaug_gen.export import read_manifest
    from imgaug_gen.jobs.generate import generate

    argv = [
        sys.executable,
        str(ROOT / "generate.py"),
        f"run_dir={ddpm_run}",
        f"out_dir={tmp_path / 'out'}",
        "n_per_class=60",
        "include_real=false",
        "score=false",
        "progress=false",
    ]
    _second_launch(argv, tmp_path / "out" / "generate.lock", tmp_path)
    generate(gen_cfg(ddpm_run, tmp_path / "alone", "n_per_class=60", "include_real=false", "score=false"))
    rows = read_manifest(tmp_path / "out")
    assert files_bytes(tmp_path / "out") == files_bytes(tmp_path / "alone")
    assert len(rows) == len({r["id"] for r in rows}) == len(files_bytes(tmp_path / "out")) == 600
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n_synthetic"] == 600


def test_two_train_jobs_on_one_run_folder(tmp_path):
    run = tmp_path / "run"
    argv = [
        sys.executable,
        str(ROOT / "train.py"),
        *train_overrides("cgan", run, "trainer.max_steps=16"),
        f"hydra.run.dir={run}",
    ]
    _second_launch(argv, run / "train.lock", tmp_path)
    import csv

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    steps = [r["step"] for r in rows if r["val/fid"]]
    assert len(steps) == len(set(steps)) == 2  # every validation step once (8 and 16), not twice


def test_two_evaluate_jobs_on_one_folder(tmp_path):
    ev = tmp_path / "ev"
    argv = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        f"out_dir={ev}",
        "shots=[5]",
        "seeds=[0]",
        "generators.cgan.enabled=false",
        "classifier.steps=150",
    ]
    _second_launch(argv, ev / "evaluate.shots5_d0.lock", tmp_path)
    rows = [json.loads(line) for line in (ev / "classifier_runs.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["key"] for r in rows}) == 2


def test_shards_finishing_together_merge_once(ddpm_run, tmp_path):
    from imgaug_gen.export import read_manifest
    from imgaug_gen.jobs.generate import generate

    out = tmp_path / "out"
    procs = [
        fastcli.Popen(
            [
                sys.executable,
                str(ROOT / "generate.py"),
                f"run_dir={ddpm_run}",
                f"out_dir={out}",
                "n_per_class=20",
                "score=false",
                "progress=false",
                f"shard={s}",
                "num_shards=2",
            ],
            cwd=tmp_path,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for s in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("merging the manifests" in log for log in logs) == 1
    generate(gen_cfg(ddpm_run, tmp_path / "alone", "n_per_class=20", "score=false"))
    assert files_bytes(out) == files_bytes(tmp_path / "alone")
    assert sorted(r["id"] for r in read_manifest(out)) == sorted(r["id"] for r in read_manifest(tmp_path / "alone"))
    assert json.loads((out / "merged.json").read_text()) == {"num_shards": 2}


# -- 7. durability and bounds ----------------------------------------------------------------------
def test_a_listed_file_that_does_not_decode_is_made_again(out_folder, ddpm_run, tmp_path):
    from imgaug_gen.jobs.generate import generate

    out = tmp_path / "o"
    shutil.copytree(out_folder, out, ignore=shutil.ignore_patterns("*.lock"))
    victims = sorted((out / "train" / "1").glob("syn_*.png"))[:2]
    victims[0].write_bytes(b"")  # a power cut after the rename, before the data reached the disk
    victims[1].write_bytes(victims[1].read_bytes()[:30])
    generate(gen_cfg(ddpm_run, out, "score=false", "n_per_class=2"))
    assert files_bytes(out) == files_bytes(out_folder)


def test_durable_writes_fsync_before_rename(monkeypatch, tmp_path):
    import os

    from imgaug_gen import io

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    io.atomic_write_bytes(tmp_path / "a", b"x")
    assert calls == ["fsync", "replace"]
    old = io.set_durable(False)
    try:
        calls.clear()
        io.atomic_write_bytes(tmp_path / "b", b"x")
        assert calls == ["replace"]
    finally:
        io.set_durable(old)


@pytest.mark.parametrize(
    "override, match",
    [
        ("n_per_class=1000000000", r"`n_per_class` = 1000000000: input should be less than or equal to 10000000"),
        ("mix.target_per_class=100000000", "less than or equal to 10000000"),
        ("filter.max_factor=1000", "less than or equal to 100"),
        ("n_per_class=3000000", r"plans 3000\d{4} images .* over the limit of 20000000"),
    ],
)
def test_counts_have_upper_bounds(ddpm_run, tmp_path, override, match):
    from imgaug_gen.jobs.generate import generate

    with pytest.raises(ConfigError, match=match):
        generate(gen_cfg(ddpm_run, tmp_path / "o", "score=false", override))
    assert not (tmp_path / "o" / "manifest.jsonl").exists()
