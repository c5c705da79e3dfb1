"""The replication contract: strict loading, the pure spawn check, the one ledger of a tree."""

from __future__ import annotations

import errno

import pytest

from kernel.decide import Usage
from kernel.errors import PolicyError
from kernel.replication import (
    Contract,
    SpawnRequest,
    TreeFacts,
    TreeLedger,
    check_spawn,
    contract_from,
    facts_from,
    facts_record,
    parse_condition,
)

S = 1_000_000_000
BIG = Usage(syscalls=1000, bytes_written=10_000, files_written=100, exec_count=10)
OPEN = Contract(max_depth=3, max_replicas=4, max_spawns=10, cooldown_seconds=0,
                expiration_seconds=60)
REQ = SpawnRequest(argv=("/usr/bin/python3", "child.py"), resolved="/usr/bin/python3",
                   budget=None)


def facts(**kw: object) -> TreeFacts:
    base: dict[str, object] = {"parent_depth": 0, "live": 0, "spawns": 0, "last_spawn_ns": None,
                               "remainder": BIG, "totals": {}}
    base.update(kw)
    return TreeFacts(**base)  # type: ignore[arg-type]


def test_contract_loads_strictly_and_parses_stop_conditions() -> None:
    c = contract_from({"max_depth": 2, "max_replicas": 3, "max_spawns": 5,
                       "cooldown_seconds": 1, "expiration_seconds": 30,
                       "stop": [{"when": "denials >= 5"},
                                {"when": "bytes_written > 100", "kill_tree": True}]}, "p.toml")
    assert (c.max_depth, c.max_replicas, c.max_spawns, c.cooldown_seconds,
            c.expiration_seconds) == (2, 3, 5, 1, 30)
    assert [(s.metric, s.op, s.value, s.kill_tree) for s in c.stop] == [
        ("denials", ">=", 5, False), ("bytes_written", ">", 100, True)]
    assert contract_from({}, "p.toml") == Contract()  # default: every spawn refused


@pytest.mark.parametrize(("data", "key"), [
    ({"max_depht": 1}, "spawn.max_depht"),
    ({"max_depth": -1}, "spawn.max_depth"),
    ({"max_replicas": "3"}, "spawn.max_replicas"),
    ({"expiration_seconds": 0}, "spawn.expiration_seconds"),
    ({"stop": [{"when": "denials >= five"}]}, "spawn.stop[0].when"),
    ({"stop": [{"when": "cpu >= 5"}]}, "spawn.stop[0].when"),
    ({"stop": [{"when": "denials => 5"}]}, "spawn.stop[0].when"),
    ({"stop": [{"when": "denials >= 5; rm -rf /"}]}, "spawn.stop[0].when"),
    ({"stop": [{"when": "denials >= 5", "kill": True}]}, "spawn.stop[0].kill"),
])
def test_bad_contract_is_a_policy_error_naming_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(PolicyError) as ei:
        contract_from(data, "p.toml")
    assert ei.value.key == key and ei.value.file == "p.toml"


def test_stop_condition_operators() -> None:
    c = parse_condition("denials >= 5")
    assert not c.holds({"denials": 4}) and c.holds({"denials": 5})
    assert parse_condition("spawns > 2").holds({"spawns": 3})
    assert not parse_condition("spawns > 2").holds({"spawns": 2})
    assert parse_condition("live == 0").holds({})
    assert parse_condition("  expired>=1 ").rule == "spawn.stop:expired>=1"


def test_default_contract_refuses_every_spawn() -> None:
    d = check_spawn(REQ, Contract(), facts(), 0)
    assert (d.decision, d.rule) == ("denied", "spawn.max_depth")


@pytest.mark.parametrize(("contract", "tree", "now", "rule", "code"), [
    (OPEN, {"parent_depth": 3}, 0, "spawn.max_depth", errno.EPERM),
    (OPEN, {"spawns": 10}, 0, "spawn.max_spawns", errno.EAGAIN),
    (OPEN, {"live": 4}, 0, "spawn.max_replicas", errno.EAGAIN),
    (Contract(3, 4, 10, 2, 60), {"last_spawn_ns": 10 * S}, 11 * S, "spawn.cooldown",
     errno.EAGAIN),
    (Contract(3, 4, 10, 0, 60, (parse_condition("denials >= 5"),)), {"totals": {"denials": 5}},
     0, "spawn.stop:denials>=5", errno.EPERM),
])
def test_each_contract_rule_denies_with_its_rule_id(contract: Contract, tree: dict[str, object],
                                                     now: int, rule: str, code: int) -> None:
    d = check_spawn(REQ, contract, facts(**tree), now)
    assert (d.decision, d.rule, d.errno) == ("denied", rule, code)
    # one step back inside the limit, the same request is allowed
    relaxed = {k: (v - 1 if isinstance(v, int) and k != "last_spawn_ns" else v)
               for k, v in tree.items()}
    if rule == "spawn.cooldown":
        assert check_spawn(REQ, contract, facts(**tree), 12 * S).allowed
    elif rule.startswith("spawn.stop"):
        assert check_spawn(REQ, contract, facts(totals={"denials": 4}), now).allowed
    else:
        assert check_spawn(REQ, contract, facts(**relaxed), now).allowed


