"""Seeded fuzzing of the file loaders: truncations and byte flips of valid files.

Every case must either load a valid result or raise the project's own error type
(FlameAssetError, CheckpointError, DatasetError) with a message naming the file:
no other exception type, no crash, no hang. The cases run in a subprocess (this
file run as a script) so that a segfault fails the test instead of killing pytest.
"""

import io
import json
import pathlib
import pickle
import pickletools
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest

SEED = 1234
# cases per mutation of each file kind: 312 in all
CASES = {"flame_pkl": 12, "flame_npz": 12, "safetensors": 20, "torch_bin": 20, "png": 40}
GROUPS = {"flame": ("flame_pkl", "flame_npz"), "checkpoint": ("safetensors", "torch_bin"),
          "image": ("png",)}
TIMEOUT_S = 240


# ----------------------------------------------------------------------------
# Mutations: truncations and byte flips, anywhere or where a file's structure lives.


def _flip(rng, data, positions=None):
  """`data` with 1-3 bytes XORed, at random `positions` (default: anywhere)."""
  data = bytearray(data)
  for _ in range(int(rng.integers(1, 4))):
    pos = int(rng.choice(positions)) if positions is not None else int(rng.integers(len(data)))
    data[pos] ^= int(rng.integers(1, 256))
  return bytes(data)


def _truncate(rng, blob):
  return blob[:int(rng.integers(len(blob)))]


def _flip_pickle(rng, blob):
  """Flips an opcode, or (as often) a byte of one array's data (each array as likely)."""
  ops = list(pickletools.genops(blob))
  if rng.random() < 0.5:
    return _flip(rng, blob, [pos for _, _, pos in ops])
  ends = [pos for _, _, pos in ops[1:]]
  payloads = [(end - len(arg), end) for (_, arg, _), end in zip(ops, ends)
              if isinstance(arg, (bytes, str)) and len(arg) > 64]
  start, end = payloads[int(rng.integers(len(payloads)))]
  return _flip(rng, blob, np.arange(start, end))


def _flip_zip_member(rng, blob):
  """Flips bytes of one member (its first 128 bytes - the .npy / pickle header - or
  anywhere) and zips again, so that the CRC matches the new contents."""
  with zipfile.ZipFile(io.BytesIO(blob)) as zf:
    members = [(info.filename, zf.read(info)) for info in zf.infolist()]
  i = int(rng.integers(len(members)))
  name, data = members[i]
  if data:
    members[i] = name, _flip(rng, data, np.arange(min(len(data), 128))
                             if rng.random() < 0.5 else None)
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
    for name, data in members:
      zf.writestr(name, data)
  return out.getvalue()


def _flip_safetensors_header(rng, blob):
  return _flip(rng, blob, np.arange(8 + int.from_bytes(blob[:8], "little")))


def _flip_png_chunk(rng, blob):
  """Flips bytes of the IHDR chunk's data (size, bit depth, colour type...), or of the
  first bytes of any chunk, and fixes every chunk's CRC, so that the decoder gets past
  its CRC check."""
  starts, pos = [], 8
  while pos + 12 <= len(blob):
    starts.append(pos)
    pos += 12 + int.from_bytes(blob[pos:pos + 4], "big")
  start = starts[int(rng.integers(len(starts)))]
  positions = np.arange(16, 29) if rng.random() < 0.5 else np.arange(start, start + 12)
  data = bytearray(_flip(rng, blob, positions))
  pos = 8
  while pos + 12 <= len(data):
    n = int.from_bytes(data[pos:pos + 4], "big")
    if pos + 12 + n > len(data):
      break
    data[pos + 8 + n:pos + 12 + n] = zlib.crc32(data[pos + 4:pos + 8 + n]).to_bytes(4, "big")
    pos += 12 + n
  return bytes(data)


MUTATIONS = {"flame_pkl": (_truncate, _flip, _flip_pickle),
             "flame_npz": (_truncate, _flip, _flip_zip_member),
             "safetensors": (_truncate, _flip, _flip_safetensors_header),
             "torch_bin": (_truncate, _flip, _flip_zip_member),
             "png": (_truncate, _flip, _flip_png_chunk)}


# ----------------------------------------------------------------------------
# Valid files: {kind: (bytes, file name, FLAME folder or None)}.


def _flame_files(root):
  from kaojax.flame.synthetic import write_synthetic_flame
  folder = write_synthetic_flame(root / "flame")
  model = pickle.loads((folder / "generic_model.pkl").read_bytes())
  npz = io.BytesIO()  # official keys + DECA landmark keys in one file
  np.savez(npz, **{k: v for k, v in model.items() if isinstance(v, np.ndarray)},
           **np.load(folder / "landmark_embedding.npz"))
  return {"flame_pkl": ((folder / "generic_model.pkl").read_bytes(), "generic_model.pkl", folder),
          "flame_npz": (npz.getvalue(), "flame.npz", folder)}


