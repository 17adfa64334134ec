"""A stop that stops (issue 21, case 7): the host runs a bounded number of dispatches ahead of the device, a second
Ctrl-C leaves while the device is still busy, and a preemption during an in-loop evaluation stops between
evaluation batches (the step's checkpoint is already saved when evaluation starts).

The device is made slow or stuck from here, not by hooks in the code under test: train.make_train_steps is
replaced by a stand-in (tests/fake_steps.py, or a computation that never ends) whose every dispatch runs a real
XLA:CPU computation, asynchronously dispatched as the real step is; no train step is compiled.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading

import jax
import numpy as np

from fake_steps import SlowSteps
from fake_steps import tiny_config as _config
from immiscible_jax import train
from immiscible_jax.evaluation import runs

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def test_the_host_dispatches_at_most_two_calls_ahead_of_the_device(tmp_path, monkeypatch):
  """No log, save or evaluation inside the run (all at its last step), so only the run-ahead bound can make the
  host wait: when dispatch n is made, every dispatch before n - 1 has finished."""
  steps = SlowSteps(iterations=40)
  monkeypatch.setattr(train, 'make_train_steps', steps.make)
  config = _config(**{'training.num_steps': 8, 'training.log_every_steps': 8, 'checkpoint.every_steps': 8})
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert len(steps.finished_before) == 8
  for n, finished in enumerate(steps.finished_before):
    assert finished >= n - 1, (n, steps.finished_before)


# `python -c` program: immiscible_jax.main with every train dispatch running an XLA computation that never ends (a
# while loop whose condition stays true), as if the device were stuck in a very slow step. It is compiled and run
# once with a bound that ends it first: XLA:CPU runs a program's first call in the caller's thread, later calls
# asynchronously (as the real step is dispatched).
_STUCK_DEVICE_MAIN = """
import runpy
import jax, jax.numpy as jnp
from immiscible_jax import train
names = ('train/loss', 'train/grad_norm', 'assignment/distance_before', 'assignment/distance_after')
spin = lambda x, bound: jax.lax.while_loop(lambda y: y[0, 0] < bound, lambda y: jnp.tanh(y @ y) * 0.5 + 0.5, x)
never = jax.jit(lambda x, bound: {n: spin(x, bound)[0, :1] for n in names})
x = jnp.zeros((64, 64))
jax.block_until_ready(never(x, 0.0))
def make_train_steps(model, optimizer, config, layout, loss_params=None):
  calls = []
  def step(d_state, d_batches):
    calls.append(1)
    print(f'test: dispatched {len(calls)}', flush=True)
    return d_state, never(x, 2.0)
  return step
train.make_train_steps = make_train_steps
runpy.run_module('immiscible_jax.main', run_name='__main__', alter_sys=True)
"""


def _expect_line(proc, pattern, lines, timeout_s):
  """Reads the subprocess's output until a line matches; fails (and kills it) after timeout_s seconds."""
  timer = threading.Timer(timeout_s, proc.kill)
  timer.start()
  try:
    for line in proc.stdout:
      lines.append(line)
      if re.search(pattern, line):
        return
  finally:
    timer.cancel()
  raise AssertionError(f'{pattern!r} never appeared within {timeout_s} s; output:\n' + ''.join(lines[-40:]))


def test_a_second_ctrl_c_leaves_while_the_device_is_still_busy(tmp_path):
  """The device never finishes a step. The first Ctrl-C is acknowledged at once (the main thread is not stuck in a
  device wait, so the handler runs) and a second one ends the process promptly, unsaved, with status 130."""
  flags = ['--config=configs/tiny.py', f'--workdir={tmp_path / "run"}', '--config.training.num_steps=100',
           '--config.training.log_every_steps=2', '--config.checkpoint.every_steps=50']
  proc = subprocess.Popen([sys.executable, '-c', _STUCK_DEVICE_MAIN, *flags], cwd=_ROOT, text=True,
                          env={**os.environ, 'PYTHONUNBUFFERED': '1'}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  lines = []
  try:
    _expect_line(proc, r'^test: dispatched 2$', lines, timeout_s=240)  # start-up and init compile
    proc.send_signal(signal.SIGINT)
    _expect_line(proc, r'Ctrl-C again', lines, timeout_s=30)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
  finally:
    proc.kill()
  lines.append(out)
  text = ''.join(lines)
  assert proc.returncode == 130, text[-4000:]
  assert 'aborted' in text and 'Traceback' not in text, text[-4000:]
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints' / '2')  # nothing saved


def test_a_preemption_during_evaluation_stops_between_evaluation_batches(tmp_path, monkeypatch):
  """SIGTERM arrives while the in-loop evaluation of step 4 draws its second batch of samples (of 8): the
  evaluation stops after that batch, nothing is logged for it, and the run leaves with step 4's checkpoint
  (saved before the evaluation began)."""
  monkeypatch.setenv('IMMISCIBLE_JAX_CACHE', str(tmp_path / 'cache'))
  steps = SlowSteps(iterations=0)
  monkeypatch.setattr(train, 'make_train_steps', steps.make)
  config = _config(**{'training.num_steps': 12, 'training.log_every_steps': 2, 'checkpoint.every_steps': 4,
                      'eval.every_steps': 4, 'eval.num_samples': 64, 'eval.batch_size': 1})
  evaluator = runs.TrainingEvaluator(config)
  sampler, calls = evaluator._sampler, []  # pylint: disable=protected-access

  def sampler_that_gets_preempted(*args):
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return sampler(*args)

  evaluator._sampler = sampler_that_gets_preempted  # pylint: disable=protected-access
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir), evaluator=evaluator)
  per_call = jax.local_device_count() * config.eval.batch_size
  assert config.eval.num_samples // per_call == 8 and len(calls) == 2
  assert sorted(int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit()) == [4]
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [2, 4] and not any('eval/fd_pixels' in r for r in rows)
  assert np.isfinite(rows[-1]['train/loss'])
