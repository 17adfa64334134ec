"""Training steps on the tiny config: device-count invariance, parallel modes, steps per call, gradient
accumulation, the CT target update, the loop (save before evaluate, one compilation, resume across modes).
Learning, sampling and eval modes on a longer run: test_train_run.py."""
import json
import math

import jax
import numpy as np
import pytest

from configs import tiny
from immiscible_jax import assignment
from immiscible_jax import data
from immiscible_jax import models
from immiscible_jax import train
from immiscible_jax import train_state
from immiscible_jax.evaluation import runs
from immiscible_jax.parallel import layouts


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
                    'training.s0': S0, 'training.s1': S1, 'training.mu0': MU0, 'assignment.method': 'jv',
                    'assignment.scope': 'global', 'assignment.dtype': 'float32'})
  model = models.create_model(config.model, config.data.channels)
  optimizer = train_state.create_optimizer(config.optim)
  state = jax.jit(train_state.initializer(config, model, optimizer))(jax.random.key(0))
  state = jax.device_get(state.replace(
      step=np.int32(K_AT), target_params=jax.tree_util.tree_map(lambda p: p + 1.0, state.params),
      ema_params=jax.tree_util.tree_map(lambda p: p - 1.0, state.params)))
  batches = [next(it) for it in [data.create_train_iterator(config.data, 16, 0)] for _ in range(3)]
  by_devices = {n: layouts.PmapLayout(jax.local_devices()[:n]) for n in (1, 8)}
  steps = {n: (by_devices[n], train.make_train_steps(model, optimizer, config, by_devices[n])) for n in (1, 8)}
  return config, state, batches, steps, (model, optimizer)


def test_eight_devices_match_one_device_on_the_same_global_batch(ct_steps):
  _, state, batches, steps, _ = ct_steps
  (one, m_one), (eight, m_eight) = [_run_steps(*steps[n], state, batches) for n in (1, 8)]
  for a, b in zip(_leaves((one.params, one.target_params)), _leaves((eight.params, eight.target_params))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(m_one['train/loss'], m_eight['train/loss'], rtol=1e-4)
  np.testing.assert_allclose(m_one['assignment/distance_after'], m_eight['assignment/distance_after'],
                             rtol=1e-5)
  assert (m_one['assignment/distance_after'] < m_one['assignment/distance_before']).all()


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
  shard_map = layouts.ShardMapLayout()
  three = config.copy_and_resolve_references()
  three.training.steps_per_dispatch = 3
  compared = {
      'shard_map, 1 step per call': _run_steps(
          shard_map, train.make_train_steps(model, optimizer, config, shard_map), state, batches),
      'pmap, 3 steps per call': _run_steps(
          pmap8, train.make_train_steps(model, optimizer, three, pmap8), state, batches, 3),
  }
  for name, (result, metrics) in compared.items():
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

  def __call__(self, state, step, between_batches):
    del between_batches  # one batch, no stop to check
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
                    'eval.every_steps': 4, 'checkpoint.every_steps': 4, 'assignment.method': 'jv'})
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
  _, saved, _ = runs.restore_ema_params(config, str(tmp_path / 'resumed'), step=8)
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


def test_a_scanned_step_on_cpu_is_announced_at_start_up():
  """k > 1 steps per call and gradient accumulation put the step in a lax.scan, which XLA:CPU runs several
  times slower (train.train_steps): said at start-up on CPU, not elsewhere, and not for k = 1."""
  for k, accum, backend, said in ((1, 1, 'cpu', None), (4, 1, 'cpu', 'training.steps_per_dispatch=4'),
                                  (1, 2, 'cpu', 'training.grad_accum_steps=2'), (4, 2, 'gpu', None)):
    note = train.cpu_scan_note(_tiny(**{'training.steps_per_dispatch': k, 'training.grad_accum_steps': accum}),
                               backend)
    assert (note is None) if said is None else (said in note and 'slower' in note), (k, accum, backend, note)


class _StopBeforeCompiling(Exception):
  pass


def test_one_image_per_assignment_problem_is_announced_at_start_up(tmp_path, monkeypatch, capsys):
  """Issue 21, case 13: with local scope and one image per device, every exact method leaves the noise as drawn
  (reduction 0.0%) and the run said nothing. The loop is stopped where it would compile the step."""
  monkeypatch.setattr(train, 'make_train_steps', lambda *a, **k: (_ for _ in ()).throw(_StopBeforeCompiling()))
  with pytest.raises(_StopBeforeCompiling):
    train.train_and_evaluate(_tiny(**{'training.batch_size': 8, 'assignment.method': 'jv'}), str(tmp_path / 'run'))
  out = capsys.readouterr().out
  assert 'one image per assignment problem' in out and 'scope=global' in out and 'knn' in out, out
  # 8 forced devices: batch 8 is one image per device; the note names what to change, and is absent otherwise.
  for method, batch, scope, devices, said in (('jv', 8, 'local', 8, 'scope=global'),
                                              ('auction', 8, 'local', 8, 'scope=global'),
                                              ('jv', 1, 'local', 1, 'knn'), ('jv', 16, 'local', 8, None),
                                              ('jv', 8, 'global', 8, None), ('knn', 8, 'local', 8, None),
                                              ('none', 8, 'local', 8, None)):
    config = _tiny(**{'training.batch_size': batch, 'assignment.method': method, 'assignment.scope': scope})
    note = assignment.problem_size_note(config, devices)
    assert (note is None) if said is None else (said in note), (method, batch, scope, note)
