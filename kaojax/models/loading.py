"""kaojax's own model directories: what training, evaluation and inference load.

`kaojax.convert` turns foreign checkpoints (PyTorch, safetensors, diffusers) into
these directories once; everything at run time loads them here.

Layout of a model directory written by `save_model`:
  kaojax_model.json   {"format": 1, "kind": "openlrm" | "kaolrm", "config": {...}}
                      (the model's config dataclass as nested dicts)
  params/             Orbax StandardCheckpointer tree = nnx.state(model, nnx.Param)
                      as a pure dict (nnx paths, float arrays)
  flame.npz           (KaoLRM only, when the model holds one) the FLAME model's
                      arrays, field by field; its two static fields go in
                      kaojax_model.json ("flame_static").

`load_model(directory)` rebuilds the network abstractly from the JSON config (no
random initialisation of weights about to be overwritten), restores the parameters
and returns the model. Execution options that do not change the parameters
(attention kernel, rematerialisation, compute dtype) can be changed at load time.

A training run's work directory (`kaojax.train.loop`) loads the same way: the run
writes its network's kaojax_model.json and flame.npz into WORKDIR/model_spec/ when it
starts (`write_model_spec`), and `load_model(WORKDIR)` rebuilds the network from them
and restores the model parameters (not the optimiser state) of the latest complete
Orbax TrainState checkpoint in WORKDIR/checkpoints/ (`load_training_model` for
another step).

The FaceLift networks (kinds "gslrm", "unet", "vae": `save_network` / `load_network`,
written by `python -m kaojax.convert.gslrm` / `kaojax.convert.diffusers`) and the
LPIPS-VGG network (kind "lpips-vgg": `save_lpips` / `load_lpips`, written by
`python -m kaojax.convert.vgg`, its config the VGG block widths) use the same layout
without flame.npz.
"""

import dataclasses
import json
import os
import pathlib
from typing import Optional, Union

import jax
import numpy as np
from flax import nnx

PathLike = Union[str, os.PathLike]
META_FILE = "kaojax_model.json"
PARAMS_DIR = "params"
FLAME_FILE = "flame.npz"
SPEC_DIR = "model_spec"            # in a training work directory
CHECKPOINTS_DIR = "checkpoints"    # in a training work directory
FORMAT = 1
LPIPS_KIND = "lpips-vgg"


def config_to_dict(cfg) -> dict:
  """A (nested) config dataclass -> JSON-ready dict."""
  return dataclasses.asdict(cfg)


def config_from_dict(cls, data: dict, source: str = "config"):
  """Inverse of `config_to_dict` for dataclass `cls`: nested dataclass fields are
  rebuilt from their default's type, lists become tuples; unknown keys are an error
  naming `source`."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise ValueError(f"{source}: unknown {cls.__name__} fields {unknown}")
  values = {}
  for name, value in data.items():
    default = fields[name].default
    if dataclasses.is_dataclass(default):
      value = config_from_dict(type(default), value, f"{source}.{name}")
    elif isinstance(value, list):
      value = tuple(value)
    values[name] = value
  return cls(**values)


def _output_directory(directory: PathLike, overwrite: bool) -> pathlib.Path:
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and any(directory.iterdir()) and not overwrite:
    raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True)")
  return directory


def write_directory(directory: PathLike, model, meta: dict,
                    overwrite: bool = False) -> pathlib.Path:
  """Parameters of `model` (Orbax) and `meta` (JSON) into `directory`."""
  import orbax.checkpoint as ocp
  directory = _output_directory(directory, overwrite)
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                    force=overwrite)
  checkpointer.wait_until_finished()
  (directory / META_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=1))
  return directory


def _model_kind(model) -> str:
  from kaojax.models.kaolrm import KaoLRM
  from kaojax.models.lrm import OpenLRM
  if isinstance(model, KaoLRM):
    return "kaolrm"
  if isinstance(model, OpenLRM):
    return "openlrm"
  raise TypeError(f"save_model: cannot save a {type(model).__name__} (OpenLRM or KaoLRM)")


def _flame_arrays(flame) -> tuple:
  arrays, static = {}, {}
  for field in dataclasses.fields(flame):
    value = getattr(flame, field.name)
    if field.metadata.get("pytree_node", True):
      arrays[field.name] = np.asarray(value)
    else:
      static[field.name] = list(value) if isinstance(value, tuple) else value
  return arrays, static


def _model_meta(model) -> tuple:
  """(meta without "format", FLAME arrays or None) of an OpenLRM or KaoLRM model."""
  kind = _model_kind(model)
  meta, arrays = {"kind": kind, "config": config_to_dict(model.cfg)}, None
  if kind == "kaolrm":
    arrays, meta["flame_static"] = _flame_arrays(model.flame_model)
  return meta, arrays


def save_model(directory: PathLike, model, overwrite: bool = False) -> pathlib.Path:
  """Write an OpenLRM or KaoLRM model (config, parameters, FLAME model) to `directory`."""
  directory = _output_directory(directory, overwrite)
  meta, arrays = _model_meta(model)
  directory = write_directory(directory, model, meta, overwrite)
  if arrays is not None:
    np.savez(directory / FLAME_FILE, **arrays)
  return directory


def _replace_file(path: pathlib.Path, write):
  """`write(file)` into a temporary file next to `path`, then renamed onto it."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def write_model_spec(workdir: PathLike, model) -> pathlib.Path:
  """What rebuilds `model`'s network without its parameters: kaojax_model.json and
  (KaoLRM) flame.npz as `save_model` writes them, into WORKDIR/model_spec/ (replaced
  file by file). The training loop calls it when a run starts; `load_model(workdir)`
  reads it with the parameters of the run's checkpoints."""
  directory = pathlib.Path(workdir).absolute() / SPEC_DIR
  directory.mkdir(parents=True, exist_ok=True)
  meta, arrays = _model_meta(model)
  meta = {"format": FORMAT, **meta, "params": f"../{CHECKPOINTS_DIR} (Orbax TrainState)"}
  if arrays is not None:
    _replace_file(directory / FLAME_FILE, lambda f: np.savez(f, **arrays))
  text = json.dumps(meta, indent=1).encode()
  _replace_file(directory / META_FILE, lambda f: f.write(text))
  return directory


