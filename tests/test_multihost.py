"""Two processes on this host, joined by jax.distributed with 4 forced CPU devices each, train the tiny config.

What only several processes can break: every process must end with the same parameters, and with the
parameters one process with all 8 devices reaches on the same global batches (noise, noise levels and the
assignment are functions of the global example index); the 'global' noise assignment must solve one problem over
all processes' devices; the checkpoint that process 0 writes must restore in every process, and when one process
cannot read the newest step, all must restore the same earlier one; the evaluation split over processes must
give the one-process metric; only process 0 may write metrics; parallel.mode='shard_map' (global arrays built
from each process's rows) must train as 'pmap' does; a SIGTERM to one process must stop both at the same step,
each saving it (JAX's preemption sync point, agreement.StopPoints). The processes are started by launch.multiprocess (its
environment, output prefixes and failure handling) and set up by the trainer's own
main._maybe_initialize_distributed; each runs this file as its driver:

  python tests/test_multihost.py WORKDIR OUT_DIR     (with the launcher's environment)
"""
import faulthandler
import io
import json
import os
import sys

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES, CPU_DEVICES = 2, 4
NUM_STEPS, CKPT_EVERY, LOG_EVERY = 6, 3, 2
# The assignment check's global batch: 2 rows per device over all 8 devices, digits-sized rows.
ASSIGN_ROWS, ROW_SHAPE = 16, (8, 8, 1)
# The preempted run: long enough that only the stop can end it; process 1 signals itself at this dispatch.
PREEMPT_NUM_STEPS, PREEMPT_AT_DISPATCH = 1000, 2
# A hung collective must fail the test, not stall the suite: a process still running after this long prints its
# Python stacks and exits 1, and the launcher then stops the other one.
PROCESS_TIMEOUT_S = 420


def _config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.training.num_steps = NUM_STEPS
  config.training.log_every_steps = LOG_EVERY
  config.checkpoint.every_steps = CKPT_EVERY
  config.assignment.method = 'jv'  # exact (the optimality check below needs it); compiles faster than 'hungarian'
  config.assignment.scope = 'global'
  config.eval.every_steps = NUM_STEPS  # once, at the end: the metric of the split evaluation
  config.eval.num_samples = 50  # not a multiple of the process count: unequal shares
  return config


def _assignment_problem():
  rng = np.random.RandomState(0)
  images = rng.uniform(-1.0, 1.0, (ASSIGN_ROWS, *ROW_SHAPE)).astype(np.float32)
  noise = rng.standard_normal((ASSIGN_ROWS, *ROW_SHAPE)).astype(np.float32)
  return images, noise


def _named_leaves(prefix, tree):
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {f'{prefix}{jax.tree_util.keystr(path)}': np.asarray(leaf) for path, leaf in leaves}


