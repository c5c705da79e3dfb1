"""The ``kernel`` command: parse -> call the library -> print -> map errors to exit codes.

Nothing here decides anything; every command is a call into the Python API. Every failure the
operator can cause ends in one message on stderr and an exit code from ``kernel.errors.ExitCode``
(documented in docs/cli.md), never a traceback (set ``KERNEL_DEBUG=1`` to see one for an
internal error).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

from kernel import approval_cli
from kernel.errors import ExitCode, KernelError, NotFoundError, UsageError

STATUS_EXIT = {
    "passed": ExitCode.OK,
    "failed": ExitCode.RUN_FAILED,
    "limit": ExitCode.LIMIT,
    "protocol_error": ExitCode.PROTOCOL,
    "killed": ExitCode.KILLED,
    "stopped": ExitCode.LIMIT,
}
VERIFY_EXIT = {"intact": ExitCode.OK, "incomplete": ExitCode.INCOMPLETE,
               "corrupt": ExitCode.INTEGRITY}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # no usage dump + exit 2 from deep inside argparse
        raise UsageError(f"{self.prog}: {message}", hint=f"see `{self.prog} --help`")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``kernel`` parser. With ``command="exec"`` only the exec sub-parser is added: a
    ``kernel exec`` parses exactly as with the whole parser (the first argument selects the
    sub-parser, which parses the rest), without building the others or importing the
    self-test's corpus on every run."""
    p = _Parser(prog="kernel", description="Run untrusted agent code in a sandbox whose only "
                "way to change anything is a small, recorded syscall layer.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)
    _exec_parser(sub)
    if command == "exec":
        return p
    _other_parsers(sub)
    return p


def _exec_parser(sub: Any) -> None:
    e = sub.add_parser("exec", help="run an agent command under a policy",
                       description="Run CMD as the agent, cwd = the workspace, under the policy. "
                       "Exits 0 only when the run passes (docs/cli.md lists every code).")
    e.add_argument("--policy", default=None, metavar="NAME|PATH",
                   help="policy profile: a name in policies/ or a path (default: the task's, "
                   "else default)")
    e.add_argument("--workspace", default=None, metavar="DIR",
                   help="the workspace the agent sees read-only (default: the task's, else the "
                   "current directory)")
    e.add_argument("--task", default=None, metavar="TASK_FILE",
                   help="a task file (TOML): command, workspace, policy, verification commands "
                   "and gate rules; exit 0 only when the gate passes")
    e.add_argument("--runs-dir", default="runs", metavar="DIR",
                   help="where run folders go (default: ./runs; hidden from the agent)")
    e.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="pass one variable to the agent explicitly (repeatable; recorded)")
    e.add_argument("--isolation", choices=("native", "firejail", "auto"), default=None,
                   help="override the policy's isolation backend (recorded)")
    e.add_argument("--json", action="store_true",
                   help="print one JSON object at the end; agent output goes to stderr")
    e.add_argument("--approve", choices=("prompt", "queue", "deny"), default=None,
                   help="how protected actions are decided: prompt in this terminal, queue "
                   "for `kernel approve` (default when stdin is not a terminal), or deny")
    e.add_argument("--approve-key", metavar="FILE", default=None,
                   help="prompt mode: your reviewer key (default: your only key)")
    e.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")


