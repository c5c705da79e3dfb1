"""The kernel key: created once, private, never clobbered; public keys load or fail clearly."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from kernel.errors import BadInputError, NotFoundError
from kernel.keys import (
    KernelKey,
    kernel_home,
    keyid_of,
    load_or_create_kernel_key,
    load_public_key,
)


def test_kernel_home_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KERNEL_HOME", str(tmp_path / "h"))
    assert kernel_home() == tmp_path / "h"
    monkeypatch.delenv("KERNEL_HOME")
    assert kernel_home() == Path.home() / ".agent-kernel"


def test_key_created_private_and_reloaded(tmp_path: Path) -> None:
    key = load_or_create_kernel_key(tmp_path)
    kdir = tmp_path / "keys"
    assert stat.S_IMODE(os.stat(kdir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(kdir / "kernel.key").st_mode) == 0o600
    assert (kdir / "kernel.pub").read_bytes() == key.public_pem()
    assert sorted(os.listdir(kdir)) == ["kernel.key", "kernel.pub"]  # no temporary left over
    again = load_or_create_kernel_key(tmp_path)
    assert again.keyid == key.keyid and again.public_bytes == key.public_bytes
    assert key.keyid.startswith("ed25519:") and len(key.keyid) == len("ed25519:") + 16
    assert len(key.public_bytes) == 32
    sig = key.sign(b"m")
    load_public_key(kdir / "kernel.pub").verify(sig, b"m")


def _create(home: str) -> str:
    return load_or_create_kernel_key(Path(home)).keyid


def test_concurrent_creators_agree_on_one_key(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(6) as pool:
        ids = pool.map(_create, [str(tmp_path)] * 12)
    assert len(set(ids)) == 1
    assert load_or_create_kernel_key(tmp_path).keyid == ids[0]


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create_kernel_key(tmp_path)
    os.chmod(tmp_path / "keys" / "kernel.key", 0o644)
    with pytest.raises(BadInputError, match="readable by others"):
        load_or_create_kernel_key(tmp_path)


def test_load_public_key_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        load_public_key(tmp_path / "nope.pub")
    bad = tmp_path / "bad.pub"
    bad.write_bytes(b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n")
    with pytest.raises(BadInputError, match=r"bad\.pub"):
        load_public_key(bad)
    with pytest.raises(BadInputError, match="directory"):
        load_public_key(tmp_path)


def test_load_public_key_hex_form(tmp_path: Path) -> None:
    key = KernelKey.generate()
    p = tmp_path / "k.hex"
    p.write_text(key.public_bytes.hex() + "\n")
    assert keyid_of(load_public_key(p)) == key.keyid
