"""Reviewer decisions: what is signed, how a signature is checked, how decisions combine.

Pure functions only (no I/O, no clock): the live kernel (``kernel/approval_gate.py``), the
reviewer commands (``kernel/approval_cli.py``) and ``kernel verify`` (``kernel/approval_audit.py``)
all call the same :func:`check_envelope` and :func:`resolve`, so a signature the kernel accepted
live is exactly one the verifier accepts later, and the other way round.

A decision is an *envelope* (canonical JSON)::

    {"payload": {...}, "public_key": "<64 hex>", "keyid": "ed25519:...", "sig": "<128 hex>"}

``sig`` is Ed25519 over ``b"agent-kernel/approval/v1\\n" + canonical_json(payload)``. The domain
prefix keeps an approval signature from ever being taken for a run or seal signature (and the
other way round). The payload binds the decision to one request of one run under one policy:

=================  ==========================================================================
``format``         ``"agent-kernel/approval/v1"``
``approval_id``    ``<run_id>.<approval_seq>``: the id reviewers type
``run_id``         the run
``request_seq``    seq of the request's ``syscall.request`` record (for a change captured from
                   an ``exec``: the exec's)
``approval_seq``   seq of the ``approval.requested`` record (unique per pending action)
``request_digest`` digest of the recorded request (or of the captured change)
``action_digest``  digest of the action object the reviewer was shown (path, op, content digest;
                   or argv, cwd, program)
``policy_digest``  digest of the exact policy bytes of the run
``nonce``          128 random bits issued by the kernel with the request, single use
``issued_ns``      when the kernel issued the request (ns since the epoch, kernel clock)
``expires_ns``     after this (kernel clock, as recorded) the request is expired
``decision``       ``approve`` or ``deny``
``reason``         the reviewer's free text
``reviewer``       the reviewer's name (informational; the key is what counts)
``reviewer_uid``   uid of the account that signed (used for the operator rule)
``signed_ns``      the reviewer's clock (informational)
=================  ==========================================================================

The key counts only when its full public key bytes are one of the reviewers the *run's recorded
policy* makes eligible for that rule; key ids are names for humans, never trusted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kernel.canonical import canonical_json

APPROVAL_FORMAT = "agent-kernel/approval/v1"
APPROVAL_SIG_DOMAIN = b"agent-kernel/approval/v1\n"
APPROVE, DENY = "approve", "deny"
BINDING_FIELDS = ("run_id", "approval_id", "request_seq", "approval_seq", "request_digest",
                  "action_digest", "policy_digest", "nonce", "issued_ns", "expires_ns")
PAYLOAD_FIELDS = frozenset({"format", *BINDING_FIELDS, "decision", "reason", "reviewer",
                            "reviewer_uid", "signed_ns"})
ENVELOPE_FIELDS = frozenset({"payload", "public_key", "keyid", "sig"})
MAX_REASON = 4096
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")


def signed_message(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes a reviewer signs."""
    return APPROVAL_SIG_DOMAIN + canonical_json(dict(payload))


@dataclass(frozen=True)
class Operator:
    """Who started the run: the uid of ``kernel exec`` and that user's own reviewer keys."""

    uid: int
    public_keys: tuple[str, ...] = ()

    def as_record(self) -> dict[str, Any]:
        return {"uid": self.uid, "public_keys": list(self.public_keys)}


@dataclass(frozen=True)
class Checked:
    """One envelope after :func:`check_envelope`: accepted (``ok``) or why not."""

    ok: bool
    reason: str
    public_key: str = ""
    reviewer: str = ""
    decision: str = ""
    note: str = ""
    """The reviewer's reason text."""


def _int(v: Any) -> bool:
    return type(v) is int