def _other_parsers(sub: Any) -> None:
    from kernel import selftest

    v = sub.add_parser("verify", help="check a run folder's chain, digests, signatures, seal",
                       description="Exit 0 only if the run folder is intact; 6 if it was never "
                       "sealed but is intact so far; 5 if anything is wrong (the first thing "
                       "wrong is named).")
    v.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (or a run id under ./runs)")
    v.add_argument("--trust", action="append", default=[], metavar="PUBKEY_FILE",
                   help="trusted kernel public key (repeatable; default: this host's key)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--attestation", default=None, metavar="FILE",
                   help="also check this in-toto/DSSE attestation of the run (default: "
                   "RUN_DIR.intoto.json when it exists); an invalid one exits 5")

    kl = sub.add_parser("kill", help="end live runs: kill every process, record, seal",
                        description="Ask the kernel of each named live run (or, with --all, "
                        "of every live run of the runs dir) to end it: every process of the run "
                        "is killed, `run.kill` is recorded and the folder is sealed with status "
                        "killed. Waits until each run has ended. Exit 0 when all have; 8 when a "
                        "named run is not live; 70 when one did not end in time.")
    kl.add_argument("run_ids", nargs="*", metavar="RUN", help="run id(s) to end")
    kl.add_argument("--all", action="store_true", help="end every live run of the runs dir")
    kl.add_argument("--runs-dir", default="runs", metavar="DIR",
                    help="the runs dir the runs were started with (default: ./runs)")
    kl.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                    help="how long to wait for the runs to end (default: 30, plus 0.1 per "
                    "live run of the runs dir: a tree's folders are sealed one by one)")
    kl.add_argument("--json", action="store_true", help="print {killed, not_live} as JSON")

    k = sub.add_parser("key", help="show the kernel's public key (created on first use)")
    k.add_argument("--json", action="store_true")
    _evidence_parsers(sub)
    approval_cli.register(sub)
    selftest.register(sub)


def _evidence_parsers(sub: Any) -> None:
    """replay, recover, attest, show: the auditor's commands over run folders."""
    r = sub.add_parser("replay", help="re-derive every decision and rebuild the workspace",
                       description="Verify the run, then re-decide every recorded request with "
                       "the recorded policy, facts and time, re-apply every recorded change to "
                       "the initial workspace and require the recorded final tree. Exit 0 if "
                       "identical; 21 at the first divergence (seq, expected, actual).")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (or a run id under ./runs)")
    r.add_argument("--workspace", metavar="DIR", default=None,
                   help="the initial workspace (needed only when the run did not store it); "
                   "must match the initial manifest")
    r.add_argument("--rerun-gates", action="store_true",
                   help="re-run the task's verification commands, sandboxed, on the replayed "
                   "workspace and compare the verifier report")
    r.add_argument("--trust", action="append", default=[], metavar="PUBKEY_FILE",
                   help="trusted kernel public key (repeatable; default: this host's key)")
    r.add_argument("--json", action="store_true", help="print the report as JSON")

    c = sub.add_parser("recover", help="seal a run cut short (kernel killed) as aborted",
                       description="Seal a run folder that verifies as incomplete: a torn last "
                       "line is kept as evidence, stray workspace temp files are removed and "
                       "recorded, committed (log-durable) writes after the last workspace sync "
                       "are re-applied from the log, the final workspace is recorded, then "
                       "run.end (aborted) and the seal. In an agent tree, the folder's unsealed "
                       "descendants are recovered first, deepest first. Needs this host's "
                       "kernel key (the one that started the run).")
    c.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (or a run id under ./runs)")
    c.add_argument("--workspace", metavar="DIR", default=None,
                   help="the run's workspace (default: the one recorded in run.json)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")

    t = sub.add_parser("attest", help="write a signed in-toto attestation of a sealed run",
                       description="Write an in-toto Statement v1 (SLSA Provenance v1 "
                       "predicate) naming every file of the intact run folder, in a DSSE "
                       "envelope signed with this host's kernel key, to RUN_DIR.intoto.json "
                       "(next to the folder) or --out FILE. `kernel verify` checks it.")
    t.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (or a run id under ./runs)")
    t.add_argument("--out", default=None, metavar="FILE",
                   help="where to write it (default: RUN_DIR.intoto.json)")
    t.add_argument("--json", action="store_true", help="print {path, subjects} as JSON")

    s = sub.add_parser("show", help="a run as a readable timeline, with lineage and totals",
                       description="Verify the run folder, then print each request with its "
                       "decision(s), rule, approvals and effect, the changes captured from each "
                       "exec, the other events in order, and totals. Secrets are redacted as "
                       "everywhere (the record never holds them).")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (or a run id under ./runs)")
    s.add_argument("--trust", action="append", default=[], metavar="PUBKEY_FILE",
                   help="trusted kernel public key (repeatable; default: this host's key)")
    s.add_argument("--json", action="store_true", help="print the timeline as JSON")


