"""Golden table: (policy, task, evidence) -> gate report, byte for byte.

The expected reports are in gates.golden.json (reviewed by hand; see gate_cases.py). A change
in the gate's behaviour must show up here as a diff to that file.
"""

from __future__ import annotations

import json

import pytest

from kernel.canonical import canonical_json
from tests.golden.gate_cases import CASES, GOLDEN, POLICY_CASES, reports

ALL = CASES + POLICY_CASES


def test_every_case_has_a_golden_report() -> None:
    golden = json.loads(GOLDEN.read_text())
    assert [g["case"] for g in golden] == [name for name, _, _ in ALL]


@pytest.mark.parametrize("i", range(len(ALL)), ids=[c[0] for c in ALL])
def test_gate_report_matches_golden(i: int) -> None:
    golden = json.loads(GOLDEN.read_text())[i]
    got = reports()[i]
    assert canonical_json(got) == canonical_json(golden)


def test_gate_is_deterministic() -> None:
    assert canonical_json(reports()) == canonical_json(reports())
