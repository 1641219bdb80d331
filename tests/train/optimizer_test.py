"""The optimiser against PyTorch's AdamW + clip_grad_norm_ + LambdaLR."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
import torch
from flax import nnx

from kaojax.nn.layers import layer_norm, linear
from kaojax.nn.params import mark_parameters
from kaojax.train.optimizer import (
    learning_rate_schedule, make_optimizer, restarted_schedule, weight_decay_mask)


def _torch_lambda(warmup, total, init, peak):
  def factor(step):
    if step < warmup:
      return (init + (peak - init) * step / warmup) / peak
    progress = min((step - warmup) / (total - warmup), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
  return factor


def test_schedule_warmup_then_cosine():
  schedule = learning_rate_schedule(4e-4, 3000, 10_000)
  assert float(schedule(0)) == pytest.approx(1e-10, abs=1e-15)
  assert float(schedule(1500)) == pytest.approx(2e-4, rel=1e-5)
  assert float(schedule(3000)) == pytest.approx(4e-4, rel=1e-6)
  assert float(schedule(6500)) == pytest.approx(2e-4, rel=1e-5)
  assert float(schedule(10_000)) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match="warmup_steps"):
    learning_rate_schedule(1e-3, 10, 10)


def test_restarted_schedule_warms_up_again_at_the_restart():
  schedule = restarted_schedule(1e-3, 20, 1000, restart_step=800, restart_peak=2e-4)
  plain = learning_rate_schedule(1e-3, 20, 800)
  for step in (0, 10, 20, 400, 799):
    assert float(schedule(step)) == pytest.approx(float(plain(step)), rel=1e-6, abs=1e-15)
  assert float(schedule(799)) < 1e-7
  assert float(schedule(800)) == pytest.approx(1e-10, abs=1e-15)  # warm-up from ~0
  assert float(schedule(810)) == pytest.approx(1e-4, rel=1e-5)
  assert float(schedule(820)) == pytest.approx(2e-4, rel=1e-6)
  assert float(schedule(910)) == pytest.approx(1e-4, rel=1e-5)   # half-way down the cosine
  assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-12)
  assert float(restarted_schedule(1e-3, 20, 810, 800, 2e-4)(809)) > 0  # short second stage
  with pytest.raises(ValueError, match="restart_step"):
    restarted_schedule(1e-3, 20, 1000, restart_step=1000, restart_peak=2e-4)


def test_weight_decay_mask_by_module_type():
  """LayerNorm parameters and biases are spared whatever their names; other weights
  decay whatever theirs (a module named "norm_proj" is a Linear); frozen ones never."""

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.norm_proj = linear(4, 4, (None, None), rngs)
      self.ln = layer_norm(4, 1e-6, rngs, axis=None)
      self.table = nnx.Param(jnp.ones((3,)))   # a plain parameter: decays
      self.frozen_fc = linear(4, 4, (None, None), rngs)

  net = mark_parameters(Net(nnx.Rngs(0)), frozen=[("frozen_fc",)])
  mask = weight_decay_mask(net)
  assert mask["norm_proj"]["kernel"].get_value() and not mask["norm_proj"]["bias"].get_value()
  assert not mask["ln"]["scale"].get_value() and not mask["ln"]["bias"].get_value()
  assert mask["table"].get_value()
  assert not mask["frozen_fc"]["kernel"].get_value()


def test_matches_torch_adamw_with_clipping_and_schedule():
  rng = np.random.default_rng(0)
  dense = mark_parameters(linear(5, 3, (None, None), nnx.Rngs(0)))
  params = {"dense": {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
                      "bias": rng.normal(size=(3,)).astype(np.float32)}}
  state = nnx.state(dense, nnx.Param)
  nnx.replace_by_pure_dict(state, params["dense"])
  grads = [{"dense": {"kernel": rng.normal(size=(5, 3)).astype(np.float32) * s,
                      "bias": rng.normal(size=(3,)).astype(np.float32) * s}}
           for s in (0.1, 3.0, 0.5, 2.0, 0.05, 1.0)]  # some steps get clipped
  peak, warmup, total = 1e-2, 2, 6
  tx = make_optimizer(peak, warmup, total)
  opt_state = tx.init(state)
  ours = state
  for g in grads:
    grad = jax.tree.map(jnp.zeros_like, ours)
    nnx.replace_by_pure_dict(grad, g["dense"])
    updates, opt_state = tx.update(grad, opt_state, ours)
    ours = optax.apply_updates(ours, updates)
  ours = {"dense": nnx.to_pure_dict(ours)}

  w = torch.tensor(params["dense"]["kernel"], requires_grad=True)
  b = torch.tensor(params["dense"]["bias"], requires_grad=True)
  opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.05},
                           {"params": [b], "weight_decay": 0.0}],
                          lr=peak, betas=(0.9, 0.95), eps=1e-8)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, _torch_lambda(warmup, total, 1e-10, peak))
  for g in grads:
    w.grad = torch.tensor(g["dense"]["kernel"])
    b.grad = torch.tensor(g["dense"]["bias"])
    torch.nn.utils.clip_grad_norm_([w, b], 1.0)
    opt.step()
    sched.step()
  np.testing.assert_allclose(ours["dense"]["kernel"], w.detach().numpy(), atol=2e-6)
  np.testing.assert_allclose(ours["dense"]["bias"], b.detach().numpy(), atol=2e-6)
