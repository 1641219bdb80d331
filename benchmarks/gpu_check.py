"""The project's first run on a lent GPU, as one time-boxed script.

    python benchmarks/gpu_check.py [--wheels .whl] [--out DIR] [--commit SHA]
                                   [--budget 540] [--steps a,b,...]
    python benchmarks/gpu_check.py --cpu-dry-run [--out DIR]      # the same, tiny, on a CPU
    python benchmarks/gpu_check.py --merge DIR [DIR ...] --out DIR  # join two runs' steps
    python benchmarks/gpu_check.py --download-wheels .whl          # here, before a GPU run

On a machine with an NVIDIA GPU it
  setup         installs the carried wheels (--wheels DIR: `pip install --no-index
                --find-links DIR --no-deps --target`, nothing from a registry), reads the
                GPU's compute capability (nvidia-smi, else JAX) and builds the native CPU
                and CUDA libraries for it in place (setup.py, KAOJAX_CUDA_ARCHS), starts
                gsplat's CUDA build in the background (measured at the end if it is ready);
then runs, in order, each step in its own process under its own timeout:
  cuda_parity   tests/render/native_test.py on the GPU (the CPU-platform cases left out);
                passed / failed / skipped from pytest's junit XML
  render        surfel renderer at 8,000 surfels, 192x192, 16 views: forward and
                forward+backward, native vs the pure-JAX reference (benchmarks/render.py)
  kaolrm_train  KaoLRM base training step (stage II), 16 subjects x 4 views, 192 px,
                8,000 surfels, bf16 (benchmarks/train.py's measure()): step time,
                examples/s, peak memory, MFU vs the chip's bf16 peak
  kaolrm_infer  KaoLRM base forward (bf16), images/s at batch 1 and 64
  facelift      FaceLift at the released sizes with random weights (bf16 UNet/VAE/CLIP):
                one guided UNet step at 512 px (6 views x [uncond; cond]), and seconds
                per image for the whole pipeline (50 DDIM steps, GS-LRM, PLY export)
  gsplat        gsplat's rasterization_2dgs vs ours on the same scene
                (benchmarks/render_gpu.py), if its background build finished in time
and, only when named in --steps (the default budget has no room for it):
  facelift_train  FaceLift's two training steps at the released sizes, bf16, remat
                (benchmarks/facelift_train.py's measure()): GS-LRM at 512 px, 2 subjects
                x 8 views; the multi-view UNet (with VAE and CLIP conditions), 1 subject
                x 6 views: step time, examples/s, XLA's buffer plan, MFU
Each step writes step_<name>.json into the output folder (--out, default $OUT) as it
goes, so a step that times out keeps what it measured, and after every step the
merged result gpu_<date>_<commit>.json is rewritten there (and, on a GPU, into
benchmarks/results/). A step that fails or times out is recorded with its error and
the run goes on. At most 8 files are written to the output folder (the lent machine
returns no more): a step JSON per step (six at most: name no more than six steps),
the merged JSON (setup's record inside it) and gpu_check.log.

--cpu-dry-run runs the same steps end to end on a CPU at toy sizes (tiny presets, a few
hundred surfels, 32 px images, 2 DDIM steps), with no wheel install and no CUDA build,
in about a minute or two; tests/benchmarks_gpu_check_test.py runs it so this script
cannot rot.
"""

import argparse
import datetime
import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
SCHEMA = "kaojax-gpu-check/1"

STEPS = ("cuda_parity", "render", "kaolrm_train", "kaolrm_infer", "facelift", "gsplat",
         "facelift_train")
DEFAULT_STEPS = STEPS[:6]      # six step JSONs + merged JSON + log: the 8 files returned
# Seconds each step may take on the GPU (the --budget cuts later steps shorter).
GPU_TIMEOUTS = {"setup": 240, "cuda_parity": 150, "render": 120, "kaolrm_train": 200,
                "kaolrm_infer": 120, "facelift": 240, "gsplat": 90, "facelift_train": 300}
DRY_TIMEOUTS = {"setup": 60, "cuda_parity": 90, "render": 60, "kaolrm_train": 120,
                "kaolrm_infer": 60, "facelift": 90, "gsplat": 30, "facelift_train": 120}
MIN_STEP_S = 15          # a step is not started with less than this left of the budget
MERGE_RESERVE_S = 10

# Packages the lent machine's image lacks (or holds at other versions) that the checks
# import; `--download-wheels` fetches exactly these for its Python 3.12 on x86-64.
CARRY = ("flax==0.12.12", "optax==0.2.8", "orbax-checkpoint==0.12.8", "grain==0.2.18",
         "array-record==0.8.3", "portpicker==1.6.0", "ml-collections==1.1.0",
         "plyfile==1.1.5", "tensorboardX==2.6.5", "gsplat==1.5.3")
MANYLINUX = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

# Sizes: the on a GPU, toys for --cpu-dry-run.
GPU_SIZES = dict(
    surfels=8000, render_size=192, views=16, render_repeats=5,
    train_preset="base", train_batch=16, train_repeats=3, dtype="bfloat16",
    infer_preset="base", infer_batches=(1, 64), infer_repeats=5,
    facelift_presets="facelift", facelift_size=512, facelift_steps=50, facelift_views=6,
    unet_repeats=5, parity_select="not cpu",
    train_facelift_preset="facelift", train_facelift_size=512,
    train_facelift_batch={"gslrm": 2, "mvdiff": 1}, train_facelift_remat=True)
DRY_SIZES = dict(
    surfels=300, render_size=32, views=2, render_repeats=1,
    train_preset="tiny", train_batch=2, train_repeats=1, dtype="bfloat16",
    infer_preset="tiny", infer_batches=(1, 2), infer_repeats=1,
    facelift_presets="tiny", facelift_size=32, facelift_steps=2, facelift_views=6,
    unet_repeats=1, parity_select="cuda",
    train_facelift_preset="tiny", train_facelift_size=None,
    train_facelift_batch={"gslrm": None, "mvdiff": None}, train_facelift_remat=True)


