"""The run lifecycle: launch the agents' sandboxes, read frames, decide, dispatch, record, reap.

One kernel process serves one agent *tree* in one single-threaded loop: the agent
``kernel exec`` started (the root) and every child it (or a child) started with ``spawn``.
Single-threaded on purpose: sandboxes are started with ``fork`` and the parent-death signal is
tied to the thread that forked; and every decision of the tree (above all the replication
contract's counts) is made by one turn of one loop, so children racing for the last slots are
served one after another, never at once. Order of a run:

1. validate inputs and choose the backend (refusal here: nothing ran, nothing recorded);
2. create the root's run folder: header, exact policy bytes, initial workspace manifest;
3. start the agent in its sandbox with one end of a socketpair as its syscall channel;
4. loop: frames -> handler -> one recorded decision per request -> answer, only after the
   records are durable; agent output is relayed and kept; limits, children's expiry and the
   contract's stop conditions are watched every turn;
5. an agent ends (or is stopped): first its live descendants are ended, then its final
   manifest, ``run.end``, seal; a child's seal digest goes into its parent's log
   (``spawn.exit``). The root is sealed last.

Each child has its own sandbox, channel and run folder (``<runs>/<child id>``) and shares the
root's workspace and policy; see docs/syscalls.md (``spawn``, ``wait``, ``register``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import errno
import os
import platform
import resource
import secrets
import select
import selectors
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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
    replication,
    snapshot,
)
from kernel.canonical import canonical_json, digest_of
from kernel.context import Ledger, RunContext
from kernel.controlplane import control_dir
from kernel.decide import ALLOWED, Decision, Usage, check_quota_syscalls, deny
from kernel.errors import BadInputError, KernelError
from kernel.keys import KernelKey
from kernel.paths import Workspace
from kernel.policy import Policy
from kernel.recorder import RecorderError, Redactor, RunRecorder
from kernel.replication import BUDGET_FIELDS, Contract, SpawnRequest, TreeLedger
from sandbox import registry
from sandbox.base import Backend, Sandboxed, SandboxSpec, spec_summary
from sandbox.mounts import SYSTEM_DIRS
from syscalls import abi
from syscalls import exec as exec_sys
from syscalls import info as info_sys
from syscalls import write as write_sys

KERNEL_VERSION = "0.1.0"
OUTPUT_CAP = 1 << 20
"""Bytes of an agent's stdout and of its stderr kept in its run folder (the rest is relayed)."""
FLOOD_GRACE = 64
"""Requests answered with a quota denial before a flooding agent is stopped."""
TICK = 0.05
BREACH_CHECK_S = 0.01
"""Least time between two reads of a sandbox's limit counters inside the request loop."""
INLINE_ARGS_MAX = 64 * 1024
"""Request arguments larger than this (canonical JSON) are recorded as a blob."""
LOG_CONTENT_MAX = 32 * 1024
"""Largest content a ``write`` may carry in its request line (write-ahead, see dispatch)."""
LOG_B64_MAX = (LOG_CONTENT_MAX + 2) // 3 * 4
CHECKPOINT_WRITES = 256
"""Log-durable writes after which the workspace is synced (bounds what recovery re-applies)."""
CHECKPOINT_S = 1.0
"""Longest time a log-durable write waits for a workspace checkpoint."""
WAIT_MAX_MS = 86_400_000
ARGV_MAX = 4096
"""Most arguments a spawn request may carry."""


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
    """Called once the root agent has ended and the final manifest is written, before
    ``run.end`` (``kernel exec --task`` runs the verification commands and the gate here); what
    it returns goes into the ``run.end`` summary as ``gate`` and into :attr:`RunOutcome.gate`."""
    ignore_late_signals: bool = False
    """Leave SIGTERM, SIGINT and SIGHUP ignored when the run is over instead of restoring the
    caller's handlers (the ``kernel`` program, which exits right after): a signal that comes
    after the root's folder is sealed -- ``kernel kill --all`` signals a tree's kernel once per
    live run -- cannot then turn the sealed run's exit status into death by that signal."""


@dataclass
class RunOutcome:
    run_id: str
    run_dir: Path
    status: str
    """``passed`` (agent exited 0), ``failed`` (non-zero), ``limit`` (a limit killed it),
    ``protocol_error`` (the agent broke the protocol and was stopped), ``killed``,
    ``stopped`` (a stop condition of the replication contract ended the tree)."""
    exit_code: int | None
    """The agent's exit code, or ``-N`` for death by signal N."""
    isolation: str
    breach: str | None = None
    seal: str | None = None
    requests: int = 0
    denials: int = 0
    gate: dict[str, Any] | None = None
    """The gate report, when the run had a task with a gate."""
    children: int = 0
    """Agents spawned in the whole tree."""

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "status": self.status,
                "exit_code": self.exit_code, "isolation": self.isolation,
                "breach": self.breach, "seal": self.seal, "requests": self.requests,
                "denials": self.denials, "gate": self.gate, "children": self.children}


class _Stop(Exception):
    def __init__(self, status: str, detail: str, breach: str | None = None,
                 kill: dict[str, Any] | None = None, *, tree: bool = False) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.breach = breach
        self.kill = kill
        """For an agent ended from outside: the ``run.kill`` record (who asked, which signal)."""
        self.tree = tree
        """End the whole tree (a signal to the kernel, ``kernel kill`` of the root)."""


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


@dataclass
class _Parked:
    """A ``wait`` whose answer is deferred until the child ends or the timeout passes."""

    req: int
    request_digest: str
    child: str
    deadline: float | None
    """Monotonic time of the timeout (None: until the child ends)."""


@dataclass
class Agent:
    """One agent of the tree: its folder, context, sandbox, channel and output."""

    ctx: RunContext
    rec: RunRecorder
    argv: list[str]
    program: str
    parent: Agent | None
    depth: int
    initial_digest: str = ""
    started: float = 0.0
    """Monotonic start time (the wall-clock limit counts from here)."""
    expires_at: float | None = None
    """Monotonic expiry of a child (None for the root)."""
    expires_ns: int | None = None
    token: str | None = None
    """A child's signed manifest."""
    registered: bool = False
    sandbox: Sandboxed | None = None
    chan: Channel | None = None
    pipes: dict[int, int] = field(default_factory=dict)
    """Open output pipes: read end -> 1 (stdout) or 2 (stderr)."""
    all_pipes: tuple[int, ...] = ()
    out_keep: dict[int, bytearray] = field(default_factory=lambda: {1: bytearray(),
                                                                     2: bytearray()})
    requests: int = 0
    denials: int = 0
    quota_denials: int = 0
    log_durable_answer: bool = False
    """The answer being sent is for a log-durable write (its result line may be unsynced)."""
    children: list[Agent] = field(default_factory=list)
    spawn_seq: int = -1
    """Seq of the parent's allowed spawn decision for this child."""
    parked: _Parked | None = None
    live: killswitch.LiveMark | None = None
    next_breach_check: float = 0.0
    ended: bool = False
    cleaned: bool = False
    status: str = ""
    exit_code: int | None = None
    breach: str | None = None
    seal: str | None = None
    gate: dict[str, Any] | None = None

    @property
    def run_id(self) -> str:
        return self.ctx.run_id


