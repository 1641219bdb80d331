"""Dataset layouts and grain pipelines on small hand-made datasets."""

import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import layout, sources
from data_pipeline.batch import Batch
from kaojax import geometry, images

CFG = sources.PipelineConfig(num_views=3, source_size=20, render_size=16)


def _write_subject(root, uid, seed, views=5, size=32):
  rng = np.random.default_rng(seed)
  az = rng.uniform(200, 340, views)
  el = rng.uniform(-20, 40, views)
  c2w = np.asarray(geometry.orbit_cameras(az, el, 2.0, up="y"))
  rgba = rng.uniform(size=(views, size, size, 4)).astype(np.float32)
  K = np.array([[0.75 * size, 0, size / 2], [0, 0.75 * size, size / 2], [0, 0, 1]])
  lmks = rng.uniform(1, size - 1, (views, 68, 2)).astype(np.float32)
  lmks[1, 3] = -1  # a view without detection
  layout.write_multiview_subject(root, uid, c2w, rgba, K, lmks, gt={"seed": seed})
  return c2w


@pytest.fixture
def multiview_root(tmp_path):
  for i in range(4):
    _write_subject(tmp_path, f"s{i}", i)
  return tmp_path


def test_canonical_camera_is_openlrms_default_source_camera():
  c2w, K = geometry.from_openlrm_camera(sources.source_camera_vector(), 192, 192)
  np.testing.assert_allclose(geometry.triplane_pose_to_flame(c2w), sources.CANONICAL_C2W,
                             atol=1e-6)
  np.testing.assert_allclose(sources.source_camera_vector(),
                             geometry.default_openlrm_source_camera(2.0, 0.75))
  assert K[0, 0] == pytest.approx(0.75 * 192)


def test_pose_normalisation_is_rigid_and_puts_view0_at_canonical():
  c2w = np.asarray(geometry.orbit_cameras(np.array([250., 290., 300.]),
                                          np.array([0., 10., -5.]), 3.0, up="y"))
  out = sources.world_to_canonical(c2w[0]) @ c2w
  np.testing.assert_allclose(out[0], sources.CANONICAL_C2W, atol=1e-5)
  for i in (1, 2):  # relative poses unchanged
    np.testing.assert_allclose(np.linalg.inv(out[0]) @ out[i],
                               np.linalg.inv(c2w[0]) @ c2w[i], atol=1e-5)


def test_multiview_sample(multiview_root):
  loader = sources.multiview_loader(multiview_root, "train", CFG)
  a = loader(1, np.random.default_rng(7))
  b = loader(1, np.random.default_rng(7))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])  # deterministic from the rng
  assert a["source"].shape == (20, 20, 3) and a["target_rgb"].shape == (3, 16, 16, 3)
  assert a["target_alpha"].shape == (3, 16, 16) and a["viewmats"].shape == (3, 4, 4)
  assert a["num_skipped"] == 0
  np.testing.assert_allclose(np.linalg.inv(a["viewmats"][0]), sources.CANONICAL_C2W,
                             atol=1e-5)
  np.testing.assert_allclose(a["Ks"][0], [[12, 0, 8], [0, 12, 8], [0, 0, 1]], atol=1e-6)
  # Landmarks follow the chosen views, scaled 32 -> 16 px; missing stay <= 0.
  lmks = np.load(multiview_root / "s1" / "lmks2d.npy") / 2
  matches = [np.allclose(a["landmarks"][0], lmks[v]) for v in range(5)]
  assert sum(matches) == 1
  # The source view on white equals target view 0 composited on white when the
  # background drawn is white; alpha stays in [0, 1].
  assert np.all((a["target_alpha"] >= 0) & (a["target_alpha"] <= 1))
  assert float(a["background"][0]) in sources.BACKGROUNDS


def test_cached_views_give_the_same_samples_without_rereading(multiview_root):
  plain = sources.multiview_loader(multiview_root, "train", CFG)
  cached = sources.multiview_loader(multiview_root, "train", CFG, cache_views=64)
  first = [cached(i, np.random.default_rng(i)) for i in range(4)]
  for i in range(4):
    expected = plain(i, np.random.default_rng(i))
    for k in expected:
      np.testing.assert_array_equal(first[i][k], expected[k])
  for png in multiview_root.glob("*/rgba/*.png"):
    png.unlink()  # what was read is served from memory
  again = cached(2, np.random.default_rng(2))
  np.testing.assert_array_equal(again["target_rgb"], first[2]["target_rgb"])
  with pytest.raises(layout.DatasetError, match="unreadable subjects"):
    plain(2, np.random.default_rng(2))  # the files are gone


