"""syscalls.write: request validation, each op on a real filesystem, atomicity, captured changes."""

from __future__ import annotations

import base64
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel.decide import Decision, Grant, Usage, check_write, grant
from kernel.manifest import Change, clone_tree, diff, scan
from kernel.paths import Workspace
from kernel.policy import Policy, ProtectedPath, WritePolicy
from syscalls.write import (
    RENAME_NOREPLACE,
    TMP_PREFIX,
    perform,
    prepare,
    prepare_captured,
    renameat2,
)

VIEW = "/workspace"
POLICY = Policy()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    root = tmp_path / "ws"
    root.mkdir()
    w = Workspace.open(root, view_root=VIEW, hidden=["runs"])
    try:
        yield w
    finally:
        w.close()


def decide(ws: Workspace, args: dict[str, Any], policy: Policy = POLICY) -> Decision | Grant:
    prep = prepare(args, ws, policy)
    if isinstance(prep, Decision):
        return prep
    req, _ = prep
    d = check_write(req, policy, Usage(), 0)
    return grant(d, req) if d.allowed else d


def run(ws: Workspace, args: dict[str, Any], policy: Policy = POLICY) -> dict[str, Any]:
    prep = prepare(args, ws, policy)
    assert not isinstance(prep, Decision), prep
    req, content = prep
    d = check_write(req, policy, Usage(), 0)
    assert d.allowed, d
    return perform(grant(d, req), ws, content)


def denied(ws: Workspace, args: dict[str, Any], policy: Policy = POLICY) -> Decision:
    got = decide(ws, args, policy)
    assert isinstance(got, Decision) and not got.allowed, got
    return got


def no_temp_files(root: Path) -> None:
    left = [p for p in root.rglob("*") if p.name.startswith(TMP_PREFIX)]
    assert left == []


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "must be an object"),
        ({"path": "a"}, "write: missing field(s) 'op'"),
        ({"op": "write"}, "write: missing field(s) 'path'"),
        ({"op": "write", "path": "a", "content_b64": "", "extra": 1},
         "write: unknown field(s) 'extra' (write accepts: op, path, content_b64"),
        ({"op": 1, "path": "a"}, "'op' must be a string"),
        ({"op": "truncate", "path": "a"}, "not one of"),
        ({"op": "delete", "path": 3}, "'path' must be a string"),
        ({"op": "write", "path": "a"}, "needs 'content_b64'"),
        ({"op": "write", "path": "a", "content_b64": 5}, "'content_b64' must be a string"),
        ({"op": "write", "path": "a", "content_b64": "a"}, "not valid base64"),
        ({"op": "write", "path": "a", "content_b64": "aGk=\n"}, "not valid base64"),
        ({"op": "write", "path": "a", "content_b64": "a$==" }, "not valid base64"),
        ({"op": "write", "path": "a", "content_b64": "é"}, "not valid base64"),
        ({"op": "delete", "path": "a", "content_b64": ""}, "only for write"),
        ({"op": "write", "path": "a", "content_b64": "", "mode": "644"}, "'mode' must be an"),
        ({"op": "write", "path": "a", "content_b64": "", "mode": True}, "'mode' must be an"),
        ({"op": "write", "path": "a", "content_b64": "", "mode": 4.0}, "'mode' must be an"),
        ({"op": "delete", "path": "a", "mode": 0o644}, "'mode' is only for"),
        ({"op": "chmod", "path": "a"}, "needs 'mode'"),
        ({"op": "rename", "path": "a"}, "needs 'dest'"),
        ({"op": "rename", "path": "a", "dest": 1}, "'dest' must be a string"),
        ({"op": "delete", "path": "a", "dest": "b"}, "'dest' is only for rename"),
        ({"op": "write", "path": "a", "content_b64": "", "parents": True}, "only for mkdir"),
        ({"op": "mkdir", "path": "a", "parents": 1}, "'parents' must be true or false"),
        ({"op": "delete", "path": "a", "justification": None}, "'justification' must be"),
    ],
)
def test_invalid_requests(ws: Workspace, args: Any, needle: str) -> None:
    d = prepare(args, ws, POLICY)
    assert isinstance(d, Decision)
    assert (d.decision, d.rule, d.errno) == ("denied", "request.invalid", errno.EINVAL)
    assert needle in d.reason


