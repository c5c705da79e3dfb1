"""The ``firejail`` isolation backend: Debian's ``firejail`` with a profile generated per sandbox.

Firejail does the namespace and mount work of the agent's view (whitelist/blacklist, a private
``/dev``, a whitelisted ``/etc``, net/ipc/uts/pid/user namespaces), drops capabilities, sets
``no_new_privs``, installs its seccomp filters and applies the rlimits. Its defaults are not
enough for SPEC §4, and some guarantees it cannot give at all, so the launch is a short chain,
each link a small, documented layer:

``kernel`` → **launcher child** (this module's pre-exec step, as root) → ``unshare --pid
--mount-proc --fork --kill-child`` → pid 1 of a new pid namespace: ``timeout --signal=KILL
WALL`` (or ``unshare --fork --kill-child`` without a wall time) → ``setpriv`` (drop to the
agent uid/gid) → ``firejail --profile=…`` → ``/usr/bin/env -u …`` (removes the variables
firejail adds) → the agent program.

Layers of this project around firejail (all listed in ``enforced["layers"]``):

* **agent identity** — firejail runs the program as the user who invoked it, so it is started
  as the dedicated agent uid/gid (``AGENT_UID``/``AGENT_GID``, overridable by
  ``KERNEL_AGENT_UID``/``KERNEL_AGENT_GID``; the same constants as the native backend). That
  uid has no passwd entry on the host and firejail refuses users without one, so the launcher
  binds a generated ``/etc/passwd``/``/etc/group`` (root, the agent user, nobody) in its own
  private mount namespace; firejail's whitelisted ``/etc`` then shows those.
* **size-limited scratch** — firejail's ``private-tmp``/``tmpfs`` have no size option and a
  non-root user may not ``bind``: the launcher mounts a ``tmpfs`` of ``spec.scratch_bytes`` on
  ``/tmp`` in its mount namespace; workspace and read paths that live under ``/tmp`` are bound
  into it at their own paths (firejail's ``whitelist`` would put an unlimited tmpfs on ``/tmp``).
* **private copy of an ``exec``'d command** (``workspace != workspace_view``): bound over the
  view path by the launcher, then whitelisted (writable) by firejail.
* **/run** — firejail fails when ``/run`` is blacklisted (it keeps its state in
  ``/run/firejail``), so the launcher mounts an empty, non-listable (0711) tmpfs on ``/run``;
  firejail builds a private ``/run/firejail`` in it. (Shared state would collide anyway: firejail
  names its run files by pid, and every sandbox's firejail is pid 2 of its own pid namespace.)
* **die with the kernel** — firejail does not die with its parent and the parent-death signal
  is cleared when a setuid program is executed. The launcher sets ``PR_SET_PDEATHSIG(SIGKILL)``
  on the first ``unshare``; its ``--kill-child`` gives the same to its child, pid 1 of a new pid
  namespace around firejail (``timeout`` or a second ``unshare``, neither setuid); when pid 1
  dies the Linux kernel kills every process in that namespace, firejail's sandbox included,
  double-forked and ``setsid`` children too. (The parent-death signal follows the *thread*
  that started the sandbox: start sandboxes from a thread that outlives them.)
  firejail's own check for "already inside a sandbox" would silently run the program
  *unsandboxed* in such a namespace; ``container=lxc`` in firejail's environment tells it to
  sandbox normally (the probe verifies that the filters really are in place).
* **seccomp, second filter** — firejail's default list misses io_uring (a seccomp bypass),
  ``kcmp`` and ``process_madvise``; those are added to firejail's filter. firejail cannot
  filter ioctl arguments, so the launcher loads, before firejail starts (as root, so no
  ``no_new_privs`` is needed), a small BPF filter of its own: ioctl ``TIOCSTI``/``TIOCLINUX``
  (low 32 bits compared) → EPERM, io_uring → ENOSYS, foreign architectures → kill. It stays on
  every process below it. The launcher also calls
  ``setsid`` (no controlling terminal).
* **wall time** — coreutils ``timeout --signal=KILL`` as that pid 1 (its death ends the
  namespace), and :meth:`FirejailSandboxed.kill` from the kernel. firejail's own ``timeout``
  is not used: with it firejail polls ``waitpid`` once a second, which adds up to a second to
  the end of every sandbox.
* **cgroups** — memory and process-count groups (``sandbox.cgroups``) where the host allows;
  without a memory group, ``rlimit-as`` is used instead.
* **environment** — firejail adds variables of its own (``FIREJAIL_ADDED_ENV``); ``env -u``
  removes those the policy did not name. glibc strips loader and a few other variables
  (``SETUID_STRIPPED_ENV``) from every setuid program, firejail included, so they cannot reach
  the agent: a spec naming one is refused.

What firejail itself is asked for, beyond the above: ``noroot`` (a user namespace mapping
only the agent uid), ``nonewprivs``, ``caps.drop all``, ``nogroups``, its default seccomp list
plus :data:`EXTRA_SECCOMP`, ``seccomp.block-secondary``, ``restrict-namespaces``, ``net none``,
``protocol unix``, ``ipc-namespace``, ``hostname``, ``private-dev`` without ``/dev/shm``,
``/dev/tty``, ``/dev/pts``, ``/dev/ptmx``, blacklists of every host top-level entry that is
not a system directory, whitelists (read-only) of the workspace and read paths, blacklists of
the hidden paths, ``rlimit-nofile``/``-nproc``/``-fsize`` (``-as`` without a memory cgroup),
``deterministic-exit-code``, ``deterministic-shutdown`` (the sandbox ends with the agent, like
the native backend's pid 1; firejail then waits a fixed 100 ms between SIGTERM and SIGKILL of
what is left, a cost paid by every sandbox), ``private-cwd``, and ``--keep-fd`` for
``spec.pass_fds`` (kept at the same numbers; firejail closes every other descriptor above 2).

Known limits: ``RLIMIT_NPROC`` counts every process of the agent uid on the host, so
concurrent sandboxes share it (the pids cgroup is the per-sandbox limit); a hidden path that
does not exist at start cannot be blacklisted (recorded in ``hidden_absent_at_start``); a
workspace view outside ``/tmp`` must exist on the host (the private copy is bound over it).

Refusals (:class:`SandboxError`, nothing runs): the kernel is not root, firejail is missing or
not setuid root or too old, a path firejail cannot express exactly (glob or macro characters,
commas, newlines, symbolic links, ``..``), a workspace or read path in a place the agent must
never see (``/proc``, ``/sys``, ``/dev``, ``/run``, ``/etc`` as workspace, ``/``), or an
environment variable glibc would strip.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import math
import os
import platform
import re
import resource
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from kernel.errors import SandboxError
from sandbox import cgroups, hostcache
from sandbox.base import Availability, SandboxSpec

AGENT_UID = 64000
"""Host uid the agent runs as (override: ``KERNEL_AGENT_UID``); same as the native backend."""
AGENT_GID = 64000
"""Host gid the agent runs as (override: ``KERNEL_AGENT_GID``)."""
AGENT_USER = "agent"
"""Name of the agent user in the generated passwd/group."""

MIN_VERSION = (0, 9, 60)
HOSTNAME = "sandbox"
SCRATCH = "/tmp"  # noqa: S108 - the sandbox's own scratch dir, a private tmpfs

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
"""Visible read-only as they are on the host (firejail leaves them; they are root's)."""

ETC_ENTRIES = (
    "alternatives", "debian_version", "group",
    "host.conf", "hostname", "hosts", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "locale.alias",
    "localtime", "mime.types", "nsswitch.conf", "os-release", "passwd", "protocols",
    "python3", "python3.11", "services", "timezone",
)
"""The curated ``/etc`` (whitelisted, read-only); passwd/group are the generated ones."""

FIREJAIL_ADDED_ENV = (
    "container", "FIREJAIL_QUIET", "KDE_FORK_SLAVES", "PROMPT_COMMAND", "QML_DISABLE_DISK_CACHE",
    "QT_X11_NO_MITSHM", "SHELL",
)
"""Variables firejail 0.9.72 sets in the sandbox, removed again by ``env -u``. A spec may not
name them (firejail would replace the value), except ``SHELL``, which comes from the generated
passwd entry and so takes the spec's value."""

SETUID_STRIPPED_ENV = frozenset({
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH",
    "MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_CHECK_", "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_", "MALLOC_PERTURB_", "MALLOC_TOP_PAD_", "MALLOC_TRACE",
    "MALLOC_TRIM_THRESHOLD_", "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS",
    "TMPDIR", "TZDIR",
})
"""glibc's unsecure variables (plus every ``LD_*``): removed from any setuid program's
environment, so they cannot pass through firejail."""

EXTRA_SECCOMP = ("io_uring_setup", "io_uring_enter", "io_uring_register", "kcmp",
                 "process_madvise")
"""Added to firejail's default (``@default-nodebuggers``) filter."""

# firejail profile lines cannot quote; these characters are globs, macros, list separators or
# line breaks there.
_UNSAFE_PATH = re.compile(r"[\x00-\x1f\x7f*?\[\]{}$,\\\"'~]")

_PIDS_OVERHEAD = 4
"""Processes of the launch chain in the pids cgroup: unshare, unshare, firejail, its child."""
_NPROC_OVERHEAD = 2
"""Processes firejail keeps under the agent's real uid (RLIMIT_NPROC counts per uid)."""

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
TIOCSTI = 0x5412
TIOCLINUX = 0x541C

_libc = ctypes.CDLL(None, use_errno=True)


def agent_ids() -> tuple[int, int]:
    """(uid, gid) of the agent: the dedicated ids when root, else the kernel's own."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    return (int(os.environ.get("KERNEL_AGENT_UID", AGENT_UID)),
            int(os.environ.get("KERNEL_AGENT_GID", AGENT_GID)))


# --------------------------------------------------------------------------------------------
# The probe's smoke test, cached per boot
#
# The probe starts one real sandbox and checks from inside that firejail confined it (about
# 200 ms, which every `kernel exec` with this backend paid once). A *passed* result is kept in
# the kernel home, keyed by everything it depends on: the boot, the kernel release, the
# firejail binary and the helper tools (path, inode, size, mtime, mode, owner), firejail's
# config and users files, this module's source, the extra filter and the agent ids. Any change
# to any of those, or a new boot, runs the smoke test again; a failure is never cached. The
# cache lives beside the kernel's private key (same owner, mode 0700): whoever can write it can
# also read that key.

SMOKE_CACHE = "cache/firejail-smoke.json"


def _smoke_key(bins: Mapping[str, str], uid: int, gid: int, extra_digest: str) -> str:
    h = hashlib.sha256()
    parts: list[str] = [platform.release(), str(uid), str(gid), extra_digest]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append(f"no-boot-id-{time.time_ns()}")  # never matches: no caching
    for name in sorted(bins):
        st = os.stat(bins[name])
        parts.append(f"{name}={bins[name]}:{st.st_dev}:{st.st_ino}:{st.st_size}:"
                     f"{st.st_mtime_ns}:{st.st_mode}:{st.st_uid}")
    for path in ("/etc/firejail/firejail.config", "/etc/firejail/firejail.users", __file__):
        try:
            parts.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        except OSError:
            parts.append(f"{path}:absent")
    h.update("\0".join(parts).encode())
    return h.hexdigest()


def _smoke_cache_path() -> Path | None:
    from kernel.keys import kernel_home

    if os.geteuid() != 0:
        return None
    return kernel_home() / SMOKE_CACHE


def _smoke_cache_get(key: str) -> str | None:
    """When the smoke test passed with this key (this boot), or None."""
    path = _smoke_cache_path()
    if path is None:
        return None
    raw = hostcache.read_private(path, 4096)
    if raw is None:
        return None
    text = raw.decode(errors="replace").split()
    if len(text) == 2 and text[0] == key:
        return text[1]
    return None


def _smoke_cache_put(key: str) -> None:
    path = _smoke_cache_path()
    if path is None:
        return
    hostcache.write_private(
        path, f"{key} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())


# --------------------------------------------------------------------------------------------
# The generated profile


@dataclass(frozen=True)
class HostLayout:
    """What of the host's top level the profile has to hide (read from the host at start)."""

    root_entries: tuple[str, ...]
    """Names in ``/`` that are not symbolic links into the system directories."""
    etc_entries: tuple[str, ...]
    """Those of :data:`ETC_ENTRIES` that exist."""

    @staticmethod
    def read() -> HostLayout:
        root: list[str] = []
        for name in sorted(os.listdir("/")):
            p = "/" + name
            if os.path.islink(p):
                target = os.path.realpath(p)
                if any(_under(target, d) for d in SYSTEM_DIRS):
                    continue
            root.append(name)
        etc = tuple(n for n in ETC_ENTRIES if os.path.lexists("/etc/" + n))
        return HostLayout(tuple(root), etc)


@dataclass(frozen=True)
class Bind:
    """A bind mount the launcher makes in its own mount namespace before firejail runs."""

    source: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class Plan:
    """A sandbox's generated profile and the launcher's preparation, both from one spec."""

    profile: str
    binds: tuple[Bind, ...]
    keep_fds: tuple[int, ...]
    memory_rlimit: bool


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _check_path(p: Path | str, what: str) -> str:
    s = str(p)
    if not s.startswith("/"):
        raise SandboxError(f"firejail backend: {what} {s!r} is not an absolute path")
    if _UNSAFE_PATH.search(s) or s != s.strip():
        raise SandboxError(
            f"firejail backend: {what} {s!r} contains characters a firejail profile cannot "
            "express exactly (globs, macros, commas, quotes, control characters or edge "
            "whitespace)", hint="rename the path or use the native backend")
    parts = s.split("/")
    if ".." in parts or "." in parts or "//" in s or (len(s) > 1 and s.endswith("/")):
        raise SandboxError(f"firejail backend: {what} {s!r} is not a normalized path")
    return s


def _check_real(s: str, what: str) -> None:
    if not os.path.lexists(s):
        raise SandboxError(f"firejail backend: {what} {s} does not exist")
    if os.path.realpath(s) != s:
        raise SandboxError(
            f"firejail backend: {what} {s} goes through a symbolic link; firejail would "
            "whitelist the link's target as well, which the policy did not name",
            hint="pass the resolved path")


_FORBIDDEN_VIEW = ("/proc", "/sys", "/dev", "/run", "/etc")


def make_plan(spec: SandboxSpec, layout: HostLayout, *, memory_cgroup: bool,
              pids_cgroup: bool) -> Plan:
    """The profile text and the launcher's binds for ``spec`` (pure: no host access)."""
    del pids_cgroup  # the rlimit is set either way; kept for symmetry with memory_cgroup
    view = _check_path(spec.workspace_view, "workspace view")
    source = _check_path(spec.workspace, "workspace")
    cwd = _check_path(spec.cwd, "working directory")
    if view == "/" or any(_under(view, d) for d in (*_FORBIDDEN_VIEW, *SYSTEM_DIRS)):
        raise SandboxError(
            f"firejail backend: the workspace view {view} lies in a system directory; it "
            "cannot be made visible read-only on its own there")
    if not (_under(cwd, view) or cwd == SCRATCH):
        raise SandboxError(f"firejail backend: working directory {cwd} is neither in the "
                           f"workspace view {view} nor the scratch dir {SCRATCH}")
    for fd in spec.pass_fds:
        if fd < 3:
            raise SandboxError(f"firejail backend: pass_fds holds {fd}, a standard descriptor")

    binds: list[Bind] = []
    whitelist: list[str] = []
    read_only: list[str] = []

    ws_ro = not spec.workspace_writable
    if _under(view, SCRATCH) or source != view:
        binds.append(Bind(source, view, ws_ro))
    if not _under(view, SCRATCH):
        whitelist.append(view)
    read_write: list[str] = []
    if ws_ro:
        read_only.append(view)
    elif not _under(view, SCRATCH):
        read_write.append(view)  # firejail mounts some whitelisted trees (/var) read-only

    for rp in spec.read_paths:
        s = _check_path(rp, "read path")
        if s == "/" or any(_under(s, d) for d in ("/proc", "/sys", "/dev", "/run")):
            raise SandboxError(f"firejail backend: read path {s} is in /proc, /sys, /dev or "
                               "/run, which the sandbox never shows from the host")
        if any(_under(s, d) for d in SYSTEM_DIRS):
            continue  # visible read-only already
        if s == "/etc":
            raise SandboxError("firejail backend: read path /etc as a whole is not allowed")
        if _under(s, SCRATCH):
            binds.append(Bind(s, s, True))
        else:
            whitelist.append(s)
        read_only.append(s)

    hidden: list[str] = []
    for h in spec.hidden:
        hidden.append(_check_path(h, "hidden path"))

    tops = {("/" + p.split("/")[1]) for p in whitelist} | {"/etc"}
    lines: list[str] = [
        "# firejail profile generated by agent-kernel for one sandbox (do not edit)",
        "quiet",
        "",
        "# identity and privileges",
        "noroot",
        "nonewprivs",
        "caps.drop all",
        "nogroups",
        "",
        "# system calls: firejail's default list plus what it lacks",
        "seccomp " + ",".join(EXTRA_SECCOMP),
        "seccomp.block-secondary",
        "restrict-namespaces",
        "",
        "# namespaces",
        "net none",
        "protocol unix",
        "ipc-namespace",
        f"hostname {HOSTNAME}",
        "",
        "# devices: null, zero, full, random, urandom only",
        "private-dev",
        "nodvd", "nosound", "notv", "nou2f", "novideo", "no3d", "noinput",
        "blacklist /dev/shm",
        "blacklist /dev/tty",
        "blacklist /dev/pts",
        "blacklist /dev/ptmx",
        "",
        "# /etc: a curated set on firejail's tmpfs (passwd and group are the generated ones;",
        "# whitelisting binds them, which costs less than private-etc's copying)",
        *(ln for n in layout.etc_entries for ln in (f"whitelist /etc/{n}", f"read-only /etc/{n}")),
        "",
        "# the host's top level: system directories stay, the rest is hidden",
    ]
    keep_top = {"/proc", "/dev", "/etc", SCRATCH, "/run", *SYSTEM_DIRS, *tops}
    for name in layout.root_entries:
        top = _check_path("/" + name, "host top-level entry")
        if top not in keep_top:
            lines.append(f"blacklist {top}")
    lines += ["", "# the workspace and the read paths (keep-var-tmp: else firejail puts its own",
              "# tmpfs on /var/tmp, over a path whitelisted there)", "keep-var-tmp"]
    lines += [f"whitelist {p}" for p in whitelist]
    lines += [f"read-only {p}" for p in read_only]
    lines += [f"read-write {p}" for p in read_write]
    lines += ["", "# hidden even inside the workspace"]
    lines += [f"blacklist {h}" for h in hidden]
    lim = spec.limits
    lines += [
        "",
        "# limits (rlimit-cpu is set by the launcher: soft below hard, so the cause is SIGXCPU)",
        f"rlimit-nofile {lim.open_files}",
        f"rlimit-nproc {lim.processes + _NPROC_OVERHEAD}",
        f"rlimit-fsize {lim.file_size_mb << 20}",
    ]
    if not memory_cgroup:
        lines.append(f"rlimit-as {lim.memory_mb << 20}")
    lines += [
        "deterministic-exit-code",
        "deterministic-shutdown",
        f"private-cwd {cwd}",
        "",
    ]
    # outer mounts first, so that a bind inside another one is not covered by it
    binds.sort(key=lambda b: b.target.count("/"))
    return Plan("\n".join(lines), tuple(binds), tuple(sorted(set(spec.pass_fds))),
                not memory_cgroup)


def check_env(env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise SandboxError(f"firejail backend: invalid environment variable name {name!r}")
        if name in FIREJAIL_ADDED_ENV and name != "SHELL":
            raise SandboxError(
                f"firejail backend: environment variable {name} cannot be passed: firejail sets "
                "it to a value of its own", hint="drop it from the policy")
        if name.startswith("LD_") or name in SETUID_STRIPPED_ENV:
            raise SandboxError(
                f"firejail backend: environment variable {name} cannot reach the agent: glibc "
                "removes it from the environment of setuid programs such as firejail",
                hint="drop it from the policy or use the native backend")


# --------------------------------------------------------------------------------------------
# The launcher's own seccomp filter (loaded before firejail starts)


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


@cache
def extra_filter() -> bytes:
    """BPF: ioctl TIOCSTI/TIOCLINUX → EPERM (low 32 bits), io_uring → ENOSYS, foreign arch →
    kill. Compiled once with libseccomp (or taken from the boot's cache of compiled programs,
    :func:`sandbox.seccomp_filter.compile_cached`); loaded raw in the launcher."""
    from sandbox import seccomp_filter

    return seccomp_filter.compile_cached("firejail-extra", _compile_extra_filter,
                                         (__file__,))[0]


def _compile_extra_filter() -> tuple[bytes, tuple[str, ...]]:
    """Compile :func:`extra_filter`'s program with libseccomp (no cache)."""
    from sandbox import seccomp_filter

    sc = seccomp_filter._import_pyseccomp()
    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
        f.add_rule(sc.ERRNO(errno.ENOSYS), name)
    for cmd in (TIOCSTI, TIOCLINUX):
        f.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, cmd))
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        bpf = out.read()
    if not bpf or len(bpf) % 8:
        raise SandboxError("firejail backend: libseccomp exported an empty BPF program")
    return bpf, ()