def _trusted_keys(trust: list[str]) -> list[Any]:
    from kernel import keys

    if trust:
        return [keys.load_public_key(Path(t)) for t in trust]
    pub = keys.kernel_home() / "keys" / "kernel.pub"
    if not pub.exists():
        raise NotFoundError(f"no trusted key: {pub} does not exist",
                            hint="pass --trust PUBKEY_FILE with the kernel key that sealed the "
                            "run")
    return [keys.load_public_key(pub)]


def _cmd_replay(a: argparse.Namespace) -> int:
    from kernel import replay

    run_dir = _find_run(a.run_dir)
    if a.workspace is not None and not Path(a.workspace).is_dir():
        raise NotFoundError(f"workspace {a.workspace}: no such directory")
    rep = replay.replay_run(run_dir, _trusted_keys(a.trust),
                            workspace=Path(a.workspace) if a.workspace else None,
                            rerun_gates=a.rerun_gates)
    if a.json:
        sys.stdout.write(json.dumps(rep.to_json(), sort_keys=True) + "\n")
    else:
        line = f"{run_dir}: replay {rep.status}"
        if rep.divergence is not None:
            line += f": first divergence at {rep.divergence}"
        if rep.problem:
            line += f": {rep.problem}"
        sys.stdout.write(line + "\n")
        if rep.status == replay.IDENTICAL:
            fc = rep.final_check or ""
            final = (f"final tree checked by replaying the root {fc[len('root:'):]}"
                     if fc.startswith("root:") else f"final tree {rep.final_tree_digest}")
            sys.stdout.write(f"  {rep.events} events; {rep.rederived} decisions re-derived, "
                             f"{rep.refusals} early refusals checked, {rep.applied} changes "
                             f"re-applied; {final}\n")
        for n in rep.notes:
            sys.stdout.write(f"  note: {n}\n")
        if rep.gates is not None:
            g = rep.gates
            if g.get("same") is None:
                sys.stdout.write(f"  gates: {g.get('detail')}\n")
            else:
                for row in g.get("rerun") or []:
                    sys.stdout.write(f"  re-ran verification {row['name']}: exit "
                                     f"{row['exit_code']}"
                                     + (" (timed out)" if row.get("timed_out") else "") + "\n")
                verdict = (g.get("gate_rerun") or {}).get("passed")
                sys.stdout.write(f"  verifier report {'same' if g['same'] else 'DIFFERENT'}; "
                                 f"gate on the replayed tree: "
                                 f"{'passed' if verdict else 'failed'}\n")
    if rep.status == replay.IDENTICAL:
        return int(ExitCode.OK)
    if rep.status == replay.DIVERGED:
        return int(ExitCode.REPLAY_DIVERGED)
    if rep.verify_status == "incomplete":
        return int(ExitCode.INCOMPLETE)
    if rep.verify_status == "corrupt":
        return int(ExitCode.INTEGRITY)
    return int(ExitCode.BAD_INPUT)


def _cmd_show(a: argparse.Namespace) -> int:
    from kernel import show

    run_dir = _find_run(a.run_dir)
    view, status = show.show_run(run_dir, _trusted_keys(a.trust))
    if a.json:
        sys.stdout.write(json.dumps({"verify_status": status, **view}, sort_keys=True) + "\n")
    else:
        sys.stdout.write(show.render(view, status))
    return int(ExitCode.OK)


def _cmd_attest(a: argparse.Namespace) -> int:
    from kernel import attest, keys

    run_dir = _find_run(a.run_dir)
    key = keys.load_or_create_kernel_key(keys.kernel_home())
    path = attest.attest_run(run_dir, key, Path(a.out) if a.out else None)
    if a.json:
        sys.stdout.write(json.dumps({"path": str(path), "keyid": key.keyid}) + "\n")
    else:
        sys.stdout.write(f"{path}\n")
    return int(ExitCode.OK)


