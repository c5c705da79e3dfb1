"""`kernel exec` end to end: real kernel, real sandbox, real agent, real run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kernel.errors import ExitCode
from tests.kernel_helpers import (
    AGENT_PY,
    BACKENDS,
    CLIENT_PRELUDE,
    kernel_cmd,
    make_workspace,
    results,
    run_agent,
    skip_unless_available,
)

pytestmark = pytest.mark.sandbox


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    skip_unless_available(name)
    return name


def test_agent_writes_through_the_syscall_layer_and_the_run_verifies(
        tmp_path: Path, backend: str) -> None:
    run = run_agent(tmp_path, CLIENT_PRELUDE + """
attempt("write", lambda: k.write("hello.txt", b"hello world\\n"))
attempt("append", lambda: k.append("hello.txt", b"again\\n"))
attempt("mkdir", lambda: k.mkdir("out/deep", parents=True))
attempt("rename", lambda: k.rename("hello.txt", "out/deep/hello.txt"))
attempt("chmod", lambda: k.chmod("out/deep/hello.txt", 0o600))
attempt("info", lambda: k.info())
""", backend=backend)
    assert run.proc.returncode == ExitCode.OK, run.proc.stderr
    r = results(run)
    assert all(v["ok"] for v in r.values()), r
    f = run.workspace / "out" / "deep" / "hello.txt"
    assert f.read_bytes() == b"hello world\nagain\n"
    assert f.stat().st_mode & 0o777 == 0o600
    assert not (run.workspace / "hello.txt").exists()
    assert r["info"]["result"]["quotas"]["files_written"]["used"] == 5
    assert run.out["status"] == "passed" and run.out["isolation"] == backend
    assert run.out["exit_code"] == 0
    v = run.verify()
    assert v.returncode == 0, v.stdout + v.stderr
    assert "intact" in v.stdout
    decisions = run.decisions()
    assert [d["decision"] for d in decisions] == ["allowed"] * 6
    assert all(d["policy_digest"].startswith("sha256:") for d in decisions)


def test_the_run_folder_records_what_was_enforced(tmp_path: Path, backend: str) -> None:
    run = run_agent(tmp_path, "print('hi')\n", backend=backend,
                    extra=["--env", "GREETING=hello"])
    assert run.proc.returncode == 0, run.proc.stderr
    header = json.loads((run.run_dir / "run.json").read_text())
    assert header["isolation"] == backend
    assert header["isolation_override"] == backend
    assert header["env"]["explicit"] == ["GREETING"]
    starts = [e["body"] for e in run.events() if e["type"] == "sandbox.start"]
    assert starts and starts[0]["enforced"]["backend"] == backend
    assert (run.run_dir / "policy.toml").read_bytes() == \
        (Path(__file__).resolve().parents[2] / "policies" / "default.toml").read_bytes()
    assert (run.run_dir / "initial" / "tree.json").exists()
    assert (run.run_dir / "final" / "tree.json").exists()
    assert (run.run_dir / "SEAL.json").exists()
    # sealed folders are read-only
    assert not os.stat(run.run_dir / "SEAL.json").st_mode & 0o222


def test_env_is_scrubbed_and_explicit_env_reaches_the_agent(tmp_path: Path, backend: str) -> None:
    run = run_agent(tmp_path, """
import os, json
print("ENV " + json.dumps(sorted(os.environ)))
print("GREETING=" + os.environ.get("GREETING", "<unset>"))
""", backend=backend, extra=["--env", "GREETING=hello"],
        env={"HOST_ONLY_VARIABLE": "should-not-pass"})
    assert run.proc.returncode == 0, run.proc.stderr
    assert "GREETING=hello" in run.agent_output
    assert "HOST_ONLY_VARIABLE" not in run.agent_output
    assert "should-not-pass" not in run.agent_output


def test_allowlisted_exec_relays_output_and_applies_allowed_changes(
        tmp_path: Path, backend: str) -> None:
    run = run_agent(tmp_path, CLIENT_PRELUDE + """
