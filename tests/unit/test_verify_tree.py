"""`kernel verify` over an agent tree: a parent's children are verified with it, and linked.

Every folder here is a real run folder written by ``RunRecorder`` and signed with a real kernel
key; the records follow docs/runs-format.md (§17): the parent's allowed ``spawn`` decision, the
child's ``lineage`` header pointing back at that decision's seq and record hash with a manifest
signed by the kernel key, and the parent's ``spawn.exit`` holding the child's seal digest. Each
tamper case starts from a genuine tree and changes one thing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kernel import lineage
from kernel.decide import Usage
from kernel.keys import KernelKey
from kernel.lineage import Manifest
from kernel.recorder import RunRecorder
from kernel.verify import VerifyReport, verify_run

POLICY = b'name = "tree"\n'
POLICY_DIGEST = "sha256:" + hashlib.sha256(POLICY).hexdigest()
BUDGET = {"syscalls": 10, "bytes_written": 1000, "files_written": 5, "exec_count": 1}
NOW = 1_800_000_000_000_000_000
EXPIRES = NOW + 300 * 1_000_000_000


@pytest.fixture(scope="module")
def key() -> KernelKey:
    return KernelKey.generate()


@dataclass
class Grant:
    child: str
    seq: int
    hash: str
    token: str
    req: int
    request_digest: str


@dataclass
class Agent:
    """One agent's folder being written (the root, or a child)."""

    rec: RunRecorder
    root: str
    depth: int
    reqs: int = 0
    spawned: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.rec.run_id


def start(runs: Path, key: KernelKey, run_id: str, lineage_hdr: dict[str, Any] | None = None,
          ) -> Agent:
    header: dict[str, Any] = {"argv": ["agent"], "policy_name": "tree"}
    if lineage_hdr is not None:
        header["lineage"] = lineage_hdr
    rec = RunRecorder.create(runs, run_id=run_id, header=header, policy_raw=POLICY, key=key)
    rec.append("run.start", {"argv": ["agent"]})
    root = run_id if lineage_hdr is None else lineage_hdr["root"]
    depth = 0 if lineage_hdr is None else lineage_hdr["depth"]
    return Agent(rec, root, depth)


def grant(parent: Agent, child: str, key: KernelKey, *, manifest_key: KernelKey | None = None,
          token: str | None = None) -> Grant:
    """The parent's spawn request and allowed decision (with a manifest for ``child``)."""
    parent.reqs += 1
    req = parent.reqs
    digest = "sha256:" + hashlib.sha256(f"{parent.run_id}-{req}".encode()).hexdigest()
    parent.rec.append("syscall.request", {"req": req, "call": "spawn", "request_digest": digest,
                                          "args": {"argv": ["agent"]}})
    if token is None:
        token = lineage.issue(manifest_key or key, Manifest(
            child=child, parent=parent.run_id, root=parent.root, depth=parent.depth + 1,
            budget=Usage(**BUDGET), policy_digest=POLICY_DIGEST, issued_ns=NOW,
            expires_ns=EXPIRES, nonce=os.urandom(8).hex()))
    seq = parent.rec.append("syscall.decision", {
        "req": req, "request_digest": digest, "decision": "allowed", "rule": "spawn",
        "reason": f"child at depth {parent.depth + 1}", "errno": 0,
        "policy_digest": POLICY_DIGEST, "now_ns": NOW,
        "facts": {"kind": "spawn", "parent_depth": parent.depth, "live": 0, "spawns": 0,
                  "last_spawn_ns": None, "remainder": BUDGET, "totals": {},
                  "request": {"argv": ["agent"], "resolved": "/usr/bin/agent", "budget": None}},
        "child": child, "budget": BUDGET, "expires_ns": EXPIRES,
        "manifest_digest": lineage.digest(token)})
    parent.spawned.append(child)
    return Grant(child, seq, parent.rec.head(), token, req, digest)


def lineage_of(parent: Agent, g: Grant, /, **changes: Any) -> dict[str, Any]:
    lin = {"parent": parent.run_id, "root": parent.root, "depth": parent.depth + 1,
           "manifest": g.token, "manifest_digest": lineage.digest(g.token),
           "parent_decision_seq": g.seq, "parent_decision_hash": g.hash}
    lin.update(changes)
    return lin


def started(parent: Agent, g: Grant) -> None:
    parent.rec.append("syscall.result", {"req": g.req, "request_digest": g.request_digest,
                                         "ok": True, "child": g.child, "pid": 4242})


