"""evaluate.py / imgaug_gen.jobs.evaluate: the downstream proof on tiny settings."""

from __future__ import annotations

import json
import sys
import time

import fastcli
import numpy as np
import pytest
from PIL import Image

from imgaug_gen.errors import ConfigError

from conftest import ROOT, TINY_MODELS, gen_cfg

TINY_TRAIN = ",".join(
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
TINY_EVAL = [
    "seeds=[0,1,2]",
    "classifier.steps=10",
    "metrics.domain_steps=30",
    "augment.copies_per_image=2",
    "synthetic_copies=1",
    f"generators.cgan.train=[{TINY_TRAIN}]",
    'generators.cgan.generate=["n_per_class=4"]',
    "policies={concat:{name:concat},replace:{name:replace,p:0.5},kd:{name:weighted,p:0.25,distill:0.5}}",
]
METHODS = [
    "real",
    "real+classical",
    "real+copies+classical@kd",  # the distilling policy's control: the shots as its synthetic images
    "real+cgan+classical@concat",
    "real+cgan+classical@replace",
    "real+cgan+classical@kd",
]


def eval_cfg(out_dir, *extra):
    from imgaug_gen.config import compose_config

    return compose_config("evaluate", [f"out_dir={out_dir}", *TINY_EVAL, *extra])


EVALUATED = ["shots=[3,4]", "data_seeds=[0,1]", "seeds=[0,1]"]  # the `evaluated` fixture's job


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from imgaug_gen.jobs.evaluate import evaluate

    out = tmp_path_factory.mktemp("eval")
    return out, evaluate(eval_cfg(out, *EVALUATED, f"metrics.cache_dir={out / 'cache'}"))


def test_evaluate_writes_every_method_per_shots(evaluated):
    out, ev = evaluated
    assert ev["shots"] == [3, 4] and ev["seeds"] == [0, 1] and ev["data_seeds"] == [0, 1]
    for shots in (3, 4):
        r = ev["results"][str(shots)]
        assert list(r) == METHODS
        n_real = 10 * shots
        # copies: 2 classical copies per real image, 4 synthetic per class (+1 classical copy each)
        assert r["real"]["n_train"] == n_real
        assert r["real+classical"]["n_train"] == 3 * n_real
        # the control: real+classical plus the shots again (+1 classical copy each), under the same policy
        assert r["real+copies+classical@kd"]["n_train"] == 3 * n_real + 2 * n_real
        for m in METHODS[3:]:
            assert r[m]["n_train"] == 3 * n_real + 80
        for m in r.values():
            # one accuracy per (subset, seed) pair, tested and validated
            assert m["pairs"] == [[d, s] for d in (0, 1) for s in (0, 1)]
            assert len(m["accs"]) == 4 and all(0.0 <= a <= 1.0 for a in m["accs"] + m["val_accs"])
            assert m["mean"] == pytest.approx(np.mean(m["accs"]))
            assert m["std"] == pytest.approx(np.std(m["accs"], ddof=1))
            assert m["ci95"][0] <= m["mean"] <= m["ci95"][1]
        # the baseline is the non-generative recipe with the best validation mean; gains pair with it
        chosen = ev["baselines"][str(shots)]
        val_means = {m: r[m]["val_mean"] for m in METHODS[:3]}  # the control is non-generative: it competes
        assert chosen["method"] == max(val_means, key=val_means.get) and chosen["val_means"] == pytest.approx(val_means)
        base = chosen["method"]
        assert "gain" not in r[base]
        for m in [x for x in METHODS if x != base]:
            g = r[m]["gain"]  # paired with the chosen baseline, same subset and seed
            assert g["mean"] == pytest.approx(np.mean(np.asarray(r[m]["accs"]) - np.asarray(r[base]["accs"])))
            assert g["lo"] <= g["mean"] <= g["hi"] and g["n_pairs"] == 4 and g["n_subsets"] == 2
            assert g["significant"] == (g["lo"] > 0 or g["hi"] < 0)
            assert r[m]["val_gain"]["mean"] == pytest.approx(
                np.mean(np.asarray(r[m]["val_accs"]) - np.asarray(r[base]["val_accs"]))
            )
        g = ev["generators"][str(shots)]["cgan"]
        assert g["n_synthetic"] == 40 and 0.0 <= g["cas"]["mean"] <= 1.0 and len(g["cas"]["accs"]) == 2
        assert np.isfinite(g["fid"]) and 0.0 <= g["memorisation"] <= 1.0 and 0.0 <= g["copy_rate"] <= 1.0
        # one generator per subset, trained on exactly that few-shot subset
        from imgaug_gen.generators.base import read_run_config

        runs = {d: g["subsets"][d]["run_dir"] for d in ("0", "1")}
        assert runs["0"] != runs["1"]
        for d, run in runs.items():
            data = read_run_config(f"{run}/generator")["data"]["args"]
            assert data["shots"] == shots and data["seed"] == int(d)
    # the headline is the generative method with the best mean validation gain
    sel = ev["selected"]
    val = {m: np.mean([ev["results"][s][m]["val_gain"]["mean"] for s in ("3", "4")]) for m in METHODS[3:]}
    assert sel["method"] == max(val, key=val.get) and sel["val_gain"] == pytest.approx(val[sel["method"]])
    assert ev["dataset"]["n_test"] == 355 and ev["dataset"]["n_val"] > 300  # fixed, never trained on
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(ev["results"]))
    md = (out / "results.md").read_text()
    assert "| real+cgan+classical@replace" in md and "3 shots" in md and "CAS" in md and "Headline" in md
    assert "memorisation" in md and "95 %" in md
    with Image.open(out / "accuracy_vs_shots.png") as im:
        assert im.format == "PNG" and im.size[0] > 600  # accuracy and gain panels
    # the evaluation's `metrics` block scored the generators' folders: their domain network is its recipe
    recipes = [json.loads(p.read_text())["recipe"] for p in (out / "cache" / "domain_features").glob("*.json")]
    assert recipes and all(r["steps"] == 30 for r in recipes)


