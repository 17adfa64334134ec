"""The CPU-scale evidence study (configs/sweeps/cifar10_small_study.py): arms are valid, paired by seed, and run.

Paired seeds: with the same seed, arms that differ only in the assignment see the same data order, the same base
noise and noise levels, and start from the same parameters. Checked here on the study's own configs (data) and on
the tiny config (a training step), so a change that lets the assignment settings leak into another random stream
fails a test.
"""
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from immiscible_jax import config_checks
from immiscible_jax import data
from immiscible_jax import models
from immiscible_jax import train
from immiscible_jax import train_state
from immiscible_jax.evaluation import runs
from launch import report_stats
from launch import sweep

STUDY = 'configs/sweeps/cifar10_small_study.py'


def _arm_config(overrides):
  config_spec, _ = sweep.load_sweep(STUDY)
  config = sweep.load_config(config_spec)
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope='module')
def arms():
  return dict(sweep.load_sweep(STUDY)[1])


def test_every_arm_is_valid_and_has_its_paired_baseline(arms):
  for name, overrides in arms.items():
    config = _arm_config(overrides)
    config_checks.validate(config)
    # Same number of images for every batch size; evaluation at the same number of images.
    assert config.training.num_steps * config.training.batch_size == 800 * 128
    assert config.eval.every_steps * config.training.batch_size == 100 * 128
    base = report_stats.baseline_of(name, 'assign=none')
    assert base in arms, name
    differing = {k for k in set(overrides) | set(arms[base]) if overrides.get(k) != arms[base].get(k)}
    assert differing <= {k for k in overrides if k.startswith('assignment.')}, name  # only the assignment


def test_paired_arms_read_the_same_batches(arms):
  none, exact = (arms[f'size=16,batch=128,assign={a},seed=1'] for a in ('none', 'exact_l2'))
  other_seed = arms['size=16,batch=128,assign=exact_l2,seed=2']

  def batches(overrides):
    config = _arm_config(overrides)
    config.data.random_flip = True
    iterator = data.create_train_iterator(config.data, 8, config.seed, process_index=0, process_count=1)
    return np.stack([next(iterator)['image'] for _ in range(3)])

  with tfds.testing.mock_data(num_examples=32):
    a, b, c = batches(none), batches(exact), batches(other_seed)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def _run(tmp_path, name, **overrides):
  config = tiny.get_config()
  config.update_from_flattened_dict({'training.num_steps': 2, 'training.log_every_steps': 1,
                                     'assignment.scope': 'global', **overrides})
  train.train_and_evaluate(config, str(tmp_path / name))
  return [json.loads(line) for line in (tmp_path / name / 'metrics.jsonl').read_text().splitlines()]


def test_paired_arms_share_initial_parameters_and_base_noise(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  # The same images with the same base noise give the same distance before assignment at every step (and the
  # distance is not a constant: it changes from step to step with the batch and the noise).
  none = _run(tmp_path, 'none', **{'assignment.method': 'none', 'seed': 3})
  exact = _run(tmp_path, 'exact', **{'assignment.method': 'jv', 'seed': 3})
  assert [a['step'] for a in none] == [b['step'] for b in exact] == [1, 2]
  for a, b in zip(none, exact):
    assert a['assignment/distance_before'] == b['assignment/distance_before']
    assert b['assignment/distance_after'] < b['assignment/distance_before']
    # jv reports that it finished within its caps (always: it is exact) and its loop depth; 'none' has no solver.
    assert b['assignment/converged'] == 1.0 and b['assignment/sequential_steps'] > 0
    assert 'assignment/converged' not in a
  assert none[0]['assignment/distance_before'] != none[1]['assignment/distance_before']
  # Initial parameters depend on the seed alone (built as train_and_evaluate builds them from scratch).
  inits = []
  for method, seed in (('none', 3), ('jv', 3), ('jv', 4)):
    config = tiny.get_config()
    config.update_from_flattened_dict({'assignment.method': method, 'seed': seed})
    model = models.create_model(config.model, config.data.channels)
    init = train_state.initializer(config, model, train_state.create_optimizer(config.optim))
    inits.append(jax.tree_util.tree_leaves(jax.jit(init)(train_state.run_keys(config.seed)[0]).params))
  for a, b in zip(inits[0], inits[1]):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, c) for a, c in zip(inits[0], inits[2]))


def test_one_study_arm_runs_two_steps_with_evaluation(arms, tmp_path, monkeypatch):
  # Reference statistics of mock images must not land in the user's cache under a real dataset's name.
  monkeypatch.setenv('IMMISCIBLE_JAX_CACHE', str(tmp_path / 'cache'))
  config = _arm_config(arms['size=16,batch=128,assign=exact_l2,seed=0'])
  config.update_from_flattened_dict({
      'training.num_steps': 2, 'training.log_every_steps': 1, 'eval.every_steps': 2, 'eval.num_samples': 64,
      'eval.batch_size': 32, 'eval.reference_num_images': 64, 'checkpoint.every_steps': 2})
  with tfds.testing.mock_data(num_examples=256):  # the evaluator (built as main.py builds it) reads it too
    train.train_and_evaluate(config, str(tmp_path / 'arm'), evaluator=runs.TrainingEvaluator(config))
  rows = [json.loads(line) for line in (tmp_path / 'arm' / 'metrics.jsonl').read_text().splitlines()]
  assert np.isfinite([r['eval/fd_pixels'] for r in rows if 'eval/fd_pixels' in r]).all()
  assert [r['step'] for r in rows if 'eval/fd_pixels' in r] == [2]
  assert json.loads((tmp_path / 'arm' / 'done.json').read_text()) == {'step': 2}


CT_LPIPS_STUDY = 'configs/sweeps/cifar10_small_ct_lpips.py'


def test_every_ct_lpips_arm_is_valid_and_paired_with_its_loss_and_seed():
  """The CT-LPIPS study: 5 LPIPS seeds and 3 squared-L2 seeds of none vs exact L2, every arm CT with its
  baseline (assign=none, same loss and seed) differing in the assignment only; 8 evaluations per arm."""
  config_spec, plan = sweep.load_sweep(CT_LPIPS_STUDY)
  arms = dict(plan)
  assert sorted(n for n in arms if n.startswith('loss=lpips,assign=none')) == [
      f'loss=lpips,assign=none,seed={s}' for s in range(5)]
  assert sum(n.startswith('loss=l2,') for n in arms) == 6
  for name, overrides in arms.items():
    config = sweep.load_config(config_spec)
    config.update_from_flattened_dict(overrides)
    config_checks.validate(config)
    assert config.training.recipe == 'ct' and config.training.loss == name.split(',')[0].split('=')[1]
    assert config.training.num_steps == 8 * config.eval.every_steps
    base = report_stats.baseline_of(name, 'assign=none')
    differing = {k for k in set(overrides) | set(arms[base]) if overrides.get(k) != arms[base].get(k)}
    assert differing <= {k for k in overrides if k.startswith('assignment.')}, name
