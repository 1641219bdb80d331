"""The NoW evaluation job (`eval_now`): predictions -> scan-to-mesh errors -> tables.

    python run.py --config=configs/eval_now.py:tiny --workdir=OUT
    python run.py --config=configs/eval_now.py --config.now_root=NOW \
        --config.infer.model=MODEL_DIR --workdir=OUT
    python run.py --config=configs/eval_now.py --config.now_root=NOW \
        --config.predictions=PRED --workdir=OUT

The benchmark: `now_root` (NoW's final_release_version/ folder: image list, scans,
scans_lmks_onlypp, iphone_pictures) or, without one, a synthetic NoW-style benchmark
written into OUT/benchmark (`kaojax.evaluate.synthetic_now`). The predictions:
`predictions` (NoW's submission layout: SUBJECT/CHALLENGE/NAME.obj + NAME.npy) or,
without one, the KaoLRM inference job (`kaojax.infer.kaolrm`, config `infer`) run on
the list's images into OUT/inference, its mesh_neutral.obj and lmk7.npy copied into
that layout in OUT/predictions (params.npz beside them as NAME_params.npz).

Per image, `kaojax.evaluate.now.score_prediction` (subjects in parallel over `workers`
threads; a subject's scan is read once); an image whose scan, landmarks or
prediction is missing, whose mesh has not `num_vertices` vertices, or whose scoring
fails (unreadable file, landmarks not [7, 3], an empty crop), is listed under `skipped`
with the reason and not scored. With a FLAME model for the check (`flame_path`;
"synthetic", or empty with a synthetic benchmark: the built-in stand-in), meshes that are not neutral
(`kaojax.evaluate.neutral`) are listed under `not_neutral` (still scored).

Writes into OUT:
  now_results.json   per challenge and `overall`: median, mean, std (mm), images,
                     points; plus skipped, not_neutral, per-image numbers, the settings
                     and the command
  now_results.md     the table, with the published NoW validation rows beside ours
  now_curve.json     the cumulative error curves (0-8 mm), per challenge and overall
  now_curve.png      the same as a plot
  now_errors.npz     the errors of every scored image (key: its image-list line)
"""

import concurrent.futures
import json
import pathlib
import shutil
import sys
import time

import numpy as np
from absl import logging

from kaojax.evaluate import now
from kaojax.evaluate.neutral import NeutralCheck
from kaojax.evaluate.plots import plot_cumulative

# The KaoLRM paper's NoW validation rows (mm), printed there as overall "mean / median"
# (its mean is below its median, as printed; see ../shared/spec/flame.md section 4).
PUBLISHED = {"DECA": (1.24, 1.56), "EMOCA": (1.21, 1.49), "SMIRK": (1.02, 1.25),
             "MICA": (0.96, 1.19), "KaoLRM (paper)": (0.99, 1.23)}


def _benchmark(config, workdir):
  """(NoW root, whether it is synthetic)."""
  if config.now_root:
    return pathlib.Path(config.now_root), False
  from kaojax.evaluate.synthetic_now import write_synthetic_now  # pylint: disable=import-outside-toplevel
  root = workdir / "benchmark"
  if not (root / "imagepathsvalidation.txt").is_file():
    write_synthetic_now(root, num_subjects=config.synthetic.num_subjects,
                        images_per_challenge=config.synthetic.images_per_challenge,
                        seed=config.seed, image_size=config.synthetic.image_size)
  return root, True


