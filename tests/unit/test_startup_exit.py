"""`kernel exec` ends its process without the interpreter's teardown, once everything is out."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kernel import _cli
from kernel.errors import ExitCode

ROOT = Path(__file__).resolve().parents[2]


class _Exited(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []

    def fake_exit(code: int) -> None:
        seen.append(code)
        raise _Exited(code)

    monkeypatch.setattr(_cli.os, "_exit", fake_exit)
    return seen


def test_only_the_kernel_program_running_exec_exits_early(
        exits: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["kernel", "exec"])  # no command: a usage error
    with pytest.raises(_Exited):
        _cli.main()
    assert exits == [int(ExitCode.USAGE)]
    # a caller passing argv (tests, embedding) gets the code back
    assert _cli.main(["exec"]) == int(ExitCode.USAGE)
    monkeypatch.setattr(sys, "argv", ["kernel", "verify", "/nonexistent/run"])
    assert _cli.main() == int(ExitCode.NOT_FOUND)
    assert exits == [int(ExitCode.USAGE)]


def test_atexit_handlers_run_and_output_is_flushed_first(
        exits: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    monkeypatch.setattr("atexit._run_exitfuncs", lambda: order.append("atexit"))
    monkeypatch.setattr(sys.stdout, "flush", lambda: order.append("stdout"))
    monkeypatch.setattr(sys.stderr, "flush", lambda: order.append("stderr"))
    with pytest.raises(_Exited):
        _cli._exit_now(3)
    assert order == ["atexit", "stdout", "stderr"] and exits == [3]


def test_no_early_exit_while_another_thread_runs_or_when_a_flush_fails(
        exits: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        _cli._exit_now(0)  # returns: the ordinary exit joins the thread
    finally:
        stop.set()
        t.join()

    def broken() -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys.stdout, "flush", broken)
    _cli._exit_now(0)
    assert exits == []


def test_the_exit_code_and_the_message_reach_the_caller(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "kernel._cli", "exec", "--env", "NOEQUALS", "--",
                        "true"], capture_output=True, text=True, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "KERNEL_HOME": str(tmp_path / "home"),
                            "PYTHONPATH": str(ROOT)})
    assert r.returncode == ExitCode.BAD_INPUT
    assert r.stderr.startswith("kernel: ") and "NAME=VALUE" in r.stderr


def _native_available() -> bool:
    from sandbox import registry

    return os.geteuid() == 0 and registry.probe("native").available


@pytest.mark.skipif(not _native_available(), reason="needs root and the native backend")
def test_a_whole_run_still_delivers_all_output_and_a_sealed_intact_folder(
        tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    for p in (tmp_path, ws):
        os.chmod(p, 0o755)  # the agent uid traverses to its workspace
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KERNEL_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(ROOT)}
    agent = "import sys; sys.stdout.write('x' * 300000 + 'END'); sys.stderr.write('E' * 5000)"
    r = subprocess.run([sys.executable, "-m", "kernel._cli", "exec", "--isolation", "native",
                        "--workspace", str(ws), "--runs-dir", str(tmp_path / "runs"), "--",
                        "/usr/bin/python3", "-c", agent],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == "x" * 300000 + "END"
    assert "E" * 5000 in r.stderr and "kernel: run folder" in r.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    v = subprocess.run([sys.executable, "-m", "kernel._cli", "verify", str(run_dir)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert v.returncode == 0 and ": intact" in v.stdout, v.stdout + v.stderr


def test_the_prompt_terminal_is_flushed_when_the_run_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernel import approval_cli, supervisor

    path = tmp_path / "tty"
    tty = open(path, "w+")  # fully buffered, as an opened /dev/tty may hold text
    monkeypatch.setattr(approval_cli, "exec_options",
                        lambda a: {"approve": "prompt", "tty_in": tty, "tty_out": tty})

    def fake_run(opts: object) -> None:
        tty.write("approved 1 of 1")  # no newline: stays in the buffer
        raise _Exited(0)

    monkeypatch.setattr(supervisor, "run", fake_run)
    try:
        with pytest.raises(_Exited):
            _cli._cmd_exec(_cli.build_parser("exec").parse_args(["exec", "--", "/bin/true"]))
        assert path.read_text() == "approved 1 of 1"
    finally:
        tty.close()
