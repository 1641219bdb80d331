"""KaoLRM's two training stages in time: which stage a step belongs to, and how many
steps each stage gets (spec: kaolrm.md, "Losses": stage I for the first 5 epochs).

Stage I (landmarks, regularisers, alpha mask) runs steps [0, stage1_steps), stage II
(photometric + binding) the steps after; the loss weights of each stage are
`kaojax.losses.stage_weights`.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class StageSchedule:
  """total_steps: steps of the run; stage1_steps: how many of them are stage I."""
  total_steps: int
  stage1_steps: int

  @classmethod
  def from_config(cls, config, steps_per_epoch: int) -> "StageSchedule":
    """From `config.total_steps` / `config.num_epochs` and `config.stage1_steps` /
    `config.stage1_epochs` (a step count, when given, wins over epochs)."""
    total = config.total_steps if config.total_steps > 0 else (
        config.num_epochs * steps_per_epoch)
    stage1 = config.stage1_steps if config.stage1_steps >= 0 else (
        config.stage1_epochs * steps_per_epoch)
    return cls(total, min(stage1, total))

  def stage_at(self, step: int) -> int:
    """The stage that trains step `step` (0-based)."""
    return 1 if step < self.stage1_steps else 2

  def stage_after(self, steps_done: int) -> int:
    """The stage of the last step trained after `steps_done` steps (before any step:
    the stage about to start), the label of an evaluation at that point."""
    return self.stage_at(max(steps_done - 1, 0))

  @property
  def restart_step(self):
    """The stage switch, where the learning rate restarts; None for one stage."""
    return self.stage1_steps if 0 < self.stage1_steps < self.total_steps else None


def stages_to_run(config) -> tuple:
  """The stages (1, 2) a run of `config` can reach, from the config alone (before any
  data is read): decided exactly when the total and the stage switch are both given
  in steps or both in epochs, else both stages."""
  total_steps = config.total_steps if config.total_steps > 0 else None
  stage1_steps = config.stage1_steps if config.stage1_steps >= 0 else None
  if total_steps is not None and stage1_steps is not None:
    total, stage1 = total_steps, stage1_steps
  elif total_steps is None and stage1_steps is None:
    total, stage1 = config.num_epochs, config.stage1_epochs
  else:
    return (1, 2)
  return tuple(s for s, reached in ((1, stage1 > 0), (2, total > stage1)) if reached)
