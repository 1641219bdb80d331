"""OpenLRM backbone parity with the reference PyTorch code (golden oracle files)."""

import jax
import numpy as np
import pytest
from flax import nnx

from kaojax.convert.dinov2 import resize_pos_embed
from kaojax.convert.openlrm import load_openlrm_state, lrm_config_from_state
from kaojax.convert.torch_state import read_state_dict
from kaojax.models.lrm import OpenLRM, concat_plane_features, sample_triplane, with_runtime_options
from tests.oracle_cases import load_case, oracle_cases


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _check(name, got, want, tol):
  got = np.asarray(got)
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  np.testing.assert_allclose(got, want, atol=tol["atol"], rtol=tol["rtol"], err_msg=name)


@pytest.mark.parametrize("folder", oracle_cases("openlrm"))
def test_openlrm_oracle(folder):
  meta, inputs, outputs = load_case(folder)
  tol = meta["tolerance"]["recommended"]
  state = read_state_dict(folder / "model.safetensors")
  image_size = inputs["image"].shape[-1]
  cfg = lrm_config_from_state(state, image_size, encoder_heads=meta["encoder"]["num_heads"],
                              heads=meta["transformer"]["heads"])
  model = nnx.eval_shape(lambda: OpenLRM(cfg, nnx.Rngs(0)))   # weights come from the file
  load_openlrm_state(model, state)

  grid = image_size // cfg.encoder.patch
  _check("encoder_pos_embed_resized", resize_pos_embed(state["encoder.model.pos_embed"], grid),
         outputs["encoder_pos_embed_resized"], tol)
  images = np.transpose(inputs["image"], (0, 2, 3, 1))
  tokens_in = model.backbone.encoder.prepare_tokens(images)
  _check("encoder_tokens_in", tokens_in, outputs["encoder_tokens_in"], tol)
  _check("encoder_block0_out", model.backbone.encoder.blocks[0](tokens_in),
         outputs["encoder_block0_out"], tol)
  image_tokens = model.backbone.encoder(images)
  _check("image_tokens", image_tokens, outputs["image_tokens"], tol)
  cond = model.backbone.camera_embedder(inputs["source_camera"])
  _check("camera_embedding", cond, outputs["camera_embedding"], tol)
  # Downstream stages start from the reference's own inputs to isolate each stage.
  ref_tokens = outputs["image_tokens"]
  layer_outs = model.backbone.transformer.run_layers(ref_tokens, outputs["camera_embedding"])
  for i, out in enumerate(layer_outs):
    _check(f"transformer_layer{i}_out", out, outputs[f"transformer_layer{i}_out"], tol)
  _check("transformer_tokens", model.backbone.transformer(ref_tokens, outputs["camera_embedding"]),
         outputs["transformer_tokens"], tol)
  # Attention in 7-query blocks (the last one padded) is the same network.
  chunked = nnx.eval_shape(lambda: OpenLRM(with_runtime_options(cfg, attention_chunk=7),
                                           nnx.Rngs(0)))
  load_openlrm_state(chunked, state)
  assert chunked.backbone.transformer.layers[0].self_attn.query_chunk == 7
  _check("transformer_tokens, attention_chunk=7",
         chunked.backbone.transformer(ref_tokens, outputs["camera_embedding"]),
         outputs["transformer_tokens"], tol)
  planes = model.backbone.upsampler(outputs["transformer_tokens"])
  _check("planes", np.transpose(np.asarray(planes), (0, 1, 4, 2, 3)), outputs["planes"], tol)
  ref_planes = np.transpose(outputs["planes"], (0, 1, 3, 4, 2))
  sampled = sample_triplane(ref_planes, inputs["query_points"])
  _check("sampled_features", sampled, outputs["sampled_features"], tol)
  decoded = model.query_points(ref_planes, inputs["query_points"])
  _check("decoder_raw", decoded["raw"], outputs["decoder_raw"], tol)
  _check("decoder_sigma", decoded["raw"][..., :1], outputs["decoder_sigma"], tol)
  _check("decoder_rgb", decoded["rgb"], outputs["decoder_rgb"], tol)
  _check("sigma_activated", decoded["sigma"], outputs["sigma_activated"], tol)
  # End to end: image + camera -> planes.
  _check("planes (end to end)", np.transpose(np.asarray(model(images, inputs["source_camera"])),
                                             (0, 1, 4, 2, 3)), outputs["planes"], tol)
  assert concat_plane_features(sampled).shape[-1] == 3 * cfg.triplane_dim
