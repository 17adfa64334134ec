"""End-to-end training on the tiny config: device-count invariance, exact resume, learning, sampling mode."""
import functools
import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from immiscible_jax import consistency
from immiscible_jax import data
from immiscible_jax import evaluators
from immiscible_jax import models
from immiscible_jax import sampling
from immiscible_jax import train


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _tiny(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def test_eight_devices_match_one_device_on_the_same_global_batch():
  method = 'hungarian'
  # 'global' scope: the assignment is over the whole batch either way, so both layouts solve one problem.
  config = _tiny(**{'assignment.method': method, 'assignment.scope': 'global', 'assignment.dtype': 'float32'})
  model = models.create_model(config.model, config.data.channels)
  optimizer = train.create_optimizer(config.optim)
  state = jax.jit(functools.partial(train.create_train_state, model=model, image_shape=(8, 8, 1),
                                    optimizer=optimizer, recipe='ct'))(jax.random.key(0))
  batches = [next(it) for it in [data.create_train_iterator(config.data, 16, 0)] for _ in range(3)]
  results = []
  for devices in (jax.local_devices()[:1], jax.local_devices()):
    p_step = train.make_p_train_step(model, optimizer, config, devices=devices)
    p_state = train.replicate(state, devices)
    for batch in batches:
      p_state, metrics = p_step(p_state, train.shard_batch(batch, len(devices)))
    results.append((jax.device_get(jax.tree_util.tree_map(lambda x: x[0], p_state)),
                    jax.device_get(jax.tree_util.tree_map(lambda x: x[0], metrics))))
  (one, m_one), (eight, m_eight) = results
  for a, b in zip(_leaves(one.params), _leaves(eight.params)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(m_one['train/loss'], m_eight['train/loss'], rtol=1e-4)
  np.testing.assert_allclose(m_one['assignment/distance_after'], m_eight['assignment/distance_after'],
                             rtol=1e-5)
  assert m_one['assignment/distance_after'] < m_one['assignment/distance_before']


def test_resumed_run_is_bit_identical_to_uninterrupted(tmp_path):
  config = _tiny(**{'training.num_steps': 12, 'checkpoint.every_steps': 4, 'assignment.method': 'hungarian'})
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  first = train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at_step=6)
  assert int(first.step) == 6
  assert not (tmp_path / 'resumed' / 'done.json').exists()
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert int(resumed.step) == int(straight.step) == 12
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert json.loads((tmp_path / 'resumed' / 'done.json').read_text()) == {'step': 12}
  steps = [json.loads(line)['step'] for line in open(tmp_path / 'resumed' / 'metrics.jsonl')]
  assert steps == sorted(steps) and steps[-1] == 12


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A few hundred steps of the tiny config with the pixel metric evaluated along the way."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = _tiny(**{'training.num_steps': 300, 'training.log_every_steps': 50, 'optim.learning_rate': 2e-3,
                    'training.ema_rate': 0.99, 'eval.every_steps': 150, 'eval.num_samples': 256,
                    'checkpoint.every_steps': 150, 'assignment.method': 'hungarian'})
  train.train_and_evaluate(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return config, workdir, rows


def _denoising_error(config, params, images):
  """Mean squared error of f(x + sigma z, sigma) against x at moderate noise levels (fixed noise)."""
  model = models.create_model(config.model, 1)
  errors = []
  for i, sigma in enumerate((0.5, 1.0, 2.0)):
    z = jax.random.normal(jax.random.key(100 + i), images.shape)
    out = consistency.denoise(model.apply, params, images + sigma * z, np.full((len(images),), sigma, np.float32),
                              0.002, 0.5)
    errors.append(float(np.mean((np.asarray(out) - images) ** 2)))
  return np.mean(errors)


def test_training_learns_to_denoise_and_logs_evaluations(trained_run):
  config, workdir, rows = trained_run
  images = data.load_images(config.data, 'train', 256).astype(np.float32) / 127.5 - 1.0
  _, trained, _ = evaluators.restore_ema_params(config, workdir)
  model = models.create_model(config.model, 1)
  untrained = model.init(jax.random.key(3), images[:1], np.zeros((1,), np.float32))['params']
  before, after = _denoising_error(config, untrained, images), _denoising_error(config, trained, images)
  assert after < 0.6 * before, (before, after)
  evals = [(r['step'], r['eval/fd_pixels']) for r in rows if 'eval/fd_pixels' in r]
  assert [s for s, _ in evals] == [150, 300] and all(np.isfinite(v) and v > 0 for _, v in evals)
  train_rows = [r for r in rows if 'train/loss' in r]
  assert [r['step'] for r in train_rows] == [50, 100, 150, 200, 250, 300]
  assert all(np.isfinite(r['train/loss']) for r in train_rows)
  assert all(r['assignment/reduction_pct'] > 0 for r in train_rows)
  assert all(r['perf/images_per_sec'] > 0 for r in train_rows)


def test_sample_mode_writes_npz_and_grid_from_the_checkpoint(trained_run, capsys):
  config, workdir, _ = trained_run
  config.sampling.num_samples = 20
  config.sampling.shard_size = 8
  paths, grid = evaluators.sample_from_checkpoint(config, workdir)
  assert len(paths) == 3 and os.path.exists(grid)
  images = sampling.load_samples(os.path.dirname(paths[0]))
  assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8
  assert grid in capsys.readouterr().out
  again, _ = evaluators.sample_from_checkpoint(config, workdir, step=300)
  np.testing.assert_array_equal(sampling.load_samples(os.path.dirname(again[0])), images)
  config.sampling.seed = 2
  other = evaluators._generate_from_checkpoint(config, workdir, None, 20)[1]  # pylint: disable=protected-access
  assert np.any(other != images)


def test_eval_mode_scores_fresh_samples_and_a_saved_sample_set(trained_run, tmp_path):
  config, workdir, _ = trained_run
  fresh = evaluators.evaluate(config, workdir)
  assert fresh['step'] == 300 and fresh['num_samples'] == config.eval.num_samples
  assert np.isfinite(fresh['eval/fd_pixels']) and fresh['eval/fd_pixels'] > 0
  assert json.load(open(os.path.join(workdir, 'eval_300.json')))['eval/fd_pixels'] == fresh['eval/fd_pixels']
  # The reference images themselves, saved as a sample archive, are at distance ~0 from their own statistics.
  real = data.load_images(config.data, config.eval.reference_split, config.eval.reference_num_images)
  path = sampling.save_samples(real, str(tmp_path / 'real'))[0]
  scored = evaluators.evaluate(config, workdir, samples_path=path)
  assert scored['eval/fd_pixels'] < 1e-6 < fresh['eval/fd_pixels']
