"""Reviewer and index commands: approvals, approve, deny, keys, runs, reconcile.

Thin, like ``kernel/_cli.py``: parse, call the library, print, raise a ``KernelError`` for the
exit code. Signing happens here, in the reviewer's own process, with the reviewer's own key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from kernel.errors import (
    ApprovalClosedError,
    ApprovalRefusedError,
    BadInputError,
    NotFoundError,
    UsageError,
)


def register(sub: Any) -> None:
    """Add the subcommands to the ``kernel`` parser (handlers: :data:`HANDLERS`)."""
    def runs_dir_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--runs-dir", default="runs", metavar="DIR",
                       help="the runs dir the operator used (default: ./runs); the control "
                       "plane is DIR.control/control.db beside it")

    a = sub.add_parser("approvals", help="list pending approval requests; `show ID` for one",
                       description="List the requests waiting for reviewers (run, agent, "
                       "action, age, expiry), or show one: the diff or command, the rule and "
                       "its justification, the run's lineage and remaining quota.")
    runs_dir_opt(a)
    a.add_argument("--all", action="store_true", help="also list decided requests")
    a.add_argument("--json", action="store_true")
    asub = a.add_subparsers(dest="approvals_cmd", metavar="show")
    s = asub.add_parser("show", help="show one request")
    s.add_argument("id", metavar="ID")
    runs_dir_opt(s)
    s.add_argument("--json", action="store_true")

    for name, helptext in (("approve", "sign and submit an approval"),
                           ("deny", "sign and submit a denial")):
        p = sub.add_parser(name, help=helptext,
                           description=f"{helptext.capitalize()} for request ID with your "
                           "reviewer key (--key, or the only key in $KERNEL_HOME/reviewers), "
                           "or submit an envelope signed elsewhere (--envelope).")
        p.add_argument("id", metavar="ID")
        runs_dir_opt(p)
        p.add_argument("--reason", required=(name == "deny"), default="",
                       help="why (required for deny; recorded)")
        p.add_argument("--key", metavar="FILE", help="your reviewer private key file")
        p.add_argument("--envelope", metavar="FILE",
                       help="a signed decision envelope made elsewhere (JSON)")
        p.add_argument("--json", action="store_true")

    k = sub.add_parser("keys", help="reviewer keys: new, list, export",
                       description="Reviewer Ed25519 keys in $KERNEL_HOME/reviewers/ "
                       "(private key mode 0600).")
    ksub = k.add_subparsers(dest="keys_cmd", metavar="new|list|export", required=True)
    kn = ksub.add_parser("new", help="create a reviewer key pair")
    kn.add_argument("--reviewer", required=True, metavar="NAME")
    kl = ksub.add_parser("list", help="list your reviewer keys")
    kl.add_argument("--json", action="store_true")
    ke = ksub.add_parser("export", help="print keyring entries for your public keys")
    ke.add_argument("names", nargs="*", metavar="NAME")

    r = sub.add_parser("runs", help="the runs index; `runs show RUN` for one run",
                       description="List runs from the control-plane index, each spawned "
                       "child indented under the run that spawned it.")
    runs_dir_opt(r)
    r.add_argument("--json", action="store_true")
    rsub = r.add_subparsers(dest="runs_cmd", metavar="show")
    rs = rsub.add_parser("show", help="one run: its lineage, children and approval requests")
    rs.add_argument("run_id", metavar="RUN")
    runs_dir_opt(rs)
    rs.add_argument("--json", action="store_true")

    c = sub.add_parser("reconcile", help="compare the index with the run folders and rebuild it",
                       description="Report every difference between the control-plane index "
                       "and the run folders, then rebuild the index from the folders (the "
                       "folder wins).")
    runs_dir_opt(c)
    c.add_argument("--json", action="store_true")


def _out(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")


def _ago(ns: int, now: int) -> str:
    s = (now - ns) // 1_000_000_000
    if s < 0:
        return f"in {_dur(-s)}"
    return f"{_dur(s)} ago"


def _dur(s: int) -> str:
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


def _cp(a: argparse.Namespace) -> Any:
    from kernel.controlplane import ControlPlane

    return ControlPlane.open(Path(a.runs_dir), create=False)


def _public(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for k in ("binding", "eligible", "preview", "usage", "lineage"):
        if isinstance(out.get(k), str):
            out[k] = json.loads(out[k])
    return out


def cmd_approvals(a: argparse.Namespace) -> int:
    if a.approvals_cmd == "show":
        return _show(a)
    now = time.time_ns()
    with _cp(a) as cp:
        rows = cp.approvals(None if a.all else "pending")
        runs = {r["run_id"]: r for r in cp.runs()}
    if a.json:
        _out([{**_public(r), "agent": json.loads(runs.get(r["run_id"], {}).get("argv") or "[]")}
              for r in rows])
        return 0
    if not rows:
        sys.stdout.write("no pending approval requests\n" if not a.all else "none\n")
        return 0
    for r in rows:
        argv = json.loads(runs.get(r["run_id"], {}).get("argv") or "[]")
        agent = " ".join(argv)[:40]
        exp = (f"expires {_ago(r['expires_ns'], now)}" if r["state"] == "pending"
               else r["state"])
        sys.stdout.write(f"{r['id']}  {r['summary']}  [{r['rule']}]  agent: {agent}  "
                         f"asked {_ago(r['created_ns'], now)}, {exp}\n")
    return 0


def _show(a: argparse.Namespace) -> int:
    from kernel.approval_gate import render_preview

    with _cp(a) as cp:
        row = cp.approval(a.id)
        if row is None:
            raise NotFoundError(f"no approval request {a.id}",
                                hint="`kernel approvals` lists the pending ones")
        sigs = cp.signatures_after(a.id, 0)
    r = _public(row)
    if a.json:
        _out({**r, "signatures": sigs})
        return 0
    now = time.time_ns()
    lin = r["lineage"]
    w = sys.stdout.write
    w(f"request {r['id']}: {r['summary']}\n")
    w(f"  state:   {r['state']}" + (f" ({r['outcome']})" if r["outcome"] else "") + "\n")
    w(f"  rule:    {r['rule']}\n  why:     {r['rule_reason']}\n")
    w(f"  agent's justification: {r['justification'] or '(none given)'}\n")
    w(f"  run:     {r['run_id']} (policy {lin.get('policy')} {lin.get('policy_digest')}; "
      f"workspace {lin.get('workspace')}; operator uid {lin.get('operator_uid')}; "
      f"parent {lin.get('parent') or 'none'}, depth {lin.get('depth', 0)})\n")
    quota = ", ".join(f"{n} {v['limit'] - v['used']}/{v['limit']}"
                      for n, v in r["usage"].items())
    w(f"  quota left: {quota}\n")
    w(f"  needs:   {r['threshold']} approval(s) from: "
      f"{', '.join(e['name'] for e in r['eligible'])}"
      f"{'' if r['operator_may_approve'] else ' (not the operator)'}\n")
    w(f"  asked {_ago(r['created_ns'], now)}; expires {_ago(r['expires_ns'], now)}\n")
    for s in sigs:
        w(f"  signature #{s['id']}: {s['decision']} by {s['reviewer']} ({s['status']}"
          + (f": {s['note']}" if s["note"] else "") + ")\n")
    w(render_preview(r) + "\n")
    return 0


def _decide(a: argparse.Namespace, decision: str) -> int:
    from kernel import keys as kkeys
    from kernel import reviewers
    from kernel.approvals import (
        APPROVAL_FORMAT,
        BINDING_FIELDS,
        Operator,
        check_envelope,
        eligible_map,
        signed_message,
    )
    from kernel.canonical import canonical_json
    from kernel.controlplane import ClosedError, RefusedError

    cp = _cp(a)
    try:
        row = cp.approval(a.id)
        if row is None:
            raise NotFoundError(f"no approval request {a.id}",
                                hint="`kernel approvals` lists the pending ones")
        now = time.time_ns()
        binding = json.loads(row["binding"])
        closed = (f"already {row['state']}" if row["state"] != "pending" else
                  "expired" if now > binding["expires_ns"] else None)
        if closed is not None:
            _attempt(cp, a.id, decision, now, f"the request is {closed}")
            raise ApprovalClosedError(f"{a.id} is {closed}; nothing changed (the attempt is "
                                      "recorded, in the run folder too if the run is going on)")
        eligible = eligible_map(json.loads(row["eligible"]))
        if a.envelope:
            try:
                env = json.loads(Path(a.envelope).read_bytes())
            except FileNotFoundError:
                raise NotFoundError(f"envelope {a.envelope} does not exist") from None
            except (ValueError, OSError) as e:
                raise BadInputError(f"envelope {a.envelope}: not JSON: {e}") from None
        else:
            key = (reviewers.load_key(Path(a.key)) if a.key
                   else reviewers.default_key(kkeys.kernel_home()))
            payload = {"format": APPROVAL_FORMAT, **{f: binding[f] for f in BINDING_FIELDS},
                       "decision": decision, "reason": a.reason,
                       "reviewer": eligible.get(key.public_hex, key.name),
                       "reviewer_uid": os.getuid(), "signed_ns": now}
            env = {"payload": payload, "public_key": key.public_hex, "keyid": key.keyid,
                   "sig": key.sign(signed_message(payload))}
        lin = json.loads(row["lineage"])
        op = lin.get("operator", {})
        operator = Operator(int(row["operator_uid"]), tuple(op.get("public_keys", [])))
        c = check_envelope(env, binding, eligible, operator, bool(row["operator_may_approve"]),
                           now)
        if c.ok and c.decision != decision:
            c = type(c)(False, f"the envelope says {c.decision!r}, not {decision!r}",
                        c.public_key, c.reviewer)
        try:
            text = canonical_json(env).decode()
        except (TypeError, ValueError):
            text = json.dumps(env, default=str)
        pk = env.get("public_key") if isinstance(env, dict) else None
        sig_row = {"approval_id": a.id, "envelope": text,
                   "public_key": pk if isinstance(pk, str) else "",
                   "reviewer": c.reviewer, "decision": decision, "submitted_ns": now,
                   "submitted_uid": os.getuid()}
        try:
            state = cp.submit(a.id, sig_row, threshold=int(row["threshold"]), now_ns=now,
                              check=lambda: (c.ok, c.reason))
        except LookupError:
            raise NotFoundError(f"no approval request {a.id}") from None
        except ClosedError as e:
            _attempt(cp, a.id, decision, now, f"the request is {e}", sig_row)
            raise ApprovalClosedError(f"{a.id} is {e}; nothing changed (the attempt is "
                                      "recorded)") from None
        except RefusedError as e:
            raise ApprovalRefusedError(
                f"{a.id}: refused: {e}; nothing was decided (the attempt is recorded, and the "
                "run records it in its folder while it waits)") from None
    finally:
        cp.close()
    if a.json:
        _out({"id": a.id, "decision": decision, "reviewer": c.reviewer, "state": state})
    else:
        more = "" if state != "pending" else " (waiting for more approvals)"
        sys.stdout.write(f"{a.id}: {decision} by {c.reviewer} recorded; request is "
                         f"{state}{more}\n")
    return 0


def _attempt(cp: Any, approval_id: str, decision: str, now: int, note: str,
             sig_row: dict[str, Any] | None = None) -> None:
    row = sig_row or {"approval_id": approval_id, "envelope": "", "public_key": "",
                      "reviewer": "", "decision": decision, "submitted_ns": now,
                      "submitted_uid": os.getuid()}
    try:
        cp.record_attempt(row, note)
    except Exception:  # noqa: S110 - the refusal itself is what the user must see
        pass


def cmd_approve(a: argparse.Namespace) -> int:
    return _decide(a, "approve")


def cmd_deny(a: argparse.Namespace) -> int:
    if not a.reason.strip():
        raise UsageError("kernel deny: --reason must say why")
    return _decide(a, "deny")


def cmd_keys(a: argparse.Namespace) -> int:
    from kernel import keys as kkeys
    from kernel import reviewers

    home = kkeys.kernel_home()
    if a.keys_cmd == "new":
        key = reviewers.new_key(home, a.reviewer)
        sys.stdout.write(f"reviewer key {key.name} ({key.keyid})\n  private: {key.path} "
                         f"(mode 0600; keep it to yourself)\n  public:  {key.public_hex}\n"
                         f"  give the operator: kernel keys export {key.name}\n")
        return 0
    found = reviewers.list_keys(home)
    if a.keys_cmd == "list":
        if a.json:
            _out([{"name": n, "public_key": k, "path": str(p)} for n, k, p in found])
        elif not found:
            sys.stdout.write(f"no reviewer keys in {reviewers.reviewers_dir(home)}\n")
        for n, k, p in [] if a.json else found:
            sys.stdout.write(f"{n}  {k}  {p}\n")
        return 0
    names = a.names or [n for n, _, _ in found]
    by = {n: k for n, k, _ in found}
    for n in names:
        if n not in by:
            raise NotFoundError(f"no reviewer key named {n!r} in "
                                f"{reviewers.reviewers_dir(home)}")
    sys.stdout.write("\n".join(reviewers.export_entry(n, by[n]) for n in names))
    return 0


CHILD_FIELDS = ("run_id", "status", "exit_code", "seal", "requests", "denials", "depth",
                "started", "ended")


def cmd_runs(a: argparse.Namespace) -> int:
    from kernel.controlplane import tree_order

    with _cp(a) as cp:
        if a.runs_cmd == "show":
            row = cp.run(a.run_id)
            if row is None:
                raise NotFoundError(f"run {a.run_id} is not in the index",
                                    hint="`kernel reconcile` rebuilds the index from the folders")
            apps = [_public(r) for r in cp.approvals_of(a.run_id)]
            kids = cp.children_of(a.run_id)
        else:
            rows = cp.runs()
    if a.runs_cmd == "show":
        children = [{k: c.get(k) for k in CHILD_FIELDS} for c in kids]
        if a.json:
            _out({**row, "approvals": apps, "children": children})
            return 0
        for k in ("run_id", "status", "exit_code", "run_dir", "workspace", "policy_name",
                  "policy_digest", "argv", "isolation", "operator_uid", "started", "ended",
                  "requests", "denials", "seal", "parent", "root", "depth"):
            sys.stdout.write(f"{k:>14}: {row.get(k)}\n")
        for c in children:
            sys.stdout.write(f"  child {c['run_id']}: {c['status']}, exit {c['exit_code']}, "
                             f"{c['requests']} requests, {c['denials']} denials, seal "
                             f"{c['seal'] or '(not sealed)'}\n")
        for ap in apps:
            sys.stdout.write(f"  approval {ap['id']}: {ap['summary']} -> {ap['state']}\n")
        return 0
    if a.json:
        _out(rows)
        return 0
    if not rows:
        sys.stdout.write("no runs in the index\n")
    for indent, r in tree_order(rows):
        lead = "  " * indent + ("`- " if indent else "")
        sys.stdout.write(f"{lead}{r['run_id']}  {r['status']:<14} exit {r['exit_code']}  "
                         f"{r['policy_name']}  {' '.join(json.loads(r['argv'] or '[]'))[:50]}\n")
    return 0


def cmd_reconcile(a: argparse.Namespace) -> int:
    from kernel import reconcile

    report = reconcile.reconcile(Path(a.runs_dir))
    if a.json:
        _out(report)
    else:
        for m in report["mismatches"]:
            sys.stdout.write(f"mismatch: {m}\n")
        sys.stdout.write(f"reconciled {report['runs']} run folder(s): "
                         f"{len(report['mismatches'])} mismatch(es) corrected\n")
    return 0


HANDLERS = {"approvals": cmd_approvals, "approve": cmd_approve, "deny": cmd_deny,
            "keys": cmd_keys, "runs": cmd_runs, "reconcile": cmd_reconcile}


def exec_options(a: argparse.Namespace) -> dict[str, Any]:
    """``kernel exec --approve``: prompt (default on a terminal), queue (default otherwise),
    deny. Prompt mode talks to the controlling terminal and falls back to queue without one."""
    mode = a.approve or ("prompt" if sys.stdin.isatty() else "queue")
    opts: dict[str, Any] = {"approve": mode}
    if a.approve_key:
        opts["approve_key"] = Path(a.approve_key)
    if mode == "prompt":
        if sys.stdin.isatty():
            opts["tty_in"] = sys.stdin
            opts["tty_out"] = sys.stderr if sys.stderr.isatty() else sys.stdout
            return opts
        try:
            tty = open("/dev/tty", "r+", buffering=1)  # the run keeps it open
        except OSError:
            opts["approve"] = "queue"
            sys.stderr.write("kernel: no terminal for --approve prompt; using the queue\n")
        else:
            opts["tty_in"] = tty
            opts["tty_out"] = tty
    return opts
