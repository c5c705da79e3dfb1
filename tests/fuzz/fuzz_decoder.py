"""Coverage-guided fuzz target (atheris, libFuzzer) for the kernel's frame decoder.

Bytes from the fuzzer are fed, in fuzzer-chosen chunks, to the kernel's end of the syscall
channel (``kernel.supervisor.Channel``: length prefix, size cap, strict JSON decoding) and every
decoded frame to the request checker. Anything but a frame, ``None`` (incomplete) or a
``FrameError`` is a crash. Run by tests/unit/test_fuzz_atheris.py for a bounded time; by hand:

    .venv/bin/python tests/fuzz/fuzz_decoder.py -max_total_time=600 tests/fuzz/seeds/decoder
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from kernel.supervisor import Channel, _frame_problem
    from syscalls import abi

# Set by the harness test to prove that a failure inside the target is reported as a crash.
_CONTROL = os.environ.get("FUZZ_DECODER_CONTROL") == "1"
_A, _B = socket.socketpair()
_CH = Channel(_A)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    chunk = fdp.ConsumeIntInRange(1, 64)
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    _CH.inbuf.clear()
    for pos in range(0, len(stream), chunk):
        _CH.inbuf += stream[pos:pos + chunk]
        while True:
            try:
                frame = _CH.next_frame()
            except abi.FrameError:
                if _CONTROL:
                    raise
                return
            if frame is None:
                break
            if not isinstance(frame, dict):
                raise AssertionError(f"decoded a {type(frame).__name__}")
            problem = _frame_problem(frame)
            if problem is not None and not isinstance(problem, str):
                raise AssertionError("the request checker returned a non-string")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
