"""Measure the kernel against the baselines users would pick instead; print medians and ratios.

    python -m benchmarks [--runs N] [--writes N] [--only exec|write]

1. whole `kernel exec` of a trivial agent (`/usr/bin/python3 -c pass`), per available backend,
   beside the same command bare and under `firejail --noprofile --net=none --seccomp`, measured
   in one interleaved run (A, B, C, A, B, C...) so drift hits every contender alike;
2. gated durable 4 KiB writes from one agent (writes/s, p50/p99 latency) beside a plain
   write + fsync + rename + directory fsync of the same files.
Timings are wall-clock medians; nothing here asserts anything.
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
PY = "/usr/bin/python3"


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:4]}... exited {r.returncode}: {r.stderr.decode()[-500:]}")
    return dt


def _open_up(p: Path) -> None:
    while p != p.parent:
        os.chmod(p, os.stat(p).st_mode | 0o011)
        p = p.parent


def bench_exec(runs: int) -> None:
    from sandbox import registry

    tmp = Path(tempfile.mkdtemp(prefix="kbench-"))
    ws = tmp / "ws"
    ws.mkdir()
    _open_up(ws)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KERNEL_HOME": str(tmp / "home")}
    kernel = [str(ROOT / ".venv" / "bin" / "kernel")]
    contenders: dict[str, Callable[[], float]] = {"bare": lambda: _timed([PY, "-c", "pass"])}
    if shutil.which("firejail"):
        contenders["firejail --noprofile --net=none --seccomp"] = lambda: _timed(
            ["firejail", "--quiet", "--noprofile", "--net=none", "--seccomp", PY, "-c", "pass"])
    for name in registry.NAMES:
        if registry.probe(name).available:
            argv = [*kernel, "exec", "--isolation", name, "--workspace", str(ws), "--runs-dir",
                    str(tmp / "runs"), "--", PY, "-c", "pass"]
            contenders[f"kernel exec ({name})"] = (lambda a=argv: _timed(a, env))
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():  # warm-up
        fn()
    for _ in range(runs):
        for k, fn in contenders.items():
            samples[k].append(fn())
    base = statistics.median(samples["bare"])
    fj = samples.get("firejail --noprofile --net=none --seccomp")
    fj_med = statistics.median(fj) if fj else None
    print(f"\n1. whole run of `{PY} -c pass`, {runs} interleaved runs each (median wall)")
    print(f"   {'contender':45} {'median':>9} {'x bare':>7} {'x firejail':>11}")
    for k, v in samples.items():
        m = statistics.median(v)
        vs_fj = f"{m / fj_med:11.2f}" if fj_med else f"{'-':>11}"
        print(f"   {k:45} {m * 1000:7.1f}ms {m / base:7.2f} {vs_fj}")
    shutil.rmtree(tmp, ignore_errors=True)


WRITER = """
import base64, os, sys, time, json
from syscalls.client import Kernel
k = Kernel.from_env()
n = int(sys.argv[1]); data = os.urandom(4096); lat = []
t0 = time.perf_counter()
for i in range(n):
    t = time.perf_counter()
    k.write(f"w/f{i % 64}.bin", data)
    lat.append(time.perf_counter() - t)
total = time.perf_counter() - t0
print("BENCH " + json.dumps({"total": total, "lat": lat}))
"""


def bench_writes(n: int) -> None:
    from sandbox import registry

    tmp = Path(tempfile.mkdtemp(prefix="kbench-"))
    ws = tmp / "ws"
    (ws / "w").mkdir(parents=True)
    _open_up(ws)
    (ws / "writer.py").write_text(WRITER)
    os.chmod(ws / "writer.py", 0o644)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KERNEL_HOME": str(tmp / "home")}
    policy = tmp / "bench.toml"
    policy.write_text((ROOT / "policies" / "default.toml").read_text()
                      .replace("syscalls = 10000", f"syscalls = {n + 100}")
                      .replace("files_written = 1000", f"files_written = {n + 100}")
                      .replace("bytes_written = 104857600", f"bytes_written = {8192 * n}"))
    print(f"\n2. gated durable 4 KiB writes from one agent ({n} writes over 64 files)")
    # baseline: write + fsync + rename + dir fsync
    d = tmp / "plain"
    d.mkdir()
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    data = os.urandom(4096)
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
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
    _report("plain write+fsync+rename+dir fsync", n, total, lat, None)
    plain_rate = n / total
    for name in registry.NAMES:
        if not registry.probe(name).available:
            continue
        r = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "kernel"), "exec", "--isolation", name, "--policy",
             str(policy), "--workspace", str(ws), "--runs-dir", str(tmp / "runs"), "--", PY,
             "writer.py", str(n)], capture_output=True, text=True, env=env)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")]
        if r.returncode != 0 or not line:
            print(f"   kernel ({name}): failed: {r.stderr[-400:]}")
            continue
        res = json.loads(line[0][6:])
        _report(f"gated write through the kernel ({name})", n, res["total"], res["lat"],
                plain_rate)
    shutil.rmtree(tmp, ignore_errors=True)


def _report(name: str, n: int, total: float, lat: list[float], plain: float | None) -> None:
    lat = sorted(lat)
    p50 = lat[len(lat) // 2] * 1e6
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6
    ratio = f" ({n / total / plain:.2f}x plain)" if plain else ""
    print(f"   {name:45} {n / total:8.0f} writes/s  p50 {p50:6.0f} µs  p99 {p99:6.0f} µs{ratio}")


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--only", choices=("exec", "write"))
    a = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()} Linux {platform.release()}, "
          f"{os.cpu_count()} cpus, Python {platform.python_version()}")
    if a.only in (None, "exec"):
        bench_exec(a.runs)
    if a.only in (None, "write"):
        bench_writes(a.writes)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
