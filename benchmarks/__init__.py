"""Benchmarks: time and memory of our trainers against the reference code's layout (see docs/performance.md)."""
