"""Benchmark helpers without processes: pass@k, aggregation over seeds, reports and plots."""
