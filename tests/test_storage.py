"""Every output in a bucket: the trainer, sampling, evaluation, launch.sweep and launch.report against a real GCS
JSON API on localhost (gcp-storage-emulator from requirements-test.txt, started by tests/gcs_emulator.py), not a mock.

One tiny training run (module fixture) is shared: it is stopped after its first checkpoint (step 4), started again
from the bucket and finishes at step 8. Its workdir is an arm of a sweep root in the bucket, so launch.sweep sees its
done.json there and launch.report reads its metrics.jsonl. Every subprocess runs in an empty local folder that must
stay empty. A .tar.gz of images in the bucket is read as data.path, its decoded cache kept in the bucket.
The tests are skipped only when the emulator cannot start, with the reason (make test prints it: -rs).
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from immiscible_jax import storage
from launch import common
from launch import local
from launch import report
from launch import sweep

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
BUCKET = 'immiscible-test'
ROOT = f'gs://{BUCKET}/sweep'        # a sweep root in the bucket
ARM = 'method=none,seed=0'            # the trained run is this arm
WORKDIR = f'{ROOT}/{ARM}'
_STEPS = {'training.num_steps': 8, 'training.log_every_steps': 2, 'checkpoint.every_steps': 4}
_FLAGS = [f'--config.{k}={v}' for k, v in _STEPS.items()]
# `python -c` program: immiscible_jax.main, leaving (with a checkpoint) after step 4 as if preempted there.
_STOP_AT_4 = """
import functools, runpy
from immiscible_jax import train
train.train_and_evaluate = functools.partial(train.train_and_evaluate, stop_at_step=4)
runpy.run_module('immiscible_jax.main', run_name='__main__', alter_sys=True)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _answers(url):
  try:
    with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}', timeout=2) as response:
      return response.status == 200
  except (urllib.error.URLError, OSError):
    return False


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """The emulator on a free port, in memory, with BUCKET; its environment set here and for subprocesses."""
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  log_path = tmp_path_factory.mktemp('gcs') / 'emulator.log'
  with open(log_path, 'w') as log:
    try:
      proc = subprocess.Popen([sys.executable, os.path.join(_ROOT, 'tests', 'gcs_emulator.py'), 'start',
                               '--host=127.0.0.1', f'--port={port}', '--in-memory', f'--default-bucket={BUCKET}'],
                              stdout=log, stderr=subprocess.STDOUT)
    except OSError as e:
      pytest.skip(f'GCS emulator cannot start: {e}')
  deadline = time.time() + 60
  while not _answers(url):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      proc.wait()
      reason = f'GCS emulator did not answer at {url}: {log_path.read_text()[-1500:]}'
      print(reason, file=sys.stderr)
      pytest.skip(reason)
    time.sleep(0.2)
  saved = {k: os.environ.get(k) for k in storage.emulator_env(url)}
  os.environ.update(storage.emulator_env(url))
  yield url
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  proc.terminate()
  proc.wait(timeout=30)


def _start(cwd, args, program=('-m', 'immiscible_jax.main'), env=None, config=True):
  """The trainer's command line (on configs/tiny.py unless not `config`) in a subprocess whose working directory
  is `cwd` (the emulator env inherited)."""
  full_env = {**os.environ, 'JAX_PLATFORMS': 'cpu',  # XLA_FLAGS: conftest.py's
              'PYTHONUNBUFFERED': '1', 'PYTHONPATH': _ROOT,
              **(env or {})}
  config_flag = [f'--config={_ROOT}/configs/tiny.py'] if config else []
  return subprocess.Popen([sys.executable, *program, *config_flag, *args], cwd=cwd,
                          env=full_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc):
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  return out


@pytest.fixture(scope='module')
def trained(gcs, tmp_path_factory):
  """The run in WORKDIR: steps 1-4 (stopped after the checkpoint of step 4), then resumed to step 8."""
  del gcs
  cwd = tmp_path_factory.mktemp('cwd')
  first = _finish(_start(cwd, [f'--workdir={WORKDIR}', *_FLAGS], program=('-c', _STOP_AT_4)))
  second = _finish(_start(cwd, [f'--workdir={WORKDIR}', *_FLAGS]))
  return dict(cwd=cwd, first=first, second=second)


