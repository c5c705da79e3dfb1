"""Signed child manifests: a tampered, forged, foreign, replayed or expired one is refused."""

from __future__ import annotations

import base64
import json

import pytest

from kernel import lineage
from kernel.decide import Usage
from kernel.keys import KernelKey
from kernel.lineage import Manifest, ManifestRefused

KEY = KernelKey.generate()
M = Manifest(child="20261122T000000Z-aaaaaaaa", parent="20261122T000000Z-bbbbbbbb",
             root="20261122T000000Z-bbbbbbbb", depth=1,
             budget=Usage(syscalls=10, bytes_written=100, files_written=2, exec_count=0),
             policy_digest="sha256:" + "0" * 64, issued_ns=1_000, expires_ns=2_000,
             nonce="00112233")


def check(token: object, *, child: str = M.child, now: int = 1_500,
          presented: frozenset[str] = frozenset()) -> Manifest:
    return lineage.check(token, KEY.public, expect_child=child, now_ns=now, presented=presented)


def retamper(token: str, **changes: object) -> str:
    """The same token with body fields changed, the original signature kept."""
    b64, _, sig = token.partition(".")
    body = json.loads(base64.urlsafe_b64decode(b64))
    body.update(changes)
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode() + "." + sig


def test_a_genuine_manifest_is_accepted() -> None:
    token = lineage.issue(KEY, M)
    assert check(token) == M
    assert lineage.digest(token).startswith("sha256:")


@pytest.mark.parametrize("change", [
    {"depth": 0}, {"budget": {"syscalls": 10**9, "bytes_written": 100, "files_written": 2,
                              "exec_count": 0}},
    {"expires_ns": 10**18}, {"parent": "someone-else"}, {"policy_digest": "sha256:" + "1" * 64},
])
def test_a_tampered_manifest_is_refused(change: dict[str, object]) -> None:
    with pytest.raises(ManifestRefused) as ei:
        check(retamper(lineage.issue(KEY, M), **change))
    assert ei.value.rule == "spawn.manifest.signature"


def test_a_manifest_signed_by_another_key_is_refused() -> None:
    with pytest.raises(ManifestRefused) as ei:
        check(lineage.issue(KernelKey.generate(), M))
    assert ei.value.rule == "spawn.manifest.signature"


def test_another_childs_manifest_is_refused() -> None:
    with pytest.raises(ManifestRefused) as ei:
        check(lineage.issue(KEY, M), child="20261122T000000Z-cccccccc")
    assert ei.value.rule == "spawn.manifest.identity"


def test_a_replayed_manifest_is_refused() -> None:
    token = lineage.issue(KEY, M)
    with pytest.raises(ManifestRefused) as ei:
        check(token, presented=frozenset({lineage.digest(token)}))
    assert ei.value.rule == "spawn.manifest.replayed"


def test_an_expired_manifest_is_refused() -> None:
    with pytest.raises(ManifestRefused) as ei:
        check(lineage.issue(KEY, M), now=2_000)
    assert ei.value.rule == "spawn.manifest.expired"


@pytest.mark.parametrize("token", [
    None, 42, "", ".", "abc", "x" * 10_000, "!!!." + "00" * 64, "e30." + "zz",
    base64.urlsafe_b64encode(b"[1]").decode() + "." + "00" * 64,
])
def test_garbage_is_refused_never_a_crash(token: object) -> None:
    with pytest.raises(ManifestRefused) as ei:
        check(token)
    assert ei.value.rule in ("spawn.manifest.malformed", "spawn.manifest.signature")


def test_a_signed_but_malformed_body_is_refused() -> None:
    """Even a body the kernel's key signed must have exactly the manifest's fields."""
    for body in ({**M.body(), "extra": 1}, {k: v for k, v in M.body().items() if k != "nonce"},
                 {**M.body(), "depth": "1"}, {**M.body(), "budget": {"syscalls": -1}}):
        raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        token = (base64.urlsafe_b64encode(raw).decode() + "."
                 + KEY.sign(lineage.MANIFEST_DOMAIN + raw).hex())
        with pytest.raises(ManifestRefused) as ei:
            check(token)
        assert ei.value.rule == "spawn.manifest.malformed"
