r"""Dispatch cost of the train step: parallel.mode 'pmap' vs 'shard_map', and training.steps_per_dispatch.

  python benchmarks/dispatch.py --json benchmarks/results/dispatch_cpu.json

The tiny model (configs/tiny.py, no assignment), so the host's dispatch work shows in the step time. Each layout
runs twice: 1 process x 8 forced CPU devices, and 2 processes x 4 devices started by launch.multiprocess. Per
step it times what the loop does: place the host batch(es) on the devices (pmap: shards of a host array;
shard_map: jax.make_array_from_process_local_data), call the compiled k-step function; after a warm-up, --steps
steps, --repeats times, median milliseconds per train step. Modes alternate repeat by repeat, so that a busy
machine slows both alike.
"""
import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
import warnings

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)
warnings.filterwarnings('ignore', message='.*JAXopt is no longer maintained.*')


def worker(args):
  """One process's part: compile every (mode, k), then time them in alternation; process 0 prints the rows."""
  from immiscible_jax import main as entry  # pylint: disable=g-import-not-at-top
  entry._maybe_initialize_distributed()  # pylint: disable=protected-access
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from immiscible_jax import data, models, replicas, train, train_state  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  model = models.create_model(config.model, config.data.channels)
  optimizer = train_state.create_optimizer(config.optim)
  state = jax.device_get(jax.jit(train_state.initializer(config, model, optimizer))(jax.random.key(0)))
  b_host = config.training.batch_size // jax.process_count()
  rng = np.random.default_rng(jax.process_index())
  runs = {}
  for mode in args.modes.split(','):
    for k in (int(k) for k in args.ks.split(',')):
      config.parallel.mode, config.training.steps_per_dispatch = mode, k
      layout = replicas.create_layout(mode)
      fn = train.make_train_steps(model, optimizer, config.copy_and_resolve_references(), layout)
      first_row = jax.process_index() * b_host  # process p holds contiguous rows of the global batch
      host = {'image': rng.uniform(-1, 1, (k, b_host, *data.image_shape(config.data))).astype(np.float32),
              'example_id': np.tile(np.arange(first_row, first_row + b_host, dtype=np.int32), (k, 1))}
      d_state = layout.put_state(state)
      t0 = time.perf_counter()
      d_state, metrics = fn(d_state, layout.put_batches(host))
      jax.block_until_ready(metrics)
      runs[(mode, k)] = dict(fn=fn, host=host, layout=layout, state=d_state, compile_s=time.perf_counter() - t0,
                             ms=[])
  for _ in range(args.repeats):
    for run in runs.values():
      k, fn, layout, d_state = len(run['host']['image']), run['fn'], run['layout'], run['state']
      dispatches = max(1, args.steps // k)
      t0 = time.perf_counter()
      for _ in range(dispatches):
        d_state, metrics = fn(d_state, layout.put_batches(run['host']))
      jax.block_until_ready(metrics)
      run['ms'].append(1000 * (time.perf_counter() - t0) / (dispatches * k))
      run['state'] = d_state
  rows = [dict(mode=mode, steps_per_dispatch=k, processes=jax.process_count(), devices=jax.device_count(),
               ms_per_step=float(np.median(run['ms'])), ms_all=[round(m, 3) for m in run['ms']],
               compile_s=run['compile_s']) for (mode, k), run in runs.items()]
  if jax.process_index() == 0:
    print('ROWS ' + json.dumps(rows), flush=True)


def _rows(output):
  line = next(line for line in output.splitlines() if 'ROWS ' in line)
  return json.loads(line.split('ROWS ', 1)[1])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--modes', default='pmap,shard_map')
  parser.add_argument('--ks', default='1,4', help='training.steps_per_dispatch values')
  parser.add_argument('--steps', type=int, default=40, help='train steps per timed repeat')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--layouts', default='1x8,2x4', help='processes x devices to measure')
  parser.add_argument('--json', default='')
  parser.add_argument('--worker', action='store_true', help='(internal) time in this process')
  args = parser.parse_args()
  if args.worker:
    return worker(args)

  from launch import multiprocess  # pylint: disable=g-import-not-at-top
  argv = [sys.executable, os.path.abspath(__file__), '--worker', f'--modes={args.modes}', f'--ks={args.ks}',
          f'--steps={args.steps}', f'--repeats={args.repeats}']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  rows = []
  if '1x8' in args.layouts:
    rows += _rows(subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout)
  if '2x4' in args.layouts:
    log = io.StringIO()
    statuses = multiprocess.run_processes(multiprocess.process_commands(argv, 2, multiprocess.free_port(), 4), log)
    if statuses != [0, 0]:
      sys.exit(f'2-process run failed: {statuses}\n{log.getvalue()[-4000:]}')
    rows += _rows(log.getvalue())
  cpus = os.cpu_count()
  print(f'\nconfigs/tiny.py, batch 16, assignment none, {platform.processor() or platform.machine()}, {cpus} cores')
  print('| processes x devices | mode | steps/dispatch | ms per step | vs pmap, same layout and k |')
  print('|---|---|---:|---:|---:|')
  base = {(r['processes'], r['steps_per_dispatch']): r['ms_per_step'] for r in rows if r['mode'] == 'pmap'}
  for r in rows:
    ref = base.get((r['processes'], r['steps_per_dispatch']))
    r['ratio_vs_pmap'] = r['ms_per_step'] / ref if ref else None
    ratio = f"{r['ratio_vs_pmap']:.2f}" if ref else 'n/a'
    print(f"| {r['processes']} x {r['devices'] // r['processes']} | {r['mode']} | {r['steps_per_dispatch']} | "
          f"{r['ms_per_step']:.2f} | {ratio} |")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(dict(config='configs/tiny.py', batch_size=16, assignment='none', cpu_cores=cpus,
                     host=platform.processor() or platform.machine(), device='forced CPU devices',
                     note='measured on a shared 2-core machine with other jobs running: compare rows, '
                          'not absolute times', rows=rows), f, indent=2)


if __name__ == '__main__':
  main()
