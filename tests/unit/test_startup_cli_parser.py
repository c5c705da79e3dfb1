"""`kernel exec` builds only its own sub-parser; it must parse exactly as the whole parser does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kernel import _cli
from kernel.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]

ARGVS = [
    ["exec", "--", "/usr/bin/python3", "-c", "pass"],
    ["exec", "--policy", "strict", "--workspace", "/tmp", "--runs-dir", "r", "--env", "A=1",
     "--env", "B=2", "--isolation", "native", "--json", "--approve", "deny", "--", "x", "-y"],
    ["exec", "--task", "t.toml"],
    ["exec", "--approve-key", "k", "cmd", "--policy", "p"],
    ["exec"],
]
BAD = [
    ["exec", "--bogus", "--", "true"],
    ["exec", "--isolation", "nope", "--", "true"],
    ["exec", "--approve"],
]


@pytest.mark.parametrize("argv", ARGVS)
def test_the_exec_parser_alone_parses_as_the_whole_parser(argv: list[str]) -> None:
    assert vars(_cli.build_parser("exec").parse_args(argv)) == vars(
        _cli.build_parser().parse_args(argv))


@pytest.mark.parametrize("argv", BAD)
def test_the_exec_parser_alone_refuses_as_the_whole_parser(argv: list[str]) -> None:
    with pytest.raises(UsageError) as alone:
        _cli.build_parser("exec").parse_args(argv)
    with pytest.raises(UsageError) as whole:
        _cli.build_parser().parse_args(argv)
    assert alone.value.diagnostics() == whole.value.diagnostics()


def test_the_exec_help_is_the_same() -> None:
    def exec_help(p: object) -> str:
        sub = next(a for a in p._subparsers._group_actions)  # type: ignore[attr-defined]
        return str(sub.choices["exec"].format_help())

    assert exec_help(_cli.build_parser("exec")) == exec_help(_cli.build_parser())


def test_every_other_first_argument_gets_the_whole_parser() -> None:
    whole = _cli.build_parser().format_help()
    for first in (None, "verify", "selftest", "-h", "--help", "exe", "approve"):
        assert _cli.build_parser(first).format_help() == whole


def test_kernel_exec_does_not_import_the_self_test_corpus() -> None:
    probe = ("import sys\nfrom kernel import _cli\n"
             "try:\n    _cli.main(['exec', '--bogus'])\nexcept SystemExit:\n    pass\n"
             "print(' '.join(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.split()
    assert "kernel.corpus" not in out and "kernel.selftest" not in out
