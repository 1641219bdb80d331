"""Camera conventions. Every camera convention in kaojax is owned by this module.

* Poses are OpenCV camera-to-world 4x4 matrices (`c2w`): camera x right, y down,
  z forward. Renderers take the inverse, world-to-camera (`viewmat`).
* Intrinsics `K` are 3x3 in pixels; OpenLRM/KaoLRM store them normalised as
  (fx/W, fy/H, cx/W, cy/H).
* OpenLRM's 16-number camera vector is the 3x4 camera-to-world matrix in the
  Blender/OpenGL convention (x right, y up, z backward), row-major, followed by the
  normalised intrinsics. Its default source camera sits at (0, -2, 0) in OpenLRM's
  Z-up triplane world, looking along +Y.
* The FLAME world is Y-up with the face looking along +Z. A triplane-world point
  (x, y, z) is the FLAME-world point (x, z, -y); conversely FLAME (x, y, z) is
  triplane (x, -z, y). The canonical KaoLRM camera therefore sits at (0, 0, 2) in
  the FLAME world, looking down -Z at the face.
* FaceLift's world is Z-up with the subject facing -Y; its six cameras orbit at
  radius 2.7 with 50 degrees field of view.
"""

import math

import jax.numpy as jnp
import numpy as np

# Right-multiplying a camera-to-world matrix by this flips between OpenCV and OpenGL.
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0]).astype(np.float32)

# p_triplane = FLAME_TO_TRIPLANE @ p_flame, i.e. (x, y, z) -> (x, -z, y).
FLAME_TO_TRIPLANE = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], np.float32)

FACELIFT_VIEWS = ("front", "front_right", "right", "back", "left", "front_left")
# Azimuths (degrees, Z-up orbit, see `orbit_cameras`) of FaceLift's six views.
FACELIFT_AZIMUTHS = (270.0, 225.0, 180.0, 90.0, 0.0, 315.0)
FACELIFT_RADIUS = 2.7
FACELIFT_FOV_DEG = 50.0


def fov_to_focal(fov_deg, size):
  """Focal length in pixels for a full field of view `fov_deg` over `size` pixels."""
  return size / (2.0 * math.tan(math.radians(fov_deg) / 2.0))


def focal_to_fov(focal, size):
  """Inverse of `fov_to_focal`, in degrees."""
  return math.degrees(2.0 * math.atan(size / (2.0 * focal)))


def intrinsics(fx, fy, cx, cy):
  """Pixel intrinsics from [...]-shaped fx, fy, cx, cy -> K [..., 3, 3]."""
  fx, fy, cx, cy = jnp.broadcast_arrays(
      *(jnp.asarray(v, jnp.float32) for v in (fx, fy, cx, cy)))
  zero, one = jnp.zeros_like(fx), jnp.ones_like(fx)
  return jnp.stack([
      jnp.stack([fx, zero, cx], -1),
      jnp.stack([zero, fy, cy], -1),
      jnp.stack([zero, zero, one], -1),
  ], -2)


def intrinsics_from_fov(fov_deg, width, height):
  """K [3, 3] with square pixels, the principal point at the image centre and the
  field of view `fov_deg` across the width."""
  f = fov_to_focal(fov_deg, width)
  return intrinsics(f, f, width / 2.0, height / 2.0)


def normalize_intrinsics(K, width, height):
  """K [..., 3, 3] pixels -> [..., 4] (fx/W, fy/H, cx/W, cy/H)."""
  return jnp.stack([K[..., 0, 0] / width, K[..., 1, 1] / height,
                    K[..., 0, 2] / width, K[..., 1, 2] / height], -1)


def denormalize_intrinsics(normalized, width, height):
  """[..., 4] (fx/W, fy/H, cx/W, cy/H) -> K [..., 3, 3] in pixels."""
  n = jnp.asarray(normalized, jnp.float32)
  return intrinsics(n[..., 0] * width, n[..., 1] * height,
                    n[..., 2] * width, n[..., 3] * height)