# ----------------------------------------------------------------------------
# Small helpers (no JAX: the orchestrating process never imports it).


def _now():
  return datetime.datetime.now(datetime.timezone.utc)


def _write_json(path, data):
  """Atomic write: a kill mid-write leaves the previous file."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
  os.replace(tmp, path)


def _read_json(path):
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError):
    return None


def _tail(text, n=3000):
  text = text or ""
  return text if len(text) <= n else "..." + text[-n:]


def _run(cmd, timeout, env=None, cwd=REPO, log=None):
  """subprocess.run in its own process group, killed whole at the timeout. Returns
  (returncode or None on timeout, combined output, seconds)."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=max(1, timeout))
    code = proc.returncode
  except subprocess.TimeoutExpired:
    _kill_group(proc)
    out, _ = proc.communicate()
    code = None
  seconds = time.perf_counter() - start
  if log is not None:
    log.write(f"\n$ {' '.join(map(str, cmd))}  ({seconds:.1f} s, "
              f"{'timed out' if code is None else f'rc {code}'})\n{out}")
    log.flush()
  return code, out or "", seconds


def _kill_group(proc):
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _commit(given):
  if given:
    return given
  try:
    sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, text=True,
                         capture_output=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=REPO, text=True, capture_output=True, timeout=10).stdout.strip()
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def _nvidia_smi():
  """name, compute capability, memory, driver of the first GPU, or None."""
  if not shutil.which("nvidia-smi"):
    return None
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,"
                          "driver_version", "--format=csv,noheader"], text=True,
                         capture_output=True, timeout=30).stdout.strip().splitlines()
  except (OSError, subprocess.SubprocessError):
    return None
  if not out:
    return None
  fields = [f.strip() for f in out[0].split(",")]
  if len(fields) < 4:
    return {"raw": out[0]}
  return {"name": fields[0], "compute_capability": fields[1], "memory": fields[2],
          "driver": fields[3], "count": len(out)}


# ----------------------------------------------------------------------------
# Setup (in the orchestrating process, each command time-boxed).


def setup(args, env, log, deadline):
  """Install carried wheels, pick the CUDA architecture, build the native libraries,
  start gsplat's build. Returns (record, gsplat background process or None)."""
  rec = {"status": "ok", "started": _now().isoformat()}
  start = time.perf_counter()
  left = lambda: max(1, deadline - time.perf_counter())
  if args.cpu_dry_run:
    rec["wheels"] = {"skipped": "--cpu-dry-run: no wheel install"}
  elif args.wheels:
    wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
    site = os.path.join(args.scratch, "site")
    if not wheels:
      rec["wheels"] = {"error": f"no .whl files in {args.wheels}"}
    else:
      code, out, secs = _run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                              "--find-links", args.wheels, "--no-deps", "--no-compile",
                              "--no-cache-dir", "--upgrade", "--target", site, *wheels],
                             min(120, left()), env, log=log)
      rec["wheels"] = {"installed": [os.path.basename(w) for w in wheels], "target": site,
                       "seconds": round(secs, 1)}
      if code != 0:
        rec["wheels"]["error"] = _tail(out, 1500) if code is not None else "timed out"
        rec["status"] = "error"
      else:
        env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")])
  else:
    rec["wheels"] = {"skipped": "no --wheels folder given"}

  smi = _nvidia_smi()
  rec["nvidia_smi"] = smi or {"skipped": "nvidia-smi not found"}
  archs = args.cuda_archs
  if not archs and smi and smi.get("compute_capability"):
    archs = smi["compute_capability"].replace(".", "")
  if args.cpu_dry_run:
    rec["native_build"] = {"skipped": "--cpu-dry-run: the installed libraries are used"}
  else:
    if not archs:
      archs = _jax_compute_capability(env, min(60, left()), log)
    rec["cuda_archs"] = archs
    rec["native_build"] = _build_native(args, env, archs or "80;90", left, log)
    if "error" in rec["native_build"]:
      rec["status"] = "error"

  code, out, _ = _run([sys.executable, "-c", _PROBE], min(90, left()), env, log=log)
  probe = _last_json(out)
  rec["probe"] = probe if probe else {"error": _tail(out, 2000) or f"rc {code}"}

  gsplat = None
  if args.cpu_dry_run or args.no_gsplat:
    rec["gsplat_build"] = {"skipped": "--cpu-dry-run" if args.cpu_dry_run else "--no-gsplat"}
  else:
    gsplat = _start_gsplat_build(args, env, archs)
    rec["gsplat_build"] = {"started": gsplat is not None}
  rec["seconds"] = round(time.perf_counter() - start, 1)
  return rec, gsplat


NATIVE = REPO / "kaojax" / "render" / "native"
BUILD_STAMP = REPO / "build" / "kaojax_gpu_check_native.json"


def _build_native(args, env, archs, left, log):
  """The CPU and CUDA libraries in place (setup.py build_ext --inplace), unless a
  previous call on this machine built them from the same sources for `archs`."""
  libs = lambda: sorted(glob.glob(str(NATIVE / "_kaojax_render_*.so")))
  sources = [*glob.glob(str(NATIVE / "csrc" / "*")), str(REPO / "setup.py")]
  stamp = _read_json(BUILD_STAMP) or {}
  built = libs()
  if (not args.rebuild and stamp.get("archs") == archs and len(built) == 2
      and min(os.path.getmtime(p) for p in built) > max(os.path.getmtime(p) for p in sources)):
    return {"skipped": "up to date (built by an earlier call on this machine)", "archs": archs,
            "libraries": [os.path.basename(p) for p in built]}
  code, out, secs = _run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                         min(GPU_TIMEOUTS["setup"], left()),
                         dict(env, KAOJAX_CUDA_ARCHS=archs), log=log)
  rec = {"seconds": round(secs, 1), "archs": archs,
         "libraries": [os.path.basename(p) for p in libs()]}
  if code != 0:
    rec["error"] = "timed out" if code is None else _tail(out, 2000)
  else:
    BUILD_STAMP.parent.mkdir(exist_ok=True)
    _write_json(BUILD_STAMP, {"archs": archs})
  return rec


