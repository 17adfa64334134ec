"""Benchmark of immiscible noise assignment at CIFAR-10 shape (32x32x3): time, quality and depth per method and cost.

For each batch size, method and cost: the median wall time of the jitted `assign_noise` (cost matrix + solve +
reorder) after a warm-up call; its quality: the reduction of the mean image-noise L2 distance as a fraction of the
optimal one (exact L2 assignment, scipy in float64) and as a raw % of the random pairing; and its
`sequential_steps`: the loop iterations the program executed (every while loop, fori_loop and scan, nested ones
included, counted by immiscible_jax/assignment/loop_steps.py), the depth an accelerator pays a few microseconds
for per iteration. Quality and steps are medians over --num_batches batches, time is taken on the first. The same
run times the paper's path (fp16 L2 distances, scipy linear_sum_assignment on the host, permuted noise back to the
device) and reports every method's time as a ratio to it.

  .venv/bin/python benchmarks/assignment.py --json benchmarks/results/assignment_cpu.json
  .venv/bin/python benchmarks/assignment.py --batch_sizes 1024 --methods jv --jv_sweep 1024  # jv's knobs
  python benchmarks/assignment.py --device_report   # on a GPU/TPU machine: one call, about 5-10 minutes

--device_report is the prepared run for a machine with an accelerator: B = 256, 1024, 4096, the methods that
matter there, sqeuclidean cost, one batch; it writes benchmarks/results/assignment_<platform>.json with the
device named. Images: the real CIFAR-10 JPEG archive when given (--data or $CIFAR10_JPG_ARCHIVE), else labelled
synthetic images.
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

from configs import default  # noqa: E402
from immiscible_jax import assignment  # noqa: E402
from immiscible_jax.assignment import loop_steps  # noqa: E402
from immiscible_jax.assignment import solvers  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
# A .tar.gz of CIFAR-10 as JPEGs laid out train/<class>/*.jpg (--data, or this environment variable).
DEFAULT_DATA = os.environ.get('CIFAR10_JPG_ARCHIVE', '')
SHAPE = (32, 32, 3)


def load_images(path, count, seed=0):
  """`count` CIFAR-10 training images in [-1, 1] (an equal share per class), or synthetic ones."""
  if path and os.path.exists(path):
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
    source = f'CIFAR-10 train JPEGs ({os.path.basename(path)})'
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


def make_config(method, cost, dtype):
  """configs/default.py's assignment section (every knob at its default) with this method, cost, dtype."""
  values = default.get_config().assignment.to_dict()
  values.update(method=method, cost=cost, dtype=dtype, scope='local')
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
            jax.jit(lambda c: solvers.min_and_argmin(c, axis=1)), (cost,)),
           ('40 kernel-domain Sinkhorn iterations (warm start only)',
            jax.jit(lambda c: solvers.sinkhorn_column_potentials(c, eps, 40)), (cost,)),
           ('40 log-domain Sinkhorn iterations',
            jax.jit(lambda c: _log_domain_potentials(c, eps, 40)), (cost,))]
  rows = [dict(what=what, median_ms=median_ms(fn, args, repeats)) for what, fn, args in timed]
  knobs = [(0.03, 40, 1), (0.1, 0, 0), (0.1, 0, 2), (0.1, 0, 8), (0.1, 10, 1), (0.05, 20, 0), (0.05, 40, 0),
           (0.03, 40, 0), (0.03, 40, 4), (0.03, 80, 1), (0.02, 40, 0), (0.02, 80, 0)]
  for eps_rel, iters, sweeps in knobs:
    fn = jax.jit(lambda c, e=eps_rel, i=iters, s=sweeps: solvers.jv(c, e, i, s, return_stats=True))
    stats = {k: int(v) for k, v in fn(cost)[1].items()}
    what = f'jv solve only: warm_start_epsilon={eps_rel} iterations={iters} arr_sweeps={sweeps}'
    rows.append(dict(what=what, median_ms=median_ms(fn, (cost,), repeats), **stats))
  rows.append(dict(what='hungarian (ott-jax, optax inside) solve only',
                   median_ms=median_ms(jax.jit(solvers.hungarian), (cost,), repeats)))
  rows.append(dict(what='scipy linear_sum_assignment on this cost, host only',
                   median_ms=median_ms(scipy.optimize.linear_sum_assignment, (np.asarray(cost),), repeats)))
  for row in rows:
    extra = ' '.join(f'{k}={v}' for k, v in row.items() if k not in ('what', 'median_ms'))
    print(f"{row['median_ms']:9.1f} ms  {row['what']}  {extra}", flush=True)
  return rows


