"""The sweep report on hand-made metrics.jsonl files (2 arm groups x 3 seeds) whose answers are worked out here."""
import json
import math

import pytest

from launch import report

# eval/fd_pixels at steps 100, 200, 300 for each run.
CURVES = {
    'method=none,seed=0': [30.0, 20.0, 12.0],
    'method=none,seed=1': [28.0, 22.0, 14.0],
    'method=none,seed=2': [32.0, 18.0, 10.0],
    'method=hungarian,seed=0': [25.0, 15.0, 11.0],
    'method=hungarian,seed=1': [24.0, 14.0, 9.0],
    'method=hungarian,seed=2': [26.0, 19.0, 10.0],
}
T_975_2DOF = 4.302652729749462  # Student t 97.5% quantile, 2 degrees of freedom (tables: 4.303)


@pytest.fixture
def root(tmp_path):
  for name, values in CURVES.items():
    rows = []
    for i, value in enumerate(values):
      step = 100 * (i + 1)
      rows.append({'step': step - 50, 'train/loss': 0.5})  # train rows carry no eval metric
      rows.append({'step': step, 'eval/fd_pixels': value})
    if name == 'method=hungarian,seed=1':
      # A resumed run logs step 300 again: the later row counts.
      rows.insert(-1, {'step': 300, 'eval/fd_pixels': 99.0})
    (tmp_path / name).mkdir()
    (tmp_path / name / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (tmp_path / 'not_an_arm').mkdir()  # ignored: no metrics.jsonl
  return tmp_path


def test_numbers_match_the_hand_computation(root):
  threshold, rows = report.write_report(str(root), threshold=20.0)
  assert threshold == 20.0
  # Without sweep.json the arms come in sorted directory order: hungarian first.
  assert [r['group'] for r in rows] == ['method=hungarian', 'method=none']
  hungarian, none = rows
  assert none['num_seeds'] == hungarian['num_seeds'] == 3
  # none: finals 12, 14, 10 -> mean 12, sample sd 2, half-width t * 2 / sqrt(3).
  assert none['final_mean'] == pytest.approx(12.0)
  assert none['final_ci95'] == pytest.approx(T_975_2DOF * 2.0 / math.sqrt(3.0), rel=1e-9)
  # hungarian: finals 11, 9, 10 -> mean 10, sample sd 1.
  assert hungarian['final_mean'] == pytest.approx(10.0)
  assert hungarian['final_ci95'] == pytest.approx(T_975_2DOF * 1.0 / math.sqrt(3.0), rel=1e-9)
  # First step <= 20: none 200 (20 <= 20), 300 (22 > 20), 200 -> 700 / 3; hungarian 200, 200, 200.
  assert none['steps_to_threshold'] == pytest.approx(700.0 / 3.0)
  assert hungarian['steps_to_threshold'] == pytest.approx(200.0)
  assert none['speedup'] == pytest.approx(1.0)
  assert hungarian['speedup'] == pytest.approx((700.0 / 3.0) / 200.0)  # 1.1667


def test_default_threshold_is_the_worst_final_value(root):
  threshold, rows = report.write_report(str(root))
  assert threshold == 14.0  # none seed 1
  by_group = {r['group']: r for r in rows}
  # First step <= 14: none 300, 300, 300; hungarian 300 (15 > 14), 200 (14), 300.
  assert by_group['method=none']['steps_to_threshold'] == pytest.approx(300.0)
  assert by_group['method=hungarian']['steps_to_threshold'] == pytest.approx(800.0 / 3.0)
  assert by_group['method=hungarian']['speedup'] == pytest.approx(300.0 / (800.0 / 3.0))  # 1.125


def test_not_reached_when_any_seed_misses_the_threshold(root):
  _, rows = report.write_report(str(root), threshold=11.0)
  by_group = {r['group']: r for r in rows}
  # none: only seed 2 (10) gets to <= 11; hungarian: 11, 9, 10 all do, at step 300.
  assert by_group['method=none']['steps_to_threshold'] is None
  assert by_group['method=none']['num_reached'] == 1
  assert by_group['method=hungarian']['steps_to_threshold'] == pytest.approx(300.0)
  assert by_group['method=hungarian']['speedup'] is None  # no baseline steps to divide
  text = (root / 'report.md').read_text()
  assert '| method=none | 3 | 12 ± 4.968 | 300 | not reached (1/3) | n/a |' in text


def test_markdown_table_and_sweep_order(root):
  (root / 'sweep.json').write_text(json.dumps({'arms': [{'name': n} for n in CURVES]}))
  report.write_report(str(root), threshold=20.0)
  text = (root / 'report.md').read_text()
  # 12 ± 4.302652729749462 * 2 / sqrt(3) = 4.968; 10 ± 2.484; 700/3 = 233.3 steps; 233.33/200 = 1.17x.
  assert '| method=none | 3 | 12 ± 4.968 | 300 | 233.3 | 1.00× |' in text
  assert '| method=hungarian | 3 | 10 ± 2.484 | 300 | 200 | 1.17× |' in text
  assert text.index('| method=none |') < text.index('| method=hungarian |')  # sweep.json's order
  assert '| method=hungarian,seed=1 | 300 | 9 | 200 |' in text
  saved = json.loads((root / 'report.json').read_text())
  assert saved['threshold'] == 20.0 and [g['group'] for g in saved['groups']] == ['method=none', 'method=hungarian']


def test_png_is_written_and_valid(root, tmp_path_factory):
  out = tmp_path_factory.mktemp('out')
  report.write_report(str(root), out=str(out))
  data = (out / 'report.png').read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR'
  width, height = int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
  assert (width, height) == (840, 540)  # figsize (7, 4.5) inches at 120 dpi
  assert not (root / 'report.png').exists()


def test_baseline_matches_the_other_name_components():
  assert report.group_name('batch=64,method=knn,seed=2') == 'batch=64,method=knn'
  assert report.baseline_of('batch=64,method=knn', 'method=none') == 'batch=64,method=none'
  assert report.baseline_of('batch=64', 'method=none') is None


# ------------------------------------------------------------------------------ paired comparisons (evidence)

# Two contexts; in size=16, seeds 0-2 of none and exact, and one knn seed; size=8 has only its baseline.
# eval/fd_pixels at steps 100, 200, 300, 400.
PAIRED = {
    'size=16,assign=none,seed=0': [40.0, 30.0, 20.0, 10.0],
    'size=16,assign=none,seed=1': [42.0, 33.0, 21.0, 12.0],
    'size=16,assign=none,seed=2': [38.0, 27.0, 22.0, 11.0],
    'size=16,assign=exact,seed=0': [39.0, 28.0, 19.0, 10.5],
    'size=16,assign=exact,seed=1': [41.0, 31.0, 20.0, 12.5],
    'size=16,assign=exact,seed=2': [37.0, 25.0, 21.0, 11.5],
    'size=16,assign=knn,seed=0': [45.0, 35.0, 25.0, 15.0],
    'size=8,assign=none,seed=0': [9.0, 8.0, 7.0, 6.0],
}


@pytest.fixture
def paired_root(tmp_path):
  for name, values in PAIRED.items():
    (tmp_path / name).mkdir()
    rows = [{'step': 100 * (i + 1), 'eval/fd_pixels': v} for i, v in enumerate(values)]
    (tmp_path / name / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (tmp_path / 'sweep.json').write_text(json.dumps({'arms': [{'name': n} for n in PAIRED]}))
  return tmp_path


def _t_half(values):
  """95% Student-t half-width, from the table value for 2 dof (all paired sets here have 3 seeds)."""
  n = len(values)
  mean = sum(values) / n
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return T_975_2DOF * sd / math.sqrt(n)


def test_paired_differences_thresholds_and_conclusion(paired_root):
  report.write_report(str(paired_root), baseline='assign=none', thresholds=(25.0,))
  saved = json.loads((paired_root / 'report.json').read_text())
  by_group = {c['group']: c for c in saved['comparisons']}
  assert set(by_group) == {'size=16,assign=exact', 'size=16,assign=knn'}  # size=8 has no arm to compare
  exact = by_group['size=16,assign=exact']
  assert exact['baseline'] == 'size=16,assign=none' and exact['paired_seeds'] == 3
  # Differences exact - none per seed: step 100: -1, -1, -1; 200: -2, -2, -2; 300: -1, -1, -1; 400: .5, .5, .5
  # -> zero spread, an interval of width 0 that excludes zero at every step.
  steps = [(row[0], row[1], row[2], row[3]) for row in exact['per_step']]
  assert steps == [(100, -1.0, 0.0, 3), (200, -2.0, 0.0, 3), (300, -1.0, 0.0, 3), (400, 0.5, 0.0, 3)]
  assert exact['final_diff'] == [pytest.approx(0.5), pytest.approx(0.0)]
  # Best (minimum over steps) per seed: exact 10.5, 12.5, 11.5; none 10, 12, 11 -> diff +0.5 each.
  assert exact['best'][0] == pytest.approx(11.5) and exact['best'][1] == pytest.approx(_t_half([10.5, 12.5, 11.5]))
  # Thresholds: baseline mean final (10 + 12 + 11) / 3 = 11 -> 16.5, 13.2, 11.0, and the given 25.
  values = [t['value'] for t in exact['thresholds']]
  assert values == [pytest.approx(16.5), pytest.approx(13.2), pytest.approx(11.0), 25.0]
  at_11 = exact['thresholds'][2]
  # <= 11: exact seed 0 (10.5 at 400) only -> 400 (1/3); none seeds 0 (10) and 2 (11) at 400 -> 400 (2/3).
  assert (at_11['steps'], at_11['reached'], at_11['seeds']) == (400.0, 1, 3)
  assert (at_11['baseline_steps'], at_11['baseline_reached'], at_11['speedup']) == (400.0, 2, None)
  at_25 = exact['thresholds'][3]
  # <= 25: exact 300, 300 (20 at 300; 31 > 25 at 200), 200 (25) -> 800/3; none 300, 300, 300 -> 300.
  assert at_25['steps'] == pytest.approx(800 / 3) and at_25['baseline_steps'] == pytest.approx(300.0)
  assert at_25['speedup'] == pytest.approx(300 / (800 / 3))
  knn = by_group['size=16,assign=knn']
  assert knn['paired_seeds'] == 1 and knn['final_diff'][1] is None  # one seed: no interval (null in JSON)
  text = saved['conclusion']
  assert 'size=16,assign=exact vs size=16,assign=none (3 paired seeds)' in text
  assert 'lower beyond the 95% interval at steps 100, 200, 300, higher at steps 400' in text
  assert 'size=16,assign=knn vs size=16,assign=none: 1 paired seed(s), too few for an interval; no claim.' in text
  md = (paired_root / 'report.md').read_text()
  for name in PAIRED:  # every arm that ran is in the report
    assert f'| {name} |' in md
  assert (paired_root / 'report_paired.png').read_bytes()[:4] == b'\x89PNG'


def test_paired_interval_uses_the_seed_differences():
  arm = {'seed=0': [(1, 5.0)], 'seed=1': [(1, 7.0)], 'seed=2': [(1, 3.0)]}
  base = {'seed=0': [(1, 6.0)], 'seed=1': [(1, 6.0)], 'seed=2': [(1, 6.0)], 'seed=9': [(1, 0.0)]}
  ((step, mean, half, n, diffs),) = report.report_stats.paired_differences(arm, base)
  assert (step, n, diffs) == (1, 3, [-1.0, 1.0, -3.0])  # seed=9 has no partner and is left out
  assert mean == pytest.approx(-1.0) and half == pytest.approx(_t_half([-1.0, 1.0, -3.0]))


def test_comparisons_use_only_the_paired_seeds():
  runs = {'a=none,seed=0': [(1, 10.0), (2, 4.0)], 'a=none,seed=1': [(1, 10.0), (2, 1.0)],
          'a=x,seed=0': [(1, 9.0), (2, 5.0)]}
  (c,) = report.report_stats.compare(runs, 'a=none', multipliers=(1.0,))
  # Seed 1 has no partner: the baseline's final is 4 (seed 0 alone), not (4 + 1) / 2.
  assert c['paired_seeds'] == 1 and c['baseline_final'][0] == 4.0
  (t,) = c['thresholds']
  assert t['value'] == 4.0 and (t['reached'], t['baseline_reached'], t['baseline_seeds']) == (0, 1, 1)
