"""Fault injection on the tiny config: SIGTERM, SIGKILL mid-commit, corrupt checkpoints, config drift, NaN.

Signals go to `python -m immiscible_jax.main` subprocesses; references and resumes run in process. The faults
are injected from here, not by hooks in the code under test: the blocked commit by patching Orbax in the
subprocess (_BLOCKED_COMMIT_MAIN), the NaN by feeding one NaN batch to the training loop.
Every run shares one schedule (training.num_steps = 1000; the schedules depend on it) and leaves early, so a
resumed run and the uninterrupted reference (module fixture, steps 0-12, checkpoints at 4, 8, 12) can be
compared bit for bit. Bad input is in tests/test_validation.py.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from configs import tiny
from immiscible_jax import checkpointing
from immiscible_jax import errors
from immiscible_jax import models
from immiscible_jax import train
from immiscible_jax import train_state
from immiscible_jax.parallel import agreement
from immiscible_jax.parallel import preemption
import command_line

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
_OVERRIDES = {'training.num_steps': 1000, 'training.log_every_steps': 2, 'checkpoint.every_steps': 4,
              'checkpoint.max_to_keep': 10}
_END = 12  # Every run here is compared at this step.
# A subprocess that says nothing for this long is killed (and its test fails) instead of hanging the suite.
_WATCHDOG_S = 300


def _config(**extra):
  config = tiny.get_config()
  for key, value in {**_OVERRIDES, **extra}.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


# `python -c` program: immiscible_jax.main, with Orbax's commit (the rename of <step>.orbax-checkpoint-tmp to
# <step>) of the step given as the first argument held open forever, as if the process were killed mid-write.
_BLOCKED_COMMIT_MAIN = """
import runpy, sys, threading
import orbax.checkpoint as ocp
blocked = sys.argv.pop(1)
rename = ocp.path.atomicity.AtomicRenameTemporaryPath
commit = rename.finalize
async def finalize(self):
  if self.get_final().name == blocked:
    print(f'test: step {blocked} is written to {self.get()} and blocked before its commit', flush=True)
    threading.Event().wait()  # until the test kills the process
  await commit(self)
rename.finalize = finalize
runpy.run_module('immiscible_jax.main', run_name='__main__', alter_sys=True)
"""


def _start(workdir, block_commit_at=None):
  """`python -m immiscible_jax.main` on the tiny config in a subprocess, stdout and stderr merged; with
  block_commit_at, the same through _BLOCKED_COMMIT_MAIN."""
  flags = [f'--config.{k}={v}' for k, v in _OVERRIDES.items()]
  full_env = {**os.environ, 'JAX_PLATFORMS': 'cpu',  # XLA_FLAGS: conftest.py's
              'PYTHONUNBUFFERED': '1'}
  program = ['-m', 'immiscible_jax.main'] if block_commit_at is None else ['-c', _BLOCKED_COMMIT_MAIN,
                                                                          str(block_commit_at)]
  proc = subprocess.Popen([sys.executable, *program, '--config=configs/tiny.py', f'--workdir={workdir}', *flags],
                          cwd=_ROOT, env=full_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  timer = threading.Timer(_WATCHDOG_S, proc.kill)
  timer.daemon = True
  timer.start()
  return proc


def _read_until(proc, pattern):
  """Reads the subprocess's output line by line until `pattern` matches; returns (match, lines so far)."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    match = re.search(pattern, line)
    if match:
      return match, lines
  raise AssertionError(f'{pattern!r} never appeared; output:\n' + ''.join(lines))


def _abstract_state(config):
  model = models.create_model(config.model, config.data.channels)
  init = train_state.initializer(config, model, train_state.create_optimizer(config.optim))
  return jax.eval_shape(init, train_state.run_keys(config.seed)[0])


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def _saved(workdir, step):
  """The train state saved at `step`, as a list of numpy leaves (read with Orbax directly)."""
  manager = checkpointing.create_manager(workdir, _config().checkpoint, read_only=True)
  _, state, _ = checkpointing.restore(manager, _abstract_state(_config()), step=step)
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def _assert_identical(workdir, reference, step):
  got, want = _saved(workdir, step), _saved(reference, step)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run: steps 0-12 in process, checkpoints 4, 8 and 12."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  train.train_and_evaluate(_config(), workdir, stop_at_step=_END)
  assert _steps(workdir) == [4, 8, 12]
  return workdir


