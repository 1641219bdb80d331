"""grain pipelines for KaoLRM training: multi-view and monocular datasets.

A sample (dict of numpy arrays, batched by grain along a new leading axis):

  source          [S, S, 3]       source view composited on white, S = source_size
  source_camera   [16]            OpenLRM camera vector of the canonical source camera
  target_rgb      [V, R, R, 3]    the V views (first = source) on `background`
  target_alpha    [V, R, R]
  viewmats        [V, 4, 4]       world-to-camera (OpenCV, FLAME world), normalised so
                                  view 0 is the canonical camera
  Ks              [V, 3, 3]       pixel intrinsics at R x R
  landmarks       [V, 68, 2]      pixels at R x R (<= 0: missing)
  background      [3]
  num_skipped     []              unreadable subjects replaced to build this sample

Unreadable subjects (missing / corrupt files) are logged with their path and replaced
by the next subject, so a run never stops for one bad file.
"""

import dataclasses
import pathlib

import grain
import numpy as np
from absl import logging
from PIL import Image

from data_pipeline import layout

# The canonical source camera in the FLAME world (Y up): at (0, 0, 2) looking down -Z
# at the face, OpenCV axes; the same camera as OpenLRM's default source camera
# (geometry.default_openlrm_source_camera) moved to the FLAME world.
CANONICAL_C2W = np.array([[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 2], [0, 0, 0, 1]],
                         np.float32)
SOURCE_FOCAL = 0.75  # normalised focal of the source camera (always)
BACKGROUNDS = (0.0, 0.5, 1.0)
MAX_REPLACEMENTS = 16


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  num_views: int = 4
  source_size: int = 224
  render_size: int = 192
  random_background: bool = True


def source_camera_vector():
  """[16] the model's camera input: OpenLRM's default source camera (Z-up triplane
  world, at (0, -2, 0)), which is CANONICAL_C2W seen from the triplane world."""
  return np.array([1, 0, 0, 0, 0, 0, -1, -2, 0, 1, 0, 0,
                   SOURCE_FOCAL, SOURCE_FOCAL, 0.5, 0.5], np.float32)


def normalize_poses(c2w):
  """c2w [V, 4, 4] -> the same rig moved rigidly so that view 0 is CANONICAL_C2W."""
  return CANONICAL_C2W @ np.linalg.inv(c2w[0]) @ c2w


def resize(image, size: int):
  """[H, W, C] float -> [size, size, C] (antialiased bilinear, per channel)."""
  if image.shape[0] == size and image.shape[1] == size:
    return image.astype(np.float32)
  channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), "F")
                         .resize((size, size), Image.BILINEAR))
              for c in range(image.shape[-1])]
  return np.stack(channels, -1)


def composite(rgba, background):
  """[H, W, 4] -> [H, W, 3] over a constant background."""
  return rgba[..., :3] * rgba[..., 3:] + np.asarray(background, np.float32) * (1 - rgba[..., 3:])


def scaled_intrinsics(K, width, height, size):
  """K for the image resized from (width, height) to size x size."""
  scale = np.array([[size / width], [size / height], [1.0]], np.float32)
  return (K * scale).astype(np.float32)


def load_multiview(subject_dir, rng: np.random.Generator, cfg: PipelineConfig):
  """One training sample from a multi-view subject folder (see module doc)."""
  subject_dir = pathlib.Path(subject_dir)
  total = layout.num_views(subject_dir)
  if total < cfg.num_views:
    raise layout.DatasetError(f"{subject_dir} has {total} views, need {cfg.num_views}")
  K, width, height, landmarks = layout.read_multiview_meta(subject_dir)
  if landmarks.shape[0] != total:
    raise layout.DatasetError(f"{subject_dir}/lmks2d.npy has {landmarks.shape[0]} "
                              f"views, the subject has {total}")
  if width != height:
    raise layout.DatasetError(f"{subject_dir}: images must be square, got {width}x{height}")
  views = rng.choice(total, cfg.num_views, replace=False)
  rgba, c2w = zip(*(layout.read_multiview_view(subject_dir, int(v)) for v in views))
  for v, image in zip(views, rgba):
    if image.shape[:2] != (height, width):
      raise layout.DatasetError(f"{subject_dir}/rgba/{layout.view_name(v)}.png is "
                                f"{image.shape[1]}x{image.shape[0]}, intrinsics say "
                                f"{width}x{height}")
  background = np.full(3, rng.choice(BACKGROUNDS) if cfg.random_background else 1.0,
                       np.float32)
  c2w = normalize_poses(np.stack(c2w))
  scale = cfg.render_size / width
  return {
      "source": resize(composite(rgba[0], 1.0), cfg.source_size),
      "source_camera": source_camera_vector(),
      "target_rgb": np.stack([resize(composite(r, background), cfg.render_size)
                              for r in rgba]),
      "target_alpha": np.stack([resize(r[..., 3:], cfg.render_size)[..., 0] for r in rgba]),
      "viewmats": np.linalg.inv(c2w).astype(np.float32),
      "Ks": np.broadcast_to(scaled_intrinsics(K, width, height, cfg.render_size),
                            (cfg.num_views, 3, 3)).copy(),
      "landmarks": (landmarks[views] * scale).astype(np.float32),
      "background": background,
  }


