"""The ``exec`` syscall: run an allowlisted command for the agent in a fresh sandbox.

Why this is safe:

* The program is resolved to an absolute, symlink-free path on the policy's PATH and must be the
  very file a command rule names; arguments are checked against the rule's subcommands and denied
  patterns. There is never a shell: the argv goes to ``execve`` as a list.
* The command runs in a *fresh* sandbox of the run's backend, with the same guarantees as the
  agent (no network, minimal filesystem, limits), no syscall channel, and a wall-clock cap.
* It works in a private copy of the workspace. Nothing it does reaches the workspace directly:
  afterwards the kernel diffs the copy against its starting state, and every change goes through
  exactly the same checks as a ``write`` request (path rules, protected paths, quotas), is
  recorded with its own decision, and only then is applied by file descriptor beneath the root.
  Refused changes are recorded and dropped with the copy.
* Output is capped (the rest is read and discarded, so the command cannot block the kernel) and
  kept as content-addressed blobs.
"""

from __future__ import annotations

import base64
import binascii
import os
import selectors
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from kernel import approval_gate, evidence, failpoints, manifest
from kernel.canonical import digest_of
from kernel.context import RunContext
from kernel.decide import Decision, ExecRequest, Grant, PathFacts, check_exec, deny, grant
from kernel.dispatch import Outcome, apply_write, record_decision
from kernel.paths import normalize
from kernel.policy import CommandRule
from sandbox.base import SandboxSpec, spec_summary
from syscalls import abi
from syscalls import write as write_sys

MAX_ARGS = 4096
MAX_ARG_BYTES = 128 * 1024
MAX_STDIN = 16 * 1024 * 1024


def resolve_program(prog: str, path_env: str) -> str | None:
    """Absolute, symlink-resolved path of ``prog`` (a name looked up on ``path_env``, or an
    absolute path), or None when it is not an executable regular file."""
    if "/" in prog:
        if not prog.startswith("/"):
            return None
        cand: str | None = prog
    else:
        cand = shutil.which(prog, path=path_env)
    if cand is None:
        return None
    real = os.path.realpath(cand)
    if not os.path.isfile(real) or not os.access(real, os.X_OK):
        return None
    return real


def prepare(ctx: RunContext, args: dict[str, Any]) -> tuple[ExecRequest, bytes] | Decision:
    problem = abi.fields_problem("exec", args)
    if problem is not None:
        return deny("request.invalid", problem, 22)
    argv = args.get("argv")
    if (not isinstance(argv, list) or not argv or len(argv) > MAX_ARGS
            or not all(isinstance(a, str) for a in argv)):
        return deny("request.invalid", "exec: argv must be a non-empty list of strings", 22)
    if any("\x00" in a for a in argv) or sum(len(a.encode()) for a in argv) > MAX_ARG_BYTES:
        return deny("request.invalid", "exec: arguments hold NUL bytes or are too long", 22)
    stdin = b""
    if "stdin_b64" in args:
        raw = args["stdin_b64"]
        if not isinstance(raw, str):
            return deny("request.invalid", "exec: stdin_b64 must be a string", 22)
        try:
            stdin = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return deny("request.invalid", "exec: stdin_b64 is not valid base64", 22)
        if len(stdin) > MAX_STDIN:
            return deny("request.invalid", f"exec: stdin over {MAX_STDIN} bytes", 22)
    if "justification" in args and not isinstance(args["justification"], str):
        return deny("request.invalid", "exec: justification must be a string", 22)
    cwd = PathFacts(rel="", exists=True, kind="dir")
    raw_cwd = args.get("cwd")
    if raw_cwd is not None:
        if not isinstance(raw_cwd, str):
            return deny("request.invalid", "exec: cwd must be a string", 22)
        norm = normalize(raw_cwd, view_root=ctx.view_root, limits=ctx.policy.write)
        if isinstance(norm, tuple):
            cwd = PathFacts(rel=raw_cwd, violation=norm)
        elif norm:
            cwd = ctx.ws.facts(norm)
            if cwd.violation is None and cwd.kind != "dir":
                cwd = PathFacts(rel=norm, violation=(
                    "exec.cwd", f"cwd {norm!r} is not a directory of the workspace", 20))
    path_env = ctx.policy.env.set.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    candidates = {}
    for rule in ctx.policy.commands:
        r = resolve_program(rule.program, path_env)
        if r is not None:
            candidates[rule.id] = r
    req = ExecRequest(argv=tuple(argv), resolved=resolve_program(argv[0], path_env),
                      candidates=candidates, cwd=cwd)
    return req, stdin


