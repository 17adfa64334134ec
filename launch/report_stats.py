"""The numbers of a sweep report, from metric series alone: bands over seeds, paired differences, thresholds.

Names: an arm is 'size=16,assign=exact_l2,seed=3'; its group drops the seed ('size=16,assign=exact_l2'); its
baseline swaps one component for the baseline's ('assign=none'), so an arm is paired with the baseline arm of the
same seed and the same other components. Lower metric values are better throughout. Intervals are 95% Student-t
over seeds (t quantile with n-1 degrees of freedom times the sample standard deviation over sqrt(n)); a paired
interval is the same over the per-seed differences. Intervals are per evaluation step, not corrected for the number
of steps or comparisons looked at.
"""
import math

import numpy as np
from scipy import stats

# Thresholds relative to the baseline group's mean final value: reach 1.5x, 1.2x and 1.0x of where vanilla ends.
DEFAULT_MULTIPLIERS = (1.5, 1.2, 1.0)


def group_name(arm_name):
  """'method=knn,seed=2' -> 'method=knn': the arm's name without its seed component."""
  return ','.join(part for part in arm_name.split(',') if not part.startswith('seed=')) or arm_name


def baseline_of(name, baseline):
  """`name` with the component of the baseline's key replaced by `baseline`; None when it has no such key."""
  key = baseline.split('=', 1)[0] + '='
  parts = name.split(',')
  if not any(part.startswith(key) for part in parts):
    return None
  return ','.join(baseline if part.startswith(key) else part for part in parts)


def context_of(group, baseline):
  """The components a group shares with its baseline: 'size=16,assign=knn8' -> 'size=16' ('' if none)."""
  key = baseline.split('=', 1)[0] + '='
  return ','.join(part for part in group.split(',') if not part.startswith(key))


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


def band(series_list):
  """[(step, mean, ci95 half-width, n)] at the steps every series logged."""
  tables = [dict(s) for s in series_list]
  steps = sorted(set.intersection(*(set(t) for t in tables)))
  return [(step, *t_interval([t[step] for t in tables]), len(tables)) for step in steps]


def paired_differences(arm_runs, base_runs):
  """Per-step arm - baseline over the seeds both have: [(step, mean, ci95, n, [diff per seed])].

  arm_runs / base_runs: {seed name component: series}. A step counts when every paired seed logged it.
  """
  seeds = sorted(set(arm_runs) & set(base_runs))
  if not seeds:
    return []
  arm = [dict(arm_runs[s]) for s in seeds]
  base = [dict(base_runs[s]) for s in seeds]
  steps = sorted(set.intersection(*(set(t) for t in arm + base)))
  rows = []
  for step in steps:
    diffs = [a[step] - b[step] for a, b in zip(arm, base)]
    rows.append((step, *t_interval(diffs), len(diffs), diffs))
  return rows


def _seed_of(arm_name):
  return next((part for part in arm_name.split(',') if part.startswith('seed=')), '')


def threshold_row(arm_runs, base_runs, label, value):
  """Steps to reach `value` for the arm and its baseline group: mean over the seeds that reached, k/n each.

  The speed-up (baseline steps / arm steps) is given only when every seed of both groups reached the value.
  """
  def reach(runs):
    steps = [steps_to_threshold(series, value) for series in runs.values()]
    got = [s for s in steps if s is not None]
    return (float(np.mean(got)) if got else None), len(got), len(steps)

  arm_steps, arm_k, arm_n = reach(arm_runs)
  base_steps, base_k, base_n = reach(base_runs)
  complete = arm_k == arm_n and base_k == base_n and arm_steps
  return dict(label=label, value=value, steps=arm_steps, reached=arm_k, seeds=arm_n, baseline_steps=base_steps,
              baseline_reached=base_k, baseline_seeds=base_n,
              speedup=base_steps / arm_steps if complete else None)


