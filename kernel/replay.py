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
     recorded content blob is applied to the rebuilt tree through the kernel's own ``perform``
     (by fd, beneath the root), and the outcome (success and result, or the errno) must equal
     the recorded one; an ``exec`` is never re-run (its output is evidence, kept as blobs);

5. the rebuilt final tree must hash to ``final/tree.json`` and to ``run.end``'s
   ``final_tree_digest``. A run cut short by a crash and sealed by ``kernel recover`` may end with
   one allowed write whose result was never recorded; its effect is unknown, and the recorded
   (observed) final tree decides: replay accepts the tree with or without it.

No clock, environment variable or randomness is read by any of this. The first divergence is
reported with its ``seq``, what was expected (recorded) and what replay got.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import stat
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
from kernel.recorder import LOG_FILE, MANIFESTS, POLICY_FILE, REDACTED, blob_relpath
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

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "what": self.what, "expected": self.expected,
                "actual": self.actual}

    def __str__(self) -> str:
        where = f"seq {self.seq}" if self.seq is not None else "run"
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

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "run_id": self.run_id, "events": self.events,
                "rederived": self.rederived, "refusals": self.refusals,
                "applied": self.applied, "initial_source": self.initial_source,
                "final_tree_digest": self.final_tree_digest,
                "divergence": self.divergence.to_json() if self.divergence else None,
                "problem": self.problem, "verify_status": self.verify_status,
                "unfinished": self.unfinished, "gates": self.gates, "notes": list(self.notes)}


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


class _Replayer:
    def __init__(self, run_dir: Path, policy: Policy, events: list[dict[str, Any]],
                 tree: Path, report: ReplayReport) -> None:
        self.run_dir = run_dir
        self.policy = policy
        self.events = events
        self.tree = tree
        self.report = report
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

    def run(self, initial_digest: str) -> None:
        self.ws = Workspace.open(self.tree, view_root=str(self.tree))
        try:
            for ev in self.events:
                t = ev["type"]
                if t == "snapshot.initial" and ev["body"].get("tree_digest") != initial_digest:
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
        finally:
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
        if "facts" not in b:
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
        if recorded_usage != self.usage:
            raise _diverge(seq, "quota usage the decision saw (re-derived from earlier events)",
                           evidence.usage_record(recorded_usage),
                           evidence.usage_record(self.usage))
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
            d = self._after_approval(req, b, now_ns)
        else:
            d = (check_write(req, self.policy, self.usage, now_ns)
                 if isinstance(req, WriteRequest)
                 else check_exec(req, self.policy, self.usage, now_ns))
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
            if ref is None and req.payload_bytes == 0:
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

    def _after_approval(self, req: WriteRequest | ExecRequest, b: dict[str, Any],
                        now_ns: int) -> Decision:
        """Re-decide a settled approval with the recorded outcome of the wait.

        The outcome (approved, denied, expired) is taken from the record; the reviewer
        signatures behind it are checked by the approval verifier, not here.
        """
        from kernel import decide

        outcome = decide.ApprovalOutcome(
            str(b["approval_outcome"]), "", tuple(b.get("approvals") or ()))
        check: Any = check_write if isinstance(req, WriteRequest) else check_exec
        result: Decision = check(req, self.policy, self.usage, now_ns, approval=outcome)
        return result

    def perform(self, req: WriteRequest, content: bytes, d: Decision) -> dict[str, Any]:
        from syscalls import write as write_sys  # the kernel's own effect code

        assert self.ws is not None
        try:
            result = write_sys.perform(grant(d, req), self.ws, content)
        except OSError as e:
            return {"ok": False, "errno": e.errno or 0}
        return {"ok": True, "result": result}

    def on_result(self, ev: dict[str, Any]) -> None:
        seq, b = ev["seq"], ev["body"]
        key = (b.get("req"), b.get("request_digest"))
        if key not in self.pending:
            return  # the result of an exec (never re-run) or of an info request
        dseq, req, content, d = self.pending.pop(key)
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


def replay_run(run_dir: Path, trusted: Sequence[Ed25519PublicKey], *,
               workspace: Path | None = None, rerun_gates: bool = False) -> ReplayReport:
    """Verify, then replay ``run_dir``. Never raises for anything in the folder."""
    run_dir = Path(run_dir)
    vr = verify_run(run_dir, trusted)
    report = ReplayReport(status=UNVERIFIED, run_id=vr.run_id, events=vr.events,
                          verify_status=vr.status)
    if vr.status != INTACT:
        report.problem = (f"the run folder is {vr.status}"
                          + (f": {vr.problem}" if vr.problem else "")
                          + ("; seal it with `kernel recover` first" if vr.status ==
                             "incomplete" else ""))
        return report
    try:
        policy = load_bytes((run_dir / POLICY_FILE).read_bytes(),
                            source=str(run_dir / POLICY_FILE))
    except PolicyError as e:
        report.problem = f"the recorded policy does not load: {e.message}"
        return report
    events = [json.loads(line) for line in (run_dir / LOG_FILE).read_bytes().splitlines()]
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
            r = _Replayer(run_dir, policy, events, tree, report)
            r.run(sha256_digest(initial_bytes))
            if r.redacted_at is not None:
                _check_gate(events, policy)
                raise _Unreplayable(
                    f"the content written at seq {r.redacted_at} held a secret value and is "
                    "recorded redacted, so the workspace cannot be rebuilt past it (all "
                    f"{report.rederived} decisions were re-derived identically)",
                    needs_workspace=False)
            _check_final(r, events, final_bytes, final, report)
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
        _rmtree(tmp)
    return report


def _check_final(r: _Replayer, events: list[dict[str, Any]], final_bytes: bytes,
                 final: dict[str, Any], report: ReplayReport) -> None:
    want = sha256_digest(final_bytes)
    end = events[-1]["body"] if events and events[-1]["type"] == "run.end" else {}
    recorded_end = end.get("final_tree_digest")
    if recorded_end is not None and recorded_end != want:
        raise _diverge(events[-1]["seq"], "run.end final_tree_digest vs final/tree.json",
                       recorded_end, want)
    recovered = any(e["type"] == "run.recovered" for e in events)
    unfinished = r.finish_unfinished() if recovered else []
    report.unfinished = len(unfinished)
    rebuilt = manifest.scan(r.tree)
    got = manifest.tree_digest(rebuilt)
    if got != want and unfinished:
        # A crash left an allowed write without a recorded result: its effect is unknown and
        # the observed final tree (recorded by recovery) decides whether it happened.
        r.ws = Workspace.open(r.tree, view_root=str(r.tree))
        try:
            for req, content, d in unfinished:
                r.perform(req, content, d)
        finally:
            r.ws.close()
        rebuilt = manifest.scan(r.tree)
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


def _rmtree(path: Path) -> None:
    def onerror(func: Any, p: str, exc: Any) -> None:
        try:
            parent = os.path.dirname(p)
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | 0o700)
            func(p)
        except OSError as e:
            if e.errno != errno.ENOENT:
                pass

    shutil.rmtree(path, onerror=onerror)


__all__ = ["DIVERGED", "IDENTICAL", "UNVERIFIED", "Divergence", "ReplayReport", "replay_run"]
