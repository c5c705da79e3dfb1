"""The run lifecycle: launch the agent's sandbox, read frames, decide, dispatch, record, reap.

One run, one single-threaded loop (single-threaded on purpose: sandboxes are started with
``fork`` and the parent-death signal is tied to the thread that forked). Order of a run:

1. validate inputs and choose the backend (refusal here: nothing ran, nothing recorded);
2. create the run folder: header, exact policy bytes, initial workspace manifest;
3. start the agent in its sandbox with one end of a socketpair as its syscall channel;
4. loop: frames -> handler -> one recorded decision per request -> answer, only after the
   records are durable; agent output is relayed and kept; limits are watched;
5. the agent ends (or is stopped): final manifest, ``run.end``, seal.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import platform
import secrets
import select
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kernel import (
    agentenv,
    approval_gate,
    bundle,
    dispatch,
    failpoints,
    keys,
    killswitch,
    manifest,
    snapshot,
)
from kernel.canonical import canonical_json, digest_of
from kernel.context import RunContext
from kernel.controlplane import control_dir
from kernel.decide import check_quota_syscalls
from kernel.errors import BadInputError, KernelError
from kernel.paths import Workspace
from kernel.policy import Policy
from kernel.recorder import RunRecorder
from sandbox import registry
from sandbox.base import Sandboxed, SandboxSpec, spec_summary
from syscalls import abi
from syscalls import exec as exec_sys
from syscalls import info as info_sys

KERNEL_VERSION = "0.1.0"
OUTPUT_CAP = 1 << 20
"""Bytes of the agent's stdout and of its stderr kept in the run folder (the rest is relayed)."""
FLOOD_GRACE = 64
"""Requests answered with a quota denial before a flooding agent is stopped."""
TICK = 0.05
BREACH_CHECK_S = 0.01
"""Least time between two reads of the sandbox's limit counters inside the request loop."""
INLINE_ARGS_MAX = 64 * 1024
"""Request arguments larger than this (canonical JSON) are recorded as a blob."""


@dataclass
class ExecOptions:
    argv: list[str]
    policy: Policy
    workspace: Path
    runs_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    """Variables passed explicitly by the operator (``--env``)."""
    isolation: str | None = None
    """Overrides the policy's backend when set."""
    home: Path | None = None
    """Kernel home (keys, client bundle); default ``keys.kernel_home()``."""
    relay_stdout: IO[bytes] | None = None
    relay_stderr: IO[bytes] | None = None
    approve: str = "queue"
    """How protected actions are decided: ``prompt``, ``queue`` or ``deny`` (docs/cli.md)."""
    approve_key: Path | None = None
    """Prompt mode: the operator's reviewer key file, used by a ``kernel approve`` child."""
    tty_in: IO[str] | None = None
    tty_out: IO[str] | None = None
    after_agent: Callable[[RunContext, str, int | None], dict[str, Any]] | None = None
    """Called once the agent has ended and the final manifest is written, before ``run.end``
    (``kernel exec --task`` runs the verification commands and the gate here); what it returns
    goes into the ``run.end`` summary as ``gate`` and into :attr:`RunOutcome.gate`."""


@dataclass
class RunOutcome:
    run_id: str
    run_dir: Path
    status: str
    """``passed`` (agent exited 0), ``failed`` (non-zero), ``limit`` (a limit killed it),
    ``protocol_error`` (the agent broke the protocol and was stopped), ``killed``."""
    exit_code: int | None
    """The agent's exit code, or ``-N`` for death by signal N."""
    isolation: str
    breach: str | None = None
    seal: str | None = None
    requests: int = 0
    denials: int = 0
    gate: dict[str, Any] | None = None
    """The gate report, when the run had a task with a gate."""

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "status": self.status,
                "exit_code": self.exit_code, "isolation": self.isolation,
                "breach": self.breach, "seal": self.seal, "requests": self.requests,
                "denials": self.denials, "gate": self.gate}


