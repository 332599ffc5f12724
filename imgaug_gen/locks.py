"""One writer per folder: :class:`FolderLock`, an OS lock (``flock``) held for a job's life."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from imgaug_gen.errors import ConfigError


class FolderLock:
    """An exclusive OS lock (``flock``) on ``folder/name``, held for a job's life.

    The kernel releases it when the process ends, however it ends (SIGKILL included), so a killed job
    resumes with the same command; a second job that finds it held stops with an error naming the
    holder (pid, host, start time and command, which the holder writes into the file). The file
    itself stays (it is tiny): removing a lock file that another process may be opening would let
    two jobs hold two different files. Where ``fcntl`` does not exist (Windows) the lock is a no-op;
    on network file systems that do not honour ``flock`` it may not exclude another machine's job.
    """

    def __init__(self, folder: str | os.PathLike, name: str, what: str = "job"):
        self.folder, self.name, self.what = Path(folder), name, what
        self.path = self.folder / name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict:
        """What the holder wrote into the lock file (empty if unreadable)."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, blocking: bool = False) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # no flock on this platform: nothing to exclude with
            return self
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            h = self.holder()
            who = (
                (
                    f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, started {h.get('started', '?')}: "
                    f"{h.get('command', '?')}"
                )
                if h
                else "a process that has not written its details yet"
            )
            raise ConfigError(
                f"`{self.folder}` is in use by another {self.what} ({who}). Wait for it to finish or stop it, or "
                f"choose another folder. If no such process runs (a network file system that ignores locks), "
                f"delete {str(self.path)!r}."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._write_details()
        return self

    def _write_details(self) -> None:
        import socket
        import sys
        import time

        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv) or sys.executable,
        }
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(info, sort_keys=True) + "\n").encode("utf-8"), 0)

    def is_held_elsewhere(self) -> bool:
        """Whether another process holds this lock right now (tested without keeping it)."""
        if self._fd is not None or not self.path.is_file():
            return False
        try:
            import fcntl
        except ImportError:
            return False
        fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing the descriptor releases a lock it took
        return False

    def release(self, failed: bool = False) -> None:
        """Release the lock. ``failed``: the job stopped before writing anything, so a folder this lock
        created holding nothing but its lock files goes again (a refused job leaves no trace)."""
        if self._fd is None:
            return
        if failed and getattr(self, "_made_folder", False):
            names = {p.name for p in self.folder.iterdir()}
            if all(n.endswith(".lock") for n in names):
                for n in names:
                    with contextlib.suppress(OSError):
                        os.unlink(self.folder / n)
                with contextlib.suppress(OSError):
                    self.folder.rmdir()
        os.close(self._fd)  # closing the only descriptor of the open file releases the flock
        self._fd = None

    def __enter__(self) -> "FolderLock":
        return self if self.held else self.acquire()

    def __exit__(self, exc_type, *exc) -> None:
        self.release(failed=exc_type is not None)
