"""``kernel recover``: seal a run the kernel never finished (killed, power lost) as ``aborted``.

What a crash can leave, and what recovery does with it:

* **The log** ends at its last durable record, possibly followed by a torn line that was never
  acknowledged (``append`` had not returned, so the agent was never answered). Nothing already
  written is edited: ``RunRecorder.resume`` keeps the torn bytes as a blob and records
  ``log.torn_tail``.
* **The workspace** never holds a half-written file: every write goes to a fresh temp file that
  is fsync'ed before it is renamed over its target. A crash between the two leaves the target
  untouched plus a stray temp file named ``.kernel-tmp-<16 hex>``. Recovery removes such stray
  files (only names of exactly that form that no recorded evidence mentions) and keeps their
  content as blobs, named in the ``run.recovered`` event.
* **Log-durable writes** (write-ahead, ``docs/runs-format.md``): an op ``write`` whose
  decision carries ``"durable": "log"`` was committed by that decision line, which holds its
  content in the request line; its change in the workspace was made without a sync, and after a
  power cut the file may hold the old content, the new one or neither. Every such write after
  the log's last ``workspace.synced`` (and not recorded as failed) is re-applied in log order,
  atomically and fsync'ed (``syscalls.write.apply_logged``: a file that already holds the
  content is only synced), and listed in ``run.recovered`` as ``redone``, each with its
  outcome (``present``, ``applied``, or the error). Nothing else is ever re-applied.
* **Unfinished requests**: an allowed write whose result was never recorded may or may not have
  taken effect. ``run.recovered`` lists them; the observed workspace (the final manifest written
  now) decides, and ``kernel replay`` accepts either outcome only for those.
* The exec scratch directories of the run (``$TMPDIR/agent-kernel-<run_id>-*``) are removed.

Then ``run.end {status: "aborted"}`` (unless the log already ends with ``run.end``) and the seal.

**Agent trees.** A kernel serving a tree dies with every agent of it, leaving one unsealed folder
per agent still running. Recovering a folder recovers its unsealed descendants too (found as
``<runs dir>/<child id>`` from the allowed spawn decisions, recursively), deepest first, so each
child is sealed before its parent, as the kernel does; the shared workspace's stray temp files
are removed once, recorded by the folder asked for. A parent's ``run.recovered`` lists each spawn
without a result (the child never ran) or without ``spawn.exit`` (its end was never recorded) as
unfinished, with ``child`` and ``missing``; then the parent records ``spawn.exit`` (``recovered:
true``) for each child sealed by then, with that child's seal digest.
Every answer the agent got was sent only after its records were fdatasync'd (for a log-durable
write: its request and decision, which hold the content), so nothing the agent was told
succeeded is missing from the sealed folder or, once recovered, from the workspace.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel import evidence, manifest
from kernel.canonical import sha256_digest
from kernel.decide import WriteRequest
from kernel.errors import BadInputError, RunIntegrityError
from kernel.keys import KernelKey
from kernel.paths import PathViolation, read_regular
from kernel.recorder import LOG_FILE, MANIFESTS, RUN_JSON, RunRecorder, parse_timestamp_ns
from kernel.verify import CORRUPT, INTACT, verify_run

STRAY_RE = re.compile(r"\.kernel-tmp-[0-9a-f]{16}")
MAX_STRAY_KEPT = 64 << 20
"""A stray temp file larger than this is removed but not kept as a blob (only its size)."""


@dataclass
class RecoverReport:
    run_id: str
    run_dir: Path
    status: str
    """The seal status: ``aborted`` (or the run's own status if it had ended)."""
    events_before: int
    torn_tail: int
    """Bytes of a torn last line kept as evidence (0 if none)."""
    unfinished: list[dict[str, Any]] = field(default_factory=list)
    stray_removed: list[str] = field(default_factory=list)
    scratch_removed: list[str] = field(default_factory=list)
    redone: list[dict[str, Any]] = field(default_factory=list)
    """Log-durable writes re-applied (``seq`` of the decision, ``path``, ``digest``,
    ``outcome``)."""
    final_tree_digest: str | None = None
    seal: str | None = None
    descendants: list[RecoverReport] = field(default_factory=list)
    """In an agent tree: the descendant folders recovered with this one, in the order they
    were sealed (children before their parent)."""

    def to_json(self) -> dict[str, Any]:
        out = {"run_id": self.run_id, "run_dir": str(self.run_dir), "status": self.status,
               "events_before": self.events_before, "torn_tail": self.torn_tail,
               "unfinished": self.unfinished, "stray_removed": self.stray_removed,
               "scratch_removed": self.scratch_removed, "redone": self.redone,
               "final_tree_digest": self.final_tree_digest, "seal": self.seal}
        if self.descendants:
            out["descendants"] = [d.to_json() for d in self.descendants]
        return out


def _events(run_dir: Path) -> list[dict[str, Any]]:
    data = (run_dir / LOG_FILE).read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def _unfinished(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Allowed requests with no recorded result, and allowed spawns whose child's end
    (``spawn.exit``) was never recorded. A spawn names its ``child`` and what is ``missing``
    (``result``: the kernel stopped before the child ran; ``spawn.exit``: before it ended)."""
    open_: dict[tuple[Any, Any], dict[str, Any]] = {}
    spawned: dict[str, dict[str, Any]] = {}
    for ev in events:
        b = ev["body"]
        key = (b.get("req"), b.get("request_digest"))
        if ev["type"] == "syscall.decision" and b.get("decision") == "allowed":
            open_[key] = {"seq": ev["seq"], "req": b.get("req"),
                          "request_digest": b.get("request_digest"), "rule": b.get("rule")}
            if isinstance(b.get("child"), str) and isinstance(b.get("facts"), dict) and (
                    b["facts"].get("kind") == "spawn"):
                open_[key].update(child=b["child"], missing="result")
                spawned[b["child"]] = open_[key]
        elif ev["type"] == "syscall.result":
            done = open_.pop(key, None)
            if done is not None and "child" in done:
                done = dict(done, missing="spawn.exit")
                spawned[done["child"]] = done
                open_[(key, "exit")] = done
        elif ev["type"] == "spawn.exit":
            child = spawned.pop(str(b.get("child")), None)
            if child is not None:
                open_ = {k: v for k, v in open_.items() if v is not child}
    return sorted(open_.values(), key=lambda u: u["seq"])


def _child_exits(run_dir: Path, key: KernelKey, events: list[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """``spawn.exit`` bodies for this folder's children that are sealed now (by the kernel, or
    just before by this recovery) but whose end the kernel never recorded here: a parent is
    sealed after its children and names each child's seal, as the kernel does. ``recovered``
    marks them; ``exit_code`` is the one the child's ``agent.exit`` recorded, if any."""
    ended = {e["body"].get("child") for e in events if e["type"] == "spawn.exit"}
    out = []
    for ev in events:
        b = ev["body"]
        child = b.get("child")
        if (ev["type"] != "syscall.decision" or b.get("decision") != "allowed"
                or b.get("rule") != "spawn" or not isinstance(child, str) or child in ended):
            continue
        cdir = run_dir.parent / child
        if not (cdir / "SEAL.json").is_file() or verify_run(
                cdir, [key.public], children=False).status != INTACT:
            continue
        seal_bytes = (cdir / "SEAL.json").read_bytes()
        cevents = _events(cdir)
        code = next((e["body"].get("exit_code") for e in cevents if e["type"] == "agent.exit"),
                    None)
        out.append({
            "child": child, "status": json.loads(seal_bytes)["body"].get("status"),
            "exit_code": code, "seal": sha256_digest(seal_bytes),
            "requests": sum(1 for e in cevents if e["type"] == "syscall.request"),
            "denials": sum(1 for e in cevents if e["type"] == "syscall.decision"
                           and e["body"].get("decision") in ("denied", "expired")),
            "request_seq": ev["seq"], "recovered": True})
    return out


def _descendants(run_dir: Path, key: KernelKey) -> list[Path]:
    """The incomplete descendant folders of ``run_dir`` (children found as ``<runs dir>/<child
    id>`` from its allowed spawn decisions, recursively), deepest first: each child before its
    parent. Raises RunIntegrityError, before anything is changed, if one is corrupt."""
    out: list[Path] = []
    seen = {run_dir.name}

    def walk(folder: Path) -> None:
        try:
            events = _events(folder)
        except (OSError, ValueError):
            return
        for ev in events:
            b = ev["body"]
            child = b.get("child")
            if (ev["type"] != "syscall.decision" or b.get("decision") != "allowed"
                    or not isinstance(child, str) or child in seen
                    or not isinstance(b.get("facts"), dict)
                    or b["facts"].get("kind") != "spawn"):
                continue
            seen.add(child)
            cdir = run_dir.parent / child
            if not cdir.exists():
                continue  # decided, but the kernel stopped before the child's folder existed
            vr = verify_run(cdir, [key.public], children=False)
            if vr.status == CORRUPT:
                raise RunIntegrityError(
                    f"{cdir}: a descendant of {run_dir.name} is corrupt: {vr.problem}",
                    hint="recovery only seals runs cut short; nothing was changed, and a "
                    "corrupt folder is kept as it is for investigation")
            walk(cdir)
            if vr.status != INTACT:
                out.append(cdir)

    walk(run_dir)
    return out


def _open_approvals(events: list[dict[str, Any]]) -> list[str]:
    """Approvals requested without a final decision or a cancellation, in request order."""
    opened: list[str] = []
    closed: set[str] = set()
    for e in events:
        b = e.get("body") or {}
        if e["type"] == "approval.requested":
            opened.append(str(b["binding"]["approval_id"]))
        elif e["type"] == "approval.cancelled" or (
                e["type"] == "syscall.decision" and b.get("approval_id") is not None):
            closed.add(str(b["approval_id"]))
    return [a for a in opened if a not in closed]


def _log_durable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Log-durable writes after the last ``workspace.synced``, in log order, with their content
    (from the request line) and target (from the decision's facts); not those whose result
    says they failed."""
    last = max((i for i, e in enumerate(events) if e["type"] == "workspace.synced"), default=-1)
    out: list[dict[str, Any]] = []
    request: dict[str, Any] = {}
    for ev in events[last + 1:]:
        t, b = ev["type"], ev["body"]
        if t == "syscall.request":
            request = b
        elif (t == "syscall.decision" and b.get("durable") == "log"
              and b.get("decision") == "allowed"):
            args = request.get("args")
            if request.get("request_digest") != b.get("request_digest") or not isinstance(
                    args, dict) or not isinstance(args.get("content_b64"), str):
                raise RunIntegrityError(f"seq {ev['seq']}: a log-durable decision without its "
                                        "request's content in the line before it")
            try:
                wreq, _ = evidence.request_from(b.get("facts"))
                content = base64.b64decode(args["content_b64"], validate=True)
            except (ValueError, binascii.Error) as e:
                raise RunIntegrityError(f"seq {ev['seq']}: log-durable write unreadable: {e}"
                                        ) from None
            if not isinstance(wreq, WriteRequest) or wreq.op != "write":
                raise RunIntegrityError(f"seq {ev['seq']}: a log-durable decision that is not "
                                        "for an op 'write'")
            out.append({"seq": ev["seq"], "req": b.get("req"),
                        "request_digest": b.get("request_digest"), "path": wreq.target.rel,
                        "mode": wreq.mode, "content": content})
        elif t == "syscall.result" and b.get("ok") is False:
            out = [w for w in out if (w["req"], w["request_digest"]) != (
                b.get("req"), b.get("request_digest"))]
    return out


REDO_SLACK_NS = 2_000_000_000
"""A workspace entry modified more than this after the run's last record was changed by
something else after the run stopped: recovery does not write over it."""


def _redo(ws: Path, writes: list[dict[str, Any]], last_ts: str) -> list[dict[str, Any]]:
    """Re-apply log-durable writes in order (see the module docstring)."""
    from kernel.paths import Workspace
    from syscalls.write import apply_logged, changed_after

    done: list[dict[str, Any]] = []
    limit = parse_timestamp_ns(last_ts) + REDO_SLACK_NS
    wsh = Workspace.open(ws, view_root=str(ws))
    try:
        # Looked at before anything is written: a path something else changed after the run
        # stopped keeps that change (the outcome says so); the others are re-applied in order.
        newer = {w["path"] for w in writes if changed_after(wsh, w["path"], limit)}
        for w in writes:
            entry = {"seq": w["seq"], "path": w["path"], "digest": sha256_digest(w["content"])}
            if w["path"] in newer:
                entry["outcome"] = "newer: changed after the run stopped; left as it is"
                done.append(entry)
                continue
            try:
                entry["outcome"] = apply_logged(wsh, w["path"], w["content"], w["mode"])
            except OSError as e:
                entry["outcome"] = f"failed: {e.strerror or e}"
            done.append(entry)
    finally:
        wsh.close()
    return done


def _known_paths(run_dir: Path, events: list[dict[str, Any]]) -> set[str]:
    known: set[str] = set()
    init = run_dir / MANIFESTS["initial"]
    if init.is_file():
        known.update(json.loads(init.read_bytes()).get("entries", {}))
    for ev in events:
        if ev["type"] == "syscall.result" and ev["body"].get("ok"):
            res = ev["body"].get("result") or {}
            for k in ("path", "dest"):
                if isinstance(res.get(k), str):
                    known.add(res[k])
    return known


def _strays(workspace: Path, known: set[str], exclude: tuple[str, ...]) -> list[str]:
    entries = manifest.scan(workspace, exclude=exclude)
    return sorted(rel for rel, e in entries.items()
                  if e.kind == "file" and STRAY_RE.fullmatch(rel.rsplit("/", 1)[-1])
                  and rel not in known)


def recover_run(run_dir: Path, key: KernelKey, *, workspace: Path | None = None
                ) -> RecoverReport:
    """Seal an incomplete run as aborted. Raises KernelError if it is sealed or corrupt.

    In an agent tree every incomplete descendant folder is recovered too, each child before its
    parent and ``run_dir`` last (so each parent is sealed after its children, as the kernel
    does); the stray temp files of the shared workspace are removed first, once, and recorded
    in ``run_dir``'s ``run.recovered``."""
    run_dir = Path(run_dir)
    vr = verify_run(run_dir, [key.public], children=False)  # its descendants: one by one below
    if vr.status == INTACT:
        raise BadInputError(f"{run_dir}: already sealed (intact); nothing to recover")
    if vr.status == CORRUPT:
        raise RunIntegrityError(f"{run_dir}: corrupt, not just incomplete: {vr.problem}",
                                hint="recovery only seals a run cut short; a corrupt folder "
                                "is kept as it is for investigation")
    header = json.loads((run_dir / RUN_JSON).read_bytes())
    ws = Path(workspace) if workspace is not None else (
        Path(header["workspace"]) if isinstance(header.get("workspace"), str) else None)
    if ws is not None and not ws.is_dir():
        raise BadInputError(f"workspace {ws} of run {vr.run_id}: not a directory",
                            hint="give the run's workspace with --workspace DIR")
    below = _descendants(run_dir, key)
    known: set[str] = set()
    for folder in (run_dir, *below):
        known |= _known_paths(folder, _events(folder))
    return _recover_one(run_dir, key, ws, known=known, strays=True, below=below)


def _recover_one(run_dir: Path, key: KernelKey, ws: Path | None, *, known: set[str],
                 strays: bool, below: list[Path]) -> RecoverReport:
    before = _events(run_dir)
    redo = _log_durable(before) if before and before[-1]["type"] != "run.end" else []
    if redo and ws is None:
        raise BadInputError(f"{run_dir}: {len(redo)} committed write(s) must be re-applied to "
                            "the workspace, and the run names none",
                            hint="give the run's workspace with --workspace DIR")
    log_size = (run_dir / LOG_FILE).stat().st_size
    rec = RunRecorder.resume(run_dir, key=key)
    report = RecoverReport(run_id=rec.run_id, run_dir=run_dir, status="aborted",
                           events_before=len(before), torn_tail=0)
    end = sum(len(line) + 1 for line in
              (run_dir / LOG_FILE).read_bytes().splitlines()[: len(before)])
    report.torn_tail = max(log_size - end, 0)
    try:
        report.unfinished = _unfinished(before)
        removed: list[dict[str, Any]] = []
        if ws is not None and strays:
            for rel in _strays(ws, known | _known_paths(run_dir, before),
                               hidden_runs_dir(ws, run_dir)):
                removed.append(_remove_stray(rec, ws, rel))
                report.stray_removed.append(rel)
        report.scratch_removed = _remove_scratch(rec.run_id)
        if redo and ws is not None:  # (a log cut before its first event has nothing to redo)
            report.redone = _redo(ws, redo, before[-1]["ts"])
        for child in below:  # deepest first; each is sealed before its parent
            report.descendants.append(_recover_one(child, key, ws, known=known, strays=False,
                                                   below=[]))
        ended = rec.last_type() == "run.end"
        final_digest: str | None = None
        if (run_dir / MANIFESTS["final"]).is_file():
            final_digest = sha256_digest((run_dir / MANIFESTS["final"]).read_bytes())
        elif ws is not None and not ended:
            final = manifest.scan(ws, exclude=hidden_runs_dir(ws, run_dir))
            final_digest = rec.write_manifest("final", manifest.manifest_bytes(final))
        report.final_tree_digest = final_digest
        if not ended:
            # An approval the kernel was waiting for when it stopped was never decided: nothing
            # was performed for it. Record that, as a stopped run does, so the sealed folder
            # has a closing record for every request for approval.
            for approval_id in _open_approvals(before):
                rec.append("approval.cancelled", {
                    "approval_id": approval_id,
                    "reason": "the kernel stopped while the request waited; sealed by kernel "
                    "recover"})
            rec.append("run.recovered", {
                "last_seq_before": len(before) - 1, "unfinished": report.unfinished,
                "stray_tmp": removed, "scratch_removed": report.scratch_removed,
                **({"redone": report.redone} if report.redone else {}),
                "observed_tree_digest": final_digest,
                "detail": "the kernel stopped before sealing; sealed by kernel recover"})
            for body in _child_exits(run_dir, key, before):
                rec.append("spawn.exit", body)
            initial = next((e["body"].get("tree_digest") for e in before
                            if e["type"] == "snapshot.initial"), None)
            rec.append("run.end", {"status": "aborted", "exit_code": None, "breach": None,
                                   "final_tree_digest": final_digest,
                                   "initial_tree_digest": initial,
                                   "detail": "the run was cut short (kernel killed or host "
                                   "stopped) and sealed by kernel recover"})
            summary: dict[str, Any] = {"status": "aborted", "recovered": True,
                                       "final_tree_digest": final_digest,
                                       "unfinished": len(report.unfinished)}
        else:
            last = before[-1]["body"]
            report.status = str(last.get("status") or "aborted")
            summary = {**{k: v for k, v in last.items() if k != "gate"}, "recovered": True}
        report.seal = rec.seal(report.status, summary)
    finally:
        rec.close()
    return report


def check_torn_tail_records(log: bytes, read_blob: Callable[[str], bytes]) -> str | None:
    """The first problem with the ``log.torn_tail`` records of a log, or None.

    Recovery cuts a torn last line at byte ``offset`` and records it right there, so the record
    must start at exactly ``offset`` (nothing came between), appear at most once, and its blob
    must be ``length`` bytes without a newline (a torn *line*).
    """
    seen = 0
    pos = 0
    for line in log.split(b"\n")[:-1]:
        if b'"type":"log.torn_tail"' in line:
            ev = json.loads(line)
            seq, b = ev["seq"], ev["body"]
            if ev["type"] == "log.torn_tail":
                seen += 1
                if seen > 1:
                    return f"seq {seq}: a second log.torn_tail (a run is recovered once)"
                if b.get("offset") != pos:
                    return (f"seq {seq}: log.torn_tail says the torn line was at byte "
                            f"{b.get('offset')!r}, but this record starts at byte {pos}")
                try:
                    torn = read_blob(str(b.get("torn_tail_blob")))
                except (OSError, KeyError):
                    return f"seq {seq}: the torn tail's blob cannot be read"
                if len(torn) != b.get("length") or b"\n" in torn or not torn:
                    return (f"seq {seq}: log.torn_tail length {b.get('length')!r} does not "
                            f"describe its blob ({len(torn)} bytes"
                            + (", holding a newline)" if b"\n" in torn else ")"))
        pos += len(line) + 1
    return None


def hidden_runs_dir(ws: Path, run_dir: Path) -> tuple[str, ...]:
    """The runs dir and its control-plane dir, where they lie inside the workspace, are not part
    of it (the kernel hides them from the run and leaves them out of its manifests)."""
    from kernel.controlplane import control_dir

    runs = run_dir.resolve().parent
    out = []
    for p in (runs, control_dir(runs)):
        try:
            rel = p.relative_to(ws.resolve())
        except ValueError:
            continue
        if str(rel) != ".":
            out.append(rel.as_posix())
    return tuple(out)


def _remove_stray(rec: RunRecorder, ws: Path, rel: str) -> dict[str, Any]:
    out: dict[str, Any] = {"path": rel}
    rootfd = os.open(ws, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            data = read_regular(rootfd, rel, MAX_STRAY_KEPT)
            out["size"] = len(data)
            out["content_blob"] = rec.put_blob(data)
        except (OSError, PathViolation) as e:
            out["not_kept"] = str(e)
        parent, _, name = rel.rpartition("/")
        dfd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                      | os.O_CLOEXEC, dir_fd=rootfd) if parent else os.open(
                          ws, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                os.unlink(name, dir_fd=dfd)
                os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(rootfd)
    return out


def _remove_scratch(run_id: str) -> list[str]:
    base = Path(tempfile.gettempdir())
    removed = []
    for p in sorted(base.glob(f"agent-kernel-{run_id}-*")):
        if p.is_dir() and not p.is_symlink():
            manifest.remove_tree(p)
            removed.append(str(p))
    return removed
