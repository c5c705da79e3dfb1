"""The pure decision function: ``check(request, policy, usage, now) -> Decision``.

No I/O, no clock, no environment, no randomness: everything the decision depends on is an
argument, so ``kernel replay`` can re-run it on the recorded request and get the same answer.
Facts that need the filesystem (is a path component a symlink? a device?) are gathered *before*
the check by the handler's ``prepare`` step and travel in the request as data.

Decisions are data. A denial carries the id of the rule that made it, a reason for the agent,
and an errno. Checks run in the order SPEC §5 gives and the first denial wins.
"""

from __future__ import annotations

import errno
import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from kernel.policy import CommandRule, Policy

ALLOWED = "allowed"
DENIED = "denied"
PENDING = "pending"
"""Waits for reviewers: the decision carries the :class:`ApprovalNeed`."""
APPROVED = "approved"
"""Allowed after the approvals the policy asks for (recorded as evidence)."""
EXPIRED = "expired"
"""No reviewer decided before the policy's timeout: a denial."""


@dataclass(frozen=True)
class ApprovalNeed:
    """What a pending request needs: ``threshold`` approvals by distinct keys of ``eligible``."""

    threshold: int
    eligible: tuple[tuple[str, str], ...]
    """``(reviewer name, raw public key hex)`` of every reviewer who may decide."""
    operator_may_approve: bool
    timeout_seconds: int

    def as_record(self) -> dict[str, object]:
        return {"threshold": self.threshold,
                "eligible": [{"name": n, "public_key": k} for n, k in self.eligible],
                "operator_may_approve": self.operator_may_approve,
                "timeout_seconds": self.timeout_seconds}


@dataclass(frozen=True)
class ApprovalOutcome:
    """The recorded result of a wait: ``approved``, ``denied`` or ``expired`` (plus who/why)."""

    outcome: str
    reason: str = ""
    approvals: tuple[int, ...] = ()
    """Seqs of the ``approval.received`` records that approved."""


@dataclass(frozen=True)
class Decision:
    decision: str
    """``allowed``, ``denied``, ``pending`` (then ``approved``, ``denied`` or ``expired``)."""
    rule: str
    """Id of the deciding rule (``protected:.git/**``, ``command:git-read``, ``quota.bytes``)."""
    reason: str
    errno: int = 0
    need: ApprovalNeed | None = None

    @property
    def allowed(self) -> bool:
        return self.decision in (ALLOWED, APPROVED)

    @property
    def pending(self) -> bool:
        return self.decision == PENDING

    def as_record(self) -> dict[str, object]:
        rec: dict[str, object] = {"decision": self.decision, "rule": self.rule,
                                  "reason": self.reason, "errno": self.errno}
        if self.need is not None:
            rec["approval"] = self.need.as_record()
        return rec


def deny(rule: str, reason: str, code: int = errno.EACCES) -> Decision:
    return Decision(DENIED, rule, reason, code)


@dataclass(frozen=True)
class Usage:
    """What the run has spent so far (quota ledger)."""

    syscalls: int = 0
    bytes_written: int = 0
    files_written: int = 0
    exec_count: int = 0


@dataclass(frozen=True)
class PathFacts:
    """What ``prepare`` learned about one normalized path, by file descriptor, before deciding.

    ``violation`` is set when the path cannot be used at all (escape, symlink component, special
    file, hard link, bad bytes): ``(rule, reason, errno)``.
    """

    rel: str
    """Normalized path relative to the workspace root (``a/b.txt``; ``""`` is the root)."""
    exists: bool = False
    kind: str = "none"
    """``file``, ``dir``, ``symlink``, ``none`` (special files are violations)."""
    size: int = 0
    violation: tuple[str, str, int] | None = None


@dataclass(frozen=True)
class WriteRequest:
    op: str
    target: PathFacts
    dest: PathFacts | None = None
    """For ``rename``: the destination."""
    new_size: int = 0
    """Size of the file after the operation (``write``/``create``/``append``)."""
    payload_bytes: int = 0
    """Bytes of content in the request (counted against ``quotas.bytes_written``)."""
    mode: int | None = None
    captured: bool = False
    """True when the change was captured from an ``exec``'d command rather than asked for."""
    parents: bool = False
    """For ``mkdir``: also create missing parent directories."""


