"""Measure how a multi-view dataset frames its faces, for the `multiview` crop.

    python -m kaojax.infer.framing --data=ROOT [--split=train] [--max_views=2000]

KaoLRM's multi-view model sees its training renders' framing (a head at a fixed
distance in a square view). Real photos must be cropped the same way, so this runs
MTCNN (`kaojax.infer.detect`, FaceLift's settings) over the source views of a dataset
in the multi-view layout (`data_pipeline.layout`: root/{uid}/rgba/{NNN}.png,
composited on white as the loader does), keeps the largest face with probability >
0.8 of each view where one is found (profiles and backs of heads find none), and
reports the median `kaojax.infer.crops.Framing`: the box's mean side and its centre
as fractions of the view's side. FaceLift measured its crop the same way on its
data; `configs/infer_kaolrm.py --config.multiview_framing=face_size,cx,cy` takes the
printed value. The last line printed is one JSON object.
"""

import argparse
import json
import pathlib
import sys

import numpy as np
from tqdm import tqdm

from data_pipeline import layout
from kaojax.images import composite
from kaojax.infer import crops, detect

FACE_THRESHOLD = 0.8


def view_paths(root, split: str = "train", max_views: int = 0) -> list:
  """The rgba view files of the split's subjects, sorted (at most max_views, spread
  evenly over the list when it is longer)."""
  root = pathlib.Path(root)
  paths = []
  for uid in layout.read_split(root, split):
    paths.extend(sorted((root / uid / "rgba").glob("*.png")))
  if max_views and len(paths) > max_views:
    paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_views).astype(int)]
  return paths


def view_framing(image: np.ndarray, detector) -> "crops.Framing | None":
  """The framing of the largest confident face of a uint8 view [H, W, 3], or None."""
  boxes, scores, _ = detector.detect(image)
  keep = [i for i in range(len(scores)) if scores[i] > FACE_THRESHOLD]
  if not keep:
    return None
  box = max((boxes[i] for i in keep), key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
  h, w = image.shape[:2]
  side = np.mean([box[2] - box[0], box[3] - box[1]]) / np.mean([w, h])
  return crops.Framing(float(side), (float((box[0] + box[2]) / 2 / w),
                                     float((box[1] + box[3]) / 2 / h)))


def measure(paths, detector=None, progress: bool = True) -> dict:
  """Median framing over the views (module doc) -> {face_size, center, spread (the
  interquartile ranges), views, faces}. Raises ValueError when no view has a face."""
  detector = detector or detect.default_detector()
  found = []
  for path in tqdm(paths, desc="framing", unit="view", disable=not progress):
    rgba = layout.read_png(path, 4)
    rgb = composite(rgba, 1.0)
    framing = view_framing((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), detector)
    if framing is not None:
      found.append((framing.face_size, *framing.center))
  if not found:
    raise ValueError(f"no face with probability > {FACE_THRESHOLD} in {len(paths)} views")
  values = np.asarray(found)
  median = np.median(values, 0)
  q75, q25 = np.percentile(values, [75, 25], axis=0)
  return {"face_size": float(median[0]), "center": [float(median[1]), float(median[2])],
          "spread": [float(v) for v in q75 - q25], "views": len(paths), "faces": len(found)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="multi-view dataset root")
  parser.add_argument("--split", default="train")
  parser.add_argument("--max_views", type=int, default=2000,
                      help="views measured at most (spread over the split); 0: all")
  args = parser.parse_args(argv)
  result = measure(view_paths(args.data, args.split, args.max_views))
  spec = "{:.4f},{:.4f},{:.4f}".format(result["face_size"], *result["center"])
  result["config"] = f"--config.multiview_framing={spec}"
  print(f"{result['faces']} of {result['views']} views have a face; "
        f"pass {result['config']}", file=sys.stderr)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
