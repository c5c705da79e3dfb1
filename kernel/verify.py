"""Run-folder verifier: is this folder exactly what the kernel wrote and sealed?

``verify_run(run_dir, trusted)`` checks, in this order, and stops at the first thing wrong:

1. structure: only the names of the format, regular files and directories only (no symlinks,
   devices, fifos, hard links or other mounts; ``lstat`` and ``O_NOFOLLOW`` only, nothing followed);
2. ``run.json`` (canonical, known format, sha256) and its signature by a key in ``trusted``;
3. ``policy.toml`` hashes to ``run.json``'s ``policy_digest``;
4. ``log/events.jsonl`` line by line: newline-terminated, canonical JSON, known fields,
   ``seq`` contiguous from 0, ``run_id``, ``prev`` chain, ``run.start`` only first, ``run.end``
   only last; blob references well-formed (sha256 only);
5. manifests are canonical JSON; every blob hashes to its name;
6. every blob reference names a blob (or a manifest or the policy); unreferenced blobs;
7. ``SEAL.json``: signature by the same trusted key, run id, event count, chain head, and its
   file and directory lists equal to exactly what is present, digests included;
8. the agent tree: every child that an allowed ``spawn`` decision granted, in the sibling folder
   ``<runs_dir>/<child id>``, verified the same way (recursively), linked both ways (the child's
   ``lineage`` names this run, the decision's seq and record hash and the manifest digest; the
   manifest is signed by this run's kernel key; the parent's ``spawn.exit`` holds the child's
   seal digest). The report's status is the worst of the tree.

Folder content never makes this raise: any problem, even an unexpected exception, becomes
status ``corrupt`` with the reason. Format: ``docs/runs-format.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kernel.errors import NotFoundError
from kernel.keys import keyid_of, raw_public
from kernel.recorder import (
    EVENT_VERSION,
    LOG_FILE,
    MANIFESTS,
    OBJECTS_DIR,
    POLICY_FILE,
    RUN_FORMAT,
    RUN_ID_RE,
    RUN_JSON,
    RUN_SIG,
    RUN_SIG_DOMAIN,
    SEAL_FILE,
    SEAL_FORMAT,
    SEAL_SIG_DOMAIN,
    ZERO_HEAD,
    blob_relpath,
    check_digest,
    iter_blob_refs,
    iter_digests,
    parse_canonical,
)

INTACT, INCOMPLETE, CORRUPT = "intact", "incomplete", "corrupt"

_F, _D = "file", "dir"
_TOP = {RUN_JSON: _F, RUN_SIG: _F, POLICY_FILE: _F, SEAL_FILE: _F,
        "log": _D, "objects": _D, "initial": _D, "final": _D}
_HEX2 = re.compile(r"[0-9a-f]{2}")
_HEX62 = re.compile(r"[0-9a-f]{62}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_EVENT_KEYS = frozenset({"v", "seq", "run_id", "ts", "type", "prev", "body"})
_RUN_KEYS_REQUIRED = ("format", "run_id", "created", "hash_alg", "kernel_keyid", "kernel_pubkey",
                      "policy_digest")


@dataclass
class VerifyReport:
    status: str  # "intact" | "incomplete" | "corrupt"
    problem: str | None  # the first thing wrong, naming the file and seq/offset
    run_id: str | None
    events: int
    keyid: str | None
    warnings: list[str] = field(default_factory=list)
    seal_status: str | None = None  # the status recorded in SEAL.json (only when intact)
    folder_status: str | None = None
    """This folder's own status, its children left aside (``status`` is the whole tree's)."""
    lineage: dict[str, Any] | None = None
    """For a spawned child: ``{"parent", "root", "depth"}`` from its ``run.json``."""
    children: list[VerifyReport] = field(default_factory=list)
    """The reports of the children this run spawned, in the order they were granted."""
    seal: str | None = None
    """Digest of ``SEAL.json`` (what a parent's ``spawn.exit`` records), when sealed."""

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "problem": self.problem, "run_id": self.run_id,
                "events": self.events, "keyid": self.keyid, "warnings": list(self.warnings),
                "seal_status": self.seal_status,
                "folder_status": self.folder_status or self.status, "seal": self.seal,
                "lineage": self.lineage, "children": [c.to_json() for c in self.children]}

    def tree(self) -> list[VerifyReport]:
        """This report and every descendant's, depth first."""
        return [self, *(r for c in self.children for r in c.tree())]

    def child_lines(self, indent: str = "  ") -> list[str]:
        """One line per descendant, indented by generation (what ``kernel verify`` prints)."""
        out = []
        for c in self.children:
            line = f"{indent}child {c.run_id}: {c.status}"
            if c.seal_status is not None:
                line += f", sealed {c.seal_status}"
            if c.status != INTACT and c.problem:
                line += f": {c.problem}"
            out.append(line)
            out.extend(f"{indent}  warning: {w}" for w in c.warnings)
            out.extend(c.child_lines(indent + "  "))
        return out


class _Corrupt(Exception):
    pass


def _no_float(s: str) -> Any:
    raise ValueError(f"float {s} not allowed")


def _no_const(s: str) -> Any:
    raise ValueError(f"{s} not allowed")


_loads = json.JSONDecoder(parse_float=_no_float, parse_constant=_no_const).decode
_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode


