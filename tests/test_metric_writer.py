"""metrics.jsonl stays machine-readable across a hard kill; the report reader keeps the last row per step."""
import json

from immiscible_jax import metric_writer
from launch import report


def test_resumed_writer_starts_a_new_line_after_a_torn_one(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 10, "eval/fd_pixels": 3.0}\n{"step": 20, "eval/fd_pi')  # killed mid-write
  writer = metric_writer.MetricWriter(str(tmp_path), total_steps=30, initial_step=10, enabled=True)
  writer.write(20, {'eval/fd_pixels': 2.0})
  writer.write(30, {'eval/fd_pixels': 1.5})
  writer.close()
  lines = path.read_text().splitlines()
  assert json.loads(lines[-1]) == {'step': 30, 'eval/fd_pixels': 1.5}
  assert report.read_series(str(path), 'eval/fd_pixels') == [(10, 3.0), (20, 2.0), (30, 1.5)]


def test_console_line_keeps_what_matters_within_80_columns(tmp_path, capsys):
  """A log row of every metric the loop writes prints loss, reduction, throughput and the evaluation values, with
  an ETA counted from start_clock (a resumed run at step 100 of 300, 100 steps later: 100 steps left)."""
  row = {'train/loss': 0.01234567, 'train/grad_norm': 0.2, 'train/update_norm': 0.03, 'train/num_scales': 11.0,
         'assignment/distance_before': 30.77, 'assignment/distance_after': 30.01, 'assignment/reduction_pct': 2.4567,
         'train/lr': 1e-3, 'perf/images_per_sec': 111.6}
  writer = metric_writer.MetricWriter(str(tmp_path), total_steps=300, enabled=True)
  writer.start_clock(100)
  writer._start_time -= 50.0  # pylint: disable=protected-access  # 100 steps took 50 s
  writer.write(200, row)
  writer.write(200, {'eval/fd_pixels': 4.5678})
  writer.close()
  first, second = capsys.readouterr().out.strip().splitlines()
  assert first.startswith('step 200/300 loss=0.01235 reduction=2.46% img/s=112 eta 50s'), first
  assert 'grad_norm' not in first and len(first) <= 80
  assert second.startswith('step 200/300 fd_pixels=4.568')
  assert metric_writer.format_seconds(3725) == '1h02m' and metric_writer.format_seconds(125) == '2m05s'
