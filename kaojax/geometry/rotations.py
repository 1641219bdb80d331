"""Rotations: axis-angle, unit quaternions (w, x, y, z) and 3x3 matrices.

All functions broadcast over leading axes and are differentiable.
"""

import jax.numpy as jnp


def skew(v):
  """v: [..., 3] -> cross-product matrices [..., 3, 3] with skew(v) @ u = v x u."""
  x, y, z = v[..., 0], v[..., 1], v[..., 2]
  zero = jnp.zeros_like(x)
  return jnp.stack([
      jnp.stack([zero, -z, y], -1),
      jnp.stack([z, zero, -x], -1),
      jnp.stack([-y, x, zero], -1),
  ], -2)


def axis_angle_to_matrix(axis_angle, eps: float = 1e-8):
  """Rodrigues' formula. axis_angle: [..., 3] -> [..., 3, 3].

  The angle is ||r + eps|| as in FLAME/SMPL's `batch_rodrigues`, which keeps the
  gradient finite at zero and matches the reference bit for bit.
  """
  angle = jnp.linalg.norm(axis_angle + eps, axis=-1, keepdims=True)
  axis = axis_angle / angle
  k = skew(axis)
  sin = jnp.sin(angle)[..., None]
  cos = jnp.cos(angle)[..., None]
  eye = jnp.eye(3, dtype=axis_angle.dtype)
  return eye + sin * k + (1.0 - cos) * (k @ k)


def quat_to_matrix(quat):
  """quat: [..., 4] (w, x, y, z), normalised here -> rotation [..., 3, 3]."""
  q = quat / jnp.linalg.norm(quat, axis=-1, keepdims=True)
  w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
  return jnp.stack([
      jnp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
      jnp.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
      jnp.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
  ], -2)


def matrix_to_quat(matrix):
  """matrix: [..., 3, 3] rotation -> quat [..., 4] (w, x, y, z) with w >= 0.

  Uses the numerically best of the four Shepperd candidates per element.
  """
  m = matrix
  m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
  candidates = jnp.stack([
      jnp.stack([1 + m00 + m11 + m22, m[..., 2, 1] - m[..., 1, 2],
                 m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
      jnp.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m00 - m11 - m22,
                 m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
      jnp.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0],
                 1 - m00 + m11 - m22, m[..., 1, 2] + m[..., 2, 1]], -1),
      jnp.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0],
                 m[..., 1, 2] + m[..., 2, 1], 1 - m00 - m11 + m22], -1),
  ], -2)  # [..., 4, 4]; row i is 4 * q_i * q
  diag = jnp.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                    1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
  best = jnp.argmax(diag, axis=-1)
  row = jnp.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]
  q = row / jnp.linalg.norm(row, axis=-1, keepdims=True)
  return jnp.where(q[..., :1] < 0, -q, q)


def _safe_norm(v, tiny=1e-8):
  """(||v||, mask ||v|| > tiny) with a finite gradient at v = 0."""
  sq = jnp.sum(v * v, axis=-1, keepdims=True)
  big = sq > tiny * tiny
  return jnp.where(big, jnp.sqrt(jnp.where(big, sq, 1.0)), 0.0), big


def axis_angle_to_quat(axis_angle):
  """axis_angle: [..., 3] -> quat [..., 4] (w, x, y, z)."""
  angle, big = _safe_norm(axis_angle)
  half = 0.5 * angle
  # sin(half)/angle, with its limit 1/2 at zero.
  factor = jnp.where(big, jnp.sin(half) / jnp.where(big, angle, 1.0), 0.5 - angle**2 / 48.0)
  return jnp.concatenate([jnp.cos(half), axis_angle * factor], -1)


def quat_to_axis_angle(quat):
  """quat: [..., 4] (w, x, y, z) -> axis-angle [..., 3] with angle in [0, pi]."""
  q = quat / jnp.linalg.norm(quat, axis=-1, keepdims=True)
  q = jnp.where(q[..., :1] < 0, -q, q)
  vec_norm, big = _safe_norm(q[..., 1:])
  angle = 2.0 * jnp.arctan2(vec_norm, q[..., :1])
  factor = jnp.where(big, angle / jnp.where(big, vec_norm, 1.0), 2.0)
  return q[..., 1:] * factor


def matrix_to_axis_angle(matrix):
  """matrix: [..., 3, 3] -> axis-angle [..., 3]."""
  return quat_to_axis_angle(matrix_to_quat(matrix))


def quat_multiply(a, b):
  """Hamilton product of [..., 4] (w, x, y, z) quaternions: rotation a after b."""
  aw, ax, ay, az = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
  bw, bx, by, bz = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  return jnp.stack([
      aw * bw - ax * bx - ay * by - az * bz,
      aw * bx + ax * bw + ay * bz - az * by,
      aw * by - ax * bz + ay * bw + az * bx,
      aw * bz + ax * by - ay * bx + az * bw,
  ], -1)
