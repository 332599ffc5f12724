"""Rendering a job's batches: on a CPU device several at once, each on one torch thread, handed back in
plan order (generate.py's ``render_streams``)."""

from __future__ import annotations

import contextlib
from collections import deque

from omegaconf import DictConfig

from imgaug_gen.runtime import prepare_thread


def render_streams_for(cfg: DictConfig, gen) -> int:
    """``render_streams``, or where it is null: on a CPU device, for a kind that samples concurrently, one
    stream per torch thread, each rendering its own batch on one thread (a small batch's forward scales
    poorly across threads: ``benchmarks/bench_generate.py`` runs the bare forward both ways); else 1."""
    import torch

    if cfg.get("render_streams") is not None:
        return int(cfg.render_streams) if gen.concurrent_sampling else 1
    return max(1, torch.get_num_threads()) if gen.concurrent_sampling and gen.device.type == "cpu" else 1


@contextlib.contextmanager
def render_pool(gen, streams: int):
    """Threads rendering batches, each with one torch thread (the process's thread count restored after),
    the generator held in eval mode throughout (its calls then switch no module's mode); None for 1 stream."""
    if streams <= 1:
        yield None
        return
    from concurrent.futures import ThreadPoolExecutor

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(streams, thread_name_prefix="imgaug_gen-render", initializer=prepare_thread)
    try:
        with gen._eval_mode():
            yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def rendered(render, groups, pool, streams: int):
    """``(group, render(group))`` of each group, in order; with a pool, up to two groups per stream rendered
    ahead (the memory in flight is bounded: a fixed number of batches, whatever the job's size)."""
    if pool is None:
        for group in groups:
            yield group, render(group)
        return
    ahead: deque = deque()
    for group in groups:
        ahead.append((group, pool.submit(render, group)))
        if len(ahead) >= 2 * streams:
            done, fut = ahead.popleft()
            yield done, fut.result()
    while ahead:
        done, fut = ahead.popleft()
        yield done, fut.result()
