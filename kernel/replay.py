"""``kernel replay``: re-derive every decision of a run and rebuild its workspace from evidence.

Replay trusts nothing but the run folder and the auditor's kernel public key:

1. the folder must verify ``intact`` (``kernel/verify.py``);
2. the recorded policy bytes are loaded with the same loader the kernel uses;
3. the initial workspace is rebuilt in a private temporary directory from the blobs the run
   stored (``kernel/snapshot.py``), or cloned from ``--workspace``, which must match the initial
   manifest; the rebuilt tree must hash to the recorded initial manifest;
4. every event is walked in ``seq`` order:

   - ``syscall.request``: its ``request_digest`` is recomputed from the recorded request;
   - ``syscall.decision`` with recorded ``facts``: the request object is rebuilt from the facts
     (``kernel/evidence.py``), the quota usage is re-derived from the events before it and must
     equal the recorded one, and the *same* pure function (``check_write``/``check_exec``) is
     called with the recorded policy and recorded time; decision, rule and errno must be equal;
   - a decision without facts is a refusal made before any fact could be gathered (a malformed
     frame or argument, a path the normalizer rejects): it must be a denial; a syscall-quota
     denial is re-derived from the number of requests before it;
   - ``syscall.result`` of an allowed write (asked for, or captured from an ``exec``): the
     recorded content (its blob, or the request line's own ``content_b64`` for a write-ahead
     write) is applied to the rebuilt tree through the kernel's own ``perform``
     (by fd, beneath the root), and the outcome (success and result, or the errno) must equal
     the recorded one; an ``exec`` is never re-run (its output is evidence, kept as blobs);

5. the rebuilt final tree must hash to ``final/tree.json`` and to ``run.end``'s
   ``final_tree_digest``. A run cut short by a crash and sealed by ``kernel recover`` may end with
   one allowed write whose result was never recorded; its effect is unknown, and the recorded
   (observed) final tree decides: replay accepts the tree with or without it.

Agent trees (``spawn``). All agents of a tree change one workspace, so a folder's own changes
do not make its final tree; each result that changed (or tried to change) the workspace carries
``tseq``, the tree's one change counter. ``spawn``, ``register`` and ``wait`` decisions are
re-made in any folder: ``spawn`` with ``replication.check_spawn`` from the recorded tree facts
and request (the facts must also fit the folder: its depth, its last spawn, its own children,
its remainder; the granted budget and expiry must follow from them), ``register`` by checking
the recorded token again with ``kernel/lineage.py`` against the folder's kernel key and run id,
``wait`` as one of the agent's own children or ``wait.not_child``.

* Replaying the **root** of a tree (a folder with an allowed spawn) walks every folder of the
  tree (``<runs dir>/<child id>`` of each allowed spawn, recursively), re-decides each, checks
  each child's ``lineage`` and ``spawn.exit`` against its parent's record, then re-applies the
  changes of all folders merged in ``tseq`` order and requires each recorded outcome, each
  child's initial and final trees at some point of that order, and the root's final tree.
* Replaying a **child** re-decides its own folder and names the root whose replay covers its
  final tree (``final_check`` ``root:<id>``).
* In a tree, the quota usage a decision saw is the tree's and cannot be re-derived from one
  folder: it is bounded (:meth:`_Replayer.check_tree_usage`) and the decision re-made with it.

Runs without an allowed spawn are replayed exactly as above.

No clock, environment variable or randomness is read by any of this. The first divergence is
reported with its ``seq`` (and, in a tree, the folder's ``run_id``), what was expected
(recorded) and what replay got.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kernel import evidence, manifest, snapshot
from kernel.canonical import sha256_digest
from kernel.decide import (
    Decision,
    ExecRequest,
    Usage,
    WriteRequest,
    check_exec,
    check_quota_syscalls,
    check_write,
    grant,
)
from kernel.errors import PolicyError
from kernel.paths import Workspace
from kernel.policy import Policy, load_bytes
from kernel.recorder import LOG_FILE, MANIFESTS, POLICY_FILE, REDACTED, RUN_JSON, blob_relpath
from kernel.replication import BUDGET_FIELDS
from kernel.verify import INTACT, verify_run

IDENTICAL, DIVERGED, UNVERIFIED = "identical", "diverged", "unverified"
# The log verified, so it holds no float: the canonical encoder without the float walk.
_canon = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode


@dataclass
class Divergence:
    seq: int | None
    """The event where replay first disagreed (None: before the log, or at the very end)."""
    what: str
    expected: Any
    actual: Any
    run_id: str | None = None
    """In an agent tree: the folder where replay disagreed (None for a single-agent run)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seq": self.seq, "what": self.what,
                               "expected": self.expected, "actual": self.actual}
        if self.run_id is not None:
            out["run_id"] = self.run_id
        return out

    def __str__(self) -> str:
        where = f"seq {self.seq}" if self.seq is not None else "run"
        if self.run_id is not None:
            where = f"{self.run_id} {where}"
        return (f"{where}: {self.what}: expected {_short(self.expected)}, "
                f"replay got {_short(self.actual)}")


@dataclass
class ReplayReport:
    status: str
    """``identical``, ``diverged`` or ``unverified`` (the folder did not verify intact)."""
    run_id: str | None
    events: int = 0
    rederived: int = 0
    """Decisions re-made by the pure decision functions and found equal."""
    refusals: int = 0
    """Denials made before any fact could be gathered (checked to be denials)."""
    applied: int = 0
    """Recorded workspace changes re-applied."""
    initial_source: str = ""
    """``blobs`` or ``workspace``."""
    final_tree_digest: str | None = None
    divergence: Divergence | None = None
    problem: str | None = None
    """Why replay could not run (``unverified``), from the verifier."""
    verify_status: str | None = None
    unfinished: int = 0
    """Allowed writes whose result was never recorded (a crash); resolved by the final tree."""
    gates: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    folders: list[dict[str, Any]] = field(default_factory=list)
    """In an agent tree: one entry per folder replayed (run id, role, counts, status)."""
    final_check: str | None = None
    """In an agent tree: ``root`` (the tree's merged changes were checked against the root's
    final tree) or ``root:<id>`` (a child: its final tree is covered by replaying that root)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
               "status": self.status, "run_id": self.run_id, "events": self.events,
               "rederived": self.rederived, "refusals": self.refusals,
               "applied": self.applied, "initial_source": self.initial_source,
               "final_tree_digest": self.final_tree_digest,
               "divergence": self.divergence.to_json() if self.divergence else None,
               "problem": self.problem, "verify_status": self.verify_status,
               "unfinished": self.unfinished, "gates": self.gates, "notes": list(self.notes)}
        if self.folders or self.final_check is not None:
            out["folders"] = [dict(f) for f in self.folders]
            out["final_check"] = self.final_check
        return out


class _Diverged(Exception):
    def __init__(self, d: Divergence) -> None:
        super().__init__(str(d))
        self.d = d


class _Unreplayable(Exception):
    """Replay cannot proceed (missing initial content...): a bad input, not a divergence."""

    def __init__(self, message: str, *, needs_workspace: bool = True) -> None:
        super().__init__(message)
        self.needs_workspace = needs_workspace


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 300 else s[:297] + "..."


def _diverge(seq: int | None, what: str, expected: Any, actual: Any) -> _Diverged:
    return _Diverged(Divergence(seq, what, expected, actual))


def _decode_name(rel: str) -> str:
    """A manifest path back to a file name (non-UTF-8 names are stored escaped)."""
    if rel.startswith("\x00hex:"):
        return os.fsdecode(bytes.fromhex(rel[len("\x00hex:"):]))
    return rel


@dataclass
class _Folder:
    """What replay knows about one folder of an agent tree."""

    run_id: str
    header: dict[str, Any]
    depth: int
    budget: Usage | None
    """The child's budget from its signed manifest (None: the root, whose budget is the
    policy's quotas)."""
    public: Ed25519PublicKey
    """The kernel key the folder is signed with (verify checked it is trusted)."""
    runs_dir: Path


