r"""How often auction, jv and sinkhorn finish within their loop caps on real batches: the values a run logs as
assignment/converged and assignment/sequential_steps, at the defaults and with the knob that moves them.

  CIFAR10_JPG_ARCHIVE=PATH python benchmarks/convergence.py --json benchmarks/results/convergence_cpu.json

For each batch size (the problem size of one solve: per-device batch with scope 'local', global batch with
'global'), --batches disjoint batches of real CIFAR-10 images (synthetic ones, labelled, without the archive), each
with its own noise: the share of solves that converged, the median loop iterations, and the quality (fraction of
the optimal L2 reduction, scipy in float64) of each setting.
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import assignment as assignment_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from immiscible_jax import assignment  # pylint: disable=g-import-not-at-top,wrong-import-position

# (method, knob overrides): the defaults, then the knob README names for a low converged share.
SETTINGS = (('auction', {}), ('auction', {'auction_max_rounds': 400}), ('auction', {'auction_epsilon': 0.05}),
            ('jv', {}), ('sinkhorn', {}), ('sinkhorn', {'sinkhorn_max_iterations': 1000}),
            ('sinkhorn', {'sinkhorn_epsilon': 0.1}))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch_sizes', default='128,512,1024')
  parser.add_argument('--batches', type=int, default=5)
  parser.add_argument('--data', default=assignment_bench.DEFAULT_DATA)
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  sizes = [int(b) for b in args.batch_sizes.split(',')]
  pool, source = assignment_bench.load_images(args.data, max(sizes) * args.batches)
  print(f'images: {source}', flush=True)
  rows = []
  for size in sizes:
    problems = assignment_bench.problems(pool, size, args.batches)
    for method, knobs in SETTINGS:
      config = assignment_bench.make_config(method, 'sqeuclidean', 'bfloat16')
      config.update(knobs)
      fn = jax.jit(lambda x, n, k, config=config: assignment.assign_noise(x, n, k, config))
      outs = [fn(x, n, jax.random.key(0)) for x, n, _, _ in problems]
      converged = [float(info.converged) for _, info in outs]
      steps = [float(info.sequential_steps) for _, info in outs]
      quality = [assignment_bench.quality_of(np.asarray(x), out, d, opt)[0]
                 for (x, _, d, opt), (out, _) in zip(problems, outs)]
      rows.append(dict(batch_size=size, method=method, knobs=knobs, converged_share=statistics.mean(converged),
                       sequential_steps_median=statistics.median(steps), quality_median=statistics.median(quality),
                       quality_min=min(quality)))
      r = rows[-1]
      print(f"B={size} {method} {knobs or 'defaults'}: converged {r['converged_share']:.2f}, steps "
            f"{r['sequential_steps_median']:.0f}, quality {r['quality_median']:.4f} (min {r['quality_min']:.4f})",
            flush=True)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(dict(command=' '.join(['python', 'benchmarks/convergence.py'] + sys.argv[1:]), images=source,
                     batches=args.batches, device=f'{jax.devices()[0].device_kind} ({jax.default_backend()})',
                     rows=rows), f, indent=2)


if __name__ == '__main__':
  main()
