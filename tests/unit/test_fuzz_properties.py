"""Property tests (hypothesis) for the parsers that take agent or operator input.

* path resolution: any byte string either resolves to a path beneath the workspace root or is
  rejected, and never reads through a symlink that points out (a fixed tree full of hostile
  links: absolute, relative ``../..``, to ``/``, to a secret outside, loops);
* the frame decoder: any bytes decode to one JSON object or a ``FrameError``, nothing else; valid
  frames survive any split into chunks; the request checker never raises;
* the policy loader: any bytes, and any mutation of the shipped profiles, load to a valid policy
  or fail with a ``PolicyError`` naming the problem, nothing else.

The string normalizer's own property test is in test_paths.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import tempfile
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel import policy as policy_mod
from kernel.errors import PolicyError
from kernel.paths import PathViolation, Workspace, normalize, open_dir_beneath
from kernel.policy import Limits, WritePolicy
from kernel.supervisor import Channel, _frame_problem
from syscalls import abi

ROOT = Path(__file__).resolve().parents[2]
VIEW = "/workspace"
SECRET = b"OUTSIDE-SECRET"
SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# --- path resolution ---------------------------------------------------------------------------

_NAMES = ["a", "b", "f.txt", "up", "abs", "root", "loop", "self", "dotdot", "..", ".", "secret",
          "outside", "d", "deep"]


@cache
def _tree() -> tuple[Path, Path]:
    """A workspace whose links all try to leave it; built once per test process."""
    base = Path(tempfile.mkdtemp(prefix="fuzz-paths-"))
    root = base / "ws"
    (root / "a" / "b" / "d").mkdir(parents=True)
    (root / "f.txt").write_bytes(b"inside")
    (root / "a" / "f.txt").write_bytes(b"inside")
    (base / "outside").mkdir()
    (base / "outside" / "secret").write_bytes(SECRET)
    (base / "secret").write_bytes(SECRET)
    for where in (root, root / "a", root / "a" / "b"):
        os.symlink("../../outside", where / "up")
        os.symlink(str(base / "outside"), where / "abs")
        os.symlink("/", where / "root")
        os.symlink("loop", where / "loop")
        os.symlink(".", where / "self")
        os.symlink("..", where / "dotdot")
        os.symlink(str(base / "secret"), where / "secret")
        os.symlink("../../../secret", where / "deep")
    return root, base


_segment = st.one_of(st.sampled_from(_NAMES), st.text(max_size=6))
_raw_paths = st.one_of(
    st.lists(_segment, max_size=8).map("/".join),
    st.lists(_segment, max_size=8).map(lambda p: VIEW + "/" + "/".join(p)),
    st.binary(max_size=64).map(lambda b: b.decode("utf-8", "surrogateescape")),
)


def _real(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@SETTINGS
@given(_raw_paths)
def test_any_path_resolves_beneath_the_root_or_is_rejected(raw: str) -> None:
    root, _ = _tree()
    rel = normalize(raw, view_root=VIEW, limits=WritePolicy())
    if isinstance(rel, tuple):
        assert rel[0].startswith("path.")
        return
    with Workspace.open(root, view_root=VIEW) as ws:
        facts = ws.facts(rel)  # never raises for the path
        assert facts.rel == rel
        try:
            data = ws.read_file(rel, 1 << 16)
        except (PathViolation, OSError):
            data = None
        assert data in (None, b"inside"), (raw, rel, data)
        try:
            fd = open_dir_beneath(ws.fd, rel)
        except OSError:
            return
        try:
            real = _real(fd)
        finally:
            os.close(fd)
        assert real == str(root) or real.startswith(str(root) + "/"), (raw, rel, real)


# --- frame decoder ------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=20)
_objects = st.dictionaries(st.text(max_size=8), _json, max_size=6)


@SETTINGS
@given(st.one_of(st.binary(max_size=512), _json.map(lambda v: json.dumps(v).encode()),
                 st.text(max_size=200).map(str.encode)))
def test_decode_body_returns_an_object_or_a_frame_error(data: bytes) -> None:
    try:
        obj = abi.decode_body(data)
    except abi.FrameError as e:
        assert str(e)
        return
    assert isinstance(obj, dict)
    assert abi.decode_body(abi.encode_frame(obj)[abi.HEADER.size:]) == obj
    problem = _frame_problem(obj)  # the request checker never raises
    assert problem is None or isinstance(problem, str)


def _channel() -> tuple[Channel, socket.socket]:
    a, b = socket.socketpair()
    return Channel(a), b


@SETTINGS
@given(st.lists(_objects, min_size=1, max_size=6), st.lists(st.integers(1, 64), max_size=20))
def test_frames_survive_any_split_into_chunks(objs: list[dict[str, Any]],
                                              cuts: list[int]) -> None:
    stream = b"".join(abi.encode_frame(o) for o in objs)
    ch, other = _channel()
    try:
        got: list[dict[str, Any]] = []
        pos = 0
        sizes = cuts or [len(stream)]
        i = 0
        while pos < len(stream):
            n = sizes[i % len(sizes)]
            ch.inbuf += stream[pos:pos + n]
            pos += n
            i += 1
            while (f := ch.next_frame()) is not None:
                got.append(f)
        assert got == objs
        assert not ch.inbuf
    finally:
        ch.sock.close()
        other.close()


@SETTINGS
@given(st.binary(max_size=1024))
def test_any_byte_stream_gives_frames_or_a_frame_error(stream: bytes) -> None:
    ch, other = _channel()
    try:
        ch.inbuf += stream
        for _ in range(len(stream) + 1):
            try:
                f = ch.next_frame()
            except abi.FrameError:
                return
            if f is None:
                return
            assert isinstance(f, dict)
    finally:
        ch.sock.close()
        other.close()


# --- policy loader -------------------------------------------------------------------------------

_toml_scalar = st.one_of(st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=20),
                         st.floats())
_toml_value = st.recursive(
    _toml_scalar,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.from_regex(r"[a-z_]{1,12}", fullmatch=True), kids, max_size=4),
    max_leaves=12)


def _toml(v: Any) -> str:
    """Inline TOML for any value (strings JSON-escaped: a bad escape is itself a test input)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"


