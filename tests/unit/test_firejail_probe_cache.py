"""The firejail probe's smoke-test result, cached per boot: when it is used, and when not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox import firejail

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the cache is used only as root")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KERNEL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _bins(tmp_path: Path) -> dict[str, str]:
    b = tmp_path / "fake-firejail"
    b.write_bytes(b"binary v1")
    return {"firejail": str(b), "env": "/usr/bin/env"}


def test_a_passed_result_is_reused_only_under_the_same_key(home: Path, tmp_path: Path) -> None:
    bins = _bins(tmp_path)
    key = firejail._smoke_key(bins, 64000, 64000, "sha256:x")
    assert firejail._smoke_cache_get(key) is None
    firejail._smoke_cache_put(key)
    assert firejail._smoke_cache_get(key) is not None
    # another agent uid, another extra filter, another binary: not the same probe
    assert firejail._smoke_key(bins, 64001, 64000, "sha256:x") != key
    assert firejail._smoke_key(bins, 64000, 64000, "sha256:y") != key
    Path(bins["firejail"]).write_bytes(b"binary v2, replaced")
    key2 = firejail._smoke_key(bins, 64000, 64000, "sha256:x")
    assert key2 != key and firejail._smoke_cache_get(key2) is None


def test_a_cache_file_others_could_write_is_ignored(home: Path, tmp_path: Path) -> None:
    key = firejail._smoke_key(_bins(tmp_path), 64000, 64000, "")
    firejail._smoke_cache_put(key)
    path = home / firejail.SMOKE_CACHE
    os.chmod(path, 0o666)
    assert firejail._smoke_cache_get(key) is None
    os.chmod(path, 0o600)
    os.chmod(path.parent, 0o755)
    assert firejail._smoke_cache_get(key) is None
    os.chmod(path.parent, 0o700)
    assert firejail._smoke_cache_get(key) is not None


def test_a_failed_smoke_test_is_never_cached(home: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    be = firejail.FirejailBackend()
    monkeypatch.setattr(be, "_smoke", lambda: "firejail smoke test failed: injected")
    av = be.probe()
    if "injected" not in " ".join(av.missing):
        pytest.skip(f"firejail unavailable before the smoke test: {av.missing}")
    assert not (home / firejail.SMOKE_CACHE).exists()