class _Stop(Exception):
    def __init__(self, status: str, detail: str, breach: str | None = None,
                 kill: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.breach = breach
        self.kill = kill
        """For a run ended from outside: the ``run.kill`` record (who asked, which signal)."""


def new_run_id() -> str:
    """Time-ordered and unique: ``20261122T145910Z-3f9a1c2e``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def _inside(child: Path, parent: Path) -> str | None:
    """``child`` relative to ``parent`` if it lies inside it (or is it), else None."""
    try:
        rel = child.relative_to(parent)
    except ValueError:
        return None
    return rel.as_posix() if str(rel) != "." else ""


def _check_workspace(ws: Path) -> Path:
    if not ws.exists():
        raise BadInputError(f"workspace {ws}: no such directory")
    if not ws.is_dir():
        raise BadInputError(f"workspace {ws}: not a directory")
    real = ws.resolve(strict=True)
    if real == Path("/"):
        raise BadInputError("workspace /: the whole filesystem cannot be a workspace")
    return real


class Channel:
    """Kernel end of the syscall channel: length-prefixed frames, a size cap, backpressure."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closed = False

    def fill(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.closed = True
        self.inbuf += data

    def next_frame(self) -> dict[str, Any] | None:
        """One decoded frame if complete; raises FrameError on an oversized or bad one."""
        if len(self.inbuf) < abi.HEADER.size:
            return None
        (size,) = abi.HEADER.unpack_from(self.inbuf)
        if size > abi.MAX_FRAME:
            raise abi.FrameError(f"frame of {size} bytes exceeds the {abi.MAX_FRAME}-byte limit")
        end = abi.HEADER.size + size
        if len(self.inbuf) < end:
            return None
        body = bytes(self.inbuf[abi.HEADER.size:end])
        del self.inbuf[:end]
        return abi.decode_body(body)

    def send(self, obj: dict[str, Any]) -> None:
        self.outbuf += abi.encode_frame(obj)
        self.flush()

    def flush(self) -> None:
        while self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                return
            except OSError:
                self.outbuf.clear()
                return
            del self.outbuf[:n]


class Supervisor:
    def __init__(self, opts: ExecOptions) -> None:
        self.opts = opts
        self.ctx: RunContext | None = None
        self.sandbox: Sandboxed | None = None
        self.requests = 0
        self.denials = 0
        self.out_keep = {1: bytearray(), 2: bytearray()}
        self._pumping: tuple[float, dict[int, int]] = (time.monotonic(), {})
        self.redact: tuple[str, ...] = ()
        self.live: killswitch.LiveMark | None = None
        """This run's mark in the control dir: ``kernel kill`` finds the run through it."""

    # -- set-up --------------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        o = self.opts
        if not o.argv:
            raise BadInputError("no agent command given: kernel exec [OPTIONS] -- CMD [ARG...]")
        workspace = _check_workspace(o.workspace)
        requested = o.isolation or o.policy.sandbox.isolation
        backend, availability = registry.choose(requested)
        home = o.home or keys.kernel_home()
        key = keys.load_or_create_kernel_key(home)
        runs_dir = o.runs_dir.absolute()
        runs_dir.mkdir(parents=True, exist_ok=True)
        runs_dir = runs_dir.resolve()
        program = self._resolve_agent_program(o.argv[0], o.policy, workspace)

        policy = approval_gate.load_keyring(o.policy, home)
        hidden_abs = [runs_dir, home.resolve(), control_dir(runs_dir)]
        hidden_rel = tuple(r for r in (_inside(p, workspace) for p in hidden_abs) if r)
        if any(_inside(workspace, p) is not None for p in hidden_abs):
            raise BadInputError(f"workspace {workspace} lies inside the runs dir or the "
                                "kernel home; choose another workspace")
        env = agentenv.build(o.policy, os.environ, o.env)
        self.redact = tuple(env.redact)
        run_id = new_run_id()
        header = {
            "kernel_version": KERNEL_VERSION,
            "argv": list(o.argv),
            "program": program,
            "workspace": str(workspace),
            "policy_name": o.policy.name,
            "policy_source": o.policy.source,
            "isolation_requested": requested,
            "isolation_override": o.isolation,
            "isolation": backend.name,
            "host": {"kernel_release": platform.release(), "machine": platform.machine()},
            "env": {"passthrough": list(env.passthrough), "set": sorted(o.policy.env.set),
                    "secrets": list(env.secrets), "explicit": list(env.explicit)},
        }
        rec = RunRecorder.create(runs_dir, run_id=run_id, header=header,
                                 policy_raw=o.policy.raw, key=key, redact=env.redact)
        scratch = Path(tempfile.mkdtemp(prefix=f"agent-kernel-{run_id}-"))
        os.chmod(scratch, 0o711)  # noqa: S103 - the agent uid must traverse to its exec copy
        bundle_dir = bundle.ensure_bundle(scratch)
        ws = Workspace.open(workspace, view_root=str(workspace), hidden=hidden_rel)
        try:
            self.ctx = RunContext(
                run_id=run_id, policy=policy, workspace=workspace,
                view_root=str(workspace), ws=ws, recorder=rec, backend=backend,
                agent_env=dict(env.env), hidden_rel=hidden_rel,
                hidden_abs=tuple(hidden_abs),
                read_paths=(bundle_dir, *(Path(p) for p in o.policy.sandbox.read_paths)),
                scratch_dir=scratch,
            )
            self.ctx.agent_env["PYTHONPATH"] = str(bundle_dir / "lib")
            self.ctx.agent_env["PATH"] = (str(bundle_dir / "bin") + ":" +
                                          self.ctx.agent_env.get("PATH", "/usr/bin:/bin"))
            self.ctx.agent_env[abi.WORKSPACE_ENV] = str(workspace)
            self.ctx.agent_env[abi.RUN_ID_ENV] = run_id
            return self._run(rec, availability.facts, program)
        finally:
            if self.live is not None:
                self.live.release()
            ws.close()
            shutil.rmtree(scratch, ignore_errors=True)

    def _resolve_agent_program(self, prog: str, policy: Policy, workspace: Path) -> str:
        """The agent program as an absolute path, looked up as the sandbox would."""
        if "/" in prog:
            p = Path(prog) if prog.startswith("/") else workspace / prog
            if not p.is_file():
                raise BadInputError(f"agent program {prog}: no such file")
            return str(p.absolute())
        path = policy.env.set.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        found = shutil.which(prog, path=path)
        if found is None:
            raise BadInputError(f"agent program {prog!r}: not found on the sandbox PATH {path}")
        return found

    def _run(self, rec: RunRecorder, facts: dict[str, Any], program: str) -> RunOutcome:
        ctx = self.ctx
        assert ctx is not None
        o = self.opts
        initial = manifest.scan(ctx.workspace, exclude=ctx.hidden_rel)
        initial_digest = rec.write_manifest("initial", manifest.manifest_bytes(initial))
        stored = snapshot.store_initial(rec, ctx.workspace, initial, self.redact)
        rec.append("run.start", {
            "argv": list(o.argv), "program": program, "workspace": str(ctx.workspace),
            "policy_digest": ctx.policy.digest, "isolation": ctx.backend.name,
            "host_facts": _jsonable(facts),
        })
        rec.append("snapshot.initial", {"tree_digest": initial_digest,
                                        "entries": len(initial), **stored})
        approval_gate.open_gate(ctx, self._pump, runs_dir=rec.run_dir.parent,
                                home=o.home or keys.kernel_home(), mode=o.approve,
                                approve_key=o.approve_key, tty_in=o.tty_in, tty_out=o.tty_out)

        kernel_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        agent_fd = agent_end.fileno()
        env = dict(ctx.agent_env)
        env[abi.FD_ENV] = str(agent_fd)
        spec = SandboxSpec(
            argv=(program, *o.argv[1:]), workspace=ctx.workspace,
            workspace_view=ctx.workspace, workspace_writable=False, cwd=ctx.workspace,
            env=env, limits=ctx.policy.limits,
            scratch_bytes=ctx.policy.sandbox.scratch_mb << 20, pass_fds=(agent_fd,),
            stdin=None, stdout=out_w, stderr=err_w, hidden=ctx.hidden_abs,
            read_paths=ctx.read_paths, wall_seconds=float(ctx.policy.limits.wall_seconds),
        )
        status, detail, breach = "failed", "", None
        started = time.monotonic()
        old_handlers = self._trap_signals()
        # marked live only once a kill can be served: the signal handlers are in place
        try:
            self.live = killswitch.LiveMark.claim(rec.run_dir.parent, ctx.run_id, rec.run_dir)
        except OSError as e:  # the run goes on; only a signal to this kernel can end it early
            rec.append("controlplane.error", {"error": f"live mark: {e}"})
        try:
            try:
                self.sandbox = ctx.backend.start(spec)
            finally:
                agent_end.close()
                os.close(out_w)
                os.close(err_w)
            rec.append("sandbox.start", {"spec": spec_summary(spec),
                                         "enforced": _jsonable(self.sandbox.enforced),
                                         "pid": self.sandbox.pid})
            try:
                self._loop(Channel(kernel_end), out_r, err_r, started)
                status = "ended"
            except _Stop as stop:
                status, detail, breach = stop.status, stop.detail, stop.breach
                if stop.kill is not None:
                    rec.append("run.kill", stop.kill)
                self.sandbox.kill()
                self.sandbox.wait(5.0)
            code = self.sandbox.wait(5.0)
            if code is None:
                self.sandbox.kill()
                code = self.sandbox.wait(5.0)
            if breach is None:
                breach = self.sandbox.breach()
                if breach is not None:
                    status, detail = "limit", f"the sandbox breached its {breach} limit"
            if status == "ended":
                status = "passed" if code == 0 else "failed"
        finally:
            signal.signal(signal.SIGTERM, old_handlers[0])
            signal.signal(signal.SIGINT, old_handlers[1])
            signal.signal(signal.SIGHUP, old_handlers[2])
            kernel_end.close()
            if self.sandbox is not None and self.sandbox.poll() is None:
                # only on the kernel's own failure (a recorder error...): never leave it running
                self.sandbox.kill()
                self.sandbox.wait(5.0)
            self._drain(out_r, 1)
            self._drain(err_r, 2)
            os.close(out_r)
            os.close(err_r)
            if self.sandbox is not None:
                self.sandbox.cleanup()

        body: dict[str, Any] = {"exit_code": code, "status": status,
                                "wall_ms": int((time.monotonic() - started) * 1000)}
        if breach:
            body["breach"] = breach
        if detail:
            body["detail"] = detail
        body["stdout_blob"] = rec.put_blob(bytes(self.out_keep[1]))
        body["stderr_blob"] = rec.put_blob(bytes(self.out_keep[2]))
        rec.append("agent.exit", body)
        final = manifest.scan(ctx.workspace, exclude=ctx.hidden_rel)
        final_digest = rec.write_manifest("final", manifest.manifest_bytes(final))
        usage = ctx.ledger.usage
        summary = {
            "status": status, "exit_code": code, "breach": breach,
            "final_tree_digest": final_digest, "initial_tree_digest": initial_digest,
            "requests": self.requests, "denials": self.denials,
            "usage": {"syscalls": usage.syscalls, "bytes_written": usage.bytes_written,
                      "files_written": usage.files_written, "exec_count": usage.exec_count},
        }
        gate = None
        if o.after_agent is not None:
            gate = o.after_agent(ctx, status, code)
            summary["gate"] = gate
        approval_gate.drain_late(ctx)
        rec.append("run.end", summary)
        seal = rec.seal(status, summary)
        approval_gate.close_gate(ctx, status, code, summary, seal)
        return RunOutcome(run_id=ctx.run_id, run_dir=rec.run_dir, status=status,
                          exit_code=code, isolation=ctx.backend.name, breach=breach,
                          seal=seal, requests=self.requests, denials=self.denials, gate=gate)

    def _trap_signals(self) -> tuple[Any, Any, Any]:
        def on_signal(signum: int, frame: object) -> None:
            name = signal.Signals(signum).name
            asked = self.live.kill_request() if self.live is not None else None
            if asked is not None:
                raise _Stop("killed", f"ended by `kernel kill` (uid {asked.get('uid')})",
                            kill={"signal": name, **asked})
            raise _Stop("killed", f"the kernel received {name}",
                        kill={"signal": name, "by": "signal"})

        return (signal.signal(signal.SIGTERM, on_signal),
                signal.signal(signal.SIGINT, on_signal),
                signal.signal(signal.SIGHUP, on_signal))

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self, chan: Channel, out_r: int, err_r: int, started: float) -> None:
        ctx = self.ctx
        sb = self.sandbox
        assert ctx is not None and sb is not None
        wall = ctx.policy.limits.wall_seconds
        sel = selectors.DefaultSelector()
        sel.register(chan.sock, selectors.EVENT_READ, "chan")
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        sel.register(out_r, selectors.EVENT_READ, 1)
        sel.register(err_r, selectors.EVENT_READ, 2)
        open_pipes = {1, 2}
        self._pumping = (started, {out_r: 1, err_r: 2})
        next_breach_check = 0.0
        try:
            while True:
                now = time.monotonic()
                if now - started > wall:
                    raise _Stop("limit", f"wall-clock limit of {wall} s reached", "wall_seconds")
                # The cgroup counters are files: while requests stream in, read them at most
                # every BREACH_CHECK_S (Linux enforces the limits; this notices and records a
                # breach, and the end of the run checks once more).
                if now >= next_breach_check:
                    next_breach_check = now + BREACH_CHECK_S
                    breach = sb.breach()
                    if breach is not None:
                        raise _Stop("limit", f"the sandbox breached its {breach} limit", breach)
                if sb.poll() is not None and not open_pipes:
                    break
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if chan.outbuf else 0)
                if not chan.closed:
                    sel.modify(chan.sock, want, "chan")
                for key, mask in sel.select(TICK):
                    if key.data == "chan":
                        if mask & selectors.EVENT_WRITE:
                            chan.flush()
                        if mask & selectors.EVENT_READ and not chan.outbuf:
                            chan.fill()
                            self._serve(chan)
                            if chan.closed:
                                sel.unregister(chan.sock)
                    else:
                        fd = int(key.data)
                        src = out_r if fd == 1 else err_r
                        if not self._relay(src, fd):
                            sel.unregister(src)
                            open_pipes.discard(fd)
                if sb.poll() is not None and not open_pipes:
                    break
                if chan.closed and sb.poll() is not None:
                    break
                if chan.closed and not open_pipes:
                    # nothing left to read: wait for the exit itself, not for the next tick
                    left = wall - (time.monotonic() - started)
                    if sb.wait(max(min(left, 1.0), 0.0)) is not None:
                        break
            while not chan.closed:
                before = len(chan.inbuf)
                chan.fill()
                if len(chan.inbuf) == before:
                    break
            if chan.inbuf:
                self._record_leftover(chan.inbuf)
        finally:
            sel.close()

    def _pump(self, timeout: float) -> None:
        """While a request waits for reviewers: relay the agent's output and enforce its
        limits (raises ``_Stop`` like the loop does)."""
        ctx, sb = self.ctx, self.sandbox
        assert ctx is not None and sb is not None
        started, pipes = self._pumping
        wall = ctx.policy.limits.wall_seconds
        if time.monotonic() - started > wall:
            raise _Stop("limit", f"wall-clock limit of {wall} s reached", "wall_seconds")
        breach = sb.breach()
        if breach is not None:
            raise _Stop("limit", f"the sandbox breached its {breach} limit", breach)
        if not pipes:
            time.sleep(timeout)
            return
        ready, _, _ = select.select(list(pipes), [], [], timeout)
        for src in ready:
            if not self._relay(src, pipes[src]):
                del pipes[src]  # EOF; the loop unregisters it on its next turn

    def _record_leftover(self, buf: bytearray) -> None:
        """Bytes the agent sent that were never served: whole frames sent as it ended, or a
        frame cut short. Recorded, never performed."""
        complete = 0
        pos = 0
        while len(buf) - pos >= abi.HEADER.size:
            (size,) = abi.HEADER.unpack_from(buf, pos)
            if size > abi.MAX_FRAME or len(buf) - pos - abi.HEADER.size < size:
                break
            pos += abi.HEADER.size + size
            complete += 1
        if complete:
            self.ctx_append("channel.unanswered", {
                "frames": complete, "bytes": pos,
                "detail": "requests sent as the agent ended; not performed"})
        if len(buf) > pos:
            self.ctx_append("channel.truncated", {
                "bytes": len(buf) - pos,
                "detail": "the channel closed in the middle of a frame"})

    def ctx_append(self, type_: str, body: dict[str, Any]) -> int:
        assert self.ctx is not None
        return self.ctx.recorder.append(type_, body)

    def _relay(self, src: int, fd: int) -> bool:
        try:
            data = os.read(src, 65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        self._keep_and_relay(data, fd)
        return True

    def _keep_and_relay(self, data: bytes, fd: int) -> None:
        keep = self.out_keep[fd]
        if len(keep) < OUTPUT_CAP:
            keep += data[: OUTPUT_CAP - len(keep)]
        sink = self.opts.relay_stdout if fd == 1 else self.opts.relay_stderr
        if sink is not None:
            try:
                sink.write(data)
                sink.flush()
            except (OSError, ValueError):
                pass

    def _drain(self, src: int, fd: int) -> None:
        """Relay what is left in a pipe without ever blocking (the tree has ended or been
        killed; a writer that survived cannot stall the kernel)."""
        os.set_blocking(src, False)
        while True:
            try:
                data = os.read(src, 65536)
            except OSError:  # EAGAIN: nothing more now; or the pipe is gone
                return
            if not data:
                return
            self._keep_and_relay(data, fd)

    def _serve(self, chan: Channel) -> None:
        """Answer every complete frame in the buffer, in order."""
        while not chan.outbuf:
            try:
                frame = chan.next_frame()
            except abi.FrameError as e:
                self.ctx_append("protocol.error", {"reason": str(e),
                                                   "buffered_bytes": len(chan.inbuf)})
                raise _Stop("protocol_error", f"the agent sent a bad frame: {e}") from None
            if frame is None:
                return
            answer = self._handle(frame)
            # Every record of this request is durable before the agent hears anything. (The
            # decision's own fdatasync normally covered the request line already.)
            assert self.ctx is not None
            self.ctx.recorder.sync()
            failpoints.hit("answer.before_send")
            chan.send(answer)

    def _handle(self, frame: dict[str, Any]) -> dict[str, Any]:
        """One request -> exactly one recorded decision -> one response."""
        ctx = self.ctx
        assert ctx is not None
        self.requests += 1
        policy = ctx.policy
        req_id = frame.get("id")
        rid = req_id if isinstance(req_id, int) and not isinstance(req_id, bool) else None
        usage = ctx.ledger.usage
        ctx.ledger.debit(syscalls=1)
        if usage.syscalls >= policy.quotas.syscalls + FLOOD_GRACE:
            self.ctx_append("protocol.error", {"reason": "request flood after the syscall "
                                               "quota was spent"})
            raise _Stop("protocol_error", "the agent kept sending requests after its "
                        "syscall quota was spent")
        problem = _frame_problem(frame)
        call = frame.get("call") if problem is None else None
        args = frame.get("args") if problem is None else None
        recorded_args, blobs = _recordable_args(ctx, call, args if isinstance(args, dict) else {})
        request_body: dict[str, Any] = {"req": rid, "call": call if isinstance(call, str) else None,
                                        "args": recorded_args}
        request_digest = digest_of(request_body)
        # The request line is written now and made durable by the decision's fdatasync, which
        # always follows before any effect or answer (one sync for both lines instead of two).
        seq = ctx.recorder.append("syscall.request", {**request_body, **blobs,
                                                      "request_digest": request_digest},
                                  sync=False)
        now_ns = time.time_ns()
        if problem is not None:
            return self._deny(rid, seq, request_digest, now_ns,
                              ("request.invalid", problem, errno.EINVAL))
        quota = check_quota_syscalls(policy, usage)
        if quota is not None:
            return self._deny(rid, seq, request_digest, now_ns,
                              (quota.rule, quota.reason, quota.errno))
        assert isinstance(call, str) and isinstance(args, dict) and rid is not None
        handler: Callable[..., dispatch.Outcome]
        if call == "write":
            handler = dispatch.handle_write
        elif call == "exec":
            handler = exec_sys.handle
        else:
            handler = info_sys.handle
        ctx.request_seq = seq
        note = args.get("justification")
        ctx.justification = note if isinstance(note, str) else ""
        out = handler(ctx, args, now_ns=now_ns, request_digest=request_digest, req=rid)
        if out.decision is not None and not out.decision.allowed:
            self.denials += 1
        if out.error is not None:
            code, reason, rule, decision = out.error
            resp = abi.error_response(rid, code, reason, rule=rule, decision=decision,
                                      seq=out.seq)
        else:
            resp = abi.ok_response(rid, out.result or {}, seq=out.seq)
        return resp

    def _deny(self, rid: int | None, seq: int, request_digest: str, now_ns: int,
              violation: tuple[str, str, int]) -> dict[str, Any]:
        ctx = self.ctx
        assert ctx is not None
        rule, reason, code = violation
        self.denials += 1
        dseq = self.ctx_append("syscall.decision", {
            "req": rid, "request_seq": seq, "request_digest": request_digest,
            "decision": abi.DENIED, "rule": rule, "reason": reason, "errno": code,
            "policy_digest": ctx.policy.digest, "now_ns": now_ns})
        return abi.error_response(rid, code, reason, rule=rule, seq=dseq)


def _frame_problem(frame: dict[str, Any]) -> str | None:
    unknown = sorted(set(frame) - set(abi.REQUEST_FIELDS))
    if unknown:
        return f"unknown request field(s): {', '.join(unknown)}"
    missing = [k for k in abi.REQUEST_FIELDS if k not in frame]
    if missing:
        return f"missing request field(s): {', '.join(missing)}"
    if frame["v"] != abi.VERSION:
        return f"protocol version {frame['v']!r} is not supported (expected {abi.VERSION})"
    rid = frame["id"]
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 2**63:
        return "id must be a non-negative integer"
    if frame["call"] not in abi.CALLS:
        return f"unknown call {frame['call']!r}; calls are: {', '.join(abi.CALLS)}"
    if not isinstance(frame["args"], dict):
        return "args must be an object"
    return None


def _recordable_args(ctx: RunContext, call: object, args: dict[str, Any]
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Request args as recorded: bulky base64 payloads become blob references."""
    out: dict[str, Any] = {}
    blobs: dict[str, Any] = {}
    for k, v in args.items():
        if k in ("content_b64", "stdin_b64") and isinstance(v, str):
            name = k[: -len("_b64")]
            try:
                data = base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                out[k] = v[:256]
                continue
            blobs[f"{name}_blob"] = ctx.recorder.put_blob(data)
            out[f"{name}_bytes"] = len(data)
        else:
            out[k] = _jsonable(v)
    if len(canonical_json(out)) > INLINE_ARGS_MAX:
        # An agent controls the size of its arguments; big ones go to a blob, not the log line.
        blobs["args_blob"] = ctx.recorder.put_blob(canonical_json(out))
        out = {"inline": False}
    return out, blobs


def _jsonable(v: Any) -> Any:
    """Recorded data holds no floats (canonical form): floats become strings."""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def run(opts: ExecOptions) -> RunOutcome:
    """Run one agent task under the kernel. Raises KernelError for refusals before the run."""
    try:
        return Supervisor(opts).run()
    except KernelError:
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise KernelError(f"no space left while recording the run: {e}") from e
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.stderr.write("use the `kernel` command\n")
    sys.exit(2)