r = k.exec(["ls", "-1"])
report("ls", {"code": r.exit_code, "out": r.stdout.decode()})
r = k.exec(["python3", "-c", "open('made.txt','w').write('by exec')"])
report("py", {"code": r.exit_code, "changes": r.changes, "err": r.stderr.decode()})
attempt("curl", lambda: k.exec(["curl", "http://example.com"]))
attempt("git-push", lambda: k.exec(["git", "push"]))
""", backend=backend, files={"a.txt": "A", "sub/b.txt": "B"})
    assert run.proc.returncode == 0, run.proc.stderr
    r = results(run)
    assert r["ls"]["code"] == 0 and "a.txt" in r["ls"]["out"] and "sub" in r["ls"]["out"]
    assert r["py"]["code"] == 0, r["py"]
    assert [(c["path"], c["decision"]) for c in r["py"]["changes"]] == [("made.txt", "allowed")]
    assert (run.workspace / "made.txt").read_text() == "by exec"
    assert r["curl"]["ok"] is False and r["curl"]["rule"] in ("exec.not_found",
                                                              "exec.not_allowlisted")
    assert r["git-push"]["ok"] is False
    assert run.verify().returncode == 0


def test_ksys_shell_agent(tmp_path: Path, backend: str) -> None:
    ws = make_workspace(tmp_path)
    (ws / "agent.sh").write_text(
        "set -u\n"
        "printf 'from ksys\\n' | ksys write notes.txt; echo write=$?\n"
        "printf 'x' | ksys write ../escape.txt; echo escape=$?\n"
        "printf 'x' | ksys write .git/config; echo protected=$?\n"
        "ksys exec -- ls; echo exec=$?\n"
        "ksys exec -- sh -c 'echo hi'; echo shell=$?\n"
        "ksys info > /dev/null; echo info=$?\n")
    run = run_agent(tmp_path, "", backend=backend, workspace=ws, argv=["/bin/sh", "agent.sh"])
    out = run.agent_output
    assert run.proc.returncode == 0, out
    assert "write=0" in out and "escape=77" in out and "protected=77" in out
    assert "exec=0" in out and "shell=77" in out and "info=0" in out
    assert "rule path.outside" in out and "rule protected:.git/**" in out
    assert (ws / "notes.txt").read_text() == "from ksys\n"
    assert not (tmp_path / "escape.txt").exists()


def test_agent_exit_code_maps_to_run_failed(tmp_path: Path, backend: str) -> None:
    run = run_agent(tmp_path, "import sys; sys.exit(3)\n", backend=backend)
    assert run.proc.returncode == ExitCode.RUN_FAILED
    assert run.out["status"] == "failed" and run.out["exit_code"] == 3
    assert run.verify().returncode == 0


def test_unavailable_backend_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    (ws / "agent.py").write_text("open('/proc/self/status')\n")
    proc = kernel_cmd(["exec", "--workspace", str(ws), "--runs-dir", str(tmp_path / "runs"),
                       "--isolation", "firejail", "--", AGENT_PY, "agent.py"],
                      home=tmp_path / "home", env={"PATH": str(tmp_path / "empty-path")})
    assert proc.returncode == ExitCode.SANDBOX_UNAVAILABLE, proc.stderr
    assert "firejail" in proc.stderr and "not available" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_verify_reports_a_tampered_run(tmp_path: Path, backend: str) -> None:
    run = run_agent(tmp_path, CLIENT_PRELUDE + "k.write('x.txt', b'1')\n", backend=backend)
    assert run.proc.returncode == 0
    log = run.run_dir / "log" / "events.jsonl"
    os.chmod(log, 0o644)
    data = log.read_bytes().replace(b'"allowed"', b'"denied"', 1)
    log.write_bytes(data)
    v = run.verify()
    assert v.returncode == ExitCode.INTEGRITY
    assert "corrupt" in v.stdout and "events.jsonl" in v.stdout
