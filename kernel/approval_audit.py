"""``kernel verify``'s approval checks: every approval in a run re-checked from the folder alone.

The trust root for reviewers is the run's *recorded* policy (``policy.toml``, whose digest the
header signs) plus the keyring bytes recorded in ``approval.setup``. Nothing else in the folder
is believed. For every pending request (``syscall.decision`` ``pending``):

* an ``approval.requested`` follows, whose binding names this run, its own seq, the request's
  digest and the run's policy digest, with a nonce used by no other request, and whose eligible
  keys, threshold and operator rule are exactly what the recorded policy gives for the rule;
* each ``approval.received`` re-checks with :func:`kernel.approvals.check_envelope` at its
  recorded time (signature, trusted and eligible key, binding, expiry, operator rule), agrees
  with its envelope on key and decision, comes from a key that has not decided this request
  before, and arrives while the request is still open;
* the final ``syscall.decision`` follows from the evidence: ``approved`` lists at least k
  accepted approvals by distinct keys and no accepted denial; ``denied`` rests on an accepted
  denial or a recorded closing (``--approve deny``, the prompt's "n"); ``expired`` on an
  ``approval.expired`` after the expiry;
* no effect (``syscall.result`` of the request) before its final decision, none after a denial.

Returns the first problem as text, naming the seq, or None.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from kernel.approvals import APPROVE, DENY, Operator, Tally, check_envelope, eligible_map
from kernel.decide import APPROVED, DENIED, EXPIRED, PENDING, approval_need
from kernel.errors import KernelError
from kernel.policy import Policy, load_bytes
from kernel.recorder import parse_timestamp_ns

_EVENTS = ("approval.requested", "approval.received", "approval.rejected", "approval.closed",
           "approval.expired", "approval.cancelled", "approval.late")


def _expected_need(policy: Policy, rule: str) -> Any:
    if rule.startswith("protected:"):
        glob = rule[len("protected:"):]
        for pr in policy.protected:
            if pr.glob == glob and pr.action == "approval":
                return approval_need(policy, rule, "", pr.approvals_required, pr.approvers,
                                     pr.operator_may_approve).need
    elif rule.startswith("command:") and rule.endswith(".approval"):
        cid = rule[len("command:"):-len(".approval")]
        for c in policy.commands:
            if c.id == cid and c.approval:
                return approval_need(policy, rule, "", c.approvals_required, c.approvers,
                                     c.operator_may_approve).need
    return None


@dataclasses.dataclass
class _Open:
    seq: int
    binding: dict[str, Any]
    eligible: dict[str, str]
    operator: Operator
    operator_may_approve: bool
    tally: Tally
    closed: str | None = None
    expired: bool = False
    final: bool = False


def check(run_id: str, policy_bytes: bytes, events: list[dict[str, Any]],
          blob: Callable[[str], bytes], sealed: bool) -> str | None:
    """The first approval problem in ``events`` (parsed log lines), or None."""
    try:
        return _check(run_id, policy_bytes, events, blob, sealed)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"approval records malformed: {type(e).__name__}: {e}"


def _check(run_id: str, policy_bytes: bytes, events: list[dict[str, Any]],
           blob: Callable[[str], bytes], sealed: bool) -> str | None:
    if not any(e["type"] in _EVENTS or e["type"] == "approval.setup" or
               (e["type"] == "syscall.decision" and e["body"].get("decision") == PENDING)
               for e in events):
        return None
    try:
        policy = load_bytes(policy_bytes, source="policy.toml")
    except KernelError as e:
        return f"policy.toml cannot be loaded to check approvals: {e.message}"
    setup = [e for e in events if e["type"] == "approval.setup"]
    if len(setup) != 1:
        return f"{len(setup)} approval.setup records (want exactly one)"
    sb = setup[0]["body"]
    if sb.get("keyring_blob"):
        from kernel.reviewers import parse_keyring

        try:
            ring = parse_keyring(blob(sb["keyring_blob"]), "recorded keyring")
        except KernelError as e:
            return f"seq {setup[0]['seq']}: {e.message}"
        policy = dataclasses.replace(policy, keyring_reviewers=ring)
    trusted = [{"name": r.name, "public_key": r.public_key} for r in policy.trusted_reviewers()]
    if sb.get("reviewers") != trusted:
        return (f"seq {setup[0]['seq']}: approval.setup lists reviewers that the recorded "
                "policy and keyring do not")
    setup_op = sb.get("operator")
    digest = "sha256:" + __import__("hashlib").sha256(policy_bytes).hexdigest()

    pending: dict[int, dict[str, Any]] = {}  # pending decision seq -> its body
    opened: dict[str, _Open] = {}
    by_pending: dict[int, str] = {}
    nonces: set[str] = set()
    envelopes: set[str] = set()
    waiting_digests: dict[str, str] = {}  # request_digest -> approval id (not yet final)
    refused_digests: set[str] = set()
    for ev in events:
        t, b, seq = ev["type"], ev["body"], ev["seq"]
        where = f"seq {seq} ({t})"
        if t == "syscall.decision" and b.get("decision") == PENDING:
            pending[seq] = b
        elif t == "approval.requested":
            bind = b["binding"]
            ps = b["pending_seq"]
            if ps not in pending or ps in by_pending:
                return f"{where}: does not follow a pending decision of its own"
            pb = pending[ps]
            if bind["approval_seq"] != seq or bind["approval_id"] != f"{run_id}.{seq}":
                return f"{where}: binding names seq {bind['approval_seq']}, not its own"
            if bind["run_id"] != run_id:
                return f"{where}: binding names run {bind['run_id']!r}"
            if bind["policy_digest"] != digest:
                return f"{where}: binding names another policy digest"
            if bind["request_digest"] != pb["request_digest"] or b["rule"] != pb["rule"]:
                return f"{where}: binding does not match the pending decision seq {ps}"
            if bind["nonce"] in nonces:
                return f"{where}: nonce reused (already issued for another request)"
            nonces.add(bind["nonce"])
            need = _expected_need(policy, b["rule"])
            if need is None:
                return f"{where}: the recorded policy has no approval rule {b['rule']!r}"
            want = need.as_record()
            for k in ("eligible", "threshold", "operator_may_approve", "timeout_seconds"):
                if b[k] != want[k]:
                    return (f"{where}: {k} is not what the recorded policy gives for "
                            f"{b['rule']}")
            if b["operator"] != setup_op:
                return f"{where}: operator differs from approval.setup"
            if bind["expires_ns"] != bind["issued_ns"] + need.timeout_seconds * 1_000_000_000:
                return f"{where}: expiry is not issue time + the policy's timeout"
            opened[bind["approval_id"]] = _Open(
                seq, bind, eligible_map(b["eligible"]),
                Operator(b["operator"]["uid"], tuple(b["operator"]["public_keys"])),
                b["operator_may_approve"], Tally(b["threshold"]))
            by_pending[ps] = bind["approval_id"]
            waiting_digests[pb["request_digest"]] = bind["approval_id"]
        elif t == "approval.late":
            if b["approval_id"] not in opened:
                return f"{where}: names approval {b['approval_id']!r}, never requested"
        elif t in ("approval.received", "approval.rejected", "approval.closed",
                   "approval.expired", "approval.cancelled"):
            o: _Open | None = opened.get(b["approval_id"])
            if o is None:
                return f"{where}: names approval {b['approval_id']!r}, never requested"
            if o.final or o.closed or o.expired:
                return f"{where}: arrives after the request was decided (causality)"
            if t == "approval.received":
                ref = b["envelope_blob"]
                if ref in envelopes:
                    return f"{where}: the same envelope is counted twice"
                envelopes.add(ref)
                env = json.loads(blob(ref))
                if b["now_ns"] > parse_timestamp_ns(ev["ts"]):
                    return f"{where}: recorded time lies after the record's own timestamp"
                c = check_envelope(env, o.binding, o.eligible, o.operator,
                                   o.operator_may_approve, b["now_ns"])
                if not c.ok:
                    return f"{where}: approval does not hold: {c.reason}"
                if c.public_key != b["public_key"] or c.decision != b["decision"]:
                    return f"{where}: record disagrees with its envelope (key or decision)"
                if o.tally.duplicate(c.public_key):
                    return f"{where}: the same key decided this request twice"
                o.tally.add(c, seq)
            elif t == "approval.closed":
                if b["outcome"] != DENIED:
                    return f"{where}: a closing can only deny"
                o.closed = DENIED
            elif t == "approval.expired":
                if (b["now_ns"] <= o.binding["expires_ns"]
                        or b["now_ns"] > parse_timestamp_ns(ev["ts"])):
                    return f"{where}: expiry recorded before the request's expiry time"
                o.expired = True
            elif t == "approval.cancelled":
                o.final = True
                waiting_digests.pop(o.binding["request_digest"], None)
        elif t == "syscall.decision" and b.get("approval_id") is not None:
            o = opened.get(b["approval_id"])
            if o is None or by_pending.get(b.get("pending_seq", -1)) != b["approval_id"]:
                return f"{where}: final decision for an approval never requested"
            if o.final:
                return f"{where}: a second final decision"
            o.final = True
            waiting_digests.pop(o.binding["request_digest"], None)
            problem = _final_holds(b, o, events)
            if problem:
                return f"{where}: {problem}"
            if b["decision"] not in (APPROVED,):
                refused_digests.add(o.binding["request_digest"])
        elif t == "syscall.result":
            d = b.get("request_digest")
            if d in waiting_digests:
                return f"{where}: effect before the request's final approval decision"
            if d in refused_digests:
                return f"{where}: effect after the request was refused"
    if sealed:
        for aid, o in opened.items():
            if not o.final:
                return f"approval {aid}: no final decision in a sealed run"
    return None


def _final_holds(b: dict[str, Any], o: _Open, events: list[dict[str, Any]]) -> str | None:
    decision, outcome = b["decision"], b.get("approval_outcome")
    listed = b.get("approvals", [])
    if outcome == APPROVED or decision == APPROVED:
        if o.tally.denied is not None:
            return "approved although a reviewer's denial was accepted"
        keys = set()
        for s in listed:
            ev = events[s] if 0 <= s < len(events) else None
            if (ev is None or ev["type"] != "approval.received"
                    or ev["body"]["approval_id"] != b["approval_id"]
                    or ev["body"]["decision"] != APPROVE):
                return f"lists seq {s}, which is not an accepted approval of this request"
            keys.add(ev["body"]["public_key"])
        if len(keys) < o.tally.threshold:
            return (f"approved with {len(keys)} distinct reviewer key(s); the policy asks "
                    f"{o.tally.threshold}")
        return None
    if outcome == EXPIRED:
        return None if o.expired else "expired without an approval.expired record"
    if decision == DENIED or outcome == DENIED:
        if o.tally.denied is not None or o.closed == DENIED:
            return None
        return "denied by review without an accepted denial or a closing"
    if outcome == DENY:  # pragma: no cover - not a kernel outcome name
        return None
    return f"unknown approval outcome {outcome!r}"
