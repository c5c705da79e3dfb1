"""Per-sandbox cgroups for memory and process count, where the host allows them.

Preference: a cgroup v2 tree with the ``memory`` and ``pids`` controllers (``memory.max``,
``pids.max``, ``cgroup.kill``); else v1 ``memory`` (``memory.limit_in_bytes`` and, when the
host has swap accounting, ``memory.memsw.limit_in_bytes``) and v1 ``pids`` (``pids.max``).

Groups are created *below the kernel's own cgroup* of each controller
(``<mount>/<own path>/agent-kernel/<unique>``), so whatever limits the host puts on the kernel
still apply to the sandboxes (hierarchical accounting) and nothing outside the kernel's own
subtree is touched. Only root can do this here; otherwise :func:`create` says why and the
sandbox falls back to rlimits (recorded, not a refusal).

The sandbox's first process joins the groups itself, through descriptors the parent opened
(:attr:`Group.procs_fds`), before it executes anything.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path("/sys/fs/cgroup")
SUBDIR = "agent-kernel"


def _own_path(controller: str | None) -> str | None:
    """This process's cgroup path for a v1 controller, or for v2 when ``controller`` is None."""
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller is None and ctrls == "":
            return path
        if controller is not None and controller in ctrls.split(","):
            return path
    return None


def _v2_root() -> Path | None:
    """The cgroup2 mount holding memory and pids, if any."""
    for candidate in (ROOT, ROOT / "unified"):
        try:
            ctrls = (candidate / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if "memory" in ctrls and "pids" in ctrls:
            return candidate
    return None


def mode() -> tuple[str, str]:
    """(``"v2"``, ``"v1"`` or ``"none"``, explanation) for this host and process."""
    if _v2_root() is not None:
        return "v2", "cgroup v2 with memory and pids"
    have = [c for c in ("memory", "pids") if (ROOT / c / "cgroup.procs").exists()]
    if have:
        return "v1", "cgroup v1 controllers: " + ", ".join(have)
    return "none", "no cgroup v2 memory/pids and no cgroup v1 memory or pids controller"


@dataclass
class Group:
    """The cgroups of one sandbox (one directory per v1 controller, or one v2 directory)."""

    version: str
    dirs: dict[str, Path]
    """controller (``memory``, ``pids``, or ``unified`` for v2) -> directory."""
    settings: dict[str, int]
    procs_fds: list[int] = field(default_factory=list)
    """Open ``cgroup.procs`` files the sandbox's first process writes its pid into."""

    def join_self(self) -> None:
        """Called in the child: move this process into every group (before it runs anything)."""
        pid = str(os.getpid()).encode()
        for fd in self.procs_fds:
            os.write(fd, pid)

    def close_fds(self) -> None:
        for fd in self.procs_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.procs_fds = []

    def _read(self, ctrl: str, name: str) -> str:
        try:
            return (self.dirs[ctrl] / name).read_text()
        except (OSError, KeyError):
            return ""

    @staticmethod
    def _field(text: str, key: str) -> int:
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
                return int(parts[1])
        return 0

    def breach(self) -> str | None:
        """``"memory"`` if the OOM killer acted in the group, ``"processes"`` if a fork was
        refused at ``pids.max``; else None."""
        if self.version == "v2":
            if self._field(self._read("unified", "memory.events"), "oom_kill") > 0:
                return "memory"
            if self._field(self._read("unified", "pids.events"), "max") > 0:
                return "processes"
            return None
        if "memory" in self.dirs and self._field(self._read("memory", "memory.oom_control"),
                                                 "oom_kill") > 0:
            return "memory"
        if "pids" in self.dirs and self._field(self._read("pids", "pids.events"), "max") > 0:
            return "processes"
        return None

    def pids(self) -> set[int]:
        out: set[int] = set()
        for ctrl in self.dirs:
            for tok in self._read(ctrl, "cgroup.procs").split():
                if tok.isdigit():
                    out.add(int(tok))
        return out

    def kill(self, deadline_s: float = 2.0) -> None:
        """SIGKILL every process in the groups until they are empty (v1 has no cgroup.kill)."""
        if self.version == "v2":
            try:
                (self.dirs["unified"] / "cgroup.kill").write_text("1")
            except OSError:
                pass
        end = time.monotonic() + deadline_s
        while True:
            pids = self.pids()
            if not pids or time.monotonic() > end:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.002)

    def remove(self, deadline_s: float = 2.0) -> None:
        """rmdir the groups (retrying while the last processes are being reaped)."""
        self.close_fds()
        end = time.monotonic() + deadline_s
        for d in self.dirs.values():
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > end:
                        break
                    time.sleep(0.005)

    def summary(self) -> dict[str, Any]:
        return {"mode": self.version, "paths": {k: str(v) for k, v in self.dirs.items()},
                **self.settings}