def test_sigterm_saves_the_current_step_exits_0_and_resumes_bit_identically(reference, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  proc = _start(workdir)
  _read_until(proc, r'^step \d+/1000 ')  # Training has made progress (a metrics line).
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  saved = re.findall(r'^preempted: saved step (\d+) to (\S+); exiting$', out, re.MULTILINE)
  assert len(saved) == 1, out
  step, where = int(saved[0][0]), saved[0][1]
  assert where == os.path.join(workdir, 'checkpoints')
  assert 2 <= step < _END, out  # The signal came after the first metrics line, long before step 12.
  assert _steps(workdir)[-1] == step and os.path.exists(os.path.join(where, str(step), 'commit_success.txt'))
  assert 'Traceback' not in out
  capsys.readouterr()
  train.train_and_evaluate(_config(), workdir, stop_at_step=_END)
  assert f'resumed from step {step} in {workdir}' in capsys.readouterr().out
  _assert_identical(workdir, reference, _END)


def test_sigkill_during_a_checkpoint_commit_resumes_from_the_previous_step(reference, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  proc = _start(workdir, block_commit_at=8)
  match, _ = _read_until(proc, r'test: step 8 is written to (\S+) and blocked before its commit')
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  # The window really is open: step 8's data sits in its temporary directory, its final directory is absent.
  assert match.group(1) == os.path.join(ckpt_dir, '8.orbax-checkpoint-tmp')
  assert os.path.isdir(match.group(1)) and not os.path.exists(os.path.join(ckpt_dir, '8'))
  proc.kill()
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  # Orbax's save() of step 12 waits for step 8's commit, so nothing later can have been committed either.
  assert _steps(workdir) == [4] and os.path.isdir(os.path.join(ckpt_dir, '8.orbax-checkpoint-tmp'))
  capsys.readouterr()
  train.train_and_evaluate(_config(), workdir, stop_at_step=8)
  assert f'resumed from step 4 in {workdir}' in capsys.readouterr().out
  assert _steps(workdir) == [4, 8]
  assert not os.path.exists(os.path.join(ckpt_dir, '8.orbax-checkpoint-tmp'))  # The partial step is gone.
  _assert_identical(workdir, reference, 8)


def _truncate_files(step_dir):
  for folder, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      if name != 'commit_success.txt':
        path = os.path.join(folder, name)
        os.truncate(path, os.path.getsize(path) // 2)


def _delete_arrays(step_dir):
  shutil.rmtree(os.path.join(step_dir, 'state', 'ocdbt.process_0'))


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


def _flip_bytes(step_dir):
  """Inverts 16 bytes in the middle of the largest array file: Orbax itself reads that back without error."""
  folder = os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd')
  path = max((os.path.join(folder, n) for n in os.listdir(folder)), key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(16)
    f.seek(-len(chunk), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))


@pytest.mark.parametrize('corrupt', [_truncate_files, _delete_arrays, _empty, _flip_bytes],
                         ids=lambda f: f.__name__[1:])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_step(reference, tmp_path, corrupt):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  corrupt(os.path.join(workdir, 'checkpoints', '12'))
  manager = checkpointing.create_manager(workdir, _config().checkpoint)
  messages = []
  step, state, _ = checkpointing.restore(manager, _abstract_state(_config()), log=messages.append)
  assert step == 8 and int(state.step) == 8
  assert len(messages) == 1 and messages[0].startswith('checkpoint at step 12 is unreadable, trying an earlier')
  for a, b in zip(jax.tree_util.tree_leaves(state), _saved(reference, 8)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(reference, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  for step in (4, 8, 12):
    _truncate_files(os.path.join(workdir, 'checkpoints', str(step)))
  with pytest.raises(RuntimeError, match=r'no readable checkpoint in .*checkpoints:\n  step 12: .*\n  step 8: '
                                         r'.*\n  step 4: .*\nMove the directory away to start from scratch'):
    train.train_and_evaluate(_config(), workdir)
  assert _steps(workdir) == [4, 8, 12]  # Nothing was written over them.


def test_config_drift_is_refused_with_the_differing_keys(reference, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  base = _config()
  # The recipe, ch_mult and clipping on/off change the state's tree structure, nf only its shapes, the batch
  # size neither: each is named, and none is mistaken for a corrupt checkpoint.
  changes = {'training.recipe': {'ct': 'ict', 'ict': 'ct'}[base.training.recipe],
             'model.nf': 2 * base.model.nf, 'model.ch_mult': (*base.model.ch_mult, 2),
             'training.batch_size': 2 * base.training.batch_size,
             'optim.grad_clip': 0.0 if base.optim.grad_clip > 0 else 1.0}
  with pytest.raises(errors.ConfigError) as err:
    train.train_and_evaluate(_config(**changes, **{'training.log_every_steps': 3}), workdir)
  message = str(err.value)
  assert message.startswith('cannot resume: the workdir holds a run whose config differs') and '\n' not in message
  for key, now in changes.items():
    saved = base[key.split('.')[0]][key.split('.')[1]]
    saved = list(saved) if isinstance(saved, tuple) else saved  # The saved config went through JSON.
    assert f'{key} (saved {saved!r}, now {now!r})' in message
  assert 'log_every_steps' not in message and 'unreadable' not in message
  assert _steps(workdir) == [4, 8, 12]


def test_schedule_changes_need_the_switch_and_harmless_changes_resume(reference, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  # The saved run was configured for 1000 steps (and left at 12); ending it at 13 instead moves N(k) under it:
  # refused, naming the key and the switch.
  ends_at_13 = _config(**{'training.num_steps': 13, 'training.log_every_steps': 1})
  with pytest.raises(errors.ConfigError, match=r'training\.num_steps \(saved 1000, now 13\).*--allow_schedule_change'):
    train.train_and_evaluate(ends_at_13, workdir)
  with pytest.raises(errors.ConfigError, match=r'training\.s1 \(saved'):
    train.train_and_evaluate(_config(**{'training.s1': 2 * _config().training.s1}), workdir)
  assert _steps(workdir) == [4, 8, 12]
  capsys.readouterr()
  final = train.train_and_evaluate(ends_at_13, workdir, allow_schedule_change=True)  # the documented switch
  assert f'resumed from step 12 in {workdir}' in capsys.readouterr().out
  assert int(final.step) == 13 and _steps(workdir) == [4, 8, 12, 13]
  assert json.loads(open(os.path.join(workdir, 'done.json')).read()) == {'step': 13}


def test_nan_loss_stops_with_the_step_window_and_leaves_checkpoints_intact(reference, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  # The batch of the update from step 9 to 10 is all NaN (float32: uint8 has no NaN), so that step's loss and
  # gradients are; steps 9-10 are one logging window (every 2 steps).
  fed, stack_batches = [], train.stack_batches

  def nan_batch_at_step_9(data_iter, k):
    batch = stack_batches(data_iter, k)
    fed.append(batch)
    return {**batch, 'image': np.full(batch['image'].shape, np.nan, np.float32)} if len(fed) == 10 else batch

  monkeypatch.setattr(train, 'stack_batches', nan_batch_at_step_9)
  with pytest.raises(train.NonFiniteError, match=r'non-finite loss or gradients between steps 9 and 10 '
                                                 r'.*the last checkpoint, step 8, is untouched'):
    train.train_and_evaluate(_config(), workdir)
  assert len(fed) == 11  # It stopped at the first log after the NaN (batch 11 was already prefetched).
  assert _steps(workdir) == [4, 8]  # Nothing at or after the NaN.
  _assert_identical(workdir, reference, 8)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows] == [2, 4, 6, 8, 10]
  assert all(np.isfinite(r['train/loss']) for r in rows[:-1]) and np.isnan(rows[-1]['train/loss'])


def test_second_sigint_aborts_at_once():
  previous = signal.getsignal(signal.SIGINT)
  flag = preemption.install()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert flag.signalled and agreement.StopPoints(flag).reached()
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    flag.uninstall()
  assert signal.getsignal(signal.SIGINT) is previous


def test_sample_and_eval_do_not_apply_the_training_device_check(reference, tmp_path, monkeypatch, capfd):
  """Issue 21, case 11: the run trained batch 16 on 8 devices; sampling it where 6 devices are seen must work,
  since sampling never uses training.batch_size (training there is still refused)."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  monkeypatch.setattr(jax, 'device_count', lambda *args: 6)
  assert command_line.run_cli([f'--workdir={workdir}', '--mode=sample']) == 0, capfd.readouterr()
  assert os.path.exists(os.path.join(workdir, 'samples', f'step_{_END}_1step', 'grid.png'))
  capfd.readouterr()
  code = command_line.run_cli(['--config=configs/tiny.py', f'--workdir={workdir}'])
  command_line.assert_one_line_error(code, ''.join(capfd.readouterr()),
                                     'must be divisible by the number of devices (6)')


def test_done_json_is_written_only_when_the_final_checkpoint_reads_back(tmp_path, monkeypatch):
  """Issue 21, case 1: with `[1]` in the workdir Orbax skipped the merge of its per-process array index (a warning
  only), so no checkpoint read back, yet the run wrote done.json. The same failure is injected here by skipping
  that merge; the run must stop without done.json, naming the step."""
  from orbax.checkpoint._src.serialization import ocdbt_utils  # pylint: disable=g-import-not-at-top

  async def skip_merge(*args, **kwargs):
    del args, kwargs

  monkeypatch.setattr(ocdbt_utils, 'merge_ocdbt_per_process_files', skip_merge)
  workdir = str(tmp_path / 'run')
  with pytest.raises(checkpointing.UnreadableCheckpointError, match=r'final checkpoint \(step 4\) does not read back'):
    train.train_and_evaluate(_config(**{'training.num_steps': 4}), workdir)
  assert _steps(workdir) == [4] and not os.path.exists(os.path.join(workdir, 'done.json'))


def test_sample_and_eval_fall_back_past_a_corrupt_newest_meta_saying_which_step(reference, tmp_path, capfd):
  """Issue 21, case 8: training fell back past a corrupt meta/metadata, --mode=sample and --mode=eval ended in a
  JSONDecodeError traceback."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  with open(os.path.join(workdir, 'checkpoints', str(_END), 'meta', 'metadata'), 'w') as f:
    f.write('{"config": {"seed"')
  for mode in ('sample', 'eval'):
    capfd.readouterr()
    assert command_line.run_cli([f'--workdir={workdir}', f'--mode={mode}']) == 0, capfd.readouterr()
    out = ''.join(capfd.readouterr())
    assert f'checkpoint at step {_END} is unreadable' in out and 'Traceback' not in out, out
  assert os.path.exists(os.path.join(workdir, 'samples', 'step_8_1step', 'grid.png'))
  assert [n for n in os.listdir(workdir) if n.startswith('eval_8_')]


def test_evaluations_of_one_step_keep_every_metric_and_flag_small_sample_sets(reference, tmp_path):
  """Issue 21, case 5: a second metric of the same step replaced the first's eval_<step>.json; an FD on fewer
  samples than feature dimensions carried no warning."""
  from immiscible_jax.evaluation import runs  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  small = _config(**{'eval.num_samples': 16})  # 16 samples of 8x8x1 = 64 pixel features
  pooled = _config(**{'eval.num_samples': 128, 'eval.pixel_downsample': 2})  # 128 samples, 16 features
  first, second = runs.evaluate(small, workdir), runs.evaluate(pooled, workdir)
  written = sorted(n for n in os.listdir(workdir) if n.startswith('eval_'))
  assert len(written) == 2, written
  by_extractor = {json.load(open(os.path.join(workdir, n)))['extractor']: n for n in written}
  assert set(by_extractor) == {'pixels_ds1', 'pixels_ds2'}
  assert json.load(open(os.path.join(workdir, by_extractor['pixels_ds1'])))['eval/fd_pixels'] == \
      first['eval/fd_pixels']
  assert '16 samples' in first['warning'] and '64 feature dimensions' in first['warning']
  assert 'warning' not in second


# `python -c` program: immiscible_jax.main, waiting for a line on stdin when it is about to train (after main's
# checks, and the workdir lock), so that a second trainer can be started on the same workdir meanwhile.
_WAIT_BEFORE_TRAINING_MAIN = """
import runpy, sys
from immiscible_jax import train
real = train.train_and_evaluate
def waiting(*args, **kwargs):
  print('test: about to train', flush=True)
  sys.stdin.readline()
  return real(*args, **kwargs)
train.train_and_evaluate = waiting
runpy.run_module('immiscible_jax.main', run_name='__main__', alter_sys=True)
"""


def test_a_second_trainer_on_a_workdir_is_refused_in_one_line_and_the_first_finishes(tmp_path):
  """Issue 21, case 3: two trainers on one workdir both crashed with long tracebacks, and metrics.jsonl held
  rows of both. The second must be refused naming the first, which finishes untouched."""
  workdir = str(tmp_path / 'run')
  args = ['--config=configs/tiny.py', f'--workdir={workdir}', '--config.training.num_steps=4',
          '--config.training.log_every_steps=2', '--config.checkpoint.every_steps=4']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}  # XLA_FLAGS: conftest.py's
  first = subprocess.Popen([sys.executable, '-c', _WAIT_BEFORE_TRAINING_MAIN, *args], cwd=_ROOT, env=env, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  timer = threading.Timer(_WATCHDOG_S, first.kill)
  timer.daemon = True
  timer.start()
  _read_until(first, r'^test: about to train')
  second = subprocess.run([sys.executable, '-m', 'immiscible_jax.main', *args], cwd=_ROOT, env=env, text=True,
                          capture_output=True, timeout=_WATCHDOG_S)
  first.stdin.write('go\n')
  first.stdin.flush()
  out, _ = first.communicate(timeout=_WATCHDOG_S)
  assert first.returncode == 0, out
  refusal = second.stdout + second.stderr
  assert second.returncode == 2 and refusal.count('\n') == 1, refusal
  assert refusal.startswith(f'error: --workdir={workdir}: another trainer is running in it (host '
                            f'{socket.gethostname()}, pid {first.pid}, since '), refusal
  assert json.load(open(os.path.join(workdir, 'done.json'))) == {'step': 4}
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows] == [2, 4]  # the first trainer's rows only
  assert not os.path.exists(os.path.join(workdir, 'lock.json'))  # released


def _dead_pid():
  proc = subprocess.Popen(['true'])
  proc.wait()  # reaped: its pid runs nothing now
  return proc.pid


def test_a_local_lock_is_exclusive_and_one_left_by_a_killed_run_is_taken_over(tmp_path):
  from immiscible_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  messages = []
  with workdir_lock.hold(str(tmp_path), log=messages.append):
    owner = json.load(open(tmp_path / 'lock.json'))
    assert owner['pid'] == os.getpid() and owner['host'] == socket.gethostname() and owner['since']
    with pytest.raises(errors.ConfigError, match=rf'another trainer is running in it \(host .*, pid {os.getpid()},'):
      with workdir_lock.hold(str(tmp_path)):
        pass
  assert not os.path.exists(tmp_path / 'lock.json') and not messages
  # A killed run leaves its lock.json, but not its flock (the kernel drops it): taken over, saying whose it was.
  dead = _dead_pid()
  (tmp_path / 'lock.json').write_text(json.dumps({'host': 'elsewhere', 'pid': dead, 'since': 'then'}))
  with workdir_lock.hold(str(tmp_path), log=messages.append):
    assert json.load(open(tmp_path / 'lock.json'))['pid'] == os.getpid()
  assert len(messages) == 1 and f'pid {dead}' in messages[0] and 'took over' in messages[0]


def test_sample_and_eval_take_overrides_of_the_saved_config_without_a_config_file(reference, tmp_path, capfd):
  """--mode=sample|eval --config.KEY=VALUE with no --config file: applied to the run's saved config, for the keys
  sampling and evaluation may change; any other key, or a value of the wrong type, is one line naming it."""
  from immiscible_jax import sampling  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  args = [f'--workdir={workdir}', '--mode=sample']
  assert command_line.run_cli(args + ['--config.sampling.num_samples=5', '--config.sampling.shard_size=2']) == 0
  images = sampling.load_samples(os.path.join(workdir, 'samples', f'step_{_END}_1step'))
  assert images.shape == (5, 8, 8, 1)
  capfd.readouterr()
  code = command_line.run_cli(args + ['--config.model.nf=16'])
  command_line.assert_one_line_error(code, ''.join(capfd.readouterr()), '--config.model.nf: sampling and evaluation')
  code = command_line.run_cli([f'--workdir={workdir}', '--mode=eval', '--config.eval.num_samples=many'])
  command_line.assert_one_line_error(code, ''.join(capfd.readouterr()), '--config.eval.num_samples=many: expected')
