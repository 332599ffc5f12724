"""A non-editable install works: the wheel, installed into a fresh virtual environment (reusing the installed
dependencies), runs train -> generate through its console scripts from a folder outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import ROOT, cli_env


def _run(argv, cwd, env, timeout=600):
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def test_the_wheel_trains_and_generates_from_outside_the_repository(tmp_path):
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    env = cli_env()
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        tmp_path,
        env,
    )
    wheel = next(dist.glob("imgaug_gen-*.whl"))
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)  # this pip installs into it
    # the installed dependencies as a plain path entry: their .pth files (this checkout's editable install
    # among them) are not processed, so only the wheel's imgaug_gen can be imported
    site = Path(
        _run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            tmp_path,
            env,
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        tmp_path,
        env,
    )
    work.mkdir()
    env = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "PYTHONPATH": ""}
    where = _run(
        [str(venv / "bin" / "python"), "-c", "import imgaug_gen, os; print(os.path.dirname(imgaug_gen.__file__))"],
        work,
        env,
    ).stdout.strip()
    assert where.startswith(str(venv)), where
    run, out = work / "run", work / "out"
    _run(["imgaug-gen", "train", "debug=tiny", "callbacks.fidelity=null", f"hydra.run.dir={run}"], work, env)
    assert (run / "generator" / "config.json").is_file() and (run / "train.log").is_file()
    _run(
        ["imgaug-gen-generate", f"run_dir={run}", f"out_dir={out}", "n_per_class=2", "score=false", "progress=false"],
        work,
        env,
    )
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sum(r["source"] == "synthetic" for r in rows) == 20 and (out / "generate.log").is_file()
    # an override the config does not have: Hydra's error, before the job imports anything heavy (the job's own
    # config errors, exit status 2, come from the same cli functions the root scripts call: tests/test_gan.py)
    bad = subprocess.run(
        ["imgaug-gen", "train", "debug=tiny", "data.shotz=5", f"hydra.run.dir={work / 'bad'}"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "data.shotz" in bad.stderr and not (work / "bad").exists()
