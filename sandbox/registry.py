"""Choosing a backend: by name, or ``auto`` = the strongest available. Never a silent downgrade.

``auto`` prefers ``native`` (namespaces + Landlock + seccomp built by this project) over
``firejail``; whichever it picks is recorded. A backend that is named explicitly and is not
available is a :class:`SandboxError` listing what is missing; nothing runs.
"""

from __future__ import annotations

from functools import cache

from kernel.errors import SandboxError
from sandbox.base import Availability, Backend

NAMES = ("native", "firejail")


@cache
def backend(name: str) -> Backend:
    if name == "native":
        from sandbox.native import NativeBackend

        return NativeBackend()
    if name == "firejail":
        from sandbox.firejail import FirejailBackend

        return FirejailBackend()
    raise SandboxError(f"unknown isolation backend {name!r}",
                       hint=f"choose one of: {', '.join(NAMES)}, auto")


@cache
def probe(name: str) -> Availability:
    return backend(name).probe()


def choose(requested: str) -> tuple[Backend, Availability]:
    """The backend to use for ``requested`` (``native``, ``firejail`` or ``auto``)."""
    if requested == "auto":
        reasons = []
        for name in NAMES:
            av = probe(name)
            if av.available:
                return backend(name), av
            reasons.append(f"{name}: {'; '.join(av.missing)}")
        raise SandboxError("no isolation backend is available here: " + " | ".join(reasons))
    av = probe(requested)
    if not av.available:
        raise SandboxError(
            f"isolation {requested!r} is not available here: {'; '.join(av.missing)}",
            hint="nothing ran; fix the host or choose another backend with --isolation",
        )
    return backend(requested), av
