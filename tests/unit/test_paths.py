"""kernel.paths: the string normalizer (table + property) and facts gathered by fd."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.paths import PathViolation, Workspace, normalize
from kernel.policy import WritePolicy

VIEW = "/workspace"
LIMITS = WritePolicy()


def norm(raw: str, limits: WritePolicy = LIMITS) -> str | tuple[str, str, int]:
    return normalize(raw, view_root=VIEW, limits=limits)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a.txt", "a.txt"),
        ("a/b.txt", "a/b.txt"),
        ("./a//b/./c/", "a/b/c"),
        ("a/../b", "b"),
        ("a/b/../../c", "c"),
        (".", ""),
        ("a/..", ""),
        ("/workspace", ""),
        ("/workspace/", ""),
        ("/workspace/a/b", "a/b"),
        ("//workspace/./a", "a"),
        ("/workspace/a/../b", "b"),
        ("é/ü.txt", "é/ü.txt"),
        ("a b/c\u00a0d", "a b/c\u00a0d"),
    ],
)
def test_normalize_accepts(raw: str, expected: str) -> None:
    assert norm(raw) == expected


@pytest.mark.parametrize(
    ("raw", "rule", "code"),
    [
        ("", "path.empty", errno.EINVAL),
        ("a\x00b", "path.bad_bytes", errno.EINVAL),
        ("a\nb", "path.bad_bytes", errno.EINVAL),
        ("a\tb", "path.bad_bytes", errno.EINVAL),
        ("a\x1b[31m", "path.bad_bytes", errno.EINVAL),
        ("a\x7f", "path.bad_bytes", errno.EINVAL),
        ("a\x85b", "path.bad_bytes", errno.EINVAL),
        ("a\x9f", "path.bad_bytes", errno.EINVAL),
        ("a\udcffb", "path.bad_bytes", errno.EINVAL),
        ("..", "path.outside", errno.EXDEV),
        ("../x", "path.outside", errno.EXDEV),
        ("a/../../x", "path.outside", errno.EXDEV),
        ("./../x", "path.outside", errno.EXDEV),
        ("/etc/passwd", "path.outside", errno.EXDEV),
        ("/", "path.outside", errno.EXDEV),
        ("/workspace2/x", "path.outside", errno.EXDEV),
        ("/workspacex", "path.outside", errno.EXDEV),
        ("/workspace/../etc/x", "path.outside", errno.EXDEV),
        ("/workspace/../workspace/x", "path.outside", errno.EXDEV),
        ("/../workspace/x", "path.outside", errno.EXDEV),
        ("x" * 256, "path.too_long", errno.ENAMETOOLONG),
        ("a/" * 600 + "b", "path.too_long", errno.ENAMETOOLONG),
        ("é" * 128, "path.too_long", errno.ENAMETOOLONG),  # 256 UTF-8 bytes
    ],
)
def test_normalize_refuses(raw: str, rule: str, code: int) -> None:
    got = norm(raw)
    assert isinstance(got, tuple), got
    assert got[0] == rule
    assert got[2] == code
    assert got[1]


def test_normalize_limits_come_from_policy() -> None:
    small = WritePolicy(max_path_bytes=16, max_component_bytes=4)
    assert norm("abcd/efgh", small) == "abcd/efgh"
    assert norm("abcde", small)[0] == "path.too_long"
    assert norm("a/b/c/d/e/f/g/h/i", small)[0] == "path.too_long"  # 17 bytes


def test_view_root_with_trailing_slash() -> None:
    assert normalize("/ws/a", view_root="/ws/", limits=LIMITS) == "a"


_alphabet = st.sampled_from(["a", "b", ".", "..", "/", "\x00", "\n", "é", "\x85", " ", "\\"])


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.text(), st.lists(_alphabet, max_size=40).map("".join),
                 st.binary().map(lambda b: b.decode("utf-8", "surrogateescape"))))
def test_normalize_property(raw: str) -> None:
    got = norm(raw)
    if isinstance(got, tuple):
        rule, reason, code = got
        assert rule.startswith("path.") and reason and code > 0
        return
    assert not got.startswith("/")
    if got:
        parts = got.split("/")
        assert all(p not in ("", ".", "..") for p in parts)
        assert all(len(p.encode()) <= LIMITS.max_component_bytes for p in parts)
    assert len(got.encode()) <= LIMITS.max_path_bytes
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in got)
    # Lexical resolution of the result under a root stays under it.
    joined = os.path.join("/root-dir", got)
    assert os.path.abspath(joined) == joined.rstrip("/") or got == ""
    # Idempotent.
    assert norm(got) == got if got else norm(".") == ""


# ---------------------------------------------------------------------------------------------
# facts by fd


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    root = tmp_path / "ws"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("s")
    w = Workspace.open(root, view_root=VIEW, hidden=["runs"])
    try:
        yield w
    finally:
        w.close()


def test_facts_kinds(ws: Workspace, tmp_path: Path) -> None:
    r = ws.root
    (r / "d").mkdir()
    (r / "d" / "f.txt").write_bytes(b"12345")
    (r / "lnk").symlink_to("d/f.txt")
    os.mkfifo(r / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(r / "sock"))
    try:
        assert ws.facts("") .kind == "dir"
        f = ws.facts("d/f.txt")
        assert (f.kind, f.exists, f.size, f.violation) == ("file", True, 5, None)
        d = ws.facts("d")
        assert (d.kind, d.exists, d.violation) == ("dir", True, None)
        s = ws.facts("lnk")
        assert (s.kind, s.exists, s.violation) == ("symlink", True, None)
        n = ws.facts("d/new.txt")
        assert (n.kind, n.exists, n.violation) == ("none", False, None)
        assert ws.facts("missing/deeper/x").violation is None
        for special in ("fifo", "sock"):
            v = ws.facts(special).violation
            assert v is not None and v[0] == "path.special" and v[2] == errno.EPERM
    finally:
        sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device needs root")
def test_facts_device(ws: Workspace) -> None:
    os.mknod(ws.root / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    v = ws.facts("null").violation
    assert v is not None and v[0] == "path.special"


def test_facts_hardlink(ws: Workspace, tmp_path: Path) -> None:
    os.link(tmp_path / "outside" / "secret", ws.root / "hl")
    v = ws.facts("hl").violation
    assert v is not None and v[:1] == ("path.hardlink",) and v[2] == errno.EPERM


def test_facts_symlink_components(ws: Workspace, tmp_path: Path) -> None:
    (ws.root / "real").mkdir()
    (ws.root / "in").symlink_to("real")
    (ws.root / "out").symlink_to(tmp_path / "outside")
    for rel in ("in/x", "out/secret", "out/new"):
        v = ws.facts(rel).violation
        assert v is not None and v[0] == "path.symlink" and v[2] == errno.ELOOP, rel


def test_facts_not_dir(ws: Workspace) -> None:
    (ws.root / "f").write_text("x")
    v = ws.facts("f/x").violation
    assert v is not None and v[0] == "path.not_dir" and v[2] == errno.ENOTDIR


def test_facts_hidden(ws: Workspace) -> None:
    for rel in ("runs", "runs/r1/log", ):
        v = ws.facts(rel).violation
        assert v is not None and v[0] == "path.hidden" and v[2] == errno.EACCES
    assert ws.facts("runsx").violation is None


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_facts_mount_point(ws: Workspace) -> None:
    mnt = ws.root / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "f").write_text("x")
        v = ws.facts("mnt").violation
        assert v is not None and v[0] == "path.xdev"
        v = ws.facts("mnt/f").violation
        assert v is not None and v[0] == "path.xdev" and v[2] == errno.EXDEV
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_open_refuses_symlink_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    with pytest.raises(OSError):
        Workspace.open(tmp_path / "link", view_root=VIEW)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        Workspace.open(tmp_path / "file", view_root=VIEW)


def test_open_refuses_unnormalized_hidden(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hidden"):
        Workspace.open(tmp_path, view_root=VIEW, hidden=["../x"])


# ---------------------------------------------------------------------------------------------
# read_file


def test_read_file_regular(ws: Workspace) -> None:
    (ws.root / "f").write_bytes(b"hello")
    assert ws.read_file("f", 5) == b"hello"
    with pytest.raises(OSError) as ei:
        ws.read_file("f", 4)
    assert ei.value.errno == errno.EFBIG


def test_read_file_fifo_does_not_block(ws: Workspace) -> None:
    os.mkfifo(ws.root / "fifo")
    t0 = time.monotonic()
    with pytest.raises(PathViolation) as ei:
        ws.read_file("fifo", 100)
    assert time.monotonic() - t0 < 1.0
    assert ei.value.rule == "path.special" and ei.value.errno == errno.EPERM


def test_read_file_refuses(ws: Workspace, tmp_path: Path) -> None:
    (ws.root / "d").mkdir()
    (ws.root / "lnk").symlink_to(tmp_path / "outside" / "secret")
    os.link(tmp_path / "outside" / "secret", ws.root / "hl")
    (ws.root / "dl").symlink_to(tmp_path / "outside")
    cases = {"lnk": errno.ELOOP, "hl": errno.EPERM, "d": errno.EISDIR, "dl/secret": errno.ELOOP,
             "nope": errno.ENOENT, "runs/x": errno.EACCES}
    for rel, code in cases.items():
        with pytest.raises(OSError) as ei:
            ws.read_file(rel, 100)
        assert ei.value.errno == code, rel
