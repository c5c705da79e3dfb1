"""``kernel selftest``: run the adversarial corpus on this host and say which guarantees hold.

Each attack of :mod:`kernel.corpus` runs in a fresh sandbox of each backend asked for (default:
every backend this host offers); the verdict comes from host-side evidence. Exit 0 when every
attack was stopped on every backend that ran, 1 when at least one guarantee does not hold here
(each is named), 4 when no backend asked for is available (nothing ran).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from kernel import corpus
from kernel.errors import ExitCode, SandboxError, UsageError


def register(sub: Any) -> None:
    s = sub.add_parser("selftest", help="run the adversarial corpus here; which guarantees hold",
                       description="Run every hostile program of the adversarial corpus "
                       "(docs/adversarial-corpus.md) in a real sandbox of each backend and check "
                       "on the host that it failed. Exits 0 when every guarantee holds on every "
                       "backend that ran, 1 when one does not (named), 4 when no backend asked "
                       "for is available.")
    s.add_argument("--isolation", choices=("native", "firejail", "all"), default="all",
                   help="backend to test (default: all, every backend available here)")
    s.add_argument("--only", action="append", default=[], metavar="PREFIX",
                   help="run only attacks whose id starts with PREFIX (repeatable), e.g. "
                   "fs. or net.tcp4")
    s.add_argument("--list", action="store_true", help="list the attacks and exit")
    s.add_argument("--json", action="store_true", help="print the results as JSON")


def _cmd_selftest(a: argparse.Namespace) -> int:
    from sandbox import registry

    attacks = [x for x in corpus.ATTACKS
               if not a.only or any(x.id.startswith(p) for p in a.only)]
    if not attacks:
        raise UsageError(f"no attack id starts with {', '.join(a.only)}",
                         hint="`kernel selftest --list` lists them")
    if a.list:
        for x in attacks:
            sys.stdout.write(f"{x.id:28} {x.category:15} {x.tries}\n")
        return int(ExitCode.OK)
    names = list(registry.NAMES) if a.isolation == "all" else [a.isolation]
    report: dict[str, Any] = {"backends": {}, "attacks": len(attacks)}
    ran = 0
    broken = 0
    for name in names:
        av = registry.probe(name)
        if not av.available:
            report["backends"][name] = {"available": False, "missing": av.missing}
            if not a.json:
                sys.stdout.write(f"{name}: not available here ({'; '.join(av.missing)}); "
                                 "its guarantees were not tested\n")
            continue
        ran += 1
        backend = registry.backend(name)
        rows: list[dict[str, Any]] = []
        t0 = time.monotonic()
        for x in attacks:
            try:
                o = corpus.run_attack(backend, x)
                held, evidence = o.held, o.evidence
            except SandboxError as e:
                held, evidence = False, [f"BROKEN: the sandbox could not be built: {e.message}"]
            broken += not held
            rows.append({"id": x.id, "category": x.category, "held": held,
                         "evidence": evidence})
            if not a.json and not held:
                sys.stdout.write(f"{name}: DOES NOT HOLD: {x.id} ({x.tries})\n")
                for line in evidence:
                    sys.stdout.write(f"    {line}\n")
        report["backends"][name] = {"available": True, "results": rows,
                                    "seconds": round(time.monotonic() - t0, 1)}
        if not a.json:
            for cat in corpus.CATEGORIES:
                mine = [r for r in rows if r["category"] == cat]
                if mine:
                    ok = sum(r["held"] for r in mine)
                    sys.stdout.write(f"{name}: {cat}: {ok}/{len(mine)} attacks stopped\n")
            total_ok = sum(r["held"] for r in rows)
            sys.stdout.write(f"{name}: {total_ok}/{len(rows)} guarantees hold here "
                             f"({time.monotonic() - t0:.0f} s)\n")
    if a.json:
        sys.stdout.write(json.dumps(report, sort_keys=True) + "\n")
    if ran == 0:
        raise SandboxError("no isolation backend asked for is available here; nothing ran",
                           hint="see the reasons above; `kernel selftest --isolation NAME`")
    return int(ExitCode.RUN_FAILED if broken else ExitCode.OK)


HANDLERS = {"selftest": _cmd_selftest}
