r"""Entry point: train, sample or evaluate a consistency model from a config file.

  python -m immiscible_jax.main --config=configs/digits.py --workdir=/tmp/run --mode=train \
      [--config.assignment.method=jv ...]
  python -m immiscible_jax.main --workdir=/tmp/run --mode=sample [--step=N]
  python -m immiscible_jax.main --workdir=/tmp/run --mode=eval [--samples=PATH]

sample and eval rebuild the run from the config saved with its checkpoint (saved_config.py); --config.KEY=VALUE
there (with no --config file) changes the saved config's sampling.*, eval.* and moved data paths, and a --config
file given there may differ from the saved run in those keys only. Resuming with a changed experiment key is
refused, and with a changed schedule key (training.num_steps, s0, s1, mu0, p_mean, p_std, huber_c,
optim.learning_rate, warmup_steps) unless --allow_schedule_change (immiscible_jax/resume_rules.py classifies every
key).

--workdir may be a bucket, gs://BUCKET/prefix (immiscible_jax/storage.py): every output goes there. One trainer
runs per workdir (immiscible_jax/workdir_lock.py): a second one is refused, naming the first.

Bad input (a config value, a data folder, a flag) ends in one line on stderr, `error: <key>: <what is wrong>`,
and exit status 2; with --traceback the error is raised instead, with its Python traceback.

Several hosts: set IMMISCIBLE_JAX_DISTRIBUTED=1 (the launchers in launch/ do) and every process calls
jax.distributed.initialize(); on TPU VMs and SLURM it finds its peers itself, elsewhere it reads
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""
import os
import re
import sys
import warnings

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

warnings.filterwarnings('ignore', message='.*JAXopt is no longer maintained.*')

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py); sample/eval: optional, the run\'s '
                                'saved config is used.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'What to do.')
flags.DEFINE_integer('step', None, 'sample / eval: checkpoint step (default: the latest).')
flags.DEFINE_string('samples', None, 'eval: a .npz or a directory of shards (default: fresh samples).')
flags.DEFINE_bool('traceback', False, 'On a config or input error, show the Python traceback, not one line.')
flags.DEFINE_bool('allow_schedule_change', False, 'train: resume although a schedule key (training.num_steps, '
                  's0, s1, mu0, p_mean, p_std, huber_c, optim.learning_rate, warmup_steps; docs/reliability.md '
                  'lists every key) differs from the saved run, e.g. to extend it.')
flags.mark_flags_as_required(['workdir'])


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
  from immiscible_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    _run(_loaded(FLAGS.config))
  except errors.ConfigError as e:
    if FLAGS.traceback:
      raise
    _fail(str(e))
  except KeyboardInterrupt:  # the second Ctrl-C (parallel/preemption.py): leave now
    sys.stdout.flush()
    sys.stderr.write('aborted by a second Ctrl-C: the current step is not saved; the run resumes from its last '
                     'checkpoint\n')
    sys.stderr.flush()
    # Not sys.exit: interpreter shutdown waits for the computations still running on the device.
    os._exit(130)  # pylint: disable=protected-access
  except Exception as e:  # pylint: disable=broad-except
    full = errors.disk_full_message(e)
    if full is None or FLAGS.traceback:
      raise
    _fail(full)


def _loaded(config):
  """The --config, or a ConfigError naming the file: ml_collections reports a file that did not load (a wrong
  path, an import error in it) only when the config is first read, with a 40-line traceback."""
  from immiscible_jax import errors  # pylint: disable=g-import-not-at-top
  if config is None:
    return None
  try:
    config.get('seed')  # the first read: raises for a file that did not load
  except OSError as e:
    cause = e.__cause__ or e
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    raise errors.ConfigError(f'--config={config_flags.get_config_filename(FLAGS["config"])}: cannot load the config '
                             f'file ({lines[-1] if lines else type(cause).__name__})') from e
  return config


def _run(config):
  """Validates, then runs one mode. The evaluator is built here and handed to the trainer."""
  from immiscible_jax import config_checks, errors, storage  # pylint: disable=g-import-not-at-top
  # Orbax wants absolute paths; URLs such as gs://bucket/run stay as they are (and get no local folder).
  workdir = storage.abspath(FLAGS.workdir)
  storage.check_no_glob_characters(workdir, '--workdir')  # before anything is created or trained
  if FLAGS.mode == 'train':
    if config is None:
      raise errors.ConfigError('--config: required for --mode=train (e.g. --config=configs/digits.py)')
  else:
    from immiscible_jax import saved_config  # pylint: disable=g-import-not-at-top
    ckpt_config = (config or config_checks.default_config()).checkpoint
    config = saved_config.for_inference(workdir, ckpt_config, FLAGS.step, config, _SAVED_CONFIG_OVERRIDES)
  # Before the heavier imports below, and before anything compiles.
  config_checks.validate(config, for_training=FLAGS.mode == 'train')
  from immiscible_jax import train  # pylint: disable=g-import-not-at-top
  from immiscible_jax.evaluation import runs  # pylint: disable=g-import-not-at-top
  created = not storage.exists(workdir)
  storage.makedirs(workdir)
  try:
    _run_mode(config, workdir, runs, train)
  except errors.ConfigError:
    if created and not storage.is_remote(workdir) and not os.listdir(workdir):
      os.rmdir(workdir)  # a refused run leaves no empty workdir behind
    raise


def _run_mode(config, workdir, runs, train):
  if FLAGS.mode == 'train':
    from immiscible_jax import workdir_lock  # pylint: disable=g-import-not-at-top
    with workdir_lock.hold(workdir):  # one trainer per workdir; a second one is refused before it touches it
      evaluator = runs.TrainingEvaluator(config) if config.eval.every_steps > 0 else None
      train.train_and_evaluate(config, workdir, evaluator=evaluator,
                               allow_schedule_change=FLAGS.allow_schedule_change,
                               config_name=config_flags.get_config_filename(FLAGS['config']))
  elif FLAGS.mode == 'sample':
    runs.sample_from_checkpoint(config, workdir, FLAGS.step)
  else:
    runs.evaluate(config, workdir, FLAGS.step, FLAGS.samples)


def _fail(message):
  """Bad input: one line on stderr and exit status 2 (as argparse does for usage errors)."""
  sys.stderr.write(f'error: {" ".join(message.split())}\n')
  sys.exit(2)


def _flag_error(text):
  """absl's 'flag --config.a.b=v: reason' -> 'a.b: reason (in --config.a.b=v)'; other flags keep their name."""
  match = re.match(r'flag --config\.([\w.]+)=(.*?): (.*)', text, re.DOTALL)
  if match:
    key, value, reason = match.groups()
    return f'{key}: {reason} (in --config.{key}={value})'
  match = re.match(r'flag (--\w+)=.*?: (.*)', text, re.DOTALL)
  return f'{match.group(1)}: {match.group(2)}' if match else text


