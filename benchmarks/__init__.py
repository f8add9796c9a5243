"""Benchmarks of implicitdiff (run as scripts, e.g. ``python benchmarks/ridge_hypergradient.py``; not part of the test suite)."""
