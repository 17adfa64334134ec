"""Benchmark of immiscible noise assignment at CIFAR-10 shape (32x32x3): time and quality per method and cost.

For each batch size, method and cost: the median wall time of the jitted `assign_noise` (cost matrix + solve
+ reorder) after a warm-up call, and its quality: the reduction of the mean image-noise L2 distance as a
fraction of the optimal one (exact L2 assignment, scipy in float64) and as a raw % of the random pairing.
The same run times the paper's path (fp16 L2 distances, scipy linear_sum_assignment on the host, permuted
noise back to the device) and reports every method's time as a ratio to it.

  .venv/bin/python benchmarks/assignment.py --json benchmarks/results/assignment_cpu.json
  .venv/bin/python benchmarks/assignment.py --batch_sizes 1024 --methods jv --jv_sweep 1024  # jv's knobs

Images: the real CIFAR-10 JPEG archive when present (--data), else labelled synthetic images.
"""
import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
warnings.filterwarnings('ignore', message='.*JAXopt is no longer maintained.*')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402

from immiscible_jax import assignment  # noqa: E402
from immiscible_jax import assignment_solvers  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
DEFAULT_DATA = os.path.join(ROOT, os.pardir, 'shared', 'data', 'cifar10-jpg.tar.gz')
SHAPE = (32, 32, 3)