@dataclass
class _Effect:
    """A recorded workspace change of one folder, re-applied in the tree's ``tseq`` order."""

    tseq: int | None
    run_id: str
    seq: int
    dseq: int
    req: WriteRequest
    content: bytes
    decision: Decision
    expected: dict[str, Any]


class _Replayer:
    def __init__(self, run_dir: Path, policy: Policy, events: list[dict[str, Any]],
                 tree: Path | None, report: ReplayReport, folder: _Folder | None = None
                 ) -> None:
        self.run_dir = run_dir
        self.policy = policy
        self.events = events
        self.tree = tree
        self.report = report
        self.folder = folder
        """Set for a folder of an agent tree: decisions are re-made with the tree usage the
        kernel recorded (bounded by this agent's own spend), and writes are collected in
        :attr:`effects` for the merged re-application instead of being applied here."""
        self.effects: list[_Effect] = []
        self.children: list[tuple[str, int, dict[str, Any]]] = []
        """``(child id, decision seq, decision body)`` of every allowed ``spawn``."""
        self.spawn_req: dict[Any, tuple[int, str]] = {}
        """req -> (seq of the spawn request, child id) of allowed spawns."""
        self.last_spawn_ns: int | None = None
        self.registered: str | None = None
        """Digest of the manifest this folder registered with (a child)."""
        self.seen_usage: Usage | None = None
        self.stops: set[str] = set()
        self.last_tseq = 0
        """The latest ``tseq`` of this folder's changes so far: every change of the tree up to
        it happened before this folder's next decision."""
        self.points: list[tuple[int, str, Usage, int]] = []
        """``(seq, "usage" | "remainder", recorded, last_tseq)`` of each decision that read the
        tree ledger, for the tree-wide bounds (:func:`_check_tree_spend`)."""
        """Rules of the ``spawn.stop`` records seen (each is recorded once)."""
        self.usage = Usage()
        self.syscalls_before: Usage = Usage()
        self.last_request: dict[str, Any] | None = None
        self.pending: dict[tuple[Any, str], tuple[int, WriteRequest, bytes, Decision]] = {}
        self.ws: Workspace | None = None
        self.redacted_at: int | None = None
        """Seq of the first write whose recorded content was redacted (tree unknown after)."""

    def blob(self, digest: str) -> bytes:
        return (self.run_dir / blob_relpath(digest)).read_bytes()

    # ---- the walk ----

    def run(self, initial_digest: str | None) -> None:
        if self.tree is not None:
            self.ws = Workspace.open(self.tree, view_root=str(self.tree))
        try:
            for ev in self.events:
                t = ev["type"]
                if (t == "snapshot.initial" and initial_digest is not None
                        and ev["body"].get("tree_digest") != initial_digest):
                    raise _diverge(ev["seq"], "snapshot.initial tree_digest vs initial/tree.json",
                                   ev["body"].get("tree_digest"), initial_digest)
                if t == "approval.setup":
                    self.on_approval_setup(ev)
                if t == "syscall.request":
                    self.on_request(ev)
                elif t == "syscall.decision":
                    self.on_decision(ev)
                elif t == "syscall.result":
                    self.on_result(ev)
                elif t == "spawn.stop":
                    self.on_spawn_stop(ev)
        finally:
            if self.ws is not None:
                self.ws.close()

    def on_approval_setup(self, ev: dict[str, Any]) -> None:
        """Reviewers trusted through a keyring file are part of the policy the run decided
        with; the keyring's exact bytes are recorded (their consistency is checked by verify)."""
        ring_ref = ev["body"].get("keyring_blob")
        if not ring_ref:
            return
        from kernel.errors import KernelError
        from kernel.reviewers import parse_keyring

        try:
            ring = parse_keyring(self.blob(ring_ref), "recorded keyring")
        except KernelError as e:
            raise _diverge(ev["seq"], "recorded keyring", "a keyring that loads",
                           e.message) from None
        self.policy = dataclasses.replace(self.policy, keyring_reviewers=ring)

    def on_request(self, ev: dict[str, Any]) -> None:
        b = ev["body"]
        expected = b.get("request_digest")
        actual = "sha256:" + hashlib.sha256(_canon(
            {"req": b.get("req"), "call": b.get("call"), "args": b.get("args")}
        ).encode("utf-8")).hexdigest()
        if expected != actual:
            raise _diverge(ev["seq"], "request_digest (recomputed from the recorded request)",
                           expected, actual)
        self.syscalls_before = self.usage
        self.usage = Usage(self.usage.syscalls + 1, self.usage.bytes_written,
                           self.usage.files_written, self.usage.exec_count)
        self.last_request = b

    def on_decision(self, ev: dict[str, Any]) -> None:
        seq, b = ev["seq"], ev["body"]
        recorded = (b.get("decision"), b.get("rule"), b.get("errno"))
        if b.get("policy_digest") != self.policy.digest:
            raise _diverge(seq, "policy_digest bound into the decision", b.get("policy_digest"),
                           self.policy.digest)
        lr = self.last_request or {}
        call = lr.get("call") if lr.get("request_digest") == b.get("request_digest") else None
        if call in ("spawn", "register", "wait") and "request_seq" not in b:
            self.on_tree_decision(str(call), ev, lr)
            return
        if "facts" not in b:
            if b.get("rule") == "quota.syscalls" and self.folder is not None:
                # The syscall quota is the tree's remainder on this agent's chain, which
                # depends on the other agents' requests: a denial is taken as recorded.
                if b.get("decision") != "denied":
                    raise _diverge(seq, "a quota.syscalls decision must be a denial",
                                   "denied", b.get("decision"))
                self.report.refusals += 1
                return
            if b.get("rule") == "quota.syscalls":
                d = check_quota_syscalls(self.policy, self.syscalls_before)
                got = (d.decision, d.rule, d.errno) if d else ("allowed", None, 0)
                if got != recorded:
                    raise _diverge(seq, "decision (decision, rule, errno)", list(recorded),
                                   list(got))
                self.report.rederived += 1
                return
            lr = self.last_request or {}
            if (lr.get("call") == "info" and "request_seq" not in b
                    and lr.get("request_digest") == b.get("request_digest")):
                # info reads nothing but the policy and ledger: allowed iff it has no arguments
                got = (("allowed", "info", 0) if lr.get("args") == {}
                       else ("denied", "request.invalid", errno.EINVAL))
                if got != recorded:
                    raise _diverge(seq, "decision (decision, rule, errno)", list(recorded),
                                   list(got))
                self.report.rederived += 1
                return
            if b.get("decision") != "denied":
                raise _diverge(seq, "a decision without recorded facts must be a denial",
                               "denied", b.get("decision"))
            self.report.refusals += 1
            return
        try:
            req, recorded_usage = evidence.request_from(b["facts"])
        except ValueError as e:
            raise _diverge(seq, "recorded facts", "well-formed facts", str(e)) from None
        if self.folder is not None:
            self.check_tree_usage(seq, recorded_usage)
            usage = recorded_usage
        elif recorded_usage != self.usage:
            raise _diverge(seq, "quota usage the decision saw (re-derived from earlier events)",
                           evidence.usage_record(recorded_usage),
                           evidence.usage_record(self.usage))
        else:
            usage = self.usage
        now_ns = b.get("now_ns")
        if type(now_ns) is not int:
            raise _diverge(seq, "recorded time now_ns", "an integer", now_ns)
        if "pending_seq" in b and "approval_outcome" not in b:
            # settled without any approval channel: the pending decision's rule, denied
            pend = self.events[b["pending_seq"]]["body"] if isinstance(
                b.get("pending_seq"), int) and 0 <= b["pending_seq"] < seq else {}
            got = ("denied", pend.get("rule"), recorded[2])
            if pend.get("decision") != "pending" or got != recorded:
                raise _diverge(seq, "denial of a pending request with no approval channel",
                               list(recorded), list(got))
            self.report.rederived += 1
            return
        if "approval_outcome" in b:
            d = self._after_approval(req, b, now_ns, usage)
        else:
            d = (check_write(req, self.policy, usage, now_ns)
                 if isinstance(req, WriteRequest)
                 else check_exec(req, self.policy, usage, now_ns))
        got = (d.decision, d.rule, d.errno)
        if got != recorded:
            raise _diverge(seq, "decision (decision, rule, errno)", list(recorded), list(got))
        self.report.rederived += 1
        if not d.allowed:
            return
        if isinstance(req, ExecRequest):
            self.usage = Usage(self.usage.syscalls, self.usage.bytes_written,
                               self.usage.files_written, self.usage.exec_count + 1)
            return
        content = b""
        if req.op in ("write", "create", "append"):
            ref = b.get("content_blob") if req.captured else (
                self.last_request or {}).get("content_blob")
            args = (self.last_request or {}).get("args")
            in_line = (args.get("content_b64") if not req.captured and isinstance(args, dict)
                       else None)
            if ref is None and isinstance(in_line, str):
                # a write-ahead request line holds the content itself (docs/runs-format.md)
                try:
                    content = base64.b64decode(in_line, validate=True)
                except (binascii.Error, ValueError):
                    raise _diverge(seq, "content held by the request line", "base64",
                                   in_line[:64]) from None
            elif ref is None and req.payload_bytes == 0:
                content = b""
            elif not isinstance(ref, str):
                raise _diverge(seq, "content blob of an allowed write", "a recorded blob", ref)
            else:
                content = self.blob(ref)
            if len(content) != req.payload_bytes:
                if REDACTED.encode() not in content:
                    raise _diverge(seq, "content size (blob vs recorded facts)",
                                   req.payload_bytes, len(content))
                # The content held a secret value and was recorded redacted: from here on the
                # tree cannot be rebuilt, but every decision can still be re-derived.
                if self.redacted_at is None:
                    self.redacted_at = seq
        self.pending[(b.get("req"), b.get("request_digest"))] = (seq, req, content, d)

    # ---- agent trees: spawn, register, wait ----

    def check_tree_usage(self, seq: int, recorded: Usage) -> None:
        """In a tree, the usage a quota check sees is the tree's: the policy's quotas minus the
        least room left on the agent's chain, which moves with the other agents' spend. Replay
        cannot re-derive it from one folder; it requires what must hold whatever the others
        did: never above the quotas, never below what this agent itself spent (counted against
        its own budget), and never less than at the folder's previous decision."""
        assert self.folder is not None
        quotas = self.policy.quotas
        budget = self.folder.budget
        for name in BUDGET_FIELDS:
            q = getattr(quotas, name)
            own = getattr(self.usage, name)
            room = max(0, (getattr(budget, name) if budget is not None else q) - own)
            low = max(0, q - room)
            got = getattr(recorded, name)
            prev = getattr(self.seen_usage, name) if self.seen_usage is not None else 0
            if not (max(low, prev) <= got <= max(q, low)):
                raise _diverge(seq, f"quota usage the decision saw ({name}, the tree's, "
                               "bounded by this agent's own spend and its earlier decisions)",
                               f"{max(low, prev)}..{max(q, low)}", got)
        self.seen_usage = recorded
        self.points.append((seq, "usage", recorded, self.last_tseq))

    def on_tree_decision(self, call: str, ev: dict[str, Any], lr: dict[str, Any]) -> None:
        seq, b = ev["seq"], ev["body"]
        recorded = (b.get("decision"), b.get("rule"), b.get("errno"))
        now_ns = b.get("now_ns")
        if call == "spawn" and isinstance(b.get("facts"), dict):
            got = self._redecide_spawn(seq, b, now_ns)
        elif call == "register" and isinstance(b.get("facts"), dict):
            got = self._redecide_register(seq, b, lr, now_ns)
        elif call == "wait" and isinstance(lr.get("args"), dict) and isinstance(
                lr["args"].get("child"), str) and recorded[1] != "request.invalid":
            own = {c for c, _, _ in self.children}
            got = (("allowed", "wait", 0) if lr["args"]["child"] in own
                   else ("denied", "wait.not_child", errno.ENOENT))
        else:
            # refused before any fact was gathered (malformed arguments, the root registering,
            # an unregistered child): it must be a denial
            if b.get("decision") != "denied":
                raise _diverge(seq, f"a {call} decision without recorded facts must be a "
                               "denial", "denied", b.get("decision"))
            self.report.refusals += 1
            return
        if got != recorded:
            raise _diverge(seq, f"{call} decision (decision, rule, errno)", list(recorded),
                           list(got))
        self.report.rederived += 1

    def on_spawn_stop(self, ev: dict[str, Any]) -> None:
        """A recorded stop must name a stop condition of the policy that holds on the recorded
        tree totals, with the policy's ``kill_tree``, and be recorded once."""
        from kernel import replication

        seq, b = ev["seq"], ev["body"]
        try:
            conds = replication.contract_of(self.policy.spawn).stop
        except PolicyError as e:
            raise _diverge(seq, "the policy's stop conditions", "conditions that load",
                           e.message) from None
        cond = next((c for c in conds if c.rule == b.get("rule")), None)
        totals = b.get("totals")
        if cond is None or not isinstance(totals, dict):
            raise _diverge(seq, "spawn.stop names a stop condition of the policy",
                           [c.rule for c in conds], b.get("rule"))
        got = {"condition": cond.text, "kill_tree": cond.kill_tree,
               "holds": cond.holds({k: v for k, v in totals.items() if type(v) is int})}
        want = {"condition": b.get("condition"), "kill_tree": b.get("kill_tree"),
                "holds": True}
        if got != want or cond.rule in self.stops:
            raise _diverge(seq, "spawn.stop (the condition on the recorded totals, once)",
                           want, dict(got, again=cond.rule in self.stops))
        self.stops.add(cond.rule)

    def _redecide_spawn(self, seq: int, b: dict[str, Any], now_ns: Any
                        ) -> tuple[str, str | None, int]:
        from kernel import replication

        facts = b["facts"]
        try:
            tf = replication.facts_from(facts)
            r = facts.get("request")
            if not isinstance(r, dict):
                raise ValueError("spawn facts: no request")
            argv, resolved, budget = r.get("argv"), r.get("resolved"), r.get("budget")
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise ValueError("spawn facts: argv must be a list of strings")
            if resolved is not None and not isinstance(resolved, str):
                raise ValueError("spawn facts: resolved must be a string or null")
            asked: Usage | None = None
            if budget is not None:
                if not isinstance(budget, dict) or not set(budget) <= set(BUDGET_FIELDS) or not all(
                        type(v) is int and v >= 0 for v in budget.values()):
                    raise ValueError("spawn facts: bad budget")
                # a field left out is the parent's whole remainder of it
                asked = Usage(**{k: budget.get(k, getattr(tf.remainder, k))
                                 for k in BUDGET_FIELDS})
            contract = replication.contract_of(self.policy.spawn)
        except (ValueError, PolicyError) as e:
            raise _diverge(seq, "recorded spawn facts", "well-formed facts",
                           str(e)) from None
        if type(now_ns) is not int:
            raise _diverge(seq, "recorded time now_ns", "an integer", now_ns)
        depth = self.folder.depth if self.folder is not None else 0
        if tf.parent_depth != depth:
            raise _diverge(seq, "spawn facts: the parent's depth (this folder's depth)", depth,
                           tf.parent_depth)
        if tf.last_spawn_ns != self.last_spawn_ns:
            raise _diverge(seq, "spawn facts: when this agent last spawned (its earlier "
                           "allowed spawn decisions)", self.last_spawn_ns, tf.last_spawn_ns)
        if tf.spawns < len(self.children):
            raise _diverge(seq, "spawn facts: children started in the tree (at least this "
                           "agent's own)", f">= {len(self.children)}", tf.spawns)
        for metric, value in (("spawns", tf.spawns), ("live", tf.live)):
            if metric in tf.totals and tf.totals[metric] != value:
                raise _diverge(seq, f"spawn facts: totals.{metric} vs {metric}", value,
                               tf.totals[metric])
        budget_self = (self.folder.budget if self.folder is not None else None) or Usage(
            **{k: getattr(self.policy.quotas, k) for k in BUDGET_FIELDS})
        self.points.append((seq, "remainder", tf.remainder, self.last_tseq))
        for name in BUDGET_FIELDS:
            most = max(0, getattr(budget_self, name) - getattr(self.usage, name))
            if getattr(tf.remainder, name) > most:
                raise _diverge(seq, f"spawn facts: the parent's remainder of {name} (at most "
                               "its budget less its own spend)", f"<= {most}",
                               getattr(tf.remainder, name))
        d = replication.check_spawn(
            replication.SpawnRequest(tuple(argv), resolved, asked), contract, tf, now_ns)
        got = (d.decision, d.rule, d.errno)
        if d.allowed and got == (b.get("decision"), b.get("rule"), b.get("errno")):
            granted = asked if asked is not None else tf.remainder
            want = {k: getattr(granted, k) for k in BUDGET_FIELDS}
            if b.get("budget") != want:
                raise _diverge(seq, "budget granted to the child (asked, or the remainder)",
                               want, b.get("budget"))
            expires = now_ns + contract.expiration_seconds * 1_000_000_000
            if b.get("expires_ns") != expires:
                raise _diverge(seq, "the child's expiry (decision time + expiration_seconds)",
                               expires, b.get("expires_ns"))
            child = b.get("child")
            if not isinstance(child, str) or not child:
                raise _diverge(seq, "child run id of an allowed spawn", "a run id", child)
            self.children.append((child, seq, b))
            self.last_spawn_ns = now_ns
            req = b.get("req")
            rseq = next((e["seq"] for e in reversed(self.events[:seq])
                         if e["type"] == "syscall.request" and e["body"].get("req") == req), -1)
            self.spawn_req[req] = (rseq, child)
        return got

    def _redecide_register(self, seq: int, b: dict[str, Any], lr: dict[str, Any],
                           now_ns: Any) -> tuple[str, str | None, int]:
        from kernel import lineage

        facts = b["facts"]
        own_id = self.folder.run_id if self.folder is not None else self.report.run_id
        if self.folder is None or not isinstance(self.folder.header.get("lineage"), dict):
            return ("denied", "request.invalid", errno.EINVAL)  # only a spawned child registers
        if facts.get("kind") != "register" or facts.get("expect_child") != own_id:
            raise _diverge(seq, "register facts: the child registering is this folder's run",
                           own_id, facts.get("expect_child"))
        if type(now_ns) is not int or facts.get("now_ns", now_ns) != now_ns:
            raise _diverge(seq, "recorded time now_ns", now_ns, facts.get("now_ns"))
        args: dict[str, Any] = lr["args"] if isinstance(lr.get("args"), dict) else {}
        token = args.get("manifest")
        public = self.folder.public
        try:
            digest = lineage.digest(token) if isinstance(token, str) else None
        except lineage.ManifestRefused:
            digest = None
        if digest is not None and facts.get("manifest_digest") != digest:
            raise _diverge(seq, "register facts: digest of the presented manifest",
                           digest, facts.get("manifest_digest"))
        if self.registered is not None and digest == self.registered:
            return ("allowed", "spawn.register", 0)  # the same token again: idempotent
        presented = {self.registered} if self.registered else set()
        try:
            m = lineage.check(token, public, expect_child=str(own_id), now_ns=now_ns,
                              presented=presented)
        except lineage.ManifestRefused as e:
            if (e.rule == "spawn.manifest.identity" and b.get("rule") == "spawn.manifest.replayed"
                    and digest is not None and self.folder is not None
                    and isinstance(token, str)
                    and _registered_elsewhere(self.folder.runs_dir, token, digest)):
                # presented here after the child it names had registered with it
                return ("denied", "spawn.manifest.replayed", errno.EPERM)
            return ("denied", e.rule, errno.EPERM)
        lin = (self.folder.header.get("lineage") or {}) if self.folder is not None else {}
        if lin.get("manifest_digest") not in (None, digest) or m.depth != lin.get(
                "depth", m.depth):
            raise _diverge(seq, "manifest accepted at registration vs the folder's lineage",
                           lin.get("manifest_digest"), digest)
        self.registered = digest
        return ("allowed", "spawn.register", 0)

    def _after_approval(self, req: WriteRequest | ExecRequest, b: dict[str, Any],
                        now_ns: int, usage: Usage) -> Decision:
        """Re-decide a settled approval with the recorded outcome of the wait.

        The outcome (approved, denied, expired) is taken from the record; the reviewer
        signatures behind it are checked by the approval verifier, not here.
        """
        from kernel import decide

        outcome = decide.ApprovalOutcome(
            str(b["approval_outcome"]), "", tuple(b.get("approvals") or ()))
        check: Any = check_write if isinstance(req, WriteRequest) else check_exec
        result: Decision = check(req, self.policy, usage, now_ns, approval=outcome)
        return result

    def perform(self, req: WriteRequest, content: bytes, d: Decision) -> dict[str, Any]:
        assert self.ws is not None
        return _perform(self.ws, req, content, d)

    def on_result(self, ev: dict[str, Any]) -> None:
        seq, b = ev["seq"], ev["body"]
        key = (b.get("req"), b.get("request_digest"))
        if key not in self.pending:
            return  # the result of an exec (never re-run) or of an info request
        dseq, req, content, d = self.pending.pop(key)
        if self.folder is not None:  # re-applied later, merged with the tree's other folders
            tseq = b.get("tseq")
            expected = ({"ok": True, "result": b.get("result")} if b.get("ok") is True
                        else {"ok": False, "errno": b.get("errno")})
            self.effects.append(_Effect(tseq if type(tseq) is int else None, self.folder.run_id,
                                        seq, dseq, req, content, d, expected))
            if type(tseq) is int:
                self.last_tseq = max(self.last_tseq, tseq)
            if b.get("ok") is True:
                self.usage = Usage(self.usage.syscalls,
                                   self.usage.bytes_written + req.payload_bytes,
                                   self.usage.files_written + 1, self.usage.exec_count)
            return
        if self.redacted_at is not None:  # the tree is unknown: check the usage only
            if b.get("ok") is True:
                self.usage = Usage(self.usage.syscalls,
                                   self.usage.bytes_written + req.payload_bytes,
                                   self.usage.files_written + 1, self.usage.exec_count)
            return
        got = self.perform(req, content, d)
        if b.get("ok") is True:
            expected = {"ok": True, "result": b.get("result")}
        else:
            expected = {"ok": False, "errno": b.get("errno")}
        if got != expected:
            raise _diverge(seq, f"effect of the write decided at seq {dseq}", expected, got)
        self.report.applied += 1
        if got["ok"]:
            self.usage = Usage(self.usage.syscalls, self.usage.bytes_written + req.payload_bytes,
                               self.usage.files_written + 1, self.usage.exec_count)

    def finish_unfinished(self) -> list[tuple[WriteRequest, bytes, Decision]]:
        return [(req, content, d) for (_, req, content, d) in self.pending.values()]


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _registered_elsewhere(runs_dir: Path, token: str, digest: str) -> bool:
    """Whether the child a manifest names holds it in its own (signed) header: then a second
    presentation anywhere is a replay."""
    try:
        body = json.loads(base64.urlsafe_b64decode(token.partition(".")[0].encode("ascii")))
        header = json.loads((runs_dir / str(body["child"]) / RUN_JSON).read_bytes())
    except (OSError, ValueError, KeyError, TypeError, binascii.Error):
        return False
    lin = header.get("lineage")
    return isinstance(lin, dict) and lin.get("manifest_digest") == digest


