"""Gates: success is never what the agent says; it is what the evidence shows.

After the agent ends, the task's verification commands run, each in a fresh sandbox of the run's
backend with the workspace **read-only** (a writable scratch ``/tmp`` only); their exit codes and
output are recorded (the *verifier report*: one ``verification.result`` event each, output in
blobs). Then :func:`evaluate` turns the evidence into the *gate report* (``gate.report``).

:func:`evaluate` is a pure function of ``(policy, task, evidence)``: no I/O, clock or
environment, so ``kernel replay`` recomputes every gate report from the recorded events and a
golden table (tests/golden/) pins its answers. :func:`evidence_from_events` reads the evidence
from the run's own log: the agent's exit (``agent.exit``), every decision (denials; requests still
``pending``) and the verifier report.

The rules come from the task file and from the policy's ``[gate]`` table; where both set one,
the stricter applies (a rule on in either is on; the lower ``max_denials``; both lists of
``forbid_denials``). A run under a policy with gate rules but without a task is gated too, with
no verification command. Rules, checked in this order (all must pass):

=========================  =====================================================================
``agent_exit_zero``        the agent exited 0 (its own status is evidence too, not the verdict)
``all_verifications_pass`` every verification named by the task ran, exited 0, did not time out
``no_pending_approvals``   no request is still waiting for a reviewer's decision
``max_denials``            at most N requests were denied (``-1``: rule off)
``forbid_denials``         no denial's rule id matches one of these globs (``fnmatch``)
=========================  =====================================================================
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel.errors import KernelError
from kernel.policy import Policy
from kernel.task import GateRules, Task, Verification

if TYPE_CHECKING:
    from kernel.context import RunContext
    from sandbox.base import Backend

OUTPUT_CAP = 1 << 20
DENIED_DECISIONS = ("denied", "expired")


@dataclass(frozen=True)
class VerificationResult:
    name: str
    exit_code: int | None
    """None when the command could not be started (``error`` says why)."""
    timed_out: bool = False
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.error is None


@dataclass(frozen=True)
class Evidence:
    agent_exit: int | None
    agent_status: str
    denials: tuple[tuple[int, str], ...] = ()
    """``(seq, rule)`` of every denied (or expired) decision."""
    pending: tuple[int, ...] = ()
    """Seqs of ``pending`` decisions that no later decision resolved."""
    verifications: tuple[VerificationResult, ...] = ()


def effective_rules(policy: Policy, task: Task) -> GateRules:
    """The task's rules and the policy's ``[gate]`` together: the stricter of each applies."""
    p, t = policy.gate, task.gate
    limits = [m for m in (p.max_denials, t.max_denials) if m >= 0]
    return GateRules(
        agent_exit_zero=p.agent_exit_zero or t.agent_exit_zero,
        all_verifications_pass=p.all_verifications_pass or t.all_verifications_pass,
        no_pending_approvals=p.no_pending_approvals or t.no_pending_approvals,
        max_denials=min(limits) if limits else -1,
        forbid_denials=tuple(dict.fromkeys((*t.forbid_denials, *p.forbid_denials))))


def evaluate(policy: Policy, task: Task, ev: Evidence) -> dict[str, Any]:
    """The gate report. Pure: same inputs, same report, byte for byte (canonical JSON)."""
    g = effective_rules(policy, task)
    rules: list[dict[str, Any]] = []

    def rule(rid: str, ok: bool, detail: str) -> None:
        rules.append({"rule": rid, "passed": ok, "detail": detail})

    if g.agent_exit_zero:
        rule("agent_exit_zero", ev.agent_exit == 0,
             f"agent exited {ev.agent_exit} (run status {ev.agent_status})")
    if g.all_verifications_pass:
        got = {v.name: v for v in ev.verifications}
        bad = []
        for v in task.verify:
            r = got.get(v.name)
            if r is None:
                bad.append(f"{v.name}: did not run")
            elif not r.passed:
                why = r.error or ("timed out" if r.timed_out else f"exited {r.exit_code}")
                bad.append(f"{v.name}: {why}")
        if not task.verify:
            rule("all_verifications_pass", True, "the task names no verification command")
        else:
            rule("all_verifications_pass", not bad,
                 "; ".join(bad) if bad else f"{len(task.verify)} of {len(task.verify)} passed")
    if g.no_pending_approvals:
        rule("no_pending_approvals", not ev.pending,
             f"pending at seq {', '.join(map(str, ev.pending))}" if ev.pending
             else "no request is waiting for review")
    if g.max_denials >= 0:
        n = len(ev.denials)
        rule("max_denials", n <= g.max_denials, f"{n} denied, at most {g.max_denials} allowed")
    if g.forbid_denials:
        hits = [(s, r) for s, r in ev.denials
                if any(fnmatch.fnmatchcase(r, pat) for pat in g.forbid_denials)]
        rule("forbid_denials", not hits,
             "; ".join(f"seq {s}: {r}" for s, r in hits) if hits
             else f"no denial matches {', '.join(g.forbid_denials)}")
    return {"passed": all(r["passed"] for r in rules), "rules": rules,
            "policy_digest": policy.digest, "task_digest": task.digest}


def evidence_from_events(events: Sequence[dict[str, Any]]) -> Evidence:
    """The gate's evidence, read from a run's log (the only source of truth)."""
    agent_exit: int | None = None
    agent_status = "unknown"
    denials: list[tuple[int, str]] = []
    pending: dict[tuple[Any, Any], int] = {}
    verifs: list[VerificationResult] = []
    for e in events:
        t, b = e["type"], e["body"]
        if t == "agent.exit":
            agent_exit = b.get("exit_code") if type(b.get("exit_code")) is int else None
            agent_status = str(b.get("status"))
        elif t == "syscall.decision":
            key = (b.get("req"), b.get("request_digest"))
            pending.pop(key, None)
            if b.get("decision") == "pending":
                pending[key] = e["seq"]
            elif b.get("decision") in DENIED_DECISIONS:
                denials.append((e["seq"], str(b.get("rule"))))
        elif t == "verification.result":
            code = b.get("exit_code")
            verifs.append(VerificationResult(str(b.get("name")),
                                             code if type(code) is int else None,
                                             bool(b.get("timed_out")), b.get("error")))
    return Evidence(agent_exit=agent_exit, agent_status=agent_status, denials=tuple(denials),
                    pending=tuple(sorted(pending.values())), verifications=tuple(verifs))


def task_from_record(d: dict[str, Any]) -> Task:
    """The task as the run recorded it (``gate.task``)."""
    g = d.get("gate") or {}
    return Task(command=tuple(d.get("command") or ()), workspace=Path(str(d.get("workspace"))),
                policy=str(d.get("policy")), description=str(d.get("description") or ""),
                verify=tuple(Verification(str(v["name"]), tuple(v["argv"]),
                                          int(v.get("timeout_seconds", 120)))
                             for v in d.get("verify") or ()),
                gate=GateRules(agent_exit_zero=bool(g.get("agent_exit_zero", True)),
                               all_verifications_pass=bool(g.get("all_verifications_pass",
                                                                 True)),
                               no_pending_approvals=bool(g.get("no_pending_approvals", True)),
                               max_denials=int(g.get("max_denials", -1)),
                               forbid_denials=tuple(g.get("forbid_denials") or ())),
                source=str(d.get("source") or ""), digest=str(d.get("digest") or ""))


# ---- running the verification commands (not pure: sandboxes) ----


def run_verification(backend: Backend, policy: Policy, v: Verification, *, tree: Path,
                     view: Path, env: dict[str, str], hidden: tuple[Path, ...],
                     read_paths: tuple[Path, ...]) -> tuple[dict[str, Any], bytes, bytes]:
    """Run one verification command sandboxed, the workspace ``tree`` read-only at ``view``."""
    from sandbox.base import SandboxSpec
    from syscalls import exec as exec_sys

    path_env = policy.env.set.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    resolved = exec_sys.resolve_program(v.argv[0], path_env)
    rec: dict[str, Any] = {"name": v.name, "argv": list(v.argv), "resolved": resolved,
                           "timeout_seconds": v.timeout_seconds}
    if resolved is None:
        rec.update(exit_code=None, timed_out=False,
                   error=f"{v.argv[0]!r} is not a program on the sandbox PATH")
        return rec, b"", b""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    spec = SandboxSpec(argv=(resolved, *v.argv[1:]), workspace=tree, workspace_view=view,
                       workspace_writable=False, cwd=view, env=env, limits=policy.limits,
                       scratch_bytes=policy.sandbox.scratch_mb << 20, stdin=None,
                       stdout=out_w, stderr=err_w, hidden=hidden, read_paths=read_paths,
                       wall_seconds=float(v.timeout_seconds))
    started = time.monotonic()
    try:
        sb = backend.start(spec)
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    try:
        outs, timed_out = exec_sys._collect(sb, out_r, err_r, OUTPUT_CAP, v.timeout_seconds)
        code = sb.wait(5.0)
        if code is None:
            sb.kill()
            code = sb.wait(5.0)
        breach = sb.breach()
    finally:
        os.close(out_r)
        os.close(err_r)
        sb.cleanup()
    rec.update(exit_code=code, timed_out=timed_out, breach=breach, error=None,
               elapsed_ms=int((time.monotonic() - started) * 1000))
    return rec, outs[0][0], outs[1][0]


def run_gate(ctx: RunContext, task: Task, status: str = "") -> dict[str, Any]:
    """The live run's gate: record the task, run and record the verifications, evaluate.

    A run the kernel was told to stop (``killed``) runs no verification: each is recorded as
    not run, so the gate fails unless the task does not require them.
    """
    from kernel.recorder import LOG_FILE

    rec = ctx.recorder
    rec.append("gate.task", task.as_record())
    for v in task.verify:
        env = {k: val for k, val in ctx.agent_env.items() if not k.startswith("KERNEL_")}
        if status == "killed":
            rec.append("verification.result", {
                "name": v.name, "argv": list(v.argv), "resolved": None,
                "timeout_seconds": v.timeout_seconds, "exit_code": None, "timed_out": False,
                "error": "not run: the kernel was told to stop the run"})
            continue
        try:
            body, out, err = run_verification(ctx.backend, ctx.policy, v, tree=ctx.workspace,
                                              view=Path(ctx.view_root), env=env,
                                              hidden=ctx.hidden_abs,
                                              read_paths=ctx.read_paths)
        except (KernelError, OSError) as e:  # recorded as a failed verification; run sealed
            body, out, err = ({"name": v.name, "argv": list(v.argv), "resolved": None,
                               "timeout_seconds": v.timeout_seconds, "exit_code": None,
                               "timed_out": False,
                               "error": f"the sandbox could not start: {e}"}, b"", b"")
        body["stdout_blob"] = rec.put_blob(out)
        body["stderr_blob"] = rec.put_blob(err)
        rec.append("verification.result", body)
    events = [json.loads(line) for line in
              (rec.run_dir / LOG_FILE).read_bytes().splitlines()]
    report = evaluate(ctx.policy, task, evidence_from_events(events))
    rec.append("gate.report", report)
    return report


def rerun_recorded(run_dir: Path, events: Sequence[dict[str, Any]], policy: Policy,
                   tree: Path) -> dict[str, Any]:
    """``kernel replay --rerun-gates``: run the recorded verifications on the replayed tree."""
    from kernel import agentenv
    from kernel.recorder import RUN_JSON
    from sandbox import registry

    task_ev = next((e for e in events if e["type"] == "gate.task"), None)
    if task_ev is None:
        return {"same": None, "detail": "the run had no task, so no verification to re-run"}
    task = task_from_record(task_ev["body"])
    header = json.loads((run_dir / RUN_JSON).read_bytes())
    backend, _ = registry.choose(str(header.get("isolation") or policy.sandbox.isolation))
    view = Path(str(header.get("workspace") or tree))
    env = agentenv.build(policy, {}, {}).env
    recorded = {e["body"]["name"]: e["body"] for e in events
                if e["type"] == "verification.result"}
    rows_recorded, rows_rerun = [], []
    results: list[VerificationResult] = []
    for v in task.verify:
        body, _, _ = run_verification(backend, policy, v, tree=tree, view=view, env=env,
                                      hidden=(), read_paths=tuple(
                                          Path(p) for p in policy.sandbox.read_paths))
        r = recorded.get(v.name, {})
        rows_recorded.append({"name": v.name, "exit_code": r.get("exit_code"),
                              "timed_out": r.get("timed_out")})
        rows_rerun.append({"name": v.name, "exit_code": body.get("exit_code"),
                           "timed_out": body.get("timed_out")})
        results.append(VerificationResult(v.name, body.get("exit_code"),
                                          bool(body.get("timed_out")), body.get("error")))
    base = evidence_from_events(events)
    again = Evidence(base.agent_exit, base.agent_status, base.denials, base.pending,
                     tuple(results))
    gate_rerun = evaluate(policy, task, again)
    gate_recorded = next((e["body"] for e in events if e["type"] == "gate.report"), None)
    return {"same": rows_recorded == rows_rerun, "recorded": rows_recorded,
            "rerun": rows_rerun, "gate_recorded": gate_recorded, "gate_rerun": gate_rerun}
