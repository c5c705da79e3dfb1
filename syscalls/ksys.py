"""``ksys``: the command-line syscall client for shell-based agents. UNTRUSTED side.

    ksys write PATH            < content      create or replace PATH
    ksys create PATH           < content      create PATH (fails if it exists)
    ksys append PATH           < content
    ksys delete PATH
    ksys mkdir [-p] PATH
    ksys rename PATH DEST
    ksys chmod MODE PATH       (octal, e.g. 644)
    ksys exec [--cwd DIR] -- CMD [ARG...]   relays stdout/stderr, exits with the command's code
    ksys spawn [--budget K=V[,K=V...]] [--why TEXT] -- CMD [ARG...]
                               start a child agent; prints its run id
    ksys wait ID [--timeout-ms N]
                               wait for a child to end; prints the result (JSON)
    ksys info                  run id, policy, remaining quotas, spawn status (JSON)

Exit codes: 0 success; for ``exec`` the command's own exit code; for ``wait`` 0 if the child
passed (ended with exit code 0) and 1 otherwise (failed, killed, expired, stopped, or still
running when the timeout passed); 2 usage error; 77 denied by the kernel (rule id and reason on
stderr); 71 a perform-time failure of an allowed request (ENOENT, EEXIST...); 74 the channel to
the kernel is missing or broken. Documented in docs/syscalls.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from syscalls import abi
from syscalls.client import BUDGET_FIELDS, ChannelError, Kernel, SyscallError

EXIT_CHILD_NOT_PASSED = 1
EXIT_USAGE = 2
EXIT_FAILED = 71
EXIT_CHANNEL = 74
EXIT_DENIED = 77
MAX_TIMEOUT_MS = 86_400_000


class UsageError(ValueError):
    """Bad arguments found after parsing: one line on stderr, exit 2."""


def parse_budget(values: list[str]) -> dict[str, int] | None:
    """``["syscalls=100,exec_count=2", "bytes_written=0"]`` -> a budget object (None if no
    ``--budget`` was given). Raises UsageError naming what is wrong."""
    if not values:
        return None
    budget: dict[str, int] = {}
    for value in values:
        for item in value.split(","):
            key, eq, num = item.strip().partition("=")
            key, num = key.strip(), num.strip()
            if not eq or not key:
                raise UsageError(f"--budget: {item!r} is not K=V")
            if key not in BUDGET_FIELDS:
                raise UsageError(f"--budget: unknown quota {key!r} (one of "
                                 f"{', '.join(BUDGET_FIELDS)})")
            if key in budget:
                raise UsageError(f"--budget: {key} given twice")
            if not num.isdigit() or not num.isascii():
                raise UsageError(f"--budget: {key}={num!r} is not a non-negative integer")
            budget[key] = int(num)
    return budget


def _command(argv: list[str], call: str) -> list[str]:
    cmd = argv[1:] if argv[:1] == ["--"] else argv
    if not cmd:
        raise UsageError(f"no command given (ksys {call} -- CMD [ARG...])")
    return cmd


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ksys", description="Ask the kernel to change the "
                                "workspace or run an allowlisted command.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name in ("write", "create", "append"):
        s = sub.add_parser(name, help=f"{name} PATH with the content read from stdin")
        s.add_argument("path")
        s.add_argument("--mode", type=lambda v: int(v, 8), default=None,
                       help="permission bits in octal (write/create)")
    s = sub.add_parser("delete", help="remove a file, symlink or empty directory")
    s.add_argument("path")
    s = sub.add_parser("mkdir", help="create a directory")
    s.add_argument("-p", "--parents", action="store_true")
    s.add_argument("path")
    s = sub.add_parser("rename", help="rename PATH to DEST")
    s.add_argument("path")
    s.add_argument("dest")
    s = sub.add_parser("chmod", help="set permission bits (octal)")
    s.add_argument("mode", type=lambda v: int(v, 8))
    s.add_argument("path")
    s = sub.add_parser("exec", help="run an allowlisted command: ksys exec -- CMD [ARG...]")
    s.add_argument("--cwd", default=None, help="working directory relative to the workspace")
    s.add_argument("argv", nargs=argparse.REMAINDER)
    s = sub.add_parser("spawn", help="start a child agent: ksys spawn [--budget K=V,...] "
                       "-- CMD [ARG...]; prints the child's run id")
    s.add_argument("--budget", action="append", default=[], metavar="K=V[,K=V...]",
                   help="quotas handed to the child, any of " + ", ".join(BUDGET_FIELDS)
                   + " (a quota not named: this agent's whole remainder of it)")
    s.add_argument("--why", default=None, metavar="TEXT", help="justification, recorded")
    s.add_argument("argv", nargs=argparse.REMAINDER)
    s = sub.add_parser("wait", help="wait for a child to end; prints the result as JSON and "
                       "exits 0 if the child passed, 1 otherwise")
    s.add_argument("child", metavar="ID")
    s.add_argument("--timeout-ms", default=None, metavar="N",
                   help=f"give up after N milliseconds (0..{MAX_TIMEOUT_MS})")
    sub.add_parser("info", help="run id, policy summary, remaining quotas, spawn status")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    try:
        a = p.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    budget: dict[str, int] | None = None
    timeout_ms: int | None = None
    cmd: list[str] = []
    try:
        if a.cmd in ("exec", "spawn"):
            cmd = _command(a.argv, a.cmd)
        if a.cmd == "spawn":
            budget = parse_budget(a.budget)
        if a.cmd == "wait" and a.timeout_ms is not None:
            t = a.timeout_ms.strip()
            if not t.isdigit() or not t.isascii() or int(t) > MAX_TIMEOUT_MS:
                raise UsageError(f"--timeout-ms: {a.timeout_ms!r} is not an integer "
                                 f"0..{MAX_TIMEOUT_MS}")
            timeout_ms = int(t)
    except UsageError as e:
        sys.stderr.write(f"ksys {a.cmd}: {e}\n")
        return EXIT_USAGE
    try:
        k = Kernel.from_env()
    except ChannelError as e:
        sys.stderr.write(f"ksys: {e}\n")
        return EXIT_CHANNEL
    try:
        if a.cmd in ("write", "create", "append"):
            data = sys.stdin.buffer.read()
            if a.cmd == "write":
                r = k.write(a.path, data, mode=a.mode)
            elif a.cmd == "create":
                r = k.create(a.path, data, mode=a.mode)
            else:
                r = k.append(a.path, data)
        elif a.cmd == "delete":
            r = k.delete(a.path)
        elif a.cmd == "mkdir":
            r = k.mkdir(a.path, parents=a.parents)
        elif a.cmd == "rename":
            r = k.rename(a.path, a.dest)
        elif a.cmd == "chmod":
            r = k.chmod(a.path, a.mode)
        elif a.cmd == "exec":
            res = k.exec(cmd, cwd=a.cwd)
            sys.stdout.buffer.write(res.stdout)
            sys.stdout.flush()
            sys.stderr.buffer.write(res.stderr)
            for ch in res.changes:
                if ch.get("decision") != abi.ALLOWED:
                    sys.stderr.write(f"ksys exec: change refused: {ch.get('op')} "
                                     f"{ch.get('path')}: {ch.get('reason')} "
                                     f"(rule {ch.get('rule')})\n")
            if res.timed_out:
                sys.stderr.write("ksys exec: the command timed out and was killed\n")
            sys.stderr.flush()
            return res.exit_code if 0 <= res.exit_code <= 255 else 128 + (-res.exit_code % 128)
        elif a.cmd == "spawn":
            r = k.spawn(cmd, budget, a.why)
            sys.stdout.write(f"{r.get('child')}\n")
            return 0
        elif a.cmd == "wait":
            r = k.wait(a.child, timeout_ms)
            sys.stdout.write(json.dumps(r, indent=2, sort_keys=True) + "\n")
            passed = r.get("status") == "passed" and not r.get("timed_out")
            return 0 if passed else EXIT_CHILD_NOT_PASSED
        else:
            r = k.info()
            sys.stdout.write(json.dumps(r, indent=2, sort_keys=True) + "\n")
            return 0
    except SyscallError as e:
        sys.stderr.write(f"ksys {a.cmd}: {e.decision}: {e.reason} "
                         f"(rule {e.rule}, {abi.error_name(e.errno or 0)})\n")
        return EXIT_DENIED if e.decision == abi.DENIED else EXIT_FAILED
    except ChannelError as e:
        sys.stderr.write(f"ksys: {e}\n")
        return EXIT_CHANNEL
    del r
    return 0


if __name__ == "__main__":
    sys.exit(main())
