"""The ``write`` syscall: create, overwrite, append, delete, mkdir, rename, chmod in the workspace.

Why this is safe
----------------
* Strict input. ``prepare`` accepts exactly the fields of ``abi.CALL_FIELDS["write"]`` with
  exact types (``bool`` is not an ``int``), strict base64, and only the fields each op uses.
  Anything else is a recorded ``request.invalid`` denial, never an exception.
* One normalizer. Paths go through :func:`kernel.paths.normalize` (control bytes, length,
  absolute paths outside the view root and ``..`` escapes are refused) and then through
  :meth:`Workspace.facts`, which resolves the parent with ``openat2`` and
  ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`` and lstats
  the final name. Symlinked components, special files, hard-linked files, mount points and the
  kernel's own hidden paths become violations that the pure ``check_write`` turns into denials.
* Perform needs proof. :func:`perform` takes a :class:`kernel.decide.Grant`, which only the
  decision code can make.
* Nothing is trusted from check time. ``perform`` resolves every parent again with the same
  ``openat2`` flags and acts on the final name only through ``*at`` calls on that directory fd,
  which never follow a final symlink (``renameat``, ``unlinkat``, ``mkdirat``, ``O_NOFOLLOW``
  opens). A directory swapped for a symlink after the check makes the call fail with ``ELOOP``;
  a final name swapped for a symlink is replaced, never written through. ``chmod`` acts on an
  ``O_PATH|O_NOFOLLOW`` descriptor re-checked with ``fstat`` (regular with one link, or a
  directory), so it cannot reach a file outside through a symlink or a hard link.
* Atomic and durable. Content goes to a fresh ``O_EXCL`` temp file in the target's directory,
  is ``fsync``'ed, renamed over the target (``RENAME_NOREPLACE`` for ``create``), and the
  directory is ``fsync``'ed: after a crash a file is entirely old or entirely new. ``append``
  never writes into the old inode: it builds the new content in a temp file too.
* Log-durable writes. For a ``write`` whose content is held by its own request line (see
  ``docs/runs-format.md``, "Write-ahead"), the decision line's ``fdatasync`` is what makes the
  change durable: ``perform(..., durable=False)`` still replaces the file atomically (a
  ``RENAME_EXCHANGE`` of a fresh temp file with the old one, then the old one is unlinked) but
  syncs nothing; the kernel syncs the workspace's file system at checkpoints and
  ``kernel recover`` re-applies every such write after the last checkpoint with
  :func:`apply_logged` (fsync'ed, as above).
* Never blocks. Existing content is read only after ``fstat`` shows a regular file, through a
  descriptor opened ``O_NONBLOCK``, so a FIFO cannot hang the kernel.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import dataclasses
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kernel import failpoints
from kernel.decide import Decision, Grant, PathFacts, WriteRequest, deny
from kernel.manifest import Change
from kernel.paths import (
    PathViolation,
    Workspace,
    check_regular,
    normalize,
    open_dir_beneath,
    read_regular,
)
from kernel.policy import Policy
from syscalls.abi import WRITE_OPS, fields_problem

CONTENT_OPS = ("write", "create", "append")
MODE_OPS = ("write", "create", "append", "mkdir", "chmod")
NO_SYMLINK_OPS = ("write", "create", "append", "chmod")
"""Ops refused when the final component is a symlink (``delete`` and ``rename`` act on the link
itself and are allowed)."""
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
TMP_PREFIX = ".kernel-tmp-"
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_uint)
_renameat2.restype = ctypes.c_int


def renameat2(olddir: int, old: str, newdir: int, new: str, flags: int = 0) -> None:
    if _renameat2(olddir, os.fsencode(old), newdir, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def sync_filesystem(ws: Workspace) -> None:
    """``syncfs(2)`` of the workspace's file system: every change made to it so far, log-durable
    writes included, reaches the disk (errors are reported since Linux 5.8)."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=ws.fd)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


def _invalid(reason: str) -> Decision:
    return deny("request.invalid", reason, errno.EINVAL)


# ---------------------------------------------------------------------------------------------
# prepare: validate, normalize, gather facts (no effect on the workspace)


