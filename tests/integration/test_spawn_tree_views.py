"""A real agent tree (root -> child -> grandchild, each in its own sandbox, started by `kernel
exec` through `spawn`) as the auditor's commands see it: `kernel verify` checks the whole tree
and lists it, `kernel runs` indents it, `kernel runs show` and `kernel show` give the lineage and
the children, and removing or swapping a child's folder is caught and named."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from tests.kernel_helpers import BACKENDS, kernel_cmd, results, run_agent, skip_unless_available

pytestmark = [pytest.mark.sandbox]

POLICY = """
[spawn]
max_depth = 2
max_replicas = 4
max_spawns = 4
cooldown_seconds = 0
expiration_seconds = 120
"""

PRELUDE = """
import json, sys
from syscalls.client import Kernel, SyscallError
k = Kernel.from_env()
def report(name, value):
    print("RESULT " + json.dumps({name: value}), flush=True)
"""

ROOT_AGENT = PRELUDE + """
r = k.spawn(["python3", "child.py"], budget={"files_written": 3}, justification="views test")
report("spawn", r)
report("wait", k.wait(r["child"]))
"""

CHILD_AGENT = PRELUDE + """
k.write("from-child.txt", b"child\\n")
g = k.spawn(["python3", "grandchild.py"])
w = k.wait(g["child"])
report("grandchild", {"spawn": g, "wait": w})
"""

GRANDCHILD_AGENT = PRELUDE + """
try:
    k.write("/etc/passwd-nope", b"x")
except SyscallError as e:
    report("denied", e.rule)
k.write("from-grandchild.txt", b"grandchild\\n")
"""


def policy_file(tmp_path: Path) -> Path:
    from tests.kernel_helpers import ROOT

    text = (ROOT / "policies" / "default.toml").read_text()
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.strip().startswith("["):
            skipping = line.strip() in ("[spawn]", "[[spawn.stop]]")
        if not skipping:
            out.append(line)
    path = tmp_path / "tree.toml"
    path.write_text("".join(out) + textwrap.dedent(POLICY))
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_runs_and_show_over_a_real_tree(tmp_path: Path, backend: str) -> None:
    skip_unless_available(backend)
    run = run_agent(tmp_path, ROOT_AGENT, backend=backend, policy=str(policy_file(tmp_path)),
                    files={"child.py": CHILD_AGENT, "grandchild.py": GRANDCHILD_AGENT})
    assert run.proc.returncode == 0, run.agent_output
    root_dir = run.run_dir
    runs = root_dir.parent
    home = run.home
    child_id = results(run)["spawn"]["child"]
    waited = results(run)["wait"]
    assert waited["status"] == "passed", (waited, run.agent_output)
    assert (run.workspace / "from-child.txt").read_text() == "child\n"
    assert (run.workspace / "from-grandchild.txt").read_text() == "grandchild\n"
    folders = {json.loads((p / "run.json").read_text())["run_id"]: p for p in runs.iterdir()
               if (p / "run.json").is_file()}
    assert len(folders) == 3
    [grand_id] = [r for r, p in folders.items() if r not in (root_dir.name, child_id)]
    trust = ["--trust", str(home / "keys" / "kernel.pub")]

    # verify: the whole tree, intact, listed generation by generation
    v = kernel_cmd(["verify", str(root_dir), *trust], home=home)
    assert v.returncode == 0, v.stdout + v.stderr
    assert f"  child {child_id}: intact, sealed passed" in v.stdout
    assert f"    child {grand_id}: intact, sealed passed" in v.stdout
    vj = json.loads(kernel_cmd(["verify", str(root_dir), "--json", *trust], home=home).stdout)
    assert vj["status"] == "intact" and vj["children"][0]["run_id"] == child_id
    assert vj["children"][0]["children"][0]["lineage"] == {"parent": child_id,
                                                           "root": root_dir.name, "depth": 2}
    # the seal each parent recorded is the child's
    spawn_exit = [json.loads(line)["body"] for line in
                  (root_dir / "log" / "events.jsonl").read_text().splitlines()
                  if '"type":"spawn.exit"' in line]
    assert [e["seal"] for e in spawn_exit] == [vj["children"][0]["seal"]] == [waited["seal"]]

    # runs: the tree indented, from the index the kernel kept while it ran
    r = kernel_cmd(["runs", "--runs-dir", str(runs)], home=home)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 3, r.stdout + r.stderr
    assert lines[0].startswith(f"{root_dir.name}  passed")
    assert lines[1].startswith(f"  `- {child_id}  passed")
    assert lines[2].startswith(f"    `- {grand_id}  passed")
    rs = json.loads(kernel_cmd(["runs", "show", child_id, "--runs-dir", str(runs), "--json"],
                               home=home).stdout)
    assert (rs["parent"], rs["root"], rs["depth"]) == (root_dir.name, root_dir.name, 1)
    [gc] = rs["children"]
    assert gc["run_id"] == grand_id and gc["status"] == "passed" and gc["denials"] == 1
    assert gc["seal"] == vj["children"][0]["children"][0]["seal"]

    # show: the root lists its child; the child shows its lineage and its own child
    s = kernel_cmd(["show", str(root_dir), *trust], home=home)
    assert s.returncode == 0, s.stderr
    assert f"child {child_id} (seq " in s.stdout and "python3 child.py: passed, exit 0" in s.stdout
    assert "folder intact" in s.stdout and "children spawned 1" in s.stdout
    sc = json.loads(kernel_cmd(["show", str(folders[child_id]), "--json", *trust],
                               home=home).stdout)
    assert sc["lineage"]["parent"] == root_dir.name and sc["lineage"]["depth"] == 1
    assert sc["children"][0]["run_id"] == grand_id
    assert sc["children"][0]["denials"] == 1 and sc["children"][0]["verify"] == "intact"

    # reconcile agrees with what the kernel indexed
    rc = json.loads(kernel_cmd(["reconcile", "--runs-dir", str(runs), "--json"],
                               home=home).stdout)
    assert rc["runs"] == 3 and not [m for m in rc["mismatches"]
                                    if "parent" in m or "depth" in m or "root" in m]

    # the grandchild's folder removed from a copy of the tree: corrupt, named
    copy = tmp_path / "copy"
    shutil.copytree(runs, copy)
    _writable(copy / grand_id)
    shutil.rmtree(copy / grand_id)
    v = kernel_cmd(["verify", str(copy / root_dir.name), *trust], home=home)
    assert v.returncode == 5, v.stdout
    assert f"child {child_id}" in v.stdout and f"child {grand_id}" in v.stdout
    assert "folder missing" in v.stdout


def _writable(folder: Path) -> None:
    for d, _dirs, files in os.walk(folder):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