# Largest batch size each method is run at by default on a CPU (slower ones are skipped above it, and the
# table says so): seconds per call measured here grow fastest for these.
MAX_BATCH = dict(hungarian=1024, knn=2048, sinkhorn=2048, scipy=2048)
# On an accelerator: optax's Hungarian runs about B^2 dependent iterations (4096^2 is minutes per call).
DEVICE_MAX_BATCH = dict(hungarian=1024)
HOST_METHODS = ('scipy',)  # solved on the host: their device loop count says nothing about their depth


def problems(pool, batch, count):
  """`count` disjoint batches of `batch` images with their own noise, L2 distances and optimal mean L2."""
  out = []
  for k in range(count):
    images = jnp.asarray(pool[k * batch:(k + 1) * batch])
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(batch), k), images.shape, jnp.float32)
    distances = l2_distances(np.asarray(images), np.asarray(noise))
    r, c = scipy.optimize.linear_sum_assignment(distances)
    out.append((images, noise, distances, float(distances[r, c].mean())))
  return out


def time_against_baseline(fn, args, baseline, base_ms, repeats):
  """(median ms, median ratio to the paper path). Timed alternately with the paper path so that load from other
  processes hits both alike, unless the paper path takes over 2 s a call: then its own median is the divisor."""
  if base_ms < 2000:
    return median_ms_and_ratio(fn, args, baseline, args[:2], repeats)
  ms = median_ms(fn, args, repeats)
  return ms, ms / base_ms


def summary(qualities, reductions, steps):
  row = dict(quality=statistics.median(qualities), quality_min=min(qualities),
             reduction_pct=statistics.median(reductions), quality_per_batch=qualities)
  if steps is not None:
    row.update(sequential_steps=int(statistics.median(steps)), sequential_steps_max=int(max(steps)),
               sequential_steps_per_batch=[int(s) for s in steps])
  else:
    row.update(sequential_steps=None, host_solver=True)
  return row


def bench_batch(batch, pool, methods, costs, args):
  """Rows for one batch size: the paper's path first, then every method x cost."""
  batches = problems(pool, batch, args.num_batches)
  images, noise = batches[0][:2]
  baseline = paper_baseline(images, noise)
  base_ms = median_ms(baseline, (images, noise), args.repeats)
  scores = [quality_of(np.asarray(x), baseline(x, n), d, opt) for x, n, d, opt in batches]
  fp16 = np.asarray(assignment.cost_matrix(images, noise, 'l2', jnp.float32).astype(jnp.float16), np.float32)
  lsa_ms = median_ms(scipy.optimize.linear_sum_assignment, (fp16,), args.repeats)
  rows = [dict(method='paper_baseline', cost='l2', batch_size=batch, median_ms=base_ms,
               ratio_to_paper_baseline=1.0, host_lsa_only_ms=lsa_ms,
               **summary([q for q, _ in scores], [r for _, r in scores], None))]
  print(f'B={batch}: paper baseline {base_ms:.1f} ms (host LSA alone {lsa_ms:.1f} ms), '
        f"quality {rows[0]['quality']:.4f}", flush=True)
  key = jax.random.key(1)
  for method in methods:
    if batch > args.max_batch.get(method, batch):
      continue
    for cost in costs:
      config = make_config(method, cost, args.dtype)
      assign = lambda x, n, k, config=config: assignment.assign_noise(x, n, k, config)[0]
      ms, ratio = time_against_baseline(jax.jit(assign), (images, noise, key), baseline, base_ms, args.repeats)
      counted = jax.jit(loop_steps.counting(assign))
      outs = [counted(x, n, key) for x, n, _, _ in batches]
      scores = [quality_of(np.asarray(x), out, d, opt) for (x, _, d, opt), (out, _) in zip(batches, outs)]
      steps = None if method in HOST_METHODS else [int(s) for _, s in outs]
      rows.append(dict(method=method, cost=cost, batch_size=batch, median_ms=ms, ratio_to_paper_baseline=ratio,
                       **summary([q for q, _ in scores], [r for _, r in scores], steps)))
      row = rows[-1]
      print(f'B={batch} {method:9s} {cost:11s} {ms:9.1f} ms  ratio {ratio:6.3f}  quality {row["quality"]:.4f} '
            f'(min {row["quality_min"]:.4f})  reduction {row["reduction_pct"]:.3f}%  steps '
            f'{row["sequential_steps"]}', flush=True)
  if batch == args.jv_sweep:
    return rows, jv_sweep(images, noise, args.repeats)
  return rows, None


