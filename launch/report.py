"""Summarises a sweep as evidence: tables, paired comparisons and plots of one metric over every arm group.

  python -m launch.report ROOT [--metric=eval/fd_pixels] [--baseline=method=none] [--threshold=X]
      [--multipliers=1.5,1.2,1.0] [--thresholds=X,Y] [--out=DIR]

Reads ROOT/<arm>/metrics.jsonl for every arm (in ROOT/sweep.json's order when present), groups arms by their name
without its `seed=...` part, pairs each group with its baseline group (the same name with --baseline swapped in,
e.g. 'size=16,assign=knn8' -> 'size=16,assign=none') seed by seed, and writes to --out (default ROOT):
  report.md         overview (final value with its 95% interval, steps to one threshold, speed-up); per comparison:
                    final and best values with intervals, paired differences (arm - baseline, same seed) with 95%
                    intervals at every evaluation step and at the end, steps to several thresholds (multiples of
                    the baseline's final value, plus any given) with how many seeds reached each; a conclusion
                    generated from those numbers only (report_stats.conclusion); every run's final value.
  report.png        the metric vs step, one panel per context (what arms share with their baseline): mean over
                    seeds with a 95% band.
  report_paired.png the paired difference to the baseline vs step with its 95% band, one panel per context.
  report.json       the same numbers, machine-readable.
The overview's threshold defaults to the worst final value over all runs, so that every run reaches it.
ROOT and --out may be buckets (gs://BUCKET/prefix, through immiscible_jax/storage.py).
Statistics: launch/report_stats.py.
"""
import argparse
import io
import json
import math
import sys

import numpy as np

from immiscible_jax import storage
from launch import common
from launch import report_stats


def read_series(path, metric):
  """[(step, value), ...] by step from a metrics.jsonl; a step logged twice (after a resume) keeps its last value."""
  values = {}
  for line in storage.read_text(path).splitlines():
    try:
      row = json.loads(line) if line.strip() else {}
    except json.JSONDecodeError:  # a line cut short by a hard kill; the resumed run logs that step again
      continue
    if metric in row and row[metric] is not None:
      values[int(row['step'])] = float(row[metric])
  return sorted(values.items())


group_name = report_stats.group_name
baseline_of = report_stats.baseline_of
t_interval = report_stats.t_interval
steps_to_threshold = report_stats.steps_to_threshold


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
  return 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.4g}'


def _pm(mean_half):
  mean, half = mean_half
  return _fmt(mean) + ('' if math.isnan(half) else f' ± {_fmt(half)}')


def _signed(mean_half):
  mean, half = mean_half
  return f'{mean:+.4g}' + ('' if math.isnan(half) else f' ± {_fmt(half)}')