# --mode=sample|eval without --config: the --config.KEY=VALUE arguments, applied to the run's saved config.
_SAVED_CONFIG_OVERRIDES = []


def _split_saved_config_overrides(argv):
  """argv without the --config.KEY=VALUE arguments of a --mode=sample|eval command that names no --config file
  (config_flags needs a file to apply them to; they go to the run's saved config instead), and those pairs."""
  modes = [a.split('=', 1)[1] for a in argv if a.startswith('--mode=')]
  modes += [value for flag, value in zip(argv, argv[1:]) if flag == '--mode']
  mode = modes[-1] if modes else 'train'
  has_file = any(a == '--config' or a.startswith('--config=') for a in argv)
  if mode == 'train' or has_file:
    return argv, []
  overrides = [a[len('--config.'):].split('=', 1) for a in argv if a.startswith('--config.')]
  if any(len(pair) != 2 for pair in overrides):
    _fail('--config.KEY: give overrides as --config.KEY=VALUE')
  return [a for a in argv if not a.startswith('--config.')], overrides


def _parse_flags(argv):
  """absl's parser, except that every error is one line (`error: ...`, exit status 2), a misspelt
  --config.KEY included (ml_collections would raise a KeyError with a traceback)."""
  argv, _SAVED_CONFIG_OVERRIDES[:] = _split_saved_config_overrides(argv)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(_flag_error(str(e)))
  except (AttributeError, KeyError) as e:  # ml_collections: KeyError("'nf'\nDid you mean ..."), maybe wrapped.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    text = e.args[0] if e.args and isinstance(e.args[0], str) else ''
    name = text.split("'")[1] if text.startswith("'") else None
    culprits = [a.split('=')[0][len('--config.'):] for a in argv[1:]
                if name and a.startswith('--config.') and f'.{name}' in a.split('=')[0]]
    if not culprits:
      raise
    suggestion = text.splitlines()[-1] if '\n' in text else ''  # 'Did you mean "num_steps" instead of ...?'
    hint = f'; {suggestion[:1].lower()}{suggestion[1:]}' if suggestion else ''
    _fail(f'{" ".join(culprits)}: unknown config key{hint} (configs/default.py lists every key)')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