def load_monocular(root, uid: str, landmarks: dict, synth_focal: float,
                   cfg: PipelineConfig):
  """One sample from a monocular dataset: the image is source and only target,
  seen by the canonical camera with normalised focal `synth_focal`."""
  root = pathlib.Path(root)
  rgba = layout.read_png(root / "rgba" / f"{uid}.png", 4)
  mask = layout.read_png(root / "mask" / f"{uid}.png", 1)[..., 0]
  height, width = rgba.shape[:2]
  if uid not in landmarks:
    raise layout.DatasetError(f"{root}/lmks.npz has no landmarks for {uid!r}")
  size = cfg.render_size
  K = np.array([[synth_focal * size, 0, size / 2], [0, synth_focal * size, size / 2],
                [0, 0, 1]], np.float32)
  return {
      "source": resize(composite(rgba, 1.0), cfg.source_size),
      "source_camera": source_camera_vector(),
      "target_rgb": resize(composite(rgba, 1.0), size)[None],
      "target_alpha": resize(mask[..., None], size)[None, ..., 0],
      "viewmats": np.linalg.inv(CANONICAL_C2W)[None].astype(np.float32),
      "Ks": K[None],
      "landmarks": (np.asarray(landmarks[uid], np.float32)
                    * np.array([size / width, size / height], np.float32))[None],
      "background": np.ones(3, np.float32),
  }


class SkippingLoader:
  """Loads subject `index`; an unreadable subject is logged with its path and
  replaced by the next one (up to MAX_REPLACEMENTS), counted in `num_skipped`."""

  def __init__(self, load_one, num_subjects: int):
    self._load_one = load_one
    self.num_subjects = num_subjects

  def __call__(self, index, rng: np.random.Generator):
    for skipped in range(MAX_REPLACEMENTS):
      try:
        sample = self._load_one(int(index + skipped) % self.num_subjects, rng)
      except layout.DatasetError as err:
        logging.warning("skipping unreadable subject: %s", err)
        continue
      sample["num_skipped"] = np.int32(skipped)
      return sample
    raise layout.DatasetError(f"{MAX_REPLACEMENTS} consecutive unreadable subjects "
                              f"from index {index}; is the dataset path right?")


def multiview_loader(root, split: str, cfg: PipelineConfig):
  uids = layout.read_split(root, split)
  root = pathlib.Path(root)
  return SkippingLoader(lambda i, rng: load_multiview(root / uids[i], rng, cfg), len(uids))


def monocular_loader(root, split: str, synth_focal: float, cfg: PipelineConfig):
  uids = layout.read_split(root, split, monocular=True)
  path = pathlib.Path(root) / "lmks.npz"
  if not path.is_file():
    raise layout.DatasetError(f"missing landmark file {path}")
  with np.load(path, allow_pickle=False) as data:
    landmarks = {k: data[k] for k in data.files}
  return SkippingLoader(lambda i, rng: load_monocular(root, uids[i], landmarks,
                                                      synth_focal, cfg), len(uids))


def make_dataset(loader: SkippingLoader, batch_size: int, seed: int,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1):
  """Batched grain MapDataset over an endless (or, unshuffled, single) pass.

  Batch `b` of host `process_index` is a pure function of (seed, b): a run resumes
  exactly by slicing `dataset[step:]`. Each host reads a disjoint stride of the
  subjects (per-host sharding for multi-host runs); batch_size is per host.
  """
  indices = grain.MapDataset.range(loader.num_subjects)
  indices = indices[process_index::process_count]
  if shuffle:
    indices = indices.shuffle(seed=seed).repeat()
  dataset = indices.seed(seed).random_map(loader)
  return dataset.batch(batch_size, drop_remainder=True)


def iterate(dataset, start_step: int = 0, num_workers: int = 0):
  """An iterator over batches from `start_step`, with `num_workers` processes."""
  it = dataset[start_step:].to_iter_dataset(grain.ReadOptions(num_threads=2,
                                                              prefetch_buffer_size=2))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it)