_PROBE = """
import json, sys, jax
import kaojax.render.native as native
d = jax.devices()[0]
info = {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
        "compute_capability": getattr(d, "compute_capability", None),
        "jax": jax.__version__, "python": sys.version.split()[0],
        "native_loaded": sorted(native.loaded), "native_load_errors": native.load_errors}
import importlib.metadata as md
versions = {}
for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "torch", "gsplat"):
  try:
    versions[name] = md.version(name)
  except md.PackageNotFoundError:
    versions[name] = None
info["versions"] = versions
print(json.dumps(info))
"""


def _jax_compute_capability(env, timeout, log):
  code, out, _ = _run([sys.executable, "-c", "import jax; d = jax.devices()[0]; "
                       "print(getattr(d, 'compute_capability', ''))"], timeout, env, log=log)
  cc = out.strip().splitlines()[-1] if code == 0 and out.strip() else ""
  return cc.replace(".", "") if cc and cc[0].isdigit() else ""


def _start_gsplat_build(args, env, archs):
  """gsplat JIT-compiles its CUDA extension on first use (minutes): start it now, in
  the background, and measure against it at the end if it finished."""
  arch = ((archs or "90").split(";")[-1].strip().rstrip("a") or "90")   # "90" -> "9.0"
  cc = f"{arch[:-1]}.{arch[-1]}"
  build_env = dict(env, TORCH_CUDA_ARCH_LIST=cc, MAX_JOBS=str(args.gsplat_jobs))
  build_env.pop("CUDA_HOME", None) if build_env.get("CUDA_HOME") == "/nonexistent" else None
  log = open(os.path.join(args.scratch, "gsplat_build.log"), "w")
  try:
    proc = subprocess.Popen([sys.executable, "-c", "from gsplat.cuda._backend import _C; "
                             "assert _C is not None, 'gsplat: no CUDA extension'; print('ok')"],
                            cwd=args.scratch, env=build_env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
  except OSError:
    return None
  proc.started = time.perf_counter()
  proc.log_path = log.name
  return proc


def _gsplat_status(proc):
  """'ready', or why not."""
  if proc is None:
    return "gsplat's build was not started (no gsplat, or --no-gsplat)"
  code = proc.poll()
  waited = time.perf_counter() - proc.started
  if code is None:
    return f"gsplat's CUDA build still running after {waited:.0f} s; not measured"
  if code != 0:
    try:
      tail = _tail(pathlib.Path(proc.log_path).read_text(), 800)
    except OSError:
      tail = ""
    return f"gsplat's CUDA build failed (rc {code}): {tail}"
  return "ready"


def _last_json(text):
  for line in reversed((text or "").strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except ValueError:
        continue
  return None


# ----------------------------------------------------------------------------
# Steps (each in its own process: python gpu_check.py --step NAME).


class StepWriter:
  """step_<name>.json in the output folder, rewritten as results come in."""

  def __init__(self, out, name, dry):
    self.path = pathlib.Path(out) / f"step_{name}.json"
    self.data = {"step": name, "status": "running", "dry_run": dry}

  def update(self, **values):
    self.data.update(values)
    _write_json(self.path, self.data)


def _sizes(args):
  return DRY_SIZES if args.cpu_dry_run else GPU_SIZES


def _device_info():
  import jax
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "jax": jax.__version__}


def step_cuda_parity(args, w):
  s = _sizes(args)
  junit = os.path.join(args.scratch, "cuda_parity_junit.xml")
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/render/native_test.py", "-k", s["parity_select"], f"--junitxml={junit}"]
  w.update(command=" ".join(cmd[1:]))
  env = dict(os.environ)
  env.pop("CUDA_HOME", None) if env.get("CUDA_HOME") == "/nonexistent" else None
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  counts = _junit_counts(junit)
  if counts is None:
    raise RuntimeError(f"pytest wrote no junit XML (rc {proc.returncode}): "
                       f"{_tail(proc.stdout + proc.stderr, 2000)}")
  w.update(**counts, pytest_returncode=proc.returncode,
           pytest_summary=_tail(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip()
                                else "", 300))
  if counts["failed"] or counts["errors"]:
    w.update(output_tail=_tail(proc.stdout, 4000))


def _junit_counts(path):
  try:
    root = ElementTree.parse(path).getroot()
  except (OSError, ElementTree.ParseError):
    return None
  counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
  failures, cuda_cases = [], {"passed": 0, "failed": 0, "skipped": 0}
  for case in root.iter("testcase"):
    name = case.get("name", "")
    if case.find("failure") is not None:
      kind = "failed"
      failures.append(name)
    elif case.find("error") is not None:
      kind = "errors"
      failures.append(name)
    elif case.find("skipped") is not None:
      kind = "skipped"
    else:
      kind = "passed"
    counts[kind] += 1
    if "cuda" in name and kind in cuda_cases:
      cuda_cases[kind] += 1
  return {**counts, "failures": failures[:40], "cases_named_cuda": cuda_cases}


def step_render(args, w):
  import jax
  import jax.numpy as jnp
  from render import _measure, head_scene   # benchmarks/render.py
  s = _sizes(args)
  num, size, views = s["surfels"], s["render_size"], s["views"]
  w.update(surfels=num, image_size=size, views=views,
           units="ms per call for all views (best of repeats, compile excluded)",
           loss="weighted sum of colour, alpha, depth and normal", **_device_info())
  _, _, gaussians, viewmats, Ks, weights = head_scene(num, size, views)
  background = jnp.zeros(3)
  from kaojax.render import rasterize_surfels
  fwd_ms, fwd_bwd_ms, extra = {}, {}, {}
  configs = {"native": dict(backend="native"), "reference": dict(block_size=16,
                                                                 backend="reference")}
  for name, cfg in configs.items():
    cfg = dict(tile_size=16, **cfg)

    def forward(g, cfg=cfg):
      return rasterize_surfels(g, viewmats, Ks, size, size, background, **cfg)

    def loss(g, cfg=cfg):
      out = forward(g)
      return sum(jnp.sum(weights[k] * out[k]) for k in weights)

    res, _ = _measure(f"surfels {name}", forward, loss, (gaussians,), s["render_repeats"])
    fwd_ms[name] = round(1e3 * res["fwd_s"], 3)
    fwd_bwd_ms[name] = round(1e3 * res["fwd_bwd_s"], 3)
    extra[name] = {k: res[k] for k in ("compile_s", "fwd_mib", "fwd_bwd_mib",
                                       "device_peak_mib", "overflow", "max_tile_count")}
    w.update(surfel_fwd_ms=fwd_ms, surfel_fwd_bwd_ms=fwd_bwd_ms, details=extra)
  w.update(native_over_reference_fwd_bwd=round(fwd_bwd_ms["reference"] / fwd_bwd_ms["native"],
                                               2),
           native_backend_platforms=_native_platforms(), jax_backend=jax.default_backend())


def _native_platforms():
  from kaojax.render import native
  return sorted(native.loaded)


def step_gsplat(args, w):
  s = _sizes(args)
  status = os.environ.get("KAOJAX_GSPLAT_STATUS", "not started")
  if status != "ready":
    w.update(status="skipped", skipped=status)
    return
  from render_gpu import _gsplat, _kaojax   # benchmarks/render_gpu.py
  from render import head_scene
  from kaojax.render import rasterize_surfels
  num, size, views = s["surfels"], s["render_size"], s["views"]
  w.update(surfels=num, image_size=size, views=views, loss="weighted sum of colour and alpha",
           units="ms per call for all views", **_device_info())
  _, _, gaussians, viewmats, Ks, weights = head_scene(num, size, views)
  ours = _kaojax(rasterize_surfels, gaussians, viewmats, Ks, size, weights, s["render_repeats"])
  w.update(kaojax_fwd_ms=1e3 * ours[0], kaojax_fwd_bwd_ms=1e3 * ours[1])
  theirs = _gsplat("surfel", gaussians, viewmats, Ks, size, weights, s["render_repeats"])
  w.update(gsplat_fwd_ms=1e3 * theirs[0], gsplat_fwd_bwd_ms=1e3 * theirs[1],
           gsplat_over_kaojax_fwd_bwd=theirs[1] / ours[1],
           gsplat_peak_mib=theirs[2] / 2 ** 20)


def step_kaolrm_train(args, w):
  import train as train_bench   # benchmarks/train.py
  s = _sizes(args)
  config = train_bench.run_config(s["train_preset"])
  w.update(preset=s["train_preset"], batch=s["train_batch"], views=config.data.num_views,
           render_size=config.data.render_size, source_size=config.data.source_size,
           surfels=config.model.num_samples, dtype=s["dtype"], stage=2,
           attention_chunk=512, **_device_info())
  result = train_bench.measure(s["train_preset"], s["train_repeats"], batch_size=s["train_batch"],
                               dtype=s["dtype"], stages=(2,), network=False)
  w.update(step_s=result["stage2_step_s"], examples_per_s=result["stage2_examples_per_s"],
           peak_gib=round(train_bench.peak_memory_gib(), 3),
           peak_memory_kind=("device peak bytes in use" if _on_gpu()
                             else "process peak resident memory (CPU)"),
           gflop_per_step=result.get("stage2_model_gflop_per_step"),
           tflops_achieved=(result["stage2_gflops_achieved"] / 1e3
                            if "stage2_gflops_achieved" in result else None),
           mfu=result.get("stage2_mfu"), peak_tflops=result.get("peak_tflops"),
           mfu_note=(None if result.get("stage2_mfu") is not None else
                     "no listed peak for this device (benchmarks/timing.PEAK_FLOPS)"))


def _on_gpu():
  import jax
  return jax.default_backend() == "gpu"


def step_kaolrm_infer(args, w):
  import dataclasses
  import jax
  import numpy as np
  from flax import nnx
  from model import _random_params   # benchmarks/model.py
  from timing import best_time, peak_flops
  from kaojax.flame.synthetic import make_synthetic_flame
  from kaojax.geometry.cameras import default_openlrm_source_camera
  from kaojax.models.kaolrm import KaoLRM, kaolrm_config
  from kaojax.models.lrm import with_runtime_options
  s = _sizes(args)
  cfg = kaolrm_config(s["infer_preset"])
  cfg = dataclasses.replace(cfg, lrm=with_runtime_options(cfg.lrm, dtype=s["dtype"]))
  size = cfg.lrm.encoder.image_size
  w.update(preset=s["infer_preset"], dtype=s["dtype"], image_size=size,
           units="images/s (forward: image + camera -> FLAME mesh + Gaussians, no render)",
           **_device_info())
  model = _random_params(KaoLRM.abstract(cfg, make_synthetic_flame(seed=0)), 1)
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, x, c, k: nnx.merge(graphdef, p)(x, c, k))
  key = jax.random.key(0)
  rng = np.random.default_rng(0)
  images_per_s, ms_per_batch, mfu = {}, {}, {}
  peak = peak_flops(s["dtype"]) if _on_gpu() else None
  for batch in s["infer_batches"]:
    images = rng.uniform(size=(batch, size, size, 3)).astype(np.float32)
    cameras = np.stack([np.asarray(default_openlrm_source_camera())] * batch).astype(np.float32)
    compiled = forward.lower(params, images, cameras, key).compile()
    seconds = best_time(lambda: jax.block_until_ready(compiled(params, images, cameras, key)),
                        s["infer_repeats"])
    images_per_s[f"batch_{batch}"] = batch / seconds
    ms_per_batch[f"batch_{batch}"] = 1e3 * seconds
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))
    if flops and peak:
      mfu[f"batch_{batch}"] = flops / seconds / peak
    w.update(images_per_s=images_per_s, ms_per_batch=ms_per_batch, mfu=mfu or None)


