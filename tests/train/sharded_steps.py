"""Two KaoLRM training steps on one device and on a (data=4, fsdp=2) mesh of 8 fake
CPU devices; prints a JSON report. Run by sharding_test.py in a subprocess, since
the device count must be set before JAX starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.train.sharded_steps
"""

import json

import jax
import numpy as np
from flax import nnx

from data_pipeline.batch import random_batch
from kaojax import losses, sharding
from kaojax.flame.synthetic import make_synthetic_flame
from kaojax.models.kaolrm import KaoLRM, kaolrm_config
from kaojax.train.loop import compile_step
from kaojax.train.runtime import place_state
from kaojax.train.optimizer import make_optimizer
from kaojax.train.step import create_state

BATCH, VIEWS, SIZE = 8, 2, 32


def run(device_mesh, batch, num_steps=2):
  flame = make_synthetic_flame()
  model = KaoLRM(kaolrm_config("tiny", num_samples=256), flame, nnx.Rngs(0))
  tx = make_optimizer(1e-4, 1, 10)
  graphdef, state = create_state(model, tx)
  state = place_state(state, device_mesh, tx)
  weights = losses.stage_weights(2, overrides={"lpips": 0})
  step = compile_step(graphdef, tx, state, device_mesh, weights, 0.75)
  data = jax.device_put(batch, sharding.batch_sharding(device_mesh))
  history = []
  for i in range(num_steps):
    state, metrics = step(state, data, jax.random.fold_in(jax.random.key(0), i))
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  shards = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)}
  return history, [np.asarray(x) for x in jax.tree.leaves(state.params)], shards


def initial_params():
  model = KaoLRM(kaolrm_config("tiny", num_samples=256), make_synthetic_flame(), nnx.Rngs(0))
  return [np.asarray(x) for x in jax.tree.leaves(create_state(model, make_optimizer(
      1e-4, 1, 10))[1].params)]


def main():
  devices = jax.devices()
  assert len(devices) == 8, f"expected 8 fake devices, got {len(devices)}"
  batch = random_batch(BATCH, VIEWS, 56, SIZE)
  single, single_params, _ = run(sharding.make_device_mesh(1, 1, devices[:1]), batch)
  multi, multi_params, specs = run(sharding.make_device_mesh(4, 2, devices), batch)
  # Loss terms; the gradient norm (a diagnostic summed over every parameter in a
  # different order per mesh) is reported apart.
  loss_diff = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-6)
                  for a, b in zip(single, multi) for k in a if k != "grad_norm")
  grad_norm_diff = max(abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"]
                       for a, b in zip(single, multi))
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(single_params, initial_params()))
  param_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(single_params, multi_params))
  print(json.dumps({"single": single, "multi": multi, "max_rel_loss_diff": loss_diff,
                    "max_param_diff": param_diff,
                    "max_rel_grad_norm_diff": grad_norm_diff, "max_param_change": moved,
                    "fsdp_sharded": any("fsdp" in s for s in specs)}))


if __name__ == "__main__":
  main()
