"""Benchmarks run by hand: `python bench/run.py --help`. Not part of the test suite."""