def _perform(ws: Workspace, req: WriteRequest, content: bytes, d: Decision) -> dict[str, Any]:
    from syscalls import write as write_sys  # the kernel's own effect code

    try:
        result = write_sys.perform(grant(d, req), ws, content)
    except OSError as e:
        return {"ok": False, "errno": e.errno or 0}
    return {"ok": True, "result": result}


# ---- the initial tree ----


def _materialize(run_dir: Path, entries: dict[str, Any], dest: Path,
                 snap: dict[str, Any]) -> None:
    contents: dict[str, bytes] | None = None
    if "content_blobs" in snap["body"]:
        try:
            contents = dict(snapshot.stored_files(
                entries, snap["body"], lambda d: (run_dir / blob_relpath(d)).read_bytes()))
        except ValueError as err:
            raise _diverge(snap["seq"], "initial content packs vs initial/tree.json",
                           "the stored files' bytes", str(err)) from None
    dirs: list[tuple[str, int]] = []
    for rel in sorted(entries, key=lambda r: r.split("/")):
        e = entries[rel]
        path = dest / _decode_name(rel)
        kind = e.get("kind")
        if kind == "dir":
            os.mkdir(path, 0o700)
            dirs.append((rel, e["mode"]))
        elif kind == "file":
            if contents is not None:
                if rel not in contents:
                    raise _Unreplayable(f"{rel}: initial content not stored in the run folder")
                data = contents[rel]
            else:  # runs that stored one blob per initial file
                blob = run_dir / blob_relpath(e["digest"])
                if not blob.is_file():
                    raise _Unreplayable(f"{rel}: initial content not stored in the run folder")
                data = blob.read_bytes()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(path, e["mode"])
        elif kind == "symlink":
            os.symlink(_decode_name(e["target"]), path)
        else:
            raise _Unreplayable(f"{rel}: a {kind} file cannot be rebuilt from the run folder")
    for rel, mode in sorted(dirs, key=lambda d: d[0].split("/"), reverse=True):
        os.chmod(dest / _decode_name(rel), mode)


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    for rel in sorted(set(a) | set(b)):
        if a.get(rel) != b.get(rel):
            return f"{rel}: recorded {_short(a.get(rel))}, rebuilt {_short(b.get(rel))}"
    return "(no entry differs)"


