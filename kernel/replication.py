"""The replication contract of ``spawn``: its policy section, the pure check, the tree ledger.

These are the decision-side pieces of SPEC §5 ``spawn``. The supervisor does not serve
``spawn`` or ``wait`` yet (both are answered ``request.invalid``); nothing here runs a process.

* :class:`SpawnPolicy` is the ``[spawn]`` profile section (strict, documented fields, like every
  other section of ``kernel/policy.py``); :func:`contract_from` loads it, parsing each stop
  condition (``denials >= 5``) into a :class:`StopCondition` or raising ``PolicyError`` naming the
  key.
* :func:`check_spawn` is pure: ``(request, contract, tree facts, now_ns) -> Decision``. Every
  fact it uses travels in :class:`TreeFacts`, which the kernel records with the decision, so a
  replay can call it again and get the same answer.
* :class:`TreeLedger` is the one ledger of an agent tree. A node's spend is debited from the node
  and every ancestor; a node may spend only while every budget on its chain has room (its
  *remainder* is the least room on the chain), so siblings together never spend more than their
  parent was given. A child's budget must fit in its parent's remainder when it is spawned.

Why siblings racing for the last slots cannot split one: the kernel serves every agent of a tree
in one single-threaded loop, and :meth:`TreeLedger.facts`, :func:`check_spawn` and
:meth:`TreeLedger.add_child` run back to back for one request before the next request is read.
Twenty spawn requests arriving together are twenty turns of that sequence; the slot counted by one
turn is seen by the next.
"""

from __future__ import annotations

import dataclasses
import errno
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kernel.decide import ALLOWED, Decision, Usage, deny
from kernel.errors import PolicyError
from kernel.policy import SPAWN_METRICS, SpawnPolicy, _build

BUDGET_FIELDS = ("syscalls", "bytes_written", "files_written", "exec_count")
"""The quotas a parent hands down to a child (the fields of :class:`~kernel.decide.Usage`)."""

METRICS = SPAWN_METRICS
"""What a stop condition may test, each a tree-wide count (see ``kernel/policy.py``)."""


OPS = (">=", ">", "==")
_COND_RE = re.compile(r"\s*([a-z_]+)\s*(>=|>|==)\s*(\d{1,18})\s*\Z")


@dataclass(frozen=True)
class StopCondition:
    metric: str
    op: str
    value: int
    kill_tree: bool = False
    text: str = ""

    def holds(self, totals: Mapping[str, int]) -> bool:
        v = totals.get(self.metric, 0)
        if self.op == ">=":
            return v >= self.value
        if self.op == ">":
            return v > self.value
        return v == self.value

    @property
    def rule(self) -> str:
        return f"spawn.stop:{self.metric}{self.op}{self.value}"


@dataclass(frozen=True)
class Contract:
    """A loaded ``[spawn]`` section with its stop conditions parsed."""

    max_depth: int = 0
    max_replicas: int = 0
    max_spawns: int = 0
    cooldown_seconds: int = 0
    expiration_seconds: int = 300
    stop: tuple[StopCondition, ...] = ()


def parse_condition(text: str, *, kill_tree: bool = False) -> StopCondition:
    """``"denials >= 5"`` -> StopCondition; ValueError saying why otherwise."""
    m = _COND_RE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not `METRIC OP N` (OP one of {', '.join(OPS)})")
    metric, op, value = m.group(1), m.group(2), int(m.group(3))
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; metrics are: {', '.join(METRICS)}")
    return StopCondition(metric, op, value, kill_tree, f"{metric} {op} {value}")


def contract_from(data: Mapping[str, Any], source: str) -> Contract:
    """Load a ``[spawn]`` table strictly (unknown keys, bad values, bad conditions:
    :class:`PolicyError` naming ``source`` and the dotted key)."""
    sp: SpawnPolicy = _build(SpawnPolicy, data, "spawn", source)
    return contract_of(sp, source)


def contract_of(sp: SpawnPolicy, source: str = "") -> Contract:
    """The contract of a loaded ``[spawn]`` section (its stop conditions parsed)."""
    conds = []
    for i, s in enumerate(sp.stop):
        try:
            conds.append(parse_condition(s.when, kill_tree=s.kill_tree))
        except ValueError as e:
            raise PolicyError(source, f"spawn.stop[{i}].when", str(e)) from None
    return Contract(sp.max_depth, sp.max_replicas, sp.max_spawns, sp.cooldown_seconds,
                    sp.expiration_seconds, tuple(conds))


