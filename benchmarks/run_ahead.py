r"""Does the loop's run-ahead bound (train.MAX_DISPATCHES_IN_FLIGHT) slow training? Paired, interleaved runs.

  python benchmarks/run_ahead.py --json benchmarks/results/run_ahead_cpu.json

The whole training loop (train.train_and_evaluate: input, dispatch, logs; one checkpoint at the end) runs
--steps steps of --config, alternately with the bound (2 dispatches in flight) and without it (as before:
the host waited for the device only when it read the metrics at a log), --rounds times each, the order of the two
alternating from round to round. The compiled step is
built once and shared by all runs (train.make_train_steps memoised here), so every run times the same program.
A run's speed is the median of its logged perf/images_per_sec windows after the first (which holds the warm-up);
reported: each variant's median over rounds and the median over rounds of the per-round ratio bounded/unbounded.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from immiscible_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from launch import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/digits.py')
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--log_every', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--fixed_order', action='store_true', help='bounded first in every round (no ABBA)')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  config = sweep.load_config(args.config)
  config.training.num_steps = args.steps
  config.training.log_every_steps = args.log_every
  config.checkpoint.every_steps = args.steps
  config.eval.every_steps = 0
  built, make = {}, train.make_train_steps
  train.make_train_steps = lambda *a, **kw: built.setdefault('steps', make(*a, **kw))
  bound = train.MAX_DISPATCHES_IN_FLIGHT
  variants = {'bounded': bound, 'unbounded': 10 ** 9}
  speeds = {name: [] for name in variants}
  with tempfile.TemporaryDirectory() as root:
    for r in range(args.rounds):
      # ABBA: no variant always runs first (or after the other one)
      order = list(variants) if r % 2 == 0 or args.fixed_order else list(variants)[::-1]
      for name in order:
        limit = variants[name]
        train.MAX_DISPATCHES_IN_FLIGHT = limit
        workdir = os.path.join(root, f'{name}_{r}')
        train.train_and_evaluate(config, workdir)
        rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
        speeds[name].append(statistics.median(row['perf/images_per_sec'] for row in rows[1:]))
        print(f'round {r} {name:>9}: {speeds[name][-1]:.1f} images/s', flush=True)
  ratios = [b / u for b, u in zip(speeds['bounded'], speeds['unbounded'])]
  result = dict(command=' '.join(['python', 'benchmarks/run_ahead.py'] + sys.argv[1:]), config=args.config,
                bound=bound, steps=args.steps, batch_size=config.training.batch_size,
                host=f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
                devices=os.environ.get('XLA_FLAGS', ''), load_average=os.getloadavg(),
                images_per_s=speeds, median_images_per_s={k: statistics.median(v) for k, v in speeds.items()},
                ratio_bounded_to_unbounded=ratios, median_ratio=statistics.median(ratios))
  print(f"\n{args.config}, {args.steps} steps per run, {args.rounds} paired rounds: bounded "
        f"{result['median_images_per_s']['bounded']:.1f}, unbounded {result['median_images_per_s']['unbounded']:.1f} "
        f"images/s; median per-round ratio {result['median_ratio']:.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
