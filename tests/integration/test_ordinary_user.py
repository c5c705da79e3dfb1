"""The kernel run by an ordinary (unprivileged) user, as most operators will.

As root, these tests create that user (``useradd``, as CI does) and switch to it for every
check; run by an ordinary user (the user pass of ``make test``, scripts/run-user-tests.sh) they
run as that user directly. The checks: ``kernel selftest`` on the native backend (unprivileged
user namespaces) with every attack of the corpus stopped; the firejail backend, which needs root
to give every guarantee, refused with a clear message (nothing runs); a real ``kernel exec`` run
that passes and verifies; and, where the host forbids user namespaces (simulated with a seccomp
filter that refuses them, as container runtimes and AppArmor do), a clear refusal.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel import corpus
from kernel.errors import ExitCode
from tests.kernel_helpers import ROOT, skip_unless_available

USER = os.environ.get("KERNEL_TEST_USER", "kernel-test-user")
pytestmark = [pytest.mark.sandbox]


def _user() -> pwd.struct_passwd:
    """The ordinary user the checks run as: this process's user unless it is root."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", USER], check=True, capture_output=True)
    return pwd.getpwnam(USER)


def _as_user(pw: pwd.struct_passwd) -> list[str]:
    if os.geteuid() == pw.pw_uid:
        return []
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
            "--inh-caps=-all", "--"]