def load_images(path, count, seed=0):
  """`count` CIFAR-10 training images in [-1, 1] (an equal share per class), or synthetic ones."""
  if os.path.exists(path):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    per_class, taken, images = -(-count // 10), {}, []
    with tarfile.open(path, 'r|gz') as archive:
      for member in archive:
        parts = member.name.split('/')
        if not member.isfile() or len(parts) != 3 or parts[0] != 'train':
          continue
        if taken.get(parts[1], 0) < per_class:
          taken[parts[1]] = taken.get(parts[1], 0) + 1
          data = archive.extractfile(member).read()
          images.append(np.asarray(Image.open(io.BytesIO(data)).convert('RGB')))
    source = f'CIFAR-10 train JPEGs ({os.path.relpath(path, ROOT)})'
    images = np.stack(images).astype(np.float32) / 127.5 - 1.0
  else:
    # Ten labelled classes: a smooth class template (4x4 upsampled) plus a per-image variation.
    rng = np.random.default_rng(seed)
    templates = rng.uniform(-0.8, 0.8, (10, 4, 4, 3))
    labels = np.arange(count) % 10
    coarse = templates[labels] + 0.4 * rng.normal(size=(count, 4, 4, 3))
    images = coarse.repeat(8, axis=1).repeat(8, axis=2) + 0.1 * rng.normal(size=(count,) + SHAPE)
    images = np.clip(images, -1, 1).astype(np.float32)
    source = 'synthetic labelled images (CIFAR-10 archive not found)'
  np.random.default_rng(seed).shuffle(images)
  return images[:count], source


def median_ms(fn, args, max_repeats, budget_s=1.5):
  """Median over up to `max_repeats` timed calls (at least 3, fewer when a call is slow) after a warm-up."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  while len(times) < max(3, min(max_repeats, int(budget_s / max(min(times, default=1e-3), 1e-3)))):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def median_ms_and_ratio(fn, args, base, base_args, max_repeats, budget_s=3.0):
  """Median time of `fn` and median ratio to `base`, timed alternately so that load from other processes
  on a shared machine hits both alike. At least 3 pairs, more while within about `budget_s`."""
  jax.block_until_ready(fn(*args))
  times, ratios = [], []
  while len(times) < max(3, min(max_repeats, int(budget_s / max(min(times, default=1e-3) * 2, 1e-3)))):
    start = time.perf_counter()
    jax.block_until_ready(base(*base_args))
    middle = time.perf_counter()
    jax.block_until_ready(fn(*args))
    end = time.perf_counter()
    times.append(end - middle)
    ratios.append((end - middle) / (middle - start))
  return 1e3 * statistics.median(times), statistics.median(ratios)


def l2_distances(images, noise):
  x = images.reshape(len(images), -1).astype(np.float64)
  n = noise.reshape(len(noise), -1).astype(np.float64)
  sq = (x * x).sum(1)[:, None] + (n * n).sum(1)[None, :] - 2.0 * x @ n.T
  return np.sqrt(np.maximum(sq, 0.0))


def paper_baseline(images, noise):
  """The official code's path: fp16 L2 distances, host scipy, permuted noise back on the device."""
  distances = jax.jit(lambda x, n: assignment.cost_matrix(x, n, 'l2', jnp.float32).astype(jnp.float16))
  take = jax.jit(lambda n, perm: n[perm])

  def run(x, n):
    cost = np.asarray(distances(x, n)).astype(np.float32)
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    perm = np.empty(len(rows), np.int32)
    perm[rows] = cols
    return take(n, jnp.asarray(perm))

  return run


def make_config(method, cost, dtype, **extra):
  values = dict(method=method, cost=cost, dtype=dtype, scope='local', knn_k=8, sinkhorn_epsilon=0.05,
                sinkhorn_max_iterations=200, sinkhorn_threshold=1e-3)
  values.update(extra)
  return ml_collections.ConfigDict(values)


def quality_of(images, out, distances, optimal):
  before = float(np.mean(np.diag(distances)))
  after = float(np.mean(l2_distances(images, np.asarray(out)).diagonal()))
  return (before - after) / (before - optimal), 100.0 * (before - after) / before


def _log_domain_potentials(cost, epsilon, num_iterations):
  """The textbook log-domain Sinkhorn (two logsumexps per iteration), to compare with the kernel form."""
  def body(_, g):
    f = -epsilon * jax.nn.logsumexp((g[None, :] - cost) / epsilon, axis=1)
    return -epsilon * jax.nn.logsumexp((f[:, None] - cost) / epsilon, axis=0)
  return jax.lax.fori_loop(0, num_iterations, body, jnp.zeros(cost.shape[1], cost.dtype))


def jv_sweep(images, noise, repeats):
  """Time of jv's parts and of its knobs on one problem (sqeuclidean, bf16): the README's 'what we tried'."""
  cost_fn = jax.jit(lambda x, n: assignment.cost_matrix(x, n, 'sqeuclidean', jnp.bfloat16))
  cost = cost_fn(images, noise)
  eps = 0.03 * float(jnp.std(cost))
  timed = [('cost matrix only (-x.n, bf16 in, f32 acc)', cost_fn, (images, noise)),
           ('row-wise jnp.argmin over the BxB cost', jax.jit(lambda c: jnp.argmin(c, axis=1)), (cost,)),
           ('row-wise min, then first index at the min (two plain reductions)',
            jax.jit(lambda c: assignment_solvers.min_and_argmin(c, axis=1)), (cost,)),
           ('40 kernel-domain Sinkhorn iterations (warm start only)',
            jax.jit(lambda c: assignment_solvers.sinkhorn_column_potentials(c, eps, 40)), (cost,)),
           ('40 log-domain Sinkhorn iterations',
            jax.jit(lambda c: _log_domain_potentials(c, eps, 40)), (cost,))]
  rows = [dict(what=what, median_ms=median_ms(fn, args, repeats)) for what, fn, args in timed]
  knobs = [(0.03, 40, 1), (0.1, 0, 0), (0.1, 0, 2), (0.1, 0, 8), (0.1, 10, 1), (0.05, 20, 0), (0.05, 40, 0),
           (0.03, 40, 0), (0.03, 40, 4), (0.03, 80, 1), (0.02, 40, 0), (0.02, 80, 0)]
  for eps_rel, iters, sweeps in knobs:
    fn = jax.jit(lambda c, e=eps_rel, i=iters, s=sweeps: assignment_solvers.jv(c, e, i, s, return_stats=True))
    stats = {k: int(v) for k, v in fn(cost)[1].items()}
    what = f'jv solve only: warm_start_epsilon={eps_rel} iterations={iters} arr_sweeps={sweeps}'
    rows.append(dict(what=what, median_ms=median_ms(fn, (cost,), repeats), **stats))
  rows.append(dict(what='optax hungarian solve only',
                   median_ms=median_ms(jax.jit(assignment_solvers.hungarian), (cost,), repeats)))
  rows.append(dict(what='scipy linear_sum_assignment on this cost, host only',
                   median_ms=median_ms(scipy.optimize.linear_sum_assignment, (np.asarray(cost),), repeats)))
  for row in rows:
    extra = ' '.join(f'{k}={v}' for k, v in row.items() if k not in ('what', 'median_ms'))
    print(f"{row['median_ms']:9.1f} ms  {row['what']}  {extra}", flush=True)
  return rows


def bench_batch(batch, all_images, methods, costs, args):
  """Rows for one batch size: the paper's path first, then every method x cost."""
  images = jnp.asarray(all_images[:batch])
  noise = jax.random.normal(jax.random.key(batch), images.shape, jnp.float32)
  distances = l2_distances(np.asarray(images), np.asarray(noise))
  r, c = scipy.optimize.linear_sum_assignment(distances)
  optimal = float(distances[r, c].mean())
  baseline = paper_baseline(images, noise)
  base_ms = median_ms(baseline, (images, noise), args.repeats)
  quality, reduction = quality_of(np.asarray(images), baseline(images, noise), distances, optimal)
  fp16 = np.asarray(assignment.cost_matrix(images, noise, 'l2', jnp.float32).astype(jnp.float16), np.float32)
  lsa_ms = median_ms(scipy.optimize.linear_sum_assignment, (fp16,), args.repeats)
  rows = [dict(method='paper_baseline', cost='l2', batch_size=batch, median_ms=base_ms, quality=quality,
               reduction_pct=reduction, ratio_to_paper_baseline=1.0, host_lsa_only_ms=lsa_ms)]
  print(f'B={batch}: paper baseline {base_ms:.1f} ms (host LSA alone {lsa_ms:.1f} ms), quality {quality:.4f}',
        flush=True)
  key = jax.random.key(1)
  for method in methods:
    if method in args.skip_above and batch > args.skip_above_batch:
      continue
    for cost in costs:
      config = make_config(method, cost, args.dtype)
      fn = jax.jit(lambda x, n, k, config=config: assignment.assign_noise(x, n, k, config))
      ms, ratio = median_ms_and_ratio(fn, (images, noise, key), baseline, (images, noise), args.repeats)
      quality, reduction = quality_of(np.asarray(images), fn(images, noise, key)[0], distances, optimal)
      rows.append(dict(method=method, cost=cost, batch_size=batch, median_ms=ms, quality=quality,
                       reduction_pct=reduction, ratio_to_paper_baseline=ratio))
      print(f'B={batch} {method:9s} {cost:11s} {ms:9.1f} ms  ratio {ratio:6.3f}  quality {quality:.4f}  '
            f'reduction {reduction:.3f}%', flush=True)
  if batch == args.jv_sweep:
    return rows, jv_sweep(images, noise, args.repeats)
  return rows, None


def print_table(rows, batch_sizes):
  print('\n| method | cost | ' + ' | '.join(f'B={b}' for b in batch_sizes) + ' |')
  print('|---|---|' + '---:|' * len(batch_sizes))
  keys = sorted({(r['method'], r['cost']) for r in rows}, key=lambda k: (k[0] != 'paper_baseline', k))
  for method, cost in keys:
    cells = []
    for b in batch_sizes:
      row = next((r for r in rows if (r['method'], r['cost'], r['batch_size']) == (method, cost, b)), None)
      cells.append('skipped' if row is None else
                   f"{row['median_ms']:.1f} ms ({row['ratio_to_paper_baseline']:.2f}x, "
                   f"q {row['quality']:.3f}, -{row['reduction_pct']:.2f}%)")
    print(f'| {method} | {cost} | ' + ' | '.join(cells) + ' |')


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch_sizes', default='64,128,256,512,1024', help='e.g. add 2048')
  parser.add_argument('--methods', default='none,jv,hungarian,sinkhorn,scipy,knn')
  parser.add_argument('--costs', default='sqeuclidean,l2')
  parser.add_argument('--dtype', default='bfloat16', choices=sorted(assignment.DTYPES))
  parser.add_argument('--repeats', type=int, default=15,
                      help='at most this many timed calls per row (at least 3; fewer when calls are slow)')
  parser.add_argument('--skip_above', default='hungarian,sinkhorn,knn', help='slow methods skipped above ...')
  parser.add_argument('--skip_above_batch', type=int, default=1024, help='... this batch size')
  parser.add_argument('--data', default=DEFAULT_DATA)
  parser.add_argument('--json', default='', help='write the rows here')
  parser.add_argument('--jv_sweep', type=int, default=0,
                      help='also time jv parts and knobs at this batch size (0: no)')
  args = parser.parse_args()
  args.skip_above = args.skip_above.split(',')
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  load_start = os.getloadavg()
  # A fixed pool (at least 2048 images), so a batch size sees the same images whatever else is run.
  all_images, source = load_images(args.data, max(batch_sizes + [2048]))
  print(f'images: {source}; jax {jax.__version__} on {jax.default_backend()}; {os.cpu_count()} CPUs',
        flush=True)
  rows, sweep = [], None
  for batch in batch_sizes:
    methods, costs = args.methods.split(','), args.costs.split(',')
    batch_rows, batch_sweep = bench_batch(batch, all_images, methods, costs, args)
    rows += batch_rows
    sweep = batch_sweep or sweep
  machine = dict(processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                 backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                 jax=jax.__version__, load_average_start=load_start, load_average_end=os.getloadavg())
  print_table(rows, batch_sizes)
  print(f'\nmachine: {machine}\nimages: {source}; dtype {args.dtype}. Cell: median time (median ratio to '
        "the paper's host path timed alternately, quality = fraction of the optimal L2 reduction, raw "
        'reduction of the mean L2 distance)')
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(dict(machine=machine, images=source, dtype=args.dtype, command=' '.join(sys.argv),
                     rows=rows, jv_sweep=sweep), f, indent=1)


if __name__ == '__main__':
  main()