def end(a: Agent, status: str = "passed") -> str:
    a.rec.append("run.end", {"status": status, "requests": a.reqs, "denials": 0,
                             "spawns": len(a.spawned)})
    return a.rec.seal(status, {"exit_code": 0 if status == "passed" else 1,
                               "requests": a.reqs, "denials": 0})


def exited(parent: Agent, g: Grant, seal: str, status: str = "passed") -> None:
    parent.rec.append("spawn.exit", {"child": g.child, "status": status, "exit_code": 0,
                                     "seal": seal, "requests": 0, "denials": 0,
                                     "request_seq": g.seq - 1})


def child_run(runs: Path, key: KernelKey, parent: Agent, g: Grant, /, *, note: str = "",
              **lin: Any) -> Agent:
    c = start(runs, key, g.child, lineage_of(parent, g, **lin))
    c.rec.append("agent.exit", {"status": "passed", "exit_code": 0, "note": note})
    return c


def tree(runs: Path, key: KernelKey, **lin: Any) -> Path:
    """root -> child (sealed) -> grandchild (sealed); ``lin`` changes the child's lineage."""
    root = start(runs, key, "root-1")
    g = grant(root, "child-1", key)
    child = child_run(runs, key, root, g, **lin)
    started(root, g)
    gg = grant(child, "grandchild-1", key)
    grandchild = child_run(runs, key, child, gg)
    started(child, gg)
    exited(child, gg, end(grandchild))
    exited(root, g, end(child))
    end(root)
    return runs / "root-1"


def writable(folder: Path) -> None:
    for d, _dirs, files in os.walk(folder):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)


def verify(run_dir: Path, key: KernelKey, status: str, *words: str) -> VerifyReport:
    rep = verify_run(run_dir, [key.public])
    assert rep.status == status, (rep.status, rep.problem)
    for w in words:
        assert w in (rep.problem or ""), (w, rep.problem)
    return rep


def test_an_intact_tree_verifies_with_every_child_reported(tmp_path: Path, key: KernelKey
                                                           ) -> None:
    rep = verify(tree(tmp_path, key), key, "intact")
    assert [r.run_id for r in rep.tree()] == ["root-1", "child-1", "grandchild-1"]
    child = rep.children[0]
    assert child.lineage == {"parent": "root-1", "root": "root-1", "depth": 1}
    assert child.children[0].lineage == {"parent": "child-1", "root": "root-1", "depth": 2}
    assert all(r.status == "intact" and r.seal_status == "passed" for r in rep.tree())
    seal = (tmp_path / "child-1" / "SEAL.json").read_bytes()
    assert child.seal == "sha256:" + hashlib.sha256(seal).hexdigest()
    js = rep.to_json()
    assert js["children"][0]["run_id"] == "child-1"
    assert js["children"][0]["children"][0]["lineage"]["depth"] == 2
    json.dumps(js)  # serializable
    # a child verified on its own is intact too (its own subtree)
    assert verify(tmp_path / "child-1", key, "intact").children[0].run_id == "grandchild-1"


def test_a_run_without_children_reports_none(tmp_path: Path, key: KernelKey) -> None:
    a = start(tmp_path, key, "alone")
    end(a)
    rep = verify(tmp_path / "alone", key, "intact")
    assert rep.children == [] and rep.lineage is None and rep.folder_status == "intact"


def test_child_seal_swapped_for_an_older_one(tmp_path: Path, key: KernelKey) -> None:
    """The child folder replaced by another genuine, signed version of the same child."""
    runs, other = tmp_path / "runs", tmp_path / "other"
    root = start(runs, key, "root-1")
    g = grant(root, "child-1", key)
    child = child_run(runs, key, root, g, note="what really happened")
    started(root, g)
    older = child_run(other, key, root, g, note="an older, different story")
    end(older)
    exited(root, g, end(child))
    end(root)
    assert verify(runs / "root-1", key, "intact")
    writable(runs / "child-1")
    shutil.rmtree(runs / "child-1")
    shutil.copytree(other / "child-1", runs / "child-1")
    rep = verify(runs / "root-1", key, "corrupt", "child child-1", "spawn.exit",
                 "swapped or re-sealed")
    assert rep.folder_status == "intact"  # the parent's own folder is untouched


def test_child_folder_missing(tmp_path: Path, key: KernelKey) -> None:
    run = tree(tmp_path, key)
    writable(tmp_path / "child-1")
    shutil.rmtree(tmp_path / "child-1")
    verify(run, key, "corrupt", "child child-1", "folder missing")


