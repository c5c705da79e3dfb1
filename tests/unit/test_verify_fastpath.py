"""kernel verify's fast path (orjson) never accepts a log line the exact judge (the json module
with its hooks, kernel/verify.py) would refuse, and agrees on the value when it accepts."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.verify import _dumps, _fast_canonical, _loads

SETTINGS = settings(max_examples=600, deadline=None)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.sampled_from(["2026-11-22T18:30:11.123456Z", ":1.5,", "\u2028", "\x00\x1f\x7f", "é𝄞"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20)
objects = st.dictionaries(st.text(max_size=6), values, max_size=6)


def exact(line: bytes) -> Any:
    """What the exact judge says: the value, or None for a refusal."""
    try:
        text = line.decode("utf-8")
        ev = _loads(text)
        return ev if _dumps(ev) == text else None
    except (ValueError, RecursionError):
        return None


def check(line: bytes) -> None:
    fast = _fast_canonical(line)
    if fast is not None:
        want = exact(line)
        assert want is not None, line
        assert fast == want, line


@SETTINGS
@given(objects)
def test_canonical_lines_agree(obj: dict[str, Any]) -> None:
    line = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False
                      ).encode("utf-8", "surrogatepass")
    check(line)
    has_float = "." in line.decode("utf-8", "replace") or "e" in line.decode("utf-8", "replace")
    if exact(line) is not None and not has_float:
        assert _fast_canonical(line) is not None or any(
            abs(v) >= 2**63 for v in _ints(obj)), line  # the fast path takes the plain lines


@SETTINGS
@given(objects, st.data())
def test_mutated_lines_are_never_wrongly_accepted(obj: dict[str, Any], data: st.DataObject
                                                  ) -> None:
    line = bytearray(json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if line:
        i = data.draw(st.integers(0, len(line) - 1))
        line[i] = data.draw(st.integers(0, 255))
    check(bytes(line))


def test_floats_and_odd_forms_go_to_the_exact_judge() -> None:
    for line in (b'{"a":1.5}', b'{"a":[1e5]}', b'{"a":-2.0E-3}', b'{"b":1,"a":2}',
                 b'{"a":1,"a":1}', b'{"a": 1}', b'{"a":"\\u00e9"}', b'[1]', b'{"a":NaN}',
                 b'{"a":18446744073709551616}'):
        assert _fast_canonical(line) is None, line
    assert _fast_canonical(b'{"a":"x:1.5,"}') == {"a": "x:1.5,"}  # a float-like string


def _ints(o: Any) -> list[int]:
    if isinstance(o, bool):
        return []
    if isinstance(o, int):
        return [o]
    if isinstance(o, dict):
        return [i for v in o.values() for i in _ints(v)]
    if isinstance(o, list):
        return [i for v in o for i in _ints(v)]
    return []
