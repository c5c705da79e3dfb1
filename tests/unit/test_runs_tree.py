"""The agent tree in the runs index, `kernel runs`, `kernel runs show`, `kernel show`, `kernel
verify`'s output, and `kernel reconcile`: built from real signed folders of a parent, a child and
a grandchild (tests/unit/test_verify_tree.py writes them with RunRecorder)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kernel import reconcile, show
from kernel._cli import main
from kernel.approval_gate import tree_columns
from kernel.controlplane import ControlPlane, db_path, tree_order
from kernel.keys import KernelKey
from tests.unit.test_verify_tree import tree, writable


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: KernelKey) -> Path:
    h = tmp_path / "home"
    (h / "keys").mkdir(parents=True)
    (h / "keys" / "kernel.pub").write_bytes(key.public_pem())
    monkeypatch.setenv("KERNEL_HOME", str(h))
    return h


@pytest.fixture(scope="module")
def key() -> KernelKey:
    return KernelKey.generate()


def out_of(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_an_index_made_before_the_tree_columns_is_migrated(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    db_path(runs).parent.mkdir()
    old = sqlite3.connect(db_path(runs))
    old.execute('CREATE TABLE "runs" ("run_id" TEXT PRIMARY KEY, "run_dir" TEXT, '
                '"status" TEXT, "started" TEXT)')
    old.execute("INSERT INTO runs VALUES ('old-1', '/x', 'passed', '2026')")
    old.commit()
    old.close()
    with ControlPlane.open(runs, create=False) as cp:
        cols = {r[1] for r in cp.conn.execute('PRAGMA table_info("runs")')}
        assert {"parent", "root", "depth", "seal", "kernel_pid"} <= cols
        row = cp.run("old-1")
        assert row is not None and row["status"] == "passed" and row["depth"] is None
        cp.upsert_run({"run_id": "new-1", "parent": "old-1", "root": "old-1", "depth": 1})
    with ControlPlane.open(runs, create=False) as cp:  # a second open changes nothing
        assert [r["run_id"] for r in cp.children_of("old-1")] == ["new-1"]


def test_tree_columns_from_the_run_context() -> None:
    assert tree_columns(SimpleNamespace(run_id="r", lineage=None)) == {
        "parent": None, "root": "r", "depth": 0}
    kid = SimpleNamespace(run_id="c", lineage={"parent": "r", "root": "r", "depth": 1})
    assert tree_columns(kid) == {"parent": "r", "root": "r", "depth": 1}


def test_tree_order_nests_children_and_keeps_orphans_and_loops() -> None:
    rows: list[dict[str, Any]] = [{"run_id": "a", "parent": None}, {"run_id": "b", "parent": None},
            {"run_id": "a1", "parent": "a"}, {"run_id": "a1x", "parent": "a1"},
            {"run_id": "a2", "parent": "a"}, {"run_id": "lost", "parent": "gone"},
            {"run_id": "p", "parent": "q"}, {"run_id": "q", "parent": "p"}]
    got = [(i, r["run_id"]) for i, r in tree_order(rows)]
    assert got[:6] == [(0, "a"), (1, "a1"), (2, "a1x"), (1, "a2"), (0, "b"), (0, "lost")]
    assert sorted(r for _, r in got) == sorted(r["run_id"] for r in rows)


def test_reconcile_indexes_the_tree_and_runs_shows_it(tmp_path: Path, home: Path,
                                                      key: KernelKey,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    runs = tmp_path / "runs"
    tree(runs, key)
    rep = reconcile.reconcile(runs)
    assert rep["runs"] == 3
    with ControlPlane.open(runs, create=False) as cp:
        rows = {r["run_id"]: r for r in cp.runs()}
    assert (rows["root-1"]["parent"], rows["root-1"]["root"], rows["root-1"]["depth"]) == (
        None, "root-1", 0)
    assert (rows["child-1"]["parent"], rows["child-1"]["root"], rows["child-1"]["depth"]) == (
        "root-1", "root-1", 1)
    assert (rows["grandchild-1"]["parent"], rows["grandchild-1"]["depth"]) == ("child-1", 2)
    assert all(r["status"] == "passed" for r in rows.values())

    code, out = out_of(capsys, "runs", "--runs-dir", str(runs))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("root-1  passed")
    assert lines[1].startswith("  `- child-1  passed")
    assert lines[2].startswith("    `- grandchild-1  passed")

    code, out = out_of(capsys, "runs", "show", "child-1", "--runs-dir", str(runs))
    assert code == 0
    assert "parent: root-1" in out and "depth: 1" in out
    assert "child grandchild-1: passed" in out and "seal sha256:" in out
    code, out = out_of(capsys, "runs", "show", "root-1", "--runs-dir", str(runs), "--json")
    data = json.loads(out)
    assert data["parent"] is None and data["depth"] == 0
    assert [c["run_id"] for c in data["children"]] == ["child-1"]
    assert data["children"][0]["seal"].startswith("sha256:")

    # an index edited to drop the tree is put back by reconcile
    with ControlPlane.open(runs, create=False) as cp:
        cp.upsert_run({"run_id": "child-1", "parent": None, "depth": 0})
    rep = reconcile.reconcile(runs)
    assert any("child-1: parent" in m for m in rep["mismatches"])
    with ControlPlane.open(runs, create=False) as cp:
        again = cp.run("child-1")
    assert again is not None and again["parent"] == "root-1" and again["depth"] == 1


def test_show_lists_children_and_lineage(tmp_path: Path, home: Path, key: KernelKey,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    root = tree(runs, key)
    view, status = show.show_run(root, [key.public])
    assert status == "intact" and view["lineage"] is None
    [child] = view["children"]
    assert child["run_id"] == "child-1" and child["status"] == "passed"
    assert child["verify"] == "intact" and child["started"] is True
    assert child["seal"].startswith("sha256:") and child["argv"] == ["agent"]
    assert view["totals"]["spawns"] == 1
    text = show.render(view, status)
    assert "child child-1 (seq 2): agent: passed, exit 0" in text
    assert "#1 spawn agent" in text and "child child-1 started (pid 4242)" in text
    assert "child child-1 ended: passed" in text

    view, _ = show.show_run(runs / "child-1", [key.public])
    assert view["lineage"]["parent"] == "root-1" and view["lineage"]["depth"] == 1
    assert "lineage: spawned by root-1 (decision seq 2), root root-1, depth 1" in show.render(
        view, "intact")

    code, out = out_of(capsys, "show", str(runs / "child-1"), "--json")
    assert code == 0 and json.loads(out)["children"][0]["run_id"] == "grandchild-1"

    # a tree with a missing grandchild: the parent's folder is still shown, with the verdict
    writable(runs / "grandchild-1")
    shutil.rmtree(runs / "grandchild-1")
    view, status = show.show_run(root, [key.public])
    assert status == "corrupt" and "grandchild-1" in view["tree_problem"]
    assert view["children"][0]["verify"] == "corrupt"
    assert "tree: child child-1" in show.render(view, status)


def test_verify_prints_the_tree(tmp_path: Path, home: Path, key: KernelKey,
                                capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    root = tree(runs, key)
    code, out = out_of(capsys, "verify", str(root))
    assert code == 0
    assert "  child child-1: intact, sealed passed" in out
    assert "    child grandchild-1: intact, sealed passed" in out
    code, out = out_of(capsys, "verify", str(runs / "child-1"))
    assert code == 0 and "spawned by root-1 (root root-1, depth 1)" in out
    code, out = out_of(capsys, "verify", str(root), "--json")
    data = json.loads(out)
    assert data["status"] == "intact" and data["children"][0]["children"][0]["lineage"] == {
        "parent": "child-1", "root": "root-1", "depth": 2}
    writable(runs / "child-1")
    shutil.rmtree(runs / "child-1")
    code, out = out_of(capsys, "verify", str(root))
    assert code == 5 and "corrupt: child child-1" in out and "folder missing" in out


def test_show_an_expired_child_and_one_that_could_not_start(tmp_path: Path, key: KernelKey
                                                            ) -> None:
    from tests.unit.test_verify_tree import child_run, end, exited, grant, start

    runs = tmp_path / "runs"
    root = start(runs, key, "root-1")
    g = grant(root, "child-1", key)
    child = child_run(runs, key, root, g)
    root.rec.append("syscall.result", {"req": g.req, "request_digest": g.request_digest,
                                       "ok": True, "child": g.child, "pid": 1})
    child.rec.append("run.kill", {"by": "expiry", "expires_ns": 5})
    exited(root, g, end(child, "expired"), status="expired")
    g2 = grant(root, "child-2", key)
    broken = child_run(runs, key, root, g2)
    broken.rec.append("sandbox.error", {"error": "no such backend"})
    exited(root, g2, end(broken, "failed"), status="failed")
    root.rec.append("syscall.result", {"req": g2.req, "request_digest": g2.request_digest,
                                       "ok": False, "errno": 11, "reason": "could not start",
                                       "child": g2.child})
    end(root)
    view, status = show.show_run(runs / "root-1", [key.public])
    assert status == "intact"
    first, second = view["children"]
    assert (first["status"], first["started"]) == ("expired", True)
    assert (second["status"], second["started"]) == ("failed", False)
    text = show.render(view, status)
    assert "child child-1 (seq 2): agent: expired" in text
    assert "child child-2 (seq" in text and ": failed, exit" in text
    assert "ended from outside: expiry" in show.render(*show.show_run(runs / "child-1",
                                                                      [key.public]))
