"""Prints the two tables of this folder's README from the committed metrics (run from the repository root):
per-arm median images/s after the first log window, and the pixel FD of each arm here beside the same arm's in
results/cifar10_small_study/ (the CPU study)."""
import glob
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = os.path.join(HERE, os.pardir, 'cifar10_small_study')


def _records(path):
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _fd(records):
  return {r['step']: r['eval/fd_pixels'] for r in records if 'eval/fd_pixels' in r}


for arm_dir in sorted(glob.glob(os.path.join(HERE, 'arms', 'size*'))):
  arm = os.path.basename(arm_dir)
  records = _records(os.path.join(arm_dir, 'metrics.jsonl'))
  rates = [r['perf/images_per_sec'] for r in records if 'perf/images_per_sec' in r][1:]  # first: compilation
  here, cpu = _fd(records), _fd(_records(os.path.join(CPU, arm, 'metrics.jsonl')))
  deltas = ' '.join(f'{s}: {here[s]:.2f}/{cpu[s]:.2f} ({here[s] - cpu[s]:+.2f})' for s in sorted(here) if s in cpu)
  print(f'{arm}  last step {records[-1]["step"]}  median img/s {statistics.median(rates):.0f}  '
        f'FD gpu/cpu by step: {deltas}')
