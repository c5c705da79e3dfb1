"""``kernel attest``: an in-toto Statement v1 about a sealed run, in a DSSE envelope.

The statement names every file of the run folder as a *subject* (``name`` = path inside the
folder, ``digest.sha256``), with a SLSA Provenance v1 predicate saying what ran (argv, policy,
task), how (kernel version, isolation backend) and how it ended (seal status, event count, chain
head, final tree, gate verdict). It is wrapped in a DSSE envelope (payload type
``application/vnd.in-toto+json``) signed with the kernel's Ed25519 key, so any in-toto/DSSE tool
can check it; ``docs/attestations.md`` shows how, without this project.

DSSE is implemented here over ``cryptography`` (the PAE is ten lines): the signed bytes are
``PAE(payloadType, payload)`` = ``"DSSEv1" SP len(type) SP type SP len(body) SP body``. The
tests check it against the DSSE test vector and against ``securesystemslib`` in both directions.

The run folder is sealed read-only and admits no extra file, so the attestation lives *next to*
it: ``<RUN_DIR>.intoto.json``. ``kernel verify RUN_DIR`` checks it when present.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kernel.errors import BadInputError, RunIntegrityError
from kernel.keys import KernelKey, keyid_of
from kernel.recorder import LOG_FILE, MANIFESTS, RUN_JSON, SEAL_FILE, publish
from kernel.verify import INTACT, verify_run

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://agent-kernel.dev/agent-run/v1"
BUILDER_ID = "https://agent-kernel.dev/kernel"
SUFFIX = ".intoto.json"


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def sidecar_path(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / (run_dir.name + SUFFIX)


def _b64decode(s: Any, where: str) -> bytes:
    """Standard or URL-safe base64, padded or not (DSSE verifiers must accept both)."""
    if not isinstance(s, str):
        raise ValueError(f"{where}: not a string")
    t = s.replace("-", "+").replace("_", "/")
    t += "=" * (-len(t) % 4)
    try:
        return base64.b64decode(t, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: not base64") from None


def _files(run_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for root, dnames, fnames in os.walk(run_dir):
        dnames.sort()
        rel = os.path.relpath(root, run_dir)
        for fn in sorted(fnames):
            r = fn if rel == "." else f"{rel}/{fn}"
            with open(os.path.join(root, fn), "rb") as f:
                out[r] = hashlib.file_digest(f, "sha256").hexdigest()
    return dict(sorted(out.items()))


def statement(run_dir: Path) -> dict[str, Any]:
    """The in-toto Statement for a sealed, verified run folder."""
    run_dir = Path(run_dir)
    files = _files(run_dir)
    header = json.loads((run_dir / RUN_JSON).read_bytes())
    seal = json.loads((run_dir / SEAL_FILE).read_bytes())["body"]
    events = (run_dir / LOG_FILE).read_bytes().splitlines()
    end = json.loads(events[-1])["body"] if events else {}
    task = next((json.loads(e)["body"] for e in events if b'"type":"gate.task"' in e), None)

    def rd(name: str) -> dict[str, Any]:
        return {"name": name, "digest": {"sha256": files[name]}}

    external: dict[str, Any] = {"argv": header.get("argv"), "workspace": header.get("workspace"),
                                "policy": header.get("policy_name")}
    if task is not None:
        external["task"] = {"digest": task.get("digest"), "command": task.get("command"),
                            "verify": task.get("verify"), "gate": task.get("gate")}
    deps = [rd(n) for n in ("policy.toml", MANIFESTS["initial"]) if n in files]
    byproducts = [rd(n) for n in (LOG_FILE, MANIFESTS["final"]) if n in files]
    seal_rd = rd(SEAL_FILE)
    seal_rd["annotations"] = {"status": seal.get("status"), "events": seal.get("events"),
                              "head": seal.get("head"),
                              "final_tree_digest": end.get("final_tree_digest"),
                              "gate_passed": (end.get("gate") or {}).get("passed")}
    byproducts.append(seal_rd)
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": n, "digest": {"sha256": d}} for n, d in files.items()],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": {"kernel_version": header.get("kernel_version"),
                                       "isolation": header.get("isolation"),
                                       "policy_digest": header.get("policy_digest")},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID,
                            "version": {"agent-kernel": str(header.get("kernel_version"))}},
                "metadata": {"invocationId": header.get("run_id"),
                             "startedOn": header.get("created"),
                             "finishedOn": seal.get("sealed")},
                "byproducts": byproducts,
            },
        },
    }


def envelope(payload: bytes, key: KernelKey, payload_type: str = PAYLOAD_TYPE) -> dict[str, Any]:
    sig = key.sign(pae(payload_type, payload))
    return {"payload": base64.b64encode(payload).decode(), "payloadType": payload_type,
            "signatures": [{"keyid": key.keyid, "sig": base64.b64encode(sig).decode()}]}


def attest_run(run_dir: Path, key: KernelKey, out: Path | None = None) -> Path:
    """Write the signed attestation of an intact run (default: next to the folder)."""
    run_dir = Path(run_dir)
    rep = verify_run(run_dir, [key.public])
    if rep.status != INTACT:
        raise RunIntegrityError(f"{run_dir}: cannot attest a run that is {rep.status}"
                                + (f": {rep.problem}" if rep.problem else ""),
                                hint="only a sealed, intact run signed by this host's kernel "
                                "key can be attested here")
    payload = json.dumps(statement(run_dir), sort_keys=True, separators=(",", ":"),
                         ensure_ascii=False).encode("utf-8")
    data = json.dumps(envelope(payload, key), indent=2, sort_keys=True).encode() + b"\n"
    dest = Path(out) if out is not None else sidecar_path(run_dir)
    if dest.resolve().is_relative_to(run_dir.resolve()):
        raise BadInputError(f"{dest}: the attestation cannot go inside the sealed run folder")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        publish(dest.parent, tmp.name, data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


@dataclass
class AttestationCheck:
    path: str
    valid: bool
    problem: str | None
    keyid: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "valid": self.valid, "problem": self.problem,
                "keyid": self.keyid}


def check_envelope(raw: bytes, trusted: Sequence[Ed25519PublicKey]) -> tuple[dict[str, Any],
                                                                              str]:
    """Parse and authenticate a DSSE envelope; returns (statement, signer key id).

    Only trusted keys count; ``keyid`` is a hint and never decides anything (DSSE).
    """
    try:
        env = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(env, dict):
        raise ValueError("not a DSSE envelope (a JSON object)")
    if env.get("payloadType") != PAYLOAD_TYPE:
        raise ValueError(f"payloadType {env.get('payloadType')!r} is not {PAYLOAD_TYPE}")
    payload = _b64decode(env.get("payload"), "payload")
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise ValueError("no signatures")
    message = pae(PAYLOAD_TYPE, payload)
    signer = None
    for s in sigs:
        if not isinstance(s, dict):
            continue
        try:
            sig = _b64decode(s.get("sig"), "sig")
        except ValueError:
            continue
        for k in trusted:
            try:
                k.verify(sig, message)
            except InvalidSignature:
                continue
            signer = keyid_of(k)
            break
        if signer:
            break
    if signer is None:
        raise ValueError("no signature verifies under a trusted key")
    try:
        stmt = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("payload is not JSON") from None
    if not isinstance(stmt, dict) or stmt.get("_type") != STATEMENT_TYPE:
        raise ValueError(f"payload is not an in-toto Statement v1 ({STATEMENT_TYPE})")
    return stmt, signer


def verify_attestation(run_dir: Path, path: Path,
                       trusted: Sequence[Ed25519PublicKey]) -> AttestationCheck:
    """The attestation is signed by a trusted key and its subjects are exactly the folder's
    files with their digests."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        return AttestationCheck(str(path), False, f"cannot read: {e.strerror}")
    try:
        stmt, signer = check_envelope(raw, trusted)
    except ValueError as e:
        return AttestationCheck(str(path), False, str(e))
    if stmt.get("predicateType") != PREDICATE_TYPE:
        return AttestationCheck(str(path), False,
                                f"predicateType {stmt.get('predicateType')!r} is not "
                                f"{PREDICATE_TYPE}", signer)
    subjects = stmt.get("subject")
    if not isinstance(subjects, list):
        return AttestationCheck(str(path), False, "subject is not a list", signer)
    claimed: dict[str, Any] = {}
    for s in subjects:
        if not isinstance(s, dict) or not isinstance(s.get("name"), str):
            return AttestationCheck(str(path), False, "a subject has no name", signer)
        claimed[s["name"]] = (s.get("digest") or {}).get("sha256")
    actual = _files(Path(run_dir))
    for name in sorted(set(claimed) | set(actual)):
        if name not in actual:
            return AttestationCheck(str(path), False, f"subject {name}: not in the run folder",
                                    signer)
        if name not in claimed:
            return AttestationCheck(str(path), False, f"{name}: in the run folder but not a "
                                    "subject of the attestation", signer)
        if claimed[name] != actual[name]:
            return AttestationCheck(str(path), False, f"subject {name}: digest differs from "
                                    "the file", signer)
    return AttestationCheck(str(path), True, None, signer)
