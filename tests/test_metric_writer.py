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
