"""benchmarks/accelerator.py (`make bench-accel`) end to end in its --smoke form on the 8 CPU devices: every section
runs and lands in the JSON with the device named, and a spent budget skips cases with a reason instead of running
over. Speed is not asserted (the numbers of a smoke run mean nothing)."""
import importlib.util
import json
import os

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, 'benchmarks', 'accelerator.py')


def _module():
  spec = importlib.util.spec_from_file_location('accelerator_benchmark', _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_smoke_run_writes_every_section_and_a_spent_budget_skips_with_reasons(tmp_path):
  bench = _module()
  path = tmp_path / 'smoke.json'
  bench.main(['--smoke', '--budget_s=3600', f'--json={path}'])  # ample: every smoke case runs
  result = json.loads(path.read_text())
  assert result['smoke'] and result['backend'] == 'cpu' and result['device_count'] == 8
  assert 'cpu' in result['device']
  train = result['train']
  assert [(r['dtype'], r['method'], r['scope']) for r in train['rows']] == [
      ('bfloat16', 'none', 'local'), ('bfloat16', 'auction', 'global')]
  assert all(r['images_per_s'] > 0 and r['per_device_batch'] == 2 for r in train['rows'])
  assert train['rows'][1]['reduction_pct'] > 0 == train['rows'][0]['reduction_pct']  # assignment ran, or not
  methods = {r['method']: r for r in result['assignment']['rows']}
  assert set(methods) == {'paper_baseline', 'none', 'auction'} and methods['auction']['quality'] > 0.9
  assert result['sampling']['rows'][0]['images_per_s'] > 0
  assert result['inception']['rows'] == [] and 'smoke' in result['inception']['skipped'][0]['reason']

  bench.main(['--smoke', '--budget_s=0', f'--json={path}'])
  spent = json.loads(path.read_text())
  assert spent['train']['rows'] == [] and len(spent['train']['skipped']) == 2
  assert all('budget' in s['reason'] for s in spent['train']['skipped'] + spent['assignment']['skipped'])
  assert spent['assignment']['rows'] == [] and spent['sampling']['rows'] == []