def drive(workdir, out_dir):
  """One process's part: train, restore the last checkpoint, run the global assignment alone; save to out_dir."""
  faulthandler.dump_traceback_later(PROCESS_TIMEOUT_S, exit=True)
  from immiscible_jax import main as entry  # pylint: disable=g-import-not-at-top
  entry._maybe_initialize_distributed()  # pylint: disable=protected-access  # the trainer's own set-up
  import jax  # pylint: disable=g-import-not-at-top
  from immiscible_jax import assignment, checkpointing, data, train  # pylint: disable=g-import-not-at-top
  from immiscible_jax.evaluation import runs  # pylint: disable=g-import-not-at-top

  config = _config()
  final = train.train_and_evaluate(config, workdir, evaluator=runs.TrainingEvaluator(config))
  sharded = config.copy_and_resolve_references()
  sharded.parallel.mode = 'shard_map'
  sharded.eval.every_steps = 0
  final_shard_map = train.train_and_evaluate(sharded, os.path.join(out_dir, 'shard_map'))
  # Restore: the state written by process 0 alone.
  manager = checkpointing.create_manager(workdir, config.checkpoint, read_only=True)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), final)
  checkpoint_step, restored, _ = checkpointing.restore(manager, abstract, step=NUM_STEPS)
  # Process 1 alone cannot read the newest step (an I/O error): both must fall back to the same earlier step.
  read_meta = checkpointing.read_meta

  def flaky_read_meta(manager, step):
    if jax.process_index() == 1 and step == NUM_STEPS:
      raise OSError('injected: transient read error')
    return read_meta(manager, step)

  checkpointing.read_meta = flaky_read_meta
  fallback_messages = []
  fallback_step, _, _ = checkpointing.restore(manager, abstract, log=fallback_messages.append)
  checkpointing.read_meta = read_meta
  lock_outcomes = _lock_outcomes(os.path.join(out_dir, 'locked'))
  batch = next(data.create_train_iterator(config.data, config.training.batch_size, config.seed))
  preempted_step, preempted_committed = _preempted_run(config, os.path.join(out_dir, 'preempted'))

  # The assignment alone, on a known global batch: this process feeds the rows of its own devices.
  cfg = config.assignment.copy_and_resolve_references()
  cfg.dtype = 'float32'  # the reference solve sees the same costs
  images, noise = _assignment_problem()
  n_local, rows = jax.local_device_count(), ASSIGN_ROWS // jax.device_count()
  mine = slice(jax.process_index() * n_local * rows, (jax.process_index() + 1) * n_local * rows)
  local = lambda x: x[mine].reshape(n_local, rows, *ROW_SHAPE)

  def assign(x, n):
    out, _ = assignment.assign_noise(x, n, jax.random.key(0), cfg, axis_name=train.AXIS)
    return out, jax.lax.axis_index(train.AXIS)

  assigned, axis_index = jax.device_get(jax.pmap(assign, axis_name=train.AXIS)(local(images), local(noise)))
  np.savez(os.path.join(out_dir, f'process_{jax.process_index()}.npz'),
           process_count=jax.process_count(), device_count=jax.device_count(), checkpoint_step=checkpoint_step,
           assigned=np.asarray(assigned).reshape(-1, *ROW_SHAPE), axis_index=np.asarray(axis_index),
           fallback_step=fallback_step, fallback_messages=np.array(fallback_messages),
           lock_outcomes=np.array(lock_outcomes), preempted_step=preempted_step,
           preempted_committed=preempted_committed,
           example_id=batch['example_id'],
           **_named_leaves('final', final), **_named_leaves('restored', restored),
           **_named_leaves('shard_map', final_shard_map))


def _lock_outcomes(lockdir):
  """The workdir lock as main.py takes it, in every process: first free (all go on), then held by another
  trainer (here process 0's own second lock on it): all are refused, with process 0's message."""
  import jax  # pylint: disable=g-import-not-at-top
  from immiscible_jax import errors, workdir_lock  # pylint: disable=g-import-not-at-top
  os.makedirs(lockdir, exist_ok=True)
  outcomes = []
  with workdir_lock.hold(lockdir):
    outcomes.append('went on')
  # pylint: disable-next=protected-access
  other = workdir_lock._acquire(lockdir, print) if jax.process_index() == 0 else None
  try:
    with workdir_lock.hold(lockdir):
      outcomes.append('went on')
  except errors.ConfigError as e:
    outcomes.append(f'refused: {e}')
  if other:
    other()
  return outcomes


