"""Checking an evaluate config: the generator entries, the policies, the methods they make."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from imgaug_gen.errors import require
from imgaug_gen.io import overlaps

log = logging.getLogger(__name__)

ENTRY_SOURCES = ("train", "run_of", "run_dir", "folder")


SEED_STRIDE = 1_000_003


BASELINE = "real+classical"


#: with `classifier.init`: the same two sets on the transferred classifier
TRANSFER_BASELINE = "transfer+classical"


#: with an unlabelled pool (`data.unlabeled` / `data.unlabeled_root`): `real+classical` plus the pool's images
#: that the teacher labels with confidence >= the validation-chosen threshold (imgaug_gen.jobs.evaluate.pseudo)
PSEUDO_BASELINE = "real+pseudo+classical"


#: the control of a distilling policy: the shots themselves as its synthetic images (a generator that only copies;
#: under distillation, self-distillation from the same teacher); a non-generative recipe, so it competes for the
#: baseline (`distill_control`)
COPIES = "copies"


def is_control(method: str) -> bool:
    """Whether ``method`` is a copies control (``real+copies+classical@<P>``): non-generative."""
    return method.startswith(f"real+{COPIES}+")


def control_methods(cfg: DictConfig, entries: Mapping[str, Mapping], policies: Mapping[str, Any]) -> dict[str, str]:
    """``{real+copies+classical@<P>: P}`` for each distilling policy ``P`` an entry uses, in ``policies`` order
    (none with ``distill_control: false``)."""
    if not cfg.get("distill_control", True):
        return {}
    used = {p for e in entries.values() for p in e["policies"]}
    return {method_name(COPIES, p): p for p, pol in policies.items() if p in used and pol.distill > 0}


def generator_entries(cfg: DictConfig, policies: Mapping[str, Any]) -> dict[str, dict]:
    given = cfg.get("generators")  # typed by schemas.Evaluate; {} (no generator) evaluates the baselines only
    gens = OmegaConf.to_container(given, resolve=True) if given is not None else {}
    out = {}
    for name, e in gens.items():
        if e is None or not e.get("enabled", True):
            continue
        where = f"generators.{name}"
        given = [k for k in ENTRY_SOURCES if e.get(k) is not None]
        require(
            "/" not in str(name) and "@" not in str(name) and not str(name).startswith("."),
            f"`{where}`: the entry name is used as a folder name; use letters, digits, '_' or '-'.",
        )
        require(
            str(name) != COPIES,
            f"`{where}`: the name {COPIES!r} is the copies control's (`distill_control`); rename the entry.",
        )
        pols = e.get("policies")
        require(
            pols is None or (isinstance(pols, list) and len(pols) > 0 and all(p in policies for p in pols)),
            f"`{where}.policies` = {pols!r}; give null (every entry of `policies`) or a list of names from "
            f"{sorted(policies)}.",
        )
        out[str(name)] = {"source": given[0], **e, "policies": list(pols or policies)}
    for name, e in out.items():
        if e["source"] == "run_of":
            ref = e["run_of"]
            require(
                ref in out and out[ref]["source"] in ("train", "run_dir"),
                f"`generators.{name}.run_of` = {ref!r} must name an enabled entry with `train:` or `run_dir:` "
                f"(enabled: {sorted(out)}).",
            )
        if e["source"] in ("run_dir", "folder"):
            p = Path(e[e["source"]])
            require(p.is_dir(), f"`generators.{name}.{e['source']}` = {str(p)!r} is not a folder.")
            if e["source"] == "folder":
                require(
                    (p / "manifest.jsonl").is_file() or any(p.glob("manifest.shard*.jsonl")),
                    f"`generators.{name}.folder` = {str(p)!r} holds no manifest.jsonl; give a generate.py out_dir.",
                )
    return out


def policies_of(cfg: DictConfig) -> dict[str, Any]:
    from imgaug_gen.data.mixed import MixPolicy

    raw = OmegaConf.to_container(cfg.get("policies") or {}, resolve=True)
    require(
        isinstance(raw, dict) and len(raw) > 0,
        f"`policies` = {raw!r}; give a mapping {{name: {{name: concat|replace|weighted, p: ...}}}} with at "
        "least one entry.",
    )
    out = {}
    for name, p in raw.items():
        require(
            "@" not in str(name) and "/" not in str(name),
            f"`policies.{name}`: the name is used in method names; use letters, digits, '_', '.' or '-'.",
        )
        out[str(name)] = MixPolicy.from_config(p, key=f"policies.{name}")
    return out


def shots_list(cfg: DictConfig) -> list:
    """``shots`` as a list (checked by the schema: distinct positive ints or null = all)."""
    return list(OmegaConf.to_container(cfg.shots, resolve=True))


def wanted_methods(cfg: DictConfig) -> list[str] | None:
    m = cfg.get("methods")
    require(m is None or OmegaConf.is_list(m), f"`methods` = {m!r}; give null (all) or a list of method names.")
    return None if m is None else [str(x) for x in m]


def method_name(generator: str, policy: str, pseudo: bool = False) -> str:
    """``real+<g>+classical@<P>``; ``pseudo``: on top of the pseudo-labelled set, ``real+pseudo+<g>+classical@<P>``."""
    return f"real+{'pseudo+' if pseudo else ''}{generator}+classical@{policy}"


def method_names(
    entries: Mapping[str, Mapping], with_init: bool = False, pseudo: bool = False, controls: list[str] = ()
) -> list[str]:
    """The methods, in report order, for these generator entries (``{name: {"policies": [...]}}``);
    ``pseudo``: with the pseudo-label methods of an unlabelled pool; ``controls``: the copies controls
    (:func:`control_methods`), after the baselines."""
    names = baseline_methods(with_init, pseudo) + list(controls)
    for g, e in entries.items():
        names += [method_name(g, p) for p in e["policies"]]
    if pseudo:
        for g, e in entries.items():
            names += [method_name(g, p, pseudo=True) for p in e["policies"]]
    return names


def baseline_methods(with_init: bool, pseudo: bool = False) -> list[str]:
    """The non-generative recipes a gain is measured against (the best on validation is the baseline)."""
    return [
        "real",
        BASELINE,
        *(("transfer", TRANSFER_BASELINE) if with_init else ()),
        *((PSEUDO_BASELINE,) if pseudo else ()),
    ]


def pseudo_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """The ``pseudo`` block when the data names an unlabelled pool (``data.unlabeled`` / ``data.unlabeled_root``)
    and ``pseudo.enabled``; else None (no pseudo-label method exists)."""
    data = cfg.get("data") or {}
    pool = data.get("unlabeled") not in (None, "", False, "none") or data.get("unlabeled_root") not in (None, "")
    block = OmegaConf.to_container(cfg.pseudo, resolve=True) if cfg.get("pseudo") is not None else {}
    if not pool or not block.get("enabled", True):
        return None
    return {
        "thresholds": [float(t) for t in block.get("thresholds") or [0.5, 0.8, 0.95]],
        "copies": int(block.get("copies") or 0),
    }


def check_evaluate_config(cfg: DictConfig) -> tuple[dict[str, dict], dict[str, Any]]:
    """Validate an evaluate config (the schema :class:`imgaug_gen.schemas.Evaluate`, then the rules that
    need the policies, the filesystem or the recipe); returns the enabled generator entries and the policies."""
    from imgaug_gen.schemas import Evaluate, validate

    require(cfg.get("out_dir") not in (None, "", "???"), "`out_dir` is required: python evaluate.py out_dir=EVAL_DIR.")
    validate(cfg, Evaluate, "evaluate")
    root = (cfg.get("data") or {}).get("root")
    if root not in (None, "", "???"):
        root = str(Path(str(root)).expanduser())
        require(
            not (Path(root).exists() and overlaps(cfg.out_dir, root)),
            f"`out_dir` = {str(cfg.out_dir)!r} and `data.root` = {root!r} overlap (one is, contains or lies inside "
            "the other): the evaluation's runs and folders would land among your images. Choose an `out_dir` "
            "outside `data.root`.",
        )
    if len(cfg.seeds) < 3:
        log.warning(
            "only %d classifier seed(s): the intervals are not meaningful (use seeds=[0,1,2,3,4])", len(cfg.seeds)
        )
    if cfg.selection == "val":
        vf = cfg.data.get("val_fraction", 0.0)
        require(
            isinstance(vf, (int, float)) and vf > 0,
            f"`selection=val` needs a validation split, but `data.val_fraction` = {vf!r}. Set "
            "`data.val_fraction=0.2` (held out per class, never trained on), or `selection=none` to report the "
            "grid without choosing. A folder too small to spare a validation split leaves only cross-validation "
            "on the few-shot images, which evaluate.py does not do: its generators train on those images.",
        )
    from imgaug_gen.metrics.downstream import check_recipe

    check_recipe(
        {k: v for k, v in (OmegaConf.to_container(cfg.classifier, resolve=True) or {}).items() if k != "init"},
        key="classifier",
    )
    policies = policies_of(cfg)
    entries = generator_entries(cfg, policies)
    init = (cfg.classifier or {}).get("init")
    require(
        init is None
        or isinstance(init, str)
        or (OmegaConf.is_dict(init) and set(init) <= {"classes", "steps"} and init.get("classes")),
        f"`classifier.init` = {init!r}; give null, the path of a saved classifier, or {{classes: [...]}} (the "
        "data's other classes, on which evaluate.py trains the init once).",
    )
    if OmegaConf.is_dict(init):
        mine = (cfg.data or {}).get("classes")
        overlap = sorted(set(map(str, init.classes)) & set(map(str, mine or [])))
        require(
            mine is not None and not overlap,
            f"`classifier.init.classes` = {list(init.classes)} and `data.classes` = {mine}: the init must learn "
            "from other classes than the evaluated ones (set `data.classes` to the evaluated classes, disjoint "
            "from the init's).",
        )
    pseudo = pseudo_settings(cfg)
    _check_pseudo(cfg, pseudo)
    known = method_names(entries, init is not None, pseudo is not None, list(control_methods(cfg, entries, policies)))
    dup = sorted({m for m in known if known.count(m) > 1})
    require(not dup, f"the generator entries make the method name(s) {dup} twice; rename the entries.")
    bad = sorted(set(wanted_methods(cfg) or []) - set(known))
    hint = "" if pseudo else " (the `real+pseudo...` methods need an unlabelled pool: data.unlabeled=rest)"
    require(not bad, f"`methods` names unknown method(s) {bad}; known: {known} (null = all){hint}.")
    return entries, policies


def _check_pseudo(cfg: DictConfig, pseudo: dict | None) -> None:
    """The threshold is chosen on the validation split: several thresholds need one."""
    if pseudo is None or len(pseudo["thresholds"]) < 2:
        return
    vf = cfg.data.get("val_fraction", 0.0)
    require(
        isinstance(vf, (int, float)) and vf > 0,
        f"`pseudo.thresholds` = {pseudo['thresholds']} are chosen between on the validation split, but "
        f"`data.val_fraction` = {vf!r}. Set `data.val_fraction=0.2`, or give one threshold, e.g. "
        "`pseudo.thresholds=[0.9]`.",
    )
