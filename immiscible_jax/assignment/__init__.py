"""Immiscible noise assignment (Li et al., NeurIPS 2024; KNN variant: arXiv 2505.18521), inside jit / pmap.

Before noising, the batch's Gaussian noise rows are re-paired with its images so that the total
image-noise distance is (near-)minimal. Permutation methods ('hungarian', 'jv', 'auction', 'sinkhorn',
'scipy') only reorder the batch's own noise, so its multiset, hence its Gaussian distribution, is unchanged. 'knn' keeps
for each image the nearest of `knn_k` draws (the given noise and knn_k - 1 fresh ones): each output row is
a genuine draw, but selection favours short noise vectors, so it changes the noise marginal.

Costs are computed from inputs quantised to `assignment.dtype` with float32 accumulation. For
'sqeuclidean' the terms ||x||^2 and ||n||^2 cannot change the optimal permutation, so the cost is the
cross term -x.n alone (one matmul); rounding the full squared distance to bf16 would lose much of the
small achievable gain.

Non-finite inputs: if any image or noise value in the problem is NaN or inf, every method except 'none'
returns all-NaN noise (and NaN distances), so the trainer's NaN guard stops the run at that step; the
solvers run on a zeroed cost meanwhile, so they always terminate. 'none' returns its input unchanged.
"""
from typing import Optional

import flax
import jax
import jax.numpy as jnp

from immiscible_jax.assignment import solvers
from immiscible_jax.errors import ConfigError

METHODS = ('none', 'hungarian', 'jv', 'auction', 'sinkhorn', 'scipy', 'knn')
PERMUTATION_METHODS = ('hungarian', 'jv', 'auction', 'sinkhorn', 'scipy')
COSTS = ('l2', 'sqeuclidean')
DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}
SCOPES = ('local', 'global')


# The solvers that report whether they finished within their loop caps and how many loop iterations they ran.
REPORTING_METHODS = ('jv', 'auction', 'sinkhorn')


@flax.struct.dataclass
class AssignmentInfo:
  distance_before: jax.Array  # [] mean image-noise L2 distance with the given pairing
  distance_after: jax.Array  # [] mean image-noise L2 distance after assignment
  # REPORTING_METHODS only (None otherwise): 1.0 if the solver finished within its caps, else 0.0 (jv: every
  # Dijkstra search ended, i.e. exact; auction: bidding placed every row within auction_max_rounds; sinkhorn:
  # the marginals met sinkhorn_threshold within sinkhorn_max_iterations); and its loop iterations (float32).
  converged: Optional[jax.Array] = None  # []
  sequential_steps: Optional[jax.Array] = None  # []


def _check(ok, key, allowed, value):
  if not ok:
    raise ConfigError(f'assignment.{key} must be {allowed}, got {value!r}')


def _is_int(value):
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool)


# Each key of the config's assignment section and what it must be (configs/default.py gives their meaning).
_ONE_OF = (('method', METHODS), ('cost', COSTS), ('dtype', tuple(DTYPES)), ('scope', SCOPES))
_POSITIVE_INTS = ('knn_k', 'sinkhorn_max_iterations')
_COUNTS = ('sinkhorn_arr_sweeps', 'jv_warm_start_iterations', 'jv_arr_sweeps', 'auction_warm_start_iterations',
           'auction_max_rounds', 'auction_swap_rounds')
_POSITIVE_NUMBERS = ('sinkhorn_epsilon', 'sinkhorn_threshold', 'jv_warm_start_epsilon', 'auction_epsilon',
                     'auction_warm_start_epsilon')


