"""grain sources for FaceLift training over `data_pipeline.facelift_layout` datasets.

A sample is a dict with the fields of `data_pipeline.view_batch.ViewBatch` (without
the batch axis); `sources.make_dataset(..., batch_fn=make_view_batch)` batches them,
with KaoLRM's guarantees: unreadable subjects are logged with their path and replaced
(`sources.SkippingLoader`), batch b is a pure function of (seed, b) (exact resume),
each host reads its own stride of the subjects.

  GS-LRM:     `num_views` frames drawn at random from all of a subject's frames (the
              first `num_input` of them are the inputs, all are targets), on white.
  diffusion:  FaceLift's six fixed views (frames 0-5, checked by name) on a background
              drawn from BACKGROUNDS (the reference's "three choices") or white.
"""

import pathlib

import numpy as np

from data_pipeline import facelift_layout, layout, sources
from kaojax import images
from kaojax.geometry.cameras import FACELIFT_VIEWS

BACKGROUNDS = {"white": ((1.0, 1.0, 1.0),),
               "three_choices": ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.5, 0.5, 0.5))}


def load_views(subject_dir, indices, size: int, background, cameras=None):
  """Frames `indices` of a subject -> sample dict: images [V, size, size, 3] on
  `background` [3] (bicubic resize of the premultiplied RGBA when the files' size
  differs, clamped), c2w [V, 4, 4], Ks [V, 3, 3] at `size`."""
  c2w, K, sizes, files, _ = cameras or facelift_layout.read_cameras(subject_dir)
  background = np.asarray(background, np.float32)
  views, Ks = [], []
  for i in indices:
    width, height = (int(x) for x in sizes[i])
    if width != height:
      raise layout.DatasetError(f"{subject_dir}: frame {i} is not square ({width}x{height})")
    rgba = facelift_layout.read_image(subject_dir, files[i], width, height)
    premultiplied = sources.premultiply(rgba)
    if width != size:
      premultiplied = images.resize_bicubic(premultiplied, size)
    views.append(sources.render_targets(premultiplied, background)[0])
    Ks.append(sources.scaled_intrinsics(K[i], width, height, size))
  return {"images": np.stack(views).astype(np.float32), "c2w": c2w[list(indices)],
          "Ks": np.stack(Ks), "background": background}


def _draw_background(rng, kind: str):
  if kind not in BACKGROUNDS:
    raise ValueError(f"background must be one of {sorted(BACKGROUNDS)}, got {kind!r}")
  choices = BACKGROUNDS[kind]
  return np.asarray(choices[rng.integers(len(choices))] if len(choices) > 1 else choices[0],
                    np.float32)


def load_random_views(subject_dir, rng: np.random.Generator, size: int, num_views: int,
                      background: str = "white"):
  """GS-LRM sample: `num_views` distinct frames in random order."""
  cameras = facelift_layout.read_cameras(subject_dir)
  total = len(cameras[0])
  if total < num_views:
    raise layout.DatasetError(f"{subject_dir} has {total} frames, need {num_views}")
  indices = [int(i) for i in rng.choice(total, num_views, replace=False)]
  return load_views(subject_dir, indices, size, _draw_background(rng, background), cameras)


def load_fixed_views(subject_dir, rng: np.random.Generator, size: int,
                     background: str = "three_choices"):
  """Diffusion sample: the six fixed views (front first)."""
  cameras = facelift_layout.read_cameras(subject_dir)
  names = cameras[4][:len(FACELIFT_VIEWS)]
  if tuple(names) != FACELIFT_VIEWS:
    raise layout.DatasetError(f"{subject_dir}: frames 0-5 must be FaceLift's views "
                              f"{FACELIFT_VIEWS}, got {names}")
  return load_views(subject_dir, range(len(FACELIFT_VIEWS)), size,
                    _draw_background(rng, background), cameras)


def gslrm_loader(root, split: str, size: int, num_views: int, background: str = "white"):
  uids = facelift_layout.read_split(root, split)
  root = pathlib.Path(root)
  return sources.SkippingLoader(
      lambda i, rng: load_random_views(root / uids[i], rng, size, num_views, background),
      len(uids))


def mvdiff_loader(root, split: str, size: int, background: str = "three_choices"):
  uids = facelift_layout.read_split(root, split)
  root = pathlib.Path(root)
  return sources.SkippingLoader(
      lambda i, rng: load_fixed_views(root / uids[i], rng, size, background), len(uids))