def test_budget_larger_than_the_remainder_is_denied() -> None:
    rem = Usage(syscalls=10, bytes_written=100, files_written=1, exec_count=0)
    ok = SpawnRequest(REQ.argv, REQ.resolved, rem)
    assert check_spawn(ok, OPEN, facts(remainder=rem), 0).allowed
    over = SpawnRequest(REQ.argv, REQ.resolved, Usage(10, 101, 1, 0))
    d = check_spawn(over, OPEN, facts(remainder=rem), 0)
    assert (d.rule, d.errno) == ("spawn.budget", errno.EDQUOT)
    assert "bytes_written" in d.reason


def test_malformed_and_unknown_commands_are_denied() -> None:
    assert check_spawn(SpawnRequest((), None, None), OPEN, facts(), 0).rule == "request.invalid"
    d = check_spawn(SpawnRequest(("nope",), None, None), OPEN, facts(), 0)
    assert (d.rule, d.errno) == ("spawn.not_found", errno.ENOENT)


def test_the_last_three_replica_slots_go_to_exactly_three_of_twenty_requests() -> None:
    contract = Contract(max_depth=2, max_replicas=5, max_spawns=100)
    tree = TreeLedger("root", BIG)
    for i in range(2):
        tree.add_child("root", f"old{i}", Usage(), 0)
    granted = []
    for i in range(20):  # the kernel serves racing requests one at a time: check, then count
        d = check_spawn(REQ, contract, tree.facts("root"), i)
        if d.allowed:
            tree.add_child("root", f"c{i}", Usage(), i)
            granted.append(i)
        else:
            assert d.rule == "spawn.max_replicas"
    assert len(granted) == 3 and tree.live_children() == 5
    tree.end("c0")
    assert check_spawn(REQ, contract, tree.facts("root"), 99).allowed


def test_siblings_share_the_parents_budget_and_every_spend_hits_the_root() -> None:
    tree = TreeLedger("root", Usage(syscalls=100, bytes_written=1000, files_written=10,
                                    exec_count=0))
    half = Usage(syscalls=50, bytes_written=600, files_written=10, exec_count=0)
    tree.add_child("root", "a", half, 0)
    tree.add_child("root", "b", half, 0)  # both fit the remainder when spawned
    tree.debit("a", bytes_written=600, files_written=1)
    assert tree.remainder("a").bytes_written == 0
    assert tree.remainder("b").bytes_written == 400  # root has 400 left, b's own cap 600
    assert tree.remainder("root").bytes_written == 400
    tree.debit("b", bytes_written=400)
    assert tree.remainder("b").bytes_written == 0 and tree.remainder("root").bytes_written == 0
    assert tree.nodes["root"].used.bytes_written == 1000
    # the policy's own quota checks see the remainder through the effective usage
    quotas = Usage(syscalls=100, bytes_written=1000, files_written=10, exec_count=0)
    assert tree.effective_usage("b", quotas).bytes_written == 1000
    assert tree.effective_usage("b", quotas).files_written == 1


def test_grandchild_budget_is_bounded_by_every_ancestor() -> None:
    tree = TreeLedger("root", BIG)
    tree.add_child("root", "a", Usage(syscalls=100, bytes_written=50, files_written=5,
                                      exec_count=1), 0)
    tree.add_child("a", "g", Usage(syscalls=100, bytes_written=50, files_written=5,
                                   exec_count=1), 0)
    assert tree.nodes["g"].depth == 2
    tree.debit("root", bytes_written=9_980)
    assert tree.remainder("g").bytes_written == 20  # the root's room is now the least
    f = tree.facts("g")
    assert f.parent_depth == 2 and f.remainder.bytes_written == 20
    d = check_spawn(SpawnRequest(REQ.argv, REQ.resolved, Usage(1, 21, 0, 0)), OPEN, f, 0)
    assert d.rule == "spawn.budget"


def test_totals_and_stop_conditions_fire_on_tree_wide_counts() -> None:
    contract = Contract(max_depth=1, max_replicas=9, max_spawns=9,
                        stop=(parse_condition("expired >= 1", kill_tree=True),))
    tree = TreeLedger("root", BIG)
    tree.add_child("root", "a", Usage(), 0)
    assert tree.fired(contract) is None
    tree.end("a", expired=True)
    tree.end("a", expired=True)  # ending twice counts once
    fired = tree.fired(contract)
    assert fired is not None and fired.kill_tree and tree.totals()["expired"] == 1


def test_spawn_facts_round_trip_for_replay() -> None:
    f = facts(parent_depth=1, live=2, spawns=3, last_spawn_ns=7, totals={"denials": 1})
    assert facts_from(facts_record(f)) == f
    rec = facts_record(f)
    bads: list[object] = [{**rec, "live": "2"}, {**rec, "remainder": {}},
                          {**rec, "kind": "exec"}, {**rec, "last_spawn_ns": 1.5}, [], None]
    for bad in bads:
        with pytest.raises(ValueError):
            facts_from(bad)
