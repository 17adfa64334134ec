"""Whole-config validation before anything compiles, and the resume-compatibility check.

Every error is an errors.ConfigError of one line, `<key>: <what is wrong>[; allowed: <values>]`. Each section's own
module validates its knobs (data, model, assignment, evaluation); this module checks the key set against
configs/default.py, the types, and the cross-section constraints.
"""
import difflib
import importlib.util
import os

import jax

from immiscible_jax import assignment
from immiscible_jax import data
from immiscible_jax import errors
from immiscible_jax import evaluation
from immiscible_jax import lpips
from immiscible_jax import models
from immiscible_jax import replicas

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, 'configs', 'default.py')

RECIPES = ('ct', 'ict')
LOSSES = ('l2', 'l1', 'pseudo_huber', 'lpips')
OPTIMIZERS = ('adam', 'radam')

# Keys whose change makes a saved run a different experiment (shapes or semantics): refuse to resume.
_RESUME_FIXED = ('seed', 'data.dataset', 'data.path', 'data.image_size', 'data.channels', 'data.split',
                 'model.', 'training.recipe', 'training.batch_size', 'training.loss', 'training.lpips_resolution',
                 'training.sigma_',
                 'training.rho', 'optim.optimizer', 'assignment.method', 'assignment.cost', 'assignment.scope')
# Keys of the training schedule: resuming with other values needs --allow_schedule_change.
RESUME_SCHEDULE = ('training.num_steps', 'training.s0', 'training.s1', 'training.mu0', 'training.p_mean',
                   'training.p_std', 'training.huber_c')


