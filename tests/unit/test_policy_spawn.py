"""The `[spawn]` sections of the shipped profiles, and a bad stop condition at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel import policy
from kernel.decide import Usage
from kernel.errors import PolicyError
from kernel.replication import (
    Contract,
    SpawnRequest,
    StopCondition,
    TreeFacts,
    check_spawn,
    contract_of,
)

REQ = SpawnRequest(argv=("/usr/bin/python3", "child.py"), resolved="/usr/bin/python3",
                   budget=None)
PLENTY = Usage(syscalls=10_000, bytes_written=1 << 20, files_written=100, exec_count=10)


def fresh_tree(**kw: object) -> TreeFacts:
    base: dict[str, object] = {"parent_depth": 0, "live": 0, "spawns": 0, "last_spawn_ns": None,
                               "remainder": PLENTY, "totals": {}}
    base.update(kw)
    return TreeFacts(**base)  # type: ignore[arg-type]


def test_default_profile_has_the_documented_contract() -> None:
    c = contract_of(policy.load("default").spawn)
    assert c == Contract(max_depth=2, max_replicas=4, max_spawns=16, cooldown_seconds=0,
                         expiration_seconds=300,
                         stop=(StopCondition("denials", ">=", 50, False, "denials >= 50"),))


def test_default_profile_allows_children_and_grandchildren_only() -> None:
    c = contract_of(policy.load("default").spawn)
    assert check_spawn(REQ, c, fresh_tree(), 0).allowed
    assert check_spawn(REQ, c, fresh_tree(parent_depth=1), 0).allowed
    d = check_spawn(REQ, c, fresh_tree(parent_depth=2), 0)
    assert (d.decision, d.rule) == ("denied", "spawn.max_depth")
    d = check_spawn(REQ, c, fresh_tree(totals={"denials": 50}), 0)
    assert (d.decision, d.rule) == ("denied", "spawn.stop:denials>=50")


def test_strict_profile_refuses_every_spawn() -> None:
    sp = policy.load("strict").spawn
    assert (sp.max_depth, sp.max_replicas, sp.max_spawns, sp.cooldown_seconds) == (0, 0, 0, 0)
    c = contract_of(sp)
    for depth in (0, 1, 5):
        d = check_spawn(REQ, c, fresh_tree(parent_depth=depth), 0)
        assert (d.decision, d.rule) == ("denied", "spawn.max_depth")


def test_strict_states_its_spawn_section_explicitly() -> None:
    text = Path(policy.resolve_profile("strict")).read_text()
    assert "\n[spawn]\n" in text and "max_depth = 0" in text


@pytest.mark.parametrize(("when", "why"), [
    ("denials => 5", "METRIC OP N"),
    ("colour >= 1", "unknown metric"),
    ("denials >= -1", "METRIC OP N"),
    ("", "METRIC OP N"),
])
def test_bad_stop_condition_is_a_policy_error_naming_its_key(tmp_path: Path, when: str,
                                                             why: str) -> None:
    f = tmp_path / "p.toml"
    f.write_text(f'description = "t"\n[spawn]\nmax_depth = 1\n[[spawn.stop]]\nwhen = "{when}"\n')
    with pytest.raises(PolicyError) as e:
        policy.load(str(f))
    assert f"{f}: spawn.stop[0].when:" in str(e.value)
    assert why in str(e.value)
