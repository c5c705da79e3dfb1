"""The client bundle: the only project code a sandbox can see.

The untrusted client (``syscalls/abi.py``, ``syscalls/client.py``, ``syscalls/ksys.py``) is
copied into a content-addressed directory (under the run's private scratch dir, which the
unprivileged agent uid can traverse), made read-only, and shown to the agent read-only;
``PYTHONPATH`` and ``PATH`` point at it. The trusted modules are never inside it, so the agent
cannot even read the kernel's code path by accident.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from syscalls import abi

CLIENT_FILES = ("abi.py", "client.py", "ksys.py")
KSYS_SCRIPT = """#!/usr/bin/env python3
# ksys: the kernel's command-line syscall client (see docs/syscalls.md).
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "lib"))
from syscalls.ksys import main
sys.exit(main())
"""


def ensure_bundle(home: Path) -> Path:
    """Return the bundle directory (``<home>/client/<digest>``), creating it once.

    ``home`` must be traversable by the agent uid (mode 0711 is set on it)."""
    src = Path(abi.__file__).resolve().parent
    files = {name: (src / name).read_bytes() for name in CLIENT_FILES}
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name] + b"\0")
    h.update(KSYS_SCRIPT.encode())
    target = home / "client" / h.hexdigest()[:16]
    if (target / "bin" / "ksys").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o711)  # noqa: S103 (agent must traverse to the bundle)
    os.chmod(target.parent, 0o711)  # noqa: S103
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=target.parent))
    pkg = tmp / "lib" / "syscalls"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Agent-side syscall client (bundle)."""\n')
    for name, data in files.items():
        (pkg / name).write_bytes(data)
    (tmp / "bin").mkdir()
    (tmp / "bin" / "ksys").write_text(KSYS_SCRIPT)
    for dirpath, dirnames, filenames in os.walk(tmp):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o555)  # noqa: S103 (read-only bundle)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o555 if dirpath.endswith("bin") else 0o444)
    os.chmod(tmp, 0o555)  # noqa: S103
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / "bin" / "ksys").is_file():
            raise
    return target