def _fast_random_init(build, seed=0, pool_size=1 << 22):
  """Like kaojax.infer.facelift.random_init (kernels N(0, 1/fan_in), norm scales 1,
  biases 0.1 N(0, 1), the rest 0.02 N(0, 1)) but drawing from one pool of float32
  normals: the released FaceLift networks hold ~2e9 values, whose float64 draws alone
  take a minute. Timing does not depend on the values."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  model = nnx.eval_shape(build)
  rng = np.random.default_rng(seed)
  pool = rng.standard_normal(pool_size, dtype=np.float32)
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    shape, name = var.get_value().shape, str(path[-1])
    n = int(np.prod(shape))
    if name == "scale":
      value = np.ones(shape, np.float32)
    else:
      m = min(n, pool_size)
      start = int(rng.integers(0, pool_size - m + 1))
      value = np.resize(pool[start:start + m], n).reshape(shape)
      if name == "kernel":
        value = value / np.float32(np.sqrt(max(1, int(np.prod(shape[:-1])))))
      elif name == "bias":
        value = np.float32(0.1) * value
      else:
        value = np.float32(0.02) * value
    var.set_value(jnp.asarray(value, jnp.float32))
  nnx.update(model, state)
  return model


def step_facelift(args, w):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from timing import best_time
  from kaojax.infer import facelift as fl
  from kaojax.models.gslrm import GSLRM, gslrm_config
  from kaojax.models.mvdiffusion.clip import CLIPVisionEncoder, clip_vision_config
  from kaojax.models.mvdiffusion.scheduler import DDIM, SchedulerConfig
  from kaojax.models.mvdiffusion.unet import UNet, unet_config
  from kaojax.models.mvdiffusion.vae import VAE, vae_config
  s = _sizes(args)
  preset, size, steps, views = (s["facelift_presets"], s["facelift_size"], s["facelift_steps"],
                                s["facelift_views"])
  dtype = s["dtype"]
  w.update(presets=preset, image_size=size, ddim_steps=steps, views=views,
           unet_batch=2 * views, unet_batch_note="views x [uncond; cond] (CFG)",
           dtype=f"{dtype} UNet/VAE/CLIP, float32 GS-LRM and rendering",
           weights="random, at the preset's sizes", **_device_info())
  start = time.perf_counter()
  unet_cfg = unet_config(preset, num_views=views, dtype=dtype, attention_chunk=1024)
  clip_cfg = clip_vision_config(preset, dtype=dtype)
  models = fl.FaceLiftModels(
      unet=_fast_random_init(lambda: UNet(unet_cfg, nnx.Rngs(0)), 0),
      vae=_fast_random_init(lambda: VAE(vae_config(preset, dtype=dtype), nnx.Rngs(0)), 1),
      clip=_fast_random_init(lambda: CLIPVisionEncoder(clip_cfg, nnx.Rngs(0)), 2),
      gslrm=_fast_random_init(lambda: GSLRM(gslrm_config(preset), nnx.Rngs(0)), 3),
      text_embeddings=jax.random.normal(jax.random.key(1),
                                        (views, 77, unet_cfg.cross_attention_dim)),
      normalizer_mean=jnp.zeros(clip_cfg.projection_dim),
      normalizer_std=jnp.ones(clip_cfg.projection_dim))
  w.update(init_s=time.perf_counter() - start)

  # One guided DDIM step of the UNet: the pipeline's own jitted step.
  f = models.vae.cfg.block_out_channels
  latent = size // (2 ** (len(f) - 1))
  rng = np.random.default_rng(0)
  lat = jnp.asarray(rng.normal(size=(views, latent, latent, 4)), jnp.float32)
  labels = jnp.asarray(rng.normal(size=(views, unet_cfg.projection_class_embeddings_input_dim)),
                       jnp.float32)
  scheduler = SchedulerConfig()
  t = jnp.int32(DDIM(scheduler).timesteps(steps)[0])

  def unet_step():
    return jax.block_until_ready(fl._denoise_step(
        models.unet, lat, t, lat, labels, models.text_embeddings, lat, num_steps=steps,
        eta=1.0, guidance_scale=3.0, scheduler=scheduler))
  compile_start = time.perf_counter()
  unet_step()
  w.update(unet_latent=latent, unet_compile_s=time.perf_counter() - compile_start)
  w.update(unet_step_s=best_time(unet_step, s["unet_repeats"]))

  # The whole pipeline, twice: the first run compiles, the second is the figure.
  cfg = fl.FaceLiftConfig(image_size=size, num_views=views, num_steps=steps, scheduler=scheduler)
  image = np.clip(rng.uniform(0.2, 0.9, size=(size, size, 3)), 0, 1).astype(np.float32)
  out_dir = os.path.join(args.scratch, "facelift_out")
  runs = []
  for _ in range(2):
    run_start = time.perf_counter()
    try:
      result = fl.run(models, image, out_dir, cfg, render_outputs=False)
      jax.block_until_ready(result["gaussians"].xyz)
      note = None
    except ValueError as e:   # random weights may give non-finite views or Gaussians
      if "non-finite" not in str(e):
        raise
      note = f"{e} (time up to that check; PLY export not run)"
    runs.append(time.perf_counter() - run_start)
    w.update(pipeline_runs_s=runs, nonfinite_note=note)
  w.update(seconds_per_image=runs[-1], first_run_s_with_compile=runs[0],
           pipeline="input checks, CLIP + VAE conditioning, "
                    f"{steps} guided DDIM steps, VAE decode, GS-LRM, post-filter, PNG + PLY "
                    "export (no turntable rendering)")


def step_facelift_train(args, w):
  import facelift_train   # benchmarks/facelift_train.py
  s = _sizes(args)
  w.update(preset=s["train_facelift_preset"], dtype=s["dtype"],
           remat=s["train_facelift_remat"], **_device_info())
  for name in ("gslrm", "mvdiff"):
    result = facelift_train.measure(
        name, s["train_facelift_preset"], s["train_repeats"], s["train_facelift_size"],
        s["train_facelift_batch"][name], s["dtype"], s["train_facelift_remat"])
    w.update(**{name: result})


STEP_FUNCTIONS = {"cuda_parity": step_cuda_parity, "render": step_render,
                  "kaolrm_train": step_kaolrm_train, "kaolrm_infer": step_kaolrm_infer,
                  "facelift": step_facelift, "gsplat": step_gsplat,
                  "facelift_train": step_facelift_train}


def run_step(args):
  """Child process: one step, its JSON written as it goes; any exception recorded."""
  sys.path[:0] = [str(HERE), str(REPO)]
  w = StepWriter(args.out, args.step, args.cpu_dry_run)
  w.update(started=_now().isoformat())
  start = time.perf_counter()
  try:
    if args.step in (args.fail_step or "").split(","):
      raise RuntimeError(f"failure injected by --fail-step {args.step}")
    STEP_FUNCTIONS[args.step](args, w)
  except Exception as e:  # pylint: disable=broad-except  (recorded, the run goes on)
    w.update(status="error", error=f"{type(e).__name__}: {e}"[:2000],
             traceback=_tail(traceback.format_exc(), 3000),
             seconds=round(time.perf_counter() - start, 1))
    traceback.print_exc()
    return 1
  if w.data.get("status") == "running":
    w.data["status"] = "ok"
  w.update(seconds=round(time.perf_counter() - start, 1))
  return 0


# ----------------------------------------------------------------------------
# Merge: one JSON object with the headline figures.


def _headline(name, step):
  """(key, value) pairs of the merged JSON for one step record."""
  status = step.get("status")
  problem = None
  if status in ("error", "timeout"):
    problem = {"error": step.get("error", status)}
  elif status == "skipped":
    problem = {"skipped": step.get("skipped", "skipped")}
  elif status == "not run":
    problem = {"skipped": step.get("skipped", "not run")}
  if name == "cuda_parity":
    if "passed" in step:
      value = {k: step.get(k) for k in ("passed", "failed", "skipped", "errors",
                                        "failures", "cases_named_cuda", "command")}
      if problem:
        value.update(problem)
      return {"cuda_parity": value}
    return {"cuda_parity": problem or {"error": "no counts"}}
  if name == "render":
    fb = step.get("surfel_fwd_bwd_ms")
    if fb:
      common = {k: step.get(k) for k in ("surfels", "image_size", "views", "units", "loss")}
      out = {"surfel_fwd_bwd_ms": {"native": fb.get("native"), "reference": fb.get("reference"),
                                   **common},
             "surfel_fwd_ms": {**step.get("surfel_fwd_ms", {}), **common}}
      if problem:
        out["surfel_fwd_bwd_ms"].update(problem)
      return out
    return {"surfel_fwd_bwd_ms": problem or {"error": "no figures"}}
  if name == "kaolrm_train":
    if "step_s" in step:
      value = {k: step.get(k) for k in ("step_s", "examples_per_s", "mfu", "peak_gib",
                                        "peak_memory_kind", "tflops_achieved", "peak_tflops",
                                        "gflop_per_step", "preset", "batch", "views",
                                        "render_size", "surfels", "dtype", "stage",
                                        "mfu_note")}
      value["units"] = {"step_s": "s per training step", "examples_per_s": "subjects/s",
                        "peak_gib": "GiB", "mfu": "fraction of the dtype's dense peak"}
      if problem:
        value.update(problem)
      return {"kaolrm_train": value}
    return {"kaolrm_train": problem or {"error": "no figures"}}
  if name == "kaolrm_infer":
    if step.get("images_per_s"):
      value = {**step["images_per_s"], "units": "images/s", "preset": step.get("preset"),
               "dtype": step.get("dtype"), "image_size": step.get("image_size"),
               "mfu": step.get("mfu")}
      if problem:
        value.update(problem)
      return {"kaolrm_infer_images_per_s": value}
    return {"kaolrm_infer_images_per_s": problem or {"error": "no figures"}}
  if name == "facelift":
    details = {k: step.get(k) for k in ("unet_step_s", "unet_batch", "unet_latent", "image_size",
                                        "views", "ddim_steps", "presets", "dtype",
                                        "first_run_s_with_compile", "nonfinite_note", "pipeline")}
    out = {"facelift": {**details, **(problem or {})}}
    if "seconds_per_image" in step:
      out["facelift_seconds_per_image"] = step["seconds_per_image"]
    else:
      out["facelift_seconds_per_image"] = problem or {"error": "no figure"}
    return out
  if name == "facelift_train":
    if "gslrm" in step or "mvdiff" in step:
      value = {k: step.get(k) for k in ("gslrm", "mvdiff", "preset", "dtype", "remat")}
      value["units"] = {"step_s": "s per training step", "examples_per_s": "subjects/s",
                        "gradient_s": "s, the loss's forward+backward alone (the peer)",
                        "xla_plan_gib": "GiB (XLA's buffer plan)",
                        "peak_memory_gib": "GiB (device peak in use, this process so far)",
                        "mfu": "fraction of the dtype's dense peak"}
      if problem:
        value.update(problem)
      return {"facelift_train": value}
    return {"facelift_train": problem or {"error": "no figures"}}
  if name == "gsplat":
    if "gsplat_fwd_bwd_ms" in step:
      return {"surfel_vs_gsplat": {k: step.get(k) for k in (
          "kaojax_fwd_ms", "kaojax_fwd_bwd_ms", "gsplat_fwd_ms", "gsplat_fwd_bwd_ms",
          "gsplat_over_kaojax_fwd_bwd", "loss", "units")}}
    return {"surfel_vs_gsplat": problem or {"error": "no figures"}}
  return {}


def merge(steps, meta):
  """The one JSON object: meta (device, commit, ...), per-step status, headlines."""
  result = {"schema": SCHEMA, **meta}
  probe = (steps.get("setup") or {}).get("probe") or {}
  device = {k: probe.get(k) for k in ("platform", "device_kind", "device_count",
                                      "compute_capability") if probe.get(k) is not None}
  smi = (steps.get("setup") or {}).get("nvidia_smi")
  if isinstance(smi, dict) and "name" in smi:
    device["nvidia_smi"] = smi
  if not device:
    for step in steps.values():
      if isinstance(step, dict) and step.get("device_kind"):
        device = {"platform": step.get("platform"), "device_kind": step["device_kind"]}
        break
  result["device"] = device or {"error": "no step reported a device"}
  result["versions"] = {"python": probe.get("python"), "jax": probe.get("jax"),
                        **(probe.get("versions") or {})}
  result["native_libraries_loaded"] = probe.get("native_loaded")
  if steps.get("setup"):
    result["setup"] = {k: v for k, v in steps["setup"].items() if k != "probe"}
  result["steps"] = {name: {k: step.get(k) for k in ("status", "seconds", "timeout_s", "error",
                                                      "skipped")
                            if isinstance(step.get(k), (str, int, float))
                            and not (k == "skipped" and not isinstance(step.get(k), str))}
                     for name, step in steps.items()}
  for name in STEPS:
    if name in steps:
      result.update(_headline(name, steps[name]))
  fb = result.get("surfel_fwd_bwd_ms")
  if isinstance(fb, dict) and "native" in fb:
    vs = result.get("surfel_vs_gsplat", {})
    fb["gsplat"] = vs.get("gsplat_fwd_bwd_ms")
    if fb["gsplat"] is None:
      fb["gsplat_skipped"] = vs.get("skipped") or vs.get("error") or "gsplat step not run"
  return result


def _probe_of(result):
  """The setup probe's fields back from a merged result (for --merge)."""
  device = result.get("device") or {}
  versions = dict(result.get("versions") or {})
  return {**{k: device.get(k) for k in ("platform", "device_kind", "device_count",
                                       "compute_capability")},
          "python": versions.pop("python", None), "jax": versions.pop("jax", None),
          "versions": versions, "native_loaded": result.get("native_libraries_loaded")}


