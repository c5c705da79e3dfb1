"""The adversarial corpus as the agent of real ``kernel exec`` runs, on every backend.

tests/adversarial/test_corpus.py runs each attack in a bare sandbox. Here each attack is the
agent of a whole ``kernel exec`` run, with the same bait on the host and the same judgement
(``kernel.corpus.bait``/``judge``), under a policy with the corpus's limits. For each attack:

- the host-side evidence that it failed, as in the corpus (canaries, listeners, the victim...);
- the run folder shows it: the run verifies intact; its ``agent.exit`` record names how the
  agent ended, and the stdout blob it references holds the agent's own report line (the same
  line the kernel relayed), or, for an attack whose agent may be killed before it reports, the
  record shows the ending (a limit, a signal);
- where the attack also went through the syscall layer (the forms in
  ``hostile_agent.THROUGH_KERNEL``), the agent was told "denied" with a rule, and the log holds
  that request and the denial with the same rule, the one expected here.

The runs of one backend are independent (fresh bait, workspace and runs dir each) and run a few
at a time, each attack in its own run; the tests then read the results.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pty
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kernel import corpus, keys
from kernel.recorder import REDACTED
from kernel.verify import verify_run
from tests.kernel_helpers import BACKENDS, ROOT, skip_unless_available

pytestmark = [pytest.mark.sandbox, pytest.mark.adversarial]

WORKERS = 4
"""Runs at a time: most of an attack's run is waiting (the kernel's syncs, a sandbox starting,
an attack's timeout), so a few overlap well on two cores."""

DENIED_BY = {
    "fs.traversal": "path.outside",
    "fs.absolute-write": "path.outside",
    "fs.proc-self-root": "path.outside",
    "fs.dev-shm": "path.outside",
    "fs.hidden-runs": "path.hidden",
    "fs.workspace-metadata": "write.mode",
    "net.tcp4": "exec.not_allowlisted",
    "proc.kill-host": "exec.not_allowlisted",
    "kernel.unshare-user": "exec.not_allowlisted",
    "kernel.mount": "exec.not_allowlisted",
}
"""The rule that must deny each attack's syscall-layer form (hostile_agent.THROUGH_KERNEL)."""

POLICY = """\
description = "The adversarial corpus under kernel exec: the corpus's own limits."

[sandbox]
isolation = "auto"
network = "off"
scratch_mb = {scratch_mb}
read_paths = [{corpus_dir}]

[limits]
wall_seconds = {l.wall_seconds}
cpu_seconds = {l.cpu_seconds}
memory_mb = {l.memory_mb}
processes = {l.processes}
open_files = {l.open_files}
file_size_mb = {l.file_size_mb}

[env]
passthrough = ["LANG"]
set = {{ PATH = "/usr/bin:/bin", HOME = "/tmp" }}

[[commands]]
id = "ls"
program = "ls"
reason = "the only command: every other one an attack asks for is not allowlisted"
"""


@dataclass
class KernelRun:
    """One attack run under ``kernel exec``: what the host saw and what the run folder says."""

    attack: corpus.Attack
    outcome: corpus.Outcome | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    """The kernel's --json line."""
    kernel_exit: int | None = None
    relayed: str = ""
    """Everything the kernel printed on stderr (the agent's output, relayed, and its own)."""
    verify: str = ""
    verify_problem: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    stdout_blob: bytes = b""
    stderr_blob: bytes = b""
    error: str | None = None

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_]


def _blob(run_dir: Path, digest: str | None) -> bytes:
    if not digest:
        return b""
    hexd = digest.split(":", 1)[1]
    return (run_dir / "objects" / "sha256" / hexd[:2] / hexd[2:]).read_bytes()


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for seg in sorted((run_dir / "log").iterdir())
            for line in seg.read_text().splitlines()]


