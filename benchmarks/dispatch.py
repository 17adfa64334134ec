r"""Per-step time of the loop's compiled k-step function against the plain train step, k = 1, 2, 4.

  python benchmarks/dispatch.py --json benchmarks/results/dispatch_cpu.json
  python benchmarks/dispatch.py --layouts=1x8,2x4 --configs=tiny --modes=pmap,shard_map    # layouts and modes

For each config (default: configs/digits.py and configs/tiny.py, assignment none) it compiles the plain step
(jax.pmap of train.train_step, one host batch per call), the same step in a length-1 lax.scan (what the loop
ran for k = 1 until 2026-12-06: on XLA:CPU several times slower), and the function the training loop runs
(train.make_train_steps: k stacked batches per call, in each parallel.mode asked for), then times them in
--repeats paired rounds: every case runs --steps train steps once per round, in the same order, so load from
other processes hits all cases alike. Each step includes placing its host batch on the devices, as the loop does.
Reported: the median ms per train step, and the median over rounds of each case's time / the plain step's time in
the same round (1.00 = the loop costs nothing over the plain step).

Layouts: '1x1' is one CPU device (a user's CPU run), '1x8' eight forced CPU devices in one process (the tests'
set-up), '2x4' two processes of four started by launch.multiprocess. Each layout runs in a subprocess of its own.
"""
import argparse
import functools
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


