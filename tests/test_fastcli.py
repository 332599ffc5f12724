"""The forked front-end processes of tests/fastcli.py behave as fresh interpreters do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import fastcli

from conftest import ROOT, cli_env


def _both(argv, **kw):
    fresh = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)
    forked = fastcli.run(argv, capture_output=True, text=True, timeout=300, **kw)
    return fresh, forked


def test_a_forked_front_end_prints_and_exits_as_a_fresh_one(tmp_path):
    env = cli_env()
    for argv in (
        [sys.executable, str(ROOT / "generate.py"), "--help"],
        [sys.executable, "generate.py", f"out_dir={tmp_path / 'o'}", "nope=1"],  # relative, from its folder
    ):
        fresh, forked = _both(argv, env=env, cwd=ROOT)
        assert forked.returncode == fresh.returncode and forked.stdout == fresh.stdout
        assert forked.stderr == fresh.stderr
    assert fresh.returncode == 1 and "Could not override 'nope'" in fresh.stderr  # Hydra's own error exit
    # a config error of the job itself: exit status 2 and the message, as the front ends give it
    bad = fastcli.run(
        [sys.executable, str(ROOT / "generate.py"), f"run_dir={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'o'}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "nowhere" in bad.stderr and "Traceback" not in bad.stderr


def _long_train(tmp_path, name, **kw):
    argv = [
        sys.executable,
        str(ROOT / "train.py"),
        "debug=tiny",
        f"run_dir={tmp_path / name}",
        "trainer.max_steps=9999",
    ]
    proc = fastcli.Popen(
        argv, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw
    )
    while not (tmp_path / name).is_dir():  # Hydra made the run folder: the script is running
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    return proc


def test_a_forked_front_end_is_its_own_process(tmp_path):
    proc = _long_train(tmp_path, "run")
    assert proc._forked and proc.pid not in (os.getpid(), fastcli._server["proc"].pid)
    assert os.getpgid(proc.pid) == os.getpgrp()  # in the caller's process group, as a plain child
    if os.path.isdir("/proc"):
        assert os.readlink(f"/proc/{proc.pid}/cwd") == str(tmp_path)
    alone = _long_train(tmp_path, "run2", start_new_session=True)
    assert os.getsid(alone.pid) == os.getpgid(alone.pid) == alone.pid
    for p in (proc, alone):
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    # anything but a front-end script starts as a plain subprocess
    plain = fastcli.Popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    out, _ = plain.communicate(timeout=60)
    assert not plain._forked and int(out) == plain.pid
    # an option a forked child would not honour (here preexec_fn) also gets a plain subprocess
    hook = fastcli.Popen(
        [sys.executable, str(ROOT / "generate.py"), "--help"],
        preexec_fn=os.getpid,
        stdout=subprocess.DEVNULL,
        env=cli_env(),
    )
    assert hook.wait(timeout=120) == 0 and not hook._forked
