"""Helpers for the tests of ``spawn``: profiles with a ``[spawn]`` section, the small library the
test agents share inside their sandboxes, and readers for the run folders of an agent tree.

Every agent of a tree has its own run folder in the runs dir (children are siblings of the root's
folder, linked by the ``lineage`` key of their ``run.json``), so the tests read the whole runs dir
and rebuild the tree from the folders, never from what an agent printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel.corpus import pids_with_marker
from tests.kernel_helpers import AGENT_PY, ROOT, kernel_cmd, open_up

AGENTS = Path(__file__).resolve().parent / "adversarial" / "agents"

SPAWNLIB = (AGENTS / "spawnlib.py").read_text()
"""The library the spawn test agents import (written into each workspace beside them)."""

BUDGET_FIELDS = ("syscalls", "bytes_written", "files_written", "exec_count")


def _without_spawn(text: str) -> str:
    """``text`` without its ``[spawn]`` and ``[[spawn.stop]]`` tables (tests write their own)."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        header = line.strip()
        if header.startswith("["):
            skipping = header in ("[spawn]", "[[spawn.stop]]")
        if not skipping:
            out.append(line)
    return "".join(out)


def spawn_policy(directory: Path, *, max_depth: int = 1, max_replicas: int = 4,
                 max_spawns: int = 8, cooldown_seconds: int = 0, expiration_seconds: int = 60,
                 stop: tuple[tuple[str, bool], ...] = (), quotas: dict[str, int] | None = None,
                 base: str = "default", name: str = "spawn.toml") -> Path:
    """A copy of a shipped profile with ``quotas`` changed and a ``[spawn]`` section added."""
    text = _without_spawn((ROOT / "policies" / f"{base}.toml").read_text())
    for key, value in (quotas or {}).items():
        text, n = re.subn(rf"(?m)^{key} = \d+$", f"{key} = {value}", text)
        assert n == 1, f"quota {key} not found in {base}.toml"
    text += textwrap.dedent(f"""
        [spawn]
        max_depth = {max_depth}
        max_replicas = {max_replicas}
        max_spawns = {max_spawns}
        cooldown_seconds = {cooldown_seconds}
        expiration_seconds = {expiration_seconds}
        """)
    for when, kill_tree in stop:
        text += f'\n[[spawn.stop]]\nwhen = "{when}"\nkill_tree = {str(kill_tree).lower()}\n'
    path = directory / name
    path.write_text(text)
    return path


def agent_files(*names: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Workspace files: the shared library, the named programs of tests/adversarial/agents/ and
    ``extra`` (name -> source)."""
    files = {"spawnlib.py": SPAWNLIB}
    for n in names:
        files[n] = (AGENTS / n).read_text()
    for n, src in (extra or {}).items():
        files[n] = textwrap.dedent(src)
    return files


# ---- the folders of a tree ---------------------------------------------------------------------


@dataclass
class Folder:
    """One agent's run folder, read from the host."""

    path: Path
    header: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.header = json.loads((self.path / "run.json").read_text())

    @property
    def run_id(self) -> str:
        return str(self.header["run_id"])

    @property
    def lineage(self) -> dict[str, Any] | None:
        lin = self.header.get("lineage")
        return dict(lin) if isinstance(lin, dict) else None

    @property
    def depth(self) -> int:
        return int(self.lineage["depth"]) if self.lineage else 0

    @property
    def parent(self) -> str | None:
        return str(self.lineage["parent"]) if self.lineage else None

    def events(self) -> list[dict[str, Any]]:
        """Every complete record (a torn last line, left by a crash, is skipped)."""
        out: list[dict[str, Any]] = []
        for seg in sorted((self.path / "log").iterdir()):
            for line in seg.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e["body"] for e in self.events() if e["type"] == kind]

    def calls(self, call: str) -> list[tuple[dict[str, Any], dict[str, Any] | None,
                                             dict[str, Any] | None]]:
        """(request, decision, result) bodies of every request for ``call``, in order."""
        reqs: dict[int, dict[str, Any]] = {}
        decs: dict[int, dict[str, Any]] = {}
        ress: dict[int, dict[str, Any]] = {}
        for e in self.events():
            b = e["body"]
            if e["type"] == "syscall.request" and b.get("call") == call:
                reqs[b["req"]] = dict(b, seq=e["seq"])
            elif e["type"] == "syscall.decision" and b.get("req") in reqs:
                decs[b["req"]] = dict(b, seq=e["seq"])
            elif e["type"] == "syscall.result" and b.get("req") in reqs:
                ress[b["req"]] = b
        return [(reqs[r], decs.get(r), ress.get(r)) for r in sorted(reqs)]

    def decisions(self, call: str) -> list[dict[str, Any]]:
        return [d for _, d, _ in self.calls(call) if d is not None]

    @property
    def sealed(self) -> bool:
        return (self.path / "SEAL.json").exists()

    @property
    def status(self) -> str | None:
        if not self.sealed:
            return None
        return str(json.loads((self.path / "SEAL.json").read_text())["body"]["status"])

    @property
    def seal_digest(self) -> str:
        return "sha256:" + hashlib.sha256((self.path / "SEAL.json").read_bytes()).hexdigest()


def tree(runs: Path) -> dict[str, Folder]:
    """Every run folder of ``runs`` by run id."""
    if not runs.exists():
        return {}
    out = {}
    for d in sorted(runs.iterdir()):
        if d.is_dir() and (d / "run.json").exists():
            f = Folder(d)
            out[f.run_id] = f
    return out


