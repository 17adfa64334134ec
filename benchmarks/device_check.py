r"""make device-check: the first command on a lent GPU or TPU, and the numbers it must bring back.

  make device-check                                   # = python benchmarks/device_check.py --budget_s=480
  python benchmarks/device_check.py --smoke --out /tmp/dc     # every part shrunk, on CPU (tests/test_device_check.py)

Parts, most valuable first; each runs in a subprocess of its own (a crash or an out-of-memory ends that part
only, and its peak device memory is its own) with a time budget. Time a part leaves unspent passes to the next;
a part that fails or runs over its budget is recorded as such (with the end of its output) and the next one
starts; a part that would start with less than MIN_PART_S left is recorded as not started. After every part the
results so far are written to OUT/device_check_<device>.json (default OUT: benchmarks/results), so a kill loses
only the part that was running; a table is printed at the end.

  probe        the device, its kind and count, jax version, backend
  train:*      configs/cifar10_ct.py (CT, LPIPS-VGG16 at 224) or configs/cifar10_ict.py at per-device batch 128,
               model.dtype bfloat16 / float32, parallel.mode pmap / shard_map, assignment 'none': compile time,
               images/s of the loop's own compiled step on a synthetic uint8 batch, FLOPs per image (XLA's cost
               analysis), MFU against the device's dense peak (immiscible_jax/perf.py), peak device memory.
               Without the converted LPIPS weights in the cache, LPIPS runs on random weights of the same shapes
               (same cost; said in the row)
  assignment   assign_noise alone (jitted, bf16 inputs, sqeuclidean cost) for auction, jv, sinkhorn at B = 1024,
               4096, 256: median ms, loop iterations (the solver's own count), the cost matrix alone, and
               per-iteration loop cost = (ms - cost-matrix ms) / iterations: what README's GPU advice assumes
               (5-10 us)
  study:*      one arm of the CPU study (configs/cifar10_small.py, 16x16, batch 128, assignment none) alone for 200
               steps through `python -m immiscible_jax.main`, with and without the settings the H200 attempt used
               (XLA_FLAGS=--xla_gpu_autotune_level=0 --xla_gpu_deterministic_ops=true,
               JAX_DEFAULT_MATMUL_PRECISION=highest; results/h200_study_attempt/): images/s after the first log
               window, wall time, pixel FD. Data: the CIFAR-10 JPEG archive from $CIFAR10_JPG_ARCHIVE,
               .devdata/cifar10-jpg.tar.gz or shared/data/cifar10-jpg.tar.gz (19.6 MB: carry one of them), else
               5,000 synthetic random uint8 images of the same shape, labelled so in the row (the same cost per
               step; its FD values mean nothing). The deterministic variant runs on GPUs only (GPU flags)
--smoke: one train part on configs/tiny.py (per-device batch 2) instead of the CIFAR-10 configs, assignment at
B = 16, the study arm on the digits for 2 steps: checks the command end to end on CPU (numbers mean nothing).
"""
import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings('ignore', message='.*JAXopt is no longer maintained.*')

# A part is not started with less than this many seconds left of the whole budget (--min_part_s).
MIN_PART_S = 15
# What the one GPU session set for its study arms (results/h200_study_attempt/run_study.sh).
DETERMINISTIC_ENV = {'XLA_FLAGS': '--xla_gpu_autotune_level=0 --xla_gpu_deterministic_ops=true',
                     'JAX_DEFAULT_MATMUL_PRECISION': 'highest'}
ARCHIVES = ('.devdata/cifar10-jpg.tar.gz', 'shared/data/cifar10-jpg.tar.gz')


@dataclasses.dataclass
class Part:
  name: str
  budget_s: float
  kind: str  # probe, train, assignment, study
  args: dict = dataclasses.field(default_factory=dict)


def _train(config, dtype, mode, budget):
  short = 'ct' if 'cifar10_ct' in config else 'ict'
  return Part(f'train:{short}:{dtype}:{mode}', budget, 'train', dict(config=config, dtype=dtype, mode=mode))


