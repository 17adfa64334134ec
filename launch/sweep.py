r"""Expands a sweep file into one workdir and one trainer command per arm, and launches the unfinished arms.

  python -m launch.sweep --sweep=configs/sweeps/assignment_digits.py --runner=local --root=workdirs/ablation \
      [--parallel=1] [--dry_run] [runner flags, e.g. --num_processes=2] [-- extra trainer args for every arm]

A sweep file defines CONFIG (the base config, as given to --config) and get_sweep(), which returns or yields
(name, overrides) pairs: a filesystem-safe name such as 'method=hungarian,seed=1' and a dict of config keys to values
such as {'assignment.method': 'hungarian', 'seed': 1}. Each arm runs in ROOT/<name> with
  --config=CONFIG --workdir=ROOT/<name> --mode=train --config.KEY=VALUE ... <extra trainer args>
An arm is finished when ROOT/<name>/done.json holds a step >= its training.num_steps (from its overrides, the extra
args, else CONFIG). Finished arms are skipped; the others are launched and the trainer resumes each from its last
checkpoint. ROOT/sweep.json records the plan (arms, overrides, commands); it depends only on the flags and the sweep
file, so a second run rewrites it unchanged and launches only what is still unfinished. With --parallel=1 the arms
run one after another with their output on the terminal; with --parallel=K, K at a time, each arm's output appended
to ROOT/<name>/launch.log. Exit status: non-zero when any launched arm failed.
ROOT may be a bucket (gs://BUCKET/prefix, through immiscible_jax/storage.py): done.json and sweep.json are read and
written there (--parallel > 1 needs a local ROOT).
"""
import argparse
import concurrent.futures
import importlib.util
import json
import os
import re
import sys

from immiscible_jax import storage
from launch import common
from launch import local
from launch import multiprocess
from launch import slurm
from launch import tpu_pod

RUNNERS = {'local': local, 'multiprocess': multiprocess, 'tpu_pod': tpu_pod, 'slurm': slurm}
_ARM_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._=,+-]*$')


