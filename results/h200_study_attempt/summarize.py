"""Prints the two tables of this folder's README from the committed metrics (run from the repository root):
per-arm median images/s after the first log window, and the pixel FD of each arm here beside the same arm's in
results/cifar10_small_study/ (the CPU study)."""
import glob
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = os.path.join(HERE, os.pardir, 'cifar10_small_study')
sys.path.insert(0, os.path.join(HERE, os.pardir, os.pardir))  # the repository root, for launch.report

from launch import report  # pylint: disable=g-import-not-at-top,wrong-import-position


def _series(path, metric):
  return dict(report.read_series(path, metric)) if os.path.exists(path) else {}


for arm_dir in sorted(glob.glob(os.path.join(HERE, 'arms', 'size*'))):
  arm = os.path.basename(arm_dir)
  path = os.path.join(arm_dir, 'metrics.jsonl')
  rates = list(_series(path, 'perf/images_per_sec').values())[1:]  # the first window includes compilation
  here, cpu = _series(path, 'eval/fd_pixels'), _series(os.path.join(CPU, arm, 'metrics.jsonl'), 'eval/fd_pixels')
  deltas = ' '.join(f'{s}: {here[s]:.2f}/{cpu[s]:.2f} ({here[s] - cpu[s]:+.2f})' for s in sorted(here) if s in cpu)
  print(f'{arm}  last step {max(_series(path, "step"))}  median img/s {statistics.median(rates):.0f}  '
        f'FD gpu/cpu by step: {deltas}')