def invert_pose(pose):
  """Rigid inverse of [..., 4, 4] (c2w <-> w2c)."""
  rot = pose[..., :3, :3]
  trans = pose[..., :3, 3]
  rot_t = jnp.swapaxes(rot, -1, -2)
  new_t = -jnp.einsum("...ij,...j->...i", rot_t, trans)
  top = jnp.concatenate([rot_t, new_t[..., None]], -1)
  bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], pose.dtype),
                            top.shape[:-2] + (1, 4))
  return jnp.concatenate([top, bottom], -2)


def pose_from_rt(rotation, translation):
  """rotation [..., 3, 3], translation [..., 3] -> [..., 4, 4]."""
  top = jnp.concatenate([rotation, translation[..., None]], -1)
  bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], rotation.dtype),
                            top.shape[:-2] + (1, 4))
  return jnp.concatenate([top, bottom], -2)


def _normalize(v):
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def look_at(eye, target, up):
  """OpenCV camera-to-world [..., 4, 4] for cameras at `eye` [..., 3] looking at
  `target` [..., 3], with world direction `up` [3] appearing upwards in the image.
  (Undefined when the viewing direction is parallel to `up`.)"""
  eye = jnp.asarray(eye, jnp.float32)
  target = jnp.broadcast_to(jnp.asarray(target, jnp.float32), eye.shape)
  up = jnp.broadcast_to(jnp.asarray(up, jnp.float32), eye.shape)
  z = _normalize(target - eye)
  x = _normalize(jnp.cross(z, up))
  y = jnp.cross(z, x)
  return pose_from_rt(jnp.stack([x, y, z], -1), eye)


def orbit_positions(azimuth_deg, elevation_deg, radius, up="z"):
  """Points on a sphere. Z-up: (r cos(el) cos(az), r cos(el) sin(az), r sin(el)),
  so azimuth 270 is the front (0, -r, 0) of an OpenLRM/FaceLift subject facing -Y.
  Y-up (FLAME world): the same point mapped triplane -> FLAME, so the same angles
  see the same side of the subject (azimuth 270 -> (0, 0, r))."""
  az = jnp.deg2rad(jnp.asarray(azimuth_deg, jnp.float32))
  el = jnp.deg2rad(jnp.asarray(elevation_deg, jnp.float32))
  az, el = jnp.broadcast_arrays(az, el)
  pos = radius * jnp.stack([jnp.cos(el) * jnp.cos(az), jnp.cos(el) * jnp.sin(az),
                            jnp.sin(el)], -1)
  if up == "z":
    return pos
  if up == "y":
    return triplane_to_flame(pos)
  raise ValueError(f"up must be 'z' or 'y', got {up!r}")


def orbit_cameras(azimuth_deg, elevation_deg, radius, up="z", target=(0.0, 0.0, 0.0)):
  """OpenCV c2w [..., 4, 4] on an orbit looking at `target`; see `orbit_positions`."""
  eye = orbit_positions(azimuth_deg, elevation_deg, radius, up)
  up_vec = (0.0, 0.0, 1.0) if up == "z" else (0.0, 1.0, 0.0)
  return look_at(eye + jnp.asarray(target, jnp.float32), target, up_vec)


def project_points(points, viewmat, K):
  """points [..., N, 3] world, viewmat [..., 4, 4] w2c, K [..., 3, 3]
  -> pixels [..., N, 2] (x, y; pixel centres at +0.5), depth [..., N] (camera z)."""
  cam = jnp.einsum("...ij,...nj->...ni", viewmat[..., :3, :3], points)
  cam = cam + viewmat[..., None, :3, 3]
  depth = cam[..., 2]
  uvw = jnp.einsum("...ij,...nj->...ni", K, cam)
  return uvw[..., :2] / uvw[..., 2:3], depth


# ----------------------------------------------------------------------------
# OpenLRM 16-number camera vector.


