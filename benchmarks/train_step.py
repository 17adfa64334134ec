r"""Train-step throughput: images/s of the training loop's compiled step (pmap, one step per call) with and without immiscible assignment.

  python benchmarks/train_step.py --config=configs/digits.py --json benchmarks/results/train_step_cpu.json
  python benchmarks/train_step.py --config=configs/digits.py --methods=none --dtypes=float32,bfloat16 \
      --json benchmarks/results/train_step_dtype_cpu.json      # compute dtype (model.dtype) alone
  python benchmarks/train_step.py --config=configs/cifar10_small_ct.py --methods=none,jv --losses=lpips,l2 \
      --json benchmarks/results/train_step_small_ct_cpu.json   # the LPIPS branch's cost (training.loss)
  python benchmarks/train_step.py --config=configs/cifar10_ct.py --batch_size=128 \
      --methods=none,jv,hungarian,sinkhorn,knn --json benchmarks/results/train_step_gpu.json   # on a GPU host

Every (loss, dtype, method) runs in the same process on the same uint8 batch: all are compiled and warmed up first, then
timed in --repeats rounds of --steps steps, each case once per round (so load from other processes hits all alike).
Reported: the median images/s, and the medians of the per-round ratios: each method's overhead relative to method
'none' and each dtype's (loss's) speed relative to the first one.
"""
import argparse
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

from immiscible_jax import data, models, train, train_state  # pylint: disable=g-import-not-at-top
from immiscible_jax.parallel import layouts  # pylint: disable=g-import-not-at-top
from launch import sweep  # pylint: disable=g-import-not-at-top