# ---- the pure check --------------------------------------------------------------------------


@dataclass(frozen=True)
class SpawnRequest:
    argv: tuple[str, ...]
    resolved: str | None
    """Absolute path of ``argv[0]`` as the child's sandbox would find it; None if not found."""
    budget: Usage | None
    """The quotas asked for the child; None: the parent's whole remainder."""


@dataclass(frozen=True)
class TreeFacts:
    """What :func:`check_spawn` needs to know about the tree, recorded with the decision."""

    parent_depth: int
    live: int
    """Children alive now, whole tree (the agent `kernel exec` started is not counted)."""
    spawns: int
    """Children started so far, whole tree."""
    last_spawn_ns: int | None
    """When this parent last spawned, if ever."""
    remainder: Usage
    """The parent's remainder: the least room left on every budget of its chain."""
    totals: dict[str, int] = field(default_factory=dict)
    """Tree-wide counts the stop conditions test (:data:`METRICS`)."""


def _usage_le(a: Usage, b: Usage) -> str | None:
    for name in BUDGET_FIELDS:
        if getattr(a, name) > getattr(b, name):
            return name
    return None


def check_spawn(req: SpawnRequest, contract: Contract, facts: TreeFacts,
                now_ns: int) -> Decision:
    """Decide one ``spawn`` request. Checks in order, first denial wins: the command, the stop
    conditions, depth, total spawns, live replicas, the parent's cooldown, the budget."""
    if not req.argv:
        return deny("request.invalid", "spawn: argv must be a non-empty list", errno.EINVAL)
    if req.resolved is None:
        return deny("spawn.not_found", f"{req.argv[0]!r} is not a program the child's "
                    "sandbox can run", errno.ENOENT)
    for cond in contract.stop:
        if cond.holds(facts.totals):
            return deny(cond.rule, f"stop condition `{cond.text}` holds "
                        f"({cond.metric} = {facts.totals.get(cond.metric, 0)}): no more "
                        "spawns in this tree", errno.EPERM)
    depth = facts.parent_depth + 1
    if depth > contract.max_depth:
        return deny("spawn.max_depth", f"a child here would be at depth {depth}; the policy "
                    f"allows {contract.max_depth}", errno.EPERM)
    if facts.spawns >= contract.max_spawns:
        return deny("spawn.max_spawns", f"the tree has spawned {facts.spawns} of "
                    f"{contract.max_spawns} children", errno.EAGAIN)
    if facts.live >= contract.max_replicas:
        return deny("spawn.max_replicas", f"{facts.live} children are alive; the policy "
                    f"allows {contract.max_replicas} at once", errno.EAGAIN)
    if facts.last_spawn_ns is not None and contract.cooldown_seconds:
        ready = facts.last_spawn_ns + contract.cooldown_seconds * 1_000_000_000
        if now_ns < ready:
            ago_ms = (now_ns - facts.last_spawn_ns) // 1_000_000
            return deny("spawn.cooldown", f"this agent spawned {ago_ms} ms ago; the cooldown "
                        f"is {contract.cooldown_seconds} s", errno.EAGAIN)
    if req.budget is not None:
        over = _usage_le(req.budget, facts.remainder)
        if over is not None:
            return deny("spawn.budget", f"budget {over} = {getattr(req.budget, over)} exceeds "
                        f"the parent's remainder {getattr(facts.remainder, over)}",
                        errno.EDQUOT)
    return Decision(ALLOWED, "spawn", f"child at depth {depth}")


# ---- the tree ledger -------------------------------------------------------------------------


@dataclass
class _Node:
    parent: str | None
    depth: int
    budget: Usage
    used: Usage = field(default_factory=Usage)
    """Spend of this node and all its descendants."""
    live: bool = True
    last_spawn_ns: int | None = None


_USAGE_FIELDS = tuple(f.name for f in dataclasses.fields(Usage))


def _add(a: Usage, amounts: Mapping[str, int]) -> Usage:
    cur = {name: getattr(a, name) for name in _USAGE_FIELDS}  # asdict without its deep copy
    for k, v in amounts.items():
        cur[k] += v
    return Usage(**cur)


