"""The package installs with pip and its entry point runs from any directory, reading no file relative to it.

A fresh virtual environment sees the test environment's third-party packages through a .pth file (so nothing is
downloaded), gets the project with `pip install --no-deps --no-build-isolation -e .`, and then runs
`python -m immiscible_jax.main` from an unrelated directory: the config check there imports configs/default.py
through the installed package `configs`. The dependency list comes from requirements.txt (pyproject.toml reads it).
"""
import os
import subprocess
import sysconfig
import venv

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """The python of a fresh venv with the project installed in editable mode."""
  env_dir = tmp_path_factory.mktemp('venv')
  venv.EnvBuilder(with_pip=False).create(env_dir)
  python = str(env_dir / 'bin' / 'python')
  site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                        capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(site, 'test_env_packages.pth'), 'w') as f:
    f.write(sysconfig.get_paths()['purelib'] + '\n')  # this test run's packages (pip, setuptools, jax, ...)
  install = subprocess.run([python, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation', '-e', ROOT],
                           capture_output=True, text=True, cwd=str(env_dir))
  assert install.returncode == 0, install.stderr[-3000:]
  return python


def test_pip_install_declares_the_pinned_requirements(installed):
  out = subprocess.run([installed, '-c', 'from importlib import metadata; '
                        'print("\\n".join(metadata.requires("immiscible-jax")))'],
                       capture_output=True, text=True, check=True).stdout.split('\n')
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    pinned = [line.strip() for line in f if line.strip() and not line.startswith('#')]
  assert pinned and set(pinned) <= {r.strip() for r in out}


def test_entry_point_runs_from_any_directory(installed, tmp_path):
  """From a directory holding no project file: the config is validated against configs/default.py (imported
  from the installed package) and a bad value ends in the one-line error, exit status 2."""
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  run = subprocess.run(
      [installed, '-m', 'immiscible_jax.main', f'--config={ROOT}/configs/tiny.py', f'--workdir={tmp_path}/run',
       '--config.training.num_steps=0'],
      capture_output=True, text=True, cwd=str(elsewhere), env={**os.environ, 'PYTHONPATH': ''})
  assert run.returncode == 2, run.stderr[-2000:]
  assert run.stderr.strip().splitlines()[-1] == 'error: training.num_steps: must be positive, got 0'
  where = subprocess.run([installed, '-c', 'import immiscible_jax, configs; print(immiscible_jax.__file__)'],
                         capture_output=True, text=True, check=True, cwd=str(elsewhere)).stdout.strip()
  assert where.startswith(ROOT)