@dataclass(frozen=True)
class ExecRequest:
    argv: tuple[str, ...]
    resolved: str | None
    """Absolute, symlink-resolved path of ``argv[0]`` on the sandbox PATH; ``None`` if not
    found."""
    candidates: dict[str, str] = field(default_factory=dict)
    """Command rule id -> absolute, symlink-resolved path of that rule's program."""
    cwd: PathFacts = PathFacts(rel="")


def check_quota_syscalls(policy: Policy, usage: Usage) -> Decision | None:
    if usage.syscalls >= policy.quotas.syscalls:
        return deny("quota.syscalls",
                    f"syscall quota of {policy.quotas.syscalls} requests is spent", errno.EDQUOT)
    return None


@lru_cache(maxsize=512)
def _glob_re(glob: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = glob.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = glob[i + 1 : j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"(?!/)[{body}]")
                i = j + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def glob_matches(glob: str, rel: str) -> bool:
    """Protected-path matching; see ``ProtectedPath.glob`` for the rules."""
    if not rel:
        return False
    if "/" not in glob:
        rx = _glob_re(glob)
        return any(rx.match(part) for part in rel.split("/"))
    if glob.endswith("/**") and rel == glob[:-3]:
        return True
    return bool(_glob_re(glob).match(rel))


def approval_need(policy: Policy, rule: str, what: str, threshold: int,
                  approvers: Sequence[str], operator_may_approve: bool) -> Decision:
    """The pending decision for an action that needs approval, or a denial when the policy
    trusts too few eligible reviewer keys for it ever to be approved."""
    eligible = tuple((r.name, r.public_key) for r in policy.trusted_reviewers()
                     if not approvers or r.name in approvers)
    if len(eligible) < threshold:
        return deny(rule, f"{what}: needs approval by {threshold} reviewer(s), but the policy "
                    f"trusts {len(eligible)} eligible reviewer key(s); refused")
    need = ApprovalNeed(threshold, eligible, operator_may_approve,
                        policy.approvals.timeout_seconds)
    return Decision(PENDING, rule, f"{what}: waits for {threshold} reviewer approval(s)",
                    errno.EACCES, need)


def after_approval(pending: Decision, outcome: ApprovalOutcome | None) -> Decision | None:
    """None when approved (later checks go on); else the final denial or the pending decision."""
    if outcome is None:
        return pending
    if outcome.outcome == APPROVED:
        return None
    if outcome.outcome == EXPIRED:
        return Decision(EXPIRED, pending.rule, f"no reviewer decided in time; {outcome.reason}",
                        errno.EACCES)
    return deny(pending.rule, f"denied by review: {outcome.reason}")


def protected_rule(policy: Policy, rel: str) -> Decision | None:
    """The strictest protected rule matching ``rel`` (``deny`` beats ``approval``)."""
    hit: Decision | None = None
    for pr in policy.protected:
        if glob_matches(pr.glob, rel):
            if pr.action == "deny":
                return deny(f"protected:{pr.glob}", f"{rel}: protected ({pr.reason})")
            if hit is None:
                hit = approval_need(policy, f"protected:{pr.glob}",
                                    f"{rel}: protected ({pr.reason})", pr.approvals_required,
                                    pr.approvers, pr.operator_may_approve)
    return hit


def _path_checks(facts: Sequence[PathFacts]) -> Decision | None:
    for f in facts:
        if f.violation is not None:
            rule, reason, code = f.violation
            return deny(rule, reason, code)
    return None


def check_write(req: WriteRequest, policy: Policy, usage: Usage, now_ns: int,
                approval: ApprovalOutcome | None = None) -> Decision:
    """Decide one ``write`` request (or one change captured from an ``exec``).

    A protected path with ``approval`` gives ``pending`` until ``approval`` (the recorded outcome
    of the wait) is passed in; then ``approved`` if the later checks pass too.
    """
    del now_ns  # expiry is decided from recorded times by kernel/approvals.py
    approved: Decision | None = None
    facts = [req.target] + ([req.dest] if req.dest is not None else [])
    bad = _path_checks(facts)
    if bad:
        return bad
    for f in facts:
        if f.rel == "":
            return deny("path.root", "the workspace root itself cannot be changed", errno.EPERM)
    for f in facts:
        hit = protected_rule(policy, f.rel)
        if hit and not hit.pending:
            return hit
        if hit and approved is None:
            final = after_approval(hit, approval)
            if final is not None:
                return final
            approved = hit
    if req.op in ("write", "create", "append") and req.new_size > policy.write.max_file_bytes:
        return deny("write.max_file_bytes",
                    f"{req.target.rel}: {req.new_size} bytes exceeds the "
                    f"{policy.write.max_file_bytes}-byte file limit", errno.EFBIG)
    if req.mode is not None and req.mode & ~0o777:
        return deny("write.mode", f"mode {req.mode:#o}: only permission bits (0o777) may be set",
                    errno.EPERM)
    if usage.bytes_written + req.payload_bytes > policy.quotas.bytes_written:
        return deny("quota.bytes_written",
                    f"writing {req.payload_bytes} bytes would exceed the quota of "
                    f"{policy.quotas.bytes_written} bytes ({usage.bytes_written} used)",
                    errno.EDQUOT)
    if usage.files_written + 1 > policy.quotas.files_written:
        return deny("quota.files_written",
                    f"the quota of {policy.quotas.files_written} file changes is spent",
                    errno.EDQUOT)
    if approved is not None:
        return Decision(APPROVED, approved.rule, f"{req.target.rel}: approved by review")
    return Decision(ALLOWED, f"write.{req.op}", "allowed")


def _command_rule(req: ExecRequest, policy: Policy) -> CommandRule | None:
    if req.resolved is None:
        return None
    for c in policy.commands:
        if req.candidates.get(c.id) == req.resolved:
            return c
    return None


def check_exec(req: ExecRequest, policy: Policy, usage: Usage, now_ns: int,
               approval: ApprovalOutcome | None = None) -> Decision:
    """Decide one ``exec`` request: allowlist, argument rules, approval, quota."""
    del now_ns
    prog = req.argv[0] if req.argv else ""
    if req.resolved is None:
        return deny("exec.not_found", f"{prog!r} is not a program on the sandbox PATH",
                    errno.ENOENT)
    rule = _command_rule(req, policy)
    if rule is None:
        return deny("exec.not_allowlisted",
                    f"{req.resolved} is not on the command allowlist of this policy")
    rid = f"command:{rule.id}"
    args = req.argv[1:]
    if rule.subcommands and (not args or args[0] not in rule.subcommands):
        got = args[0] if args else "(none)"
        return deny(f"{rid}.subcommand",
                    f"{rule.program} subcommand {got!r} is not one of "
                    f"{', '.join(rule.subcommands)}")
    for a in args:
        for pat in rule.deny_args:
            if fnmatch.fnmatchcase(a, pat):
                return deny(f"{rid}.deny_args", f"argument {a!r} matches denied pattern {pat!r}")
    if req.cwd.violation is not None:
        r, reason, code = req.cwd.violation
        return deny(r, reason, code)
    approved = False
    if rule.approval:
        need = approval_need(policy, f"{rid}.approval", f"{rule.program}", rule.approvals_required,
                             rule.approvers, rule.operator_may_approve)
        if not need.pending:
            return need
        final = after_approval(need, approval)
        if final is not None:
            return final
        approved = True
    if usage.exec_count + 1 > policy.quotas.exec_count:
        return deny("quota.exec_count",
                    f"the quota of {policy.quotas.exec_count} exec requests is spent",
                    errno.EDQUOT)
    if approved:
        return Decision(APPROVED, rid, f"{rule.program}: approved by review")
    return Decision(ALLOWED, rid, rule.reason or "allowlisted")


class Grant:
    """Proof that a request was allowed. Only :func:`grant` makes one (``perform`` needs it).

    A handler's ``perform`` takes a Grant, so no code path can apply an effect without having
    gone through a decision first (trio's NoPublicConstructor idea).
    """

    __slots__ = ("decision", "request")
    _token = object()

    def __init__(self, token: object, decision: Decision, request: object) -> None:
        if token is not Grant._token:
            raise TypeError("a Grant is made only by kernel.decide.grant()")
        self.decision = decision
        self.request = request


def grant(decision: Decision, request: object) -> Grant:
    if not decision.allowed:
        raise ValueError(f"cannot grant a {decision.decision} request ({decision.rule})")
    return Grant(Grant._token, decision, request)
