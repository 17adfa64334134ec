"""Everything the processes of a multi-host run must decide together, in one module.

  gather_ints(value)      one small int from every process, through the coordination service's key-value store:
                          checkpointing.restore agrees on the step to read (and on who could read it)
  from_process0(name, s)  process 0's string in every process, through the same store (a decision only process 0
                          can make, e.g. a workdir lock)
  allgather_float64(x)    a float64 array from every process, bit for bit, by a device all-gather:
                          evaluation sums the feature moments of each process's samples
  barrier(name)           every process reaches this point: the one writer of the reference statistics' cache
  StopPoints              where every process stops after a preemption notice: the training loop after each
                          dispatch, the in-loop evaluator between its batches

All on public JAX APIs (jax.experimental.multihost_utils) except the key-value store's client, which JAX reaches
only through jax._src: key_value_client() is the one place that touches it, and tests/test_agreement.py fails
when a JAX upgrade moves it. Why the key-value store for restores and not a device collective: no program to
compile, and it cannot pair with a collective that another process runs inside Orbax's save or restore. In a
single-process run every function here is a local no-op.
"""
import itertools

import jax
from jax.experimental import multihost_utils
import numpy as np

# How long a process waits for the others to report a value to gather_ints.
_GATHER_TIMEOUT_MS = 10 * 60 * 1000


def key_value_client():
  """The distributed runtime's key-value store client of this process (None when jax.distributed is not
  initialised). The one private JAX API of the project: JAX exposes the store only as jax._src.distributed's
  global state (Orbax reaches it the same way)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


_gather_rounds = itertools.count()  # every process calls gather_ints equally often: round k has the same key


def gather_ints(value, name='restore'):
  """[process_count] ints: `value` from every process. Every process must call it, equally often, in the same
  order (keys are numbered by call)."""
  if jax.process_count() == 1:
    return np.array([int(value)])
  client = key_value_client()
  key = f'immiscible_jax/{name}/{next(_gather_rounds)}'
  client.key_value_set(f'{key}/{jax.process_index()}', str(int(value)))
  return np.array([int(client.blocking_key_value_get(f'{key}/{p}', _GATHER_TIMEOUT_MS))
                   for p in range(jax.process_count())])


_shared_rounds = itertools.count()  # every process calls from_process0 equally often: round k has the same key


def from_process0(name, text=None):
  """Process 0's `text` (a str), returned in every process: process 0 passes it, the others pass None and wait
  for it, through the key-value store. Every process must call it, equally often, in the same order. (For a
  decision only process 0 can make, such as taking a workdir lock.)"""
  if jax.process_count() == 1:
    return text
  client = key_value_client()
  key = f'immiscible_jax/{name}/{next(_shared_rounds)}'
  if jax.process_index() == 0:
    client.key_value_set(key, text)
    return text
  return client.blocking_key_value_get(key, _GATHER_TIMEOUT_MS)


def allgather_float64(x):
  """[process_count, *x.shape]: float64 `x` from every process, bit for bit (sent as uint32 words: device
  collectives carry no float64 without jax_enable_x64). Every process must call it with the same shape."""
  x = np.ascontiguousarray(x, np.float64)
  if jax.process_count() == 1:
    return x[None]
  words = multihost_utils.process_allgather(x.view(np.uint32))
  return np.asarray(words).view(np.float64).reshape(jax.process_count(), *x.shape)


def barrier(name):
  """Returns in every process once all processes have called it with this name."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class StopReached(Exception):
  """Raised by StopPoints.check: every process stops at this point (the training loop saves and leaves)."""


# Process-wide count of stop points: every process passes the same points in the same order, so the counts agree.
_STOP_POINTS = itertools.count(1)


class StopPoints:
  """Where a run stops after SIGTERM / SIGINT: the same place in every process.

  The training loop asks reached() after every dispatch and the in-loop evaluator calls check() between its
  batches; every process makes the same calls in the same order. Once reached, it stays reached.
  One process: reached() is the signal flag of preemption.py. Several: JAX's preemption sync point
  (multihost_utils.reached_preemption_sync_point). jax.distributed.initialize installs JAX's own SIGTERM handler
  (its preemption notifier; TPU maintenance events arrive the same way where the platform sends them), which tells
  the coordination service; in the background every process then reports how many points it has passed, and the
  one after the furthest becomes the stop point, where reached() turns True in every process at the same call.
  Between notices a call reads a local counter: no device collective, no network, nothing drained from the
  dispatch queue. (Orbax calls the same sync point from CheckpointManager.should_save, with its own step numbers;
  checkpointing.save passes force=True, which skips that call.)
  """

  def __init__(self, flag):
    self._flag = flag
    self._several = jax.process_count() > 1
    self.stopped = False

  def reached(self):
    if not self.stopped:
      if self._several:
        self.stopped = multihost_utils.reached_preemption_sync_point(next(_STOP_POINTS))
      else:
        self.stopped = bool(self._flag.signalled)
    return self.stopped

  def check(self):
    """Raises StopReached at the stop point (for loops that cannot return a flag, such as the evaluator's)."""
    if self.reached():
      raise StopReached()
