r"""What one checkpoint save costs the training thread, part by part, for a config's train state.

  python benchmarks/checkpoint_save.py --json benchmarks/results/checkpoint_save_cpu.json   # configs/cifar10_ct.py

The state (parameters, CT target, EMA, RAdam moments: 5 copies of the 56,395,651 parameters, 1.13 GB in float32)
is built on one device and refreshed by a jitted step before every save, as the loop's state is. Each round saves
it twice, the old way then the loop's way, into two checkpoint folders (max_to_keep 1):
  inline      host copy (layout.host), CRC-32 of every leaf, Orbax's CheckpointManager.save() call, all on the
              calling thread (the loop before this change); then Orbax's background write (wait_until_finished)
  background  host copy on the calling thread; checksums and the save() call on checkpointing.BackgroundSaves'
              thread; the calling thread is free after the copy (plus starting the thread)
Reported per part: the median over --repeats rounds (seconds), and the load average.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top,wrong-import-position

from immiscible_jax import checkpointing, models, train_state  # pylint: disable=g-import-not-at-top
from immiscible_jax.parallel import layouts  # pylint: disable=g-import-not-at-top
from launch import sweep  # pylint: disable=g-import-not-at-top


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/cifar10_ct.py')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dir', default='', help='where the checkpoints go (default: a temporary folder)')
  parser.add_argument('--json', default='')
  args = parser.parse_args()

  config = sweep.load_config(args.config)
  model = models.create_model(config.model, config.data.channels)
  init = train_state.initializer(config, model, train_state.create_optimizer(config.optim))
  state, init_s = _timed(lambda: jax.block_until_ready(jax.jit(init)(jax.random.key(0))))
  layout = layouts.PmapLayout(jax.local_devices()[:1])
  d_state = layout.put_state(jax.device_get(state))
  del state
  # Stands in for a train step: new device buffers for the whole state, the old ones donated.
  refresh = jax.pmap(lambda s: jax.tree_util.tree_map(lambda x: x + 0 if x.dtype != np.int32 else x + 1, s),
                     donate_argnums=0, devices=jax.local_devices()[:1])
  leaves = jax.tree_util.tree_leaves(d_state)
  state_bytes = sum(x.nbytes for x in leaves)
  root = args.dir or tempfile.mkdtemp(prefix='checkpoint_save_')
  managers = {way: checkpointing.create_manager(os.path.join(root, way), _keep_one(config))
              for way in ('inline', 'background')}
  background = checkpointing.BackgroundSaves(managers['background'])
  meta = {'config': config.to_dict()}
  rows = {'inline': [], 'background': []}
  for r in range(args.repeats):
    for way in ('inline', 'background'):
      d_state = jax.block_until_ready(refresh(d_state))
      step = 2 * r + 1
      host, copy_s = _timed(lambda: layout.host(d_state))
      if way == 'inline':
        crc, crc_s = _timed(lambda: checkpointing.checksums(host))
        full_meta = {**meta, 'state_crc32': crc}
        save_args = ocp.args.Composite(state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(full_meta))
        _, orbax_s = _timed(lambda: managers['inline'].save(step, args=save_args, force=True))
        _, write_s = _timed(managers['inline'].wait_until_finished)
        rows[way].append(dict(host_copy_s=copy_s, crc_s=crc_s, orbax_save_call_s=orbax_s,
                              training_thread_s=copy_s + crc_s + orbax_s, until_written_s=write_s))
      else:
        _, start_s = _timed(lambda: checkpointing.save(background, step, host, meta))
        _, write_s = _timed(background.wait_until_finished)
        rows[way].append(dict(host_copy_s=copy_s, start_thread_s=start_s, training_thread_s=copy_s + start_s,
                              until_written_s=write_s))
      del host
      print(f'round {r} {way:>10}: ' + ', '.join(f'{k} {v:.3f}' for k, v in rows[way][-1].items()), flush=True)
  medians = {way: {k: float(np.median([row[k] for row in rs])) for k in rs[0]} for way, rs in rows.items()}
  print(f'\n{args.config}: state {state_bytes / 1e9:.2f} GB in {len(leaves)} leaves, {jax.devices()[0].device_kind} '
        f'({jax.default_backend()}), median of {args.repeats} rounds, load average {os.getloadavg()[0]:.1f}')
  print('| way | host copy (s) | CRC-32 (s) | Orbax save() call (s) | training thread (s) | until written (s) |')
  print('|---|---:|---:|---:|---:|---:|')
  for way, m in medians.items():
    print(f"| {way} | {m['host_copy_s']:.3f} | {m.get('crc_s', float('nan')):.3f} | "
          f"{m.get('orbax_save_call_s', float('nan')):.3f} | {m['training_thread_s']:.3f} | "
          f"{m['until_written_s']:.3f} |")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(dict(command=' '.join(['python', 'benchmarks/checkpoint_save.py'] + sys.argv[1:]),
                     config=args.config, state_bytes=state_bytes, leaves=len(leaves),
                     device=f'{jax.devices()[0].device_kind} ({jax.default_backend()})',
                     host=f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
                     load_average=os.getloadavg(), init_s=init_s, medians=medians, rounds=rows), f, indent=2)
  if not args.dir:
    shutil.rmtree(root, ignore_errors=True)


def _keep_one(config):
  ckpt = config.checkpoint.copy_and_resolve_references()
  ckpt.max_to_keep = 1
  return ckpt


if __name__ == '__main__':
  main()
