"""SIGTERM / SIGINT become "checkpoint at this step and exit 0", agreed on by every process.

The handler only sets a flag; the training loop asks `should_stop(step)` after each step. With one process the
answer is the flag itself. With several, processes must stop at the *same* step (the checkpoint is collective),
so every `sync_every` steps they all-gather their flags and stop together if any was signalled (one tiny host
collective per interval: no per-step host sync). A second SIGINT (Ctrl-C again) aborts at once, unsaved.
"""
import signal

import jax
import numpy as np

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionFlag:

  def __init__(self, sync_every=10):
    self.signalled = False
    self._sync_every = sync_every
    self._previous = {}

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    if self.signalled and signum == signal.SIGINT:
      raise KeyboardInterrupt  # The user insists: leave without the checkpoint.
    self.signalled = True

  def install(self):
    for sig in _SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def uninstall(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def should_stop(self, step):
    if jax.process_count() == 1:
      return self.signalled
    if step % self._sync_every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.array([self.signalled], np.int32))
    return bool(np.any(flags))


def install(sync_every=10):
  return PreemptionFlag(sync_every).install()
