"""Compiled seccomp programs cached per boot: byte-identical to a fresh compilation, used only
under the same key, never from a file others could write, never after a failure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sandbox import firejail, seccomp_filter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the cache is used only as root")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KERNEL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _fresh_native() -> tuple[bytes, tuple[str, ...]]:
    return seccomp_filter.compile_native()


def _path(home: Path, name: str) -> Path:
    return home / seccomp_filter.PROGRAM_CACHE.format(name=name)


def test_a_cached_program_is_byte_identical_to_a_fresh_one(home: Path) -> None:
    fresh = _fresh_native()
    first = seccomp_filter.compile_cached("native", _fresh_native, ())
    assert seccomp_filter.origin("native") == "compiled"
    assert _path(home, "native").is_file()
    cached = seccomp_filter.compile_cached(
        "native", lambda: pytest.fail("compiled although cached"), ())
    assert seccomp_filter.origin("native").startswith("cached this boot")
    assert first == fresh and cached == fresh
    # the firejail backend's extra filter goes through the same cache
    extra = firejail._compile_extra_filter()
    seccomp_filter.compile_cached("firejail-extra", firejail._compile_extra_filter,
                                  (firejail.__file__,))
    again = seccomp_filter.compile_cached(
        "firejail-extra", lambda: pytest.fail("compiled although cached"), (firejail.__file__,))
    assert again == extra


def test_the_key_covers_what_the_program_depends_on(home: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rules = tmp_path / "rules.py"
    rules.write_text("v1")
    key = seccomp_filter.cache_key("native", (str(rules),))
    assert key is not None and key == seccomp_filter.cache_key("native", (str(rules),))
    assert seccomp_filter.cache_key("firejail-extra", (str(rules),)) != key
    rules.write_text("v2")  # the rules' source
    assert seccomp_filter.cache_key("native", (str(rules),)) != key
    rules.write_text("v1")
    assert seccomp_filter.cache_key("native", (str(rules),)) == key
    monkeypatch.setattr(seccomp_filter.platform, "release", lambda: "0.0.0-other")
    assert seccomp_filter.cache_key("native", (str(rules),)) != key
    monkeypatch.undo()
    # another libseccomp file (or the same path replaced: another inode, size or times)
    lib = tmp_path / "libseccomp.so.2.9.9"
    lib.write_bytes(b"\x7fELF other")
    monkeypatch.setattr(seccomp_filter, "_libseccomp_file", lambda: str(lib))
    other = seccomp_filter.cache_key("native", (str(rules),))
    assert other not in (None, key)
    os.utime(lib, ns=(1, 1))
    assert seccomp_filter.cache_key("native", (str(rules),)) not in (None, key, other)
    # no identifiable library, or a source that cannot be read: no caching at all
    monkeypatch.setattr(seccomp_filter, "_libseccomp_file", lambda: None)
    assert seccomp_filter.cache_key("native", (str(rules),)) is None
    monkeypatch.undo()
    assert seccomp_filter.cache_key("native", (str(tmp_path / "missing.py"),)) is None


def test_a_cache_file_others_could_write_or_that_was_altered_is_ignored(home: Path) -> None:
    bpf, names = _fresh_native()
    key = seccomp_filter.cache_key("native", ())
    assert key is not None
    seccomp_filter.cache_put("native", key, bpf, names)
    path = _path(home, "native")
    assert seccomp_filter.cache_get("native", key) is not None
    assert seccomp_filter.cache_get("native", "0" * 64) is None  # another key
    os.chmod(path, 0o666)
    assert seccomp_filter.cache_get("native", key) is None
    os.chmod(path, 0o600)
    os.chmod(path.parent, 0o755)
    assert seccomp_filter.cache_get("native", key) is None
    os.chmod(path.parent, 0o700)
    assert seccomp_filter.cache_get("native", key) is not None
    # a symbolic link in its place is not followed
    real = path.with_name("real.json")
    path.rename(real)
    path.symlink_to(real)
    assert seccomp_filter.cache_get("native", key) is None
    path.unlink()
    real.rename(path)
    # a program that does not match its digest, or is truncated
    d = json.loads(path.read_text())
    d["bpf"] = d["bpf"][:-2] + ("00" if d["bpf"][-2:] != "00" else "01")
    path.write_text(json.dumps(d))
    assert seccomp_filter.cache_get("native", key) is None
    d["bpf"] = d["bpf"][:-2]
    d["sha256"] = __import__("hashlib").sha256(bytes.fromhex(d["bpf"])).hexdigest()
    path.write_text(json.dumps(d))
    assert seccomp_filter.cache_get("native", key) is None
    path.write_text("not json")
    assert seccomp_filter.cache_get("native", key) is None


def test_a_failed_compilation_is_never_cached(home: Path) -> None:
    def broken() -> tuple[bytes, tuple[str, ...]]:
        raise OSError(22, "injected")

    with pytest.raises(OSError, match="injected"):
        seccomp_filter.compile_cached("native", broken, ())
    with pytest.raises(OSError, match="truncated"):
        seccomp_filter.compile_cached("native", lambda: (b"\0" * 12, ()), ())
    with pytest.raises(OSError, match="empty"):
        seccomp_filter.compile_cached("native", lambda: (b"", ()), ())
    assert not _path(home, "native").exists()


def test_an_ordinary_user_never_uses_the_cache(home: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bpf, names = _fresh_native()
    key = seccomp_filter.cache_key("native", ())
    assert key is not None
    seccomp_filter.cache_put("native", key, bpf, names)
    monkeypatch.setattr(seccomp_filter.os, "geteuid", lambda: 1000)
    assert seccomp_filter.cache_get("native", key) is None
