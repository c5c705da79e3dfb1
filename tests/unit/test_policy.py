"""Policy loading: strict, every error names the file, the key and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel import policy
from kernel.errors import ExitCode, PolicyError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["default", "strict"])
def test_shipped_profiles_load_with_a_description(name: str) -> None:
    p = policy.load(name)
    assert p.description.strip()
    assert p.digest.startswith("sha256:") and len(p.digest) == 71
    assert p.raw == (ROOT / "policies" / f"{name}.toml").read_bytes()


def test_default_protects_repository_ci_and_secret_files() -> None:
    globs = {r.glob: r.action for r in policy.load("default").protected}
    for g in (".git/**", ".ci/**", ".github/**", ".env*", "*.pem"):
        assert globs[g] == "approval"


def test_strict_requires_native_isolation() -> None:
    assert policy.load("strict").sandbox.isolation == "native"


def _load(tmp_path: Path, text: str) -> policy.Policy:
    f = tmp_path / "p.toml"
    f.write_text('description = "t"\n' + text)
    return policy.load(str(f))


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("colour = 1\n", "colour", "unknown key"),
        ("[sandbox]\nisolaton = 'native'\n", "sandbox.isolaton", "unknown key"),
        ("[sandbox]\nisolation = 'docker'\n", "sandbox.isolation", "not one of"),
        ("[sandbox]\nnetwork = 'on'\n", "sandbox.network", "not one of"),
        ("[limits]\nmemory_mb = 'lots'\n", "limits.memory_mb", "expected an integer"),
        ("[limits]\nmemory_mb = 1\n", "limits.memory_mb", "below the minimum"),
        ("[limits]\nprocesses = true\n", "limits.processes", "expected an integer"),
        ("[quotas]\nsyscalls = 0\n", "quotas.syscalls", "below the minimum"),
        ("[env]\npassthrough = 'HOME'\n", "env.passthrough", "expected a list"),
        ("[env]\nset = { KERNEL_X = '1' }\n", "env.set.KERNEL_X", "kernel's own"),
        ("[[protected]]\nglob = '/etc/**'\n", "protected[0].glob", "relative"),
        ("[[protected]]\nglob = 'a'\naction = 'ask'\n", "protected[0].action", "not one of"),
        ("[[commands]]\nid = 'Bad Id'\nprogram = 'ls'\n", "commands[0].id", "lowercase"),
        ("[[commands]]\nid = 'a'\nprogram = 'bin/ls'\n", "commands[0].program", "absolute"),
        ("[[commands]]\nid='a'\nprogram='ls'\n[[commands]]\nid='a'\nprogram='cat'\n",
         "commands[1].id", "duplicate"),
        ("[[commands]]\nid = 'a'\nprogram = 'ls'\ntimeout_seconds = 0\n",
         "commands[0].timeout_seconds", "below the minimum"),
        ("[sandbox]\nread_paths = ['opt']\n", "sandbox.read_paths", "absolute"),
    ],
)
def test_bad_profiles_name_file_key_and_why(tmp_path: Path, text: str, key: str,
                                            why: str) -> None:
    with pytest.raises(PolicyError) as ei:
        _load(tmp_path, text)
    e = ei.value
    assert e.file == str(tmp_path / "p.toml")
    assert e.key == key
    assert why in e.why
    assert e.exit_code == ExitCode.POLICY
    assert str(tmp_path / "p.toml") in e.diagnostics() and key in e.diagnostics()


def test_missing_description_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[sandbox]\nisolation = 'native'\n")
    with pytest.raises(PolicyError, match="description"):
        policy.load(str(f))


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("description = \n")
    with pytest.raises(PolicyError, match="invalid TOML"):
        policy.load(str(f))
    with pytest.raises(PolicyError, match="file not found"):
        policy.load(str(tmp_path / "nope.toml"))
    with pytest.raises(PolicyError, match="no such profile"):
        policy.load("no-such-profile")


def test_digest_binds_exact_bytes(tmp_path: Path) -> None:
    a = _load(tmp_path, "")
    f = tmp_path / "p.toml"
    f.write_text('description = "t"\n\n')
    b = policy.load(str(f))
    assert a.digest != b.digest


def test_policy_reference_is_generated_from_the_field_docs() -> None:
    doc = (ROOT / "docs" / "policy-reference.md").read_text()
    assert doc == policy.reference_markdown(), (
        "docs/policy-reference.md is stale: run `python -m kernel.policy --reference "
        "> docs/policy-reference.md`")
