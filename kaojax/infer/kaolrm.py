"""KaoLRM batch inference from real photos and videos (the job `infer_kaolrm`).

    python run.py --config=configs/infer_kaolrm.py --config.input=PHOTOS \
        --config.model=MODEL_DIR --workdir=OUT

Per photo or sampled video frame (`kaojax.infer.runner`: inputs, background decoding
and detection, batches, results.jsonl, reruns): MTCNN (`kaojax.infer.detect`,
FaceLift's settings) -> faces with probability > face_threshold, the largest
(`faces=largest`, by box area) or all (`faces=all`) -> a crop of each
(`kaojax.infer.crops`: `ffhq` for a monocular model, `multiview` for the multi-view
one (framed like its training renders: `multiview_framing`),
`facelift`, or `full`: no detection) -> the model's source image
(`kaojax.images.prepare_source_image`) -> `KaoLRM.forward_and_render` at the canonical
source camera (normalised focal synth_focal), in fixed-size batches padded to
`batch_size` (one compilation), data-parallel over the local devices.

Outputs, per face, in OUT/<name> (faces=largest) or OUT/<name>/face_<k> (faces=all,
k in descending detector score); <name> is the input's file stem (plus a hash of its
path when two inputs share a stem). `outputs` (comma-separated) picks the files;
params.npz is always written:
  params.npz       shape [n_shape], expression [n_expr], pose [6] (global, jaw
                   axis-angle), scale [1], translation [3], box [4] (x0, y0, x1, y1) and
                   landmarks5 [5, 2] (MTCNN) in original-photo pixels, score [] (MTCNN
                   probability), crop_transform [2, 3] (photo pixels -> crop pixels;
                   `crops.invert_affine` maps back), crop_kind, crop_size [], image_size
                   [2] (w, h), landmarks3d [68, 3] (posed, FLAME world), landmarks2d
                   [68, 2] (their projection in the render camera mapped onto the photo;
                   the crop's bicubic align-corners resize makes this exact to about a
                   source pixel), lmk7 [7, 3], synth_focal [], source_camera [16] (the
                   model's input camera), render_K [3, 3] and render_viewmat [4, 4] (the
                   render camera, FLAME world, OpenCV). With crop=full, landmarks5 is
                   NaN and score 1.
  "mesh":      mesh.obj (the posed FLAME mesh, vertices * scale + translation, metres)
               and mesh_neutral.obj (the same shape and scale with expression and pose
               zeroed, no translation: what the NoW benchmark expects).
  "lmk7":      lmk7.npy [7, 3], NoW's landmarks of the neutral mesh: FLAME's
               landmarks3d at iBUG 36, 39, 42, 45, 33, 48, 54.
  "reference": reference/, the reference inference's exports for one-to-one
               comparisons: mesh.ply (the posed mesh scaled by synth_focal / 0.75, as
               the reference writes it), mesh_shape.npy, mesh_expression.npy,
               mesh_pose.npy, mesh_lmks.npy (the 68 3D landmarks, same scaling).
  "vis":       vis.png: input crop | surfel render | shaded mesh normals (render_size
               each) | the mesh and its 68 landmarks over the original photo.
  "gaussians": gaussians.ply, the surfels as a standard 3DGS PLY (flat third axis).
  "turntable": turntable.mp4 (GIF without ffmpeg), the surfels on a 360 degree orbit.
Folders are written under a temporary name and renamed when complete.

A video (`kaojax.infer.video`) gives OUT/<name>/frames/<frame index>/ (the files above
per frame, without vis.png), OUT/<name>/sequence.npz (per-frame parameters, identities
linked by box overlap, a robust shape per identity, pose / expression / translation
smoothed over time with `video_smoothing` seconds; keys in kaojax.infer.video) and
OUT/<name>/overlay.mp4 (the smoothed meshes and landmarks over the sampled frames).

OUT/results.jsonl and summary.json: `kaojax.infer.runner`. A photo whose outputs are
not all finite is an `error` row and writes nothing.

Model: `model` is a converted KaoLRM model directory or a training run's work
directory, whose latest complete checkpoint is used (`kaojax.models.loading`; the
step is part of the run's settings, so a rerun after more training redoes the inputs).
Without one, `preset` builds random weights (tests).
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from data_pipeline.sources import CANONICAL_C2W, source_camera_vector
from kaojax.export.animation import write_animation
from kaojax.export.obj import write_obj
from kaojax.export.ply import write_mesh_ply, write_surfel_ply
from kaojax.flame.demo import shade
from kaojax.flame.io import load_flame
from kaojax.flame.synthetic import make_synthetic_flame
from kaojax.geometry.cameras import SOURCE_FOCAL
from kaojax.images import prepare_source_image
from kaojax.infer import crops, exports, runner, video
from kaojax.models import loading
from kaojax.models.kaolrm import KaoLRM, kaolrm_config, project_landmarks
from kaojax.render import Gaussians, rasterize_mesh

NOW_LANDMARKS = (36, 39, 42, 45, 33, 48, 54)   # iBUG indices, NoW's order
OUTPUTS = ("params", "mesh", "lmk7", "reference", "vis", "gaussians", "turntable")
PARAM_KEYS = ("shape", "expression", "pose", "scale", "translation")
GAUSSIAN_KEYS = ("means", "quats", "scales", "opacities", "colors")
DEFAULT_FPS = 25.0      # a video whose container gives no frame rate


# ------------------------------------------------------------------------------ model


def build_model(config) -> KaoLRM:
  """The KaoLRM network of `config.model` (a converted model directory, or a training
  run's work directory: its latest checkpoint) or, without one, random weights of
  `config.preset`."""
  num_samples = {"num_samples": int(config.num_samples)} if config.num_samples else {}
  if config.model:
    directory = pathlib.Path(config.model)
    if not (loading.is_model_directory(directory) or loading.is_training_workdir(directory)):
      raise ValueError(f"--config.model={directory} is neither a converted KaoLRM model "
                       f"directory (no {loading.META_FILE}) nor a training work directory "
                       "(no checkpoints/)")
    flame = None
    if config.flame_path:
      meta = loading.read_meta(directory)
      flame = load_flame(config.flame_path, n_shape=meta["config"]["n_shape"],
                         n_expr=meta["config"]["n_expr"])
    model = loading.load_model(directory, flame=flame, dtype=config.dtype or None,
                               **num_samples)
    if not isinstance(model, KaoLRM):
      raise ValueError(f"{directory} holds an OpenLRM model, not KaoLRM")
    return model
  if not config.preset:
    raise ValueError("no model: pass --config.model=DIR (a converted KaoLRM model) or "
                     "use the :tiny preset")
  cfg = kaolrm_config(config.preset, monocular=bool(config.monocular), **num_samples)
  flame = (load_flame(config.flame_path, n_shape=cfg.n_shape, n_expr=cfg.n_expr)
           if config.flame_path else
           make_synthetic_flame(n_shape=cfg.n_shape, n_expr=cfg.n_expr))
  if config.dtype:
    from kaojax.models.lrm import with_runtime_options
    cfg = dataclasses.replace(cfg, lrm=with_runtime_options(cfg.lrm, dtype=config.dtype))
  logging.warning("infer_kaolrm: random %r weights (no --config.model): the meshes are "
                  "not reconstructions", config.preset)
  return KaoLRM(cfg, flame, nnx.Rngs(config.seed))


def canonical_camera(batch_size: int, render_size: int, synth_focal: float):
  """(source cameras [B, 16], viewmats [B, 1, 4, 4], Ks [B, 1, 3, 3]): the model's
  input camera and the canonical render camera (as the monocular training data)."""
  cameras = np.broadcast_to(source_camera_vector(), (batch_size, 16))
  viewmat = np.linalg.inv(CANONICAL_C2W).astype(np.float32)
  f, c = synth_focal * render_size, render_size / 2
  K = np.array([[f, 0, c], [0, f, c], [0, 0, 1]], np.float32)
  return (jnp.asarray(cameras), jnp.asarray(np.broadcast_to(viewmat, (batch_size, 1, 4, 4))),
          jnp.asarray(np.broadcast_to(K, (batch_size, 1, 3, 3))))


def local_devices(count: int = 0) -> list:
  """The first `count` local devices (0: all of them)."""
  devices = jax.local_devices()
  if count < 0 or count > len(devices):
    raise ValueError(f"devices={count}: this process has {len(devices)} local devices")
  return devices[:count] if count else devices


class Reconstructor:
  """The jitted forward over fixed-size batches of source images [B, S, S, 3],
  data-parallel over `devices` (B is rounded up to a multiple of their number; the
  parameters are replicated)."""

  def __init__(self, model: KaoLRM, batch_size: int, render_size: int, synth_focal: float,
               seed: int = 0, devices=None):
    devices = list(devices or [jax.local_devices()[0]])
    self.batch_size = -(-int(batch_size) // len(devices)) * len(devices)
    self.render_size = int(render_size)
    self.source_size = model.cfg.lrm.encoder.image_size
    self.num_vertices = model.flame_model.num_vertices
    self.faces = np.asarray(model.flame_model.faces)
    self.key = jax.random.PRNGKey(seed)
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    self.data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    graphdef, state = nnx.split(model)
    self.state = jax.device_put(state, replicated)
    cameras, viewmats, Ks = canonical_camera(self.batch_size, self.render_size, synth_focal)
    self.viewmat, self.K = np.asarray(viewmats[0, 0]), np.asarray(Ks[0, 0])
    now = jnp.asarray(NOW_LANDMARKS)
    render_size = self.render_size
    flame = model.flame_model

    def forward(state, images, key):
      net = nnx.merge(graphdef, state)
      out, renders = net.forward_and_render(
          images, cameras, viewmats, Ks, render_size, key, synth_focal=synth_focal,
          background=jnp.ones((images.shape[0], 3), jnp.float32))
      p = out.flame
      f32 = lambda x: x.astype(jnp.float32)
      neutral = net.flame_model(f32(p.shape), jnp.zeros_like(f32(p.expression)),
                                jnp.zeros_like(f32(p.pose)), scale=f32(p.scale))
      mesh = renders["mesh"]
      g = out.gaussians
      return {
          "shape": f32(p.shape), "expression": f32(p.expression), "pose": f32(p.pose),
          "scale": f32(p.scale), "translation": f32(p.translation),
          "vertices": out.vertices, "landmarks3d": out.landmarks,
          "landmarks_render": project_landmarks(out.landmarks, viewmats, Ks)[:, 0],
          "neutral_vertices": neutral.vertices, "lmk7": neutral.landmarks3d[:, now],
          "surfels": jnp.clip(renders["surfels"]["color"][:, 0], 0.0, 1.0),
          "normals": shade(mesh["normal"][:, 0], mesh["mask"][:, 0]),
          "mesh_mask": mesh["mask"][:, 0],
          **{f"gaussian_{k}": f32(getattr(g, k)) for k in GAUSSIAN_KEYS},
      }

    def render_params(shape, expression, pose, scale, translation):
      """FLAME parameters [B, *] -> the mesh at the render camera: shaded [B, R, R, 3],
      mask [B, R, R], landmarks [B, 68, 2] (pixels of the render)."""
      out = flame(shape, expression, pose, scale=scale, translation=translation)
      mesh = rasterize_mesh(out.vertices, flame.faces, viewmats, Ks, render_size,
                            render_size)
      return {"normals": shade(mesh["normal"][:, 0], mesh["mask"][:, 0]),
              "mesh_mask": mesh["mask"][:, 0],
              "landmarks_render": project_landmarks(out.landmarks3d, viewmats, Ks)[:, 0]}

    self._forward = jax.jit(forward)
    self._render_params = jax.jit(render_params)

  def _padded(self, arrays: dict, fill: float) -> dict:
    n = len(next(iter(arrays.values())))
    if not 0 < n <= self.batch_size:
      raise ValueError(f"batch of {n}, expected 1..{self.batch_size}")
    out = {}
    for k, v in arrays.items():
      v = np.asarray(v, np.float32)
      padded = np.full((self.batch_size,) + v.shape[1:], fill, np.float32)
      padded[:n] = v
      out[k] = jax.device_put(padded, self.data_sharding)
    return out

  @staticmethod
  def _split(out, n: int) -> list:
    out = jax.device_get(out)
    return [{k: np.asarray(v[i]) for k, v in out.items()} for i in range(n)]

  def __call__(self, images: np.ndarray) -> list:
    """images [n <= B, S, S, 3] -> n dicts of numpy arrays (one per image)."""
    n = len(images)
    padded = self._padded({"images": images}, 1.0)["images"]
    return self._split(self._forward(self.state, padded, self.key), n)

  def render_params(self, params: dict) -> list:
    """FLAME parameters {shape, expression, pose, scale, translation: [n <= B, *]} ->
    n dicts: normals [R, R, 3] (shaded), mesh_mask [R, R], landmarks_render [68, 2]."""
    n = len(params["shape"])
    padded = self._padded({k: params[k] for k in PARAM_KEYS}, 0.0)
    padded["scale"] = padded["scale"].at[n:].set(1.0)
    return self._split(self._render_params(**padded), n)


# ---------------------------------------------------------------------------- writing


def _to_uint8(image):
  return (np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def photo_landmarks(landmarks_render, transform, crop_size: int, render_size: int):
  """[K, 2] landmarks in render pixels -> original-photo pixels."""
  return crops.apply_affine(crops.invert_affine(transform),
                            np.asarray(landmarks_render) * (crop_size / render_size))


def mesh_over_photo(image, rendered: dict, transform, crop_size: int, render_size: int):
  """The shaded mesh and its 68 landmarks (a `render_params` / forward result) over the
  original photo uint8 [H, W, 3]."""
  return exports.photo_overlay(
      image, rendered["normals"], rendered["mesh_mask"], transform, crop_size,
      photo_landmarks(rendered["landmarks_render"], transform, crop_size, render_size))


def visualization(face: runner.Face, image, crop_size: int, size: int) -> np.ndarray:
  """input crop | surfel render | shaded normals | mesh over the photo (height size)."""
  r = face.result
  crop = np.asarray(Image.fromarray(face.crop).resize((size, size), Image.BICUBIC))
  overlay = mesh_over_photo(image, r, face.transform, crop_size, size)
  h, w = overlay.shape[:2]
  overlay = np.asarray(Image.fromarray(overlay).resize(
      (max(1, round(w * size / h)), size), Image.BICUBIC))
  return np.concatenate([crop, _to_uint8(r["surfels"]), _to_uint8(r["normals"]), overlay], 1)


def face_params(face: runner.Face, frame: runner.Frame, crop_kind: str, crop_size: int,
                render_size: int, synth_focal: float, viewmat, K) -> dict:
  r = face.result
  return {
      **{k: r[k] for k in ("shape", "expression", "pose", "translation")},
      "scale": r["scale"].reshape(1),
      "box": np.asarray(face.box, np.float32), "score": np.float32(face.score),
      "landmarks5": np.asarray(face.landmarks5, np.float32),
      "crop_transform": face.transform.astype(np.float64), "crop_kind": np.array(crop_kind),
      "crop_size": np.int32(crop_size),
      "image_size": np.array(frame.image_size, np.int32),
      "landmarks3d": r["landmarks3d"],
      "landmarks2d": photo_landmarks(r["landmarks_render"], face.transform, crop_size,
                                     render_size).astype(np.float32),
      "lmk7": r["lmk7"], "synth_focal": np.float32(synth_focal),
      "source_camera": source_camera_vector().astype(np.float32),
      "render_viewmat": np.asarray(viewmat, np.float32), "render_K": np.asarray(K, np.float32),
  }


def write_reference_outputs(folder: pathlib.Path, result: dict, faces_array,
                            synth_focal: float):
  """The files KaoLRM's reference inference writes for a face: its mesh and 68 3D
  landmarks scaled by synth_focal / SOURCE_FOCAL (its "align with gt mesh scale"), and
  the raw FLAME parameters."""
  to_reference = synth_focal / SOURCE_FOCAL
  write_mesh_ply(folder / "mesh.ply", result["vertices"] * to_reference, faces_array)
  for key in ("shape", "expression", "pose"):
    np.save(folder / f"mesh_{key}.npy", np.asarray(result[key], np.float32))
  np.save(folder / "mesh_lmks.npy",
          (result["landmarks3d"] * to_reference).astype(np.float32))


def result_gaussians(result: dict) -> Gaussians:
  return Gaussians(**{k: result[f"gaussian_{k}"] for k in GAUSSIAN_KEYS})


# -------------------------------------------------------------------------------- job


def parse_outputs(spec: str) -> tuple:
  """`outputs` ("mesh,vis", or "all") -> the chosen OUTPUTS (params always)."""
  names = [n.strip() for n in str(spec).split(",") if n.strip()]
  if names == ["all"]:
    return OUTPUTS
  unknown = sorted(set(names) - set(OUTPUTS))
  if unknown:
    raise ValueError(f"unknown outputs {unknown} (known: all, {', '.join(OUTPUTS)})")
  return tuple(n for n in OUTPUTS if n == "params" or n in names)


def resolve_crop(config, model: KaoLRM) -> str:
  kind = config.crop
  if kind == "auto":
    kind = "ffhq" if model.cfg.monocular else "multiview"
  if kind not in crops.CROPS + ("full",):
    raise ValueError(f"unknown crop {config.crop!r} (known: auto, full, "
                     f"{', '.join(crops.CROPS)})")
  return kind


class KaoLRMTask(runner.Task):
  """KaoLRM as the runner's task (module doc)."""
  name = "infer_kaolrm"

  def __init__(self, config):
    self.config = config
    self.outputs = parse_outputs(config.outputs)
    model = build_model(config)
    self.crop_kind = resolve_crop(config, model)
    self.source_size = model.cfg.lrm.encoder.image_size
    self.render_size = int(config.render_size) or self.source_size
    self.crop_size = (self.source_size if self.crop_kind == "full"
                      else crops.output_size(self.crop_kind, self.source_size))
    self.synth_focal = float(config.synth_focal)
    if config.multiview_framing:
      self.framing = crops.Framing.parse(config.multiview_framing)
    self.recon = Reconstructor(model, config.batch_size, self.render_size, self.synth_focal,
                               config.seed, local_devices(int(config.devices)))
    self.batch_size = self.recon.batch_size

  def prepare(self, crop):
    return prepare_source_image(crop / 255.0, self.source_size)

  def predict(self, sources):
    return self.recon(sources)

  def slim(self, result):
    return {k: result[k] for k in PARAM_KEYS}

  def write_face(self, folder, face, frame):
    r, faces = face.result, self.recon.faces
    np.savez(folder / "params.npz", **face_params(
        face, frame, self.crop_kind, self.crop_size, self.render_size, self.synth_focal,
        self.recon.viewmat, self.recon.K))
    if "mesh" in self.outputs:
      write_obj(folder / "mesh.obj", r["vertices"], faces)
      write_obj(folder / "mesh_neutral.obj", r["neutral_vertices"], faces)
    if "lmk7" in self.outputs:
      np.save(folder / "lmk7.npy", r["lmk7"].astype(np.float32))
    if "reference" in self.outputs:
      (folder / "reference").mkdir(exist_ok=True)
      write_reference_outputs(folder / "reference", r, faces, self.synth_focal)
    if "vis" in self.outputs and not frame.item.is_video:
      Image.fromarray(visualization(face, frame.image, self.crop_size, self.render_size)
                      ).save(folder / "vis.png")
    if "gaussians" in self.outputs:
      write_surfel_ply(folder / "gaussians.ply", result_gaussians(r))
    if "turntable" in self.outputs:
      frames = exports.turntable_frames(result_gaussians(r), self.render_size,
                                        int(self.config.turntable_frames), self.synth_focal)
      write_animation(folder / "turntable.mp4", frames, self.config.turntable_fps)

  def finish_video(self, folder, item, frames):
    tracks = video.link_tracks([np.stack([f.box for f in frame.faces]) for frame in frames])
    # Rows in sequence.npz's order: frame index, then track.
    faces = sorted(((frame, face, int(track)) for frame, frame_tracks in zip(frames, tracks)
                    for face, track in zip(frame.faces, frame_tracks)),
                   key=lambda row: (row[0].index, row[2]))
    rows = [{"frame_index": frame.index, "track": track, **face.result, "box": face.box,
             "score": face.score, "landmarks5": face.landmarks5}
            for frame, face, track in faces]
    fps = item.fps or DEFAULT_FPS
    sequence = video.build_sequence(rows, fps, float(self.config.video_smoothing),
                                    int(self.config.video_every))
    sequence["crop_transform"] = np.stack([face.transform for _, face, _ in faces])
    np.savez(folder / "sequence.npz", **sequence)
    smoothed = {"shape": sequence["shape_track"][np.searchsorted(sequence["tracks"],
                                                                 sequence["track"])],
                "expression": sequence["expression_smoothed"],
                "pose": sequence["pose_smoothed"], "scale": sequence["scale_smoothed"],
                "translation": sequence["translation_smoothed"]}
    write_animation(folder / "overlay.mp4", self._overlay_frames(item, faces, smoothed),
                    fps / int(self.config.video_every))

  def _overlay_frames(self, item, faces, smoothed):
    """The sampled frames decoded again, the smoothed meshes drawn over them."""
    rows_of = {}
    for row, (frame, _, _) in enumerate(faces):
      rows_of.setdefault(frame.index, []).append(row)
    every = int(self.config.video_every)
    limit = int(self.config.video_max_frames) or None
    for index, image in video.read_frames(item.path, every=every, max_frames=limit):
      rows = rows_of.get(index, [])
      for start in range(0, len(rows), self.batch_size):
        chunk = rows[start:start + self.batch_size]
        rendered = self.recon.render_params({k: v[chunk] for k, v in smoothed.items()})
        for row, r in zip(chunk, rendered):
          image = mesh_over_photo(image, r, faces[row][1].transform, self.crop_size,
                                  self.render_size)
      yield image


def run(config, workdir) -> dict:
  """The job (module doc); returns the run's summary (also in summary.json)."""
  settings = {k: config[k] for k in TASK_SETTINGS}
  if config.model and loading.is_training_workdir(config.model):
    steps = loading.checkpoint_steps(pathlib.Path(config.model) / loading.CHECKPOINTS_DIR)
    settings["checkpoint_step"] = steps[-1] if steps else None
  return runner.run(lambda: KaoLRMTask(config), config, workdir, settings)


# Config fields of this task that change an input's outputs (a rerun with other
# values redoes it).
TASK_SETTINGS = ("model", "preset", "monocular", "flame_path", "multiview_framing",
                 "synth_focal", "render_size", "num_samples", "dtype", "turntable_frames",
                 "video_smoothing")