class _Verifier:
    def __init__(self, run_dir: Path, trusted: Sequence[Ed25519PublicKey]) -> None:
        self.root = run_dir
        self.trusted = {raw_public(k): k for k in trusted}
        self.run_id: str | None = None
        self.keyid: str | None = None
        self.pub: Ed25519PublicKey | None = None
        self.events = 0
        self.head = ZERO_HEAD
        self.warnings: list[str] = []
        self.files: dict[str, tuple[int, int]] = {}  # relpath -> (dev, ino) seen at lstat
        self.dirs: list[str] = []
        self.leftovers: list[str] = []
        self.digests: dict[str, str] = {}  # relpath -> sha256:<hex>
        self.last_type: str | None = None
        self.lineage: dict[str, Any] | None = None
        self.log_data = b""
        self.linked: list[tuple[int, int, int]] = []
        self.seal_digest: str | None = None

    # ---- helpers ----

    def _read(self, rel: str) -> bytes:
        """Read a file found by the structure walk, without following anything."""
        fd = self._open(rel)
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        self.digests[rel] = "sha256:" + hashlib.sha256(data).hexdigest()
        return data

    def _open(self, rel: str) -> int:
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            parts = rel.split("/")
            for p in parts[:-1]:
                nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=dfd)
                os.close(dfd)
                dfd = nfd
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dfd)
        finally:
            os.close(dfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != self.files[rel]:
            os.close(fd)
            raise _Corrupt(f"{rel}: changed while being verified")
        return fd

    # ---- 1. structure ----

    def structure(self) -> None:
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.dev = os.fstat(root_fd).st_dev
            self._walk(root_fd, "", 0)
        finally:
            os.close(root_fd)
        self.dirs.sort()

    def _expect(self, rel: str, depth: int, name: str) -> str | None:
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if depth == 0:
            return _TOP.get(name)
        if parent == "log":
            return _F if name == "events.jsonl" else None
        if parent == "objects":
            return _D if name == "sha256" else None
        if parent in MANIFESTS:
            return _F if name == "tree.json" else None
        if parent == OBJECTS_DIR:
            return _D if _HEX2.fullmatch(name) else None
        if parent.startswith(OBJECTS_DIR + "/") and depth == 3:
            if _HEX62.fullmatch(name):
                return _F
            if name.startswith(".tmp-"):
                self.leftovers.append(rel)
                return _F
        return None

    def _walk(self, dfd: int, prefix: str, depth: int) -> None:
        with os.scandir(dfd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = prefix + e.name
            st = os.stat(e.name, dir_fd=dfd, follow_symlinks=False)
            kind = self._expect(rel, depth, e.name)
            if stat.S_ISLNK(st.st_mode):
                raise _Corrupt(f"{rel}: symbolic link in the run folder (not followed)")
            if kind is None:
                what = "directory" if stat.S_ISDIR(st.st_mode) else "file"
                raise _Corrupt(f"{rel}: unexpected {what} in the run folder")
            if st.st_dev != self.dev:
                raise _Corrupt(f"{rel}: on another file system (mount point in the run folder)")
            if kind == _D:
                if not stat.S_ISDIR(st.st_mode):
                    raise _Corrupt(f"{rel}: expected a directory, found {_kind(st.st_mode)}")
                self.dirs.append(rel)
                sub = os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                              | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    self._walk(sub, rel + "/", depth + 1)
                finally:
                    os.close(sub)
            else:
                if not stat.S_ISREG(st.st_mode):
                    raise _Corrupt(f"{rel}: expected a regular file, found {_kind(st.st_mode)}")
                if st.st_nlink != 1:
                    raise _Corrupt(f"{rel}: has {st.st_nlink} hard links (must be 1)")
                self.files[rel] = (st.st_dev, st.st_ino)

    # ---- 2, 3. header, signature, policy ----

    def header(self) -> None:
        for rel in (RUN_JSON, RUN_SIG, POLICY_FILE, LOG_FILE):
            if rel not in self.files:
                raise _Corrupt(f"{rel}: missing")
        try:
            hdr = parse_canonical(self._read(RUN_JSON), RUN_JSON)
        except ValueError as e:
            raise _Corrupt(str(e)) from None
        if not isinstance(hdr, dict):
            raise _Corrupt(f"{RUN_JSON}: not a JSON object")
        for k in _RUN_KEYS_REQUIRED:
            if not isinstance(hdr.get(k), str):
                raise _Corrupt(f"{RUN_JSON}: field {k!r} missing or not a string")
        if hdr["format"] != RUN_FORMAT:
            raise _Corrupt(f"{RUN_JSON}: unknown format {hdr['format']!r} (want {RUN_FORMAT})")
        if hdr["hash_alg"] != "sha256":
            raise _Corrupt(f"{RUN_JSON}: hash_alg {hdr['hash_alg']!r} is not accepted (sha256)")
        self.run_id = hdr["run_id"]
        self.lineage = _lineage_of(hdr)
        if self.run_id != self.root.name:
            self.warnings.append(f"{RUN_JSON}: run_id {self.run_id!r} differs from the folder "
                                 f"name {self.root.name!r}")
        pk = hdr["kernel_pubkey"]
        if not _HEX64.fullmatch(pk):
            raise _Corrupt(f"{RUN_JSON}: kernel_pubkey is not 64 lowercase hex digits")
        raw = bytes.fromhex(pk)
        embedded = Ed25519PublicKey.from_public_bytes(raw)
        claimed = keyid_of(embedded)
        self.keyid = claimed
        if hdr["kernel_keyid"] != claimed:
            raise _Corrupt(f"{RUN_JSON}: kernel_keyid {hdr['kernel_keyid']!r} does not match "
                           f"kernel_pubkey ({claimed})")
        try:
            check_digest(hdr["policy_digest"], f"{RUN_JSON}: policy_digest")
        except ValueError as e:
            raise _Corrupt(str(e)) from None
        self.policy_digest: str = hdr["policy_digest"]

        try:
            sig_obj = parse_canonical(self._read(RUN_SIG), RUN_SIG)
        except ValueError as e:
            raise _Corrupt(str(e)) from None
        sig = _sig_of(sig_obj, RUN_SIG, claimed)
        message = RUN_SIG_DOMAIN + self._read(RUN_JSON)
        trusted = self.trusted.get(raw)
        if trusted is None:
            if _verifies(embedded, sig, message):
                raise _Corrupt(f"{RUN_SIG}: run signed by key {claimed}, which is not trusted")
            raise _Corrupt(f"{RUN_SIG}: signature does not verify (claimed key {claimed}, "
                           "which is not trusted either)")
        if not _verifies(trusted, sig, message):
            raise _Corrupt(f"{RUN_SIG}: signature over {RUN_JSON} does not verify with "
                           f"trusted key {claimed}")
        self.pub = trusted

        policy = self._read(POLICY_FILE)
        if self.digests[POLICY_FILE] != self.policy_digest:
            raise _Corrupt(f"{POLICY_FILE}: digest {self.digests[POLICY_FILE]} differs from "
                           f"{RUN_JSON} policy_digest {self.policy_digest}")
        del policy

    # ---- 4. log ----

    def log(self, sealed: bool) -> None:
        data = self._read(LOG_FILE)
        end = data.rfind(b"\n") + 1
        if end != len(data):
            tail = len(data) - end
            if sealed:
                raise _Corrupt(f"{LOG_FILE}: {tail} bytes without a final newline at offset "
                               f"{end} (torn line in a sealed log)")
            self.warnings.append(f"{LOG_FILE}: torn last line ({tail} bytes at offset {end}) "
                                 "ignored: it was never acknowledged")
        assert self.run_id is not None
        self.log_data = data[:end]
        chunks = _scan_log(data, end, self.run_id)
        error: tuple[int, int, str] | None = None
        prev_chunk: _Chunk | None = None
        for c in chunks:
            if c.error is not None and (error is None or tuple(c.error[:2]) < error[:2]):
                error = (c.error[0], c.error[1], c.error[2])
            if c.count == 0:
                continue
            if prev_chunk is not None:
                s = c.first_seq
                where = f"{LOG_FILE} seq {s} (line {s + 1}, byte offset {c.first_offset})"
                if c.first_prev is not None and c.first_prev != prev_chunk.last_hash:
                    cand = (s, _R_PREV, f"{where}: {_CHAIN_MSG}")
                    if error is None or cand[:2] < error[:2]:
                        error = cand
                if prev_chunk.last_type == "run.end":
                    cand = (s, _R_AFTER_END, f"{where}: event after run.end")
                    if error is None or cand[:2] < error[:2]:
                        error = cand
                if c.first_ts < prev_chunk.last_ts:
                    self.warnings.append(f"{where}: ts goes backwards")
            prev_chunk = c
        if error is not None:
            raise _Corrupt(error[2])
        self.warnings.extend(w for c in chunks for w in c.warnings)
        self.refs = [r for c in chunks for r in c.refs]
        self.linked = [x for c in chunks for x in c.linked]
        self.events = sum(c.count for c in chunks)
        self.head = prev_chunk.last_hash if prev_chunk is not None else ZERO_HEAD
        self.last_type = prev_chunk.last_type if prev_chunk is not None else None

    # ---- 5, 6. manifests, blobs, references ----

    def objects(self, sealed: bool) -> None:
        self.manifest_digests: set[str] = set()
        manifest_refs: set[str] = set()
        for which, rel in MANIFESTS.items():
            if rel not in self.files:
                continue
            try:
                obj = parse_canonical(self._read(rel), rel)
            except ValueError as e:
                raise _Corrupt(str(e)) from None
            self.manifest_digests.add(self.digests[rel])
            manifest_refs.update(iter_digests(obj))
            del which
        blobs: set[str] = set()
        prefix = OBJECTS_DIR + "/"
        for rel in self.files:
            if not rel.startswith(prefix) or rel in self.leftovers:
                continue
            fd = self._open(rel)
            with os.fdopen(fd, "rb") as f:
                digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
            self.digests[rel] = digest
            name = "sha256:" + rel[len(prefix):].replace("/", "")
            if digest != name:
                raise _Corrupt(f"{rel}: content hashes to {digest}, not to its name")
            blobs.add(digest)
        for rel in self.leftovers:
            if sealed:
                raise _Corrupt(f"{rel}: leftover temporary file in a sealed run")
            self.warnings.append(f"{rel}: leftover temporary file from an interrupted write")
            self.digests[rel] = "sha256:" + hashlib.sha256(self._read(rel)).hexdigest()
        known = blobs | self.manifest_digests | {self.policy_digest}
        referenced: set[str] = set()
        for seq, path, d in self.refs:
            if d not in known:
                raise _Corrupt(f"{LOG_FILE} seq {seq}: {path} references {d}, but "
                               f"{blob_relpath(d)} is missing")
            referenced.add(d)
        self.orphans = sorted(blobs - referenced - manifest_refs)
        if not sealed:
            for d in self.orphans:
                self.warnings.append(f"{blob_relpath(d)}: blob not referenced by any event or "
                                     "manifest (staged before a crash?)")

    # ---- 7. seal ----

    def seal(self) -> None:
        data = self._read(SEAL_FILE)
        try:
            outer = parse_canonical(data, SEAL_FILE)
        except ValueError as e:
            raise _Corrupt(str(e)) from None
        if type(outer) is not dict or outer.keys() != {"body", "sig"}:
            raise _Corrupt(f"{SEAL_FILE}: must be an object with exactly 'body' and 'sig'")
        body = outer["body"]
        if type(body) is not dict:
            raise _Corrupt(f"{SEAL_FILE}: body must be an object")
        sig = _sig_hex(outer["sig"], SEAL_FILE)
        assert self.pub is not None
        if not _verifies(self.pub, sig, SEAL_SIG_DOMAIN + _dumps(body).encode("utf-8")):
            raise _Corrupt(f"{SEAL_FILE}: signature does not verify with the run's trusted "
                           f"kernel key {self.keyid}")
        if body.get("format") != SEAL_FORMAT:
            raise _Corrupt(f"{SEAL_FILE}: unknown format {body.get('format')!r}")
        if body.get("keyid") != self.keyid:
            raise _Corrupt(f"{SEAL_FILE}: keyid {body.get('keyid')!r} is not {self.keyid}")
        if body.get("run_id") != self.run_id:
            raise _Corrupt(f"{SEAL_FILE}: run_id {body.get('run_id')!r} is not this run's")
        if not isinstance(body.get("status"), str):
            raise _Corrupt(f"{SEAL_FILE}: status missing")
        if body.get("events") != self.events:
            raise _Corrupt(f"{LOG_FILE}: has {self.events} events but {SEAL_FILE} sealed "
                           f"{body.get('events')!r}")
        if body.get("head") != self.head:
            raise _Corrupt(f"{LOG_FILE}: chain head differs from the one in {SEAL_FILE} "
                           "(log truncated or rewritten)")
        if self.last_type != "run.end":
            raise _Corrupt(f"{LOG_FILE}: sealed log does not end with run.end")
        sealed_files = body.get("files")
        if type(sealed_files) is not dict:
            raise _Corrupt(f"{SEAL_FILE}: files must be an object")
        present = {r for r in self.files if r != SEAL_FILE}
        for rel in sorted(present - sealed_files.keys()):
            raise _Corrupt(f"{rel}: present but not listed in {SEAL_FILE} (added after sealing)")
        for rel in sorted(sealed_files.keys() - present):
            raise _Corrupt(f"{rel}: listed in {SEAL_FILE} but missing")
        for rel in sorted(present):
            if rel not in self.digests:
                self._read(rel)
            if sealed_files[rel] != self.digests[rel]:
                raise _Corrupt(f"{rel}: digest {self.digests[rel]} differs from {SEAL_FILE} "
                               f"({sealed_files[rel]})")
        if body.get("dirs") != self.dirs:
            extra = sorted(set(self.dirs) - set(body.get("dirs") or []))
            missing = sorted(set(body.get("dirs") or []) - set(self.dirs))
            raise _Corrupt(f"{SEAL_FILE}: directory list differs from the folder (added: "
                           f"{extra}, missing: {missing})")
        declared = body.get("unreferenced")
        if type(declared) is not list:
            raise _Corrupt(f"{SEAL_FILE}: unreferenced must be a list")
        for d in self.orphans:
            if d not in declared:
                raise _Corrupt(f"{blob_relpath(d)}: blob not referenced by any event or "
                               f"manifest, nor declared unreferenced in {SEAL_FILE}")
            self.warnings.append(f"{blob_relpath(d)}: stored but never referenced (declared in "
                                 f"{SEAL_FILE})")
        if sorted(declared) != self.orphans:
            raise _Corrupt(f"{SEAL_FILE}: unreferenced lists blobs that are referenced: "
                           f"{sorted(set(declared) - set(self.orphans))}")
        self.seal_status: str | None = body["status"]
        self.seal_digest = self.digests[SEAL_FILE]

    def modes(self) -> None:
        dirs = set(self.dirs)
        for rel in [*self.dirs, *self.files]:
            mode = os.lstat(self.root / rel).st_mode & 0o7777
            want = 0o555 if rel in dirs else 0o444
            if mode != want:
                self.warnings.append(f"{rel}: mode {mode:o}, sealed runs are {want:o}")
                return

    def run(self) -> VerifyReport:
        self.structure()
        sealed = SEAL_FILE in self.files
        self.header()
        self.log(sealed)
        self.objects(sealed)
        self.approvals(sealed)
        self.torn_tails()
        if not sealed:
            if self.events:
                msg = (f"not sealed; {self.events} events intact up to seq {self.events - 1}")
            else:
                msg = "not sealed; 0 events intact (empty log)"
            return self.report(INCOMPLETE, msg)
        self.seal()
        self.modes()
        report = self.report(INTACT, None)
        report.seal_status = self.seal_status
        return report

    def torn_tails(self) -> None:
        """A ``log.torn_tail`` record must describe exactly the bytes recovery cut (§10)."""
        from kernel.recover import check_torn_tail_records

        with os.fdopen(self._open(LOG_FILE), "rb") as f:  # read only; digested already
            data = f.read()
        if b'"type":"log.torn_tail"' not in data:
            return
        problem = check_torn_tail_records(data, lambda d: self._read(blob_relpath(d)))
        if problem is not None:
            raise _Corrupt(f"{LOG_FILE}: {problem}")

    def approvals(self, sealed: bool) -> None:
        """Every approval re-checked against the recorded policy (kernel/approval_audit.py)."""
        from kernel import approval_audit

        data = self._read(LOG_FILE)
        data = data[: data.rfind(b"\n") + 1]
        if (b'"type":"approval.' not in data or b'"approval.requested"' not in data) and \
                b'"decision":"pending"' not in data:
            return  # no approval was ever asked for: nothing to re-check
        events = [json.loads(line) for line in data.split(b"\n") if line]
        assert self.run_id is not None
        problem = approval_audit.check(
            self.run_id, self._read(POLICY_FILE), events,
            lambda d: self._read(blob_relpath(d)), sealed)
        if problem is not None:
            raise _Corrupt(f"{LOG_FILE}: {problem}")

    def report(self, status: str, problem: str | None) -> VerifyReport:
        lin = None if self.lineage is None else {k: self.lineage[k]
                                                 for k in ("parent", "root", "depth")}
        return VerifyReport(status=status, problem=problem, run_id=self.run_id,
                            events=self.events, keyid=self.keyid, warnings=self.warnings,
                            folder_status=status, lineage=lin, seal=self.seal_digest)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _sig_hex(value: Any, where: str) -> bytes:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{128}", value):
        raise _Corrupt(f"{where}: sig must be 128 lowercase hex digits")
    return bytes.fromhex(value)


def _sig_of(obj: Any, where: str, keyid: str) -> bytes:
    if type(obj) is not dict or obj.keys() != {"keyid", "sig"}:
        raise _Corrupt(f"{where}: must be an object with exactly 'keyid' and 'sig'")
    if obj["keyid"] != keyid:
        raise _Corrupt(f"{where}: keyid {obj['keyid']!r} does not match {RUN_JSON} ({keyid})")
    return _sig_hex(obj["sig"], where)


def _verifies(pub: Ed25519PublicKey, sig: bytes, message: bytes) -> bool:
    try:
        pub.verify(sig, message)
    except InvalidSignature:
        return False
    return True


def verify_run(run_dir: Path, trusted: Sequence[Ed25519PublicKey], *,
               children: bool = True) -> VerifyReport:
    """Verify one run folder, and the folders of the children it spawned, against the auditor's
    trusted kernel public keys.

    Raises NotFoundError only if ``run_dir`` does not exist or is not a directory; everything
    about the folder's content (and its children's) is reported in the returned
    :class:`VerifyReport`, whose ``status`` is the worst of the tree. ``children=False`` checks
    the folder alone (``folder_status`` is then ``status``).
    """
    run_dir = Path(run_dir)
    _check_dir(run_dir)
    report, v = _verify_folder(run_dir, trusted)
    if children and report.status != CORRUPT:
        try:
            _Tree(trusted).check(v, report, {v.run_id or run_dir.name})
        except Exception as e:  # folder content must never crash the verifier
            _worsen(report, CORRUPT, "unexpected error while verifying the agent tree: "
                    f"{type(e).__name__}: {e}")
    return report


def _check_dir(run_dir: Path) -> None:
    try:
        st = os.lstat(run_dir)
    except FileNotFoundError:
        raise NotFoundError(f"run folder {run_dir} does not exist") from None
    except OSError as e:
        raise NotFoundError(f"run folder {run_dir} cannot be read: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotFoundError(f"{run_dir} is not a directory (a run folder is a directory)")


def _verify_folder(run_dir: Path, trusted: Sequence[Ed25519PublicKey]
                   ) -> tuple[VerifyReport, _Verifier]:
    v = _Verifier(run_dir, trusted)
    try:
        return v.run(), v
    except _Corrupt as e:
        return v.report(CORRUPT, str(e)), v
    except Exception as e:  # folder content must never crash the verifier
        return v.report(CORRUPT, f"unexpected error while verifying: {type(e).__name__}: {e}"), v


# ---- the agent tree: children spawned by a run ----

_LINEAGE_KEYS = ("parent", "root", "depth", "manifest", "manifest_digest", "parent_decision_seq",
                 "parent_decision_hash")
_RANK = {INTACT: 0, INCOMPLETE: 1, CORRUPT: 2}
_MAX_TREE_DEPTH = 64  # the deepest a policy allows (``[spawn] max_depth``)


def _lineage_of(hdr: dict[str, Any]) -> dict[str, Any] | None:
    """``run.json``'s ``lineage`` (a spawned child's link to its parent), shape-checked."""
    if "lineage" not in hdr:
        return None
    lin = hdr["lineage"]
    if type(lin) is not dict:
        raise _Corrupt(f"{RUN_JSON}: lineage must be an object")
    for k in _LINEAGE_KEYS:
        want: type = int if k in ("depth", "parent_decision_seq") else str
        if type(lin.get(k)) is not want:
            raise _Corrupt(f"{RUN_JSON}: lineage.{k} missing or not {want.__name__}")
    if lin["depth"] < 1:
        raise _Corrupt(f"{RUN_JSON}: lineage.depth {lin['depth']} (a child is at depth 1 or "
                       "more)")
    return lin


@dataclass
class _Grant:
    """An allowed ``spawn`` decision in the parent's log, and what the log says about it."""

    seq: int
    hash: str
    body: dict[str, Any]
    started: int | None = None  # seq of the spawn's syscall.result
    exit_seq: int | None = None
    exit: dict[str, Any] | None = None
    never_started: bool = False
    """``run.recovered`` says the kernel stopped before this child's spawn had a result."""


class _Tree:
    """Checks the children of a verified folder (and theirs, through :func:`_verify_folder`)."""

    def __init__(self, trusted: Sequence[Ed25519PublicKey]) -> None:
        self.trusted = trusted

    def check(self, v: _Verifier, report: VerifyReport, seen: set[str]) -> None:
        """Verify ``v``'s children into ``report.children``; worsen ``report`` to the tree's."""
        try:
            grants = self._grants(v)
        except _Corrupt as e:
            _worsen(report, CORRUPT, str(e))
            return
        for child, g in grants.items():
            child_report, problem = self._child(v, child, g, seen)
            if child_report is not None:
                report.children.append(child_report)
            if problem is not None:
                _worsen(report, *problem)
            if report.status == CORRUPT:
                return

    def _grants(self, v: _Verifier) -> dict[str, _Grant]:
        """Every child granted in ``v``'s log, with its start and its ``spawn.exit``."""
        grants: dict[str, _Grant] = {}
        by_key: dict[tuple[Any, Any], str] = {}
        for seq, offset, length in v.linked:  # lines naming a child (none: no spawn, no cost)
            line = v.log_data[offset:offset + length]
            ev = json.loads(line)
            t, b = ev["type"], ev["body"]
            where = f"{LOG_FILE} seq {seq}"
            child = b.get("child")
            if t == "syscall.decision" and b.get("decision") == "allowed" and \
                    b.get("rule") == "spawn":
                if not isinstance(child, str) or not RUN_ID_RE.fullmatch(child) or \
                        ".." in child:
                    raise _Corrupt(f"{where}: spawn decision grants child {child!r}, which is "
                                   "not a run id")
                if child in grants:
                    raise _Corrupt(f"{where}: child {child} granted a second time (first at "
                                   f"seq {grants[child].seq})")
                grants[child] = _Grant(seq, hashlib.sha256(line).hexdigest(), b)
                by_key[(b.get("req"), b.get("request_digest"))] = child
            elif t == "syscall.result" and by_key.get((b.get("req"),
                                                        b.get("request_digest"))) == child:
                grants[child].started = seq
            elif t == "syscall.result" and "timed_out" in b and b.get("seal") is not None:
                g = grants.get(child) if isinstance(child, str) else None
                if g is None or g.exit is None or b["seal"] != g.exit.get("seal") or \
                        b.get("status") != g.exit.get("status"):
                    told = "no spawn.exit" if g is None or g.exit is None else (
                        f"spawn.exit (seq {g.exit_seq}) records {g.exit.get('status')!r} "
                        f"{g.exit.get('seal')!r}")
                    raise _Corrupt(f"{where}: wait result reports child {child!r} ended "
                                   f"{b.get('status')!r} with seal {b['seal']!r}, but {told}")
            elif t == "run.recovered":
                unfinished = b.get("unfinished")
                for u in unfinished if isinstance(unfinished, list) else []:
                    if isinstance(u, dict) and u.get("missing") == "result" and \
                            isinstance(u.get("child"), str) and u["child"] in grants:
                        grants[u["child"]].never_started = True
            elif t == "spawn.exit":
                g = grants.get(child) if isinstance(child, str) else None
                if g is None:
                    raise _Corrupt(f"{where}: spawn.exit for child {child!r}, which no allowed "
                                   "spawn decision before it granted")
                if g.exit_seq is not None:
                    raise _Corrupt(f"{where}: second spawn.exit for child {child} (first at "
                                   f"seq {g.exit_seq})")
                g.exit_seq, g.exit = seq, b
        return grants

    def _child(self, v: _Verifier, child: str, g: _Grant, seen: set[str]
               ) -> tuple[VerifyReport | None, tuple[str, str] | None]:
        """The child's report and the problem it makes for the tree, if any."""
        sealed = v.seal_digest is not None
        name = f"child {child} (granted at {v.run_id}'s {LOG_FILE} seq {g.seq})"
        child_dir = v.root.parent / child
        if sealed and g.exit is None and g.never_started and g.started is None and \
                not os.path.lexists(child_dir):
            v.warnings.append(f"{name}: never started (the kernel stopped before creating its "
                              "folder; recorded by run.recovered)")
            return None, None
        if sealed and g.exit is None:
            return None, (CORRUPT, f"{name}: the sealed parent has no spawn.exit for it")
        if child in seen:
            return None, (CORRUPT, f"{name}: appears twice in the tree (a loop of lineages)")
        if len(seen) > _MAX_TREE_DEPTH:
            return None, (CORRUPT, f"{name}: deeper than {_MAX_TREE_DEPTH} generations, more "
                          "than any policy allows")
        try:
            _check_dir(child_dir)
        except NotFoundError as e:
            if sealed or g.exit is not None or g.started is not None:
                return None, (CORRUPT, f"{name}: folder missing: {e}")
            v.warnings.append(f"{name}: no folder (the kernel stopped before creating it)")
            return None, None
        report, cv = _verify_folder(child_dir, self.trusted)
        if report.status == CORRUPT:
            return report, (CORRUPT, f"{name}: its folder {child_dir} is corrupt: "
                            f"{report.problem}")
        problem = self._link(v, child, g, cv)
        if problem is not None:
            report.status, report.problem = CORRUPT, problem
            return report, (CORRUPT, f"{name}: {problem}")
        self.check(cv, report, seen | {child})
        if report.status == CORRUPT:
            return report, (CORRUPT, f"{name}: {report.problem}")
        if g.exit is not None:
            ex = g.exit
            if cv.seal_digest is None:
                return report, (CORRUPT, f"{name}: not sealed, but the parent's spawn.exit "
                                f"(seq {g.exit_seq}) records its seal {ex.get('seal')!r}")
            if ex.get("seal") != cv.seal_digest:
                return report, (CORRUPT, f"{name}: its seal is {cv.seal_digest}, but the "
                                f"parent's spawn.exit (seq {g.exit_seq}) records "
                                f"{ex.get('seal')!r} (child folder swapped or re-sealed)")
            if ex.get("status") != cv.seal_status:
                return report, (CORRUPT, f"{name}: sealed {cv.seal_status!r}, but the "
                                f"parent's spawn.exit (seq {g.exit_seq}) says "
                                f"{ex.get('status')!r}")
        if report.status == INCOMPLETE:
            return report, (INCOMPLETE, f"{name}: {report.problem}")
        return report, None

    def _link(self, v: _Verifier, child: str, g: _Grant, cv: _Verifier) -> str | None:
        """Why the child's ``lineage`` does not point back at this grant (None: it does)."""
        from kernel import lineage

        lin = cv.lineage
        if cv.run_id != child:
            return f"{RUN_JSON}: run_id is {cv.run_id!r}, not {child}"
        if lin is None:
            return f"{RUN_JSON} has no lineage: not the run of a spawned child"
        if lin["parent"] != v.run_id:
            return (f"lineage names parent {lin['parent']!r}, but {v.run_id} granted it "
                    f"(seq {g.seq})")
        if lin["parent_decision_seq"] != g.seq or lin["parent_decision_hash"] != g.hash:
            return (f"lineage points at the parent's decision seq {lin['parent_decision_seq']} "
                    f"hash {lin['parent_decision_hash'][:16]}..., but the granting decision is "
                    f"seq {g.seq} hash {g.hash[:16]}...")
        p_root = v.run_id if v.lineage is None else v.lineage["root"]
        p_depth = 0 if v.lineage is None else v.lineage["depth"]
        if lin["root"] != p_root or lin["depth"] != p_depth + 1:
            return (f"lineage says root {lin['root']!r} depth {lin['depth']}; the parent's "
                    f"root is {p_root!r} at depth {p_depth}")
        want = g.body.get("manifest_digest")
        token = lin["manifest"]
        try:
            got = lineage.digest(token)
        except lineage.ManifestRefused as e:
            return f"lineage manifest refused ({e.rule}): {e.reason}"
        if lin["manifest_digest"] != want or got != want:
            return (f"manifest digest {got} (lineage says {lin['manifest_digest']}) differs from "
                    f"the granting decision's {want!r}")
        now_ns = g.body.get("now_ns")
        if type(now_ns) is not int:
            return f"the granting decision (seq {g.seq}) has no now_ns"
        assert v.pub is not None
        try:  # valid when the parent's kernel granted it, under the key that signed the parent
            m = lineage.check(token, v.pub, expect_child=child, now_ns=now_ns, presented=())
        except lineage.ManifestRefused as e:
            return f"lineage manifest refused ({e.rule}): {e.reason}"
        budget = {k: getattr(m.budget, k) for k in ("syscalls", "bytes_written",
                                                     "files_written", "exec_count")}
        for what, got_v, want_v in (("parent", m.parent, v.run_id), ("root", m.root, p_root),
                                    ("depth", m.depth, p_depth + 1),
                                    ("policy_digest", m.policy_digest, cv.policy_digest),
                                    ("budget", budget, g.body.get("budget")),
                                    ("expires_ns", m.expires_ns, g.body.get("expires_ns"))):
            if got_v != want_v:
                return (f"manifest {what} is {got_v!r}, but the run and the granting decision "
                        f"say {want_v!r}")
        return None


def _worsen(report: VerifyReport, status: str, problem: str) -> None:
    if _RANK[status] > _RANK[report.status]:
        report.status, report.problem = status, problem


# ---- the log scan: the hot loop, optionally split across processes ----

_CHAIN_MSG = "prev does not match the hash of the previous line (chain broken)"
# Check order inside one line; with (seq, rank) the first failure is the same however the log is
# split into chunks.
(_R_PARSE, _R_SHAPE, _R_V, _R_SEQ, _R_RUN_ID, _R_PREV, _R_TS, _R_TYPE, _R_START, _R_AFTER_END,
 _R_BODY, _R_REFS) = range(12)
_PARALLEL_MIN_BYTES = 4 << 20


@dataclass
class _Chunk:
    first_seq: int
    first_offset: int
    count: int = 0
    error: tuple[int, int, str] | None = None
    first_prev: str | None = None  # prev of the first line, checked by the caller
    last_hash: str = ZERO_HEAD
    first_ts: str = ""
    last_ts: str = ""
    last_type: str | None = None
    refs: list[tuple[int, str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    linked: list[tuple[int, int, int]] = field(default_factory=list)
    """``(seq, offset, length)`` of lines whose body names a ``child`` (the agent tree), and of
    ``run.recovered`` (which names children that never started)."""


_FLOAT_TOKEN = re.compile(rb"[:,\[]-?[0-9]+(?:\.[0-9]+(?:[eE][+-]?[0-9]+)?|[eE][+-]?[0-9]+)[,\]}]")


def _fast_canonical(line: bytes) -> Any:
    """The event in ``line`` when orjson parses it, re-serializes it (sorted keys, compact) to
    exactly the same bytes and it holds no float: then the json module would accept it too
    (same escapes, same key order by code point, same integers). None: let the json module
    judge the line (a float, an integer beyond 64 bits, anything orjson refuses or writes
    differently)."""
    try:
        ev = orjson.loads(line)
        if type(ev) is not dict or orjson.dumps(ev, option=orjson.OPT_SORT_KEYS) != line:
            return None
    except (orjson.JSONDecodeError, orjson.JSONEncodeError, TypeError, ValueError):
        return None
    # The line is canonical compact JSON, so a float is a number token between `:`, `,` or `[`
    # and `,`, `]` or `}` with a fraction or an exponent. Most lines have none: only when the
    # pattern shows up (perhaps inside a string) are the values walked.
    if _FLOAT_TOKEN.search(line) is None:
        return ev
    stack: list[Any] = [ev]
    while stack:
        x = stack.pop()
        t: type = type(x)
        if t is dict:
            stack.extend(x.values())
        elif t is list:
            stack.extend(x)
        elif t is float:
            return None
    return ev


def _scan_chunk(data: bytes, start: int, end: int, first_seq: int, run_id: str,
                prev: str | None) -> _Chunk:
    """Check the lines in ``data[start:end]`` (whole lines). ``prev=None``: the first line's
    ``prev`` is returned for the caller to check against the previous chunk."""
    c = _Chunk(first_seq=first_seq, first_offset=start)
    lines = data[start:end].split(b"\n")
    lines.pop()
    sha = hashlib.sha256
    loads, dumps = _loads, _dumps
    keys = _EVENT_KEYS
    ts_ok = _TS.fullmatch
    last_ts = ""
    last_type: str | None = None
    offset = start
    seq = first_seq
    for line in lines:
        rank = _R_PARSE
        try:
            ev = _fast_canonical(line)
            if ev is None:  # the exact, slower judge: the standard json module with hooks
                text = line.decode("utf-8")
                ev = loads(text)
                if dumps(ev) != text:
                    raise ValueError("not in canonical form (re-serialization differs)")
            rank = _R_SHAPE
            if type(ev) is not dict or ev.keys() != keys:
                raise ValueError(f"not an event object with fields {sorted(keys)}")
            rank = _R_V
            if ev["v"] != EVENT_VERSION or type(ev["v"]) is not int:
                raise ValueError(f"unknown event version {ev['v']!r}")
            rank = _R_SEQ
            if ev["seq"] != seq or type(ev["seq"]) is not int:
                raise ValueError(f"seq is {ev['seq']!r}, expected {seq}")
            rank = _R_RUN_ID
            if ev["run_id"] != run_id:
                raise ValueError(f"run_id {ev['run_id']!r} is not this run's ({run_id!r})")
            rank = _R_PREV
            if prev is None:
                c.first_prev = ev["prev"]
            elif ev["prev"] != prev:
                raise ValueError(_CHAIN_MSG)
            rank = _R_TS
            ts = ev["ts"]
            if type(ts) is not str or not ts_ok(ts):
                raise ValueError(f"ts {ts!r} is not RFC 3339 UTC with microseconds")
            if ts < last_ts:
                c.warnings.append(f"{LOG_FILE} seq {seq}: ts goes backwards ({ts} < {last_ts})")
            elif not last_ts:
                c.first_ts = ts
            last_ts = ts
            rank = _R_TYPE
            etype = ev["type"]
            if type(etype) is not str or not etype:
                raise ValueError("type must be a non-empty string")
            rank = _R_START
            if etype == "run.start" and seq != 0:
                raise ValueError("run.start after the first event")
            rank = _R_AFTER_END
            if last_type == "run.end":
                raise ValueError("event after run.end")
            rank = _R_BODY
            if type(ev["body"]) is not dict:
                raise ValueError("body must be an object")
            rank = _R_REFS
            if b"_blob" in line or b'"blobs"' in line:
                for path, d in iter_blob_refs(ev["body"]):
                    c.refs.append((seq, path, d))
            if "child" in ev["body"] or etype == "run.recovered":
                c.linked.append((seq, offset, len(line)))
        except (ValueError, RecursionError) as e:
            where = f"{LOG_FILE} seq {seq} (line {seq + 1}, byte offset {offset})"
            c.error = (seq, rank, f"{where}: {e}")
            break
        last_type = etype
        prev = sha(line).hexdigest()
        offset += len(line) + 1
        seq += 1
    c.count = seq - first_seq
    c.last_hash = prev if prev is not None else ZERO_HEAD
    c.last_ts = last_ts
    c.last_type = last_type
    return c


def _split(data: bytes, end: int, parts: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_seq)`` of ``parts`` chunks of whole lines."""
    bounds = [0]
    for i in range(1, parts):
        cut = data.find(b"\n", end * i // parts, end)
        if cut < 0 or cut + 1 <= bounds[-1]:
            continue
        bounds.append(cut + 1)
    bounds.append(end)
    out = []
    seq = 0
    for a, b in itertools.pairwise(bounds):
        if b > a:
            out.append((a, b, seq))
            seq += data.count(b"\n", a, b)
    return out


def _chunk_to_json(c: _Chunk) -> bytes:
    return json.dumps(dataclasses.asdict(c)).encode()


def _chunk_from_json(raw: bytes) -> _Chunk:
    d = json.loads(raw)
    c = _Chunk(**d)
    c.error = (int(d["error"][0]), int(d["error"][1]), str(d["error"][2])) if d["error"] else None
    c.refs = [(int(s), str(p), str(g)) for s, p, g in d["refs"]]
    c.linked = [(int(s), int(o), int(n)) for s, o, n in d["linked"]]
    return c


def _scan_log(data: bytes, end: int, run_id: str) -> list[_Chunk]:
    """Scan the whole log; large logs are split across forked workers (one per CPU).

    Workers are only used when this process has a single thread (fork is then safe); each
    returns its result as JSON on a pipe. A worker that fails is redone in this process.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    parts = min(cpus, 8)
    if end < _PARALLEL_MIN_BYTES or parts < 2 or threading.active_count() > 1:
        return [_scan_chunk(data, 0, end, 0, run_id, ZERO_HEAD)]
    pieces = _split(data, end, parts)
    workers: dict[int, tuple[int, int]] = {}  # piece index -> (pid, read fd)
    results: dict[int, _Chunk] = {}
    try:
        for i, (a, b, s) in enumerate(pieces[1:], start=1):
            try:
                r, w = os.pipe()
            except OSError:
                break
            try:
                pid = os.fork()
            except OSError:
                os.close(r)
                os.close(w)
                break
            if pid == 0:  # child: compute, write, exit without running any cleanup
                code = 1
                try:
                    os.close(r)
                    out = _chunk_to_json(_scan_chunk(data, a, b, s, run_id, None))
                    view = memoryview(out)
                    while view:
                        view = view[os.write(w, view):]
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            workers[i] = (pid, r)
        results[0] = _scan_chunk(data, pieces[0][0], pieces[0][1], 0, run_id, ZERO_HEAD)
    finally:
        raw: dict[int, bytes] = {}
        for i, (pid, r) in workers.items():
            with os.fdopen(r, "rb") as f:
                out = f.read()
            _, status = os.waitpid(pid, 0)
            if status == 0:
                raw[i] = out
    for i in range(1, len(pieces)):
        try:
            results[i] = _chunk_from_json(raw[i])
        except (KeyError, ValueError, TypeError):  # no worker, or it failed: do it here
            a, b, s = pieces[i]
            results[i] = _scan_chunk(data, a, b, s, run_id, None)
    return [results[i] for i in range(len(pieces))]