def handle(ctx: RunContext, args: dict[str, Any], *, now_ns: int, request_digest: str,
           req: int) -> Outcome:
    prepared = prepare(ctx, args)
    if isinstance(prepared, Decision):
        decision, request, stdin = prepared, None, b""
    else:
        request, stdin = prepared
        usage = ctx.ledger.usage
        decision = check_exec(request, ctx.policy, usage, now_ns)
    extra = ({"resolved": request.resolved, "facts": evidence.exec_facts(request, usage)}
             if request is not None else None)
    dseq = record_decision(ctx, decision, req=req, request_digest=request_digest,
                           now_ns=now_ns, extra=extra)
    if decision.pending and request is not None:
        pending_request = request
        decision, dseq = approval_gate.settle(
            ctx, decision, pending_seq=dseq, req=req, request_digest=request_digest,
            action=approval_gate.exec_action(request, stdin),
            preview=approval_gate.exec_preview(ctx, request),
            recheck=lambda outcome, now: check_exec(pending_request, ctx.policy,
                                                    ctx.ledger.usage, now, outcome),
            extra={"resolved": request.resolved,
                   "facts": evidence.exec_facts(request, ctx.ledger.usage)})
    if not decision.allowed or request is None:
        return Outcome(decision, error=(decision.errno, decision.reason, decision.rule,
                                        approval_gate.answer(decision)), seq=dseq)
    ctx.ledger.debit(exec_count=1)
    result = perform(grant(decision, request), ctx, stdin, req=req,
                     request_digest=request_digest, now_ns=now_ns)
    rseq = ctx.recorder.append("syscall.result", {
        "req": req, "request_digest": request_digest, "ok": True,
        "result": {k: v for k, v in result.items() if not k.endswith("_b64")}})
    return Outcome(decision, result=result, seq=rseq)


def _rule_for(g: Grant, ctx: RunContext) -> CommandRule:
    rid = g.decision.rule.removeprefix("command:")
    for c in ctx.policy.commands:
        if c.id == rid:
            return c
    raise LookupError(f"granted rule {g.decision.rule} is not in the policy")  # kernel bug