def _poll_inbound(b: corpus.Bait, done: threading.Event, inbound: list[str]) -> None:
    """Keep trying to connect to the port the agent listens on, as the host, until it ends."""
    while not done.is_set():
        with contextlib.suppress(OSError), \
                socket.create_connection(("127.0.0.1", b.free_port), 0.1) as c:
            c.sendall(b"host")
            inbound.append("the host connected to the agent's port")
        done.wait(0.05)


def _run_one(backend: str, attack: corpus.Attack, home: Path, policy: Path,
             pub: Any) -> KernelRun:
    kr = KernelRun(attack)
    t0 = time.monotonic()
    with corpus.bait(set_environ=False) as b:
        master = slave = -1
        if "terminal" in attack.checks:
            master, slave = pty.openpty()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               "KERNEL_HOME": str(home), **b.kernel_environ()}
        argv = [sys.executable, "-m", "kernel._cli", "exec", "--json",
                "--workspace", str(b.workspace), "--runs-dir", str(b.hidden),
                "--isolation", backend, "--policy", str(policy), "--approve", "deny", "--",
                *corpus.agent_argv(b, attack)]
        done = threading.Event()
        inbound: list[str] = []
        poller = threading.Thread(target=_poll_inbound, args=(b, done, inbound), daemon=True)
        try:
            proc = subprocess.Popen(argv, stdin=slave if slave >= 0 else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                    cwd=ROOT, pass_fds=(b.inherited_fd,))
            if "no_inbound" in attack.checks:
                poller.start()
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                kr.error = "kernel exec did not end within 120 s"
        finally:
            done.set()
            if poller.is_alive():
                poller.join(5)
            injected = corpus.drain_terminal(master, slave)
        kr.kernel_exit = proc.returncode
        kr.relayed = err.decode(errors="replace")
        try:
            kr.summary = json.loads(out.decode().strip().splitlines()[-1])
            run_dir = Path(kr.summary["run_dir"])
            kr.events = _events(run_dir)
            report = verify_run(run_dir, [pub])
            kr.verify, kr.verify_problem = report.status, report.problem
            exits = kr.of_type("agent.exit")
            body = exits[-1]["body"] if exits else {}
            kr.stdout_blob = _blob(run_dir, body.get("stdout_blob"))
            kr.stderr_blob = _blob(run_dir, body.get("stderr_blob"))
        except (IndexError, ValueError, KeyError, OSError) as e:
            kr.error = kr.error or (f"no run folder to read ({type(e).__name__}: {e}); kernel "
                                    f"exit {proc.returncode}: {out[-500:]!r} {err[-1500:]!r}")
            body = {}
        # The verdict is the corpus's, on what the run recorded as the agent's output (and
        # whatever the kernel printed besides, so a leak anywhere is seen).
        ignore = ("runs.control", f"{b.hidden.name}/{kr.summary.get('run_id', '?')}")
        kr.outcome = corpus.judge(attack, b, backend, kr.stdout_blob,
                                  kr.stderr_blob + out + err, body.get("exit_code"),
                                  body.get("breach"), injected, inbound, started=t0,
                                  ignore=ignore)
        _make_removable(b.hidden)
    return kr


def _make_removable(runs: Path) -> None:
    """A sealed run folder is read-only; let the bait's clean-up remove it (as any user)."""
    for d, dirs, _ in os.walk(runs):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(Path(d) / name, 0o755)


def _relayed_as_recorded(recorded: str, relayed: str) -> bool:
    """Some line the kernel relayed is ``recorded``, but for the values the record redacts
    (secrets the kernel knows of, such as a session socket path in its environment)."""
    pattern = re.compile(".+?".join(map(re.escape, recorded.split(REDACTED))))
    return any(pattern.fullmatch(line) for line in relayed.splitlines())


_RESULTS: dict[str, dict[str, KernelRun]] = {}