def is_training_workdir(path: PathLike) -> bool:
  """Whether `path` is a training run's work directory (it has checkpoints/ or
  model_spec/) rather than a model directory written by `save_model`."""
  path = pathlib.Path(path)
  return not is_model_directory(path) and (
      (path / CHECKPOINTS_DIR).is_dir() or (path / SPEC_DIR / META_FILE).is_file())


def _spec_directory(workdir: pathlib.Path) -> pathlib.Path:
  spec = workdir / SPEC_DIR
  if not (spec / META_FILE).is_file():
    raise FileNotFoundError(
        f"{workdir}: training work directory without {SPEC_DIR}/{META_FILE}, which a run "
        "writes when it starts (runs started before kaojax wrote it lack it): resume the "
        "run once, e.g. with --config.stop_at_step=<its latest step>, to write it")
  return spec


def read_meta(directory: PathLike, kinds=("openlrm", "kaolrm")) -> dict:
  """The JSON of a kaojax directory whose kind is one of `kinds` (of a training work
  directory: its model_spec/)."""
  directory = pathlib.Path(directory)
  if is_training_workdir(directory):
    directory = _spec_directory(directory)
  path = directory / META_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{directory}: not a kaojax model directory (no {META_FILE})")
  meta = json.loads(path.read_text())
  if meta.get("format") != FORMAT or meta.get("kind") not in kinds:
    raise ValueError(f"{path}: unsupported format {meta.get('format')} / kind "
                     f"{meta.get('kind')!r} (expected {' or '.join(map(repr, kinds))})")
  return meta


def load_flame_npz(directory: PathLike, meta: Optional[dict] = None):
  """The FlameModel stored next to a KaoLRM checkpoint."""
  from kaojax.flame import FlameModel
  directory = pathlib.Path(directory)
  meta = meta or read_meta(directory)
  path = directory / FLAME_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no FLAME model stored; pass flame= to load_model")
  with np.load(path) as data:
    arrays = {k: jax.numpy.asarray(data[k]) for k in data.files}
  static = {k: tuple(v) if isinstance(v, list) else v
            for k, v in meta.get("flame_static", {}).items()}
  return FlameModel(**arrays, **static)


# KaoLRMConfig fields that do not change the parameters (load_model may replace them).
KAOLRM_RUNTIME_FIELDS = ("num_samples", "monocular")


