"""Linear assignment solvers on a square cost matrix, written for jit: each returns `perm` with
`perm[i]` = the column assigned to row i, a permutation of range(B). Costs must be finite (assignment/__init__.py
zeroes a non-finite problem and returns NaN noise instead).

Every while loop here has an iteration cap (the theory's bound where there is one), and whatever a cap
cuts short is completed to a permutation, so the output is always one; `return_stats=True` says whether a
cap was hit ('converged') and how many loop iterations ran ('sequential_steps': the solver's depth, what an
accelerator pays per iteration; assignment/loop_steps.py measures the same from outside).

The exact solver here, `jv`, is Jonker & Volgenant's shortest-augmenting-path method (Computing 38, 1987)
warm-started from the column potentials of a few kernel-domain Sinkhorn iterations. Its state keeps column
duals `v` and, implicitly, row duals u_i = C[i, perm[i]] - v[perm[i]] for assigned rows; every step keeps
C - u - v >= 0 with equality on assigned pairs, so when all rows are assigned the permutation is optimal.
On XLA:CPU each while-loop iteration costs microseconds, so the aim is to reach a near-complete matching
with few iterations (Sinkhorn potentials + augmenting row reduction), then finish with few Dijkstra steps.

`auction` is the low-depth method for accelerators: a Jacobi auction (Bertsekas; every free row bids at
once) from Sinkhorn prices, cut at a fixed number of rounds, then a parallel fill and parallel pairwise
swaps. Its depth does not grow with B; it is near-optimal, not exact.
"""
import warnings

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

with warnings.catch_warnings():
  # ott imports jaxopt, which warns that it is no longer maintained.
  warnings.filterwarnings('ignore', message='.*JAXopt is no longer maintained.*')
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn as ott_sinkhorn
  from ott.tools import unreg


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


def complete_to_permutation(col4row):
  """Loop-free repair after a capped loop: each column keeps its first claimant; the rows left without a
  column take the unclaimed columns in index order. Leaves a permutation unchanged."""
  n = col4row.shape[0]
  rows = jnp.arange(n, dtype=jnp.int32)
  claimed = col4row >= 0
  owner = jnp.full(n, n, jnp.int32).at[jnp.where(claimed, col4row, n)].min(rows, mode='drop')
  keep = claimed & (owner[jnp.maximum(col4row, 0)] == rows)
  free_rows = jnp.nonzero(~keep, size=n, fill_value=n)[0]
  free_cols = jnp.nonzero(owner == n, size=n, fill_value=n)[0]
  return jnp.where(keep, col4row, -1).at[free_rows].set(free_cols.astype(jnp.int32), mode='drop')


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


def _augment_one(cost, v, row4col, col4row, f, max_steps):
  """Dijkstra from free row f over reduced costs to the nearest free column, then flip the path.

  Every step scans a new column, so a free column is reached within B steps; `max_steps` (B by default)
  caps the search anyway. A search cut short changes nothing and leaves f free (found = False).
  Returns (v, row4col, col4row, Dijkstra steps, path flips, found).
  """
  n = cost.shape[0]
  d = cost[f] - v
  free_col = row4col < 0

  def cond(s):
    return (s[-1] < 0) & (s[-2] < max_steps)

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
  found = sink >= 0
  v = jnp.where(scanned & found, v + d - d[jnp.maximum(sink, 0)], v)

  def flip(s):
    row4col, col4row, j, _, k = s
    i = pred[j]
    nxt = col4row[i]
    return row4col.at[j].set(i), col4row.at[i].set(j), nxt, i == f, k + 1

  # The path back to f runs through scanned columns only, so it has at most `steps` of them.
  row4col, col4row, _, _, flips = lax.while_loop(
      lambda s: ~s[3] & (s[4] < steps), flip, (row4col, col4row, sink, ~found, jnp.int32(0)))
  return v, row4col, col4row, steps, flips, found


