"""`kernel verify` re-checks every approval against the recorded policy: audit.md §8 cases 30-39.

Each case starts from a real sealed run (two protected writes: one approved 2-of-3 by alice and
bob, one denied by carol), changes its approval evidence the way an insider holding the kernel key
could (the log re-chained, blobs re-hashed, the seal re-signed), and expects `kernel verify` to
name the approval problem. So these checks hold even when every other integrity check passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kernel.canonical import canonical_json
from kernel.errors import ExitCode
from kernel.recorder import utc_timestamp
from tests.approval_helpers import (
    events,
    new_reviewer,
    policy_text,
    query,
    reforge,
    signed_envelope,
    start_run,
    verify,
)
from tests.kernel_helpers import skip_unless_available

pytestmark = pytest.mark.sandbox

AGENT = """
from syscalls.client import Kernel, SyscallError
k = Kernel.from_env()
for name in (".env", ".env.local"):
    try:
        k.write(name, b"T=1\\n")
        print("RESULT", name, "applied", flush=True)
    except SyscallError as e:
        print("RESULT", name, e.decision, flush=True)
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    skip_unless_available("native")
    tmp = tmp_path_factory.mktemp("tamper")
    home = tmp / "home"
    rhome = tmp / "rhome"  # reviewers' keys: not the operator's own
    ring = tmp / "ring.toml"
    text = ""
    for n in ("alice", "bob", "carol"):
        text += f'[[reviewers]]\nname = "{n}"\npublic_key = "{new_reviewer(rhome, n)}"\n'
    ring.write_text(text)
    new_reviewer(tmp / "mhome", "mallory")
    run = start_run(tmp, AGENT, policy_text(keyring=str(ring), threshold=2,
                                            operator_may_approve=False), home=home)
    keys = {n: rhome / "reviewers" / f"{n}.key" for n in ("alice", "bob", "carol")}
    keys["mallory"] = tmp / "mhome" / "reviewers" / "mallory.key"
    bindings = []
    for who, decision in ((("alice", "bob"), "approve"), (("carol",), "deny")):
        (row,) = run.wait_pending()
        b = json.loads(row["binding"])
        bindings.append(b)
        for name in who:
            f = tmp / f"{name}.json"
            f.write_text(json.dumps(signed_envelope(keys[name], b, decision=decision)))
            cmd = ["approve", row["id"], "--envelope", str(f)] if decision == "approve" else \
                ["deny", row["id"], "--reason", "no", "--envelope", str(f)]
            r = run.kernel(cmd)
            assert r.returncode == 0, r.stderr
    out = run.finish()
    assert "RESULT .env applied" in run.stderr and "RESULT .env.local denied" in run.stderr
    run_dir = Path(out["run_dir"])
    assert verify(run_dir, home).returncode == 0
    db = run.runs.parent / "runs.control" / "control.db"
    assert len(query(db, "select * from signatures")) == 3
    return {"run_dir": run_dir, "home": home, "keys": keys, "bindings": bindings}


def _copy(base: dict[str, Any], tmp_path: Path) -> Path:
    dst = tmp_path / base["run_dir"].name
    shutil.copytree(base["run_dir"], dst)
    return dst


def _idx(evs: list[dict[str, Any]], type_: str, n: int = 0) -> int:
    return [i for i, e in enumerate(evs) if e["type"] == type_][n]


def _set_envelope(evs: list[dict[str, Any]], put: Any, n: int, env: dict[str, Any]) -> None:
    i = _idx(evs, "approval.received", n)
    evs[i]["body"]["envelope_blob"] = put(canonical_json(env))
    evs[i]["body"]["public_key"] = env["public_key"]


def _blob(run_dir: Path, digest: str) -> bytes:
    h = digest.removeprefix("sha256:")
    return (run_dir / "objects" / "sha256" / h[:2] / h[2:]).read_bytes()


def _expect(run_dir: Path, base: dict[str, Any], needle: str) -> None:
    r = verify(run_dir, base["home"])
    assert r.returncode == ExitCode.INTEGRITY, r.stdout
    assert needle in r.stdout, r.stdout


