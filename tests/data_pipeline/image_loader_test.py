"""read_png on corrupt headers: a DatasetError naming the file, nothing decoded."""

import struct
import zlib

import numpy as np
import pytest

from data_pipeline import layout


def _with_size(blob, width, height):
  """The PNG with IHDR claiming width x height (and a matching CRC)."""
  data = bytearray(blob)
  assert data[12:16] == b"IHDR"
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


@pytest.mark.parametrize("width,height,message", [
    (40000, 40000, "decompression bomb"),   # PIL's own limit: was a DecompressionBombError
    (1 << 30, 3, "decompression bomb"),
    (9000, 9000, "is 9000 x 9000 pixels"),  # under PIL's limit: refused before decoding
])
def test_png_claiming_a_huge_size_is_refused(tmp_path, width, height, message):
  layout.write_png(tmp_path / "ok.png", np.zeros((4, 4, 4)))
  path = tmp_path / "huge.png"
  path.write_bytes(_with_size((tmp_path / "ok.png").read_bytes(), width, height))
  with pytest.raises(layout.DatasetError, match=rf"huge\.png.*{message}"):
    layout.read_png(path)
  assert layout.read_png(tmp_path / "ok.png").shape == (4, 4, 4)