def _result_name(meta):
  return f"gpu_{meta['date'][:10]}_{meta['commit']}.json"


# ----------------------------------------------------------------------------
# The orchestrator.


def orchestrate(args):
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  args.scratch = args.scratch or tempfile.mkdtemp(prefix="kaojax_gpu_check_")
  os.makedirs(args.scratch, exist_ok=True)
  t0 = time.perf_counter()
  deadline = t0 + args.budget
  timeouts = dict(DRY_TIMEOUTS if args.cpu_dry_run else GPU_TIMEOUTS)
  for item in args.step_timeout:
    name, _, value = item.partition("=")
    timeouts[name] = float(value)
  selected = [s for s in (args.steps.split(",") if args.steps else DEFAULT_STEPS) if s]
  unknown = [s for s in selected if s not in STEPS]
  if unknown:
    raise SystemExit(f"unknown steps {unknown}; known: {', '.join(STEPS)}")
  if len(selected) > len(DEFAULT_STEPS):
    raise SystemExit(f"at most {len(DEFAULT_STEPS)} steps per call: the lent machine "
                     "returns 8 files (a JSON per step, the merged JSON and the log)")

  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
  env["PYTHONUNBUFFERED"] = "1"
  if env.get("CUDA_HOME") == "/nonexistent":   # set by the test suite's conftest
    env.pop("CUDA_HOME")
  if not args.cpu_dry_run:
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.scratch, "xla_cache"))
  meta = {"date": _now().isoformat(timespec="seconds"), "commit": _commit(args.commit),
          "dry_run": bool(args.cpu_dry_run), "budget_s": args.budget,
          "sizes": dict(DRY_SIZES if args.cpu_dry_run else GPU_SIZES)}
  name = _result_name(meta)
  results_dir = args.results_dir or (None if args.cpu_dry_run else str(HERE / "results"))
  log = open(out / "gpu_check.log", "a")
  log.write(f"# benchmarks/gpu_check.py {' '.join(sys.argv[1:])}  ({meta['date']})\n")
  steps = {}

  def save():
    result = merge(steps, dict(meta, elapsed_s=round(time.perf_counter() - t0, 1)))
    _write_json(out / name, result)
    if results_dir:
      os.makedirs(results_dir, exist_ok=True)
      _write_json(pathlib.Path(results_dir) / name, result)
    return result

  print(f"gpu_check: {'CPU dry run' if args.cpu_dry_run else 'GPU run'}, budget "
        f"{args.budget:.0f} s, output {out}", flush=True)
  rec, gsplat = setup(args, env, log, min(deadline, t0 + timeouts["setup"]))
  steps["setup"] = rec
  print(f"gpu_check: setup {rec['status']} in {rec['seconds']} s: "
        f"{json.dumps(rec.get('probe'))[:300]}", flush=True)
  save()

  for step in selected:
    left = deadline - time.perf_counter() - MERGE_RESERVE_S
    timeout = min(timeouts[step], left)
    if step == "gsplat":
      env["KAOJAX_GSPLAT_STATUS"] = (_gsplat_status(gsplat) if not args.cpu_dry_run
                                     else "--cpu-dry-run: gsplat needs CUDA")
    if left < MIN_STEP_S:
      steps[step] = {"status": "not run", "skipped": f"the --budget of {args.budget:.0f} s "
                     f"was spent ({left:.0f} s left)"}
      save()
      continue
    path = out / f"step_{step}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "gpu_check.py"), "--step", step, "--out", str(out),
           "--scratch", args.scratch]
    if args.cpu_dry_run:
      cmd.append("--cpu-dry-run")
    if args.fail_step:
      cmd += ["--fail-step", args.fail_step]
    code, output, seconds = _run(cmd, timeout, env, log=log)
    rec = _read_json(path) or {"step": step}
    rec["seconds"] = round(seconds, 1)
    rec["timeout_s"] = round(timeout, 1)
    if code is None:
      rec["status"] = "timeout"
      rec["error"] = (f"timed out after {timeout:.0f} s (figures measured before are kept); "
                      f"output: {_tail(output, 600)}")
    elif code != 0 and rec.get("status") != "error":
      rec["status"] = "error"
      rec["error"] = f"exit code {code}: {_tail(output, 1500)}"
    elif rec.get("status") == "running":
      rec["status"] = "error"
      rec["error"] = "the step ended without finishing its record"
    _write_json(path, rec)
    steps[step] = rec
    print(f"gpu_check: {step} {rec['status']} in {seconds:.1f} s"
          + (f": {rec.get('error') or rec.get('skipped')}"[:400]
             if rec["status"] != "ok" else ""), flush=True)
    save()

  if gsplat is not None and gsplat.poll() is None and not args.keep_gsplat_build:
    _kill_group(gsplat)
  result = save()
  log.close()
  print(json.dumps(result))
  return 0


