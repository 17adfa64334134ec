"""Throughput of the Flax FID Inception (uint8 32x32 -> resize to 299 -> pool3), and what FID then costs.

  python benchmarks/inception.py [--batch_sizes=8,32] [--min_seconds=10] [--torch] [--json PATH]

Times the jitted `inception.features` after one warm-up call, per batch size, on the default JAX backend (one
device). Uses the converted weights when present, else random ones (the speed does not depend on the values).
Also times one 2048-d Frechet distance, and prints the implied cost of FID-5k and FID-50k: extracting the
samples, plus extracting the 50k reference images the first time (their statistics are cached afterwards).
--torch also times the TorchScript reference (needs torch and the converted cache) for comparison.
"""
import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from immiscible_jax import storage  # pylint: disable=g-import-not-at-top,wrong-import-position
from immiscible_jax.evaluation import frechet  # pylint: disable=g-import-not-at-top,wrong-import-position
from immiscible_jax.evaluation import inception  # pylint: disable=g-import-not-at-top,wrong-import-position

REFERENCE_IMAGES = 50_000


def _params():
  path = inception.weights_path(storage.default_cache_dir())
  if os.path.exists(path):
    return inception.load_params(path), 'converted'
  variables = jax.jit(inception.InceptionV3().init)(
      jax.random.key(0), np.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3), np.float32))
  return variables['params'], 'random'


def _time(run, batch_size, min_seconds):
  """Images/s of run() over at least two calls and min_seconds, after a warm-up (compile) call."""
  start = time.perf_counter()
  run()
  compile_s = time.perf_counter() - start
  calls, start = 0, time.perf_counter()
  while calls < 2 or time.perf_counter() - start < min_seconds:
    run()
    calls += 1
  elapsed = time.perf_counter() - start
  return {'batch_size': batch_size, 'calls': calls, 'seconds': round(elapsed, 2),
          'first_call_s': round(compile_s, 2), 'images_per_s': round(batch_size * calls / elapsed, 2)}


def bench_flax(params, batch_sizes, min_seconds):
  fn = jax.jit(inception.features)
  rows = []
  for b in batch_sizes:
    images = np.random.default_rng(b).integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)
    rows.append(_time(lambda: fn(params, images).block_until_ready(), b, min_seconds))
    print(f'flax  batch {b:4d}: {rows[-1]["images_per_s"]:8.2f} images/s '
          f'(first call incl. compile {rows[-1]["first_call_s"]} s)', flush=True)
  return rows


def bench_torch(batch_size, min_seconds):
  import torch  # pylint: disable=g-import-not-at-top
  module = torch.jit.load(inception.torchscript_path(storage.default_cache_dir()), map_location='cpu').eval()
  x = torch.rand(batch_size, 3, inception.INPUT_SIZE, inception.INPUT_SIZE) * 2 - 1
  with torch.no_grad():
    row = _time(lambda: module(x), batch_size, min_seconds)
  print(f'torch batch {batch_size:4d}: {row["images_per_s"]:8.2f} images/s (TorchScript, 299x299 input, '
        f'{torch.get_num_threads()} threads)', flush=True)
  return row


def bench_frechet(dim=inception.FEATURE_DIM):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
  sigma1, sigma2 = a @ a.T / dim, b @ b.T / dim
  start = time.perf_counter()
  frechet.frechet_distance(np.zeros(dim), sigma1, np.ones(dim), sigma2)
  return round(time.perf_counter() - start, 2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_sizes', default='8,32')
  parser.add_argument('--min_seconds', type=float, default=10.0)
  parser.add_argument('--torch', action='store_true', help='Also time the TorchScript reference.')
  parser.add_argument('--json', help='Write the results here.')
  args = parser.parse_args()
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]

  params, weights = _params()
  device = jax.devices()[0]
  print(f'backend {jax.default_backend()} ({device.device_kind}), {os.cpu_count()} CPUs, weights: {weights}')
  rows = bench_flax(params, batch_sizes, args.min_seconds)
  best = max(r['images_per_s'] for r in rows)
  frechet_s = bench_frechet()
  print(f'Frechet distance, 2048-d (host, numpy/LAPACK): {frechet_s} s')
  costs = {}
  for n in (5_000, 50_000):
    samples_s = n / best + frechet_s
    costs[f'fid_{n // 1000}k'] = {'samples_only_s': round(samples_s, 1),
                                  'with_reference_s': round(samples_s + REFERENCE_IMAGES / best, 1)}
    print(f'FID-{n // 1000}k at {best:.1f} images/s: {samples_s / 60:.1f} min with cached reference statistics, '
          f'{(samples_s + REFERENCE_IMAGES / best) / 60:.1f} min the first time (+{REFERENCE_IMAGES} reference '
          'images)')
  result = {'backend': jax.default_backend(), 'device_kind': device.device_kind, 'cpu_count': os.cpu_count(),
            'machine': platform.machine(), 'jax': jax.__version__, 'weights': weights,
            'load_average_at_end': [round(x, 2) for x in os.getloadavg()],
            'input': 'uint8 [B, 32, 32, 3] -> resize 299 -> pool3', 'flax': rows,
            'best_images_per_s': best, 'frechet_2048_s': frechet_s, 'fid_cost': costs}
  if args.torch:
    result['torch'] = bench_torch(max(batch_sizes), args.min_seconds)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
