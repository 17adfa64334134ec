"""What the launchers share: the Command record, the trainer's command line, config overrides, the CLI frame.

A launcher module provides:
  add_flags(parser)                      its own flags;
  commands(args, trainer_args)           the commands it would run (pure: no side effects);
  execute(args, trainer_args, log=None)  runs them, output to `log` (an open file) or the terminal; exit status;
and optionally dry_run_text(args, trainer_args) when printing the commands is not the whole story (SLURM).
"""
import argparse
import dataclasses
import os
import shlex
import subprocess
import sys

# The trainer every launcher runs.
TRAINER_MODULE = 'immiscible_jax.main'
# main.py calls jax.distributed.initialize() when this is '1'.
DISTRIBUTED_ENV = 'IMMISCIBLE_JAX_DISTRIBUTED'


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """--help of the launchers: the docstring as written, and each option's default where it has one."""

  def _get_help_string(self, action):
    text = action.help or ''
    if action.default not in (None, False, '', argparse.SUPPRESS) and 'default' not in text and action.option_strings:
      text += ' (default: %(default)s)'
    return text


@dataclasses.dataclass
class Command:
  """One process to start: its argv and the variables it adds to the inherited environment."""
  argv: list
  env: dict = dataclasses.field(default_factory=dict)

  def shell(self):
    """The command as one POSIX shell line (`K=V ... argv`), quoted so it can be pasted."""
    assignments = [f'{key}={shlex.quote(str(value))}' for key, value in self.env.items()]
    return ' '.join(assignments + [shlex.join(self.argv)])

  def full_env(self):
    return {**os.environ, **{key: str(value) for key, value in self.env.items()}}

  def run(self, log=None):
    """Runs to completion with output to `log` (an open file) or the terminal; returns the exit status."""
    stderr = subprocess.STDOUT if log is not None else None
    return subprocess.run(self.argv, env=self.full_env(), stdout=log, stderr=stderr, check=False).returncode


def split_argv(argv):
  """Splits argv at the first '--' into (launcher args, trainer args)."""
  if '--' in argv:
    i = argv.index('--')
    return argv[:i], argv[i + 1:]
  return argv, []


def trainer_argv(trainer_args, python=sys.executable):
  return [python, '-m', TRAINER_MODULE, *trainer_args]


def flag_value(args, name):
  """The value of `--name=value` or `--name value` in an argv list (the last one wins), else None."""
  value = None
  for i, arg in enumerate(args):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(args):
      value = args[i + 1]
  return value


def format_value(value):
  """A Python value written the way ml_collections' config_flags parses it: True, 0.0004, (1,2), (4,), text."""
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (tuple, list)):
    items = [format_value(item) for item in value]
    return '(' + ','.join(items) + (',)' if len(items) == 1 else ')')
  return str(value)


def override_flags(overrides):
  """{'assignment.method': 'knn', 'seed': 1} -> ['--config.assignment.method=knn', '--config.seed=1']."""
  return [f'--config.{key}={format_value(value)}' for key, value in overrides.items()]


def parse_env(pairs):
  """['K=V', ...] from repeated --env flags -> {'K': 'V'}."""
  env = {}
  for pair in pairs or ():
    key, sep, value = pair.partition('=')
    if not sep or not key:
      raise ValueError(f'--env takes KEY=VALUE, got {pair!r}')
    env[key] = value
  return env


def launcher_main(module, argv=None, prog=None):
  """The shared `python -m launch.<name> [flags] [--dry_run] -- <trainer args>` entry point."""
  argv = sys.argv[1:] if argv is None else list(argv)
  own, trainer_args = split_argv(argv)
  parser = argparse.ArgumentParser(
      prog=prog, description=module.__doc__.splitlines()[0],
      usage=f'python -m {prog or module.__name__} [flags] [--dry_run] -- <trainer args>')
  parser.add_argument('--dry_run', action='store_true', help='print the commands instead of running them')
  module.add_flags(parser)
  args = parser.parse_args(own)
  if not trainer_args:
    parser.error('give the trainer arguments after "--", e.g. -- --config=configs/digits.py --workdir=DIR')
  if args.dry_run:
    text = getattr(module, 'dry_run_text', None)
    print(text(args, trainer_args) if text else '\n'.join(c.shell() for c in module.commands(args, trainer_args)))
    return 0
  return module.execute(args, trainer_args)
