"""One training run per workdir: ``RUN/.lock`` names its holder (host, PID, start time).

The lock file is created atomically (``O_CREAT | O_EXCL``), so of two runs started together on the
same workdir exactly one gets it; the other stops at once with :class:`WorkdirBusyError` naming
the holder. A lock left behind by a process that died (same host, PID gone or reused by another
process) is taken over. A lock held from another host cannot be checked from here: the message
says so and how to remove it. In a multi-process run only process 0 takes the lock.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from btlm_jax.errors import UserError

LOCK_NAME = ".lock"


class WorkdirBusyError(UserError):
    """Another live process holds the workdir."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _start_time(pid)
    return not (started and now and now != started)


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds ``workdir/.lock`` for the block."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir).absolute()
        self.path = self.workdir / LOCK_NAME
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                      "started": _start_time(os.getpid()),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self.held = False

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or garbage: treated as held (see acquire)

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") != self.owner["host"] or not isinstance(holder.get("pid"), int):
            return False
        return not _alive(holder["pid"], holder.get("started"))

    def acquire(self) -> "WorkdirLock":
        self.workdir.mkdir(parents=True, exist_ok=True)
        body = json.dumps(self.owner).encode()
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released meanwhile
                if not holder:  # created but not yet written by its holder
                    time.sleep(0.05)
                    holder = self._read()
                    if holder is None:
                        continue
                if holder and self._stale(holder):
                    # move the stale file aside under a unique name: of several takers one wins
                    grave = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
                    try:
                        os.replace(self.path, grave)
                    except FileNotFoundError:
                        continue
                    try:
                        moved = json.loads(grave.read_text() or "{}")
                    except (OSError, ValueError):
                        moved = {}
                    if moved != holder:  # a fresh lock was taken meanwhile: put it back
                        try:
                            os.link(grave, self.path)
                        except OSError:
                            pass
                    else:
                        print(f"[btlm_jax] {self.path}: removed the stale lock of process "
                              f"{holder['pid']} on {holder['host']} (no longer running)",
                              flush=True)
                    grave.unlink(missing_ok=True)
                    continue
                raise WorkdirBusyError(self._busy_message(holder)) from None
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.held = True
            return self
        raise WorkdirBusyError(self._busy_message(self._read() or {}))

    def _busy_message(self, holder: dict) -> str:
        if not holder:
            return (f"--workdir={self.workdir} is locked ({self.path}, unreadable); if no run "
                    "uses this workdir, delete that file and rerun")
        who = f"process {holder.get('pid')} on host {holder.get('host')}"
        since = f" since {holder['since']}" if holder.get("since") else ""
        if holder.get("host") == self.owner["host"]:
            hint = "wait for it to finish (or stop it), or use another --workdir"
        else:
            hint = (f"wait for it to finish, or use another --workdir; if that process is gone, "
                    f"delete {self.path}")
        return f"--workdir={self.workdir} is in use by {who}{since}: {hint}"

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
            try:
                self.path.unlink()
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EROFS):
                    raise

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def workdir_lock(workdir: str | os.PathLike):
    """The lock of a training run's workdir: taken by process 0 only (the other processes of a
    multi-process run share the workdir with it); a no-op context on the other processes."""
    import contextlib

    import jax

    p = Path(workdir).absolute()
    if p.exists() and not p.is_dir():
        from btlm_jax.train.run_dir import RunError

        raise RunError(f"--workdir={workdir} is a file, not a directory; choose another path")
    if jax.process_index() != 0:
        return contextlib.nullcontext()
    return WorkdirLock(p)
