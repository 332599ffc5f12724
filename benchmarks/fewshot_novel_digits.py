"""Does a prior make generated data help? Novel digits, 1 to 10 shots, generators from scratch vs from a prior.

    python benchmarks/fewshot_novel_digits.py [--out bench_out/fewshot_novel] [--shots 1 2 5 10] [--subsets 0 1 2]
                                              [--seeds 0 1 2 3 4] [--workers 2] [--generators a,b] [overrides ...]

The protocol (16 px digits):

* digits 0-4 are the *base* classes: all their training-split images train one prior per generator kind
  (``experiment=digits_ddpm_base``, ``experiment=digits_cgan_base``) and the base classifier
  (``classifier.init={classes: [0,1,2,3,4], steps: 3000}``, the fixed recipe trained to convergence);
* digits 5-9 are the *novel* classes, at 1, 2, 5 and 10 shots, 3 few-shot subsets x 5 classifier seeds,
  scored on their fixed validation split (recipes and the baseline are chosen there) and test split
  (read once);
* rows: the baselines ``real``, ``real+classical``, ``transfer`` and ``transfer+classical`` (the base
  classifier's features, a new head), and for each kind the generator trained *from scratch* on the shots
  and *from the prior* (its fine-tuning modes in ``GENERATORS``), each under ``replace`` and ``kd``, all on
  the transfer classifier; the baseline is the best non-generative recipe on validation.

It runs the real jobs: ``train.py`` for the priors, ``evaluate.py`` (:func:`imgaug_gen.jobs.evaluate.evaluate`)
for everything else, one (shots, subset) unit per single-threaded worker process, then assembles the table
from their finished work. A second part measures how fast a prior-started ddpm reaches the from-scratch
one's final folder FID (validation FID every 25 steps, subset 0). Re-running the same command reuses every
finished prior, generator, folder and classifier result. Budget: 90 minutes on 2 CPU cores.
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
    markdown_table,
    print_table,
    reuse_note,
    run_units,
    unit_argv,
    write_results_page,
)

BASE, NOVEL = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
TARGETS = {"1": 0.030, "2": 0.030, "5": 0.010}
# the base classifier trains to convergence on its ~700 images (the few-shot runs' 300 steps leave its features
# less general: transfer+classical's validation accuracy was lower with them)
BASE_CLASSIFIER_STEPS = 3000
POLICIES = {"replace": "{name:replace,p:0.5}", "kd": "{name:replace,p:0.5,distill:0.5,temperature:2.0}"}
SMALL_UNET = ["model.unet.block_out_channels=[16,32,32]", "model.unet.attention_head_dim=4"]
SCRATCH_STEPS = {"ddpm": 400, "cgan": 800}
PRIOR_STEPS = {"ddpm": 200, "cgan": 400}
DDPM = [
    "experiment=digits_ddpm",
    "logger=none",
    *SMALL_UNET,
    f"trainer.max_steps={SCRATCH_STEPS['ddpm']}",
    "model.lr_warmup_steps=20",
]
CGAN = ["experiment=digits_cgan", "logger=none", f"trainer.max_steps={SCRATCH_STEPS['cgan']}"]
SAMPLE = ["n_per_class=50", "sample_kwargs.num_inference_steps=10"]
# img2img edits of every shot (SDEdit, as DA-Fusion does with SD): noised to 50-70 % of the schedule, then
# denoised by the prior, so the shot's shape stays and the prior redraws its strokes
EDITS = [
    "mode=img2img",
    "img2img.edits_per_image=20",
    "img2img.strengths=[0.5,0.7]",
    "sample_kwargs.num_inference_steps=10",
]


def prior_runs(out: Path) -> dict[str, Path]:
    return {"ddpm": out / "priors" / "ddpm", "cgan": out / "priors" / "cgan"}


def grid(out: Path) -> dict[str, dict]:
    """One entry per synthetic source; the validation split chooses among all of them and their policies."""
    priors = prior_runs(out)

    def from_prior(kind: str, *extra: str) -> list[str]:
        base = DDPM if kind == "ddpm" else CGAN
        return [*base, f"model.pretrained={priors[kind]}", f"trainer.max_steps={PRIOR_STEPS[kind]}", *extra]

    both = ["replace", "kd"]
    emb_lr = "model.embedding_lr=3e-2"  # the new classes' rows learn fast in every mode
    return {
        # from scratch on the shots
        "ddpm_scratch": {"train": DDPM, "generate": SAMPLE, "policies": both},
        "cgan_scratch": {"train": CGAN, "generate": ["n_per_class=50"], "policies": both},
        # from the base-class prior: three fine-tuning modes, and edits of the shots by the prior with the learnt
        # class rows (textual-inversion analogue, guidance 1.5) or the null row alone (guidance 0: the prior's
        # unconditional model, its null row tuned in the same run through label dropout)
        "ddpm_prior_full": {
            "train": from_prior("ddpm", "model.finetune=full", "model.lr=3e-4", emb_lr),
            "generate": SAMPLE,
            "policies": both,
        },
        "ddpm_prior_emb": {
            "train": from_prior("ddpm", "model.finetune=embeddings", emb_lr),
            "generate": SAMPLE,
            "policies": both,
        },
        "ddpm_prior_lora": {
            "train": from_prior("ddpm", "model.finetune=lora", emb_lr),  # rank 8 on attention + convolutions
            "generate": SAMPLE,
            "policies": both,
        },
        "ddpm_prior_edits": {"run_of": "ddpm_prior_emb", "generate": EDITS, "policies": both},
        "ddpm_prior_sdedit": {
            "run_of": "ddpm_prior_emb",
            "generate": [*EDITS, "sample_kwargs.guidance_scale=0"],
            "policies": both,
        },
        "cgan_prior_full": {
            "train": from_prior("cgan", "model.finetune=full", "model.freeze_d=1"),
            "generate": ["n_per_class=50"],
            "policies": both,
        },
    }


def overrides_for(args, shots: list[int], subsets: list[int]) -> list[str]:
    join = lambda v: ",".join(map(str, v))  # noqa: E731
    novel = [
        f"data.classes=[{join(NOVEL)}]",
        f"classifier.init={{classes:[{join(BASE)}],steps:{BASE_CLASSIFIER_STEPS}}}",
    ]
    return evaluation_overrides(args, shots, subsets, grid(Path(args.out).resolve()), POLICIES, *novel)


def train_priors(out: Path) -> dict[str, float]:
    """The two base-class priors, one after the other on every core (skipped when done)."""
    runs = {"ddpm": ["experiment=digits_ddpm_base"], "cgan": ["experiment=digits_cgan_base"]}
    seconds = {}
    for kind, over in runs.items():
        run = prior_runs(out)[kind]
        if (run / "prior_done.json").is_file():
            seconds[kind] = json.loads((run / "prior_done.json").read_text())["seconds"]
            continue
        run.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(run.parent / f"{kind}.log", "w") as log:
            code = subprocess.call(
                [
                    sys.executable,
                    str(ROOT / "train.py"),
                    *over,
                    "logger=csv",
                    "callbacks.fidelity=null",
                    f"hydra.run.dir={run}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        if code:
            raise SystemExit(f"the {kind} prior failed; see {run.parent / f'{kind}.log'}")
        seconds[kind] = round(time.perf_counter() - t0, 1)
        (run / "prior_done.json").write_text(json.dumps({"seconds": seconds[kind]}))
    return seconds


def fid_by_steps(args, ev: dict) -> list[list]:
    """Optimiser steps a prior-started ddpm needs to reach the from-scratch ddpm's final folder FID (subset 0,
    each shots value): validation FID of the prior run every 25 steps up to a quarter of the scratch run's
    steps (50 images per class, the folder's count and feature space) beside the scratch run's folder FID
    after its SCRATCH_STEPS["ddpm"] steps."""
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import train

    out = Path(args.out).resolve()
    rows = []
    entry = grid(out)["ddpm_prior_full"]["train"]
    for shots in args.shots:
        scratch = ev["generators"].get(str(shots), {}).get("ddpm_scratch", {}).get("subsets", {}).get("0", {})
        target = (scratch.get("generate") or {}).get("fid")
        if target is None:
            continue
        run = out / "fid_by_steps" / f"shots{shots}"
        done = run / "fid_history.json"
        if not done.is_file():
            cfg = compose_config(
                "train",
                [
                    *entry,
                    f"trainer.max_steps={SCRATCH_STEPS['ddpm'] // 4}",
                    f"run_dir={run}",
                    f"data.shots={shots}",
                    "data.seed=0",
                    "seed=0",
                    "data.image_size=16",
                    f"data.classes=[{','.join(map(str, NOVEL))}]",
                    "data.val_fraction=0.2",
                    "callbacks.fidelity.every_n_steps=25",
                    "callbacks.fidelity.n_per_class=50",
                    "callbacks.fidelity.at_end=true",
                    "callbacks.samples=null",
                    "callbacks.progress=null",
                    "logger=csv",  # val/fid per step in RUN/metrics.csv
                    "model.num_inference_steps=10",
                ],
            )  # the folders' sampler steps
            train(cfg)
            history = [
                (int(float(r["global_step"])), float(r["val/fid"]))
                for r in _csv_rows(run / "metrics.csv")
                if r.get("val/fid")
            ]
            done.write_text(json.dumps(history))
        history = json.loads(done.read_text())
        reached = next((s for s, f in history if f <= target), None)
        rows.append(
            [
                shots,
                SCRATCH_STEPS["ddpm"],
                round(target, 3),
                ", ".join(f"{s}: {f:.2f}" for s, f in history),
                reached if reached is not None else "not reached",
                "met" if reached is not None and reached <= SCRATCH_STEPS["ddpm"] / 4 else "NOT met",
            ]
        )
    return rows


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def verdicts(ev: dict) -> list[str]:
    """The acceptance lines: the validation-chosen prior-started recipe vs the chosen baseline (chosen per shots
    value, as a user with that many shots chooses, and one recipe for every shots value beside it), and the
    chosen prior-started generator vs the from-scratch one's copy rate and CAS at 1 and 2 shots."""
    out = []
    results, gens = ev["results"], ev["generators"]
    prior_methods = [m for m in results[next(iter(results))] if "_prior" in m]
    if not prior_methods:
        return ["no prior-started method was evaluated"]

    def val(s: str, m: str) -> float:
        return results[s].get(m, {}).get("val_gain", {}).get("mean", float("-inf"))

    def line(s: str, m: str, target: float | None) -> str:
        g = results[s][m]["gain"]
        label = f"{s} shots: {m} vs `{ev['baselines'][s]['method']}`"
        if target is None:
            return f"  {label} (reported): {fmt_gain(g)}"
        return gain_verdict(label, g, target)

    out.append("validation-chosen prior-started recipe, per shots value:")
    chosen = {s: max(prior_methods, key=lambda m: val(s, m)) for s in results}
    for s in results:
        out.append(line(s, chosen[s], TARGETS.get(s)))
    overall = max(prior_methods, key=lambda m: sum(val(s, m) for s in results))
    out.append(f"one recipe for every shots value (the best mean validation gain): {overall}")
    for s in results:
        out.append(line(s, overall, None))
    for s in ("1", "2"):
        if s not in chosen:
            continue
        gen = chosen[s].split("+")[1]
        kind = gen.split("_")[0]
        if s not in gens or gen not in gens[s] or f"{kind}_scratch" not in gens[s]:
            continue
        mine, theirs = gens[s][gen], gens[s][f"{kind}_scratch"]
        cr, cr0 = mine.get("copy_rate"), theirs.get("copy_rate")
        cas, cas0 = (mine.get("cas") or {}).get("mean"), (theirs.get("cas") or {}).get("mean")
        if None not in (cr, cr0):
            out.append(
                f"  {s} shots copy rate {gen} {cr:.3f} vs {kind}_scratch {cr0:.3f} (target <= half) -> "
                f"{'met' if cr <= cr0 / 2 else 'NOT met'}"
            )
        if None not in (cas, cas0):
            out.append(
                f"  {s} shots CAS {gen} {100 * cas:.1f} vs {kind}_scratch {100 * cas0:.1f} (target >= +5) -> "
                f"{'met' if cas - cas0 >= 0.05 else 'NOT met'}"
            )
    return out


def main(argv=None) -> dict:
    args = benchmark_args(
        __doc__,
        "bench_out/fewshot_novel",
        "fewshot_novel_digits.md",
        grid(Path("bench_out/fewshot_novel")),
        argv,
        extra=lambda p: p.add_argument("--no-fid-steps", action="store_true", help="skip the FID-by-steps measurement"),
    )

    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.evaluate import evaluate

    t0 = time.perf_counter()
    started = time.time()  # runs trained before it are marked as reused
    if args.unit:
        return evaluate(compose_config("evaluate", overrides_for(args, args.shots, args.subsets)))
    prior_seconds = train_priors(Path(args.out).resolve())
    if args.workers > 0:
        run_units(__file__, args, unit_argv(args, "--no-fid-steps"))
    ev = evaluate(compose_config("evaluate", overrides_for(args, args.shots, args.subsets)))
    steps = [] if args.no_fid_steps else fid_by_steps(args, ev)
    minutes = (time.perf_counter() - t0) / 60
    table = Path(ev["files"]["table"]).read_text()
    print("\n" + table)
    print_table(
        "Generators (means over subsets): folder FID (domain features), CAS, copy rate, memorisation, training seconds",
        GENERATOR_COLUMNS,
        generator_rows(ev, started),
    )
    print(f"\npriors: ddpm {prior_seconds.get('ddpm')} s, cgan {prior_seconds.get('cgan')} s (training, base classes)")
    if steps:
        print_table(
            "FID by optimiser steps: a prior-started ddpm (validation FID) vs the from-scratch ddpm's final "
            "folder FID (subset 0)",
            ["shots", "scratch steps", "scratch final FID", "prior: step: FID", "prior reaches it at", "<= a quarter"],
            steps,
        )
    lines = verdicts(ev)
    print("\n" + "\n".join(lines))
    reuse = reuse_note(ev, started)
    print(f"\nwall time: {minutes:.1f} min (budget 90 min on 2 CPU cores; {reuse})\nfiles: {ev['files']}")
    write_docs(args.docs, table, generator_rows(ev, started), steps, lines, f"{minutes:.1f} min", reuse, prior_seconds)
    return ev


def write_docs(
    path: Path, table: str, gen_rows: list, steps: list, lines: list[str], wall: str, reuse: str, prior_seconds: dict
) -> None:
    """The result page the docs site shows (docs/results/)."""
    header = ["shots", "scratch steps", "scratch final FID", "prior: step: FID", "prior reaches it at", "<= a quarter"]
    more = (("FID by optimiser steps", markdown_table(header, steps)),) if steps else ()
    priors = ", ".join(f"{kind} {seconds} s" for kind, seconds in prior_seconds.items())
    by = f"Written by `python benchmarks/fewshot_novel_digits.py` ({wall} on 2 CPU cores, {reuse}; priors: {priors})."
    write_results_page(path, "Novel digits from a prior", by, table, gen_rows, lines, more)


if __name__ == "__main__":
    main()
