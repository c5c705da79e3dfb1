"""Hostile agent: allocates and touches memory until something stops it."""

import json
import sys

chunks = []
total = 0
try:
    while total < 8 * 1024 * 1024 * 1024:
        b = bytearray(16 * 1024 * 1024)
        for i in range(0, len(b), 4096):
            b[i] = 1
        chunks.append(b)
        total += len(b)
        print(json.dumps({"allocated_mb": total >> 20}), flush=True)
except MemoryError:
    print(json.dumps({"allocated_mb": total >> 20, "error": "MemoryError"}), flush=True)
    sys.exit(3)
