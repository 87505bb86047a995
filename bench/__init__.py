"""Benchmarks: each `bench_<thing>.py` prints a table and writes JSON to `bench/results/`."""
