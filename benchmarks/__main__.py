"""Measure the kernel against what users would pick instead; print medians and ratios.

    python -m benchmarks [--only exec,write,execsys,verify,concurrent,spawn,tree] [--quick]
                         [--markdown FILE]

1. ``exec``: the whole ``kernel exec`` of a trivial agent (``/usr/bin/python3 -c pass``), per
   available backend, beside the same command bare, under bubblewrap and under
   ``firejail --noprofile --net=none --seccomp --caps.drop=all --private``.
2. ``write``: gated durable 4 KiB writes from one agent (writes/s, p50/p99 latency) beside a plain
   write + fsync + rename + directory fsync of the same files, and beside the raw floor (an
   in-place 4 KiB ``pwrite`` + ``fdatasync``).
3. ``execsys``: the ``exec`` syscall of ``/bin/true`` from inside a run (latency seen by the
   agent) beside bare ``/bin/true``, bubblewrap and firejail runs of it.
4. ``verify``: ``kernel verify`` (and ``kernel replay`` where the command exists) of a real run of
   100k events, in events/s, beside ``sha256sum`` over the same bytes.
5. ``concurrent``: N trivial runs started at once (N = 1, 10, 50, 100): runs/s, peak memory per
   run, and whether every run ended passed and sealed and verifies intact.
6. ``spawn``: one ``spawn`` from request to child running (sandbox started, parent answered,
   child's first request), per available backend (benchmarks/spawn.py).
7. ``tree``: the largest agent tree asked for (``--tree-shape``), all alive at once, per backend.

Contenders of one item are measured interleaved (A, B, C, A, B, C, ...) so that drift and other
load on the machine hit all of them alike. Nothing here asserts anything: it reports. A baseline
whose program is missing is skipped, and the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = "/usr/bin/python3"
KERNEL = str(ROOT / ".venv" / "bin" / "kernel")
BWRAP_FLAGS = ["--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "--dev", "/dev",
               "--proc", "/proc", "--new-session"]
FIREJAIL_FLAGS = ["--quiet", "--noprofile", "--net=none", "--seccomp", "--caps.drop=all",
                  "--private"]
ITEMS = ("exec", "write", "execsys", "verify", "concurrent", "spawn", "tree")

_out: list[str] = []
BASELINE: Path | None = None
"""Another checkout of the project (``--baseline``): its kernel runs beside this one in items
1 and 2, same venv, same interleaving (for before/after comparisons under the same load)."""


def say(line: str = "") -> None:
    print(line, flush=True)
    _out.append(line)


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                       check=False)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... exited {r.returncode}: "
                           f"{r.stderr.decode(errors='replace')[-500:]}")
    return dt


def _open_up(p: Path) -> None:
    """The agent uid must traverse to a workspace made under /tmp."""
    while p != p.parent:
        os.chmod(p, os.stat(p).st_mode | 0o011)
        p = p.parent


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * q))]


def _backends() -> list[str]:
    from sandbox import registry

    out = []
    for name in registry.NAMES:
        av = registry.probe(name)
        if av.available:
            out.append(name)
        else:
            say(f"   (backend {name} unavailable here: {'; '.join(av.missing)})")
    return out


class Env:
    """A scratch area: workspace, runs dir and kernel home under one temp dir."""

    def __init__(self, extra_policy: str = "", quotas: dict[str, int] | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="kbench-"))
        self.ws = self.tmp / "ws"
        self.ws.mkdir()
        _open_up(self.ws)
        self.runs = self.tmp / "runs"
        # PYTHONPATH: measure the kernel of this checkout, whatever the venv was installed from
        self.env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KERNEL_HOME": str(self.tmp / "home"),
                    "PYTHONPATH": str(ROOT)}
        self.policy = self._policy(ROOT, "bench.toml", quotas, extra_policy)
        self.baseline_policy = (self._policy(BASELINE, "bench-baseline.toml", quotas,
                                             extra_policy) if BASELINE else self.policy)

    def _policy(self, root: Path, name: str, quotas: dict[str, int] | None,
                extra: str) -> Path:
        import re

        text = (root / "policies" / "default.toml").read_text()
        for k, v in (quotas or {}).items():
            text = re.sub(rf"(?m)^{k} = \d+$", f"{k} = {v}", text)
        path = self.tmp / name
        path.write_text(text + extra)
        return path

    def script(self, name: str, text: str) -> None:
        (self.ws / name).write_text(text)
        os.chmod(self.ws / name, 0o644)

    def exec_argv(self, backend: str, *cmd: str, baseline: bool = False) -> list[str]:
        policy = self.baseline_policy if baseline else self.policy
        return [KERNEL, "exec", "--isolation", backend, "--policy", str(policy),
                "--workspace", str(self.ws), "--runs-dir", str(self.runs), "--", *cmd]

    def run_agent(self, backend: str, *cmd: str, env: dict[str, str] | None = None
                  ) -> dict[str, Any]:
        r = subprocess.run(self.exec_argv(backend, *cmd, baseline=env is not None),
                           capture_output=True, text=True, env=env or self.env, check=False)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")]
        if r.returncode != 0 or not line:
            raise RuntimeError(f"kernel exec ({backend}) failed ({r.returncode}): "
                               f"{r.stderr[-600:]}")
        res: dict[str, Any] = json.loads(line[0][6:])
        return res

    def close(self) -> None:
        subprocess.run(["chmod", "-R", "u+w", str(self.tmp)], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---- 1. whole exec ----------------------------------------------------------------------------


def bench_exec(runs: int) -> None:
    say(f"\n## 1. Whole run of `{PY} -c pass` ({runs} interleaved runs each, median wall)\n")
    e = Env()
    contenders: dict[str, Callable[[], float]] = {"bare": lambda: _timed([PY, "-c", "pass"])}
    if shutil.which("bwrap"):
        contenders["bubblewrap"] = lambda: _timed(["bwrap", *BWRAP_FLAGS, PY, "-c", "pass"])
    else:
        say("   (bubblewrap: skipped, `bwrap` is not installed)")
    if shutil.which("firejail"):
        contenders["firejail"] = lambda: _timed(["firejail", *FIREJAIL_FLAGS, PY, "-c", "pass"])
    else:
        say("   (firejail: skipped, `firejail` is not installed)")
    for name in _backends():
        argv = e.exec_argv(name, PY, "-c", "pass")
        contenders[f"kernel exec ({name})"] = (lambda a=argv: _timed(a, e.env))
        if BASELINE is not None:
            benv = dict(e.env, PYTHONPATH=str(BASELINE), KERNEL_HOME=str(e.tmp / "home-baseline"))
            bargv = e.exec_argv(name, PY, "-c", "pass", baseline=True)
            contenders[f"kernel exec ({name}), baseline"] = (
                lambda a=bargv, b=benv: _timed(a, b))
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():  # warm-up: caches, page cache, the kernel's key
        fn()
    for _ in range(runs):
        for k, fn in contenders.items():
            samples[k].append(fn())
    base = statistics.median(samples["bare"])
    fj = statistics.median(samples["firejail"]) if "firejail" in samples else None
    say("| contender | median | min | max | x bare | x firejail |")
    say("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k, v in samples.items():
        m = statistics.median(v)
        vs_fj = f"{m / fj:.2f}" if fj else "-"
        say(f"| {k} | {m * 1000:.1f} ms | {min(v) * 1000:.1f} | {max(v) * 1000:.1f} | "
            f"{m / base:.2f} | {vs_fj} |")
    e.close()


# ---- 2. gated writes --------------------------------------------------------------------------

WRITER = """
import os, sys, time, json
from syscalls.client import Kernel
k = Kernel.from_env()
n = int(sys.argv[1]); data = bytearray(os.urandom(4096)); lat = []
t0 = time.perf_counter()
for i in range(n):
    data[:8] = i.to_bytes(8, "little")  # new content each time: no blob is deduplicated
    t = time.perf_counter()
    k.write(f"w/f{i % 64}.bin", bytes(data))
    lat.append(time.perf_counter() - t)
