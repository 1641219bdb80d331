"""Shared helpers of the benchmark scripts (run as `python benchmarks/X.py`, so this
module is importable as `timing`): best-of-N timing, XLA FLOP counts and buffer
plans, the device's peak FLOP/s and peak memory in use."""

import resource
import time

import jax

# Dense peak FLOP/s per device kind (vendor figures, no sparsity) by compute dtype.
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
}


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


def peak_flops(dtype: str):
  """The first device's dense peak FLOP/s for `dtype`, None for an unlisted kind."""
  kind = jax.devices()[0].device_kind
  for name, peaks in PEAK_FLOPS.items():
    if name in kind:
      return peaks[dtype]
  return None


def _flops(cost):
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0)) or None


def compiled_flops(jitted, *args):
  """XLA's FLOP count of the compiled `jitted(*args)`, None where it has none."""
  try:
    return _flops(jitted.lower(*args).compile().cost_analysis())
  except Exception:  # pylint: disable=broad-except  (cost analysis is best effort)
    return None


def lowered_flops(jitted, *args):
  """XLA's FLOP count of `jitted(*args)` before compilation (no compile, no memory):
  the program as written, with loop bodies counted once."""
  try:
    return _flops(jitted.lower(*args).cost_analysis())
  except Exception:  # pylint: disable=broad-except
    return None


def device_peak_bytes():
  """The first device's peak bytes in use, None where the backend keeps no count
  (the CPU)."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def xla_buffer_bytes(compiled):
  """The bytes XLA's buffer plan of a compiled program needs at once: arguments +
  outputs + temporaries - aliased (donated) buffers; None where there is no plan."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def peak_memory_gib():
  """The accelerator's peak bytes in use, or on the CPU the process's peak resident
  memory (compilation included), in GiB."""
  peak = device_peak_bytes() if jax.default_backend() != "cpu" else None
  if peak is not None:
    return peak / 2 ** 30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
