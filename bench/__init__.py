"""Benchmarks: `python -m bench.submit`, `python -m bench.proxy`."""
