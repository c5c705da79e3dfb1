"""The initial workspace's content, kept in the run folder so `kernel replay` needs nothing else.

Size policy: when the regular files of the initial workspace total at most
:data:`INITIAL_CONTENT_MAX` bytes, their content is stored; above it, none is. A file is left out
when it is hard-linked (a hard link may lead to a file outside the workspace; the same rule as
for writes), when its content holds a value the run redacts, or when it changed between the
scan and the copy.

Format: the stored files' contents are concatenated, in the initial manifest's path order
(sorted), into *packs* of at most :data:`PACK_BYTES` (a file never spans two packs; a larger
file is a pack of its own), each stored as one blob. A pack is cheap to make durable (one fsync
however many files it holds) and carries no names: the manifest gives every file's path, size
and digest, and the ``snapshot.initial`` event says which files are not in the packs::

    {"tree_digest", "entries", "content": "complete" | "partial" | "none",
     "unstored": N, "unstored_paths": [...], "content_blobs": [pack digests]}

Replay reads the packs in order, slicing each stored file's ``size`` bytes and checking its
digest. A run without complete content needs ``--workspace DIR`` holding the initial workspace
(checked against the initial manifest).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kernel.manifest import Entry
from kernel.paths import PathViolation, read_regular
from kernel.recorder import Redactor, RunRecorder

INITIAL_CONTENT_MAX = 256 << 20
"""Bytes of initial file content stored per run, at most (above: none stored)."""
PACK_BYTES = 32 << 20
"""Largest pack of concatenated file contents (one blob each)."""
UNSTORED_LISTED = 1000
"""At most this many files may be left out (each is named); beyond, nothing is stored."""


def store_initial(rec: RunRecorder, root: Path, entries: dict[str, Entry],
                  redact: Sequence[str]) -> dict[str, Any]:
    """Store the initial files' content; returns the fields of the ``snapshot.initial`` event."""
    files = {rel: e for rel, e in entries.items() if e.kind == "file"}
    if sum(e.size for e in files.values()) > INITIAL_CONTENT_MAX:
        return {"content": "none", "unstored": len(files), "unstored_paths": [],
                "content_blobs": []}
    redactor = Redactor(redact)
    unstored: list[str] = []
    packs: list[str] = []
    pack: list[bytes] = []
    names: list[str] = []
    size = 0

    def flush() -> None:
        joined = b"".join(pack)
        digest = rec.put_blob(joined)
        if digest == "sha256:" + hashlib.sha256(joined).hexdigest():
            packs.append(digest)
        else:  # a redacted value spanned two files: the pack is not these bytes; leave them out
            unstored.extend(names)
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for rel in sorted(files):
            e = files[rel]
            try:
                data = read_regular(rootfd, rel, e.size)
            except (OSError, PathViolation):
                unstored.append(rel)
                continue
            if ("sha256:" + hashlib.sha256(data).hexdigest() != e.digest
                    or redactor.data(data) != data):
                unstored.append(rel)
                continue
            if pack and size + len(data) > PACK_BYTES:
                flush()
                pack, names, size = [], [], 0
            pack.append(data)
            names.append(rel)
            size += len(data)
        if pack:
            flush()
    finally:
        os.close(rootfd)
    unstored.sort()
    if len(unstored) > UNSTORED_LISTED:  # too many to name: replay needs --workspace anyway
        return {"content": "none", "unstored": len(files), "unstored_paths": [],
                "content_blobs": []}
    return {"content": "partial" if unstored else "complete", "unstored": len(unstored),
            "unstored_paths": unstored, "content_blobs": packs}


def stored_files(entries: dict[str, Any], snapshot_body: dict[str, Any],
                 read_blob: Any) -> Iterator[tuple[str, bytes]]:
    """``(path, content)`` of every stored initial file, read back from the packs.

    Raises ValueError when the packs do not hold exactly the stored files' bytes.
    """
    skip = set(snapshot_body.get("unstored_paths") or ())
    if len(skip) != snapshot_body.get("unstored", 0):
        raise ValueError("not every unstored file is named")
    wanted = [(rel, entries[rel]) for rel in sorted(entries)
              if entries[rel].get("kind") == "file" and rel not in skip]
    stream = b"".join(read_blob(d) for d in snapshot_body.get("content_blobs") or ())
    pos = 0
    for rel, e in wanted:
        n = e.get("size")
        if type(n) is not int or pos + n > len(stream):
            raise ValueError(f"{rel}: the content packs end before this file")
        data = stream[pos:pos + n]
        pos += n
        if "sha256:" + hashlib.sha256(data).hexdigest() != e.get("digest"):
            raise ValueError(f"{rel}: the bytes in the content packs do not hash to the "
                             "manifest's digest")
        yield rel, data
    if pos != len(stream):
        raise ValueError(f"the content packs hold {len(stream) - pos} bytes more than the "
                         "stored files")