def test_grandchild_folder_missing_is_named_through_its_parent(tmp_path: Path, key: KernelKey
                                                               ) -> None:
    run = tree(tmp_path, key)
    writable(tmp_path / "grandchild-1")
    shutil.rmtree(tmp_path / "grandchild-1")
    verify(run, key, "corrupt", "child child-1", "child grandchild-1", "folder missing")


def test_child_lineage_pointing_to_another_parent(tmp_path: Path, key: KernelKey) -> None:
    verify(tree(tmp_path, key, parent="someone-else"), key, "corrupt", "child child-1",
           "names parent 'someone-else'")


def test_child_lineage_decision_hash_mismatch(tmp_path: Path, key: KernelKey) -> None:
    verify(tree(tmp_path, key, parent_decision_hash="0" * 64), key, "corrupt",
           "child child-1", "granting decision is seq")


def test_child_lineage_decision_seq_mismatch(tmp_path: Path, key: KernelKey) -> None:
    verify(tree(tmp_path, key, parent_decision_seq=0), key, "corrupt", "child child-1",
           "granting decision is seq")


def test_forged_manifest_signed_by_another_key(tmp_path: Path, key: KernelKey) -> None:
    """A manifest the kernel never signed, even with the parent's decision agreeing on its
    digest, is refused with lineage.check's rule."""
    runs = tmp_path
    root = start(runs, key, "root-1")
    g = grant(root, "child-1", key, manifest_key=KernelKey.generate())
    child = child_run(runs, key, root, g)
    started(root, g)
    exited(root, g, end(child))
    end(root)
    verify(runs / "root-1", key, "corrupt", "child child-1", "spawn.manifest.signature")


def test_manifest_tampered_after_signing(tmp_path: Path, key: KernelKey) -> None:
    """The lineage's manifest with its budget raised (signature kept): digests differ."""
    def raised(token: str) -> str:
        import base64

        b64, _, sig = token.partition(".")
        body = json.loads(base64.urlsafe_b64decode(b64))
        body["budget"]["syscalls"] = 10**9
        raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode() + "." + sig

    runs = tmp_path
    root = start(runs, key, "root-1")
    g = grant(root, "child-1", key)
    forged = raised(g.token)
    child = child_run(runs, key, root, g, manifest=forged,
                      manifest_digest=lineage.digest(forged))
    started(root, g)
    exited(root, g, end(child))
    end(root)
    verify(runs / "root-1", key, "corrupt", "child child-1", "manifest digest")


def test_manifest_for_another_child(tmp_path: Path, key: KernelKey) -> None:
    """A genuine manifest, for another child, presented in this child's lineage."""
    runs = tmp_path
    root = start(runs, key, "root-1")
    other = lineage.issue(key, Manifest(
        child="child-9", parent="root-1", root="root-1", depth=1, budget=Usage(**BUDGET),
        policy_digest=POLICY_DIGEST, issued_ns=NOW, expires_ns=EXPIRES, nonce="ab"))
    g = grant(root, "child-1", key, token=other)
    child = child_run(runs, key, root, g)
    started(root, g)
    exited(root, g, end(child))
    end(root)
    verify(runs / "root-1", key, "corrupt", "child child-1", "spawn.manifest.identity")


def test_child_that_is_not_a_spawned_run(tmp_path: Path, key: KernelKey) -> None:
    """A genuine root run dropped in where the child should be."""
    runs = tmp_path
    root = start(runs, key, "root-1")
    g = grant(root, "child-1", key)
    impostor = start(runs, key, "child-1")
    started(root, g)
    exited(root, g, end(impostor))
    end(root)
    verify(runs / "root-1", key, "corrupt", "child child-1", "has no lineage")


def test_incomplete_child_makes_the_tree_incomplete(tmp_path: Path, key: KernelKey) -> None:
    """The kernel died: neither the parent nor its child was sealed."""
    runs = tmp_path
    root = start(runs, key, "root-1")
    g = grant(root, "child-1", key)
    child_run(runs, key, root, g)
    started(root, g)
    rep = verify(runs / "root-1", key, "incomplete")
    assert rep.children[0].status == "incomplete"


def test_unsealed_child_under_a_sealed_parent_is_corrupt(tmp_path: Path, key: KernelKey
                                                         ) -> None:
    run = tree(tmp_path, key)
    writable(tmp_path / "child-1")
    os.unlink(tmp_path / "child-1" / "SEAL.json")
    verify(run, key, "corrupt", "child child-1", "not sealed")


