"""Measuring a multi-view dataset's face framing (kaojax.infer.framing) on views in the
dataset layout made from a real photo at known framings."""

import json

import numpy as np
import skimage.data

from data_pipeline import layout
from kaojax.infer import crops, detect, framing


def test_measure_recovers_the_framing_of_the_views(tmp_path, capsys):
  photo = skimage.data.astronaut()
  boxes, scores, _ = detect.detect_faces(photo)
  box = boxes[0]
  truth = crops.Framing(0.42, (0.5, 0.56))
  jitter = [(0.0, 0.0, 0.0), (0.02, 0.01, -0.01), (-0.02, -0.01, 0.01)]
  for s, (ds, dx, dy) in enumerate(jitter):
    views = []
    for flip in (False, True):
      f = crops.Framing(truth.face_size + ds, (truth.center[0] + dx, truth.center[1] + dy))
      rgb = crops.warp(photo, crops.framing_transform(box, 160, f), 160)
      views.append(np.dstack([rgb[:, ::-1] if flip else rgb, np.full((160, 160), 255, np.uint8)]))
    if s == 0:   # a view with no face: transparent (white once composited)
      views.append(np.zeros((160, 160, 4), np.uint8))
    layout.write_multiview_subject(tmp_path, f"s{s}", np.tile(np.eye(4), (len(views), 1, 1)),
                                   np.stack(views), np.eye(3), np.zeros((len(views), 68, 2)))
  paths = framing.view_paths(tmp_path)
  assert len(paths) == 7
  result = framing.main(["--data", str(tmp_path)])
  assert result["views"] == 7 and result["faces"] == 6
  # MTCNN's boxes move by a pixel or two with the resampling: about 1% of the side.
  assert abs(result["face_size"] - truth.face_size) < 0.015
  np.testing.assert_allclose(result["center"], truth.center, atol=0.015)
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["config"].startswith("--config.multiview_framing=0.4")
  parsed = crops.Framing.parse(printed["config"].split("=")[1])
  assert abs(parsed.face_size - result["face_size"]) < 1e-4
