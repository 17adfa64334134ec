"""Summarises a sweep: a Markdown table and a plot of one metric over every arm group (arms that differ by seed).

  python -m launch.report ROOT [--metric=eval/fd_pixels] [--threshold=X] [--baseline=method=none] [--out=DIR]

Reads ROOT/<arm>/metrics.jsonl for every arm (in ROOT/sweep.json's order when present), groups arms by their name
without its `seed=...` part, and writes to --out (default ROOT):
  report.md   per group: number of seeds; final metric (each seed's last logged value) as mean ± the 95% Student-t
              interval over seeds (t quantile with n-1 degrees of freedom times the sample standard deviation over
              sqrt(n); none for a single seed); steps to reach the threshold (first logged step whose value is
              <= threshold, lower is better), averaged over seeds, or 'not reached (k/n)' when any seed never reached
              it; and the speed-up over the baseline group (its mean steps / this group's mean steps). The baseline of
              'method=hungarian,batch=64' is 'method=none,batch=64': the same name with --baseline swapped in.
              Default threshold: the worst final value over all runs, so that every run reaches it.
  report.png  the metric vs step: per group the mean over seeds (at the steps every seed logged) and a band from
              the minimum to the maximum over seeds.
  report.json the same numbers, machine-readable.
"""
import argparse
import json
import math
import os
import sys

from etils import epath
import numpy as np
from scipy import stats


def read_series(path, metric):
  """[(step, value), ...] by step from a metrics.jsonl; a step logged twice (after a resume) keeps its last value."""
  values = {}
  for line in epath.Path(path).read_text().splitlines():
    try:
      row = json.loads(line) if line.strip() else {}
    except json.JSONDecodeError:  # a line cut short by a hard kill; the resumed run logs that step again
      continue
    if metric in row and row[metric] is not None:
      values[int(row['step'])] = float(row[metric])
  return sorted(values.items())


def group_name(arm_name):
  """'method=knn,seed=2' -> 'method=knn': the arm's name without its seed component."""
  return ','.join(part for part in arm_name.split(',') if not part.startswith('seed=')) or arm_name


def t_interval(values):
  """(mean, half-width of the 95% Student-t interval with n-1 dof); the half-width is nan for one value."""
  values = np.asarray(values, np.float64)
  n = len(values)
  if n < 2:
    return float(values.mean()), math.nan
  sem = values.std(ddof=1) / math.sqrt(n)
  return float(values.mean()), float(stats.t.ppf(0.975, n - 1) * sem)


def steps_to_threshold(series, threshold):
  """First logged step whose value is <= threshold, or None."""
  return next((step for step, value in series if value <= threshold), None)


def baseline_of(group, baseline):
  """The baseline group's name: `group` with the component of the same key replaced by `baseline`."""
  key = baseline.split('=', 1)[0] + '='
  parts = group.split(',')
  if not any(part.startswith(key) for part in parts):
    return None
  return ','.join(baseline if part.startswith(key) else part for part in parts)


def summarize(runs, threshold=None, baseline='method=none'):
  """runs: {arm name: [(step, value), ...]} -> (threshold used, [one summary dict per group, in first-seen order])."""
  runs = {name: series for name, series in runs.items() if series}
  if not runs:
    raise ValueError('no run logged the metric')
  if threshold is None:
    threshold = max(series[-1][1] for series in runs.values())
  groups = {}
  for name, series in runs.items():
    groups.setdefault(group_name(name), []).append(name)
  rows = []
  for group, names in groups.items():
    finals = [runs[n][-1][1] for n in names]
    mean, half = t_interval(finals)
    reached = [steps_to_threshold(runs[n], threshold) for n in names]
    steps = float(np.mean(reached)) if None not in reached else None
    rows.append(dict(group=group, runs=names, num_seeds=len(names), final_values=finals,
                     final_steps=[runs[n][-1][0] for n in names], final_mean=mean, final_ci95=half,
                     steps_each=reached, steps_to_threshold=steps,
                     num_reached=sum(r is not None for r in reached)))
  by_group = {row['group']: row for row in rows}
  for row in rows:
    base = by_group.get(baseline_of(row['group'], baseline))
    ok = base and base['steps_to_threshold'] and row['steps_to_threshold']
    row['baseline'] = base['group'] if base else None
    row['speedup'] = base['steps_to_threshold'] / row['steps_to_threshold'] if ok else None
  return threshold, rows


def _fmt(x):
  return f'{x:.4g}'


