"""Linear blend skinning as in FLAME/SMPL (`lbs` of FLAME_PyTorch and DECA).

Written for speed on the CPU as well as the accelerator: every blend shape is one
matrix product against the flat [V*3, K] view of its directions (a free reshape of the
stored [V, 3, K] array, no per-call transpose or concatenation), and skinning blends
the per-joint rigid motions of the posed vertices in one fused elementwise pass
instead of tiny batched 3x3 matrix products. Sums are accumulated in at least float32
(bfloat16 models round once, at the end).
"""

import jax.numpy as jnp

from kaojax.geometry.rotations import axis_angle_to_matrix


def blend_shapes(coeffs, dirs, dtype=None):
  """coeffs [B, K], dirs [V, 3, K] -> offsets [B, V, 3] in `dtype` (default: the
  inputs' type)."""
  num_vertices, _, k = dirs.shape
  flat = jnp.einsum("bk,nk->bn", coeffs, dirs.reshape(num_vertices * 3, k),
                    preferred_element_type=dtype)                 # [B, V*3]
  return flat.reshape(coeffs.shape[0], num_vertices, 3)


def rigid_chain(rotations, joints, parents):
  """Forward kinematics.

  rotations [B, J, 3, 3] local joint rotations; joints [B, J, 3] rest positions;
  parents: tuple of J ints (parents[0] = -1).
  Returns (posed joints [B, J, 3], skinning transforms [B, J, 3, 4]) where each
  transform [R | t] maps a rest-pose point x to its posed position R x + t for that
  joint.
  """
  # World rotation and translation of each joint, root first.
  world_r = [rotations[:, 0]]                                     # [B, 3, 3] each
  world_t = [joints[:, 0]]                                        # [B, 3] each
  for i in range(1, len(parents)):
    p = parents[i]
    rel = joints[:, i] - joints[:, p]
    world_r.append(world_r[p] @ rotations[:, i])
    world_t.append(jnp.einsum("bij,bj->bi", world_r[p], rel) + world_t[p])
  world_r = jnp.stack(world_r, 1)                                 # [B, J, 3, 3]
  posed_joints = jnp.stack(world_t, 1)                            # [B, J, 3]
  rest_offset = jnp.einsum("bjik,bjk->bji", world_r, joints)
  skin = jnp.concatenate([world_r, (posed_joints - rest_offset)[..., None]], -1)
  return posed_joints, skin


def lbs(blend, full_pose, v_template, posedirs, j_regressor, weights, parents):
  """FLAME linear blend skinning.

  blend: pairs (coeffs [B, K_i], dirs [V, 3, K_i]) of the identity and expression
  blend shapes; full_pose [B, J, 3] axis-angle; v_template [V, 3];
  posedirs [V, 3, 9 (J - 1)]; j_regressor [J, V]; weights [V, J]; parents: tuple of
  J ints. Returns (vertices [B, V, 3], posed joints [B, J, 3]).
  """
  batch = full_pose.shape[0]
  # Blend shapes and skinning are accumulated in at least float32, rounded once.
  dtype = v_template.dtype
  acc = jnp.promote_types(dtype, jnp.float32)
  v_shaped = v_template.astype(acc)
  for coeffs, dirs in blend:
    v_shaped = v_shaped + blend_shapes(coeffs, dirs, acc)         # [B, V, 3]
  joints = jnp.einsum("jv,bvc->bjc", j_regressor.astype(acc), v_shaped).astype(dtype)
  rotations = axis_angle_to_matrix(full_pose)                     # [B, J, 3, 3]
  eye = jnp.eye(3, dtype=rotations.dtype)
  pose_feature = (rotations[:, 1:] - eye).reshape(batch, -1)      # [B, 9 (J - 1)]
  v_posed = v_shaped + blend_shapes(pose_feature, posedirs, acc)
  posed_joints, skin = rigid_chain(rotations, joints, parents)
  # sum_j w[v, j] (R_j v_posed + t_j), one joint at a time: XLA fuses the loop into a
  # single elementwise pass over [B, V, 3] (a blended [B, V, 3, 4] transform per vertex
  # would be written to memory first).
  skin, weights = skin.astype(acc), weights.astype(acc)
  vertices = 0.0
  for j in range(skin.shape[1]):
    r = skin[:, None, j]                                          # [B, 1, 3, 4]
    moved = (r[..., 0] * v_posed[..., 0:1] + r[..., 1] * v_posed[..., 1:2]
             + r[..., 2] * v_posed[..., 2:3] + r[..., 3])         # [B, V, 3]
    vertices = vertices + weights[None, :, j, None] * moved
  return vertices.astype(dtype), posed_joints
