"""Named model sizes: each model family keeps one table of presets ('tiny' for CPU
tests, the released sizes) and looks names up here (`gslrm_config`, `unet_config`,
`vae_config`, `clip_vision_config`)."""

import dataclasses
from typing import Mapping


def preset(family: str, presets: Mapping, name: str, overrides: Mapping):
  """presets[name] with `overrides` replacing config fields; an unknown name is a
  ValueError listing the family's presets."""
  if name not in presets:
    raise ValueError(f"unknown {family} preset {name!r}: {', '.join(presets)}")
  return dataclasses.replace(presets[name], **overrides)