def test_the_evaluation_metrics_apply_to_generate_entries_under_their_own_keys(tmp_path):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.evaluate.sources import _apply_metrics

    ev = eval_cfg(tmp_path, "metrics.domain_steps=30", "metrics.seed=7")
    for own, steps, seed in (
        ([], 30, 7),
        (["metrics.domain_steps=5"], 5, 7),
        (["metrics=default"], 300, 0),  # another metrics config chosen: none of the evaluation's keys
    ):
        gcfg = compose_config("generate", ["run_dir=r", "out_dir=o", *own])
        _apply_metrics(gcfg, ev.metrics, own)
        assert (gcfg.metrics.domain_steps, gcfg.metrics.seed) == (steps, seed)


def test_evaluate_validation_test_and_shots_are_disjoint():
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.evaluate.sources import subset_datamodule as _datamodule

    cfg = compose_config("evaluate", ["out_dir=/tmp/unused"])
    ids = {}
    for seed in (0, 1):
        dm, _ = _datamodule(cfg, 10, seed)
        test, val, train = (
            set(map(tuple, a[0].reshape(len(a[0]), -1).tolist()))
            for a in (dm.test_arrays(), dm.val_arrays(), dm.train_arrays())
        )
        ids[seed] = (dm._test_idx, dm._val_idx, dm._train_idx)
        assert not set(dm._val_idx) & set(dm._test_idx)
        assert not set(dm._train_idx) & (set(dm._val_idx) | set(dm._test_idx))
    assert (ids[0][0] == ids[1][0]).all() and (ids[0][1] == ids[1][1]).all()  # fixed splits
    assert set(ids[0][2]) != set(ids[1][2])  # another subset


def test_evaluate_rerun_reuses_runs_and_results(evaluated, tmp_path):
    from imgaug_gen.jobs.evaluate import evaluate

    out, ev = evaluated
    lines = (out / "classifier_runs.jsonl").read_text().splitlines()
    again = evaluate(eval_cfg(out, *EVALUATED, f"metrics.cache_dir={out / 'cache'}"))
    assert all(s["reused_run"] for s in again["generators"]["3"]["cgan"]["subsets"].values())
    reused = again["generators"]["3"]["cgan"]
    assert reused["trained_at"] == ev["generators"]["3"]["cgan"]["trained_at"] <= time.time()  # when it was trained
    assert (out / "classifier_runs.jsonl").read_text().splitlines() == lines  # nothing retrained
    assert again["results"] == ev["results"]  # read back from the cache, seconds included


