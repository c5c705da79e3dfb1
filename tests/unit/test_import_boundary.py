"""The untrusted client never imports trusted code (STYLE: mechanical guards against drift)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ["syscalls/abi.py", "syscalls/client.py", "syscalls/ksys.py"]
ALLOWED_PROJECT = {"syscalls", "syscalls.abi", "syscalls.client"}


@pytest.mark.parametrize("rel", CLIENT)
def test_client_imports_only_stdlib_and_abi(rel: str) -> None:
    tree = ast.parse((ROOT / rel).read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{rel}: relative import"
            mod = node.module or ""
            names = [mod] if mod != "syscalls" else [f"syscalls.{a.name}" for a in node.names]
        for n in names:
            top = n.split(".")[0]
            if top == "syscalls":
                assert n in ALLOWED_PROJECT, f"{rel} imports trusted module {n}"
            else:
                assert top in sys.stdlib_module_names or top == "__future__", \
                    f"{rel} imports non-stdlib {n}"


def test_syscalls_package_init_imports_nothing() -> None:
    tree = ast.parse((ROOT / "syscalls/__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


def test_client_bundle_holds_only_client_files(tmp_path: Path) -> None:
    from kernel import bundle

    b = bundle.ensure_bundle(tmp_path)
    files = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files == ["bin/ksys", "lib/syscalls/__init__.py", "lib/syscalls/abi.py",
                     "lib/syscalls/client.py", "lib/syscalls/ksys.py"]
    assert bundle.ensure_bundle(tmp_path) == b
