"""Attempts to make the `write` syscall touch something outside the workspace, or hang it.

Each test plants a canary (or a victim file) outside the workspace, tries the attack through
the real prepare -> check_write -> grant -> perform path, and checks both the rule id of the
refusal and the host-side evidence: the canary is still absent, the victim unchanged.
"""

from __future__ import annotations

import base64
import errno
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from kernel.decide import Decision, Grant, Usage, check_write, grant
from kernel.paths import Workspace
from kernel.policy import Policy
from syscalls.write import perform, prepare

pytestmark = pytest.mark.adversarial

VIEW = "/workspace"
POLICY = Policy()


@dataclass
class Env:
    ws: Workspace
    root: Path
    outside: Path
    victim: Path


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    root = tmp_path / "ws"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"original")
    os.chmod(victim, 0o600)
    ws = Workspace.open(root, view_root=VIEW, hidden=["runs"])
    try:
        yield Env(ws, root, outside, victim)
    finally:
        ws.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def attempt(ws: Workspace, args: dict[str, Any]) -> tuple[str, Any]:
    """("denied", rule) | ("ok", result) | ("error", errno)."""
    prep = prepare(args, ws, POLICY)
    if isinstance(prep, Decision):
        return ("denied", prep.rule)
    req, content = prep
    d = check_write(req, POLICY, Usage(), 0)
    if not d.allowed:
        return ("denied", d.rule)
    try:
        return ("ok", perform(grant(d, req), ws, content))
    except OSError as e:
        return ("error", e.errno)


def granted(ws: Workspace, args: dict[str, Any]) -> tuple[Grant, bytes]:
    prep = prepare(args, ws, POLICY)
    assert not isinstance(prep, Decision), prep
    req, content = prep
    d = check_write(req, POLICY, Usage(), 0)
    assert d.allowed, d
    return grant(d, req), content


def victim_intact(e: Env) -> None:
    assert e.victim.read_bytes() == b"original"
    assert stat.S_IMODE(e.victim.stat().st_mode) == 0o600
    assert sorted(p.name for p in e.outside.iterdir()) == ["victim"]


class Deadline:
    """Fail (instead of hanging the suite) if the body blocks for more than ``seconds``."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def boom(signum: int, frame: FrameType | None) -> None:
            raise TimeoutError("the kernel blocked")

        self.old = signal.signal(signal.SIGALRM, boom)
        signal.alarm(self.seconds)

    def __exit__(self, *exc: object) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


WRITE_OPS_ON: list[Callable[[str], dict[str, Any]]] = [
    lambda p: {"op": "write", "path": p, "content_b64": b64(b"pwned")},
    lambda p: {"op": "create", "path": p, "content_b64": b64(b"pwned")},
    lambda p: {"op": "append", "path": p, "content_b64": b64(b"pwned")},
    lambda p: {"op": "mkdir", "path": p, "parents": True},
    lambda p: {"op": "mkdir", "path": p},
    lambda p: {"op": "delete", "path": p},
    lambda p: {"op": "chmod", "path": p, "mode": 0o777},
]


# ---------------------------------------------------------------------------------------------
# lexical escapes


@pytest.mark.parametrize("path", ["../canary", "a/../../canary", "./../canary", "..",
                                  "/workspace/../canary", "a/b/../../../canary"])
def test_dotdot_escape_refused(env: Env, path: str) -> None:
    for make in WRITE_OPS_ON:
        assert attempt(env.ws, make(path)) == ("denied", "path.outside")
    assert attempt(env.ws, {"op": "rename", "path": "x", "dest": path}) == \
        ("denied", "path.outside")
    assert not (env.root.parent / "canary").exists()
    assert sorted(p.name for p in env.root.parent.iterdir()) == ["outside", "ws"]


@pytest.mark.parametrize("path", ["/etc/kernel-canary", "/tmp/kernel-canary",
                                  "/workspace2/kernel-canary", "/kernel-canary"])
def test_absolute_outside_refused(env: Env, path: str) -> None:
    assert attempt(env.ws, {"op": "write", "path": path, "content_b64": b64(b"x")}) == \
        ("denied", "path.outside")
    assert not os.path.lexists(path)


def test_absolute_path_outside_view_root_aimed_at_real_root(env: Env) -> None:
    """The host path of the workspace is not the agent's view of it: refused, nothing made."""
    host = str(env.root / "canary")
    assert attempt(env.ws, {"op": "write", "path": host, "content_b64": b64(b"x")}) == \
        ("denied", "path.outside")
    assert not (env.root / "canary").exists()


