"""profile.start_step / profile.num_steps: a jax.profiler trace of those steps lands in WORKDIR/profile, readable
by TensorBoard (xplane.pb) and Perfetto (perfetto_trace.json.gz), with one 'train' annotation per traced
dispatch; off by default. The loop runs stand-in steps (tests/fake_steps.py): no train step is compiled."""
import glob
import gzip
import json

from fake_steps import SlowSteps
from fake_steps import tiny_config
from immiscible_jax import train


def test_a_trace_of_the_chosen_steps_appears_only_when_profiling_is_on(tmp_path, monkeypatch):
  monkeypatch.setattr(train, 'make_train_steps', SlowSteps(iterations=2).make)
  base = {'training.num_steps': 8, 'training.log_every_steps': 2, 'checkpoint.every_steps': 8}
  train.train_and_evaluate(tiny_config(**base), str(tmp_path / 'off'))
  assert not (tmp_path / 'off' / 'profile').exists()

  train.train_and_evaluate(tiny_config(**base, **{'profile.start_step': 3, 'profile.num_steps': 2}),
                           str(tmp_path / 'on'))
  runs = glob.glob(str(tmp_path / 'on' / 'profile' / 'plugins' / 'profile' / '*'))
  assert len(runs) == 1
  assert glob.glob(f'{runs[0]}/*.xplane.pb')
  with gzip.open(f'{runs[0]}/perfetto_trace.json.gz') as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  traced = sorted({e['args']['step_num'] for e in events if e.get('name') == 'train' and 'args' in e})
  assert traced == ['4', '5'], traced  # the dispatches of steps 4 and 5: after step 3, for 2 steps
