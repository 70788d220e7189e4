"""Benchmarks (pytest-benchmark suites, the step microbenchmark, result files and plots).

A package so that its conftest is imported as `bench.conftest`, not as a second top-level
`conftest` beside tests/conftest.py (which tests import from).
"""
