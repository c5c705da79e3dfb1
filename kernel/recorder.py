"""Run-folder writer: hash-chained events, content-addressed blobs, manifests, signed seal.

One run, one folder (format: ``docs/runs-format.md``)::

    <runs_dir>/<run_id>/
      run.json            header, canonical JSON
      run.json.sig        kernel signature over run.json
      policy.toml         the exact policy bytes
      log/events.jsonl    one canonical-JSON event per line, each chained to the previous
      objects/sha256/ab/cdef...   content-addressed blobs
      initial/tree.json   initial workspace manifest (bytes made by the caller)
      final/tree.json     final workspace manifest
      SEAL.json           signed list of every other file's digest, event count and chain head

Durability rules, which the rest of the kernel relies on:

- ``append`` returns only after its line is on disk (one ``os.write`` on an ``O_APPEND`` fd, then
  ``fdatasync``). The kernel answers the agent only after that.
- ``put_blob`` / ``write_manifest`` publish a file atomically (fsynced, linked into place, parent
  directory fsynced) before returning, so a blob is durable before any event can name it.
- Any failed write or sync poisons the recorder: every later call raises, nothing more is written
  (after a failed fsync the kernel cannot know what reached the disk).

Secret values given as ``redact`` are replaced by ``[REDACTED]`` in blobs, event and header string
values and the seal summary before anything touches disk.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import secrets as _secrets
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kernel import failpoints
from kernel.canonical import canonical_json, sha256_digest
from kernel.errors import BadInputError, KernelError, RunIntegrityError
from kernel.keys import KernelKey

# ---- format constants (shared with kernel/verify.py; documented in docs/runs-format.md) ----

RUN_FORMAT = "agent-kernel/run/v1"
SEAL_FORMAT = "agent-kernel/seal/v1"
EVENT_VERSION = 1
RUN_SIG_DOMAIN = b"agent-kernel/run/v1\n"
SEAL_SIG_DOMAIN = b"agent-kernel/seal/v1\n"
ZERO_HEAD = "0" * 64
REDACTED = "[REDACTED]"
MIN_SECRET_LEN = 4
MAX_LINE = 16 * 1024 * 1024

RUN_JSON = "run.json"
RUN_SIG = "run.json.sig"
POLICY_FILE = "policy.toml"
LOG_DIR = "log"
LOG_FILE = "log/events.jsonl"
OBJECTS_DIR = "objects/sha256"
SEAL_FILE = "SEAL.json"
MANIFESTS = {"initial": "initial/tree.json", "final": "final/tree.json"}

RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
ANY_DIGEST_RE = re.compile(r"([A-Za-z0-9_-]+):[0-9A-Fa-f]+")
RESERVED_HEADER = frozenset({"format", "run_id", "created", "hash_alg", "kernel_keyid",
                             "kernel_pubkey", "policy_digest"})


class RecorderError(KernelError):
    """The recorder was used after seal/close, or a write to the run folder failed."""


_last_second: tuple[int, str] = (-1, "")
"""The whole second :func:`utc_timestamp` formatted last, and its text (most calls share it)."""


def utc_timestamp(ns: int | None = None) -> str:
    """RFC 3339 UTC with microseconds: ``2026-01-02T03:04:05.123456Z``."""
    global _last_second
    ns = time.time_ns() if ns is None else ns
    sec = ns // 1_000_000_000
    cached = _last_second  # one read: another thread may replace it, never half of it
    if cached[0] != sec:
        t = _dt.datetime.fromtimestamp(sec, tz=_dt.UTC)
        cached = (sec, t.strftime("%Y-%m-%dT%H:%M:%S."))
        _last_second = cached
    return f"{cached[1]}{(ns // 1000) % 1_000_000:06d}Z"


def parse_timestamp_ns(ts: str) -> int:
    """The nanoseconds since the epoch of a :func:`utc_timestamp` (microsecond precision)."""
    t = _dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=_dt.UTC)
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


def is_blob_key(key: str) -> bool:
    """A body key whose value is one blob reference (a digest string, or null)."""
    return key.endswith("_blob")


def is_blob_list_key(key: str) -> bool:
    """A body key whose value is a list of blob references."""
    return key == "blobs" or key.endswith("_blobs")


def check_digest(value: Any, where: str) -> str:
    """A blob reference must be ``sha256:<64 lowercase hex>``; any other algorithm is refused."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: blob reference must be a digest string, got {value!r}")
    if DIGEST_RE.fullmatch(value):
        return value
    m = ANY_DIGEST_RE.fullmatch(value)
    if m and m.group(1) != "sha256":
        raise ValueError(f"{where}: digest algorithm {m.group(1)!r} is not accepted "
                         f"(only sha256): {value!r}")
    raise ValueError(f"{where}: not a sha256:<64 lowercase hex> digest: {value!r}")