def _cmd_recover(a: argparse.Namespace) -> int:
    from kernel import keys, recover

    run_dir = _find_run(a.run_dir)
    key = keys.load_or_create_kernel_key(keys.kernel_home())
    rep = recover.recover_run(run_dir, key,
                              workspace=Path(a.workspace) if a.workspace else None)
    if a.json:
        sys.stdout.write(json.dumps(rep.to_json(), sort_keys=True) + "\n")
    else:
        for r in [*rep.descendants, rep]:  # the order they were sealed: children first
            _print_recovered(r)
    return int(ExitCode.OK)


def _print_recovered(rep: Any) -> None:
    sys.stdout.write(f"{rep.run_dir}: sealed as {rep.status} ({rep.events_before} events "
                     f"were intact")
    sys.stdout.write(f"; torn tail of {rep.torn_tail} bytes kept as evidence"
                     if rep.torn_tail else "")
    sys.stdout.write(")\n")
    for u in rep.unfinished:
        if u.get("missing") == "spawn.exit":
            sys.stdout.write(f"  unfinished: child {u.get('child')} spawned at seq {u['seq']} "
                             "has no recorded end (spawn.exit)\n")
        elif u.get("child"):
            sys.stdout.write(f"  unfinished: spawn of child {u.get('child')} allowed at seq "
                             f"{u['seq']} has no recorded result (the child never ran)\n")
        else:
            sys.stdout.write(f"  unfinished: request {u['req']} allowed at seq {u['seq']} "
                             "has no recorded result (the final tree shows its effect)\n")
    for s in rep.stray_removed:
        sys.stdout.write(f"  removed stray temp file {s} (kept as a blob)\n")
    for d in rep.redone:
        sys.stdout.write(f"  committed write of {d['path']} (seq {d['seq']}): {d['outcome']}\n")


def _cmd_exec(a: argparse.Namespace) -> int:
    # kernel.task and kernel.gates only when there is a gate to run (~5 ms of every run else)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # importing only allocates (classes, functions, tables): ~5 ms of collections
    try:
        from kernel import agentenv, policy, supervisor
    finally:
        gc.freeze()  # what the imports made lives as long as the process: never scanned again
        if gc_was_enabled:
            gc.enable()

    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    task = None
    if a.task is not None:
        from kernel import task as task_mod

        task = task_mod.load(Path(a.task))
        if cmd:
            raise UsageError("kernel exec: give the agent command in the task file or after "
                             "--, not both", hint="drop -- CMD, or drop --task")
        cmd = list(task.command)
    if not cmd:
        raise UsageError("kernel exec: no agent command given",
                         hint="kernel exec [OPTIONS] -- CMD [ARG...]")
    pol = policy.load(a.policy or (task.policy if task else "default"))
    env = agentenv.parse_env_args(a.env)
    out = sys.stderr.buffer if a.json else sys.stdout.buffer
    workspace = Path(a.workspace) if a.workspace else (task.workspace if task else Path("."))
    gated = task is not None
    if task is None and pol.gate.active():  # the policy's gate alone, no verification command
        from kernel import task as task_mod

        task = task_mod.Task(command=tuple(cmd), workspace=workspace, policy=pol.name,
                             gate=task_mod.GateRules(False, False, False, -1, ()))
    if task is not None:
        from kernel import gates
    approve = approval_cli.exec_options(a)
    try:
        outcome = supervisor.run(supervisor.ExecOptions(
            argv=cmd, policy=pol, workspace=workspace, runs_dir=Path(a.runs_dir), env=env,
            isolation=a.isolation, relay_stdout=out, relay_stderr=sys.stderr.buffer,
            **approve, ignore_late_signals=True,
            after_agent=(lambda ctx, status, code: gates.run_gate(ctx, task, status))
            if task is not None else None))
    finally:  # the prompt's terminal: nothing of it may wait in a buffer (see _exit_now)
        tty = approve.get("tty_out")
        if tty is not None and tty not in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                tty.flush()
    if a.json:
        sys.stdout.write(json.dumps(outcome.to_json(), sort_keys=True) + "\n")
    else:
        extra = f", breach: {outcome.breach}" if outcome.breach else ""
        sys.stderr.write(
            f"kernel: run {outcome.run_id} {outcome.status} (agent exit "
            f"{outcome.exit_code}{extra}; isolation {outcome.isolation}; "
            f"{outcome.requests} requests, {outcome.denials} denied"
            + (f"; {outcome.children} child agents" if outcome.children else "") + ")\n"
            f"kernel: run folder {outcome.run_dir}\n")
        if outcome.gate is not None:
            verdict = "passed" if outcome.gate["passed"] else "FAILED"
            sys.stderr.write(f"kernel: gate {verdict}\n")
            for r in outcome.gate["rules"]:
                mark = "ok  " if r["passed"] else "FAIL"
                sys.stderr.write(f"  {mark} {r['rule']}: {r['detail']}\n")
    if outcome.gate is not None and (gated or outcome.status == "passed"):
        return int(ExitCode.OK if outcome.gate["passed"] else ExitCode.GATE_FAILED)
    return int(STATUS_EXIT.get(outcome.status, ExitCode.RUN_FAILED))