def _checkpoint_files(root):
  import torch
  from safetensors.torch import save_file
  gen = torch.Generator().manual_seed(SEED)
  tensors = {"a.weight": torch.randn(8, 4, generator=gen), "a.bias": torch.arange(8),
             "b.half": torch.randn(6, generator=gen).half(),
             "view": torch.randn(4, 6, generator=gen)[:, 1:4]}
  save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "model.safetensors"))
  torch.save(tensors, root / "pytorch_model.bin")
  return {"safetensors": ((root / "model.safetensors").read_bytes(), "model.safetensors", None),
          "torch_bin": ((root / "pytorch_model.bin").read_bytes(), "pytorch_model.bin", None)}


def _image_files(root):
  from data_pipeline import layout
  layout.write_png(root / "image.png", np.random.default_rng(SEED).uniform(size=(12, 16, 4)))
  return {"png": ((root / "image.png").read_bytes(), "image.png", None)}


# ----------------------------------------------------------------------------
# Loading one case.


def _loader(kind, path, folder):
  """(load, is the loaded value valid, the project's error type) for one file."""
  if kind.startswith("flame"):
    from kaojax.flame import FlameAssetError, FlameModel, load_flame
    return (lambda: load_flame(path, landmarks=folder / "landmark_embedding.npz",
                               masks=folder / "FLAME_masks.pkl"),
            lambda m: isinstance(m, FlameModel) and bool(np.isfinite(m.v_template).all()),
            FlameAssetError)
  if kind in ("safetensors", "torch_bin"):
    from kaojax.convert.torch_state import CheckpointError, read_state_dict
    return (lambda: read_state_dict(path),
            lambda d: isinstance(d, dict) and all(isinstance(v, np.ndarray) for v in d.values()),
            CheckpointError)
  from data_pipeline import layout
  return (lambda: layout.read_png(path),
          lambda a: a.dtype == np.float32 and a.ndim == 3 and a.shape[2] == 4
          and bool(np.all((a >= 0) & (a <= 1))),
          layout.DatasetError)


def run_group(group, root):
  """Runs every case of `group` in this process; returns the unexpected outcomes. Each
  case is announced on stderr first, so that a crash shows which case it was."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  makers = {"flame": _flame_files, "checkpoint": _checkpoint_files, "image": _image_files}
  files = makers[group](root)
  rng = np.random.default_rng(SEED)
  problems, counts = [], {"loaded": 0, "refused": 0, "bad": 0}
  for kind in GROUPS[group]:
    blob, name, folder = files[kind]
    for mutate in MUTATIONS[kind]:
      for i in range(CASES[kind]):
        label = f"{kind} {mutate.__name__} {i}"
        path = root / "cases" / label.replace(" ", "_") / name
        path.parent.mkdir(parents=True)
        path.write_bytes(mutate(rng, blob))
        print(f"case {label}", file=sys.stderr, flush=True)
        load, valid, error_type = _loader(kind, path, folder)
        try:
          outcome = "loaded" if valid(load()) else "an invalid result"
        except error_type as e:
          outcome = "refused" if str(path) in str(e) else f"a message without the file: {e}"
        except Exception as e:  # pylint: disable=broad-except
          outcome = f"{type(e).__name__}: {e}"
        counts[outcome if outcome in counts else "bad"] += 1
        if outcome not in counts:
          problems.append(f"{label}: {outcome[:500]}")
        path.unlink()
  return {"problems": problems, "counts": counts}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_fuzzed_files_load_or_raise_the_project_error(group, tmp_path):
  proc = subprocess.run([sys.executable, __file__, group, str(tmp_path)], capture_output=True,
                        text=True, timeout=TIMEOUT_S, cwd=pathlib.Path(__file__).parents[1])
  last_case = [l for l in proc.stderr.splitlines() if l.startswith("case ")][-1:]
  assert proc.returncode == 0, (f"worker died (exit {proc.returncode}) at {last_case}:\n"
                                f"{proc.stderr[-3000:]}")
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not report["problems"], "\n".join(report["problems"])
  assert sum(report["counts"].values()) == sum(3 * CASES[k] for k in GROUPS[group]), report
  assert report["counts"]["refused"] and report["counts"]["loaded"], report


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
  print(json.dumps(run_group(sys.argv[1], sys.argv[2])))