def test_training_writes_every_file_to_the_bucket_and_resumes_from_it(trained):
  assert f'training from scratch in {WORKDIR}' in trained['first']
  assert f'preempted: saved step 4 to {WORKDIR}/checkpoints; exiting' in trained['first']
  assert f'resumed from step 4 in {WORKDIR}' in trained['second']
  assert 'training from scratch' not in trained['second']
  assert os.listdir(trained['cwd']) == []  # nothing local, no `gs:` folder in particular
  assert {'4', '8'} <= set(storage.listdir(f'{WORKDIR}/checkpoints'))
  for step in (4, 8):
    assert storage.exists(f'{WORKDIR}/checkpoints/{step}/commit_success.txt')
    assert storage.listdir(f'{WORKDIR}/checkpoints/{step}/state')  # the arrays (tensorstore)
  rows = [json.loads(line) for line in storage.read_text(f'{WORKDIR}/metrics.jsonl').splitlines()]
  assert [r['step'] for r in rows] == [2, 4, 6, 8]  # both runs' rows, the second appended to the first's
  assert json.loads(storage.read_text(f'{WORKDIR}/config.json'))['training']['num_steps'] == 8
  assert json.loads(storage.read_text(f'{WORKDIR}/done.json')) == {'step': 8}
  events = storage.listdir(f'{WORKDIR}/tensorboard')
  assert len(events) == 2 and all(name.startswith('events.out.tfevents.') for name in events)  # one per run
  assert all(storage.size(f'{WORKDIR}/tensorboard/{name}') > 0 for name in events)


def test_sample_and_eval_write_their_outputs_to_the_bucket(trained):
  cwd, cache = trained['cwd'], f'gs://{BUCKET}/cache'
  # In parallel: both only read the checkpoint. Sampling takes the run's config from the bucket (no --config);
  # evaluation keeps its reference statistics in the bucket too.
  procs = [_start(cwd, [f'--workdir={WORKDIR}', '--mode=sample'], config=False),
           _start(cwd, [f'--workdir={WORKDIR}', '--mode=eval', *_FLAGS], env={'IMMISCIBLE_JAX_CACHE': cache})]
  sample_out, eval_out = (_finish(p) for p in procs)
  samples = f'{WORKDIR}/samples/step_8_1step'
  assert f'{samples}/samples_00000-of-00001.npz' in sample_out
  assert storage.load_npz(f'{samples}/samples_00000-of-00001.npz')['images'].shape == (16, 8, 8, 1)
  assert storage.read_bytes(f'{samples}/grid.png')[:8] == b'\x89PNG\r\n\x1a\n'
  result = json.loads(storage.read_text(f'{WORKDIR}/eval_8_pixels_ds1.json'))
  assert result['step'] == 8 and np.isfinite(result['eval/fd_pixels']) and result['num_samples'] == 64
  assert json.dumps(result) in eval_out
  assert [n for n in storage.listdir(f'{cache}/stats') if n.startswith('digits_train_8px_n256')]
  assert os.listdir(cwd) == []


@pytest.fixture(scope='module')
def swept(trained, tmp_path_factory):
  """launch.sweep over ROOT twice: the trained arm (done.json in the bucket) and one unfinished arm, launched by a
  stub that 'finishes' it (done.json and a metrics.jsonl in the bucket, loss 10% above the trained arm's)."""
  del trained
  path = tmp_path_factory.mktemp('sweep') / 'sweep_file.py'
  path.write_text(textwrap.dedent(f'''
      CONFIG = {os.path.join(_ROOT, 'configs', 'tiny.py')!r}
      def get_sweep():
        return [({ARM!r}, {{'assignment.method': 'none', 'seed': 0}}),
                ('method=knn,seed=0', {{'assignment.method': 'knn', 'seed': 0}})]
      '''))
  launched = []

  def execute(args, trainer_args, log=None):
    del args, log
    launched.append(trainer_args)
    workdir = common.flag_value(trainer_args, 'workdir')
    rows = [json.loads(line) for line in storage.read_text(f'{WORKDIR}/metrics.jsonl').splitlines()]
    storage.write_text(f'{workdir}/metrics.jsonl', ''.join(
        json.dumps({**r, 'train/loss': 1.1 * r['train/loss']}) + '\n' for r in rows))
    storage.write_text(f'{workdir}/done.json', json.dumps({'step': 8}))
    return 0

  original, local.execute = local.execute, execute
  try:
    argv = [f'--sweep={path}', '--runner=local', f'--root={ROOT}', '--', *_FLAGS]
    first = sweep.main(argv), list(launched)
    launched.clear()
    second = sweep.main(argv), list(launched)
  finally:
    local.execute = original
  return dict(first=first, second=second)


def test_sweep_over_a_bucket_skips_arms_whose_done_json_is_there(swept):
  status, launched = swept['first']
  assert status == 0
  assert [common.flag_value(a, 'workdir') for a in launched] == [f'{ROOT}/method=knn,seed=0']
  status, launched = swept['second']
  assert status == 0 and launched == []  # every arm's done.json is in the bucket now
  record = json.loads(storage.read_text(f'{ROOT}/sweep.json'))
  assert [a['workdir'] for a in record['arms']] == [WORKDIR, f'{ROOT}/method=knn,seed=0']