def _greedy_fill(cost, v, row4col, col4row, stack, count):
  """Gives each row left on the stack its cheapest still-free column (reduced costs), one row per step.
  Returns (col4row, steps)."""
  n = cost.shape[0]

  def body(s):
    row4col, col4row, count, k = s
    i = stack[count - 1]
    _, j = min_and_argmin(jnp.where(row4col < 0, cost[i] - v, jnp.inf))
    return row4col.at[j].set(i), col4row.at[i].set(j), count - 1, k + 1

  _, col4row, _, steps = lax.while_loop(lambda s: (s[2] > 0) & (s[3] < n), body,
                                        (row4col, col4row, count, jnp.int32(0)))
  return complete_to_permutation(col4row), steps


def _prepare(cost):
  cost = cost.astype(jnp.float32)
  return cost - jnp.min(cost, axis=1, keepdims=True)  # smaller magnitudes, same optimum


def _warm_start(cost, epsilon, iterations):
  """Column potentials v: Sinkhorn's (epsilon relative to the cost's std), or column minima if iterations=0."""
  if iterations > 0:
    v = sinkhorn_column_potentials(cost, epsilon * jnp.maximum(jnp.std(cost), 1e-6), iterations)
  else:
    v = jnp.min(cost, axis=0)
  return jnp.where(jnp.isfinite(v), v, 0.0)


def jv(cost, warm_start_epsilon=0.03, warm_start_iterations=40, arr_sweeps=1, return_stats=False,
       max_dijkstra_steps=None):
  """Exact assignment: Sinkhorn-potential warm start, augmenting row reduction, then Dijkstra augmentation.

  `warm_start_epsilon` is relative to the cost's standard deviation; `warm_start_iterations=0` starts
  from column reduction (v = column minima) instead. `arr_sweeps` caps the reduction at arr_sweeps * B
  bids. Exact for any settings: they change only the speed. `max_dijkstra_steps` (default B, which never
  binds) caps each shortest-path search; a row whose search is cut short is placed by
  complete_to_permutation and the result is no longer exact (stats: converged = False).
  """
  n = cost.shape[0]
  max_dijkstra_steps = n if max_dijkstra_steps is None else max_dijkstra_steps
  cost = _prepare(cost)
  v = _warm_start(cost, warm_start_epsilon, warm_start_iterations)
  row4col, col4row = _initial_matching(cost, v)
  free_initial = jnp.sum(col4row < 0)
  v, row4col, col4row, stack, count, arr_steps = augmenting_row_reduction(
      cost, v, row4col, col4row, arr_sweeps * n)

  def body(s):
    v, row4col, col4row, left, steps, flips, failed = s
    v, row4col, col4row, st, fl, found = _augment_one(cost, v, row4col, col4row, stack[left - 1],
                                                      max_dijkstra_steps)
    return v, row4col, col4row, left - 1, steps + st, flips + fl, failed + (~found).astype(jnp.int32)

  # One augmentation per row left on the stack: at most B iterations.
  zero = jnp.int32(0)
  v, row4col, col4row, _, dijkstra_steps, flips, failed = lax.while_loop(
      lambda s: s[3] > 0, body, (v, row4col, col4row, count, zero, zero, zero))
  col4row = complete_to_permutation(col4row)
  if return_stats:
    steps = warm_start_iterations + arr_steps + count + dijkstra_steps + flips
    return col4row, dict(free_initial=free_initial, arr_steps=arr_steps, free_after_arr=count,
                         dijkstra_steps=dijkstra_steps, flips=flips, converged=failed == 0,
                         sequential_steps=steps)
  return col4row


def _bidders(col4row, block):
  """Up to `block` unassigned rows (the lowest indices) and which slots hold one (the rest hold B)."""
  n = col4row.shape[0]
  rows = jnp.nonzero(col4row < 0, size=block, fill_value=n)[0].astype(jnp.int32)
  return rows, rows < n


