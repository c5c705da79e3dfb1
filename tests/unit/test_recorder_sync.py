"""Deferred syncs in the recorder, and the fast paths of the per-event checks.

``append(..., sync=False)`` writes a line without its own fdatasync; the next synced append or
``sync()`` makes it durable. The fast blob-reference and canonical-form checks must accept and
refuse exactly what the precise (path-naming) versions do.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from kernel.canonical import _check, canonical_json
from kernel.keys import KernelKey
from kernel.recorder import RecorderError, RunRecorder, blob_refs, iter_blob_refs


def _rec(tmp_path: Path) -> RunRecorder:
    return RunRecorder.create(tmp_path / "runs", run_id="r1", header={}, policy_raw=b"x = 1\n",
                              key=KernelKey.generate())


def _count_syncs(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[int]:
    calls: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        if fail:
            raise OSError(errno.EIO, "injected")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return calls


def test_an_unsynced_line_is_made_durable_by_the_next_synced_append(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _rec(tmp_path)
    calls = _count_syncs(monkeypatch)
    rec.append("run.start", {})
    assert len(calls) == 1 and rec.unsynced() == 0
    rec.append("syscall.request", {"req": 1}, sync=False)
    assert len(calls) == 1 and rec.unsynced() == 1
    rec.append("syscall.decision", {"req": 1})
    assert len(calls) == 2 and rec.unsynced() == 0
    rec.sync()  # nothing pending: no fdatasync
    assert len(calls) == 2
    rec.append("syscall.request", {"req": 2}, sync=False)
    rec.sync()
    assert len(calls) == 3 and rec.unsynced() == 0
    lines = (rec.run_dir / "log" / "events.jsonl").read_bytes().splitlines()
    assert len(lines) == 4


def test_a_failed_deferred_sync_poisons_the_recorder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _rec(tmp_path)
    rec.append("run.start", {})
    rec.append("syscall.request", {"req": 1}, sync=False)
    _count_syncs(monkeypatch, fail=True)
    with pytest.raises(RecorderError, match="syncing the log"):
        rec.sync()
    with pytest.raises(RecorderError):
        rec.append("syscall.decision", {"req": 1})


def test_sync_refuses_a_closed_recorder_with_pending_lines(tmp_path: Path) -> None:
    rec = _rec(tmp_path)
    rec.append("run.start", {}, sync=False)
    rec.close()
    with pytest.raises(RecorderError):
        rec.sync()


D = "sha256:" + "ab" * 32
BODIES: list[Any] = [
    {}, {"a": 1}, {"x_blob": D}, {"x_blob": None}, {"blobs": [D, D]}, {"y_blobs": []},
    {"n": {"deep": [{"z_blob": D}, [{"blobs": [D]}]]}},
    {"x_blob": "md5:abcd"}, {"x_blob": 3}, {"blobs": D}, {"blobs": [D, "sha256:XY"]},
    {"n": [{"q_blob": "nope"}]},
]


@pytest.mark.parametrize("body", BODIES)
def test_fast_blob_refs_match_the_precise_walk(body: Any) -> None:
    try:
        want: Any = [d for _, d in iter_blob_refs(body)]
    except ValueError as e:
        want = ("error", str(e))
    try:
        got: Any = blob_refs(body)
    except ValueError as e:
        got = ("error", str(e))
    assert got == want


@pytest.mark.parametrize("obj", [{"a": 1.5}, {"a": [1, {"b": 2.0}]}, {1: "x"}, [0.1]])
def test_canonical_json_still_names_the_offending_value(obj: Any) -> None:
    with pytest.raises(TypeError) as fast:
        canonical_json(obj)
    with pytest.raises(TypeError) as precise:
        _check(obj)
    assert str(fast.value) == str(precise.value)
