"""Exporters refuse non-finite geometry instead of writing 'nan' into files."""

import numpy as np
import pytest

from kaojax.export.obj import write_obj
from kaojax.export.ply import write_gaussian_ply, write_mesh_ply


def test_mesh_writers_refuse_nonfinite_vertices(tmp_path):
  vertices = np.zeros((3, 3))
  vertices[1, 2] = np.nan
  with pytest.raises(ValueError, match="NaN or infinite"):
    write_obj(tmp_path / "mesh.obj", vertices, np.array([[0, 1, 2]]))
  with pytest.raises(ValueError, match="NaN or infinite"):
    write_mesh_ply(tmp_path / "mesh.ply", vertices, np.array([[0, 1, 2]]))
  with pytest.raises(ValueError, match="indices below 3"):
    write_mesh_ply(tmp_path / "mesh.ply", np.zeros((3, 3)), np.array([[0, 1, 3]]))
  assert not (tmp_path / "mesh.obj").exists() and not (tmp_path / "mesh.ply").exists()


@pytest.mark.parametrize("field", ["means", "scales", "opacities", "colors"])
def test_gaussian_ply_refuses_nonfinite_values(tmp_path, field):
  n = 4
  values = dict(means=np.zeros((n, 3)), scales=np.full((n, 3), 0.1),
                quats=np.tile([1.0, 0, 0, 0], (n, 1)), opacities=np.full(n, 0.5),
                colors=np.full((n, 3), 0.5))
  values[field] = np.array(values[field], copy=True)
  values[field].reshape(-1)[1] = np.inf
  with pytest.raises(ValueError, match="NaN or infinite"):
    write_gaussian_ply(tmp_path / "g.ply", **values)
  assert not (tmp_path / "g.ply").exists()
