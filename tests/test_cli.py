"""Front-end conventions: --help, --cfg job, strict keys, experiment configs."""

from __future__ import annotations

import sys

import fastcli
import pytest
import yaml

from conftest import ROOT


def _run(*args):
    return fastcli.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "script, group", [("train.py", "model"), ("generate.py", "augment"), ("evaluate.py", "augment")]
)
def test_help_lists_groups(script, group):
    out = _run(script, "--help")
    assert out.returncode == 0, out.stderr
    assert "== Configuration groups ==" in out.stdout and group in out.stdout


def test_cfg_job_prints_the_composed_config_without_running(tmp_path):
    out = _run("train.py", "experiment=digits_ddpm", f"hydra.run.dir={tmp_path / 'r'}", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["_target_"].endswith("DDPMModule") and cfg["trainer"]["max_steps"] == 800
    assert not (tmp_path / "r").exists()  # nothing ran


@pytest.mark.parametrize(
    "experiment, target",
    [("digits_cgan", "CGANModule"), ("digits_ddpm", "DDPMModule"), ("folder_sd_lora", "SDLoRAModule")],
)
def test_experiment_recipes_compose(experiment, target):
    from imgaug_gen.config import compose_config

    cfg = compose_config("train", [f"experiment={experiment}", "run_dir=/tmp/x"])
    assert cfg.model._target_.endswith(target)


def test_every_public_name_has_an_example_on_the_api_page():
    import imgaug_gen

    page = (ROOT / "docs" / "api.md").read_text()
    api = page[: page.index("\n## ")]  # the examples above the reference
    missing = [
        n for n in imgaug_gen.__all__ if f"{n}(" not in api and f"@{n}" not in api and not (n[0].isupper() and n in api)
    ]
    assert not missing, f"docs/api.md lacks an example of {missing}"
    for n in imgaug_gen.__all__:  # each name resolves (lazily) to the package's own callable or class
        obj = getattr(imgaug_gen, n)
        assert callable(obj) and obj.__module__.startswith("imgaug_gen."), (n, obj)


def test_no_function_in_the_package_is_80_lines_or_longer():
    """Each step of a job reads on one screen (a longer one is split into named steps)."""
    import ast

    long = []
    for path in sorted((ROOT / "imgaug_gen").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 >= 80:
                long.append(
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                )
    assert not long, long


def test_no_module_in_the_package_is_over_500_lines():
    """One responsibility per module: a module that outgrows 500 lines is split."""
    big = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for p in sorted((ROOT / "imgaug_gen").rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 500
    ]
    assert not big, big
