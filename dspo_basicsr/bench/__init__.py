"""Benchmark helpers of ``scripts/bench_*.py``: synthetic inputs, baselines, one timer (not imported on start-up)."""
