"""Bad input fails fast: through the trainer and the command line, one error naming the key or file, and
nothing compiled before it.

tests/test_configs.py checks config_checks.validate on its own; these go through train_and_evaluate and the
command line (main's flag parsing and main, in this process and, twice, as a real subprocess) and watch JAX's
compile events, so a check that ran only after the first compilation would fail.
"""
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from immiscible_jax import errors
from immiscible_jax import train
import command_line

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
# Lowering a function to MLIR and compiling it: neither may happen before a bad input is reported.
_COMPILE_EVENTS = ('/jax/core/compile/jaxpr_to_mlir_module_duration', '/jax/core/compile/backend_compile_duration')


@pytest.fixture
def compilations():
  """Names of the functions JAX lowers or compiles while the test runs."""
  seen = []

  def listener(event, duration, **kwargs):  # pylint: disable=unused-argument
    if event in _COMPILE_EVENTS:
      seen.append(kwargs.get('fun_name', event))

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield seen
  jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('IMMISCIBLE_JAX_CACHE', str(tmp_path / 'cache'))  # Decoded folders never go to ~/.cache.


def test_the_compile_watch_sees_a_compilation(compilations):
  jax.jit(lambda x: x * 3 + 1)(np.float32(2.0))
  assert compilations


def _set(config, key, value):
  section, name = key.split('.')
  with config.unlocked():
    config[section][name] = value


def _with_type(key, value):
  """The tiny config with `key` holding a value of another type (ml_collections refuses that on assignment,
  so such a config comes from a file that builds its dicts by hand)."""
  raw = tiny.get_config().to_dict()
  section, name = key.split('.')
  raw[section][name] = value
  return ml_collections.ConfigDict(raw)