def _python(pw: pwd.struct_passwd) -> tuple[list[str], dict[str, str]]:
    """An interpreter the user can run, with the project importable."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp",
           "KERNEL_DEBUG": "1"}
    probe = subprocess.run([*_as_user(pw), sys.executable, "-c", "import kernel, cryptography"],
                           capture_output=True, cwd="/", env={**env, "PYTHONPATH": str(ROOT)})
    if probe.returncode == 0:
        return [sys.executable], {**env, "PYTHONPATH": str(ROOT)}
    # The venv's interpreter may live where the user cannot go (a pyenv build under /root):
    # the system Python of the same version runs the same packages.
    system = Path("/usr/bin/python3")
    site = sysconfig.get_paths()["purelib"]
    env = {**env, "PYTHONPATH": f"{ROOT}:{site}"}
    probe = subprocess.run([*_as_user(pw), str(system), "-c",
                            "import sys, kernel, cryptography; "
                            f"assert sys.version_info[:2] == {tuple(sys.version_info[:2])}"],
                           capture_output=True, cwd="/", env=env)
    if probe.returncode != 0:
        pytest.skip(f"no interpreter usable by {USER}: {probe.stderr.decode()[-300:]}")
    return [str(system)], env


def _kernel(pw: pwd.struct_passwd, args: list[str], *, prefix: list[str] | None = None,
            home: Path | None = None, cwd: Path | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:
    py, env = _python(pw)
    if home is not None:
        env["KERNEL_HOME"] = str(home)
    return subprocess.run([*(prefix or []), *_as_user(pw), *py, "-m", "kernel._cli", *args],
                          capture_output=True, text=True, env=env, cwd=cwd or "/",
                          timeout=timeout)


def _owned_dir(base: Path, name: str, pw: pwd.struct_passwd) -> Path:
    d = base / name
    d.mkdir()
    if os.geteuid() == 0:
        os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


@pytest.fixture
def user_tmp() -> Iterator[Path]:
    """A directory the ordinary user can reach (pytest's own tmp dirs are private to root)."""
    d = Path(tempfile.mkdtemp(prefix="kernel-user-test-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_selftest_as_an_ordinary_user_native_holds() -> None:
    skip_unless_available("native")
    pw = _user()
    res = _kernel(pw, ["selftest", "--isolation", "native"])
    assert res.returncode == ExitCode.OK, res.stdout + res.stderr
    n = len(corpus.ATTACKS)
    assert f"native: {n}/{n} guarantees hold here" in res.stdout, res.stdout


def test_firejail_as_an_ordinary_user_is_refused_with_its_reason() -> None:
    pw = _user()
    fj = _kernel(pw, ["selftest", "--isolation", "firejail", "--only", "fs.traversal"])
    assert fj.returncode == ExitCode.SANDBOX_UNAVAILABLE, fj.stdout + fj.stderr
    assert "firejail: not available here" in fj.stdout
    assert "not running as root" in fj.stdout
    assert "Traceback" not in fj.stderr
    ex = _kernel(pw, ["exec", "--isolation", "firejail", "--workspace", "/usr", "--runs-dir",
                      "/nonexistent/runs", "--", "/bin/true"])
    assert ex.returncode == ExitCode.SANDBOX_UNAVAILABLE
    assert "not running as root" in ex.stderr and "nothing ran" in ex.stderr


def test_a_run_as_an_ordinary_user_passes_and_verifies(user_tmp: Path) -> None:
    skip_unless_available("native")
    pw = _user()
    ws = _owned_dir(user_tmp, "ws", pw)
    home = _owned_dir(user_tmp, "home", pw)
    (ws / "agent.py").write_text(textwrap.dedent("""
        from syscalls.client import Kernel
        k = Kernel.from_env()
        k.write("out.txt", b"written by an agent of an ordinary user\\n")
        print(k.exec(["ls"]).exit_code)
    """))
    if os.geteuid() == 0:
        os.chown(ws / "agent.py", pw.pw_uid, pw.pw_gid)
    runs = _owned_dir(user_tmp, "runs", pw)
    res = _kernel(pw, ["exec", "--json", "--isolation", "native", "--workspace", str(ws),
                       "--runs-dir", str(runs), "--", "/usr/bin/python3", "agent.py"],
                  home=home)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["status"] == "passed", out
    assert (ws / "out.txt").read_text() == "written by an agent of an ordinary user\n"
    assert (ws / "out.txt").stat().st_uid == pw.pw_uid
    v = _kernel(pw, ["verify", out["run_dir"], "--json"], home=home)
    assert v.returncode == 0 and json.loads(v.stdout)["status"] == "intact", v.stdout


FORBID_USERNS = """
import os, sys
import pyseccomp as sc
f = sc.SyscallFilter(defaction=sc.ALLOW)
f.add_rule(sc.ERRNO(1), "unshare")
f.add_rule(sc.ERRNO(1), "clone", sc.Arg(0, sc.MASKED_EQ, 0x10000000, 0x10000000))
f.add_rule(sc.ERRNO(38), "clone3")
f.load()
os.execvp(sys.argv[1], sys.argv[1:])
"""


def test_where_user_namespaces_are_forbidden_the_kernel_refuses_clearly(user_tmp: Path) -> None:
    skip_unless_available("native")
    pw = _user()
    helper = user_tmp / "forbid_userns.py"
    helper.write_text(FORBID_USERNS)
    helper.chmod(0o644)
    ws = _owned_dir(user_tmp, "ws", pw)
    site = sysconfig.get_paths()["purelib"]
    res = _kernel(pw, ["exec", "--isolation", "native", "--workspace", str(ws), "--runs-dir",
                       str(ws.parent / "runs"), "--", "/bin/true"],
                  prefix=["env", f"PYTHONPATH={ROOT}:{site}", sys.executable, str(helper)])
    assert res.returncode == ExitCode.SANDBOX_UNAVAILABLE, res.stdout + res.stderr
    assert "cannot create user/mount/pid/net namespaces" in res.stderr
    assert "forbids or limits user namespaces" in res.stderr
    assert "nothing ran" in res.stderr and "Traceback" not in res.stderr
    auto = _kernel(pw, ["exec", "--workspace", str(ws), "--runs-dir", str(ws.parent / "runs"),
                        "--", "/bin/true"],
                   prefix=["env", f"PYTHONPATH={ROOT}:{site}", sys.executable, str(helper)])
    assert auto.returncode == ExitCode.SANDBOX_UNAVAILABLE, auto.stdout + auto.stderr
    assert "no isolation backend is available" in auto.stderr
