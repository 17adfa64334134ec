"""Ablation on the 8x8 digits: assignment.method in {none, hungarian, sinkhorn, knn} x seeds {0, 1, 2} (12 arms).

Sized to run on 2 CPU cores in well under an hour in total (the step count and evaluation cadence are in COMMON;
shrink them if a run shows otherwise). Every arm evaluates the offline pixel Frechet distance, so the report reads
eval/fd_pixels:

  python -m launch.sweep --sweep=configs/sweeps/assignment_digits.py --runner=local --root=workdirs/ablation_digits
  python -m launch.report workdirs/ablation_digits --metric=eval/fd_pixels
"""
CONFIG = 'configs/digits.py'
METHODS = ('none', 'hungarian', 'sinkhorn', 'knn')
SEEDS = (0, 1, 2)
# Shared by every arm: the run length and how often the metric is measured.
# 600 steps is half the demo's run: long enough for recognisable digits, short enough for 12 arms on 2 cores.
COMMON = {
    'training.num_steps': 600,
    'eval.every_steps': 100,
    'eval.num_samples': 500,
    'eval.metric': 'pixels',
    'checkpoint.every_steps': 300,
}


def get_sweep():
  for method in METHODS:
    for seed in SEEDS:
      yield f'method={method},seed={seed}', {'assignment.method': method, 'seed': seed, **COMMON}
