"""KaoLRM FLAME and Gaussian decoder parity with the reference PyTorch heads."""

import jax
import numpy as np
import pytest
from flax import nnx

from kaojax.convert.openlrm import map_flame_decoder, map_gaussian_decoder
from kaojax.convert.torch_state import StateMapping, assign_state, param_shapes, read_state_dict
from kaojax.models.kaolrm import (FlameDecoder, GaussianDecoder, KaoLRMConfig,
                                  gaussian_activations, gaussian_query_points)
from kaojax.models.lrm import sample_triplane
from tests.oracle_cases import load_case, oracle_cases


def _check(name, got, want, tol):
  got = np.asarray(got)
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  np.testing.assert_allclose(got, want, atol=tol["atol"], rtol=tol["rtol"], err_msg=name)


class Heads(nnx.Module):
  """Just the two KaoLRM heads, at the nnx paths the full model uses."""

  def __init__(self, in_dim, channels, cfg, rngs):
    self.flame_decoder = FlameDecoder(in_dim, cfg, rngs)
    self.gaussian_decoder = GaussianDecoder(channels, cfg.gaussian_hidden, rngs)


@pytest.mark.parametrize("folder", oracle_cases("kaolrm_heads"))
def test_kaolrm_heads_oracle(folder):
  meta, inputs, outputs = load_case(folder)
  tol = meta["tolerance"]["recommended"]
  state = read_state_dict(folder / "model.safetensors")
  fd = "flame_decoder.decoder."
  n_out = state[fd + "7.weight"].shape[0]
  n_shape = outputs["flame_shape"].shape[-1]
  n_expr = outputs["flame_expression"].shape[-1]
  assert n_out == n_shape + n_expr + 10
  cfg = KaoLRMConfig(
      flame_hidden=tuple(state[fd + f"{i}.weight"].shape[0] for i in (0, 2, 5)),
      gating_hidden=state[fd + "4.fc.0.weight"].shape[0], n_shape=n_shape, n_expr=n_expr,
      gaussian_hidden=state["gaussian_decoder.decoder.net.0.weight"].shape[0])
  planes = np.transpose(inputs["planes"], (0, 1, 3, 4, 2))   # -> [B, 3, H, W, C]
  heads = nnx.eval_shape(lambda: Heads(state[fd + "0.weight"].shape[1], planes.shape[-1], cfg,
                                       nnx.Rngs(0)))   # weights come from the file
  m = StateMapping(state, str(folder))
  map_flame_decoder(m)
  map_gaussian_decoder(m)
  assign_state(heads, m.finish(param_shapes(heads)))

  with jax.default_matmul_precision("highest"):
    _check("flame_seq_mean", FlameDecoder.plane_means(planes), outputs["flame_seq_mean"], tol)
    params = heads.flame_decoder(planes)
    for name in ("raw", "shape", "expression", "pose", "scale", "translation"):
      _check("flame_" + name, getattr(params, name), outputs["flame_" + name], tol)

    focal = inputs["scale_coords"]
    query = gaussian_query_points(inputs["points"], focal)
    _check("gauss_points_transformed", query, outputs["gauss_points_transformed"], tol)
    _check("gauss_sampled_features", sample_triplane(planes, query),
           outputs["gauss_sampled_features"], tol)
    raw = heads.gaussian_decoder.raw(planes, inputs["points"], focal)
    _check("gauss_raw", raw, outputs["gauss_raw"], tol)
    opacity, scales, quats, rgb = gaussian_activations(raw)
    _check("gauss_activated", np.concatenate([opacity, scales, quats, rgb], -1),
           outputs["gauss_activated"], tol)
    g = heads.gaussian_decoder(planes, inputs["points"], focal)
    _check("gauss_opacity", g.opacities[..., None], outputs["gauss_opacity"], tol)
    _check("gauss_scales", g.scales, outputs["gauss_scales"], tol)
    _check("gauss_rotations", g.quats, outputs["gauss_rotations"], tol)
    _check("gauss_rgbs", g.colors, outputs["gauss_rgbs"], tol)
    np.testing.assert_array_equal(np.asarray(g.means), inputs["points"])
