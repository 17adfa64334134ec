r"""Entry point: train, sample or evaluate a consistency model from a config file.

  python -m immiscible_jax.main --config=configs/digits.py --workdir=/tmp/run --mode=train \
      [--config.assignment.method=hungarian ...]
  python -m immiscible_jax.main --config=configs/digits.py --workdir=/tmp/run --mode=sample [--step=N]
  python -m immiscible_jax.main --config=configs/digits.py --workdir=/tmp/run --mode=eval [--samples=PATH]

Several hosts: set IMMISCIBLE_JAX_DISTRIBUTED=1 (the launchers in launch/ do) and every process calls
jax.distributed.initialize(); on TPU VMs and SLURM it finds its peers itself, elsewhere it reads
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""
import os
import sys
import warnings

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

warnings.filterwarnings('ignore', message='.*JAXopt is no longer maintained.*')

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'What to do.')
flags.DEFINE_integer('step', None, 'sample / eval: checkpoint step (default: the latest).')
flags.DEFINE_string('samples', None, 'eval: a .npz or a directory of shards (default: fresh samples).')
flags.mark_flags_as_required(['config', 'workdir'])


def _maybe_initialize_distributed():
  if os.environ.get('IMMISCIBLE_JAX_DISTRIBUTED') != '1':
    return
  import jax  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if 'JAX_COORDINATOR_ADDRESS' in os.environ:
    kwargs = dict(coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
                  num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                  process_id=int(os.environ['JAX_PROCESS_ID']))
  jax.distributed.initialize(**kwargs)
  if jax.default_backend() == 'cpu' and jax.process_count() > 1:
    # CPU collectives (gloo) connect a group of devices at its first collective and wait only 30 s there for
    # the other processes. The first train step can start further apart: on CPU the compilation cache key
    # differs per process and only process 0 writes the cache, so process 0 loads the step while the others
    # compile it. Connect all devices now, while the processes are in step; later collectives wait longer.
    import numpy as np  # pylint: disable=g-import-not-at-top
    ones = np.ones(jax.local_device_count(), np.float32)
    jax.block_until_ready(jax.pmap(lambda x: jax.lax.psum(x, 'all'), axis_name='all')(ones))


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:  # Orbax logs every save at INFO; keep the console for our progress lines.
    logging.set_verbosity(logging.WARNING)
  _maybe_initialize_distributed()
  # Imported after initialize(): nothing may touch the backend before it.
  from immiscible_jax import config_checks, evaluators, train  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  config_checks.validate(config)
  # Orbax wants absolute paths; leave URLs such as gs://bucket/run alone.
  workdir = FLAGS.workdir if '://' in FLAGS.workdir else os.path.abspath(FLAGS.workdir)
  if '://' not in workdir:
    os.makedirs(workdir, exist_ok=True)
  if FLAGS.mode == 'train':
    train.train_and_evaluate(config, workdir)
  elif FLAGS.mode == 'sample':
    evaluators.sample_from_checkpoint(config, workdir, FLAGS.step)
  else:
    evaluators.evaluate(config, workdir, FLAGS.step, FLAGS.samples)


def _parse_flags(argv):
  """absl's parser, except that a misspelt --config.KEY ends in one line, not ml_collections' traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: KeyError("'nf'\nDid you mean ..."), maybe wrapped.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    text = e.args[0] if e.args and isinstance(e.args[0], str) else ''
    name = text.split("'")[1] if text.startswith("'") else None
    culprits = [a.split('=')[0] for a in argv[1:]
                if name and a.startswith('--config.') and f'.{name}' in a.split('=')[0]]
    if not culprits:
      raise
    sys.exit(f'FATAL Flags parsing error: unknown config key in {" ".join(culprits)}. {text.splitlines()[-1]} '
             '(configs/default.py lists every key)')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