def _infer(config, workdir, root, lines):
  """Runs the inference job on the images of `lines`; returns the predictions folder
  in NoW's submission layout."""
  from kaojax.infer import kaolrm, runner  # pylint: disable=import-outside-toplevel
  images = [(root / config.images_folder / line).resolve() for line in lines]
  infer_dir = workdir / "inference"
  infer_dir.mkdir(parents=True, exist_ok=True)
  listing = infer_dir / "inputs.txt"
  listing.write_text("\n".join(str(p) for p in images if p.is_file()) + "\n")
  infer_config = config.infer.copy_and_resolve_references()
  with infer_config.unlocked():
    infer_config.input = str(listing)
  kaolrm.run(infer_config, infer_dir)
  rows = runner.read_results(*runner.results_files(infer_dir))
  predictions = workdir / "predictions"
  for line, image in zip(lines, images):
    row = rows.get(str(image))
    if not row or row.get("status") != "ok" or not row.get("outputs"):
      continue
    source = infer_dir / row["outputs"][0]
    subject, challenge, filename = line.split("/")[-3:]
    stem = filename.rsplit(".", 1)[0]
    target = predictions / subject / challenge
    target.mkdir(parents=True, exist_ok=True)
    for name, new in (("mesh_neutral.obj", f"{stem}.obj"), ("lmk7.npy", f"{stem}.npy"),
                      ("params.npz", f"{stem}_params.npz")):
      if (source / name).is_file():
        shutil.copyfile(source / name, target / new)
  return predictions


def _neutral_check(config, synthetic):
  if not config.check_neutral:
    return None
  if config.flame_path and config.flame_path != "synthetic":
    from kaojax.flame.io import load_flame  # pylint: disable=import-outside-toplevel
    return NeutralCheck(load_flame(config.flame_path), config.neutral_threshold_mm)
  if synthetic or config.flame_path == "synthetic":
    from kaojax.flame.synthetic import make_synthetic_flame  # pylint: disable=import-outside-toplevel
    return NeutralCheck(make_synthetic_flame(), config.neutral_threshold_mm)
  return None


def _score_subject(config, items, num_vertices, neutral):
  """One subject's items (they share a scan) -> [(item, skip reason or '', row,
  errors)]."""
  outcomes, scan = [], None
  for item in items:
    start = time.perf_counter()
    reason = now.missing_reason(item)
    if not reason:
      vertices, faces = now.read_mesh(item.mesh)
      reason = now.missing_reason(item, vertices, num_vertices)
    if reason:
      outcomes.append((item, reason, None, None))
      continue
    row = {"image": item.line, "challenge": item.challenge}
    if neutral is not None and len(vertices) == neutral.num_vertices:
      row["neutral_check"] = neutral(vertices)
    try:
      if scan is None:
        scan = now.read_mesh(item.scan)[0]
      score = now.score_prediction(
          scan, now.read_pp(item.scan_landmarks)[:7], vertices, faces,
          now.read_landmarks(item.landmarks), metrical=config.metrical, unit=config.unit,
          refine=config.refine, iterations=config.iterations)
    except (ValueError, OSError) as e:
      outcomes.append((item, f"error: {type(e).__name__}: {e}", None, None))
      continue
    row.update({"median": float(np.median(score.errors)), "mean": float(np.mean(score.errors)),
                "points": len(score.errors), "scale": score.scale,
                "seconds": round(time.perf_counter() - start, 3)})
    logging.info("NoW %s: median %.3f mean %.3f mm (%d points, %.1f s)", item.line,
                 row["median"], row["mean"], row["points"], row["seconds"])
    outcomes.append((item, "", row, score.errors))
  return outcomes


def score_folder(config, root, predictions, lines, neutral=None):
  """Scores every item, the subjects in parallel over `config.workers` threads;
  returns (errors {challenge: {line: errors}}, per-image rows, skipped rows,
  not-neutral rows), in the image list's order."""
  num_vertices = config.num_vertices
  if num_vertices < 0:
    if neutral is None:
      raise ValueError("num_vertices=-1 needs a model for the neutral check (flame_path)")
    num_vertices = neutral.num_vertices
  items = now.now_items(root, predictions, lines, config.challenge)
  subjects = {}
  for item in items:
    subjects.setdefault(item.subject, []).append(item)
  score = lambda group: _score_subject(config, group, num_vertices, neutral)
  with concurrent.futures.ThreadPoolExecutor(max(1, config.workers)) as pool:
    outcomes = {id(o[0]): o for group in pool.map(score, subjects.values()) for o in group}
  errors = {c: {} for c in now.CHALLENGES}
  per_image, skipped, not_neutral = [], [], []
  for item in items:
    _, reason, row, item_errors = outcomes[id(item)]
    if reason:
      logging.warning("NoW: skipped %s: %s", item.line, reason)
      skipped.append({"image": item.line, "reason": reason})
      continue
    check = row.get("neutral_check")
    if check and check["flagged"]:
      logging.warning("NoW: %s is not neutral (%s)", item.line, check)
      not_neutral.append({"image": item.line, **check})
    errors.setdefault(item.challenge, {})[item.line] = item_errors
    per_image.append(row)
  return errors, per_image, skipped, not_neutral