def validate_config(assignment_config):
  """Raises ValueError naming the key and the allowed values for any bad or missing setting."""
  c = assignment_config
  missing = [k for k in [k for k, _ in _ONE_OF] + list(_POSITIVE_INTS + _COUNTS + _POSITIVE_NUMBERS)
             if k not in c]
  if missing:
    raise ConfigError(f'assignment config is missing keys {missing} (build it from configs/default.py)')
  for key, allowed in _ONE_OF:
    _check(c[key] in allowed, key, f'one of {list(allowed)}', c[key])
  for key in _POSITIVE_INTS:
    _check(_is_int(c[key]) and c[key] >= 1, key, 'a positive integer', c[key])
  for key in _COUNTS:
    _check(_is_int(c[key]) and c[key] >= 0, key, 'an integer >= 0', c[key])
  for key in _POSITIVE_NUMBERS:
    _check(_is_number(c[key]) and c[key] > 0, key, 'a positive number', c[key])


def problem_size_note(config, device_count):
  """A start-up line when a permutation method solves problems of one image each (local scope, one image per
  device): it can only keep the noise as drawn (reduction 0%). None otherwise."""
  method, scope = config.assignment.method, config.assignment.scope
  size = config.training.batch_size // (device_count if scope == 'local' else 1)
  if method not in PERMUTATION_METHODS or size > 1:
    return None
  fixes = ['assignment.scope=global (one problem over the whole batch)'] if config.training.batch_size > 1 else []
  fixes.append("assignment.method=knn (nearest of knn_k fresh draws per image)")
  return (f'note: assignment.method={method} with assignment.scope={scope} solves one image per assignment '
          f'problem (training.batch_size={config.training.batch_size} over {device_count} device(s)), so it leaves '
          f'the noise as drawn (reduction 0%); use {" or ".join(fixes)}')


def cost_matrix(images, noise, cost, dtype):
  """[B, B] float32 cost between flattened images (rows) and noise (columns), from dtype-quantised inputs."""
  x = images.reshape(images.shape[0], -1).astype(dtype)
  n = noise.reshape(noise.shape[0], -1).astype(dtype)
  cross = jnp.einsum('id,jd->ij', x, n, preferred_element_type=jnp.float32)
  if cost == 'sqeuclidean':
    return -cross
  x2 = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=1)
  n2 = jnp.sum(jnp.square(n.astype(jnp.float32)), axis=1)
  return jnp.sqrt(jnp.maximum(x2[:, None] + n2[None, :] - 2.0 * cross, 0.0))


def solve(cost, assignment_config):
  """(perm, stats): the permutation `perm` ([B] int32) minimising sum_i cost[i, perm[i]] with the configured
  method, and for REPORTING_METHODS the solver's {'converged', 'sequential_steps'} (None for the others)."""
  c, method = assignment_config, assignment_config.method
  if cost.shape[0] == 1:
    return jnp.zeros(1, jnp.int32), None
  if method == 'hungarian':
    return solvers.hungarian(cost), None
  if method == 'scipy':
    return solvers.scipy_lsa(cost), None
  if method == 'jv':
    perm, stats = solvers.jv(cost, c.jv_warm_start_epsilon, c.jv_warm_start_iterations, c.jv_arr_sweeps,
                             return_stats=True)
  elif method == 'auction':
    perm, stats = solvers.auction(cost, c.auction_epsilon, c.auction_warm_start_epsilon,
                                  c.auction_warm_start_iterations, c.auction_max_rounds, c.auction_swap_rounds,
                                  return_stats=True)
  elif method == 'sinkhorn':
    perm, stats = solvers.sinkhorn(cost, c.sinkhorn_epsilon, c.sinkhorn_max_iterations, c.sinkhorn_threshold,
                                   c.sinkhorn_arr_sweeps, return_stats=True)
  else:
    raise ValueError(f'assignment.method {method!r} is not a permutation method')
  return perm, {'converged': stats['converged'], 'sequential_steps': stats['sequential_steps']}


def _all_finite(*arrays):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))


def _mean_distance(images, noise):
  diff = (images - noise).reshape(images.shape[0], -1).astype(jnp.float32)
  return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(diff), axis=1)))


def knn_candidates(noise, key, k):
  """[k, B, ...] candidates: the given noise, then k - 1 fresh standard-normal draws from `key`."""
  extra = jax.random.normal(key, (k - 1,) + noise.shape, noise.dtype)
  return jnp.concatenate([noise[None], extra], axis=0)