def plan(smoke):
  """The parts in the order they run, with their budgets (seconds)."""
  ct, ict = 'configs/cifar10_ct.py', 'configs/cifar10_ict.py'
  if smoke:
    return [Part('probe', 60, 'probe'), _train(ct, 'bfloat16', 'pmap', 180), Part('assignment', 120, 'assignment'),
            Part('study:default', 180, 'study', dict(deterministic=False)),
            Part('study:deterministic', 60, 'study', dict(deterministic=True))]
  return [Part('probe', 40, 'probe'),
          _train(ct, 'bfloat16', 'pmap', 150),   # the paper's recipe, in the dtype its config uses
          _train(ict, 'float32', 'pmap', 90),    # iCT in its config's dtype
          Part('assignment', 70, 'assignment'),
          Part('study:default', 60, 'study', dict(deterministic=False)),
          Part('study:deterministic', 60, 'study', dict(deterministic=True)),
          _train(ct, 'float32', 'pmap', 60), _train(ict, 'bfloat16', 'pmap', 50),
          _train(ct, 'bfloat16', 'shard_map', 50), _train(ict, 'float32', 'shard_map', 45),
          _train(ct, 'float32', 'shard_map', 45), _train(ict, 'bfloat16', 'shard_map', 45)]


# ------------------------------------------------------------------------------------------------ the parts

def part_probe(smoke, workdir):
  del smoke, workdir
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return dict(device_kind=devices[0].device_kind, backend=jax.default_backend(), device_count=len(devices),
              local_device_count=jax.local_device_count(), process_count=jax.process_count(), jax=jax.__version__,
              python=platform.python_version(), host_cpus=os.cpu_count(),
              matmul_precision=jax.config.jax_default_matmul_precision,
              memory_per_device_bytes=(devices[0].memory_stats() or {}).get('bytes_limit'))


def _load_config(path):
  """The config at `path`, relative to the repository root (the check runs from any directory)."""
  from launch import sweep  # pylint: disable=g-import-not-at-top
  return sweep.load_config(os.path.join(ROOT, path))


def _loss_params(config):
  """(LPIPS weights from the cache or random ones of the same shapes, what they are); ({}, '') for other losses."""
  if config.training.loss != 'lpips':
    return {}, ''
  import jax  # pylint: disable=g-import-not-at-top
  from immiscible_jax import errors, train  # pylint: disable=g-import-not-at-top
  from immiscible_jax.models import lpips  # pylint: disable=g-import-not-at-top
  try:
    return train.frozen_loss_params(config), 'converted LPIPS-VGG16 weights'
  except errors.ConfigError:
    x = jax.numpy.zeros((1, lpips.MIN_SIZE, lpips.MIN_SIZE, 3))
    return lpips.LPIPS().init(jax.random.key(0), x, x)['params'], 'random LPIPS weights (converted ones absent)'


def _peak_memory():
  import jax  # pylint: disable=g-import-not-at-top
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peaks = [s.get('peak_bytes_in_use') for s in stats if s.get('peak_bytes_in_use') is not None]
  return max(peaks) if peaks else None


