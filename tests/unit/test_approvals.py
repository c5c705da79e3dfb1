"""Pure approval logic: pending decisions, envelope checks, tallies, keyrings, policy fields."""

from __future__ import annotations

import dataclasses
import errno

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kernel import decide
from kernel.approvals import (
    APPROVAL_FORMAT,
    BINDING_FIELDS,
    Operator,
    Tally,
    check_envelope,
    resolve,
    signed_message,
)
from kernel.decide import ApprovalOutcome, PathFacts, Usage, WriteRequest
from kernel.errors import BadKeyError, PolicyError
from kernel.keys import raw_public
from kernel.policy import Reviewer, load, load_bytes
from kernel.reviewers import parse_keyring

DEFAULT = load("default")


def _key() -> tuple[Ed25519PrivateKey, str]:
    k = Ed25519PrivateKey.generate()
    return k, raw_public(k.public_key()).hex()


ALICE, ALICE_PUB = _key()
BOB, BOB_PUB = _key()
WITH_REVIEWERS = dataclasses.replace(
    DEFAULT, keyring_reviewers=(Reviewer("alice", ALICE_PUB), Reviewer("bob", BOB_PUB)))
ENV_WRITE = WriteRequest(op="write", target=PathFacts(rel=".env", exists=True, kind="file"),
                         new_size=3, payload_bytes=3)


def test_a_protected_write_is_pending_with_its_requirement() -> None:
    d = decide.check_write(ENV_WRITE, WITH_REVIEWERS, Usage(), 0)
    assert d.decision == "pending" and d.rule == "protected:.env*"
    assert d.need is not None and d.need.threshold == 1
    assert dict(d.need.eligible) == {"alice": ALICE_PUB, "bob": BOB_PUB}
    assert d.need.operator_may_approve is True  # the default profile lets the operator approve
    assert not d.allowed
    assert d.as_record()["approval"]["timeout_seconds"] == 900  # type: ignore[index]


def test_the_final_decision_follows_from_the_recorded_outcome() -> None:
    ok = decide.check_write(ENV_WRITE, WITH_REVIEWERS, Usage(), 0, ApprovalOutcome("approved"))
    assert ok.decision == "approved" and ok.allowed and ok.rule == "protected:.env*"
    no = decide.check_write(ENV_WRITE, WITH_REVIEWERS, Usage(), 0,
                            ApprovalOutcome("denied", "denied by bob: no"))
    assert no.decision == "denied" and "bob" in no.reason and no.errno == errno.EACCES
    late = decide.check_write(ENV_WRITE, WITH_REVIEWERS, Usage(), 0, ApprovalOutcome("expired"))
    assert late.decision == "expired" and not late.allowed


def test_quotas_still_apply_after_approval() -> None:
    spent = Usage(files_written=DEFAULT.quotas.files_written)
    d = decide.check_write(ENV_WRITE, WITH_REVIEWERS, spent, 0, ApprovalOutcome("approved"))
    assert d.decision == "denied" and d.rule == "quota.files_written"


def test_deny_rules_still_beat_approval_and_too_few_reviewers_refuse_at_once() -> None:
    d = decide.check_write(ENV_WRITE, DEFAULT, Usage(), 0)
    assert d.decision == "denied" and "trusts 0 eligible" in d.reason
    strict = dataclasses.replace(
        WITH_REVIEWERS, protected=[dataclasses.replace(p, approvals_required=3)
                                   for p in WITH_REVIEWERS.protected])
    d = decide.check_write(ENV_WRITE, strict, Usage(), 0)
    assert d.decision == "denied" and "needs approval by 3" in d.reason
    only_bob = dataclasses.replace(
        WITH_REVIEWERS, protected=[dataclasses.replace(p, approvers=["bob"])
                                   for p in WITH_REVIEWERS.protected])
    d = decide.check_write(ENV_WRITE, only_bob, Usage(), 0)
    assert d.need is not None and d.need.eligible == (("bob", BOB_PUB),)


BINDING = {"approval_id": "r.5", "run_id": "r", "request_seq": 3, "approval_seq": 5,
           "request_digest": "sha256:" + "a" * 64, "action_digest": "sha256:" + "b" * 64,
           "policy_digest": "sha256:" + "c" * 64, "nonce": "d" * 32, "issued_ns": 1000,
           "expires_ns": 2000}
ELIGIBLE = {ALICE_PUB: "alice", BOB_PUB: "bob"}
OPERATOR = Operator(uid=1000, public_keys=())


def _env(key: Ed25519PrivateKey, pub: str, *, binding: dict[str, object] = BINDING,
         decision: str = "approve", uid: int = 2000) -> dict[str, object]:
    payload = {"format": APPROVAL_FORMAT, **{f: binding[f] for f in BINDING_FIELDS},
               "decision": decision, "reason": "", "reviewer": "x", "reviewer_uid": uid,
               "signed_ns": 1}
    return {"payload": payload, "public_key": pub, "keyid": "ed25519:whatever",
            "sig": key.sign(signed_message(payload)).hex()}


