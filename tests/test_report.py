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
