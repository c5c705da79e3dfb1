"""``ksys``: the command-line syscall client for shell-based agents. UNTRUSTED side.

    ksys write PATH            < content      create or replace PATH
    ksys create PATH           < content      create PATH (fails if it exists)
    ksys append PATH           < content
    ksys delete PATH
    ksys mkdir [-p] PATH
    ksys rename PATH DEST
    ksys chmod MODE PATH       (octal, e.g. 644)
    ksys exec [--cwd DIR] -- CMD [ARG...]   relays stdout/stderr, exits with the command's code
    ksys info                  run id, policy, remaining quotas (JSON)

Exit codes: 0 success; for ``exec`` the command's own exit code; 2 usage error; 77 denied by
the kernel (rule id and reason on stderr); 71 a perform-time failure of an allowed request
(ENOENT, EEXIST...); 74 the channel to the kernel is missing or broken. Documented in
docs/syscalls.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from syscalls import abi
from syscalls.client import ChannelError, Kernel, SyscallError

EXIT_USAGE = 2
EXIT_FAILED = 71
EXIT_CHANNEL = 74
EXIT_DENIED = 77


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
    sub.add_parser("info", help="run id, policy summary, remaining quotas")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    try:
        a = p.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
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
            cmd = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
            if not cmd:
                sys.stderr.write("ksys exec: no command given (ksys exec -- CMD [ARG...])\n")
                return EXIT_USAGE
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
