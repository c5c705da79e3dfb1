"""``kernel show``: a run folder as a readable timeline, with lineage and totals.

Each request is shown with everything the log links to it: its decision(s) (``pending`` then the
settled one), the approval events about it, its result, and for an ``exec`` every change captured
from the command with its own decision and result (``captured_from``). Other events (run start,
sandbox, agent exit, verifications, gate, run end) appear in order between them. Totals count
requests by call, decisions by outcome, denials by rule, bytes and files written, execs, and the
gate's verdict.

A run that spawned children lists them (id, command, budget, how each ended: status, exit code,
seal digest, request and denial counts from the parent's ``spawn.exit``, and the verdict of
verifying the child's own folder); a spawned child shows its lineage (parent, root, depth, the
granting decision, the manifest digest).

Everything shown comes from the recorded events, which hold no secret value (the recorder
redacts known secrets before writing), so nothing here can reveal one. The folder is verified
first; a corrupt folder is refused (its content cannot be trusted to mean anything). A folder
that verifies but whose tree does not (a child missing, swapped or corrupt) is shown, with the
tree's verdict and each child's.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kernel.errors import RunIntegrityError
from kernel.recorder import LOG_FILE, RUN_JSON
from kernel.verify import CORRUPT, verify_run

_LINKED = ("syscall.decision", "syscall.result")


def _args_summary(call: str | None, body: dict[str, Any]) -> str:
    a = body.get("args") or {}
    if call == "write":
        s = f"{a.get('op')} {a.get('path')!r}"
        if "dest" in a:
            s += f" -> {a.get('dest')!r}"
        if "content_bytes" in a:
            s += f" ({a['content_bytes']} bytes)"
        elif isinstance(a.get("content_b64"), str):  # held by the line itself (write-ahead)
            b64 = a["content_b64"]
            s += f" ({len(b64) * 3 // 4 - b64[-2:].count('=')} bytes, in the log)"
        if "mode" in a:
            s += f" mode {a['mode']:o}" if isinstance(a["mode"], int) else ""
        return s
    if call == "exec":
        argv = a.get("argv")
        return " ".join(map(str, argv)) if isinstance(argv, list) else str(argv)
    if call == "spawn":
        argv = a.get("argv")
        s = " ".join(map(str, argv)) if isinstance(argv, list) else str(argv)
        if isinstance(a.get("budget"), dict):
            s += " budget " + " ".join(f"{k}={v}" for k, v in sorted(a["budget"].items()))
        return s
    if call == "register":
        from kernel import lineage

        try:
            return f"manifest {lineage.digest(str(a.get('manifest')))[:19]}..."
        except lineage.ManifestRefused:
            return "a malformed manifest"
    if call == "wait":
        return f"child {a.get('child')}" + (f" (timeout {a['timeout_ms']} ms)"
                                            if "timeout_ms" in a else "")
    if a.get("inline") is False:
        return "(arguments stored as a blob)"
    return json.dumps(a, sort_keys=True)[:120] if a else ""


def build(events: Sequence[dict[str, Any]], header: dict[str, Any]) -> dict[str, Any]:
    """The timeline and totals (what ``--json`` prints)."""
    items: list[dict[str, Any]] = []
    by_key: dict[tuple[Any, Any], dict[str, Any]] = {}
    by_req: dict[Any, dict[str, Any]] = {}
    by_digest: dict[str, dict[str, Any]] = {}
    by_decision_seq: dict[int, dict[str, Any]] = {}
    by_approval_seq: dict[int, dict[str, Any]] = {}
    captured: dict[tuple[Any, Any], dict[str, Any]] = {}
    totals: dict[str, Any] = {"events": len(events), "requests": Counter(),
                              "decisions": Counter(), "denials_by_rule": Counter(),
                              "bytes_written": 0, "files_written": 0, "execs": 0,
                              "verifications": {}, "gate": None, "status": None}
    children: dict[str, dict[str, Any]] = {}
    t0 = events[0]["ts"] if events else None
    for e in events:
        t, b, seq = e["type"], e["body"], e["seq"]
        key = (b.get("req"), b.get("request_digest"))
        _note_child(children, t, b, seq)
        if t == "syscall.request":
            item = {"kind": "request", "seq": seq, "ts": e["ts"], "req": b.get("req"),
                    "call": b.get("call"), "what": _args_summary(b.get("call"), b),
                    "decisions": [], "result": None, "captured": [], "approvals": []}
            items.append(item)
            by_key[key] = item
            by_req[b.get("req")] = item
            by_digest[str(b.get("request_digest"))] = item
            totals["requests"][str(b.get("call"))] += 1
            continue
        if t in _LINKED and "captured_from" in b:
            parent = by_req.get(b.get("captured_from"))
            ch = captured.get(key)
            if ch is None:
                change = b.get("change") or {}
                ch = {"seq": seq, "op": change.get("op"), "path": change.get("path"),
                      "decision": None, "rule": None, "reason": None, "result": None}
                captured[key] = ch
                if parent is not None:
                    parent["captured"].append(ch)
            if t == "syscall.decision":
                ch.update(decision=b.get("decision"), rule=b.get("rule"),
                          reason=b.get("reason"))
                _count_decision(totals, b)
            else:
                ch["result"] = _result(b)
                _count_result(totals, b)
            continue
        linked = by_key.get(key) if t in _LINKED else None
        if linked is not None and t == "syscall.decision":
            by_decision_seq[seq] = linked
            linked["decisions"].append({"seq": seq, "decision": b.get("decision"),
                                      "rule": b.get("rule"), "reason": b.get("reason")})
            _count_decision(totals, b)
            if b.get("decision") in ("allowed", "approved") and linked["call"] == "exec":
                totals["execs"] += 1
            continue
        if linked is not None and t == "syscall.result":
            linked["result"] = _result(b)
            _count_result(totals, b)
            continue
        if t.startswith("approval."):
            target = _approval_target(b, by_digest, by_decision_seq, by_approval_seq)
            if t == "approval.requested" and target is not None:
                by_approval_seq[seq] = target
            if target is not None:
                target["approvals"].append({"seq": seq, "type": t,
                                            "reviewer": b.get("reviewer"),
                                            "decision": b.get("decision")
                                            or b.get("outcome")})
                continue
        if t == "verification.result":
            totals["verifications"][str(b.get("name"))] = (
                "passed" if b.get("exit_code") == 0 and not b.get("timed_out")
                else (b.get("error") or ("timed out" if b.get("timed_out")
                                         else f"exit {b.get('exit_code')}")))
        elif t == "gate.report":
            totals["gate"] = "passed" if b.get("passed") else "failed"
        elif t == "run.end":
            totals["status"] = b.get("status")
        items.append({"kind": "event", "seq": seq, "ts": e["ts"], "type": t,
                      "what": _event_summary(t, b)})
    for k in ("requests", "decisions", "denials_by_rule"):
        totals[k] = dict(sorted(totals[k].items()))
    totals["spawns"] = len(children)
    lin = header.get("lineage")
    lineage = None if not isinstance(lin, dict) else {
        k: lin.get(k) for k in ("parent", "root", "depth", "parent_decision_seq",
                                "manifest_digest")}
    return {"run_id": header.get("run_id"), "argv": header.get("argv"),
            "workspace": header.get("workspace"), "policy": header.get("policy_name"),
            "isolation": header.get("isolation"), "started": t0, "lineage": lineage,
            "children": list(children.values()), "timeline": items, "totals": totals}


def _note_child(children: dict[str, dict[str, Any]], t: str, b: dict[str, Any],
                seq: int) -> None:
    """Collect the children this run spawned: granted, started, ended (``spawn.exit``)."""
    child = b.get("child")
    if not isinstance(child, str):
        return
    if t == "syscall.decision" and b.get("decision") == "allowed" and b.get("rule") == "spawn":
        req = (b.get("facts") or {}).get("request") or {}
        children[child] = {"run_id": child, "granted_seq": seq, "argv": req.get("argv"),
                           "budget": b.get("budget"), "expires_ns": b.get("expires_ns"),
                           "manifest_digest": b.get("manifest_digest"), "started": None,
                           "status": None, "exit_code": None, "seal": None, "requests": None,
                           "denials": None, "ended_seq": None, "verify": None}
    elif t == "syscall.result" and child in children and "timed_out" not in b:  # not a wait's
        children[child]["started"] = bool(b.get("ok"))
    elif t == "spawn.exit" and child in children:
        children[child].update({k: b.get(k) for k in ("status", "exit_code", "seal", "requests",
                                                      "denials")}, ended_seq=seq)


def _approval_target(b: dict[str, Any], by_digest: dict[str, dict[str, Any]],
                     by_decision_seq: dict[int, dict[str, Any]],
                     by_approval_seq: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The request an approval event is about: by its request digest, the pending decision it
    waits on (``pending_seq``), or its approval id (``<run_id>.<seq of approval.requested>``)."""
    if isinstance(b.get("request_digest"), str) and b["request_digest"] in by_digest:
        return by_digest[b["request_digest"]]
    if isinstance(b.get("pending_seq"), int) and b["pending_seq"] in by_decision_seq:
        return by_decision_seq[b["pending_seq"]]
    aid = b.get("approval_id")
    if isinstance(aid, str) and aid.rpartition(".")[2].isdigit():
        return by_approval_seq.get(int(aid.rpartition(".")[2]))
    return None


