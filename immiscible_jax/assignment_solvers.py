"""Linear assignment solvers on a square cost matrix, written for jit: each returns `perm` with
`perm[i]` = the column assigned to row i, a permutation of range(B). Costs must be finite (assignment.py
zeroes a non-finite problem and returns NaN noise instead).

The exact solver here, `jv`, is Jonker & Volgenant's shortest-augmenting-path method (Computing 38, 1987)
warm-started from the column potentials of a few log-domain Sinkhorn iterations. Its state keeps column
duals `v` and, implicitly, row duals u_i = C[i, perm[i]] - v[perm[i]] for assigned rows; every step keeps
C - u - v >= 0 with equality on assigned pairs, so when all rows are assigned the permutation is optimal.
On XLA:CPU each while-loop iteration costs microseconds, so the aim is to reach a near-complete matching
with few iterations (Sinkhorn potentials + augmenting row reduction), then finish with few Dijkstra steps.
"""
import warnings

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

with warnings.catch_warnings():
  # ott imports jaxopt, which warns that it is no longer maintained.
  warnings.filterwarnings('ignore', message='.*JAXopt is no longer maintained.*')
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn as ott_sinkhorn


def sinkhorn_column_potentials(cost, epsilon, num_iterations):
  """Column potentials g of entropic OT (uniform marginals) after a fixed number of Sinkhorn iterations.

  `epsilon` is absolute. Only a warm start, so convergence is not checked. Kernel (not log) domain: one
  exp pass, then two matrix-vector products per iteration, several times cheaper than two logsumexps on
  CPU. The kernel is built from the cost shifted to a zero minimum in every column; entries that
  underflow only drop pairs that are far from optimal anyway.
  """
  shift = jnp.min(cost, axis=0)
  kernel = jnp.exp(-(cost - shift[None, :]) / epsilon)
  tiny = jnp.finfo(jnp.float32).tiny

  def body(_, b):
    a = 1.0 / jnp.maximum(kernel @ b, tiny)
    return 1.0 / jnp.maximum(a @ kernel, tiny)

  b = lax.fori_loop(0, num_iterations, body, jnp.ones(cost.shape[1], jnp.float32))
  g = epsilon * jnp.log(b) + shift
  return jnp.where(jnp.isfinite(g), g, shift)


def min_and_argmin(w, axis=-1):
  """(min, first index of the min) along `axis`. XLA:CPU's argmin (a variadic reduce) is several times
  slower than two plain min-reductions, which matters inside the solvers' while loops."""
  m = jnp.min(w, axis=axis, keepdims=True)
  iota = lax.broadcasted_iota(jnp.int32, w.shape, w.ndim - 1 if axis == -1 else axis)
  j = jnp.min(jnp.where(w == m, iota, w.shape[axis]), axis=axis)
  return jnp.squeeze(m, axis), j


def _initial_matching(cost, v):
  """Each row takes its cheapest column under duals v; on collisions the lowest row index keeps it."""
  n = cost.shape[0]
  rows = jnp.arange(n, dtype=jnp.int32)
  _, best = min_and_argmin(cost - v[None, :], axis=1)
  row4col = jnp.full(n, n, jnp.int32).at[best].min(rows)
  row4col = jnp.where(row4col == n, -1, row4col)
  col4row = jnp.where(row4col[best] == rows, best, -1)
  return row4col, col4row


def _free_rows(col4row):
  """Stack of unassigned rows (first `count` entries) and its count."""
  free = col4row < 0
  order = jnp.argsort(~free, stable=True).astype(jnp.int32)  # free rows first
  return order, jnp.sum(free).astype(jnp.int32)


def _two_smallest(w):
  """(j1, u1, j2, u2): a cheapest column and its value, then the second-cheapest value and, on a tie
  (u2 == u1), another column at that value (j2 is unspecified otherwise). The three reductions after
  the min read the same inputs, so XLA can do them in one pass."""
  n = w.shape[0]
  iota = jnp.arange(n, dtype=jnp.int32)
  u1 = jnp.min(w)
  at_min = w == u1
  j1 = jnp.min(jnp.where(at_min, iota, n))
  j2 = jnp.max(jnp.where(at_min, iota, -1))
  above = jnp.min(jnp.where(at_min, jnp.inf, w))
  return j1, u1, j2, jnp.where(j2 != j1, u1, above)