# ---------------------------------------------------------------------------------------------
# symlinks


def test_symlink_component_to_outside(env: Env) -> None:
    (env.root / "esc").symlink_to(env.outside)
    for make in WRITE_OPS_ON:
        assert attempt(env.ws, make("esc/canary")) == ("denied", "path.symlink")
        assert attempt(env.ws, make("esc/victim")) == ("denied", "path.symlink")
    assert attempt(env.ws, {"op": "write", "path": "esc/sub/canary",
                            "content_b64": ""}) == ("denied", "path.symlink")
    victim_intact(env)


def test_symlink_component_inside_is_still_refused(env: Env) -> None:
    (env.root / "real").mkdir()
    (env.root / "in").symlink_to("real")
    (env.root / "abs_in").symlink_to(env.root / "real")
    for link in ("in", "abs_in"):
        for make in WRITE_OPS_ON:
            assert attempt(env.ws, make(f"{link}/canary")) == ("denied", "path.symlink")
    assert list((env.root / "real").iterdir()) == []


def test_dotdot_through_symlink_is_lexical_and_safe(env: Env) -> None:
    """`esc/../x` is `x` lexically; the kernel never asks where `esc` leads."""
    (env.root / "esc").symlink_to(env.outside / "deep")
    (env.outside / "deep").mkdir()
    got = attempt(env.ws, {"op": "write", "path": "esc/../canary", "content_b64": b64(b"x")})
    assert got[0] == "ok"
    assert (env.root / "canary").read_bytes() == b"x"
    assert not (env.outside / "canary").exists()


def test_final_symlink_to_outside_not_followed(env: Env) -> None:
    (env.root / "lnk").symlink_to(env.victim)
    (env.root / "dangling").symlink_to(env.outside / "canary")
    for name in ("lnk", "dangling"):
        for op in ("write", "create", "append"):
            got = attempt(env.ws, {"op": op, "path": name, "content_b64": b64(b"pwned")})
            assert got == ("denied", "path.symlink"), (name, op)
        assert attempt(env.ws, {"op": "chmod", "path": name, "mode": 0o777}) == \
            ("denied", "path.symlink")
    victim_intact(env)
    # deleting the link itself is allowed and leaves its target alone
    assert attempt(env.ws, {"op": "delete", "path": "lnk"})[0] == "ok"
    assert not os.path.lexists(env.root / "lnk")
    victim_intact(env)


def test_final_component_swapped_to_symlink_after_check(env: Env) -> None:
    (env.root / "f").write_bytes(b"ws")
    asks: dict[str, dict[str, Any]] = {
        "write": {"op": "write", "path": "f", "content_b64": b64(b"pwned")},
        "append": {"op": "append", "path": "f", "content_b64": b64(b"pwned")},
        "chmod": {"op": "chmod", "path": "f", "mode": 0o777},
    }
    grants = {op: granted(env.ws, args) for op, args in asks.items()}
    (env.root / "f").unlink()
    (env.root / "f").symlink_to(env.victim)
    for op, (g, content) in grants.items():
        with pytest.raises(OSError) as ei:
            perform(g, env.ws, content)
        assert ei.value.errno == errno.ELOOP, op
    victim_intact(env)
    assert os.readlink(env.root / "f") == str(env.victim)


def test_rename_through_symlinked_dirs(env: Env) -> None:
    (env.root / "sl").symlink_to(env.outside)
    (env.root / "f").write_bytes(b"ws")
    assert attempt(env.ws, {"op": "rename", "path": "f", "dest": "sl/canary"}) == \
        ("denied", "path.symlink")
    assert attempt(env.ws, {"op": "rename", "path": "f", "dest": "sl/victim"}) == \
        ("denied", "path.symlink")
    assert attempt(env.ws, {"op": "rename", "path": "sl/victim", "dest": "stolen"}) == \
        ("denied", "path.symlink")
    assert (env.root / "f").read_bytes() == b"ws" and not (env.root / "stolen").exists()
    victim_intact(env)


