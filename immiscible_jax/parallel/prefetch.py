"""Training batches copied to the devices ahead of the step that consumes them.

    batches = prefetch.DevicePrefetcher(data.create_train_iterator(...))
    p_state, metrics = p_step(p_state, next(batches))                     # already on the devices

Each `next` returns a batch that was put on the devices one call earlier, and reads and starts the copy of the
following one (`depth` batches ahead). JAX dispatches steps asynchronously and `jax.device_put` returns before
its copy ends, so the host read of batch k+1 runs while step k-1 still computes and its transfer overlaps step k.

Resuming is unaffected: the input stream is a pure function of the step (data.create_train_iterator starts at the
restored step), so batches prefetched but not consumed when a run saves or is preempted are simply dropped.
"""
import collections

from immiscible_jax.parallel import layouts


class DevicePrefetcher:
  """Iterator over device batches, `depth` batches ahead of the consumer."""

  def __init__(self, iterator, put=layouts.put_sharded, depth=1):
    if depth < 0:
      raise ValueError(f'depth must be >= 0, got {depth}')
    self._iterator, self._put, self._depth = iterator, put, depth
    self._buffer = collections.deque()

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._buffer) < self._depth + 1:
      self._buffer.append(self._put(next(self._iterator)))
    return self._buffer.popleft()