# --------------------------------------------------------------------------------------------
# The launcher (runs in the forked child, as root, before exec)


def _check(r: int, what: str) -> None:
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc.mount(src.encode() if src is not None else None, target.encode(),
                       fstype.encode() if fstype is not None else None, ctypes.c_ulong(flags),
                       data.encode() if data is not None else None),
           f"mount {target}")


@dataclass
class _Launcher:
    """Everything the pre-exec step needs, prepared in the parent."""

    binds: tuple[Bind, ...]
    passwd: str
    group: str
    scratch_bytes: int
    bpf: bytes
    kernel_pid: int
    cgroup: cgroups.Group | None
    cpu_seconds: int
    _buf: Any = field(default=None, repr=False)
    _prog: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._buf = ctypes.create_string_buffer(self.bpf, len(self.bpf))
        self._prog = _SockFprog(len(self.bpf) // 8, ctypes.addressof(self._buf))

    def __call__(self) -> None:
        os.umask(0o022)
        if self.cgroup is not None:
            self.cgroup.join_self()
        _check(_libc.unshare(ctypes.c_int(CLONE_NEWNS)), "unshare(CLONE_NEWNS)")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _mount(self.passwd, "/etc/passwd", None, MS_BIND)
        _mount(self.group, "/etc/group", None, MS_BIND)
        # /run: an empty, non-listable tmpfs; firejail builds its state dir /run/firejail in
        # it (private: firejail names its run files by pid, and every sandbox's firejail is
        # pid 2 of its own pid namespace)
        _mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
               "size=1048576,mode=0711")
        # sources first: the scratch tmpfs hides the host's /tmp
        fds = []
        for b in self.binds:
            flags = os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW
            fds.append(os.open(b.source, flags))
        _mount("tmpfs", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={self.scratch_bytes},mode=1777")
        for b, fd in zip(self.binds, fds, strict=True):
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            if _under(b.target, SCRATCH):
                os.makedirs(b.target if is_dir else os.path.dirname(b.target), 0o755,
                            exist_ok=True)
                if not is_dir and not os.path.lexists(b.target):
                    os.close(os.open(b.target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o444))
            _mount(f"/proc/self/fd/{fd}", b.target, None, MS_BIND | MS_REC)
            if b.read_only:
                _mount(None, b.target, None,
                       MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            os.close(fd)
        os.chdir("/")
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # firejail's rlimit-cpu sets soft == hard: the kernel then kills with SIGKILL and the
        # cause cannot be told. Soft N, hard N+1: SIGXCPU first, SIGKILL if it is ignored.
        resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_seconds, self.cpu_seconds + 1))
        _check(_libc.prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER),
                           ctypes.byref(self._prog), ctypes.c_ulong(0), ctypes.c_ulong(0)),
               "seccomp filter")
        _check(_libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL),
                           ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
               "PR_SET_PDEATHSIG")
        if os.getppid() != self.kernel_pid:
            raise OSError(errno.ESRCH, "the kernel exited during the launch")