def test_evaluate_is_deterministic(evaluated, tmp_path):
    from imgaug_gen.jobs.evaluate import evaluate

    _, ev = evaluated
    # one subset of the fixture's job, alone: the same accuracies as its (subset, seed) pairs there
    fresh = evaluate(eval_cfg(tmp_path / "e2", "shots=[3]", "data_seeds=[0]", "seeds=[0,1]"))
    for m, v in fresh["results"]["3"].items():
        there = ev["results"]["3"][m]
        assert v["pairs"] == [[0, 0], [0, 1]] and v["accs"] == there["accs"][:2] and there["pairs"][:2] == v["pairs"]


def test_evaluate_existing_run_and_folder_entries(trained_cgan, tmp_path):
    from imgaug_gen.jobs.evaluate import evaluate
    from imgaug_gen.jobs.generate import generate

    folder = tmp_path / "gen"
    generate(gen_cfg(trained_cgan, folder, "score=false", "include_real=false"))
    # the fixture's run trained with no validation split: the evaluation must match its subset
    ev = evaluate(
        eval_cfg(
            tmp_path / "ev",
            "shots=[6]",
            "seeds=[0]",
            "generators.cgan.enabled=false",
            "data.val_fraction=0",
            "selection=none",
            f"+generators.mine.run_dir={trained_cgan}",
            '+generators.mine.generate=["n_per_class=4"]',
            f"+generators.made.folder={folder}",
            "+generators.made.policies=[concat]",
            "methods=[real,real+mine+classical@replace,real+made+classical@concat]",
        )
    )
    r = ev["results"]["6"]
    # the non-generative recipes a baseline is chosen from always run, before the methods asked for
    assert list(r) == ["real", "real+classical", "real+mine+classical@replace", "real+made+classical@concat"]
    assert ev["baselines"]["6"]["criterion"] == "fixed (no validation split)"
    assert r["real+made+classical@concat"]["n_train"] == 180 + 80
    assert r["real+mine+classical@replace"]["n_train"] == 180 + 80
    assert ev["generators"]["6"]["mine"]["run_dir"] == str(trained_cgan.resolve())


@pytest.mark.parametrize(
    "extra, match",
    [
        (["shots=[0]"], "shots"),
        (["seeds=[]"], "seeds"),
        (["methods=[real,real+nope]"], "methods"),
        (["+generators.cgan.oops=1"], "generators.cgan.*oops"),
        (["+generators.x.run_of=ddpm"], "generators.x.run_of"),
        (["+generators.x.folder=/does/not/exist"], "/does/not/exist"),
        (["+generators.x.train=[]", "+generators.x.run_dir=/tmp"], "exactly one"),
        (["classifier.steps=0"], "classifier.steps"),
        (["data_seeds=[0,0]"], "data_seeds"),
        (["selection=test"], "selection"),
        (["data.val_fraction=0"], "data.val_fraction"),
        (["policies.replace.p=1.5"], "policies.replace.p"),
        (["policies.replace.name=swap"], "policies.replace.name"),
        (["+policies.replace.q=1"], "policies.replace.*q"),
        (["+generators.cgan.policies=[nope]"], "generators.cgan.policies"),
        (["+generators.copies.folder=/tmp"], "generators.copies.*copies control"),
    ],
)
def test_evaluate_config_errors_before_work(tmp_path, extra, match):
    from imgaug_gen.jobs.evaluate import evaluate

    with pytest.raises(ConfigError, match=match):
        evaluate(eval_cfg(tmp_path / "ev", *extra))
    assert not (tmp_path / "ev").exists()  # nothing written


def test_the_copies_control_comes_with_each_distilling_policy_in_use(tmp_path):
    from imgaug_gen.jobs.evaluate.config import check_evaluate_config, control_methods

    def controls(*extra):
        cfg = eval_cfg(tmp_path / "ev", *extra)
        return list(control_methods(cfg, *check_evaluate_config(cfg)))

    assert controls() == ["real+copies+classical@kd"]
    assert controls("distill_control=false") == []
    assert controls("+generators.cgan.policies=[concat,replace]") == []  # kd unused: no teacher to control for
    assert controls("+policies.kd2={name:replace,p:0.5,distill:1.0}") == [
        "real+copies+classical@kd",
        "real+copies+classical@kd2",
    ]