def merge_folders(args):
  """Join the step JSONs of several runs' output folders (e.g. two `run` calls that
  split the steps): for each step, an 'ok' record wins over others, later folders over
  earlier ones."""
  steps, meta = {}, None
  for folder in args.merge:
    for path in sorted(glob.glob(os.path.join(folder, "step_*.json"))):
      rec = _read_json(path)
      if not rec:
        continue
      name = pathlib.Path(path).stem[len("step_"):]
      if name not in steps or rec.get("status") == "ok" or steps[name].get("status") != "ok":
        steps[name] = rec
    for path in sorted(glob.glob(os.path.join(folder, "gpu_*.json"))):
      prev = _read_json(path) or {}
      meta = meta or {k: prev[k] for k in ("date", "commit", "dry_run", "budget_s", "sizes")
                      if k in prev}
      if "setup" not in steps and prev.get("setup"):
        steps["setup"] = dict(prev["setup"], probe=_probe_of(prev))
  meta = meta or {"date": _now().isoformat(timespec="seconds"), "commit": _commit(args.commit)}
  if args.commit:
    meta["commit"] = args.commit
  meta["merged_from"] = list(args.merge)
  result = merge(steps, meta)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  _write_json(out / _result_name(meta), result)
  print(json.dumps(result))
  return 0