def _load(run_dir: Path, trusted: Sequence[Ed25519PublicKey], *, children: bool = True
          ) -> tuple[Any, Policy | None, list[bytes], str | None]:
    """Verify a folder (with its children's, unless the caller verified them already) and load
    its policy and log lines: (verify report, policy, lines, problem)."""
    vr = verify_run(run_dir, trusted, children=children)
    if vr.status != INTACT:
        return vr, None, [], (f"the run folder is {vr.status}"
                              + (f": {vr.problem}" if vr.problem else "")
                              + ("; seal it with `kernel recover` first" if vr.status ==
                                 "incomplete" else ""))
    try:
        policy = load_bytes((run_dir / POLICY_FILE).read_bytes(),
                            source=str(run_dir / POLICY_FILE))
    except PolicyError as e:
        return vr, None, [], f"the recorded policy does not load: {e.message}"
    return vr, policy, (run_dir / LOG_FILE).read_bytes().splitlines(), None


def _is_tree_root(events: list[dict[str, Any]]) -> bool:
    return any(e["type"] == "syscall.decision" and e["body"].get("decision") == "allowed"
               and isinstance(e["body"].get("facts"), dict)
               and e["body"]["facts"].get("kind") == "spawn" for e in events)


def replay_run(run_dir: Path, trusted: Sequence[Ed25519PublicKey], *,
               workspace: Path | None = None, rerun_gates: bool = False) -> ReplayReport:
    """Verify, then replay ``run_dir``. Never raises for anything in the folder.

    A folder of an agent tree is replayed as part of it: the root re-decides every folder of
    its tree and re-applies their changes merged in ``tseq`` order; a child re-decides its own
    decisions and names the root whose replay covers its final tree."""
    run_dir = Path(run_dir)
    vr, policy, lines, problem = _load(run_dir, trusted)
    report = ReplayReport(status=UNVERIFIED, run_id=vr.run_id, events=vr.events,
                          verify_status=vr.status)
    if policy is None:
        report.problem = problem
        return report
    events = [json.loads(line) for line in lines]
    header = json.loads((run_dir / RUN_JSON).read_bytes())
    if isinstance(header.get("lineage"), dict):
        return _replay_child(run_dir, header, policy, events, report)
    initial_bytes = (run_dir / MANIFESTS["initial"]).read_bytes() if (
        run_dir / MANIFESTS["initial"]).is_file() else None
    final_bytes = (run_dir / MANIFESTS["final"]).read_bytes() if (
        run_dir / MANIFESTS["final"]).is_file() else None
    if initial_bytes is None or final_bytes is None:
        report.problem = "the run has no initial or final manifest (it never started a workspace)"
        return report
    initial = json.loads(initial_bytes)
    final = json.loads(final_bytes)
    tmp = Path(tempfile.mkdtemp(prefix="kernel-replay-"))
    tree = tmp / "ws"
    try:
        try:
            _build_initial(run_dir, events, initial_bytes, initial, workspace, tree, report)
            if _is_tree_root(events):
                _replay_tree(run_dir, header, policy, events, lines, initial_bytes, final_bytes,
                             final, tree, trusted, report)
            else:
                r = _Replayer(run_dir, policy, events, tree, report)
                r.run(sha256_digest(initial_bytes))
                if r.redacted_at is not None:
                    _check_gate(events, policy)
                    raise _Unreplayable(
                        f"the content written at seq {r.redacted_at} held a secret value and "
                        "is recorded redacted, so the workspace cannot be rebuilt past it (all "
                        f"{report.rederived} decisions were re-derived identically)",
                        needs_workspace=False)
                recovered = any(e["type"] == "run.recovered" for e in events)
                _check_final(tree, r.finish_unfinished() if recovered else [], events,
                             final_bytes, final, report)
            _check_gate(events, policy)
            report.status = IDENTICAL
            if rerun_gates:
                from kernel import gates

                report.gates = gates.rerun_recorded(run_dir, events, policy, tree)
                if report.gates.get("same") is False:
                    report.status = DIVERGED
                    report.divergence = Divergence(
                        None, "re-run verification commands (verifier report)",
                        report.gates.get("recorded"), report.gates.get("rerun"))
        except _Diverged as e:
            report.status = DIVERGED
            report.divergence = e.d
        except _Unreplayable as e:
            report.status = UNVERIFIED
            report.problem = (f"{e}; give the initial workspace with --workspace DIR"
                              if e.needs_workspace else str(e))
    finally:
        manifest.remove_tree(tmp)
    return report


