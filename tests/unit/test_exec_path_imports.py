"""`kernel exec` starts a Python process per run: what it imports is paid on every run.

These modules cost tens of milliseconds each to import and are not needed to run an agent
(sqlite_utils: the control plane's reading commands; cryptography's serialization package:
key formats other than the kernel's own; ctypes.util's ldconfig lookups; the self-test's
corpus). A change that pulls
one of them back onto the exec path fails here instead of silently slowing every run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from kernel import _cli, supervisor, policy, agentenv, keys, approval_gate, controlplane
from kernel import reviewers
from sandbox import registry, native, seccomp_filter
seccomp_filter.program()
print(" ".join(sorted(m for m in sys.modules)))
"""

HEAVY = ("sqlite_utils", "click", "pluggy", "dateutil",
         "cryptography.hazmat.primitives.serialization.ssh",
         # the self-test's attack corpus (only `kernel selftest` needs it)
         "kernel.selftest", "kernel.corpus")


def test_the_exec_path_imports_none_of_the_heavy_modules() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.split()
    loaded = [m for m in HEAVY if m in out]
    assert loaded == [], f"imported on the exec path: {loaded}"