def _award(n, rows, valid, cols, offers):
  """Each column in `cols` goes to its lowest offer (lowest row index on a tie): (best offer per column,
  winning row per column or B)."""
  target = jnp.where(valid, cols, n)
  best = jnp.full(n, jnp.inf).at[target].min(offers, mode='drop')
  wins = valid & (offers == best[cols])
  winner = jnp.full(n, n, jnp.int32).at[jnp.where(wins, cols, n)].min(rows, mode='drop')
  return best, winner


def _bid_round(cost, v, row4col, col4row, eps, block):
  """One Jacobi auction round: every bidding row offers for its best column under the potentials v (reduced
  cost C - v; a lower v[j] is a higher price), lowering v[j] by its margin over its second-best column plus
  eps; each column takes the best offer and its previous owner becomes free. The winner ends within eps of
  its best column and prices only rise, so if bidding places every row, the total cost is within B * eps of
  the optimum (Bertsekas' eps-complementary slackness)."""
  n = cost.shape[0]
  rows, valid = _bidders(col4row, block)
  w = cost[jnp.minimum(rows, n - 1)] - v[None, :]  # [block, B]
  w1, j1 = min_and_argmin(w, axis=1)
  w2 = jnp.min(jnp.where(jnp.arange(n)[None, :] == j1[:, None], jnp.inf, w), axis=1)
  best, winner = _award(n, rows, valid, j1, v[j1] - (w2 - w1) - eps)
  won = winner < n
  displaced = jnp.where(won, row4col, -1)
  col4row = col4row.at[jnp.where(displaced >= 0, displaced, n)].set(-1, mode='drop')
  col4row = col4row.at[jnp.where(won, winner, n)].set(jnp.arange(n, dtype=jnp.int32), mode='drop')
  return jnp.where(won, best, v), jnp.where(won, winner, row4col), col4row


def _fill_round(cost, v, row4col, col4row, block):
  """Every free row proposes to its cheapest free column (reduced cost); each column accepts its cheapest
  proposer. Nobody is displaced, and at least one row is placed per round."""
  n = cost.shape[0]
  rows, valid = _bidders(col4row, block)
  w = jnp.where(row4col[None, :] < 0, cost[jnp.minimum(rows, n - 1)] - v[None, :], jnp.inf)
  w1, j1 = min_and_argmin(w, axis=1)
  _, winner = _award(n, rows, valid, j1, w1)
  won = winner < n
  col4row = col4row.at[jnp.where(won, winner, n)].set(jnp.arange(n, dtype=jnp.int32), mode='drop')
  return jnp.where(won, winner, row4col), col4row


def _swap_round(cost, col4row):
  """Parallel pairwise exchange: rows i and k swap columns when each is the other's best partner and the
  swap lowers the total cost. Mutual best partners form disjoint pairs, so the result is a permutation."""
  n = cost.shape[0]
  m = cost[:, col4row]  # m[i, k] = cost of row i on row k's column
  d = jnp.diagonal(m)
  delta = (m + m.T) - (d[:, None] + d[None, :])  # exactly symmetric
  gain, k = min_and_argmin(delta, axis=1)
  mutual = (gain < 0) & (k[k] == jnp.arange(n))
  return jnp.where(mutual, col4row[k], col4row), jnp.any(mutual)


