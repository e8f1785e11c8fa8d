"""Measuring the engines: workloads, the benchmark runner (`python -m common.benchmark.bench`), the
HuggingFace baselines, online arrivals, the HTTP load driver, memory estimates, quality checks, plots."""