def _validate(args: Any) -> dict[str, Any] | Decision:
    if not isinstance(args, dict):
        return _invalid(f"write args must be an object, not {type(args).__name__}")
    problem = fields_problem("write", args)
    if problem is not None:
        return _invalid(problem)
    op = args["op"]
    if not isinstance(op, str):
        return _invalid(f"field 'op' must be a string, not {type(op).__name__}")
    if op not in WRITE_OPS:
        return _invalid(f"op {op!r} is not one of {', '.join(WRITE_OPS)}")
    for k in ("path", "dest", "content_b64", "justification"):
        if k in args and not isinstance(args[k], str):
            return _invalid(f"field {k!r} must be a string, not {type(args[k]).__name__}")
    if "mode" in args and (isinstance(args["mode"], bool) or not isinstance(args["mode"], int)):
        return _invalid(f"field 'mode' must be an integer, not {type(args['mode']).__name__}")
    if "parents" in args and not isinstance(args["parents"], bool):
        return _invalid(f"field 'parents' must be true or false, not "
                        f"{type(args['parents']).__name__}")
    if op in CONTENT_OPS and "content_b64" not in args:
        return _invalid(f"op {op!r} needs 'content_b64'")
    if op not in CONTENT_OPS and "content_b64" in args:
        return _invalid(f"'content_b64' is only for {', '.join(CONTENT_OPS)}, not {op!r}")
    if op == "rename" and "dest" not in args:
        return _invalid("op 'rename' needs 'dest'")
    if op != "rename" and "dest" in args:
        return _invalid(f"'dest' is only for rename, not {op!r}")
    if op != "mkdir" and "parents" in args:
        return _invalid(f"'parents' is only for mkdir, not {op!r}")
    if op == "chmod" and "mode" not in args:
        return _invalid("op 'chmod' needs 'mode'")
    if op not in MODE_OPS and "mode" in args:
        return _invalid(f"'mode' is only for {', '.join(MODE_OPS)}, not {op!r}")
    return args


def _decode(b64: str) -> bytes | Decision:
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        return _invalid(f"'content_b64' is not valid base64: {e}")


def _path_facts(raw: str, ws: Workspace, policy: Policy, op: str) -> PathFacts | Decision:
    rel = normalize(raw, view_root=ws.view_root, limits=policy.write)
    if isinstance(rel, tuple):
        rule, reason, code = rel
        return deny(rule, reason, code)
    facts = ws.facts(rel)
    if facts.violation is None and op == "rename" and any(
            h.startswith(rel + "/") for h in ws.hidden) and rel:
        facts = dataclasses.replace(facts, violation=(
            "path.hidden", f"{rel}: holds a path reserved for the kernel", errno.EACCES))
    if facts.violation is None and facts.kind == "symlink" and op in NO_SYMLINK_OPS:
        facts = dataclasses.replace(facts, violation=(
            "path.symlink", f"{rel}: is a symlink; the kernel never writes through one",
            errno.ELOOP))
    return facts


def _request(op: str, target: PathFacts, content: bytes, mode: int | None,
             dest: PathFacts | None = None, captured: bool = False) -> WriteRequest:
    payload = len(content) if op in CONTENT_OPS else 0
    new_size = payload
    if op == "append" and target.kind == "file":
        new_size = target.size + payload
    return WriteRequest(op=op, target=target, dest=dest, new_size=new_size,
                        payload_bytes=payload, mode=mode, captured=captured)


def prepare(args: dict[str, Any], ws: Workspace,
            policy: Policy) -> tuple[WriteRequest, bytes] | Decision:
    """Validate a ``write`` request and gather its facts; a Decision means it was refused."""
    valid = _validate(args)
    if isinstance(valid, Decision):
        return valid
    op: str = valid["op"]
    content = b""
    if op in CONTENT_OPS:
        decoded = _decode(valid["content_b64"])
        if isinstance(decoded, Decision):
            return decoded
        content = decoded
    target = _path_facts(valid["path"], ws, policy, op)
    if isinstance(target, Decision):
        return target
    dest: PathFacts | None = None
    if op == "rename":
        d = _path_facts(valid["dest"], ws, policy, op)
        if isinstance(d, Decision):
            return d
        dest = d
    mode: int | None = valid.get("mode")
    req = _request(op, target, content, mode, dest)
    if valid.get("parents"):
        req = dataclasses.replace(req, parents=True)
    return req, content


