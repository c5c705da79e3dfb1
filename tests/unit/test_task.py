"""Task files are strict like policies: every bad input is named (file, key, why), exit 11."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kernel.errors import ExitCode
from kernel.task import TaskError, load, parse

ROOT = Path(__file__).resolve().parents[2]
GOOD = b'command = ["python3", "agent.py"]\nworkspace = "ws"\n'


def test_minimal_task_and_defaults(tmp_path: Path) -> None:
    t = parse(GOOD, source="t.toml", base=tmp_path)
    assert t.command == ("python3", "agent.py") and t.workspace == tmp_path / "ws"
    assert t.policy == "default" and t.verify == ()
    g = t.gate
    assert (g.agent_exit_zero, g.all_verifications_pass, g.no_pending_approvals,
            g.max_denials, g.forbid_denials) == (True, True, True, -1, ())
    assert t.digest.startswith("sha256:")


def test_policy_path_is_relative_to_the_task_file(tmp_path: Path) -> None:
    t = parse(GOOD + b'policy = "pol/p.toml"\n', source="t.toml", base=tmp_path)
    assert t.policy == str(tmp_path / "pol/p.toml")
    assert parse(GOOD + b'policy = "strict"\n', source="t.toml", base=tmp_path).policy == "strict"


@pytest.mark.parametrize(("extra", "key", "why"), [
    (b'colour = "red"\n', "colour", "unknown key"),
    (b'[gate]\nmax_denial = 1\n', "gate.max_denial", "unknown key"),
    (b'[[verify]]\nname = "t"\nargv = ["x"]\nshell = true\n', "verify[0].shell", "unknown key"),
    (b'[[verify]]\nname = "t"\n', "verify[0].argv", "missing"),
    (b'[[verify]]\nname = "t"\nargv = "make test"\n', "verify[0].argv", "argv"),
    (b'[[verify]]\nname = "t"\nargv = []\n', "verify[0].argv", "non-empty"),
    (b'[[verify]]\nname = "a b"\nargv = ["x"]\n', "verify[0].name", "letters"),
    (b'[[verify]]\nname = "t"\nargv = ["x"]\n[[verify]]\nname = "t"\nargv = ["y"]\n',
     "verify[1].name", "duplicate"),
    (b'[[verify]]\nname = "t"\nargv = ["x"]\ntimeout_seconds = 0\n',
     "verify[0].timeout_seconds", "1..3600"),
    (b'[gate]\nmax_denials = -2\n', "gate.max_denials", "-1"),
    (b'[gate]\nagent_exit_zero = "yes"\n', "gate.agent_exit_zero", "true or false"),
    (b'[gate]\nforbid_denials = "protected:*"\n', "gate.forbid_denials", "list"),
])
def test_bad_task_is_named(tmp_path: Path, extra: bytes, key: str, why: str) -> None:
    with pytest.raises(TaskError) as e:
        parse(GOOD + extra, source="t.toml", base=tmp_path)
    assert e.value.key == key and why in e.value.why
    assert e.value.exit_code == ExitCode.BAD_INPUT


@pytest.mark.parametrize(("raw", "key"), [
    (b'workspace = "ws"\n', "command"),
    (b'command = ["a"]\n', "workspace"),
    (b'command = "python3 agent.py"\nworkspace = "ws"\n', "command"),
    (b'command = ["a"\n', ""),
])
def test_required_fields_and_bad_toml(tmp_path: Path, raw: bytes, key: str) -> None:
    with pytest.raises(TaskError) as e:
        parse(raw, source="t.toml", base=tmp_path)
    assert e.value.key == key


def test_cli_reports_a_bad_task_file_without_running_anything(tmp_path: Path) -> None:
    task = tmp_path / "task.toml"
    task.write_bytes(GOOD + b"bogus = 1\n")
    (tmp_path / "ws").mkdir()
    env = {"PATH": "/usr/bin:/bin", "KERNEL_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "kernel._cli", "exec", "--task", str(task),
                        "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    assert r.returncode == ExitCode.BAD_INPUT
    assert f"{task}: bogus: unknown key" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()
    r = subprocess.run([sys.executable, "-m", "kernel._cli", "exec", "--task",
                        str(tmp_path / "none.toml")], capture_output=True, text=True, cwd=ROOT,
                       env=env)
    assert r.returncode == ExitCode.NOT_FOUND
    task.write_bytes(GOOD)
    r = subprocess.run([sys.executable, "-m", "kernel._cli", "exec", "--task", str(task), "--",
                        "true"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == ExitCode.USAGE and "not both" in r.stderr


def test_load_missing_file(tmp_path: Path) -> None:
    from kernel.errors import NotFoundError

    with pytest.raises(NotFoundError):
        load(tmp_path / "nope.toml")