def test_path_violation_is_a_denial(ws: Workspace) -> None:
    d = prepare({"op": "delete", "path": "../x"}, ws, POLICY)
    assert isinstance(d, Decision) and d.rule == "path.outside" and d.errno == errno.EXDEV
    d = prepare({"op": "rename", "path": "a", "dest": "/etc/x"}, ws, POLICY)
    assert isinstance(d, Decision) and d.rule == "path.outside"


def test_root_and_protected_and_size(ws: Workspace) -> None:
    assert denied(ws, {"op": "delete", "path": "."}).rule == "path.root"
    assert denied(ws, {"op": "delete", "path": VIEW}).rule == "path.root"
    pol = Policy(protected=[ProtectedPath(glob=".git/**", action="deny", reason="vcs")],
                 write=WritePolicy(max_file_bytes=4))
    assert denied(ws, {"op": "write", "path": ".git/config", "content_b64": ""},
                  pol).rule == "protected:.git/**"
    assert denied(ws, {"op": "write", "path": "big", "content_b64": b64(b"12345")},
                  pol).rule == "write.max_file_bytes"
    (ws.root / "f").write_bytes(b"123")
    assert denied(ws, {"op": "append", "path": "f", "content_b64": b64(b"45")},
                  pol).rule == "write.max_file_bytes"
    assert denied(ws, {"op": "chmod", "path": "f", "mode": 0o4755}).rule == "write.mode"
    assert denied(ws, {"op": "write", "path": "runs/x", "content_b64": ""}).rule == "path.hidden"


def test_prepare_sizes(ws: Workspace) -> None:
    (ws.root / "f").write_bytes(b"123")
    prep = prepare({"op": "append", "path": "f", "content_b64": b64(b"45")}, ws, POLICY)
    assert not isinstance(prep, Decision)
    req, content = prep
    assert (req.new_size, req.payload_bytes, content) == (5, 2, b"45")
    prep = prepare({"op": "mkdir", "path": "a/b", "parents": True}, ws, POLICY)
    assert not isinstance(prep, Decision) and prep[0].parents


# ---------------------------------------------------------------------------------------------
# each op


def test_write_create_overwrite(ws: Workspace) -> None:
    r = run(ws, {"op": "write", "path": "a.txt", "content_b64": b64(b"one")})
    assert r["op"] == "write" and r["path"] == "a.txt" and r["size"] == 3
    assert r["digest"].startswith("sha256:")
    assert (ws.root / "a.txt").read_bytes() == b"one"
    assert stat.S_IMODE((ws.root / "a.txt").stat().st_mode) == 0o644
    os.chmod(ws.root / "a.txt", 0o600)
    run(ws, {"op": "write", "path": "/workspace/a.txt", "content_b64": b64(b"two!")})
    assert (ws.root / "a.txt").read_bytes() == b"two!"
    assert stat.S_IMODE((ws.root / "a.txt").stat().st_mode) == 0o600  # kept on overwrite
    run(ws, {"op": "write", "path": "x.sh", "content_b64": "", "mode": 0o750})
    assert stat.S_IMODE((ws.root / "x.sh").stat().st_mode) == 0o750
    assert (ws.root / "x.sh").read_bytes() == b""
    no_temp_files(ws.root)


def test_write_replaces_inode(ws: Workspace) -> None:
    (ws.root / "f").write_bytes(b"old")
    ino = (ws.root / "f").stat().st_ino
    run(ws, {"op": "write", "path": "f", "content_b64": b64(b"new")})
    assert (ws.root / "f").stat().st_ino != ino


def test_create_is_exclusive(ws: Workspace) -> None:
    run(ws, {"op": "create", "path": "c", "content_b64": b64(b"1")})
    g = decide(ws, {"op": "create", "path": "c", "content_b64": b64(b"2")})
    assert isinstance(g, Grant)
    with pytest.raises(FileExistsError):
        perform(g, ws, b"2")
    assert (ws.root / "c").read_bytes() == b"1"
    no_temp_files(ws.root)


