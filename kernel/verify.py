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
   file and directory lists equal to exactly what is present, digests included.

Folder content never makes this raise: any problem, even an unexpected exception, becomes
status ``corrupt`` with the reason. Format: ``docs/runs-format.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "problem": self.problem, "run_id": self.run_id,
                "events": self.events, "keyid": self.keyid, "warnings": list(self.warnings),
                "seal_status": self.seal_status}


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
        run_id = self.run_id
        prev = ZERO_HEAD
        refs: list[tuple[int, str, str]] = []
        last_ts = ""
        sha = hashlib.sha256
        offset = 0
        seq = 0
        last_type: str | None = None
        lines = data[:end].split(b"\n")
        lines.pop()
        for seq, line in enumerate(lines):
            where = f"{LOG_FILE} seq {seq} (line {seq + 1}, byte offset {offset})"
            try:
                text = line.decode("utf-8")
                ev = _loads(text)
                if _dumps(ev) != text:
                    raise ValueError("not in canonical form (re-serialization differs)")
            except (ValueError, RecursionError) as e:
                raise _Corrupt(f"{where}: {e}") from None
            if type(ev) is not dict or ev.keys() != _EVENT_KEYS:
                raise _Corrupt(f"{where}: not an event object with fields "
                               f"{sorted(_EVENT_KEYS)}")
            if ev["v"] != EVENT_VERSION or type(ev["v"]) is not int:
                raise _Corrupt(f"{where}: unknown event version {ev['v']!r}")
            if type(ev["seq"]) is not int or ev["seq"] != seq:
                raise _Corrupt(f"{where}: seq is {ev['seq']!r}, expected {seq}")
            if ev["run_id"] != run_id:
                raise _Corrupt(f"{where}: run_id {ev['run_id']!r} is not this run's "
                               f"({run_id!r})")
            if ev["prev"] != prev:
                raise _Corrupt(f"{where}: prev does not match the hash of the previous line "
                               "(chain broken)")
            ts = ev["ts"]
            if type(ts) is not str or not _TS.fullmatch(ts):
                raise _Corrupt(f"{where}: ts {ts!r} is not RFC 3339 UTC with microseconds")
            if ts < last_ts:
                self.warnings.append(f"{where}: ts goes backwards ({ts} < {last_ts})")
            last_ts = ts
            etype = ev["type"]
            if type(etype) is not str or not etype:
                raise _Corrupt(f"{where}: type must be a non-empty string")
            if etype == "run.start" and seq != 0:
                raise _Corrupt(f"{where}: run.start after the first event")
            if last_type == "run.end":
                raise _Corrupt(f"{where}: event after run.end")
            if type(ev["body"]) is not dict:
                raise _Corrupt(f"{where}: body must be an object")
            if b"_blob" in line or b'"blobs"' in line:
                try:
                    for path, d in iter_blob_refs(ev["body"]):
                        refs.append((seq, path, d))
                except ValueError as e:
                    raise _Corrupt(f"{where}: {e}") from None
            last_type = etype
            prev = sha(line).hexdigest()
            offset += len(line) + 1
        self.events = len(lines)
        self.head = prev
        self.last_type = last_type
        self.refs = refs

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
        for d in sorted(blobs - referenced - manifest_refs):
            msg = f"{blob_relpath(d)}: blob not referenced by any event or manifest"
            if sealed:
                raise _Corrupt(msg)
            self.warnings.append(msg + " (staged before a crash?)")

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
        self.seal_status: str | None = body["status"]

    def modes(self) -> None:
        for rel in [*self.dirs, *self.files]:
            mode = os.lstat(self.root / rel).st_mode & 0o7777
            want = 0o555 if rel in self.dirs else 0o444
            if mode != want:
                self.warnings.append(f"{rel}: mode {mode:o}, sealed runs are {want:o}")
                return

    def run(self) -> VerifyReport:
        self.structure()
        sealed = SEAL_FILE in self.files
        self.header()
        self.log(sealed)
        self.objects(sealed)
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

    def report(self, status: str, problem: str | None) -> VerifyReport:
        return VerifyReport(status=status, problem=problem, run_id=self.run_id,
                            events=self.events, keyid=self.keyid, warnings=self.warnings)


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


def verify_run(run_dir: Path, trusted: Sequence[Ed25519PublicKey]) -> VerifyReport:
    """Verify one run folder against the auditor's trusted kernel public keys.

    Raises NotFoundError only if ``run_dir`` does not exist or is not a directory; everything
    about the folder's content is reported in the returned :class:`VerifyReport`.
    """
    run_dir = Path(run_dir)
    try:
        st = os.lstat(run_dir)
    except FileNotFoundError:
        raise NotFoundError(f"run folder {run_dir} does not exist") from None
    except OSError as e:
        raise NotFoundError(f"run folder {run_dir} cannot be read: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotFoundError(f"{run_dir} is not a directory (a run folder is a directory)")
    v = _Verifier(run_dir, trusted)
    try:
        return v.run()
    except _Corrupt as e:
        return v.report(CORRUPT, str(e))
    except Exception as e:  # folder content must never crash the verifier
        return v.report(CORRUPT, f"unexpected error while verifying: {type(e).__name__}: {e}")