def part_train(smoke, workdir, config, dtype, mode, per_device_batch=128, min_seconds=5.0, min_steps=10):
  """Compile time, images/s, FLOPs per image, MFU and peak device memory of the loop's compiled step."""
  del workdir
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from immiscible_jax import data, models, perf, train, train_state  # pylint: disable=g-import-not-at-top
  from immiscible_jax.parallel import layouts  # pylint: disable=g-import-not-at-top
  recipe = 'ct' if 'cifar10_ct' in config else 'ict'
  if smoke:  # the tiny model with the recipe of the config it stands in for
    name, config = config, _load_config('configs/tiny.py')
    config.training.recipe = recipe
    per_device_batch, min_seconds, min_steps = 2, 0.0, 2
  else:
    name, config = config, _load_config(config)
  config.model.dtype, config.parallel.mode = dtype, mode
  config.assignment.method = 'none'
  config.training.batch_size = per_device_batch * jax.device_count()
  loss_params, loss_weights = _loss_params(config)
  model = models.create_model(config.model, config.data.channels)
  optimizer = train_state.create_optimizer(config.optim)
  layout = layouts.create_layout(mode)
  state = jax.jit(train_state.initializer(config, model, optimizer))(train_state.run_keys(config.seed)[0])
  d_state = layout.put_state(jax.device_get(state))
  del state
  steps = train.make_train_steps(model, optimizer, config, layout, loss_params)
  rng = np.random.default_rng(0)
  shape = (1, config.training.batch_size // jax.process_count(), *data.image_shape(config.data))
  batch = layout.put_batches({'image': rng.integers(0, 256, shape, dtype=np.uint8),
                              'example_id': np.arange(shape[1], dtype=np.int32)[None]})
  t0 = time.perf_counter()
  d_state, metrics = steps(d_state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  per_image, peak, accounting = perf.train_step_accounting(lambda: steps.lower(d_state, batch), per_device_batch,
                                                           dtype)
  for _ in range(2):  # warm-up
    d_state, metrics = steps(d_state, batch)
  jax.block_until_ready(metrics)
  count, t0 = 0, time.perf_counter()
  while count < min_steps or time.perf_counter() - t0 < min_seconds:
    d_state, metrics = steps(d_state, batch)
    count += 1
  jax.block_until_ready((d_state, metrics))
  elapsed = time.perf_counter() - t0
  images_per_s = count * config.training.batch_size / elapsed
  memory = steps.lower(d_state, batch).compile().memory_analysis()
  return dict(config=name, recipe=recipe, loss=config.training.loss, lpips_weights=loss_weights or None,
              dtype=dtype, mode=mode, per_device_batch=per_device_batch, devices=jax.device_count(),
              compile_s=round(compile_s, 2), timed_steps=count, step_ms=round(1e3 * elapsed / count, 3),
              images_per_s=round(images_per_s, 2),
              gflops_per_image=round(per_image / 1e9, 3) if per_image else None,
              mfu=perf.mfu(images_per_s, per_image, peak, jax.device_count()), peak_flops_per_device=peak,
              accounting=accounting, peak_memory_bytes=_peak_memory(),
              compiled_temp_bytes=getattr(memory, 'temp_size_in_bytes', None),
              loss_finite=bool(np.isfinite(np.asarray(layouts.fetch_stacked([jax.tree_util.tree_map(
                  layout.first, metrics)])['train/loss'])).all()))


def part_assignment(smoke, workdir):
  """ms and per-iteration loop cost of the in-graph solvers on one device."""
  del workdir
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import assignment as assignment_bench  # pylint: disable=g-import-not-at-top  # benchmarks/assignment.py
  from immiscible_jax import assignment  # pylint: disable=g-import-not-at-top
  sizes = (16,) if smoke else (1024, 4096, 256)
  archive = _archive()
  pool, source = assignment_bench.load_images(archive or '', max(sizes))
  key, rows = jax.random.key(1), []
  for size in sizes:
    images = jnp.asarray(pool[:size])
    noise = jax.random.normal(jax.random.key(size), images.shape, jnp.float32)
    cost_only = jax.jit(lambda x, n: assignment.cost_matrix(x, n, 'sqeuclidean', jnp.bfloat16))
    cost_ms = assignment_bench.median_ms(cost_only, (images, noise), 10)
    for method in ('auction', 'jv', 'sinkhorn'):
      config = assignment_bench.make_config(method, 'sqeuclidean', 'bfloat16')
      # One compile per case: the solver's own iteration count (info.sequential_steps) equals loop_steps' count
      # (tests/test_assignment.py), so the program is not traced a second time to count its loops.
      assign = jax.jit(lambda x, n, k, config=config: assignment.assign_noise(x, n, k, config))
      ms = assignment_bench.median_ms(assign, (images, noise, key), 10)
      _, info = assign(images, noise, key)
      steps = int(info.sequential_steps)
      rows.append(dict(batch_size=size, method=method, median_ms=round(ms, 3), cost_matrix_ms=round(cost_ms, 3),
                       sequential_steps=steps, converged=float(info.converged),
                       us_per_iteration=round(1e3 * max(ms - cost_ms, 0.0) / steps, 3) if steps else None))
      print(f"B={size} {method}: {ms:.2f} ms, {steps} loop iterations, "
            f"{rows[-1]['us_per_iteration']} us per iteration", flush=True)
  return dict(images=source, rows=rows)


def _archive():
  """The CIFAR-10 JPEG archive if one was carried to this machine, else None."""
  for path in (os.environ.get('CIFAR10_JPG_ARCHIVE', ''), *(os.path.join(ROOT, p) for p in ARCHIVES)):
    if path and os.path.exists(path):
      return path
  return None


def _synthetic_folder(root, count, size=32):
  """`count` random uint8 RGB PNGs under root/train/<class>/: the study's input shape, no content."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for i in range(count):
    folder = os.path.join(root, 'train', f'class{i % 10}')
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f'{i}.png'))
  return root


def part_study(smoke, workdir, deterministic):
  """One study arm alone through the trainer's command line: images/s, wall time, pixel FD."""
  import jax  # pylint: disable=g-import-not-at-top
  if deterministic and jax.default_backend() != 'gpu':
    return dict(skipped=f'the flags are XLA:GPU flags; backend is {jax.default_backend()}')
  env = {**os.environ, 'IMMISCIBLE_JAX_CACHE': os.path.join(workdir, 'cache'), 'PYTHONUNBUFFERED': '1'}
  if deterministic:
    env.update(DETERMINISTIC_ENV)
  if smoke:
    flags, data = ['--config=configs/tiny.py', '--config.training.num_steps=2',
                   '--config.training.log_every_steps=1'], 'digits (smoke)'
  else:
    archive = _archive()
    if archive is None:
      archive = _synthetic_folder(os.path.join(workdir, 'synthetic'), 5000)
      data = 'SYNTHETIC: 5,000 random uint8 32x32 RGB images (CIFAR-10 archive not carried); FD values mean nothing'
      reference = ['--config.eval.reference_num_images=5000']
    else:
      data, reference = f'CIFAR-10 JPEG archive {os.path.relpath(archive, ROOT)}', []
    flags = ['--config=configs/cifar10_small.py', '--config.training.num_steps=200', '--config.data.dataset=folder',
             f'--config.data.path={archive}', *reference]
  run_dir = os.path.join(workdir, 'arm')
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, '-m', 'immiscible_jax.main', f'--workdir={run_dir}', *flags], cwd=ROOT,
                        env=env, capture_output=True, text=True, check=False)
  wall_s = time.perf_counter() - t0
  rows = [json.loads(line) for line in open(os.path.join(run_dir, 'metrics.jsonl'))] if os.path.exists(
      os.path.join(run_dir, 'metrics.jsonl')) else []
  train_rows = [r for r in rows if 'perf/images_per_sec' in r]
  if proc.returncode:
    raise RuntimeError(f'the arm exited with {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}')
  return dict(data=data, env={k: env[k] for k in DETERMINISTIC_ENV} if deterministic else {}, wall_s=round(wall_s, 1),
              steps=max((r['step'] for r in rows), default=0),
              images_per_s_first_window=train_rows[0]['perf/images_per_sec'] if train_rows else None,
              images_per_s_after_first_window=statistics.median(
                  [r['perf/images_per_sec'] for r in train_rows[1:]]) if len(train_rows) > 1 else None,
              fd_pixels={r['step']: r['eval/fd_pixels'] for r in rows if 'eval/fd_pixels' in r},
              peak_memory_bytes=None)


