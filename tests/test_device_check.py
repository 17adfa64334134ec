"""benchmarks/device_check.py (`make device-check`) in its --smoke form on the 8 CPU devices: every part runs in its
own process and lands in the JSON (written after each part, the device named), the table is printed, and a part
that fails, runs over its budget or finds the budget spent is recorded as such while the others still run. Speed is
not asserted (the numbers of a smoke run mean nothing)."""
import importlib.util
import json
import os

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, 'benchmarks', 'device_check.py')


def _module():
  spec = importlib.util.spec_from_file_location('device_check', _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_smoke_run_measures_every_part_and_writes_the_device_json(tmp_path, capsys):
  check = _module()
  report = check.main(['--smoke', '--budget_s=1200', f'--out={tmp_path}'])
  path = tmp_path / 'device_check_cpu_smoke.json'
  assert json.loads(path.read_text()) == json.loads(json.dumps(report))  # written, and complete
  parts = {p['name']: p for p in report['parts']}
  assert list(parts) == ['probe', 'train:ct:bfloat16:pmap', 'assignment', 'study:default', 'study:deterministic']
  assert report['device'] == '8x cpu (cpu)' and parts['probe']['result']['device_count'] == 8
  train = parts['train:ct:bfloat16:pmap']
  assert train['status'] == 'ok', train['output_tail']
  row = train['result']
  assert row['recipe'] == 'ct' and row['images_per_s'] > 0 and row['gflops_per_image'] > 0 and row['loss_finite']
  assert row['mfu'] is None and 'no peak known' in row['accounting']  # a CPU has no entry in the peak table
  assignment = parts['assignment']['result']['rows']
  assert {r['method'] for r in assignment} == {'auction', 'jv', 'sinkhorn'}
  assert all(r['sequential_steps'] > 0 and r['us_per_iteration'] is not None for r in assignment)
  study = parts['study:default']
  assert study['status'] == 'ok', study['output_tail']
  assert study['result']['steps'] == 2 and study['result']['images_per_s_after_first_window'] > 0
  assert parts['study:deterministic']['status'].startswith('skipped: the flags are XLA:GPU flags')
  table = capsys.readouterr().out
  assert '| part | status | s | result |' in table and '| assignment | ok |' in table


def test_failed_over_budget_and_unstarted_parts_are_recorded_and_the_rest_runs(tmp_path):
  check = _module()
  report = check.main(['--smoke', '--parts=no_such_part,probe', '--budget_s=300', f'--out={tmp_path}'])
  failed, probe = report['parts']
  assert failed['status'].startswith('failed') and 'unknown part' in failed['output_tail']
  assert probe['status'] == 'ok'
  report = check.main(['--smoke', '--parts=assignment,probe', '--budget_s=1', '--min_part_s=0',
                       f'--out={tmp_path}'])
  assert report['parts'][0]['status'].startswith('over budget')  # killed after 1 s: JAX is not even imported
  assert report['parts'][1]['status'].startswith('not started')
  assert json.loads((tmp_path / 'device_check_pending.json').read_text())['parts'][1]['status'].startswith(
      'not started')  # no probe ran: the JSON still lands, under a name that says the device is unknown
