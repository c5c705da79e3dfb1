"""Shared helpers for tests that start real sandboxes, through the contract of sandbox/base.py
only (so the same tests run against every backend)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kernel.corpus import collect_output, pids_with_marker
from kernel.errors import SandboxError
from kernel.policy import Limits
from sandbox import registry
from sandbox.base import Backend, Sandboxed, SandboxSpec

AGENTS = Path(__file__).resolve().parent / "adversarial" / "agents"
PYTHON = "/usr/bin/python3"
BACKENDS = ["native", "firejail"]
DEFAULT_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
MIB = 1024 * 1024


def backend_or_skip(name: str) -> Backend:
    """The backend, or a skip saying exactly why it cannot run here."""
    try:
        b = registry.backend(name)
    except ImportError as e:
        pytest.skip(f"backend {name!r} is not built in this checkout: {e}")
    except SandboxError as e:
        pytest.skip(f"backend {name!r}: {e.message}")
    av = b.probe()
    if not av.available:
        pytest.skip(f"backend {name!r} unavailable here: {'; '.join(av.missing)}")
    return b


def make_spec(workspace: Path, argv: list[str], *, env: Mapping[str, str] | None = None,
              writable: bool = False, limits: Limits | None = None,
              scratch_bytes: int = 16 * MIB, hidden: tuple[Path, ...] = (),
              read_paths: tuple[Path, ...] = (), pass_fds: tuple[int, ...] = (),
              stdin: int | None = None, stdout: int | None = None, stderr: int | None = None,
              cwd: Path | None = None, view: Path | None = None) -> SandboxSpec:
    view = view or workspace
    return SandboxSpec(
        argv=tuple(argv),
        workspace=workspace,
        workspace_view=view,
        workspace_writable=writable,
        cwd=cwd or view,
        env=dict(DEFAULT_ENV if env is None else env),
        limits=limits or Limits(wall_seconds=60, cpu_seconds=30, memory_mb=512, processes=64,
                                open_files=256, file_size_mb=64),
        scratch_bytes=scratch_bytes,
        pass_fds=pass_fds,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        hidden=hidden,
        read_paths=(AGENTS, *read_paths),
        wall_seconds=None,
    )


def agent_argv(script: str, *args: str) -> list[str]:
    return [PYTHON, str(AGENTS / script), *args]


@dataclass
class Result:
    status: int | None
    stdout: bytes
    stderr: bytes
    breach: str | None
    enforced: dict[str, Any]
    timed_out: bool

    def json(self) -> dict[str, Any]:
        """The last line of stdout that is a JSON object (what agent scripts print)."""
        for line in reversed(self.stdout.decode(errors="replace").splitlines()):
            line = line.strip()
            if line.startswith("{"):
                obj: dict[str, Any] = json.loads(line)
                return obj
        raise AssertionError(f"no JSON from the agent; status={self.status} "
                             f"stdout={self.stdout[-2000:]!r} stderr={self.stderr[-2000:]!r}")

    @property
    def text(self) -> str:
        return (self.stdout + self.stderr).decode(errors="replace")


def start(backend: Backend, spec: SandboxSpec) -> Sandboxed:
    return backend.start(spec)


def run(backend: Backend, spec: SandboxSpec, *, timeout: float = 60.0) -> Result:
    """Start ``spec`` with stdout/stderr on pipes (unless the spec sets them), collect both,
    wait up to ``timeout`` seconds (then kill), clean up."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    spec = dataclasses.replace(
        spec,
        stdout=out_w if spec.stdout is None else spec.stdout,
        stderr=err_w if spec.stderr is None else spec.stderr,
    )
    try:
        sb = backend.start(spec)
    finally:
        os.close(out_w)
        os.close(err_w)
    try:
        out, err, timed_out = collect(sb, out_r, err_r, timeout)
        status = sb.poll()
        breach = sb.breach()
        return Result(status, out, err, breach, dict(sb.enforced), timed_out)
    finally:
        sb.kill()
        sb.wait(10)
        sb.cleanup()
        os.close(out_r)
        os.close(err_r)


def collect(sb: Sandboxed, out_r: int, err_r: int, timeout: float) -> tuple[bytes, bytes, bool]:
    """Read both pipes until EOF and the process has ended, or kill at the deadline."""
    return collect_output(sb, out_r, err_r, timeout)


def wait_gone(marker: str, seconds: float) -> list[int]:
    """Poll until no process carries ``marker``; returns the survivors (empty = all gone)."""
    end = time.monotonic() + seconds
    while True:
        left = pids_with_marker(marker)
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.05)
