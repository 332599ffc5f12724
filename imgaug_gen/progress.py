"""The progress of a generate job, read from its folder (any format, any number of shards, while it runs).

python -m imgaug_gen.progress OUT [--json]

Each shard of the job records how many images it plans (``plan[.shardXXX-of-YYY].json``); its manifest
lists the images already written (a shard format lists an image once its shard is whole), and
``shardXXX-of-YYY.done`` marks a finished shard. Nothing is locked or written: it is safe to run from
another machine while the shards run on a cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imgaug_gen.data.manifest import is_kept
from imgaug_gen.errors import ConfigError


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _count_lines(path: Path) -> tuple[int, int]:
    """(kept images, rejected candidates) listed in a manifest; a torn last line is not counted."""
    kept = rejected = 0
    if not path.is_file():
        return 0, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # being written
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                kept, rejected = (kept + 1, rejected) if is_kept(rec) else (kept, rejected + 1)
    return kept, rejected


def job_progress(out_dir: str | Path) -> dict:
    """``{"num_shards", "planned", "written", "rejected", "done_shards", "merged", "shards": [...]}``; per
    shard: ``shard``, ``planned`` (None until it starts), ``written``, ``rejected``, ``done``."""
    from imgaug_gen.export import JOB_FILE, manifest_shard_name, plan_record_name

    out_dir = Path(out_dir)
    job = _json(out_dir / JOB_FILE)
    if not isinstance(job, dict):
        raise ConfigError(f"`{out_dir}` holds no generate.py job record ({JOB_FILE}); give a generate.py out_dir.")
    n = int(job.get("num_shards", 1))
    shards = []
    for s in range(n):
        plan = _json(out_dir / plan_record_name(s, n))
        written, rejected = _count_lines(out_dir / manifest_shard_name(s, n))
        done = (out_dir / f"shard{s:03d}-of-{n:03d}.done").is_file() if n > 1 else (out_dir / "metrics.json").is_file()
        shards.append(
            {
                "shard": s,
                "planned": plan.get("planned") if isinstance(plan, dict) else None,
                "written": written,
                "rejected": rejected,
                "done": done,
            }
        )
    return {
        "num_shards": n,
        "format": job.get("format", "folder"),
        "planned": sum(x["planned"] or 0 for x in shards),
        "written": sum(x["written"] for x in shards),
        "rejected": sum(x["rejected"] for x in shards),
        "done_shards": sum(x["done"] for x in shards),
        "merged": (out_dir / "metrics.json").is_file(),
        "shards": shards,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imgaug_gen.progress", description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--json", action="store_true", help="print the progress as JSON")
    args = p.parse_args(argv)
    try:
        prog = job_progress(args.out_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(prog, indent=2))
        return 0
    print(f"{'shard':>6} {'planned':>9} {'written':>9} {'rejected':>9}  done")
    for x in prog["shards"]:
        planned = "-" if x["planned"] is None else x["planned"]
        print(f"{x['shard']:>6} {planned:>9} {x['written']:>9} {x['rejected']:>9}  {'yes' if x['done'] else 'no'}")
    print(
        f"{prog['written']} of {prog['planned']} images written ({prog['format']}); {prog['done_shards']} of "
        f"{prog['num_shards']} shards done; {'merged and scored' if prog['merged'] else 'not merged yet'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
