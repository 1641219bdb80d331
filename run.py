"""kaojax command line: one config, one work directory.

    python run.py --config=configs/flame_demo.py --workdir=outputs/flame_demo
    python run.py --config=configs/flame_demo.py:tiny --config.num_subjects=4 ...

The config's `job` names what runs (see kaojax/jobs.py).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from kaojax import jobs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "outputs/run", "Where results are written.")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  jobs.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