def _build_initial(run_dir: Path, events: list[dict[str, Any]], initial_bytes: bytes,
                   initial: dict[str, Any], workspace: Path | None, tree: Path,
                   report: ReplayReport) -> None:
    if workspace is not None:
        report.initial_source = "workspace"
        from kernel.recover import hidden_runs_dir

        skip = hidden_runs_dir(Path(workspace), run_dir)
        given = manifest.scan(Path(workspace), exclude=skip)
        got = manifest.tree_digest(given)
        if got != sha256_digest(initial_bytes):
            first = _first_difference(
                initial["entries"],
                json.loads(manifest.manifest_bytes(given))["entries"])
            raise _diverge(None, "--workspace does not match the initial manifest",
                           sha256_digest(initial_bytes), f"{got} ({first})")
        manifest.clone_tree(Path(workspace), tree, exclude=skip, uid=os.getuid(),
                            gid=os.getgid())
    else:
        report.initial_source = "blobs"
        os.mkdir(tree, 0o755)
        snap: dict[str, Any] = next(
            (ev for ev in events if ev["type"] == "snapshot.initial"),
            {"seq": None, "body": {}})
        _materialize(run_dir, initial["entries"], tree, snap)
    rebuilt = manifest.scan(tree)
    if manifest.tree_digest(rebuilt) != sha256_digest(initial_bytes):
        raise _diverge(None, "rebuilt initial workspace vs initial/tree.json",
                       sha256_digest(initial_bytes),
                       f"{manifest.tree_digest(rebuilt)} ("
                       f"{_first_difference(initial['entries'], json.loads(manifest.manifest_bytes(rebuilt))['entries'])})")  # noqa: E501


