"""SIGTERM / SIGINT become "checkpoint at this step and exit 0"; a second Ctrl-C leaves at once, unsaved.

The handlers only set a flag (and say so on stderr); where every process stops is decided by
agreement.StopPoints, which the training loop asks after each dispatch and the evaluator between its batches.
  one process       SIGTERM and SIGINT set the flag.
  several processes SIGTERM is left to JAX: jax.distributed.initialize installed its preemption notifier's own
                    handler, which tells every process (a Python handler would replace it). SIGINT sets the flag
                    and passes the notice on by raising SIGTERM in this process.
A second SIGINT raises KeyboardInterrupt; main.py then leaves with status 130 without waiting for the device.
The main thread never blocks inside a device wait (layouts.wait_until_ready sleeps between polls), so the
handlers run while the device is busy.
"""
import os
import signal


class PreemptionFlag:

  def __init__(self, notify_jax=False):
    self.signalled = False
    self._notify_jax = notify_jax
    self._previous = {}

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    if self.signalled and signum == signal.SIGINT:
      raise KeyboardInterrupt  # The user insists: leave without the checkpoint.
    if not self.signalled:
      # os.write, not print: the handler may interrupt a print of the main thread (reentrant buffered write).
      os.write(2, f'{signal.Signals(signum).name}: stopping at the next step with a checkpoint '
                  '(Ctrl-C again to abort without one)\n'.encode())
    self.signalled = True
    if self._notify_jax and signum == signal.SIGINT:
      signal.raise_signal(signal.SIGTERM)  # to JAX's preemption notifier, which tells the other processes

  def install(self):
    signals = (signal.SIGINT,) if self._notify_jax else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def uninstall(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}


def install(notify_jax=False):
  """The flag with its handlers installed. notify_jax: several processes, whose SIGTERM belongs to JAX's
  preemption notifier (see the module docstring)."""
  return PreemptionFlag(notify_jax).install()