def perform(g: Grant, ctx: RunContext, stdin: bytes, *, req: int, request_digest: str,
            now_ns: int) -> dict[str, Any]:
    """Run the granted command in a private copy and push its changes through ``write``."""
    request = g.request
    assert isinstance(request, ExecRequest) and request.resolved is not None
    rule = _rule_for(g, ctx)
    uid, gid = ctx.backend.agent_ids()
    work = Path(tempfile.mkdtemp(prefix="exec-", dir=ctx.scratch_dir))
    try:
        os.chmod(work, 0o711)  # noqa: S103 - the agent uid traverses to its copy
        copy = work / "ws"
        manifest.clone_tree(ctx.workspace, copy, exclude=ctx.hidden_rel, uid=uid, gid=gid)
        before = manifest.scan(copy)
        failpoints.hit("exec.copied")
        stdin_path = work / "stdin"
        stdin_path.write_bytes(stdin)
        stdin_fd = os.open(stdin_path, os.O_RDONLY | os.O_CLOEXEC)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        cwd = Path(ctx.view_root) / request.cwd.rel if request.cwd.rel else Path(ctx.view_root)
        spec = SandboxSpec(
            argv=(request.resolved, *request.argv[1:]), workspace=copy,
            workspace_view=Path(ctx.view_root), workspace_writable=True, cwd=cwd,
            env=dict(ctx.agent_env), limits=ctx.policy.limits,
            scratch_bytes=ctx.policy.sandbox.scratch_mb << 20, stdin=stdin_fd,
            stdout=out_w, stderr=err_w, hidden=ctx.hidden_abs, read_paths=ctx.read_paths,
            wall_seconds=float(rule.timeout_seconds),
        )
        started = time.monotonic()
        try:
            sb = ctx.backend.start(spec)
        finally:
            os.close(stdin_fd)
            os.close(out_w)
            os.close(err_w)
        try:
            outs, timed_out = _collect(sb, out_r, err_r, rule.max_output_bytes,
                                       rule.timeout_seconds)
            code = sb.wait(5.0)
            if code is None:
                sb.kill()
                code = sb.wait(5.0)
            breach = sb.breach()
            enforced = sb.enforced
        finally:
            os.close(out_r)
            os.close(err_r)
            sb.cleanup()
        elapsed_ms = int((time.monotonic() - started) * 1000)
        after = manifest.scan(copy)
        failpoints.hit("exec.captured")
        changes = []
        for ch in manifest.diff(before, after):
            change = {"op": ch.op, "path": ch.rel, "mode": ch.mode}
            prepared = write_sys.prepare_captured(ch, copy, ctx.ws, ctx.policy)
            content_blob = None
            if not isinstance(prepared, Decision) and prepared[1]:
                content_blob = ctx.recorder.put_blob(prepared[1])
            cdigest = digest_of({"exec_req": req, "change": change, "content": content_blob})
            extra: dict[str, Any] = {"captured_from": req, "change": change}
            if content_blob:
                extra["content_blob"] = content_blob
            out = apply_write(ctx, prepared, req=req, request_digest=cdigest, now_ns=now_ns,
                              extra=extra)
            d = out.decision
            changes.append({"op": ch.op, "path": ch.rel,
                            "decision": d.decision if d else abi.DENIED,
                            "rule": d.rule if d else None,
                            "reason": (out.error[1] if out.error else "applied")})
        stdout, stdout_cut = outs[0]
        stderr, stderr_cut = outs[1]
        return {
            "exit_code": code if code is not None else -9,
            "timed_out": timed_out,
            "breach": breach,
            "elapsed_ms": elapsed_ms,
            "stdout_b64": base64.b64encode(stdout).decode(),
            "stderr_b64": base64.b64encode(stderr).decode(),
            "stdout_blob": ctx.recorder.put_blob(stdout),
            "stderr_blob": ctx.recorder.put_blob(stderr),
            "stdout_truncated": stdout_cut,
            "stderr_truncated": stderr_cut,
            "changes": changes,
            "sandbox": {"spec": spec_summary(spec), "enforced": enforced},
        }
    finally:
        manifest.remove_tree(work)


def _collect(sb: Any, out_r: int, err_r: int, cap: int, timeout: int
             ) -> tuple[list[tuple[bytes, bool]], bool]:
    """Read both pipes until EOF and exit (or the timeout), keeping at most ``cap`` bytes."""
    bufs = {out_r: bytearray(), err_r: bytearray()}
    cut = {out_r: False, err_r: False}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                sb.kill()
                break
            for key, _ in sel.select(min(left, 0.1)):
                fd = int(key.fd)
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(fd)
                    continue
                room = cap - len(bufs[fd])
                if room > 0:
                    bufs[fd] += data[:room]
                if len(data) > max(room, 0):
                    cut[fd] = True
            if sb.poll() is not None and not sel.get_map():
                break
        if not timed_out:
            left = deadline - time.monotonic()
            if sb.wait(max(left, 0.0)) is None:
                timed_out = True
                sb.kill()
    finally:
        sel.close()
    return [(bytes(bufs[out_r]), cut[out_r]), (bytes(bufs[err_r]), cut[err_r])], timed_out
