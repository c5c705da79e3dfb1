"""Canonical JSON: the one byte form of every recorded object (a JCS-compatible subset).

UTF-8, keys sorted, no insignificant whitespace, no floats (times and amounts are integers or
strings), so the same object always hashes the same and a verifier can demand byte equality.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson


def _check(obj: Any, where: str = "$") -> None:
    if isinstance(obj, float):
        raise TypeError(f"{where}: floats are not allowed in recorded data")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: non-string key {k!r}")
            _check(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check(v, f"{where}[{i}]")


_SCALARS = frozenset({str, int, bool, type(None)})
"""Exact types that are always clean: leaves are checked here without a call per value."""


def _clean(obj: Any) -> bool:
    """True if ``obj`` holds no float and no non-string key (what :func:`_check` checks, without
    building a path for every node: the hot path of every record)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                return False
            if type(v) not in _SCALARS and not _clean(v):
                return False
        return True
    if isinstance(obj, list | tuple):
        for v in obj:
            if type(v) not in _SCALARS and not _clean(v):
                return False
        return True
    return not isinstance(obj, float)


def _plain(obj: Any) -> bool:
    """True if ``obj`` is made only of dicts with string keys, lists, tuples, strings, ints, bools
    and None, each of exactly that type (no subclass, no float): values that orjson writes byte for
    byte as the json module below does (tests/unit/test_cpu_canonical.py compares the two)."""
    t = type(obj)
    if t is dict:
        for k, v in obj.items():
            if type(k) is not str:
                return False
            if type(v) not in _SCALARS and not _plain(v):
                return False
        return True
    if t is list or t is tuple:
        for v in obj:
            if type(v) not in _SCALARS and not _plain(v):
                return False
        return True
    return t in _SCALARS


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                            allow_nan=False)
"""What ``json.dumps`` with these options builds on every call, built once."""


def canonical_json(obj: Any) -> bytes:
    if _plain(obj):
        try:
            return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass  # an int beyond 64 bits, a lone surrogate, deep nesting: as the json module says
    if not _clean(obj):
        _check(obj)  # raises, naming where the offending value is
        raise TypeError("$: not serializable as canonical JSON")  # pragma: no cover
    return _ENCODER.encode(obj).encode("utf-8")


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>``: the one digest notation used everywhere."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of(obj: Any) -> str:
    return sha256_digest(canonical_json(obj))
