"""`kernel replay` on real runs: identical when untouched; the first divergence named (seq,
expected, actual) when an insider holding the kernel key rewrites evidence so that `verify`
still says intact (audit §8 cases 19, 40, 41, 43, and a rewritten gate report)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kernel import keys
from kernel.canonical import canonical_json
from kernel.keys import KernelKey
from kernel.recorder import RUN_SIG_DOMAIN
from kernel.replay import replay_run
from kernel.verify import verify_run
from tests.kernel_helpers import CLIENT_PRELUDE, Run, kernel_cmd, run_agent, skip_unless_available
from tests.unit.test_verify_tamper import events, rechain, reseal, writable

AGENT = CLIENT_PRELUDE + """
k.write("new.txt", b"hello\\n")
k.append("new.txt", b"more\\n")
k.mkdir("d/e", parents=True)
k.rename("new.txt", "d/e/moved.txt")
k.chmod("a.txt", 0o600)
attempt("git", lambda: k.write(".git/config", b"[core]\\n"))
attempt("escape", lambda: k.write("../escape", b"x"))
attempt("missing", lambda: k.delete("nope.txt"))
k.delete("sub/b.txt")
attempt("exec", lambda: k.exec(["python3", "-c", "open('made.txt','w').write('by exec')"]))
attempt("rm", lambda: k.exec(["rm", "-rf", "x"]))
k.info()
attempt("badinfo", lambda: k.call("info", {"x": 1}))
k.write("last.txt", b"end\\n")
"""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Run:
    skip_unless_available("native")
    tmp = tmp_path_factory.mktemp("replay")
    run = run_agent(tmp, AGENT, backend="native",
                    files={"a.txt": "a\n", "sub/b.txt": "b\n", "README.md": "r\n"})
    assert run.out["status"] == "passed", run.proc.stderr
    return run


def kernel_key(run: Run) -> KernelKey:
    return keys.load_or_create_kernel_key(run.home)


@pytest.fixture
def copy(recorded: Run, tmp_path: Path) -> Path:
    return writable(recorded.run_dir, tmp_path)


def test_untouched_run_replays_identically(recorded: Run) -> None:
    rep = replay_run(recorded.run_dir, [kernel_key(recorded).public])
    assert rep.status == "identical", rep.to_json()
    assert rep.initial_source == "blobs"
    # every request was re-decided: write, exec, captured changes; the invalid path too
    assert rep.rederived >= 11 and rep.applied >= 8, rep.to_json()


def test_replay_from_a_given_workspace(recorded: Run, tmp_path: Path) -> None:
    ws = tmp_path / "initial"
    ws.mkdir()
    (ws / "a.txt").write_text("a\n")
    (ws / "sub").mkdir()
    (ws / "sub" / "b.txt").write_text("b\n")
    (ws / "README.md").write_text("r\n")
    shutil.copy(recorded.workspace / "agent.py", ws / "agent.py")
    for p in [ws, ws / "sub", *ws.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    rep = replay_run(recorded.run_dir, [kernel_key(recorded).public], workspace=ws)
    assert rep.status == "identical", rep.to_json()
    (ws / "README.md").write_text("changed\n")
    rep = replay_run(recorded.run_dir, [kernel_key(recorded).public], workspace=ws)
    assert rep.status == "diverged"
    assert rep.divergence is not None and "does not match the initial manifest" in \
        rep.divergence.what and "README.md" in str(rep.divergence.actual)


def _resign_run_json(run_dir: Path, key: KernelKey, edit: Any) -> None:
    hdr = json.loads((run_dir / "run.json").read_bytes())
    edit(hdr)
    data = canonical_json(hdr)
    (run_dir / "run.json").write_bytes(data)
    (run_dir / "run.json.sig").write_bytes(canonical_json(
        {"keyid": key.keyid, "sig": key.sign(RUN_SIG_DOMAIN + data).hex()}))


def _intact(run_dir: Path, key: KernelKey) -> None:
    v = verify_run(run_dir, [key.public])
    assert v.status == "intact", v.problem


def test_40_decision_flipped_and_resigned_diverges(recorded: Run, copy: Path) -> None:
    key = kernel_key(recorded)
    evs = events(copy)
    target = next(e for e in evs if e["type"] == "syscall.decision"
                  and e["body"]["rule"] == "exec.not_allowlisted")
    target["body"].update(decision="allowed", rule="command:rm", errno=0)
    rechain(copy, evs)
    reseal(copy, key)
    _intact(copy, key)
    rep = replay_run(copy, [key.public])
    assert rep.status == "diverged"
    d = rep.divergence
    assert d is not None and d.seq == target["seq"]
    assert d.expected == ["allowed", "command:rm", 0]
    assert d.actual[:2] == ["denied", "exec.not_allowlisted"]
    r = kernel_cmd(["replay", str(copy), "--trust", str(recorded.home / "keys" / "kernel.pub")],
                   home=recorded.home)
    assert r.returncode == 21 and f"seq {target['seq']}" in r.stdout, r.stdout + r.stderr


def test_40_early_refusal_turned_into_an_allow_diverges(recorded: Run, copy: Path) -> None:
    key = kernel_key(recorded)
    evs = events(copy)
    target = next(e for e in evs if e["type"] == "syscall.decision"
                  and e["body"]["rule"] == "path.outside")
    target["body"].update(decision="allowed", rule="write.write", errno=0)
    rechain(copy, evs)
    reseal(copy, key)
    _intact(copy, key)
    rep = replay_run(copy, [key.public])
    assert rep.divergence is not None and rep.divergence.seq == target["seq"]
    assert "without recorded facts" in rep.divergence.what


def test_40_recorded_facts_rewritten_diverges(recorded: Run, copy: Path) -> None:
    """Facts are evidence too: a decision whose recorded quota usage does not follow from the
    events before it is a divergence, even when the decision itself would not change."""
    key = kernel_key(recorded)
    evs = events(copy)
    target = next(e for e in evs if e["type"] == "syscall.decision"
                  and e["body"]["rule"] == "write.write")
    target["body"]["facts"]["usage"]["bytes_written"] += 1000
    rechain(copy, evs)
    reseal(copy, key)
    _intact(copy, key)
    rep = replay_run(copy, [key.public])
    assert rep.divergence is not None and rep.divergence.seq == target["seq"]
    assert "quota usage" in rep.divergence.what


def test_41_write_result_removed_diverges(recorded: Run, copy: Path) -> None:
    key = kernel_key(recorded)
    evs = events(copy)
    res = next(e for e in evs if e["type"] == "syscall.result"
               and (e["body"].get("result") or {}).get("path") == "new.txt")
    evs.remove(res)
    rechain(copy, evs)
    reseal(copy, key)
    _intact(copy, key)
    rep = replay_run(copy, [key.public])
    assert rep.status == "diverged", rep.to_json()
    assert rep.divergence is not None


def test_19_initial_manifest_edited_and_resealed_diverges(recorded: Run, copy: Path) -> None:
    key = kernel_key(recorded)
    p = copy / "initial" / "tree.json"
    m = json.loads(p.read_bytes())
    m["entries"]["README.md"]["mode"] = 0o600
    p.write_bytes(canonical_json(m))
    reseal(copy, key)
    _intact(copy, key)
    rep = replay_run(copy, [key.public])
    assert rep.status == "diverged"
    assert rep.divergence is not None and "snapshot.initial" in rep.divergence.what


def test_43_policy_swapped_and_everything_repointed_diverges(recorded: Run, copy: Path) -> None:
    key = kernel_key(recorded)
    old_raw = (copy / "policy.toml").read_bytes()
    new_raw = old_raw.replace(b'glob = ".git/**"\naction = "approval"',
                              b'glob = ".nothing/**"\naction = "approval"')
    assert new_raw != old_raw
    old_d = "sha256:" + hashlib.sha256(old_raw).hexdigest()
    new_d = "sha256:" + hashlib.sha256(new_raw).hexdigest()
    (copy / "policy.toml").write_bytes(new_raw)
    _resign_run_json(copy, key, lambda h: h.update(policy_digest=new_d))
    evs = json.loads(json.dumps(events(copy)).replace(old_d, new_d))
    rechain(copy, evs)
    reseal(copy, key)
    _intact(copy, key)
    rep = replay_run(copy, [key.public])
    assert rep.status == "diverged"
    d = rep.divergence
    assert d is not None and d.expected[0] == "denied" and d.actual[0] == "allowed", d


def test_replay_refuses_a_folder_that_does_not_verify(recorded: Run, copy: Path) -> None:
    key = kernel_key(recorded)
    (copy / "policy.toml").write_bytes(b"edited")
    rep = replay_run(copy, [key.public])
    assert rep.status == "unverified" and rep.verify_status == "corrupt"
    r = kernel_cmd(["replay", str(copy), "--trust", str(recorded.home / "keys" / "kernel.pub")],
                   home=recorded.home)
    assert r.returncode == 5


def test_initial_file_holding_a_secret_is_not_stored_and_replay_asks_for_the_workspace(
        tmp_path: Path) -> None:
    skip_unless_available("native")
    secret = "tok-initial-5ecr3t-99"
    run = run_agent(tmp_path, CLIENT_PRELUDE + 'k.write("out.txt", b"ok\\n")\n',
                    backend="native", files={"config.ini": f"token = {secret}\n", "a.txt": "a\n"},
                    env={"SERVICE_API_TOKEN": secret})
    assert run.out["status"] == "passed", run.proc.stderr
    snap = next(e for e in run.events() if e["type"] == "snapshot.initial")["body"]
    assert snap["content"] == "partial" and snap["unstored"] == 1
    blobs = [p.read_bytes() for p in (run.run_dir / "objects").rglob("*") if p.is_file()]
    assert not any(secret.encode() in b for b in blobs)
    pub = str(run.home / "keys" / "kernel.pub")
    r = kernel_cmd(["replay", str(run.run_dir), "--trust", pub], home=run.home)
    assert r.returncode == 11 and "config.ini: initial content not stored" in r.stdout, r.stdout
    # the operator still has the workspace as it was (the agent only added out.txt)
    (run.workspace / "out.txt").unlink()
    r = kernel_cmd(["replay", str(run.run_dir), "--trust", pub, "--workspace",
                    str(run.workspace)], home=run.home)
    assert r.returncode == 0, r.stdout + r.stderr


def test_workspace_holding_the_runs_dir_replays_from_itself(tmp_path: Path) -> None:
    """The runs dir inside the workspace is invisible to the run and left out of its
    manifests; replay --workspace leaves it out too."""
    skip_unless_available("native")
    from tests.kernel_helpers import make_workspace

    ws = make_workspace(tmp_path, {"a.txt": "a\n"})
    run = run_agent(tmp_path, CLIENT_PRELUDE + 'attempt("w", lambda: k.write(".git/x", b""))\n',
                    backend="native", workspace=ws, runs_dir=ws / "runs")
    assert run.out["status"] == "passed", run.proc.stderr
    rep = replay_run(run.run_dir, [kernel_key(run).public], workspace=ws)
    assert rep.status == "identical", rep.divergence


def test_19_initial_content_pack_rewritten_and_resealed_diverges(recorded: Run,
                                                                 copy: Path) -> None:
    key = kernel_key(recorded)
    evs = events(copy)
    snap = next(e for e in evs if e["type"] == "snapshot.initial")
    (old,) = snap["body"]["content_blobs"]
    old_path = copy / "objects" / "sha256" / old[7:9] / old[9:]
    data = bytearray(old_path.read_bytes())
    data[0] ^= 0x20  # same size, different bytes: 'a' <-> 'A'
    new = "sha256:" + hashlib.sha256(bytes(data)).hexdigest()
    new_path = copy / "objects" / "sha256" / new[7:9] / new[9:]
    new_path.parent.mkdir(exist_ok=True)
    new_path.write_bytes(bytes(data))
    old_path.unlink()
    if not any(old_path.parent.iterdir()):
        old_path.parent.rmdir()
    snap["body"]["content_blobs"] = [new]
    rechain(copy, evs)
    reseal(copy, key)
    assert verify_run(copy, [key.public]).status == "intact"
    rep = replay_run(copy, [key.public])
    assert rep.status == "diverged"
    assert rep.divergence is not None and rep.divergence.seq == snap["seq"]
    assert "initial content packs" in rep.divergence.what