def augmenting_row_reduction(cost, v, row4col, col4row, max_steps):
  """JV's augmenting row reduction: an auction with zero increment that keeps exact dual feasibility.

  A free row bids for its cheapest column j1 and lowers v[j1] by (second - first) cost, so the new pair is
  tight and no other reduced cost becomes negative; the displaced row bids next. Ties move to the
  second-best column without a price change, which can cycle, hence `max_steps`.
  Returns (v, row4col, col4row, free stack, free count, steps used).
  """
  stack, count = _free_rows(col4row)

  def cond(s):
    _, _, _, _, count, cur, step = s
    return ((cur >= 0) | (count > 0)) & (step < max_steps)

  def body(s):
    v, row4col, col4row, stack, count, cur, step = s
    pop = cur < 0
    count = jnp.where(pop, count - 1, count)
    i = jnp.where(pop, stack[jnp.maximum(count, 0)], cur)
    j1, u1, j2, u2 = _two_smallest(cost[i] - v)
    strict = u1 < u2
    k1 = row4col[j1]
    j = jnp.where(strict | (k1 < 0), j1, j2)
    k = row4col[j]
    v = v.at[j1].add(jnp.where(strict, u1 - u2, 0.0))
    row4col = row4col.at[j].set(i)
    col4row = col4row.at[i].set(j)
    displaced = k >= 0
    col4row = col4row.at[jnp.where(displaced, k, i)].set(jnp.where(displaced, -1, j))
    # A strictly outbid row goes next (JV); after a tie it waits on the stack.
    cur = jnp.where(displaced & strict, k, -1)
    push = displaced & ~strict
    stack = stack.at[jnp.where(push, count, stack.shape[0])].set(k, mode='drop')
    count = jnp.where(push, count + 1, count)
    return v, row4col, col4row, stack, count, cur, step + 1

  init = (v, row4col, col4row, stack, count, jnp.int32(-1), jnp.int32(0))
  v, row4col, col4row, stack, count, cur, step = lax.while_loop(cond, body, init)
  stack = stack.at[jnp.where(cur >= 0, count, stack.shape[0])].set(cur, mode='drop')
  count = jnp.where(cur >= 0, count + 1, count)
  return v, row4col, col4row, stack, count, step


def _augment_one(cost, v, row4col, col4row, f):
  """Dijkstra from free row f over reduced costs to the nearest free column, then flip the path."""
  n = cost.shape[0]
  d = cost[f] - v
  free_col = row4col < 0

  def cond(s):
    return s[-1] < 0

  def body(s):
    d, pred, scanned, steps, _ = s
    dm = jnp.where(scanned, jnp.inf, d)
    mu = jnp.min(dm)
    # Among equally near columns a free one ends the search at once. Every step scans a new column
    # (even if a NaN slipped in), so the loop ends within B steps.
    rank = jnp.where(dm == mu, jnp.where(free_col, 0, n), 2 * n)
    j = jnp.min(jnp.where(scanned, 3 * n, rank) + jnp.arange(n, dtype=jnp.int32)) % n
    scanned = scanned.at[j].set(True)
    i = jnp.maximum(row4col[j], 0)
    h = mu + (cost[i] - v) - (cost[i, j] - v[j])
    better = ~scanned & (h < d) & ~free_col[j]
    pred = jnp.where(better, i, pred)
    d = jnp.where(better, h, d)
    sink = jnp.where(free_col[j], j, -1)
    return d, pred, scanned, steps + 1, sink

  init = (d, jnp.full(n, f, jnp.int32), jnp.zeros(n, bool), jnp.int32(0), jnp.int32(-1))
  d, pred, scanned, steps, sink = lax.while_loop(cond, body, init)
  v = jnp.where(scanned, v + d - d[sink], v)

  def flip(s):
    row4col, col4row, j, _ = s
    i = pred[j]
    nxt = col4row[i]
    return row4col.at[j].set(i), col4row.at[i].set(j), nxt, i == f

  row4col, col4row, _, _ = lax.while_loop(lambda s: ~s[-1], flip, (row4col, col4row, sink, False))
  return v, row4col, col4row, steps


