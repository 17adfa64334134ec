"""End-to-end training on the tiny config: device-count invariance, parallel modes, steps per call, gradient
accumulation, the CT target update, the loop (save before evaluate, one compilation, resume across modes),
learning, sampling mode."""
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
import pytest

from configs import default
from configs import tiny
from immiscible_jax import consistency
from immiscible_jax import data
from immiscible_jax import errors
from immiscible_jax import evaluators
from immiscible_jax import models
from immiscible_jax import replicas
from immiscible_jax import sampling
from immiscible_jax import saved_config
from immiscible_jax import train
from immiscible_jax import train_state


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _tiny(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


# CT schedule of the module's CT steps: at step K_AT of NUM_STEPS, N(k) = 8 levels.
K_AT, NUM_STEPS, S0, S1, MU0 = 10, 20, 2, 10, 0.9


def _run_steps(layout, train_fn, state, batches, k=1):
  """Feeds `batches` (host dicts) k per dispatch from `state`: (host state, host metrics {name: [steps]})."""
  d_state, metrics = layout.put_state(state), []
  for i in range(0, len(batches), k):
    d_state, m = train_fn(d_state, layout.put_batches(_stack(batches[i:i + k])))
    metrics.append(layout.host(m))
  return layout.host(d_state), {name: np.concatenate([m[name] for m in metrics]) for name in metrics[0]}


def _stack(batches):
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)


@pytest.fixture(scope='module')
def ct_steps():
  """A CT run's pieces, shared by the tests below (so each step compiles once): the config, the state at step
  K_AT with a target and an EMA away from the online parameters (so that every update's weights show), three
  batches, the pmapped one-step function on one device and on all eight (with its layout), model, optimizer."""
  # 'global' scope: the assignment is over the whole batch either way, so both layouts solve one problem.
  config = _tiny(**{'training.recipe': 'ct', 'training.loss': 'l2', 'training.num_steps': NUM_STEPS,
                    'training.s0': S0, 'training.s1': S1, 'training.mu0': MU0, 'assignment.method': 'hungarian',
                    'assignment.scope': 'global', 'assignment.dtype': 'float32'})
  model = models.create_model(config.model, config.data.channels)
  optimizer = train_state.create_optimizer(config.optim)
  state = jax.jit(train_state.initializer(config, model, optimizer))(jax.random.key(0))
  state = jax.device_get(state.replace(
      step=np.int32(K_AT), target_params=jax.tree_util.tree_map(lambda p: p + 1.0, state.params),
      ema_params=jax.tree_util.tree_map(lambda p: p - 1.0, state.params)))
  batches = [next(it) for it in [data.create_train_iterator(config.data, 16, 0)] for _ in range(3)]
  layouts = {n: replicas.PmapLayout(jax.local_devices()[:n]) for n in (1, 8)}
  steps = {n: (layouts[n], train.make_train_steps(model, optimizer, config, layouts[n])) for n in (1, 8)}
  return config, state, batches, steps, (model, optimizer)


