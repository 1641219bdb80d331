"""grain pipelines for KaoLRM training: multi-view and monocular datasets.

A sample is a dict of numpy arrays with the fields of `data_pipeline.batch.Batch`
without the batch axis (`world_to_canonical` for multi-view data only); grain
batches samples into a `Batch` with `make_batch`.

Unreadable subjects (missing / corrupt files) are logged with their path and replaced
by the next subject, so a run never stops for one bad file.
"""

import dataclasses
import functools
import pathlib

import grain
import numpy as np
from absl import flags, logging

from data_pipeline import layout
from data_pipeline.batch import make_batch
from kaojax import images
from kaojax.geometry.cameras import SOURCE_FOCAL, default_openlrm_source_camera

# The canonical source camera in the FLAME world (Y up): at (0, 0, 2) looking down -Z
# at the face, OpenCV axes; the same camera as OpenLRM's default source camera
# (geometry.default_openlrm_source_camera) moved to the FLAME world.
CANONICAL_C2W = np.array([[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 2], [0, 0, 0, 1]],
                         np.float32)
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
  return default_openlrm_source_camera(2.0, SOURCE_FOCAL)


def world_to_canonical(source_c2w):
  """source_c2w [4, 4] -> [4, 4] the rigid motion of the world that puts this camera
  at CANONICAL_C2W."""
  return CANONICAL_C2W @ np.linalg.inv(source_c2w)


def premultiply(rgba):
  """[..., 4] RGBA -> [..., 4] (rgb * alpha, alpha): the form that resizes exactly
  like composites do (resizing is linear and keeps constants), so a view resized
  once serves every background."""
  return np.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], -1)


def composite_premultiplied(premultiplied, background):
  """[..., 4] premultiplied RGBA -> ([..., 3] over a constant background, [...] alpha);
  composite_premultiplied(resize(premultiply(x))) == resize(composite(x)), resize(alpha)
  for any linear resize that keeps constants."""
  alpha = premultiplied[..., 3:]
  rgb = premultiplied[..., :3] + np.asarray(background, np.float32) * (1 - alpha)
  return rgb, alpha[..., 0]


def render_targets(premultiplied, background):
  """Resized premultiplied views [..., 4] -> (rgb [..., 3] on `background`, alpha [...]),
  clamped to [0, 1]: the reference's targets (composite at the file's size, bicubic
  resize, clamp), the resize done before compositing (exact: see `premultiply`)."""
  rgb, alpha = composite_premultiplied(premultiplied, background)
  return np.clip(rgb, 0.0, 1.0), np.clip(alpha, 0.0, 1.0)


def scaled_intrinsics(K, width, height, size):
  """K for the image resized from (width, height) to size x size."""
  scale = np.array([[size / width], [size / height], [1.0]], np.float32)
  return (K * scale).astype(np.float32)


class MultiviewReader:
  """Reads multi-view subjects: each subject's metadata (checked), each view as
  premultiplied RGBA resized to a given size with its camera (render targets), and
  a view as the model's source image (`kaojax.images.prepare_source_image`).
  cache_views > 0 keeps that many resized views (and their subjects' metadata) in
  memory, so that a small dataset is decoded once; 0 reads the files every time."""

  def __init__(self, cache_views: int = 0):
    if cache_views > 0:
      self.meta = functools.lru_cache(maxsize=cache_views)(self.meta)
      self.view = functools.lru_cache(maxsize=cache_views)(self.view)
      self.source = functools.lru_cache(maxsize=cache_views)(self.source)

  def meta(self, subject_dir: pathlib.Path):
    """-> (number of views, K [3, 3], image size, landmarks [views, 68, 2])."""
    K, width, height, landmarks = layout.read_multiview_meta(subject_dir)
    total = landmarks.shape[0]
    layout.check_view_files(subject_dir, total)
    if layout.num_views(subject_dir) != total:
      raise layout.DatasetError(f"{subject_dir}/lmks2d.npy describes {total} views, "
                                f"{subject_dir}/pose holds {layout.num_views(subject_dir)}")
    if width != height:
      raise layout.DatasetError(f"{subject_dir}: images must be square, got {width}x{height}")
    return total, K, width, landmarks

  def _read(self, subject_dir: pathlib.Path, index: int):
    image_size = self.meta(subject_dir)[2]
    rgba, c2w = layout.read_multiview_view(subject_dir, index)
    if rgba.shape[:2] != (image_size, image_size):
      raise layout.DatasetError(f"{subject_dir}/rgba/{layout.view_name(index)}.png is "
                                f"{rgba.shape[1]}x{rgba.shape[0]}, intrinsics say "
                                f"{image_size}x{image_size}")
    return rgba, c2w

  def view(self, subject_dir: pathlib.Path, index: int, size: int):
    """-> (premultiplied RGBA [size, size, 4] (bicubic, not clamped), c2w [4, 4]) of
    view `index`."""
    rgba, c2w = self._read(subject_dir, index)
    return images.resize_bicubic(premultiply(rgba), size), c2w

  def source(self, subject_dir: pathlib.Path, index: int, size: int):
    """-> the model's source image [size, size, 3] from view `index`."""
    return images.prepare_source_image(self._read(subject_dir, index)[0], size)


