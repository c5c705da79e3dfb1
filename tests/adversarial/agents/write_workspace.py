"""Hostile agent: tries every way to change the read-only workspace it can see."""

import json
import os
import sys

target = sys.argv[1]  # an existing file in the workspace
ws = os.path.dirname(target)
results = {}


def attempt(name, fn):
    try:
        fn()
        results[name] = "succeeded"
    except OSError as e:
        results[name] = f"errno {e.errno}"


def overwrite():
    with open(target, "w") as f:
        f.write("pwned by the agent")


def append():
    with open(target, "a") as f:
        f.write("pwned")


attempt("overwrite", overwrite)
attempt("append", append)
attempt("truncate", lambda: os.truncate(target, 0))
attempt("chmod", lambda: os.chmod(target, 0o777))
attempt("utime", lambda: os.utime(target, (0, 0)))
attempt("remove", lambda: os.remove(target))
attempt("rename", lambda: os.rename(target, target + ".moved"))
attempt("link", lambda: os.link(target, os.path.join(ws, "hardlink")))
attempt("create", lambda: open(os.path.join(ws, "new-file"), "x").close())
attempt("mkdir", lambda: os.mkdir(os.path.join(ws, "new-dir")))
attempt("symlink", lambda: os.symlink("/etc/passwd", os.path.join(ws, "new-link")))
attempt("mkfifo", lambda: os.mkfifo(os.path.join(ws, "new-fifo")))
print(json.dumps(results))
