r"""Train-step throughput: images/s of the compiled, pmapped step with and without immiscible assignment.

  python benchmarks/train_step.py --config=configs/digits.py --json benchmarks/results/train_step_cpu.json
  python benchmarks/train_step.py --config=configs/cifar10_ct.py --batch_size=128 \
      --methods=none,jv,hungarian,sinkhorn,knn --json benchmarks/results/train_step_gpu.json   # on a GPU host

Every method runs in the same process on the same batch: compile, warm up, then time --steps steps several
times and report the median images/s and the overhead of each method relative to method 'none'.
"""
import argparse
import importlib.util
import json
import platform
import sys
import time
import os
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
warnings.filterwarnings('ignore', message='.*JAXopt is no longer maintained.*')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from immiscible_jax import data, models, replicas, train, train_state  # pylint: disable=g-import-not-at-top


def load_config(path):
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def time_method(config, method, batch, steps, repeats):
  config = config.copy_and_resolve_references()
  config.assignment.method = method
  model = models.create_model(config.model, config.data.channels)
  optimizer = train_state.create_optimizer(config.optim)
  state = replicas.replicate(jax.jit(train_state.initializer(config, model, optimizer))(jax.random.key(0)))
  p_step = train.make_p_train_step(model, optimizer, config)
  sharded = replicas.shard_batch(batch)
  t0 = time.perf_counter()
  state, metrics = p_step(state, sharded)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = p_step(state, sharded)
    jax.block_until_ready(metrics)
    rates.append(steps * config.training.batch_size / (time.perf_counter() - t0))
  m = jax.device_get(jax.tree_util.tree_map(lambda x: x[0], metrics))
  before, after = float(m['assignment/distance_before']), float(m['assignment/distance_after'])
  return dict(method=method, images_per_sec=float(np.median(rates)), compile_s=compile_s,
              reduction_pct=100 * (before - after) / before)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/digits.py')
  parser.add_argument('--batch_size', type=int, default=0, help='global batch (0 = the config\'s)')
  parser.add_argument('--methods', default='none,jv,hungarian,sinkhorn,scipy,knn')
  parser.add_argument('--scope', default='', help='override assignment.scope')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', default='')
  args = parser.parse_args()

  config = load_config(args.config)
  if args.batch_size:
    config.training.batch_size = args.batch_size
  if args.scope:
    config.assignment.scope = args.scope
  rng = np.random.default_rng(0)
  shape = (config.training.batch_size, *data.image_shape(config.data))
  # Synthetic images in [-1, 1]: the step's cost does not depend on their content.
  batch = {'image': rng.uniform(-1, 1, shape).astype(np.float32)}
  rows = []
  for method in args.methods.split(','):
    row = time_method(config, method, batch, args.steps, args.repeats)
    rows.append(row)
    print(f"{method:>10}: {row['images_per_sec']:9.1f} images/s (compile {row['compile_s']:.1f} s)", flush=True)
  base = next((r['images_per_sec'] for r in rows if r['method'] == 'none'), None)
  for row in rows:
    row['overhead_pct'] = 100 * (base / row['images_per_sec'] - 1) if base else None
  device = f'{jax.device_count()}x {jax.devices()[0].device_kind} ({jax.default_backend()})'
  print(f'\nconfig={args.config} batch={config.training.batch_size} scope={config.assignment.scope} '
        f'dtype={config.assignment.dtype} cost={config.assignment.cost} device={device}')
  print('| method | images/s | step overhead vs none | distance reduction % |')
  print('|---|---:|---:|---:|')
  for r in rows:
    overhead = f"{r['overhead_pct']:+.1f}%" if r['overhead_pct'] is not None else 'n/a'
    print(f"| {r['method']} | {r['images_per_sec']:.1f} | {overhead} | {r['reduction_pct']:.2f} |")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(dict(config=args.config, batch_size=config.training.batch_size, device=device,
                     host=platform.processor() or platform.machine(), rows=rows), f, indent=2)


if __name__ == '__main__':
  main()