def test_report_reads_the_bucket_and_writes_its_report_there(swept, capsys):
  del swept
  assert report.main([ROOT, '--metric=train/loss', '--baseline=method=none']) == 0
  assert '# Sweep report: train/loss' in capsys.readouterr().out
  for name in ('report.md', 'report.png', 'report_paired.png', 'report.json'):
    assert storage.exists(f'{ROOT}/{name}'), name
  assert storage.read_bytes(f'{ROOT}/report.png')[:4] == b'\x89PNG'
  record = json.loads(storage.read_text(f'{ROOT}/report.json'))
  finals = {g['group']: g['final_values'] for g in record['groups']}
  trained_loss = json.loads(storage.read_text(f'{WORKDIR}/metrics.jsonl').splitlines()[-1])['train/loss']
  assert finals['method=none'] == [pytest.approx(trained_loss)]
  assert finals['method=knn'] == [pytest.approx(1.1 * trained_loss)]


def test_image_archive_in_the_bucket_is_streamed_and_its_decoded_cache_kept_there(gcs, monkeypatch):
  del gcs
  import io  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from immiscible_jax import image_folder  # pylint: disable=g-import-not-at-top
  archive = io.BytesIO()
  with tarfile.open(fileobj=archive, mode='w:gz') as tar:
    for label in range(2):
      for i in range(3):
        png = io.BytesIO()
        Image.fromarray(np.full((4, 4), 10 * label + i, np.uint8)).save(png, format='png')
        member = tarfile.TarInfo(f'digits/train/{label}/{i}.png')
        member.size = len(png.getvalue())
        tar.addfile(member, io.BytesIO(png.getvalue()))
  path, cache = f'gs://{BUCKET}/data/tiny.tar.gz', f'gs://{BUCKET}/image_cache'
  storage.write_bytes(path, archive.getvalue())
  monkeypatch.setenv('IMMISCIBLE_JAX_CACHE', cache)
  images = image_folder.load(path, 'train', channels=1)
  assert images.shape == (6, 4, 4, 1) and list(images[:, 0, 0, 0]) == [0, 10, 1, 11, 2, 12]  # round-robin order
  (cached,) = storage.listdir(f'{cache}/data')
  assert cached.startswith('tiny.tar.gz-train-') and cached.endswith('.npy')
  np.testing.assert_array_equal(storage.load_npy(f'{cache}/data/{cached}'), images)


def _dead_pid():
  proc = subprocess.Popen(['true'])
  proc.wait()  # reaped: its pid runs nothing now
  return proc.pid


def test_the_workdir_lock_in_a_bucket_is_created_once_refuses_others_and_takes_over_a_stale_one(gcs):
  """Issue 21, case 3, for gs:// workdirs: one create-if-absent object (ifGenerationMatch=0), an owner that still
  runs (or runs on another host) refused with the command that removes the lock, a dead owner on this host taken
  over, saying so; released only while still ours."""
  del gcs
  import socket  # pylint: disable=g-import-not-at-top
  from immiscible_jax import errors  # pylint: disable=g-import-not-at-top
  from immiscible_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = f'gs://{BUCKET}/locked'
  lock = f'{workdir}/lock.json'
  assert storage.create_if_absent(f'{workdir}/once', b'1') is not None
  assert storage.create_if_absent(f'{workdir}/once', b'2') is None  # the precondition holds: exactly one creates
  assert storage.read_bytes(f'{workdir}/once') == b'1'
  messages = []
  with workdir_lock.hold(workdir, log=messages.append):
    owner = json.loads(storage.read_text(lock))
    assert (owner['host'], owner['pid']) == (socket.gethostname(), os.getpid())
    with pytest.raises(errors.ConfigError, match=rf'another trainer is running in it \(host .*, pid {os.getpid()}, '
                                                 rf'.*gcloud storage rm {lock}'):
      with workdir_lock.hold(workdir):
        pass
  assert not storage.exists(lock) and not messages
  elsewhere = json.dumps({'host': 'another-vm', 'pid': _dead_pid(), 'since': 'then'}).encode()
  storage.write_bytes(lock, elsewhere)
  with pytest.raises(errors.ConfigError, match=r'host another-vm'):
    with workdir_lock.hold(workdir):
      pass
  assert storage.read_bytes(lock) == elsewhere  # another host's lock is never removed by a guess
  dead = _dead_pid()
  storage.write_bytes(lock, json.dumps({'host': socket.gethostname(), 'pid': dead, 'since': 'then'}).encode())
  with workdir_lock.hold(workdir, log=messages.append):
    assert json.loads(storage.read_text(lock))['pid'] == os.getpid()
    _, generation = storage.read_with_generation(lock)
    assert not storage.remove_if_generation(lock, int(generation) + 1)  # another generation: not removed
  assert len(messages) == 1 and f'pid {dead}' in messages[0] and 'took over' in messages[0]
  assert not storage.exists(lock)
