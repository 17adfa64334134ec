"""The one error type of the input checks: a bad config value, or a bad input (file, folder) a config value names.

Its message is one line that starts with what is wrong, the config key first where there is one:

    training.num_steps: must be positive, got -3
    assignment.method must be one of ['none', 'hungarian', ...], got 'hungarain'
    data.path='/data/missing' does not exist; ...

`python -m immiscible_jax.main` prints it as `error: <message>` and exits with status 2, without a traceback
(`--traceback` shows one). It is a ValueError, so code that catches ValueError keeps working. A full disk is not
bad input, but it is reported the same way: disk_full_message finds it in any error's chain (main.py prints it).
"""
import errno


class ConfigError(ValueError):
  """A config value, or an input named by one, that the run cannot use. The message is one line."""


class MissingInputError(ConfigError, FileNotFoundError):
  """Input that must be prepared first (e.g. CIFAR-10 for tfds): a ConfigError, and a FileNotFoundError."""


def allowed_values(values):
  """'a, b, c' for a message's `; allowed: ...` part."""
  return ', '.join(repr(v) if isinstance(v, str) else str(v) for v in values)


# errno values of a full disk or quota, and the text tensorstore (Orbax's array writer) gives them.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ('No space left on device', 'Disk quota exceeded')


def disk_full_message(error):
  """One line for an error anywhere in `error`'s chain that says the disk (or quota) is full, else None: the
  file if known, the cause, and that the run resumes from its last complete checkpoint."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = ' '.join(str(error).split())
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
      where = f'{error.filename}: ' if error.filename else ''
      return (f'{where}{error.strerror or text} while writing; free space and rerun the same command (a run '
              'resumes from its last complete checkpoint)')
    if any(t in text for t in _DISK_FULL_TEXTS):
      return (f'{text[:300]}; free space and rerun the same command (a run resumes from its last complete '
              'checkpoint)')
    error = error.__cause__ or error.__context__
  return None
