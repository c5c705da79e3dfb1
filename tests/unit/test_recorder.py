"""The run-folder writer: what it puts on disk, when, and what it refuses."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from kernel.canonical import canonical_json, sha256_digest
from kernel.errors import BadInputError, NotFoundError, RunIntegrityError
from kernel.keys import KernelKey
from kernel.recorder import RecorderError, RunRecorder, utc_timestamp
from kernel.verify import _scan_chunk, _scan_log, verify_run

POLICY = b'name = "test"\n# exact bytes, comments included\n'


@pytest.fixture(scope="module")
def key() -> KernelKey:
    return KernelKey.generate()


def new(tmp: Path, key: KernelKey, run_id: str = "run-1", redact: tuple[str, ...] = ()
        ) -> RunRecorder:
    return RunRecorder.create(tmp / "runs", run_id=run_id, header={"task": "demo"},
                              policy_raw=POLICY, key=key, redact=redact)


def full_run(tmp: Path, key: KernelKey) -> RunRecorder:
    rec = new(tmp, key)
    rec.append("run.start", {"argv": ["agent"]})
    out = rec.put_blob(b"hello\n")
    content = rec.put_blob(b"print('x')\n")
    initial = canonical_json({"files": [{"path": "a.py", "digest": content}]})
    d_init = rec.write_manifest("initial", initial)
    rec.append("syscall.request", {"req_id": 1, "content_blob": content})
    rec.append("syscall.result", {"req_id": 1, "stdout_blob": out, "stderr_blob": None,
                                  "blobs": [out, content]})
    d_final = rec.write_manifest("final", canonical_json({"files": []}))
    rec.append("run.end", {"status": "passed", "final_tree_digest": d_final,
                           "initial": d_init})
    return rec


def test_round_trip_is_intact(tmp_path: Path, key: KernelKey) -> None:
    rec = full_run(tmp_path, key)
    seal_digest = rec.seal("passed", {"exit_code": 0})
    run_dir = rec.run_dir
    assert run_dir == tmp_path / "runs" / "run-1"
    assert seal_digest == sha256_digest((run_dir / "SEAL.json").read_bytes())
    rep = verify_run(run_dir, [key.public])
    assert rep.status == "intact", rep.problem
    assert rep.problem is None and rep.events == 4 and rep.run_id == "run-1"
    assert rep.keyid == key.keyid and rep.seal_status == "passed" and rep.warnings == []
    assert json.loads(json.dumps(rep.to_json()))["status"] == "intact"
    assert (run_dir / "policy.toml").read_bytes() == POLICY
    hdr = json.loads((run_dir / "run.json").read_bytes())
    assert hdr["task"] == "demo" and hdr["policy_digest"] == sha256_digest(POLICY)
    assert hdr["kernel_pubkey"] == key.public_bytes.hex() and hdr["kernel_keyid"] == key.keyid
    seal = json.loads((run_dir / "SEAL.json").read_bytes())["body"]
    assert seal["events"] == 4 and seal["head"] == rec.head()
    assert "log/events.jsonl" in seal["files"] and "SEAL.json" not in seal["files"]


def test_untrusted_key_is_corrupt_and_names_the_signer(tmp_path: Path, key: KernelKey) -> None:
    rec = full_run(tmp_path, key)
    rec.seal("passed", {})
    other = KernelKey.generate()
    rep = verify_run(rec.run_dir, [other.public])
    assert rep.status == "corrupt"
    assert rep.problem is not None and key.keyid in rep.problem and "not trusted" in rep.problem
    assert verify_run(rec.run_dir, []).status == "corrupt"
    assert verify_run(rec.run_dir, [other.public, key.public]).status == "intact"


def test_sealed_folder_is_read_only_and_recorder_refuses(tmp_path: Path, key: KernelKey) -> None:
    rec = full_run(tmp_path, key)
    rec.seal("passed", {})
    for root, dirs, files in os.walk(rec.run_dir):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o555
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o444
        del dirs
    with pytest.raises(RecorderError, match="sealed"):
        rec.append("late", {})
    with pytest.raises(RecorderError, match="sealed"):
        rec.put_blob(b"late")
    with pytest.raises(RecorderError):
        rec.seal("again", {})


def test_event_is_on_disk_when_append_returns(tmp_path: Path, key: KernelKey) -> None:
    rec = new(tmp_path, key)
    log = rec.run_dir / "log" / "events.jsonl"
    fd = os.open(log, os.O_RDONLY)
    try:
        for i in range(5):
            seq = rec.append("tick", {"i": i})
            assert seq == i
            os.lseek(fd, 0, os.SEEK_SET)
            lines = os.read(fd, 1 << 20).split(b"\n")
            assert lines[-1] == b"" and len(lines) == i + 2
            ev = json.loads(lines[i])
            assert ev["seq"] == i and ev["body"] == {"i": i}
            assert hashlib.sha256(lines[i]).hexdigest() == rec.head()
            assert rec.events() == i + 1
    finally:
        os.close(fd)
    rec.close()


def test_blob_is_durable_content_addressed_and_deduplicated(tmp_path: Path, key: KernelKey
                                                           ) -> None:
    rec = new(tmp_path, key)
    d1 = rec.put_blob(b"abc")
    d2 = rec.put_blob(b"abc")
    h = hashlib.sha256(b"abc").hexdigest()
    assert d1 == d2 == "sha256:" + h
    p = rec.run_dir / "objects" / "sha256" / h[:2] / h[2:]
    assert p.read_bytes() == b"abc"
    assert os.listdir(p.parent) == [h[2:]]  # nothing temporary left beside it
    rec.close()


def test_event_fields_and_chain(tmp_path: Path, key: KernelKey) -> None:
    rec = new(tmp_path, key)
    rec.append("run.start", {})
    rec.append("x", {"n": 1, "s": "é"})
    rec.close()
    raw = (rec.run_dir / "log" / "events.jsonl").read_bytes().split(b"\n")
    first, second = json.loads(raw[0]), json.loads(raw[1])
    assert set(first) == {"v", "seq", "run_id", "ts", "type", "prev", "body"}
    assert first["prev"] == "0" * 64 and first["seq"] == 0 and first["v"] == 1
    assert second["prev"] == hashlib.sha256(raw[0]).hexdigest()
    assert raw[1] == canonical_json(second) and "é".encode() in raw[1]
    assert first["ts"].endswith("Z") and len(first["ts"]) == len("2026-01-01T00:00:00.000000Z")
    assert second["ts"] >= first["ts"]


def test_redaction_before_disk(tmp_path: Path, key: KernelKey) -> None:
    secret = "hunter2-secret"
    rec = new(tmp_path, key, redact=(secret, "abc", ""))
    d = rec.put_blob(f"token={secret};x".encode())
    assert d == sha256_digest(b"token=[REDACTED];x")
    rec.append("run.start", {"note": f"uses {secret}", "list": [secret], "short": "abc",
                             "ref_blob": d})
    rec.append("run.end", {})
    rec.seal("done", {"why": secret})
    for root, _, files in os.walk(rec.run_dir):
        for f in files:
            assert secret.encode() not in Path(root, f).read_bytes(), f
    log = (rec.run_dir / "log" / "events.jsonl").read_text()
    assert "[REDACTED]" in log and '"short":"abc"' in log  # too short to redact
    assert verify_run(rec.run_dir, [key.public]).status == "intact"


def test_redaction_applies_to_header(tmp_path: Path, key: KernelKey) -> None:
    rec = RunRecorder.create(tmp_path, run_id="r", header={"argv": ["--pw", "s3cr3t-pw"]},
                             policy_raw=POLICY, key=key, redact=["s3cr3t-pw"])
    rec.close()
    assert b"s3cr3t-pw" not in (rec.run_dir / "run.json").read_bytes()


def test_refusals(tmp_path: Path, key: KernelKey) -> None:
    rec = new(tmp_path, key)
    with pytest.raises(TypeError, match="float"):
        rec.append("x", {"f": 1.5})
    with pytest.raises(ValueError, match="not a blob of this run"):
        rec.append("x", {"out_blob": "sha256:" + "0" * 64})
    with pytest.raises(ValueError, match="md5"):
        rec.append("x", {"out_blob": "md5:" + "0" * 32})
    with pytest.raises(ValueError, match="list"):
        rec.append("x", {"blobs": "sha256:" + "0" * 64})
    rec.append("x", {})
    with pytest.raises(ValueError, match=r"run\.start"):
        rec.append("run.start", {})
    with pytest.raises(ValueError, match=r"run\.end"):
        rec.seal("done", {})
    rec.append("run.end", {})
    with pytest.raises(ValueError, match=r"run\.end"):
        rec.append("after", {})
    with pytest.raises(ValueError, match="canonical"):
        rec.write_manifest("initial", b'{"a": 1}')
    with pytest.raises(ValueError, match="initial"):
        rec.write_manifest("middle", b"{}")
    rec.write_manifest("initial", b"{}")
    with pytest.raises(ValueError, match="already"):
        rec.write_manifest("initial", b"{}")
    assert rec.events() == 2  # nothing refused was written
    rec.close()
    with pytest.raises(RecorderError, match="closed"):
        rec.append("x", {})


def test_create_refuses_existing_folder_and_bad_input(tmp_path: Path, key: KernelKey) -> None:
    new(tmp_path, key).close()
    with pytest.raises(BadInputError, match="already exists"):
        new(tmp_path, key)
    with pytest.raises(BadInputError, match="run id"):
        new(tmp_path, key, run_id="../escape")
    with pytest.raises(ValueError, match="policy_digest"):
        RunRecorder.create(tmp_path, run_id="h", header={"policy_digest": "x"},
                           policy_raw=POLICY, key=key)
    assert not (tmp_path / "h").exists()


def test_unsealed_run_is_incomplete_not_corrupt(tmp_path: Path, key: KernelKey) -> None:
    rec = new(tmp_path, key)
    rec.append("run.start", {})
    rec.append("x", {})
    rec.append("y", {})
    rec.close()
    rep = verify_run(rec.run_dir, [key.public])
    assert rep.status == "incomplete"
    assert rep.problem == "not sealed; 3 events intact up to seq 2"
    # a torn last line (the kernel died mid-write) is still incomplete, with a warning
    with open(rec.run_dir / "log" / "events.jsonl", "ab") as f:
        f.write(b'{"body":{},"prev":"')
    rep = verify_run(rec.run_dir, [key.public])
    assert rep.status == "incomplete" and rep.events == 3
    assert any("torn" in w for w in rep.warnings)


def test_empty_run_is_incomplete(tmp_path: Path, key: KernelKey) -> None:
    rec = new(tmp_path, key)
    rec.close()
    rep = verify_run(rec.run_dir, [key.public])
    assert rep.status == "incomplete" and rep.events == 0


def test_staged_but_unreferenced_blob_is_a_warning_while_unsealed(tmp_path: Path,
                                                                  key: KernelKey) -> None:
    rec = new(tmp_path, key)
    rec.put_blob(b"staged before a crash")
    rec.close()
    rep = verify_run(rec.run_dir, [key.public])
    assert rep.status == "incomplete"
    assert any("not referenced" in w for w in rep.warnings)


def test_unreferenced_blob_is_declared_in_the_seal(tmp_path: Path, key: KernelKey) -> None:
    rec = new(tmp_path, key)
    orphan = rec.put_blob(b"staged for a request that then failed")
    used = rec.put_blob(b"used")
    rec.append("run.end", {"out_blob": used})
    rec.seal("done", {})
    body = json.loads((rec.run_dir / "SEAL.json").read_bytes())["body"]
    assert body["unreferenced"] == [orphan]
    rep = verify_run(rec.run_dir, [key.public])
    assert rep.status == "intact"
    assert any("never referenced" in w and orphan[7:9] in w for w in rep.warnings)


def test_missing_run_dir_raises_not_found(tmp_path: Path, key: KernelKey) -> None:
    with pytest.raises(NotFoundError):
        verify_run(tmp_path / "nope", [key.public])
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotFoundError):
        verify_run(tmp_path / "file", [key.public])


def test_concurrent_appends_stay_contiguous(tmp_path: Path, key: KernelKey) -> None:
    rec = new(tmp_path, key)
    rec.append("run.start", {})

    def worker(n: int) -> None:
        for i in range(20):
            rec.append("t", {"w": n, "i": i, "out_blob": rec.put_blob(f"{n}/{i}".encode())})

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec.append("run.end", {})
    rec.seal("done", {})
    rep = verify_run(rec.run_dir, [key.public])
    assert rep.status == "intact" and rep.events == 82


def test_resume_keeps_torn_tail_as_evidence_and_seals(tmp_path: Path, key: KernelKey) -> None:
    rec = new(tmp_path, key)
    rec.append("run.start", {})
    rec.append("x", {"out_blob": rec.put_blob(b"out")})
    rec.close()
    torn = b'{"body":{"half'
    with open(rec.run_dir / "log" / "events.jsonl", "ab") as f:
        f.write(torn)
    again = RunRecorder.resume(rec.run_dir, key=key)
    assert again.events() == 3 and again.last_type() == "log.torn_tail"
    again.append("run.end", {"status": "aborted"})
    again.seal("aborted", {"reason": "kernel died"})
    rep = verify_run(rec.run_dir, [key.public])
    assert rep.status == "intact" and rep.seal_status == "aborted" and rep.events == 4
    ev = json.loads((rec.run_dir / "log" / "events.jsonl").read_bytes().split(b"\n")[2])
    assert ev["body"]["length"] == len(torn)
    h = ev["body"]["torn_tail_blob"][7:]
    assert (rec.run_dir / "objects" / "sha256" / h[:2] / h[2:]).read_bytes() == torn


def test_resume_after_run_end_seals_directly(tmp_path: Path, key: KernelKey) -> None:
    rec = new(tmp_path, key)
    rec.append("run.end", {})
    rec.close()
    again = RunRecorder.resume(rec.run_dir, key=key)
    again.seal("aborted", {})
    assert verify_run(rec.run_dir, [key.public]).status == "intact"


def test_resume_refuses_sealed_and_corrupt_runs(tmp_path: Path, key: KernelKey) -> None:
    rec = full_run(tmp_path, key)
    rec.seal("passed", {})
    with pytest.raises(RunIntegrityError, match="already sealed"):
        RunRecorder.resume(rec.run_dir, key=key)
    bad = new(tmp_path, key, run_id="bad")
    bad.append("a", {})
    bad.close()
    (bad.run_dir / "policy.toml").write_bytes(b"edited")
    with pytest.raises(RunIntegrityError, match="policy"):
        RunRecorder.resume(bad.run_dir, key=key)


def test_split_scan_falls_back_when_fork_fails(tmp_path: Path, key: KernelKey,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = _big_unsealed_run(tmp_path, key, 14_000)

    def no_fork() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr("kernel.verify.os.fork", no_fork)
    rep = verify_run(run_dir, [key.public])
    assert rep.problem == "not sealed; 14000 events intact up to seq 13999"


def test_timestamp_format() -> None:
    assert utc_timestamp(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456Z"


def _big_unsealed_run(tmp: Path, key: KernelKey, n: int) -> Path:
    """An unsealed run whose log (over 4 MiB) is written directly, chain included."""
    rec = new(tmp, key, run_id="big")
    rec.append("run.start", {})
    rec.close()
    out = bytearray()
    prev = rec.head()
    for i in range(1, n):
        line = canonical_json({"v": 1, "seq": i, "run_id": "big",
                               "ts": "2099-01-01T00:00:00.000000Z", "type": "t",
                               "prev": prev, "body": {"i": i, "pad": "x" * 300}})
        prev = hashlib.sha256(line).hexdigest()
        out += line + b"\n"
    with open(rec.run_dir / "log" / "events.jsonl", "ab") as f:
        f.write(out)
    return rec.run_dir


def test_parallel_scan_reports_what_a_single_scan_reports(tmp_path: Path, key: KernelKey,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Large logs are split across forked workers; the verdict must not depend on the split."""
    run_dir = _big_unsealed_run(tmp_path, key, 16_000)
    log = run_dir / "log" / "events.jsonl"
    data = log.read_bytes()
    assert len(data) > 4 << 20
    chunks = _scan_log(data, len(data), "big")
    if len(chunks) < 2:
        pytest.skip("one CPU only: the split path is not taken")
    whole = _scan_chunk(data, 0, len(data), 0, "big", "0" * 64)
    assert chunks[-1].last_hash == whole.last_hash and whole.error is None
    assert sum(c.count for c in chunks) == whole.count == 16_000
    assert verify_run(run_dir, [key.public]).problem == \
        "not sealed; 16000 events intact up to seq 15999"
    b = chunks[1].first_offset
    last_of_first = data.rfind(b"\n", 0, b - 1) + 1
    targets = [b + data.find(b'"prev":"', b) - b + 10,  # prev of the first line of chunk 2
               b + 5,  # first line of chunk 2 made non-canonical / unparsable
               last_of_first + 30,  # last line of chunk 1 (breaks the next prev too)
               b + 1000 * 390]  # somewhere inside chunk 2
    for pos in targets:
        broken = bytearray(data)
        broken[pos] ^= 0x01
        os.chmod(log, 0o644)
        log.write_bytes(bytes(broken))
        monkeypatch.setattr("kernel.verify._PARALLEL_MIN_BYTES", 4 << 20)
        split = verify_run(run_dir, [key.public])
        monkeypatch.setattr("kernel.verify._PARALLEL_MIN_BYTES", 1 << 62)
        single = verify_run(run_dir, [key.public])
        assert split.status == single.status == "corrupt"
        assert split.problem == single.problem, pos
    log.write_bytes(data)
