r"""FLOPs per image of a config's train step, from XLA's cost analysis of the compiled step (no timing).

  python benchmarks/flops.py --json benchmarks/results/flops_cifar10_ct_cpu.json      # configs/cifar10_ct.py

The loop's own compiled step (train.make_train_steps, pmap over one device, assignment 'none') is compiled at two
small per-device batches, b1 and b2, for the config's loss and for training.loss = 'l2' (the same step without
LPIPS). A step's count is linear in the batch, F(b) = a b + c: a is the cost of one image (networks, loss,
gradients), c the cost of one step whatever the batch (optimizer, EMA and target updates: a few FLOPs per
parameter). Reported: a, c, and F(b) / b at per-device batch 128 (what perf/mfu divides by in a run at that
batch). LPIPS's weights need not be converted: random weights of the same shapes cost the same.
"""
import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import device_check  # pylint: disable=g-import-not-at-top,wrong-import-position
from immiscible_jax import data, models, perf, train, train_state  # pylint: disable=g-import-not-at-top
from immiscible_jax.parallel import layouts  # pylint: disable=g-import-not-at-top


def step_flops(config, per_device_batch, loss_params):
  """(XLA's FLOPs of one compiled train step at this per-device batch on one device, compile seconds)."""
  config = config.copy_and_resolve_references()
  config.training.batch_size = per_device_batch
  config.assignment.method = 'none'
  model = models.create_model(config.model, config.data.channels)
  optimizer = train_state.create_optimizer(config.optim)
  layout = layouts.PmapLayout(jax.local_devices()[:1])
  abstract = jax.eval_shape(train_state.initializer(config, model, optimizer), jax.random.key(0))
  d_state = layout.put_state(jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), abstract))
  steps = train.make_train_steps(model, optimizer, config, layout, loss_params)
  shape = (1, per_device_batch, *data.image_shape(config.data))
  batch = layout.put_batches({'image': np.zeros(shape, np.uint8),
                              'example_id': np.arange(per_device_batch, dtype=np.int32)[None]})
  t0 = time.perf_counter()
  flops = perf.flops_per_call(steps.lower(d_state, batch))
  return flops, time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/cifar10_ct.py')
  parser.add_argument('--batches', default='1,2', help='the two per-device batches b1,b2 compiled')
  parser.add_argument('--at', type=int, default=128, help='report FLOPs per image at this per-device batch')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  config = device_check._load_config(args.config)  # pylint: disable=protected-access
  b1, b2 = (int(b) for b in args.batches.split(','))
  rows = []
  losses = [config.training.loss] + (['l2'] if config.training.loss != 'l2' else [])
  for loss in losses:
    variant = config.copy_and_resolve_references()
    variant.training.loss = loss
    loss_params, weights = device_check._loss_params(variant)  # pylint: disable=protected-access
    (f1, s1), (f2, s2) = step_flops(variant, b1, loss_params), step_flops(variant, b2, loss_params)
    per_image = (f2 - f1) / (b2 - b1)
    per_step = f1 - per_image * b1
    rows.append(dict(loss=loss, lpips_weights=weights or None, flops_at=[[b1, f1], [b2, f2]], compile_s=[s1, s2],
                     gflops_per_image_marginal=per_image / 1e9, gflops_per_step_fixed=per_step / 1e9,
                     gflops_per_image_at=(per_image + per_step / args.at) / 1e9))
    print(f"{args.config} loss={loss}: {per_image / 1e9:.2f} GFLOPs per image + {per_step / 1e9:.2f} GFLOPs per step "
          f"-> {rows[-1]['gflops_per_image_at']:.2f} GFLOPs per image at per-device batch {args.at} "
          f"(compiles {s1:.0f} s, {s2:.0f} s)", flush=True)
  result = dict(command=' '.join(['python', 'benchmarks/flops.py'] + sys.argv[1:]), config=args.config,
                model_dtype=config.model.dtype, device=f'{jax.devices()[0].device_kind} ({jax.default_backend()})',
                jax=jax.__version__, host=f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
                per_device_batch_reported=args.at, rows=rows)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