def markdown(rows, metric, threshold, baseline, comparisons=(), text=''):
  lines = [f'# Sweep report: {metric}', '',
           f'Lower is better. Intervals: 95% Student-t over seeds (t quantile, n-1 degrees of freedom); paired '
           f'intervals are over the per-seed differences arm - baseline at the same seed. Overview steps: first '
           f'logged step with {metric} <= {_fmt(threshold)}, mean over seeds; "not reached (k/n)" when any seed '
           f'never got there. Speed-up: the {baseline} group\'s steps / this group\'s steps.', '',
           f'| arm group | seeds | final {metric} | final step | steps to <= {_fmt(threshold)} | speed-up vs '
           f'{baseline} |', '|---|---:|---:|---:|---:|---:|']
  for r in rows:
    lo, hi = min(r['final_steps']), max(r['final_steps'])
    steps = (_fmt(r['steps_to_threshold']) if r['steps_to_threshold'] is not None
             else f'not reached ({r["num_reached"]}/{r["num_seeds"]})')
    speedup = f'{r["speedup"]:.2f}×' if r['speedup'] is not None else 'n/a'
    lines.append(f'| {r["group"]} | {r["num_seeds"]} | {_pm((r["final_mean"], r["final_ci95"]))} | '
                 f'{lo if lo == hi else f"{lo}–{hi}"} | {steps} | {speedup} |')
  if comparisons:
    lines += ['', '## Conclusion (generated from the numbers below)', '', text, '',
              '## Final and best values, paired with the baseline', '',
              '| arm group | baseline | paired seeds | final | baseline final | paired final diff | best | '
              'baseline best | paired best diff |', '|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for c in comparisons:
      lines.append(f'| {c["group"]} | {c["baseline"]} | {c["paired_seeds"]} | {_pm(c["final"])} | '
                   f'{_pm(c["baseline_final"])} | {_signed(c["final_diff"])} | {_pm(c["best"])} | '
                   f'{_pm(c["baseline_best"])} | {_signed(c["best_diff"])} |')
    lines += ['', '## Steps to thresholds', '',
              'Mean step over the seeds that reached the value (k/n seeds); speed-up = baseline steps / arm steps, '
              'given only when every seed of both reached it.', '',
              '| arm group | threshold | value | arm steps (k/n) | baseline steps (k/n) | speed-up |',
              '|---|---|---:|---:|---:|---:|']
    for c in comparisons:
      for t in c['thresholds']:
        speedup = f'{t["speedup"]:.2f}×' if t['speedup'] is not None else 'n/a'
        lines.append(f'| {c["group"]} | {t["label"]} | {_fmt(t["value"])} | {_fmt(t["steps"])} '
                     f'({t["reached"]}/{t["seeds"]}) | {_fmt(t["baseline_steps"])} '
                     f'({t["baseline_reached"]}/{t["baseline_seeds"]}) | {speedup} |')
    lines += ['', '## Paired difference at every evaluation step (arm - baseline, same seed)', '',
              '`*` marks an interval that excludes zero.', '']
    for c in comparisons:
      lines += [f'**{c["group"]}** vs {c["baseline"]}', '', '| step | seeds | mean diff ± 95% | per seed |',
                '|---:|---:|---:|---|']
      for step, mean, half, n, diffs in c['per_step']:
        star = '*' if report_stats._side(mean, half) else ''  # pylint: disable=protected-access
        lines.append(f'| {step} | {n} | {_signed((mean, half))}{star} | '
                     f'{", ".join(f"{d:+.3g}" for d in diffs)} |')
      lines.append('')
  lines += ['', '## Runs', '', f'| run | final step | final {metric} | steps to threshold |', '|---|---:|---:|---:|']
  for r in rows:
    for name, step, value, reached in zip(r['runs'], r['final_steps'], r['final_values'], r['steps_each']):
      lines.append(f'| {name} | {step} | {_fmt(value)} | {"not reached" if reached is None else reached} |')
  return '\n'.join(lines) + '\n'


def _panels(contexts, figsize=(7, 4.5)):
  """A figure with one panel per context; one context keeps the plain single-panel size."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  n = max(1, len(contexts))
  cols = min(n, 2)
  rows = (n + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(figsize[0] * cols, figsize[1] * rows), squeeze=False)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  return fig, dict(zip(contexts or [''], axes.flat))


def _save(fig, path):
  """Writes the figure as PNG to a local path or a URL (matplotlib itself writes local files only)."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, dpi=120, format='png')
  plt.close(fig)
  storage.write_bytes(path, png.getvalue())


def _draw_band(ax, points, label):
  steps = [p[0] for p in points]
  mean = np.array([p[1] for p in points])
  half = np.nan_to_num(np.array([p[2] for p in points]))  # one seed: no band
  line, = ax.plot(steps, mean, label=label)
  ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.2, linewidth=0)


def plot(runs, rows, metric, threshold, path, baseline='method=none'):
  """Mean over seeds per group with its 95% band, one panel per context; writes a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  contexts = list(dict.fromkeys(report_stats.context_of(r['group'], baseline) for r in rows))
  fig, axes = _panels(contexts)
  for r in rows:
    ax = axes[report_stats.context_of(r['group'], baseline)]
    _draw_band(ax, report_stats.band([runs[n] for n in r['runs']]), f'{r["group"]} (n={r["num_seeds"]})')
  for context, ax in axes.items():
    if len(axes) == 1:
      ax.axhline(threshold, color='grey', linestyle='--', linewidth=1, label=f'threshold {_fmt(threshold)}')
    ax.set(xlabel='step', ylabel=metric, title=f'{context or metric}: mean over seeds, 95% band')
    ax.legend(fontsize=8)
  _save(fig, path)


def plot_paired(comparisons, metric, path):
  """Paired difference to the baseline vs step with its 95% band, one panel per context; writes a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  contexts = list(dict.fromkeys(c['context'] for c in comparisons))
  fig, axes = _panels(contexts)
  for c in comparisons:
    _draw_band(axes[c['context']], c['per_step'], f'{c["group"]} (n={c["paired_seeds"]})')
  for context, ax in axes.items():
    ax.axhline(0.0, color='grey', linewidth=1)
    ax.set(xlabel='step', ylabel=f'{metric}: arm - baseline (< 0: arm better)',
           title=f'{context or metric}: paired difference, 95% band')
    ax.legend(fontsize=8)
  _save(fig, path)


