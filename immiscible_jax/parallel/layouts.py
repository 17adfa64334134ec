"""Where a run's arrays live on the devices, in either `parallel.mode`, and how they come back to the host.

  'pmap'       jax.pmap over this process's devices: the state as stacked copies ([local devices, ...]), a host
               batch reshaped into per-device shards ([local devices, ..., B_dev, ...]).
  'shard_map'  jax.jit over a one-axis Mesh ('batch') of all devices, the same per-device step inside
               jax.shard_map: the state replicated by sharding (P(), one logical array), each process's batch one
               block of a global array built by jax.make_array_from_process_local_data.
Both give the per-device step the same view: the whole state, its [..., B_dev, ...] rows, axis 'batch' spanning
every device of every process in process order (process i holds the i-th block of devices), so the step's
collectives and its global example indices are the same in both. A layout's `host` reads one local copy back
without any device computation, so checkpoints hold host numpy state that either mode restores.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = 'batch'  # The device axis of every mapped function here (mesh axis name, and pmap's axis_name).
MODES = ('pmap', 'shard_map')


def pmap_sharding(devices=None):
  """The sharding pmap gives its inputs and outputs over `devices` (default: this process's): split along the
  leading axis, mesh axis 'batch'. Arrays put with it are neither copied again nor recompiled for by the step."""
  return NamedSharding(jax.sharding.Mesh(np.array(devices or jax.local_devices()), (AXIS,)), P(AXIS))


def replicate(tree, devices=None):
  """Copies a host pytree of arrays to every local device with the sharding pmap gives its outputs, so feeding
  the first step's outputs back does not compile the step a second time."""
  devices = devices or jax.local_devices()
  sharding, n = pmap_sharding(devices), len(devices)
  stack = lambda x: np.broadcast_to(np.asarray(x)[None], (n, *np.shape(x)))
  return jax.tree_util.tree_map(lambda x: jax.device_put(stack(x), sharding), tree)


def put_sharded(batch, devices=None):
  """Host batch {key: [B_host, ...]} -> [devices, B_host / devices, ...] on the devices (default: this
  process's), laid out as pmap reads its input."""
  devices = devices or jax.local_devices()
  return jax.device_put(shard_batch(batch, len(devices)), pmap_sharding(devices))


def shard_batch(batch, num_devices=None):
  """[B_host, ...] -> [local_devices, B_host // local_devices, ...]."""
  n = num_devices or jax.local_device_count()
  return jax.tree_util.tree_map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def first_replica(x):
  """This process's first shard of a pmapped array, left on its device: [1, ...] (no copy, no computation).

  `x[0]` would run a gather program whose collective spans the local devices: one launch per leaf, and with
  several processes on CPU it deadlocked against the other process's save barrier.
  """
  return x.addressable_data(0) if isinstance(x, jax.Array) else np.asarray(x)[:1]


def host_state(replicated_state):
  """The first replica of a pmap-replicated pytree, as host numpy arrays (what every process saves).

  A local read, no device computation: after the step's pmean every replica is equal, in every process.
  """
  return jax.tree_util.tree_map(lambda x: np.asarray(first_replica(x)).reshape(np.shape(x)[1:]), replicated_state)


class PmapLayout:
  """parallel.mode='pmap': stacked copies of the state, per-device shards of the batch."""

  def __init__(self, devices=None):
    # None: pmap's own default, every device of every process. An explicit list (one process, tests) must not be
    # the local devices of a multi-process run: pmap would then map, and pmean, over this process alone.
    self.devices = devices

  def compile(self, step_fn):
    """step_fn(state, batches, frozen) on one device's part -> the mapped function; the state is donated (frozen:
    a pytree put with put_state, e.g. a loss network's weights)."""
    return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,), devices=self.devices)

  def put_state(self, tree):
    return replicate(tree, self.devices)

  def put_batches(self, batches):
    """Host {name: [k, B_host, ...]} -> {name: [local devices, k, B_dev, ...]}."""
    n = len(self.devices) if self.devices else jax.local_device_count()
    rows_first = jax.tree_util.tree_map(lambda x: np.moveaxis(x, 1, 0), batches)       # [B_host, k, ...]
    shards = shard_batch(rows_first, n)                                                 # [devices, B_dev, k, ...]
    # Copied now, laid out as pmap reads its input (so the step neither waits for nor repeats the copy).
    sharding = pmap_sharding(self.devices)
    return jax.tree_util.tree_map(lambda x: jax.device_put(np.moveaxis(x, 1, 2), sharding), shards)

  first = staticmethod(first_replica)
  host = staticmethod(host_state)


class ShardMapLayout:
  """parallel.mode='shard_map': jit over a Mesh of all devices, the state replicated by sharding."""

  def __init__(self, devices=None):
    self.mesh = jax.sharding.Mesh(np.array(devices or jax.devices()), (AXIS,))

  def compile(self, step_fn):
    """step_fn(state, batches, frozen) on one device's part -> jit(shard_map(...)); the state is donated (frozen:
    a pytree put with put_state, replicated like the state).

    check_vma=False: the solvers' loops (optax's Hungarian, ott's Sinkhorn) do not type-check under the
    varying-manual-axes check; the step pmeans everything it returns, so P() outputs are replicated.
    """
    mapped = jax.shard_map(step_fn, mesh=self.mesh, in_specs=(P(), P(None, AXIS), P()), out_specs=(P(), P()),
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,))

  def put_state(self, tree):
    """The same host pytree in every process -> arrays replicated over the mesh."""
    sharding = NamedSharding(self.mesh, P())
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                                  tree)

  def put_batches(self, batches):
    """This process's {name: [k, B_host, ...]} -> global {name: [k, B_global, ...]}, rows in process order."""
    sharding = NamedSharding(self.mesh, P(None, AXIS))
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, x), batches)

  @staticmethod
  def first(x):
    """This process's first copy of a replicated array, left on its device (no computation)."""
    return x.addressable_data(0)

  @staticmethod
  def host(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def create_layout(mode, devices=None):
  """The layout of parallel.mode (validated by config_checks); devices: a subset, for tests (one process)."""
  return {'pmap': PmapLayout, 'shard_map': ShardMapLayout}[mode](devices)


@jax.jit
def _concatenate(firsts):
  return jax.tree_util.tree_map(lambda *xs: jnp.concatenate([x.reshape(-1) for x in xs]), *firsts)


def wait_until_ready(tree, longest_sleep_s=0.002):
  """Returns once every array of `tree` is computed, without blocking inside XLA: it polls and sleeps (10 us,
  doubling up to longest_sleep_s), so Python runs the signal handlers meanwhile and a second Ctrl-C is not held
  up by a step that takes minutes. The poll is late by at most longest_sleep_s."""
  for x in jax.tree_util.tree_leaves(tree):
    delay = 1e-5
    while isinstance(x, jax.Array) and not x.is_ready():
      time.sleep(delay)
      delay = min(2 * delay, longest_sleep_s)


def fetch_stacked(firsts):
  """[tree of on-device first copies ([1, k] or [k]), one per dispatch] -> one host tree of flat [steps] arrays:
  concatenated on the device, then copied to the host in one transfer (not one scalar at a time)."""
  return jax.device_get(_concatenate(list(firsts)))