def test_a_good_envelope_is_accepted_and_its_keyid_is_only_a_name() -> None:
    c = check_envelope(_env(ALICE, ALICE_PUB), BINDING, ELIGIBLE, OPERATOR, False, 1500)
    assert c.ok and c.reviewer == "alice" and c.decision == "approve"


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda e: e.update(sig="0" * 128), "does not verify"),
    (lambda e: e["payload"].update(decision="deny"), "does not verify"),
    (lambda e: e.pop("keyid"), "malformed envelope"),
    (lambda e: e["payload"].update(format="other/v1"), "format"),
])
def test_altered_envelopes_are_refused(mutate: object, needle: str) -> None:
    env = _env(ALICE, ALICE_PUB)
    mutate(env)  # type: ignore[operator]
    c = check_envelope(env, BINDING, ELIGIBLE, OPERATOR, False, 1500)
    assert not c.ok and needle in c.reason


def test_misbound_late_untrusted_and_self_approvals_are_refused() -> None:
    other, other_pub = _key()
    cases = [
        (_env(other, other_pub), 1500, "wrong key"),
        (_env(ALICE, ALICE_PUB, binding={**BINDING, "run_id": "s"}), 1500, "another run"),
        (_env(ALICE, ALICE_PUB, binding={**BINDING, "nonce": "e" * 32}), 1500, "nonce"),
        (_env(ALICE, ALICE_PUB, binding={**BINDING, "request_seq": 4}), 1500,
         "another request"),
        (_env(ALICE, ALICE_PUB), 2001, "expired"),
        (_env(ALICE, ALICE_PUB, uid=1000), 1500, "self-approval"),
        (_env(ALICE, ALICE_PUB, decision="maybe"), 1500, "neither approve nor deny"),
    ]
    for env, now, needle in cases:
        c = check_envelope(env, BINDING, ELIGIBLE, OPERATOR, False, now)
        assert not c.ok and needle in c.reason, (needle, c.reason)
    own = Operator(uid=1000, public_keys=(ALICE_PUB,))
    c = check_envelope(_env(ALICE, ALICE_PUB), BINDING, ELIGIBLE, own, False, 1500)
    assert not c.ok and "self-approval" in c.reason
    assert check_envelope(_env(ALICE, ALICE_PUB), BINDING, ELIGIBLE, own, True, 1500).ok
    # an operator may always deny
    assert check_envelope(_env(ALICE, ALICE_PUB, decision="deny", uid=1000), BINDING, ELIGIBLE,
                          OPERATOR, False, 1500).ok


def test_tally_needs_k_distinct_keys_and_a_denial_wins() -> None:
    t = Tally(threshold=2)
    a = check_envelope(_env(ALICE, ALICE_PUB), BINDING, ELIGIBLE, OPERATOR, False, 1500)
    t.add(a, 10)
    assert resolve(t) is None and t.duplicate(ALICE_PUB)
    b = check_envelope(_env(BOB, BOB_PUB), BINDING, ELIGIBLE, OPERATOR, False, 1500)
    t.add(b, 11)
    assert resolve(t) == ("approved", "approved by 2 reviewer(s)", (10, 11))
    t2 = Tally(threshold=2)
    t2.add(a, 10)
    t2.add(check_envelope(_env(BOB, BOB_PUB, decision="deny"), BINDING, ELIGIBLE, OPERATOR,
                          False, 1500), 11)
    got = resolve(t2)
    assert got is not None and got[0] == "denied" and got[2] == (11,)


@pytest.mark.parametrize(("text", "needle"), [
    ("not toml [", "not valid TOML"),
    ('[[reviewers]]\nname = "a"\n', "exactly name and public_key"),
    ('[[reviewers]]\nname = "A B"\npublic_key = "' + "0" * 64 + '"\n', "valid reviewer name"),
    ('[[reviewers]]\nname = "a"\npublic_key = "xyz"\n', "64 lowercase hex"),
    ('other = 1\n', "unknown key"),
    ('[[reviewers]]\nname = "a"\npublic_key = "' + ALICE_PUB + '"\n'
     '[[reviewers]]\nname = "a"\npublic_key = "' + BOB_PUB + '"\n', "duplicate"),
])
def test_malformed_keyrings_are_refused_by_file_and_entry(text: str, needle: str) -> None:
    with pytest.raises(BadKeyError) as ei:
        parse_keyring(text.encode(), "ring.toml")
    assert needle in ei.value.message and "ring.toml" in ei.value.message


def test_policy_reviewer_entries_are_validated() -> None:
    base = b'description = "x"\n[approvals]\n'
    with pytest.raises(PolicyError) as ei:
        load_bytes(base + b'[[approvals.reviewers]]\nname = "a"\npublic_key = "zz"\n',
                   source="p.toml")
    assert "approvals.reviewers[0].public_key" in str(ei.value)
    p = load_bytes(base + f'[[approvals.reviewers]]\nname = "a"\npublic_key = "{ALICE_PUB}"\n'
                   .encode(), source="p.toml")
    assert p.trusted_reviewers() == (Reviewer("a", ALICE_PUB),)