def _greedy_fill(cost, v, row4col, col4row, stack, count):
  """Gives each row left on the stack its cheapest still-free column (reduced costs): a permutation."""

  def body(s):
    row4col, col4row, count = s
    i = stack[count - 1]
    _, j = min_and_argmin(jnp.where(row4col < 0, cost[i] - v, jnp.inf))
    return row4col.at[j].set(i), col4row.at[i].set(j), count - 1

  _, col4row, _ = lax.while_loop(lambda s: s[2] > 0, body, (row4col, col4row, count))
  return col4row


def _prepare(cost):
  cost = cost.astype(jnp.float32)
  return cost - jnp.min(cost, axis=1, keepdims=True)  # smaller magnitudes, same optimum


def jv(cost, warm_start_epsilon=0.03, warm_start_iterations=40, arr_sweeps=1, return_stats=False):
  """Exact assignment: Sinkhorn-potential warm start, augmenting row reduction, then Dijkstra augmentation.

  `warm_start_epsilon` is relative to the cost's standard deviation; `warm_start_iterations=0` starts
  from column reduction (v = column minima) instead. `arr_sweeps` caps the reduction at arr_sweeps * B
  bids. Exact for any settings: they change only the speed.
  """
  n = cost.shape[0]
  cost = _prepare(cost)
  if warm_start_iterations > 0:
    eps = warm_start_epsilon * jnp.maximum(jnp.std(cost), 1e-6)
    v = sinkhorn_column_potentials(cost, eps, warm_start_iterations)
  else:
    v = jnp.min(cost, axis=0)
  v = jnp.where(jnp.isfinite(v), v, 0.0)
  row4col, col4row = _initial_matching(cost, v)
  free_initial = jnp.sum(col4row < 0)
  v, row4col, col4row, stack, count, arr_steps = augmenting_row_reduction(
      cost, v, row4col, col4row, arr_sweeps * n)

  def body(s):
    v, row4col, col4row, count, steps = s
    v, row4col, col4row, st = _augment_one(cost, v, row4col, col4row, stack[count - 1])
    return v, row4col, col4row, count - 1, steps + st

  v, row4col, col4row, _, dijkstra_steps = lax.while_loop(
      lambda s: s[3] > 0, body, (v, row4col, col4row, count, jnp.int32(0)))
  if return_stats:
    return col4row, dict(free_initial=free_initial, arr_steps=arr_steps, free_after_arr=count,
                         dijkstra_steps=dijkstra_steps)
  return col4row


def sinkhorn(cost, epsilon, max_iterations, threshold, arr_sweeps=1):
  """ott-jax Sinkhorn (epsilon relative to the cost's std), rounded to a permutation.

  Rounding: each row takes its cheapest column under the column potential g (reduced cost C - g); rows
  that collide bid for columns through `arr_sweeps` * B steps of augmenting row reduction, and the few rows
  still free then take their cheapest free column. Every column is used exactly once.
  """
  n = cost.shape[0]
  cost = _prepare(cost)
  geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon, relative_epsilon='std')
  solver = ott_sinkhorn.Sinkhorn(max_iterations=max_iterations, threshold=threshold)
  g = solver(linear_problem.LinearProblem(geom)).g
  v = jnp.where(jnp.isfinite(g), g, 0.0)
  row4col, col4row = _initial_matching(cost, v)
  v, row4col, col4row, stack, count, _ = augmenting_row_reduction(
      cost, v, row4col, col4row, arr_sweeps * n)
  return _greedy_fill(cost, v, row4col, col4row, stack, count)


def hungarian(cost):
  """optax's Hungarian (the one ott.tools.unreg.hungarian calls). On a square matrix it returns (i, j)
  with j = arange(B) and i[k] the row matched to column k."""
  i, j = optax.assignment.hungarian_algorithm(cost.astype(jnp.float32))
  return jnp.zeros(cost.shape[0], jnp.int32).at[i].set(j.astype(jnp.int32))


def _scipy_host(cost):
  rows, cols = scipy.optimize.linear_sum_assignment(np.asarray(cost, np.float64))
  perm = np.empty(cost.shape[0], np.int32)
  perm[rows] = cols
  return perm


def scipy_lsa(cost):
  """scipy.optimize.linear_sum_assignment on the host through jax.pure_callback (the paper's solver)."""
  out = jax.ShapeDtypeStruct((cost.shape[0],), jnp.int32)
  return jax.pure_callback(_scipy_host, out, cost.astype(jnp.float32), vmap_method='sequential')
