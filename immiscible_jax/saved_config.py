"""The config a run saved with its checkpoints, for --mode=sample|eval.

Sampling and evaluation rebuild the model of the run that wrote the checkpoint: its config comes from the
checkpoint's meta, not from the command line. A --config given there may change only what does not touch the
trained model (INFERENCE_KEYS); any other key that differs from the saved run is refused, before any array is
read, with the keys listed.
"""
import ast

import ml_collections

from immiscible_jax import checkpointing
from immiscible_jax import config_checks
from immiscible_jax import errors

# Keys that --mode=sample|eval may take from the command line: sampling and evaluation settings, and paths that
# may have moved since training.
INFERENCE_KEYS = ('sampling.', 'eval.', 'data.path', 'data.tfds_data_dir')
# Keys that neither the trained model nor sampling reads: a --config may differ in them, and they are ignored.
_IGNORED_KEYS = ('checkpoint.', 'training.log_every_steps', 'training.steps_per_dispatch', 'data.num_workers',
                 'parallel.')


def from_dict(saved):
  """configs/default.py's config with the saved values (as JSON gave them back) written over it.

  Tuples come back from JSON as lists: they are turned back into tuples where the default holds one. Keys the
  saved run did not know (added since) keep their defaults, which preserve earlier behaviour.
  """
  config = config_checks.default_config()
  known = config_checks.flatten(config)
  for key, value in config_checks.flatten(saved).items():
    if key not in known:
      continue  # a key since removed: nothing reads it
    if isinstance(known[key], tuple) and isinstance(value, list):
      value = tuple(value)
    *parents, leaf = key.split('.')
    node = config
    for name in parents:
      node = node[name]
    with node.ignore_type():  # e.g. an int saved where the default holds a float
      node[leaf] = value
  return config


def _differing(saved, given):
  old, new = config_checks.flatten(saved), config_checks.flatten(given)
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  return sorted(k for k in set(old) | set(new) if norm(old.get(k)) != norm(new.get(k)))


def _readable_meta(manager, steps, step, log=print):
  """The meta of `step`, or of the newest step whose meta reads (as training falls back past a corrupt one,
  saying so)."""
  for candidate in [step] if step is not None else reversed(steps):
    try:
      return checkpointing.read_meta(manager, candidate)
    except Exception as e:  # pylint: disable=broad-except  # unreadable or not JSON: try an earlier step
      why = f'{type(e).__name__}: {" ".join(str(e).split())[:200]}'
      if step is not None:
        raise errors.ConfigError(f'--step={step}: the saved config of that checkpoint is unreadable ({why}); '
                                 f'choose another step; allowed: {errors.allowed_values(steps)}') from e
      log(f'the saved config of step {candidate} is unreadable ({why}); trying an earlier step')
  raise errors.ConfigError(f'--workdir={manager.directory.parent}: no checkpoint in {manager.directory} has a '
                           'readable saved config')


def apply_overrides(config, overrides):
  """config with [(key, text)] pairs (--config.KEY=VALUE of a command without a --config file) applied: each
  key must be an INFERENCE_KEYS key of the config, and its text is read as the type of the value it replaces."""
  flat = config_checks.flatten(config)
  for key, text in overrides:
    if key not in flat:
      raise errors.ConfigError(f'--config.{key}: unknown config key (configs/default.py lists every key)')
    if not key.startswith(INFERENCE_KEYS):
      raise errors.ConfigError(
          f'--config.{key}: sampling and evaluation use the run\'s own model and training settings; change only '
          f'{", ".join(k + "*" if k.endswith(".") else k for k in INFERENCE_KEYS)}')
    section, leaf = key.split('.', 1)
    with config[section].ignore_type():
      config[section][leaf] = _parse_like(text, flat[key], key)
  return config


def _parse_like(text, current, key):
  """`text` read as the type of `current` (bool, int, float, tuple, str), or a ConfigError naming the key."""
  try:
    if isinstance(current, bool):
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(text)
      return text.lower() in ('true', '1')
    if isinstance(current, (int, float)):
      value = ast.literal_eval(text)
      number = (int,) if isinstance(current, int) else (int, float)  # an int key takes no 2.5
      if isinstance(value, bool) or not isinstance(value, number):
        raise ValueError(text)
      return type(current)(value)
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(text)
      return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return text
  except (ValueError, SyntaxError) as e:
    raise errors.ConfigError(f'--config.{key}={text}: expected a {type(current).__name__} like the saved '
                             f'{current!r}') from e


def for_inference(workdir, ckpt_config, step=None, given=None, overrides=()):
  """The config to sample or evaluate the run in `workdir` with.

  The run's own saved config (from the checkpoint at `step`, default the newest), with the INFERENCE_KEYS of
  `given` (the --config of the command line, or None) applied, then `overrides` ([(key, text)]: --config.KEY=VALUE
  without a --config file; apply_overrides). Without a checkpoint, `given` is used as is. Raises ConfigError
  naming the keys when `given` or an override differs from the saved run elsewhere.
  """
  manager = checkpointing.create_manager(workdir, ckpt_config, read_only=True)
  steps = sorted(manager.all_steps())
  if not steps:
    if given is None:
      raise errors.ConfigError(f'--workdir={workdir}: no checkpoint in {workdir}/checkpoints to take the config '
                               'from; train first (--mode=train), or pass --config')
    return given
  if step is not None and step not in steps:
    raise errors.ConfigError(f'--step={step}: no checkpoint at that step in {manager.directory}; '
                             f'allowed: {errors.allowed_values(steps)}')
  saved = from_dict(_readable_meta(manager, steps, step)['config'])
  if given is None:
    return apply_overrides(saved, overrides)
  given = ml_collections.ConfigDict(given.to_dict())
  refused = [k for k in _differing(saved, given) if not k.startswith(INFERENCE_KEYS + _IGNORED_KEYS)]
  if refused:
    old, new = config_checks.flatten(saved), config_checks.flatten(given)
    changes = ', '.join(f'{k} (saved {old.get(k)!r}, given {new.get(k)!r})' for k in refused)
    raise errors.ConfigError(
        f'--config: {changes} differ from the run saved in {workdir}; sampling and evaluation use the run\'s own '
        f'model and training settings: omit --config (the saved config is used), or change only '
        f'{", ".join(k + "*" if k.endswith(".") else k for k in INFERENCE_KEYS)}')
  merged = saved
  flat_given = config_checks.flatten(given)
  for key in _differing(saved, given):
    if not key.startswith(INFERENCE_KEYS):
      continue
    section, leaf = key.split('.', 1)
    merged[section][leaf] = flat_given[key]
  return apply_overrides(merged, overrides)
