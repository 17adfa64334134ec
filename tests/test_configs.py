"""Every config in configs/ loads, validates and builds its model; bad values fail fast."""
import glob
import importlib.util
import os
import re

import pytest

from immiscible_jax import config_checks
from immiscible_jax import errors
from immiscible_jax import models

_ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
_CONFIGS = sorted(glob.glob(os.path.join(_ROOT, 'configs', '*.py')))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('path', [p for p in _CONFIGS if not p.endswith('__init__.py')],
                         ids=os.path.basename)
def test_config_loads_and_validates(path, monkeypatch):
  config = _load(path)
  if config.data.dataset == 'folder':
    pytest.skip('folder configs need their data path')
  # cifar10 is not prepared on test machines: validation must not need the data itself.
  config_checks.validate(config)
  models.create_model(config.model, config.data.channels)  # the model builds (tests/test_models.py: its size)


def _digits():
  return _load(os.path.join(_ROOT, 'configs', 'digits.py'))


@pytest.mark.parametrize('key,value,message', [
    ('training.recipe', 'cd', "training.recipe: got 'cd'; allowed: 'ct', 'ict'"),
    ('training.loss', 'lpsis', "training.loss: got 'lpsis'; allowed: 'l2', 'l1', 'pseudo_huber', 'lpips'"),
    # digits are 8x8: LPIPS at their own size (0) is below VGG16's 16 pixels, and so is 8.
    ('training.lpips_resolution', 0, 'training.lpips_resolution: LPIPS runs at 8x8 pixels here'),
    ('training.lpips_resolution', 8, 'needs at least 16; set it to 16 or more'),
    ('training.batch_size', 12, 'must be divisible by the number of devices'),
    ('training.num_steps', 0, 'training.num_steps: must be positive, got 0'),
    ('training.sigma_min', 100.0, 'training.sigma_min: must lie in (0, training.sigma_max), got 100.0'),
    ('assignment.method', 'auction!', 'assignment.method'),
    ('assignment.knn_k', 0, 'assignment.knn_k'),
    ('optim.optimizer', 'sgd', "optim.optimizer: got 'sgd'; allowed: 'adam', 'radam'"),
    ('sampling.sigmas', (0.5, 80.0), 'sampling.sigmas: must be a non-empty decreasing sequence, got (0.5, 80.0)'),
    ('eval.metric', 'lpips', 'eval.metric'),
    ('data.dataset', 'imagenet', 'data.dataset'),
    ('model.ch_mult', (1, 2, 2, 2, 2), 'model.ch_mult'),
    ('checkpoint.every_steps', 0, 'checkpoint.every_steps: must be positive, got 0'),
    ('parallel.mode', 'xmap', "parallel.mode: got 'xmap'; allowed: 'pmap', 'shard_map'"),
    # digits: 1200 steps, log every 100, eval and checkpoint every 400: only the log interval is off.
    ('training.steps_per_dispatch', 8,
     'training.log_every_steps: must be multiples of training.steps_per_dispatch (8), got 100'),
    ('training.grad_accum_steps', 3,
     'training.grad_accum_steps: training.batch_size (64) must divide into 8 devices x 3 equal micro-batches'),
])
def test_bad_values_name_their_key(key, value, message):
  config = _digits()
  section, name = key.split('.')
  with config.unlocked():
    config[section][name] = value
    if name == 'lpips_resolution':
      config.training.loss = 'lpips'
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    config_checks.validate(config)


def test_unknown_and_mistyped_keys_are_refused():
  config = _digits()
  with config.unlocked():
    config.training.num_stepz = 5
  with pytest.raises(errors.ConfigError, match=r'training.num_stepz: unknown config key; did you mean '
                                                r'training.num_steps\?'):
    config_checks.validate(config)
  config = _digits()
  with pytest.raises(TypeError, match='batch_size'):  # ml_collections refuses the override itself
    config.training.batch_size = '64'


def test_resume_compatibility_lists_the_differing_keys():
  saved = _digits()
  config = _digits()
  config.model.nf = 64
  config.training.recipe = 'ct'
  config.training.num_steps = 99          # a schedule key: refused on its own, after the experiment keys
  config.training.log_every_steps = 7     # harmless
  with pytest.raises(errors.ConfigError) as err:
    config_checks.check_resume_compatible(saved.to_dict(), config)
  assert 'model.nf (saved 32, now 64)' in str(err.value)
  assert 'training.recipe' in str(err.value) and 'num_steps' not in str(err.value)
  longer = _digits()
  longer.training.num_steps, longer.training.log_every_steps = 99, 7
  with pytest.raises(errors.ConfigError, match=r'training\.num_steps \(saved \d+, now 99\).*--allow_schedule'):
    config_checks.check_resume_compatible(saved.to_dict(), longer)
  config_checks.check_resume_compatible(saved.to_dict(), longer, allow_schedule_change=True)
  harmless = _digits()
  harmless.training.log_every_steps = 7
  config_checks.check_resume_compatible(saved.to_dict(), harmless)


def test_docs_config_reference_matches_configs_default():
  from tools import config_docs  # pylint: disable=g-import-not-at-top
  reference = open(os.path.join(_ROOT, 'docs', 'config.md')).read()
  assert config_docs.markdown() in reference, 'regenerate with: python -m tools.config_docs'
  rows = config_docs.reference_rows()
  assert len(rows) == len(config_checks.flatten(config_checks.default_config()))
  # Every meaning is its key's own full sentence(s): none cut off mid-sentence, none shared with the next key.
  assert all(meaning.endswith('.') for _, _, meaning in rows), [k for k, _, m in rows if not m.endswith('.')]
  assert len({meaning for _, _, meaning in rows}) == len(rows)


def _default_config_lines():
  return open(os.path.join(_ROOT, 'configs', 'default.py')).read().split('\n')