@cache
def _profiles() -> list[dict[str, Any]]:
    return [tomllib.loads(p.read_text()) for p in sorted((ROOT / "policies").glob("*.toml"))]


def _mutate(doc: dict[str, Any], path: list[int], value: Any, action: int) -> dict[str, Any]:
    """Replace, delete or add one key somewhere in ``doc`` (``path`` picks where)."""
    doc = json.loads(json.dumps(doc))
    node: Any = doc
    for step in path:
        kids = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) \
            if isinstance(node, list) else []
        kids = [(k, v) for k, v in kids if isinstance(v, (dict, list))]
        if not kids:
            break
        node = kids[step % len(kids)][1]
    if isinstance(node, dict):
        keys = sorted(node)
        if action == 0 and keys:
            node[keys[len(path) % len(keys)]] = value
        elif action == 1 and keys:
            del node[keys[len(path) % len(keys)]]
        else:
            node["fuzz_key"] = value
    elif isinstance(node, list):
        node.append(value)
    return doc


def _check_load(raw: bytes) -> None:
    try:
        p = policy_mod.load_bytes(raw, source="fuzz.toml")
    except PolicyError as e:
        assert e.file == "fuzz.toml" and e.why
        return
    for f in dataclasses.fields(Limits):
        v = getattr(p.limits, f.name)
        assert isinstance(v, int) and f.metadata["min"] <= v <= f.metadata["max"], f.name
    assert policy_mod.load_bytes(raw, source="fuzz.toml").digest == p.digest


@SETTINGS
@given(st.binary(max_size=512))
def test_any_bytes_load_or_fail_with_a_policy_error(raw: bytes) -> None:
    _check_load(raw)


@SETTINGS
@given(st.integers(0, 1), st.lists(st.integers(0, 20), max_size=4), _toml_value,
       st.integers(0, 2))
def test_mutated_profiles_load_valid_or_fail_with_a_policy_error(
        which: int, path: list[int], value: Any, action: int) -> None:
    docs = _profiles()
    doc = _mutate(docs[which % len(docs)], path, value, action)
    raw = "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in doc.items()).encode()
    _check_load(raw)


def test_the_inline_writer_round_trips_the_shipped_profiles() -> None:
    # Without this, a writer bug would turn every mutation into a parse error and the test above
    # would never reach validation.
    for doc in _profiles():
        raw = "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in doc.items()).encode()
        assert policy_mod.load_bytes(raw, source="fuzz.toml") is not None
