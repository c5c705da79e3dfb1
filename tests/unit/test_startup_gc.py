"""`kernel exec` imports its modules with the cyclic collector paused; it is on again after."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from kernel import _cli, supervisor


class _Stop(Exception):
    pass


@pytest.fixture
def stopped_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    seen: list[bool] = []

    def fake_run(opts: object) -> None:
        seen.append(gc.isenabled())
        raise _Stop

    monkeypatch.setattr(supervisor, "run", fake_run)
    was = gc.isenabled()
    yield seen
    gc.unfreeze()
    if was:
        gc.enable()


def test_the_collector_is_on_again_when_the_run_starts(stopped_run: list[bool]) -> None:
    gc.enable()
    with pytest.raises(_Stop):
        _cli._cmd_exec(_cli.build_parser("exec").parse_args(["exec", "--", "/bin/true"]))
    assert stopped_run == [True] and gc.isenabled()


def test_a_collector_turned_off_by_the_caller_stays_off(stopped_run: list[bool]) -> None:
    gc.disable()
    with pytest.raises(_Stop):
        _cli._cmd_exec(_cli.build_parser("exec").parse_args(["exec", "--", "/bin/true"]))
    assert stopped_run == [False] and not gc.isenabled()