def _preempted_run(config, workdir):
  """Trains towards PREEMPT_NUM_STEPS; process 1 sends itself SIGTERM at its PREEMPT_AT_DISPATCH-th dispatch
  (JAX's preemption notifier takes it; only process 1 is signalled). Returns the step this process stopped at,
  and whether that step's checkpoint is committed."""
  import signal  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from immiscible_jax import train  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.training.num_steps = PREEMPT_NUM_STEPS
  config.checkpoint.every_steps = PREEMPT_NUM_STEPS // 2
  config.eval.every_steps = 0
  make = train.make_train_steps

  def make_signalling(*args, **kwargs):
    steps, calls = make(*args, **kwargs), []

    def step(d_state, d_batches):
      calls.append(1)
      if jax.process_index() == 1 and len(calls) == PREEMPT_AT_DISPATCH:
        os.kill(os.getpid(), signal.SIGTERM)
      return steps(d_state, d_batches)

    step.lower = steps.lower
    return step

  train.make_train_steps = make_signalling
  try:
    step = int(train.train_and_evaluate(config, workdir).step)
  finally:
    train.make_train_steps = make
  return step, os.path.exists(os.path.join(workdir, 'checkpoints', str(step), 'commit_success.txt'))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  from launch import multiprocess  # pylint: disable=g-import-not-at-top
  workdir, out_dir = tmp_path_factory.mktemp('workdir'), tmp_path_factory.mktemp('out')
  argv = [sys.executable, os.path.abspath(__file__), str(workdir), str(out_dir)]
  commands = multiprocess.process_commands(argv, NUM_PROCESSES, multiprocess.free_port(), CPU_DEVICES)
  for command in commands:
    command.env.update(IMMISCIBLE_JAX_CACHE=str(out_dir / 'cache'))  # reference statistics: written by process 0
  log = io.StringIO()
  statuses = multiprocess.run_processes(commands, log)
  (out_dir / 'output.txt').write_text(log.getvalue())
  quiet = '\n'.join(line for line in log.getvalue().splitlines() if '[Gloo]' not in line)  # one per device
  assert statuses == [0] * NUM_PROCESSES, f'statuses {statuses}; output:\n{quiet[-12000:]}'
  results = [dict(np.load(out_dir / f'process_{i}.npz')) for i in range(NUM_PROCESSES)]
  return workdir, results, log.getvalue()


def _prefixed(result, prefix):
  return {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}


def test_processes_form_one_pmap_axis_in_process_order(run):
  _, results, _ = run
  for i, result in enumerate(results):
    assert result['process_count'] == NUM_PROCESSES
    assert result['device_count'] == NUM_PROCESSES * CPU_DEVICES
    # train.py's global example index assumes process i holds the i-th block of the pmap axis.
    np.testing.assert_array_equal(result['axis_index'], np.arange(i * CPU_DEVICES, (i + 1) * CPU_DEVICES))


def test_processes_end_with_identical_trained_parameters(run):
  _, (first, second), _ = run
  final0, final1 = _prefixed(first, 'final'), _prefixed(second, 'final')
  assert final0.keys() == final1.keys() and len(final0) > 10
  for name in final0:  # each process trained on its own half of every batch
    np.testing.assert_array_equal(final0[name], final1[name], err_msg=name)
  assert int(final0['.step']) == NUM_STEPS
  # The EMA started at the initial parameters and lags: unequal means the parameters moved.
  params = [k for k in final0 if k.startswith('.params')]
  assert any(not np.array_equal(final0[k], final0['.ema_params' + k[len('.params'):]]) for k in params)


def test_one_process_with_all_devices_trains_and_evaluates_the_same(run, tmp_path):
  from immiscible_jax import train  # pylint: disable=g-import-not-at-top
  from immiscible_jax.evaluation import runs  # pylint: disable=g-import-not-at-top
  workdir, (first, _), _ = run
  config = _config()
  # This pytest process: 1 process x 8 devices, the same global batches; dropout is 0 in the tiny config.
  single = train.train_and_evaluate(config, str(tmp_path), evaluator=runs.TrainingEvaluator(config))
  two_processes = _prefixed(first, 'final')
  # Same examples on the same global devices; only the cross-device sum of the gradients differs in order
  # (in-process all-reduce vs gloo across processes), so float32 rounding: 1.5e-8 at most, measured.
  for name, leaf in _named_leaves('', single).items():
    np.testing.assert_allclose(leaf, two_processes[name], rtol=1e-5, atol=1e-6, err_msg=name)
  metric = lambda d: [json.loads(line) for line in open(d / 'metrics.jsonl') if 'eval/fd_pixels' in line][-1]
  # The split evaluation: each process drew and scored its share, the moments were summed over processes.
  np.testing.assert_allclose(metric(workdir)['eval/fd_pixels'], metric(tmp_path)['eval/fd_pixels'], rtol=1e-9)


def test_each_process_holds_its_block_of_the_global_batch(run):
  _, results, _ = run
  per_process = _config().training.batch_size // NUM_PROCESSES
  for i, result in enumerate(results):
    np.testing.assert_array_equal(result['example_id'], np.arange(i * per_process, (i + 1) * per_process))