def prepare_captured(change: Change, copy_root: Path, ws: Workspace,
                     policy: Policy) -> tuple[WriteRequest, bytes] | Decision:
    """Prepare one change captured from an ``exec``'d command's private copy of the workspace.

    The content is read from the copy with the same rules as the workspace: no symlink
    followed, regular files with one link only, never blocking, at most the file-size limit.
    """
    if change.op == "symlink":
        return deny("path.symlink", f"{change.rel}: the command made a symlink; symlinks are "
                    "not copied into the workspace", errno.ELOOP)
    if change.op == "special":
        return deny("path.special", f"{change.rel}: the command made a special file (device, "
                    "fifo or socket); those are not copied into the workspace", errno.EPERM)
    if change.op not in ("write", "delete", "mkdir", "chmod"):
        return _invalid(f"captured change {change.op!r} is not one the kernel applies")
    target = _path_facts(change.rel, ws, policy, change.op)
    if isinstance(target, Decision):
        return target
    content = b""
    if change.op == "write":
        fd = os.open(copy_root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            content = read_regular(fd, target.rel, policy.write.max_file_bytes)
        except PathViolation as e:
            return deny(e.rule, str(e.strerror), e.errno or errno.EIO)
        except OSError as e:
            code = e.errno or errno.EIO
            rule = "path.symlink" if code == errno.ELOOP else "path.unreadable"
            return deny(rule, f"{change.rel}: cannot read the command's copy: "
                        f"{os.strerror(code)}", code)
        finally:
            os.close(fd)
    return _request(change.op, target, content, change.mode, captured=True), content


# ---------------------------------------------------------------------------------------------
# perform: apply a granted request, by fd beneath the root


@contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _lstat(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _read_existing(dirfd: int, name: str, rel: str, expect_size: int) -> bytes:
    """Current content of a regular, singly-linked file (for ``append``), never blocking."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    with _fd(fd):
        st = os.fstat(fd)
        check_regular(rel, st)
        if st.st_size != expect_size:
            raise OSError(errno.EAGAIN, f"{rel}: changed since it was checked "
                          f"({st.st_size} bytes, expected {expect_size}); ask again")
        data = b""
        while len(data) < expect_size + 1:
            b = os.read(fd, expect_size + 1 - len(data))
            if not b:
                break
            data += b
        if len(data) != expect_size:
            raise OSError(errno.EAGAIN, f"{rel}: changed while read; ask again")
        return data


def _write_tmp(dirfd: int, content: bytes, mode: int, owner: tuple[int, int] | None,
               durable: bool = True) -> str:
    """A fully written temp file in ``dirfd`` (fsync'ed when ``durable``); returns its name."""
    for _ in range(16):
        name = TMP_PREFIX + secrets.token_hex(8)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
            # Content, size, mode and owner reach the disk before the rename makes the file
            # visible; the directory is fsync'ed after the rename.
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quiet(dirfd, name)
            raise
        os.close(fd)
        return name
    raise OSError(errno.EEXIST, "cannot create a temp file")  # pragma: no cover


def _unlink_quiet(dirfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except OSError:  # pragma: no cover - best effort clean-up
        pass


def _owner_for_new(dirfd: int) -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    st = os.fstat(dirfd)
    return st.st_uid, st.st_gid


def _put(dirfd: int, name: str, rel: str, content: bytes, mode: int | None,
         op: str, durable: bool = True) -> dict[str, Any]:
    old = _lstat(dirfd, name)
    if old is not None and op == "create":
        raise FileExistsError(errno.EEXIST, "already exists")
    if old is not None:
        # Re-checked now, by the directory fd: whatever sits at the name must still be a
        # regular file with one link (a symlink or special file swapped in is refused).
        if stat.S_ISDIR(old.st_mode):
            raise IsADirectoryError(errno.EISDIR, f"{rel}: is a directory")
        check_regular(rel, old)
        new_mode = stat.S_IMODE(old.st_mode) & 0o777 if mode is None else mode
        owner = (old.st_uid, old.st_gid) if os.geteuid() == 0 else None
    else:
        new_mode = DEFAULT_FILE_MODE if mode is None else mode
        owner = _owner_for_new(dirfd)
    tmp = _write_tmp(dirfd, content, new_mode, owner, durable)
    failpoints.hit("ws.tmp_written")
    try:
        if old is not None and not durable:
            _exchange(dirfd, tmp, name, rel)
        else:
            renameat2(dirfd, tmp, dirfd, name, RENAME_NOREPLACE if op == "create" else 0)
    except BaseException:
        _unlink_quiet(dirfd, tmp)
        raise
    failpoints.hit("ws.renamed")
    if durable:
        os.fsync(dirfd)
    return {"op": op, "path": rel, "digest": "sha256:" + hashlib.sha256(content).hexdigest(),
            "size": len(content)}


def _exchange(dirfd: int, tmp: str, name: str, rel: str) -> None:
    """Swap the new temp file in for the old file ``name`` and unlink the old one.

    Readers see the old or the new file, never a mix, as with a rename over it; unlike a rename
    over an existing file, an exchange does not make ext4 start writing the new data at once
    (its replace-by-rename heuristic), which for a log-durable write is wasted work. Whatever
    was swapped out must still be the regular, singly-linked file checked before; anything else
    (swapped in since) is swapped back and the write fails, touching nothing."""
    renameat2(dirfd, tmp, dirfd, name, RENAME_EXCHANGE)
    st = _lstat(dirfd, tmp)
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        renameat2(dirfd, tmp, dirfd, name, RENAME_EXCHANGE)
        raise OSError(errno.EAGAIN, f"{rel}: changed while it was written; ask again")
    os.unlink(tmp, dir_fd=dirfd)


def _delete(dirfd: int, name: str, rel: str) -> dict[str, Any]:
    st = _lstat(dirfd, name)
    if st is None:
        raise FileNotFoundError(errno.ENOENT, f"{rel}: does not exist")
    if stat.S_ISDIR(st.st_mode):
        os.rmdir(name, dir_fd=dirfd)
    else:
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            raise PathViolation("path.hardlink", errno.EPERM, f"{rel}: has hard links")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise PathViolation("path.special", errno.EPERM, f"{rel}: is a special file")
        os.unlink(name, dir_fd=dirfd)
    os.fsync(dirfd)
    return {"op": "delete", "path": rel}


def _mkdir_one(dirfd: int, name: str, mode: int) -> None:
    os.mkdir(name, 0o700, dir_fd=dirfd)
    sub = openat_dir(dirfd, name)
    with _fd(sub):
        owner = _owner_for_new(dirfd)
        if owner is not None:
            os.fchown(sub, *owner)
        os.fchmod(sub, mode)
        os.fsync(sub)
    os.fsync(dirfd)


def openat_dir(dirfd: int, name: str) -> int:
    """Open the directory ``name`` in ``dirfd`` with the strict resolve flags (no symlink)."""
    return open_dir_beneath(dirfd, name)


def _mkdir(ws: Workspace, rel: str, mode: int | None, parents: bool) -> dict[str, Any]:
    m = DEFAULT_DIR_MODE if mode is None else mode
    if not parents:
        dirfd, name = ws.open_parent(rel)
        with _fd(dirfd):
            _mkdir_one(dirfd, name, m)
        return {"op": "mkdir", "path": rel}
    cur = open_dir_beneath(ws.fd, "")
    try:
        names = rel.split("/")
        for i, name in enumerate(names):
            try:  # like `mkdir -p -m MODE`: the mode is for the last directory only
                _mkdir_one(cur, name, m if i == len(names) - 1 else DEFAULT_DIR_MODE)
            except FileExistsError:
                pass
            nxt = openat_dir(cur, name)
            os.close(cur)
            cur = nxt
    finally:
        os.close(cur)
    return {"op": "mkdir", "path": rel}


def _rename(ws: Workspace, rel: str, dest: str) -> dict[str, Any]:
    if dest == rel or dest.startswith(rel + "/"):
        if dest == rel:
            return {"op": "rename", "path": rel, "dest": dest}
        raise OSError(errno.EINVAL, f"cannot move {rel} into itself ({dest})")
    sfd, sname = ws.open_parent(rel)
    with _fd(sfd):
        dfd, dname = ws.open_parent(dest)
        with _fd(dfd):
            st = _lstat(sfd, sname)
            if st is None:
                raise FileNotFoundError(errno.ENOENT, f"{rel}: does not exist")
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                raise PathViolation("path.hardlink", errno.EPERM, f"{rel}: has hard links")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
                    or stat.S_ISDIR(st.st_mode)):
                raise PathViolation("path.special", errno.EPERM, f"{rel}: is a special file")
            renameat2(sfd, sname, dfd, dname, 0)
            os.fsync(dfd)
            if os.fstat(sfd)[:2] != os.fstat(dfd)[:2]:
                os.fsync(sfd)
    return {"op": "rename", "path": rel, "dest": dest}


def _chmod(dirfd: int, name: str, rel: str, mode: int) -> dict[str, Any]:
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    with _fd(fd):
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            check_regular(rel, st)  # refuses symlinks, specials and hard-linked files
        # chmod on the pinned inode: the /proc magic link names this fd, not a path.
        os.chmod(_proc(fd), mode)
    os.fsync(dirfd)
    return {"op": "chmod", "path": rel, "mode": mode}


def perform(g: Grant, ws: Workspace, content: bytes, *, durable: bool = True
            ) -> dict[str, Any]:
    """Apply a granted write request; raises ``OSError`` for failures found while applying.

    ``durable=False`` only for an op ``write`` whose content the log already holds durably
    (the kernel's write-ahead path): the change is atomic but not synced.

    The error's ``strerror`` says what went wrong without repeating the path (the caller
    prefixes it) and never names the kernel's temp files.
    """
    req = g.request
    if not isinstance(req, WriteRequest):
        raise TypeError("perform() needs a Grant for a WriteRequest")
    if not durable and req.op != "write":
        raise ValueError(f"only op 'write' is log-durable, not {req.op!r}")
    try:
        return _perform(req, ws, content, durable)
    except OSError as e:
        code = e.errno or errno.EIO
        msg = str(e.strerror or os.strerror(code))
        for rel in (req.target.rel, req.dest.rel if req.dest else None):
            if rel and msg.startswith(rel + ": "):
                msg = msg[len(rel) + 2:]
        if isinstance(e, PathViolation):
            raise PathViolation(e.rule, code, msg) from None
        raise OSError(code, msg) from None


def _perform(req: WriteRequest, ws: Workspace, content: bytes, durable: bool = True
             ) -> dict[str, Any]:
    rel = req.target.rel
    if rel == "" or (req.dest is not None and req.dest.rel == ""):  # check_write refuses these
        raise OSError(errno.EPERM, "the workspace root itself cannot be changed")
    if req.op == "mkdir":
        return _mkdir(ws, rel, req.mode, parents=req.parents)
    if req.op == "rename":
        if req.dest is None:
            raise OSError(errno.EINVAL, "rename without a destination")
        return _rename(ws, rel, req.dest.rel)
    dirfd, name = ws.open_parent(rel)
    with _fd(dirfd):
        if req.op in ("write", "create"):
            return _put(dirfd, name, rel, content, req.mode, req.op, durable)
        if req.op == "append":
            old = _lstat(dirfd, name)
            prefix = b""
            if old is not None:
                if stat.S_ISDIR(old.st_mode):
                    raise IsADirectoryError(errno.EISDIR, f"{rel}: is a directory")
                if stat.S_ISLNK(old.st_mode):
                    raise PathViolation("path.symlink", errno.ELOOP, f"{rel}: is a symlink")
                expect = req.target.size if req.target.kind == "file" else 0
                prefix = _read_existing(dirfd, name, rel, expect)
            elif req.target.exists:
                raise FileNotFoundError(errno.ENOENT, f"{rel}: vanished since it was checked")
            result = _put(dirfd, name, rel, prefix + content, req.mode, "append")
            return result
        if req.op == "delete":
            return _delete(dirfd, name, rel)
        if req.op == "chmod":
            if req.mode is None:
                raise OSError(errno.EINVAL, "chmod without a mode")
            return _chmod(dirfd, name, rel, req.mode)
    raise OSError(errno.EINVAL, f"unknown write op {req.op!r}")


def changed_after(ws: Workspace, rel: str, ns: int) -> bool:
    """Whether ``rel`` (or, if it does not exist, its directory) was modified after ``ns``."""
    try:
        dirfd, name = ws.open_parent(rel)
    except OSError:
        return False
    with _fd(dirfd):
        old = _lstat(dirfd, name)
        seen = old if old is not None else os.fstat(dirfd)
        return seen.st_mtime_ns > ns


def apply_logged(ws: Workspace, rel: str, content: bytes, mode: int | None) -> str:
    """Re-apply a log-durable ``write`` after a crash (``kernel recover``), durably.

    For a write the log records as decided ``allowed`` with its content, after the last
    workspace checkpoint: the file may hold the new content, the old one, or (after a power
    cut) neither. Returns ``present`` when it already holds exactly ``content`` (it is only
    fsync'ed), else ``applied`` after the same atomic, fsync'ed replacement as ``perform``.
    Raises ``OSError`` like ``perform``."""
    dirfd, name = ws.open_parent(rel)
    with _fd(dirfd):
        old = _lstat(dirfd, name)
        if old is not None and stat.S_ISREG(old.st_mode) and old.st_size == len(content) and (
                mode is None or stat.S_IMODE(old.st_mode) == mode):
            try:
                same = _read_existing(dirfd, name, rel, len(content)) == content
            except OSError:
                same = False
            if same:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=dirfd)
                with _fd(fd):
                    os.fsync(fd)  # present, perhaps only in the page cache until now
                os.fsync(dirfd)
                return "present"
        _put(dirfd, name, rel, content, mode, "write")
        return "applied"


__all__ = ["apply_logged", "changed_after", "perform", "prepare", "prepare_captured",
           "sync_filesystem"]