def load_model(directory: PathLike, flame=None, efficient_attention: Optional[bool] = None,
               remat: Optional[bool] = None, dtype: Optional[str] = None,
               attention_chunk: Optional[int] = None, **kaolrm_options):
  """An OpenLRM or KaoLRM model from a directory written by `save_model`, or from a
  training run's work directory (its latest checkpoint; `load_training_model`).

  flame: a FlameModel replacing the stored one (KaoLRM). efficient_attention / remat /
  dtype / attention_chunk: execution options (None keeps the saved value, see
  `kaojax.models.lrm.with_runtime_options`). kaolrm_options: KaoLRM's
  num_samples / monocular."""
  options = dict(flame=flame, efficient_attention=efficient_attention, remat=remat,
                 dtype=dtype, attention_chunk=attention_chunk, **kaolrm_options)
  directory = pathlib.Path(directory).absolute()
  if is_training_workdir(directory):
    return load_training_model(directory, **options)
  if not (directory / PARAMS_DIR).is_dir() and (directory / META_FILE).is_file() and (
      directory.name == SPEC_DIR):
    raise FileNotFoundError(f"{directory} holds no parameters: it is the model spec of the "
                            f"training work directory {directory.parent}; load that")
  model = _abstract_model(directory, read_meta(directory), **options)
  return restore_params(model, directory / PARAMS_DIR)


def load_training_model(workdir: PathLike, step: Optional[int] = None, **options):
  """The model of a training run's work directory: the network of WORKDIR/model_spec/
  with the parameters (trainable and frozen; FLAME from the spec or `flame=`) of the
  checkpoint of `step` (None: the latest complete one) in WORKDIR/checkpoints/.
  options: those of `load_model`."""
  workdir = pathlib.Path(workdir).absolute()
  spec = _spec_directory(workdir)
  model = _abstract_model(spec, read_meta(spec), **options)
  return restore_checkpoint_params(model, workdir / CHECKPOINTS_DIR, step)


def _abstract_model(directory: pathlib.Path, meta: dict, flame=None,
                    efficient_attention=None, remat=None, dtype=None, attention_chunk=None,
                    **kaolrm_options):
  """The network of a directory's `meta` with abstract parameters (see `load_model`
  for the options); a KaoLRM's FLAME model from `directory`'s flame.npz unless given."""
  unknown = sorted(set(kaolrm_options) - set(KAOLRM_RUNTIME_FIELDS))
  if unknown:
    raise TypeError(f"load_model: unknown options {unknown} (KaoLRM options: "
                    f"{KAOLRM_RUNTIME_FIELDS})")
  from kaojax.models.kaolrm import KaoLRM, KaoLRMConfig
  from kaojax.models.lrm import LRMConfig, OpenLRM, with_runtime_options
  source = str(directory / META_FILE)
  if meta["kind"] == "kaolrm":
    cfg = config_from_dict(KaoLRMConfig, meta["config"], source)
    cfg = dataclasses.replace(cfg, lrm=with_runtime_options(
        cfg.lrm, efficient_attention, remat, dtype, attention_chunk), **kaolrm_options)
    if flame is None:
      flame = load_flame_npz(directory, meta)
    return KaoLRM.abstract(cfg, flame)
  if kaolrm_options:
    raise TypeError(f"load_model: {sorted(kaolrm_options)} apply to KaoLRM, {directory} "
                    "holds an OpenLRM model")
  cfg = with_runtime_options(config_from_dict(LRMConfig, meta["config"], source),
                             efficient_attention, remat, dtype, attention_chunk)
  return nnx.eval_shape(lambda: OpenLRM(cfg, nnx.Rngs(0)))


def checkpoint_steps(checkpoints_dir: PathLike) -> list:
  """The steps of the complete checkpoints in a training run's checkpoints/ folder
  (Orbax leaves unfinished ones under temporary names), ascending."""
  import orbax.checkpoint as ocp
  path = pathlib.Path(checkpoints_dir).absolute()
  if not path.is_dir():
    return []
  return sorted(ocp.utils.checkpoint_steps(path))