def markdown(rows, metric, threshold, baseline):
  lines = [f'# Sweep report: {metric}', '',
           f'Final value: mean ± 95% Student-t interval over seeds (t quantile, n-1 degrees of freedom). Steps: first '
           f'logged step with {metric} <= {_fmt(threshold)}, mean over seeds; "not reached (k/n)" when any seed '
           f'never got there. Speed-up: the {baseline} group\'s steps / this group\'s steps.', '',
           f'| arm group | seeds | final {metric} | final step | steps to <= {_fmt(threshold)} | speed-up vs '
           f'{baseline} |', '|---|---:|---:|---:|---:|---:|']
  for r in rows:
    final = _fmt(r['final_mean']) + ('' if math.isnan(r['final_ci95']) else f' ± {_fmt(r["final_ci95"])}')
    lo, hi = min(r['final_steps']), max(r['final_steps'])
    steps = (_fmt(r['steps_to_threshold']) if r['steps_to_threshold'] is not None
             else f'not reached ({r["num_reached"]}/{r["num_seeds"]})')
    speedup = f'{r["speedup"]:.2f}×' if r['speedup'] is not None else 'n/a'
    lines.append(f'| {r["group"]} | {r["num_seeds"]} | {final} | {lo if lo == hi else f"{lo}–{hi}"} | {steps} | '
                 f'{speedup} |')
  lines += ['', '## Runs', '', f'| run | final step | final {metric} | steps to threshold |', '|---|---:|---:|---:|']
  for r in rows:
    for name, step, value, reached in zip(r['runs'], r['final_steps'], r['final_values'], r['steps_each']):
      lines.append(f'| {name} | {step} | {_fmt(value)} | {"not reached" if reached is None else reached} |')
  return '\n'.join(lines) + '\n'


def plot(runs, rows, metric, threshold, path):
  """Mean over seeds per group with a min–max band; writes a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    tables = [dict(runs[n]) for n in r['runs']]
    steps = sorted(set.intersection(*(set(t) for t in tables)))
    values = np.array([[t[s] for s in steps] for t in tables])  # [seeds, steps]
    line, = ax.plot(steps, values.mean(0), label=f'{r["group"]} (n={r["num_seeds"]})')
    ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
  ax.axhline(threshold, color='grey', linestyle='--', linewidth=1, label=f'threshold {_fmt(threshold)}')
  ax.set(xlabel='step', ylabel=metric, title=f'{metric}: mean over seeds, band = min–max')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def arm_names(root):
  """Arms in sweep.json's order when it exists, else every sub-directory holding a metrics.jsonl, sorted."""
  root = epath.Path(root)
  if (root / 'sweep.json').exists():
    return [arm['name'] for arm in json.loads((root / 'sweep.json').read_text())['arms']]
  return sorted(p.parent.name for p in root.glob('*/metrics.jsonl'))


def write_report(root, metric='eval/fd_pixels', threshold=None, baseline='method=none', out=None):
  """Reads every arm, writes report.md, report.png and report.json to `out` (default root).

  Returns (threshold used, rows) as summarize() does.
  """
  runs = {}
  for name in arm_names(root):
    path = epath.Path(root) / name / 'metrics.jsonl'
    if path.exists():
      runs[name] = read_series(path, metric)
  threshold, rows = summarize(runs, threshold, baseline)
  out = str(out or root)
  if '://' in out:
    raise ValueError(f'--out must be a local directory, got {out!r}')
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'report.md'), 'w') as f:
    f.write(markdown(rows, metric, threshold, baseline))
  with open(os.path.join(out, 'report.json'), 'w') as f:
    json.dump(dict(metric=metric, threshold=threshold, baseline=baseline, groups=rows), f, indent=2)
  plot(runs, rows, metric, threshold, os.path.join(out, 'report.png'))
  return threshold, rows


def main(argv=None):
  parser = argparse.ArgumentParser(prog='launch.report', description=__doc__.splitlines()[0])
  parser.add_argument('root', help='sweep root: one sub-directory per arm')
  parser.add_argument('--metric', default='eval/fd_pixels', help='key in metrics.jsonl (lower is better)')
  parser.add_argument('--threshold', type=float, default=None, help='default: the worst final value of any run')
  parser.add_argument('--baseline', default='method=none', help='name component of the baseline arms')
  parser.add_argument('--out', default=None, help='output directory (default: ROOT; must be local)')
  args = parser.parse_args(argv)
  threshold, rows = write_report(args.root, args.metric, args.threshold, args.baseline, args.out)
  print(markdown(rows, args.metric, threshold, args.baseline))
  print(f'wrote report.md, report.png, report.json to {args.out or args.root}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
