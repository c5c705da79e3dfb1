"""Agents that abuse the syscall channel: bad frames end in a recorded error, the kernel survives,
the run folder verifies."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel.errors import ExitCode
from tests.kernel_helpers import BACKENDS, ROOT, run_agent, skip_unless_available

pytestmark = [pytest.mark.sandbox, pytest.mark.adversarial]

RAW = """
import os, socket, struct, sys, time
s = socket.socket(fileno=int(os.environ["KERNEL_SYSCALL_FD"]))
def frame(body):
    return struct.pack(">I", len(body)) + body
def read_reply():
    n = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
    return s.recv(n, socket.MSG_WAITALL)
"""


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    skip_unless_available(name)
    return name


def _types(run: object) -> list[str]:
    return [e["type"] for e in run.events()]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("not_json", "frame(b'this is not json')"),
        ("not_utf8", "frame(b'\\xff\\xfe{}')"),
        ("not_object", "frame(b'[1,2,3]')"),
        ("duplicate_keys", "frame(b'{\"v\":1,\"v\":1}')"),
        ("nan", "frame(b'{\"v\":NaN}')"),
        ("oversized", "struct.pack('>I', 0xFFFFFFFF) + b'{}'"),
    ],
)
def test_malformed_frames_stop_the_agent_with_a_recorded_error(
        tmp_path: Path, backend: str, name: str, payload: str) -> None:
    run = run_agent(tmp_path, RAW + f"""
s.sendall({payload})
time.sleep(30)
print("STILL RUNNING")
""", backend=backend)
    assert run.proc.returncode == ExitCode.PROTOCOL, run.proc.stderr
    assert run.out["status"] == "protocol_error"
    assert "STILL RUNNING" not in run.agent_output
    assert "protocol.error" in _types(run)
    assert run.verify().returncode == 0


def test_a_well_formed_request_with_wrong_fields_is_an_answered_denial(
        tmp_path: Path, backend: str) -> None:
    run = run_agent(tmp_path, RAW + """
import json
for body in [
    {"v": 1, "id": 1, "call": "write", "args": {"op": "write", "path": "a", "extra": 1}},
    {"v": 1, "id": 2, "call": "write", "args": {"op": "explode", "path": "a"}},
    {"v": 1, "id": 3, "call": "spawn", "args": {}},
    {"v": 2, "id": 4, "call": "info", "args": {}},
    {"v": 1, "id": 5, "call": "write", "args": {"op": "write", "path": "a", "content_b64": "!!"}},
    {"v": 1, "id": 6, "call": "write", "args": {"op": "write", "path": 7, "content_b64": ""}},
    {"v": 1, "id": 7, "call": "exec", "args": {"argv": "ls"}},
    {"v": 1, "id": 8, "call": "info", "args": {}, "surprise": True},
]:
    s.sendall(frame(json.dumps(body).encode()))
    r = json.loads(read_reply())
    err = r.get("error", {})
    print("REPLY", body["id"], r["ok"], err.get("rule"), err.get("code"))
""", backend=backend)
    assert run.proc.returncode == 0, run.proc.stderr
    replies = [ln.split() for ln in run.agent_output.splitlines() if ln.startswith("REPLY")]
    assert len(replies) == 8
    for rep in replies:
        assert rep[2] == "False" and rep[3] == "request.invalid" and rep[4] == "EINVAL", rep
    assert not (run.workspace / "a").exists()
    decisions = run.decisions()
    assert len(decisions) == 8 and all(d["decision"] == "denied" for d in decisions)
    assert run.verify().returncode == 0


def test_channel_closed_mid_frame_is_recorded(tmp_path: Path, backend: str) -> None:
    run = run_agent(tmp_path, RAW + """
s.sendall(struct.pack(">I", 100) + b'{"v":1,')
s.close()
""", backend=backend)
    assert run.proc.returncode == 0, run.proc.stderr
    assert "channel.truncated" in _types(run)
    assert run.verify().returncode == 0


def test_a_request_flood_after_the_quota_is_stopped(tmp_path: Path, backend: str) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text((ROOT / "policies" / "default.toml").read_text()
                      .replace("syscalls = 10000", "syscalls = 10"))
    run = run_agent(tmp_path, RAW + """
import json
body = json.dumps({"v": 1, "id": 1, "call": "info", "args": {}}).encode()
n = 0
try:
    while n < 100000:
        s.sendall(frame(body)); read_reply(); n += 1
except OSError:
    pass
print("SENT", n)
time.sleep(30)
""", backend=backend, policy=str(policy))
    assert run.proc.returncode == ExitCode.PROTOCOL, run.proc.stderr
    quota_denials = [d for d in run.decisions() if d["rule"] == "quota.syscalls"]
    assert len(quota_denials) >= 1
    assert "protocol.error" in _types(run)
    assert run.verify().returncode == 0
