"""Signed run folders of an agent tree, recorded with the kernel's own code, for replay and
recovery tests that need exact control over what was recorded.

Each agent has a real ``RunRecorder`` folder; writes go through ``kernel.dispatch.apply_write``
on one shared workspace (so ``tseq``, facts and results are exactly what the kernel records);
spawn decisions come from ``replication.check_spawn`` over a real ``TreeLedger`` and manifests
from ``lineage.issue``. A test may record something else than the kernel would (a forged
decision, a flipped outcome, another ``tseq`` order): the folders are still signed and sealed
by the kernel key, so ``kernel verify`` says intact and only replay can tell.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from kernel import dispatch, lineage, manifest, replication
from kernel.canonical import digest_of
from kernel.context import Ledger, RunContext
from kernel.decide import ALLOWED, Decision, Usage, deny
from kernel.keys import KernelKey
from kernel.paths import Workspace
from kernel.policy import Policy, load_bytes
from kernel.recorder import RunRecorder
from syscalls import write as write_sys

NOW = 1_800_000_000_000_000_000
ROOT_DIR = Path(__file__).resolve().parents[2]


def policy_bytes(max_depth: int = 2) -> bytes:
    raw = (ROOT_DIR / "policies" / "default.toml").read_bytes()
    return raw.replace(b"max_depth = 2", f"max_depth = {max_depth}".encode())


class Agent:
    def __init__(self, tree: Tree, run_id: str, rec: RunRecorder, ctx: RunContext,
                 depth: int, parent: Agent | None, token: str | None) -> None:
        self.tree = tree
        self.run_id = run_id
        self.rec = rec
        self.ctx = ctx
        self.depth = depth
        self.parent = parent
        self.token = token
        self.req = 0
        self.spawn_seq: int | None = None
        self.registered = False
        self.requests = 0
        self.denials = 0

    # ---- requests ----

    def request(self, call: str, args: dict[str, Any], blobs: dict[str, Any] | None = None
                ) -> tuple[int, str]:
        self.req += 1
        self.requests += 1
        body = {"req": self.req, "call": call, "args": args}
        digest = digest_of(body)
        self.ctx.ledger.debit(syscalls=1)
        self.tree.ledger.requests += 1
        self.rec.append("syscall.request", {**body, **(blobs or {}), "request_digest": digest})
        return self.req, digest

    def write(self, path: str, data: bytes, op: str = "write") -> dispatch.Outcome:
        blob = self.rec.put_blob(data)
        rid, digest = self.request("write", {"op": op, "path": path,
                                             "content_bytes": len(data)},
                                   {"content_blob": blob})
        args = {"op": op, "path": path, "content_b64": base64.b64encode(data).decode()}
        prepared = write_sys.prepare(args, self.ctx.ws, self.ctx.policy)
        return dispatch.apply_write(self.ctx, prepared, req=rid, request_digest=digest,
                                    now_ns=self.tree.now())

    def decide(self, rid: int, digest: str, d: Decision, extra: dict[str, Any]) -> int:
        if not d.allowed:
            self.denials += 1
        return dispatch.record_decision(self.ctx, d, req=rid, request_digest=digest,
                                        now_ns=self.tree.now(), extra=extra)

    def spawn(self, child_id: str, *, budget: dict[str, int] | None = None,
              forge: Callable[[dict[str, Any]], None] | None = None,
              result: bool = True) -> Agent | None:
        """Spawn as the kernel does; ``forge`` may rewrite the recorded facts and turns the
        decision into an allow whatever the check said."""
        t = self.tree
        args: dict[str, Any] = {"argv": ["/bin/true"]}
        if budget is not None:
            args["budget"] = budget
        rid, digest = self.request("spawn", args)
        now = t.now()
        facts = t.ledger.facts(self.run_id)
        asked = (Usage(**{k: budget.get(k, getattr(facts.remainder, k))
                          for k in replication.BUDGET_FIELDS}) if budget else None)
        d = replication.check_spawn(replication.SpawnRequest(("/bin/true",), "/bin/true",
                                                             asked), t.contract, facts, now)
        recorded = {**replication.facts_record(facts), "request": {
            "argv": ["/bin/true"], "resolved": "/bin/true",
            "budget": dataclasses.asdict(asked) if asked is not None else None}}
        if forge is not None:
            forge(recorded)
            d = Decision(ALLOWED, "spawn", "forged")
        if not d.allowed:
            dispatch.record_decision(self.ctx, d, req=rid, request_digest=digest, now_ns=now,
                                     extra={"facts": recorded})
            self.denials += 1
            return None
        granted = asked if asked is not None else facts.remainder
        expires = now + t.contract.expiration_seconds * 1_000_000_000
        token = lineage.issue(t.key, lineage.Manifest(
            child=child_id, parent=self.run_id, root=t.root.run_id, depth=self.depth + 1,
            budget=granted, policy_digest=t.policy.digest, issued_ns=now, expires_ns=expires,
            nonce="00" * 16))
        mdigest = lineage.digest(token)
        dseq = dispatch.record_decision(self.ctx, d, req=rid, request_digest=digest,
                                        now_ns=now, extra={
                                            "facts": recorded, "child": child_id,
                                            "budget": dataclasses.asdict(granted),
                                            "expires_ns": expires, "manifest_digest": mdigest})
        dhash = self.rec.head()
        t.ledger.add_child(self.run_id, child_id, granted, now)
        child = t.agent(child_id, self, {
            "parent": self.run_id, "root": t.root.run_id, "depth": self.depth + 1,
            "manifest": token, "manifest_digest": mdigest, "parent_decision_seq": dseq,
            "parent_decision_hash": dhash}, token)
        child.spawn_seq = dseq
        t.children_of.setdefault(self.run_id, []).append(child_id)
        if result:
            self.rec.append("syscall.result", {"req": rid, "request_digest": digest,
                                               "ok": True, "child": child_id, "pid": 4242})
        return child

    def register(self, token: str | None = None, *, flip: bool = False) -> None:
        """Present a manifest (default: this child's own); ``flip`` records the opposite
        outcome of what the kernel's check says."""
        t = self.tree
        tok = self.token if token is None else token
        assert tok is not None
        rid, digest = self.request("register", {"manifest": tok})
        now = t.now()
        facts: dict[str, Any] = {"kind": "register", "expect_child": self.run_id,
                                 "now_ns": now, "manifest_digest": None}
        try:
            facts["manifest_digest"] = lineage.digest(tok)
        except lineage.ManifestRefused:
            pass
        try:
            if not (self.registered and tok == self.token):  # the same token again: allowed
                lineage.check(tok, t.key.public, expect_child=self.run_id, now_ns=now,
                              presented=t.presented)
            d = Decision(ALLOWED, "spawn.register", "manifest verified")
        except lineage.ManifestRefused as r:
            d = deny(r.rule, r.reason, errno.EPERM)
        if flip:
            d = (deny("spawn.manifest.signature", "flipped", errno.EPERM) if d.allowed
                 else Decision(ALLOWED, "spawn.register", "flipped"))
        elif d.allowed:
            t.presented.add(str(facts["manifest_digest"]))
            self.registered = True
        dispatch.record_decision(self.ctx, d, req=rid, request_digest=digest, now_ns=now,
                                 extra={"facts": facts})

    def wait(self, child_id: str, *, flip: bool = False) -> None:
        """``wait`` as the kernel decides it (own child: allowed; else wait.not_child), answered
        at once with the child's recorded end; ``flip`` records the opposite decision."""
        rid, digest = self.request("wait", {"child": child_id})
        own = child_id in self.tree.children_of.get(self.run_id, [])
        facts = {"kind": "wait", "child": child_id, "own_child": own}
        d = (Decision(ALLOWED, "wait", f"wait for child {child_id}") if own
             else deny("wait.not_child", f"{child_id!r} is not a child", errno.ENOENT))
        if flip:
            d = (deny("wait.not_child", "flipped", errno.ENOENT) if d.allowed
                 else Decision(ALLOWED, "wait", "flipped"))
        self.decide(rid, digest, d, {"facts": facts})
        if d.allowed:
            seal, status = self.tree.seals.get(child_id, (None, "running"))
            self.rec.append("syscall.result", {
                "req": rid, "request_digest": digest, "ok": True, "child": child_id,
                "status": status, "exit_code": 0 if seal else None, "seal": seal,
                "requests": 0, "denials": 0, "timed_out": seal is None})

    # ---- the end ----

    def end(self, status: str = "passed", *, seal: bool = True) -> str | None:
        """agent.exit, final manifest, run.end, seal; then the parent's spawn.exit."""
        t = self.tree
        self.rec.append("agent.exit", {"exit_code": 0, "status": status})
        final = self.rec.write_manifest("final", manifest.manifest_bytes(
            manifest.scan(t.workspace)))
        self.rec.append("run.end", {"status": status, "exit_code": 0,
                                    "final_tree_digest": final,
                                    "requests": self.requests, "denials": self.denials})
        if not seal:
            self.rec.close()
            return None
        digest = self.rec.seal(status, {"status": status})
        t.seals[self.run_id] = (digest, status)
        self.ctx.ws.close()
        if self.parent is not None:
            t.ledger.end(self.run_id)
            self.parent.rec.append("spawn.exit", {
                "child": self.run_id, "status": status, "exit_code": 0, "seal": digest,
                "requests": self.requests, "denials": self.denials,
                "request_seq": self.spawn_seq})
        return digest

    def stop(self) -> None:
        """The kernel was killed: the folder stays unsealed."""
        self.rec.close()
        self.ctx.ws.close()


class Tree:
    """One agent tree on one workspace; ``clock`` may give the tseq values to record."""

    def __init__(self, tmp: Path, key: KernelKey, *, max_depth: int = 2,
                 clock: Iterator[int] | None = None) -> None:
        self.key = key
        self.runs = tmp / "runs"
        self.workspace = tmp / "ws"
        self.workspace.mkdir(parents=True)
        self.policy_raw = policy_bytes(max_depth)
        self.policy: Policy = load_bytes(self.policy_raw, source="test policy")
        self.contract = replication.contract_of(self.policy.spawn)
        self.quotas = Usage(**{k: getattr(self.policy.quotas, k)
                               for k in replication.BUDGET_FIELDS})
        self.ledger = replication.TreeLedger("root", self.quotas)
        self.presented: set[str] = set()
        self.children_of: dict[str, list[str]] = {}
        self.seals: dict[str, tuple[str, str]] = {}
        self._t = NOW
        self._tseq = 0
        self._clock = clock
        self.root = self.agent("root", None, None, None)

    def now(self) -> int:
        self._t += 1_000_000
        return self._t

    def tick(self) -> int:
        if self._clock is not None:
            return next(self._clock)
        self._tseq += 1
        return self._tseq

    def agent(self, run_id: str, parent: Agent | None, lin: dict[str, Any] | None,
              token: str | None) -> Agent:
        header: dict[str, Any] = {"workspace": str(self.workspace), "argv": ["agent"]}
        if lin is not None:
            header["lineage"] = lin
        rec = RunRecorder.create(self.runs, run_id=run_id, header=header,
                                 policy_raw=self.policy_raw, key=self.key)
        rec.append("run.start", {"argv": ["agent"]})
        initial = rec.write_manifest("initial", manifest.manifest_bytes(
            manifest.scan(self.workspace)))
        rec.append("snapshot.initial", {"tree_digest": initial, "content_blobs": [],
                                        "content": "complete", "unstored": 0,
                                        "unstored_paths": [], "entries": 0})
        ws = Workspace.open(self.workspace, view_root=str(self.workspace))
        ctx = RunContext(
            run_id=run_id, policy=self.policy, workspace=self.workspace,
            view_root=str(self.workspace), ws=ws, recorder=rec, backend=cast(Any, None),
            agent_env={}, hidden_rel=(), hidden_abs=(), read_paths=(),
            scratch_dir=self.workspace.parent,
            ledger=Ledger(tree=self.ledger, node=run_id, quotas=self.quotas),
            tree_clock=self.tick)
        depth = 0 if parent is None else parent.depth + 1
        return Agent(self, run_id, rec, ctx, depth, parent, token)
