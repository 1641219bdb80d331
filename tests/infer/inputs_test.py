"""Input listing and decoding (kaojax.infer.inputs)."""

import io

import numpy as np
import pytest
from PIL import Image

from kaojax.infer import inputs


def _save(path, array, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)
  return path


def test_list_inputs_folder_glob_file_and_list(tmp_path):
  rgb = np.zeros((4, 4, 3), np.uint8)
  a = _save(tmp_path / "a.png", rgb)
  b = _save(tmp_path / "sub" / "deeper" / "b.JPG", rgb)
  c = _save(tmp_path / "sub" / "c.webp", rgb)
  (tmp_path / "notes.txt").write_text("not an image")
  found = inputs.list_inputs(tmp_path)
  assert found == sorted([a, b, c])
  assert inputs.list_inputs(a) == [a]
  assert inputs.list_inputs(str(tmp_path / "sub" / "**" / "*")) == sorted([b, c])
  listing = tmp_path / "list.txt"
  listing.write_text(f"# photos\n\na.png\n{c}\na.png\n")
  assert inputs.list_inputs(listing) == [a, c]
  with pytest.raises(FileNotFoundError):
    inputs.list_inputs(tmp_path / "missing.png")
  with pytest.raises(ValueError):
    inputs.list_inputs("")


def test_read_image_modes(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (6, 8, 3), np.uint8)
  np.testing.assert_array_equal(inputs.read_image(_save(tmp_path / "rgb.png", rgb)), rgb)
  grey = inputs.read_image(_save(tmp_path / "grey.png", rgb[..., 0]))
  assert grey.shape == (6, 8, 3) and (grey == rgb[..., :1]).all()
  rgba = np.concatenate([rgb, np.full((6, 8, 1), 255, np.uint8)], -1)
  rgba[0, 0, 3] = 0
  rgba[0, 1, 3] = 128
  out = inputs.read_image(_save(tmp_path / "rgba.png", rgba))
  assert out.shape == (6, 8, 3)
  np.testing.assert_array_equal(out[0, 0], [255, 255, 255])        # transparent: white
  np.testing.assert_allclose(out[0, 1], rgb[0, 1].astype(float) * 128 / 255 + 127,
                             atol=1)
  np.testing.assert_array_equal(out[1:], rgb[1:])
  palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=8)
  palette.save(tmp_path / "palette.png")
  assert inputs.read_image(tmp_path / "palette.png").shape == (6, 8, 3)
  deep = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
  deep.save(tmp_path / "deep.png")
  np.testing.assert_array_equal(inputs.read_image(tmp_path / "deep.png")[..., 0], rgb[..., 0])


def test_read_image_exif_orientation(tmp_path):
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, :20] = 255               # left half white
  exif = Image.Exif()
  exif[0x0112] = 6                  # rotate 90 degrees clockwise on display
  path = tmp_path / "rotated.jpg"
  Image.fromarray(image).save(path, exif=exif.tobytes(), quality=95)
  out = inputs.read_image(path)
  assert out.shape == (40, 20, 3)   # portrait after transposition
  assert out[:15].mean() > 200 and out[25:].mean() < 50   # the white half on top


def test_unreadable_files(tmp_path):
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
      buf, "JPEG")
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  text = tmp_path / "text.png"
  text.write_text("this is not a PNG")
  empty = tmp_path / "empty.bmp"
  empty.write_bytes(b"")
  for path in (truncated, text, empty, tmp_path / "missing.jpg"):
    with pytest.raises(inputs.UnreadableImage, match=path.name):
      inputs.read_image(path)