def auction(cost, epsilon=0.01, warm_start_epsilon=0.1, warm_start_iterations=10, max_rounds=80,
            swap_rounds=4, fill_rounds=16, return_stats=False):
  """Near-optimal assignment in a bounded number of dependent steps (for GPUs and TPUs).

  1. Prices from `warm_start_iterations` kernel-domain Sinkhorn iterations (`warm_start_epsilon` relative
     to the cost's std), as in `jv`.
  2. At most `max_rounds` Jacobi auction rounds with increment `epsilon` (relative to the cost's std): all
     free rows bid at once. (A round reads at most max(B // 4, 64) free rows, or max(B // 32, 64) once that
     few are left, the lowest indices first: this saves work on CPU and does not change the depth much.)
  3. Rows still free after that take free columns in at most `fill_rounds` parallel rounds (the rest, if
     any, in index order), so the result is always a permutation.
  4. At most `swap_rounds` rounds of parallel pairwise swaps, each lowering the total cost.
  Depth: at most warm_start_iterations + max_rounds + fill_rounds + swap_rounds loop iterations, whatever B.
  """
  n = cost.shape[0]
  big, small = min(n, max(n // 4, 64)), min(n, max(n // 32, 64))
  cost = _prepare(cost)
  v = _warm_start(cost, warm_start_epsilon, warm_start_iterations)
  eps = epsilon * jnp.maximum(jnp.std(cost), 1e-6)
  none = jnp.full(n, -1, jnp.int32)

  def bid(s):
    v, row4col, col4row, rounds = s
    state = lax.cond(jnp.sum(col4row < 0) > small,
                     lambda *a: _bid_round(*a, big), lambda *a: _bid_round(*a, small),
                     cost, v, row4col, col4row, eps)
    return (*state, rounds + 1)

  v, row4col, col4row, rounds = lax.while_loop(
      lambda s: jnp.any(s[2] < 0) & (s[3] < max_rounds), bid, (v, none, none, jnp.int32(0)))
  free_after_auction = jnp.sum(col4row < 0)

  def fill(s):
    return (*_fill_round(cost, v, s[0], s[1], small), s[2] + 1)

  _, col4row, fills = lax.while_loop(
      lambda s: jnp.any(s[1] < 0) & (s[2] < fill_rounds), fill, (row4col, col4row, jnp.int32(0)))
  col4row = complete_to_permutation(col4row)

  def swap(s):
    return (*_swap_round(cost, s[0]), s[2] + 1)

  col4row, _, swaps = lax.while_loop(
      lambda s: s[1] & (s[2] < swap_rounds), swap, (col4row, jnp.bool_(True), jnp.int32(0)))
  if return_stats:
    return col4row, dict(rounds=rounds, free_after_auction=free_after_auction, fill_rounds=fills,
                         swap_rounds=swaps, converged=free_after_auction == 0,
                         sequential_steps=warm_start_iterations + rounds + fills + swaps)
  return col4row


def sinkhorn(cost, epsilon, max_iterations, threshold, arr_sweeps=1, return_stats=False):
  """ott-jax Sinkhorn (epsilon relative to the cost's std), rounded to a permutation.

  Rounding: each row takes its cheapest column under the column potential g (reduced cost C - g); rows
  that collide bid for columns through `arr_sweeps` * B steps of augmenting row reduction, and the few rows
  still free then take their cheapest free column. Every column is used exactly once.
  """
  n = cost.shape[0]
  cost = _prepare(cost)
  geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon, relative_epsilon='std')
  solver = ott_sinkhorn.Sinkhorn(max_iterations=max_iterations, threshold=threshold)
  out = solver(linear_problem.LinearProblem(geom))
  v = jnp.where(jnp.isfinite(out.g), out.g, 0.0)
  row4col, col4row = _initial_matching(cost, v)
  v, row4col, col4row, stack, count, arr_steps = augmenting_row_reduction(
      cost, v, row4col, col4row, arr_sweeps * n)
  col4row, fill_steps = _greedy_fill(cost, v, row4col, col4row, stack, count)
  if return_stats:
    # ott runs blocks of `inner_iterations` Sinkhorn iterations inside an outer loop: both loops count.
    ott_steps = out.n_iters + out.n_iters // solver.inner_iterations
    return col4row, dict(sinkhorn_iterations=out.n_iters, arr_steps=arr_steps, fill_steps=fill_steps,
                         converged=out.converged, sequential_steps=ott_steps + arr_steps + fill_steps)
  return col4row


def hungarian(cost):
  """ott-jax's Hungarian, `ott.tools.unreg.hungarian` (which runs optax's hungarian_algorithm: a scan over
  rows, each with a shortest-path loop; about B^2 dependent iterations in all). On a square matrix its
  paired indices are (i, j) with j = arange(B) and i[k] the row matched to column k."""
  _, out = unreg.hungarian(geometry.Geometry(cost_matrix=cost.astype(jnp.float32)))
  i, j = out.paired_indices
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
