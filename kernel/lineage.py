"""Signed child manifests: who a spawned child is, who spawned it, and what it may spend.

A manifest is canonical JSON signed with the kernel's Ed25519 key (domain-separated from run
headers and seals). Its fields::

    {"v": 1, "child": RUN_ID, "parent": RUN_ID, "root": RUN_ID, "depth": N,
     "budget": {"syscalls", "bytes_written", "files_written", "exec_count"},
     "policy_digest": "sha256:...", "issued_ns": N, "expires_ns": N, "nonce": HEX}

It travels as one token, ``base64url(body) "." hex(signature)``. :func:`check` is what the
kernel runs when a child registers: it refuses (:class:`ManifestRefused`, with a rule id) a token
that does not decode, is not canonical, has unknown or missing fields, is not signed by the
kernel's key, names another child than the one registering, was already presented (replay), or
has expired. Never raises anything else on any input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kernel.canonical import canonical_json
from kernel.decide import Usage
from kernel.keys import KernelKey
from kernel.replication import BUDGET_FIELDS

MANIFEST_DOMAIN = b"agent-kernel/spawn-manifest/v1\n"
MANIFEST_VERSION = 1
FIELDS = ("v", "child", "parent", "root", "depth", "budget", "policy_digest", "issued_ns",
          "expires_ns", "nonce")
MAX_TOKEN = 8192


class ManifestRefused(Exception):
    """A manifest the kernel does not accept; ``rule`` is recorded with the refusal."""

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.rule = rule
        self.reason = reason


@dataclass(frozen=True)
class Manifest:
    child: str
    parent: str
    root: str
    depth: int
    budget: Usage
    policy_digest: str
    issued_ns: int
    expires_ns: int
    nonce: str

    def body(self) -> dict[str, Any]:
        return {"v": MANIFEST_VERSION, "child": self.child, "parent": self.parent,
                "root": self.root, "depth": self.depth,
                "budget": {k: getattr(self.budget, k) for k in BUDGET_FIELDS},
                "policy_digest": self.policy_digest, "issued_ns": self.issued_ns,
                "expires_ns": self.expires_ns, "nonce": self.nonce}


def issue(key: KernelKey, m: Manifest) -> str:
    """The signed token for ``m``."""
    body = canonical_json(m.body())
    sig = key.sign(MANIFEST_DOMAIN + body)
    return base64.urlsafe_b64encode(body).decode("ascii") + "." + sig.hex()


def digest(token: str) -> str:
    """``sha256:<hex>`` of the token's body bytes (what the parent's log records)."""
    body, _ = _split(token)
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _split(token: str) -> tuple[bytes, bytes]:
    if not isinstance(token, str) or len(token) > MAX_TOKEN:
        raise ManifestRefused("spawn.manifest.malformed", "the manifest is not a token string "
                              f"of at most {MAX_TOKEN} characters")
    b64, dot, sig_hex = token.partition(".")
    if not dot:
        raise ManifestRefused("spawn.manifest.malformed", "the manifest token has no signature")
    try:
        body = base64.urlsafe_b64decode(b64.encode("ascii"))
        if base64.urlsafe_b64encode(body).decode("ascii") != b64:
            raise ValueError("not canonical base64")
        sig = bytes.fromhex(sig_hex)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise ManifestRefused("spawn.manifest.malformed",
                              "the manifest token is not base64url body + hex signature"
                              ) from None
    return body, sig


def _parse(body: bytes) -> Manifest:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ManifestRefused("spawn.manifest.malformed", "the manifest body is not JSON"
                              ) from None
    if not isinstance(obj, dict) or set(obj) != set(FIELDS):
        raise ManifestRefused("spawn.manifest.malformed",
                              f"the manifest must hold exactly the fields {', '.join(FIELDS)}")
    try:
        if canonical_json(obj) != body:
            raise ManifestRefused("spawn.manifest.malformed", "the manifest is not canonical")
    except TypeError:
        raise ManifestRefused("spawn.manifest.malformed", "the manifest holds floats") from None
    if obj["v"] != MANIFEST_VERSION:
        raise ManifestRefused("spawn.manifest.malformed", f"manifest version {obj['v']!r}")
    for k in ("child", "parent", "root", "policy_digest", "nonce"):
        if not isinstance(obj[k], str):
            raise ManifestRefused("spawn.manifest.malformed", f"manifest {k} must be a string")
    for k in ("depth", "issued_ns", "expires_ns"):
        if type(obj[k]) is not int:
            raise ManifestRefused("spawn.manifest.malformed", f"manifest {k} must be an integer")
    b = obj["budget"]
    if not isinstance(b, dict) or set(b) != set(BUDGET_FIELDS) or not all(
            type(v) is int and v >= 0 for v in b.values()):
        raise ManifestRefused("spawn.manifest.malformed", "manifest budget: "
                              f"non-negative integers {', '.join(BUDGET_FIELDS)}")
    return Manifest(child=obj["child"], parent=obj["parent"], root=obj["root"],
                    depth=obj["depth"], budget=Usage(**b), policy_digest=obj["policy_digest"],
                    issued_ns=obj["issued_ns"], expires_ns=obj["expires_ns"], nonce=obj["nonce"])


def check(token: object, public: Ed25519PublicKey, *, expect_child: str, now_ns: int,
          presented: Container[str]) -> Manifest:
    """The manifest in ``token`` if the kernel accepts it from the child ``expect_child`` now;
    ``presented`` holds the digests of manifests already accepted (a second presentation is a
    replay). Raises :class:`ManifestRefused` otherwise."""
    if not isinstance(token, str):
        raise ManifestRefused("spawn.manifest.malformed", "the manifest must be a string")
    body, sig = _split(token)
    try:
        public.verify(sig, MANIFEST_DOMAIN + body)
    except InvalidSignature:
        raise ManifestRefused("spawn.manifest.signature", "the manifest is not signed by "
                              "this kernel's key (tampered or forged)") from None
    m = _parse(body)
    if "sha256:" + hashlib.sha256(body).hexdigest() in presented:
        raise ManifestRefused("spawn.manifest.replayed", "this manifest was already presented")
    if m.child != expect_child:
        raise ManifestRefused("spawn.manifest.identity", f"the manifest is for child {m.child}, "
                              f"not for {expect_child}")
    if now_ns >= m.expires_ns:
        raise ManifestRefused("spawn.manifest.expired", "the manifest has expired")
    return m
