"""``kernel kill``: end live runs from another terminal, recorded in their folders.

A running kernel marks each of its live runs with ``<control dir>/live/<run_id>.json`` (its pid,
the run id and folder) and holds an exclusive ``flock`` on that file for as long as the run
lives. The lock is the proof of life: the operating system drops it when the kernel exits or dies,
so a mark left by a killed kernel is never mistaken for a live run and its pid (which may have
been reused) is never signalled. The mark is created under a temporary name, locked, then renamed
into place, so no reader ever sees an unlocked mark of a live run.

``kernel kill RUN`` writes ``<run_id>.kill`` (who asked, when) beside the mark and sends SIGTERM
to the kernel. The kernel reads the request, kills the run's sandbox (every process in it),
records ``run.kill`` and seals the folder with status ``killed``, and only then drops the lock;
``kernel kill`` waits for that. ``--all`` does the same for every live run of the runs dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from kernel.controlplane import control_dir

LIVE_DIR = "live"


def live_dir(runs_dir: Path) -> Path:
    return control_dir(runs_dir) / LIVE_DIR


class LiveMark:
    """The mark of one live run, held by its kernel."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def claim(cls, runs_dir: Path, run_id: str, run_dir: Path) -> LiveMark:
        d = live_dir(runs_dir)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{run_id}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps({"run_id": run_id, "kernel_pid": os.getpid(),
                                     "run_dir": str(run_dir)}).encode())
            os.rename(tmp, d / f"{run_id}.json")
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return cls(d / f"{run_id}.json", fd)

    def kill_request(self) -> dict[str, Any] | None:
        """What ``kernel kill`` wrote for this run, if it asked."""
        try:
            raw = self.path.with_suffix(".kill").read_bytes()
            req = json.loads(raw)
        except (OSError, ValueError):
            return None
        return req if isinstance(req, dict) else None

    def release(self) -> None:
        for p in (self.path.with_suffix(".kill"), self.path):
            with contextlib.suppress(OSError):
                os.unlink(p)
        os.close(self.fd)  # drops the lock: `kernel kill` sees the run has ended


def _is_live(path: Path) -> dict[str, Any] | None:
    """The mark's content if its kernel still holds the lock, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            data = os.read(fd, 65536)
            try:
                mark = json.loads(data)
            except ValueError:
                return None
            if (isinstance(mark, dict) and isinstance(mark.get("kernel_pid"), int)
                    and isinstance(mark.get("run_id"), str)):
                return mark
            return None
        return None  # lock free: its kernel is gone
    finally:
        os.close(fd)


def live_runs(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """Run id -> mark, for every run of ``runs_dir`` whose kernel is alive."""
    d = live_dir(runs_dir)
    out: dict[str, dict[str, Any]] = {}
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return out
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        mark = _is_live(d / name)
        if mark is not None and mark["run_id"] == name[: -len(".json")]:
            out[mark["run_id"]] = mark
    return out


def request_kill(runs_dir: Path, mark: dict[str, Any]) -> None:
    """Ask the kernel of a live run to kill it: the request file, then SIGTERM."""
    path = live_dir(runs_dir) / f"{mark['run_id']}.kill"
    body = json.dumps({"by": "kernel kill", "uid": os.getuid(), "pid": os.getpid(),
                       "requested_ns": time.time_ns()}).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(body)
    os.rename(tmp, path)
    os.kill(int(mark["kernel_pid"]), signal.SIGTERM)


def wait_ended(runs_dir: Path, run_ids: list[str], timeout: float) -> list[str]:
    """Wait until none of ``run_ids`` is live; returns those still live at the timeout."""
    deadline = time.monotonic() + timeout
    left = list(run_ids)
    while left and time.monotonic() < deadline:
        live = live_runs(runs_dir)
        left = [r for r in left if r in live]
        if left:
            time.sleep(0.05)
    return left