def default_config():
  spec = importlib.util.spec_from_file_location('immiscible_jax_default_config', _DEFAULT_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def flatten(d, prefix=''):
  """{'a': {'b': 1}} -> {'a.b': 1} for ConfigDicts and plain dicts."""
  out = {}
  for key, value in d.items():
    if hasattr(value, 'items'):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _fail(key, problem, allowed=None):
  raise errors.ConfigError(f'{key}: {problem}' + (f'; allowed: {allowed}' if allowed is not None else ''))


def _require(condition, key, problem, allowed=None):
  if not condition:
    _fail(key, problem, allowed)


def _check_keys_and_types(config):
  given, reference = flatten(config), flatten(default_config())
  unknown = sorted(set(given) - set(reference))
  missing = sorted(set(reference) - set(given))
  if unknown:
    close = difflib.get_close_matches(unknown[0], reference, n=1)
    hint = f'; did you mean {close[0]}?' if close else ''
    _fail(', '.join(unknown), f'unknown config key{hint} (configs/default.py lists every key)')
  if missing:
    _fail(', '.join(missing), 'missing from the config (build configs from configs/default.py)')
  for key, ref in reference.items():
    value = given[key]
    if isinstance(ref, bool) or isinstance(value, bool):
      ok = isinstance(value, bool) == isinstance(ref, bool)
    elif isinstance(ref, (int, float)):
      ok = isinstance(value, (int, float))
    elif isinstance(ref, (tuple, list)):
      ok = isinstance(value, (tuple, list))
    else:
      ok = isinstance(value, type(ref))
    _require(ok, key, f'must be of type {type(ref).__name__} (like its default {ref!r}), got {value!r} of type '
             f'{type(value).__name__}')


def _check_training(config):
  t = config.training
  _require(t.recipe in RECIPES, 'training.recipe', f'got {t.recipe!r}', errors.allowed_values(RECIPES))
  _require(t.loss in LOSSES, 'training.loss', f'got {t.loss!r}', errors.allowed_values(LOSSES))
  if t.loss == 'lpips':
    size = t.lpips_resolution or config.data.image_size
    _require(t.lpips_resolution >= 0 and size >= lpips.MIN_SIZE, 'training.lpips_resolution',
             f'LPIPS runs at {size}x{size} pixels here (0 = data.image_size, {config.data.image_size}), but VGG16 '
             f'pools four times and needs at least {lpips.MIN_SIZE}; set it to 16 or more (224 as in CT)')
  for key in ('batch_size', 'num_steps', 'log_every_steps', 's0', 's1'):
    _require(getattr(t, key) > 0, f'training.{key}', f'must be positive, got {getattr(t, key)!r}')
  _require(0 < t.sigma_min < t.sigma_max, 'training.sigma_min',
           f'must lie in (0, training.sigma_max), got {t.sigma_min} with training.sigma_max = {t.sigma_max}')
  _require(t.s0 <= t.s1, 'training.s0', f'{t.s0} exceeds training.s1 ({t.s1})')
  _require(0 < t.mu0 < 1, 'training.mu0', f'must lie in (0, 1), got {t.mu0}')
  _require(0 <= t.ema_rate < 1, 'training.ema_rate', f'must lie in [0, 1), got {t.ema_rate}')
  for key in ('p_std', 'sigma_data', 'rho'):
    _require(getattr(t, key) > 0, f'training.{key}', f'must be positive, got {getattr(t, key)!r}')
  devices = jax.device_count()
  _require(t.batch_size % devices == 0, 'training.batch_size',
           f'{t.batch_size} must be divisible by the number of devices ({devices})')
  _require(t.grad_accum_steps > 0, 'training.grad_accum_steps', f'must be positive, got {t.grad_accum_steps!r}')
  _require(t.batch_size % (devices * t.grad_accum_steps) == 0, 'training.grad_accum_steps',
           f'training.batch_size ({t.batch_size}) must divide into {devices} devices x {t.grad_accum_steps} '
           'equal micro-batches')


def _check_dispatch(config):
  """parallel.mode, and intervals that fall on dispatch boundaries (training.steps_per_dispatch)."""
  mode, k = config.parallel.mode, config.training.steps_per_dispatch
  _require(mode in replicas.MODES, 'parallel.mode', f'got {mode!r}', errors.allowed_values(replicas.MODES))
  _require(k > 0, 'training.steps_per_dispatch', f'must be positive, got {k!r}')
  intervals = {'training.num_steps': config.training.num_steps,
               'training.log_every_steps': config.training.log_every_steps,
               'eval.every_steps': config.eval.every_steps, 'checkpoint.every_steps': config.checkpoint.every_steps}
  off = {key: value for key, value in intervals.items() if value % k}
  _require(not off, ', '.join(off), f'must be multiples of training.steps_per_dispatch ({k}), got '
           f'{", ".join(str(v) for v in off.values())}')


def _check_optim_sampling_checkpoint(config):
  o, s, c = config.optim, config.sampling, config.checkpoint
  _require(o.optimizer in OPTIMIZERS, 'optim.optimizer', f'got {o.optimizer!r}', errors.allowed_values(OPTIMIZERS))
  _require(o.learning_rate > 0, 'optim.learning_rate', f'must be positive, got {o.learning_rate}')
  _require(o.warmup_steps >= 0, 'optim.warmup_steps', f'must be >= 0, got {o.warmup_steps}')
  _require(o.grad_clip >= 0, 'optim.grad_clip', f'must be >= 0 (0 = off), got {o.grad_clip}')
  _require(len(s.sigmas) >= 1 and all(b < a for a, b in zip(s.sigmas, s.sigmas[1:])), 'sampling.sigmas',
           f'must be a non-empty decreasing sequence, got {tuple(s.sigmas)}')
  t = config.training
  _require(all(t.sigma_min < x <= t.sigma_max for x in s.sigmas), 'sampling.sigmas',
           f'every value must lie in (training.sigma_min, training.sigma_max] = ({t.sigma_min}, {t.sigma_max}], '
           f'got {tuple(s.sigmas)}')
  _require(s.num_samples > 0, 'sampling.num_samples', f'must be positive, got {s.num_samples}')
  _require(s.shard_size > 0, 'sampling.shard_size', f'must be positive, got {s.shard_size}')
  _require(c.every_steps > 0, 'checkpoint.every_steps', f'must be positive, got {c.every_steps}')
  _require(c.max_to_keep > 0, 'checkpoint.max_to_keep', f'must be positive, got {c.max_to_keep}')
  for key in ('start_step', 'num_steps'):
    value = config.profile[key]
    _require(isinstance(value, int) and value >= 0, f'profile.{key}', f'must be an integer >= 0, got {value!r}')


def validate(config):
  """Raises errors.ConfigError naming the first bad key; cheap (no compilation, no data read). Each section's
  own module checks its section."""
  _check_keys_and_types(config)
  _check_training(config)
  _check_optim_sampling_checkpoint(config)
  _check_dispatch(config)
  data.validate_config(config.data)
  models.validate_config(config.model, config.data.image_size)
  assignment.validate_config(config.assignment)
  evaluation.validate_config(config.eval)


def check_resume_compatible(saved, config, allow_schedule_change=False):
  """Refuses to resume when a shape- or semantics-changing key differs from the saved run's config, or (unless
  allow_schedule_change) a key of the training schedule: those move N(k), mu(k) or the loss under the run."""
  old, new = flatten(saved), flatten(config.to_dict())
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  changed = lambda prefixes: sorted(k for k in set(old) | set(new)
                                    if k.startswith(prefixes) and norm(old.get(k)) != norm(new.get(k)))
  describe = lambda keys: ', '.join(f'{k} (saved {old.get(k)!r}, now {new.get(k)!r})' for k in keys)
  differing = changed(_RESUME_FIXED)
  # Switching clipping on or off adds or removes a stage of the optimizer state (its value alone is harmless).
  if (old.get('optim.grad_clip', 0) > 0) != (new.get('optim.grad_clip', 0) > 0):
    differing = sorted(differing + ['optim.grad_clip'])
  if differing:
    raise errors.ConfigError(f'cannot resume: the workdir holds a run whose config differs in keys that change '
                             f'the experiment: {describe(differing)}; use a new --workdir, or restore these values')
  schedule = changed(RESUME_SCHEDULE)
  if schedule and not allow_schedule_change:
    raise errors.ConfigError(
        f'cannot resume: {describe(schedule)}: the noise-level curriculum N(k), the target EMA mu(k) and the '
        'loss follow these keys, so changing them mid-run changes the experiment from this step on; restore the '
        'saved values, or pass --allow_schedule_change to continue with the new ones deliberately (the way to '
        'extend a finished run: raise training.num_steps and pass it)')
