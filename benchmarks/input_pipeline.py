r"""Input-pipeline throughput per host: images/s that `data.create_train_iterator` alone delivers (uint8 batches),
and with the trainer's device prefetch (`prefetch.DevicePrefetcher`: the batch sharded onto the local devices).

  python benchmarks/input_pipeline.py --json benchmarks/results/input_pipeline_cpu.json
  python benchmarks/input_pipeline.py --folder=PATH/cifar10-jpg.tar.gz    # a real image folder instead

Sources: digits (8x8x1, in memory), a JPEG folder (a synthetic one of --folder_images random 32x32x3 JPEGs
written to a temporary directory, or --folder; its decode is timed separately, as the first read of a folder
is), and CIFAR-10 through tfds' mock data (`tfds.testing.mock_data`, random 32x32x3 records: the real source's
code path with no download; decoding into memory is timed as set-up). Each source: build the iterator (timed),
one warm-up batch, then batches for at least --seconds; the median of --repeats such windows is reported.
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from immiscible_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from immiscible_jax.parallel import prefetch  # pylint: disable=g-import-not-at-top,wrong-import-position


def _rate(iterator, batch_size, seconds, repeats, block=False):
  """Median images/s over `repeats` windows of at least `seconds` (and 3 batches) each, after one warm-up."""
  out = next(iterator)
  rates = []
  for _ in range(repeats):
    count, start = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < seconds:
      out = next(iterator)
      count += 1
    if block:
      jax.block_until_ready(out)
    rates.append(count * batch_size / (time.perf_counter() - start))
  return float(np.median(rates))


def write_jpeg_folder(root, count, size=32, classes=10, seed=0):
  """`count` random RGB JPEGs in root/train/class_<k>/ (decode cost is what is measured, not the content)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for i in range(count):
    folder = os.path.join(root, 'train', f'class_{i % classes}')
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        os.path.join(folder, f'{i:06d}.jpg'), quality=90)
  return root


def bench_source(name, data_config, batch_size, seconds, repeats, setup=contextlib.nullcontext):
  with setup():
    start = time.perf_counter()
    iterator = data.create_train_iterator(data_config, batch_size, seed=0, process_index=0, process_count=1)
    build_s = time.perf_counter() - start
    host = _rate(iterator, batch_size, seconds, repeats)
    on_device = _rate(prefetch.DevicePrefetcher(iterator), batch_size, seconds, repeats, block=True)
  row = dict(source=name, image_shape=list(data.image_shape(data_config)), batch_size=batch_size,
             build_s=round(build_s, 2), images_per_s=round(host, 1), images_per_s_to_devices=round(on_device, 1))
  print(f'{name:>14}: build {build_s:6.2f} s, {host:10.1f} images/s host, {on_device:10.1f} images/s onto '
        f'{jax.local_device_count()} device(s)', flush=True)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch_size', type=int, default=512, help='per-host batch')
  parser.add_argument('--seconds', type=float, default=3.0, help='minimum length of one timed window')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--folder', default='', help='a folder or .tar.gz of images (default: a synthetic JPEG one)')
  parser.add_argument('--folder_images', type=int, default=5000)
  parser.add_argument('--mock_images', type=int, default=5000)
  parser.add_argument('--json', default='')
  args = parser.parse_args()

  base = default.get_config().data
  rows = [bench_source('digits', base, args.batch_size, args.seconds, args.repeats)]
  with tempfile.TemporaryDirectory() as tmp:
    os.environ['IMMISCIBLE_JAX_CACHE'] = tmp  # the folder's decode cache, so the first read really decodes
    folder = args.folder or write_jpeg_folder(os.path.join(tmp, 'jpeg'), args.folder_images)
    cfg = base.copy_and_resolve_references()
    cfg.update(dict(dataset='folder', path=folder, image_size=32, channels=3, random_flip=True))
    rows.append(bench_source('jpeg folder', cfg, args.batch_size, args.seconds, args.repeats))
    rows[-1]['folder'] = args.folder or f'synthetic: {args.folder_images} random 32x32 JPEGs'

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cfg = base.copy_and_resolve_references()
  cfg.update(dict(dataset='cifar10', image_size=32, channels=3, random_flip=True))
  mock = lambda: tfds.testing.mock_data(num_examples=args.mock_images)
  rows.append(bench_source('cifar10 (mock)', cfg, args.batch_size, args.seconds, args.repeats, setup=mock))

  machine = dict(host=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                 devices=f'{jax.local_device_count()}x {jax.devices()[0].device_kind} ({jax.default_backend()})',
                 load_average=os.getloadavg()[0])
  print(f"\nper host, batch {args.batch_size}, {machine['devices']}, load average {machine['load_average']:.1f}")
  print('| source | set-up s | images/s (iterator) | images/s (prefetched onto the devices) |')
  print('|---|---:|---:|---:|')
  for r in rows:
    print(f"| {r['source']} | {r['build_s']} | {r['images_per_s']} | {r['images_per_s_to_devices']} |")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(dict(machine=machine, rows=rows), f, indent=2)


if __name__ == '__main__':
  main()
