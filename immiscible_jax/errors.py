"""The one error type of the input checks: a bad config value, or a bad input (file, folder) a config value names.

Its message is one line that starts with what is wrong, the config key first where there is one:

    training.num_steps: must be positive, got -3
    assignment.method must be one of ['none', 'hungarian', ...], got 'hungarain'
    data.path='/data/missing' does not exist; ...

`python -m immiscible_jax.main` prints it as `error: <message>` and exits with status 2, without a traceback
(`--traceback` shows one). It is a ValueError, so code that catches ValueError keeps working.
"""


class ConfigError(ValueError):
  """A config value, or an input named by one, that the run cannot use. The message is one line."""


def allowed_values(values):
  """'a, b, c' for a message's `; allowed: ...` part."""
  return ', '.join(repr(v) if isinstance(v, str) else str(v) for v in values)
