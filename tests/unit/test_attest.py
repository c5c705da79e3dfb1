"""Attestations: DSSE/in-toto as the standard says (test vector, securesystemslib both ways), the
documented third-party check works without this project, and tampering is caught (audit §8
cases 28 and 29 among them)."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import CryptoSigner, SSlibKey

from kernel import attest
from kernel.keys import KernelKey
from tests.unit.test_verify_tamper import build, writable

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def key() -> KernelKey:
    return KernelKey.generate()


@pytest.fixture
def run(tmp_path: Path, key: KernelKey) -> Path:
    return build(tmp_path / "runs", key)


def test_pae_matches_the_dsse_test_vector() -> None:
    assert attest.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_attestation_names_every_file_and_verifies(run: Path, key: KernelKey) -> None:
    path = attest.attest_run(run, key)
    assert path == run.parent / (run.name + ".intoto.json")
    check = attest.verify_attestation(run, path, [key.public])
    assert check.valid, check.problem
    stmt, _ = attest.check_envelope(path.read_bytes(), [key.public])
    names = {s["name"] for s in stmt["subject"]}
    assert "SEAL.json" in names and "log/events.jsonl" in names and "run.json" in names
    assert stmt["predicateType"] == "https://slsa.dev/provenance/v1"
    assert stmt["predicate"]["runDetails"]["metadata"]["invocationId"] == "run-t"


def test_securesystemslib_verifies_our_envelope(run: Path, key: KernelKey) -> None:
    path = attest.attest_run(run, key)
    env = Envelope.from_dict(json.loads(path.read_bytes()))
    # securesystemslib looks keys up by keyid (a hint; the signature still has to verify)
    ours = SSlibKey.from_crypto(key.public, keyid=key.keyid)
    env.verify([ours], 1)
    other = SSlibKey.from_crypto(KernelKey.generate().public, keyid=key.keyid)
    with pytest.raises(VerificationError):
        Envelope.from_dict(json.loads(path.read_bytes())).verify([other], 1)


def test_we_verify_an_envelope_signed_by_securesystemslib(run: Path, key: KernelKey) -> None:
    stmt = attest.statement(run)
    payload = json.dumps(stmt).encode()
    env = Envelope(payload=payload, payload_type=attest.PAYLOAD_TYPE, signatures={})
    env.sign(CryptoSigner(load_pem_private_key(key.private_pem(), None)))
    got, signer = attest.check_envelope(json.dumps(env.to_dict()).encode(), [key.public])
    assert got == stmt and signer == key.keyid


def _doc_script() -> str:
    doc = (ROOT / "docs" / "attestations.md").read_text()
    m = re.search(r"check_attestation\.py: begin.*?```python\n(.*?)```", doc, re.S)
    assert m, "the documented script is missing from docs/attestations.md"
    return m.group(1)


def test_documented_third_party_check_works_without_this_project(
        run: Path, key: KernelKey, tmp_path: Path) -> None:
    path = attest.attest_run(run, key)
    script = tmp_path / "check_attestation.py"
    script.write_text(_doc_script())
    pub = tmp_path / "kernel.pub"
    pub.write_bytes(key.public_pem())
    # -I: isolated mode, so nothing of this project is importable by the script
    r = subprocess.run([sys.executable, "-I", str(script), str(path), str(run), str(pub)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK run run-t status passed")
    bad = writable(run, tmp_path / "copy")
    (bad / "log" / "events.jsonl").write_bytes(b"x" + (bad / "log/events.jsonl").read_bytes())
    r = subprocess.run([sys.executable, "-I", str(script), str(path), str(bad), str(pub)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "does not match" in r.stderr
    other = tmp_path / "other.pub"
    other.write_bytes(KernelKey.generate().public_pem())
    r = subprocess.run([sys.executable, "-I", str(script), str(path), str(run), str(other)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "no signature verifies" in r.stderr


def _env(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_bytes())


def _problem(run: Path, env: dict, key: KernelKey, tmp_path: Path) -> str | None:  # type: ignore[type-arg]
    p = tmp_path / "edited.intoto.json"
    p.write_text(json.dumps(env))
    c = attest.verify_attestation(run, p, [key.public])
    return None if c.valid else c.problem


def test_28_payload_type_changed_is_rejected(run: Path, key: KernelKey, tmp_path: Path) -> None:
    env = _env(attest.attest_run(run, key))
    env["payloadType"] = "application/json"
    assert "payloadType" in (_problem(run, env, key, tmp_path) or "")
    # and re-signing under the other type does not help: the type is inside the signature
    other = attest.envelope(base64.b64decode(env["payload"]), key, "application/json")
    assert "payloadType" in (_problem(run, other, key, tmp_path) or "")


def test_29_keyid_changed_does_not_change_the_outcome(run: Path, key: KernelKey,
                                                      tmp_path: Path) -> None:
    env = _env(attest.attest_run(run, key))
    env["signatures"][0]["keyid"] = "ed25519:0000000000000000"
    assert _problem(run, env, key, tmp_path) is None
    forged = copy.deepcopy(env)
    forged["signatures"][0]["keyid"] = key.keyid
    sig = bytearray(base64.b64decode(forged["signatures"][0]["sig"]))
    sig[0] ^= 1
    forged["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    assert "no signature verifies" in (_problem(run, forged, key, tmp_path) or "")


def test_url_safe_base64_is_accepted(run: Path, key: KernelKey, tmp_path: Path) -> None:
    env = _env(attest.attest_run(run, key))
    env["payload"] = base64.urlsafe_b64encode(base64.b64decode(env["payload"])).decode()
    assert _problem(run, env, key, tmp_path) is None


def test_attestation_by_another_key_is_rejected(run: Path, key: KernelKey,
                                                tmp_path: Path) -> None:
    mallory = KernelKey.generate()
    env = attest.envelope(json.dumps(attest.statement(run)).encode(), mallory)
    assert "trusted" in (_problem(run, env, key, tmp_path) or "")


def test_subjects_must_be_exactly_the_folder(run: Path, key: KernelKey, tmp_path: Path) -> None:
    stmt = attest.statement(run)
    dropped = copy.deepcopy(stmt)
    dropped["subject"] = [s for s in dropped["subject"] if s["name"] != "policy.toml"]
    env = attest.envelope(json.dumps(dropped).encode(), key)
    assert "policy.toml: in the run folder but not a subject" in (
        _problem(run, env, key, tmp_path) or "")
    wrong = copy.deepcopy(stmt)
    wrong["subject"][0]["digest"]["sha256"] = "0" * 64
    env = attest.envelope(json.dumps(wrong).encode(), key)
    assert "digest differs" in (_problem(run, env, key, tmp_path) or "")
    extra = copy.deepcopy(stmt)
    extra["subject"].append({"name": "ghost", "digest": {"sha256": "0" * 64}})
    env = attest.envelope(json.dumps(extra).encode(), key)
    assert "ghost: not in the run folder" in (_problem(run, env, key, tmp_path) or "")


def test_attest_refuses_a_run_that_is_not_intact(run: Path, key: KernelKey,
                                                 tmp_path: Path) -> None:
    from kernel.errors import RunIntegrityError

    bad = writable(run, tmp_path / "copy")
    (bad / "policy.toml").write_bytes(b"edited")
    with pytest.raises(RunIntegrityError, match="corrupt"):
        attest.attest_run(bad, key)
    with pytest.raises(RunIntegrityError):
        attest.attest_run(run, KernelKey.generate())


def test_cli_verify_checks_the_sidecar(run: Path, key: KernelKey, tmp_path: Path) -> None:
    path = attest.attest_run(run, key)
    pub = tmp_path / "kernel.pub"
    pub.write_bytes(key.public_pem())
    cmd = [sys.executable, "-m", "kernel._cli", "verify", str(run), "--trust", str(pub),
           "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["attestation"]["valid"] is True
    env = _env(path)
    env["payloadType"] = "text/plain"
    path.write_text(json.dumps(env))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 5
    assert "payloadType" in json.loads(r.stdout)["attestation"]["problem"]
    shutil.rmtree(tmp_path / "copy", ignore_errors=True)
