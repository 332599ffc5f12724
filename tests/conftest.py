"""Shared tiny configs: the real conf/ composed with overrides that shrink everything
(16 px, narrow nets, a few steps, outputs in tmp_path)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores (make test: one per core): one thread each, here and in
    # the subprocesses they start, or the processes' thread pools fight over the cores.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# What the tests train with: conf/debug/tiny.yaml (16 px digits, 6 shots, 8 optimiser steps, a tiny feature
# network, frequent checkpoints and grids) and its model part (debug/model/tiny_<kind>.yaml: narrow nets).
TINY_DATA = ["debug=tiny", "data=digits"]
TINY_METRICS = ["metrics.domain_steps=30"]  # generate / evaluate configs have no debug group
TINY_CALLBACKS: list[str] = []  # in debug=tiny
TINY_MODELS = {"cgan": ["model=cgan"]}


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """One feature cache for the session (the domain network trains once), never in $HOME; the
    variable is restored afterwards."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    old = os.environ.get("IMGAUG_GEN_CACHE")
    os.environ["IMGAUG_GEN_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    yield Path(os.environ["IMGAUG_GEN_CACHE"])
    if old is None:
        os.environ.pop("IMGAUG_GEN_CACHE", None)
    else:
        os.environ["IMGAUG_GEN_CACHE"] = old


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: intra-op threads only add overhead (and stall when other jobs share the cores).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_env(**extra: str) -> dict[str, str]:
    """The one environment for the front ends run as subprocesses: offline, one thread, the session cache."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def train_overrides(kind: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        *TINY_MODELS[kind],
        *TINY_DATA,
        *TINY_METRICS,
        *TINY_CALLBACKS,
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"run_dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="session")
def trained_cgan(tmp_path_factory):
    """A tiny cGAN run folder shared by the tests that only read it."""
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import train

    run_dir = tmp_path_factory.mktemp("cgan_run")
    train(compose_config("train", train_overrides("cgan", run_dir)))
    return run_dir


def digits_images(n_per_class: int = 10, classes=(0, 1, 2), size: int = 20, channels: int = 3, seed: int = 0):
    """Real digit images as uint8 NHWC (for folder fixtures)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    out, labels = [], []
    for c in classes:
        idx = rng.choice(np.flatnonzero(d.target == c), n_per_class, replace=False)
        for i in idx:
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR)
            img = img.convert("RGB" if channels == 3 else "L")
            out.append(np.asarray(img))
            labels.append(c)
    return out, labels


@pytest.fixture
def tiny_folder(tmp_path):
    """root/<class>/*.png: 3 classes x 10 RGB 20x20 images, class names with a space and unicode."""
    return write_digit_folder(tmp_path / "images", ["zero", "one one", "zwei_ü"])


def write_digit_folder(root, names, n_per_class: int = 10):
    """root/<names[c]>/img_XXX.png: real digits 0..len(names)-1 as RGB 20x20 PNGs; returns root."""
    from PIL import Image

    images, labels = digits_images(n_per_class=n_per_class, classes=tuple(range(len(names))))
    for k, (img, c) in enumerate(zip(images, labels)):
        d = root / names[c]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{k:03d}.png")
    return root


def gen_cfg(run_dir, out_dir, *extra):
    """A tiny generate config (4 per class, no progress bar)."""
    from imgaug_gen.config import compose_config

    return compose_config(
        "generate",
        [f"run_dir={run_dir}", f"out_dir={out_dir}", "n_per_class=4", "progress=false", *TINY_METRICS, *extra],
    )


def class_counts(out_dir) -> dict[str, int]:
    """{class folder: PNG count} under out_dir/train (its metadata.jsonl is not a class)."""
    return {d.name: len(list(d.glob("*.png"))) for d in sorted((out_dir / "train").iterdir()) if d.is_dir()}


def files_bytes(out_dir):
    """{relative path: bytes} of every PNG under out_dir/train."""
    return {p.relative_to(out_dir).as_posix(): p.read_bytes() for p in sorted((out_dir / "train").rglob("*.png"))}


def kill_when(proc, ready, timeout=300):
    """SIGKILL the subprocess ``proc`` as soon as ``ready()`` is true (polled every 50 ms); fails if
    it ends first or never gets there."""
    import signal
    import time

    t0 = time.time()
    while not ready():
        assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read()[-2000:]
        assert time.time() - t0 < timeout, "never reached the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def train_killed_and_resumed(cmd, tmp_path, first_step: int, max_steps: int):
    """The SIGKILL resume protocol of a real ``train.py``: ``cmd(run_dir, *extra)`` (its argv) runs
    uninterrupted into ``tmp_path/full``; a second run into ``tmp_path/killed`` is SIGKILLed as soon as
    it has written ``checkpoints/last.ckpt`` (Lightning writes it atomically), then resumed from it
    with ``ckpt_path=``. Returns the two run folders, to compare what they wrote."""
    import signal
    import subprocess

    import fastcli
    import torch

    env = cli_env()
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = fastcli.run(cmd(full), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = fastcli.Popen(
        cmd(killed), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    ckpt = killed / "checkpoints" / "last.ckpt"
    kill_when(proc, ckpt.is_file)
    assert proc.returncode == -signal.SIGKILL
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert first_step <= step < max_steps  # killed part-way, after a checkpoint
    resumed = fastcli.run(
        cmd(killed, f"ckpt_path={ckpt}"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return full, killed


# The longest files first: pytest-xdist (--dist loadfile) hands files to the workers in this order, so the
# last files to run are short ones and the workers finish together. The rest keep their order.
LONG_FIRST = (
    "test_wheel.py",
    "test_evaluate.py",
    "test_untrusted.py",
    "test_metrics.py",
    "test_notebooks.py",
    "test_priors.py",
    "test_reliability.py",
    "test_pseudo_baseline.py",
    "test_shards.py",
    "test_gan.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: a file keeps its order