def compare(runs, baseline, multipliers=DEFAULT_MULTIPLIERS, thresholds=()):
  """Every non-baseline group against its baseline group, on the seeds both have.

  runs: {arm name: [(step, value), ...]}. Returns one dict per group that has a baseline group, in first-seen
  order: finals and bests (mean, ci95) of both, their paired differences, the per-step paired differences, and
  steps to each threshold (multiples of the baseline's mean final value over those seeds, then the absolute
  `thresholds`).
  """
  groups = {}
  for name, series in runs.items():
    if series:
      groups.setdefault(group_name(name), {})[_seed_of(name)] = series
  out = []
  for group, arm_runs in groups.items():
    base_group = baseline_of(group, baseline)
    if base_group is None or base_group == group or base_group not in groups:
      continue
    seeds = sorted(set(arm_runs) & set(groups[base_group]))
    if not seeds:
      continue
    # Only the paired seeds, on both sides: a baseline seed without its partner would bias the comparison.
    arm_runs = {s: arm_runs[s] for s in seeds}
    base_runs = {s: groups[base_group][s] for s in seeds}
    final = lambda rs: [rs[s][-1][1] for s in seeds]
    best = lambda rs: [min(v for _, v in rs[s]) for s in seeds]
    base_final_mean = t_interval(final(base_runs))[0]
    levels = [(f'{m:g} x {base_group} final', m * base_final_mean) for m in multipliers]
    levels += [(f'{t:g}', float(t)) for t in thresholds]
    out.append(dict(
        group=group, baseline=base_group, context=context_of(group, baseline), paired_seeds=len(seeds),
        final=t_interval(final(arm_runs)), baseline_final=t_interval(final(base_runs)),
        final_diff=t_interval(np.subtract(final(arm_runs), final(base_runs))),
        best=t_interval(best(arm_runs)), baseline_best=t_interval(best(base_runs)),
        best_diff=t_interval(np.subtract(best(arm_runs), best(base_runs))),
        per_step=paired_differences(arm_runs, base_runs),
        thresholds=[threshold_row(arm_runs, base_runs, label, value) for label, value in levels]))
  return out


def _side(mean, half):
  """'lower' / 'higher' when the interval excludes 0, else None (also with no interval)."""
  if math.isnan(half):
    return None
  if mean + half < 0:
    return 'lower'
  if mean - half > 0:
    return 'higher'
  return None


def _steps_text(steps):
  return 'steps ' + ', '.join(str(s) for s in steps) if steps else 'no step'


def conclusion(comparisons, metric):
  """One paragraph, generated from the numbers only: where the paired differences lie outside their intervals."""
  if not comparisons:
    return 'No arm has a baseline arm to be compared with, so no difference can be stated.'
  sentences, outside = [], []
  for c in comparisons:
    name = f'{c["group"]} vs {c["baseline"]}'
    if c['paired_seeds'] < 2:
      sentences.append(f'{name}: {c["paired_seeds"]} paired seed(s), too few for an interval; no claim.')
      continue
    lower = [row[0] for row in c['per_step'] if _side(row[1], row[2]) == 'lower']
    higher = [row[0] for row in c['per_step'] if _side(row[1], row[2]) == 'higher']
    final_side = _side(*c['final_diff'])
    mean, half = c['final_diff']
    verdict = {'lower': 'lower (better) beyond its 95% interval', 'higher': 'higher (worse) beyond its 95% interval',
               None: 'not distinguishable from zero'}[final_side]
    sentences.append(
        f'{name} ({c["paired_seeds"]} paired seeds): {metric} is lower beyond the 95% interval at '
        f'{_steps_text(lower)}, higher at {_steps_text(higher)}, and within the interval at the other '
        f'{len(c["per_step"]) - len(lower) - len(higher)} of {len(c["per_step"])} evaluations; the final paired '
        f'difference {mean:+.4g} ± {half:.3g} is {verdict}.')
    if lower or higher:
      outside.append(name)
  summary = ('Differences outside their intervals appear in: ' + '; '.join(outside) + '.' if outside else
             'No paired difference lies outside its 95% interval at any evaluation step.')
  return ' '.join(sentences) + ' ' + summary + (' Intervals are per step and uncorrected for the number of steps '
                                               'and comparisons, so isolated exclusions are expected by chance.')
