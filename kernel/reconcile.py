"""``kernel reconcile``: rebuild the control-plane index from the run folders (the folder wins).

For every run folder under the runs dir, the index row is derived from the folder alone: the
header (``run.json``, including a spawned child's ``lineage``: its parent, root and depth in the
agent tree), the seal (status, summary, sealing time) and the event log (approval
requests and their final decisions). Each difference with the current index is reported, then
the row is replaced. Rows whose folder is gone are reported and removed. A folder that does not
verify (under this host's kernel key, when it is available) is indexed with status ``corrupt``.
A run that is still going (unsealed, and its kernel process alive) is left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kernel.controlplane import ControlPlane

COMPARED_RUN = ("status", "exit_code", "policy_digest", "seal", "final_tree_digest", "run_dir",
                "workspace", "requests", "denials", "parent", "root", "depth")
COMPARED_APPROVAL = ("state", "rule", "run_id", "request_seq")


def _events(run_dir: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        data = (run_dir / "log" / "events.jsonl").read_bytes()
    except OSError:
        return out
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def folder_rows(run_dir: Path, trusted: list[Any]) -> tuple[dict[str, Any],
                                                           list[dict[str, Any]]]:
    """The index rows one run folder implies."""
    from kernel.verify import verify_run

    hdr = json.loads((run_dir / "run.json").read_bytes())
    run_id = hdr["run_id"]
    seal_body: dict[str, Any] = {}
    seal_digest = ""
    if (run_dir / "SEAL.json").is_file():
        raw = (run_dir / "SEAL.json").read_bytes()
        seal_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        seal_body = json.loads(raw).get("body", {})
    events = _events(run_dir)
    status = seal_body.get("status", "incomplete")
    if trusted:
        rep = verify_run(run_dir, trusted, children=False)  # each folder is indexed itself
        if rep.status == "corrupt":
            status = "corrupt"
    summary = seal_body.get("summary", {})
    operator_uid = None
    for e in events:
        if e.get("type") == "approval.setup":
            operator_uid = e["body"].get("operator", {}).get("uid")
    run = {"run_id": run_id, "run_dir": str(run_dir), "workspace": hdr.get("workspace", ""),
           "policy_name": hdr.get("policy_name", ""), "policy_digest": hdr["policy_digest"],
           "argv": json.dumps(hdr.get("argv", [])), "operator_uid": operator_uid,
           "isolation": hdr.get("isolation", ""), "kernel_pid": None, "status": status,
           "exit_code": summary.get("exit_code"), "requests": summary.get("requests", 0),
           "denials": summary.get("denials", 0), "started": hdr.get("created", ""),
           "ended": seal_body.get("sealed", ""), "seal": seal_digest,
           "final_tree_digest": summary.get("final_tree_digest", ""), **_tree(hdr, run_id)}
    approvals: dict[str, dict[str, Any]] = {}
    notes: dict[int, str] = {}
    for e in events:
        b = e.get("body", {})
        t = e.get("type")
        if t == "syscall.request":
            note = (b.get("args") or {}).get("justification")
            notes[e["seq"]] = note if isinstance(note, str) else ""
        elif t == "approval.requested":
            bind = b["binding"]
            preview: dict[str, Any] = {"action": b.get("action")}
            blob = b.get("preview_blob")
            if isinstance(blob, str):
                h = blob.removeprefix("sha256:")
                try:
                    preview.update(json.loads((run_dir / "objects" / "sha256" / h[:2] /
                                               h[2:]).read_bytes()))
                except (OSError, ValueError):
                    pass
            approvals[bind["approval_id"]] = {
                "id": bind["approval_id"], "run_id": run_id,
                "request_seq": bind["request_seq"], "approval_seq": bind["approval_seq"],
                "kind": b["action"]["kind"], "summary": _summary(b["action"]),
                "rule": b["rule"], "rule_reason": "",
                "justification": notes.get(bind["request_seq"], ""),
                "binding": json.dumps(bind), "eligible": json.dumps(b["eligible"]),
                "threshold": b["threshold"], "operator_uid": b["operator"]["uid"],
                "operator_may_approve": int(b["operator_may_approve"]),
                "preview": json.dumps(preview), "usage": json.dumps({}),
                "lineage": json.dumps({"run_id": run_id, "operator": b["operator"]}),
                "state": "pending" if not seal_body else "cancelled", "outcome": "",
                "created_ns": bind["issued_ns"], "expires_ns": bind["expires_ns"],
                "decided_ns": 0}
        elif t == "syscall.decision" and b.get("approval_id") in approvals:
            row = approvals[b["approval_id"]]
            oc = b.get("approval_outcome")
            row["state"] = ("approved" if b.get("decision") == "approved" else
                            "expired" if oc == "expired" else "denied")
            row["outcome"] = b.get("reason", "")
            row["decided_ns"] = b.get("now_ns", 0)
        elif t == "approval.cancelled" and b.get("approval_id") in approvals:
            approvals[b["approval_id"]]["state"] = "cancelled"
    return run, list(approvals.values())


def _tree(hdr: dict[str, Any], run_id: str) -> dict[str, Any]:
    """``parent``, ``root``, ``depth`` from the header's ``lineage`` (a root has none)."""
    lin = hdr.get("lineage")
    if not isinstance(lin, dict):
        return {"parent": None, "root": run_id, "depth": 0}
    return {"parent": lin.get("parent"), "root": lin.get("root"), "depth": lin.get("depth")}


