"""FLAME landmarks: barycentric lookup, the static 51, the yaw-dependent 17
contour points, and the fixed 'full' 68.

Yaw sign convention (the one place it is decided): the contour bin is chosen from
the yaw of R = R_global @ R_neck, yaw = atan2(-R[2,0], sqrt(R[0,0]^2 + R[1,0]^2)).
DECA and KaoLRM use +yaw ("deca", the default); smplx and FLAME_PyTorch use -yaw
("smplx"). Both pick rows of the same 79-bin table:
a = round(min(s * yaw_deg, 39)); bin = a for a >= 0, 39 - a for -39 <= a < 0, 78 below.
"""

import jax.numpy as jnp
import numpy as np

from kaojax.geometry.mesh import interpolate_barycentric
from kaojax.geometry.rotations import axis_angle_to_matrix

YAW_SIGNS = {"deca": 1.0, "smplx": -1.0}


def vertices_to_landmarks(vertices, faces, face_idx, bary):
  """vertices [B, V, 3], faces [F, 3], face_idx [L] or [B, L], bary [L, 3] or
  [B, L, 3] -> landmarks [B, L, 3]."""
  return interpolate_barycentric(vertices, faces, face_idx, bary.astype(vertices.dtype))


def head_yaw_degrees(global_pose, neck_pose):
  """global_pose, neck_pose: [B, 3] axis-angle -> yaw of R_global @ R_neck [B] (deg)."""
  r = axis_angle_to_matrix(global_pose.astype(jnp.float32)) @ axis_angle_to_matrix(
      neck_pose.astype(jnp.float32))
  sy = jnp.sqrt(r[..., 0, 0] ** 2 + r[..., 1, 0] ** 2)
  return jnp.arctan2(-r[..., 2, 0], sy) * (180.0 / np.pi)


def contour_bin(yaw_deg, yaw_sign: str = "deca"):
  """yaw_deg [B] -> row [B] int32 of the 79-row dynamic contour table."""
  if yaw_sign not in YAW_SIGNS:
    raise ValueError(f"yaw_sign must be one of {sorted(YAW_SIGNS)}, got {yaw_sign!r}")
  a = jnp.round(jnp.minimum(YAW_SIGNS[yaw_sign] * yaw_deg, 39.0)).astype(jnp.int32)
  return jnp.where(a >= 0, a, jnp.where(a < -39, 78, 39 - a))