total = time.perf_counter() - t0
print("BENCH " + json.dumps({"total": total, "lat": lat}))
"""


def _plain_atomic(d: Path, n: int) -> tuple[float, list[float]]:
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    data = bytearray(os.urandom(4096))
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        data[:8] = i.to_bytes(8, "little")
        t = time.perf_counter()
        fd = os.open(d / f".tmp{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(d / f".tmp{i}", d / f"f{i % 64}.bin")
        os.fsync(dfd)
        lat.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    os.close(dfd)
    return total, lat


def _raw_inplace(d: Path, n: int) -> tuple[float, list[float]]:
    fd = os.open(d / "raw.bin", os.O_RDWR | os.O_CREAT, 0o644)
    data = os.urandom(4096)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        os.pwrite(fd, data, 0)
        os.fdatasync(fd)
        lat.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    os.close(fd)
    return total, lat


def bench_writes(n: int, rounds: int) -> None:
    say(f"\n## 2. Durable 4 KiB writes from one agent ({rounds} interleaved rounds of {n} writes "
        "over 64 files; rate = median of rounds, latency over all)\n")
    e = Env(quotas={"syscalls": n + 100, "files_written": n + 100, "bytes_written": 8192 * n})
    (e.ws / "w").mkdir()
    _open_up(e.ws / "w")
    e.script("writer.py", WRITER)
    plain = e.tmp / "plain"
    plain.mkdir()
    contenders: dict[str, Callable[[], tuple[float, list[float]]]] = {
        "raw: pwrite 4 KiB in place + fdatasync": lambda: _raw_inplace(plain, n),
        "plain: tmp + write + fsync + rename + dir fsync": lambda: _plain_atomic(plain, n),
    }
    for name in _backends():
        def gated(name: str = name, env: dict[str, str] | None = None
                  ) -> tuple[float, list[float]]:
            r = e.run_agent(name, PY, "writer.py", str(n), env=env)
            return float(r["total"]), list(r["lat"])
        contenders[f"kernel write ({name})"] = gated
        if BASELINE is not None:
            benv = dict(e.env, PYTHONPATH=str(BASELINE), KERNEL_HOME=str(e.tmp / "home-baseline"))
            contenders[f"kernel write ({name}), baseline"] = (
                lambda name=name, benv=benv: gated(name, benv))
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    lats: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, fn in contenders.items():
            total, lat = fn()
            rates[k].append(n / total)
            lats[k].extend(lat)
    raw = statistics.median(rates["raw: pwrite 4 KiB in place + fdatasync"])
    atomic = statistics.median(rates["plain: tmp + write + fsync + rename + dir fsync"])
    say("| contender | writes/s | p50 | p99 | x raw | x plain |")
    say("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k in contenders:
        r = statistics.median(rates[k])
        say(f"| {k} | {r:,.0f} | {_pct(lats[k], 0.5) * 1e6:,.0f} µs | "
            f"{_pct(lats[k], 0.99) * 1e6:,.0f} µs | {r / raw:.2f} | {r / atomic:.2f} |")
    e.close()


# ---- 3. the exec syscall ----------------------------------------------------------------------

EXECER = """
import sys, time, json
from syscalls.client import Kernel
k = Kernel.from_env()
n = int(sys.argv[1]); lat = []
for i in range(n):
    t = time.perf_counter()
    r = k.exec(["true"])
    lat.append(time.perf_counter() - t)
    assert r.exit_code == 0, r
