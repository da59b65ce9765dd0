"""Benchmarks and reports: `python -m lifecycle.bench.<name>`; they print tables, never assert timings."""
