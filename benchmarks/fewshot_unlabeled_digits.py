"""Do the unlabelled images users already have make generated data help? Digits, 1 to 10 labelled shots.

    python benchmarks/fewshot_unlabeled_digits.py [--out bench_out/fewshot_unlabeled] [--shots 1 2 5 10]
                                                  [--subsets 0 1 2] [--seeds 0 1 2 3 4] [--workers 2]
                                                  [--generators a,b] [overrides ...]

The protocol (16 px digits, all 10 classes):

* ``shots`` labelled images per class (3 few-shot subsets x 5 classifier seeds); the rest of the training split
  is the unlabelled pool (``data.unlabeled=rest``: labels dropped, never a validation or test image); recipes
  and the baseline are chosen on the fixed validation split, the test split is read once;
* baselines: ``real``, ``real+classical`` and ``real+pseudo+classical`` (the real+classical teacher labels the
  pool; the images above a validation-chosen confidence join the training set);
* generators, each under ``replace`` on top of ``real+classical`` and of ``real+pseudo+classical``:
  ``ddpm_scratch`` (the shots alone: what the pool adds), ``ddpm_semi`` (shots + pool in one run, the pool as
  the null class of classifier-free guidance; its guidance scale chosen on validation between the entries
  ``ddpm_semi`` and ``ddpm_semi_g3``), ``ddpm_pre`` (a DDPM pretrained on the pool alone, fine-tuned on the
  shots through ``model.pretrained``), ``ddpm_pseudo`` (a DDPM on the shots + the teacher's confident
  pseudo-labels, as labelled images), ``cgan_pseudo`` (a cGAN on the same) and ``cgan_pseudo_u`` (that cGAN with
  an unconditional discriminator head that also reads the pool, ``model.unlabeled_weight``).

It runs the real jobs (``train.py`` for the pool prior, ``evaluate.py`` for the rest), one (shots, subset) unit
per single-threaded worker process, then assembles the tables from their finished work; re-running the same
command reuses every finished prior, generator, folder and classifier result. Budget: 90 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (offline environment variables)
from _common import (
    GENERATOR_COLUMNS,
    ROOT,
    benchmark_args,
    evaluation_overrides,
    fmt_gain,
    gain_verdict,
    generator_rows,
    print_table,
    reuse_note,
    run_units,
    unit_argv,
    write_results_page,
)

TARGETS = {"1": 0.030, "2": 0.030, "5": 0.030}  # over real+classical
PSEUDO_TARGET = 0.010  # over real+pseudo+classical
SMALL_UNET = ["model.unet.block_out_channels=[16,32,32]", "model.unet.attention_head_dim=4"]
STEPS = {"ddpm": 400, "ddpm_pre": 200, "cgan": 800}
DDPM = ["experiment=digits_ddpm", "logger=none", *SMALL_UNET, "model.lr_warmup_steps=20"]
SAMPLE = ["n_per_class=50", "sample_kwargs.num_inference_steps=10"]


def prior_run(out: Path) -> Path:
    return out / "priors" / "ddpm_unlabeled"


def grid(out: Path) -> dict[str, dict]:
    """One entry per synthetic source; the validation split chooses among them (and their guidance scales)."""
    shots_only = "data.unlabeled_share=0"
    return {
        "ddpm_scratch": {
            "train": [*DDPM, shots_only, f"trainer.max_steps={STEPS['ddpm']}"],
            "generate": SAMPLE,
            "policies": ["replace"],
        },
        "ddpm_semi": {
            "train": [*DDPM, "data.unlabeled_share=0.5", f"trainer.max_steps={STEPS['ddpm']}"],
            "generate": SAMPLE,
            "policies": ["replace"],
        },
        "ddpm_semi_g3": {
            "run_of": "ddpm_semi",
            "generate": [*SAMPLE, "sample_kwargs.guidance_scale=3.0"],
            "policies": ["replace"],
        },
        "ddpm_pre": {
            "train": [
                *DDPM,
                shots_only,
                f"model.pretrained={prior_run(out)}",
                "model.finetune=full",
                "model.embedding_lr=3e-2",
                f"trainer.max_steps={STEPS['ddpm_pre']}",
            ],
            "generate": SAMPLE,
            "policies": ["replace"],
        },
        "ddpm_pseudo": {
            "train": [
                *DDPM,
                shots_only,
                "pseudo_labels.enabled=true",
                "pseudo_labels.threshold=0.9",
                f"trainer.max_steps={STEPS['ddpm']}",
            ],
            "generate": SAMPLE,
            "policies": ["replace"],
        },
        "cgan_pseudo": {
            "train": [
                "experiment=digits_cgan",
                "logger=none",
                shots_only,
                "pseudo_labels.enabled=true",
                "pseudo_labels.threshold=0.9",
                f"trainer.max_steps={STEPS['cgan']}",
            ],
            "generate": ["n_per_class=50"],
            "policies": ["replace"],
        },
        # the same cGAN, its discriminator with a second, unconditional head that also reads the pool (real vs
        # fake, no label), weighted 0.3 against the conditional loss
        "cgan_pseudo_u": {
            "train": [
                "experiment=digits_cgan",
                "logger=none",
                "data.unlabeled_share=0.5",
                "model.unlabeled_weight=0.3",
                "pseudo_labels.enabled=true",
                "pseudo_labels.threshold=0.9",
                f"trainer.max_steps={STEPS['cgan']}",
            ],
            "generate": ["n_per_class=50"],
            "policies": ["replace"],
        },
    }


def overrides_for(args, shots: list[int], subsets: list[int]) -> list[str]:
    policies = {"replace": "{name:replace,p:0.5}"}
    return evaluation_overrides(args, shots, subsets, grid(Path(args.out).resolve()), policies, "data.unlabeled=rest")


def train_prior(out: Path) -> float:
    """The DDPM trained on the unlabelled pool alone (skipped when done); returns its training seconds."""
    run = prior_run(out)
    if (run / "prior_done.json").is_file():
        return json.loads((run / "prior_done.json").read_text())["seconds"]
    run.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=digits_ddpm_unlabeled_base",
        "logger=csv",
        f"hydra.run.dir={run}",
    ]
    with open(run.parent / "ddpm_unlabeled.log", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        raise SystemExit(f"the unlabelled-pool prior failed; see {run.parent / 'ddpm_unlabeled.log'}")
    seconds = round(time.perf_counter() - t0, 1)
    (run / "prior_done.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def verdicts(ev: dict) -> list[str]:
    """The acceptance lines: the validation-chosen generative recipe on the semi-supervised side vs
    ``real+classical`` (>= +3.0) and vs ``real+pseudo+classical`` (>= +1.0), intervals excluding 0."""
    from imgaug_gen.jobs.evaluate.config import is_control

    results = ev["results"]
    first = results[next(iter(results))]
    generative = [m for m in first if "@" in m and "cas:" not in m and "scratch" not in m and not is_control(m)]
    score = {
        m: sum(r[m]["val_gain"]["mean"] for r in results.values() if "val_gain" in r.get(m, {})) for m in generative
    }
    if not score:
        return ["no semi-supervised generative method was evaluated"]
    best = max(score, key=score.get)
    out = [f"validation-chosen semi-supervised generative recipe: {best}"]
    for s, r in results.items():
        row = r.get(best, {})
        vs = row.get("gains") or {}
        for base, target in (("real+classical", TARGETS.get(s)), ("real+pseudo+classical", PSEUDO_TARGET)):
            g = vs.get(base)
            if g is None:
                continue
            if target is None or s not in TARGETS:
                out.append(f"  {s} shots vs `{base}` (reported): {fmt_gain(g)}")
                continue
            out.append(gain_verdict(f"{s} shots vs `{base}`", g, target))
    return out


def main(argv=None) -> dict:
    args = benchmark_args(
        __doc__,
        "bench_out/fewshot_unlabeled",
        "fewshot_unlabeled_digits.md",
        grid(Path("bench_out/fewshot_unlabeled")),
        argv,
    )

    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.evaluate import evaluate

    t0 = time.perf_counter()
    started = time.time()  # runs trained before it are marked as reused
    if args.unit:
        return evaluate(compose_config("evaluate", overrides_for(args, args.shots, args.subsets)))
    needs_prior = not args.generators or "ddpm_pre" in args.generators
    prior_seconds = train_prior(Path(args.out).resolve()) if needs_prior else None
    if args.workers > 0:
        run_units(__file__, args, unit_argv(args))
    ev = evaluate(compose_config("evaluate", overrides_for(args, args.shots, args.subsets)))
    minutes = (time.perf_counter() - t0) / 60
    table = Path(ev["files"]["table"]).read_text()
    print("\n" + table)
    gens = generator_rows(ev, started)
    print_table("Generators (means over subsets)", GENERATOR_COLUMNS, gens)
    print(f"\npool prior: {prior_seconds} s (training on the unlabelled images alone)")
    lines = verdicts(ev)
    print("\n" + "\n".join(lines))
    reuse = reuse_note(ev, started)
    print(f"\nwall time: {minutes:.1f} min (budget 90 min on 2 CPU cores; {reuse})\nfiles: {ev['files']}")
    command = " ".join(argv or sys.argv[1:])
    by = (
        f"Written by `python benchmarks/fewshot_unlabeled_digits.py {command}` "
        f"({minutes:.1f} min on 2 CPU cores, {reuse}; pool prior {prior_seconds} s)."
    )
    write_results_page(args.docs, "Unlabelled digits as a prior", by, table, gens, lines)
    return ev


if __name__ == "__main__":
    main()
