"""The client's wire behaviour for spawn, wait and registration, against a fake kernel.

A thread in the test plays the kernel's side of a real socketpair: it reads each request frame,
keeps it, and answers with a scripted response. Nothing here starts a sandbox; what the real
kernel decides is tested elsewhere.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from syscalls import abi, ksys
from syscalls.client import BUDGET_FIELDS, Kernel, SyscallError

TOKEN = "eyJ2IjoxfQ.00ff"
CHILD = "20261122T174100Z-0123abcd"

Answer = Callable[[dict[str, Any]], dict[str, Any]]


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def default_answer(req: dict[str, Any]) -> dict[str, Any]:
    rid, call = req["id"], req["call"]
    if call == "register":
        return abi.ok_response(rid, {"child": CHILD, "parent": "p", "root": "p", "depth": 1,
                                     "budget": {f: 1 for f in BUDGET_FIELDS},
                                     "expires_ns": 1})
    if call == "spawn":
        return abi.ok_response(rid, {"child": CHILD, "depth": 1,
                                     "budget": {f: 1 for f in BUDGET_FIELDS},
                                     "expires_ns": 1, "manifest_digest": "sha256:" + "0" * 64})
    if call == "wait":
        return abi.ok_response(rid, {"child": req["args"]["child"], "status": "passed",
                                     "exit_code": 0, "seal": "sha256:" + "1" * 64,
                                     "requests": 3, "denials": 0, "timed_out": False})
    if call == "info":
        return abi.ok_response(rid, {"run_id": CHILD, "spawn": {"depth": 1, "children": []}})
    return abi.ok_response(rid, {"op": "write", "path": req["args"].get("path")})


class FakeKernel:
    """The kernel's end of a socketpair, served by a thread until the agent's end closes."""

    def __init__(self, answer: Answer = default_answer) -> None:
        self.agent, self._kernel = socket.socketpair()
        self.requests: list[dict[str, Any]] = []
        self._answer = answer
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with self._kernel:
            while True:
                head = _recv_exact(self._kernel, abi.HEADER.size)
                if head is None:
                    return
                (size,) = abi.HEADER.unpack(head)
                body = _recv_exact(self._kernel, size)
                if body is None:
                    return
                req = abi.decode_body(body)
                self.requests.append(req)
                self._kernel.sendall(abi.encode_frame(self._answer(req)))

    @property
    def calls(self) -> list[str]:
        return [r["call"] for r in self.requests]

    def close(self) -> None:
        self.agent.close()
        self._thread.join(5)


@pytest.fixture
def fake() -> Iterator[FakeKernel]:
    k = FakeKernel()
    yield k
    k.close()


def refusing(rule: str, code: int) -> Answer:
    """A kernel that refuses registration with ``rule`` and, like the real one, denies every
    other call of an unregistered child."""

    def answer(req: dict[str, Any]) -> dict[str, Any]:
        if req["call"] == "register":
            return abi.error_response(req["id"], code, "refused", rule=rule, seq=4)
        return abi.error_response(req["id"], errno.EPERM, "register first",
                                  rule="spawn.unregistered", seq=5)

    return answer


def from_env(fake: FakeKernel, monkeypatch: pytest.MonkeyPatch,
             manifest: str | None) -> Kernel:
    monkeypatch.setenv(abi.FD_ENV, str(os.dup(fake.agent.fileno())))
    if manifest is None:
        monkeypatch.delenv(abi.MANIFEST_ENV, raising=False)
    else:
        monkeypatch.setenv(abi.MANIFEST_ENV, manifest)
    return Kernel.from_env()


# ---- registration ----------------------------------------------------------------------------


def test_without_a_manifest_nothing_registers(fake: FakeKernel,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    k = from_env(fake, monkeypatch, None)
    k.info()
    k.write("a.txt", b"x")
    assert fake.calls == ["info", "write"]
    assert k.registration is None
    with pytest.raises(ValueError, match=abi.MANIFEST_ENV):
        k.register()
    k.close()


def test_an_empty_manifest_variable_is_no_manifest(fake: FakeKernel,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    k = from_env(fake, monkeypatch, "")
    k.info()
    assert fake.calls == ["info"]
    k.close()


def test_a_child_registers_exactly_once_before_its_first_call(
        fake: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    k = from_env(fake, monkeypatch, TOKEN)
    assert fake.requests == []  # nothing is sent before the first call
    k.info()
    k.write("a.txt", b"x")
    k.spawn(["python3", "grandchild.py"])
    assert fake.calls == ["register", "info", "write", "spawn"]
    reg = fake.requests[0]
    assert reg == {"v": abi.VERSION, "id": 1, "call": "register", "args": {"manifest": TOKEN}}
    assert [r["id"] for r in fake.requests] == [1, 2, 3, 4]
    assert k.registration is not None and k.registration["child"] == CHILD
    k.close()


def test_registration_precedes_whichever_call_comes_first(
        fake: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    k = from_env(fake, monkeypatch, TOKEN)
    k.wait(CHILD, timeout_ms=0)
    assert fake.calls == ["register", "wait"]
    k.close()


def test_an_explicit_register_is_not_followed_by_another(
        fake: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    k = from_env(fake, monkeypatch, TOKEN)
    assert k.register()["depth"] == 1
    k.info()
    assert fake.calls == ["register", "info"]
    k.close()


def test_a_refused_registration_raises_and_is_not_retried(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKernel(refusing("spawn.manifest.signature", errno.EPERM))
    k = from_env(fake, monkeypatch, TOKEN)
    with pytest.raises(SyscallError) as e:
        k.write("a.txt", b"x")
    assert isinstance(e.value, OSError)
    assert (e.value.errno, e.value.rule, e.value.decision, e.value.seq) == (
        errno.EPERM, "spawn.manifest.signature", "denied", 4)
    assert fake.calls == ["register"]  # the write itself was never sent
    assert k.registration is None
    with pytest.raises(SyscallError) as e2:  # later calls go out unregistered
        k.info()
    assert e2.value.rule == "spawn.unregistered"
    assert fake.calls == ["register", "info"]
    k.close()
    fake.close()


# ---- spawn and wait frames -------------------------------------------------------------------


def test_spawn_sends_exactly_the_given_fields(fake: FakeKernel) -> None:
    k = Kernel(fake.agent)
    r = k.spawn(["python3", "child.py", "--fast"])
    assert r["child"] == CHILD and r["manifest_digest"].startswith("sha256:")
    k.spawn(("./agent.sh",), {"syscalls": 50, "exec_count": 0}, "split the work")
    k.spawn(["ls"], budget={})
    assert [r["args"] for r in fake.requests] == [
        {"argv": ["python3", "child.py", "--fast"]},
        {"argv": ["./agent.sh"], "budget": {"syscalls": 50, "exec_count": 0},
         "justification": "split the work"},
        {"argv": ["ls"]},  # an empty budget is no budget (the kernel refuses `{}`)
    ]
    required, optional = abi.CALL_FIELDS["spawn"]
    for req in fake.requests:
        assert req["call"] == "spawn"
        assert set(required) <= set(req["args"]) <= set(required) | set(optional)


def test_wait_sends_the_child_and_an_optional_timeout(fake: FakeKernel) -> None:
    k = Kernel(fake.agent)
    r = k.wait(CHILD)
    assert (r["status"], r["exit_code"], r["timed_out"]) == ("passed", 0, False)
    k.wait(CHILD, timeout_ms=0)
    k.wait(CHILD, 2500)
    assert [r["args"] for r in fake.requests] == [
        {"child": CHILD}, {"child": CHILD, "timeout_ms": 0}, {"child": CHILD, "timeout_ms": 2500}]


def test_spawn_and_wait_denials_are_syscall_errors() -> None:
    def answer(req: dict[str, Any]) -> dict[str, Any]:
        if req["call"] == "spawn":
            return abi.error_response(req["id"], errno.EAGAIN, "4 children are alive",
                                      rule="spawn.max_replicas")
        return abi.error_response(req["id"], errno.ENOENT, "not your child",
                                  rule="wait.not_child")

    fake = FakeKernel(answer)
    k = Kernel(fake.agent)
    with pytest.raises(SyscallError) as e:
        k.spawn(["python3", "child.py"])
    assert (e.value.errno, e.value.rule) == (errno.EAGAIN, "spawn.max_replicas")
    assert "EAGAIN" in str(e.value) and "spawn.max_replicas" in str(e.value)
    with pytest.raises(SyscallError) as e:
        k.wait("someone-else")
    assert (e.value.errno, e.value.rule) == (errno.ENOENT, "wait.not_child")
    fake.close()


# ---- ksys ------------------------------------------------------------------------------------


def run_ksys(fake: FakeKernel | None, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str], *argv: str,
             manifest: str | None = None) -> tuple[int, str, str]:
    if fake is None:
        monkeypatch.delenv(abi.FD_ENV, raising=False)
    else:
        monkeypatch.setenv(abi.FD_ENV, str(os.dup(fake.agent.fileno())))
    if manifest is None:
        monkeypatch.delenv(abi.MANIFEST_ENV, raising=False)
    else:
        monkeypatch.setenv(abi.MANIFEST_ENV, manifest)
    code = ksys.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ksys_spawn_prints_the_child_id(fake: FakeKernel, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_ksys(fake, monkeypatch, capsys, "spawn",
                              "--budget", "syscalls=100, exec_count=2",
                              "--budget", "bytes_written=0", "--why", "tests",
                              "--", "python3", "child.py", "--budget", "x")
    assert (code, out, err) == (0, CHILD + "\n", "")
    assert fake.requests[0]["args"] == {
        "argv": ["python3", "child.py", "--budget", "x"],
        "budget": {"syscalls": 100, "exec_count": 2, "bytes_written": 0},
        "justification": "tests"}


def test_ksys_spawn_without_a_budget_sends_none(fake: FakeKernel,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_ksys(fake, monkeypatch, capsys, "spawn", "--", "./agent.sh")
    assert (code, out) == (0, CHILD + "\n")
    assert fake.requests[0]["args"] == {"argv": ["./agent.sh"]}


def test_ksys_in_a_child_registers_first(fake: FakeKernel, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_ksys(fake, monkeypatch, capsys, "info", manifest=TOKEN)
    assert code == 0 and json.loads(out)["spawn"]["depth"] == 1
    assert fake.calls == ["register", "info"]


def test_ksys_refused_registration_exits_denied(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeKernel(refusing("spawn.manifest.expired", errno.EPERM))
    code, out, err = run_ksys(fake, monkeypatch, capsys, "spawn", "--", "ls", manifest=TOKEN)
    assert (code, out) == (ksys.EXIT_DENIED, "")
    assert err == "ksys spawn: denied: refused (rule spawn.manifest.expired, EPERM)\n"
    assert fake.calls == ["register"]
    fake.close()


@pytest.mark.parametrize(("status", "timed_out", "exit_code"), [
    ("passed", False, 0),
    ("failed", False, ksys.EXIT_CHILD_NOT_PASSED),
    ("killed", False, ksys.EXIT_CHILD_NOT_PASSED),
    ("expired", False, ksys.EXIT_CHILD_NOT_PASSED),
    ("running", True, ksys.EXIT_CHILD_NOT_PASSED),
])
def test_ksys_wait_prints_the_result_and_exits_0_only_if_the_child_passed(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], status: str,
        timed_out: bool, exit_code: int) -> None:
    result = {"child": CHILD, "status": status, "exit_code": 0 if status == "passed" else None,
              "seal": None if timed_out else "sha256:" + "2" * 64, "requests": 1,
              "denials": 0, "timed_out": timed_out}
    fake = FakeKernel(lambda req: abi.ok_response(req["id"], result))
    code, out, err = run_ksys(fake, monkeypatch, capsys, "wait", CHILD, "--timeout-ms", "500")
    assert (code, json.loads(out), err) == (exit_code, result, "")
    assert fake.requests[0]["args"] == {"child": CHILD, "timeout_ms": 500}
    fake.close()


def test_ksys_wait_denied_exits_77(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeKernel(lambda req: abi.error_response(req["id"], errno.ENOENT, "not a child",
                                                     rule="wait.not_child"))
    code, out, err = run_ksys(fake, monkeypatch, capsys, "wait", "nobody")
    assert (code, out) == (ksys.EXIT_DENIED, "")
    assert "rule wait.not_child, ENOENT" in err
    fake.close()


@pytest.mark.parametrize(("argv", "message"), [
    (["spawn", "--budget", "syscalls", "--", "ls"], "'syscalls' is not K=V"),
    (["spawn", "--budget", "=5", "--", "ls"], "'=5' is not K=V"),
    (["spawn", "--budget", "syscalls=1,", "--", "ls"], "'' is not K=V"),
    (["spawn", "--budget", "colour=1", "--", "ls"], "unknown quota 'colour'"),
    (["spawn", "--budget", "syscalls=-1", "--", "ls"], "not a non-negative integer"),
    (["spawn", "--budget", "syscalls=1.5", "--", "ls"], "not a non-negative integer"),
    (["spawn", "--budget", "syscalls=", "--", "ls"], "not a non-negative integer"),
    (["spawn", "--budget", "syscalls=\u0663", "--", "ls"], "not a non-negative integer"),
    (["spawn", "--budget", "syscalls=1", "--budget", "syscalls=2", "--", "ls"],
     "syscalls given twice"),
    (["spawn", "--budget", "syscalls=1"], "no command given"),
    (["spawn", "--"], "no command given"),
    (["wait", CHILD, "--timeout-ms", "soon"], "not an integer"),
    (["wait", CHILD, "--timeout-ms", "-1"], "not an integer"),
    (["wait", CHILD, "--timeout-ms", "86400001"], "not an integer"),
])
def test_ksys_bad_usage_exits_2_with_one_message(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str],
                                                 argv: list[str], message: str) -> None:
    # no channel at all: the arguments are checked before the kernel is asked anything
    code, out, err = run_ksys(None, monkeypatch, capsys, *argv)
    assert (code, out) == (ksys.EXIT_USAGE, "")
    assert err.count("\n") == 1 and err.startswith(f"ksys {argv[0]}: ")
    assert message in err


def test_ksys_spawn_without_a_channel_exits_74(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_ksys(None, monkeypatch, capsys, "spawn", "--", "ls")
    assert code == ksys.EXIT_CHANNEL and abi.FD_ENV in err


def test_parse_budget() -> None:
    assert ksys.parse_budget([]) is None
    assert ksys.parse_budget(["syscalls=7,files_written=0", "exec_count = 3"]) == {
        "syscalls": 7, "files_written": 0, "exec_count": 3}



def test_the_clients_budget_fields_are_the_kernels() -> None:
    from kernel import replication

    assert BUDGET_FIELDS == replication.BUDGET_FIELDS