def test_eight_devices_match_one_device_on_the_same_global_batch(ct_steps):
  config, state, batches, steps, _ = ct_steps
  (one, m_one), (eight, m_eight) = [_run_steps(*steps[n], state, batches) for n in (1, 8)]
  for a, b in zip(_leaves((one.params, one.target_params)), _leaves((eight.params, eight.target_params))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(m_one['train/loss'], m_eight['train/loss'], rtol=1e-4)
  np.testing.assert_allclose(m_one['assignment/distance_after'], m_eight['assignment/distance_after'],
                             rtol=1e-5)
  assert (m_one['assignment/distance_after'] < m_one['assignment/distance_before']).all()
  assert config.assignment.scope == 'global'


# Tolerance between programs that compute the same float32 steps: each (mode, steps per dispatch) is its own XLA
# program, whose fusions may order float32 sums differently, so results agree to rounding, not bitwise (measured:
# at most 1.2e-7, one ulp near 1, after 4 steps of the tiny model).
SAME_STEPS = dict(rtol=1e-5, atol=1e-6)


def test_shard_map_mode_and_steps_per_dispatch_match_pmap_step_by_step(ct_steps):
  """On all 8 devices: jit + shard_map one step per call, and pmap three steps per call (one lax.scan), give
  the pmap one-step run's states and every step's metrics."""
  config, state, batches, steps, (model, optimizer) = ct_steps
  pmap8 = steps[8][0]
  reference, m_reference = _run_steps(*steps[8], state, batches)
  shard_map = replicas.ShardMapLayout()
  three = config.copy_and_resolve_references()
  three.training.steps_per_dispatch = 3
  runs = {
      'shard_map, 1 step per call': _run_steps(
          shard_map, train.make_train_steps(model, optimizer, config, shard_map), state, batches),
      'pmap, 3 steps per call': _run_steps(
          pmap8, train.make_train_steps(model, optimizer, three, pmap8), state, batches, 3),
  }
  for name, (result, metrics) in runs.items():
    assert int(result.step) == K_AT + 3, name
    for a, b in zip(_leaves(reference), _leaves(result)):
      np.testing.assert_allclose(b, a, **SAME_STEPS, err_msg=name)
    for key, values in m_reference.items():
      assert metrics[key].shape == (3,), (name, key)  # every step's metrics, not only the call's last
      np.testing.assert_allclose(metrics[key], values, rtol=1e-5, err_msg=f'{name}: {key}')
  assert len(set(m_reference['train/loss'].tolist())) == 3  # three different steps, in order


def test_gradient_accumulation_equals_one_large_batch(ct_steps):
  """grad_accum_steps=4 over a batch of 64 (4 micro-batches of 16, 2 rows per device each) takes the same step
  as one batch of 64: the noise is drawn and (exact, global Hungarian) assigned over all 64 rows in both, and the
  mean of four micro-batch gradients is the batch gradient. Tolerance: float32 summation order (4 partial sums
  instead of one), far below what assigning per micro-batch would change."""
  config, state, _, steps, (model, optimizer) = ct_steps
  layout = steps[8][0]
  batch = next(data.create_train_iterator(config.data, 64, 1))
  results = {}
  for accum in (1, 4):
    big = config.copy_and_resolve_references()
    big.training.batch_size, big.training.grad_accum_steps, big.model.dropout = 64, accum, 0.0
    results[accum] = _run_steps(layout, train.make_train_steps(model, optimizer, big, layout), state, [batch])
  (one, m_one), (four, m_four) = results[1], results[4]
  for a, b in zip(_leaves(one), _leaves(four)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  for key in ('train/loss', 'train/grad_norm', 'train/update_norm', 'assignment/distance_after'):
    np.testing.assert_allclose(m_four[key], m_one[key], rtol=1e-5, err_msg=key)
  assert m_one['assignment/distance_after'] < m_one['assignment/distance_before']
  assert any(not np.allclose(a, b) for a, b in zip(_leaves(one.params), _leaves(state.params)))  # it moved theta


def test_one_ct_step_moves_the_target_by_mu_of_n_k(ct_steps):
  """theta^- <- mu theta^- + (1 - mu) theta with mu = exp(s0 log mu0 / N(k)), N(k) from the CT schedule at the
  state's step k; the EMA likewise with training.ema_rate. Computed here from the formulas, on one device."""
  config, before, batches, steps, _ = ct_steps
  after, metrics = _run_steps(*steps[1], before, batches[:1])
  k, big_k = K_AT, NUM_STEPS
  n_k = math.ceil(math.sqrt(k / big_k * ((S1 + 1) ** 2 - S0 ** 2) + S0 ** 2) - 1) + 1   # CT's N(k): 8 here
  mu = math.exp(S0 * math.log(MU0) / n_k)
  assert int(after.step) == k + 1 and float(metrics['train/num_scales'][0]) == n_k
  online = _leaves(after.params)
  assert any(not np.allclose(a, b) for a, b in zip(online, _leaves(before.params)))  # the step moved theta
  mu_anchor = math.exp(S0 * math.log(MU0) / (n_k - 1))  # with the JAX anchor's N(k) - 1 in the exponent
  for new, old, theta in zip(_leaves(after.target_params), _leaves(before.target_params), online):
    np.testing.assert_allclose(new, mu * old + (1 - mu) * theta, rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(new - (mu_anchor * old + (1 - mu_anchor) * theta))) > 1e-3  # distinguishable
  rate = config.training.ema_rate
  for new, old, theta in zip(_leaves(after.ema_params), _leaves(before.ema_params), online):
    np.testing.assert_allclose(new, rate * old + (1 - rate) * theta, rtol=1e-6, atol=1e-6)


class _Evaluator:
  """Records (step, state) and returns the EMA parameters' mean; raises at step `fail_at` (a crash or OOM)."""

  def __init__(self, fail_at=None):
    self.calls, self.fail_at = [], fail_at

  def __call__(self, state, step):
    self.calls.append((step, state))
    if step == self.fail_at:
      raise RuntimeError(f'evaluator failed at step {step}')
    return {'eval/ema_mean': float(np.mean(np.concatenate([x.ravel() for x in _leaves(state.ema_params)])))}


def test_loop_saves_before_evaluating_compiles_once_and_resumes_across_modes(tmp_path, monkeypatch):
  """Two steps per call, a log every call, an evaluation and a save every 4 steps. A straight pmap run; a
  shard_map run whose evaluator crashes at step 8 (a step that also saves), resumed in pmap mode from that
  checkpoint. Each train_and_evaluate traces its k-step function once (so compiles it once) whatever it logs,
  evaluates, saves or restores; the resumed run ends where the straight one does (to rounding: two modes)."""
  config = _tiny(**{'training.num_steps': 12, 'training.steps_per_dispatch': 2, 'training.log_every_steps': 2,
                    'eval.every_steps': 4, 'checkpoint.every_steps': 4, 'assignment.method': 'hungarian'})
  traces, real = [], train.train_steps
  monkeypatch.setattr(train, 'train_steps', lambda *args, **kw: (traces.append(1), real(*args, **kw))[1])

  def run(name, mode, evaluator):
    config.parallel.mode = mode
    before = len(traces)
    try:
      return train.train_and_evaluate(config, str(tmp_path / name), evaluator=evaluator)
    finally:
      assert len(traces) - before == 1, (name, mode, len(traces) - before)

  straight = run('straight', 'pmap', _Evaluator())
  crashing = _Evaluator(fail_at=8)
  with pytest.raises(RuntimeError, match='evaluator failed at step 8'):
    run('resumed', 'shard_map', crashing)
  # Step 8's save was finished before the evaluator ran, and holds the state the evaluator was given.
  _, saved, _ = evaluators.restore_ema_params(config, str(tmp_path / 'resumed'), step=8)
  assert [s for s, _ in crashing.calls] == [4, 8]
  for a, b in zip(_leaves(saved), _leaves(crashing.calls[-1][1].ema_params)):
    np.testing.assert_array_equal(a, b)
  resumed = run('resumed', 'pmap', _Evaluator())
  assert int(resumed.step) == int(straight.step) == 12
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_allclose(b, a, **SAME_STEPS)
  assert json.loads((tmp_path / 'resumed' / 'done.json').read_text()) == {'step': 12}
  rows = [json.loads(line) for line in open(tmp_path / 'resumed' / 'metrics.jsonl')]
  assert [r['step'] for r in rows if 'train/loss' in r] == [2, 4, 6, 8, 10, 12]  # one log per call, no gap
  assert [r['step'] for r in rows if 'eval/ema_mean' in r] == [4, 12]  # step 8's evaluation crashed


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A few hundred steps of the tiny config with the pixel metric evaluated along the way, as main.py runs it
  (the evaluator built first and handed to the trainer); also the trainer's wall time in seconds."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = _tiny(**{'training.num_steps': 300, 'training.log_every_steps': 50, 'optim.learning_rate': 2e-3,
                    'training.ema_rate': 0.99, 'eval.every_steps': 150, 'eval.num_samples': 256,
                    'checkpoint.every_steps': 150, 'assignment.method': 'hungarian'})
  evaluator = evaluators.TrainingEvaluator(config)
  start = time.time()
  train.train_and_evaluate(config, workdir, evaluator=evaluator)
  wall = time.time() - start
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return config, workdir, rows, wall


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
  config, workdir, rows, wall = trained_run
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
  # Throughput is images over the time of their own window: the windows' times, recovered from it, add up to
  # the training part of the run's wall time (not the set-up before the loop nor the evaluations).
  window_times = [50 * config.training.batch_size / r['perf/images_per_sec'] for r in train_rows]
  assert 0.3 * wall < sum(window_times) < wall, (window_times, wall)


