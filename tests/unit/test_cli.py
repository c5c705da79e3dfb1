"""The CLI's promises: documented exit codes equal the code's, no tracebacks on bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kernel import _cli
from kernel.errors import ExitCode

ROOT = Path(__file__).resolve().parents[2]
KERNEL = [sys.executable, "-m", "kernel._cli"]


def test_exit_code_table_matches_the_code() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    rows = re.findall(r"^\| (\d+) \| ([A-Z_]+) \| (.+?) \|$", doc, re.M)
    documented = {(int(c), n) for c, n, _ in rows}
    assert documented == {(int(e), e.name) for e in ExitCode}
    for code, name, text in rows:
        doc_first = (ExitCode[name].__doc__ or "").strip()
        del code, doc_first, text


def test_every_command_is_documented_and_has_help() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    for name in _cli.COMMANDS:
        assert f"## `kernel {name}`" in doc
        r = subprocess.run([*KERNEL, name, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        ([], ExitCode.USAGE, "required"),
        (["exec"], ExitCode.USAGE, "no agent command"),
        (["exec", "--bogus", "--", "true"], ExitCode.USAGE, "unrecognized"),
        (["exec", "--policy", "nope", "--", "true"], ExitCode.POLICY, "no such profile"),
        (["exec", "--env", "NOEQUALS", "--", "true"], ExitCode.BAD_INPUT, "NAME=VALUE"),
        (["exec", "--env", "KERNEL_X=1", "--", "true"], ExitCode.BAD_INPUT, "KERNEL_"),
        (["exec", "--workspace", "/nonexistent/ws", "--", "true"], ExitCode.BAD_INPUT,
         "no such directory"),
        (["verify", "/nonexistent/run"], ExitCode.NOT_FOUND, "no such directory"),
    ],
)
def test_bad_input_gets_one_message_and_a_documented_code(
        tmp_path: Path, args: list[str], code: ExitCode, needle: str) -> None:
    r = subprocess.run([*KERNEL, *args], capture_output=True, text=True, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "KERNEL_HOME": str(tmp_path / "home")})
    assert r.returncode == code, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_bad_policy_file_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('description = "x"\n[limits]\nmemry_mb = 5\n')
    r = subprocess.run([*KERNEL, "exec", "--policy", str(bad), "--", "true"],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "KERNEL_HOME": str(tmp_path / "home")})
    assert r.returncode == ExitCode.POLICY
    assert str(bad) in r.stderr and "limits.memry_mb" in r.stderr and "unknown key" in r.stderr
