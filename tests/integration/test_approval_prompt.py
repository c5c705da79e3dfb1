"""`kernel exec --approve prompt`, driven through a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

from tests.approval_helpers import (
    WRITE_ENV_AGENT,
    events,
    new_reviewer,
    policy_text,
    verify,
)
from tests.kernel_helpers import AGENT_PY, ROOT, make_workspace, skip_unless_available

pytestmark = pytest.mark.sandbox


def _take_tty() -> None:  # in the child, after setsid: the pty becomes its controlling tty
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _read_until(fd: int, needle: bytes, proc: subprocess.Popen[bytes], timeout: float = 60
                ) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} never appeared; got:\n{buf.decode(errors='replace')}")
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
        elif proc.poll() is not None:
            break
    return buf


def _prompt_run(tmp_path: Path, answer: bytes) -> tuple[str, Path, Path, Path]:
    skip_unless_available("native")
    home = tmp_path / "home"
    pub = new_reviewer(home, "op")
    ring = home / "reviewers.toml"
    ring.write_text(f'[[reviewers]]\nname = "op"\npublic_key = "{pub}"\n')
    ws = make_workspace(tmp_path, {".env": "TOKEN=old\n"})
    (ws / "agent.py").write_text(textwrap.dedent(WRITE_ENV_AGENT))
    pol = tmp_path / "policy.toml"
    pol.write_text(policy_text(keyring=str(ring)))
    runs = tmp_path / "runs"
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel._cli", "exec", "--workspace", str(ws), "--runs-dir",
         str(runs), "--policy", str(pol), "--isolation", "native", "--approve", "prompt", "--",
         AGENT_PY, "agent.py"],
        stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, start_new_session=True,
        preexec_fn=_take_tty,  # single-threaded test process
        env={"PATH": "/usr/bin:/bin", "KERNEL_HOME": str(home), "LANG": "C.UTF-8"})
    os.close(slave)
    try:
        shown = _read_until(master, b"approve? [y/n]", proc)
        os.write(master, answer)
        rest = _read_until(master, b"kernel: run folder", proc)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    (run_dir,) = list(runs.iterdir())
    return (shown + rest).decode(errors="replace"), run_dir, ws, home


def test_prompt_shows_the_diff_and_rule_and_y_approves(tmp_path: Path) -> None:
    text, run_dir, ws, home = _prompt_run(tmp_path, b"y\n")
    assert "approval needed" in text and "protected:.env*" in text
    assert "-TOKEN=old" in text and "+TOKEN=new" in text
    assert "approve by op recorded" in text
    assert "RESULT applied" in text
    assert (ws / ".env").read_text() == "TOKEN=new\n"
    finals = [e["body"] for e in events(run_dir) if e["type"] == "syscall.decision"
              and e["body"].get("approval_id")]
    assert finals[0]["decision"] == "approved"
    got = [e["body"] for e in events(run_dir) if e["type"] == "approval.received"]
    assert got[0]["reviewer"] == "op"  # signed by the operator's key, in a child process
    assert verify(run_dir, home).returncode == 0


def test_prompt_n_denies(tmp_path: Path) -> None:
    text, run_dir, ws, home = _prompt_run(tmp_path, b"n\n")
    assert "RESULT refused denied" in text and "at the kernel exec prompt" in text
    assert (ws / ".env").read_text() == "TOKEN=old\n"
    closed = [e["body"] for e in events(run_dir) if e["type"] == "approval.closed"]
    assert closed[0]["by"] == "prompt"
    assert verify(run_dir, home).returncode == 0
