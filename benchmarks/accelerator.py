r"""One command for a machine with an accelerator: what a CIFAR-10 run costs there, in one JSON and one table.

  make bench-accel            # = python benchmarks/accelerator.py (about 8 minutes on one GPU, at most --budget_s)
  python benchmarks/accelerator.py --smoke --json /tmp/smoke.json    # everything shrunk: about a minute on CPU

Sections, in this order (each within its share of the budget, unspent time passing to the next):
  train      images/s of the pmapped train step of configs/cifar10_ct.py (56M parameters) at per-device batch
             128 and 64, model.dtype bfloat16 and float32, assignment none / auction (the method README recommends
             for accelerators) / jv (exact) / knn, scope global and local ('none' has no scope). Cases run most
             informative first (both dtypes without assignment, then each method at batch 128 in bfloat16).
  assignment the jitted assign_noise alone at B = 256 ... 4096 (benchmarks/assignment.py's rows: time, ratio to
             the paper's host scipy path, quality, loop steps) for none / auction / jv / knn, sqeuclidean cost.
  sampling   one-step samples/s of the cifar10_ct model (sampling.make_sampler), per-device batch 256.
  inception  Inception-v3 pool3 features/s (uint8 32x32 -> 299x299), batch 256 (benchmarks/inception.py).
A case that would start after its section's time is spent is skipped and listed with the reason, so the command
always finishes and says what it did not measure. The JSON names the device, jax version and the budget used.
--smoke: configs/tiny.py, per-device batch 2, 2 train cases (bfloat16: none; auction, global), B = 16 for none
and auction, 8 samples a device, no Inception: it checks that the command runs end to end and writes its JSON
(the numbers mean nothing).
"""
import argparse
import json
import os
import platform
import sys
import time
import types
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings('ignore', message='.*JAXopt is no longer maintained.*')

import flax.jax_utils  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

import assignment as assignment_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
import inception as inception_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step as train_step_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from immiscible_jax import data, models, sampling, train_state  # pylint: disable=g-import-not-at-top

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
# Share of the budget per section; time a section leaves unspent goes to the next ones.
SHARES = dict(train=0.6, assignment=0.2, sampling=0.08, inception=0.12)
METHODS = ('auction', 'jv', 'knn')


def plan(smoke):
  """The sizes of every section: full for an accelerator, tiny for --smoke."""
  if smoke:  # two train compiles, two assignment methods, no Inception (its compile alone is ~a minute on CPU)
    return dict(config='configs/tiny.py', per_device_batches=(2,), dtypes=('bfloat16',),
                methods=('auction',), steps=2, repeats=1, assignment_batches=(16,), assignment_methods='none,auction',
                sample_batch=8, inception_batch=0, min_seconds=0.0, max_train_cases=2)
  return dict(config='configs/cifar10_ct.py', per_device_batches=(128, 64), dtypes=('bfloat16', 'float32'),
              methods=METHODS, steps=5, repeats=3, assignment_batches=(256, 512, 1024, 2048, 4096),
              assignment_methods='none,auction,jv,knn', sample_batch=256, inception_batch=256, min_seconds=3.0,
              max_train_cases=None)


def train_cases(p):
  """(per-device batch, dtype, method, scope), most informative first."""
  big, dtypes = p['per_device_batches'][0], p['dtypes']
  cases = [(big, d, 'none', 'local') for d in dtypes]
  cases += [(big, dtypes[0], m, 'global') for m in p['methods']]
  cases += [(big, dtypes[0], m, 'local') for m in p['methods']]
  cases += [(big, d, m, s) for d in dtypes[1:] for m in p['methods'] for s in ('global', 'local')]
  for small in p['per_device_batches'][1:]:
    cases += [(small, d, 'none', 'local') for d in dtypes]
    cases += [(small, d, m, s) for d in dtypes for m in p['methods'] for s in ('global', 'local')]
  return cases[:p['max_train_cases']]


class Budget:
  """Seconds left to the whole run and to the current section (a section's share plus what earlier ones left)."""

  def __init__(self, total_s):
    self.start, self.total_s, self.section_end = time.perf_counter(), total_s, 0.0

  def open(self, name):
    shares_left = sum(v for k, v in SHARES.items() if list(SHARES).index(k) >= list(SHARES).index(name))
    remaining = self.total_s - (time.perf_counter() - self.start)
    self.section_end = time.perf_counter() + remaining * SHARES[name] / shares_left

  def over(self):
    return time.perf_counter() >= self.section_end


def load_config(path):
  return train_step_bench.load_config(os.path.join(ROOT, path))


def bench_train(p, budget):
  rows, skipped = [], []
  base = load_config(p['config'])
  for per_device, dtype, method, scope in train_cases(p):
    case = dict(per_device_batch=per_device, dtype=dtype, method=method, scope=scope)
    if budget.over():
      skipped.append({**case, 'reason': 'time budget of the train section spent'})
      continue
    config = base.copy_and_resolve_references()
    config.training.batch_size = per_device * jax.device_count()
    try:
      row = train_step_bench.time_method(config, method, train_step_bench.synthetic_batch(config), p['steps'],
                                         p['repeats'], dtype=dtype, scope=scope)
    except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: record it, go on
      skipped.append({**case, 'reason': f'{type(e).__name__}: {str(e)[:200]}'})
      continue
    rows.append({**case, 'images_per_s': round(row['images_per_sec'], 1), 'compile_s': round(row['compile_s'], 1),
                 'reduction_pct': round(row['reduction_pct'], 3)})
    print(f"train  B/device={per_device:4d} {dtype:>8} {method:>7} {scope:>6}: {rows[-1]['images_per_s']:9.1f} "
          f"images/s (compile {rows[-1]['compile_s']} s)", flush=True)
  return dict(config=p['config'], rows=rows, skipped=skipped)