def _count_decision(totals: dict[str, Any], b: dict[str, Any]) -> None:
    d = str(b.get("decision"))
    totals["decisions"][d] += 1
    if d in ("denied", "expired"):
        totals["denials_by_rule"][str(b.get("rule"))] += 1


def _count_result(totals: dict[str, Any], b: dict[str, Any]) -> None:
    res = b.get("result") or {}
    if b.get("ok") and isinstance(res, dict) and res.get("op") in (
            "write", "create", "append", "delete", "mkdir", "rename", "chmod"):
        totals["files_written"] += 1
        totals["bytes_written"] += int(res.get("size") or 0)


def _result(b: dict[str, Any]) -> dict[str, Any]:
    if not b.get("ok"):
        return {"ok": False, "errno": b.get("errno"), "reason": b.get("reason")}
    if isinstance(b.get("child"), str):
        if "timed_out" in b:  # wait
            if b.get("timed_out"):
                return {"ok": True, "summary": f"child {b['child']} still running (timed out)"}
            return {"ok": True, "summary": f"child {b['child']} ended: {b.get('status')}, "
                    f"exit {b.get('exit_code')}"}
        return {"ok": True, "summary": f"child {b['child']} started (pid {b.get('pid')})"}
    res = b.get("result") or {}
    if "exit_code" in res:
        return {"ok": True, "summary": f"exit {res.get('exit_code')}"
                + (" (timed out)" if res.get("timed_out") else "")
                + f", {len(res.get('changes') or [])} change(s)"}
    parts = [str(res.get("op")), repr(res.get("path"))]
    if res.get("dest"):
        parts.append(f"-> {res['dest']!r}")
    if res.get("digest"):
        parts.append(f"{res.get('size')} bytes {res['digest'][:19]}")
    return {"ok": True, "summary": " ".join(parts)}


