"""The FLAME layer: a pytree of model arrays that is called like a function."""

import logging

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kaojax.flame import landmarks as lmk
from kaojax.flame.lbs import lbs

log = logging.getLogger(__name__)

# Kinematic tree of FLAME: root (global), neck, jaw, left eye, right eye.
FLAME_PARENTS = (-1, 0, 1, 1, 1)
# Sources already warned about having no region masks (the warning is given once each).
_WARNED_NO_MASK = set()


@flax.struct.dataclass
class FlameOutput:
  """vertices [B, V, 3]; landmarks2d [B, 68, 3] (17 dynamic contour + 51 static,
  iBUG order); landmarks3d [B, 68, 3] (fixed 'full' set); joints [B, 5, 3];
  yaw_deg [B] and contour_bin [B] of the dynamic contour selection."""
  vertices: jax.Array
  landmarks2d: jax.Array
  landmarks3d: jax.Array
  joints: jax.Array
  yaw_deg: jax.Array
  contour_bin: jax.Array


@flax.struct.dataclass
class FlameModel:
  """FLAME with `n_shape` identity and `n_expr` expression components.

  v_template [V, 3]; shapedirs [V, 3, n_shape]; exprdirs [V, 3, n_expr];
  posedirs [V, 3, 36]; j_regressor [5, V]; weights [V, 5]; faces [F, 3] int32;
  static_lmk_faces [51], static_lmk_bary [51, 3]; dynamic_lmk_faces [79, 17],
  dynamic_lmk_bary [79, 17, 3]; full_lmk_faces [68], full_lmk_bary [68, 3];
  face_mask [F] bool: KaoLRM's facial region (all True when no masks were given).
  """
  v_template: jax.Array
  shapedirs: jax.Array
  exprdirs: jax.Array
  posedirs: jax.Array
  j_regressor: jax.Array
  weights: jax.Array
  faces: jax.Array
  static_lmk_faces: jax.Array
  static_lmk_bary: jax.Array
  dynamic_lmk_faces: jax.Array
  dynamic_lmk_bary: jax.Array
  full_lmk_faces: jax.Array
  full_lmk_bary: jax.Array
  face_mask: jax.Array
  parents: tuple = flax.struct.field(pytree_node=False, default=FLAME_PARENTS)
  yaw_sign: str = flax.struct.field(pytree_node=False, default="deca")

  @property
  def n_shape(self) -> int:
    return self.shapedirs.shape[-1]

  @property
  def n_expr(self) -> int:
    return self.exprdirs.shape[-1]

  @property
  def num_vertices(self) -> int:
    return self.v_template.shape[0]

  def astype(self, dtype) -> "FlameModel":
    """Floating arrays cast to `dtype` (e.g. jnp.bfloat16); indices untouched."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, self)

  def __call__(self, shape, expression, pose, scale=None, translation=None,
               neck_pose=None, eye_pose=None) -> FlameOutput:
    """shape [..., n_shape], expression [..., n_expr], pose [..., 6] (global
    axis-angle + jaw axis-angle); optional scale [...] or [..., 1], translation
    [..., 3], neck_pose [..., 3], eye_pose [..., 6] (zeros when omitted).
    Returns a FlameOutput with vertices and landmarks = scale * X + translation,
    computed in the floating dtype of `shape`.
    """
    shape, expression, pose = (jnp.asarray(x) for x in (shape, expression, pose))
    _check_width("shape", shape, self.n_shape)
    _check_width("expression", expression, self.n_expr)
    _check_width("pose", pose, 6)
    for name, arr, width in (("neck_pose", neck_pose, 3), ("eye_pose", eye_pose, 6)):
      if arr is not None:
        _check_width(name, jnp.asarray(arr), width)
    lead = shape.shape[:-1]
    for name, arr in (("expression", expression), ("pose", pose)):
      if arr.shape[:-1] != lead:
        raise ValueError(f"FLAME: '{name}' has batch shape {arr.shape[:-1]} but 'shape' "
                         f"has {lead}")
    for name, arr in (("shape", shape), ("expression", expression), ("pose", pose),
                      ("scale", scale), ("translation", translation),
                      ("neck_pose", neck_pose), ("eye_pose", eye_pose)):
      _check_finite(name, arr)

    dtype = shape.dtype if jnp.issubdtype(shape.dtype, jnp.floating) else jnp.float32
    flat = lambda x, n: jnp.reshape(x, (-1, n)).astype(dtype)
    shape_b, expr_b, pose_b = flat(shape, self.n_shape), flat(expression, self.n_expr), flat(pose, 6)
    batch = shape_b.shape[0]
    neck = jnp.zeros((batch, 3), dtype) if neck_pose is None else flat(neck_pose, 3)
    eyes = jnp.zeros((batch, 6), dtype) if eye_pose is None else flat(eye_pose, 6)
    full_pose = jnp.concatenate([pose_b[:, :3], neck, pose_b[:, 3:], eyes], 1).reshape(batch, 5, 3)

    model = self.astype(dtype)
    blend = ((shape_b, model.shapedirs), (expr_b, model.exprdirs))
    vertices, joints = lbs(blend, full_pose, model.v_template, model.posedirs,
                           model.j_regressor, model.weights, self.parents)

    yaw = lmk.head_yaw_degrees(pose_b[:, :3], neck)
    bins = lmk.contour_bin(yaw, self.yaw_sign)
    contour = lmk.vertices_to_landmarks(vertices, self.faces, self.dynamic_lmk_faces[bins],
                                        model.dynamic_lmk_bary[bins])
    static = lmk.vertices_to_landmarks(vertices, self.faces, self.static_lmk_faces,
                                       model.static_lmk_bary)
    full = lmk.vertices_to_landmarks(vertices, self.faces, self.full_lmk_faces,
                                     model.full_lmk_bary)
    landmarks2d = jnp.concatenate([contour, static], 1)

    if scale is not None:
      s = jnp.reshape(jnp.asarray(scale, dtype), (batch, 1, 1))
      vertices, landmarks2d, full, joints = (x * s for x in (vertices, landmarks2d, full, joints))
    if translation is not None:
      _check_width("translation", jnp.asarray(translation), 3)
      t = jnp.reshape(jnp.asarray(translation, dtype), (batch, 1, 3))
      vertices, landmarks2d, full, joints = (x + t for x in (vertices, landmarks2d, full, joints))

    unflat = lambda x: x.reshape(lead + x.shape[1:])
    return FlameOutput(vertices=unflat(vertices), landmarks2d=unflat(landmarks2d),
                       landmarks3d=unflat(full), joints=unflat(joints),
                       yaw_deg=unflat(yaw), contour_bin=unflat(bins))


def _check_width(name, arr, width):
  if arr.ndim < 1 or arr.shape[-1] != width:
    raise ValueError(f"FLAME: '{name}' must have shape [..., {width}], got {tuple(arr.shape)}")


def _check_finite(name, arr):
  """Raises on NaN/inf in concrete inputs (traced inputs cannot be inspected)."""
  if arr is None or isinstance(arr, jax.core.Tracer):
    return
  if not np.all(np.isfinite(np.asarray(arr, np.float32))):
    raise ValueError(f"FLAME: '{name}' contains NaN or infinite values")


def build_flame_model(arrays: dict, n_shape: int = 100, n_expr: int = 50,
                      yaw_sign: str = "deca", source: str = "FLAME model") -> FlameModel:
  """FlameModel from a dict of numpy arrays with `kaojax.flame.io` key names:
  v_template, shapedirs [V,3,>=n_shape], exprdirs [V,3,>=n_expr], posedirs, j_regressor,
  weights, faces, parents, the landmark arrays, and optionally face_mask."""
  a = arrays
  if a["shapedirs"].shape[-1] < n_shape:
    raise ValueError(f"{source}: n_shape={n_shape} but the model has only "
                     f"{a['shapedirs'].shape[-1]} identity components")
  if a["exprdirs"].shape[-1] < n_expr:
    raise ValueError(f"{source}: n_expr={n_expr} but the model has only "
                     f"{a['exprdirs'].shape[-1]} expression components")
  if yaw_sign not in lmk.YAW_SIGNS:
    raise ValueError(f"yaw_sign must be one of {sorted(lmk.YAW_SIGNS)}, got {yaw_sign!r}")
  f32 = lambda x: jnp.asarray(np.asarray(x, np.float32))
  i32 = lambda x: jnp.asarray(np.asarray(x, np.int64).astype(np.int32))
  faces = np.asarray(a["faces"])
  mask = a.get("face_mask")
  if mask is None:
    if source not in _WARNED_NO_MASK:
      _WARNED_NO_MASK.add(source)
      log.warning("%s: no FLAME region masks (FLAME_masks.pkl) given; the facial mask "
                  "covers every face", source)
    mask = np.ones(len(faces), bool)
  mask = np.asarray(mask, bool)
  return FlameModel(
      v_template=f32(a["v_template"]),
      shapedirs=f32(a["shapedirs"][..., :n_shape]),
      exprdirs=f32(a["exprdirs"][..., :n_expr]),
      posedirs=f32(a["posedirs"]),
      j_regressor=f32(a["j_regressor"]),
      weights=f32(a["weights"]),
      faces=i32(faces),
      static_lmk_faces=i32(a["static_lmk_faces"]),
      static_lmk_bary=f32(a["static_lmk_bary"]),
      dynamic_lmk_faces=i32(a["dynamic_lmk_faces"]),
      dynamic_lmk_bary=f32(a["dynamic_lmk_bary"]),
      full_lmk_faces=i32(a["full_lmk_faces"]),
      full_lmk_bary=f32(a["full_lmk_bary"]),
      face_mask=jnp.asarray(mask),
      parents=tuple(int(p) for p in a["parents"]),
      yaw_sign=yaw_sign,
  )