def _find_run(arg: str) -> Path:
    p = Path(arg)
    if p.exists():
        return p
    if "/" not in arg and (Path("runs") / arg).exists():
        return Path("runs") / arg
    raise NotFoundError(f"run folder {arg}: no such directory",
                        hint="give the path of a run folder, or a run id under ./runs")


def _cmd_verify(a: argparse.Namespace) -> int:
    from kernel import keys, verify

    run_dir = _find_run(a.run_dir)
    if a.trust:
        trusted = [keys.load_public_key(Path(t)) for t in a.trust]
    else:
        pub = keys.kernel_home() / "keys" / "kernel.pub"
        if not pub.exists():
            raise NotFoundError(f"no trusted key: {pub} does not exist",
                                hint="pass --trust PUBKEY_FILE with the kernel key that "
                                "sealed the run")
        trusted = [keys.load_public_key(pub)]
    report = verify.verify_run(run_dir, trusted)
    att = _check_attestation(a, run_dir, trusted)
    if a.json:
        out = report.to_json()
        out["attestation"] = att.to_json() if att is not None else None
        sys.stdout.write(json.dumps(out, sort_keys=True) + "\n")
    else:
        line = f"{run_dir}: {report.status}"
        if report.problem:
            line += f": {report.problem}"
        sys.stdout.write(line + "\n")
        if report.status == "intact":
            sys.stdout.write(f"  {report.events} events, sealed by {report.keyid}\n")
        if report.lineage is not None:
            lin = report.lineage
            sys.stdout.write(f"  spawned by {lin['parent']} (root {lin['root']}, depth "
                             f"{lin['depth']}); the link is checked when the parent is verified\n")
        for line in report.child_lines():
            sys.stdout.write(line + "\n")
        for w in report.warnings:
            sys.stdout.write(f"  warning: {w}\n")
        if att is not None:
            sys.stdout.write(f"  attestation {att.path}: "
                             + (f"valid, signed by {att.keyid}\n" if att.valid
                                else f"INVALID: {att.problem}\n"))
    if att is not None and not att.valid:
        return int(ExitCode.INTEGRITY)
    return int(VERIFY_EXIT.get(report.status, ExitCode.INTEGRITY))


def _check_attestation(a: argparse.Namespace, run_dir: Path, trusted: list[Any]) -> Any:
    """The run's attestation (``--attestation FILE``, else ``RUN_DIR.intoto.json`` if present)."""
    from kernel import attest

    path = Path(a.attestation) if a.attestation else attest.sidecar_path(run_dir)
    if a.attestation and not path.is_file():
        raise NotFoundError(f"attestation {path}: no such file")
    if not path.is_file():
        return None
    return attest.verify_attestation(run_dir, path, trusted)