def test_rename_onto_symlink_replaces_the_link_only(env: Env) -> None:
    (env.root / "lnk").symlink_to(env.victim)
    (env.root / "f").write_bytes(b"ws")
    assert attempt(env.ws, {"op": "rename", "path": "f", "dest": "lnk"})[0] == "ok"
    assert (env.root / "lnk").read_bytes() == b"ws" and not (env.root / "lnk").is_symlink()
    victim_intact(env)


# ---------------------------------------------------------------------------------------------
# hard links, special files, hidden paths


def test_hardlink_to_outside_file(env: Env) -> None:
    os.link(env.victim, env.root / "hl")
    for args in ({"op": "chmod", "path": "hl", "mode": 0o777},
                 {"op": "append", "path": "hl", "content_b64": b64(b"pwned")},
                 {"op": "write", "path": "hl", "content_b64": b64(b"pwned")},
                 {"op": "delete", "path": "hl"},
                 {"op": "rename", "path": "hl", "dest": "moved"}):
        assert attempt(env.ws, args) == ("denied", "path.hardlink"), args
    assert (env.root / "hl").exists()
    assert env.victim.read_bytes() == b"original"
    assert stat.S_IMODE(env.victim.stat().st_mode) == 0o600


def test_hardlink_made_after_check(env: Env) -> None:
    (env.root / "f").write_bytes(b"ws")
    g, _ = granted(env.ws, {"op": "chmod", "path": "f", "mode": 0o777})
    (env.root / "f").unlink()
    os.link(env.victim, env.root / "f")
    with pytest.raises(OSError) as ei:
        perform(g, env.ws, b"")
    assert ei.value.errno == errno.EPERM
    victim_intact(env)


def test_fifo_target_never_blocks(env: Env) -> None:
    os.mkfifo(env.root / "fifo")
    with Deadline(5):
        t0 = time.monotonic()
        for args in ({"op": "write", "path": "fifo", "content_b64": b64(b"x")},
                     {"op": "append", "path": "fifo", "content_b64": b64(b"x")},
                     {"op": "chmod", "path": "fifo", "mode": 0o777},
                     {"op": "delete", "path": "fifo"}):
            assert attempt(env.ws, args) == ("denied", "path.special"), args
        assert time.monotonic() - t0 < 2
    assert stat.S_ISFIFO((env.root / "fifo").lstat().st_mode)


def test_fifo_swapped_in_after_check_never_blocks(env: Env) -> None:
    (env.root / "f").write_bytes(b"ws")
    g, content = granted(env.ws, {"op": "append", "path": "f", "content_b64": b64(b"x")})
    (env.root / "f").unlink()
    os.mkfifo(env.root / "f")
    with Deadline(5), pytest.raises(OSError) as ei:
        perform(g, env.ws, content)
    assert ei.value.errno == errno.EPERM
    assert stat.S_ISFIFO((env.root / "f").lstat().st_mode)


def test_hidden_runs_dir(env: Env) -> None:
    (env.root / "runs").mkdir()
    (env.root / "runs" / "log").write_bytes(b"record")
    for make in WRITE_OPS_ON:
        assert attempt(env.ws, make("runs/log")) == ("denied", "path.hidden")
    assert attempt(env.ws, {"op": "delete", "path": "runs"}) == ("denied", "path.hidden")
    assert attempt(env.ws, {"op": "rename", "path": "runs", "dest": "r2"}) == \
        ("denied", "path.hidden")
    assert (env.root / "runs" / "log").read_bytes() == b"record"