def _config(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    _set(config, key, value)
  return config


def _unknown_key():
  config = tiny.get_config()
  _set(config, 'training.num_stepz', 5)
  return config


@pytest.mark.parametrize('make,message', [
    (_unknown_key, r'training.num_stepz: unknown config key'),
    (lambda: _with_type('training.num_steps', '12'),
     r"training.num_steps: must be of type int .*got '12' of type str"),
    (lambda: _with_type('model.ch_mult', 2), r'model.ch_mult: must be of type tuple'),
    (lambda: _with_type('data.random_flip', 1), r'data.random_flip: must be of type bool'),
    (lambda: _config(**{'training.batch_size': 20}),
     r'training.batch_size: 20 must be divisible by the number of devices \(8\)'),
    (lambda: _config(**{'training.sigma_min': 80.0}),
     r'training.sigma_min: must lie in \(0, training.sigma_max\), got 80.0 with training.sigma_max = 80.0'),
    (lambda: _config(**{'assignment.method': 'knn', 'assignment.knn_k': 0}), r'assignment.knn_k'),
    (lambda: _config(**{'training.num_steps': -3}), r'training.num_steps: must be positive, got -3'),
    (lambda: _config(**{'training.log_every_steps': 0}), r'training.log_every_steps: must be positive, got 0'),
    (lambda: _config(**{'checkpoint.every_steps': -4}), r'checkpoint.every_steps: must be positive, got -4'),
    (lambda: _config(**{'eval.every_steps': -1}), r'eval.every_steps must be an integer >= 0, got -1'),
], ids=['unknown_key', 'str_for_int', 'int_for_tuple', 'int_for_bool', 'batch_vs_devices', 'sigma_min_eq_max',
        'knn_k_0', 'num_steps_negative', 'log_every_0', 'checkpoint_every_negative', 'eval_every_negative'])
def test_bad_config_fails_before_compiling(make, message, tmp_path, compilations):
  with pytest.raises(errors.ConfigError, match=message):
    train.train_and_evaluate(make(), str(tmp_path / 'run'))
  assert not compilations
  assert not os.path.exists(tmp_path / 'run')  # Nothing was started, not even the workdir.


def _png(path, size=8, mode='L'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  shape = (size, size) if mode == 'L' else (size, size, 3)
  Image.fromarray(np.arange(np.prod(shape), dtype=np.uint8).reshape(shape), mode).save(path)


def _folder(root, bad=None):
  """root/train/{a,b}/0..3.png, 8x8 grayscale, plus one bad file: (relative path, writer)."""
  for label in 'ab':
    for i in range(4):
      _png(os.path.join(root, 'train', label, f'{i}.png'))
  if bad is not None:
    relpath, write = bad
    write(os.path.join(root, relpath))
  return root


def _truncated_png(path):
  _png(path)
  os.truncate(path, os.path.getsize(path) // 2)


def _text(path):
  with open(path, 'w') as f:
    f.write('not an image')


@pytest.mark.parametrize('layout,message', [
    (lambda root: os.path.join(root, 'missing'), r"data.path='.*missing' does not exist"),
    (lambda root: _folder(root, ('train/a/9.png', _truncated_png)), r'train/a/9.png: not a readable image'),
    (lambda root: _folder(root, ('train/a/9.png', _text)), r'train/a/9.png: not a readable image'),
    (lambda root: _folder(root, ('train/b/notes.txt', _text)), r'train/b/notes.txt: not an image file'),
    (lambda root: _folder(root, ('train/b/big.png', lambda p: _png(p, size=16))),
     r'train/b/big.png: image is 16x16, but data.image_size=8'),
    (lambda root: _folder(root, ('train/b/rgb.png', lambda p: _png(p, mode='RGB'))),
     r'train/b/rgb.png: image has 3 channel\(s\) \(mode RGB\), but data.channels=1'),
    (lambda root: os.makedirs(os.path.join(root, 'train', 'a')) or root, r'no images found'),
    (lambda root: _folder(root, ('test/a/0.png', _png)) and os.path.join(root, 'test', 'a', '0.png'),
     r'data.path=.*0.png.* is neither a folder nor a'),
], ids=['missing_path', 'truncated_png', 'text_named_png', 'non_image_file', 'wrong_size', 'wrong_channels',
        'empty', 'path_is_a_file'])
def test_bad_image_folder_fails_before_compiling(layout, message, tmp_path, compilations):
  path = layout(str(tmp_path / 'data'))
  config = _config(**{'data.dataset': 'folder', 'data.path': path})
  with pytest.raises(errors.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not compilations


# The bad command lines a new user tried (issue 12), with the key each error must name.
_BAD_COMMAND_LINES = {
    'misspelt_method': (['--config.assignment.method=hungarain'], 'assignment.method'),
    'misspelt_cost': (['--config.assignment.cost=euclidean'], 'assignment.cost'),
    'misspelt_scope': (['--config.assignment.scope=globl'], 'assignment.scope'),
    'misspelt_recipe': (['--config.training.recipe=ctt'], 'training.recipe'),
    'misspelt_loss': (['--config.training.loss=huber'], 'training.loss'),
    'misspelt_dataset': (['--config.data.dataset=cifar'], 'data.dataset'),
    'sigma_min_above_max': (['--config.training.sigma_min=90.0'], 'training.sigma_min'),
    'negative_steps': (['--config.training.num_steps=-5'], 'training.num_steps'),
    'batch_0': (['--config.training.batch_size=0'], 'training.batch_size'),
    'missing_data_folder': (['--config.data.dataset=folder', '--config.data.path=/no/such/folder'], 'data.path'),
    'knn_k_0': (['--config.assignment.method=knn', '--config.assignment.knn_k=0'], 'assignment.knn_k'),
    'increasing_sampling_sigmas': (['--config.sampling.sigmas=(0.5,80.0)'], 'sampling.sigmas'),
    'unknown_key': (['--config.training.num_stepz=5'], 'training.num_stepz'),
    'non_integer': (['--config.training.num_steps=ten'], 'training.num_steps'),
}
_TINY = os.path.join(_ROOT, 'configs', 'tiny.py')


_run_cli = command_line.run_cli
_assert_one_line_error = command_line.assert_one_line_error


@pytest.mark.parametrize('name', list(_BAD_COMMAND_LINES))
def test_bad_command_line_is_one_line_naming_the_key(name, tmp_path, capfd, compilations):
  overrides, key = _BAD_COMMAND_LINES[name]
  code = _run_cli([f'--config={_TINY}', f'--workdir={tmp_path / "run"}', *overrides])
  out, err = capfd.readouterr()
  _assert_one_line_error(code, out + err, key)
  assert not compilations
  assert not os.path.exists(tmp_path / 'run')


def test_traceback_flag_shows_the_error_itself(tmp_path):
  with pytest.raises(errors.ConfigError, match='training.num_steps: must be positive, got -5'):
    _run_cli([f'--config={_TINY}', f'--workdir={tmp_path / "run"}', '--config.training.num_steps=-5',
              '--traceback'])


@pytest.mark.parametrize('name', ['misspelt_method', 'non_integer'])
def test_bad_command_line_in_a_fresh_process_prints_only_that_line(name, tmp_path):
  """The whole output of `python -m immiscible_jax.main` (imports, warnings and all) is the one error line."""
  overrides, key = _BAD_COMMAND_LINES[name]
  done = subprocess.run([sys.executable, '-m', 'immiscible_jax.main', '--config=configs/tiny.py',
                         f'--workdir={tmp_path / "run"}', *overrides], cwd=_ROOT, capture_output=True, text=True,
                        timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  _assert_one_line_error(done.returncode, done.stdout + done.stderr, key)
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('name', ['run [1]', 'run[ab]', 'run*', 'run?'])
def test_a_workdir_that_orbax_would_glob_is_refused_before_anything(name, tmp_path, capfd, compilations):
  """Issue 21, case 1: Orbax's checkpoint code globs paths under the workdir (etils' epath.glob does not escape the
  folder), so `[1]` lost every checkpoint of a run that exited 0; `*` and `?` can match another run's folders."""
  code = _run_cli([f'--config={_TINY}', f'--workdir={tmp_path / name}'])
  out, err = capfd.readouterr()
  _assert_one_line_error(code, out + err, '--workdir')
  assert not compilations and not os.path.exists(tmp_path / name)


def _npz(path, **arrays):
  np.savez(path, **arrays)
  return path


def _truncated_npz(path):
  _npz(path, images=np.zeros((8, 8, 8, 1), np.uint8))
  os.truncate(path, os.path.getsize(path) // 2)
  return path


# Issue 21, case 10: each of these --samples for --mode=eval ended in a traceback.
@pytest.mark.parametrize('make,cause', [
    (_truncated_npz, 'not a readable .npz'),
    (lambda p: _text(p) or p, 'not a readable .npz'),
    (lambda p: _npz(p, pictures=np.zeros((8, 8, 8, 1), np.uint8)), "no 'images' array"),
    (lambda p: _npz(p, images=np.zeros((8, 4, 4, 1), np.uint8)), 'images of shape (4, 4, 1)'),
    (lambda p: _npz(p, images=np.zeros((8, 8, 8), np.uint8)), 'uint8 images [N, H, W, C]'),
    (lambda p: _npz(p, images=np.zeros((1, 8, 8, 1), np.uint8)), 'at least 2 samples'),
    (lambda p: p, 'does not exist'),
], ids=['truncated', 'text', 'no_images', 'wrong_size', 'wrong_rank', 'one_image', 'missing'])
def test_a_bad_sample_file_for_eval_is_one_line_naming_it(make, cause, tmp_path, capfd):
  path = str(tmp_path / 'samples.npz')
  make(path)
  code = _run_cli([f'--config={_TINY}', f'--workdir={tmp_path / "run"}', '--mode=eval', f'--samples={path}'])
  out, err = capfd.readouterr()
  _assert_one_line_error(code, out + err, path)
  assert cause in out + err


def test_a_config_file_that_does_not_load_is_one_line(tmp_path, capfd):
  """Issue 21, case 10: a wrong --config path printed 40 lines (ml_collections reports it lazily)."""
  code = _run_cli([f'--config={tmp_path / "nosuch.py"}', f'--workdir={tmp_path / "run"}'])
  out, err = capfd.readouterr()
  _assert_one_line_error(code, out + err, f'--config={tmp_path / "nosuch.py"}')
  assert 'No such file' in out + err and not os.path.exists(tmp_path / 'run')


def test_a_data_path_the_dataset_does_not_read_is_refused(tmp_path, capfd, compilations):
  """Issue 21, case 10: data.path=<archive> without data.dataset=folder trained on digits (or, for cifar10,
  ended in a 60-line traceback and left an empty workdir)."""
  archive = str(tmp_path / 'images.tar.gz')
  open(archive, 'wb').close()
  code = _run_cli([f'--config={_TINY}', f'--workdir={tmp_path / "run"}', f'--config.data.path={archive}'])
  out, err = capfd.readouterr()
  _assert_one_line_error(code, out + err, 'data.path')
  assert "data.dataset='digits'" in out + err and not compilations and not os.path.exists(tmp_path / 'run')


def test_unprepared_cifar10_is_one_line_and_leaves_no_workdir(tmp_path, capfd):
  """Issue 21, case 10: the data error comes after main created the workdir; the refused run leaves none."""
  code = _run_cli([f'--config={_TINY}', f'--workdir={tmp_path / "run"}', '--config.data.dataset=cifar10',
                   '--config.data.image_size=32', '--config.data.channels=3', '--config.model.attn_resolutions=()',
                   f'--config.data.tfds_data_dir={tmp_path / "tfds"}'])
  output = ''.join(capfd.readouterr())
  assert code == 2 and output.startswith('error: CIFAR-10') and output.count('\n') == 1, output
  assert 'tfds build cifar10' in output and 'Traceback' not in output
  assert not os.path.exists(tmp_path / 'run')


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_temporary_file(tmp_path, capfd, monkeypatch):
  """Issue 21, case 10: ENOSPC while writing config.json gave a 2,813-line log and left a 0-byte
  config.json.<pid>.tmp. The disk is 'full' for files named config.json* (a stand-in for storage's open)."""
  import errno  # pylint: disable=g-import-not-at-top
  from immiscible_jax import storage  # pylint: disable=g-import-not-at-top
  real_open = storage.open

  class FullDisk:
    def __init__(self, path):
      self.name, self._file = path, real_open(path, 'wb')

    def write(self, data):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._file.close()

  monkeypatch.setattr(storage, 'open', lambda path, mode='r': (
      FullDisk(path) if 'config.json' in os.fspath(path) and 'w' in mode else real_open(path, mode)))
  workdir = tmp_path / 'run'
  code = _run_cli([f'--config={_TINY}', f'--workdir={workdir}'])
  out, err = capfd.readouterr()
  lines = [line for line in (out + err).splitlines() if line.startswith('error: ')]
  assert code == 2 and len(lines) == 1, out + err
  assert str(workdir / 'config.json') in lines[0] and 'No space left on device' in lines[0]
  assert 'Traceback' not in out + err
  assert not [name for name in os.listdir(workdir) if name.endswith('.tmp')]


def test_disk_full_errors_raised_deep_inside_a_library_are_found():
  import errno  # pylint: disable=g-import-not-at-top
  try:
    try:
      raise ValueError('INTERNAL: Error writing "/w/checkpoints/8/state/d/abc": [OS error 28: No space left on device]')
    except ValueError as inner:
      raise RuntimeError('save failed') from inner
  except RuntimeError as e:
    assert 'No space left on device' in errors.disk_full_message(e)
  assert 'x.json' in errors.disk_full_message(OSError(errno.ENOSPC, 'No space left on device', 'x.json'))
  assert errors.disk_full_message(RuntimeError('something else')) is None