def test_intact_child_of_an_unsealed_parent(tmp_path: Path, key: KernelKey) -> None:
    """The kernel died after sealing the child, before the parent's spawn.exit."""
    runs = tmp_path
    root = start(runs, key, "root-1")
    g = grant(root, "child-1", key)
    child = child_run(runs, key, root, g)
    started(root, g)
    end(child)
    rep = verify(runs / "root-1", key, "incomplete", "not sealed")
    assert rep.children[0].status == "intact"


def test_granted_child_never_created_under_an_unsealed_parent(tmp_path: Path, key: KernelKey
                                                              ) -> None:
    """The kernel died between the decision and the child's folder: incomplete, a warning."""
    runs = tmp_path
    root = start(runs, key, "root-1")
    grant(root, "child-1", key)
    rep = verify(runs / "root-1", key, "incomplete")
    assert any("child-1" in w and "no folder" in w for w in rep.warnings)


def test_sealed_parent_without_spawn_exit(tmp_path: Path, key: KernelKey) -> None:
    runs = tmp_path
    root = start(runs, key, "root-1")
    g = grant(root, "child-1", key)
    child = child_run(runs, key, root, g)
    started(root, g)
    end(child)
    end(root)
    verify(runs / "root-1", key, "corrupt", "child child-1", "no spawn.exit")


def test_spawn_exit_for_a_child_never_granted(tmp_path: Path, key: KernelKey) -> None:
    runs = tmp_path
    root = start(runs, key, "root-1")
    root.rec.append("spawn.exit", {"child": "ghost-1", "status": "passed", "exit_code": 0,
                                   "seal": "sha256:" + "0" * 64, "requests": 0, "denials": 0,
                                   "request_seq": 0})
    end(root)
    verify(runs / "root-1", key, "corrupt", "spawn.exit for child 'ghost-1'",
           "no allowed spawn decision")


def test_spawn_exit_status_differs_from_the_child_seal(tmp_path: Path, key: KernelKey) -> None:
    runs = tmp_path
    root = start(runs, key, "root-1")
    g = grant(root, "child-1", key)
    child = child_run(runs, key, root, g)
    started(root, g)
    exited(root, g, end(child, "failed"), status="passed")
    end(root)
    verify(runs / "root-1", key, "corrupt", "child child-1", "sealed 'failed'")


def test_corrupt_child_folder_makes_the_tree_corrupt(tmp_path: Path, key: KernelKey) -> None:
    run = tree(tmp_path, key)
    log = tmp_path / "child-1" / "log" / "events.jsonl"
    writable(tmp_path / "child-1")
    data = bytearray(log.read_bytes())
    data[40] ^= 1
    log.write_bytes(bytes(data))
    rep = verify(run, key, "corrupt", "child child-1", "child-1 is corrupt", "events.jsonl")
    assert rep.children[0].status == "corrupt"


def test_child_id_that_is_a_path_is_refused(tmp_path: Path, key: KernelKey) -> None:
    runs = tmp_path
    root = start(runs, key, "root-1")
    grant(root, "../escape", key)
    end(root)
    verify(runs / "root-1", key, "corrupt", "not a run id")


def test_children_false_checks_the_folder_alone(tmp_path: Path, key: KernelKey) -> None:
    run = tree(tmp_path, key)
    writable(tmp_path / "child-1")
    shutil.rmtree(tmp_path / "child-1")
    rep = verify_run(run, [key.public], children=False)
    assert rep.status == "intact" and rep.children == []


def test_large_parent_log_split_across_workers(tmp_path: Path, key: KernelKey) -> None:
    """Over 4 MiB the log is scanned by forked workers; grants in any chunk are found."""
    runs = tmp_path
    root = start(runs, key, "root-1")
    g1 = grant(root, "child-1", key)
    for i in range(300):
        root.rec.append("padding", {"i": i, "text": "x" * 16_000}, sync=False)
    g2 = grant(root, "child-2", key)
    for g in (g1, g2):
        child = child_run(runs, key, root, g)
        started(root, g)
        exited(root, g, end(child))
    end(root)
    assert (runs / "root-1" / "log" / "events.jsonl").stat().st_size > 4 << 20
    rep = verify(runs / "root-1", key, "intact")
    assert [c.run_id for c in rep.children] == ["child-1", "child-2"]
    writable(runs / "child-2")
    shutil.rmtree(runs / "child-2")
    verify(runs / "root-1", key, "corrupt", "child child-2", "folder missing")