def test_a_copies_control_with_the_best_validation_accuracy_is_the_baseline():
    from imgaug_gen.jobs.evaluate.selection import choose_baseline, select_headline

    def runs(val):
        return {(0, s): {"val_accuracy": val + 0.01 * s, "accuracy": val} for s in range(3)}

    by_method = {
        "real": runs(0.5),
        "real+classical": runs(0.6),
        "real+copies+classical@kd": runs(0.7),
        "real+g+classical@kd": runs(0.8),
    }
    assert choose_baseline(by_method, with_init=False)["method"] == "real+copies+classical@kd"
    # never the headline: it generates nothing
    gain = {"val_gain": {"mean": 0.1}}
    results = {"5": {"real+copies+classical@kd": {"val_gain": {"mean": 0.5}}, "real+g+classical@kd": gain}}
    assert select_headline(results)["method"] == "real+g+classical@kd"


def test_evaluate_run_dir_of_other_subset_is_refused(trained_cgan, tmp_path):
    from imgaug_gen.jobs.evaluate import evaluate

    with pytest.raises(ConfigError, match="shots=6"):
        evaluate(
            eval_cfg(
                tmp_path / "ev",
                "shots=[3]",
                "generators.cgan.enabled=false",
                f"+generators.mine.run_dir={trained_cgan}",
            )
        )
    # same shots, but the run may have trained on what is now the validation split
    with pytest.raises(ConfigError, match="data.val_fraction=0.0"):
        evaluate(
            eval_cfg(
                tmp_path / "ev",
                "shots=[6]",
                "generators.cgan.enabled=false",
                f"+generators.mine.run_dir={trained_cgan}",
            )
        )


def test_evaluate_cli_help_and_typo():
    help_ = fastcli.run([sys.executable, "evaluate.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_.returncode == 0 and "generators" in help_.stdout
    typo = fastcli.run(
        [sys.executable, "evaluate.py", "out_dir=/tmp/x", "shotz=[3]"], cwd=ROOT, capture_output=True, text=True
    )
    assert typo.returncode != 0 and "shotz" in typo.stderr


def test_copy_rate_separates_copies_from_new_images_of_the_class():
    """Fresh real images score the COPY_QUANTILE by construction; copies of the training images score 1."""
    from imgaug_gen.metrics.memorisation import COPY_QUANTILE
    from imgaug_gen.metrics.memorisation import memorisation as _memorisation

    from conftest import digits_images

    x = np.stack(digits_images(n_per_class=150, classes=(3,), size=8, channels=1)[0])
    train, heldout, fresh = x[:20], x[20:85], x[85:150]
    copies = _memorisation(np.concatenate([train, train]), train, heldout)
    assert copies["copy_rate"] == 1.0 and copies["memorisation"] == 1.0
    new = _memorisation(fresh, train, heldout)
    assert new["copy_rate"] == pytest.approx(COPY_QUANTILE, abs=0.06)  # another fresh sample: near the quantile
    assert _memorisation(fresh, train, heldout[:0])["copy_rate"] is None  # no held-out images: not measured


def test_benchmark_tables_mark_only_runs_trained_before_they_started(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _common import generator_rows

    old = {"train_seconds": 50.0, "trained_at": 100.0, "reused_run": True}
    new = {"train_seconds": 30.0, "trained_at": 200.0, "reused_run": True}  # a unit of this run trained it
    legacy = {"train_seconds": 40.0, "reused_run": True}  # no trained_at: before the field existed
    ev = {"generators": {"2": {"old": old, "new": new, "legacy": legacy}}}
    seconds = {r[1]: r[-1] for r in generator_rows(ev, since=150.0)}
    assert seconds == {"old": "50 (earlier run)", "new": "30", "legacy": "40 (earlier run)"}
    assert all(r[-1].endswith("(earlier run)") for r in generator_rows(ev))  # without a start: evaluate's flag
    # the results page's by-line counts the subsets' generator runs this benchmark trained (edits entries: none)
    from _common import reuse_note

    for info in (old, new, legacy):
        info["subsets"] = {"0": dict(info), "1": dict(info)}
    ev["generators"]["2"]["edits"] = {"subsets": {"0": {"n_synthetic": 10}}}  # run_of: trains nothing
    assert (
        reuse_note(ev, since=150.0)
        == "2 of 6 generator runs trained in this run, the others reused from an earlier run"
    )
    assert (
        reuse_note(ev, since=50.0) == "4 of 6 generator runs trained in this run, the others reused from an earlier run"
    )
