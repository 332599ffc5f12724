"""The fixed-recipe classifier runs of one (shots, subset): every method, every seed, cached by a hash of
everything that decides them (``OUT/classifier_runs.jsonl``)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgaug_gen.jobs.evaluate.config import BASELINE, TRANSFER_BASELINE, method_name


def deciding_recipe(recipe: Mapping[str, Any], transfer: bool) -> dict[str, Any]:
    """The recipe keys that decide a run's result, for its cache key: ``init_lr_scale`` only in a transfer run,
    and not at 1.0 (how transfer runs trained before the key existed, so their cached results stay valid)."""
    return {k: v for k, v in recipe.items() if k != "init_lr_scale" or (transfer and v != 1.0)}


@dataclass
class TrainingSet:
    """Images a classifier trains on: uint8 ``[N, H, W, C]``, their labels, and their groups (the real
    image each one is a view of: itself, the original of a classical copy, the image an img2img edit
    edits; -1 for a sample from noise), which the ``replace`` policy pairs by."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def astuple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.images, self.labels, self.groups

    def plus(self, other: "TrainingSet") -> "TrainingSet":
        return TrainingSet(
            np.concatenate([self.images, other.images]),
            np.concatenate([self.labels, other.labels]),
            np.concatenate([self.groups, other.groups]),
        )


@dataclass
class SyntheticSet:
    """One generator entry's images of a (shots, subset): as written, and with their classical copies."""

    images: TrainingSet
    mixed: TrainingSet | None = None


def digest(*parts: Any) -> str:
    """sha1 of arrays (their bytes) and JSON-able values, in order."""
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()


class ResultCache:
    """Classifier results keyed by a hash of everything that decides them; one JSON line each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.rows[row["key"]] = row
                except (ValueError, KeyError):
                    continue  # a torn last line from a killed run

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, row: dict) -> None:
        self.rows[row["key"]] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class Classifiers:
    """Trains (or reads back) the fixed-recipe classifier of one (shots, subset): every method, every seed,
    scored on the test and validation splits. With ``init`` (``classifier.init``) the ``transfer`` methods
    and every generative method start from that classifier's features; ``real`` / ``real+classical`` stay
    from scratch. The teacher of a distilling policy is the same seed's ``transfer+classical`` classifier
    (``real+classical`` without an init), (re)trained deterministically only when a distilling run is not
    cached."""

    def __init__(
        self,
        cache: ResultCache,
        recipe: dict,
        num_classes: int,
        test,
        val,
        shots,
        data_seed: int,
        init: str | None = None,
    ):
        from imgaug_gen.io import tree_hash

        self.cache, self.recipe, self.num_classes = cache, recipe, num_classes
        self.test, self.val, self.shots, self.data_seed = test, val, shots, int(data_seed)
        self.split_key = digest(test[0], test[1], val[0], val[1])
        self.init, self.init_key = init, (tree_hash(init) if init else None)
        self.teacher = TRANSFER_BASELINE if init else BASELINE
        #: the set the teacher learns from (the `real+classical` set); default: the `real` set of the distilling run
        self.teacher_data: TrainingSet | None = None
        self._teachers: dict[int, Any] = {}

    def key(
        self, seed: int, real: TrainingSet, synthetic: TrainingSet | None = None, policy=None, transfer: bool = False
    ) -> str:
        """The cache key of a run: everything that decides its result."""
        pol = None if policy is None else policy.to_dict()
        transfer = transfer and self.init is not None
        return digest(
            *real.astuple(),
            *(synthetic.astuple() if synthetic is not None else ()),
            pol,
            deciding_recipe(self.recipe, transfer),
            int(seed),
            self.split_key,
            *([self.init_key] if transfer else []),
        )

    def teacher_model(self, seed: int, data: TrainingSet):
        """The same seed's teacher (``self.teacher`` trained on ``data``), trained once and kept."""
        if seed not in self._teachers:
            self.run(self.teacher, seed, data, keep_model=True, transfer=True)
        return self._teachers[seed]

    def run(
        self,
        method: str,
        seed: int,
        real: TrainingSet,
        synthetic: TrainingSet | None = None,
        policy=None,
        keep_model: bool = False,
        transfer: bool = False,
    ) -> dict:
        from imgaug_gen.metrics.downstream import predict_logits, train_and_test

        transfer = transfer and self.init is not None
        key = self.key(seed, real, synthetic, policy, transfer)
        row = self.cache.get(key)
        if row is not None and not (keep_model and seed not in self._teachers):
            return row
        kwargs: dict[str, Any] = {"init": self.init} if transfer else {}
        if synthetic is not None:
            kwargs.update(synthetic=synthetic.astuple(), policy=policy, train_groups=real.groups)
            if policy.distill > 0:
                if seed not in self._teachers:  # the (+classical) set the teacher learns from
                    self.teacher_model(seed, self.teacher_data if self.teacher_data is not None else real)
                kwargs["teacher_logits"] = predict_logits(
                    self._teachers[seed], synthetic.images, self.recipe.get("input_size")
                )
        t0 = time.perf_counter()
        d = train_and_test(
            real.images,
            real.labels,
            self.test[0],
            self.test[1],
            self.num_classes,
            int(seed),
            eval_sets={"val": self.val} if len(self.val[0]) else None,
            return_details=True,
            return_model=keep_model,
            **kwargs,
            **self.recipe,
        )
        if keep_model:
            self._teachers[seed] = d["model"]
        if row is None:
            row = {
                "key": key,
                "shots": self.shots,
                "data_seed": self.data_seed,
                "method": method,
                "seed": int(seed),
                "accuracy": d["accuracy"],
                "val_accuracy": d["eval"].get("val"),
                "n_train": d["n_train"],
                "seconds": round(time.perf_counter() - t0, 2),
            }
            self.cache.put(row)
        return row


def runs_for_subset(
    clf: Classifiers,
    seeds: list[int],
    real: TrainingSet,
    classical: TrainingSet,
    syn: Mapping[str, SyntheticSet],
    entries: Mapping[str, dict],
    policies: Mapping[str, Any],
    wanted: list[str] | None,
    cas_seeds: int,
    controls: Mapping[str, tuple[TrainingSet, Any]] | None = None,
) -> list[dict]:
    """Every (method, seed) row of one (shots, subset), CAS rows included; ``controls``: the copies controls to
    run (``{method: (the shots and their classical copies, policy)}``), each like a generative method."""
    rows = []
    clf.teacher_data = classical

    def want(m: str) -> bool:
        return wanted is None or m in wanted

    distills = any(policies[p].distill > 0 for e in entries.values() for p in e["policies"])
    for seed in seeds:
        for m, data, transfer in (
            ("real", real, False),
            (BASELINE, classical, False),
            *((("transfer", real, True), (TRANSFER_BASELINE, classical, True)) if clf.init else ()),
        ):
            if want(m) or m == clf.teacher and distills:
                rows.append(clf.run(m, seed, data, transfer=transfer))
        for m, (copies, policy) in (controls or {}).items():
            rows.append({**clf.run(m, seed, classical, copies, policy, transfer=True), "method": m})
        for g, sets in syn.items():
            for pname in entries[g]["policies"]:
                m = method_name(g, pname)
                if want(m):
                    rows.append(
                        {**clf.run(m, seed, classical, sets.mixed, policies[pname], transfer=True), "method": m}
                    )
    for g, sets in syn.items():
        for seed in seeds[:cas_seeds]:
            own = TrainingSet(sets.images.images, sets.images.labels, np.arange(len(sets.images)))
            rows.append({**clf.run(f"{g} only", seed, own), "method": f"cas:{g}"})
    return rows
