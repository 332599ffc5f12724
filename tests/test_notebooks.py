"""The notebooks run end to end (nbclient, the project's own kernel) with tiny settings
injected into their `parameters` cell."""

from __future__ import annotations

import json
from pathlib import Path

import fastcli
import jupyter_client.launcher
import nbformat
from nbclient import NotebookClient

from conftest import ROOT, TINY_MODELS
from factories_ddpm import TINY_DDPM
from tiny_sd import TINY_SD, build_tiny_sd

NB = ROOT / "notebooks"
TINY_CB = [
    "callbacks.fidelity.n_per_class=5",
    "callbacks.samples.n_per_class=2",
    "metrics.domain_steps=30",
    "trainer.log_every_n_steps=2",  # a run this short logs nothing at the default 20: no metrics.csv to plot
    "trainer.enable_progress_bar=false",
]


def run_notebook(name: str, params: str, tmp_path: Path, monkeypatch) -> nbformat.NotebookNode:
    nb = nbformat.read(NB / name, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{name} needs exactly one cell tagged `parameters`"
    cells[0].source = params
    for key, value in {
        "IMGAUG_GEN_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "OMP_NUM_THREADS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    # the kernel (`python -m ipykernel_launcher`) is forked from the tests' warm interpreter (tests/fastcli.py)
    monkeypatch.setattr(jupyter_client.launcher, "Popen", fastcli.Popen)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    return nb


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _has_image(nb) -> int:
    return sum(
        "image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )


def test_01_quickstart(tmp_path, monkeypatch):
    extra = [o for o in TINY_MODELS["cgan"] if not o.startswith(("model=", "trainer.max_steps"))] + TINY_CB
    nb = run_notebook(
        "01_quickstart.ipynb",
        f"OUT = {str(tmp_path / 'nb')!r}\nSTEPS = 8\nSHOTS = 5\nN_PER_CLASS = 3\nEXTRA = {extra!r}\n"
        'GEN_EXTRA = ["metrics.domain_steps=30"]',  # the scoring network's tiny recipe, as in training
        tmp_path,
        monkeypatch,
    )
    data = tmp_path / "nb" / "data"
    m = json.loads((data / "metrics.json").read_text())
    assert m["n_synthetic"] == 30 and m["n_real"] == 50
    manifest = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 80 and all((data / r["file"]).is_file() for r in manifest)
    assert (data / "preview.png").is_file() and (tmp_path / "nb" / "run" / "progress.png").is_file()
    assert f"FID {m['fid']:.2f}" in _text(nb)
    assert _has_image(nb) >= 3  # grid, progress, preview


def test_02_diffusion_and_img2img(tmp_path, monkeypatch):
    sd = build_tiny_sd(tmp_path / "tiny_sd")
    ddpm = [o for o in TINY_DDPM if not o.startswith(("model=", "trainer.max_steps"))] + TINY_CB
    sd_extra = [o for o in TINY_SD if o != "model=sd_lora"] + [
        "callbacks.fidelity=null",
        "trainer.max_steps=2",
        "callbacks.samples.n_per_class=1",
        "trainer.enable_progress_bar=false",
    ]
    nb = run_notebook(
        "02_diffusion_and_img2img.ipynb",
        f"OUT = {str(tmp_path / 'nb')!r}\nSTEPS = 4\nSHOTS = 4\nSTRENGTHS = [0.3, 0.7]\nN_IMAGES = 2\n"
        f"EXTRA = {ddpm!r}\nSD_PRETRAINED = {str(sd)!r}\nSD_EXTRA = {sd_extra!r}",
        tmp_path,
        monkeypatch,
    )
    assert (tmp_path / "nb" / "ddpm" / "generator" / "config.json").is_file()
    assert (tmp_path / "nb" / "sd_lora" / "generator" / "pytorch_lora_weights.safetensors").is_file()
    assert _has_image(nb) >= 2  # img2img strips, SD samples


def test_03_does_it_help(tmp_path, monkeypatch):
    train = ",".join(
        f'"{o}"'
        for o in [
            *TINY_MODELS["cgan"],
            "debug=tiny",  # 8 steps of the tiny cGAN (the default trainer runs 3000)
            "callbacks=none",
            "logger=none",
            "trainer.enable_progress_bar=false",
            "data.batch_size=16",
        ]
    )
    overrides = [
        "classifier.steps=10",
        "metrics.domain_steps=30",
        "augment.copies_per_image=1",
        f"generators.cgan.train=[{train}]",
        'generators.cgan.generate=["n_per_class=3"]',
    ]
    nb = run_notebook(
        "03_does_it_help.ipynb",
        f"OUT = {str(tmp_path / 'nb')!r}\nSHOTS = [3]\nDATA_SEEDS = [0]\nSEEDS = [0, 1]\nOVERRIDES = {overrides!r}",
        tmp_path,
        monkeypatch,
    )
    ev = json.loads((tmp_path / "nb" / "eval.json").read_text())
    assert sorted(ev["results"]["3"]) == [
        "real",
        "real+cgan+classical@concat",
        "real+cgan+classical@kd",
        "real+cgan+classical@replace",
        "real+classical",
        "real+copies+classical@kd",  # the distilling policy's control
    ]
    outputs = json.dumps(nb.cells[-3].get("outputs", []))
    assert _has_image(nb) >= 1 and "real+cgan+classical@replace" in outputs and "headline" in outputs
    # the user's own classifier trained through MixedDataModule on the evaluation's folder
    last = json.dumps(nb.cells[-1].get("outputs", []))
    assert "30 real + 30 synthetic images" in last and "test accuracy" in last