def _load_module(path):
  name = 'sweep_file_' + re.sub(r'\W', '_', os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise FileNotFoundError(f'cannot load {path!r}: not a Python file')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(path):
  """(CONFIG, [(name, overrides), ...]) from a sweep file, after checking that names are safe and unique."""
  module = _load_module(path)
  if not hasattr(module, 'CONFIG') or not hasattr(module, 'get_sweep'):
    raise ValueError(f'{path}: a sweep file defines CONFIG (base config path) and get_sweep()')
  arms, seen = [], set()
  for name, overrides in module.get_sweep():
    if not _ARM_NAME.match(name):
      raise ValueError(f'{path}: arm name {name!r} must match {_ARM_NAME.pattern} (it names a directory)')
    if name in seen:
      raise ValueError(f'{path}: arm name {name!r} appears twice')
    seen.add(name)
    arms.append((name, dict(overrides)))
  return module.CONFIG, arms


def load_config(config_spec):
  """The ConfigDict of 'path.py' or 'path.py:arg', as config_flags would build it."""
  path, _, arg = config_spec.partition(':')
  module = _load_module(path)
  return module.get_config(arg) if arg else module.get_config()


def target_steps(base_config, overrides, extra_args):
  """training.num_steps of one arm: the extra trainer args win over the arm's overrides, which win over CONFIG."""
  flag = common.flag_value(extra_args, 'config.training.num_steps')
  if flag is not None:
    return int(flag)
  return int(overrides.get('training.num_steps', base_config.training.num_steps))


def finished_step(workdir):
  """The step in WORKDIR/done.json, or None when the run has not completed."""
  path = storage.join(workdir, 'done.json')
  return json.loads(storage.read_text(path))['step'] if storage.exists(path) else None


def expand(sweep_path, root, extra_args=()):
  """The plan: for every arm its name, overrides, workdir, trainer args and target step count."""
  config_spec, arms = load_sweep(sweep_path)
  base = load_config(config_spec)
  plan = []
  for name, overrides in arms:
    workdir = storage.join(root, name)
    trainer_args = [f'--config={config_spec}', f'--workdir={workdir}', '--mode=train',
                    *common.override_flags(overrides), *extra_args]
    plan.append(dict(name=name, overrides=overrides, workdir=workdir, trainer_args=trainer_args,
                     num_steps=target_steps(base, overrides, extra_args)))
  return config_spec, plan


def sweep_record(sweep_path, config_spec, runner_name, runner, args, plan):
  """What ROOT/sweep.json holds: deterministic in the flags and the sweep file."""
  arms = [dict(name=arm['name'], overrides=arm['overrides'], workdir=arm['workdir'], num_steps=arm['num_steps'],
               commands=[c.shell() for c in runner.commands(args, arm['trainer_args'])]) for arm in plan]
  return dict(sweep=sweep_path, config=config_spec, runner=runner_name, arms=arms)


def _run_arm(runner, args, arm, parallel):
  """Launches one arm; returns its exit status (or the exception's text)."""
  try:
    if parallel == 1:
      return runner.execute(args, arm['trainer_args'])
    storage.makedirs(arm['workdir'])  # --parallel > 1 needs a local root (_parse): the log is appended to
    with storage.open(storage.join(arm['workdir'], 'launch.log'), 'a') as log:
      return runner.execute(args, arm['trainer_args'], log)
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'


def run_sweep(runner, args, plan, parallel=1):
  """Skips finished (and, for SLURM, queued) arms and launches the rest, `parallel` at a time.

  Returns {name: dict(action='skipped' | 'launched', exit=status or None, finished=bool, note=str)} in plan order.
  """
  status, todo = {}, []
  for arm in plan:
    step = finished_step(arm['workdir'])
    if step is not None and step >= arm['num_steps']:
      status[arm['name']] = dict(action='skipped', exit=None, finished=True, note=f'done.json step {step}')
    elif getattr(runner, 'is_active', None) and runner.is_active(arm['workdir']):
      status[arm['name']] = dict(action='skipped', exit=None, finished=False, note='job already queued or running')
    else:
      status[arm['name']] = None  # keeps plan order
      todo.append(arm)
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    results = list(pool.map(lambda arm: _run_arm(runner, args, arm, parallel), todo))
  for arm, result in zip(todo, results):
    step = finished_step(arm['workdir'])
    status[arm['name']] = dict(action='launched', exit=result, finished=step is not None and step >= arm['num_steps'],
                               note='' if step is None else f'done.json step {step}')
  return status


def _parse(argv):
  own, extra = common.split_argv(argv)
  first = argparse.ArgumentParser(add_help=False)
  first.add_argument('--runner', choices=sorted(RUNNERS), default='local')
  runner_name = first.parse_known_args(own)[0].runner
  # The module docstring once, as the epilog (its first line would repeat as the description); defaults shown.
  parser = argparse.ArgumentParser(prog='launch.sweep', epilog=__doc__,
                                   formatter_class=common.HelpFormatter)
  parser.add_argument('--sweep', required=True, help='sweep file, e.g. configs/sweeps/assignment_digits.py')
  parser.add_argument('--runner', choices=sorted(RUNNERS), default='local', help='launcher for every arm')
  parser.add_argument('--root', required=True, help='directory holding one workdir per arm')
  parser.add_argument('--parallel', type=int, default=1, help='arms launched at the same time')
  parser.add_argument('--dry_run', action='store_true', help='print the plan and commands; write and run nothing')
  RUNNERS[runner_name].add_flags(parser)
  args = parser.parse_args(own)
  if args.parallel < 1:
    parser.error('--parallel must be >= 1')
  try:  # each arm's workdir lies under the root; Orbax would glob it (storage.GLOB_CHARACTERS)
    storage.check_no_glob_characters(args.root, '--root')
  except ValueError as e:
    parser.error(str(e))
  if args.parallel > 1 and (runner_name == 'tpu_pod' or '://' in args.root):
    parser.error('--parallel > 1 needs a local --root and a local runner (one TPU slice runs one arm at a time)')
  return runner_name, args, extra


def main(argv=None):
  runner_name, args, extra = _parse(sys.argv[1:] if argv is None else list(argv))
  runner = RUNNERS[runner_name]
  config_spec, plan = expand(args.sweep, args.root, extra)
  record = sweep_record(args.sweep, config_spec, runner_name, runner, args, plan)
  if args.dry_run:
    for arm, entry in zip(plan, record['arms']):
      step = finished_step(arm['workdir'])
      state = 'finished, would skip' if step is not None and step >= arm['num_steps'] else 'would launch'
      print(f'# {arm["name"]}: {state}\n' + '\n'.join(entry['commands']))
    return 0
  storage.makedirs(args.root)
  storage.write_text(storage.join(args.root, 'sweep.json'), json.dumps(record, indent=2) + '\n', atomic=True)
  status = run_sweep(runner, args, plan, args.parallel)
  for name, st in status.items():
    finished = 'finished' if st['finished'] else 'not finished'
    exit_text = '' if st['exit'] is None else f', exit status {st["exit"]}'
    print(f'{name}: {st["action"]}{exit_text}, {finished}' + (f' ({st["note"]})' if st['note'] else ''))
  return 1 if any(st['exit'] not in (None, 0) for st in status.values()) else 0


if __name__ == '__main__':
  sys.exit(main())