print("BENCH " + json.dumps({"lat": lat}))
"""

TRUE_COMMAND = """
[[commands]]
id = "true"
program = "true"
reason = "benchmark: a command that does nothing"
"""


def bench_execsys(n: int, rounds: int) -> None:
    say(f"\n## 3. `exec` of `/bin/true` ({rounds} interleaved rounds of {n}; median latency)\n")
    e = Env(extra_policy=TRUE_COMMAND,
            quotas={"exec_count": n + 10, "syscalls": n + 100})
    e.script("execer.py", EXECER)
    cmds: dict[str, list[str]] = {"bare /bin/true": ["/bin/true"]}
    if shutil.which("bwrap"):
        cmds["bubblewrap /bin/true"] = ["bwrap", *BWRAP_FLAGS, "/bin/true"]
    else:
        say("   (bubblewrap: skipped, `bwrap` is not installed)")
    if shutil.which("firejail"):
        cmds["firejail /bin/true"] = ["firejail", *FIREJAIL_FLAGS, "/bin/true"]
    else:
        say("   (firejail: skipped, `firejail` is not installed)")
    contenders: dict[str, Callable[[], list[float]]] = {
        k: (lambda c=c: [_timed(c) for _ in range(n)]) for k, c in cmds.items()}
    for name in _backends():
        contenders[f"kernel exec syscall ({name})"] = (
            lambda name=name: list(e.run_agent(name, PY, "execer.py", str(n))["lat"]))
    lats: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, fn in contenders.items():
            lats[k].extend(fn())
    fj = statistics.median(lats["firejail /bin/true"]) if "firejail /bin/true" in lats else None
    bw = (statistics.median(lats["bubblewrap /bin/true"]) if "bubblewrap /bin/true" in lats
          else None)
    say("| contender | median | p90 | x bubblewrap | x firejail |")
    say("| --- | ---: | ---: | ---: | ---: |")
    for k, v in lats.items():
        m = statistics.median(v)
        say(f"| {k} | {m * 1000:.1f} ms | {_pct(v, 0.9) * 1000:.1f} ms | "
            f"{f'{m / bw:.2f}' if bw else '-'} | {f'{m / fj:.2f}' if fj else '-'} |")
    e.close()


# ---- 4. verify / replay -----------------------------------------------------------------------

INFOER = """
import sys, json
from syscalls.client import Kernel, SyscallError
k = Kernel.from_env()
n = int(sys.argv[1])
for i in range(n):
    if i % 100 == 0:  # a real write now and then: replay re-applies these
        k.write(f"f{i % 1000}.txt", b"x" * (i % 4096))
    else:  # a request the policy denies (a path outside the workspace): request + decision
        try:
            k.delete(f"../outside-{i}")
        except SyscallError:
            pass