def test_hidden_dir_cannot_be_moved_by_its_parent(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    (root / "a" / "runs").mkdir(parents=True)
    with Workspace.open(root, view_root=VIEW, hidden=["a/runs"]) as ws:
        assert attempt(ws, {"op": "rename", "path": "a", "dest": "b"}) == \
            ("denied", "path.hidden")
        assert attempt(ws, {"op": "rename", "path": "a/runs", "dest": "x"}) == \
            ("denied", "path.hidden")
        assert attempt(ws, {"op": "write", "path": "a/other", "content_b64": ""})[0] == "ok"
    assert (root / "a" / "runs").is_dir()


# ---------------------------------------------------------------------------------------------
# bytes and lengths


@pytest.mark.parametrize("path", ["a\x00b", "canary\n", "\x1b]0;title\x07", "a\x7f", "a\x9bb",
                                  "a\udcffb"])
def test_control_bytes(env: Env, path: str) -> None:
    assert attempt(env.ws, {"op": "write", "path": path, "content_b64": ""}) == \
        ("denied", "path.bad_bytes")
    assert list(env.root.iterdir()) == []


@pytest.mark.parametrize("path", ["n" * 256, "d/" * 520 + "f", "ü" * 200])
def test_over_long(env: Env, path: str) -> None:
    assert attempt(env.ws, {"op": "mkdir", "path": path, "parents": True}) == \
        ("denied", "path.too_long")
    assert list(env.root.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# races: another process swaps things while perform runs


def _swapper(root: Path, name: str, target: Path, stop: threading.Event,
             swaps: list[int]) -> None:
    real = root / (name + ".real")
    link = root / name
    while not stop.is_set():
        try:
            os.rename(link, real)
            os.symlink(target, link)
            os.unlink(link)
            os.rename(real, link)
            swaps[0] += 1
        except OSError:
            pass


def test_race_dir_swapped_for_symlink(env: Env) -> None:
    (env.root / "d").mkdir()
    (env.root / "d" / "f").write_bytes(b"ws")
    attacks: dict[str, dict[str, Any]] = {
        "write": {"op": "write", "path": "d/canary", "content_b64": b64(b"pwned")},
        "create": {"op": "create", "path": "d/canary2", "content_b64": b64(b"pwned")},
        "mkdir": {"op": "mkdir", "path": "d/canary3/x", "parents": True},
        "rename": {"op": "rename", "path": "d/f", "dest": "d/victim"},
        "delete": {"op": "delete", "path": "d/victim"},
        "chmod": {"op": "chmod", "path": "d/victim", "mode": 0o777},
    }
    (env.root / "d" / "victim").write_bytes(b"inside")
    grants = {k: granted(env.ws, v) for k, v in attacks.items()}
    stop = threading.Event()
    swaps = [0]
    t = threading.Thread(target=_swapper, args=(env.root, "d", env.outside, stop, swaps))
    t.start()
    outcomes: dict[str, int] = {}
    try:
        # Run at least 3 s and 500 rounds, and on until the race was both hit (ELOOP) and
        # missed (ok), so a loaded machine cannot make the test pass without exercising it;
        # 30 s at most.
        start = time.monotonic()
        n = 0

        def exercised() -> bool:
            return (any(k.endswith(":ELOOP") for k in outcomes)
                    and any(k.endswith(":ok") for k in outcomes))

        while (time.monotonic() - start < 3.0 or n < 500 or not exercised()) \
                and time.monotonic() - start < 30.0:
            for k, (g, content) in grants.items():
                try:
                    perform(g, env.ws, content)
                    outcomes[k + ":ok"] = outcomes.get(k + ":ok", 0) + 1
                except OSError as e:
                    key = f"{k}:{errno.errorcode.get(e.errno or 0, e.errno)}"
                    outcomes[key] = outcomes.get(key, 0) + 1
            n += 1
    finally:
        stop.set()
        t.join()
    assert swaps[0] > 0
    victim_intact(env)
    assert any(k.endswith(":ELOOP") for k in outcomes), outcomes  # the race was really hit
    assert any(k.endswith(":ok") for k in outcomes), outcomes


def test_race_final_component_swapped_for_symlink(env: Env) -> None:
    (env.root / "f").write_bytes(b"ws")
    os.chmod(env.root / "f", 0o644)
    grants = [granted(env.ws, {"op": "append", "path": "f", "content_b64": ""}),
              granted(env.ws, {"op": "chmod", "path": "f", "mode": 0o644}),
              granted(env.ws, {"op": "write", "path": "f", "content_b64": b64(b"ws")})]
    stop = threading.Event()
    swaps = [0]

    def swap() -> None:
        p = env.root / "f"
        tmp = env.root / "f.real"
        while not stop.is_set():
            try:
                os.rename(p, tmp)
                os.symlink(env.victim, p)
                os.rename(tmp, p)  # atomically back to a regular file
                swaps[0] += 1
            except OSError:
                pass

    t = threading.Thread(target=swap)
    t.start()
    errors: set[int] = set()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for g, content in grants:
                try:
                    perform(g, env.ws, content)
                except OSError as e:
                    errors.add(e.errno or 0)
    finally:
        stop.set()
        t.join()
    assert swaps[0] > 0
    victim_intact(env)
    assert errors <= {errno.ELOOP, errno.ENOENT, errno.EAGAIN, errno.EPERM}, errors
