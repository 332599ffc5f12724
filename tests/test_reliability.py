"""Sharded generation (explicit shards and torchrun ranks) and real processes killed with SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import fastcli

from imgaug_gen.export import read_manifest

from conftest import ROOT, cli_env, files_bytes, gen_cfg, kill_when, train_killed_and_resumed, train_overrides


def _lines(out_dir):
    return sorted(json.dumps(r, sort_keys=True) for r in read_manifest(out_dir, include_rejected=True))


def _consistent(out_dir):
    """Every manifest line has its file, every file its line, no temp file, no duplicated id."""
    recs = read_manifest(out_dir)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids))
    on_disk = sorted(
        p.relative_to(out_dir).as_posix()
        for p in (out_dir / "train").rglob("*")
        if p.is_file() and p.name != "metadata.jsonl"
    )  # the HF metadata is not an image
    assert on_disk == sorted(r["file"] for r in recs)
    assert not [p for p in out_dir.rglob("*") if ".tmp" in p.name]


def test_shards_union_equals_one_process_byte_for_byte(trained_cgan, tmp_path):
    from imgaug_gen.jobs.generate import generate

    one, three = tmp_path / "one", tmp_path / "three"
    generate(gen_cfg(trained_cgan, one, "score=false", "augment=light"))
    for s in (2, 0, 1):  # any order
        generate(gen_cfg(trained_cgan, three, "score=false", "augment=light", f"shard={s}", "num_shards=3"))
    assert files_bytes(three) == files_bytes(one)
    assert _lines(three) == _lines(one)
    _consistent(three)


def test_torchrun_ranks_write_disjoint_shards(trained_cgan, tmp_path):
    from imgaug_gen.jobs.generate import generate

    one, ranks = tmp_path / "one", tmp_path / "ranks"
    generate(gen_cfg(trained_cgan, one, "score=false"))
    out = fastcli.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "generate.py"),
            f"run_dir={trained_cgan}",
            f"out_dir={ranks}",
            "n_per_class=4",
            "progress=false",
            "score=false",
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in ranks.glob("shard*.done")) == ["shard000-of-002.done", "shard001-of-002.done"]
    assert files_bytes(ranks) == files_bytes(one)
    assert _lines(ranks) == _lines(one)


def test_generate_killed_with_sigkill_then_rerun_finishes_the_job(trained_cgan, tmp_path):
    from imgaug_gen.jobs.generate import generate

    ref, out = tmp_path / "ref", tmp_path / "out"
    args = [f"run_dir={trained_cgan}", "n_per_class=150", "progress=false", "score=false", "batch_size=16"]
    generate(gen_cfg(trained_cgan, ref, *args[1:]))
    cmd = [sys.executable, str(ROOT / "generate.py"), *args, f"out_dir={out}"]
    proc = fastcli.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    manifest = out / "manifest.jsonl"
    kill_when(proc, lambda: manifest.is_file() and manifest.stat().st_size > 40_000)  # ~ a third written
    assert proc.returncode == -signal.SIGKILL
    assert 0 < len(read_manifest(out)) < 1500 and not (out / "metrics.json").exists()
    rerun = fastcli.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert files_bytes(out) == files_bytes(ref)
    assert _lines(out) == _lines(ref)
    _consistent(out)


def test_train_killed_with_sigkill_resumes_to_the_same_generator(tmp_path):
    """SIGKILL a real train.py after a checkpoint, resume with ckpt_path=: the final generator
    equals the uninterrupted run's, byte for byte (step, optimisers, EMA, data order, RNG)."""
    common = [
        "trainer.max_steps=60",
        "callbacks.checkpoint.every_n_train_steps=4",
        "callbacks.fidelity.every_n_steps=0",
    ]

    def cmd(run, *extra):
        over = [o for o in train_overrides("cgan", run, *common) if not o.startswith("run_dir")]
        return [sys.executable, str(ROOT / "train.py"), *over, f"hydra.run.dir={run}", *extra]

    full, killed = train_killed_and_resumed(cmd, tmp_path, first_step=4, max_steps=60)
    a = (full / "generator" / "model.safetensors").read_bytes()
    b = (killed / "generator" / "model.safetensors").read_bytes()
    assert a == b