class _Case:
  """One compiled function with its device state; `time(steps)` runs `steps` train steps and returns seconds."""

  def __init__(self, name, fn, put, host, state, k):
    import jax  # pylint: disable=g-import-not-at-top
    self.name, self._fn, self._put, self._host, self._k = name, fn, put, host, k
    t0 = time.perf_counter()
    self._state, metrics = fn(state, put(host))
    jax.block_until_ready(metrics)
    self.compile_s = time.perf_counter() - t0
    self.ms = []

  def time(self, steps):
    import jax  # pylint: disable=g-import-not-at-top
    calls = max(1, steps // self._k)
    t0 = time.perf_counter()
    for _ in range(calls):
      self._state, metrics = self._fn(self._state, self._put(self._host))
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / (calls * self._k)


def _cases(config_name, modes, ks):
  """The plain step and the loop's function for every (mode, k) of one config, compiled and warmed up."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from immiscible_jax import data, models, train, train_state  # pylint: disable=g-import-not-at-top
  from immiscible_jax.parallel import layouts  # pylint: disable=g-import-not-at-top
  config = __import__(f'configs.{config_name}', fromlist=['get_config']).get_config()
  config.assignment.method = 'none'
  model = models.create_model(config.model, config.data.channels)
  optimizer = train_state.create_optimizer(config.optim)
  state = jax.device_get(jax.jit(train_state.initializer(config, model, optimizer))(jax.random.key(0)))
  b_host = config.training.batch_size // jax.process_count()
  first_row = jax.process_index() * b_host  # process p holds contiguous rows of the global batch
  rng = np.random.default_rng(jax.process_index())
  batch = {'image': rng.integers(0, 256, (b_host, *data.image_shape(config.data)), dtype=np.uint8),
           'example_id': np.arange(first_row, first_row + b_host, dtype=np.int32)}
  step = functools.partial(train.train_step, apply_fn=model.apply, optimizer=optimizer, config=config)
  pmap = layouts.PmapLayout()
  one = jax.tree_util.tree_map(lambda x: x[None], batch)
  plain, scan1 = pmap.compile(step), pmap.compile(lambda s, b, f: jax.lax.scan(lambda s, x: step(s, x, f), s, b))
  no_loss_params = pmap.put_state({})
  cases = [_Case('plain step', lambda s, b: plain(s, b, no_loss_params), layouts.put_sharded, batch,
                 pmap.put_state(state), 1),
           # What the loop ran for k = 1 before train_steps special-cased it: the guard against that regression.
           _Case('length-1 lax.scan', lambda s, b: scan1(s, b, no_loss_params), pmap.put_batches, one,
                 pmap.put_state(state), 1)]
  for mode in modes:
    layout = layouts.create_layout(mode)
    for k in ks:
      stacked = jax.tree_util.tree_map(lambda x, k=k: np.stack([x] * k), batch)
      cases.append(_Case(f'loop, {mode}, k={k}', train.make_train_steps(model, optimizer, config, layout),
                         layout.put_batches, stacked, layout.put_state(state), k))
  return config, cases


def worker(args):
  """One process's part: every config's cases, timed in paired rounds; process 0 prints the rows."""
  from immiscible_jax import main as entry  # pylint: disable=g-import-not-at-top
  entry._maybe_initialize_distributed()  # pylint: disable=protected-access
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rows = []
  for config_name in args.configs.split(','):
    config, cases = _cases(config_name, args.modes.split(','), [int(k) for k in args.ks.split(',')])
    for _ in range(args.repeats):
      for case in cases:
        case.ms.append(1000 * case.time(args.steps))
    plain = cases[0].ms
    for case in cases:
      rows.append(dict(config=f'configs/{config_name}.py', batch_size=config.training.batch_size, case=case.name,
                       processes=jax.process_count(), devices=jax.device_count(),
                       ms_per_step=float(np.median(case.ms)),
                       vs_plain=float(np.median([m / p for m, p in zip(case.ms, plain)])),
                       ms_per_round=[round(m, 2) for m in case.ms], compile_s=round(case.compile_s, 1)))
  if jax.process_index() == 0:
    print('ROWS ' + json.dumps(rows), flush=True)


def _rows(output):
  line = next((line for line in output.splitlines() if 'ROWS ' in line), None)
  if line is None:
    sys.exit(f'worker printed no rows:\n{output[-4000:]}')
  return json.loads(line.split('ROWS ', 1)[1])


def _measure(layout, argv):
  from launch import multiprocess  # pylint: disable=g-import-not-at-top
  processes, devices = (int(n) for n in layout.split('x'))
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  if processes == 1:
    run = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    return _rows(run.stdout + run.stderr)
  log = io.StringIO()
  statuses = multiprocess.run_processes(
      multiprocess.process_commands(argv, processes, multiprocess.free_port(), devices), log)
  if any(statuses):
    sys.exit(f'{layout} run failed: {statuses}\n{log.getvalue()[-4000:]}')
  return _rows(log.getvalue())


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--configs', default='digits,tiny', help='config modules under configs/')
  parser.add_argument('--modes', default='pmap', help='parallel.mode values of the loop\'s function')
  parser.add_argument('--ks', default='1,2,4', help='training.steps_per_dispatch values')
  parser.add_argument('--steps', type=int, default=8, help='train steps per case per round')
  parser.add_argument('--repeats', type=int, default=5, help='paired rounds')
  parser.add_argument('--layouts', default='1x1', help='processes x devices, e.g. 1x1,1x8,2x4')
  parser.add_argument('--json', default='')
  parser.add_argument('--worker', action='store_true', help='(internal) time in this process')
  args = parser.parse_args()
  if args.worker:
    return worker(args)

  argv = [sys.executable, os.path.abspath(__file__), '--worker', f'--configs={args.configs}', f'--modes={args.modes}',
          f'--ks={args.ks}', f'--steps={args.steps}', f'--repeats={args.repeats}']
  rows = [row for layout in args.layouts.split(',') for row in _measure(layout, argv)]
  host = f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores'
  print(f'\nassignment none, {host}, median of {args.repeats} paired rounds of {args.steps} steps')
  print('| config | processes x devices | function | ms per step | vs plain step, same round |')
  print('|---|---|---|---:|---:|')
  for r in rows:
    print(f"| {r['config']} (batch {r['batch_size']}) | {r['processes']} x {r['devices'] // r['processes']} | "
          f"{r['case']} | {r['ms_per_step']:.1f} | {r['vs_plain']:.2f} |")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(dict(command=' '.join(['python', 'benchmarks/dispatch.py'] + sys.argv[1:]), host=host,
                     device='CPU (XLA:CPU; forced host devices beyond 1)', assignment='none',
                     load_average=os.getloadavg(), rows=rows), f, indent=2)


if __name__ == '__main__':
  main()