class Supervisor:
    def __init__(self, opts: ExecOptions) -> None:
        self.opts = opts
        self.root: Agent | None = None
        self.agents: dict[str, Agent] = {}
        self.sel: selectors.BaseSelector | None = None
        self.tree: TreeLedger | None = None
        self.contract = Contract()
        self.key: KernelKey | None = None
        self.presented: set[str] = set()
        """Digests of manifests accepted at registration (a second use is a replay)."""
        self.stops_recorded: set[str] = set()
        self.pending_kills: dict[str, dict[str, Any]] = {}
        """Child run id -> ``kernel kill`` request, served by the next turn of the loop."""
        self.serving: Agent | None = None
        self.stopping = False
        """Set by the first signal that ends the whole tree; later ones are ignored."""
        self.redact: tuple[str, ...] = ()
        self._redactor = Redactor(())
        self.tseq = 0
        self.ws_dirty = 0
        """Log-durable writes whose workspace change is not synced yet (see dispatch)."""
        self.ws_dirty_since = 0.0
        self._resume: list[Agent] = []
        """Agents whose parked ``wait`` was answered: their buffered requests are served next."""
        # shared by every agent of the tree
        self._backend: Backend | None = None
        self._facts: dict[str, Any] = {}
        self._runs_dir = Path()
        self._home = Path()
        self._workspace = Path()
        self._ws: Workspace | None = None
        self._scratch = Path()
        self._bundle = Path()
        self._hidden_rel: tuple[str, ...] = ()
        self._hidden_abs: tuple[Path, ...] = ()
        self._policy: Policy | None = None
        self._base_env: dict[str, str] = {}
        self._env_record: dict[str, Any] = {}
        self._requested = ""

    # -- set-up --------------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        o = self.opts
        if not o.argv:
            raise BadInputError("no agent command given: kernel exec [OPTIONS] -- CMD [ARG...]")
        workspace = _check_workspace(o.workspace)
        _raise_open_files()
        requested = o.isolation or o.policy.sandbox.isolation
        backend, availability = registry.choose(requested)
        home = o.home or keys.kernel_home()
        self.key = keys.load_or_create_kernel_key(home)
        runs_dir = o.runs_dir.absolute()
        runs_dir.mkdir(parents=True, exist_ok=True)
        runs_dir = runs_dir.resolve()
        program = self._resolve_program(o.argv[0], o.policy, workspace)
        if program is None:
            if "/" in o.argv[0]:
                raise BadInputError(f"agent program {o.argv[0]}: no such file")
            path = o.policy.env.set.get("PATH", "/usr/local/bin:/usr/bin:/bin")
            raise BadInputError(f"agent program {o.argv[0]!r}: not found on the sandbox PATH "
                                f"{path}")

        policy = approval_gate.load_keyring(o.policy, home)
        hidden_abs = [runs_dir, home.resolve(), control_dir(runs_dir)]
        hidden_rel = tuple(r for r in (_inside(p, workspace) for p in hidden_abs) if r)
        if any(_inside(workspace, p) is not None for p in hidden_abs):
            raise BadInputError(f"workspace {workspace} lies inside the runs dir or the "
                                "kernel home; choose another workspace")
        env = agentenv.build(o.policy, os.environ, o.env)
        self.redact = tuple(env.redact)
        self._redactor = Redactor(self.redact)
        self.contract = replication.contract_of(policy.spawn, policy.source)
        self._backend, self._facts = backend, availability.facts
        self._runs_dir, self._home, self._workspace = runs_dir, home, workspace
        self._hidden_rel, self._hidden_abs = hidden_rel, tuple(hidden_abs)
        self._policy, self._requested = policy, requested
        self._env_record = {"passthrough": list(env.passthrough),
                            "set": sorted(o.policy.env.set), "secrets": list(env.secrets),
                            "explicit": list(env.explicit)}
        run_id = new_run_id()
        self._scratch = Path(tempfile.mkdtemp(prefix=f"agent-kernel-{run_id}-"))
        os.chmod(self._scratch, 0o711)  # noqa: S103 - the agent uid must traverse to its copy
        self._bundle = bundle.ensure_bundle(self._scratch)
        base = dict(env.env)
        base["PYTHONPATH"] = str(self._bundle / "lib")
        base["PATH"] = str(self._bundle / "bin") + ":" + base.get("PATH", "/usr/bin:/bin")
        base[abi.WORKSPACE_ENV] = str(workspace)
        self._base_env = base
        self.sel = selectors.DefaultSelector()
        try:
            self._ws = Workspace.open(workspace, view_root=str(workspace), hidden=hidden_rel)
            self.tree = TreeLedger(run_id, _quota_usage(policy))
            return self._run_tree(run_id, program)
        finally:
            for a in self.agents.values():
                if a.live is not None:
                    a.live.release()
                    a.live = None
            if self._ws is not None:
                self._ws.close()
            self.sel.close()
            manifest.remove_tree(self._scratch)

    def _resolve_program(self, prog: str, policy: Policy, workspace: Path) -> str | None:
        """A program as an absolute path, looked up as the sandbox would; None if not found."""
        if "/" in prog:
            p = Path(prog) if prog.startswith("/") else workspace / prog
            return str(p.absolute()) if p.is_file() else None
        path = policy.env.set.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        return shutil.which(prog, path=path)

    def _spawn_program(self, prog: str) -> str | None:
        """A child's program as an absolute path, found only among what the sandbox shows: the
        system directories, the workspace (less its hidden parts) and the read paths. Anything
        else is "not found" without being looked at, so a spawn request is no oracle for host
        files the agent cannot see. Must be a regular file with an execute bit."""
        assert self._policy is not None
        if "/" not in prog:
            path = self._policy.env.set.get("PATH", "/usr/local/bin:/usr/bin:/bin")
            candidates = [f"{d.rstrip('/')}/{prog}" for d in path.split(":") if d.startswith("/")]
        elif prog.startswith("/"):
            candidates = [prog]
        else:
            candidates = [f"{self._workspace}/{prog}"]
        for cand in candidates:
            if ".." in cand.split("/") or "\x00" in cand:
                continue
            if not self._visible(Path(cand)):
                continue
            try:
                real = Path(cand).resolve(strict=True)
                st = real.stat()
            except (OSError, RuntimeError):
                continue
            if self._visible(real) and stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                return cand  # as named: the sandbox follows its links in its own view
        return None

    def _visible(self, p: Path) -> bool:
        """Whether an absolute path lies in the sandbox's view (lexically)."""
        if any(_inside(p, h) is not None for h in self._hidden_abs):
            return False
        roots = (*(Path(d) for d in SYSTEM_DIRS), self._workspace, self._bundle,
                 *(Path(r) for r in self.opts.policy.sandbox.read_paths))
        return any(_inside(p, r) is not None for r in roots)

    def _new_agent(self, run_id: str, argv: list[str], program: str, parent: Agent | None,
                   lineage_hdr: dict[str, Any] | None) -> Agent:
        """Create an agent's run folder and context and record its start (no sandbox yet)."""
        o, policy, key = self.opts, self._policy, self.key
        assert policy is not None and key is not None and self.tree is not None
        assert self._backend is not None and self._ws is not None
        header: dict[str, Any] = {
            "kernel_version": KERNEL_VERSION,
            "argv": list(argv),
            "program": program,
            "workspace": str(self._workspace),
            "policy_name": o.policy.name,
            "policy_source": o.policy.source,
            "isolation_requested": self._requested,
            "isolation_override": o.isolation,
            "isolation": self._backend.name,
            "host": {"kernel_release": platform.release(), "machine": platform.machine()},
            "env": self._env_record,
        }
        if lineage_hdr is not None:
            header["lineage"] = lineage_hdr
        rec = RunRecorder.create(self._runs_dir, run_id=run_id, header=header,
                                 policy_raw=o.policy.raw, key=key, redact=self.redact)
        agent_env = dict(self._base_env)
        agent_env[abi.RUN_ID_ENV] = run_id
        ctx = RunContext(
            run_id=run_id, policy=policy, workspace=self._workspace,
            view_root=str(self._workspace), ws=self._ws, recorder=rec, backend=self._backend,
            agent_env=agent_env, hidden_rel=self._hidden_rel, hidden_abs=self._hidden_abs,
            read_paths=(self._bundle, *(Path(p) for p in o.policy.sandbox.read_paths)),
            scratch_dir=self._scratch,
            ledger=Ledger(tree=self.tree, node=run_id, quotas=policy.quotas),
            tree_clock=self._tick,
        )
        depth = 0 if parent is None else parent.depth + 1
        agent = Agent(ctx=ctx, rec=rec, argv=list(argv), program=program, parent=parent,
                      depth=depth, registered=parent is None)
        if lineage_hdr is not None:
            ctx.lineage = {"parent": lineage_hdr["parent"], "root": lineage_hdr["root"],
                           "depth": depth}
        ctx.spawn_status = lambda: self._spawn_status(agent)
        self.agents[run_id] = agent
        initial = manifest.scan(self._workspace, exclude=self._hidden_rel)
        agent.initial_digest = rec.write_manifest("initial", manifest.manifest_bytes(initial))
        if parent is None:
            stored = snapshot.store_initial(rec, self._workspace, initial, self.redact)
        else:  # the root's folder holds the tree's initial content; a child lists its files
            stored = {"content": "none",
                      "unstored": sum(1 for e in initial.values() if e.kind == "file"),
                      "unstored_paths": [], "content_blobs": []}
        start: dict[str, Any] = {
            "argv": list(argv), "program": program, "workspace": str(self._workspace),
            "policy_digest": policy.digest, "isolation": self._backend.name,
            "host_facts": _jsonable(self._facts)}
        if ctx.lineage is not None:
            start["lineage"] = dict(ctx.lineage)
        rec.append("run.start", start)
        rec.append("snapshot.initial", {"tree_digest": agent.initial_digest,
                                        "entries": len(initial), **stored})
        approval_gate.open_gate(ctx, self._pump, runs_dir=self._runs_dir, home=self._home,
                                mode=o.approve,
                                approve_key=o.approve_key, tty_in=o.tty_in, tty_out=o.tty_out)
        return agent

    def _start_agent(self, agent: Agent) -> None:
        """Start the agent's sandbox with its channel; register it with the loop."""
        ctx = agent.ctx
        assert self.sel is not None
        kernel_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        agent_fd = agent_end.fileno()
        env = dict(ctx.agent_env)
        env[abi.FD_ENV] = str(agent_fd)
        if agent.token is not None:
            env[abi.MANIFEST_ENV] = agent.token
        wall = float(ctx.policy.limits.wall_seconds)
        if agent.expires_at is not None:
            wall = min(wall, max(agent.expires_at - time.monotonic(), 0.0) + 1.0)
        spec = SandboxSpec(
            argv=(agent.program, *agent.argv[1:]), workspace=ctx.workspace,
            workspace_view=ctx.workspace, workspace_writable=False, cwd=ctx.workspace,
            env=env, limits=ctx.policy.limits,
            scratch_bytes=ctx.policy.sandbox.scratch_mb << 20, pass_fds=(agent_fd,),
            stdin=None, stdout=out_w, stderr=err_w, hidden=ctx.hidden_abs,
            read_paths=ctx.read_paths, wall_seconds=wall,
        )
        agent.all_pipes = (out_r, err_r)
        agent.pipes = {out_r: 1, err_r: 2}
        agent.chan = Channel(kernel_end)
        agent.started = time.monotonic()
        try:
            agent.sandbox = ctx.backend.start(spec)
        finally:
            agent_end.close()
            os.close(out_w)
            os.close(err_w)
        ctx.recorder.append("sandbox.start", {"spec": spec_summary(spec),
                                              "enforced": _jsonable(agent.sandbox.enforced),
                                              "pid": agent.sandbox.pid})
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, (agent, agent.pipes[fd]))
        self.sel.register(kernel_end, selectors.EVENT_READ, (agent, 0))

    def _claim_live(self, agent: Agent) -> None:
        try:
            agent.live = killswitch.LiveMark.claim(self._runs_dir, agent.run_id,
                                                   agent.rec.run_dir)
        except OSError as e:  # the run goes on; only a signal to this kernel can end it early
            agent.rec.append("controlplane.error", {"error": f"live mark: {e}"})

    def _tick(self) -> int:
        self.tseq += 1
        return self.tseq

    def _log_durable_ok(self, a: Agent) -> bool:
        """Write-ahead (see dispatch) only for the root of a tree that never had a child: one
        folder then holds every change recovery may have to re-apply, in its own order."""
        return a is self.root and len(self.agents) == 1 and not self.stopping

    def _checkpoint(self) -> None:
        """Make every log-durable write's workspace change durable (one ``syncfs`` of the
        workspace's file system) and record it: ``kernel recover`` re-applies only the
        log-durable writes after the last ``workspace.synced``. A failed sync is fatal, like a
        failed fsync of the log: the kernel cannot know what reached the disk."""
        if not self.ws_dirty:
            return
        assert self._ws is not None and self.root is not None
        try:
            write_sys.sync_filesystem(self._ws)
        except OSError as e:
            raise RecorderError(f"syncing the workspace's file system failed: {e}") from e
        failpoints.hit("ws.checkpoint.synced")
        self.root.rec.append("workspace.synced", {"tseq": self.tseq, "writes": self.ws_dirty})
        self.ws_dirty = 0

    def _run_tree(self, run_id: str, program: str) -> RunOutcome:
        o = self.opts
        root = self._new_agent(run_id, list(o.argv), program, None, None)
        self.root = root
        old_handlers = self._trap_signals()
        # marked live only once a kill can be served: the signal handlers are in place
        self._claim_live(root)
        try:
            try:
                self._start_agent(root)
                self._loop()
            except _Stop as stop:
                self._finish(root, stop.status, stop.detail, stop.breach, stop.kill)
            finally:
                with self._signals_blocked():
                    for a in list(self.agents.values()):
                        if not a.ended and a.sandbox is not None and a.sandbox.poll() is None:
                            # only on the kernel's own failure (a recorder error...)
                            a.sandbox.kill()
                            a.sandbox.wait(5.0)
        finally:
            late = (signal.SIG_IGN,) * 3 if self.opts.ignore_late_signals else old_handlers
            signal.signal(signal.SIGTERM, late[0])
            signal.signal(signal.SIGINT, late[1])
            signal.signal(signal.SIGHUP, late[2])
            for a in self.agents.values():
                self._close_io(a)
                if a.sandbox is not None and not a.cleaned:
                    a.sandbox.cleanup()
        assert root.ended and root.seal is not None
        return RunOutcome(run_id=root.run_id, run_dir=root.rec.run_dir, status=root.status,
                          exit_code=root.exit_code, isolation=root.ctx.backend.name,
                          breach=root.breach, seal=root.seal, requests=root.requests,
                          denials=root.denials, gate=root.gate, children=len(self.agents) - 1)

    # -- signals -------------------------------------------------------------------------------

    def _trap_signals(self) -> tuple[Any, Any, Any]:
        def on_signal(signum: int, frame: object) -> None:
            name = signal.Signals(signum).name
            root = self.root
            if self.stopping or (root is not None and root.ended):
                return  # the tree is already being ended (`kill --all` signals once per run)
            asked: dict[str, dict[str, Any]] = {}
            for a in list(self.agents.values()):
                if a.live is not None and not a.ended:
                    req = a.live.kill_request()
                    if req is not None:
                        asked[a.run_id] = req
            if root is not None and root.run_id not in asked and asked:
                # `kernel kill CHILD`: that subtree only, ended by the next turn of the loop
                self.pending_kills.update(asked)
                return
            req = asked.get(root.run_id) if root is not None else None
            self.stopping = True
            if req is not None:
                raise _Stop("killed", f"ended by `kernel kill` (uid {req.get('uid')})",
                            kill={"signal": name, **req}, tree=True)
            raise _Stop("killed", f"the kernel received {name}",
                        kill={"signal": name, "by": "signal"}, tree=True)

        return (signal.signal(signal.SIGTERM, on_signal),
                signal.signal(signal.SIGINT, on_signal),
                signal.signal(signal.SIGHUP, on_signal))

    @contextlib.contextmanager
    def _signals_blocked(self) -> Iterator[None]:
        """Hold back SIGTERM/SIGINT/SIGHUP (delivered at the end): for steps that must not be
        cut in two, such as sealing a folder or starting a child."""
        sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    # -- the loop ------------------------------------------------------------------------------

    def _live(self) -> list[Agent]:
        return [a for a in self.agents.values() if not a.ended and a.sandbox is not None]

    def _loop(self) -> None:
        root = self.root
        assert root is not None and self.sel is not None
        resume = self._resume
        while not self._done():
            now = time.monotonic()
            if self.ws_dirty and now - self.ws_dirty_since >= CHECKPOINT_S:
                self._checkpoint()
            if self.pending_kills:
                self._serve_kills()
            for a in self._live():
                if a.ended:
                    continue  # ended this turn with an ancestor
                self._guard(a, self._watch, a, now)
            while resume:
                a = resume.pop(0)
                if not a.ended:
                    self._guard(a, self._serve, a)
            if self._done():
                break
            self._check_stop_conditions()
            live = self._live()
            if not live:
                break
            timeout = TICK
            waiting_exit = [a for a in live if a.chan is not None and a.chan.closed
                            and not a.pipes]
            if waiting_exit:
                if len(live) == 1:
                    # nothing left to read: wait for the exit itself, not for the next tick
                    a = waiting_exit[0]
                    assert a.sandbox is not None
                    left = a.ctx.policy.limits.wall_seconds - (now - a.started)
                    a.sandbox.wait(max(min(left, 1.0), 0.0))
                    continue
                timeout = 0.005
            for a in live:
                self._interest(a)
            for key, mask in self.sel.select(timeout):
                agent, kind = key.data
                if agent.ended:
                    continue
                if kind == 0:
                    self._guard(agent, self._on_channel, agent, mask)
                elif not self._relay(agent, key.fd, kind):
                    self.sel.unregister(key.fd)
                    agent.pipes.pop(key.fd, None)

    def _done(self) -> bool:
        return self.root is None or self.root.ended

    def _guard(self, a: Agent, fn: Callable[..., None], *args: Any) -> None:
        """Run one step for agent ``a``; a ``_Stop`` it raises ends ``a`` (a tree-wide one
        goes up to end the whole tree)."""
        try:
            fn(*args)
        except _Stop as stop:
            if stop.tree:
                raise
            self._finish(a, stop.status, stop.detail, stop.breach, stop.kill)

    def _interest(self, a: Agent) -> None:
        """Read a channel only when no answer is queued and no ``wait`` is parked
        (backpressure); write while an answer is queued."""
        assert self.sel is not None
        chan = a.chan
        if chan is None or chan.closed:
            return
        want = 0
        if not chan.outbuf and a.parked is None:
            want |= selectors.EVENT_READ
        if chan.outbuf:
            want |= selectors.EVENT_WRITE
        try:
            key = self.sel.get_key(chan.sock)
        except KeyError:
            key = None
        if want == 0:
            if key is not None:
                self.sel.unregister(chan.sock)
        elif key is None:
            self.sel.register(chan.sock, want, (a, 0))
        elif key.events != want:
            self.sel.modify(chan.sock, want, (a, 0))

    def _on_channel(self, a: Agent, mask: int) -> None:
        chan = a.chan
        assert chan is not None and self.sel is not None
        if mask & selectors.EVENT_WRITE:
            chan.flush()
        if mask & selectors.EVENT_READ and not chan.outbuf and a.parked is None:
            chan.fill()
            self._serve(a)
            if chan.closed:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(chan.sock)

    def _watch(self, a: Agent, now: float) -> None:
        """Limits, expiry, a parked wait's timeout, and the natural end of one agent."""
        sb = a.sandbox
        assert sb is not None
        wall = a.ctx.policy.limits.wall_seconds
        if now - a.started > wall:
            raise _Stop("limit", f"wall-clock limit of {wall} s reached", "wall_seconds")
        if a.expires_at is not None and now >= a.expires_at:
            raise _Stop("expired", "the child reached its expiry "
                        f"({self.contract.expiration_seconds} s after it was spawned)",
                        kill={"by": "expiry", "expires_ns": a.expires_ns})
        # The cgroup counters are files: while requests stream in, read them at most every
        # BREACH_CHECK_S (Linux enforces the limits; this notices and records a breach, and
        # the end of the agent checks once more).
        if now >= a.next_breach_check:
            a.next_breach_check = now + BREACH_CHECK_S
            breach = sb.breach()
            if breach is not None:
                raise _Stop("limit", f"the sandbox breached its {breach} limit", breach)
        if a.parked is not None and a.parked.deadline is not None and now >= a.parked.deadline:
            self._answer_wait(a, timed_out=True)
        chan = a.chan
        assert chan is not None
        if sb.poll() is not None and (not a.pipes or chan.closed):
            self._finish(a)

    def _pump(self, timeout: float) -> None:
        """While a request waits for reviewers: relay every agent's output and enforce the
        waiting agent's limits (raises ``_Stop`` like the loop does)."""
        a = self.serving
        assert a is not None and a.sandbox is not None
        wall = a.ctx.policy.limits.wall_seconds
        if time.monotonic() - a.started > wall:
            raise _Stop("limit", f"wall-clock limit of {wall} s reached", "wall_seconds")
        breach = a.sandbox.breach()
        if breach is not None:
            raise _Stop("limit", f"the sandbox breached its {breach} limit", breach)
        pipes = {src: (x, fd) for x in self._live() for src, fd in x.pipes.items()}
        if not pipes:
            time.sleep(timeout)
            return
        poller = select.poll()  # poll(2): any descriptor number, however many agents
        for src in pipes:
            poller.register(src, select.POLLIN)
        for src, _ev in poller.poll(timeout * 1000):
            x, fd = pipes[src]
            if not self._relay(x, src, fd):
                # EOF: forget the pipe here and in the loop's selector
                x.pipes.pop(src, None)
                if self.sel is not None:
                    with contextlib.suppress(KeyError, ValueError):
                        self.sel.unregister(src)

    def _serve_kills(self) -> None:
        kills, self.pending_kills = self.pending_kills, {}
        for rid, req in kills.items():
            a = self.agents.get(rid)
            if a is not None and not a.ended:
                self._finish(a, "killed", f"ended by `kernel kill` (uid {req.get('uid')})",
                             None, {"signal": "SIGTERM", **req})

    def _check_stop_conditions(self) -> None:
        if not self.contract.stop:
            return
        assert self.tree is not None and self.root is not None
        totals = self.tree.totals()
        for cond in self.contract.stop:
            if cond.rule in self.stops_recorded or not cond.holds(totals):
                continue
            self.stops_recorded.add(cond.rule)
            self.root.rec.append("spawn.stop", {"rule": cond.rule, "condition": cond.text,
                                                "totals": dict(sorted(totals.items())),
                                                "kill_tree": cond.kill_tree})
            if cond.kill_tree:
                self._finish(self.root, "stopped", f"stop condition `{cond.text}` holds: "
                             "the tree was ended", None,
                             {"by": "stop_condition", "rule": cond.rule,
                              "condition": cond.text})
                return

    # -- output --------------------------------------------------------------------------------

    def _relay(self, a: Agent, src: int, fd: int) -> bool:
        try:
            data = os.read(src, 65536)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self._keep_and_relay(a, data, fd)
        return True

    def _keep_and_relay(self, a: Agent, data: bytes, fd: int) -> None:
        keep = a.out_keep[fd]
        if len(keep) < OUTPUT_CAP:
            keep += data[: OUTPUT_CAP - len(keep)]
        sink = self.opts.relay_stdout if fd == 1 else self.opts.relay_stderr
        if sink is not None:
            try:
                sink.write(data)
                sink.flush()
            except (OSError, ValueError):
                pass

    def _drain(self, a: Agent, src: int, fd: int) -> None:
        """Relay what is left in a pipe without ever blocking (the agent has ended or been
        killed; a writer that survived cannot stall the kernel)."""
        with contextlib.suppress(OSError):
            os.set_blocking(src, False)
        while True:
            try:
                data = os.read(src, 65536)
            except OSError:  # EAGAIN: nothing more now; or the pipe is gone
                return
            if not data:
                return
            self._keep_and_relay(a, data, fd)

    def _close_io(self, a: Agent) -> None:
        """Forget an agent's channel and pipes (idempotent)."""
        if self.sel is not None:
            for obj in ((a.chan.sock,) if a.chan is not None else ()) + a.all_pipes:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(obj)
        if a.chan is not None:
            a.chan.sock.close()
        for fd in a.all_pipes:
            with contextlib.suppress(OSError):
                os.close(fd)
        a.all_pipes = ()
        a.pipes = {}

    def _record_leftover(self, a: Agent, buf: bytearray) -> None:
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
            a.rec.append("channel.unanswered", {
                "frames": complete, "bytes": pos,
                "detail": "requests sent as the agent ended; not performed"})
        if len(buf) > pos:
            a.rec.append("channel.truncated", {
                "bytes": len(buf) - pos,
                "detail": "the channel closed in the middle of a frame"})

    # -- the end of an agent -------------------------------------------------------------------

    def _finish(self, a: Agent, status: str | None = None, detail: str = "",
                breach: str | None = None, kill: dict[str, Any] | None = None) -> None:
        """End agent ``a``: its live descendants first, then its sandbox; record, seal, and
        tell its parent. ``status`` None: the agent ended by itself."""
        if a.ended:
            return
        with self._signals_blocked():
            a.ended = True
            for c in a.children:
                if c.ended:
                    continue
                if kill is not None and kill.get("by") != "expiry" and status is not None:
                    self._finish(c, status, f"{detail} (via {a.run_id})", None,
                                 {**kill, "via": a.run_id})
                else:
                    self._finish(c, "killed", f"its parent {a.run_id} ended", None,
                                 {"by": "parent_ended", "parent": a.run_id})
            self._seal(a, status, detail, breach, kill)

    def _seal(self, a: Agent, status: str | None, detail: str, breach: str | None,
              kill: dict[str, Any] | None) -> None:
        rec, ctx, sb = a.rec, a.ctx, a.sandbox
        natural = status is None
        code: int | None = None
        if sb is not None:
            if not natural:
                if kill is not None:
                    rec.append("run.kill", kill)
                sb.kill()
                sb.wait(5.0)
            code = sb.wait(5.0)
            if code is None:
                sb.kill()
                code = sb.wait(5.0)
            if breach is None:
                breach = sb.breach()
                if breach is not None:
                    status, detail = "limit", f"the sandbox breached its {breach} limit"
        if status is None:
            status = "passed" if code == 0 else "failed"
        chan = a.chan
        if natural and chan is not None:
            while not chan.closed:
                before = len(chan.inbuf)
                chan.fill()
                if len(chan.inbuf) == before:
                    break
            if chan.inbuf:
                self._record_leftover(a, chan.inbuf)
        for src, fd in list(a.pipes.items()):
            self._drain(a, src, fd)
        self._close_io(a)
        if sb is not None:
            sb.cleanup()
            a.cleaned = True

        body: dict[str, Any] = {"exit_code": code, "status": status,
                                "wall_ms": int((time.monotonic() - a.started) * 1000)
                                if a.started else 0}
        if breach:
            body["breach"] = breach
        if detail:
            body["detail"] = detail
        body["stdout_blob"] = rec.put_blob(bytes(a.out_keep[1]))
        body["stderr_blob"] = rec.put_blob(bytes(a.out_keep[2]))
        rec.append("agent.exit", body)
        self._checkpoint()  # the final manifest describes a workspace that is on disk
        final = manifest.scan(ctx.workspace, exclude=ctx.hidden_rel)
        final_digest = rec.write_manifest("final", manifest.manifest_bytes(final))
        own = ctx.ledger.own
        summary: dict[str, Any] = {
            "status": status, "exit_code": code, "breach": breach,
            "final_tree_digest": final_digest, "initial_tree_digest": a.initial_digest,
            "requests": a.requests, "denials": a.denials,
            "usage": {"syscalls": own.syscalls, "bytes_written": own.bytes_written,
                      "files_written": own.files_written, "exec_count": own.exec_count},
        }
        if a.children:
            summary["spawns"] = len(a.children)
        if ctx.lineage is not None:
            summary["lineage"] = dict(ctx.lineage)
        gate = None
        if a.parent is None and self.opts.after_agent is not None:
            gate = self.opts.after_agent(ctx, status, code)
            summary["gate"] = gate
        approval_gate.drain_late(ctx)
        rec.append("run.end", summary)
        seal = rec.seal(status, summary)
        approval_gate.close_gate(ctx, status, code, summary, seal)
        a.status, a.exit_code, a.breach, a.seal, a.gate = status, code, breach, seal, gate
        if a.live is not None:
            a.live.release()
            a.live = None
        parent = a.parent
        if parent is not None:
            assert self.tree is not None
            self.tree.end(a.run_id, expired=status == "expired")
            failpoints.hit("spawn.exit.before")
            parent.rec.append("spawn.exit", {
                "child": a.run_id, "status": status, "exit_code": code, "seal": seal,
                "requests": a.requests, "denials": a.denials, "request_seq": a.spawn_seq})
            if not parent.ended and parent.parked is not None \
                    and parent.parked.child == a.run_id:
                self._answer_wait(parent, timed_out=False)
                self._resume.append(parent)

    # -- requests ------------------------------------------------------------------------------

    def _serve(self, a: Agent) -> None:
        """Answer every complete frame in the agent's buffer, in order (until a ``wait``
        parks it)."""
        chan = a.chan
        assert chan is not None
        while not chan.outbuf and a.parked is None and not a.ended:
            try:
                frame = chan.next_frame()
            except abi.FrameError as e:
                a.rec.append("protocol.error", {"reason": str(e),
                                                "buffered_bytes": len(chan.inbuf)})
                raise _Stop("protocol_error", f"the agent sent a bad frame: {e}") from None
            if frame is None:
                return
            self.serving = a
            try:
                answer = self._handle(a, frame)
            finally:
                self.serving = None
            if answer is None:
                continue  # parked: answered when the child ends or the wait times out
            # Every record of this request is durable before the agent hears anything (the
            # decision's own fdatasync normally covered the request line already), except the
            # result line of a log-durable write: its decision line committed it.
            if a.log_durable_answer:
                a.log_durable_answer = False
            else:
                a.rec.sync()
            failpoints.hit("answer.before_send")
            chan.send(answer)
            if self.ws_dirty >= CHECKPOINT_WRITES:
                self._checkpoint()

    def _handle(self, a: Agent, frame: dict[str, Any]) -> dict[str, Any] | None:
        """One request -> exactly one recorded decision -> one response (None: deferred)."""
        ctx = a.ctx
        tree = self.tree
        assert tree is not None
        a.requests += 1
        tree.requests += 1
        policy = ctx.policy
        req_id = frame.get("id")
        rid = req_id if isinstance(req_id, int) and not isinstance(req_id, bool) else None
        usage = ctx.ledger.usage
        ctx.ledger.debit(syscalls=1)
        if a.quota_denials >= FLOOD_GRACE:
            a.rec.append("protocol.error", {"reason": "request flood after the syscall "
                                            "quota was spent"})
            raise _Stop("protocol_error", "the agent kept sending requests after its "
                        "syscall quota was spent")
        problem = _frame_problem(frame)
        call = frame.get("call") if problem is None else None
        args = frame.get("args") if problem is None else None
        in_log = call == "write" and self._log_durable_ok(a)
        recorded_args, blobs, in_log = _recordable_args(
            ctx, call, args if isinstance(args, dict) else {},
            self._redactor if in_log else None)
        if call != "info" and not in_log:
            # Any other change (and spawn, wait, register) comes after every log-durable write
            # is synced: those are always the last changes of a folder (see dispatch).
            self._checkpoint()
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
            return self._deny(a, rid, seq, request_digest, now_ns,
                              ("request.invalid", problem, errno.EINVAL))
        quota = check_quota_syscalls(policy, usage)
        if quota is not None:
            a.quota_denials += 1
            return self._deny(a, rid, seq, request_digest, now_ns,
                              (quota.rule, quota.reason, quota.errno))
        assert isinstance(call, str) and isinstance(args, dict) and rid is not None
        if not a.registered and call != "register":
            return self._deny(a, rid, seq, request_digest, now_ns, (
                "spawn.unregistered", "this child has not registered its manifest yet: send "
                f"`register` with ${abi.MANIFEST_ENV} first", errno.EPERM))
        ctx.request_seq = seq
        note = args.get("justification")
        ctx.justification = note if isinstance(note, str) else ""
        if call in ("spawn", "wait", "register"):
            fields_problem = _fields_problem(call, args)
            if fields_problem is not None:
                return self._deny(a, rid, seq, request_digest, now_ns,
                                  ("request.invalid", fields_problem, errno.EINVAL))
            if call == "spawn":
                return self._spawn(a, rid, args, request_digest, now_ns)
            if call == "wait":
                return self._wait(a, rid, args, request_digest, now_ns)
            return self._register(a, rid, args, request_digest, now_ns)
        out: dispatch.Outcome
        if call == "write":
            out = dispatch.handle_write(ctx, args, now_ns=now_ns, request_digest=request_digest,
                                        req=rid, content_in_log=in_log,
                                        checkpoint=self._checkpoint)
            if out.log_durable:
                a.log_durable_answer = True
                if not self.ws_dirty:
                    self.ws_dirty_since = time.monotonic()
                self.ws_dirty += 1
        elif call == "exec":
            out = exec_sys.handle(ctx, args, now_ns=now_ns, request_digest=request_digest,
                                  req=rid)
        else:
            out = info_sys.handle(ctx, args, now_ns=now_ns, request_digest=request_digest,
                                  req=rid)
        if out.decision is not None and not out.decision.allowed:
            a.denials += 1
            tree.denials += 1
        if out.error is not None:
            code, reason, rule, decision = out.error
            return abi.error_response(rid, code, reason, rule=rule, decision=decision,
                                      seq=out.seq)
        return abi.ok_response(rid, out.result or {}, seq=out.seq)

    def _deny(self, a: Agent, rid: int | None, seq: int, request_digest: str, now_ns: int,
              violation: tuple[str, str, int]) -> dict[str, Any]:
        rule, reason, code = violation
        assert self.tree is not None
        a.denials += 1
        self.tree.denials += 1
        dseq = a.rec.append("syscall.decision", {
            "req": rid, "request_seq": seq, "request_digest": request_digest,
            "decision": abi.DENIED, "rule": rule, "reason": reason, "errno": code,
            "policy_digest": a.ctx.policy.digest, "now_ns": now_ns})
        return abi.error_response(rid, code, reason, rule=rule, seq=dseq)

    def _decide(self, a: Agent, decision: Decision, *, rid: int, request_digest: str,
                now_ns: int, extra: dict[str, Any]) -> int:
        assert self.tree is not None
        if not decision.allowed:
            a.denials += 1
            self.tree.denials += 1
        return dispatch.record_decision(a.ctx, decision, req=rid, request_digest=request_digest,
                                        now_ns=now_ns, extra=extra)

    # -- spawn, wait, register -----------------------------------------------------------------

    def _spawn(self, a: Agent, rid: int, args: dict[str, Any], request_digest: str,
               now_ns: int) -> dict[str, Any]:
        from kernel import lineage  # only a tree needs it: not on every run's import path

        tree, root, key, policy = self.tree, self.root, self.key, self._policy
        assert tree is not None and root is not None and key is not None and policy is not None
        argv: list[str] = list(args["argv"])
        resolved = self._spawn_program(argv[0])
        facts = tree.facts(a.run_id)
        asked = args.get("budget")
        budget_req: Usage | None = None
        if isinstance(asked, dict):
            budget_req = Usage(**{k: asked.get(k, getattr(facts.remainder, k))
                                  for k in BUDGET_FIELDS})
        decision = replication.check_spawn(SpawnRequest(tuple(argv), resolved, budget_req),
                                           self.contract, facts, now_ns)
        recorded = {**replication.facts_record(facts), "request": {
            "argv": argv, "resolved": resolved,
            "budget": dataclasses.asdict(budget_req) if budget_req is not None else None}}
        if not decision.allowed:
            dseq = self._decide(a, decision, rid=rid, request_digest=request_digest,
                                now_ns=now_ns, extra={"facts": recorded})
            return abi.error_response(rid, decision.errno, decision.reason, rule=decision.rule,
                                      seq=dseq)
        assert resolved is not None
        with self._signals_blocked():
            child_id = new_run_id()
            while child_id in self.agents or (self._runs_dir / child_id).exists():
                child_id = new_run_id()
            budget = budget_req if budget_req is not None else facts.remainder
            expires_ns = now_ns + self.contract.expiration_seconds * 1_000_000_000
            token = lineage.issue(key, lineage.Manifest(
                child=child_id, parent=a.run_id, root=root.run_id, depth=a.depth + 1,
                budget=budget, policy_digest=policy.digest, issued_ns=now_ns,
                expires_ns=expires_ns, nonce=secrets.token_hex(16)))
            mdigest = lineage.digest(token)
            granted = dataclasses.asdict(budget)
            dseq = self._decide(a, decision, rid=rid, request_digest=request_digest,
                                now_ns=now_ns, extra={"facts": recorded, "child": child_id,
                                                      "budget": granted,
                                                      "expires_ns": expires_ns,
                                                      "manifest_digest": mdigest})
            dhash = a.rec.head()
            tree.add_child(a.run_id, child_id, budget, now_ns)
            failpoints.hit("spawn.decided")
            child = self._new_agent(child_id, argv, resolved, a, {
                "parent": a.run_id, "root": root.run_id, "depth": a.depth + 1,
                "manifest": token, "manifest_digest": mdigest,
                "parent_decision_seq": dseq, "parent_decision_hash": dhash})
            child.token = token
            child.expires_ns = expires_ns
            child.expires_at = time.monotonic() + max(expires_ns - time.time_ns(), 0) / 1e9
            child.spawn_seq = dseq
            a.children.append(child)
            failpoints.hit("spawn.child_created")
            self._claim_live(child)
            try:
                self._start_agent(child)
            except (KernelError, OSError) as e:
                reason = f"the child's sandbox could not start: {e}"
                child.rec.append("sandbox.error", {"error": str(e)})
                self._finish(child, "failed", reason)
                rseq = a.rec.append("syscall.result", {
                    "req": rid, "request_digest": request_digest, "ok": False,
                    "errno": errno.EAGAIN, "reason": reason, "child": child_id})
                return abi.error_response(rid, errno.EAGAIN, reason, rule=decision.rule,
                                          decision=abi.ALLOWED, seq=rseq)
            assert child.sandbox is not None
            rseq = a.rec.append("syscall.result", {
                "req": rid, "request_digest": request_digest, "ok": True, "child": child_id,
                "pid": child.sandbox.pid})
            failpoints.hit("spawn.started")
        return abi.ok_response(rid, {"child": child_id, "depth": a.depth + 1,
                                     "budget": granted, "expires_ns": expires_ns,
                                     "manifest_digest": mdigest}, seq=rseq)

    def _wait(self, a: Agent, rid: int, args: dict[str, Any], request_digest: str,
              now_ns: int) -> dict[str, Any] | None:
        child = args["child"]
        target = self.agents.get(child)
        facts = {"kind": "wait", "child": child,
                 "own_child": target is not None and target.parent is a}
        if target is None or target.parent is not a:
            decision = deny("wait.not_child", f"{child!r} is not a child of this agent",
                            errno.ENOENT)
            dseq = self._decide(a, decision, rid=rid, request_digest=request_digest,
                                now_ns=now_ns, extra={"facts": facts})
            return abi.error_response(rid, decision.errno, decision.reason, rule=decision.rule,
                                      seq=dseq)
        self._decide(a, Decision(ALLOWED, "wait", f"wait for child {child}"), rid=rid,
                     request_digest=request_digest, now_ns=now_ns, extra={"facts": facts})
        timeout_ms = args.get("timeout_ms")
        a.parked = _Parked(rid, request_digest, child, None if timeout_ms is None
                           else time.monotonic() + timeout_ms / 1000)
        if target.seal is not None or timeout_ms == 0:
            return self._answer_wait(a, timed_out=target.seal is None, send=False)
        return None

    def _answer_wait(self, a: Agent, *, timed_out: bool, send: bool = True
                     ) -> dict[str, Any]:
        """Record the result of ``a``'s parked wait, unpark it, and send (or return) it."""
        parked = a.parked
        assert parked is not None
        a.parked = None
        target = self.agents[parked.child]
        done = target.seal is not None
        result = {"child": parked.child, "status": target.status if done else "running",
                  "exit_code": target.exit_code if done else None,
                  "seal": target.seal if done else None,
                  "requests": target.requests, "denials": target.denials,
                  "timed_out": timed_out and not done}
        rseq = a.rec.append("syscall.result", {"req": parked.req,
                                               "request_digest": parked.request_digest,
                                               "ok": True, **result})
        resp = abi.ok_response(parked.req, result, seq=rseq)
        if send and a.chan is not None and not a.chan.closed:
            failpoints.hit("answer.before_send")
            a.chan.send(resp)
        return resp

    def _register(self, a: Agent, rid: int, args: dict[str, Any], request_digest: str,
                  now_ns: int) -> dict[str, Any]:
        from kernel import lineage

        key = self.key
        assert key is not None
        token = args["manifest"]
        facts: dict[str, Any] = {"kind": "register", "expect_child": a.run_id,
                                 "now_ns": now_ns, "manifest_digest": None}
        with contextlib.suppress(lineage.ManifestRefused):
            facts["manifest_digest"] = lineage.digest(token)
        m: lineage.Manifest | None = None
        if a.parent is None:
            decision = deny("request.invalid", "only a spawned child registers; this agent "
                            "was started by `kernel exec`", errno.EINVAL)
        elif a.registered and token == a.token:
            decision = Decision(ALLOWED, "spawn.register", "already registered")
        else:
            try:
                m = lineage.check(token, key.public, expect_child=a.run_id, now_ns=now_ns,
                                  presented=self.presented)
            except lineage.ManifestRefused as r:
                decision = deny(r.rule, r.reason, errno.EPERM)
            else:
                decision = Decision(ALLOWED, "spawn.register", "manifest verified")
        dseq = self._decide(a, decision, rid=rid, request_digest=request_digest, now_ns=now_ns,
                            extra={"facts": facts})
        if not decision.allowed:
            return abi.error_response(rid, decision.errno, decision.reason, rule=decision.rule,
                                      seq=dseq)
        if m is not None:
            a.registered = True
            self.presented.add(str(facts["manifest_digest"]))
        assert a.parent is not None and self.root is not None and self.tree is not None
        return abi.ok_response(rid, {
            "child": a.run_id, "parent": a.parent.run_id, "root": self.root.run_id,
            "depth": a.depth, "budget": dataclasses.asdict(self.tree.nodes[a.run_id].budget),
            "expires_ns": a.expires_ns}, seq=dseq)

    def _spawn_status(self, a: Agent) -> dict[str, Any]:
        c, tree, root = self.contract, self.tree, self.root
        assert tree is not None and root is not None
        fired = tree.fired(c)
        return {"depth": a.depth, "parent": a.parent.run_id if a.parent else None,
                "root": root.run_id, "max_depth": c.max_depth,
                "max_replicas": c.max_replicas, "max_spawns": c.max_spawns,
                "cooldown_seconds": c.cooldown_seconds,
                "expiration_seconds": c.expiration_seconds, "spawns": tree.spawns,
                "live": tree.live_children(),
                "remaining_spawns": max(c.max_spawns - tree.spawns, 0),
                "children": [x.run_id for x in a.children], "expires_ns": a.expires_ns,
                "stopped": fired.rule if fired is not None else None}


