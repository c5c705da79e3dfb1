"""Durability order of the request path, checked on a real run in a real sandbox.

The kernel writes a request's line without its own fdatasync and lets the decision's fdatasync
cover both lines (one sync instead of two). These tests pin what must never regress with that:
no answer reaches the agent while any record is not yet durable, no workspace effect happens
before its decision is durable, and every request line is durable before its decision returns.
The one exception is write-ahead (kernel/dispatch.py): a log-durable write is committed by its
decision line, which follows the request line holding its content; its own result line may
still be pending when the agent is answered, and nothing else may be.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kernel import policy as policy_mod
from kernel import supervisor
from kernel.recorder import LOG_FILE, RunRecorder
from tests.kernel_helpers import AGENT_PY, make_workspace, skip_unless_available

pytestmark = pytest.mark.sandbox

AGENT = """
from syscalls.client import Kernel
k = Kernel.from_env()
for i in range(4):
    k.info()
    k.write(f"f{i}.txt", b"content %d" % i)
try:
    k.write("../outside", b"x")
except OSError:
    pass
"""


def test_no_answer_and_no_effect_before_the_records_are_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    skip_unless_available("native")
    ws = make_workspace(tmp_path, {"agent.py": AGENT})
    trace: list[tuple[str, Any]] = []
    recorders: list[RunRecorder] = []
    log_fds: set[int] = set()

    real_create = RunRecorder.create.__func__  # type: ignore[attr-defined]

    def create(cls: type[RunRecorder], *a: Any, **kw: Any) -> RunRecorder:
        rec = real_create(cls, *a, **kw)
        recorders.append(rec)
        log_fds.add(rec._fd)  # the log descriptor, to tell its syncs apart
        return rec

    real_write, real_fdatasync = os.write, os.fdatasync
    real_send = supervisor.Channel.send

    def write(fd: int, data: Any) -> int:
        if fd in log_fds:
            trace.append(("log", bytes(data)))
        return real_write(fd, data)

    def fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        if fd in log_fds:
            trace.append(("sync", None))

    def send(self: supervisor.Channel, obj: dict[str, Any]) -> None:
        trace.append(("answer", recorders[0].unsynced()))
        real_send(self, obj)

    from syscalls import write as write_sys

    real_renameat2 = write_sys.renameat2

    def renameat2(*a: Any) -> None:
        trace.append(("effect", recorders[0].unsynced()))
        real_renameat2(*a)

    monkeypatch.setattr(RunRecorder, "create", classmethod(create))
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(supervisor.Channel, "send", send)
    monkeypatch.setattr(write_sys, "renameat2", renameat2)

    outcome = supervisor.run(supervisor.ExecOptions(
        argv=[AGENT_PY, "agent.py"], policy=policy_mod.load("default"), workspace=ws,
        runs_dir=tmp_path / "runs", home=tmp_path / "home", isolation="native"))
    assert outcome.status == "passed", outcome
    assert outcome.requests == 9

    answers = [t for t in trace if t[0] == "answer"]
    assert len(answers) == 9
    # 1. every answer: nothing appended is still waiting for its fdatasync, except the result
    #    line of a log-durable write, right after its decision (synced, holding the content)
    last_lines: list[bytes] = []
    late = 0
    for what, data in trace:
        if what == "log":
            last_lines.append(data)
        elif what == "answer" and data != 0:
            assert data == 1, trace
            result, decision, request = last_lines[-1], last_lines[-2], last_lines[-3]
            assert b'"type":"syscall.result"' in result and b'"ok":true' in result
            assert b'"type":"syscall.decision"' in decision and b'"durable":"log"' in decision
            assert b'"content_b64":' in request
            late += 1
    assert late == 4, answers  # the four writes; info and the denial: all synced
    # 2. every workspace effect: its request and decision lines are already durable
    effects = [t for t in trace if t[0] == "effect"]
    assert len(effects) == 4
    assert all(unsynced == 0 for _, unsynced in effects), effects
    # 3. in the log itself: a request line is always followed by the decision line, and a sync
    #    comes after the decision before anything else happens
    kinds: list[str] = []
    for what, data in trace:
        if what == "log":
            kinds.append("request" if b'"type":"syscall.request"' in data else "line")
        else:
            kinds.append(what)
    for i, k in enumerate(kinds):
        if k == "request":
            assert kinds[i + 1] == "line" and kinds[i + 2] == "sync", kinds[i:i + 4]
    # 4. and one fdatasync per request/decision pair, not two
    assert kinds.count("request") == 9
    log = (outcome.run_dir / LOG_FILE).read_bytes()
    assert log.count(b'"type":"syscall.request"') == 9