def restore_checkpoint_params(model, checkpoints_dir: PathLike, step: Optional[int] = None):
  """Fill the nnx.Param leaves of `model` (abstract, as `restore_params`) from the
  TrainState (`kaojax.train.step.TrainState`: trainable `params`, `rest` holding the
  frozen ones) of a training checkpoint: `step`, or the latest complete one. Only the
  parameters are read (no optimiser state, no FLAME buffers). Returns the model."""
  import orbax.checkpoint as ocp
  from kaojax.nn.params import TRAINABLE
  checkpoints_dir = pathlib.Path(checkpoints_dir).absolute()
  workdir = checkpoints_dir.parent
  steps = checkpoint_steps(checkpoints_dir)
  if not steps:
    raise FileNotFoundError(f"{workdir}: training work directory with no checkpoint yet "
                            f"(no complete one in {checkpoints_dir})")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"{checkpoints_dir}: no checkpoint of step {step} "
                            f"(complete ones: {steps})")
  # The TrainState splits the model as kaojax.train.step.create_state does.
  _, trainable, frozen, _ = nnx.split(model, TRAINABLE, nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  spec = lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device)
  target = {"params": jax.tree.map(spec, trainable), "rest": jax.tree.map(spec, frozen)}
  path = checkpoints_dir / str(step) / "default"
  try:
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except  (any unreadable file)
    earlier = [s for s in steps if s < step]
    why = str(e).split(" [tensorstore_spec")[0][:800]   # the file, not the driver specs
    raise ValueError(
        f"{path}: the checkpoint of step {step} could not be read as the model of "
        f"{workdir / SPEC_DIR} ({type(e).__name__}: {why})"
        + (f"; earlier checkpoints: {earlier} (load_training_model(..., step=...))"
           if earlier else "")) from e
  nnx.update(model, restored["params"], restored["rest"])
  return model


def restore_params(model, params_dir: PathLike):
  """Fill the nnx.Param leaves of `model` (e.g. built with nnx.eval_shape) from
  the Orbax checkpoint at `params_dir`; returns the model."""
  import orbax.checkpoint as ocp
  state = nnx.state(model, nnx.Param)
  target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                        nnx.to_pure_dict(state))
  restored = ocp.StandardCheckpointer().restore(pathlib.Path(params_dir), target)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  return model


def save_lpips(directory: PathLike, model, overwrite: bool = False) -> pathlib.Path:
  """Write an LPIPS network (`kaojax.losses.perceptual.LPIPS`) to `directory`."""
  return write_directory(directory, model, {"kind": LPIPS_KIND, "config": {
      "widths": [list(b) for b in model.vgg.widths]}}, overwrite)


def load_lpips(directory: PathLike):
  """The LPIPS network of a directory written by `save_lpips` (python -m
  kaojax.convert.vgg)."""
  from kaojax.losses.perceptual import LPIPS
  directory = pathlib.Path(directory).absolute()
  if not (directory / META_FILE).is_file():
    raise FileNotFoundError(f"{directory}: not a converted LPIPS directory (no {META_FILE}; "
                            "write one with python -m kaojax.convert.vgg)")
  meta = read_meta(directory, kinds=(LPIPS_KIND,))
  widths = tuple(tuple(b) for b in meta["config"]["widths"])
  model = nnx.eval_shape(lambda: LPIPS(nnx.Rngs(0), widths))
  return restore_params(model, directory / PARAMS_DIR)


def _networks() -> dict:
  """kind -> (network class, its config dataclass): the FaceLift networks."""
  from kaojax.models.gslrm import GSLRM, GSLRMConfig
  from kaojax.models.mvdiffusion.unet import UNet, UNetConfig
  from kaojax.models.mvdiffusion.vae import VAE, VAEConfig
  return {"gslrm": (GSLRM, GSLRMConfig), "unet": (UNet, UNetConfig), "vae": (VAE, VAEConfig)}


def save_network(directory: PathLike, model, overwrite: bool = False) -> pathlib.Path:
  """Write a GS-LRM, UNet or VAE (its config and parameters) to `directory`."""
  kinds = [k for k, (cls, _) in _networks().items() if isinstance(model, cls)]
  if not kinds:
    raise TypeError(f"save_network: cannot save a {type(model).__name__} (GS-LRM, UNet or VAE)")
  return write_directory(directory, model, {"kind": kinds[0],
                                            "config": config_to_dict(model.cfg)}, overwrite)


def load_network(directory: PathLike, kind: str, **config_overrides):
  """The `kind` network ("gslrm", "unet" or "vae") of a directory written by
  `save_network`; `config_overrides` replace config fields that do not change the
  parameters (e.g. a UNet's num_views)."""
  cls, config_cls = _networks()[kind]
  directory = pathlib.Path(directory).absolute()
  meta = read_meta(directory, kinds=(kind,))
  cfg = config_from_dict(config_cls, meta["config"], str(directory / META_FILE))
  cfg = dataclasses.replace(cfg, **config_overrides)
  return restore_params(nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0))), directory / PARAMS_DIR)


def is_model_directory(path: PathLike) -> bool:
  """Whether `path` is a directory written by this module."""
  return (pathlib.Path(path) / META_FILE).is_file()
