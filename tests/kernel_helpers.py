"""Helpers for tests that run the real `kernel` command on real agents in real sandboxes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandbox import registry

ROOT = Path(__file__).resolve().parents[1]
AGENT_PY = "/usr/bin/python3"
BACKENDS = ["native", "firejail"]


def skip_unless_available(name: str) -> None:
    av = registry.probe(name)
    if not av.available:
        pytest.skip(f"{name} isolation is not available here: {'; '.join(av.missing)}")


def open_up(path: Path) -> None:
    """Let the unprivileged agent uid traverse from / to ``path`` (pytest's tmp dirs are 0700)."""
    p = path
    while p != p.parent:
        try:
            mode = p.stat().st_mode
            if not mode & 0o001:
                os.chmod(p, (mode & 0o7777) | 0o011)
        except OSError:
            pass
        p = p.parent


@dataclass
class Run:
    proc: subprocess.CompletedProcess[str]
    out: dict[str, Any]
    workspace: Path
    home: Path

    @property
    def run_dir(self) -> Path:
        return Path(self.out["run_dir"])

    @property
    def agent_output(self) -> str:
        """What the agent printed (relayed on the kernel's stderr in --json mode)."""
        return self.proc.stderr

    def events(self) -> list[dict[str, Any]]:
        log = self.run_dir / "log"
        lines: list[dict[str, Any]] = []
        for seg in sorted(log.iterdir()):
            for line in seg.read_text().splitlines():
                lines.append(json.loads(line))
        return lines

    def decisions(self) -> list[dict[str, Any]]:
        return [e["body"] for e in self.events() if e["type"] == "syscall.decision"]

    def verify(self) -> subprocess.CompletedProcess[str]:
        return kernel_cmd(["verify", str(self.run_dir), "--trust",
                           str(self.home / "keys" / "kernel.pub")], home=self.home)


def kernel_cmd(args: list[str], *, home: Path, env: dict[str, str] | None = None,
               cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KERNEL_HOME": str(home),
                "LANG": "C.UTF-8"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "kernel._cli", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd or ROOT, timeout=timeout)


def start_exec(ws: Path, runs: Path, home: Path, out: Path,
               env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``kernel exec`` of ``ws/agent.py`` (native), in the background; everything the agent
    prints (relayed by the kernel) goes to the file ``out``. For tests that kill the kernel."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KERNEL_HOME": str(home), "LANG": "C.UTF-8",
           **(env_extra or {})}
    with open(out, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "kernel._cli", "exec", "--workspace", str(ws),
             "--runs-dir", str(runs), "--isolation", "native", "--", AGENT_PY, "agent.py"],
            stdout=f, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)


def make_workspace(tmp_path: Path, files: dict[str, str] | None = None) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    for rel, text in (files or {}).items():
        p = ws / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    open_up(ws)
    return ws


def run_agent(tmp_path: Path, source: str, *, backend: str, policy: str = "default",
              files: dict[str, str] | None = None, extra: list[str] | None = None,
              env: dict[str, str] | None = None, workspace: Path | None = None,
              runs_dir: Path | None = None, timeout: float = 120,
              argv: list[str] | None = None) -> Run:
    """Write ``source`` as ws/agent.py and run it under ``kernel exec --json``."""
    ws = workspace or make_workspace(tmp_path, files)
    (ws / "agent.py").write_text(textwrap.dedent(source))
    home = tmp_path / "home"
    runs = runs_dir or tmp_path / "runs"
    args = ["exec", "--json", "--workspace", str(ws), "--runs-dir", str(runs),
            "--isolation", backend, "--policy", policy, *(extra or []), "--",
            *(argv or [AGENT_PY, "agent.py"])]
    proc = kernel_cmd(args, home=home, env=env, timeout=timeout)
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(f"kernel exec printed no JSON (exit {proc.returncode}):\n"
                             f"stdout: {proc.stdout}\nstderr: {proc.stderr}") from None
    return Run(proc=proc, out=out, workspace=ws, home=home)


CLIENT_PRELUDE = """
import json, os, sys
from syscalls.client import Kernel, SyscallError
k = Kernel.from_env()
def report(name, value):
    print("RESULT " + json.dumps({name: value}), flush=True)
def attempt(name, fn):
    try:
        r = fn()
        report(name, {"ok": True, "result": r if isinstance(r, (dict, str, int)) else None})
    except SyscallError as e:
        report(name, {"ok": False, "errno": e.errno, "rule": e.rule, "decision": e.decision})
    except OSError as e:
        report(name, {"ok": False, "errno": e.errno, "os": True})
"""


def results(run: Run) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for line in run.agent_output.splitlines():
        if line.startswith("RESULT "):
            out.update(json.loads(line[len("RESULT "):]))
    return out