def bench_assignment(p, budget):
  args = types.SimpleNamespace(num_batches=1, repeats=5, max_batch={}, jv_sweep=0, dtype='bfloat16')
  methods = p['assignment_methods'].split(',')
  pool, source = assignment_bench.load_images('', max(p['assignment_batches']))
  rows, skipped = [], []
  for batch in p['assignment_batches']:
    if budget.over():
      skipped.append(dict(batch_size=batch, reason='time budget of the assignment section spent'))
      continue
    batch_rows, _ = assignment_bench.bench_batch(batch, pool, methods, ['sqeuclidean'], args)
    rows += [{k: v for k, v in r.items() if not k.endswith('_per_batch')} for r in batch_rows]
  return dict(images=source, rows=rows, skipped=skipped)


def bench_sampling(p, budget):
  if budget.over():
    return dict(rows=[], skipped=[dict(reason='time budget spent before sampling')])
  config = load_config(p['config'])
  model = models.create_model(config.model, config.data.channels)
  params = jax.jit(train_state.initializer(config, model, train_state.create_optimizer(config.optim)))(
      jax.random.key(0)).params
  shape = data.image_shape(config.data)
  sampler = sampling.make_sampler(model.apply, shape, (config.training.sigma_max,), config.training.sigma_min,
                                  config.training.sigma_data)
  replicated = flax.jax_utils.replicate(params)
  n = p['sample_batch'] * jax.local_device_count()
  run = lambda: sampling.generate(sampler, replicated, jax.random.key(1), n, shape, p['sample_batch'])
  row = inception_bench._time(run, n, p['min_seconds'])  # pylint: disable=protected-access
  row = dict(per_device_batch=p['sample_batch'], steps=1, dtype=config.model.dtype,
             images_per_s=row['images_per_s'], first_call_s=row['first_call_s'])
  print(f"sampling 1-step, {n} a call: {row['images_per_s']} images/s", flush=True)
  return dict(config=p['config'], rows=[row], skipped=[])


def bench_inception(p, budget):
  if not p['inception_batch']:
    return dict(rows=[], skipped=[dict(reason='not run by --smoke (the 299x299 network compiles for about a minute '
                                              'on CPU; tests/test_inception.py checks its features)')])
  if budget.over():
    return dict(rows=[], skipped=[dict(reason='time budget spent before inception')])
  params, weights = inception_bench._params()  # pylint: disable=protected-access
  rows = inception_bench.bench_flax(params, [p['inception_batch']], p['min_seconds'])
  return dict(weights=weights, rows=rows, skipped=[])


def print_table(result):
  print(f"\ndevice: {result['device']}  jax {result['jax']}  budget {result['budget_s']} s, used "
        f"{result['elapsed_s']} s{'  (SMOKE: numbers mean nothing)' if result['smoke'] else ''}")
  print('| section | case | images/s | note |')
  print('|---|---|---:|---|')
  train = result['train']
  for r in train['rows']:
    case = f"B/device {r['per_device_batch']}, {r['dtype']}, {r['method']}" + (
        f" ({r['scope']})" if r['method'] != 'none' else '')
    print(f"| train | {case} | {r['images_per_s']} | compile {r['compile_s']} s |")
  for r in result['assignment']['rows']:
    print(f"| assignment | B {r['batch_size']}, {r['method']} | {1e3 * r['batch_size'] / r['median_ms']:.0f} | "
          f"{r['median_ms']:.1f} ms, quality {r['quality']:.4f} |")
  for r in result['sampling']['rows']:
    print(f"| sampling | 1 step, B/device {r['per_device_batch']} | {r['images_per_s']} | |")
  for r in result['inception']['rows']:
    print(f"| inception | batch {r['batch_size']} | {r['images_per_s']} | weights {result['inception'].get('weights')} |")
  for section in ('train', 'assignment', 'sampling', 'inception'):
    for s in result[section]['skipped']:
      print(f"| {section} | skipped: {', '.join(f'{k}={v}' for k, v in s.items() if k != 'reason')} | - | "
            f"{s['reason']} |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--budget_s', type=float, default=480.0, help='wall-clock budget of the measurements')
  parser.add_argument('--smoke', action='store_true', help='shrink everything (a CPU test of the command)')
  parser.add_argument('--json', default='', help='default: benchmarks/results/accelerator_<backend>.json')
  args = parser.parse_args(argv)
  p = plan(args.smoke)
  budget = Budget(args.budget_s)
  device = train_step_bench.device_name()
  print(f'device: {device}; budget {args.budget_s} s', flush=True)
  result = dict(device=device, device_kind=jax.devices()[0].device_kind, backend=jax.default_backend(),
                device_count=jax.device_count(), jax=jax.__version__, host=platform.machine(), cpus=os.cpu_count(),
                smoke=args.smoke, budget_s=args.budget_s, command=' '.join(sys.argv))
  for name, fn in (('train', bench_train), ('assignment', bench_assignment), ('sampling', bench_sampling),
                   ('inception', bench_inception)):
    budget.open(name)
    result[name] = fn(p, budget)
  result['elapsed_s'] = round(time.perf_counter() - budget.start, 1)
  print_table(result)
  path = args.json or os.path.join(ROOT, 'benchmarks', 'results', f'accelerator_{jax.default_backend()}.json')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'wrote {path}')
  return result


if __name__ == '__main__':
  main()
