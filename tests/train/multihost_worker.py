"""One of the processes of a multi-host run on this machine (one CPU device each),
started by multihost_test.py:

    python -m tests.train.multihost_worker PORT PROCESS_ID NUM_PROCESSES WORKDIR
"""

import sys

import jax

from kaojax.train.loop import train_and_evaluate
from tests.train.tiny_run import tiny_config


def multihost_config(num_processes: int):
  """Two stage-II steps with evaluations before and after, one example per host, on
  synthetic data generated into the work directory."""
  config = tiny_config(None, total_steps=2, stage1_steps=0, eval_every=2)
  config.batch_size = num_processes
  return config


def main(port, process_id, num_processes, workdir):
  config = multihost_config(int(num_processes))
  config.multihost = True
  config.distributed.coordinator_address = f"localhost:{port}"
  config.distributed.num_processes = int(num_processes)
  config.distributed.process_id = int(process_id)
  train_and_evaluate(config, workdir)
  print(f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} of {jax.device_count()} devices")


if __name__ == "__main__":
  main(*sys.argv[1:])