def test_the_untouched_run_and_a_reforged_but_unchanged_copy_verify(
        base: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    reforge(d, base["home"], lambda evs, put: evs)
    r = verify(d, base["home"])
    assert r.returncode == 0, r.stdout  # the forging tool itself changes nothing


def test_30_flipped_approval_signature(base: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(base, tmp_path)

    def m(evs: list[dict[str, Any]], put: Any) -> list[dict[str, Any]]:
        i = _idx(evs, "approval.received")
        env = json.loads(_blob(d, evs[i]["body"]["envelope_blob"]))
        env["sig"] = ("1" if env["sig"][0] == "0" else "0") + env["sig"][1:]
        _set_envelope(evs, put, 0, env)
        return evs

    reforge(d, base["home"], m)
    _expect(d, base, "signature does not verify")


def test_31_key_not_in_the_recorded_policy(base: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    env = signed_envelope(base["keys"]["mallory"], base["bindings"][0])
    reforge(d, base["home"], lambda evs, put: (_set_envelope(evs, put, 0, env), evs)[1])
    _expect(d, base, "wrong key")


def test_32_approval_of_another_request_digest(base: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    b = {**base["bindings"][0], "request_digest": base["bindings"][1]["request_digest"]}
    env = signed_envelope(base["keys"]["alice"], b)
    reforge(d, base["home"], lambda evs, put: (_set_envelope(evs, put, 0, env), evs)[1])
    _expect(d, base, "request_digest does not match")


def test_33_approval_replayed_from_another_run(base: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    b = {**base["bindings"][0], "run_id": "20261122T000000Z-00000000",
         "nonce": "0" * 32}
    env = signed_envelope(base["keys"]["alice"], b)
    reforge(d, base["home"], lambda evs, put: (_set_envelope(evs, put, 0, env), evs)[1])
    _expect(d, base, "copied from another run")


def test_34_nonce_reused_within_the_run(base: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(base, tmp_path)

    def m(evs: list[dict[str, Any]], put: Any) -> list[dict[str, Any]]:
        first = evs[_idx(evs, "approval.requested", 0)]["body"]["binding"]["nonce"]
        evs[_idx(evs, "approval.requested", 1)]["body"]["binding"]["nonce"] = first
        return evs

    reforge(d, base["home"], m)
    _expect(d, base, "nonce reused")


def test_35_approval_expired_at_its_recorded_time(base: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(base, tmp_path)

    def m(evs: list[dict[str, Any]], put: Any) -> list[dict[str, Any]]:
        i = _idx(evs, "approval.received", 1)
        late = base["bindings"][0]["expires_ns"] + 1
        evs[i]["body"]["now_ns"] = late
        evs[i]["ts"] = utc_timestamp(late + 1000)
        return evs

    reforge(d, base["home"], m)
    _expect(d, base, "expired")


def test_36_k_of_n_met_by_the_same_key_twice(base: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    env = signed_envelope(base["keys"]["alice"], base["bindings"][0], reason="again")
    reforge(d, base["home"], lambda evs, put: (_set_envelope(evs, put, 1, env), evs)[1])
    _expect(d, base, "same key decided this request twice")


def test_37_self_approval_where_the_policy_forbids_it(base: dict[str, Any],
                                                      tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    op_uid = next(e for e in events(d) if e["type"] == "approval.setup")["body"]["operator"][
        "uid"]
    env = signed_envelope(base["keys"]["bob"], base["bindings"][0], reviewer_uid=op_uid)
    reforge(d, base["home"], lambda evs, put: (_set_envelope(evs, put, 1, env), evs)[1])
    _expect(d, base, "self-approval")


def test_38_a_denial_counted_as_an_approval(base: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    env = signed_envelope(base["keys"]["bob"], base["bindings"][0], decision="deny")
    reforge(d, base["home"], lambda evs, put: (_set_envelope(evs, put, 1, env), evs)[1])
    _expect(d, base, "disagrees with its envelope")


def test_39_approval_after_the_final_decision(base: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(base, tmp_path)

    env = signed_envelope(base["keys"]["carol"], base["bindings"][0])

    def m(evs: list[dict[str, Any]], put: Any) -> list[dict[str, Any]]:
        ev = json.loads(json.dumps(evs[_idx(evs, "approval.received", 1)]))
        j = next(k for k, e in enumerate(evs) if e["type"] == "syscall.decision"
                 and e["body"].get("approval_id"))
        ev["body"].update({"envelope_blob": put(canonical_json(env)),
                           "public_key": env["public_key"], "reviewer": "carol"})
        evs.insert(j + 1, ev)  # a third approval, after the request was decided
        return evs

    reforge(d, base["home"], m)
    _expect(d, base, "after the request was decided")


def test_39_effect_before_the_final_decision(base: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(base, tmp_path)

    def m(evs: list[dict[str, Any]], put: Any) -> list[dict[str, Any]]:
        i = _idx(evs, "syscall.result")
        ev = evs.pop(i)
        evs.insert(_idx(evs, "approval.requested") + 1, ev)
        return evs

    reforge(d, base["home"], m)
    _expect(d, base, "effect before")