def _summary(action: dict[str, Any]) -> str:
    from kernel.approval_gate import _summary as s

    return s(action)


def reconcile(runs_dir: Path) -> dict[str, Any]:
    """Compare, report, rebuild. Returns ``{"runs": n, "mismatches": [...]}``."""
    from kernel import keys

    trusted: list[Any] = []
    pub = keys.kernel_home() / "keys" / "kernel.pub"
    if pub.exists():
        trusted = [keys.load_public_key(pub)]
    runs_dir = Path(runs_dir)
    mismatches: list[str] = []
    seen: set[str] = set()
    n = 0
    with ControlPlane.open(runs_dir, create=True) as cp:
        indexed = {r["run_id"]: r for r in cp.runs()}
        folders = sorted(p for p in runs_dir.iterdir() if (p / "run.json").is_file()) \
            if runs_dir.is_dir() else []
        for d in folders:
            try:
                run, apps = folder_rows(d.resolve(), trusted)
            except (OSError, ValueError, KeyError, TypeError) as e:
                mismatches.append(f"{d}: unreadable run folder ({type(e).__name__}: {e}); "
                                  "not indexed")
                continue
            n += 1
            rid = run["run_id"]
            seen.add(rid)
            old = indexed.get(rid)
            if old is not None and old.get("status") == "running" and \
                    run["status"] == "incomplete" and _alive(old.get("kernel_pid")):
                continue  # still going: its kernel keeps the row
            if old is None:
                mismatches.append(f"run {rid}: missing from the index (added)")
            else:
                for k in COMPARED_RUN:
                    if old.get(k) != run[k]:
                        mismatches.append(f"run {rid}: {k}: index says {old.get(k)!r}, "
                                          f"folder says {run[k]!r} (corrected)")
            cp.upsert_run(run)
            old_apps = {r["id"]: r for r in cp.approvals_of(rid)}
            for ap in apps:
                prev = old_apps.pop(ap["id"], None)
                if prev is None:
                    mismatches.append(f"approval {ap['id']}: missing from the index (added)")
                else:
                    for k in COMPARED_APPROVAL:
                        if prev.get(k) != ap[k]:
                            mismatches.append(f"approval {ap['id']}: {k}: index says "
                                              f"{prev.get(k)!r}, folder says {ap[k]!r} "
                                              "(corrected)")
                    for k in ("rule_reason", "usage", "lineage"):
                        if prev.get(k):
                            ap[k] = prev[k]  # presentation only; not in the folder's terms
                cp.add_approval(ap)
            for gone in old_apps:
                mismatches.append(f"approval {gone}: in the index but not in run {rid}'s "
                                  "folder (removed)")
                cp.db.table("approvals").delete(gone)
        for rid in indexed:
            if rid not in seen and not (runs_dir / rid).exists():
                mismatches.append(f"run {rid}: in the index but its folder is gone (removed)")
                cp.db.table("runs").delete(rid)
    return {"runs": n, "mismatches": mismatches}
