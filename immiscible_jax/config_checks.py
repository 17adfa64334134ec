"""Whole-config validation before anything compiles, and the resume-compatibility check.

Every error names the config key and, where there is a fixed set, the allowed values. Each section's own
module validates its knobs (data, model, assignment, evaluation); this module checks the key set against
configs/default.py, the types, and the cross-section constraints.
"""
import importlib.util
import os

import jax

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, 'configs', 'default.py')

# Keys whose change makes a saved run a different experiment (shapes or semantics): refuse to resume.
_RESUME_FIXED = ('seed', 'data.dataset', 'data.path', 'data.image_size', 'data.channels', 'data.split',
                 'model.', 'training.recipe', 'training.batch_size', 'training.loss', 'training.sigma_',
                 'training.rho', 'optim.optimizer', 'assignment.method', 'assignment.cost', 'assignment.scope')


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


def _check_keys_and_types(config):
  given, reference = flatten(config), flatten(default_config())
  unknown = sorted(set(given) - set(reference))
  missing = sorted(set(reference) - set(given))
  if unknown:
    raise ValueError(f'unknown config keys: {unknown} (see configs/default.py for every key)')
  if missing:
    raise ValueError(f'config is missing keys: {missing} (build configs from configs/default.py)')
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
    if not ok:
      raise ValueError(f'{key} must be of type {type(ref).__name__} (like its default {ref!r}), '
                       f'got {value!r} of type {type(value).__name__}')


def _require(condition, message):
  if not condition:
    raise ValueError(message)


def _check_training(config):
  t = config.training
  _require(t.recipe in ('ct', 'ict'), f"training.recipe must be one of ['ct', 'ict'], got {t.recipe!r}")
  _require(t.loss in ('l2', 'l1', 'pseudo_huber'),
           f"training.loss must be one of ['l2', 'l1', 'pseudo_huber'], got {t.loss!r}")
  for key in ('batch_size', 'num_steps', 'log_every_steps', 's0', 's1'):
    _require(getattr(t, key) > 0, f'training.{key} must be positive, got {getattr(t, key)!r}')
  _require(0 < t.sigma_min < t.sigma_max,
           f'need 0 < training.sigma_min < training.sigma_max, got {t.sigma_min} and {t.sigma_max}')
  _require(t.s0 <= t.s1, f'training.s0 ({t.s0}) must not exceed training.s1 ({t.s1})')
  _require(0 < t.mu0 < 1, f'training.mu0 must lie in (0, 1), got {t.mu0}')
  _require(0 <= t.ema_rate < 1, f'training.ema_rate must lie in [0, 1), got {t.ema_rate}')
  _require(t.p_std > 0 and t.sigma_data > 0 and t.rho > 0,
           'training.p_std, training.sigma_data and training.rho must be positive')
  devices = jax.device_count()
  _require(t.batch_size % devices == 0,
           f'training.batch_size ({t.batch_size}) must be divisible by the number of devices ({devices})')


def _check_optim_sampling_checkpoint(config):
  o, s, c = config.optim, config.sampling, config.checkpoint
  _require(o.optimizer in ('adam', 'radam'), f"optim.optimizer must be one of ['adam', 'radam'], got {o.optimizer!r}")
  _require(o.learning_rate > 0, f'optim.learning_rate must be positive, got {o.learning_rate}')
  _require(o.warmup_steps >= 0 and o.grad_clip >= 0, 'optim.warmup_steps and optim.grad_clip must be >= 0')
  _require(len(s.sigmas) >= 1 and all(b < a for a, b in zip(s.sigmas, s.sigmas[1:])),
           f'sampling.sigmas must be a non-empty decreasing sequence, got {tuple(s.sigmas)}')
  _require(all(config.training.sigma_min < x <= config.training.sigma_max for x in s.sigmas),
           'every value of sampling.sigmas must lie in (training.sigma_min, training.sigma_max]')
  _require(s.num_samples > 0 and s.shard_size > 0, 'sampling.num_samples and sampling.shard_size must be positive')
  _require(c.every_steps > 0, f'checkpoint.every_steps must be positive, got {c.every_steps}')
  _require(c.max_to_keep > 0, f'checkpoint.max_to_keep must be positive, got {c.max_to_keep}')


def validate(config):
  """Raises ValueError naming the first bad key; cheap (no compilation, no data read)."""
  # Imported here: each module owns its section's rules, and this keeps import cycles out.
  from immiscible_jax import assignment, data, evaluation, models  # pylint: disable=g-import-not-at-top
  _check_keys_and_types(config)
  _check_training(config)
  _check_optim_sampling_checkpoint(config)
  data.validate_config(config.data)
  models.validate_config(config.model, config.data.image_size)
  assignment.validate_config(config.assignment)
  evaluation.validate_config(config.eval)


def check_resume_compatible(saved, config):
  """Refuses to resume when a shape- or semantics-changing key differs from the saved run's config."""
  old, new = flatten(saved), flatten(config.to_dict())
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  differing = sorted(k for k in set(old) | set(new)
                     if k.startswith(_RESUME_FIXED) and norm(old.get(k)) != norm(new.get(k)))
  # Switching clipping on or off adds or removes a stage of the optimizer state (its value alone is harmless).
  if (old.get('optim.grad_clip', 0) > 0) != (new.get('optim.grad_clip', 0) > 0):
    differing = sorted(differing + ['optim.grad_clip'])
  if differing:
    lines = '\n'.join(f'  {k}: saved {old.get(k)!r}, now {new.get(k)!r}' for k in differing)
    raise ValueError('cannot resume: the workdir holds a run whose config differs in keys that change the '
                     f'experiment:\n{lines}\nUse a new --workdir, or restore these values.')