def camera_centers(viewmats):
  """World-to-camera [..., 4, 4] -> camera centres in the world [..., 3] (-R^T t)."""
  rotation, translation = viewmats[..., :3, :3], viewmats[..., :3, 3]
  return -jnp.einsum("...ji,...j->...i", rotation, translation)


def to_openlrm_camera(c2w, K, width, height):
  """OpenCV c2w [..., 4, 4] + pixel K [..., 3, 3] -> OpenLRM vector [..., 16]."""
  gl = c2w @ OPENCV_TO_OPENGL
  flat = gl[..., :3, :4].reshape(gl.shape[:-2] + (12,))
  return jnp.concatenate([flat, normalize_intrinsics(K, width, height)], -1)


def from_openlrm_camera(camera, width, height):
  """OpenLRM vector [..., 16] -> (OpenCV c2w [..., 4, 4], pixel K [..., 3, 3])."""
  camera = jnp.asarray(camera, jnp.float32)
  if camera.shape[-1] != 16:
    raise ValueError(f"OpenLRM camera vectors have 16 numbers, got shape {camera.shape}")
  gl = camera[..., :12].reshape(camera.shape[:-1] + (3, 4))
  c2w = pose_from_rt(gl[..., :3], gl[..., 3]) @ OPENCV_TO_OPENGL
  return c2w, denormalize_intrinsics(camera[..., 12:], width, height)


# Normalised focal (f / image size) of OpenLRM's and KaoLRM's source camera, always.
SOURCE_FOCAL = 0.75


def default_openlrm_source_camera(distance: float = 2.0, focal: float = SOURCE_FOCAL):
  """OpenLRM's canonical source camera [16]: at (0, -distance, 0) in the Z-up
  triplane world looking at the origin, normalised focal `focal`, centre 0.5
  (a numpy array: data pipelines build it per sample)."""
  return np.array([1, 0, 0, 0, 0, 0, -1, -distance, 0, 1, 0, 0,
                   focal, focal, 0.5, 0.5], np.float32)


# ----------------------------------------------------------------------------
# FLAME world (Y-up) <-> OpenLRM triplane world (Z-up).


def flame_to_triplane(points):
  """[..., 3] FLAME-world (x, y, z) -> triplane-world (x, -z, y)."""
  return jnp.stack([points[..., 0], -points[..., 2], points[..., 1]], -1)


def triplane_to_flame(points):
  """[..., 3] triplane-world (x, y, z) -> FLAME-world (x, z, -y)."""
  return jnp.stack([points[..., 0], points[..., 2], -points[..., 1]], -1)


def flame_pose_to_triplane(c2w):
  """Camera-to-world [..., 4, 4] in the FLAME world -> the same camera in the
  triplane world (the camera axes are untouched, only the world is rotated)."""
  m = jnp.eye(4, dtype=jnp.float32).at[:3, :3].set(FLAME_TO_TRIPLANE)
  return m @ c2w


def triplane_pose_to_flame(c2w):
  """Inverse of `flame_pose_to_triplane`."""
  m = jnp.eye(4, dtype=jnp.float32).at[:3, :3].set(FLAME_TO_TRIPLANE.T)
  return m @ c2w


# ----------------------------------------------------------------------------
# FaceLift's fixed cameras.


def facelift_cameras(size: int = 512, fov_deg: float = FACELIFT_FOV_DEG,
                     radius: float = FACELIFT_RADIUS):
  """FaceLift's six views (FACELIFT_VIEWS order), Z-up world, elevation 0.

  Returns (c2w [6, 4, 4] OpenCV, K [6, 3, 3] pixels).
  """
  c2w = orbit_cameras(jnp.asarray(FACELIFT_AZIMUTHS), 0.0, radius, up="z")
  K = intrinsics_from_fov(fov_deg, size, size)
  return c2w, jnp.broadcast_to(K, (len(FACELIFT_AZIMUTHS), 3, 3))
