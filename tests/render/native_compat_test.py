"""kaojax.render.native.ops across JAX releases (jax>=0.10.2,<0.12): the Shardy rule of
the batched FFI calls is built with the sdy dialect's bindings, the same attribute as
JAX's private rule parser builds, and a JAX where neither works still lowers (without
the rule, warned once) instead of failing. The parity tests' sphere needs no open3d
(the lent GPU machine has none)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.interpreters import mlir

from kaojax.render import native, rasterize_surfels
from kaojax.render.native import ops
from tests.render.scenes import orbit_views, random_gaussians, uv_sphere

pytestmark = pytest.mark.skipif("cpu" not in native.loaded,
                                reason=f"native CPU library not built: {native.load_errors}")


def _types(*shapes):
  return [mlir.ir.RankedTensorType.get(list(s), mlir.ir.F32Type.get()) for s in shapes]


def test_direct_rule_matches_jax_rule_parser():
  with mlir.make_ir_context(), mlir.ir.Location.unknown():
    operands, results = _types((4, 3, 100, 11), (4, 3, 100)), _types((4, 3, 36, 40, 8))
    direct = ops._sharding_rule_sdy(operands, results, 2)
    try:
      parsed = ops._sharding_rule_jax(operands, results, 2)
    except ImportError:
      pytest.skip("this JAX has no private rule parser to compare with")
    assert str(direct) == str(parsed)
    assert "custom" in str(direct)


def _lowered_text():
  g = jax.tree_util.tree_map(jnp.asarray, random_gaussians(0, (2,), n=20))
  viewmats, Ks = orbit_views(1, (2,), distance=3.0, width=32, height=32, focal=30.0)
  fn = jax.jit(lambda g, v, k: rasterize_surfels(g, v, k, 32, 32, backend="native")["color"])
  return fn.lower(g, jnp.asarray(viewmats), jnp.asarray(Ks)).as_text()


def test_batched_call_carries_the_rule_under_shardy():
  if not ops._use_shardy():
    pytest.skip("Shardy is off in this JAX configuration")
  text = _lowered_text()
  assert "num_batch_dims" in text
  assert "sdy.sharding_rule" in text


def test_lowering_survives_without_any_rule_builder(monkeypatch, caplog):
  def broken(*_):
    raise AttributeError("moved")
  monkeypatch.setattr(ops, "_RULE_BUILDERS", (broken,))
  monkeypatch.setattr(ops, "_warned_no_rule", [])
  with caplog.at_level(logging.WARNING, logger="kaojax.render"):
    text = _lowered_text()
  assert "num_batch_dims" in text and "sdy.sharding_rule" not in text
  if ops._use_shardy():
    assert "no Shardy sharding rule could be built" in caplog.text


def test_numpy_sphere_is_open3d_sphere():
  o3d = pytest.importorskip("open3d")
  mesh = o3d.geometry.TriangleMesh.create_sphere(radius=0.8, resolution=24)
  verts, faces = uv_sphere(0.8, 24)
  np.testing.assert_array_equal(verts, np.asarray(mesh.vertices, np.float32))
  np.testing.assert_array_equal(faces, np.asarray(mesh.triangles, np.int32))