def print_tables(rows, batch_sizes, max_batch):
  """Markdown: time (ratio to the paper path), then quality and sequential steps, per method x cost x B."""
  keys = sorted({(r['method'], r['cost']) for r in rows}, key=lambda k: (k[0] != 'paper_baseline', k))
  find = lambda m, c, b: next((r for r in rows if (r['method'], r['cost'], r['batch_size']) == (m, c, b)), None)
  cells = dict(
      time=lambda r: f"{r['median_ms']:.1f} ms ({r['ratio_to_paper_baseline']:.2f}x)",
      quality=lambda r: f"{r['quality']:.4f} (min {r['quality_min']:.4f}, -{r['reduction_pct']:.2f}%)",
      sequential_steps=lambda r: 'host' if r['sequential_steps'] is None else (
          f"{r['sequential_steps']}" + (f" (max {r['sequential_steps_max']})"
                                        if r['sequential_steps_max'] != r['sequential_steps'] else '')))
  for title, cell in cells.items():
    print(f'\n{title}\n| method | cost | ' + ' | '.join(f'B={b}' for b in batch_sizes) + ' |')
    print('|---|---|' + '---:|' * len(batch_sizes))
    for method, cost in keys:
      out = []
      for b in batch_sizes:
        row = find(method, cost, b)
        out.append(cell(row) if row else f'skipped (> {max_batch[method]})' if method in max_batch else '-')
      print(f'| {method} | {cost} | ' + ' | '.join(out) + ' |')


def parse_max_batch(text):
  return {k: int(v) for k, v in (item.split('=') for item in text.split(',') if item)}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch_sizes', default='64,128,256,512,1024,2048,4096')
  parser.add_argument('--methods', default='none,auction,jv,sinkhorn,hungarian,scipy,knn')
  parser.add_argument('--costs', default='sqeuclidean,l2')
  parser.add_argument('--dtype', default='bfloat16', choices=sorted(assignment.DTYPES))
  parser.add_argument('--repeats', type=int, default=15,
                      help='at most this many timed calls per row (at least 3; fewer when calls are slow)')
  parser.add_argument('--num_batches', type=int, default=3, help='batches per size for quality and steps')
  parser.add_argument('--max_batch', default=','.join(f'{k}={v}' for k, v in MAX_BATCH.items()),
                      help='METHOD=B,...: skip a method above batch size B')
  parser.add_argument('--data', default=DEFAULT_DATA)
  parser.add_argument('--json', default='', help='write the rows here')
  parser.add_argument('--jv_sweep', type=int, default=0,
                      help='also time jv parts and knobs at this batch size (0: no)')
  parser.add_argument('--device_report', action='store_true',
                      help='the prepared accelerator run: B 256,1024,4096; none,auction,jv,sinkhorn,hungarian,knn; '
                           'sqeuclidean; 1 batch; writes benchmarks/results/assignment_<platform>.json')
  args = parser.parse_args()
  if args.device_report:
    args.batch_sizes, args.costs, args.num_batches, args.repeats = '256,1024,4096', 'sqeuclidean', 1, 10
    args.methods = 'none,auction,jv,sinkhorn,hungarian,knn'
    args.max_batch = ','.join(f'{k}={v}' for k, v in DEVICE_MAX_BATCH.items())
    args.json = args.json or os.path.join(ROOT, 'benchmarks', 'results', f'assignment_{jax.default_backend()}.json')
  args.max_batch = parse_max_batch(args.max_batch)
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  methods, costs = args.methods.split(','), args.costs.split(',')
  load_start = os.getloadavg()
  # A fixed pool, so a batch size sees the same images whatever else is run.
  pool, source = load_images(args.data, max(batch_sizes) * args.num_batches)
  print(f'images: {source}; jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); '
        f'{os.cpu_count()} CPUs', flush=True)
  rows, sweep = [], None
  for batch in batch_sizes:
    batch_rows, batch_sweep = bench_batch(batch, pool, methods, costs, args)
    rows += batch_rows
    sweep = batch_sweep or sweep
  machine = dict(processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                 backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                 jax=jax.__version__, load_average_start=load_start, load_average_end=os.getloadavg())
  print_tables(rows, batch_sizes, args.max_batch)
  print(f'\nmachine: {machine}\nimages: {source}; dtype {args.dtype}. time: median of the jitted assign_noise '
        "(median ratio to the paper's host path); quality: median over batches of the fraction of the optimal "
        'L2 reduction (min over batches, raw reduction of the mean L2 distance); sequential_steps: loop '
        'iterations executed, median over batches (max)')
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(dict(machine=machine, images=source, dtype=args.dtype, num_batches=args.num_batches,
                     max_batch=args.max_batch, command=' '.join(sys.argv), rows=rows, jv_sweep=sweep), f,
                indent=1)


if __name__ == '__main__':
  main()