class TreeLedger:
    """Budgets and counts of one agent tree, mutated only by the kernel's loop."""

    def __init__(self, root: str, budget: Usage) -> None:
        self.root = root
        self.nodes: dict[str, _Node] = {root: _Node(None, 0, budget)}
        self.spawns = 0
        self.expired = 0
        self.requests = 0
        self.denials = 0

    def chain(self, run_id: str) -> list[_Node]:
        out = []
        cur: str | None = run_id
        while cur is not None:
            node = self.nodes[cur]
            out.append(node)
            cur = node.parent
        return out

    def remainder(self, run_id: str) -> Usage:
        """The least room left on every budget from ``run_id`` up to the root."""
        chain = self.chain(run_id)
        room = {}
        for name in BUDGET_FIELDS:
            room[name] = max(0, min(getattr(n.budget, name) - getattr(n.used, name)
                                    for n in chain))
        return Usage(**room)

    def effective_usage(self, run_id: str, quotas: Usage) -> Usage:
        """The usage to pass to the policy's quota checks (``check_write``, ``check_exec``) so
        that they allow exactly what the remainder allows: ``quotas - remainder``."""
        rem = self.remainder(run_id)
        return Usage(**{name: max(0, getattr(quotas, name) - getattr(rem, name))
                        for name in BUDGET_FIELDS})

    def debit(self, run_id: str, **amounts: int) -> None:
        for node in self.chain(run_id):
            node.used = _add(node.used, amounts)

    def live_children(self) -> int:
        return sum(1 for rid, n in self.nodes.items() if rid != self.root and n.live)

    def totals(self) -> dict[str, int]:
        used = self.nodes[self.root].used
        return {"denials": self.denials, "requests": self.requests,
                "bytes_written": used.bytes_written, "files_written": used.files_written,
                "exec_count": used.exec_count, "spawns": self.spawns,
                "live": self.live_children(), "expired": self.expired}

    def facts(self, parent: str) -> TreeFacts:
        node = self.nodes[parent]
        return TreeFacts(parent_depth=node.depth, live=self.live_children(), spawns=self.spawns,
                         last_spawn_ns=node.last_spawn_ns, remainder=self.remainder(parent),
                         totals=self.totals())

    def add_child(self, parent: str, child: str, budget: Usage, now_ns: int) -> None:
        """Count a granted spawn (call right after an allowed :func:`check_spawn`)."""
        if child in self.nodes:
            raise ValueError(f"run {child} is already in the tree")
        p = self.nodes[parent]
        self.nodes[child] = _Node(parent, p.depth + 1, budget)
        p.last_spawn_ns = now_ns
        self.spawns += 1

    def end(self, run_id: str, *, expired: bool = False) -> None:
        node = self.nodes[run_id]
        if node.live and expired:
            self.expired += 1
        node.live = False

    def fired(self, contract: Contract) -> StopCondition | None:
        """The first stop condition that holds now, if any."""
        totals = self.totals()
        for cond in contract.stop:
            if cond.holds(totals):
                return cond
        return None


def facts_record(f: TreeFacts) -> dict[str, Any]:
    """TreeFacts as recorded data (see ``kernel/evidence.py`` for the other facts)."""
    return {"kind": "spawn", "parent_depth": f.parent_depth, "live": f.live,
            "spawns": f.spawns, "last_spawn_ns": f.last_spawn_ns,
            "remainder": dataclasses.asdict(f.remainder), "totals": dict(sorted(f.totals.items()))}


def facts_from(d: Any) -> TreeFacts:
    """Rebuild recorded TreeFacts; ValueError if malformed."""
    if not isinstance(d, dict) or d.get("kind") != "spawn":
        raise ValueError("spawn facts: not an object of kind spawn")
    ints = {}
    for k in ("parent_depth", "live", "spawns"):
        if type(d.get(k)) is not int:
            raise ValueError(f"spawn facts: {k} must be an integer")
        ints[k] = d[k]
    last = d.get("last_spawn_ns")
    if last is not None and type(last) is not int:
        raise ValueError("spawn facts: last_spawn_ns must be an integer or null")
    rem, totals = d.get("remainder"), d.get("totals")
    if not isinstance(rem, dict) or set(rem) != set(BUDGET_FIELDS) or not all(
            type(v) is int for v in rem.values()):
        raise ValueError("spawn facts: bad remainder")
    if not isinstance(totals, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in totals.items()):
        raise ValueError("spawn facts: bad totals")
    return TreeFacts(parent_depth=ints["parent_depth"], live=ints["live"],
                     spawns=ints["spawns"], last_spawn_ns=last, remainder=Usage(**rem),
                     totals=dict(totals))
