"""The front ends (train.py, generate.py, evaluate.py) as real processes, without paying their imports each time.

Importing torch + Lightning (+ torchmetrics, torchvision, transformers) is most of a tiny run's CPU time, and the
suite starts dozens of front-end processes. Here one server process per test worker imports them once and forks
a child per run; the child takes the caller's stdin/stdout/stderr file descriptors, working directory,
environment, session and argv, and runs the command as ``python [-u] SCRIPT ARGS`` / ``python -m MODULE ARGS``
would (``__main__``, ``sys.path[0]``, exit status from ``SystemExit``, atexit handlers). It is a separate process
with its own pid: SIGKILL, SIGSTOP, file locks and Lightning's DDP launcher act on it as on any other.
:class:`Popen` is :class:`subprocess.Popen`; only how the child starts and is reaped differs. What a forked
child starts itself (Lightning's DDP ranks, torchrun's ranks, submitit's tasks) is forked the same way.

Anything else (other ``-m`` programs, ``-c``, other interpreters, or an environment that changes what the server
fixed at import time, such as ``OMP_NUM_THREADS``) runs as a plain subprocess. ``IMGAUG_GEN_FORK_SERVER=0``
turns the server off.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {str(ROOT / name) for name in ("train.py", "generate.py", "evaluate.py")}
# the ``python -m`` programs the front ends and their tests start: torchrun, submitit's local job controller and
# task, the notebooks' Jupyter kernel
MODULES = {"torch.distributed.run", "submitit.local._local", "submitit.core._submit", "ipykernel_launcher"}
PRELOAD = [
    "imgaug_gen.cli",
    "imgaug_gen.jobs.train",
    "imgaug_gen.jobs.generate",
    "imgaug_gen.jobs.evaluate",
    "imgaug_gen.generators.gan",
    "imgaug_gen.generators.ddpm",
    "imgaug_gen.metrics",
    "diffusers",
]
# read once, when the libraries load: a run that sets them otherwise needs a fresh interpreter
IMPORT_TIME = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "HF_HUB_OFFLINE",
    "NO_ALBUMENTATIONS_UPDATE",
    "PYTHONPATH",
    "MPLBACKEND",
)

_server: dict = {}
_PLAIN_POPEN = subprocess.Popen


def _server_env() -> dict[str, str]:
    from conftest import cli_env

    return cli_env()


def _start_server() -> str | None:
    """The socket of the fork server (started on first use in a test process; in a forked child, the server
    that forked it), or None when it is off."""
    if os.environ.get("IMGAUG_GEN_FORK_SERVER", "1") == "0" or not hasattr(os, "fork"):
        return None
    if _server.get("served") or _server.get("pid") == os.getpid():
        return _server["path"]
    import atexit
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="imgaug_gen_fork_"), "s")
    env = _server_env()
    log = open(path + ".log", "wb")
    proc = subprocess.Popen(
        [sys.executable, __file__, path], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT
    )
    while not os.path.exists(path + ".ready"):
        if proc.poll() is not None:
            raise RuntimeError("the fork server failed to start:\n" + Path(path + ".log").read_text()[-3000:])
        time.sleep(0.05)
    _server.update(pid=os.getpid(), path=path, proc=proc, env=env)
    atexit.register(proc.kill)
    return path


def _target(args, env, cwd) -> dict | None:
    """What a ``python [-u] SCRIPT|-m MODULE ARGS`` command runs, when the server may fork it; else None."""
    if not (isinstance(args, (list, tuple)) and len(args) >= 2 and str(args[0]) == sys.executable):
        return None
    args = [os.fspath(a) for a in args]
    i, unbuffered = 1, False
    while i < len(args) and args[i] == "-u":
        i, unbuffered = i + 1, True
    if i + 1 < len(args) and args[i] == "-m" and args[i + 1] in MODULES:
        target = {"module": args[i + 1], "argv": args[i + 2 :]}
    elif i < len(args) and str(Path(cwd or os.getcwd(), args[i])) in SCRIPTS:
        target = {"script": args[i], "argv": args[i + 1 :]}
    else:
        return None
    env = os.environ if env is None else env
    if _start_server() is None or any(env.get(k) != _server["env"].get(k) for k in IMPORT_TIME):
        return None
    return {**target, "unbuffered": unbuffered}


class Popen(subprocess.Popen):
    """:class:`subprocess.Popen` whose front-end children are forked by the server (see the module)."""

    def __init__(self, args, *a, **kw):
        # options a forked child would not honour: a plain subprocess then
        plain = any(
            kw.get(k) not in (None, False, (), -1)
            for k in ("preexec_fn", "pass_fds", "user", "group", "extra_groups", "umask", "shell")
        )
        self._target = None if plain else _target(args, kw.get("env"), kw.get("cwd"))
        self._forked = self._target is not None
        self._conn = None
        super().__init__(args, *a, **kw)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, *rest):
        if not self._forked:
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env, *rest)
        p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite = rest[3:9]
        start_new_session, process_group = rest[14], rest[15] if len(rest) > 15 else -1
        fds = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1, errwrite if errwrite != -1 else 2]
        request = {
            **self._target,
            "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
            "env": dict(os.environ if env is None else env),
            "new_session": bool(start_new_session),
            "process_group": process_group if process_group not in (None, -1) else os.getpgrp(),
        }
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(_server["path"])
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], fds)
        reader = conn.makefile("rb")
        self.pid = int(reader.readline())
        self._conn, self._reader = conn, reader
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)

    def _try_wait(self, wait_flags):
        if not self._forked:
            return super()._try_wait(wait_flags)
        if wait_flags & os.WNOHANG:
            import select

            if not select.select([self._conn], [], [], 0)[0]:
                return (0, 0)
        line = self._reader.readline()
        self._reader.close()
        self._conn.close()
        return (self.pid, int(line))

    def _internal_poll(self, _deadstate=None, **kw):
        if not self._forked:
            return super()._internal_poll(_deadstate=_deadstate, **kw)
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                if self.returncode is None:
                    pid, sts = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(sts)
            finally:
                self._waitpid_lock.release()
        return self.returncode


def run(args, *, input=None, capture_output=False, timeout=None, check=False, **kw) -> subprocess.CompletedProcess:
    """:func:`subprocess.run` through :class:`Popen`."""
    if capture_output:
        kw["stdout"] = kw["stderr"] = subprocess.PIPE
    stdin = kw.pop("stdin", None)
    with Popen(args, stdin=subprocess.PIPE if input is not None else stdin, **kw) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


# --------------------------------------------------------------------------- #
# The server: python tests/fastcli.py SOCKET
# --------------------------------------------------------------------------- #
def _child(request: dict, fds: list[int], ready: int) -> None:
    """In the forked child: become ``python SCRIPT ARGS`` on the caller's descriptors, then exit."""
    import atexit
    import io
    import runpy
    import threading
    import traceback

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    # the caller's process group (as a plain child is in) or the new session asked for, before the caller has
    # the pid: it may signal the group at once (Jupyter kills a kernel's whole process group)
    try:
        os.setsid() if request["new_session"] else os.setpgid(0, request["process_group"])
    except OSError:
        pass
    os.write(ready, b"1")
    os.close(ready)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    unbuffered = request["unbuffered"] or bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False), line_buffering=os.isatty(1), write_through=unbuffered
    )
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), errors="backslashreplace", line_buffering=True, write_through=unbuffered
    )
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    # what this process starts (DDP ranks, torchrun's, submitit's tasks) is forked too, also through the modules
    # already imported here that hold their own `Popen` (`from subprocess import Popen`: torch's elastic agent)
    for module in [subprocess, *list(sys.modules.values())]:
        try:
            if getattr(module, "Popen", None) is _PLAIN_POPEN:
                module.Popen = Popen
        except Exception:  # noqa: BLE001 - a lazy module that imports on attribute access: not a holder
            pass
    if request.get("module") == "ipykernel_launcher" and "matplotlib" in sys.modules:
        # matplotlib reads MPLBACKEND when it is imported, which here was before the kernel sets its inline backend
        import matplotlib

        os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        matplotlib.rcParams["backend"] = os.environ["MPLBACKEND"]
    if "module" in request:
        sys.argv = ["-m", *request["argv"]]
        sys.path[0] = os.getcwd()
        run = lambda: runpy.run_module(request["module"], run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        script = request["script"]
        sys.argv = [script, *request["argv"]]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        run = lambda: runpy.run_path(script, run_name="__main__")  # noqa: E731
    code = 0
    try:
        run()
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _serve(path: str) -> None:
    import importlib
    import threading

    sys.path[0] = str(ROOT)  # where `python ROOT/train.py` finds its modules first
    _server.update(served=True, path=path, env=dict(os.environ))
    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    Path(path + ".ready").touch()

    def reap(conn: socket.socket, pid: int) -> None:
        _, status = os.waitpid(pid, 0)
        try:
            conn.sendall(f"{status}\n".encode())
        except OSError:  # the caller has gone
            pass
        conn.close()

    while True:
        conn, _ = listener.accept()
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        while not msg.endswith(b"\n"):
            msg += conn.recv(1 << 20)
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            listener.close()
            conn.close()
            os.close(ready_read)
            _child(json.loads(msg), fds, ready_write)
        os.close(ready_write)
        os.read(ready_read, 1)  # its process group or session is set
        os.close(ready_read)
        for fd in fds:
            os.close(fd)
        conn.sendall(f"{pid}\n".encode())
        threading.Thread(target=reap, args=(conn, pid), daemon=True).start()


if __name__ == "__main__":
    _serve(sys.argv[1])