# --------------------------------------------------------------------------------------------
# The backend


def _version_of(binary: str) -> tuple[tuple[int, ...], str]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                         env={"PATH": "/usr/bin:/bin"}, check=False).stdout
    m = re.search(r"firejail version (\d+)\.(\d+)\.(\d+)", out)
    if m is None:
        return (), out.strip().splitlines()[0] if out.strip() else ""
    return tuple(int(x) for x in m.groups()), ".".join(m.groups())


def _read_config(path: str = "/etc/firejail/firejail.config") -> dict[str, str]:
    conf: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    k, _, v = line.partition(" ")
                    conf[k] = v.strip()
    except OSError:
        pass
    return conf


class FirejailBackend:
    """SPEC §4 through firejail (see the module docstring for what is added around it)."""

    name = "firejail"

    def __init__(self, search_path: str | None = None) -> None:
        """``search_path``: the PATH to find ``firejail``, ``unshare``, ``setpriv`` and ``env``
        on (default: the kernel's PATH)."""
        self._search_path = search_path
        self._probed: Availability | None = None
        self._version = ""
        self._bin: dict[str, str] = {}

    def agent_ids(self) -> tuple[int, int]:
        return agent_ids()

    def _path(self) -> str:
        if self._search_path is not None:
            return self._search_path
        return os.environ.get("PATH") or os.defpath

    def probe(self) -> Availability:
        if self._probed is None:
            self._probed = self._probe()
        return self._probed

    def _probe(self) -> Availability:
        missing: list[str] = []
        facts: dict[str, Any] = {"kernel_release": platform.release()}
        path = self._path()
        fj = shutil.which("firejail", path=path)
        if fj is None:
            missing.append(f"firejail binary not found on PATH ({path})")
        else:
            fj = os.path.realpath(fj)
            facts["firejail_path"] = fj
            st = os.stat(fj)
            if st.st_uid != 0 or not st.st_mode & stat.S_ISUID:
                missing.append(f"{fj} is not setuid root (firejail needs it to build the "
                               "sandbox for an unprivileged user)")
            ver, text = _version_of(fj)
            facts["firejail_version"] = text
            self._version = text
            if not ver:
                missing.append(f"cannot read the version of {fj}")
            elif ver < MIN_VERSION:
                missing.append(f"firejail {text} is older than "
                               f"{'.'.join(map(str, MIN_VERSION))}")
            self._bin["firejail"] = fj
        for tool, pkg in (("unshare", "util-linux"), ("setpriv", "util-linux"),
                          ("env", "coreutils"), ("timeout", "coreutils")):
            t = shutil.which(tool, path=path)
            if t is None:
                missing.append(f"{tool} ({pkg}) not found on PATH ({path})")
            else:
                self._bin[tool] = os.path.realpath(t)
        if os.geteuid() != 0:
            missing.append("the kernel is not running as root: the firejail backend must "
                           "start firejail as the dedicated agent uid and prepare its "
                           "size-limited /tmp, which needs root")
        uid, gid = agent_ids()
        facts["agent_uid"], facts["agent_gid"] = uid, gid
        if os.geteuid() == 0 and (uid == 0 or gid == 0):
            missing.append("KERNEL_AGENT_UID/KERNEL_AGENT_GID must not be 0")
        conf = _read_config()
        for key in ("seccomp", "userns", "whitelist", "private-dev"):
            if conf.get(key, "yes") == "no":
                missing.append(f"/etc/firejail/firejail.config disables {key}")
        try:
            with open("/etc/firejail/firejail.users") as f:
                users = {ln.strip() for ln in f if ln.strip() and not ln.startswith("#")}
            if AGENT_USER not in users:
                missing.append(f"/etc/firejail/firejail.users does not list {AGENT_USER!r}, so "
                               "firejail refuses the agent user")
        except FileNotFoundError:
            pass
        mode, why = cgroups.mode()
        facts["cgroup_mode"], facts["cgroup"] = mode, why
        if not missing:
            try:
                facts["seccomp_extra_digest"] = "sha256:" + hashlib.sha256(
                    extra_filter()).hexdigest()
                from sandbox import seccomp_filter

                facts["seccomp_extra_program"] = seccomp_filter.origin("firejail-extra")
            except (OSError, ImportError) as e:
                missing.append(f"cannot compile the extra seccomp filter: {e}")
        if not missing:
            key = _smoke_key(self._bin, uid, gid, facts.get("seccomp_extra_digest", ""))
            cached = _smoke_cache_get(key)
            if cached is not None:
                facts["smoke_test"] = f"passed (result cached this boot, at {cached})"
            else:
                problem = self._smoke()
                if problem:
                    missing.append(problem)
                else:
                    facts["smoke_test"] = "passed"
                    _smoke_cache_put(key)
        return Availability(not missing, missing, facts)

    def _smoke(self) -> str:
        """'' if a tiny sandbox really runs confined, else what is wrong."""
        from kernel.policy import Limits

        ws = Path(tempfile.mkdtemp(prefix="agent-kernel-fjprobe-"))
        r, w = os.pipe()
        try:
            os.chmod(ws, 0o755)  # noqa: S103 - the agent uid reads this empty probe dir
            spec = SandboxSpec(
                argv=("/usr/bin/cat", "/proc/self/status", "/proc/self/uid_map",
                      "/proc/self/environ"),
                workspace=ws, workspace_view=ws, workspace_writable=False, cwd=ws,
                env={"PATH": "/usr/bin:/bin", "SMOKE": "1"}, limits=Limits(),
                scratch_bytes=1 << 20,
                stdout=w, stderr=w, wall_seconds=30.0)
            try:
                sb = self._start(spec)
            except SandboxError as e:
                return f"firejail smoke test could not start: {e.message}"
            os.close(w)
            w = -1
            chunks = []
            while True:
                b = os.read(r, 65536)
                if not b:
                    break
                chunks.append(b)
            code = sb.wait(30)
            sb.kill()
            sb.cleanup()
            out = b"".join(chunks).decode(errors="replace")
            uid, _ = agent_ids()
            want = {"NoNewPrivs:\t1": "no_new_privs", "Seccomp:\t2": "seccomp filter",
                    "CapEff:\t0000000000000000": "capabilities dropped",
                    f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}": "agent uid"}
            absent = [what for line, what in want.items() if line not in out]
            # firejail's user namespace maps the agent uid alone; without it ("0 0 4294967295")
            # firejail ran the program unsandboxed
            if not re.search(rf"^\s*{uid}\s+{uid}\s+1\s*$", out, re.MULTILINE):
                absent.append("firejail's user namespace (firejail did not sandbox)")
            environ = out.rsplit("\n", 1)[-1].split("\0")
            extra = sorted({v.split("=", 1)[0] for v in environ if v} - {"PATH", "SMOKE"})
            if extra:
                absent.append("a scrubbed environment (firejail adds variables this backend "
                              "does not remove: " + ", ".join(extra) + ")")
            if code != 0 or absent:
                tail = out.replace("\0", " ").strip()[-300:]
                return ("firejail smoke test failed (exit " + str(code) + "): not in place: " +
                        (", ".join(absent) or "-") + "; output: " + tail)
            return ""
        finally:
            if w >= 0:
                os.close(w)
            os.close(r)
            shutil.rmtree(ws, ignore_errors=True)

    def start(self, spec: SandboxSpec) -> FirejailSandboxed:
        av = self.probe()
        if not av.available:
            raise SandboxError("isolation 'firejail' is not available here: " +
                               "; ".join(av.missing),
                               hint="nothing ran; fix the host or choose another backend")
        return self._start(spec)

    def _start(self, spec: SandboxSpec) -> FirejailSandboxed:
        if not spec.argv or not spec.argv[0].startswith("/"):
            raise SandboxError("firejail backend: argv[0] must be an absolute path")
        if spec.scratch_bytes < 4096:
            raise SandboxError("firejail backend: scratch_bytes is below one page")
        check_env(spec.env)
        src = _check_path(spec.workspace, "workspace")
        _check_real(src, "workspace")
        if not os.path.isdir(src):
            raise SandboxError(f"firejail backend: workspace {src} is not a directory")
        view = _check_path(spec.workspace_view, "workspace view")
        if view != src and not _under(view, SCRATCH):
            _check_real(view, "workspace view")
            if not os.path.isdir(view):
                raise SandboxError(f"firejail backend: workspace view {view} is not a "
                                   "directory on the host (the private copy is bound over it)")
        for rp in spec.read_paths:
            _check_real(_check_path(rp, "read path"), "read path")

        uid, gid = agent_ids()
        if spec.workspace_writable and not _under(view, SCRATCH) and os.stat(src).st_uid != uid:
            raise SandboxError(
                f"firejail backend: the writable workspace {src} is not owned by the agent uid "
                f"{uid}; firejail's read-write applies only to the invoking user's own files "
                "and would silently leave it read-only",
                hint="chown the writable copy to the agent uid (see Backend.agent_ids)")
        limits = spec.limits
        group, group_why = cgroups.create(limits.memory_mb << 20,
                                          limits.processes + _PIDS_OVERHEAD)
        memory_cgroup = group is not None and "memory_bytes" in group.settings
        pids_cgroup = group is not None and "pids_max" in group.settings
        layout = HostLayout.read()
        plan = make_plan(spec, layout, memory_cgroup=memory_cgroup, pids_cgroup=pids_cgroup)
        hidden_absent = [str(h) for h in spec.hidden if not os.path.lexists(h)]

        tmp = tempfile.mkdtemp(prefix="agent-kernel-firejail-")
        profile_fd = -1
        devnull = -1
        try:
            shell = spec.env.get("SHELL", "/usr/sbin/nologin")
            if ":" in shell or "\n" in shell:
                raise SandboxError("firejail backend: SHELL must not contain ':' or a newline")
            passwd = os.path.join(tmp, "passwd")
            group_file = os.path.join(tmp, "group")
            profile = os.path.join(tmp, "sandbox.profile")
            _write(passwd, "root:x:0:0:root:/root:/usr/sbin/nologin\n"
                           f"{AGENT_USER}:x:{uid}:{gid}:agent:{SCRATCH}:{shell}\n"
                           "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
            _write(group_file, f"root:x:0:\n{AGENT_USER}:x:{gid}:\nnogroup:x:65534:\n")
            _write(profile, plan.profile)
            profile_fd = os.open(profile, os.O_RDONLY | os.O_CLOEXEC)
            digest = "sha256:" + hashlib.sha256(plan.profile.encode()).hexdigest()

            b = self._bin
            unset = [n for n in FIREJAIL_ADDED_ENV if n not in spec.env]
            env_prefix = [b["env"]]
            for n in unset:
                env_prefix += ["-u", n]
            fj_args = [b["firejail"], f"--profile=/proc/self/fd/{profile_fd}"]
            if plan.keep_fds:
                fj_args.append("--keep-fd=" + ",".join(str(fd) for fd in plan.keep_fds))
            if spec.wall_seconds is not None:
                # pid 1 of the sandbox's outer pid namespace enforces the wall time
                init = [b["timeout"], "--signal=KILL",
                        str(max(1, math.ceil(spec.wall_seconds)))]
            else:
                init = [b["unshare"], "--fork", "--kill-child=SIGKILL", "--"]
            argv = [
                b["unshare"], "--pid", "--mount-proc", "--fork", "--kill-child=SIGKILL", "--",
                *init,
                b["setpriv"], f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
                *fj_args, *env_prefix, *spec.argv,
            ]
            chain_env = dict(spec.env)
            chain_env["container"] = "lxc"
            launcher = _Launcher(plan.binds, passwd, group_file, spec.scratch_bytes,
                                 extra_filter(), os.getpid(), group, limits.cpu_seconds)
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            started = time.monotonic()
            try:
                proc = subprocess.Popen(
                    argv, executable=argv[0], env=chain_env,
                    stdin=spec.stdin if spec.stdin is not None else devnull,
                    stdout=spec.stdout if spec.stdout is not None else devnull,
                    stderr=spec.stderr if spec.stderr is not None else devnull,
                    pass_fds=(*plan.keep_fds, profile_fd), close_fds=True,
                    start_new_session=True, preexec_fn=launcher, cwd="/",
                    restore_signals=True)
            except (OSError, subprocess.SubprocessError) as e:
                raise SandboxError(f"firejail backend: the launcher failed: {e}") from None
        except BaseException:
            if group is not None:
                group.kill()
                group.remove()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if profile_fd >= 0:
                os.close(profile_fd)
            if devnull >= 0:
                os.close(devnull)
        if group is not None:
            group.close_fds()

        enforced: dict[str, Any] = {
            "backend": self.name,
            "firejail_version": self._version,
            "firejail_path": b["firejail"],
            "profile_sha256": digest,
            "profile": plan.profile,
            "argv": argv,
            "agent_uid": uid,
            "agent_gid": gid,
            "limits": {
                "cpu_seconds": limits.cpu_seconds,
                "cpu_by": "RLIMIT_CPU (launcher; soft, hard+1)",
                "memory_bytes": limits.memory_mb << 20,
                "memory_by": "cgroup" if memory_cgroup else "RLIMIT_AS",
                "processes": limits.processes,
                "processes_by": (["pids cgroup", "RLIMIT_NPROC"] if pids_cgroup
                                 else ["RLIMIT_NPROC"]),
                "rlimit_nproc": limits.processes + _NPROC_OVERHEAD,
                "open_files": limits.open_files,
                "file_size_bytes": limits.file_size_mb << 20,
                "scratch_bytes": spec.scratch_bytes,
            },
            "cgroup": group.summary() if group is not None else {"mode": "none",
                                                                 "why": group_why},
            "layers": [
                "launcher: private mount namespace with generated /etc/passwd and /etc/group",
                f"launcher: tmpfs /tmp size={spec.scratch_bytes} (scratch)",
                "launcher: /run replaced by an empty 0711 tmpfs (firejail's private state dir)",
                *(f"launcher: bind {bd.source} -> {bd.target} "
                  f"({'read-only' if bd.read_only else 'writable'})" for bd in plan.binds),
                "launcher: setsid (no controlling terminal)",
                "launcher: seccomp filter " + "sha256:" + hashlib.sha256(
                    extra_filter()).hexdigest() +
                " (ioctl TIOCSTI/TIOCLINUX EPERM, io_uring ENOSYS, foreign arch kill)",
                "launcher: RLIMIT_CORE=0",
                f"launcher: RLIMIT_CPU soft {limits.cpu_seconds} hard {limits.cpu_seconds + 1}",
                "launcher: PR_SET_PDEATHSIG(SIGKILL); unshare --pid --kill-child makes pid 1 "
                "of a new pid namespace around firejail (the sandbox dies with the kernel)",
                ("pid 1: coreutils timeout --signal=KILL (wall time)"
                 if spec.wall_seconds is not None else "pid 1: unshare --fork --kill-child"),
                f"setpriv: run firejail as uid {uid} gid {gid}, no supplementary groups",
                "env -u: remove variables firejail adds",
                *(["cgroups: " + ", ".join(f"{k}={v}" for k, v in group.settings.items())]
                  if group is not None else []),
            ],
            "firejail_added_env": list(FIREJAIL_ADDED_ENV),
            "firejail_added_env_removed": unset,
            "firejail_added_env_kept": [n for n in FIREJAIL_ADDED_ENV if n in spec.env],
            "hidden_absent_at_start": hidden_absent,
            "keep_fds": list(plan.keep_fds),
        }
        if spec.wall_seconds is not None:
            enforced["limits"]["wall_seconds"] = max(1, math.ceil(spec.wall_seconds))
        if spec.workspace != spec.workspace_view:
            enforced["workspace_copy"] = ("the private copy is bound over the view path by the "
                                          "launcher, then whitelisted by firejail")
        return FirejailSandboxed(proc, enforced, group, tmp, started)



def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2:].split()
        if len(rest) > 1 and int(rest[1]) == pid:
            out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


