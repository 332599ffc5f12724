"""evaluate.py / imgaug_gen.evaluation: the downstream proof on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TINY_MODELS, gen_cfg

from imgaug_gen.errors import ConfigError

TINY_TRAIN = ",".join(f'"{o}"' for o in [*TINY_MODELS["cgan"], "callbacks=none", "logger=none",
                                         "trainer.enable_progress_bar=false", "data.batch_size=16"])
TINY_EVAL = ["seeds=[0,1,2]", "classifier.steps=15", "metrics.domain_steps=30", "augment.copies_per_image=2",
             "synthetic_copies=1", f"generators.cgan.train=[{TINY_TRAIN}]", 'generators.cgan.generate=["n_per_class=4"]']


def eval_cfg(out_dir, *extra):
    from imgaug_gen.config import compose_config

    return compose_config("evaluate", [f"out_dir={out_dir}", *TINY_EVAL, *extra])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from imgaug_gen.evaluation import evaluate

    os.environ.setdefault("IMGAUG_GEN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    out = tmp_path_factory.mktemp("eval")
    return out, evaluate(eval_cfg(out, "shots=[3,4]"))


def test_evaluate_writes_every_method_per_shots(evaluated):
    out, ev = evaluated
    assert ev["shots"] == [3, 4] and ev["seeds"] == [0, 1, 2]
    for shots in (3, 4):
        r = ev["results"][str(shots)]
        assert list(r) == ["real", "real+classical", "real+cgan", "real+cgan+classical"]
        n_real = 10 * shots
        # copies: 2 classical copies per real image, 4 synthetic per class (+1 classical copy each)
        assert r["real"]["n_train"] == n_real
        assert r["real+classical"]["n_train"] == 3 * n_real
        assert r["real+cgan"]["n_train"] == n_real + 40
        assert r["real+cgan+classical"]["n_train"] == 3 * n_real + 80
        for m in r.values():
            assert len(m["accs"]) == 3 and all(0.0 <= a <= 1.0 for a in m["accs"])
            assert m["mean"] == pytest.approx(np.mean(m["accs"]))
            assert m["std"] == pytest.approx(np.std(m["accs"], ddof=1))
        g = ev["generators"][str(shots)]["cgan"]
        assert g["n_synthetic"] == 40 and 0.0 <= g["cas"]["mean"] <= 1.0
        assert np.isfinite(g["generate"]["fid"])
        # the generator was trained on exactly this few-shot subset
        from imgaug_gen.generators.base import read_run_config

        assert read_run_config(f"{g['run_dir']}/generator")["data"]["shots"] == shots
    assert ev["dataset"]["n_test"] == 355  # digits' fixed test split, never trained on
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(ev["results"]))
    md = (out / "results.md").read_text()
    assert "| real+cgan+classical |" in md and "3 shots" in md and "CAS" in md and "Gain" in md
    with Image.open(out / "accuracy_vs_shots.png") as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_evaluate_rerun_reuses_runs_and_results(evaluated, tmp_path):
    from imgaug_gen.evaluation import evaluate

    out, ev = evaluated
    lines = (out / "classifier_runs.jsonl").read_text().splitlines()
    again = evaluate(eval_cfg(out, "shots=[3,4]"))
    assert again["generators"]["3"]["cgan"]["reused_run"] is True
    assert (out / "classifier_runs.jsonl").read_text().splitlines() == lines  # nothing retrained
    assert again["results"] == ev["results"]  # read back from the cache, seconds included


def test_evaluate_is_deterministic(evaluated, tmp_path):
    from imgaug_gen.evaluation import evaluate

    _, ev = evaluated
    fresh = evaluate(eval_cfg(tmp_path / "e2", "shots=[3]"))
    def accs(r):
        return {m: v["accs"] for m, v in r.items()}

    assert accs(fresh["results"]["3"]) == accs(ev["results"]["3"])


def test_evaluate_existing_run_and_folder_entries(trained_cgan, tmp_path):
    from imgaug_gen.evaluation import evaluate
    from imgaug_gen.pipeline import generate

    folder = tmp_path / "gen"
    generate(gen_cfg(trained_cgan, folder, "score=false", "include_real=false"))
    ev = evaluate(eval_cfg(tmp_path / "ev", "shots=[6]", "seeds=[0]", "generators.cgan.enabled=false",
                           f"+generators.mine.run_dir={trained_cgan}", '+generators.mine.generate=["n_per_class=4"]',
                           f"+generators.made.folder={folder}",
                           "methods=[real,real+mine,real+made]"))
    r = ev["results"]["6"]
    assert list(r) == ["real", "real+mine", "real+made"]
    assert r["real+made"]["n_train"] == 60 + 40 and r["real+mine"]["n_train"] == 60 + 40
    assert ev["generators"]["6"]["mine"]["run_dir"] == str(trained_cgan.resolve())


@pytest.mark.parametrize("extra, match", [
    (["shots=[0]"], "shots"),
    (["seeds=[]"], "seeds"),
    (["methods=[real,real+nope]"], "methods"),
    (["+generators.cgan.oops=1"], "generators.cgan.*oops"),
    (["+generators.x.run_of=ddpm"], "generators.x.run_of"),
    (["+generators.x.folder=/does/not/exist"], "/does/not/exist"),
    (["+generators.x.train=[]", "+generators.x.run_dir=/tmp"], "exactly one"),
    (["classifier.steps=0"], "steps"),
])
def test_evaluate_config_errors_before_work(tmp_path, extra, match):
    from imgaug_gen.evaluation import evaluate

    with pytest.raises(ConfigError, match=match):
        evaluate(eval_cfg(tmp_path / "ev", *extra))
    assert not (tmp_path / "ev").exists()  # nothing written


def test_evaluate_run_dir_of_other_shots_is_refused(trained_cgan, tmp_path):
    from imgaug_gen.evaluation import evaluate

    with pytest.raises(ConfigError, match="shots=6"):
        evaluate(eval_cfg(tmp_path / "ev", "shots=[3]", "generators.cgan.enabled=false",
                          f"+generators.mine.run_dir={trained_cgan}"))


def test_evaluate_cli_help_and_typo():
    help_ = subprocess.run([sys.executable, "evaluate.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_.returncode == 0 and "generators" in help_.stdout
    typo = subprocess.run([sys.executable, "evaluate.py", "out_dir=/tmp/x", "shotz=[3]"], cwd=ROOT,
                          capture_output=True, text=True)
    assert typo.returncode != 0 and "shotz" in typo.stderr