def _raise_open_files() -> None:
    """Each live agent holds several of the kernel's descriptors (channel, output pipes, process
    handles, its log, its live mark): take the soft open-files limit up to the hard one, so a
    wide tree is not stopped by a default soft limit of 1,024. Sandboxes set their own."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _quota_usage(policy: Policy) -> Usage:
    return Usage(**{k: getattr(policy.quotas, k) for k in BUDGET_FIELDS})


def _fields_problem(call: str, args: dict[str, Any]) -> str | None:
    """Strict arguments of ``spawn``, ``wait`` and ``register``."""
    problem = abi.fields_problem(call, args)
    if problem is not None:
        return problem
    if call == "spawn":
        argv = args["argv"]
        if not isinstance(argv, list) or not argv or len(argv) > ARGV_MAX or not all(
                isinstance(x, str) and x and "\x00" not in x for x in argv):
            return (f"spawn: argv must be a non-empty list of at most {ARGV_MAX} non-empty "
                    "strings without NUL bytes")
        budget = args.get("budget")
        if budget is not None:
            if not isinstance(budget, dict) or not budget:
                return "spawn: budget must be an object with some of " + ", ".join(BUDGET_FIELDS)
            for k, v in budget.items():
                if k not in BUDGET_FIELDS:
                    return f"spawn: unknown budget field {k!r} (fields: {', '.join(BUDGET_FIELDS)})"
                if type(v) is not int or v < 0:
                    return f"spawn: budget {k} must be a non-negative integer"
        why = args.get("justification")
        if why is not None and not isinstance(why, str):
            return "spawn: justification must be a string"
    elif call == "wait":
        if not isinstance(args["child"], str) or not args["child"]:
            return "wait: child must be a run id"
        t = args.get("timeout_ms")
        if t is not None and (type(t) is not int or not 0 <= t <= WAIT_MAX_MS):
            return f"wait: timeout_ms must be an integer from 0 to {WAIT_MAX_MS}"
    elif not isinstance(args["manifest"], str):
        return "register: manifest must be a string (the token from $" + abi.MANIFEST_ENV + ")"
    return None


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


def _recordable_args(ctx: RunContext, call: object, args: dict[str, Any],
                     in_log: Redactor | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Request args as recorded: bulky base64 payloads become blob references.

    With ``in_log`` (the run's redactor; only for a ``write`` that may be log-durable), the
    content of an op ``write`` of at most ``LOG_CONTENT_MAX`` bytes stays in the line as the
    agent sent it (``content_b64``), unless redaction would change it: the log must hold the
    exact bytes that recovery may have to write again. The third value says it did."""
    out: dict[str, Any] = {}
    blobs: dict[str, Any] = {}
    kept = False
    for k, v in args.items():
        if k in ("content_b64", "stdin_b64") and isinstance(v, str):
            name = k[: -len("_b64")]
            if (in_log is not None and not in_log.values and k == "content_b64"
                    and args.get("op") == "write" and len(v) <= LOG_B64_MAX):
                out[k] = v  # no secret to redact: kept as sent (prepare checks the base64)
                kept = True
                continue
            try:
                data = base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                out[k] = v[:256]
                continue
            if (in_log is not None and k == "content_b64" and args.get("op") == "write"
                    and len(data) <= LOG_CONTENT_MAX and in_log.data(data) == data
                    and in_log.text(v) == v):
                out[k] = v
                kept = True
                continue
            blobs[f"{name}_blob"] = ctx.recorder.put_blob(data)
            out[f"{name}_bytes"] = len(data)
        else:
            out[k] = _jsonable(v)
    if len(canonical_json(out)) > INLINE_ARGS_MAX:
        if kept:  # too big with the content in it after all: the content goes to a blob
            return _recordable_args(ctx, call, args)
        # An agent controls the size of its arguments; big ones go to a blob, not the log line.
        blobs["args_blob"] = ctx.recorder.put_blob(canonical_json(out))
        out = {"inline": False}
    return out, blobs, kept


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
