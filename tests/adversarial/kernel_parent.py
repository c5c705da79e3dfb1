"""A stand-in for the kernel process: starts one sandbox, says so, then waits to be killed.

Used by ``test_kernel_death_ends_the_sandbox``: the test SIGKILLs this process and checks that
nothing of the sandbox survives it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from sandbox import registry
from tests.sandbox_helpers import agent_argv, make_spec


def main() -> None:
    name, workspace = sys.argv[1], Path(sys.argv[2])
    marker = os.environ["SURVIVOR_MARKER"]
    backend = registry.backend(name)
    sb = backend.start(make_spec(workspace, agent_argv("survivor.py", marker)))
    print("started", sb.pid, flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
