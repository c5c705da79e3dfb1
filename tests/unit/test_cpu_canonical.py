"""The faster hot-path helpers write and accept exactly what the plain versions did.

``canonical_json`` (orjson for plain values, the json module otherwise), ``blob_refs``,
``utc_timestamp`` and the wire ABI's ``encode_frame`` / ``decode_body`` are compared with the
straightforward implementations they replaced, on random values (hypothesis).
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel import recorder
from kernel.canonical import canonical_json
from syscalls import abi

SETTINGS = settings(max_examples=600, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---- the reference implementations (as they were) --------------------------------------------

def _ref_check(obj: Any, where: str = "$") -> None:
    if isinstance(obj, float):
        raise TypeError(f"{where}: floats are not allowed in recorded data")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: non-string key {k!r}")
            _ref_check(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _ref_check(v, f"{where}[{i}]")


def ref_canonical_json(obj: Any) -> bytes:
    _ref_check(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _outcome(f: Any, obj: Any) -> tuple[str, Any]:
    try:
        return "ok", f(obj)
    except Exception as e:  # the kind and message are what is compared
        return type(e).__name__, str(e)


def ref_utc_timestamp(ns: int) -> str:
    t = _dt.datetime.fromtimestamp(ns // 1_000_000_000, tz=_dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{(ns // 1000) % 1_000_000:06d}Z"


def ref_encode_frame(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return abi.HEADER.pack(len(data.encode("utf-8"))) + data.encode("utf-8")


def _ref_no_duplicates(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise abi.FrameError(f"duplicate key {k!r}")
        out[k] = v
    return out


def ref_decode_body(data: bytes) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise abi.FrameError(f"frame is not UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_ref_no_duplicates,
                         parse_constant=abi._no_constants)
    except abi.FrameError:
        raise
    except (ValueError, RecursionError) as e:
        raise abi.FrameError(f"frame is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise abi.FrameError(f"frame must hold a JSON object, not {type(obj).__name__}")
    return obj


# ---- strategies --------------------------------------------------------------------------------

class Color(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    LOW = 3


class Name(enum.StrEnum):
    A = "a"


class MyStr(str):
    pass


class MyInt(int):
    pass


_text = st.text(alphabet=st.characters(codec=None), max_size=12)  # any code point, surrogates too
_keys = st.one_of(_text, st.sampled_from(["a", "b", "é", "\U0001f600", "\x7f", "\u2028",
                                         "content_blob", "blobs", "x_blobs"]))
_ints = st.one_of(st.integers(-(2**70), 2**70),
                  st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]))
_scalars = st.one_of(st.none(), st.booleans(), _ints, _text)
_odd = st.one_of(st.floats(allow_nan=True), st.sampled_from(
    [Color.RED, Level.LOW, Name.A, MyStr("s"), MyInt(7), b"bytes", OrderedDict(b=1, a=2),
     _dt.date(2026, 1, 2)]))
_plain_values = st.recursive(
    _scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.lists(kids, max_size=3).map(tuple),
                           st.dictionaries(_keys, kids, max_size=4)),
    max_leaves=25)
_any_values = st.recursive(
    st.one_of(_scalars, _odd),
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.one_of(_keys, st.integers(0, 3)), kids, max_size=4)),
    max_leaves=25)


# ---- canonical JSON ----------------------------------------------------------------------------

@SETTINGS
@given(_plain_values)
def test_canonical_json_matches_json_module_on_plain_values(obj: Any) -> None:
    assert _outcome(canonical_json, obj) == _outcome(ref_canonical_json, obj)


@SETTINGS
@given(_any_values)
def test_canonical_json_matches_json_module_on_any_values(obj: Any) -> None:
    assert _outcome(canonical_json, obj) == _outcome(ref_canonical_json, obj)


def _nested(depth: int) -> list[Any]:
    out: list[Any] = []
    for _ in range(depth):
        out = [out]
    return out


@pytest.mark.parametrize("obj", [
    {"n": 2**64}, [-(2**63) - 1], "\ud800", {"\udfff": 1}, {"a": 1.5}, {1: "x"}, Color.RED,
    Level.LOW, {"e": Name.A}, [MyInt(5)], OrderedDict(b=1, a=2), _dt.date(2026, 1, 2),
    _nested(70),
])
def test_canonical_json_edge_cases(obj: Any) -> None:
    assert _outcome(canonical_json, obj) == _outcome(ref_canonical_json, obj)


def test_canonical_json_deep_nesting_falls_back() -> None:
    deep: Any = 0
    for _ in range(300):  # deeper than orjson accepts
        deep = {"k": [deep]}
    assert canonical_json(deep) == ref_canonical_json(deep)


# ---- blob references ---------------------------------------------------------------------------

_digest = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).map(
    lambda h: "sha256:" + h)
_ref_values = st.one_of(_digest, st.none(), st.integers(), st.sampled_from(
    ["sha256:" + "A" * 64, "md5:abcd", "sha256:12", ""]), st.lists(_digest, max_size=3))
_bodies = st.recursive(
    st.one_of(_scalars, _ref_values),
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(["content_blob", "blobs", "out_blobs", "a",
                                                   "blob", "x_blob_y", "args"]), _text,
                                  st.integers(0, 2)), kids, max_size=4)),
    max_leaves=20)


def _ref_blob_refs(body: Any) -> list[str]:
    return [d for _, d in recorder.iter_blob_refs(body)]


@SETTINGS
@given(_bodies)
def test_blob_refs_match_iter_blob_refs(body: Any) -> None:
    assert _outcome(recorder.blob_refs, body) == _outcome(_ref_blob_refs, body)


# ---- timestamps --------------------------------------------------------------------------------

@SETTINGS
@given(st.lists(st.integers(0, 4_102_444_800 * 10**9), min_size=1, max_size=5))
def test_utc_timestamp_matches_strftime(stamps: list[int]) -> None:
    for ns in [*stamps, stamps[0] + 1, stamps[0] + 999_999_999, stamps[0] + 10**9]:
        assert recorder.utc_timestamp(ns) == ref_utc_timestamp(ns)


# ---- wire frames -------------------------------------------------------------------------------

@SETTINGS
@given(st.dictionaries(_keys, _plain_values, max_size=5))
def test_encode_frame_matches_json_dumps(obj: dict[str, Any]) -> None:
    assert _outcome(abi.encode_frame, obj) == _outcome(ref_encode_frame, obj)


_frames = st.one_of(
    st.binary(max_size=40),
    _plain_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "replace")),
    st.sampled_from([b'{"a":1,"a":2}', b'{"a":{"b":1,"b":2},"c":3}', b'{"a":1,"b":2,"a":3,"b":4}',
                     "\ufeff{}".encode(), b'{"x": NaN}', b'{"x": -Infinity}', b"[1]", b"",
                     b'{"x": 1.5e3}', b'{"k": "\\ud800"}', b"\xff{}", b'{"a":1} x']),
)


@SETTINGS
@given(_frames)
def test_decode_body_matches_json_loads(data: bytes) -> None:
    assert _outcome(abi.decode_body, data) == _outcome(ref_decode_body, data)
