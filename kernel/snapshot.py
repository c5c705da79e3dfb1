"""The initial workspace's content, stored as blobs so ``kernel replay`` needs nothing else.

Size policy: when the regular files of the initial workspace total at most
:data:`INITIAL_CONTENT_MAX` bytes, each file's content is stored as a blob (under the digest the
initial manifest lists, so the manifest itself references it). A file is *not* stored when its
content holds a value the run redacts (a stored redacted copy would not hash to the manifest
digest), or when it changed between the scan and the copy. Above the cap nothing is stored. The
``snapshot.initial`` event says which: ``content`` is ``complete``, ``partial`` or ``none``, with
``unstored`` the number of files left out. Hard-linked files are never read (a hard link
may lead to a file outside the workspace; the same rule as for writes). Replay of a run
without complete content needs ``--workspace DIR`` holding the initial workspace (checked
against the initial manifest).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from kernel.manifest import Entry
from kernel.paths import PathViolation, read_regular
from kernel.recorder import Redactor, RunRecorder

INITIAL_CONTENT_MAX = 256 << 20
"""Bytes of initial file content stored per run, at most (above: none stored)."""


def store_initial(rec: RunRecorder, root: Path, entries: dict[str, Entry],
                  redact: Sequence[str]) -> tuple[str, int]:
    """Store the initial files' content; returns ``(content, unstored)`` for the event."""
    files = {rel: e for rel, e in entries.items() if e.kind == "file"}
    if not files:
        return "complete", 0
    if sum(e.size for e in files.values()) > INITIAL_CONTENT_MAX:
        return "none", len(files)
    redactor = Redactor(redact)
    unstored = 0
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for rel, e in sorted(files.items()):
            try:
                data = read_regular(rootfd, rel, e.size)
            except (OSError, PathViolation):
                unstored += 1
                continue
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            if digest != e.digest or redactor.data(data) != data:
                unstored += 1
                continue
            rec.put_blob(data)
    finally:
        os.close(rootfd)
    return ("complete" if unstored == 0 else "partial"), unstored
