"""kernel.manifest: scan by fd, canonical bytes, diff order, clone."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from kernel.manifest import Change, Entry, clone_tree, diff, manifest_bytes, scan, tree_digest


def make_tree(root: Path) -> None:
    (root / "a").mkdir()
    (root / "a" / "f.txt").write_bytes(b"hello")
    os.chmod(root / "a" / "f.txt", 0o640)
    (root / "a" / "b").mkdir()
    (root / "a" / "b" / "deep").write_bytes(b"")
    (root / "top").write_bytes(b"x" * 3000)
    (root / "lnk").symlink_to("/etc/passwd")
    (root / "dlnk").symlink_to("a")
    os.mkfifo(root / "fifo")


def test_scan(tmp_path: Path) -> None:
    make_tree(tmp_path)
    m = scan(tmp_path)
    assert set(m) == {"a", "a/f.txt", "a/b", "a/b/deep", "top", "lnk", "dlnk", "fifo"}
    assert m["a/f.txt"] == Entry("file", 0o640, 5,
                                 "sha256:" + hashlib.sha256(b"hello").hexdigest(), None)
    assert m["a"].kind == "dir" and m["a"].size == 0
    assert m["lnk"] == Entry("symlink", m["lnk"].mode, len("/etc/passwd"), None, "/etc/passwd")
    assert m["fifo"].kind == "special"
    assert m["top"].size == 3000


def test_scan_exclude(tmp_path: Path) -> None:
    make_tree(tmp_path)
    m = scan(tmp_path, exclude=["a/b", "top"])
    assert set(m) == {"a", "a/f.txt", "lnk", "dlnk", "fifo"}


def test_scan_never_follows_or_blocks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    root = tmp_path / "root"
    root.mkdir()
    (root / "out").symlink_to(outside)
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    try:
        t0 = time.monotonic()
        m = scan(root)
        assert time.monotonic() - t0 < 2
    finally:
        sock.close()
    assert set(m) == {"out", "fifo", "sock"}
    assert m["sock"].kind == "special"


def test_scan_root_symlink_refused(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "l").symlink_to("r")
    with pytest.raises(OSError):
        scan(tmp_path / "l")


def test_manifest_bytes_canonical(tmp_path: Path) -> None:
    make_tree(tmp_path)
    m = scan(tmp_path)
    data = manifest_bytes(m)
    obj = json.loads(data)
    assert list(obj["entries"]) == sorted(obj["entries"])
    assert obj["entries"]["a/f.txt"]["kind"] == "file"
    rev = dict(reversed(list(m.items())))
    assert manifest_bytes(rev) == data
    assert tree_digest(m) == "sha256:" + hashlib.sha256(data).hexdigest()
    (tmp_path / "a" / "f.txt").write_bytes(b"hellO")
    assert tree_digest(scan(tmp_path)) != tree_digest(m)


def test_manifest_non_utf8_names(tmp_path: Path) -> None:
    name = os.fsdecode(b"bad\xffname")
    (tmp_path / name).write_text("x")
    m = scan(tmp_path)
    assert name in m
    obj = json.loads(manifest_bytes(m))
    assert "\x00hex:" + b"bad\xffname".hex() in obj["entries"]


def test_diff_order() -> None:
    f = Entry("file", 0o644, 1, "sha256:1")
    d = Entry("dir", 0o755, 0)
    before = {"gone": d, "gone/x": f, "gone/x2": f, "keep": f, "modes": f,
              "flip": f, "dirflip": d, "dirflip/in": f}
    after = {"keep": Entry("file", 0o644, 2, "sha256:2"), "modes": Entry("file", 0o600, 1,
                                                                         "sha256:1"),
             "flip": d, "flip/child": f, "new": d, "new/sub": d, "new/sub/f": f,
             "dirflip": f, "ln": Entry("symlink", 0o777, 3, None, "abc"),
             "fifo": Entry("special", 0o644, 0)}
    ch = diff(before, after)
    ops = [(c.op, c.rel) for c in ch]
    pos = {c: i for i, c in enumerate(ops)}
    assert pos[("delete", "gone/x")] < pos[("delete", "gone")]
    assert pos[("delete", "dirflip/in")] < pos[("delete", "dirflip")] < pos[("write", "dirflip")]
    assert pos[("delete", "flip")] < pos[("mkdir", "flip")] < pos[("write", "flip/child")]
    assert pos[("mkdir", "new")] < pos[("mkdir", "new/sub")] < pos[("write", "new/sub/f")]
    assert Change("write", "keep", None) in ch
    assert Change("chmod", "modes", 0o600) in ch
    assert Change("symlink", "ln", None) in ch and Change("special", "fifo", None) in ch
    assert len(ops) == len(set(ops))
    assert diff(after, after) == []


def test_clone_tree(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    (src / "runs").mkdir()
    (src / "runs" / "log").write_text("private")
    dst = tmp_path / "dst"
    uid, gid = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    clone_tree(src, dst, exclude=["runs"], uid=uid, gid=gid)
    a, b = scan(src, exclude=["runs", "fifo"]), scan(dst)
    assert a == b
    assert not (dst / "runs").exists() and not os.path.lexists(dst / "fifo")
    assert os.readlink(dst / "dlnk") == "a"
    if os.geteuid() == 0:
        for p in [dst, *dst.rglob("*")]:
            st = p.lstat()
            assert (st.st_uid, st.st_gid) == (uid, gid), p
    assert stat.S_IMODE((dst / "a" / "f.txt").stat().st_mode) == 0o640
    with pytest.raises(OSError):
        clone_tree(src, dst, exclude=[], uid=uid, gid=gid)  # not empty


def test_scan_survives_concurrent_churn(tmp_path: Path) -> None:
    """Entries swapped while scanning (file <-> fifo <-> symlink) never hang or escape."""
    root = tmp_path / "r"
    root.mkdir()
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            p = root / "x"
            try:
                if os.path.lexists(p):
                    os.unlink(p) if not p.is_dir() or p.is_symlink() else os.rmdir(p)
                kind = i % 3
                if kind == 0:
                    p.write_text("x")
                elif kind == 1:
                    os.mkfifo(p)
                else:
                    p.symlink_to("/etc")
            except OSError:
                pass
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            m = scan(root)
            assert set(m) <= {"x"}
    finally:
        stop.set()
        t.join()


def test_scan_of_1000_files(tmp_path: Path) -> None:
    """Every file and directory is listed once (speed is a benchmark's business, not a test's)."""
    for d in range(10):
        (tmp_path / f"d{d}").mkdir()
        for i in range(100):
            (tmp_path / f"d{d}" / f"f{i}.txt").write_bytes(os.urandom(512))
    m = scan(tmp_path)
    assert len(m) == 1010
    assert sum(1 for e in m.values() if e.kind == "file") == 1000


def test_remove_tree_with_read_only_directories_never_chmods_through_a_symlink(
        tmp_path: Path) -> None:
    """A command's copy may hold read-only or unreadable directories: all of it goes (as an
    ordinary user too, where modes matter); a symlinked directory's target keeps its mode."""
    from kernel.manifest import remove_tree

    outside = tmp_path / "outside"
    outside.mkdir(mode=0o555)
    top = tmp_path / "copy"
    (top / "ro" / "deep").mkdir(parents=True)
    (top / "ro" / "deep" / "f.txt").write_text("x")
    (top / "ro" / "g.txt").write_text("y")
    (top / "closed").mkdir()
    (top / "closed" / "h.txt").write_text("z")
    (top / "link").symlink_to(outside)
    os.chmod(top / "ro" / "deep", 0o500)
    os.chmod(top / "ro", 0o500)
    os.chmod(top / "closed", 0o000)
    remove_tree(top)
    assert not top.exists() and not top.is_symlink()
    assert stat.S_IMODE(outside.stat().st_mode) == 0o555
    os.chmod(outside, 0o755)
