"""Inputs of the gate golden table: (task file, evidence) pairs; the policy is fixed.

Expected reports live in gates.golden.json. To add a case, append it here, run
``python -m tests.golden.gate_cases --write``, and review the new entry by eye before
committing it: the file is the contract.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from kernel.gates import Evidence, VerificationResult, evaluate
from kernel.policy import load_bytes
from kernel.task import parse

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "gates.golden.json"
POLICY = load_bytes(b'description = "gate golden policy"\n', source="golden.toml")

BASE = 'command = ["python3", "agent.py"]\nworkspace = "ws"\n'
TWO = BASE + ('[[verify]]\nname = "unit"\nargv = ["python3", "-m", "unittest"]\n'
              '[[verify]]\nname = "lint"\nargv = ["ruff", "check"]\n')

OK2 = (VerificationResult("unit", 0), VerificationResult("lint", 0))

CASES: list[tuple[str, str, Evidence]] = [
    ("defaults, clean run", TWO, Evidence(0, "passed", (), (), OK2)),
    ("defaults, agent failed", TWO, Evidence(1, "failed", (), (), OK2)),
    ("agent killed by a limit", TWO, Evidence(-9, "limit", (), (), OK2)),
    ("one verification failed", TWO,
     Evidence(0, "passed", (), (), (VerificationResult("unit", 1), OK2[1]))),
    ("one verification timed out", TWO,
     Evidence(0, "passed", (), (), (VerificationResult("unit", -9, True), OK2[1]))),
    ("one verification could not start", TWO,
     Evidence(0, "passed", (), (), (OK2[0], VerificationResult("lint", None, False,
                                                              "'ruff' is not a program")))),
    ("one verification missing from the evidence", TWO,
     Evidence(0, "passed", (), (), (OK2[0],))),
    ("no verification named", BASE, Evidence(0, "passed", (), (), ())),
    ("agent exit not required", BASE + "[gate]\nagent_exit_zero = false\n",
     Evidence(3, "failed", (), (), ())),
    ("verifications not required", TWO + "[gate]\nall_verifications_pass = false\n",
     Evidence(0, "passed", (), (), (VerificationResult("unit", 1),))),
    ("pending approval", BASE, Evidence(0, "passed", (), (17,), ())),
    ("pending approval allowed", BASE + "[gate]\nno_pending_approvals = false\n",
     Evidence(0, "passed", (), (17,), ())),
    ("denials within the limit", BASE + "[gate]\nmax_denials = 2\n",
     Evidence(0, "passed", ((5, "protected:.git/**"), (9, "exec.not_allowlisted")), (), ())),
    ("denials over the limit", BASE + "[gate]\nmax_denials = 1\n",
     Evidence(0, "passed", ((5, "protected:.git/**"), (9, "exec.not_allowlisted")), (), ())),
    ("zero denials allowed, none", BASE + "[gate]\nmax_denials = 0\n",
     Evidence(0, "passed", (), (), ())),
    ("forbidden denial kind present", BASE + '[gate]\nforbid_denials = ["protected:*"]\n',
     Evidence(0, "passed", ((5, "protected:.git/**"), (9, "exec.not_allowlisted")), (), ())),
    ("forbidden denial kind absent", BASE + '[gate]\nforbid_denials = ["quota.*"]\n',
     Evidence(0, "passed", ((9, "exec.not_allowlisted"),), (), ())),
    ("everything fails at once",
     TWO + '[gate]\nmax_denials = 0\nforbid_denials = ["exec.*", "path.*"]\n',
     Evidence(2, "failed", ((4, "path.outside"), (8, "exec.not_found")), (11,),
              (VerificationResult("unit", 1),))),
]


STRICT = load_bytes(b'description = "gate golden strict policy"\n[gate]\n'
                    b'agent_exit_zero = true\nmax_denials = 1\n'
                    b'forbid_denials = ["exec.not_allowlisted"]\n', source="strict-gate.toml")
LAX_TASK = BASE + ('[gate]\nagent_exit_zero = false\nall_verifications_pass = false\n'
                   'no_pending_approvals = false\nmax_denials = 5\n')
D2 = ((5, "protected:.git/**"), (9, "exec.not_allowlisted"))

# (name, task file, evidence) under the strict policy: the stricter of task and policy applies.
POLICY_CASES: list[tuple[str, str, Evidence]] = [
    ("policy gate: lax task, clean run", LAX_TASK, Evidence(0, "passed", (), (), ())),
    ("policy gate: lax task cannot relax agent_exit_zero", LAX_TASK,
     Evidence(1, "failed", (), (), ())),
    ("policy gate: lower max_denials wins, forbidden kind from the policy", LAX_TASK,
     Evidence(0, "passed", D2, (), ())),
    ("policy gate: task adds its own forbidden kind",
     BASE + '[gate]\nforbid_denials = ["protected:*"]\n',
     Evidence(0, "passed", ((5, "protected:.git/**"),), (), ())),
]


def reports() -> list[dict[str, Any]]:
    out = []
    for policy, cases in ((POLICY, CASES), (STRICT, POLICY_CASES)):
        for name, toml, ev in cases:
            task = parse(toml.encode(), source="task.toml", base=Path("/golden"))
            out.append({"case": name, "report": evaluate(policy, task, ev)})
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        GOLDEN.write_text(json.dumps(reports(), indent=1, sort_keys=True) + "\n")
    else:
        print(json.dumps(reports(), indent=1, sort_keys=True))