_prewarm: threading.Thread | None = None


def prewarm() -> None:
    """Start moving this process into the cgroup it is already in, in a background thread.

    Joining a cgroup (writing a pid to ``cgroup.procs``) takes a global lock whose first writer
    after a quiet spell waits for an RCU grace period: about 12 ms on an idle host, paid by the
    sandbox's first process before anything else can run. A writer that came shortly before
    (within about 30 ms here) leaves the lock in its writer-friendly state, and the sandbox's
    join then takes about 0.1 ms. Moving a process to the group it is in changes nothing. The
    kernel calls this when it probes the backend, well before it starts the sandbox;
    :func:`wait_prewarm` must run before any ``fork`` that starts one (the sandbox is forked
    from a single-threaded kernel).
    """
    global _prewarm
    if os.geteuid() != 0 or _prewarm is not None:
        return
    m, _ = mode()
    if m == "none":
        return
    if m == "v2":
        root, own = _v2_root(), _own_path(None)
        target = None if root is None or own is None else root / own.lstrip("/")
    else:
        ctrl = "memory" if (ROOT / "memory" / "cgroup.procs").exists() else "pids"
        own = _own_path(ctrl)
        target = None if own is None else ROOT / ctrl / own.lstrip("/")
    if target is None:
        return
    procs = target / "cgroup.procs"

    def join_own() -> None:
        try:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.write(fd, str(os.getpid()).encode())
        except OSError:
            pass
        finally:
            os.close(fd)

    _prewarm = threading.Thread(target=join_own, name="cgroup-prewarm", daemon=True)
    _prewarm.start()


def wait_prewarm() -> None:
    """Wait for :func:`prewarm`'s thread (if any) to end."""
    t = _prewarm
    if t is not None:
        t.join()


def _mkdirs(base: Path) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    d = base / secrets.token_hex(8)  # 64 random bits (uuid4's first 16 hex digits had 60)
    d.mkdir()
    return d


def create(memory_bytes: int, pids_max: int) -> tuple[Group | None, str]:
    """Create the groups with their limits. Returns (group, "") or (None, why not)."""
    if os.geteuid() != 0:
        return None, "the kernel is not root: cgroups are not delegated to it"
    m, why = mode()
    if m == "none":
        return None, why
    made: list[Path] = []
    try:
        if m == "v2":
            root = _v2_root()
            own = _own_path(None)
            assert root is not None and own is not None
            base = root / own.lstrip("/") / SUBDIR
            base.mkdir(parents=True, exist_ok=True)
            # Controllers must be enabled on each level below our own group.
            for level in (root / own.lstrip("/"), base):
                (level / "cgroup.subtree_control").write_text("+memory +pids")
            d = _mkdirs(base)
            made.append(d)
            (d / "memory.max").write_text(str(memory_bytes))
            if (d / "memory.swap.max").exists():
                (d / "memory.swap.max").write_text("0")
            (d / "pids.max").write_text(str(pids_max))
            g = Group("v2", {"unified": d},
                      {"memory_bytes": memory_bytes, "pids_max": pids_max})
        else:
            dirs: dict[str, Path] = {}
            settings: dict[str, int] = {}
            for ctrl in ("memory", "pids"):
                own = _own_path(ctrl)
                if own is None or not (ROOT / ctrl / "cgroup.procs").exists():
                    continue
                d = _mkdirs(ROOT / ctrl / own.lstrip("/") / SUBDIR)
                made.append(d)
                dirs[ctrl] = d
                if ctrl == "memory":
                    (d / "memory.limit_in_bytes").write_text(str(memory_bytes))
                    settings["memory_bytes"] = memory_bytes
                    if (d / "memory.memsw.limit_in_bytes").exists():
                        (d / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
                        settings["memory_and_swap_bytes"] = memory_bytes
                else:
                    (d / "pids.max").write_text(str(pids_max))
                    settings["pids_max"] = pids_max
            g = Group("v1", dirs, settings)
        g.procs_fds = [os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
                       for d in g.dirs.values()]
        return g, ""
    except OSError as e:
        for d in made:
            try:
                d.rmdir()
            except OSError:
                pass
        return None, f"cannot set up {m} cgroups: {e}"