def _cmd_kill(a: argparse.Namespace) -> int:
    from kernel import killswitch

    if a.all == bool(a.run_ids):
        raise UsageError("kernel kill: name run id(s) or give --all (not both)")
    runs_dir = Path(a.runs_dir)
    live = killswitch.live_runs(runs_dir)
    wanted = sorted(live) if a.all else list(dict.fromkeys(a.run_ids))
    missing = [r for r in wanted if r not in live]
    targets = [r for r in wanted if r in live]
    for r in targets:
        try:
            killswitch.request_kill(runs_dir, live[r])
        except ProcessLookupError:
            pass  # it ended meanwhile
        except PermissionError as e:
            raise KernelError(f"run {r}: cannot signal its kernel (pid "
                              f"{live[r]['kernel_pid']}): {e.strerror}",
                              hint="run `kernel kill` as the user who started the run") from None
    timeout = a.timeout if a.timeout is not None else 30.0 + 0.1 * len(live)
    left = killswitch.wait_ended(runs_dir, targets, timeout)
    killed = [r for r in targets if r not in left]
    if a.json:
        sys.stdout.write(json.dumps({"killed": killed, "not_live": missing,
                                     "still_live": left}, sort_keys=True) + "\n")
    else:
        for r in killed:
            sys.stdout.write(f"{r}: killed\n")
    for r in missing:
        sys.stderr.write(f"kernel kill: run {r} is not live in {runs_dir}\n")
    if left:
        raise KernelError(f"run(s) {', '.join(left)} did not end within {timeout:g} s")
    if missing:
        return int(ExitCode.NOT_FOUND)
    return int(ExitCode.OK)


def _cmd_selftest(a: argparse.Namespace) -> int:
    from kernel import selftest

    return selftest.HANDLERS["selftest"](a)


def _cmd_key(a: argparse.Namespace) -> int:
    from kernel import keys

    home = keys.kernel_home()
    key = keys.load_or_create_kernel_key(home)
    if a.json:
        sys.stdout.write(json.dumps({"keyid": key.keyid,
                                     "public_key_file": str(home / "keys" / "kernel.pub")})
                         + "\n")
    else:
        sys.stdout.write(f"{key.keyid}\n{home / 'keys' / 'kernel.pub'}\n")
    return 0


COMMANDS = {"exec": _cmd_exec, "verify": _cmd_verify, "key": _cmd_key, "kill": _cmd_kill}
COMMANDS.update(approval_cli.HANDLERS)
COMMANDS["selftest"] = _cmd_selftest
COMMANDS.update({"replay": _cmd_replay, "recover": _cmd_recover, "attest": _cmd_attest,
                 "show": _cmd_show})


def main(argv: list[str] | None = None) -> int:
    """Run one command. Called with no argv (the ``kernel`` program itself), ``kernel exec``
    ends the process as soon as its output is flushed: see :func:`_exit_now`."""
    args = sys.argv[1:] if argv is None else argv
    code = _main(args)
    if argv is None and args[:1] == ["exec"]:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process with ``code`` without the interpreter's teardown (about 17 ms after a
    run: every module and object of the exec path freed one by one, for nothing).

    By then the run folder is sealed and fsynced, the index row committed, every file the
    kernel opened is closed and the prompt's terminal flushed (:func:`_cmd_exec`); what the
    teardown would still do is run the atexit handlers (run here), flush stdout and stderr
    (done here) and join other threads (there are none: if one is alive, or a flush fails,
    the ordinary exit happens instead)."""
    import atexit
    import threading

    if threading.active_count() != 1:
        return
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # AttributeError: stdout/stderr is None
        return
    os._exit(code)


def _main(args: list[str]) -> int:
    try:
        a = build_parser(args[0] if args else None).parse_args(args)
        return COMMANDS[a.command](a)
    except KernelError as e:
        sys.stderr.write(f"kernel: {e.diagnostics()}\n")
        return int(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("kernel: interrupted\n")
        return int(ExitCode.KILLED)
    except BrokenPipeError:
        return int(ExitCode.OK)
    except Exception as e:  # the kernel's own failure: one line, no traceback by default
        if os.environ.get("KERNEL_DEBUG"):
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"kernel: internal error: {type(e).__name__}: {e}\n"
                         "  hint: set KERNEL_DEBUG=1 for a traceback and report it\n")
        return int(ExitCode.INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
