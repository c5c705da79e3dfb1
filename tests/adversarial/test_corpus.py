"""The adversarial corpus (kernel/corpus, docs/adversarial-corpus.md) on every backend.

Each attack runs in a fresh real sandbox with fresh bait on the host (canary paths, a secret
file, listeners, a victim process, a pty); the verdict is what the host observed. The same code
is what ``kernel selftest`` runs on an operator's host. A negative control runs the harmless
part of the corpus without any sandbox and checks that the host evidence does see those attacks
succeed, so a check that cannot fail would show up here.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kernel import corpus
from kernel.errors import ExitCode
from sandbox.base import Availability, Backend, SandboxSpec
from tests.sandbox_helpers import BACKENDS, backend_or_skip

pytestmark = [pytest.mark.sandbox, pytest.mark.adversarial]
ROOT = Path(__file__).resolve().parents[2]

# Categories the corpus must cover, with the least number of distinct attacks in each.
REQUIRED = {"filesystem": 15, "network": 8, "processes": 8, "kernel surface": 15,
            "terminal": 2, "resources": 3, "leaks": 2}


def test_the_catalog_is_complete_and_matches_the_agent() -> None:
    assert len(corpus.ATTACKS) >= 50
    assert len(corpus.BY_ID) == len(corpus.ATTACKS), "duplicate attack ids"
    counts = corpus.counts()
    for cat, least in REQUIRED.items():
        assert counts[cat] >= least, (cat, counts[cat])
    spec = importlib.util.spec_from_file_location("hostile_agent", corpus.AGENT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ids = {a.id.replace(".", "_").replace("-", "_") for a in corpus.ATTACKS}
    assert ids == set(mod.ATTACKS), ids ^ set(mod.ATTACKS)
    doc = (ROOT / "docs" / "adversarial-corpus.md").read_text()
    for a in corpus.ATTACKS:
        assert f"`{a.id}`" in doc, f"{a.id} is not in docs/adversarial-corpus.md"


@pytest.mark.parametrize("attack", corpus.ATTACKS, ids=[a.id for a in corpus.ATTACKS])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_attack_is_stopped(backend_name: str, attack: corpus.Attack) -> None:
    backend = backend_or_skip(backend_name)
    o = corpus.run_attack(backend, attack)
    assert o.held, (o.evidence, o.result, o.status)
    assert o.evidence and all(e.startswith("held: ") for e in o.evidence)


# --- negative control: the same bait and checks, no sandbox -----------------------------------


class _Plain:
    def __init__(self, spec: SandboxSpec) -> None:
        self.enforced: dict[str, Any] = {"backend": "none"}
        self.p = subprocess.Popen(list(spec.argv), cwd=spec.cwd, env=dict(os.environ),
                                  stdin=spec.stdin if spec.stdin is not None
                                  else subprocess.DEVNULL, stdout=spec.stdout,
                                  stderr=spec.stderr, close_fds=False)
        self.pid = self.p.pid

    def poll(self) -> int | None:
        return self.p.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def breach(self) -> str | None:
        return None

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)

    def cleanup(self) -> None:
        pass


class _NoSandbox:
    """A 'backend' that isolates nothing: the agent runs as a plain child process."""

    name = "none"

    def agent_ids(self) -> tuple[int, int]:
        return os.getuid(), os.getgid()

    def probe(self) -> Availability:
        return Availability(True)

    def start(self, spec: SandboxSpec) -> _Plain:
        return _Plain(spec)


# Only attacks that are harmless to the host when they succeed (they hit the bait only).
CONTROL = ["fs.absolute-write", "fs.traversal", "fs.read-secret", "fs.hidden-runs",
           "fs.workspace-write", "fs.workspace-metadata", "fs.dev-shm", "net.tcp4", "net.udp4",
           "net.pathname-unix", "net.abstract-unix", "proc.setsid", "proc.double-fork",
           "leak.environment", "leak.inherited-fds", "leak.host-processes"]


@pytest.mark.parametrize("attack_id", CONTROL)
def test_without_a_sandbox_the_evidence_shows_the_attack(attack_id: str) -> None:
    backend: Backend = _NoSandbox()
    o = corpus.run_attack(backend, corpus.BY_ID[attack_id])
    assert not o.held, (o.evidence, o.result)
    assert any(e.startswith("BROKEN: ") for e in o.evidence)


# --- kernel selftest ---------------------------------------------------------------------------


def _selftest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kernel._cli", "selftest", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_selftest_reports_each_backend_and_category() -> None:
    for name in BACKENDS:
        backend_or_skip(name)
    res = _selftest("--only", "fs.traversal", "--only", "net.tcp4", "--only", "kernel.bpf")
    assert res.returncode == ExitCode.OK, res.stdout + res.stderr
    for name in BACKENDS:
        assert f"{name}: filesystem: 1/1 attacks stopped" in res.stdout
        assert f"{name}: kernel surface: 1/1 attacks stopped" in res.stdout
        assert f"{name}: 3/3 guarantees hold here" in res.stdout


def test_selftest_json_and_list() -> None:
    backend_or_skip("native")
    res = _selftest("--isolation", "native", "--only", "leak.", "--json")
    assert res.returncode == ExitCode.OK, res.stdout + res.stderr
    import json
    rep = json.loads(res.stdout)
    rows = rep["backends"]["native"]["results"]
    assert {r["id"] for r in rows} == {a.id for a in corpus.ATTACKS if a.id.startswith("leak.")}
    assert all(r["held"] for r in rows)
    listing = _selftest("--list")
    assert listing.returncode == 0
    assert len(listing.stdout.splitlines()) == len(corpus.ATTACKS)
    bad = _selftest("--only", "no-such-attack")
    assert bad.returncode == ExitCode.USAGE
    assert "Traceback" not in bad.stderr
