"""The coverage-guided fuzz target for the frame decoder (tests/fuzz/fuzz_decoder.py), run for a
bounded time: ``FUZZ_SECONDS`` (default 20). Any crash fails the test with libFuzzer's report."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "tests" / "fuzz" / "fuzz_decoder.py"
SEEDS = ROOT / "tests" / "fuzz" / "seeds" / "decoder"
SECONDS = int(os.environ.get("FUZZ_SECONDS", "20"))

pytest.importorskip("atheris", reason="atheris is a dev dependency (pip install -e '.[dev]')")


def _fuzz(tmp_path: Path, seconds: int, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    corpus = tmp_path / "corpus"
    shutil.copytree(SEEDS, corpus)
    return subprocess.run(
        [sys.executable, str(TARGET), f"-max_total_time={seconds}", "-timeout=10",
         "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=seconds + 120, cwd=tmp_path,
        env={**os.environ, **(env or {})})


def test_the_decoder_survives_coverage_guided_fuzzing(tmp_path: Path) -> None:
    res = _fuzz(tmp_path, SECONDS)
    assert res.returncode == 0, res.stderr[-4000:]
    m = re.search(r"Done (\d+) runs in (\d+) second", res.stderr)
    assert m, res.stderr[-2000:]
    runs = int(m.group(1))
    assert runs > 1000, res.stderr[-2000:]
    print(f"atheris: {runs} inputs in {m.group(2)} s")


def test_a_failure_inside_the_target_is_reported(tmp_path: Path) -> None:
    # The control makes every decode error a crash: the harness must notice at once.
    res = _fuzz(tmp_path, 30, env={"FUZZ_DECODER_CONTROL": "1"})
    assert res.returncode != 0
    assert "FrameError" in res.stdout + res.stderr
    assert list(tmp_path.glob("crash-*"))