def arm_names(root):
  """Arms in sweep.json's order when it exists, else every sub-directory holding a metrics.jsonl, sorted."""
  record = storage.join(root, 'sweep.json')
  if storage.exists(record):
    return [arm['name'] for arm in json.loads(storage.read_text(record))['arms']]
  return sorted(storage.basename(storage.dirname(p)) for p in storage.glob(root, '*/metrics.jsonl'))


def write_report(root, metric='eval/fd_pixels', threshold=None, baseline='method=none', out=None,
                 multipliers=report_stats.DEFAULT_MULTIPLIERS, thresholds=()):
  """Reads every arm, writes report.md, report.png, report_paired.png and report.json to `out` (default root).

  Returns (threshold used, rows) as summarize() does.
  """
  runs = {}
  for name in arm_names(root):
    path = storage.join(root, name, 'metrics.jsonl')
    if storage.exists(path):
      runs[name] = read_series(path, metric)
  threshold, rows = summarize(runs, threshold, baseline)
  comparisons = report_stats.compare(runs, baseline, multipliers, thresholds)
  text = report_stats.conclusion(comparisons, metric)
  out = out or root
  storage.makedirs(out)
  storage.write_text(storage.join(out, 'report.md'), markdown(rows, metric, threshold, baseline, comparisons, text))
  record = dict(metric=metric, threshold=threshold, baseline=baseline, groups=rows, comparisons=comparisons,
                conclusion=text)
  storage.write_text(storage.join(out, 'report.json'), json.dumps(_without_nan(record), indent=2) + '\n')
  plot(runs, rows, metric, threshold, storage.join(out, 'report.png'), baseline)
  if comparisons:
    plot_paired(comparisons, metric, storage.join(out, 'report_paired.png'))
  return threshold, rows


def _without_nan(tree):
  """NaN (a single seed's missing interval) as null: strict JSON readers reject NaN."""
  if isinstance(tree, dict):
    return {k: _without_nan(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_without_nan(v) for v in tree]
  return None if isinstance(tree, float) and math.isnan(tree) else tree


def _floats(text):
  return tuple(float(x) for x in text.split(',') if x.strip()) if text else ()


def main(argv=None):
  parser = argparse.ArgumentParser(prog='launch.report', epilog=__doc__, formatter_class=common.HelpFormatter)
  parser.add_argument('root', help='sweep root: one sub-directory per arm')
  parser.add_argument('--metric', default='eval/fd_pixels', help='key in metrics.jsonl (lower is better)')
  parser.add_argument('--threshold', type=float, default=None,
                      help='overview threshold (default: the worst final value of any run)')
  parser.add_argument('--baseline', default='method=none',
                      help='name component of the baseline arms: each arm is paired, seed by seed, with the arm '
                      'whose name has this component in place of its own of the same key (e.g. assign=none)')
  parser.add_argument('--multipliers', default=','.join(f'{m:g}' for m in report_stats.DEFAULT_MULTIPLIERS),
                      help='thresholds as multiples of each baseline group\'s mean final value')
  parser.add_argument('--thresholds', default='', help='extra absolute thresholds, comma-separated')
  parser.add_argument('--out', default=None, help='output directory (default: ROOT)')
  args = parser.parse_args(argv)
  threshold, rows = write_report(args.root, args.metric, args.threshold, args.baseline, args.out,
                                 _floats(args.multipliers), _floats(args.thresholds))
  print(storage.read_text(storage.join(args.out or args.root, 'report.md')))
  print(f'wrote report.md, report.png, report_paired.png, report.json to {args.out or args.root}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
