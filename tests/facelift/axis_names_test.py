"""Logical axis names on every parameter of GS-LRM, the UNet, the VAE and the CLIP
encoder (tiny presets, built abstractly), and sharded placement on a device mesh."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from kaojax.models.gslrm import GSLRM, gslrm_config
from kaojax.models.mvdiffusion.clip import CLIPVisionEncoder, clip_vision_config
from kaojax.models.mvdiffusion.unet import UNet, unet_config
from kaojax.models.mvdiffusion.vae import VAE, vae_config
from kaojax.sharding import (COND, EMBED, HEADS, MLP_HIDDEN, make_device_mesh,
                             partition_specs, shard_state)

MODELS = {
    "gslrm": lambda: GSLRM(gslrm_config("tiny"), nnx.Rngs(0)),
    "unet": lambda: UNet(unet_config("tiny"), nnx.Rngs(0)),
    "vae": lambda: VAE(vae_config("tiny"), nnx.Rngs(0)),
    "clip": lambda: CLIPVisionEncoder(clip_vision_config("tiny"), nnx.Rngs(0)),
}


def _params(name):
  return nnx.state(nnx.eval_shape(MODELS[name]), nnx.Param)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_has_logical_axis_names(name):
  state = _params(name)
  flat = nnx.to_flat_state(state)
  assert flat
  for path, var in flat:
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.get_value().shape), (path, names)
    assert set(names) <= {EMBED, MLP_HIDDEN, HEADS, COND, None}, (path, names)
    wide = [n for n in names if n is not None]
    assert len(wide) == len(set(wide)), (path, names)     # one mesh axis per dimension
  specs = partition_specs(state)                           # every name has a rule
  assert len(nnx.to_flat_state(specs)) == len(flat)


def test_representative_names():
  gslrm = dict(nnx.to_flat_state(_params("gslrm")))
  names = lambda flat, *path: tuple(flat[path].get_metadata()["out_sharding"])
  assert names(gslrm, "blocks", 0, "attn", "to_qkv", "kernel") == (EMBED, HEADS)
  assert names(gslrm, "blocks", 0, "mlp", "fc1", "kernel") == (EMBED, MLP_HIDDEN)
  assert names(gslrm, "global_tokens") == (None, EMBED)
  unet = dict(nnx.to_flat_state(_params("unet")))
  block = ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0)
  assert names(unet, *block, "attn2", "to_k", "kernel") == (COND, HEADS)
  assert names(unet, *block, "ff", "net", 0, "proj", "kernel") == (EMBED, MLP_HIDDEN)
  assert names(unet, "time_embedding", "linear_1", "kernel") == (None, COND)
  assert names(unet, "conv_in", "kernel") == (None, None, None, EMBED)


@pytest.mark.parametrize("name", ["gslrm", "unet"])
def test_shard_state_places_parameters_on_a_device_mesh(name):
  state = jax.tree.map(lambda v: np.arange(math.prod(v.shape), dtype=v.dtype).reshape(v.shape),
                       _params(name))
  device_mesh = make_device_mesh(1, 1, jax.devices()[:1])
  sharded = shard_state(state, device_mesh)
  for (path, a), (_, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(sharded)):
    assert b.get_value().sharding.mesh.shape == device_mesh.shape, path
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