PART_FUNCTIONS = dict(probe=part_probe, train=part_train, assignment=part_assignment, study=part_study)


def child(args):
  """Runs one part in this process and writes its result as JSON."""
  part = next((p for p in plan(args.smoke) if p.name == args.child), None)
  if part is None:
    raise SystemExit(f'unknown part {args.child!r}; known: {[p.name for p in plan(args.smoke)]}')
  result = PART_FUNCTIONS[part.kind](args.smoke, args.workdir, **part.args)
  with open(args.result, 'w') as f:
    json.dump(result, f, indent=1)


# ------------------------------------------------------------------------------------------------ the parent

def _run_part(part, timeout_s, smoke, scratch):
  """(status, seconds, result or None, output tail): the part in a subprocess of its own session, killed with
  its children when it runs over timeout_s."""
  result_path = os.path.join(scratch, re.sub(r'\W', '_', part.name) + '.json')
  workdir = os.path.join(scratch, re.sub(r'\W', '_', part.name))
  os.makedirs(workdir, exist_ok=True)
  command = [sys.executable, os.path.abspath(__file__), '--child', part.name, '--result', result_path,
             '--workdir', workdir] + (['--smoke'] if smoke else [])
  log_path = result_path + '.log'
  t0 = time.perf_counter()
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
      proc.wait(timeout=timeout_s)
      status = 'ok' if proc.returncode == 0 else f'failed (exit status {proc.returncode})'
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      status = f'over budget ({timeout_s:.0f} s): killed'
  seconds = time.perf_counter() - t0
  tail = open(log_path, errors='replace').read()[-3000:]
  result = None
  if status == 'ok' and os.path.exists(result_path):
    result = json.load(open(result_path))
    if 'skipped' in result:
      status = f"skipped: {result['skipped']}"
  elif status == 'ok':
    status = 'failed (no result written)'
  return status, seconds, result, tail


def _slug(text):
  return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_')


def _write(path, report):
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(report, f, indent=1)
  os.replace(tmp, path)


