"""Oracle case discovery: `from tests.oracle_cases import oracle_cases, load_case`."""

import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORACLES = pathlib.Path(os.environ.get("KAOJAX_ORACLES", ROOT.parent / "shared" / "oracles"))


def oracle_cases(kind: str):
  """pytest params, one per oracle case folder whose case.json has this kind.

  Ids are the folder names, e.g. test_oracle[flame_deca]. Every number a test needs
  is read from the case's files; nothing about a particular case is hard-coded.
  """
  cases = []
  if ORACLES.is_dir():
    for folder in sorted(p for p in ORACLES.iterdir() if (p / "case.json").is_file()):
      meta = json.loads((folder / "case.json").read_text())
      if meta.get("kind") == kind:
        cases.append(pytest.param(folder, id=folder.name))
  if not cases:
    cases.append(pytest.param(None, id=f"no-{kind}-case",
                              marks=pytest.mark.skip(reason=f"no '{kind}' oracle in {ORACLES}")))
  return cases


def load_case(folder: pathlib.Path):
  """(case.json dict, inputs npz, outputs npz) of one oracle case folder."""
  import numpy as np
  meta = json.loads((folder / "case.json").read_text())
  return meta, dict(np.load(folder / "inputs.npz")), dict(np.load(folder / "outputs.npz"))