def markdown_table(stats: dict, command: str, metrical: bool) -> str:
  """The results as a Markdown table, the published rows beside ours."""
  names = [c for c in now.CHALLENGES if stats.get(c, {}).get("images")] + ["overall"]
  fmt = lambda x: "-" if x != x else f"{x:.3f}"
  lines = [f"## NoW{' (metrical)' if metrical else ''}: scan-to-mesh error (mm)", "",
           "| method | subset | images | median | mean | std |", "|---|---|---|---|---|---|"]
  for name in names:
    s = stats[name]
    lines.append(f"| kaojax (this run) | {name} | {s['images']} | {fmt(s['median'])} | "
                 f"{fmt(s['mean'])} | {fmt(s['std'])} |")
  lines += ["", "Published NoW validation rows (KaoLRM paper, overall, printed there as "
            "mean / median):", "", "| method | mean | median |", "|---|---|---|"]
  lines += [f"| {name} | {a:.2f} | {b:.2f} |" for name, (a, b) in PUBLISHED.items()]
  lines += ["", f"Command: `{command}`", ""]
  return "\n".join(lines)


def run(config, workdir) -> dict:
  """The job (module doc); returns the statistics (also in now_results.json)."""
  workdir = pathlib.Path(workdir)
  started = time.perf_counter()
  root, synthetic = _benchmark(config, workdir)
  lines = now.image_list(root, config.image_set, config.image_list)
  if config.max_images:
    lines = lines[:config.max_images]
  predictions = (pathlib.Path(config.predictions) if config.predictions
                 else _infer(config, workdir, root, lines))
  neutral = _neutral_check(config, synthetic)
  errors, per_image, skipped, not_neutral = score_folder(
      config, root, predictions, lines, neutral)
  arrays = {c: list(v.values()) for c, v in errors.items()}
  stats = now.summarize(arrays)
  command = " ".join(["python"] + sys.argv) if sys.argv and sys.argv[0].endswith(
      "run.py") else f"kaojax.evaluate.now_job.run(config, {str(workdir)!r})"
  results = {name: stats[name] for name in list(arrays) + ["overall"]}
  results.update({
      "unit": "mm", "metrical": bool(config.metrical), "benchmark": str(root),
      "synthetic": synthetic, "predictions": str(predictions), "skipped": skipped,
      "not_neutral": not_neutral,
      "neutral_check": ("off (no FLAME model: set flame_path)" if neutral is None else
                        config.flame_path or "synthetic"),
      "per_image": per_image, "command": command,
      "seconds": round(time.perf_counter() - started, 1)})
  (workdir / "now_results.json").write_text(json.dumps(results, indent=1))
  (workdir / "now_results.md").write_text(markdown_table(stats, command, config.metrical))
  curves = {}
  for name in [c for c in arrays if arrays[c]] + ["overall"]:
    pooled = np.concatenate(arrays[name]) if name != "overall" else np.concatenate(
        [e for a in arrays.values() for e in a] or [np.zeros(0)])
    curves[name] = now.cumulative_curve(pooled)
  (workdir / "now_curve.json").write_text(json.dumps(
      {"x_mm": curves["overall"][0].tolist(),
       "percentage": {k: np.round(v[1], 4).tolist() for k, v in curves.items()}}))
  plot_cumulative(workdir / "now_curve.png", curves, title="NoW cumulative error")
  np.savez_compressed(workdir / "now_errors.npz",
                      **{line: e for v in errors.values() for line, e in v.items()})
  logging.info("NoW: overall median %.3f mean %.3f std %.3f mm over %d images (%d skipped)",
               stats["overall"]["median"], stats["overall"]["mean"], stats["overall"]["std"],
               stats["overall"]["images"], len(skipped))
  return results
