"""The agent's environment: built from the policy and the operator's explicit --env, nothing else.

Everything in the kernel's own environment is scrubbed unless the policy names it
(``env.passthrough``, ``env.secrets``). The values of named secrets, and of any kernel variable
whose name looks like a secret, are collected so the recorder can redact them from everything
it writes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from kernel.errors import BadInputError
from kernel.policy import ENV_NAME_RE, Policy

SECRET_NAME_RE = re.compile(r"(TOKEN|SECRET|PASSW(OR)?D|API_?KEY|PRIVATE|CREDENTIAL|AUTH)",
                            re.IGNORECASE)


@dataclass(frozen=True)
class AgentEnv:
    env: dict[str, str]
    """The agent's environment, before the kernel adds its own KERNEL_* variables."""
    passthrough: tuple[str, ...]
    """Names actually copied from the kernel's environment (policy passthrough present)."""
    secrets: tuple[str, ...]
    """Secret names actually passed."""
    explicit: tuple[str, ...]
    """Names passed by the operator with --env."""
    redact: tuple[str, ...]
    """Values to redact from every record."""


def parse_env_args(items: list[str]) -> dict[str, str]:
    """``--env NAME=VALUE`` arguments; a bad one names itself."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise BadInputError(f"--env {item!r}: expected NAME=VALUE")
        if not ENV_NAME_RE.match(name):
            raise BadInputError(f"--env {item!r}: {name!r} is not a valid variable name")
        if name.startswith("KERNEL_"):
            raise BadInputError(f"--env {item!r}: KERNEL_* variables are set by the kernel")
        if "\x00" in value:
            raise BadInputError(f"--env {name}: the value contains a NUL byte")
        out[name] = value
    return out


def build(policy: Policy, host_env: Mapping[str, str], explicit: Mapping[str, str]) -> AgentEnv:
    env: dict[str, str] = {}
    passed: list[str] = []
    for name in policy.env.passthrough:
        if name in host_env:
            env[name] = host_env[name]
            passed.append(name)
    env.update(policy.env.set)
    secrets: list[str] = []
    for name in policy.env.secrets:
        if name in host_env:
            env[name] = host_env[name]
            secrets.append(name)
    env.update(explicit)
    redact = {host_env[n] for n in secrets}
    redact |= {v for n, v in host_env.items() if SECRET_NAME_RE.search(n)}
    redact = {v for v in redact if len(v) >= 4}
    return AgentEnv(env=env, passthrough=tuple(passed), secrets=tuple(secrets),
                    explicit=tuple(sorted(explicit)), redact=tuple(sorted(redact)))