def recovered(parent: Agent, g: Grant) -> None:
    """What `kernel recover` records for a spawn the kernel decided but never started."""
    parent.rec.append("run.recovered", {
        "last_seq_before": g.seq, "unfinished": [
            {"seq": g.seq, "req": g.req, "request_digest": g.request_digest, "rule": "spawn",
             "child": g.child, "missing": "result"}],
        "stray_tmp": [], "scratch_removed": [], "observed_tree_digest": None,
        "detail": "sealed by kernel recover"})


def test_recovered_parent_of_a_child_that_never_started(tmp_path: Path, key: KernelKey
                                                        ) -> None:
    """The kernel died right after the decision; recovery sealed the parent, naming the spawn
    as unfinished: intact, with a warning, and no spawn.exit is needed."""
    root = start(tmp_path, key, "root-1")
    g = grant(root, "child-1", key)
    recovered(root, g)
    end(root, "aborted")
    rep = verify(tmp_path / "root-1", key, "intact")
    assert rep.children == []
    assert any("child-1" in w and "never started" in w for w in rep.warnings)


def test_recovered_parent_does_not_excuse_a_child_that_has_a_folder(tmp_path: Path,
                                                                     key: KernelKey) -> None:
    root = start(tmp_path, key, "root-1")
    g = grant(root, "child-1", key)
    end(child_run(tmp_path, key, root, g))
    recovered(root, g)
    end(root, "aborted")
    verify(tmp_path / "root-1", key, "corrupt", "child child-1", "no spawn.exit")


def waited(parent: Agent, g: Grant, seal: str | None, status: str = "passed") -> None:
    """A ``wait`` for ``g``'s child, answered (request, decision, result)."""
    parent.reqs += 1
    req = parent.reqs
    digest = "sha256:" + hashlib.sha256(f"{parent.run_id}-wait-{req}".encode()).hexdigest()
    parent.rec.append("syscall.request", {"req": req, "call": "wait", "request_digest": digest,
                                          "args": {"child": g.child}})
    parent.rec.append("syscall.decision", {
        "req": req, "request_digest": digest, "decision": "allowed", "rule": "wait",
        "reason": "wait", "errno": 0, "policy_digest": POLICY_DIGEST, "now_ns": NOW,
        "facts": {"kind": "wait", "child": g.child, "own_child": True}})
    parent.rec.append("syscall.result", {
        "req": req, "request_digest": digest, "ok": True, "child": g.child, "status": status,
        "exit_code": 0, "seal": seal, "requests": 0, "denials": 0, "timed_out": False})


def test_wait_result_agrees_with_spawn_exit(tmp_path: Path, key: KernelKey) -> None:
    root = start(tmp_path, key, "root-1")
    g = grant(root, "child-1", key)
    child = child_run(tmp_path, key, root, g)
    started(root, g)
    seal = end(child)
    exited(root, g, seal)
    waited(root, g, seal)
    end(root)
    verify(tmp_path / "root-1", key, "intact")


def test_wait_result_reporting_another_seal(tmp_path: Path, key: KernelKey) -> None:
    root = start(tmp_path, key, "root-1")
    g = grant(root, "child-1", key)
    child = child_run(tmp_path, key, root, g)
    started(root, g)
    exited(root, g, end(child))
    waited(root, g, "sha256:" + "1" * 64)
    end(root)
    verify(tmp_path / "root-1", key, "corrupt", "wait result reports child 'child-1'",
           "spawn.exit (seq")


def test_odd_recovery_record_does_not_crash_the_verifier(tmp_path: Path, key: KernelKey) -> None:
    root = start(tmp_path, key, "root-1")
    grant(root, "child-1", key)
    root.rec.append("run.recovered", {"unfinished": 7, "child": ["not", "an", "id"]})
    end(root, "aborted")
    verify(tmp_path / "root-1", key, "corrupt", "child child-1", "no spawn.exit")


def test_a_chain_of_grandchildren_is_followed_to_the_end(tmp_path: Path, key: KernelKey) -> None:
    parent = start(tmp_path, key, "gen-0")
    chain = [parent]
    grants = []
    for depth in range(1, 8):
        g = grant(parent, f"gen-{depth}", key)
        parent = child_run(tmp_path, key, parent, g)
        started(chain[-1], g)
        chain.append(parent)
        grants.append(g)
    for i in range(len(chain) - 1, 0, -1):
        exited(chain[i - 1], grants[i - 1], end(chain[i]))
    end(chain[0])
    rep = verify(tmp_path / "gen-0", key, "intact")
    assert [r.run_id for r in rep.tree()] == [f"gen-{d}" for d in range(8)]
    assert rep.tree()[-1].lineage == {"parent": "gen-6", "root": "gen-0", "depth": 7}