def check_envelope(env: Any, binding: Mapping[str, Any], eligible: Mapping[str, str],
                   operator: Operator, operator_may_approve: bool, now_ns: int) -> Checked:
    """Is ``env`` a valid decision for the request described by ``binding``, at ``now_ns``?

    ``eligible`` maps raw public key hex -> reviewer name (from the run's recorded policy).
    Checks, in order: shape; signature; key trusted and eligible; every binding field equal
    (run, request, digests, policy, nonce, expiry); decision; expiry at ``now_ns``; the operator
    rule. Reuse across requests (another nonce/seq) fails the binding; a second decision by the
    same key for the same request is refused by :func:`resolve`.
    """
    if type(env) is not dict or env.keys() != ENVELOPE_FIELDS:
        return Checked(False, f"malformed envelope: want exactly the fields "
                       f"{', '.join(sorted(ENVELOPE_FIELDS))}")
    payload = env["payload"]
    if type(payload) is not dict or payload.keys() != PAYLOAD_FIELDS:
        return Checked(False, "malformed payload: want exactly the fields "
                       f"{', '.join(sorted(PAYLOAD_FIELDS))}")
    if payload["format"] != APPROVAL_FORMAT:
        return Checked(False, f"payload format {payload['format']!r} is not {APPROVAL_FORMAT}")
    pk, sig = env["public_key"], env["sig"]
    if not isinstance(pk, str) or not _HEX64.fullmatch(pk):
        return Checked(False, "public_key must be 64 lowercase hex digits")
    if not isinstance(sig, str) or not _HEX128.fullmatch(sig):
        return Checked(False, "sig must be 128 lowercase hex digits")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(pk)).verify(
            bytes.fromhex(sig), signed_message(payload))
    except (InvalidSignature, ValueError, TypeError):
        return Checked(False, "signature does not verify (forged or altered)", pk)
    name = eligible.get(pk)
    if name is None:
        return Checked(False, f"signed by key {pk[:16]}..., which this run's policy does not "
                       "trust to decide this request (wrong key)", pk)
    for f in BINDING_FIELDS:
        if payload[f] != binding[f]:
            what = {"run_id": "it was signed for another run (copied from another run)",
                    "nonce": "its nonce is not this request's (reused from another request)",
                    "policy_digest": "it was signed under another policy",
                    "expires_ns": "it was signed with another expiry"}.get(
                f, "it was signed over another request")
            return Checked(False, f"{f} does not match: {what}", pk, name)
    decision = payload["decision"]
    if decision not in (APPROVE, DENY):
        return Checked(False, f"decision {decision!r} is neither approve nor deny", pk, name)
    note = payload["reason"]
    if not isinstance(note, str) or len(note) > MAX_REASON:
        return Checked(False, "reason must be a string of at most 4096 characters", pk, name)
    if not _int(payload["reviewer_uid"]) or not _int(payload["signed_ns"]):
        return Checked(False, "reviewer_uid and signed_ns must be integers", pk, name)
    if not _int(now_ns) or now_ns > binding["expires_ns"]:
        return Checked(False, "the request had expired when this decision reached the kernel",
                       pk, name)
    if (decision == APPROVE and not operator_may_approve
            and (payload["reviewer_uid"] == operator.uid or pk in operator.public_keys)):
        return Checked(False, "self-approval: the operator who started this run may not "
                       "approve it under this policy", pk, name)
    return Checked(True, "accepted", pk, name, decision, note)


@dataclass
class Tally:
    """Accepted decisions for one pending request, in the order the kernel recorded them."""

    threshold: int
    approvers: dict[str, int] = field(default_factory=dict)
    """public key -> seq of its ``approval.received`` record."""
    denied: tuple[str, str, int] | None = None
    """(reviewer, reason, seq) of the first accepted denial."""
    decided_keys: set[str] = field(default_factory=set)

    def duplicate(self, public_key: str) -> bool:
        return public_key in self.decided_keys

    def add(self, c: Checked, seq: int) -> None:
        self.decided_keys.add(c.public_key)
        if c.decision == DENY:
            if self.denied is None:
                self.denied = (c.reviewer, c.note, seq)
        else:
            self.approvers[c.public_key] = seq


def resolve(t: Tally) -> tuple[str, str, tuple[int, ...]] | None:
    """``(outcome, reason, approval seqs)`` once decided, else None. A denial wins."""
    if t.denied is not None:
        who, why, seq = t.denied
        return "denied", f"denied by {who}" + (f": {why}" if why else ""), (seq,)
    if len(t.approvers) >= t.threshold:
        return "approved", f"approved by {len(t.approvers)} reviewer(s)", tuple(
            sorted(t.approvers.values()))
    return None


def eligible_map(eligible: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """``[{"name", "public_key"}]`` (as recorded) -> {public key: name}."""
    return {e["public_key"]: e["name"] for e in eligible}