def test_corrupt_subject_is_skipped_and_counted(multiview_root, caplog):
  (multiview_root / "s1" / "rgba" / "002.png").write_bytes(b"not a png")
  (multiview_root / "s1" / "pose" / "004.npy").unlink()
  loader = sources.multiview_loader(multiview_root, "train",
                                    sources.PipelineConfig(num_views=5, source_size=8,
                                                           render_size=8))
  sample = loader(1, np.random.default_rng(0))
  assert sample["num_skipped"] == 1
  assert "s1" in caplog.text


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(layout.DatasetError, match="does not exist"):
    layout.read_split(tmp_path / "nope", "train")
  with pytest.raises(layout.DatasetError, match="no subjects"):
    layout.read_split(tmp_path, "train")
  (tmp_path / "train.json").write_text("{broken")
  with pytest.raises(layout.DatasetError, match="train.json is not valid JSON"):
    layout.read_split(tmp_path, "train")
  np.save(tmp_path / "bad.npy", np.zeros((2, 4)))
  with pytest.raises(layout.DatasetError, match=r"bad.npy has shape \(2, 4\)"):
    layout.read_npy(tmp_path / "bad.npy", (3, 4))


def test_grain_pipeline_batches_resumes_and_shards(multiview_root):
  layout.write_split(multiview_root, "train", ["s0", "s1", "s2", "s3"])
  loader = sources.multiview_loader(multiview_root, "train", CFG)
  dataset = sources.make_dataset(loader, batch_size=2, seed=3)
  it = sources.iterate(dataset)
  batches = [next(it) for _ in range(3)]
  assert isinstance(batches[0], Batch)
  assert batches[0].target_rgb.shape == (2, 3, 16, 16, 3)
  assert batches[0].world_to_canonical.shape == (2, 4, 4)
  assert batches[0].num_skipped.shape == (2,)
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  same(next(sources.iterate(dataset, start_step=2)), batches[2])
  # Worker processes (config.data.num_workers) load the same batches, resumed too.
  it = sources.iterate(dataset, start_step=1, num_workers=2)
  for batch in batches[1:]:
    same(next(it), batch)
  # Two hosts read disjoint subjects.
  seen = []
  for host in range(2):
    host_ds = sources.make_dataset(loader, 1, seed=3, shuffle=False, process_index=host,
                                   process_count=2)
    seen.append({float(next(sources.iterate(host_ds, s)).source.sum())
                 for s in range(2)})
  assert not seen[0] & seen[1]


def test_monocular_sample(tmp_path):
  rng = np.random.default_rng(0)
  for uid in ("a", "b"):
    layout.write_monocular_sample(tmp_path, uid, rng.uniform(size=(24, 24, 4)),
                                  rng.uniform(size=(24, 24)) > 0.5)
  layout.write_monocular_landmarks(tmp_path, {"a": np.full((68, 2), 12.0),
                                              "b": np.full((68, 2), 6.0)})
  loader = sources.monocular_loader(tmp_path, "train", 4.0, CFG)
  sample = loader(1, np.random.default_rng(0))
  np.testing.assert_allclose(sample["landmarks"], np.full((1, 68, 2), 4.0))
  assert sample["Ks"][0, 0, 0] == pytest.approx(4.0 * 16)
  assert json.loads(json.dumps(layout.read_split(tmp_path, "train", monocular=True))) == ["a", "b"]


def test_npy_reads_survive_cpythons_spurious_ast_error(tmp_path, monkeypatch):
  """python/cpython#106905: np.load's header parse can raise a spurious SystemError
  when another thread parses at the same time; read_npy retries it."""
  np.save(tmp_path / "a.npy", np.arange(6.0).reshape(2, 3))
  real_load, failures = np.load, []

  def flaky_load(*args, **kwargs):
    if len(failures) < 2:
      failures.append(1)
      raise SystemError("AST constructor recursion depth mismatch (before=75, after=71)")
    return real_load(*args, **kwargs)

  monkeypatch.setattr(np, "load", flaky_load)
  np.testing.assert_array_equal(layout.read_npy(tmp_path / "a.npy", (2, 3)),
                                np.arange(6.0).reshape(2, 3))
  failures.clear()
  monkeypatch.setattr(layout, "_NPY_ATTEMPTS", 2)
  with pytest.raises(SystemError):
    layout.read_npy(tmp_path / "a.npy")


