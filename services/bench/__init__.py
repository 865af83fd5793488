"""Benchmark runners: learning efficiency, system speed, and the pass@k evaluation behind `e3 eval`."""