def test_create_loses_race_cleanly(ws: Workspace) -> None:
    g = decide(ws, {"op": "create", "path": "c", "content_b64": b64(b"mine")})
    assert isinstance(g, Grant)
    (ws.root / "c").write_bytes(b"theirs")  # appears between check and perform
    with pytest.raises(FileExistsError):
        perform(g, ws, b"mine")
    assert (ws.root / "c").read_bytes() == b"theirs"
    no_temp_files(ws.root)


def test_renameat2_noreplace_is_atomic_guard(tmp_path: Path) -> None:
    """The last line of defence of `create`: the rename itself refuses an existing target."""
    (tmp_path / "a").write_bytes(b"new")
    (tmp_path / "b").write_bytes(b"existing")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            renameat2(fd, "a", fd, "b", RENAME_NOREPLACE)
        assert (tmp_path / "b").read_bytes() == b"existing"
        renameat2(fd, "a", fd, "c", RENAME_NOREPLACE)
        assert (tmp_path / "c").read_bytes() == b"new"
    finally:
        os.close(fd)


def test_append(ws: Workspace) -> None:
    (ws.root / "log").write_bytes(b"a\n")
    os.chmod(ws.root / "log", 0o640)
    ino = (ws.root / "log").stat().st_ino
    r = run(ws, {"op": "append", "path": "log", "content_b64": b64(b"b\n")})
    assert (ws.root / "log").read_bytes() == b"a\nb\n" and r["size"] == 4
    assert (ws.root / "log").stat().st_ino != ino  # never modified in place
    assert stat.S_IMODE((ws.root / "log").stat().st_mode) == 0o640
    run(ws, {"op": "append", "path": "new", "content_b64": b64(b"x")})
    assert (ws.root / "new").read_bytes() == b"x"
    no_temp_files(ws.root)


def test_append_refuses_changed_file(ws: Workspace) -> None:
    (ws.root / "log").write_bytes(b"a")
    g = decide(ws, {"op": "append", "path": "log", "content_b64": b64(b"b")})
    assert isinstance(g, Grant)
    (ws.root / "log").write_bytes(b"grown meanwhile")
    with pytest.raises(OSError) as ei:
        perform(g, ws, b"b")
    assert ei.value.errno == errno.EAGAIN
    assert (ws.root / "log").read_bytes() == b"grown meanwhile"


def test_write_onto_directory_fails(ws: Workspace) -> None:
    (ws.root / "d").mkdir()
    g = decide(ws, {"op": "write", "path": "d", "content_b64": ""})
    assert isinstance(g, Grant)
    with pytest.raises(IsADirectoryError):
        perform(g, ws, b"")
    assert (ws.root / "d").is_dir()
    no_temp_files(ws.root)


def test_write_missing_parent_fails(ws: Workspace) -> None:
    g = decide(ws, {"op": "write", "path": "no/such/f", "content_b64": ""})
    assert isinstance(g, Grant)
    with pytest.raises(FileNotFoundError):
        perform(g, ws, b"")


def test_delete(ws: Workspace) -> None:
    (ws.root / "f").write_text("x")
    (ws.root / "d").mkdir()
    (ws.root / "full").mkdir()
    (ws.root / "full" / "x").write_text("x")
    (ws.root / "lnk").symlink_to("/etc/passwd")
    assert run(ws, {"op": "delete", "path": "f"}) == {"op": "delete", "path": "f"}
    run(ws, {"op": "delete", "path": "d"})
    run(ws, {"op": "delete", "path": "lnk"})
    assert not (ws.root / "f").exists() and not (ws.root / "d").exists()
    assert not os.path.lexists(ws.root / "lnk") and Path("/etc/passwd").exists()
    g = decide(ws, {"op": "delete", "path": "full"})
    assert isinstance(g, Grant)
    with pytest.raises(OSError) as ei:
        perform(g, ws, b"")
    assert ei.value.errno == errno.ENOTEMPTY
    g = decide(ws, {"op": "delete", "path": "gone"})
    assert isinstance(g, Grant)
    with pytest.raises(FileNotFoundError):
        perform(g, ws, b"")


