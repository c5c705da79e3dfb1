"""Helpers for approval tests: reviewer keys, policies with approvals, a kernel run in the
background, the control-plane database, and re-forging a sealed run with the kernel key."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel.canonical import canonical_json
from tests.kernel_helpers import AGENT_PY, ROOT, kernel_cmd, make_workspace

WRITE_ENV_AGENT = """
import sys, time
from syscalls.client import Kernel, SyscallError
k = Kernel.from_env()
t = time.monotonic()
try:
    k.write(".env", b"TOKEN=new\\n", justification="rotate the token")
    print("RESULT applied", round(time.monotonic() - t, 3), flush=True)
except SyscallError as e:
    print("RESULT refused", e.decision, e.rule, e.reason, flush=True)
"""


def policy_text(*, timeout: int = 60, threshold: int = 1, operator_may_approve: bool = True,
                reviewers: list[tuple[str, str]] | None = None, keyring: str = "",
                approvers: list[str] | None = None, exec_approval: bool = False) -> str:
    """A small profile: `.env*` and `.git/**` need approval; python3 and ls allowlisted."""
    revs = "".join(f'\n[[approvals.reviewers]]\nname = "{n}"\npublic_key = "{k}"\n'
                   for n, k in reviewers or [])
    appr = json.dumps(approvers or [])
    oma = "true" if operator_may_approve else "false"
    return textwrap.dedent(f"""\
        description = "approval tests"

        [sandbox]
        isolation = "native"

        [limits]
        wall_seconds = 120

        [[protected]]
        glob = ".env*"
        action = "approval"
        reason = "dotenv files hold secrets"
        approvals_required = {threshold}
        approvers = {appr}
        operator_may_approve = {oma}

        [[protected]]
        glob = ".git/**"
        action = "approval"
        reason = "repository metadata"
        approvals_required = {threshold}
        operator_may_approve = {oma}

        [[commands]]
        id = "python3"
        program = "python3"

        [[commands]]
        id = "ls"
        program = "ls"
        approval = {"true" if exec_approval else "false"}
        operator_may_approve = {oma}

        [approvals]
        timeout_seconds = {timeout}
        keyring = "{keyring}"
        """) + revs


def new_reviewer(home: Path, name: str) -> str:
    """Create a reviewer key in ``home``; returns its public key hex."""
    r = kernel_cmd(["keys", "new", "--reviewer", name], home=home)
    assert r.returncode == 0, r.stderr
    return (home / "reviewers" / f"{name}.pub").read_text().strip()


@dataclass
class BgRun:
    proc: subprocess.Popen[str]
    workspace: Path
    runs: Path
    home: Path

    def finish(self, timeout: float = 120) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        self.stderr = err
        try:
            return dict(json.loads(out.strip().splitlines()[-1]))
        except (IndexError, ValueError):
            raise AssertionError(f"no JSON from kernel exec (exit {self.proc.returncode}):\n"
                                 f"{out}\n{err}") from None

    def kernel(self, args: list[str], home: Path | None = None, **kw: Any
               ) -> subprocess.CompletedProcess[str]:
        return kernel_cmd([*args, "--runs-dir", str(self.runs)], home=home or self.home, **kw)

    def wait_pending(self, n: int = 1, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            db = self.runs.parent / (self.runs.name + ".control") / "control.db"
            if db.exists():
                try:
                    rows = query(db, "select * from approvals where state = 'pending' "
                                 "order by created_ns")
                except sqlite3.OperationalError:  # created, schema not written yet
                    rows = []
                if len(rows) >= n:
                    return rows
            if self.proc.poll() is not None:
                raise AssertionError("kernel exec ended while waiting: "
                                     f"{self.proc.communicate()}")
            time.sleep(0.02)
        raise AssertionError("no pending approval appeared")


def start_run(tmp_path: Path, source: str, policy: str, *, home: Path,
              files: dict[str, str] | None = None, extra: list[str] | None = None,
              backend: str = "native", name: str = "ws",
              env_extra: dict[str, str] | None = None) -> BgRun:
    base = tmp_path / name
    base.mkdir()
    ws = make_workspace(base, files or {".env": "TOKEN=old\n"})
    (ws / "agent.py").write_text(textwrap.dedent(source))
    pol = base / "policy.toml"
    pol.write_text(policy)
    runs = base / "runs"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KERNEL_HOME": str(home), "LANG": "C.UTF-8",
           **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel._cli", "exec", "--json", "--workspace", str(ws),
         "--runs-dir", str(runs), "--isolation", backend, "--policy", str(pol),
         "--approve", "queue", *(extra or []), "--", AGENT_PY, "agent.py"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        stdin=subprocess.DEVNULL)
    return BgRun(proc, ws, runs, home)


def query(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "log" / "events.jsonl").read_text()
            .splitlines()]


def types(run_dir: Path) -> list[str]:
    return [e["type"] for e in events(run_dir)]


def verify(run_dir: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return kernel_cmd(["verify", str(run_dir), "--trust", str(home / "keys" / "kernel.pub")],
                      home=home)


def signed_envelope(key_file: Path, binding: dict[str, Any], *, decision: str = "approve",
                    reviewer_uid: int = 4242, **overrides: Any) -> dict[str, Any]:
    """An envelope signed by the key in ``key_file`` over ``binding`` (+ overrides)."""
    from kernel.approvals import APPROVAL_FORMAT, BINDING_FIELDS, signed_message
    from kernel.reviewers import load_key

    key = load_key(key_file)
    payload = {"format": APPROVAL_FORMAT, **{f: binding[f] for f in BINDING_FIELDS},
               "decision": decision, "reason": "test", "reviewer": key.name,
               "reviewer_uid": reviewer_uid, "signed_ns": time.time_ns()}
    payload.update(overrides)
    return {"payload": payload, "public_key": key.public_hex, "keyid": key.keyid,
            "sig": key.sign(signed_message(payload))}


# ---- re-forging a sealed run (an insider holding the kernel key) --------------------------------

def reforge(run_dir: Path, home: Path, mutate: Any) -> None:
    """Rewrite a sealed run's log with ``mutate(events, put_blob)``, re-chain, re-seal with the
    kernel key in ``home``: every integrity check passes except what the approvals say."""
    from kernel.keys import load_or_create_kernel_key
    from kernel.recorder import SEAL_SIG_DOMAIN, ZERO_HEAD, iter_blob_refs, utc_timestamp

    for root, _dirs, files in os.walk(run_dir):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    evs = events(run_dir)

    def put_blob(data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        d = run_dir / "objects" / "sha256" / h[:2]
        d.mkdir(exist_ok=True)
        (d / h[2:]).write_bytes(data)
        return "sha256:" + h

    evs = mutate(evs, put_blob)
    prev = ZERO_HEAD
    lines = []
    for i, e in enumerate(evs):
        e["seq"] = i
        e["prev"] = prev
        line = canonical_json(e)
        prev = hashlib.sha256(line).hexdigest()
        lines.append(line)
    (run_dir / "log" / "events.jsonl").write_bytes(b"".join(x + b"\n" for x in lines))
    seal = json.loads((run_dir / "SEAL.json").read_bytes())
    body = seal["body"]
    (run_dir / "SEAL.json").unlink()
    files: dict[str, str] = {}
    dirs: list[str] = []
    for root, dnames, fnames in os.walk(run_dir):
        rel = os.path.relpath(root, run_dir)
        for dn in dnames:
            dirs.append(dn if rel == "." else f"{rel}/{dn}")
        for fn in fnames:
            r = fn if rel == "." else f"{rel}/{fn}"
            files[r] = "sha256:" + hashlib.sha256(Path(root, fn).read_bytes()).hexdigest()
    referenced = set()
    for e in evs:  # the recorder's own definition of a blob reference (*_blob, *_blobs, blobs)
        referenced.update(d for _, d in iter_blob_refs(e["body"]))
    for m in ("initial/tree.json", "final/tree.json"):
        for d in __import__("re").findall(r"sha256:[0-9a-f]{64}", (run_dir / m).read_text()):
            referenced.add(d)
    blobs = {"sha256:" + r.split("/")[2] + r.split("/")[3] for r in files
             if r.startswith("objects/sha256/")}
    body.update({"files": dict(sorted(files.items())), "dirs": sorted(dirs),
                 "events": len(lines), "head": prev, "sealed": utc_timestamp(),
                 "unreferenced": sorted(blobs - referenced - {body.get("policy_digest")})})
    key = load_or_create_kernel_key(home)
    sig = key.sign(SEAL_SIG_DOMAIN + canonical_json(body)).hex()
    (run_dir / "SEAL.json").write_bytes(canonical_json({"body": body, "sig": sig}))
