"""Suite-wide guards.

CI runs as root on Debian with firejail installed, where every sandbox test can and must run:
there, a skipped test means a guarantee went unchecked, so the run fails (STYLE: "CI checks that
the skips it should never see are not there"). Elsewhere skips stay skips, each with its reason.

CI then runs the tiers that do not need root again as an ordinary user
(scripts/run-user-tests.sh, docs/testing.md). There, a test marked ``root`` is skipped ("needs
root"), and the run fails if no test passed or if a test was skipped for any reason but root.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _pytest.terminal import TerminalReporter


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A small workspace the unprivileged agent uid can traverse to and read."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "README.md").write_text("the workspace\n")
    (ws / "a.txt").write_text("a\n")
    for p in (tmp_path, ws):
        p.chmod(0o755)
    for f in ("README.md", "a.txt"):
        (ws / f).chmod(0o644)
    return ws


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _ci_as_root() -> bool:
    return _ci() and os.geteuid() == 0


def _ci_as_user() -> bool:
    return _ci() and os.geteuid() != 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    needs_root = pytest.mark.skip(reason="needs root (marked root)")
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(needs_root)


def _user_pass_problems(reporter: TerminalReporter) -> list[str]:
    """Why a CI run as an ordinary user proves too little: nothing passed, or a skip that is
    not about root (a guarantee that went unchecked for the user)."""
    problems = []
    if not reporter.stats.get("passed"):
        problems.append("no test passed")
    for rep in reporter.stats.get("skipped", []):
        reason = str(rep.longrepr[2] if isinstance(rep.longrepr, tuple) else rep.longrepr)
        if "root" not in reason:
            problems.append(f"{rep.nodeid}: skipped: {reason}")
    return problems


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if _ci_as_root() and skipped:
        terminalreporter.write_line(
            f"CI (root): {len(skipped)} test(s) were skipped; on CI every test must run:",
            red=True)
        for rep in skipped:
            terminalreporter.write_line(f"  {rep.nodeid}: {rep.longrepr}")
    if _ci_as_user() and (problems := _user_pass_problems(terminalreporter)):
        terminalreporter.write_line(
            "CI (ordinary user): only tests that need root may be skipped, and some test must "
            "pass:", red=True)
        for line in problems:
            terminalreporter.write_line(f"  {line}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if _ci_as_root() and skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if (_ci_as_user() and reporter is not None and session.exitstatus == pytest.ExitCode.OK
            and _user_pass_problems(reporter)):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