def _event_summary(t: str, b: dict[str, Any]) -> str:
    if t == "run.start":
        return f"agent {' '.join(map(str, b.get('argv') or []))} (isolation {b.get('isolation')})"
    if t == "snapshot.initial":
        return (f"initial workspace: {b.get('entries')} entries, content "
                f"{b.get('content', 'not stored')}")
    if t == "sandbox.start":
        return f"sandbox started (pid {b.get('pid')})"
    if t == "agent.exit":
        s = f"agent ended: {b.get('status')}, exit {b.get('exit_code')}"
        return s + (f", breach {b['breach']}" if b.get("breach") else "")
    if t == "verification.result":
        ok = b.get("exit_code") == 0 and not b.get("timed_out") and not b.get("error")
        return (f"verification {b.get('name')}: {'passed' if ok else 'FAILED'} "
                f"({b.get('error') or 'exit ' + str(b.get('exit_code'))})")
    if t == "gate.report":
        bad = [r["rule"] for r in b.get("rules") or [] if not r.get("passed")]
        return "gate passed" if b.get("passed") else f"gate FAILED: {', '.join(bad)}"
    if t == "run.end":
        return f"run ended: {b.get('status')}"
    if t == "spawn.exit":
        seal = b.get("seal")
        return (f"child {b.get('child')} ended: {b.get('status')}, exit {b.get('exit_code')}, "
                f"{b.get('requests')} requests, {b.get('denials')} denials, seal "
                + (seal[:19] + "..." if isinstance(seal, str) else "none"))
    if t == "spawn.stop":
        return (f"stop condition `{b.get('condition')}` holds ({b.get('rule')}): no more "
                "spawns" + ("; the whole tree is ended" if b.get("kill_tree") else ""))
    if t == "run.kill":
        return f"ended from outside: {b.get('by')}" + (f" (signal {b['signal']})"
                                                       if b.get("signal") else "")
    if t == "log.torn_tail":
        return f"torn last line kept as evidence ({b.get('length')} bytes)"
    if t == "run.recovered":
        return (f"recovered after a crash: {len(b.get('unfinished') or [])} unfinished, "
                f"{len(b.get('stray_tmp') or [])} stray temp file(s) removed, "
                f"{len(b.get('redone') or [])} committed write(s) re-applied")
    if t == "workspace.synced":
        return f"workspace synced to disk ({b.get('writes')} log-durable writes)"
    keys = ", ".join(f"{k}={v}" for k, v in sorted(b.items())
                     if isinstance(v, str | int | bool) and not k.endswith("_blob"))
    return keys[:160]


def _rel(ts: str, t0: str | None) -> str:
    from kernel.recorder import parse_timestamp_ns

    if t0 is None:
        return ts
    ms = (parse_timestamp_ns(ts) - parse_timestamp_ns(t0)) // 1_000_000
    return f"+{ms / 1000:8.3f}s"


