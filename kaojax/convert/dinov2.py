"""DINOv2 checkpoints -> `kaojax.models.dinov2.Dinov2`.

Two layouts are understood:
* the original DINOv2 / OpenLRM names (`cls_token`, `pos_embed`, `register_tokens`,
  `patch_embed.proj`, `blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
  mlp.fc1, mlp.fc2, ls2.gamma}`, `norm`), usually under `encoder.model.` in OpenLRM;
* Hugging Face transformers v5 `Dinov2Model` / `Dinov2WithRegistersModel`
  (`embeddings.*`, `encoder.layer.N.attention.{q,k,v,o}_proj`, `layer_scale*.lambda1`,
  `layernorm`); the v4 names (`attention.attention.query`, `attention.output.dense`)
  are accepted too. `embeddings.mask_token` is unused (allow-listed).

The stored position table (37x37 for 518 px) is resized once, here, to the model's
fixed patch grid with PyTorch's antialiased bicubic kernel (`resize_pos_embed`).
"""

import numpy as np

from kaojax.convert.torch_state import StateMapping, conv_kernel_hwio, linear_kernel


# ----------------------------------------------------------------------------
# PyTorch's antialiased bicubic resize (F.interpolate(mode="bicubic",
# antialias=True, align_corners=False)), in numpy float64.


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def antialias_bicubic_matrix(in_size: int, out_size: int, a: float = -0.5) -> np.ndarray:
  """[out_size, in_size] interpolation weights of PyTorch's separable antialiased
  bicubic resize along one axis (scale = in/out; when shrinking the kernel is
  stretched by the scale; taps outside the input are dropped and the rest
  renormalised)."""
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    taps = np.arange(lo, hi)
    w = _cubic((taps - center + 0.5) * invscale, a)
    total = w.sum()
    weights[i, lo:hi] = w / total if total != 0 else w
  return weights


def bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out_size, in_size] weights of PyTorch's plain (antialias=False) bicubic resize
  with align_corners=False: 4 taps around (i + 0.5) * in/out - 0.5, indices clamped
  to the border, Keys kernel a = -0.75."""
  scale = in_size / out_size
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = scale * (i + 0.5) - 0.5
    base = int(np.floor(src))
    for k in range(-1, 3):
      weights[i, min(max(base + k, 0), in_size - 1)] += _cubic(np.float64(base + k - src), a)
  return weights


def resize_bicubic_antialias(grid: np.ndarray, out_h: int, out_w: int,
                             antialias: bool = True) -> np.ndarray:
  """grid [H, W, C] -> [out_h, out_w, C] like torch.nn.functional.interpolate(
  mode="bicubic", align_corners=False, antialias=antialias). The antialiased path
  uses the a = -0.5 kernel (PIL-compatible), the plain path a = -0.75."""
  grid = np.asarray(grid, np.float64)
  matrix = antialias_bicubic_matrix if antialias else bicubic_matrix
  rows = matrix(grid.shape[0], out_h)
  cols = matrix(grid.shape[1], out_w)
  return np.einsum("oh,pw,hwc->opc", rows, cols, grid)


def resize_pos_embed(pos_embed: np.ndarray, grid: int, antialias: bool = True) -> np.ndarray:
  """DINOv2 position table [1, 1 + G*G, D] -> [1, 1 + grid*grid, D]: the CLS row is
  kept, the G x G patch table is resized like DINOv2's interpolate_pos_encoding
  (bicubic, align_corners=False, antialias=True as in DINOv2 with registers / OpenLRM;
  transformers' plain Dinov2Model resizes without antialiasing)."""
  pos_embed = np.asarray(pos_embed)
  n = pos_embed.shape[1] - 1
  g = int(round(n ** 0.5))
  if g * g != n:
    raise ValueError(f"position table with {n} patch rows is not a square grid")
  if g == grid:
    return pos_embed.astype(np.float32)
  table = pos_embed[0, 1:].reshape(g, g, -1)
  resized = resize_bicubic_antialias(table, grid, grid, antialias).reshape(1, grid * grid, -1)
  return np.concatenate([pos_embed[:, :1], resized], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------
# Key mappings into a `Dinov2` module at nnx path `dest`.


def count_layers(state, prefix: str, marker: str) -> int:
  """Number of N such that f"{prefix}{N}.{marker}" is in the state."""
  n = 0
  while f"{prefix}{n}.{marker}" in state:
    n += 1
  return n


def _norm(m: StateMapping, key: str, dest: tuple):
  m.put(dest + ("scale",), m.take(key + ".weight"), key + ".weight")
  m.put(dest + ("bias",), m.take(key + ".bias"), key + ".bias")


def _linear(m: StateMapping, key: str, dest: tuple, bias: bool = True):
  w = m.take(key + ".weight")
  m.put(dest + ("kernel",), None if w is None else linear_kernel(w), key + ".weight")
  if bias:
    m.put(dest + ("bias",), m.take(key + ".bias"), key + ".bias")


def _embeddings(m: StateMapping, dest: tuple, grid: int, cls: str, pos: str, regs: str,
                patch: str, num_registers: int, antialias: bool = True):
  m.put(dest + ("cls_token",), m.take(cls), cls)
  p = m.take(pos)
  m.put(dest + ("pos_embed",), None if p is None else resize_pos_embed(p, grid, antialias), pos)
  if num_registers:
    m.put(dest + ("register_tokens",), m.take(regs), regs)
  w = m.take(patch + ".weight")
  m.put(dest + ("patch_kernel",), None if w is None else conv_kernel_hwio(w), patch + ".weight")
  m.put(dest + ("patch_bias",), m.take(patch + ".bias"), patch + ".bias")


def map_dinov2_original(m: StateMapping, prefix: str, dest: tuple, grid: int, depth: int,
                        num_registers: int):
  """Original DINOv2 names under `prefix` (OpenLRM: "encoder.model.")."""
  _embeddings(m, dest, grid, prefix + "cls_token", prefix + "pos_embed",
              prefix + "register_tokens", prefix + "patch_embed.proj", num_registers)
  for i in range(depth):
    k, d = f"{prefix}blocks.{i}.", dest + ("blocks", str(i))
    _norm(m, k + "norm1", d + ("norm1",))
    _linear(m, k + "attn.qkv", d + ("attn", "qkv"))
    _linear(m, k + "attn.proj", d + ("attn", "proj"))
    m.put(d + ("ls1", "gamma"), m.take(k + "ls1.gamma"), k + "ls1.gamma")
    _norm(m, k + "norm2", d + ("norm2",))
    _linear(m, k + "mlp.fc1", d + ("mlp", "fc1"))
    _linear(m, k + "mlp.fc2", d + ("mlp", "fc2"))
    m.put(d + ("ls2", "gamma"), m.take(k + "ls2.gamma"), k + "ls2.gamma")
  _norm(m, prefix + "norm", dest + ("norm",))


def map_dinov2_transformers(m: StateMapping, prefix: str, dest: tuple, grid: int, depth: int,
                            num_registers: int):
  """Hugging Face Dinov2Model / Dinov2WithRegistersModel names (v5; v4 accepted).
  Dinov2WithRegistersModel resizes its position table with antialiasing,
  Dinov2Model without: the converter follows whichever the state dict is."""
  e = prefix + "embeddings."
  _embeddings(m, dest, grid, e + "cls_token", e + "position_embeddings",
              e + "register_tokens", e + "patch_embeddings.projection", num_registers,
              antialias=e + "register_tokens" in m.state)
  for i in range(depth):
    k, d = f"{prefix}encoder.layer.{i}.", dest + ("blocks", str(i))
    _norm(m, k + "norm1", d + ("norm1",))
    if k + "attention.q_proj.weight" in m.state:      # transformers v5
      names = [k + f"attention.{n}_proj" for n in "qkv"]
      out = k + "attention.o_proj"
    else:                                               # transformers v4
      names = [k + f"attention.attention.{n}" for n in ("query", "key", "value")]
      out = k + "attention.output.dense"
    ws = [m.take(n + ".weight") for n in names]
    bs = [m.take(n + ".bias") for n in names]
    origin = " + ".join(n + ".weight" for n in names)
    if all(w is not None for w in ws):
      m.put(d + ("attn", "qkv", "kernel"), linear_kernel(np.concatenate(ws, 0)), origin)
    if all(b is not None for b in bs):
      m.put(d + ("attn", "qkv", "bias"), np.concatenate(bs, 0), origin.replace("weight", "bias"))
    _linear(m, out, d + ("attn", "proj"))
    m.put(d + ("ls1", "gamma"), m.take(k + "layer_scale1.lambda1"), k + "layer_scale1.lambda1")
    _norm(m, k + "norm2", d + ("norm2",))
    _linear(m, k + "mlp.fc1", d + ("mlp", "fc1"))
    _linear(m, k + "mlp.fc2", d + ("mlp", "fc2"))
    m.put(d + ("ls2", "gamma"), m.take(k + "layer_scale2.lambda1"), k + "layer_scale2.lambda1")
  _norm(m, prefix + "layernorm", dest + ("norm",))


def dinov2_config_from_transformers(state, image_size: int, heads: int, prefix: str = "",
                                    **overrides):
  """A Dinov2Config for a transformers Dinov2(WithRegisters) state dict; `heads` is
  not recoverable from shapes (it is config.num_attention_heads)."""
  from kaojax.models.dinov2 import Dinov2Config
  e = prefix + "embeddings."
  dim = state[e + "cls_token"].shape[-1]
  fc1 = state[prefix + "encoder.layer.0.mlp.fc1.weight"]
  return Dinov2Config(
      dim=dim, depth=count_layers(state, prefix + "encoder.layer.", "norm1.weight"),
      heads=heads, mlp_ratio=fc1.shape[0] / dim,
      patch=state[e + "patch_embeddings.projection.weight"].shape[-1],
      num_registers=(state[e + "register_tokens"].shape[1]
                     if e + "register_tokens" in state else 0),
      image_size=image_size, **overrides)


def load_dinov2_from_transformers(state, cfg, prefix: str = "", rngs=None):
  """A `Dinov2` module holding the weights of a transformers state dict."""
  from flax import nnx
  from kaojax.convert.torch_state import assign_state, param_shapes
  from kaojax.models.dinov2 import Dinov2
  model = Dinov2(cfg, rngs or nnx.Rngs(0))
  m = StateMapping(state, "transformers DINOv2 state dict",
                   allow=(prefix + "embeddings.mask_token",))
  map_dinov2_transformers(m, prefix, (), cfg.grid, cfg.depth, cfg.num_registers)
  assign_state(model, m.finish(param_shapes(model)))
  return model
