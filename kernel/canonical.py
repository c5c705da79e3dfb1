"""Canonical JSON: the one byte form of every recorded object (a JCS-compatible subset).

UTF-8, keys sorted, no insignificant whitespace, no floats (times and amounts are integers or
strings), so the same object always hashes the same and a verifier can demand byte equality.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


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


def _clean(obj: Any) -> bool:
    """True if ``obj`` holds no float and no non-string key (what :func:`_check` checks, without
    building a path for every node: the hot path of every record)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str) or not _clean(v):
                return False
        return True
    if isinstance(obj, list | tuple):
        for v in obj:
            if not _clean(v):
                return False
        return True
    return not isinstance(obj, float)


def canonical_json(obj: Any) -> bytes:
    if not _clean(obj):
        _check(obj)  # raises, naming where the offending value is
        raise TypeError("$: not serializable as canonical JSON")  # pragma: no cover
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>``: the one digest notation used everywhere."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of(obj: Any) -> str:
    return sha256_digest(canonical_json(obj))