def _summary(part):
  r = part.get('result') or {}
  if 'skipped' in r:
    return ''
  if part['name'].startswith('train:') and r:
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get('mfu') is not None else ', MFU n/a'
    memory = f", peak {r['peak_memory_bytes'] / 2 ** 30:.1f} GiB" if r.get('peak_memory_bytes') else ''
    flops = f", {r['gflops_per_image']} GFLOPs/image" if r.get('gflops_per_image') else ''
    return f"{r['images_per_s']} images/s (compile {r['compile_s']} s{flops}{mfu}{memory})"
  if part['name'] == 'assignment' and r:
    return '; '.join(f"B={x['batch_size']} {x['method']} {x['median_ms']} ms/{x['sequential_steps']} it "
                     f"({x['us_per_iteration']} us/it)" for x in r['rows'])
  if part['name'].startswith('study:') and r:
    return (f"{r['images_per_s_after_first_window']} images/s after the first window, {r['wall_s']} s wall for "
            f"{r['steps']} steps; data: {r['data'][:40]}")
  if part['name'] == 'probe' and r:
    return f"{r['device_count']}x {r['device_kind']} ({r['backend']}), jax {r['jax']}"
  return part.get('output_tail', '').strip().splitlines()[-1][:160] if part.get('output_tail') else ''


def print_table(report):
  print(f"\ndevice: {report['device']}  budget {report['budget_s']} s, used {report['elapsed_s']} s"
        f"{'  (SMOKE: numbers mean nothing)' if report['smoke'] else ''}")
  print('| part | status | s | result |')
  print('|---|---|---:|---|')
  for part in report['parts']:
    print(f"| {part['name']} | {part['status']} | {part['seconds']:.0f} | {_summary(part)} |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--budget_s', type=float, default=480.0, help='wall-clock budget of all parts together')
  parser.add_argument('--smoke', action='store_true', help='shrink everything (a CPU test of the command)')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results'), help='folder of the JSON')
  parser.add_argument('--parts', default='', help='comma-separated part names to run (default: all, in order)')
  parser.add_argument('--min_part_s', type=float, default=MIN_PART_S,
                      help='do not start a part with less than this many seconds of the budget left')
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  parser.add_argument('--result', default='', help=argparse.SUPPRESS)
  parser.add_argument('--workdir', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return child(args)

  start = time.perf_counter()
  parts = plan(args.smoke)
  if args.parts:
    known = {p.name: p for p in parts}
    parts = [known.get(name) or Part(name, args.min_part_s, 'unknown') for name in args.parts.split(',')]
  scratch = tempfile.mkdtemp(prefix='device_check_')
  report = dict(device='unknown (probe not run)', smoke=args.smoke, budget_s=args.budget_s,
                command=' '.join(['python', 'benchmarks/device_check.py'] + (argv if argv is not None else sys.argv[1:])),
                host=platform.node(), started=time.strftime('%Y-%m-%d %H:%M:%S %Z'), parts=[], elapsed_s=0.0)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'device_check_pending.json')
  carry = 0.0  # seconds earlier parts left unspent
  for part in parts:
    left = args.budget_s - (time.perf_counter() - start)
    entry = dict(name=part.name, budget_s=part.budget_s)
    if left < max(args.min_part_s, 1e-3):
      entry.update(status=f'not started: {max(left, 0):.0f} s of the budget left', seconds=0.0)
    else:
      timeout = min(left, part.budget_s + carry)
      status, seconds, result, tail = _run_part(part, timeout, args.smoke, scratch)
      carry = max(0.0, part.budget_s + carry - seconds)
      entry.update(status=status, seconds=round(seconds, 1), result=result,
                   output_tail=None if status == 'ok' else tail)
      if part.name == 'probe' and result:
        report['device'] = f"{result['device_count']}x {result['device_kind']} ({result['backend']})"
        report['probe'] = result
        new_path = os.path.join(args.out, f"device_check_{_slug(result['device_kind'])}"
                                          f"{'_smoke' if args.smoke else ''}.json")
        if os.path.exists(path):
          os.remove(path)
        path = new_path
    report['parts'].append(entry)
    report['elapsed_s'] = round(time.perf_counter() - start, 1)
    _write(path, report)
    print(f"[{report['elapsed_s']:6.0f} s] {part.name}: {entry['status']}  {_summary(entry)}", flush=True)
  shutil.rmtree(scratch, ignore_errors=True)
  print_table(report)
  print(f'wrote {path}')
  return report


if __name__ == '__main__':
  main()