class FirejailSandboxed:
    """A running firejail sandbox. ``pid`` is the launcher (first ``unshare``)."""

    def __init__(self, proc: subprocess.Popen[bytes], enforced: dict[str, Any],
                 group: cgroups.Group | None, tmpdir: str, started: float) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.enforced = enforced
        self._group = group
        self._tmp = tmpdir
        self._started = started
        self._killed = False

    @staticmethod
    def _status(code: int | None) -> int | None:
        """firejail reports the program's death by signal N as exit status 128+N; give it back
        as -N like the other backends (an agent exiting with 128+N on purpose looks the same)."""
        if code is not None and 128 < code <= 128 + 64:
            return 128 - code
        return code

    def _result(self, code: int | None) -> int | None:
        if code is not None and self._killed:
            return -signal.SIGKILL
        return self._status(code)

    def poll(self) -> int | None:
        return self._result(self._proc.poll())

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self._result(self._proc.wait(timeout))
        except subprocess.TimeoutExpired:
            return None

    def breach(self) -> str | None:
        if self._group is not None:
            b = self._group.breach()
            if b is not None:
                return b
        code = self._status(self._proc.returncode)
        if code is None or self._killed:
            return None
        for sig, name in ((signal.SIGXCPU, "cpu_seconds"), (signal.SIGXFSZ, "file_size")):
            if code == -sig:
                return name
        return None

    def kill(self) -> None:
        """SIGKILL pid 1 of the sandbox's outer pid namespace (the Linux kernel then kills and
        reaps everything inside it), then the launcher, then anything left in the cgroups.

        The launcher is stopped first so that it does not react to pid 1's death (``unshare``
        would print an error into the agent's stderr); it is killed once pid 1 is gone."""
        if self._proc.poll() is None:
            self._killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGSTOP)
            inits = _children(self.pid)
            for child in inits:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            deadline = time.monotonic() + 2.0
            while any(_alive(c) for c in inits) and time.monotonic() < deadline:
                time.sleep(0.002)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait(2.0)
        if self._group is not None:
            self._group.kill()

    def cleanup(self) -> None:
        if self._proc.returncode is None:
            self.kill()
            self.wait(5.0)
        if self._group is not None:
            self._group.kill()
            self._group.remove()
        shutil.rmtree(self._tmp, ignore_errors=True)

