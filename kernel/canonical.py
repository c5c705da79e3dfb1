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


def canonical_json(obj: Any) -> bytes:
    _check(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>``: the one digest notation used everywhere."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of(obj: Any) -> str:
    return sha256_digest(canonical_json(obj))
