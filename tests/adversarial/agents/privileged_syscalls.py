"""Hostile agent: tries the system calls that hand out privilege or kernel attack surface.

Every attempt is made so that it would succeed for an ordinary unprivileged process on this
host without a filter (e.g. keyctl, io_uring, unshare(CLONE_NEWUSER), userfaultfd in user mode,
perf counters of itself, ptrace of its own child), so a failure shows the sandbox stopped it.
"""

import ctypes
import json
import os
import signal
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long
out = {}


def call(name, nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(L(nr), *args)
    if r < 0:
        out[name] = f"errno {ctypes.get_errno()}"
    else:
        out[name] = f"succeeded ({r})"
    return r


CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
SIGCHLD = 17

call("unshare_user", 272, L(CLONE_NEWUSER))
call("unshare_mount", 272, L(CLONE_NEWNS))
# clone(2) with a namespace flag; a child that does get created leaves at once.
r = call("clone_newuser", 56, L(CLONE_NEWUSER | SIGCHLD), L(0), L(0), L(0), L(0))
if r == 0:
    os._exit(0)
elif r > 0:
    os.waitpid(r, 0)
args = (ctypes.c_uint64 * 11)()
args[0] = CLONE_NEWUSER  # struct clone_args.flags
args[4] = SIGCHLD  # exit_signal
r = call("clone3_newuser", 435, ctypes.byref(args), L(88))
if r == 0:
    os._exit(0)
elif r > 0:
    os.waitpid(r, 0)
call("mount_tmpfs", 165, b"none", b"/tmp", b"tmpfs", L(0), None)
call("setns", 308, L(os.open("/proc/self/ns/net", os.O_RDONLY) if os.path.exists(
    "/proc/self/ns/net") else -1), L(0))
call("chroot", 161, b"/tmp")
call("pivot_root", 155, b"/tmp", b"/tmp")
params = ctypes.create_string_buffer(120)
call("io_uring_setup", 425, L(4), params)
bpf_attr = ctypes.create_string_buffer(128)
ctypes.memmove(bpf_attr, (ctypes.c_uint32 * 4)(2, 4, 4, 1), 16)  # BPF_MAP_TYPE_ARRAY
call("bpf", 321, L(0), bpf_attr, L(128))
perf_attr = ctypes.create_string_buffer(128)
ctypes.memmove(perf_attr, (ctypes.c_uint32 * 2)(1, 128), 8)  # PERF_TYPE_SOFTWARE, size
flags = (1 << 0) | (1 << 5) | (1 << 6)  # disabled, exclude_kernel, exclude_hv
ctypes.memmove(ctypes.byref(perf_attr, 40), (ctypes.c_uint64 * 1)(flags), 8)
call("perf_event_open", 298, perf_attr, L(0), L(-1), L(-1), L(0))
call("userfaultfd", 323, L(0o2000000 | 1))  # O_CLOEXEC | UFFD_USER_MODE_ONLY
call("keyctl", 250, L(0), L(-3), L(1))  # KEYCTL_GET_KEYRING_ID, session keyring, create
call("add_key", 248, b"user", b"agent-key", b"payload", L(7), L(-2))
call("personality", 135, L(0x0040000))  # ADDR_NO_RANDOMIZE
handle = ctypes.create_string_buffer(136)
ctypes.memmove(handle, (ctypes.c_uint32 * 1)(128), 4)
mount_id = ctypes.c_int(0)
call("name_to_handle_at", 303, L(-100), b"/usr", handle, ctypes.byref(mount_id), L(0))
call("kexec_load", 246, L(0), L(0), None, L(0))
call("init_module", 175, None, L(0), b"")
call("syslog", 103, L(3), ctypes.create_string_buffer(64), L(64))

child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
time.sleep(0.05)
call("ptrace_attach", 101, L(16), L(child), None, None)
buf = ctypes.create_string_buffer(8)
local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
remote = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
call("process_vm_readv", 310, L(child), local, L(1), remote, L(1), L(0))
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
print(json.dumps(out))
