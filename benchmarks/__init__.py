"""Benchmark scripts (run as `python benchmarks/<name>.py`); shared plumbing in benchmarks/common.py."""
