"""Is a FLAME-topology mesh neutral? (NoW scores neutral shapes: expression and pose
zeroed; a prediction exported with its expression left on is flagged.)

The mesh is brought onto the model by a similarity over all vertices, and its offsets
from the template are fitted, in the least-squares sense, by the identity and
expression blend shapes together with the 7 infinitesimal similarities of the template:
offsets ~ S beta + E psi + similarity; the alignment is redone onto the fitted shape a
few times. The expression part
E psi and what neither basis explains (a jaw or neck pose is not linear in them) are
measured as RMS displacements in millimetres (the model's unit is metres); either one
above `threshold_mm` flags the mesh. A neutral FLAME mesh of any shape has both at
float rounding.
"""

import numpy as np

from kaojax.evaluate.now import procrustes


class NeutralCheck:
  """Built once from a FlameModel (template [V, 3], shapedirs, exprdirs)."""

  def __init__(self, flame, threshold_mm: float = 0.1):
    self.template = np.asarray(flame.v_template, np.float64)             # [V, 3]
    shape = np.asarray(flame.shapedirs, np.float64).reshape(-1, flame.n_shape)
    expr = np.asarray(flame.exprdirs, np.float64).reshape(-1, flame.n_expr)
    t = self.template - self.template.mean(0)
    similarity = [t] + [np.cross(axis, t) for axis in np.eye(3)] + [
        np.broadcast_to(axis, t.shape) for axis in np.eye(3)]
    similarity = np.stack([x.ravel() for x in similarity], 1)             # [3V, 7]
    self.basis = np.concatenate([shape, expr, similarity], 1)             # [3V, S + E + 7]
    self.pinv = np.linalg.pinv(self.basis)
    self.n_shape = flame.n_shape
    self.threshold_mm = threshold_mm

  @property
  def num_vertices(self) -> int:
    return len(self.template)

  def __call__(self, vertices) -> dict:
    """vertices [V, 3] (any unit, pose, place) -> {expression_mm, unexplained_mm,
    flagged}."""
    vertices = np.asarray(vertices, np.float64)
    if vertices.shape != self.template.shape:
      raise ValueError(f"mesh has {len(vertices)} vertices, the model {self.num_vertices}")
    target = self.template
    for _ in range(3):
      s, r, t = procrustes(vertices, target, reflection=False)
      offsets = (s * vertices @ r.T + t - self.template).ravel()
      coefficients = self.pinv @ offsets
      target = self.template + (self.basis @ coefficients).reshape(-1, 3)
    n_expr = self.basis.shape[1] - self.n_shape - 7
    expression = self.basis[:, self.n_shape:self.n_shape + n_expr] @ coefficients[
        self.n_shape:self.n_shape + n_expr]
    unexplained = offsets - self.basis @ coefficients
    rms = lambda x: float(1000 * np.sqrt(np.mean(np.sum(x.reshape(-1, 3) ** 2, -1))))
    result = {"expression_mm": rms(expression), "unexplained_mm": rms(unexplained)}
    result["flagged"] = bool(max(result.values()) > self.threshold_mm)
    return result
