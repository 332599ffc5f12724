"""The jobs' process settings: glibc malloc keeps the blocks a forward frees, so batches stop
faulting their memory in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc thresholds are glibc's")

# 20 cGAN forwards at batch 64 after 3 warm-up ones, under the jobs' settings; prints the page faults.
PROBE = """
import resource, torch
from imgaug_gen.runtime import prepare_process
prepare_process()
from imgaug_gen.nets.cgan import CGANGenerator
torch.manual_seed(0)
net = CGANGenerator(10, image_size=16, width=32).eval()
def run(k):
    with torch.no_grad():
        for _ in range(k):
            net(torch.randn(64, 64), torch.arange(64) % 10)
run(3)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run(20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _page_faults(**env: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, env=cli_env(**env), timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@glibc
def test_jobs_process_settings_stop_the_forward_faulting_its_memory_in_each_batch():
    default = _page_faults(IMGAUG_GEN_MALLOC="default")
    tuned = _page_faults()
    # Measured: about 35,000 faults for the 20 batches with glibc's defaults on one thread, a few
    # hundred with the thresholds raised.
    assert default > 5000, default
    assert tuned * 10 < default, (tuned, default)


def test_user_allocator_settings_are_left_alone(monkeypatch):
    from imgaug_gen import runtime

    monkeypatch.setattr(runtime, "_done", False)
    calls = []
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda *a: calls.append(a))
    for key, value in [
        ("IMGAUG_GEN_MALLOC", "default"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
        ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2"),
        ("MALLOC_MMAP_THRESHOLD_", "65536"),
    ]:
        with monkeypatch.context() as m:
            m.setenv(key, value)
            assert runtime.keep_freed_memory() is False, key
    assert calls == []  # the C library was never touched
