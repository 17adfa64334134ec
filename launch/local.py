"""Runs the trainer as one process on this host, with the command line as given.

  python -m launch.local [--dry_run] -- --config=configs/digits.py --workdir=workdirs/digits
"""
import sys

from launch import common


def local_commands(trainer_args, python=sys.executable):
  """The one command: `python -m immiscible_jax.main <trainer args>`, environment unchanged."""
  return [common.Command(common.trainer_argv(trainer_args, python))]


def add_flags(parser):
  parser.add_argument('--python', default=sys.executable, help='Python interpreter that runs the trainer')


def commands(args, trainer_args):
  return local_commands(trainer_args, args.python)


def execute(args, trainer_args, log=None):
  (command,) = commands(args, trainer_args)
  return command.run(log)


def main(argv=None):
  return common.launcher_main(sys.modules[__name__], argv, prog='launch.local')


if __name__ == '__main__':
  sys.exit(main())