def iter_blob_refs(obj: Any, where: str = "body") -> Iterator[tuple[str, str]]:
    """Yield ``(json path, digest)`` for every blob reference in an event body.

    Convention: at any depth, a key ending in ``_blob`` holds one digest (or null); a key named
    ``blobs`` or ending in ``_blobs`` holds a list of digests. Raises ValueError if such a key
    holds anything else.
    """
    if isinstance(obj, dict):
        for k, v in obj.items():
            here = f"{where}.{k}"
            if is_blob_key(k):
                if v is not None:
                    yield here, check_digest(v, here)
            elif is_blob_list_key(k):
                if not isinstance(v, list):
                    raise ValueError(f"{here}: must be a list of blob digests")
                for i, d in enumerate(v):
                    yield f"{here}[{i}]", check_digest(d, f"{here}[{i}]")
            else:
                yield from iter_blob_refs(v, here)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from iter_blob_refs(v, f"{where}[{i}]")


def _collect_refs(obj: Any, out: list[str]) -> bool:
    """The digests :func:`iter_blob_refs` yields, appended to ``out``, without building a JSON
    path per node (every event goes through this). False if some blob key holds anything but
    valid digests: the caller then runs :func:`iter_blob_refs` for the precise error."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if type(k) is not str or "blob" in k:  # every blob key contains "blob"
                if is_blob_key(k):
                    if v is not None:
                        if not (isinstance(v, str) and DIGEST_RE.fullmatch(v)):
                            return False
                        out.append(v)
                    continue
                if is_blob_list_key(k):
                    if not isinstance(v, list):
                        return False
                    for d in v:
                        if not (isinstance(d, str) and DIGEST_RE.fullmatch(d)):
                            return False
                        out.append(d)
                    continue
            if isinstance(v, (dict, list)) and not _collect_refs(v, out):
                return False
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, (dict, list)) and not _collect_refs(v, out):
                return False
    return True


def blob_refs(body: Any) -> list[str]:
    """Every blob digest an event body references (ValueError, naming where, if one is bad)."""
    out: list[str] = []
    if _collect_refs(body, out):
        return out
    return [d for _, d in iter_blob_refs(body)]


def iter_digests(obj: Any) -> Iterator[str]:
    """Every ``sha256:<hex>`` string anywhere in a JSON value (used on manifests)."""
    if isinstance(obj, str):
        if DIGEST_RE.fullmatch(obj):
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_digests(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from iter_digests(v)


def blob_relpath(digest: str) -> str:
    h = digest.removeprefix("sha256:")
    return f"{OBJECTS_DIR}/{h[:2]}/{h[2:]}"


def parse_canonical(data: bytes, where: str) -> Any:
    """Parse JSON that must be exactly in canonical form (no floats, no NaN, no duplicates)."""
    def no_float(s: str) -> Any:
        raise ValueError(f"{where}: floats are not allowed ({s})")

    def no_const(s: str) -> Any:
        raise ValueError(f"{where}: {s} is not allowed")

    try:
        obj = json.loads(data.decode("utf-8"), parse_float=no_float, parse_constant=no_const)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg} at byte {e.pos})") from None
    try:
        again = canonical_json(obj)
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        raise ValueError(f"{where}: cannot be canonicalized: {e}") from None
    if again != data:
        raise ValueError(f"{where}: not in canonical form (re-serialization differs)")
    return obj


class Redactor:
    def __init__(self, values: Sequence[str]) -> None:
        uniq = {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LEN}
        self.values = sorted(uniq, key=lambda v: (-len(v), v))
        self.raw = [v.encode("utf-8", "surrogatepass") for v in self.values]

    def text(self, s: str) -> str:
        if DIGEST_RE.fullmatch(s):
            return s  # a digest reveals nothing and must stay intact
        for v in self.values:
            if v in s:
                s = s.replace(v, REDACTED)
        return s

    def data(self, b: bytes) -> bytes:
        for v in self.raw:
            if v in b:
                b = b.replace(v, REDACTED.encode())
        return b

    def obj(self, o: Any) -> Any:
        if not self.values:
            return o
        if isinstance(o, str):
            return self.text(o)
        if isinstance(o, dict):
            return {k: self.obj(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [self.obj(v) for v in o]
        return o


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def publish(dirpath: Path, name: str, data: bytes, mode: int = 0o644) -> bool:
    """Durably create ``dirpath/name`` with ``data`` unless it exists; True if created here.

    ``O_TMPFILE`` + fsync + ``linkat`` (no half-written name is ever visible, nothing is left
    behind by a crash), falling back to a hidden temporary name + ``link`` where ``O_TMPFILE`` is
    unsupported; then the directory is fsynced.
    """
    return publish_many(dirpath, [(name, data)], mode)[0]


def publish_many(dirpath: Path, files: Sequence[tuple[str, bytes]], mode: int = 0o644
                 ) -> list[bool]:
    """:func:`publish` for several files of one directory: each file is written and fsynced
    before its name appears (exactly as there), and one directory fsync, after the last link,
    makes all the names durable (instead of one directory fsync per file)."""
    dfd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    staged: list[tuple[int, str | None]] = []
    created: list[bool] = []
    try:
        for _, data in files:
            try:
                fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode, dir_fd=dfd)
                tmpname = None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                tmpname = f".tmp-{_secrets.token_hex(8)}"
                fd = os.open(tmpname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                             | os.O_NOFOLLOW, mode, dir_fd=dfd)
            staged.append((fd, tmpname))
            os.fchmod(fd, mode)
            _write_all(fd, data)
        for fd, _ in staged:
            os.fsync(fd)
        for (name, _), (fd, tmpname) in zip(files, staged, strict=True):
            try:
                if tmpname is None:
                    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd, follow_symlinks=True)
                else:
                    os.link(tmpname, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                created.append(True)
            except FileExistsError:
                created.append(False)
        os.fsync(dfd)
        return created
    finally:
        for fd, tmpname in staged:
            os.close(fd)
            if tmpname is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmpname, dir_fd=dfd)
        os.close(dfd)


def _mkdir_durable(path: Path, mode: int = 0o755) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise RecorderError(f"{path} exists and is not a directory") from None
        return
    fsync_dir(path.parent)


class RunRecorder:
    """Writes one run folder. Not reusable: create, append/put, seal (or close)."""

    run_id: str
    run_dir: Path

    def __init__(self, run_dir: Path, run_id: str, key: KernelKey, redactor: Redactor,
                 policy_digest: str, log_fd: int) -> None:
        self.run_dir = run_dir
        self.run_id = run_id
        self._key = key
        self._redactor = redactor
        self._policy_digest = policy_digest
        self._fd: int | None = log_fd
        self._lock = threading.RLock()
        self._seq = 0
        self._head = ZERO_HEAD
        self._last_ns = 0
        self._last_type: str | None = None
        self._blobs: set[str] = set()
        self._referenced: set[str] = set()
        self._manifests: dict[str, str] = {}
        self._manifest_refs: set[str] = set()
        self._state = "open"  # open | sealed | closed | failed
        self._failure: str | None = None
        self._unsynced = 0  # lines appended with sync=False and not fdatasync'd since
        self._shards: dict[str, Path] = {}  # blob shard dirs known to exist durably

    # ---- creation ----

    @classmethod
    def create(cls, runs_dir: Path, *, run_id: str, header: dict[str, Any], policy_raw: bytes,
               key: KernelKey, redact: Sequence[str] = ()) -> RunRecorder:
        """Create ``runs_dir/run_id/`` (which must not exist) with header, signature and policy."""
        if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
            raise BadInputError(f"run id {run_id!r} is not a valid folder name",
                                hint="use letters, digits, '.', '_' and '-' (max 128)")
        clash = RESERVED_HEADER & header.keys()
        if clash:
            raise ValueError(f"header fields {sorted(clash)} are set by the recorder")
        redactor = Redactor(redact)
        policy_digest = sha256_digest(policy_raw)
        run_json = dict(redactor.obj(header))
        run_json.update({
            "format": RUN_FORMAT,
            "run_id": run_id,
            "created": utc_timestamp(),
            "hash_alg": "sha256",
            "kernel_keyid": key.keyid,
            "kernel_pubkey": key.public_bytes.hex(),
            "policy_digest": policy_digest,
        })
        run_bytes = canonical_json(run_json)  # raises TypeError on floats before any I/O
        sig_bytes = canonical_json({"keyid": key.keyid,
                                    "sig": key.sign(RUN_SIG_DOMAIN + run_bytes).hex()})

        runs_dir = Path(runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        run_dir = runs_dir / run_id
        try:
            os.mkdir(run_dir, 0o755)
        except FileExistsError:
            raise BadInputError(f"run folder {run_dir} already exists") from None
        fsync_dir(runs_dir)
        # The header files come first (a crash now leaves a folder without run.json only for
        # as long as before). Every file is fsynced before its name appears and every new name
        # is made durable by an fsync of its directory before this returns; the directory
        # fsyncs are shared: one for the three header files, one for objects/ and log/.
        publish_many(run_dir, [(POLICY_FILE, policy_raw), (RUN_JSON, run_bytes),
                               (RUN_SIG, sig_bytes)])
        os.mkdir(run_dir / "objects", 0o755)
        os.mkdir(run_dir / OBJECTS_DIR, 0o755)
        os.mkdir(run_dir / LOG_DIR, 0o755)
        fd = os.open(run_dir / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                     | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            os.fsync(fd)
            fsync_dir(run_dir / LOG_DIR)
            fsync_dir(run_dir / "objects")
            fsync_dir(run_dir)
        except BaseException:
            os.close(fd)
            raise
        return cls(run_dir, run_id, key, redactor, policy_digest, fd)

    @classmethod
    def resume(cls, run_dir: Path, *, key: KernelKey, redact: Sequence[str] = ()) -> RunRecorder:
        """Reopen an unsealed run (the kernel died) so it can be ended and sealed.

        The folder must verify as ``incomplete`` under ``key``. A torn last line (never
        acknowledged: ``append`` had not returned) is kept as evidence in a blob, cut from the
        log, and recorded as a ``log.torn_tail`` event ``{torn_tail_blob, offset, length}``.
        The caller then appends ``run.end`` (unless the log already ends with it) and seals.
        """
        from kernel.verify import verify_run  # the verifier imports this module

        run_dir = Path(run_dir)
        report = verify_run(run_dir, [key.public], children=False)
        if report.status != "incomplete":
            why = "already sealed" if report.status == "intact" else report.problem
            raise RunIntegrityError(f"cannot resume {run_dir}: {why}")
        hdr = json.loads((run_dir / RUN_JSON).read_bytes())
        log_path = run_dir / LOG_FILE
        data = log_path.read_bytes()
        end = data.rfind(b"\n") + 1
        lines = data[:end].split(b"\n")[:-1]
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
        rec = cls(run_dir, hdr["run_id"], key, Redactor(redact), hdr["policy_digest"], fd)
        rec._seq = len(lines)
        if lines:
            rec._head = hashlib.sha256(lines[-1]).hexdigest()
            last = json.loads(lines[-1])
            rec._last_type = last["type"]
            rec._last_ns = parse_timestamp_ns(last["ts"])
        for line in lines:
            rec._referenced.update(d for _, d in iter_blob_refs(json.loads(line)["body"]))
        objects = run_dir / OBJECTS_DIR
        for shard in sorted(objects.iterdir()) if objects.is_dir() else []:
            for blob in sorted(shard.iterdir()):
                if not blob.name.startswith("."):
                    rec._blobs.add(f"sha256:{shard.name}{blob.name}")
        for which, rel in MANIFESTS.items():
            if (run_dir / rel).is_file():
                mdata = (run_dir / rel).read_bytes()
                rec._manifests[which] = sha256_digest(mdata)
                rec._manifest_refs.update(iter_digests(json.loads(mdata)))
        if end != len(data):
            torn = data[end:]
            digest = rec.put_blob(torn)
            try:
                os.truncate(log_path, end)
                os.fsync(fd)
            except OSError as e:
                raise rec._fail("cutting the torn tail", e) from e
            rec.append("log.torn_tail", {"torn_tail_blob": digest, "offset": end,
                                         "length": len(torn)})
        return rec

    # ---- state ----

    def _check_open(self) -> None:
        if self._state != "open":
            why = f": {self._failure}" if self._failure else ""
            raise RecorderError(f"run {self.run_id}: recorder is {self._state}{why}")

    def _fail(self, what: str, e: BaseException) -> RecorderError:
        self._state = "failed"
        self._failure = f"{what} failed: {e}"
        return RecorderError(f"run {self.run_id}: {self._failure}; nothing more will be recorded")

    def head(self) -> str:
        """Hex sha256 of the last log line (64 zeros before the first event)."""
        return self._head

    def events(self) -> int:
        return self._seq

    def last_type(self) -> str | None:
        """Type of the last event appended (None before the first)."""
        return self._last_type

    # ---- blobs ----

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` (redacted first) as a content-addressed blob; durable on return."""
        data = self._redactor.data(bytes(data))
        digest = sha256_digest(data)
        with self._lock:
            self._check_open()
            if digest in self._blobs:
                return digest
            h = digest[7:]
            shard = self._shards.get(h[:2])
            try:
                if shard is None:
                    shard = self.run_dir / OBJECTS_DIR / h[:2]
                    _mkdir_durable(shard)
                    self._shards[h[:2]] = shard
                publish(shard, h[2:], data)
            except OSError as e:
                raise self._fail(f"storing blob {digest}", e) from e
            self._blobs.add(digest)
            return digest

    # ---- events ----

    def _known(self, digest: str) -> bool:
        return (digest in self._blobs or digest == self._policy_digest
                or digest in self._manifests.values())

    def append(self, type: str, body: dict[str, Any], *, sync: bool = True) -> int:
        """Append one event; returns its seq once the line is on disk (fdatasync'd).

        With ``sync=False`` the line is written but not fdatasync'd yet: it becomes durable with
        the next synced append or :meth:`sync` (one fdatasync covers every earlier line of the
        log). Only for a record nothing depends on before that: no answer to the agent and no
        effect may come in between (the kernel uses it for a request, whose decision follows).
        """
        if not isinstance(type, str) or not type:
            raise ValueError("event type must be a non-empty string")
        if not isinstance(body, dict):
            raise ValueError("event body must be a dict")
        body = self._redactor.obj(body)
        refs = blob_refs(body)
        with self._lock:
            self._check_open()
            for d in refs:
                if not self._known(d):
                    raise ValueError(f"{type}: references {d}, which is not a blob of this run "
                                     "(put_blob it first)")
            seq = self._seq
            if type == "run.start" and seq != 0:
                raise ValueError("run.start must be the first event")
            if self._last_type == "run.end":
                raise ValueError("no event may follow run.end")
            ns = max(time.time_ns(), self._last_ns)
            record = {"v": EVENT_VERSION, "seq": seq, "run_id": self.run_id,
                      "ts": utc_timestamp(ns), "type": type, "prev": self._head, "body": body}
            line = canonical_json(record)
            if len(line) > MAX_LINE:
                raise ValueError(f"{type}: event is {len(line)} bytes; store large data with "
                                 "put_blob and reference it with a *_blob key")
            assert self._fd is not None
            try:
                failpoints.hit("log.before_write")
                n = os.write(self._fd, line + b"\n")
                if n != len(line) + 1:
                    raise OSError(errno.EIO, f"short write ({n} of {len(line) + 1} bytes)")
                failpoints.hit("log.after_write")
                if sync:
                    os.fdatasync(self._fd)
                    self._unsynced = 0
                    failpoints.hit("log.after_sync")
                else:
                    self._unsynced += 1
            except OSError as e:
                raise self._fail(f"appending seq {seq}", e) from e
            self._head = hashlib.sha256(line).hexdigest()
            self._seq = seq + 1
            self._last_ns = ns
            self._last_type = type
            self._referenced.update(refs)
            return seq

    def sync(self) -> None:
        """Make every line appended so far durable (nothing to do when all already are)."""
        with self._lock:
            if not self._unsynced:
                return
            self._check_open()
            assert self._fd is not None
            try:
                os.fdatasync(self._fd)
                failpoints.hit("log.after_sync")
            except OSError as e:
                raise self._fail("syncing the log", e) from e
            self._unsynced = 0

    def unsynced(self) -> int:
        """Lines appended with ``sync=False`` that are not durable yet."""
        return self._unsynced

    # ---- manifests ----

    def write_manifest(self, which: str, data: bytes) -> str:
        """Store a workspace manifest (canonical JSON bytes) as ``<which>/tree.json``."""
        if which not in MANIFESTS:
            raise ValueError(f"manifest must be 'initial' or 'final', not {which!r}")
        obj = parse_canonical(bytes(data), f"{which} manifest")
        with self._lock:
            self._check_open()
            if which in self._manifests:
                raise ValueError(f"the {which} manifest was already written")
            d = self.run_dir / which
            try:
                _mkdir_durable(d)
                if not publish(d, "tree.json", bytes(data)):
                    raise ValueError(f"{d}/tree.json already exists")
            except OSError as e:
                raise self._fail(f"writing the {which} manifest", e) from e
            digest = sha256_digest(bytes(data))
            self._manifests[which] = digest
            self._manifest_refs.update(iter_digests(obj))
            return digest

    # ---- seal ----

    def _inventory(self) -> tuple[dict[str, str], list[str]]:
        files: dict[str, str] = {}
        dirs: list[str] = []
        for root, dnames, fnames in os.walk(self.run_dir):
            rel = os.path.relpath(root, self.run_dir)
            for dn in dnames:
                dirs.append(dn if rel == "." else f"{rel}/{dn}")
            for fn in fnames:
                r = fn if rel == "." else f"{rel}/{fn}"
                if r == SEAL_FILE:
                    continue
                with open(os.path.join(root, fn), "rb") as f:
                    files[r] = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        return dict(sorted(files.items())), sorted(dirs)

    def seal(self, status: str, summary: dict[str, Any]) -> str:
        """Sign the whole folder into SEAL.json, then make it read-only. Returns the seal digest.

        The caller appends its own ``run.end`` event first (this raises otherwise, before writing
        anything). Blobs that no event references and no manifest lists are named in the seal's
        ``unreferenced`` list (verify reports them as warnings).
        """
        if not isinstance(status, str) or not status:
            raise ValueError("seal status must be a non-empty string")
        summary = self._redactor.obj(summary)
        with self._lock:
            self._check_open()
            if self._last_type != "run.end":
                raise ValueError("seal: the last event must be run.end (append it first)")
            # Blobs stored but never referenced (e.g. staged for a request that then failed)
            # are declared in the seal, so the verifier can tell them from smuggled ones.
            orphans = sorted(self._blobs - self._referenced - self._manifest_refs)
            assert self._fd is not None
            try:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
                files, dirs = self._inventory()
                body = {"format": SEAL_FORMAT, "run_id": self.run_id, "status": status,
                        "summary": summary, "files": files, "dirs": dirs, "events": self._seq,
                        "head": self._head, "keyid": self._key.keyid,
                        "sealed": utc_timestamp(), "unreferenced": orphans}
                body_bytes = canonical_json(body)
                sig = self._key.sign(SEAL_SIG_DOMAIN + body_bytes).hex()
                seal_bytes = canonical_json({"body": body, "sig": sig})
                failpoints.hit("seal.before_publish")
                if not publish(self.run_dir, SEAL_FILE, seal_bytes):
                    raise OSError(errno.EEXIST, "SEAL.json already exists")
                failpoints.hit("seal.published")
                self._make_read_only()
            except (OSError, TypeError) as e:
                raise self._fail("sealing", e) from e
            self._state = "sealed"
            return sha256_digest(seal_bytes)

    def _make_read_only(self) -> None:
        # Every mode change first, then every fsync: each file and directory is still fsynced
        # after its own change, but the changes reach the journal together, so the first fsync
        # commits them all and the others find nothing left to write (one journal commit where
        # there was one per file).
        walked = list(os.walk(self.run_dir, topdown=False))
        for root, dnames, fnames in walked:
            for fn in fnames:
                fd = os.open(os.path.join(root, fn), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fchmod(fd, 0o444)
                finally:
                    os.close(fd)
            for dn in dnames:
                os.chmod(os.path.join(root, dn), 0o555, follow_symlinks=False)  # noqa: S103
        os.chmod(self.run_dir, 0o555)  # noqa: S103 - read-only
        for root, _, fnames in walked:
            for fn in fnames:
                fd = os.open(os.path.join(root, fn), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(root)
        fsync_dir(self.run_dir.parent)

    # ---- closing ----

    def close(self) -> None:
        """Close the log without sealing (the folder stays 'incomplete' until sealed)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._state == "open":
                self._state = "closed"

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