def load_multiview(subject_dir, rng: np.random.Generator, cfg: PipelineConfig,
                   reader: MultiviewReader | None = None):
  """One training sample from a multi-view subject folder (see module doc); reader:
  where the files come from (default: read every time)."""
  subject_dir = pathlib.Path(subject_dir)
  reader = reader or MultiviewReader()
  total, K, image_size, landmarks = reader.meta(subject_dir)
  if total < cfg.num_views:
    raise layout.DatasetError(f"{subject_dir} has {total} views, need {cfg.num_views}")
  views = [int(v) for v in rng.choice(total, cfg.num_views, replace=False)]
  targets, c2w = zip(*(reader.view(subject_dir, v, cfg.render_size) for v in views))
  background = np.full(3, rng.choice(BACKGROUNDS) if cfg.random_background else 1.0,
                       np.float32)
  target_rgb, target_alpha = render_targets(np.stack(targets), background)
  c2w = np.stack(c2w)
  to_canonical = world_to_canonical(c2w[0])
  c2w = to_canonical @ c2w
  return {
      "source": reader.source(subject_dir, views[0], cfg.source_size),
      "source_camera": source_camera_vector(),
      "target_rgb": target_rgb,
      "target_alpha": target_alpha,
      "viewmats": np.linalg.inv(c2w).astype(np.float32),
      "world_to_canonical": to_canonical.astype(np.float32),
      "Ks": np.broadcast_to(scaled_intrinsics(K, image_size, image_size, cfg.render_size),
                            (cfg.num_views, 3, 3)).copy(),
      "landmarks": (landmarks[views] * (cfg.render_size / image_size)).astype(np.float32),
      "background": background,
  }


def load_monocular(root, uid: str, landmarks: dict, synth_focal: float,
                   cfg: PipelineConfig, rng: np.random.Generator):
  """One sample from a monocular dataset: the image is source (on white) and only
  target (on a background drawn from BACKGROUNDS), seen by the canonical camera with normalised focal `synth_focal`; the
  target alpha is the image's own, and `mask/{uid}.png` the facial mask of the pixel
  and binding losses (resized as the reference does: bicubic of its 0-255 values,
  then > 0.5, so any pixel the mask touches)."""
  root = pathlib.Path(root)
  rgba = layout.read_png(root / "rgba" / f"{uid}.png", 4)
  mask = layout.read_png(root / "mask" / f"{uid}.png", 1)
  height, width = rgba.shape[:2]
  if uid not in landmarks:
    raise layout.DatasetError(f"{root}/lmks.npz has no landmarks for {uid!r}")
  size = cfg.render_size
  K = np.array([[synth_focal * size, 0, size / 2], [0, synth_focal * size, size / 2],
                [0, 0, 1]], np.float32)
  background = np.full(3, rng.choice(BACKGROUNDS) if cfg.random_background else 1.0,
                       np.float32)
  target_rgb, target_alpha = render_targets(
      images.resize_bicubic(premultiply(rgba), size)[None], background)
  return {
      "source": images.prepare_source_image(rgba, cfg.source_size),
      "source_camera": source_camera_vector(),
      "target_rgb": target_rgb,
      "target_alpha": target_alpha,
      "viewmats": np.linalg.inv(CANONICAL_C2W)[None].astype(np.float32),
      "Ks": K[None],
      "face_mask": (images.resize_bicubic(mask * 255.0, size)[None, ..., 0] > 0.5),
      "landmarks": (np.asarray(landmarks[uid], np.float32)
                    * np.array([size / width, size / height], np.float32))[None],
      "background": background,
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


def multiview_loader(root, split: str, cfg: PipelineConfig, cache_views: int = 0):
  """cache_views: resized views kept in memory (see MultiviewReader)."""
  uids = layout.read_split(root, split)
  root = pathlib.Path(root)
  reader = MultiviewReader(cache_views)
  return SkippingLoader(lambda i, rng: load_multiview(root / uids[i], rng, cfg, reader),
                        len(uids))


def monocular_loader(root, split: str, synth_focal: float, cfg: PipelineConfig):
  uids = layout.read_split(root, split, monocular=True)
  path = pathlib.Path(root) / "lmks.npz"
  if not path.is_file():
    raise layout.DatasetError(f"missing landmark file {path}")
  with np.load(path, allow_pickle=False) as data:
    landmarks = {k: data[k] for k in data.files}
  return SkippingLoader(lambda i, rng: load_monocular(root, uids[i], landmarks,
                                                      synth_focal, cfg, rng), len(uids))


def make_dataset(loader: SkippingLoader, batch_size: int, seed: int,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                 batch_fn=make_batch):
  """Batched grain MapDataset (of `batch_fn(samples)`: KaoLRM `Batch`es by default)
  over an endless (or, unshuffled, single) pass.

  Batch `b` of host `process_index` is a pure function of (seed, b): a run resumes
  exactly by slicing `dataset[step:]`. Each host reads a disjoint stride of the
  subjects (per-host sharding for multi-host runs); batch_size is per host.
  """
  indices = grain.MapDataset.range(loader.num_subjects)
  indices = indices[process_index::process_count]
  if shuffle:
    indices = indices.shuffle(seed=seed).repeat()
  dataset = indices.seed(seed).random_map(loader)
  return dataset.batch(batch_size, drop_remainder=True, batch_fn=batch_fn)


def iterate(dataset, start_step: int = 0, num_workers: int = 0):
  """An iterator over batches from `start_step`, with `num_workers` processes."""
  it = dataset[start_step:].to_iter_dataset(grain.ReadOptions(num_threads=2,
                                                              prefetch_buffer_size=2))
  if num_workers > 0:
    # grain's workers read absl flags, unparsed when not started through absl.app
    # (a notebook, a test): use their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it)
