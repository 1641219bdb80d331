"""Shared timing helper for the benchmark scripts (run as `python benchmarks/X.py`,
so this module is importable as `timing`)."""

import time


def best_time(fn, repeats: int) -> float:
  """Seconds of the fastest of `repeats` calls of `fn`, after one warm-up call (which
  also compiles)."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best
