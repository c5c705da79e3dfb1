"""Suite-wide guards.

CI runs as root on Debian with firejail installed, where every sandbox test can and must run:
there, a skipped test means a guarantee went unchecked, so the run fails (STYLE: "CI checks that
the skips it should never see are not there"). Elsewhere skips stay skips, each with its reason.
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


def _ci_as_root() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") and os.geteuid() == 0


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if _ci_as_root() and skipped:
        terminalreporter.write_line(
            f"CI (root): {len(skipped)} test(s) were skipped; on CI every test must run:",
            red=True)
        for rep in skipped:
            terminalreporter.write_line(f"  {rep.nodeid}: {rep.longrepr}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if _ci_as_root() and skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