class Case:
  """One compiled (config, method, dtype, scope) step with its state on the devices; `rate(steps)` times it."""

  def __init__(self, config, method, batch, dtype=None, scope=None, loss=None):
    config = config.copy_and_resolve_references()
    config.assignment.method = method
    config.training.loss = loss or config.training.loss
    config.model.dtype = dtype or config.model.dtype
    config.assignment.scope = scope or config.assignment.scope
    self.config = config
    model = models.create_model(config.model, config.data.channels)
    optimizer = train_state.create_optimizer(config.optim)
    layout = layouts.PmapLayout()
    self._state = layout.put_state(jax.jit(train_state.initializer(config, model, optimizer))(jax.random.key(0)))
    # The loop's function, one step a call, with the frozen network of training.loss (LPIPS) as the loop has it.
    self._step = train.make_train_steps(model, optimizer, config, layout, train.frozen_loss_params(config))
    # On the devices once, as the trainer's prefetch delivers it: [devices, k = 1, B_dev, ...].
    self._batch = layout.put_batches(jax.tree_util.tree_map(lambda x: x[None], batch))
    t0 = time.perf_counter()
    self.rate(1)
    self.compile_s = time.perf_counter() - t0

  def rate(self, steps):
    """Images/s over `steps` steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
      self._state, self._metrics = self._step(self._state, self._batch)
    jax.block_until_ready(self._metrics)
    return steps * self.config.training.batch_size / (time.perf_counter() - t0)

  def row(self, rates):
    m = jax.device_get(jax.tree_util.tree_map(lambda x: np.asarray(x).reshape(-1)[0], self._metrics))
    before, after = float(m['assignment/distance_before']), float(m['assignment/distance_after'])
    return dict(method=self.config.assignment.method, dtype=self.config.model.dtype, loss=self.config.training.loss,
                scope=self.config.assignment.scope, images_per_sec=float(np.median(rates)),
                compile_s=self.compile_s, reduction_pct=100 * (before - after) / before if before > 0 else 0.0)


def time_method(config, method, batch, steps, repeats, dtype=None, scope=None):
  """Median images/s of the pmapped step on `batch` (host uint8 {'image', 'example_id'}) with this assignment
  method (and model.dtype / assignment.scope when given), plus its compile time and distance reduction."""
  case = Case(config, method, batch, dtype, scope)
  return case.row([case.rate(steps) for _ in range(repeats)])


def synthetic_batch(config, seed=0):
  """Random uint8 images of the config's shape: the step's cost does not depend on their content."""
  shape = (config.training.batch_size, *data.image_shape(config.data))
  return {'image': np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8),
          'example_id': np.arange(shape[0], dtype=np.int32)}


def device_name():
  return f'{jax.device_count()}x {jax.devices()[0].device_kind} ({jax.default_backend()})'


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/digits.py')
  parser.add_argument('--batch_size', type=int, default=0, help='global batch (0 = the config\'s)')
  parser.add_argument('--methods', default='none,jv,hungarian,sinkhorn,scipy,knn')
  parser.add_argument('--scope', default='', help='override assignment.scope')
  parser.add_argument('--dtypes', default='', help="model.dtype values to time, e.g. float32,bfloat16 (default: the "
                      "config's)")
  parser.add_argument('--losses', default='', help="training.loss values to time, e.g. lpips,l2 (default: the "
                      "config's)")
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', default='')
  args = parser.parse_args()

  config = sweep.load_config(args.config)
  if args.batch_size:
    config.training.batch_size = args.batch_size
  if args.scope:
    config.assignment.scope = args.scope
  batch = synthetic_batch(config)
  dtypes = args.dtypes.split(',') if args.dtypes else [config.model.dtype]
  losses = args.losses.split(',') if args.losses else [config.training.loss]
  cases = [Case(config, method, batch, dtype=dtype, loss=loss)
           for loss in losses for dtype in dtypes for method in args.methods.split(',')]
  # Timed in rounds, every case once per round, so that load from other processes hits all cases alike; ratios
  # are medians of the per-round ratios.
  rounds = [[case.rate(args.steps) for case in cases] for _ in range(args.repeats)]
  rows = [case.row([r[i] for r in rounds]) for i, case in enumerate(cases)]
  for i, row in enumerate(rows):
    print(f"{row['loss']:>6} {row['dtype']:>9} {row['method']:>10}: {row['images_per_sec']:9.1f} images/s "
          f"(compile {row['compile_s']:.1f} s)", flush=True)
    base = next((j for j, r in enumerate(rows)
                 if r['method'] == 'none' and r['dtype'] == row['dtype'] and r['loss'] == row['loss']), None)
    row['overhead_pct'] = (100 * (float(np.median([r[base] / r[i] for r in rounds])) - 1)
                           if base is not None else None)
    first = next(j for j, r in enumerate(rows) if r['method'] == row['method'] and r['loss'] == row['loss'])
    row['speed_vs_first_dtype'] = float(np.median([r[i] / r[first] for r in rounds]))
    first = next(j for j, r in enumerate(rows) if r['method'] == row['method'] and r['dtype'] == row['dtype'])
    row['speed_vs_first_loss'] = float(np.median([r[i] / r[first] for r in rounds]))
    row['rates_per_round'] = [r[i] for r in rounds]
  device = device_name()
  print(f'\nconfig={args.config} batch={config.training.batch_size} scope={config.assignment.scope} '
        f'assignment dtype={config.assignment.dtype} cost={config.assignment.cost} device={device}')
  print(f'| training.loss | model.dtype | method | images/s | step overhead vs none | speed vs {dtypes[0]} | '
        f'speed vs {losses[0]} | distance reduction % |')
  print('|---|---|---|---:|---:|---:|---:|---:|')
  for r in rows:
    overhead = f"{r['overhead_pct']:+.1f}%" if r['overhead_pct'] is not None else 'n/a'
    print(f"| {r['loss']} | {r['dtype']} | {r['method']} | {r['images_per_sec']:.1f} | {overhead} | "
          f"{r['speed_vs_first_dtype']:.2f}x | {r['speed_vs_first_loss']:.2f}x | {r['reduction_pct']:.2f} |")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(dict(command=' '.join(['python', 'benchmarks/train_step.py'] + sys.argv[1:]), config=args.config,
                     batch_size=config.training.batch_size, device=device,
                     host=platform.processor() or platform.machine(), load_average=os.getloadavg(), rows=rows),
                f, indent=2)


if __name__ == '__main__':
  main()