def render(view: dict[str, Any], verify_status: str) -> str:
    out = [f"run {view['run_id']} ({verify_status})",
           f"  agent: {' '.join(map(str, view.get('argv') or []))}",
           f"  workspace: {view.get('workspace')}  policy: {view.get('policy')}  "
           f"isolation: {view.get('isolation')}"]
    lin = view.get("lineage")
    if lin:
        out.append(f"  lineage: spawned by {lin['parent']} (decision seq "
                   f"{lin['parent_decision_seq']}), root {lin['root']}, depth {lin['depth']}, "
                   f"manifest {str(lin['manifest_digest'])[:19]}...")
    for c in view.get("children") or []:
        seal = c.get("seal")
        ended = (f"{c['status']}, exit {c['exit_code']}, {c['requests']} requests, "
                 f"{c['denials']} denials, seal {seal[:19]}..." if isinstance(seal, str)
                 else "not ended" if c.get("started") is not False else "could not start")
        verdict = f"; folder {c['verify']}" if c.get("verify") else ""
        out.append(f"  child {c['run_id']} (seq {c['granted_seq']}): "
                   f"{' '.join(map(str, c.get('argv') or []))}: {ended}{verdict}")
    if view.get("tree_problem"):
        out.append(f"  tree: {view['tree_problem']}")
    out.append("")
    t0 = view.get("started")
    for it in view["timeline"]:
        when = _rel(it["ts"], t0)
        if it["kind"] == "event":
            out.append(f"{when} [{it['seq']:>5}] {it['what']}")
            continue
        out.append(f"{when} [{it['seq']:>5}] #{it['req']} {it['call']} {it['what']}")
        steps = sorted([("d", d) for d in it["decisions"]] + [("a", a) for a in it["approvals"]],
                       key=lambda x: int(x[1]["seq"]))
        for kind, x in steps:
            if kind == "d":
                why = f": {x['reason']}" if x["decision"] not in ("allowed",) else ""
                out.append(f"{'':>10} [{x['seq']:>5}]   -> {x['decision']} ({x['rule']}){why}")
            else:
                who = f" by {x['reviewer']}" if x.get("reviewer") else ""
                out.append(f"{'':>10} [{x['seq']:>5}]   {x['type']}{who} "
                           f"{x.get('decision') or ''}".rstrip())
        for c in it["captured"]:
            res = c.get("result")
            tail = "" if res is None else (" applied" if res["ok"] else
                                           f" failed: {res.get('reason')}")
            out.append(f"{'':>10} [{c['seq']:>5}]   captured {c['op']} {c['path']!r} -> "
                       f"{c['decision']} ({c['rule']}){tail}")
        r = it.get("result")
        if r is not None:
            out.append(f"{'':>10}          = " + (r["summary"] if r["ok"] else
                                                  f"failed errno {r['errno']}: {r['reason']}"))
    t = view["totals"]
    out += ["", "totals:",
            f"  events {t['events']}; requests {sum(t['requests'].values())} "
            + " ".join(f"{k}={v}" for k, v in t["requests"].items()),
            "  decisions " + (" ".join(f"{k}={v}" for k, v in t["decisions"].items())
                              or "none"),
            "  denials by rule " + (" ".join(f"{k}={v}" for k, v in
                                             t["denials_by_rule"].items()) or "none"),
            f"  workspace changes applied {t['files_written']} ({t['bytes_written']} bytes "
            f"written); execs {t['execs']}"]
    if t["verifications"]:
        out.append("  verifications " + " ".join(f"{k}={v}" for k, v in
                                                 t["verifications"].items()))
    if t["gate"]:
        out.append(f"  gate {t['gate']}")
    if t.get("spawns"):
        out.append(f"  children spawned {t['spawns']}")
    out.append(f"  status {t['status'] or '(not ended)'}")
    return "\n".join(out) + "\n"


def show_run(run_dir: Path, trusted: Sequence[Ed25519PublicKey]) -> tuple[dict[str, Any], str]:
    """``(view, verify status)``; raises RunIntegrityError for a corrupt folder."""
    run_dir = Path(run_dir)
    vr = verify_run(run_dir, trusted)
    if vr.folder_status == CORRUPT:
        raise RunIntegrityError(f"{run_dir}: corrupt: {vr.problem}",
                                hint="`kernel verify` names what is wrong; nothing is shown "
                                "from a folder that does not verify")
    header = json.loads((run_dir / RUN_JSON).read_bytes())
    data = (run_dir / LOG_FILE).read_bytes()
    events = [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]
    view = build(events, header)
    verdicts = {c.run_id: c.status for c in vr.children}
    for c in view["children"]:
        c["verify"] = verdicts.get(c["run_id"], "not verified")
    if vr.status != vr.folder_status:
        view["tree_problem"] = vr.problem
    return view, vr.status
