"""wise-bench: lifelong model-editing benchmarks (WISE and baselines)."""

__version__ = "0.1.0"