# ---- agent trees ----


def _manifest_budget(token: Any) -> Usage | None:
    """The budget in a manifest token's body (its signature is checked at registration)."""
    try:
        body = json.loads(base64.urlsafe_b64decode(str(token).partition(".")[0].encode("ascii")))
        return Usage(**{k: int(body["budget"][k]) for k in BUDGET_FIELDS})
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None


def _folder(run_dir: Path, header: dict[str, Any], depth: int, budget: Usage | None
            ) -> _Folder:
    return _Folder(run_id=str(header.get("run_id")), header=header, depth=depth, budget=budget,
                   public=Ed25519PublicKey.from_public_bytes(
                       bytes.fromhex(str(header.get("kernel_pubkey")))),
                   runs_dir=run_dir.parent)


def _folder_summary(r: _Replayer, role: str, status: str) -> dict[str, Any]:
    return {"run_id": r.report.run_id, "role": role, "status": status,
            "events": r.report.events, "rederived": r.report.rederived,
            "refusals": r.report.refusals, "children": [c for c, _, _ in r.children],
            "changes": len(r.effects)}


def _replay_child(run_dir: Path, header: dict[str, Any], policy: Policy,
                  events: list[dict[str, Any]], report: ReplayReport) -> ReplayReport:
    """A child alone: every decision is re-made; its changes to the shared workspace can only
    be re-applied together with the whole tree's, by replaying the root."""
    lin = header["lineage"]
    root = lin.get("root")
    report.final_check = f"root:{root}"
    try:
        depth = lin.get("depth")
        budget = _manifest_budget(lin.get("manifest"))
        if type(depth) is not int or budget is None or not isinstance(root, str):
            raise _Unreplayable("run.json lineage: depth, root or manifest budget missing",
                                needs_workspace=False)
        r = _Replayer(run_dir, policy, events, None, report,
                      _folder(run_dir, header, depth, budget))
        try:
            r.run(None)
        except _Diverged as e:
            e.d.run_id = r.report.run_id
            raise
        report.folders.append(_folder_summary(r, "child", IDENTICAL))
        report.status = IDENTICAL
        report.notes.append(
            f"child of {lin.get('parent')} (depth {depth}) in the tree of root {root}: every "
            "decision was re-derived; its final-tree check is covered by replaying the root "
            f"({run_dir.parent / root}), which re-applies the changes of every folder of the "
            "tree in the order they happened")
    except _Diverged as e:
        report.status = DIVERGED
        report.divergence = e.d
    except _Unreplayable as e:
        report.status = UNVERIFIED
        report.problem = str(e)
    return report