def test_shard_map_mode_trains_as_pmap_mode(run):
  """Same parameters as the pmap run to float32 rounding (two XLA programs; tests/test_train.py: SAME_STEPS),
  and bitwise the same in both processes."""
  _, (first, second), _ = run
  pmap0, shard0, shard1 = _prefixed(first, 'final'), _prefixed(first, 'shard_map'), _prefixed(second, 'shard_map')
  assert shard0.keys() == pmap0.keys() and int(shard0['.step']) == NUM_STEPS
  for name in pmap0:
    np.testing.assert_allclose(shard0[name], pmap0[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(shard0[name], shard1[name], err_msg=name)


def test_global_assignment_is_the_optimal_permutation_of_the_global_batch(run):
  _, results, _ = run
  images, noise = _assignment_problem()
  assigned = np.concatenate([r['assigned'] for r in results])  # process order = global row order
  flat = lambda x: x.reshape(len(x), -1).astype(np.float64)
  cost = ((flat(images)[:, None, :] - flat(noise)[None, :, :]) ** 2).sum(-1)
  rows, cols = linear_sum_assignment(cost)
  np.testing.assert_array_equal(rows, np.arange(ASSIGN_ROWS))
  np.testing.assert_array_equal(assigned, noise[cols])  # one permutation of the whole batch, the optimal one
  half = ASSIGN_ROWS // NUM_PROCESSES
  assert (cols[:half] >= half).any() and (cols[half:] < half).any()  # noise crossed between processes
  assert cost[rows, cols].sum() < np.trace(cost)


def test_checkpoint_restores_in_every_process_and_fallbacks_are_agreed(run):
  workdir, results, _ = run
  for result in results:
    assert int(result['checkpoint_step']) == NUM_STEPS
    final, restored = _prefixed(result, 'final'), _prefixed(result, 'restored')
    assert final.keys() == restored.keys()
    for name in final:  # written by process 0 alone, read back by each process
      np.testing.assert_array_equal(restored[name], final[name], err_msg=name)
    # Process 1 could not read the newest step: both restored the same earlier one, and said why.
    assert int(result['fallback_step']) == NUM_STEPS - CKPT_EVERY
    assert len(result['fallback_messages']) == 1
  assert f'step {NUM_STEPS}: unreadable on process(es) [1]' in str(results[0]['fallback_messages'][0])
  assert 'OSError: injected' in str(results[1]['fallback_messages'][0])
  steps = sorted(int(name) for name in os.listdir(workdir / 'checkpoints') if name.isdigit())
  assert steps == list(range(CKPT_EVERY, NUM_STEPS + 1, CKPT_EVERY))
  assert json.loads((workdir / 'done.json').read_text()) == {'step': NUM_STEPS}


def test_a_sigterm_to_one_process_stops_both_at_the_same_saved_step(run):
  _, results, log = run
  steps = [int(r['preempted_step']) for r in results]
  assert steps[0] == steps[1] and PREEMPT_AT_DISPATCH <= steps[0] < PREEMPT_NUM_STEPS, steps
  assert all(bool(r['preempted_committed']) for r in results)
  assert f'[proc 0] preempted: saved step {steps[0]} to ' in log


def test_only_process_zero_writes_metrics(run):
  workdir, _, log = run
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [line['step'] for line in lines if 'eval/fd_pixels' in line] == [NUM_STEPS]
  lines = [line for line in lines if 'train/loss' in line]
  logged = set(range(LOG_EVERY, NUM_STEPS + 1, LOG_EVERY)) | set(range(CKPT_EVERY, NUM_STEPS + 1, CKPT_EVERY))
  assert [line['step'] for line in lines] == sorted(logged)  # each step once: one writer
  assert all(np.isfinite(line['train/loss']) for line in lines)
  assert '[proc 0] step ' in log and '[proc 1] step ' not in log


def test_processes_agree_on_the_workdir_lock(run):
  """Process 0 takes the lock for the run; the others follow its outcome (issue 21, case 3)."""
  _, results, _ = run
  for result in results:
    went, refused = result['lock_outcomes']
    assert went == 'went on' and refused.startswith('refused: ') and 'another trainer is running in it' in refused
  assert results[0]['lock_outcomes'][1] == results[1]['lock_outcomes'][1]  # one decision, process 0's


if __name__ == '__main__':
  sys.path.insert(0, ROOT)  # `from configs import ...` and the package, from any working directory
  drive(*sys.argv[1:])
