"""What a person sees while a run compiles and trains: a start-up summary, the compilation announced and timed,
images/s and the ETA without the compilation, and at the end where the outputs are and what to run next.

The train step is a stand-in (no step is compiled) and the loop's clock a fake one. The stand-in plays a device:
its first call "compiles" for 1000 s in the caller (as XLA does), every step then takes 2 s of device time after
its dispatch, and the host's waits for the device move the clock to when the device is done. So the expected
numbers are exact, whatever the machine's load.
"""
import json
import re

import jax.numpy as jnp
import pytest

from fake_steps import METRICS
from fake_steps import tiny_config
from immiscible_jax import metric_writer
from immiscible_jax import train
from immiscible_jax.parallel import layouts

COMPILE_S, STEP_S = 1000.0, 2.0


class _Clock:
  """Stands in for the `time` module of the loop and of the metric writer."""

  def __init__(self):
    self.now = 1e9

  def time(self):
    return self.now


class _ClockedSteps:
  """train.make_train_steps' stand-in and the device it runs on: the first call compiles (the clock moves on), each
  call queues k steps of device time; wait() (layouts.wait_until_ready's stand-in) moves the clock to when the
  device has done all it was given."""

  def __init__(self, clock):
    self.clock, self.calls, self.device_free = clock, 0, 0.0

  def make(self, model, optimizer, config, layout, loss_params=None):
    del model, optimizer, layout, loss_params
    k = config.training.steps_per_dispatch

    def step(d_state, d_batches):
      del d_batches
      self.calls += 1
      if self.calls == 1:
        self.clock.now += COMPILE_S
      self.device_free = max(self.device_free, self.clock.now) + k * STEP_S
      return d_state, {name: jnp.ones((1,)) for name in METRICS}

    return step

  def wait(self, tree):
    del tree
    self.clock.now = max(self.clock.now, self.device_free)


@pytest.fixture(name='clocked')
def _clocked(monkeypatch):
  """The loop on the fake clock and its stand-in device."""
  clock = _Clock()
  monkeypatch.setattr(train, 'time', clock)
  monkeypatch.setattr(metric_writer, 'time', clock)
  steps = _ClockedSteps(clock)
  monkeypatch.setattr(train, 'make_train_steps', steps.make)
  monkeypatch.setattr(layouts, 'wait_until_ready', steps.wait)
  return steps


def test_the_console_announces_compilation_and_counts_time_without_it(tmp_path, clocked, capsys):
  del clocked
  config = tiny_config(**{'training.num_steps': 8, 'training.log_every_steps': 2, 'checkpoint.every_steps': 8,
                          'assignment.method': 'jv'})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir, config_name='configs/tiny.py')
  out = capsys.readouterr().out
  lines = out.splitlines()
  start = next(line for line in lines if line.startswith('run: '))
  assert start.startswith('run: configs/tiny.py: iCT with pseudo_huber, 8 steps of batch 16 on 8 cpu devices, '
                          'assignment jv (sqeuclidean, local scope); from scratch in ' + workdir), start
  assert 'compiling the train step (1 step per call) ...' in lines
  assert f'compiled in {COMPILE_S:.1f} s' in lines
  # Every window of 2 steps took 2 x 2 s of device time: 16 images / 2 s each, the compilation left out.
  rows = [json.loads(line) for line in open(f'{workdir}/metrics.jsonl')]
  assert [r['step'] for r in rows] == [2, 4, 6, 8]
  assert [r['perf/images_per_sec'] for r in rows] == [16 / STEP_S] * 4
  # The ETA counts from the end of the compilation: at step 2, 6 steps of 2 s are left.
  assert re.search(r'^step 2/8 loss=1 reduction=0\.00% img/s=8 eta 12s$', out, re.MULTILINE), out
  end = out[out.index('done: 8 steps'):]
  assert f'{workdir}/checkpoints' in end and f'{workdir}/metrics.jsonl' in end
  assert f'python -m immiscible_jax.main --workdir={workdir} --mode=sample' in end and '--mode=eval' in end


def test_a_stopped_run_says_how_to_resume(tmp_path, clocked, capsys):
  del clocked
  config = tiny_config(**{'training.num_steps': 8, 'training.log_every_steps': 2, 'checkpoint.every_steps': 8})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir, stop_at_step=4)
  out = capsys.readouterr().out
  assert f'stopped at step 4 of 8; the same command resumes from {workdir}/checkpoints' in out
  assert 'done:' not in out
