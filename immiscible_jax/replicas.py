"""The pmap layout of arrays: a host pytree copied to every local device, a host batch split into per-device
shards, and the first replica read back without any device computation.
"""
import jax
import jax.numpy as jnp
import numpy as np

AXIS = 'batch'  # The device axis of every pmapped function here (mesh axis name, and pmap's axis_name).


def replicate(tree, devices=None):
  """Copies a host pytree of arrays to every local device with the sharding pmap gives its outputs (mesh
  axis 'batch'), so feeding the first step's outputs back does not compile the step a second time."""
  devices = devices or jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  n = len(devices)
  stack = lambda x: np.broadcast_to(np.asarray(x)[None], (n, *np.shape(x)))
  return jax.tree_util.tree_map(lambda x: jax.device_put(stack(x), sharding), tree)


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


@jax.jit
def _concatenate(first_replicas):
  return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *first_replicas)


def fetch_stacked(first_replicas):
  """[tree of [1] first replicas, one per step] -> one host tree of [steps] arrays: stacked on the device,
  then copied to the host in one transfer (not one scalar at a time)."""
  return jax.device_get(_concatenate(list(first_replicas)))
