"""evaluate.py's pseudo-label baseline `real+pseudo+classical` (an unlabelled pool in the data), on tiny settings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgaug_gen.errors import ConfigError

from conftest import gen_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

THRESHOLDS = [0.2, 0.35, 0.5]
TINY = [
    "shots=[2]",
    "data_seeds=[0]",
    "seeds=[0,1]",
    "classifier.steps=30",
    "augment.copies_per_image=2",
    "synthetic_copies=1",
    "cas_seeds=0",
    "generators.cgan.enabled=false",
    "policies={replace:{name:replace,p:0.5},kd:{name:replace,p:0.5,distill:0.5}}",
    f"pseudo.thresholds=[{','.join(map(str, THRESHOLDS))}]",
    "pseudo.copies=1",
]
POOL = ["data.unlabeled=rest", "data.unlabeled_share=0"]
CONTROL = "real+copies+classical@kd"  # the distilling policy's control (the shots as its synthetic images)
OLD = ["real", "real+classical", CONTROL, "real+made+classical@replace", "real+made+classical@kd"]
NEW = ["real+pseudo+classical", "real+pseudo+made+classical@replace", "real+pseudo+made+classical@kd"]


def eval_cfg(out_dir, folder, *extra):
    from imgaug_gen.config import compose_config

    return compose_config(
        "evaluate",
        [
            f"out_dir={out_dir}",
            *TINY,
            f"+generators.made.folder={folder}",
            "+generators.made.policies=[replace,kd]",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def made(trained_cgan, tmp_path_factory):
    """A written synthetic folder (4 per class) that every subset consumes as it is."""
    from imgaug_gen.jobs.generate import generate

    folder = tmp_path_factory.mktemp("made")
    generate(gen_cfg(trained_cgan, folder, "score=false", "include_real=false"))
    return folder


@pytest.fixture(scope="module")
def evaluated(made, tmp_path_factory):
    """The same output folder evaluated without a pool, then with `data.unlabeled=rest`."""
    from imgaug_gen.jobs.evaluate import evaluate

    out = tmp_path_factory.mktemp("ev")
    plain = evaluate(eval_cfg(out, made))
    plain_lines = (out / "classifier_runs.jsonl").read_text().splitlines()
    pooled = evaluate(eval_cfg(out, made, *POOL))
    return out, plain, plain_lines, pooled


def test_pseudo_methods_appear_only_with_a_pool(evaluated):
    out, plain, plain_lines, pooled = evaluated
    assert list(plain["results"]["2"]) == OLD and "pseudo" not in plain
    assert all("gains" not in r for r in plain["results"]["2"].values())
    assert list(pooled["results"]["2"]) == OLD[:2] + NEW[:1] + OLD[2:] + NEW[1:]  # controls after the baselines
    # the old methods: the same training sets, so the same cache keys and results
    for m in OLD:
        assert pooled["results"]["2"][m]["accs"] == plain["results"]["2"][m]["accs"]
    lines = (out / "classifier_runs.jsonl").read_text().splitlines()
    assert lines[: len(plain_lines)] == plain_lines
    added = {json.loads(line)["method"] for line in lines[len(plain_lines) :]}
    assert added == {f"real+pseudo@{t:g}+classical" for t in THRESHOLDS} | set(NEW[1:])
    # the pseudo-labelled set: real+classical plus the kept pool images and one classical copy of each
    kept = pooled["pseudo"]["2"]["subsets"]["0"]["runs"]
    n_pseudo = (
        pooled["results"]["2"]["real+pseudo+classical"]["n_train"] - pooled["results"]["2"]["real+classical"]["n_train"]
    )
    assert n_pseudo == 2 * kept["0"]["kept"]
    assert pooled["pseudo"]["2"]["pool_size"] > 1000  # digits: the training split outside the 20 shots


def test_threshold_is_chosen_on_validation(evaluated):
    _, _, _, ev = evaluated
    p = ev["pseudo"]["2"]
    sub = p["subsets"]["0"]
    val_means = {t: np.mean([r["val_accuracy"] for r in sub["grid"][f"{t:g}"]]) for t in THRESHOLDS}
    assert sub["val_means"] == pytest.approx({f"{t:g}": v for t, v in val_means.items()})
    best = max(THRESHOLDS, key=lambda t: val_means[t])  # first of equals
    assert sub["threshold"] == best and p["chosen"] == {"0": best}
    assert p["grid"][f"{best:g}"]["chosen_in"] == ["0"]
    chosen = sub["grid"][f"{best:g}"]
    r = ev["results"]["2"]["real+pseudo+classical"]
    assert r["accs"] == [x["accuracy"] for x in chosen] and r["val_accs"] == [x["val_accuracy"] for x in chosen]
    # lower thresholds keep at least as many images; purity is measured for `rest` (labels known to the data)
    kept = [p["grid"][f"{t:g}"]["kept_mean"] for t in THRESHOLDS]
    assert kept == sorted(kept, reverse=True) and kept[0] > 0
    assert 0.0 <= p["grid"][f"{THRESHOLDS[0]:g}"]["purity"] <= 1.0
    # the baseline choice counts real+pseudo+classical among the non-generative recipes
    assert set(ev["baselines"]["2"]["val_means"]) == {"real", "real+classical", "real+pseudo+classical", CONTROL}


def test_recorded_pseudo_labels_are_data_with_confidence(evaluated):
    from imgaug_gen.jobs.evaluate.sources import subset_datamodule

    out, _, _, ev = evaluated
    sub = ev["pseudo"]["2"]["subsets"]["0"]
    dm, _ = subset_datamodule(eval_cfg(out, "unused", *POOL), 2, 0)
    pool_ids = {r["id"] for r in dm.unlabeled_records()}
    shot_ids = {r["id"] for r in dm.train_records()}
    for seed in ("0", "1"):
        path = out / "pseudo" / f"shots2_d0_s{seed}.jsonl"
        assert sub["runs"][seed]["records"] == str(path)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == sub["runs"][seed]["kept"] == sum(sub["runs"][seed]["kept_per_class"].values())
        for row in rows:
            assert row["source"] == "pseudo" and row["threshold"] == sub["threshold"]
            assert row["confidence"] >= sub["threshold"] and row["confidence"] <= 1.0
            assert 0 <= row["label"] < 10 and row["class_name"] == dm.class_names[row["label"]]
            assert row["teacher"] == "real+classical" and row["teacher_seed"] == int(seed)
            assert row["id"] in pool_ids and row["id"] not in shot_ids
        assert len({r["id"] for r in rows}) == len(rows)


def test_generative_gains_against_both_baselines(evaluated):
    out, _, _, ev = evaluated
    r = ev["results"]["2"]
    for m in OLD[2:] + NEW[1:]:
        for ref in ("real+classical", "real+pseudo+classical"):
            g = r[m]["gains"][ref]
            assert g["mean"] == pytest.approx(np.mean(np.asarray(r[m]["accs"]) - np.asarray(r[ref]["accs"])))
            assert g["lo"] <= g["mean"] <= g["hi"] and g["n_pairs"] == 2
            assert r[m]["val_gains"][ref]["mean"] == pytest.approx(
                np.mean(np.asarray(r[m]["val_accs"]) - np.asarray(r[ref]["val_accs"]))
            )
    assert all("gains" not in r[m] for m in ("real", "real+classical", "real+pseudo+classical"))
    assert ev["selected"]["method"] in OLD[3:] + NEW[1:]  # never the control: it generates nothing
    md = (out / "results.md").read_text()
    assert "pseudo-labels (`real+pseudo+classical`)" in md and "beyond the pseudo-labels" in md
    assert "| real+pseudo+made+classical@kd |" in md and "vs `real+pseudo+classical`" in md


def test_rerun_reuses_the_cache(evaluated, made, monkeypatch):
    from imgaug_gen.jobs.evaluate import evaluate
    from imgaug_gen.jobs.evaluate.classifiers import Classifiers

    out, _, _, ev = evaluated
    lines = (out / "classifier_runs.jsonl").read_text().splitlines()

    def no_teacher(*a, **k):
        raise AssertionError("a re-run trained a teacher")

    monkeypatch.setattr(Classifiers, "teacher_model", no_teacher)  # the pool's labels are read back too
    again = evaluate(eval_cfg(out, made, *POOL))
    assert (out / "classifier_runs.jsonl").read_text().splitlines() == lines
    assert again["results"] == ev["results"] and again["pseudo"] == ev["pseudo"]


def test_methods_filter_keeps_working(evaluated, made):
    from imgaug_gen.jobs.evaluate import evaluate

    out, _, _, _ = evaluated
    lines = (out / "classifier_runs.jsonl").read_text().splitlines()
    ev = evaluate(eval_cfg(out, made, *POOL, "methods=[real+classical,real+pseudo+made+classical@replace]"))
    assert set(ev["results"]["2"]) <= {
        "real+classical",
        "real+pseudo+made+classical@replace",
        ev["baselines"]["2"]["method"],
    }
    assert "real+pseudo+made+classical@replace" in ev["results"]["2"] and "pseudo" in ev
    assert (out / "classifier_runs.jsonl").read_text().splitlines() == lines  # every run was cached
    off = evaluate(eval_cfg(out, made, *POOL, "methods=[real,real+classical]"))  # nothing pseudo asked for
    assert "pseudo" not in off and list(off["results"]["2"]) == ["real", "real+classical"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["methods=[real,real+pseudo+classical]"], "data.unlabeled=rest"),
        ([*POOL, "data.val_fraction=0", "selection=none"], "pseudo.thresholds"),
        ([*POOL, "pseudo.thresholds=[0.5,1.5]"], "pseudo.thresholds"),
        ([*POOL, "pseudo.thresholds=[]"], "pseudo.thresholds"),
        ([*POOL, "pseudo.copies=-1"], "pseudo.copies"),
    ],
)
def test_pseudo_config_errors_before_work(tmp_path, made, extra, match):
    from imgaug_gen.jobs.evaluate import evaluate

    with pytest.raises(ConfigError, match=match):
        evaluate(eval_cfg(tmp_path / "ev", made, *extra))
    assert not (tmp_path / "ev").exists()


def test_method_names_stay_distinct(tmp_path, made):
    from omegaconf import OmegaConf, open_dict

    from imgaug_gen.jobs.evaluate.config import check_evaluate_config

    cfg = eval_cfg(tmp_path / "ev", made, *POOL)
    with open_dict(cfg):
        cfg.generators["pseudo+made"] = OmegaConf.create({"folder": str(made), "policies": ["replace"]})
    with pytest.raises(ConfigError, match="twice"):  # `real+pseudo+made+classical@replace`, two ways
        check_evaluate_config(cfg)


def test_pool_off_by_config_is_silent():
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.evaluate.config import method_names, pseudo_settings

    base = ["out_dir=/tmp/unused"]
    assert pseudo_settings(compose_config("evaluate", base)) is None
    assert pseudo_settings(compose_config("evaluate", [*base, *POOL, "pseudo.enabled=false"])) is None
    assert pseudo_settings(compose_config("evaluate", [*base, *POOL])) == {"thresholds": [0.5, 0.8, 0.95], "copies": 0}
    entries = {"g": {"policies": ["replace"]}}
    assert method_names(entries) == ["real", "real+classical", "real+g+classical@replace"]
    assert method_names(entries, pseudo=True) == [
        "real",
        "real+classical",
        "real+pseudo+classical",
        "real+g+classical@replace",
        "real+pseudo+g+classical@replace",
    ]


# --------------------------------------------------------------------------- the parts, on arrays


def test_keep_confident_and_records():
    from imgaug_gen.metrics.pseudo_labels import keep_confident

    labels = np.array([0, 1, 2, 1, 0])
    conf = np.array([0.95, 0.5, 0.8, 0.79999, 0.8], dtype=np.float32)
    kept = keep_confident(labels, conf, 0.8)
    assert kept.index.tolist() == [0, 2, 4] and kept.labels.tolist() == [0, 2, 0] and kept.pool_size == 5
    assert kept.per_class(3) == [2, 0, 1]
    rows = kept.records(["a", "b", "c", "d", "e"], ["x", "y", "z"], "real+classical")
    assert [r["id"] for r in rows] == ["a", "c", "e"] and all(r["confidence"] >= 0.8 for r in rows)
    assert rows[1] == {
        "id": "c",
        "label": 2,
        "class_name": "z",
        "source": "pseudo",
        "confidence": pytest.approx(0.8),
        "teacher": "real+classical",
        "threshold": 0.8,
    }
    assert len(keep_confident(labels, conf, 1.0)) == 0
    with pytest.raises(ConfigError, match="threshold"):
        keep_confident(labels, conf, 1.5)


def test_choose_threshold_by_validation_mean():
    from imgaug_gen.jobs.evaluate.pseudo import choose_threshold

    run = lambda val, test: {"val_accuracy": val, "accuracy": test}
    grid = {0.5: [run(0.6, 0.9), run(0.6, 0.9)], 0.8: [run(0.7, 0.1), run(0.5, 0.1)], 0.95: [run(0.65, 0.5)] * 2}
    c = choose_threshold(grid)
    assert c["threshold"] == 0.95 and c["val_means"] == pytest.approx({"0.5": 0.6, "0.8": 0.6, "0.95": 0.65})
    tie = choose_threshold({0.8: [run(0.6, 0)], 0.5: [run(0.6, 1)]})
    assert tie["threshold"] == 0.8  # first of equals, in the config's order; never the test split
    assert choose_threshold({0.8: [run(None, 0)], 0.5: [run(None, 1)]})["threshold"] == 0.8


def test_pseudo_set_groups_and_copies():
    from imgaug_gen.jobs.evaluate.classifiers import TrainingSet
    from imgaug_gen.jobs.evaluate.pseudo import PseudoJob, UnlabeledPool, pseudo_set
    from imgaug_gen.metrics.pseudo_labels import keep_confident

    images = np.arange(4 * 2 * 2 * 1, dtype=np.uint8).reshape(4, 2, 2, 1)
    pool = UnlabeledPool(images, [{"id": str(i)} for i in range(4)], None, "k")
    copies = TrainingSet(np.concatenate([images + 100, images + 200]), np.zeros(8, np.int64), np.tile(np.arange(4), 2))
    classical = TrainingSet(images[:0], np.zeros(0, np.int64), np.zeros(0, np.int64))
    job = PseudoJob(None, classical, 3, pool, copies, 2, [0.5], ["a", "b"], None, "t")
    kept = keep_confident(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.6, 0.7]), 0.5)
    s = pseudo_set(job, kept)
    assert len(s) == 3 * 3
    assert s.groups.tolist() == [3, 5, 6] * 3  # own groups, past the real images' 0..2; copies share them
    assert s.labels.tolist() == [1, 1, 0] * 3
    assert (s.images[:3] == images[[0, 2, 3]]).all() and (s.images[3:6] == images[[0, 2, 3]] + 100).all()
    assert (s.images[6:] == images[[0, 2, 3]] + 200).all()


def test_true_labels_only_where_the_pixels_are_known():
    from imgaug_gen.jobs.evaluate.pseudo import _true_labels

    ref = np.stack([np.full((2, 2, 1), v, np.uint8) for v in (1, 2, 3, 3)])
    pool = np.stack([np.full((2, 2, 1), v, np.uint8) for v in (2, 3, 9)])
    assert _true_labels(pool, ref, np.array([0, 1, 2, 2])).tolist() == [1, 2, -1]
    assert _true_labels(pool, ref, np.array([0, 1, 2, 0])).tolist() == [1, -1, -1]  # two labels: unknown
    assert _true_labels(pool[2:], ref, np.array([0, 1, 2, 2])) is None  # a user folder: not known


def test_no_generator_entry_evaluates_the_baselines_only():
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.evaluate.config import check_evaluate_config

    cfg = compose_config("evaluate", ["out_dir=/tmp/unused", "~generators", "+generators={}"])
    entries, _ = check_evaluate_config(cfg)
    assert entries == {}