def _knn(images, noise, key, k, dtype):
  """Each image keeps its nearest candidate in (quantised) squared L2; same choice as plain L2. So knn takes no
  `cost`: under 'l2' and 'sqeuclidean' (sqrt is monotone) the nearest candidate is the same, and assignment.cost
  cannot change the result."""
  cands = knn_candidates(noise, key, k)
  x = images.reshape(images.shape[0], -1).astype(dtype)
  n = cands.reshape(k, images.shape[0], -1).astype(dtype)
  # ||x||^2 is the same for all of an image's candidates; ||n||^2 is not, so it stays.
  cross = jnp.einsum('bd,kbd->kb', x, n, preferred_element_type=jnp.float32)
  dist = jnp.sum(jnp.square(n.astype(jnp.float32)), axis=2) - 2.0 * cross  # [k, B]
  dist = jnp.where(jnp.isfinite(dist), dist, 0.0)
  best = jnp.argmin(dist, axis=0)
  return jnp.take_along_axis(cands, best.reshape((1, -1) + (1,) * (noise.ndim - 1)), axis=0)[0]


def _permute(images, noise, assignment_config, axis_name):
  c = assignment_config
  dtype = DTYPES[c.dtype]
  gathered = c.scope == 'global' and axis_name is not None
  if gathered:
    # Images only feed the cost, so they travel quantised; noise travels as is, to be returned.
    all_images = jax.lax.all_gather(images.astype(dtype), axis_name, tiled=True)
    all_noise = jax.lax.all_gather(noise, axis_name, tiled=True)
  else:
    all_images, all_noise = images, noise
  finite = _all_finite(all_images, all_noise)
  cost = cost_matrix(all_images, all_noise, c.cost, dtype)
  perm, stats = solve(jnp.where(finite, cost, 0.0), c)
  if gathered:
    # Every device solved the same problem; device 0's answer is used by all, so the global
    # permutation stays one permutation even if devices ever rounded differently.
    perm = jax.lax.all_gather(perm, axis_name)[0]
    start = jax.lax.axis_index(axis_name) * noise.shape[0]
    perm = jax.lax.dynamic_slice_in_dim(perm, start, noise.shape[0])
  return jnp.where(finite, all_noise[perm], jnp.nan), stats


def assign_noise(images, noise, key, assignment_config, axis_name=None):
  """Returns (noise to use for each image [B, H, W, C], AssignmentInfo).

  images, noise: [B, H, W, C] float32 (this device's shard under pmap). For REPORTING_METHODS the info also says
  whether the solver finished within its caps and how many loop iterations it ran (scope 'global': the one
  solve every device repeats). key: PRNG key, used by 'knn' only
  (the device index is folded in when axis_name is given, so a replicated key still gives independent
  draws per device). axis_name: the pmap axis; scope='global' gathers over it (all hosts), solves the
  global problem on every device and keeps this device's slice; without it 'global' equals 'local'.
  """
  validate_config(assignment_config)
  if images.shape != noise.shape:
    raise ValueError(f'images and noise must have the same shape, got {images.shape} and {noise.shape}')
  c = assignment_config
  stats = None
  if c.method == 'none':
    out = noise
  elif c.method == 'knn':  # assignment.cost is not read: it cannot change the nearest candidate (see _knn)
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    out = _knn(images, noise, key, c.knn_k, DTYPES[c.dtype])
    out = jnp.where(_all_finite(images, noise), out, jnp.nan)
  else:
    out, stats = _permute(images, noise, c, axis_name)
  info = AssignmentInfo(distance_before=_mean_distance(images, noise),
                        distance_after=_mean_distance(images, out))
  if stats is not None:
    info = info.replace(converged=stats['converged'].astype(jnp.float32),
                        sequential_steps=jnp.asarray(stats['sequential_steps'], jnp.float32))
  return out, info
