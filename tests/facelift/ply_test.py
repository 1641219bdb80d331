"""3DGS .ply writer/reader: round trip, standard layout checked with plyfile."""

import numpy as np
import plyfile
import pytest

from kaojax.export.ply import SH_C0, property_names, read_gaussian_ply, write_gaussian_ply


def _random_set(n=37, seed=0):
  rng = np.random.default_rng(seed)
  return dict(means=rng.normal(size=(n, 3)), scales=rng.uniform(0.01, 0.3, (n, 3)),
              quats=rng.normal(size=(n, 4)), opacities=rng.uniform(0.01, 0.99, n),
              f_dc=rng.normal(size=(n, 3)))


def test_roundtrip(tmp_path):
  g = _random_set()
  path = write_gaussian_ply(tmp_path / "g.ply", **g)
  back = read_gaussian_ply(path)
  for name in ("means", "scales", "quats", "opacities", "f_dc"):
    np.testing.assert_allclose(getattr(back, name), g[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert back.sh_rest.shape == (37, 15, 3) and not back.sh_rest.any()
  np.testing.assert_allclose(back.colors, np.maximum(SH_C0 * g["f_dc"] + 0.5, 0), atol=1e-6)


def test_plyfile_sees_the_standard_layout(tmp_path):
  g = _random_set(5, seed=1)
  rest = np.arange(5 * 15 * 3, dtype=np.float64).reshape(5, 15, 3)
  path = write_gaussian_ply(tmp_path / "g.ply", sh_rest=rest, **g)
  ply = plyfile.PlyData.read(str(path))
  vertex = ply["vertex"]
  assert [p.name for p in vertex.properties] == property_names(15)
  assert len(property_names(15)) == 62
  assert all(vertex.data.dtype[name] == np.dtype("<f4") for name in vertex.data.dtype.names)
  assert vertex.count == 5
  np.testing.assert_allclose(vertex["x"], g["means"][:, 0], rtol=1e-6)
  np.testing.assert_allclose(vertex["nz"], 0.0)
  np.testing.assert_allclose(vertex["opacity"], np.log(g["opacities"] / (1 - g["opacities"])),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(vertex["scale_1"], np.log(g["scales"][:, 1]), rtol=1e-6)
  np.testing.assert_allclose(vertex["rot_0"], g["quats"][:, 0], rtol=1e-6)   # w first
  # channel-major f_rest: f_rest_{c*15 + k} = rest[:, k, c]
  np.testing.assert_allclose(vertex["f_rest_16"], rest[:, 1, 1])
  np.testing.assert_allclose(vertex["f_rest_44"], rest[:, 14, 2])
  np.testing.assert_allclose(read_gaussian_ply(path).sh_rest, rest, rtol=1e-6)


def test_reads_plyfile_written_ascii(tmp_path):
  names = property_names(0)
  n = 4
  rng = np.random.default_rng(2)
  values = rng.normal(size=(n, len(names))).astype(np.float32)
  rec = np.empty(n, dtype=[(name, "f4") for name in reversed(names)])   # any order
  for i, name in enumerate(names):
    rec[name] = values[:, i]
  plyfile.PlyData([plyfile.PlyElement.describe(rec, "vertex")], text=True).write(
      str(tmp_path / "a.ply"))
  back = read_gaussian_ply(tmp_path / "a.ply")
  col = {name: values[:, i] for i, name in enumerate(names)}
  np.testing.assert_allclose(back.means[:, 2], col["z"], rtol=1e-6)
  np.testing.assert_allclose(back.scales[:, 0], np.exp(col["scale_0"]), rtol=1e-5)
  np.testing.assert_allclose(back.opacities, 1 / (1 + np.exp(-col["opacity"])), rtol=1e-5)
  assert back.sh_rest.shape == (n, 0, 3)


def test_rejects_bad_input(tmp_path):
  g = _random_set(3)
  with pytest.raises(ValueError, match="quats"):
    write_gaussian_ply(tmp_path / "x.ply", **{**g, "quats": g["quats"][:, :3]})
  with pytest.raises(ValueError, match="exactly one"):
    write_gaussian_ply(tmp_path / "x.ply", colors=g["f_dc"], **g)
  (tmp_path / "bad.ply").write_text("hello")
  with pytest.raises(ValueError, match="bad.ply"):
    read_gaussian_ply(tmp_path / "bad.ply")
