"""`kernel replay` and `kernel recover` on real agent trees run by `kernel exec`.

A root spawns a child that spawns a grandchild; all three write to the one shared workspace,
including the same file (the grandchild also through an `exec` whose change is captured), and
each waits for its child. Replaying the root re-decides every
folder and re-applies every change merged in tseq order; replaying a child re-decides it and
names the root. Then the same kind of tree is cut short by SIGKILL of the kernel process:
`kernel recover ROOT` seals every folder `aborted`, the tree verifies intact and replays.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kernel.corpus import pids_with_marker
from tests.kernel_helpers import (
    AGENT_PY,
    BACKENDS,
    ROOT,
    kernel_cmd,
    make_workspace,
    run_agent,
    skip_unless_available,
)

pytestmark = [pytest.mark.sandbox]

ROOT_AGENT = """
import sys
from syscalls.client import Kernel
k = Kernel.from_env()
k.write("a.txt", b"root\\n")
k.write("shared.txt", b"root\\n")
c = k.spawn(["python3", "child.py"], budget={"files_written": 20})["child"]
w = k.wait(c)
assert w["status"] == "passed", w
k.write("after.txt", open("shared.txt", "rb").read())
"""

CHILD_AGENT = """
from syscalls.client import Kernel
k = Kernel.from_env()
k.write("b.txt", b"child\\n")
k.write("shared.txt", b"child\\n")
g = k.spawn(["python3", "grandchild.py"])["child"]
w = k.wait(g)
assert w["status"] == "passed", w
"""

GRANDCHILD_AGENT = """
from syscalls.client import Kernel
k = Kernel.from_env()
k.write("c.txt", b"grandchild\\n")
r = k.exec(["python3", "-c", "open('made-by-exec.txt', 'w').write('exec')"])
assert r.exit_code == 0, r
k.write("shared.txt", b"grandchild\\n")
"""

# Cut short: the child keeps writing until the kernel is killed; the root waits for it.
KILLED_ROOT = """
import sys
from syscalls.client import Kernel
k = Kernel.from_env()
k.write("a.txt", b"root\\n")
c = k.spawn(["python3", "child.py", sys.argv[1]])["child"]
k.wait(c)
"""

KILLED_CHILD = """
import sys, time
from syscalls.client import Kernel
k = Kernel.from_env()
g = k.spawn(["python3", "grandchild.py", sys.argv[1]])["child"]
i = 0
while True:
    k.write("child-%d.txt" % (i % 5), b"%d\\n" % i)
    i += 1
    time.sleep(0.02)
"""

KILLED_GRANDCHILD = """
import sys, time
from syscalls.client import Kernel
k = Kernel.from_env()
i = 0
while True:
    k.write("shared.txt", b"grandchild %d\\n" % i)
    i += 1
    time.sleep(0.03)