def _replay_tree(run_dir: Path, header: dict[str, Any], policy: Policy,
                 events: list[dict[str, Any]], lines: list[bytes], initial_bytes: bytes,
                 final_bytes: bytes, final: dict[str, Any], tree: Path,
                 trusted: Sequence[Ed25519PublicKey], report: ReplayReport) -> None:
    """The root of an agent tree: re-decide every folder of the tree (children found as
    ``<runs dir>/<child id>`` from the allowed spawn decisions, recursively), check the links
    between parents and children, then re-apply every folder's changes merged in ``tseq``
    order and require the root's final tree."""
    report.final_check = "root"
    root_id = str(header.get("run_id"))
    root = _Replayer(run_dir, policy, events, None, report, _folder(run_dir, header, 0, None))
    walked: list[_Replayer] = []
    links: dict[str, tuple[_Replayer, int]] = {}
    """child id -> (its parent's replayer, seq of the allowed spawn decision)"""
    redacted: list[tuple[str, int]] = []
    recovered = False

    def walk(r: _Replayer, lines_: list[bytes], initial_digest: str | None, role: str) -> None:
        nonlocal recovered
        try:
            r.run(initial_digest)
        except _Diverged as e:
            e.d.run_id = r.report.run_id
            raise
        walked.append(r)
        report.folders.append(_folder_summary(r, role, IDENTICAL))
        if r.redacted_at is not None:
            redacted.append((str(r.report.run_id), r.redacted_at))
        recovered = recovered or any(e["type"] == "run.recovered" for e in r.events)
        if r is not root:
            report.rederived += r.report.rederived
            report.refusals += r.report.refusals
        exits = {e["body"].get("child"): e for e in r.events if e["type"] == "spawn.exit"}
        assert r.folder is not None
        results = {e["body"].get("req") for e in r.events if e["type"] == "syscall.result"}
        for child_id, dseq, body in r.children:
            cdir = r.folder.runs_dir / child_id
            if (not (cdir / RUN_JSON).exists() and body.get("req") not in results
                    and any(e["type"] == "run.recovered" for e in r.events)):
                report.notes.append(
                    f"{r.report.run_id} seq {dseq}: spawn of {child_id} was decided but the "
                    "child never started (the kernel stopped; sealed by kernel recover)")
                continue
            vr, cpolicy, clines, problem = _load(cdir, trusted, children=False)
            if cpolicy is None:
                raise _Unreplayable(f"child {child_id} (spawned at seq {dseq} of "
                                    f"{r.report.run_id}): {problem}", needs_workspace=False)
            cheader = json.loads((cdir / RUN_JSON).read_bytes())
            lin = cheader.get("lineage") if isinstance(cheader.get("lineage"), dict) else {}
            link = {"parent": r.report.run_id, "root": root_id, "depth": r.folder.depth + 1,
                    "manifest_digest": body.get("manifest_digest"), "parent_decision_seq": dseq,
                    "parent_decision_hash": hashlib.sha256(lines_[dseq]).hexdigest()}
            got = {k: lin.get(k) for k in link}
            if got != link or cheader.get("run_id") != child_id:
                raise _Diverged(Divergence(dseq, f"lineage of child {child_id} (its run.json "
                                           "vs the allowed spawn decision)", link, got,
                                           r.report.run_id))
            ex = exits.get(child_id)
            if ex is not None:
                seal_bytes = (cdir / "SEAL.json").read_bytes()
                want = {"seal": sha256_digest(seal_bytes),
                        "status": json.loads(seal_bytes)["body"].get("status")}
                got = {k: ex["body"].get(k) for k in want}
                # the spawn it closes: its request's seq or its decision's
                spawn_seqs = (r.spawn_req.get(body.get("req"), (None,))[0], dseq)
                if ex["body"].get("request_seq") not in spawn_seqs:
                    want["request_seq"] = dseq
                    got["request_seq"] = ex["body"].get("request_seq")
                if got != want:
                    raise _Diverged(Divergence(ex["seq"], f"spawn.exit of child {child_id} vs "
                                               "the child's sealed folder", want, got,
                                               r.report.run_id))
            child = _Replayer(cdir, cpolicy, [json.loads(x) for x in clines], None,
                              ReplayReport(status=IDENTICAL, run_id=child_id,
                                           events=vr.events, verify_status=vr.status),
                              _folder(cdir, cheader, r.folder.depth + 1,
                                      _manifest_budget(lin.get("manifest"))))
            # the child exists only after its spawn: every change its parent knew of by then
            # happened before any of the child's decisions
            child.last_tseq = next((t for s_, kind, _, t in r.points
                                    if s_ == dseq and kind == "remainder"), 0)
            links[child_id] = (r, dseq)
            walk(child, clines, None, "child")

    walk(root, lines, sha256_digest(initial_bytes), "root")
    if redacted:
        rid, at = redacted[0]
        raise _Unreplayable(
            f"the content written at seq {at} of {rid} held a secret value and is recorded "
            "redacted, so the workspace cannot be rebuilt past it (every decision of the tree "
            "was re-derived identically)", needs_workspace=False)
    effects = [e for r in walked for e in r.effects]
    seen: dict[int, _Effect] = {}
    for e in effects:
        if e.tseq is None:
            raise _Diverged(Divergence(e.seq, "tseq of a workspace change in an agent tree",
                                       "an integer", None, e.run_id))
        if e.tseq in seen:
            o = seen[e.tseq]
            raise _Diverged(Divergence(e.seq, f"tseq {e.tseq} is also used by seq {o.seq} of "
                                       f"{o.run_id}", "a tseq used once in the tree", e.tseq,
                                       e.run_id))
        seen[e.tseq] = e
    order = sorted(effects, key=lambda x: x.tseq or 0)
    _check_tree_spend(walked, links, order, policy)
    snaps = _snapshot_checks(walked, links, order)
    ws = Workspace.open(tree, view_root=str(tree))
    try:
        _probe(snaps, tree, 0)
        for k, e in enumerate(order, 1):
            got = _perform(ws, e.req, e.content, e.decision)
            if got != e.expected:
                raise _Diverged(Divergence(
                    e.seq, f"effect of the write decided at seq {e.dseq} (re-applied in the "
                    f"tree's tseq order, at tseq {e.tseq})", e.expected, got, e.run_id))
            report.applied += 1
            _probe(snaps, tree, k)
        _probe(snaps, tree, -1)  # every window has closed by now
    finally:
        ws.close()
    unfinished = [u for r in walked for u in r.finish_unfinished()] if recovered else []
    _check_final(tree, unfinished, events, final_bytes, final, report)
    report.notes.append(
        f"agent tree of {len(walked)} folders: every decision of each was re-derived and "
        f"their {_count(len(effects), 'change')} re-applied in tseq order")
    for f in report.folders[1:]:
        report.notes.append(f"{f['role']} {f['run_id']}: {f['status']}, "
                            f"{_count(f['rederived'], 'decision')} re-derived, "
                            f"{_count(f['refusals'], 'early refusal')} checked, "
                            f"{_count(f['changes'], 'change')}")


def _check_tree_spend(walked: list[_Replayer], links: dict[str, tuple[_Replayer, int]],
                      order: list[_Effect], policy: Policy) -> None:
    """Tighter bounds on the tree usage each decision saw, from the whole tree.

    Every change with a ``tseq`` up to the latest of a folder's own changes happened before that
    folder's next decision, and was debited from each ancestor of the agent that made it. So at
    that decision every node on the folder's chain had spent at least its subtree's bytes and
    files up to there: the remainder (the least room on the chain) was at most what that leaves,
    and the usage the quota checks saw at least ``quotas - remainder``."""
    parent = {rid: str(p.report.run_id) for rid, (p, _) in links.items()}
    quotas = Usage(**{k: getattr(policy.quotas, k) for k in BUDGET_FIELDS})
    budget = {str(r.report.run_id): (r.folder.budget if r.folder is not None
                                     and r.folder.budget is not None else quotas)
              for r in walked}

    def chain(rid: str) -> list[str]:
        out = [rid]
        while out[-1] in parent:
            out.append(parent[out[-1]])
        return out

    # per node: tseqs and running (bytes, files) totals of its subtree's successful changes
    at: dict[str, list[int]] = {}
    totals: dict[str, list[tuple[int, int]]] = {}
    for e in order:
        if e.expected.get("ok") is not True or e.tseq is None:
            continue
        for a in chain(e.run_id):
            run = totals.setdefault(a, [])
            b0, f0 = run[-1] if run else (0, 0)
            run.append((b0 + e.req.payload_bytes, f0 + 1))
            at.setdefault(a, []).append(e.tseq)

    def used_by(node: str, tseq: int) -> tuple[int, int]:
        i = bisect.bisect_right(at.get(node, []), tseq)
        return totals[node][i - 1] if i else (0, 0)

    for r in walked:
        rid = str(r.report.run_id)
        for seq, kind, recorded, t in r.points:
            for i, name in enumerate(("bytes_written", "files_written")):
                most = max(0, min(getattr(budget.get(a, quotas), name) - used_by(a, t)[i]
                                  for a in chain(rid)))
                got = getattr(recorded, name)
                if kind == "remainder" and got > most:
                    raise _Diverged(Divergence(
                        seq, f"spawn facts: the parent's remainder of {name} (at most the least "
                        "room on its chain after the tree's earlier changes)", f"<= {most}", got,
                        rid))
                low = max(0, getattr(quotas, name) - most)
                if kind == "usage" and got < low:
                    raise _Diverged(Divergence(
                        seq, f"quota usage the decision saw ({name}: at least the quotas less "
                        "the least room on its chain after the tree's earlier changes)",
                        f">= {low}", got, rid))


