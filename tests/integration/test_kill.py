"""`kernel kill` from another terminal: every process of the run ends, the folder records who
asked and is sealed `killed`; `--all` ends every live run; a run that is not live is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kernel import killswitch
from tests.kernel_helpers import (
    AGENT_PY,
    BACKENDS,
    ROOT,
    kernel_cmd,
    make_workspace,
    skip_unless_available,
)

SLEEPER = """
import sys, time
from syscalls.client import Kernel
k = Kernel.from_env()
k.write("started.txt", b"up\\n")
time.sleep(300)  # {marker}
"""


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    skip_unless_available(request.param)
    return str(request.param)


def _host_pids_with(marker: str) -> list[int]:
    """Host pids whose command line holds ``marker`` (the host's process table)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmd:
            out.append(int(d))
    return out


def _start(tmp_path: Path, name: str, backend: str, runs: Path, home: Path
           ) -> tuple[subprocess.Popen[str], str]:
    marker = f"kill-test-{name}-{os.getpid()}-{time.monotonic_ns()}"
    (tmp_path / name).mkdir()
    ws = make_workspace(tmp_path / name)
    (ws / "agent.py").write_text(textwrap.dedent(SLEEPER.format(marker=marker)))
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KERNEL_HOME": str(home), "LANG": "C.UTF-8"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel._cli", "exec", "--json", "--workspace", str(ws),
         "--runs-dir", str(runs), "--isolation", backend, "--", AGENT_PY, "agent.py", marker],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = killswitch.live_runs(runs)
        if live and _host_pids_with(marker):
            runs_now = [r for r, m in live.items() if m["kernel_pid"] == proc.pid]
            if runs_now and any(runs.glob(f"{runs_now[0]}/log/*")):
                # the agent is running: wait for its first recorded write
                log = (runs / runs_now[0] / "log" / "events.jsonl").read_text()
                if '"started.txt"' in log:
                    return proc, marker
        if proc.poll() is not None:
            raise AssertionError(f"kernel exec ended early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the run never became live")


def _events(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "log" / "events.jsonl").read_text()
            .splitlines()]


def test_kernel_kill_ends_every_process_and_seals_the_run_killed(tmp_path: Path,
                                                                  backend: str) -> None:
    runs, home = tmp_path / "runs", tmp_path / "home"
    proc, marker = _start(tmp_path, "one", backend, runs, home)
    run_id = next(r for r, m in killswitch.live_runs(runs).items()
                  if m["kernel_pid"] == proc.pid)
    k = kernel_cmd(["kill", run_id, "--runs-dir", str(runs), "--json"], home=home)
    assert k.returncode == 0, k.stderr
    assert json.loads(k.stdout)["killed"] == [run_id]
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 10, err  # ExitCode.KILLED
    assert json.loads(out.strip().splitlines()[-1])["status"] == "killed"
    assert _host_pids_with(marker) == [], "a process of the killed run survived"
    run_dir = runs / run_id
    kills = [e["body"] for e in _events(run_dir) if e["type"] == "run.kill"]
    assert len(kills) == 1 and kills[0]["by"] == "kernel kill"  # type: ignore[index]
    assert kills[0]["uid"] == os.getuid() and kills[0]["signal"] == "SIGTERM"  # type: ignore[index]
    seal = json.loads((run_dir / "SEAL.json").read_text())
    assert seal["body"]["status"] == "killed"
    v = kernel_cmd(["verify", str(run_dir), "--trust", str(home / "keys" / "kernel.pub")],
                   home=home)
    assert v.returncode == 0, v.stdout + v.stderr
    assert killswitch.live_runs(runs) == {}
    # the run is no longer live: killing it again is refused, nothing is signalled
    again = kernel_cmd(["kill", run_id, "--runs-dir", str(runs)], home=home)
    assert again.returncode == 8 and "not live" in again.stderr


def test_kernel_kill_all_ends_every_live_run(tmp_path: Path) -> None:
    skip_unless_available("native")
    runs, home = tmp_path / "runs", tmp_path / "home"
    started = [_start(tmp_path, f"r{i}", "native", runs, home) for i in range(2)]
    assert len(killswitch.live_runs(runs)) == 2
    k = kernel_cmd(["kill", "--all", "--runs-dir", str(runs), "--json"], home=home)
    assert k.returncode == 0, k.stderr
    assert len(json.loads(k.stdout)["killed"]) == 2
    for proc, marker in started:
        proc.communicate(timeout=30)
        assert proc.returncode == 10
        assert _host_pids_with(marker) == []
    for run_dir in runs.iterdir():
        assert json.loads((run_dir / "SEAL.json").read_text())["body"]["status"] == "killed"


def test_a_mark_left_by_a_dead_kernel_is_not_live_and_its_pid_is_never_signalled(
        tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # a process that claims a mark and dies: the lock goes with it
    code = ("import sys; from pathlib import Path; from kernel import killswitch; "
            "killswitch.LiveMark.claim(Path(sys.argv[1]), 'r1', Path('/nonexistent'))")
    subprocess.run([sys.executable, "-c", code, str(runs)], check=True, cwd=ROOT)
    assert (killswitch.live_dir(runs) / "r1.json").exists()
    assert killswitch.live_runs(runs) == {}
    k = kernel_cmd(["kill", "r1", "--runs-dir", str(runs)], home=tmp_path / "home")
    assert k.returncode == 8, k.stderr
    usage = kernel_cmd(["kill", "--runs-dir", str(runs)], home=tmp_path / "home")
    assert usage.returncode == 2


def test_a_storm_of_signals_ends_the_run_killed_not_by_the_signal(tmp_path: Path) -> None:
    """`kernel kill --all` signals a tree's kernel once per live run, and an operator may press
    Ctrl-C twice: signals that keep coming while the run is sealed and after it must not turn the
    kernel's exit into death by that signal. SIGTERM every millisecond until it exits."""
    import signal

    skip_unless_available("native")
    runs, home = tmp_path / "runs", tmp_path / "home"
    proc, marker = _start(tmp_path, "storm", "native", runs, home)
    sent = 0
    while proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            sent += 1
        except ProcessLookupError:
            break
        time.sleep(0.001)
    out, err = proc.communicate(timeout=30)
    assert sent > 1
    assert proc.returncode == 10, (proc.returncode, err[-500:])  # ExitCode.KILLED
    assert json.loads(out.strip().splitlines()[-1])["status"] == "killed"
    assert _host_pids_with(marker) == []
    (run_dir,) = runs.iterdir()
    v = kernel_cmd(["verify", str(run_dir), "--trust", str(home / "keys" / "kernel.pub")],
                   home=home)
    assert v.returncode == 0, v.stdout + v.stderr
