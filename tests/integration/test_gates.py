"""`kernel exec --task`: verification commands run sandboxed with the workspace read-only after
the agent ends, the gate turns the recorded evidence into pass/fail, the exit code follows the
gate, and replay re-derives the gate report (and can re-run the verifications)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from kernel import keys
from kernel.errors import ExitCode
from kernel.replay import replay_run
from kernel.verify import verify_run
from tests.kernel_helpers import BACKENDS, kernel_cmd, make_workspace, skip_unless_available
from tests.unit.test_verify_tamper import events, rechain, reseal, writable

AGENT = """
from syscalls.client import Kernel, SyscallError
k = Kernel.from_env()
k.write("calc.py", b"def add(a, b):\\n    return a + b\\n")
try:
    k.write(".git/config", b"x")
except SyscallError as e:
    print("denied", e.rule)
"""

TEST = """
import unittest
class T(unittest.TestCase):
    def test_add(self):
        from calc import add
        self.assertEqual(add(2, 3), 5)
"""

# A verification command that tries to change the workspace: it must not be able to.
SNEAKY = ("import pathlib,sys\n"
          "try:\n    pathlib.Path('planted.txt').write_text('x')\nexcept OSError:\n"
          "    sys.exit(0)\nsys.exit(3)\n")


def run_task(tmp_path: Path, gate: str = "", agent: str = AGENT, extra_verify: str = "",
             backend: str = "native") -> tuple[int, dict, Path, Path]:  # type: ignore[type-arg]
    ws = make_workspace(tmp_path, {"test_calc.py": textwrap.dedent(TEST),
                                   "sneaky.py": SNEAKY})
    (ws / "agent.py").write_text(textwrap.dedent(agent))
    task = tmp_path / "task.toml"
    task.write_text(
        'command = ["python3", "agent.py"]\nworkspace = "ws"\n'
        '[[verify]]\nname = "unit"\nargv = ["python3", "-m", "unittest", "-q", "test_calc"]\n'
        '[[verify]]\nname = "readonly"\nargv = ["python3", "sneaky.py"]\n'
        + extra_verify + gate)
    home = tmp_path / "home"
    r = kernel_cmd(["exec", "--json", "--task", str(task), "--runs-dir",
                    str(tmp_path / "runs"), "--isolation", backend], home=home)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return r.returncode, out, ws, home


@pytest.fixture(autouse=True)
def _native() -> None:
    skip_unless_available("native")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_passes_exit_zero_and_verifications_cannot_write(tmp_path: Path,
                                                              backend: str) -> None:
    skip_unless_available(backend)
    code, out, ws, home = run_task(tmp_path, '[gate]\nforbid_denials = ["exec.*"]\n',
                                   backend=backend)
    assert code == 0, out
    assert out["gate"]["passed"] is True
    assert not (ws / "planted.txt").exists()
    run_dir = Path(out["run_dir"])
    evs = [json.loads(x) for x in (run_dir / "log/events.jsonl").read_text().splitlines()]
    types = [e["type"] for e in evs]
    assert types.index("agent.exit") < types.index("gate.task") < types.index("gate.report")
    results = {e["body"]["name"]: e["body"] for e in evs if e["type"] == "verification.result"}
    assert results["unit"]["exit_code"] == 0 and results["readonly"]["exit_code"] == 0
    assert evs[-1]["type"] == "run.end" and evs[-1]["body"]["gate"]["passed"] is True
    pub = keys.load_or_create_kernel_key(home).public
    assert verify_run(run_dir, [pub]).status == "intact"
    rep = replay_run(run_dir, [pub], rerun_gates=True)
    assert rep.status == "identical", rep.to_json()
    assert rep.gates is not None and rep.gates["same"] is True


def test_gate_fails_on_a_forbidden_denial_with_its_own_exit_code(tmp_path: Path) -> None:
    code, out, _, _ = run_task(tmp_path, '[gate]\nforbid_denials = ["protected:*"]\n')
    assert code == ExitCode.GATE_FAILED == 20
    assert out["status"] == "passed"  # the agent itself succeeded: the gate decides
    failed = [r for r in out["gate"]["rules"] if not r["passed"]]
    assert [r["rule"] for r in failed] == ["forbid_denials"]
    assert "protected:.git/**" in failed[0]["detail"]


def test_gate_fails_when_a_verification_fails(tmp_path: Path) -> None:
    bad_agent = AGENT.replace("a + b", "a - b")
    code, out, _, _ = run_task(tmp_path, agent=bad_agent)
    assert code == ExitCode.GATE_FAILED
    failed = [r for r in out["gate"]["rules"] if not r["passed"]]
    assert [r["rule"] for r in failed] == ["all_verifications_pass"]
    assert "unit: exited 1" in failed[0]["detail"]


def test_missing_verification_program_is_evidence_not_a_crash(tmp_path: Path) -> None:
    code, out, _, _ = run_task(
        tmp_path, extra_verify='[[verify]]\nname = "ghost"\nargv = ["no-such-tool"]\n')
    assert code == ExitCode.GATE_FAILED
    assert "ghost: 'no-such-tool' is not a program" in json.dumps(out["gate"])


def test_gate_report_rewritten_and_resealed_diverges_on_replay(tmp_path: Path) -> None:
    code, out, _, home = run_task(tmp_path, '[gate]\nforbid_denials = ["protected:*"]\n')
    assert code == ExitCode.GATE_FAILED
    key = keys.load_or_create_kernel_key(home)
    copy = writable(Path(out["run_dir"]), tmp_path / "copy")
    evs = events(copy)
    rep_ev = next(e for e in evs if e["type"] == "gate.report")
    rep_ev["body"]["passed"] = True
    for r in rep_ev["body"]["rules"]:
        r["passed"] = True
    rechain(copy, evs)
    reseal(copy, key)
    assert verify_run(copy, [key.public]).status == "intact"
    rep = replay_run(copy, [key.public])
    assert rep.status == "diverged"
    assert rep.divergence is not None and rep.divergence.seq == rep_ev["seq"]
    assert "gate report" in rep.divergence.what


def test_verifier_report_rewritten_consistently_is_caught_by_rerun_gates(
        tmp_path: Path) -> None:
    """An insider turns a failed verification into a pass and re-derives the gate report from
    the forged evidence: plain replay cannot tell (the report follows from the record), re-running
    the verification commands on the replayed workspace does."""
    from kernel import gates
    from kernel.policy import load_bytes

    code, out, _, home = run_task(tmp_path, agent=AGENT.replace("a + b", "a - b"))
    assert code == ExitCode.GATE_FAILED
    key = keys.load_or_create_kernel_key(home)
    copy = writable(Path(out["run_dir"]), tmp_path / "copy")
    evs = events(copy)
    unit = next(e for e in evs if e["type"] == "verification.result"
                and e["body"]["name"] == "unit")
    unit["body"]["exit_code"] = 0
    task = gates.task_from_record(next(e for e in evs if e["type"] == "gate.task")["body"])
    policy = load_bytes((copy / "policy.toml").read_bytes(), source="policy.toml")
    rep_ev = next(e for e in evs if e["type"] == "gate.report")
    rep_ev["body"] = gates.evaluate(policy, task, gates.evidence_from_events(
        evs[: rep_ev["seq"]]))
    assert rep_ev["body"]["passed"] is True
    evs[-1]["body"]["gate"] = rep_ev["body"]
    rechain(copy, evs)
    reseal(copy, key)
    assert verify_run(copy, [key.public]).status == "intact"
    assert replay_run(copy, [key.public]).status == "identical"
    rep = replay_run(copy, [key.public], rerun_gates=True)
    assert rep.status == "diverged", rep.to_json()
    assert rep.divergence is not None and "verifier report" in rep.divergence.what
    assert rep.gates is not None and rep.gates["gate_rerun"]["passed"] is False


def test_policy_gate_applies_without_a_task(tmp_path: Path) -> None:
    """A profile's [gate] gates every run under it: here a denial of a forbidden kind fails the
    run (exit 20) though the agent exited 0; the same agent under the plain profile passes."""
    from tests.kernel_helpers import ROOT

    ws = make_workspace(tmp_path, {})
    (ws / "agent.py").write_text(textwrap.dedent(AGENT))
    pol = tmp_path / "gated.toml"
    pol.write_text((ROOT / "policies" / "default.toml").read_text()
                   + '\n[gate]\nforbid_denials = ["protected:*"]\n')
    home = tmp_path / "home"
    base = ["exec", "--json", "--workspace", str(ws), "--runs-dir", str(tmp_path / "runs"),
            "--isolation", "native"]
    r = kernel_cmd([*base, "--policy", str(pol), "--", "/usr/bin/python3", "agent.py"],
                   home=home)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == ExitCode.GATE_FAILED, r.stderr
    assert out["status"] == "passed" and out["gate"]["passed"] is False
    assert [x["rule"] for x in out["gate"]["rules"]] == ["forbid_denials"]
    rep = replay_run(Path(out["run_dir"]), [keys.load_or_create_kernel_key(home).public])
    assert rep.status == "identical", rep.to_json()
    r = kernel_cmd([*base, "--", "/usr/bin/python3", "agent.py"], home=home)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["gate"] is None
