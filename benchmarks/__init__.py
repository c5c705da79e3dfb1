"""Benchmarks, run on demand (`make bench` or `python -m benchmarks`); never part of the tests."""