def test_mkdir(ws: Workspace) -> None:
    run(ws, {"op": "mkdir", "path": "d"})
    assert (ws.root / "d").is_dir()
    assert stat.S_IMODE((ws.root / "d").stat().st_mode) == 0o755
    g = decide(ws, {"op": "mkdir", "path": "d"})
    assert isinstance(g, Grant)
    with pytest.raises(FileExistsError):
        perform(g, ws, b"")
    g = decide(ws, {"op": "mkdir", "path": "x/y"})
    assert isinstance(g, Grant)
    with pytest.raises(FileNotFoundError):
        perform(g, ws, b"")
    run(ws, {"op": "mkdir", "path": "x/y/z", "parents": True, "mode": 0o700})
    assert stat.S_IMODE((ws.root / "x" / "y" / "z").stat().st_mode) == 0o700
    assert stat.S_IMODE((ws.root / "x" / "y").stat().st_mode) == 0o755
    run(ws, {"op": "mkdir", "path": "x/y/z", "parents": True})  # exists: fine, like mkdir -p
    (ws.root / "file").write_text("x")
    g = decide(ws, {"op": "mkdir", "path": "file/sub", "parents": True})
    assert isinstance(g, Decision) and g.rule == "path.not_dir"


def test_rename(ws: Workspace) -> None:
    (ws.root / "a").write_text("A")
    (ws.root / "d").mkdir()
    r = run(ws, {"op": "rename", "path": "a", "dest": "d/b"})
    assert r == {"op": "rename", "path": "a", "dest": "d/b"}
    assert (ws.root / "d" / "b").read_text() == "A" and not (ws.root / "a").exists()
    (ws.root / "c").write_text("C")
    run(ws, {"op": "rename", "path": "c", "dest": "d/b"})  # replaces
    assert (ws.root / "d" / "b").read_text() == "C"
    run(ws, {"op": "rename", "path": "d", "dest": "e"})
    assert (ws.root / "e" / "b").read_text() == "C"
    g = decide(ws, {"op": "rename", "path": "e", "dest": "e/inner"})
    assert isinstance(g, Grant)
    with pytest.raises(OSError) as ei:
        perform(g, ws, b"")
    assert ei.value.errno == errno.EINVAL
    (ws.root / "full").mkdir()
    (ws.root / "full" / "x").write_text("x")
    g = decide(ws, {"op": "rename", "path": "e", "dest": "full"})
    assert isinstance(g, Grant)
    with pytest.raises(OSError) as ei:
        perform(g, ws, b"")
    assert ei.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert denied(ws, {"op": "rename", "path": "e", "dest": "runs/e"}).rule == "path.hidden"


