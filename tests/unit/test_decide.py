"""The pure decision function: deterministic, ordered checks, the strictest rule wins."""

from __future__ import annotations

import errno

import pytest

from kernel import decide, policy
from kernel.decide import ExecRequest, PathFacts, Usage, WriteRequest

DEFAULT = policy.load("default")
STRICT = policy.load("strict")


def w(rel: str, op: str = "write", size: int = 5, **kw: object) -> WriteRequest:
    return WriteRequest(op=op, target=PathFacts(rel=rel), new_size=size, payload_bytes=size,
                        **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("glob", "rel", "hit"),
    [
        (".git/**", ".git/config", True),
        (".git/**", ".git", True),
        (".git/**", ".git/hooks/pre-commit", True),
        (".git/**", "src/.git/config", False),
        (".git/**", ".gitignore", False),
        (".env*", ".env", True),
        (".env*", "app/.env.local", True),
        (".env*", "environment.txt", False),
        ("*.pem", "certs/server.pem", True),
        ("*.pem", "server.pem.txt", False),
        ("docs/*.md", "docs/a.md", True),
        ("docs/*.md", "docs/sub/a.md", False),
        ("docs/**/*.md", "docs/sub/a.md", True),
        (".*", "a/.hidden/b", True),
        (".*", "a/b", False),
    ],
)
def test_glob_rules(glob: str, rel: str, hit: bool) -> None:
    assert decide.glob_matches(glob, rel) is hit


def test_plain_write_is_allowed() -> None:
    d = decide.check_write(w("src/a.txt"), DEFAULT, Usage(), 0)
    assert d.allowed and d.rule == "write.write"


@pytest.mark.parametrize("rel", [".git/config", ".ci/run", ".github/workflows/x.yml",
                                 ".env", "keys/server.pem"])
def test_protected_paths_need_approval_and_are_refused_with_that_reason(rel: str) -> None:
    d = decide.check_write(w(rel), DEFAULT, Usage(), 0)
    assert not d.allowed
    assert d.rule.startswith("protected:")
    assert "approval" in d.reason and d.errno == errno.EACCES


def test_rename_into_a_protected_path_is_refused() -> None:
    req = WriteRequest(op="rename", target=PathFacts(rel="a.txt"),
                       dest=PathFacts(rel=".git/hooks/post-checkout"))
    assert decide.check_write(req, DEFAULT, Usage(), 0).rule == "protected:.git/**"


def test_deny_beats_approval() -> None:
    d = decide.check_write(w(".env"), STRICT, Usage(), 0)
    assert d.rule == "protected:.*" and "approval" not in d.reason


def test_path_violation_comes_first() -> None:
    req = WriteRequest(op="write", target=PathFacts(rel=".git/x", violation=(
        "path.symlink", "a symlink", errno.ELOOP)))
    d = decide.check_write(req, DEFAULT, Usage(), 0)
    assert (d.rule, d.errno) == ("path.symlink", errno.ELOOP)


def test_root_cannot_be_changed() -> None:
    assert decide.check_write(w("", op="delete"), DEFAULT, Usage(), 0).rule == "path.root"


def test_quotas() -> None:
    q = DEFAULT.quotas
    d = decide.check_write(w("a", size=10), DEFAULT, Usage(bytes_written=q.bytes_written - 5), 0)
    assert (d.rule, d.errno) == ("quota.bytes_written", errno.EDQUOT)
    d = decide.check_write(w("a"), DEFAULT, Usage(files_written=q.files_written), 0)
    assert d.rule == "quota.files_written"
    assert decide.check_quota_syscalls(DEFAULT, Usage(syscalls=q.syscalls)) is not None
    assert decide.check_quota_syscalls(DEFAULT, Usage(syscalls=q.syscalls - 1)) is None


def test_file_size_and_mode_bits() -> None:
    big = DEFAULT.write.max_file_bytes + 1
    assert decide.check_write(w("a", size=big), DEFAULT, Usage(), 0).rule == \
        "write.max_file_bytes"
    d = decide.check_write(w("a", op="chmod", size=0, mode=0o4755), DEFAULT, Usage(), 0)
    assert d.rule == "write.mode"


def _exec(argv: tuple[str, ...], resolved: str | None = "/usr/bin/git") -> ExecRequest:
    return ExecRequest(argv=argv, resolved=resolved,
                       candidates={"git-read": "/usr/bin/git", "ls": "/usr/bin/ls"})


def test_exec_allowlist_and_argument_rules() -> None:
    assert decide.check_exec(_exec(("git", "status")), DEFAULT, Usage(), 0).rule == \
        "command:git-read"
    assert decide.check_exec(_exec(("git", "push")), DEFAULT, Usage(), 0).rule == \
        "command:git-read.subcommand"
    assert decide.check_exec(_exec(("git", "status", "-c", "x")), DEFAULT, Usage(), 0).rule \
        == "command:git-read.deny_args"
    assert decide.check_exec(_exec(("curl",), "/usr/bin/curl"), DEFAULT, Usage(), 0).rule == \
        "exec.not_allowlisted"
    assert decide.check_exec(_exec(("nope",), None), DEFAULT, Usage(), 0).rule == \
        "exec.not_found"
    d = decide.check_exec(_exec(("git", "status")), DEFAULT,
                          Usage(exec_count=DEFAULT.quotas.exec_count), 0)
    assert d.rule == "quota.exec_count"


def test_check_is_deterministic() -> None:
    reqs = [w(".git/x"), w("a"), w("b", size=10**12)]
    first = [decide.check_write(r, DEFAULT, Usage(), 123) for r in reqs]
    again = [decide.check_write(r, DEFAULT, Usage(), 123) for r in reqs]
    assert first == again


def test_grant_only_from_an_allowed_decision() -> None:
    allowed = decide.check_write(w("a"), DEFAULT, Usage(), 0)
    g = decide.grant(allowed, "req")
    assert g.request == "req"
    with pytest.raises(ValueError):
        decide.grant(decide.check_write(w(".git/x"), DEFAULT, Usage(), 0), "req")
    with pytest.raises(TypeError):
        decide.Grant(object(), allowed, "req")
