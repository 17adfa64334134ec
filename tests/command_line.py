"""`python -m immiscible_jax.main` run in the test's own process (main's flag parser, then main), for tests that
check exit statuses and error lines without paying for a subprocess and its imports."""
import sys

from absl import flags

from immiscible_jax import main as cli


def run_cli(argv):
  """The command line `main ARGV...` in this process; returns the exit status (0 when main returns)."""
  argv = ['main', *argv]
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:  # a previous run's --config.KEY flags
    delattr(flags.FLAGS, name)
  saved_argv, sys.argv = sys.argv, argv  # ml_collections reads the --config.KEY overrides from sys.argv
  try:
    cli.main(cli._parse_flags(argv))  # pylint: disable=protected-access
  except SystemExit as e:
    return e.code
  finally:
    sys.argv = saved_argv
  return 0


def assert_one_line_error(code, output, key):
  """Exit status 2 and, as the whole output, one `error: ...` line that names `key`."""
  assert code == 2, output
  assert output.startswith('error: ') and output.endswith('\n') and output.count('\n') == 1, output
  assert key in output and len(output) < 400 and 'Traceback' not in output, output