@pytest.mark.parametrize('edit', ['shared_comment', 'blank_line'])
def test_config_reference_refuses_a_key_without_a_comment_of_its_own(edit, tmp_path):
  from tools import config_docs  # pylint: disable=g-import-not-at-top
  lines = _default_config_lines()
  at = lines.index('  optim.b2 = 0.999')
  if edit == 'shared_comment':  # optim.b2 then sits under optim.b1's comment, as a shared comment would
    while lines[at - 1].lstrip().startswith('#'):
      del lines[at - 1]
      at -= 1
  else:
    lines.insert(at, '')
  path = tmp_path / 'default.py'
  path.write_text('\n'.join(lines))
  with pytest.raises(config_docs.UndocumentedKeyError, match=r'default.py:\d+: config key optim.b2 has no comment'):
    config_docs.markdown(str(path))


# Issue 21, case 9: values that would train nothing (grad_norm 0 at sigma_max = 1e30) must not pass validation.
@pytest.mark.parametrize('key,value,message', [
    ('training.sigma_max', float('inf'), 'training.sigma_max: must be a finite number, got inf'),
    ('training.sigma_data', float('inf'), 'training.sigma_data: must be a finite number, got inf'),
    ('training.p_mean', float('nan'), 'training.p_mean: must be a finite number, got nan'),
    ('optim.learning_rate', float('inf'), 'optim.learning_rate: must be a finite number, got inf'),
    ('optim.b1', float('nan'), 'optim.b1: must be a finite number, got nan'),
    ('sampling.sigmas', (80.0, float('nan')), 'sampling.sigmas: must be a finite number, got nan'),
    # 1e30: x + sigma z in float32 keeps nothing of the image; the bound says why.
    ('training.sigma_max', 1e30, 'training.sigma_max: must be at most 16448'),
    ('training.sigma_max', 2e4, 'float32'),
])
def test_non_finite_and_out_of_range_values_are_refused_with_the_reason(key, value, message):
  config = _digits()
  section, name = key.split('.')
  with config.unlocked():
    config[section][name] = value
    if key == 'training.sigma_max':
      config.sampling.sigmas = (min(value, 80.0),)
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    config_checks.validate(config)


def test_the_sigma_bound_keeps_the_papers_values():
  config = _digits()
  config.training.sigma_max = 16000.0  # just under the bound (papers: 80)
  config_checks.validate(config)


# Issue 21, case 6: every key classified; every experiment change refused on resume. The keys below are named
# here, independently of the table in code: the list of changes that resumed silently, and keys that must
# stay free (intervals, paths, performance knobs).
_MUST_REFUSE = ('training.ema_rate', 'optim.b1', 'optim.b2', 'optim.eps', 'data.random_flip', 'assignment.knn_k',
                'assignment.dtype', 'assignment.sinkhorn_epsilon', 'assignment.sinkhorn_max_iterations',
                'assignment.sinkhorn_threshold', 'assignment.sinkhorn_arr_sweeps', 'eval.metric', 'eval.num_samples',
                'eval.reference_num_images', 'eval.pixel_downsample', 'model.nf', 'training.recipe', 'seed')
_MUST_NEED_THE_SWITCH = ('training.num_steps', 'training.s1', 'optim.learning_rate')
_MUST_BE_FREE = ('training.log_every_steps', 'checkpoint.every_steps', 'checkpoint.max_to_keep', 'eval.every_steps',
                 'eval.batch_size', 'parallel.mode', 'data.num_workers', 'sampling.num_samples',
                 'sampling.shard_size', 'training.steps_per_dispatch')


def _another_value(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + 1
  if isinstance(value, str):
    return value + '_changed'
  return (*value, value[-1] if value else 1)


def _resume_outcome(key):
  """'refused', 'needs the switch' or 'resumes' for a resume whose config differs from the saved one in `key`."""
  saved = config_checks.default_config()
  config = config_checks.default_config()
  section, _, name = key.rpartition('.')
  node = config[section] if section else config
  with node.ignore_type():
    node[name] = _another_value(node[name])
  try:
    config_checks.check_resume_compatible(saved.to_dict(), config)
  except errors.ConfigError as e:
    assert key in str(e), str(e)
    if '--allow_schedule_change' not in str(e):
      return 'refused'
    config_checks.check_resume_compatible(saved.to_dict(), config, allow_schedule_change=True)
    return 'needs the switch'
  return 'resumes'


@pytest.mark.parametrize('key', sorted(config_checks.flatten(config_checks.default_config())))
def test_changing_each_key_on_resume_follows_its_rule(key):
  from immiscible_jax import resume_rules  # pylint: disable=g-import-not-at-top
  outcome = _resume_outcome(key)
  expected = {'shape': 'refused', 'experiment': 'refused', 'schedule': 'needs the switch', 'free': 'resumes'}
  assert outcome == expected[resume_rules.RULES[key][0]]
  if key in _MUST_REFUSE:
    assert outcome == 'refused'
  if key in _MUST_NEED_THE_SWITCH:
    assert outcome == 'needs the switch'
  if key in _MUST_BE_FREE:
    assert outcome == 'resumes'


def test_resume_rules_cover_every_key_and_the_docs_show_them():
  from immiscible_jax import resume_rules  # pylint: disable=g-import-not-at-top
  assert set(resume_rules.RULES) == set(config_checks.flatten(config_checks.default_config()))
  assert set(_MUST_REFUSE + _MUST_NEED_THE_SWITCH + _MUST_BE_FREE) <= set(resume_rules.RULES)
  docs = open(os.path.join(_ROOT, 'docs', 'reliability.md')).read()
  assert resume_rules.markdown() in docs, 'regenerate with: python -m immiscible_jax.resume_rules'
