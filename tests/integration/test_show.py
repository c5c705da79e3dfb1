"""`kernel show`: the timeline links every request to its decision, rule and effect, and each
exec to the changes captured from it; totals add up; secrets never appear."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.kernel_helpers import CLIENT_PRELUDE, Run, kernel_cmd, run_agent, skip_unless_available

SECRET = "tok-5ecr3t-value-42"

AGENT = CLIENT_PRELUDE + """
secret = os.environ["PLAIN_VALUE"]
k.write("notes.txt", ("the token is " + secret + "\\n").encode())
attempt("git", lambda: k.write(".git/hooks/x", b"x"))
attempt("exec", lambda: k.exec(["python3", "-c", "open('gen.txt','w').write('1')"]))
attempt("notallowed", lambda: k.exec(["rm", "x"]))
"""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Run:
    skip_unless_available("native")
    tmp = tmp_path_factory.mktemp("show")
    run = run_agent(tmp, AGENT, backend="native", files={"a.txt": "a\n"},
                    extra=["--env", f"PLAIN_VALUE={SECRET}"],
                    env={"SERVICE_API_TOKEN": SECRET})
    assert run.out["status"] == "passed", run.proc.stderr
    return run


def show(run: Run, *extra: str, run_dir: Path | None = None) -> tuple[int, str]:
    r = kernel_cmd(["show", str(run_dir or run.run_dir), "--trust",
                    str(run.home / "keys" / "kernel.pub"), *extra], home=run.home)
    return r.returncode, r.stdout + r.stderr


def test_timeline_lineage_and_totals(recorded: Run) -> None:
    code, out = show(recorded)
    assert code == 0, out
    assert "(intact)" in out.splitlines()[0]
    assert "-> denied (protected:.git/**)" in out
    assert "-> denied (exec.not_allowlisted)" in out
    assert "captured write 'gen.txt' -> allowed (write.write) applied" in out
    assert "requests 4 exec=2 write=2" in out
    assert "denials by rule exec.not_allowlisted=1 protected:.git/**=1" in out
    assert "status passed" in out


def test_json_view(recorded: Run) -> None:
    code, out = show(recorded, "--json")
    assert code == 0
    view = json.loads(out)
    assert view["verify_status"] == "intact"
    reqs = [i for i in view["timeline"] if i["kind"] == "request"]
    assert [r["call"] for r in reqs] == ["write", "write", "exec", "exec"]
    ex = reqs[2]
    assert ex["decisions"][0]["decision"] == "allowed"
    assert ex["captured"][0]["path"] == "gen.txt" and ex["result"]["ok"] is True
    assert view["totals"]["execs"] == 1
    assert view["totals"]["decisions"] == {"allowed": 3, "denied": 2}


def test_secrets_never_shown(recorded: Run) -> None:
    for extra in ((), ("--json",)):
        code, out = show(recorded, *extra)
        assert code == 0 and SECRET not in out
    log = (recorded.run_dir / "log" / "events.jsonl").read_text()
    assert SECRET not in log


def test_corrupt_folder_is_refused(recorded: Run, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(recorded.run_dir, copy)
    (copy / "policy.toml").chmod(0o644)
    (copy / "policy.toml").write_bytes(b"x")
    code, out = show(recorded, run_dir=copy)
    assert code == 5 and "corrupt" in out


def test_replay_of_a_write_holding_a_secret_says_why_it_stops(recorded: Run) -> None:
    from kernel import keys
    from kernel.replay import replay_run

    rep = replay_run(recorded.run_dir, [keys.load_or_create_kernel_key(recorded.home).public])
    assert rep.status == "unverified" and rep.divergence is None
    assert rep.problem is not None and "recorded redacted" in rep.problem
    assert rep.rederived == 5  # every decision was still re-derived
