"""`kernel recover` on a log cut at every byte of its last record (a crash mid-append): always
incomplete first, then intact and `aborted`, the torn bytes kept exactly as they were."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kernel.errors import BadInputError, RunIntegrityError
from kernel.keys import KernelKey
from kernel.recorder import RunRecorder, blob_relpath
from kernel.recover import recover_run
from kernel.verify import verify_run

LOG = "log/events.jsonl"


@pytest.fixture(scope="module")
def key() -> KernelKey:
    return KernelKey.generate()


@pytest.fixture(scope="module")
def unsealed(tmp_path_factory: pytest.TempPathFactory, key: KernelKey) -> Path:
    rec = RunRecorder.create(tmp_path_factory.mktemp("u"), run_id="run-u", header={},
                             policy_raw=b"x = 1\n", key=key)
    rec.append("run.start", {"argv": ["agent"]})
    rec.append("syscall.request", {"req": 1, "call": "write", "args": {"path": "a"}})
    rec.append("syscall.decision", {"req": 1, "decision": "allowed", "rule": "write.write"})
    rec.close()
    return rec.run_dir


def test_crash_at_every_byte_of_the_last_record_recovers(unsealed: Path, key: KernelKey,
                                                         tmp_path: Path) -> None:
    data = (unsealed / LOG).read_bytes()
    start = data[:-1].rfind(b"\n") + 1  # the last record begins here
    for cut in range(start, len(data) + 1):
        run = tmp_path / f"c{cut}" / "run-u"
        shutil.copytree(unsealed, run)
        (run / LOG).write_bytes(data[:cut])
        assert verify_run(run, [key.public]).status == "incomplete", cut
        rep = recover_run(run, key)
        v = verify_run(run, [key.public])
        assert v.status == "intact" and v.seal_status == "aborted", (cut, v.problem)
        torn = data[start:cut] if start < cut < len(data) else b""
        assert rep.torn_tail == len(torn), cut
        evs = [json.loads(x) for x in (run / LOG).read_bytes().splitlines()]
        kinds = [e["type"] for e in evs]
        assert kinds[-2:] == ["run.recovered", "run.end"], kinds
        if torn:
            t = next(e for e in evs if e["type"] == "log.torn_tail")["body"]
            assert (run / blob_relpath(t["torn_tail_blob"])).read_bytes() == torn
            assert t["offset"] == start and t["length"] == len(torn)
        # nothing that was whole is changed: the old lines are a prefix of the new log
        whole = data[:start] if cut < len(data) else data
        assert (run / LOG).read_bytes().startswith(whole)
        unfinished = next(e for e in evs if e["type"] == "run.recovered")["body"]["unfinished"]
        assert [u["req"] for u in unfinished] == ([1] if cut == len(data) else [])
        shutil.rmtree(run.parent, ignore_errors=True)


def test_recover_refuses_sealed_and_corrupt_folders(unsealed: Path, key: KernelKey,
                                                    tmp_path: Path) -> None:
    run = tmp_path / "run-u"
    shutil.copytree(unsealed, run)
    recover_run(run, key)
    with pytest.raises(BadInputError, match="already sealed"):
        recover_run(run, key)
    bad = tmp_path / "bad" / "run-u"
    shutil.copytree(unsealed, bad)
    (bad / "policy.toml").write_bytes(b"edited")
    before = {p: p.read_bytes() for p in bad.rglob("*") if p.is_file()}
    with pytest.raises(RunIntegrityError, match="corrupt"):
        recover_run(bad, key)
    assert {p: p.read_bytes() for p in bad.rglob("*") if p.is_file()} == before
