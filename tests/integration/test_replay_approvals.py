"""Replay of runs with approvals: the pending decision, then the settled one (approved, denied,
or refused without reviewers), are re-derived from the recorded outcome of the wait."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel import keys
from kernel.replay import replay_run
from tests.approval_helpers import WRITE_ENV_AGENT, events, new_reviewer, policy_text, start_run
from tests.kernel_helpers import kernel_cmd, skip_unless_available
from tests.unit.test_verify_tamper import events as log_events
from tests.unit.test_verify_tamper import rechain, reseal, writable


@pytest.fixture(autouse=True)
def _native() -> None:
    skip_unless_available("native")


def _ring(home: Path) -> Path:
    ring = home / "reviewers.toml"
    pub = new_reviewer(home, "alice")
    ring.write_text(f'[[reviewers]]\nname = "alice"\npublic_key = "{pub}"\n')
    return ring


@pytest.mark.parametrize("verdict", ["approve", "deny"])
def test_settled_approval_replays_identically(tmp_path: Path, verdict: str) -> None:
    home = tmp_path / "home"
    run = start_run(tmp_path, WRITE_ENV_AGENT, policy_text(keyring=str(_ring(home))), home=home)
    (row,) = run.wait_pending()
    extra = ["--reason", "no"] if verdict == "deny" else []
    assert run.kernel([verdict, row["id"], *extra]).returncode == 0
    out = run.finish()
    run_dir = Path(out["run_dir"])
    decisions = [e["body"]["decision"] for e in events(run_dir)
                 if e["type"] == "syscall.decision" and e["body"].get("rule") == "protected:.env*"]
    assert decisions == ["pending", "approved" if verdict == "approve" else "denied"]
    key = keys.load_or_create_kernel_key(home)
    rep = replay_run(run_dir, [key.public])
    assert rep.status == "identical", rep.to_json()
    # kernel show puts the approval records under the request they are about, in order
    shown = kernel_cmd(["show", str(run_dir)], home=home).stdout
    lines = [x.strip() for x in shown.splitlines()]
    i = next(n for n, x in enumerate(lines) if "#1 write write '.env'" in x)
    steps = [x.split("]", 1)[1].strip() for x in lines[i + 1:i + 5]]
    assert steps[0].startswith("-> pending (protected:.env*)")
    assert steps[1] == "approval.requested"
    assert steps[2].startswith("approval.received by alice")
    assert steps[3].startswith("-> approved" if verdict == "approve" else "-> denied")
    if verdict == "deny":
        return
    # an insider turning the approved write into a denied one (re-signed) diverges
    copy = writable(run_dir, tmp_path / "copy")
    evs = log_events(copy)
    final = next(e for e in evs if e["type"] == "syscall.decision"
                 and e["body"].get("decision") == "approved")
    final["body"]["approval_outcome"] = "expired"
    rechain(copy, evs)
    reseal(copy, key)
    rep = replay_run(copy, [key.public])
    assert rep.status == "diverged", rep.to_json()
    assert rep.divergence is not None and rep.divergence.seq == final["seq"]
    assert rep.divergence.expected[0] == "approved" and rep.divergence.actual[0] == "expired"


EXEC_AGENT = """
from syscalls.client import Kernel
k = Kernel.from_env()
r = k.exec(["ls", "-a"], justification="look around")
print("RESULT", r.exit_code, flush=True)
"""

CAPTURED_AGENT = """
from syscalls.client import Kernel
k = Kernel.from_env()
r = k.exec(["python3", "-c", "open('.env', 'w').write('FROM_EXEC=1\\\\n')"])
print("RESULT", r.exit_code, flush=True)
"""


@pytest.mark.parametrize(("agent", "exec_approval", "timeout"), [
    (EXEC_AGENT, True, 60), (CAPTURED_AGENT, False, 60), (WRITE_ENV_AGENT, False, 1)],
    ids=["exec-approved", "captured-change-approved", "expired"])
def test_other_approval_paths_replay_identically(tmp_path: Path, agent: str,
                                                 exec_approval: bool, timeout: int) -> None:
    home = tmp_path / "home"
    run = start_run(tmp_path, agent, policy_text(keyring=str(_ring(home)), timeout=timeout,
                                                 exec_approval=exec_approval), home=home)
    (row,) = run.wait_pending()
    if timeout > 1:
        assert run.kernel(["approve", row["id"]]).returncode == 0
    out = run.finish()
    run_dir = Path(out["run_dir"])
    settled = [e["body"]["decision"] for e in events(run_dir)
               if e["type"] == "syscall.decision" and "pending_seq" in e["body"]]
    assert settled == (["expired"] if timeout == 1 else ["approved"])
    rep = replay_run(run_dir, [keys.load_or_create_kernel_key(home).public])
    assert rep.status == "identical", rep.to_json()