def root_of(folders: dict[str, Folder]) -> Folder:
    roots = [f for f in folders.values() if f.lineage is None]
    assert len(roots) == 1, f"expected one root folder, found {[r.run_id for r in roots]}"
    return roots[0]


def children(folders: dict[str, Folder], parent: str) -> list[Folder]:
    return [f for f in folders.values() if f.parent == parent]


def verify(home: Path, run_dir: Path) -> subprocess.CompletedProcess[str]:
    return kernel_cmd(["verify", str(run_dir), "--trust", str(home / "keys" / "kernel.pub"),
                      "--json"], home=home)


def verdict(home: Path, run_dir: Path) -> dict[str, Any]:
    v = verify(home, run_dir)
    try:
        out: dict[str, Any] = json.loads(v.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"kernel verify printed no JSON (exit {v.returncode}): "
                             f"{v.stdout}{v.stderr}") from None
    out["exit"] = v.returncode
    return out


def tree_verdict(home: Path, root: Path) -> dict[str, dict[str, Any]]:
    """``kernel verify --json`` of the root folder (which verifies its children with it,
    recursively): each folder's report by run id, the command's exit code under ``"exit"`` of
    the root's report."""
    rep = verdict(home, root)  # the root's report, with "exit"
    out: dict[str, dict[str, Any]] = {}
    todo = [rep]
    while todo:
        r = todo.pop()
        out[r["run_id"]] = r
        todo.extend(r.get("children") or [])
    return out


def assert_tree_intact(home: Path, folders: dict[str, Folder]) -> None:
    """One ``kernel verify`` of the root covers every folder of the tree: all intact."""
    root = root_of(folders)
    reports = tree_verdict(home, root.path)
    assert reports[root.run_id]["exit"] == 0, reports[root.run_id]
    assert set(reports) == set(folders), (sorted(reports), sorted(folders))
    for rid, r in reports.items():
        assert r["status"] == "intact", (rid, r)


def assert_linked(folders: dict[str, Folder]) -> None:
    """Every child folder and its parent's record point at each other: the child's header names
    the parent and the parent's allowed spawn decision (by seq and record hash); the parent's log
    has that decision for this child, the spawn's result and, once the child is sealed, its
    ``spawn.exit`` with the child's seal digest."""
    for child in folders.values():
        lin = child.lineage
        if lin is None:
            continue
        parent = folders[lin["parent"]]
        assert lin["root"] == root_of(folders).run_id
        assert lin["depth"] == parent.depth + 1
        events = parent.events()
        by_seq = {e["seq"]: e for e in events}
        dec = by_seq[lin["parent_decision_seq"]]
        assert dec["type"] == "syscall.decision", dec
        assert dec["body"]["decision"] == "allowed" and dec["body"]["child"] == child.run_id
        assert dec["body"]["manifest_digest"] == lin["manifest_digest"]
        nxt = by_seq.get(lin["parent_decision_seq"] + 1)
        if nxt is not None:
            assert nxt["prev"] == lin["parent_decision_hash"], "decision hash does not match"
        if child.sealed:
            exits = [e["body"] for e in events if e["type"] == "spawn.exit"
                     and e["body"]["child"] == child.run_id]
            if parent.sealed:
                assert len(exits) == 1, (parent.run_id, child.run_id, exits)
            for x in exits:
                assert x["seal"] == child.seal_digest
                assert x["status"] == child.status


# ---- a tree running in the background ----------------------------------------------------------


@dataclass
class Live:
    proc: subprocess.Popen[bytes]
    workspace: Path
    runs: Path
    home: Path
    out: Path

    def folders(self) -> dict[str, Folder]:
        return tree(self.runs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def start_tree(tmp_path: Path, *, backend: str, policy: Path, files: dict[str, str],
               argv: list[str], env: dict[str, str] | None = None) -> Live:
    """``kernel exec`` of ``argv`` in a fresh workspace holding ``files``, in the background.
    The kernel's output (the agents' relayed output included) goes to ``tmp_path/kernel.out``."""
    ws = tmp_path / "ws"
    ws.mkdir()
    for rel, text in files.items():
        p = ws / rel
        p.write_text(text)
        p.chmod(0o644)
    open_up(ws)
    ws.chmod(0o755)
    home, runs, out = tmp_path / "home", tmp_path / "runs", tmp_path / "kernel.out"
    full_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KERNEL_HOME": str(home),
                "LANG": "C.UTF-8", **(env or {})}
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kernel._cli", "exec", "--json", "--workspace", str(ws),
             "--runs-dir", str(runs), "--isolation", backend, "--policy", str(policy), "--",
             *argv], stdout=f, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    return Live(proc, ws, runs, home, out)


def wait_for(cond: Any, what: str, live: Live | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if live is not None and live.proc.poll() is not None:
            raise AssertionError(f"the kernel ended (exit {live.proc.returncode}) before {what}"
                                 f":\n{live.out.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def no_process_left(marker: str, timeout: float = 10) -> list[int]:
    """Host pids still holding ``marker`` after up to ``timeout`` seconds (the host's table)."""
    deadline = time.monotonic() + timeout
    left = pids_with_marker(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = pids_with_marker(marker)
    return left


def reap(marker: str) -> None:
    """Clean-up after a failed test: SIGKILL whatever still holds ``marker``."""
    for pid in pids_with_marker(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


PY = AGENT_PY
