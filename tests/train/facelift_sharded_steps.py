"""Two training steps of each FaceLift network (GS-LRM; the multi-view diffusion UNet
with EMA) on one device and on a (data=4, fsdp=2) mesh of 8 fake CPU devices; prints
a JSON report per network. Run by facelift_sharding_test.py in a subprocess (the
device count must be set before JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m tests.train.facelift_sharded_steps
"""

import json

import jax
import numpy as np

from configs import facelift_gslrm, facelift_mvdiff
from data_pipeline.view_batch import random_view_batch
from kaojax import sharding
from kaojax.train import facelift_gslrm as gslrm_training
from kaojax.train import facelift_loop
from kaojax.train import facelift_mvdiff as mvdiff_training

BATCH, SIZE = 8, 16


def gslrm_parts(config):
  return gslrm_training.build_model(config), gslrm_training.make_loss(config), None


def mvdiff_parts(config):
  unet, conditioners = mvdiff_training.build_networks(config)
  return unet, mvdiff_training.make_loss(config), conditioners


def run(device_mesh, config, parts, batch, ema_decay, num_steps=2):
  model, loss_fn, frozen = parts(config)
  tx = facelift_loop.make_tx(config)
  graphdef, state = facelift_loop.initial_state(model, tx, device_mesh,
                                                ema=ema_decay is not None)
  initial = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  step = facelift_loop.compile_step(graphdef, tx, state, device_mesh, loss_fn, frozen,
                                    ema_decay)
  data = jax.device_put(batch, sharding.batch_sharding(device_mesh))
  history = []
  for i in range(num_steps):
    state, metrics = step(state, data, jax.random.fold_in(jax.random.key(0), i))
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  leaves = jax.tree.leaves(state.params) + (jax.tree.leaves(state.ema) if ema_decay else [])
  shards = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)}
  return history, [np.asarray(x) for x in leaves], initial, shards


def compare(config, parts, batch, ema_decay=None):
  devices = jax.devices()
  single, single_params, initial, _ = run(sharding.make_device_mesh(1, 1, devices[:1]),
                                          config, parts, batch, ema_decay)
  multi, multi_params, _, specs = run(sharding.make_device_mesh(4, 2, devices), config,
                                      parts, batch, ema_decay)
  loss_diff = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-6)
                  for a, b in zip(single, multi) for k in a if k != "grad_norm")
  grad_norm_diff = max(abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"]
                       for a, b in zip(single, multi))
  return {"single": single, "multi": multi, "max_rel_loss_diff": loss_diff,
          "max_rel_grad_norm_diff": grad_norm_diff,
          "max_param_diff": max(float(np.max(np.abs(a - b)))
                                for a, b in zip(single_params, multi_params)),
          "max_param_change": max(float(np.max(np.abs(a - b)))
                                  for a, b in zip(single_params, initial)),
          "fsdp_sharded": any("fsdp" in s for s in specs)}


def test_config(module):
  """The tiny config with an AdamW whose update is linear in small gradients (eps
  1e-2): with eps 1e-8 the first Adam step moves every parameter by +-lr whatever
  its gradient's size, so float noise in a gradient that is ~0 (e.g. an unused
  Gaussian channel) flips a 2 lr step; sharding, not Adam, is under test here."""
  config = module.get_config("tiny")
  config.data.image_size = SIZE
  config.optim.lr = 1e-2
  config.optim.warmup_steps = 1
  config.optim.eps = 1e-2
  return config


def main():
  assert len(jax.devices()) == 8, f"expected 8 fake devices, got {len(jax.devices())}"
  gslrm = test_config(facelift_gslrm)
  mvdiff = test_config(facelift_mvdiff)
  print(json.dumps({
      "gslrm": compare(gslrm, gslrm_parts, random_view_batch(BATCH, gslrm.data.num_views, SIZE)),
      "mvdiff": compare(mvdiff, mvdiff_parts, random_view_batch(BATCH, 6, SIZE, seed=1),
                        mvdiff.ema_decay)}))


if __name__ == "__main__":
  main()