@dataclass
class _Snapshot:
    """A child's recorded view of the shared workspace (its initial tree when it started, its
    final tree when it ended), which must equal the rebuilt tree at some point of the merged
    order between ``lo`` and ``hi`` (counted in changes applied)."""

    run_id: str
    seq: int | None
    what: str
    digest: str
    lo: int
    hi: int
    done: bool = False


def _snapshot_checks(walked: list[_Replayer], links: dict[str, tuple[_Replayer, int]],
                     order: list[_Effect]) -> list[_Snapshot]:
    """The windows of the merged order where each child's initial and final trees must appear.

    The loop serves one request at a time, so: a child's initial tree is taken while its
    parent's spawn is served (after the parent's changes before the decision, before the
    parent's next change and the child's first); its final tree when it ends, after every
    change of its own subtree (descendants end first) and before its parent's changes recorded
    after its ``spawn.exit``."""
    where: dict[str, list[int]] = {}
    for k, e in enumerate(order, 1):
        where.setdefault(e.run_id, []).append(k)

    def parent_changes(parent: _Replayer, after: bool, seq: int) -> list[int]:
        return [k for k, e in enumerate(order, 1) if e.run_id == parent.report.run_id
                and (e.seq > seq if after else e.seq < seq)]

    def subtree(rid: str) -> list[str]:
        kids = [c for c, (p, _) in links.items() if p.report.run_id == rid]
        return [rid, *(x for c in kids for x in subtree(c))]

    n = len(order)
    out: list[_Snapshot] = []
    for r in walked:
        rid = str(r.report.run_id)
        if rid not in links:
            continue  # the root: its final tree is checked at the end
        parent, dseq = links[rid]
        mine = where.get(rid, [])
        lo_init = max(parent_changes(parent, False, dseq), default=0)
        hi_init = min([*mine, *parent_changes(parent, True, dseq)], default=n + 1) - 1
        snap = next((e for e in r.events if e["type"] == "snapshot.initial"), None)
        if snap is not None and isinstance(snap["body"].get("tree_digest"), str):
            out.append(_Snapshot(rid, snap["seq"], "the child's initial tree (snapshot.initial)",
                                 snap["body"]["tree_digest"], lo_init, hi_init))
        end = r.events[-1] if r.events and r.events[-1]["type"] == "run.end" else None
        recovered = any(e["type"] == "run.recovered" for e in r.events)
        if (end is not None and not recovered
                and isinstance(end["body"].get("final_tree_digest"), str)):
            # (a recovered folder's final tree is the workspace observed after the crash: the
            # root's, checked at the end)
            lo = max([k for x in subtree(rid) for k in where.get(x, [])], default=lo_init)
            exit_seq = next((e["seq"] for e in parent.events if e["type"] == "spawn.exit"
                             and e["body"].get("child") == rid), None)
            hi = (min(parent_changes(parent, True, exit_seq), default=n + 1) - 1
                  if exit_seq is not None else n)
            out.append(_Snapshot(rid, end["seq"], "the child's final tree (run.end)",
                                 end["body"]["final_tree_digest"], max(lo, lo_init), hi))
    return out


def _probe(snaps: list[_Snapshot], tree: Path, k: int) -> None:
    """Match the open snapshot checks against the tree after ``k`` changes (``k`` < 0: all
    changes are applied; any check still open fails)."""
    open_ = [c for c in snaps if not c.done and c.lo <= k <= c.hi]
    if open_:
        got = manifest.tree_digest(manifest.scan(tree))
        for c in open_:
            c.done = c.digest == got
    for c in snaps:
        if not c.done and (c.hi == k or k < 0):
            raise _Diverged(Divergence(
                c.seq, f"{c.what}: no state of the shared workspace between change {c.lo} and "
                f"{c.hi} of the tree's tseq order has it", c.digest, "none matched", c.run_id))


def _check_final(tree: Path, unfinished: list[tuple[WriteRequest, bytes, Decision]],
                 events: list[dict[str, Any]], final_bytes: bytes, final: dict[str, Any],
                 report: ReplayReport) -> None:
    want = sha256_digest(final_bytes)
    end = events[-1]["body"] if events and events[-1]["type"] == "run.end" else {}
    recorded_end = end.get("final_tree_digest")
    if recorded_end is not None and recorded_end != want:
        raise _diverge(events[-1]["seq"], "run.end final_tree_digest vs final/tree.json",
                       recorded_end, want)
    report.unfinished = len(unfinished)
    rebuilt = manifest.scan(tree)
    got = manifest.tree_digest(rebuilt)
    if got != want and unfinished:
        # A crash left an allowed write without a recorded result: its effect is unknown and
        # the observed final tree (recorded by recovery) decides whether it happened.
        ws = Workspace.open(tree, view_root=str(tree))
        try:
            for req, content, d in unfinished:
                _perform(ws, req, content, d)
        finally:
            ws.close()
        rebuilt = manifest.scan(tree)
        got = manifest.tree_digest(rebuilt)
        if got == want:
            report.notes.append("an unfinished write (crash) had taken effect")
    elif unfinished:
        report.notes.append("an unfinished write (crash) had not taken effect")
    report.final_tree_digest = got
    if got != want:
        first = _first_difference(final["entries"],
                                  json.loads(manifest.manifest_bytes(rebuilt))["entries"])
        raise _diverge(None, "final workspace tree (re-applied changes vs final/tree.json)",
                       want, f"{got} ({first})")


def _check_gate(events: list[dict[str, Any]], policy: Policy) -> None:
    """A recorded gate report must be what the pure gate function makes of the recorded
    evidence (the events before it)."""
    from kernel import gates

    task_ev = next((e for e in events if e["type"] == "gate.task"), None)
    for e in events:
        if e["type"] != "gate.report":
            continue
        if task_ev is None:
            raise _diverge(e["seq"], "gate.report without a recorded gate.task", "gate.task",
                           None)
        task = gates.task_from_record(task_ev["body"])
        got = gates.evaluate(policy, task, gates.evidence_from_events(events[: e["seq"]]))
        if got != e["body"]:
            raise _diverge(e["seq"], "gate report (re-evaluated from the recorded evidence)",
                           e["body"], got)


__all__ = ["DIVERGED", "IDENTICAL", "UNVERIFIED", "Divergence", "ReplayReport", "replay_run"]