def download_wheels(folder):
  """Here (with network): the wheels `--wheels` installs there, for CPython 3.12 on
  x86-64 manylinux (the lent machine's), without their dependencies (the image has
  them)."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp", "-d", folder]
  for platform in MANYLINUX:
    cmd += ["--platform", platform]
  print(" ".join(cmd + list(CARRY)), flush=True)
  return subprocess.call(cmd + list(CARRY))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.environ.get("OUT") or None,
                      help="output folder (default: $OUT, else /tmp/kaojax_gpu_check_out)")
  parser.add_argument("--wheels", help="folder of carried wheels to install first")
  parser.add_argument("--commit", help="commit to record (default: git rev-parse HEAD)")
  parser.add_argument("--budget", type=float, default=None,
                      help="seconds for the whole run (default 540 on a GPU, 300 dry)")
  parser.add_argument("--steps", default="", help=f"comma list of {','.join(STEPS)}")
  parser.add_argument("--step-timeout", action="append", default=[], metavar="STEP=SECONDS",
                      help="override one step's timeout (setup too)")
  parser.add_argument("--cpu-dry-run", action="store_true",
                      help="tiny sizes on the CPU: no wheels, no CUDA build, no gsplat")
  parser.add_argument("--cuda-archs", default="", help="KAOJAX_CUDA_ARCHS (default: the GPU's)")
  parser.add_argument("--no-gsplat", action="store_true", help="do not build/measure gsplat")
  parser.add_argument("--keep-gsplat-build", action="store_true",
                      help="leave gsplat's background build running at the end (its own "
                           "process session: a later call on the same machine finds it done)")
  parser.add_argument("--rebuild", action="store_true",
                      help="build the native libraries even if an earlier call built them")
  parser.add_argument("--gsplat-jobs", type=int, default=8,
                      help="parallel compiler jobs of gsplat's background build")
  parser.add_argument("--results-dir", default=None,
                      help="also write the merged JSON here (default: benchmarks/results on "
                           "a GPU run, nowhere else in a dry run)")
  parser.add_argument("--merge", nargs="+", metavar="DIR",
                      help="merge the step JSONs of these output folders into --out")
  parser.add_argument("--download-wheels", metavar="DIR",
                      help="download the wheels to carry into DIR (here, with network)")
  parser.add_argument("--fail-step", default="", help=argparse.SUPPRESS)   # tests
  parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)      # child process
  parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.download_wheels:
    return download_wheels(args.download_wheels)
  args.out = args.out or os.path.join(tempfile.gettempdir(), "kaojax_gpu_check_out")
  if args.step:
    args.scratch = args.scratch or tempfile.mkdtemp(prefix="kaojax_gpu_check_")
    return run_step(args)
  if args.merge:
    return merge_folders(args)
  if args.budget is None:
    args.budget = 300.0 if args.cpu_dry_run else 540.0
  return orchestrate(args)


if __name__ == "__main__":
  sys.exit(main())