def test_sample_mode_writes_npz_and_grid_from_the_checkpoint(trained_run, capsys):
  config, workdir, _, _ = trained_run
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


def test_sample_and_eval_take_the_run_config_from_its_checkpoint(trained_run):
  config, workdir, _, _ = trained_run
  # No --config: the saved one, with its non-default model.nf, learning rate and assignment, tuples as tuples.
  saved = saved_config.for_inference(workdir, config.checkpoint)
  for section in ('data', 'model', 'training', 'assignment', 'optim', 'eval'):  # (sampling: changed above)
    assert saved[section].to_dict() == config[section].to_dict(), section
  assert saved.model.nf != default.get_config().model.nf
  # A --config may change sampling/eval settings and moved data paths, nothing that shapes the trained model.
  given = ml_collections.ConfigDict(config.to_dict())
  given.sampling.num_samples, given.eval.num_samples, given.checkpoint.max_to_keep = 7, 9, 1
  merged = saved_config.for_inference(workdir, config.checkpoint, step=150, given=given)
  assert (merged.sampling.num_samples, merged.eval.num_samples) == (7, 9)
  assert merged.checkpoint.max_to_keep == config.checkpoint.max_to_keep  # ignored: not an inference key
  drifted = ml_collections.ConfigDict(given.to_dict())
  drifted.model.nf, drifted.training.ema_rate = 16, 0.5
  with pytest.raises(errors.ConfigError) as err:
    saved_config.for_inference(workdir, config.checkpoint, given=drifted)
  message = str(err.value)
  assert 'model.nf (saved 8, given 16)' in message and 'training.ema_rate (saved 0.99, given 0.5)' in message
  assert 'sampling.num_samples' not in message.split('differ')[0] and 'unreadable' not in message
  with pytest.raises(errors.ConfigError, match='--step=7: no checkpoint at that step'):
    saved_config.for_inference(workdir, config.checkpoint, step=7)


