"""The synthetic dataset generator: exact renders, and the helpers it leans on."""

import jax.numpy as jnp
import numpy as np

from data_pipeline import synthetic
from kaojax import geometry
from kaojax.export.obj import read_obj, write_obj
from kaojax.flame.synthetic import make_synthetic_flame, make_synthetic_flame_files
from kaojax.render import rasterize_mesh


def test_subject_renders_drop_no_faces():
  flame = make_synthetic_flame()
  mesh = flame(jnp.zeros((1, 100)), jnp.zeros((1, 50)), jnp.zeros((1, 6)))
  vertices = mesh.vertices[0]
  vertices = (vertices - vertices.mean(0)) / jnp.abs(vertices - vertices.mean(0)).max()
  eyes = synthetic.sample_views(np.random.default_rng(0), 3) * synthetic.CAMERA_DISTANCE
  viewmats = jnp.asarray(np.linalg.inv(np.asarray(geometry.look_at(eyes, np.zeros(3),
                                                                   (0.0, 1.0, 0.0)))))
  size = 32
  K = jnp.array([[0.75 * size, 0, size / 2], [0, 0.75 * size, size / 2], [0, 0, 1]])
  exact = rasterize_mesh(vertices, flame.faces, viewmats, K, size, size, tile_size=4)
  assert int(exact["overflow"].sum()) == 0
  render = synthetic.SubjectRenderer(flame.faces, size)
  colors = jnp.full(vertices.shape, 0.5)
  rgba, face_id, mask = render(vertices, colors, viewmats, K, jnp.array([0.0, 0.0, 1.0]))
  np.testing.assert_array_equal(face_id, exact["face_id"])
  np.testing.assert_array_equal(mask, exact["mask"])
  np.testing.assert_array_equal(rgba[..., 3], np.asarray(exact["mask"], np.float32))


def test_synthetic_flame_files_are_fresh_copies():
  first = make_synthetic_flame_files(0)
  template = first["model"]["v_template"].copy()
  first["model"]["v_template"] += 1.0
  first["masks"]["lips"][:] = 0
  again = make_synthetic_flame_files(0)
  np.testing.assert_array_equal(again["model"]["v_template"], template)
  assert again["masks"]["lips"].any()


def test_obj_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  vertices = rng.normal(size=(50, 3))
  faces = rng.integers(0, 50, (70, 3))
  colors = rng.uniform(size=(50, 3))
  for name, cols in (("plain.obj", None), ("coloured.obj", colors)):
    path = write_obj(tmp_path / name, vertices, faces, cols)
    back_v, back_f = read_obj(path)
    np.testing.assert_allclose(back_v, vertices, atol=1e-6)
    np.testing.assert_array_equal(back_f, faces)
  line = (tmp_path / "coloured.obj").read_text().splitlines()[0].split()
  assert line[0] == "v" and len(line) == 7
  np.testing.assert_allclose([float(x) for x in line[4:]], colors[0], atol=1e-4)
