"""The ``kernel`` command: parse -> call the library -> print -> map errors to exit codes.

Nothing here decides anything; every command is a call into the Python API. Every failure the
operator can cause ends in one message on stderr and an exit code from ``kernel.errors.ExitCode``
(documented in docs/cli.md), never a traceback (set ``KERNEL_DEBUG=1`` to see one for an
internal error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from kernel.errors import ExitCode, KernelError, NotFoundError, UsageError

STATUS_EXIT = {
    "passed": ExitCode.OK,
    "failed": ExitCode.RUN_FAILED,
    "limit": ExitCode.LIMIT,
    "protocol_error": ExitCode.PROTOCOL,
    "killed": ExitCode.KILLED,
}
VERIFY_EXIT = {"intact": ExitCode.OK, "incomplete": ExitCode.INCOMPLETE,
               "corrupt": ExitCode.INTEGRITY}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # no usage dump + exit 2 from deep inside argparse
        raise UsageError(f"{self.prog}: {message}", hint=f"see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kernel", description="Run untrusted agent code in a sandbox whose only "
                "way to change anything is a small, recorded syscall layer.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)

    e = sub.add_parser("exec", help="run an agent command under a policy",
                       description="Run CMD as the agent, cwd = the workspace, under the policy. "
                       "Exits 0 only when the run passes (docs/cli.md lists every code).")
    e.add_argument("--policy", default="default", metavar="NAME|PATH",
                   help="policy profile: a name in policies/ or a path (default: default)")
    e.add_argument("--workspace", default=".", metavar="DIR",
                   help="the workspace the agent sees read-only (default: current directory)")
    e.add_argument("--runs-dir", default="runs", metavar="DIR",
                   help="where run folders go (default: ./runs; hidden from the agent)")
    e.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="pass one variable to the agent explicitly (repeatable; recorded)")
    e.add_argument("--isolation", choices=("native", "firejail", "auto"), default=None,
                   help="override the policy's isolation backend (recorded)")
    e.add_argument("--json", action="store_true",
                   help="print one JSON object at the end; agent output goes to stderr")
    e.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")

    v = sub.add_parser("verify", help="check a run folder's chain, digests, signatures, seal",
                       description="Exit 0 only if the run folder is intact; 6 if it was never "
                       "sealed but is intact so far; 5 if anything is wrong (the first thing "
                       "wrong is named).")
    v.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (or a run id under ./runs)")
    v.add_argument("--trust", action="append", default=[], metavar="PUBKEY_FILE",
                   help="trusted kernel public key (repeatable; default: this host's key)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")

    k = sub.add_parser("key", help="show the kernel's public key (created on first use)")
    k.add_argument("--json", action="store_true")
    return p


def _cmd_exec(a: argparse.Namespace) -> int:
    from kernel import agentenv, policy, supervisor

    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        raise UsageError("kernel exec: no agent command given",
                         hint="kernel exec [OPTIONS] -- CMD [ARG...]")
    pol = policy.load(a.policy)
    env = agentenv.parse_env_args(a.env)
    out = sys.stderr.buffer if a.json else sys.stdout.buffer
    outcome = supervisor.run(supervisor.ExecOptions(
        argv=cmd, policy=pol, workspace=Path(a.workspace), runs_dir=Path(a.runs_dir), env=env,
        isolation=a.isolation, relay_stdout=out, relay_stderr=sys.stderr.buffer))
    if a.json:
        sys.stdout.write(json.dumps(outcome.to_json(), sort_keys=True) + "\n")
    else:
        extra = f", breach: {outcome.breach}" if outcome.breach else ""
        sys.stderr.write(
            f"kernel: run {outcome.run_id} {outcome.status} (agent exit "
            f"{outcome.exit_code}{extra}; isolation {outcome.isolation}; "
            f"{outcome.requests} requests, {outcome.denials} denied)\n"
            f"kernel: run folder {outcome.run_dir}\n")
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
    if a.json:
        sys.stdout.write(json.dumps(report.to_json(), sort_keys=True) + "\n")
    else:
        line = f"{run_dir}: {report.status}"
        if report.problem:
            line += f": {report.problem}"
        sys.stdout.write(line + "\n")
        if report.status == "intact":
            sys.stdout.write(f"  {report.events} events, sealed by {report.keyid}\n")
        for w in report.warnings:
            sys.stdout.write(f"  warning: {w}\n")
    return int(VERIFY_EXIT.get(report.status, ExitCode.INTEGRITY))


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


COMMANDS = {"exec": _cmd_exec, "verify": _cmd_verify, "key": _cmd_key}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
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
            traceback.print_exc()
        sys.stderr.write(f"kernel: internal error: {type(e).__name__}: {e}\n"
                         "  hint: set KERNEL_DEBUG=1 for a traceback and report it\n")
        return int(ExitCode.INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