def test_eval_mode_scores_fresh_samples_and_a_saved_sample_set(trained_run, tmp_path):
  config, workdir, _, _ = trained_run
  fresh = evaluators.evaluate(config, workdir)
  assert fresh['step'] == 300 and fresh['num_samples'] == config.eval.num_samples
  assert np.isfinite(fresh['eval/fd_pixels']) and fresh['eval/fd_pixels'] > 0
  assert json.load(open(os.path.join(workdir, 'eval_300.json')))['eval/fd_pixels'] == fresh['eval/fd_pixels']
  # The reference images themselves, saved as a sample archive, are at distance ~0 from their own statistics.
  real = data.load_images(config.data, config.eval.reference_split, config.eval.reference_num_images)
  path = sampling.save_samples(real, str(tmp_path / 'real'))[0]
  scored = evaluators.evaluate(config, workdir, samples_path=path)
  assert scored['eval/fd_pixels'] < 1e-6 < fresh['eval/fd_pixels']


def test_bfloat16_compute_learns_like_float32(trained_run, tmp_path):
  """The run of `trained_run` with model.dtype='bfloat16' (activations and convolutions in bfloat16; parameters,
  optimizer, head and loss in float32), stopped at its first evaluation (step 150) to halve the cost: its pixel FD
  there is within 10% of float32's. Measured once: 8.150 vs 8.156 at step 150 (and 6.157 vs 6.065 at 300), so 10%
  leaves room for bfloat16's rounding sending the run down another path, while a run that learned less (float32's
  own FD still falls by a quarter from step 150 to 300) or not at all lands outside it."""
  config, _, rows, _ = trained_run
  config = config.copy_and_resolve_references()
  config.model.dtype = 'bfloat16'
  train.train_and_evaluate(config, str(tmp_path), evaluator=evaluators.TrainingEvaluator(config), stop_at_step=150)
  fd = lambda rs: {r['step']: r['eval/fd_pixels'] for r in rs if 'eval/fd_pixels' in r}
  bf16 = fd(json.loads(line) for line in open(tmp_path / 'metrics.jsonl'))
  f32 = fd(rows)
  assert list(bf16) == [150] and 150 in f32
  assert abs(bf16[150] - f32[150]) <= 0.1 * f32[150], (bf16, f32)
