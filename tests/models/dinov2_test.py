"""DINOv2 parity with transformers' Dinov2WithRegistersModel through the converter."""

import jax
import numpy as np
import pytest
import torch

from kaojax.convert.dinov2 import (antialias_bicubic_matrix, bicubic_matrix,
                                   dinov2_config_from_transformers,
                                   load_dinov2_from_transformers, resize_bicubic_antialias)


@pytest.mark.parametrize("registers", [4, 0])
def test_matches_transformers(registers):
  from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                            Dinov2WithRegistersModel)
  torch.manual_seed(0)
  common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=128, image_size=518, patch_size=14)
  if registers:
    ref = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers,
                                                             **common))
  else:
    ref = Dinov2Model(Dinov2Config(**common))
  ref.eval()
  with torch.no_grad():   # non-trivial LayerScale / norms / tokens
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  size = 70   # 5 x 5 patches: the 37 x 37 table is resized
  cfg = dinov2_config_from_transformers(state, size, heads=2)
  assert cfg.num_registers == registers
  model = load_dinov2_from_transformers(state, cfg)

  images = np.random.default_rng(0).uniform(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).last_hidden_state
  want = want.numpy()
  want = np.concatenate([want[:, :1], want[:, 1 + registers:]], 1)   # drop registers
  with jax.default_matmul_precision("highest"):
    got = np.asarray(model(images))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("in_size,out_size", [(37, 16), (37, 24), (37, 32), (5, 9), (7, 7)])
def test_resize_matches_torch_bicubic(in_size, out_size, antialias):
  grid = np.random.default_rng(1).normal(size=(in_size, in_size, 3)).astype(np.float32)
  want = torch.nn.functional.interpolate(
      torch.from_numpy(grid).permute(2, 0, 1)[None], size=(out_size, out_size),
      mode="bicubic", antialias=antialias, align_corners=False)[0].permute(1, 2, 0).numpy()
  got = resize_bicubic_antialias(grid, out_size, out_size, antialias)
  np.testing.assert_allclose(got, want, atol=1e-5)
  matrix = antialias_bicubic_matrix if antialias else bicubic_matrix
  np.testing.assert_allclose(matrix(in_size, out_size).sum(1), 1.0)


def test_sincos_position_table():
  from kaojax.models.dinov2 import sincos_positions
  table = np.asarray(sincos_positions(3, 8))
  assert table.shape == (10, 8)
  np.testing.assert_array_equal(table[0], 0.0)                         # CLS
  freqs = np.array([1.0, 0.01])                                        # 1 / 10000^(k/2)
  row, col = 1, 2                                                      # patch 1 * 3 + 2
  expected = np.concatenate([np.sin(row * freqs), np.cos(row * freqs),
                             np.sin(col * freqs), np.cos(col * freqs)])
  np.testing.assert_allclose(table[1 + 3 * row + col], expected, rtol=1e-6)
  patches = table[1:]
  assert len({tuple(np.round(p, 6)) for p in patches}) == 9           # every patch its own
  with pytest.raises(ValueError, match="divisible by 4"):
    sincos_positions(3, 6)


def test_position_init_option():
  from flax import nnx
  import dataclasses
  from kaojax.models.dinov2 import Dinov2, sincos_positions
  from kaojax.models.lrm import openlrm_config
  cfg = openlrm_config("tiny").encoder
  assert cfg.position_init == "normal"
  random_table = np.asarray(Dinov2(cfg, nnx.Rngs(0)).pos_embed[...])
  assert 0.005 < random_table.std() < 0.03                             # N(0, 0.02)
  model = Dinov2(dataclasses.replace(cfg, position_init="sincos"), nnx.Rngs(0))
  np.testing.assert_array_equal(model.pos_embed[...][0], sincos_positions(cfg.grid, cfg.dim))
  with pytest.raises(ValueError, match="position_init"):
    Dinov2(dataclasses.replace(cfg, position_init="learned"), nnx.Rngs(0))