print("BENCH " + json.dumps({}))
"""


def _has_command(cmd: str) -> bool:
    r = subprocess.run([KERNEL, cmd, "--help"], capture_output=True, check=False)
    return r.returncode == 0


def bench_verify(events: int, rounds: int) -> None:
    say(f"\n## 4. Verifying a run of about {events:,} events ({rounds} interleaved rounds, "
        "median)\n")
    requests = events // 2
    e = Env(quotas={"syscalls": requests + 100})
    e.script("infoer.py", INFOER)
    t = time.perf_counter()
    e.run_agent("native" if "native" in _backends() else "firejail", PY, "infoer.py",
                str(requests))
    made = time.perf_counter() - t
    run_dir = next(p for p in e.runs.iterdir() if p.is_dir())
    n_events = sum(1 for _ in open(run_dir / "log" / "events.jsonl", "rb"))
    files = sorted(str(p) for p in run_dir.rglob("*") if p.is_file())
    size = sum(os.path.getsize(f) for f in files)
    say(f"   the run: {n_events:,} events, {len(files)} files, {size / 1e6:.1f} MB "
        f"(made by one agent in {made:.1f} s: {n_events / made:,.0f} events/s recorded)\n")
    pub = str(e.tmp / "home" / "keys" / "kernel.pub")
    contenders: dict[str, list[str]] = {
        "sha256sum over every file of the run": ["sha256sum", *files],
        "kernel verify": [KERNEL, "verify", "--trust", pub, str(run_dir)],
    }
    if _has_command("replay"):
        contenders["kernel replay"] = [KERNEL, "replay", "--trust", pub, str(run_dir)]
    else:
        say("   (kernel replay: skipped, this checkout has no `kernel replay` command)\n")

    def verify_in_process() -> float:
        from kernel import keys, verify

        t = time.perf_counter()
        rep = verify.verify_run(run_dir, [keys.load_public_key(Path(pub))])
        dt = time.perf_counter() - t
        if rep.status != "intact":
            raise RuntimeError(f"verify: {rep.status}: {rep.problem}")
        return dt

    timers: dict[str, Callable[[], float]] = {
        k: (lambda c=c: _timed(c, e.env)) for k, c in contenders.items()}
    timers["verify_run() in process (no interpreter start)"] = verify_in_process
    times: dict[str, list[float]] = {k: [] for k in timers}
    for fn in timers.values():
        fn()
    for _ in range(rounds):
        for k, fn in timers.items():
            times[k].append(fn())
    sha = statistics.median(times["sha256sum over every file of the run"])
    say("| contender | median | events/s | MB/s | x sha256sum time |")
    say("| --- | ---: | ---: | ---: | ---: |")
    for k, v in times.items():
        m = statistics.median(v)
        say(f"| {k} | {m * 1000:.0f} ms | {n_events / m:,.0f} | {size / m / 1e6:,.0f} | "
            f"{m / sha:.1f} |")
    e.close()


# ---- 5. concurrent runs -----------------------------------------------------------------------


def bench_concurrent(ns: list[int], backend: str | None) -> None:
    from kernel import keys, verify

    names = _backends()
    name = backend or ("native" if "native" in names else names[0])
    say(f"\n## 5. N concurrent trivial runs (`{PY} -c pass`, backend {name}, "
        f"{os.cpu_count()} cpus)\n")
    say("| N | wall | runs/s | passed | sealed + intact | peak RSS per run (median / max) |")
    say("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in ns:
        e = Env()
        procs = []
        # GNU time is a small fresh process: the kernel forked from it does not count this
        # (large) benchmark process's pages as its own, as it would if forked from here.
        timing = ["/usr/bin/time", "-f", "%M"] if os.access("/usr/bin/time", os.X_OK) else []
        t0 = time.perf_counter()
        for i in range(n):
            argv = e.exec_argv(name, PY, "-c", "pass")
            if timing:
                argv = [*timing, "-o", str(e.tmp / f"rss-{i}"), *argv]
            procs.append(subprocess.Popen(argv, env=e.env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        passed = 0
        for p in procs:
            passed += p.wait() == 0
        wall = time.perf_counter() - t0
        rss = [int((e.tmp / f"rss-{i}").read_text().split()[-1]) for i in range(n)
               if timing and (e.tmp / f"rss-{i}").exists()] or [0]
        pub = keys.load_public_key(e.tmp / "home" / "keys" / "kernel.pub")
        intact = sum(verify.verify_run(d, [pub]).status == "intact"
                     for d in e.runs.iterdir() if d.is_dir())
        say(f"| {n} | {wall:.2f} s | {n / wall:.1f} | {passed}/{n} | {intact}/{n} | "
            f"{statistics.median(rss) / 1024:.0f} / {max(rss) / 1024:.0f} MiB |")
        e.close()
    say("\n   peak RSS per run: the largest resident set among the kernel process and the "
        "processes it waited for (GNU time's %M; 0 if /usr/bin/time is missing).")


# ---- main -------------------------------------------------------------------------------------


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal"))
        mem_gb = int(mem.split()[1]) / 1024 / 1024
    except (OSError, StopIteration):
        mem_gb = 0.0
    fs, best = "?", ""
    tmp = os.path.realpath(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind = line.split()[:3]
            if (tmp == mnt or tmp.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fs = mnt, f"{kind} ({dev})"
    return (f"{platform.node()}: {model}, {os.cpu_count()} cpus, {mem_gb:.1f} GiB, Linux "
            f"{platform.release()}, Python {platform.python_version()}, "
            f"{tempfile.gettempdir()} on {fs}, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ITEMS),
                    help=f"comma-separated items among {', '.join(ITEMS)} (default: all)")
    ap.add_argument("--runs", type=int, default=20, help="item 1: runs per contender")
    ap.add_argument("--writes", type=int, default=2000, help="item 2: writes per round")
    ap.add_argument("--execs", type=int, default=30, help="item 3: execs per round")
    ap.add_argument("--events", type=int, default=100_000, help="item 4: events in the run")
    ap.add_argument("--rounds", type=int, default=3, help="items 2-4: interleaved rounds")
    ap.add_argument("--concurrency", default="1,10,50,100", help="item 5: values of N")
    ap.add_argument("--backend", default=None, help="item 5: backend (default: native)")
    ap.add_argument("--spawns", type=int, default=20, help="item 6: children per round")
    ap.add_argument("--tree-shape", default="10,10",
                    help="item 7: children per agent at each generation (10,10: 111 agents)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("--markdown", type=Path, help="also write the tables to this file")
    ap.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                    help="items 1-2: also run the kernel of this other checkout, interleaved")
    a = ap.parse_args()
    global BASELINE
    BASELINE = a.baseline.resolve() if a.baseline else None
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    bad = sorted(set(only) - set(ITEMS))
    if bad:
        ap.error(f"unknown item(s) {', '.join(bad)}; items are {', '.join(ITEMS)}")
    if a.quick:
        a.runs, a.writes, a.execs, a.events, a.rounds = 3, 200, 3, 2000, 1
        a.concurrency = "1,10"
        a.spawns, a.tree_shape = 3, "3,2"
    if not os.access(KERNEL, os.X_OK):
        ap.error(f"{KERNEL} not found: run `make bootstrap` first")
    say(f"machine: {machine()}")
    t = time.perf_counter()
    if "exec" in only:
        bench_exec(a.runs)
    if "write" in only:
        bench_writes(a.writes, a.rounds)
    if "execsys" in only:
        bench_execsys(a.execs, a.rounds)
    if "verify" in only:
        bench_verify(a.events, a.rounds)
    if "concurrent" in only:
        bench_concurrent([int(x) for x in a.concurrency.split(",")], a.backend)
    if "spawn" in only or "tree" in only:
        from benchmarks import spawn as spawn_bench

        names = _backends()
        if "spawn" in only:
            spawn_bench.bench_spawn(a.spawns, a.rounds, say=say, env_cls=Env, backends=names)
        if "tree" in only:
            spawn_bench.bench_tree([int(x) for x in a.tree_shape.split(",")], say=say,
                                   env_cls=Env, backends=names)
    say(f"\n(benchmark took {time.perf_counter() - t:.0f} s; load average after: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    if a.markdown:
        a.markdown.write_text("\n".join(_out) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