"""


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    skip_unless_available(name)
    return name


def _folders(runs: Path) -> dict[str, dict[str, Any]]:
    """run id -> run.json of every folder in the runs dir."""
    return {d.name: json.loads((d / "run.json").read_text())
            for d in sorted(runs.iterdir()) if (d / "run.json").is_file()}


def _replay(home: Path, run_dir: Path) -> tuple[int, dict[str, Any]]:
    p = kernel_cmd(["replay", "--json", "--trust", str(home / "keys" / "kernel.pub"),
                    str(run_dir)], home=home)
    try:
        return p.returncode, json.loads(p.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"kernel replay printed no JSON (exit {p.returncode}): "
                             f"{p.stdout}{p.stderr}") from None


def _tree_ids(folders: dict[str, dict[str, Any]]) -> tuple[str, str, str]:
    root = next(r for r, h in folders.items() if "lineage" not in h)
    child = next(r for r, h in folders.items() if (h.get("lineage") or {}).get("depth") == 1)
    grand = next(r for r, h in folders.items() if (h.get("lineage") or {}).get("depth") == 2)
    return root, child, grand


def test_a_real_tree_replays_identically(tmp_path: Path, backend: str) -> None:
    files = {"child.py": CHILD_AGENT, "grandchild.py": GRANDCHILD_AGENT}
    run = run_agent(tmp_path, ROOT_AGENT, backend=backend, files=files)
    assert run.proc.returncode == 0, run.proc.stdout + run.proc.stderr
    assert (run.workspace / "after.txt").read_bytes() == b"grandchild\n"
    assert (run.workspace / "made-by-exec.txt").read_bytes() == b"exec"
    runs = run.run_dir.parent
    folders = _folders(runs)
    assert len(folders) == 3, sorted(folders)
    root, child, grand = _tree_ids(folders)

    code, rep = _replay(run.home, runs / root)
    assert code == 0, rep
    assert rep["status"] == "identical" and rep["final_check"] == "root"
    assert [(f["run_id"], f["role"], f["status"]) for f in rep["folders"]] == [
        (root, "root", "identical"), (child, "child", "identical"),
        (grand, "child", "identical")]
    assert rep["applied"] == 8  # every change of the three agents (one from an exec), in order
    # every workspace change of the tree carries a distinct tseq
    tseqs = []
    for rid in folders:
        for line in (runs / rid / "log" / "events.jsonl").read_text().splitlines():
            ev = json.loads(line)
            if ev["type"] == "syscall.result" and "tseq" in ev["body"]:
                tseqs.append(ev["body"]["tseq"])
    assert sorted(tseqs) == list(range(1, 9))

    for rid in (child, grand):
        code, rep = _replay(run.home, runs / rid)
        assert code == 0, rep
        assert rep["status"] == "identical" and rep["final_check"] == f"root:{root}"
        assert any(root in n and "covered by replaying the root" in n for n in rep["notes"])
    text = kernel_cmd(["replay", "--trust", str(run.home / "keys" / "kernel.pub"),
                       str(runs / child)], home=run.home)
    assert text.returncode == 0 and root in text.stdout, text.stdout + text.stderr


@pytest.mark.parametrize("first", ["root", "grandchild"])
def test_a_killed_tree_is_recovered_and_replays(tmp_path: Path, backend: str,
                                                first: str) -> None:
    """``first``: recover the root at once (it recovers every descendant), or the grandchild
    alone first, then the root (which recovers the rest)."""
    marker = "replay-tree-" + uuid.uuid4().hex
    ws = make_workspace(tmp_path, {"agent.py": KILLED_ROOT, "child.py": KILLED_CHILD,
                                   "grandchild.py": KILLED_GRANDCHILD})
    home, runs = tmp_path / "home", tmp_path / "runs"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KERNEL_HOME": str(home),
           "LANG": "C.UTF-8"}
    with open(tmp_path / "kernel.out", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kernel._cli", "exec", "--json", "--workspace", str(ws),
             "--runs-dir", str(runs), "--isolation", backend, "--policy", "default", "--",
             AGENT_PY, "agent.py", marker], stdout=out, stderr=subprocess.STDOUT, env=env,
            cwd=ROOT)
    try:
        deadline = time.monotonic() + 90
        while True:  # until the child and the grandchild have both written a few times
            assert proc.poll() is None, (tmp_path / "kernel.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "the tree never got going"
            done = 0
            if runs.exists():
                for d in runs.iterdir():
                    log = d / "log" / "events.jsonl"
                    if log.is_file() and log.read_bytes().count(b'"tseq"') >= 3:
                        done += 1
            if done >= 2:
                break
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        left = pids_with_marker(marker)
        for _ in range(100):
            if not left:
                break
            time.sleep(0.1)
            left = pids_with_marker(marker)
        assert left == [], "a process of the tree outlived the kernel"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for pid in pids_with_marker(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    folders = _folders(runs)
    root, child, grand = _tree_ids(folders)
    assert not any((runs / r / "SEAL.json").exists() for r in folders)
    if first == "grandchild":
        alone = kernel_cmd(["recover", "--json", str(runs / grand)], home=home)
        assert alone.returncode == 0, alone.stdout + alone.stderr
        assert "descendants" not in json.loads(alone.stdout)
        assert (runs / grand / "SEAL.json").exists()
        assert not (runs / child / "SEAL.json").exists()
    rec = kernel_cmd(["recover", "--json", str(runs / root)], home=home)
    assert rec.returncode == 0, rec.stdout + rec.stderr
    out = json.loads(rec.stdout)
    assert [d["run_id"] for d in out["descendants"]] == (
        [grand, child] if first == "root" else [child])
    for rid in folders:
        seal = json.loads((runs / rid / "SEAL.json").read_text())
        assert seal["body"]["status"] == "aborted", rid
    v = kernel_cmd(["verify", "--json", "--trust", str(home / "keys" / "kernel.pub"),
                    str(runs / root)], home=home)
    assert v.returncode == 0, v.stdout + v.stderr
    code, rep = _replay(home, runs / root)
    assert code == 0, rep
    assert [f["run_id"] for f in rep["folders"]] == [root, child, grand]
    for rid in (child, grand):
        code, rep = _replay(home, runs / rid)
        assert code == 0 and rep["final_check"] == f"root:{root}", rep
