"""GS-LRM training starts from a released-layout checkpoint (the `model` dict, with
`loss_calculator.*` dropped)."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from configs import facelift_gslrm
from data_pipeline.view_batch import random_view_batch
from kaojax.convert.gslrm import load_gslrm
from kaojax.models.gslrm import gslrm_config
from kaojax.train import facelift_gslrm as training
from tests.facelift.gslrm_model_test import _tiny_state


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_released_state_dict_initialises_training(tmp_path):
  cfg = gslrm_config("tiny")
  state = _tiny_state(cfg)
  blob = {k: torch.from_numpy(v) for k, v in state.items()}
  blob["loss_calculator.perceptual.vgg.0.weight"] = torch.zeros(4, 3, 3, 3)  # dropped
  torch.save({"model": blob, "optimizer": {}, "lr_scheduler": {}}, tmp_path / "ckpt.pt")
  config = facelift_gslrm.get_config("tiny")
  config.init.converted_model = str(tmp_path / "ckpt.pt")
  config.init.head_dim = cfg.head_dim
  model = training.build_model(config)
  assert model.cfg.heads == cfg.heads and model.cfg.layers == cfg.layers
  for a, b in zip(_params(model), _params(load_gslrm(state, cfg))):
    np.testing.assert_array_equal(a, b)
  # every parameter is tagged for the optimiser's decay mask
  assert all("weight_decay" in v.get_metadata()
             for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))



def test_remat_changes_no_gradient():
  batch = random_view_batch(1, 8, 16)
  grads = []
  for remat in (False, True):
    config = facelift_gslrm.get_config("tiny")
    config.model.remat = remat
    graphdef, params = nnx.split(training.build_model(config))
    loss_fn = training.make_loss(config)
    objective = lambda p: loss_fn(nnx.merge(graphdef, p), batch, None, None)[0]
    grads.append(jax.tree.leaves(jax.jit(jax.grad(objective))(params)))
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_resolution_stage_presets():
  """The reference's three stages: 256 px then 512 px on Objaverse, then the heads;
  the default config is stage III."""
  want = {"stage1": (256, 4e-4, 64, 80_000), "stage2": (512, 1e-4, 16, 20_000),
          "stage3": (512, 1e-4, 16, 20_000), "": (512, 1e-4, 16, 20_000)}
  for preset, values in want.items():
    c = facelift_gslrm.get_config(preset)
    assert (c.data.image_size, c.optim.lr, c.batch_size, c.total_steps) == values, preset
  with pytest.raises(ValueError, match="stage1"):
    facelift_gslrm.get_config("stage4")
