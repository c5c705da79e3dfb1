"""Tampering with a sealed run folder: every case must be caught, and named.

Numbers in test names are the tamper cases of the audit notes (§8). Some cases isolate one check
by also re-chaining the log and re-signing the seal with the real kernel key ("insider"): the
check under test must still catch what the signature alone cannot.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kernel.canonical import canonical_json
from kernel.keys import KernelKey
from kernel.recorder import RUN_SIG_DOMAIN, SEAL_SIG_DOMAIN, RunRecorder
from kernel.verify import VerifyReport, verify_run

LOG = "log/events.jsonl"
POLICY = b'name = "tamper"\n'


@pytest.fixture(scope="module")
def key() -> KernelKey:
    return KernelKey.generate()


def build(root: Path, key: KernelKey, run_id: str = "run-t") -> Path:
    """A small sealed run: a handful of events, two blobs, both manifests."""
    rec = RunRecorder.create(root, run_id=run_id, header={"task": "tamper fixture"},
                             policy_raw=POLICY, key=key)
    rec.append("run.start", {"argv": ["agent"], "note": "café"})
    content = rec.put_blob(b"print('hi')\n")
    out = rec.put_blob(b"hi\n")
    d_init = rec.write_manifest("initial", canonical_json(
        {"files": [{"digest": content, "path": "a.py"}]}))
    rec.append("syscall.request", {"req_id": 1, "op": "write", "content_blob": content})
    rec.append("syscall.decision", {"req_id": 1, "decision": "allowed", "n": 1})
    rec.append("syscall.result", {"req_id": 1, "stdout_blob": out})
    d_final = rec.write_manifest("final", canonical_json(
        {"files": [{"digest": content, "path": "a.py"}, {"digest": out, "path": "b"}]}))
    rec.append("run.end", {"status": "passed", "final_tree_digest": d_final,
                           "initial_tree_digest": d_init})
    rec.seal("passed", {"exit_code": 0})
    return rec.run_dir


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory, key: KernelKey) -> Path:
    return build(tmp_path_factory.mktemp("sealed"), key)


def writable(src: Path, dst_parent: Path) -> Path:
    dst = dst_parent / src.name
    shutil.copytree(src, dst, symlinks=True)
    for root, dirs, files in os.walk(dst):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
        del dirs
    return dst


@pytest.fixture
def run(sealed: Path, tmp_path: Path) -> Path:
    return writable(sealed, tmp_path)


def check(run_dir: Path, key: KernelKey, *names: str, status: str = "corrupt") -> VerifyReport:
    rep = verify_run(run_dir, [key.public])
    assert rep.status == status, (rep.status, rep.problem)
    for n in names:
        assert rep.problem is not None and n in rep.problem, (n, rep.problem)
    return rep


def lines(run_dir: Path) -> list[bytes]:
    return (run_dir / LOG).read_bytes().split(b"\n")[:-1]


def put_lines(run_dir: Path, ls: list[bytes]) -> None:
    (run_dir / LOG).write_bytes(b"".join(line + b"\n" for line in ls))


def events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(run_dir)]


def rechain(run_dir: Path, evs: list[dict[str, Any]], renumber: bool = True) -> None:
    prev = "0" * 64
    out = []
    for i, ev in enumerate(evs):
        if renumber:
            ev["seq"] = i
        ev["prev"] = prev
        line = canonical_json(ev)
        prev = hashlib.sha256(line).hexdigest()
        out.append(line)
    put_lines(run_dir, out)


def reseal(run_dir: Path, key: KernelKey, edit: Callable[[dict[str, Any]], None] | None = None
           ) -> None:
    """Re-sign SEAL.json over the folder as it is now (an insider holding the kernel key)."""
    seal = json.loads((run_dir / "SEAL.json").read_bytes())
    body = seal["body"]
    files: dict[str, str] = {}
    dirs: list[str] = []
    for root, dnames, fnames in os.walk(run_dir):
        rel = os.path.relpath(root, run_dir)
        dirs += [dn if rel == "." else f"{rel}/{dn}" for dn in dnames]
        for fn in fnames:
            r = fn if rel == "." else f"{rel}/{fn}"
            if r != "SEAL.json":
                files[r] = "sha256:" + hashlib.sha256(Path(root, fn).read_bytes()).hexdigest()
    ls = lines(run_dir)
    body.update(files=dict(sorted(files.items())), dirs=sorted(dirs), events=len(ls),
                head=hashlib.sha256(ls[-1]).hexdigest() if ls else "0" * 64)
    if edit:
        edit(body)
    sig = key.sign(SEAL_SIG_DOMAIN + canonical_json(body)).hex()
    (run_dir / "SEAL.json").write_bytes(canonical_json({"body": body, "sig": sig}))


def blob_paths(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "objects").rglob("*") if p.is_file())


def test_fixture_is_intact(sealed: Path, key: KernelKey) -> None:
    rep = check(sealed, key, status="intact")
    assert rep.events == 5 and rep.warnings == []


def test_insider_reseal_helper_keeps_it_intact(run: Path, key: KernelKey) -> None:
    rechain(run, events(run))
    reseal(run, key)
    check(run, key, status="intact")


# ---- log content ----

def test_01_byte_flipped_inside_middle_event(run: Path, key: KernelKey) -> None:
    ls = lines(run)
    ls[2] = ls[2].replace(b'"allowed"', b'"allowee"')
    put_lines(run, ls)
    check(run, key, LOG, "seq 3", "chain broken")


def test_02_middle_event_deleted(run: Path, key: KernelKey) -> None:
    ls = lines(run)
    del ls[2]
    put_lines(run, ls)
    check(run, key, LOG, "seq 2", "expected 2")


def test_03_two_events_swapped(run: Path, key: KernelKey) -> None:
    ls = lines(run)
    ls[1], ls[2] = ls[2], ls[1]
    put_lines(run, ls)
    check(run, key, LOG, "seq 1")


@pytest.mark.parametrize("how", ["key_order", "whitespace", "unicode_escape", "float",
                                 "duplicate_key", "slash_escape"])
def test_05_same_json_reencoded(run: Path, key: KernelKey, how: str) -> None:
    ls = lines(run)
    ev = json.loads(ls[0])
    if how == "key_order":
        new = json.dumps(dict(reversed(ev.items())), separators=(",", ":"),
                         ensure_ascii=False).encode()
    elif how == "whitespace":
        new = json.dumps(ev, sort_keys=True, ensure_ascii=False).encode()
    elif how == "unicode_escape":
        new = json.dumps(ev, sort_keys=True, separators=(",", ":")).encode()
        assert b"\\u00e9" in new
    elif how == "float":
        new = ls[0].replace(b'"v":1', b'"v":1.0')
    elif how == "duplicate_key":
        new = ls[0].replace(b'"v":1', b'"v":1,"v":1')
    else:
        new = ls[0].replace(b'"type":"run.start"', b'"type":"run.st\\u0061rt"')
    assert new != ls[0]
    ls[0] = new
    put_lines(run, ls)
    check(run, key, LOG, "seq 0")


def test_06_duplicate_seq(run: Path, key: KernelKey) -> None:
    evs = events(run)
    evs[2]["seq"] = 1
    rechain(run, evs, renumber=False)
    reseal(run, key)
    check(run, key, LOG, "seq 2", "seq is 1, expected 2")


def test_06_seq_not_starting_at_zero(run: Path, key: KernelKey) -> None:
    evs = events(run)
    for ev in evs:
        ev["seq"] += 1
    rechain(run, evs, renumber=False)
    reseal(run, key)
    check(run, key, LOG, "seq 0", "expected 0")


def test_07_event_spliced_from_another_run(run: Path, key: KernelKey, tmp_path: Path) -> None:
    other = build(tmp_path / "other", key, run_id="run-other")
    ls = lines(run)
    ls[2] = lines(other)[2]
    put_lines(run, ls)
    check(run, key, LOG, "seq 2", "run_id")


def test_08_tail_truncated_and_seal_removed_is_incomplete(run: Path, key: KernelKey) -> None:
    put_lines(run, lines(run)[:3])
    (run / "SEAL.json").unlink()
    rep = check(run, key, status="incomplete")
    assert rep.problem == "not sealed; 3 events intact up to seq 2"


def test_08_tail_truncated_with_seal_present(run: Path, key: KernelKey) -> None:
    put_lines(run, lines(run)[:3])
    check(run, key, LOG, "has 3 events")


def test_10_torn_line_in_sealed_log(run: Path, key: KernelKey) -> None:
    data = (run / LOG).read_bytes()
    (run / LOG).write_bytes(data[:-1])
    check(run, key, LOG, "torn")


def test_11_second_run_start(run: Path, key: KernelKey) -> None:
    evs = events(run)
    evs[2]["type"] = "run.start"
    rechain(run, evs)
    reseal(run, key)
    check(run, key, LOG, "seq 2", "run.start")


def test_event_after_run_end(run: Path, key: KernelKey) -> None:
    evs = events(run)
    evs.append(dict(evs[2]))
    rechain(run, evs)
    reseal(run, key)
    check(run, key, LOG, "seq 5", "after run.end")


def test_sealed_log_must_end_with_run_end(run: Path, key: KernelKey) -> None:
    evs = events(run)[:-1]
    rechain(run, evs)
    reseal(run, key)
    check(run, key, LOG, "run.end")


# ---- objects and manifests ----

def test_13_blob_content_modified(run: Path, key: KernelKey) -> None:
    p = blob_paths(run)[0]
    p.write_bytes(p.read_bytes() + b"x")
    check(run, key, str(p.relative_to(run)), "hashes to")


def test_14_two_blobs_swapped(run: Path, key: KernelKey) -> None:
    a, b = blob_paths(run)
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    check(run, key, "objects/sha256/", "hashes to")


def test_14_blob_renamed(run: Path, key: KernelKey) -> None:
    a = blob_paths(run)[0]
    target = a.parent / ("0" * 62)
    a.rename(target)
    check(run, key, str(target.relative_to(run)), "hashes to")


def test_15_referenced_blob_deleted(run: Path, key: KernelKey) -> None:
    p = blob_paths(run)[0]
    p.unlink()
    check(run, key, str(p.relative_to(run)), "missing")


def test_16_unexpected_top_level_file(run: Path, key: KernelKey) -> None:
    (run / "notes.txt").write_text("hello")
    check(run, key, "notes.txt", "unexpected")


def test_16_unreferenced_blob_added(run: Path, key: KernelKey) -> None:
    data = b"smuggled"
    h = hashlib.sha256(data).hexdigest()
    (run / "objects/sha256" / h[:2]).mkdir(exist_ok=True)
    (run / "objects/sha256" / h[:2] / h[2:]).write_bytes(data)
    check(run, key, f"objects/sha256/{h[:2]}/{h[2:]}", "not listed in SEAL.json")


def test_16_unreferenced_blob_even_when_resealed(run: Path, key: KernelKey) -> None:
    data = b"smuggled"
    h = hashlib.sha256(data).hexdigest()
    (run / "objects/sha256" / h[:2]).mkdir(exist_ok=True)
    (run / "objects/sha256" / h[:2] / h[2:]).write_bytes(data)
    reseal(run, key)
    check(run, key, f"objects/sha256/{h[:2]}/{h[2:]}", "not referenced", "nor declared")


def test_16_declared_unreferenced_list_cannot_hide_a_referenced_blob(run: Path, key: KernelKey
                                                                     ) -> None:
    used = "sha256:" + "".join(blob_paths(run)[0].parts[-2:])
    reseal(run, key, lambda body: body.update(unreferenced=[used]))
    check(run, key, "SEAL.json", "unreferenced")


def test_17_symlink_planted_as_blob_dir(run: Path, key: KernelKey, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, run / "objects/sha256/zz")
    check(run, key, "objects/sha256/zz", "symbolic link")


def test_17_file_replaced_by_symlink(run: Path, key: KernelKey, tmp_path: Path) -> None:
    target = tmp_path / "policy-copy"
    target.write_bytes(POLICY)
    (run / "policy.toml").unlink()
    os.symlink(target, run / "policy.toml")
    check(run, key, "policy.toml", "symbolic link")


def test_17_fifo_planted(run: Path, key: KernelKey) -> None:
    p = blob_paths(run)[0]
    p.unlink()
    os.mkfifo(p)
    check(run, key, str(p.relative_to(run)), "fifo")


def test_17_hard_link_trick(run: Path, key: KernelKey, tmp_path: Path) -> None:
    p = blob_paths(run)[0]
    os.link(p, tmp_path / "alias")
    check(run, key, str(p.relative_to(run)), "hard links")


def test_18_policy_edited(run: Path, key: KernelKey) -> None:
    (run / "policy.toml").write_bytes(POLICY + b"# more\n")
    check(run, key, "policy.toml", "policy_digest")


def test_19_initial_manifest_edited(run: Path, key: KernelKey) -> None:
    p = run / "initial/tree.json"
    p.write_bytes(p.read_bytes().replace(b"a.py", b"b.py"))
    check(run, key, "initial/tree.json", "SEAL.json")


def test_20_final_manifest_edited(run: Path, key: KernelKey) -> None:
    p = run / "final/tree.json"
    p.write_bytes(p.read_bytes().replace(b'"b"', b'"c"'))
    check(run, key, "final/tree.json", "SEAL.json")


def test_20_manifest_made_non_canonical(run: Path, key: KernelKey) -> None:
    p = run / "final/tree.json"
    p.write_bytes(p.read_bytes().replace(b",", b", "))
    check(run, key, "final/tree.json", "canonical")


def test_21_blob_and_its_event_changed_consistently(run: Path, key: KernelKey) -> None:
    old = next(p for p in blob_paths(run) if p.read_bytes() == b"hi\n")
    old_digest = "sha256:" + old.parent.name + old.name
    data = b"forged output\n"
    h = hashlib.sha256(data).hexdigest()
    (run / "objects/sha256" / h[:2]).mkdir(exist_ok=True)
    (run / "objects/sha256" / h[:2] / h[2:]).write_bytes(data)
    old.unlink()
    ls = lines(run)
    ls[3] = ls[3].replace(old_digest.encode(), f"sha256:{h}".encode())
    put_lines(run, ls)
    check(run, key, LOG, "seq 4", "chain broken")


# ---- signatures and the seal ----

def test_22_seal_signature_byte_flipped(run: Path, key: KernelKey) -> None:
    p = run / "SEAL.json"
    data = bytearray(p.read_bytes())
    i = data.index(b'"sig":"') + 10
    data[i] = ord("0") if data[i] != ord("0") else ord("1")
    p.write_bytes(bytes(data))
    check(run, key, "SEAL.json", "signature")


def test_25_seal_missing_is_incomplete(run: Path, key: KernelKey) -> None:
    (run / "SEAL.json").unlink()
    rep = check(run, key, status="incomplete")
    assert rep.problem == "not sealed; 5 events intact up to seq 4"


def test_25_seal_signed_by_another_key(run: Path, key: KernelKey) -> None:
    reseal(run, KernelKey.generate())
    check(run, key, "SEAL.json", "signature")


def test_25_seal_subject_digest_does_not_match(run: Path, key: KernelKey) -> None:
    def edit(body: dict[str, Any]) -> None:
        body["files"]["policy.toml"] = "sha256:" + "1" * 64

    reseal(run, key, edit)
    check(run, key, "policy.toml", "differs from SEAL.json")


def test_25_seal_lists_a_file_that_is_gone(run: Path, key: KernelKey) -> None:
    def edit(body: dict[str, Any]) -> None:
        body["files"]["objects/sha256/00/" + "0" * 62] = "sha256:" + "0" * 64

    reseal(run, key, edit)
    check(run, key, "objects/sha256/00/", "listed in SEAL.json but missing")


def test_25_seal_with_wrong_event_count(run: Path, key: KernelKey) -> None:
    reseal(run, key, lambda body: body.update(events=4))
    check(run, key, LOG, "has 5 events")


def test_26_run_json_resigned_with_attacker_key(run: Path, key: KernelKey) -> None:
    attacker = KernelKey.generate()
    hdr = json.loads((run / "run.json").read_bytes())
    hdr.update(kernel_pubkey=attacker.public_bytes.hex(), kernel_keyid=attacker.keyid)
    raw = canonical_json(hdr)
    (run / "run.json").write_bytes(raw)
    (run / "run.json.sig").write_bytes(canonical_json(
        {"keyid": attacker.keyid, "sig": attacker.sign(RUN_SIG_DOMAIN + raw).hex()}))
    reseal(run, attacker)
    check(run, key, "run.json.sig", attacker.keyid, "not trusted")


def test_26_run_json_edited(run: Path, key: KernelKey) -> None:
    p = run / "run.json"
    p.write_bytes(p.read_bytes().replace(b"tamper fixture", b"tamper fixturE"))
    check(run, key, "run.json.sig", "does not verify")


@pytest.mark.parametrize("ref", ["md5:" + "0" * 32, "sha1:" + "0" * 40,
                                 "SHA256:" + "0" * 64, "sha256:" + "A" * 64])
def test_27_digest_algorithm_downgrade(run: Path, key: KernelKey, ref: str) -> None:
    evs = events(run)
    evs[3]["body"]["stdout_blob"] = ref
    rechain(run, evs)
    reseal(run, key)
    check(run, key, LOG, "seq 3", "stdout_blob")


def test_28_signature_domain_is_bound(run: Path, key: KernelKey) -> None:
    """A seal signature is not a run.json signature: the domain prefix differs."""
    seal = json.loads((run / "SEAL.json").read_bytes())
    body = canonical_json(seal["body"])
    seal["sig"] = key.sign(RUN_SIG_DOMAIN + body).hex()
    (run / "SEAL.json").write_bytes(canonical_json(seal))
    check(run, key, "SEAL.json", "signature")


def test_renamed_folder_is_still_intact_with_a_warning(run: Path, key: KernelKey) -> None:
    moved = run.rename(run.parent / "renamed")
    rep = check(moved, key, status="intact")
    assert any("folder name" in w for w in rep.warnings)


def test_nothing_raises_on_garbage(run: Path, key: KernelKey) -> None:
    (run / "SEAL.json").write_bytes(b"\xff\xfe not json")
    check(run, key, "SEAL.json")
    (run / "run.json").write_bytes(b"[]")
    check(run, key, "run.json")


# ---- exhaustive ----

def all_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink())


def test_every_byte_flip_is_detected(run: Path, key: KernelKey) -> None:
    started = time.monotonic()
    total = 0
    for p in all_files(run):
        original = p.read_bytes()
        buf = bytearray(original)
        for i in range(len(buf)):
            for mask in (0x01, 0x20):
                buf[i] ^= mask
                p.write_bytes(bytes(buf))
                rep = verify_run(run, [key.public])
                assert rep.status != "intact", (str(p.relative_to(run)), i, mask)
                buf[i] ^= mask
                total += 1
        p.write_bytes(original)
    assert verify_run(run, [key.public]).status == "intact"
    assert total > 2000
    print(f"\n{total} flips in {time.monotonic() - started:.1f}s")


def test_every_file_removed(run: Path, key: KernelKey) -> None:
    for p in all_files(run):
        data = p.read_bytes()
        p.unlink()
        rep = verify_run(run, [key.public])
        rel = str(p.relative_to(run))
        if rel == "SEAL.json":
            assert rep.status == "incomplete"
        else:
            assert rep.status == "corrupt", rel
            assert rep.problem is not None and rel in rep.problem, (rel, rep.problem)
        p.write_bytes(data)
    assert verify_run(run, [key.public]).status == "intact"


def test_extra_file_in_every_directory(run: Path, key: KernelKey) -> None:
    dirs = [run, *sorted(p for p in run.rglob("*") if p.is_dir())]
    for d in dirs:
        for name in ("extra", "0" * 62, "ab", "tree.json", "events.jsonl", ".hidden"):
            p = d / name
            if p.exists():
                continue
            p.write_bytes(b"{}")
            rep = verify_run(run, [key.public])
            assert rep.status == "corrupt", (str(p), rep.problem)
            assert rep.problem is not None and str(p.relative_to(run)) in rep.problem
            p.unlink()
        sub = d / "newdir"
        sub.mkdir()
        rep = verify_run(run, [key.public])
        assert rep.status == "corrupt", str(sub)
        sub.rmdir()
    assert verify_run(run, [key.public]).status == "intact"


def test_empty_blob_shard_dir_added_after_seal(run: Path, key: KernelKey) -> None:
    (run / "objects/sha256/00").mkdir()
    check(run, key, "SEAL.json", "directory")


def test_log_truncated_at_every_line_boundary(run: Path, key: KernelKey) -> None:
    data = (run / LOG).read_bytes()
    seal = (run / "SEAL.json").read_bytes()
    cuts = [0] + [i + 1 for i, b in enumerate(data) if b == 0x0A]
    for cut in cuts[:-1]:
        (run / LOG).write_bytes(data[:cut])
        rep = verify_run(run, [key.public])
        assert rep.status == "corrupt", cut
        assert rep.problem is not None and LOG in rep.problem
        (run / "SEAL.json").unlink()
        rep = verify_run(run, [key.public])
        n = data[:cut].count(b"\n")
        assert rep.status == "incomplete" and rep.events == n, (cut, rep.problem)
        (run / "SEAL.json").write_bytes(seal)
    (run / LOG).write_bytes(data)
    assert verify_run(run, [key.public]).status == "intact"


def test_crash_at_every_byte_of_the_log_is_incomplete(run: Path, key: KernelKey) -> None:
    """Power lost mid-append: every prefix of the log is a valid, unsealed run."""
    data = (run / LOG).read_bytes()
    (run / "SEAL.json").unlink()
    for cut in range(len(data)):
        (run / LOG).write_bytes(data[:cut])
        rep = verify_run(run, [key.public])
        assert rep.status == "incomplete", (cut, rep.problem)
        assert rep.events == data[:cut].count(b"\n")


def test_every_pair_of_lines_swapped(run: Path, key: KernelKey) -> None:
    ls = lines(run)
    for i in range(len(ls)):
        for j in range(i + 1, len(ls)):
            swapped = list(ls)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            put_lines(run, swapped)
            rep = verify_run(run, [key.public])
            assert rep.status == "corrupt" and rep.problem is not None
            assert f"{LOG} seq {i}" in rep.problem, rep.problem
    put_lines(run, ls)
    assert verify_run(run, [key.public]).status == "intact"


def test_sealed_fixture_modes(sealed: Path) -> None:
    assert stat.S_IMODE(os.stat(sealed / LOG).st_mode) == 0o444


# ---- cases 4, 10 and 12 (with a run recovered from a torn tail for case 10) ----


def test_04_forged_event_inserted_with_chain_recomputed(run: Path, key: KernelKey) -> None:
    evs = events(run)
    evs.insert(2, {"v": 1, "seq": 0, "run_id": "run-t", "ts": evs[1]["ts"],
                   "type": "syscall.decision", "prev": "", "body": {"decision": "allowed"}})
    rechain(run, evs)  # a consistent chain, but the seal still holds the old count and head
    check(run, key, "SEAL.json")


def test_12_ts_going_backwards_is_a_warning(run: Path, key: KernelKey) -> None:
    evs = events(run)
    evs[2]["ts"], evs[3]["ts"] = evs[3]["ts"], "2000-01-01T00:00:00.000000Z"
    rechain(run, evs)
    reseal(run, key)
    rep = check(run, key, status="intact")
    assert any("ts goes backwards" in w for w in rep.warnings), rep.warnings


@pytest.fixture
def recovered(tmp_path: Path, key: KernelKey) -> Path:
    """A run whose kernel died mid-line, resumed and sealed as aborted."""
    rec = RunRecorder.create(tmp_path / "runs", run_id="run-r", header={}, policy_raw=POLICY,
                             key=key)
    rec.append("run.start", {})
    rec.append("syscall.request", {"req": 1})
    rec.close()
    with open(rec.run_dir / LOG, "ab") as f:
        f.write(b'{"body":{"req":1,"half')
    again = RunRecorder.resume(rec.run_dir, key=key)
    again.append("run.end", {"status": "aborted"})
    again.seal("aborted", {})
    return writable(rec.run_dir, tmp_path / "copy")


def test_10_recovered_torn_tail_is_intact(recovered: Path, key: KernelKey) -> None:
    rep = check(recovered, key, status="intact")
    assert rep.seal_status == "aborted"


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("offset", 3, "torn line was at byte 3"),
    ("length", 5, "does not describe its blob"),
])
def test_10_torn_tail_record_that_lies(recovered: Path, key: KernelKey, field: str,
                                       value: int, needle: str) -> None:
    evs = events(recovered)
    torn = next(e for e in evs if e["type"] == "log.torn_tail")
    torn["body"][field] = value
    rechain(recovered, evs)
    reseal(recovered, key)
    check(recovered, key, needle)


def test_10_torn_tail_record_pointing_at_another_blob(recovered: Path, key: KernelKey) -> None:
    evs = events(recovered)
    torn = next(e for e in evs if e["type"] == "log.torn_tail")
    evs.insert(1, {"v": 1, "seq": 0, "run_id": "run-r", "ts": evs[0]["ts"], "type": "x",
                   "prev": "", "body": {"a_blob": torn["body"]["torn_tail_blob"]}})
    rechain(recovered, evs)  # everything after the insert moved: the offset no longer fits
    reseal(recovered, key)
    check(recovered, key, "log.torn_tail says the torn line was at byte")


def test_10_second_torn_tail_record(recovered: Path, key: KernelKey) -> None:
    evs = events(recovered)
    i = next(i for i, e in enumerate(evs) if e["type"] == "log.torn_tail")
    evs.insert(i + 1, json.loads(json.dumps(evs[i])))
    rechain(recovered, evs)
    reseal(recovered, key)
    check(recovered, key, "log.torn_tail")
