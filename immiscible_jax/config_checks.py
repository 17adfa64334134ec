"""Whole-config validation before anything compiles, and the resume-compatibility check.

Every error is an errors.ConfigError of one line, `<key>: <what is wrong>[; allowed: <values>]`. Each section's own
module validates its knobs (data, model, assignment, evaluation); this module checks the key set against
configs/default.py, the types, and the cross-section constraints.
"""
import difflib
import math

import jax

from immiscible_jax import assignment
from immiscible_jax import data
from immiscible_jax import errors
from immiscible_jax import models
from immiscible_jax import resume_rules
from immiscible_jax.evaluation import frechet
from immiscible_jax.models import lpips
from immiscible_jax.parallel import layouts

RECIPES = ('ct', 'ict')
LOSSES = ('l2', 'l1', 'pseudo_huber', 'lpips')
OPTIMIZERS = ('adam', 'radam')
# Largest usable training.sigma_max: the noisy input x + sigma z is float32, whose spacing near 4 sigma (a 4-sigma
# noise draw) is 4 sigma 2^-23; above 2^22 / 255 that spacing exceeds one 8-bit pixel step (2/255 for images in
# [-1, 1]), so the noisiest inputs carry no image at all (sigma_max = 1e30 trained with grad_norm 0).
SIGMA_MAX_BOUND = 2.0 ** 22 / 255


def default_config():
  """configs/default.py's config, imported (the package `configs` is installed with the library), never read
  by a path relative to the working directory."""
  from configs import default  # pylint: disable=g-import-not-at-top
  return default.get_config()


flatten = resume_rules.flatten  # {'a': {'b': 1}} -> {'a.b': 1}; one definition, where the resume check needs it


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
    _check_finite(key, value)


def _check_finite(key, value):
  """inf and nan pass every range check written as a comparison that fails (nan) or are in range (inf > 0):
  refused here, for every number of the config."""
  for item in value if isinstance(value, (tuple, list)) else (value,):
    if isinstance(item, float) and not math.isfinite(item):
      _fail(key, f'must be a finite number, got {item}')


def _check_training(config, for_training):
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
  _require(t.sigma_max <= SIGMA_MAX_BOUND, 'training.sigma_max',
           f'must be at most {SIGMA_MAX_BOUND:.0f}, got {t.sigma_max}: above that, float32 cannot hold one 8-bit '
           'pixel step next to a 4-sigma noise draw in x + sigma z, so the noisiest inputs carry no image (the '
           'papers use 80)')
  _require(t.s0 <= t.s1, 'training.s0', f'{t.s0} exceeds training.s1 ({t.s1})')
  _require(0 < t.mu0 < 1, 'training.mu0', f'must lie in (0, 1), got {t.mu0}')
  _require(0 <= t.ema_rate < 1, 'training.ema_rate', f'must lie in [0, 1), got {t.ema_rate}')
  for key in ('p_std', 'sigma_data', 'rho'):
    _require(getattr(t, key) > 0, f'training.{key}', f'must be positive, got {getattr(t, key)!r}')
  _require(t.grad_accum_steps > 0, 'training.grad_accum_steps', f'must be positive, got {t.grad_accum_steps!r}')
  if for_training:  # sampling and evaluation never use the training batch: a run may be sampled on any machine
    _check_batch_fits_devices(t, jax.device_count())


def _check_batch_fits_devices(t, devices):
  _require(t.batch_size % devices == 0, 'training.batch_size',
           f'{t.batch_size} must be divisible by the number of devices ({devices})')
  _require(t.batch_size % (devices * t.grad_accum_steps) == 0, 'training.grad_accum_steps',
           f'training.batch_size ({t.batch_size}) must divide into {devices} devices x {t.grad_accum_steps} '
           'equal micro-batches')


def _check_dispatch(config):
  """parallel.mode, and intervals that fall on dispatch boundaries (training.steps_per_dispatch)."""
  mode, k = config.parallel.mode, config.training.steps_per_dispatch
  _require(mode in layouts.MODES, 'parallel.mode', f'got {mode!r}', errors.allowed_values(layouts.MODES))
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


def validate(config, for_training=True):
  """Raises errors.ConfigError naming the first bad key; cheap (no compilation, no data read). Each section's
  own module checks its section. for_training=False (--mode=sample|eval) skips what only the training step needs:
  a batch size that splits over this machine's devices."""
  _check_keys_and_types(config)
  _check_training(config, for_training)
  _check_optim_sampling_checkpoint(config)
  _check_dispatch(config)
  data.validate_config(config.data)
  models.validate_config(config.model, config.data.image_size)
  assignment.validate_config(config.assignment)
  frechet.validate_config(config.eval)


def check_resume_compatible(saved, config, allow_schedule_change=False):
  """Refuses to resume when a shape or experiment key differs from the saved run's config, or (unless
  allow_schedule_change) a schedule key; resume_rules.RULES classifies every key."""
  resume_rules.check(saved, config.to_dict(), default_config().to_dict(), allow_schedule_change)