@pytest.fixture(scope="module")
def kernel_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Any]]:
    base = tmp_path_factory.mktemp("corpus-under-kernel")
    home = base / "home"
    keys.load_or_create_kernel_key(home)  # once, before runs that would race to create it
    policy = base / "corpus.toml"
    policy.write_text(POLICY.format(scratch_mb=max(1, corpus.SCRATCH_BYTES >> 20),
                                    corpus_dir=json.dumps(str(corpus.AGENT.parent)),
                                    l=corpus.LIMITS))
    yield home, policy, keys.load_public_key(home / "keys" / "kernel.pub")


def _results(backend: str, kernel_home: tuple[Path, Path, Any]) -> dict[str, KernelRun]:
    skip_unless_available(backend)
    if backend not in _RESULTS:
        home, policy, pub = kernel_home

        def one(attack: corpus.Attack) -> KernelRun:
            try:
                return _run_one(backend, attack, home, policy, pub)
            except Exception:  # one broken run fails its own test, not every other one
                return KernelRun(attack, error=traceback.format_exc())

        with ThreadPoolExecutor(WORKERS) as pool:
            _RESULTS[backend] = {kr.attack.id: kr for kr in pool.map(one, corpus.ATTACKS)}
    return _RESULTS[backend]


def test_every_syscall_layer_form_has_its_expected_rule() -> None:
    spec = importlib.util.spec_from_file_location("hostile_agent", corpus.AGENT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert set(mod.THROUGH_KERNEL) == set(DENIED_BY)
    assert set(DENIED_BY) <= set(corpus.BY_ID)
    assert not set(DENIED_BY) & corpus.MAY_DIE


@pytest.mark.parametrize("attack", corpus.ATTACKS, ids=[a.id for a in corpus.ATTACKS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attack_under_kernel_exec_is_stopped_and_recorded(
        backend: str, attack: corpus.Attack, kernel_home: tuple[Path, Path, Any]) -> None:
    kr = _results(backend, kernel_home)[attack.id]
    assert kr.error is None, kr.error
    o = kr.outcome
    assert o is not None
    # the host's evidence
    assert o.held, (o.evidence, o.result, o.status, kr.relayed[-2000:])
    assert o.evidence and all(e.startswith("held: ") for e in o.evidence)
    # the run folder: sealed, intact, and its record of the agent's end
    assert kr.verify == "intact", (kr.verify, kr.verify_problem)
    assert kr.summary["isolation"] == backend
    (exit_ev,) = kr.of_type("agent.exit")
    body = exit_ev["body"]
    assert body["status"] == kr.summary["status"], body
    assert kr.of_type("run.end")[0]["body"]["status"] == body["status"]
    line, _ = corpus.report_of(kr.stdout_blob)
    if line is None:
        assert attack.id in corpus.MAY_DIE, (body, kr.stdout_blob[-500:], kr.stderr_blob[-500:])
        assert body["status"] != "passed", body  # a kill or a limit ended it, as recorded
    else:
        report = json.loads(line)
        assert report["attack"] == attack.id
        assert _relayed_as_recorded(line, kr.relayed), \
            "the kernel relayed a different report than it recorded"
        # the recorded report is the one the verdict was taken from
        assert report["result"] == o.result
    # the syscall-layer form: the denial the agent was told is the one recorded
    rule = DENIED_BY.get(attack.id)
    if rule is None:
        assert line is None or "kernel" not in json.loads(line)
        return
    assert line is not None, "no report"
    told = json.loads(line)["kernel"]
    assert told["ok"] is False and told["decision"] == "denied", told
    assert told["rule"] == rule, told
    requests = {e["body"]["req"]: e["body"] for e in kr.of_type("syscall.request")}
    denials = [e["body"] for e in kr.of_type("syscall.decision")
               if e["body"]["decision"] == "denied"]
    assert [d["rule"] for d in denials] == [rule], denials
    assert requests[denials[0]["req"]]["call"] == told["call"]
    assert kr.summary["denials"] == 1