def _reference_views(rgba_u8, size, background):
  """KaoLRM's reference datasets in torch: uint8 RGBA / 255 composited on `background`
  at the file's size, bicubic interpolate (align_corners=True) to `size`, clamped;
  alpha resized and clamped the same way. rgba_u8 [V, H, W, 4] -> ([V, s, s, 3], [V, s, s])."""
  rgba = torch.from_numpy(rgba_u8).float().permute(0, 3, 1, 2) / 255.0
  alpha = rgba[:, 3:]
  rgb = rgba[:, :3] * alpha + background * (1 - alpha)
  resize = lambda x: torch.clamp(torch.nn.functional.interpolate(
      x, size=(size, size), mode="bicubic", align_corners=True), 0, 1)
  return resize(rgb).permute(0, 2, 3, 1).numpy(), resize(alpha)[:, 0].numpy()


def test_multiview_images_are_prepared_as_the_reference_does(multiview_root):
  cfg = sources.PipelineConfig(num_views=3, source_size=24, render_size=20)
  loader = sources.multiview_loader(multiview_root, "train", cfg)
  seed = 11
  sample = loader(2, np.random.default_rng(seed))
  # The loader's draws: the views, then the background.
  rng = np.random.default_rng(seed)
  views = rng.choice(5, 3, replace=False)
  background = float(rng.choice(sources.BACKGROUNDS))
  files = sorted((multiview_root / "s2" / "rgba").glob("*.png"))
  rgba_u8 = np.stack([np.array(Image.open(files[v])) for v in views])
  rgb, alpha = _reference_views(rgba_u8, 20, background)
  np.testing.assert_allclose(sample["target_rgb"], rgb, atol=2e-6)
  np.testing.assert_allclose(sample["target_alpha"], alpha, atol=2e-6)
  source, _ = _reference_views(rgba_u8[:1], 24, 1.0)
  np.testing.assert_allclose(sample["source"], source[0], atol=2e-6)


def test_monocular_images_are_prepared_as_the_reference_does(tmp_path):
  rng = np.random.default_rng(3)
  layout.write_monocular_sample(tmp_path, "a", rng.uniform(size=(40, 40, 4)),
                                rng.uniform(size=(40, 40)) > 0.5)
  layout.write_monocular_landmarks(tmp_path, {"a": np.full((68, 2), 12.0)})
  seed = 5
  sample = sources.monocular_loader(tmp_path, "train", 4.0, CFG)(0, np.random.default_rng(seed))
  background = float(np.random.default_rng(seed).choice(sources.BACKGROUNDS))
  assert float(sample["background"][0]) == background
  rgba_u8 = np.array(Image.open(tmp_path / "rgba" / "a.png"))[None]
  rgb, alpha = _reference_views(rgba_u8, CFG.render_size, background)
  np.testing.assert_allclose(sample["target_rgb"], rgb, atol=2e-6)
  np.testing.assert_allclose(sample["target_alpha"], alpha, atol=2e-6)
  source, _ = _reference_views(rgba_u8, CFG.source_size, 1.0)
  np.testing.assert_allclose(sample["source"], source[0], atol=2e-6)
  # The facial mask as the reference's monocular dataset makes it: the PNG's raw 0-255
  # values, bicubic-resized, > 0.5.
  mask = torch.from_numpy(np.array(Image.open(tmp_path / "mask" / "a.png"))).float()
  want = torch.nn.functional.interpolate(mask[None, None], size=(16, 16), mode="bicubic",
                                         align_corners=True)[0] > 0.5
  np.testing.assert_array_equal(sample["face_mask"], want.numpy())


def test_premultiplied_resize_is_resize_of_the_composite():
  rgba = np.random.default_rng(1).uniform(size=(2, 64, 64, 4)).astype(np.float32)
  rgb, alpha = sources.composite_premultiplied(
      images.resize_bicubic(sources.premultiply(rgba), 24), 0.5)
  np.testing.assert_allclose(rgb, images.resize_bicubic(images.composite(rgba, 0.5), 24),
                             atol=2e-6)
  np.testing.assert_allclose(alpha, images.resize_bicubic(rgba[..., 3:], 24)[..., 0], atol=2e-6)