def test_chmod(ws: Workspace) -> None:
    (ws.root / "f").write_text("x")
    (ws.root / "d").mkdir()
    assert run(ws, {"op": "chmod", "path": "f", "mode": 0o600})["mode"] == 0o600
    assert stat.S_IMODE((ws.root / "f").stat().st_mode) == 0o600
    run(ws, {"op": "chmod", "path": "d", "mode": 0o700})
    assert stat.S_IMODE((ws.root / "d").stat().st_mode) == 0o700
    (ws.root / "lnk").symlink_to("f")
    assert denied(ws, {"op": "chmod", "path": "lnk", "mode": 0o777}).rule == "path.symlink"
    assert stat.S_IMODE((ws.root / "f").stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership needs root")
def test_new_files_take_parent_owner(ws: Workspace) -> None:
    (ws.root / "d").mkdir()
    os.chown(ws.root / "d", 1234, 2345)
    run(ws, {"op": "write", "path": "d/f", "content_b64": b64(b"x")})
    run(ws, {"op": "mkdir", "path": "d/sub/deeper", "parents": True})
    for p in (ws.root / "d" / "f", ws.root / "d" / "sub", ws.root / "d" / "sub" / "deeper"):
        st = p.stat()
        assert (st.st_uid, st.st_gid) in ((1234, 2345),), p
    os.chown(ws.root / "d" / "f", 4321, 4321)
    run(ws, {"op": "write", "path": "d/f", "content_b64": b64(b"y")})
    assert (ws.root / "d" / "f").stat().st_uid == 4321  # overwrite keeps the owner


def test_perform_needs_a_grant(ws: Workspace) -> None:
    prep = prepare({"op": "delete", "path": "x"}, ws, POLICY)
    assert not isinstance(prep, Decision)
    with pytest.raises(TypeError):
        Grant(object(), check_write(prep[0], POLICY, Usage(), 0), prep[0])
    bad = check_write(prep[0], Policy(quotas=POLICY.quotas.__class__(files_written=0)),
                      Usage(), 0)
    with pytest.raises(ValueError, match="cannot grant"):
        grant(bad, prep[0])


def test_atomic_never_half_written(ws: Workspace) -> None:
    """Across many overwrites, a reader only ever sees a whole old or a whole new file."""
    import threading

    big_a = b"A" * 300_000
    big_b = b"B" * 300_000
    (ws.root / "f").write_bytes(big_a)
    stop = threading.Event()
    seen: set[bytes] = set()

    def reader() -> None:
        while not stop.is_set():
            try:
                data = (ws.root / "f").read_bytes()
            except FileNotFoundError:  # pragma: no cover - never expected
                seen.add(b"missing")
                continue
            seen.add(data[:1] + data[-1:] + str(len(data)).encode())

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(30):
            run(ws, {"op": "write", "path": "f", "content_b64": b64(big_b if i % 2 else big_a)})
    finally:
        stop.set()
        t.join()
    assert seen <= {b"AA300000", b"BB300000"}
    no_temp_files(ws.root)


# ---------------------------------------------------------------------------------------------
# captured changes from an exec'd command's copy


def test_prepare_captured_roundtrip(ws: Workspace, tmp_path: Path) -> None:
    (ws.root / "keep.txt").write_text("k")
    (ws.root / "old.txt").write_text("o")
    (ws.root / "d").mkdir()
    before = scan(ws.root)
    copy = tmp_path / "copy"
    clone_tree(ws.root, copy, exclude=[], uid=os.getuid(), gid=os.getgid())
    (copy / "old.txt").unlink()
    (copy / "keep.txt").write_text("changed")
    (copy / "new").mkdir()
    (copy / "new" / "f.sh").write_text("#!/bin/sh\n")
    os.chmod(copy / "new" / "f.sh", 0o755)
    os.chmod(copy / "d", 0o700)
    (copy / "lnk").symlink_to("/etc/passwd")
    os.mkfifo(copy / "fifo")
    changes = diff(before, scan(copy))
    results: dict[str, str] = {}
    for ch in changes:
        prep = prepare_captured(ch, copy, ws, POLICY)
        if isinstance(prep, Decision):
            results[ch.rel] = prep.rule
            continue
        req, content = prep
        assert req.captured
        d = check_write(req, POLICY, Usage(), 0)
        assert d.allowed, d
        perform(grant(d, req), ws, content)
        results[ch.rel] = "applied"
    assert results == {"old.txt": "applied", "keep.txt": "applied", "new": "applied",
                       "new/f.sh": "applied", "d": "applied", "lnk": "path.symlink",
                       "fifo": "path.special"}
    assert (ws.root / "keep.txt").read_text() == "changed"
    assert not (ws.root / "old.txt").exists()
    assert stat.S_IMODE((ws.root / "new" / "f.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((ws.root / "d").stat().st_mode) == 0o700
    assert not os.path.lexists(ws.root / "lnk") and not os.path.lexists(ws.root / "fifo")


def test_prepare_captured_refuses_unsafe_copies(ws: Workspace, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    outside = tmp_path / "secret"
    outside.write_text("s")
    os.link(outside, copy / "hl")
    (copy / "big").write_bytes(b"x" * 10)
    (copy / "lnk").symlink_to(outside)
    pol = Policy(write=WritePolicy(max_file_bytes=5))
    got = {rel: prepare_captured(Change("write", rel, 0o644), copy, ws, pol)
           for rel in ("hl", "big", "lnk", "a\nb", "gone")}
    rules = {k: v.rule for k, v in got.items() if isinstance(v, Decision)}
    assert rules == {"hl": "path.hardlink", "big": "write.max_file_bytes",
                     "lnk": "path.symlink", "a\nb": "path.bad_bytes",
                     "gone": "path.unreadable"}


# ---- write-ahead: unsynced perform, and what recovery re-applies -------------------------------


def _perform_unsynced(ws: Workspace, path: str, data: bytes,
                      mode: int | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"op": "write", "path": path, "content_b64": b64(data)}
    if mode is not None:
        args["mode"] = mode
    prep = prepare(args, ws, POLICY)
    assert not isinstance(prep, Decision), prep
    req, content = prep
    d = check_write(req, POLICY, Usage(), 0)
    return perform(grant(d, req), ws, content, durable=False)


def test_unsynced_write_replaces_atomically_and_keeps_mode(ws: Workspace) -> None:
    root = Path(f"/proc/self/fd/{ws.fd}").resolve()
    (root / "f.txt").write_bytes(b"old")
    os.chmod(root / "f.txt", 0o640)
    ino = (root / "f.txt").stat().st_ino
    res = _perform_unsynced(ws, "f.txt", b"new content")
    assert res["size"] == 11 and (root / "f.txt").read_bytes() == b"new content"
    st = (root / "f.txt").stat()
    assert st.st_ino != ino and stat.S_IMODE(st.st_mode) == 0o640 and st.st_nlink == 1
    _perform_unsynced(ws, "g.txt", b"fresh", mode=0o600)  # a new file: a plain rename
    assert stat.S_IMODE((root / "g.txt").stat().st_mode) == 0o600
    no_temp_files(root)


def test_only_op_write_may_be_unsynced(ws: Workspace) -> None:
    prep = prepare({"op": "append", "path": "a.txt", "content_b64": b64(b"x")}, ws, POLICY)
    assert not isinstance(prep, Decision)
    req, content = prep
    with pytest.raises(ValueError, match="only op 'write'"):
        perform(grant(check_write(req, POLICY, Usage(), 0), req), ws, content, durable=False)


def test_unsynced_write_refuses_a_swapped_in_directory(ws: Workspace,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the check and the exchange a directory takes the file's place: the exchange is
    undone and the write fails, leaving the directory where it was."""
    import syscalls.write as w

    root = Path(f"/proc/self/fd/{ws.fd}").resolve()
    (root / "f.txt").write_bytes(b"old")
    real = w.renameat2
    swapped: list[bool] = []

    def swap_first(olddir: int, old: str, newdir: int, new: str, flags: int = 0) -> None:
        if flags == w.RENAME_EXCHANGE and not swapped:
            swapped.append(True)
            (root / "f.txt").unlink()
            (root / "f.txt").mkdir()
        real(olddir, old, newdir, new, flags)

    monkeypatch.setattr(w, "renameat2", swap_first)
    with pytest.raises(OSError) as e:
        _perform_unsynced(ws, "f.txt", b"new")
    assert e.value.errno == errno.EAGAIN
    assert (root / "f.txt").is_dir()
    no_temp_files(root)


def test_apply_logged_present_applied_and_mode(ws: Workspace) -> None:
    from syscalls.write import apply_logged, changed_after

    root = Path(f"/proc/self/fd/{ws.fd}").resolve()
    assert apply_logged(ws, "a.txt", b"A", None) == "applied"
    assert (root / "a.txt").read_bytes() == b"A"
    assert apply_logged(ws, "a.txt", b"A", None) == "present"
    assert apply_logged(ws, "a.txt", b"A", 0o600) == "applied"  # same bytes, other mode
    assert stat.S_IMODE((root / "a.txt").stat().st_mode) == 0o600
    (root / "a.txt").write_bytes(b"")  # a power cut kept the name, not the data
    assert apply_logged(ws, "a.txt", b"A", None) == "applied"
    assert (root / "a.txt").read_bytes() == b"A"
    mtime = (root / "a.txt").stat().st_mtime_ns
    assert changed_after(ws, "a.txt", mtime - 1) and not changed_after(ws, "a.txt", mtime)
    gone_dir = (root).stat().st_mtime_ns
    assert changed_after(ws, "missing.txt", gone_dir - 1)  # absent: its directory decides
    no_temp_files(root)
