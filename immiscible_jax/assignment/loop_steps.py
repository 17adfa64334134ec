"""Counts the loop iterations a JAX function executes: its sequential depth, measured on any backend.

On XLA:GPU a `while` loop (which `fori_loop` and `scan` also become) decides every iteration on the host, a few
microseconds each whatever the work, so the number of dependent iterations bounds a solver's speed there. This
re-traces a function with a counter carried through every `while` loop and `scan` in its program, nested ones
included, so the count covers code we do not own (optax's Hungarian, ott's Sinkhorn) exactly as our own.

  steps_fn = loop_steps.counting(fn)      # steps_fn(*args) -> (fn(*args), int32 total iterations)
  out, steps = jax.jit(steps_fn)(x)

Every iteration of every loop counts one (an iteration of an outer loop that runs an inner loop of 5 counts
1 + 5). Code outside loops counts nothing. A primitive whose sub-program holds loops we do not know how to
count (e.g. a loop inside shard_map) raises instead of undercounting.
"""
import jax
from jax import lax
from jax.extend import core
import jax.numpy as jnp

# Primitives that just call their sub-program once (jit, custom derivatives, remat): evaluated inline.
_CALLS = ('jit', 'pjit', 'closed_call', 'core_call', 'custom_jvp_call', 'custom_vjp_call', 'remat', 'checkpoint')


def counting(fn):
  """fn(*args) -> (fn(*args), total loop iterations executed as an int32 scalar)."""

  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs, steps = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs), steps

  return wrapped


def _parts(jaxpr):
  """(open jaxpr, consts) of a ClosedJaxpr or a Jaxpr."""
  if isinstance(jaxpr, core.ClosedJaxpr):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, ()


def _has_loops(jaxpr):
  jaxpr = _parts(jaxpr)[0]
  return any(e.primitive.name in ('while', 'scan') or any(_has_loops(j) for j in core.jaxprs_in_params(e.params))
             for e in jaxpr.eqns)


def _eval(jaxpr, consts, args):
  env = {}
  read = lambda v: v.val if isinstance(v, core.Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  steps = jnp.int32(0)
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name == 'while':
      outs, s = _while(eqn.params, invals)
    elif name == 'scan':
      outs, s = _scan(eqn.params, invals)
    elif name == 'cond':
      outs, s = _cond(eqn.params, invals)
    elif name in _CALLS:
      sub = eqn.params.get('jaxpr', eqn.params.get('call_jaxpr'))
      outs, s = _eval(*_parts(sub), invals)
    elif any(_has_loops(j) for j in core.jaxprs_in_params(eqn.params)):
      raise NotImplementedError(f'loop_steps cannot count the loops inside primitive {name!r}')
    else:
      outs, s = eqn.primitive.bind(*invals, **eqn.params), 0
      outs = outs if eqn.primitive.multiple_results else [outs]
    steps = steps + s
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars], steps


def _while(params, invals):
  cn, bn = params['cond_nconsts'], params['body_nconsts']
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  cond_fun = core.jaxpr_as_fun(params['cond_jaxpr'])

  def body(carry):
    outs, inner = _eval(*_parts(params['body_jaxpr']), [*bconsts, *carry[1:]])
    return [carry[0] + 1 + inner, *outs]

  steps, *outs = lax.while_loop(lambda c: cond_fun(*cconsts, *c[1:])[0], body, [jnp.int32(0), *init])
  return outs, steps


def _scan(params, invals):
  nc, ncarry = params['num_consts'], params['num_carry']
  consts, init, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]

  def body(carry, x):
    outs, inner = _eval(*_parts(params['jaxpr']), [*consts, *carry[1:], *x])
    return [carry[0] + 1 + inner, *outs[:ncarry]], outs[ncarry:]

  (steps, *carry), ys = lax.scan(body, [jnp.int32(0), *init], xs, length=params['length'],
                                 reverse=params['reverse'])
  return [*carry, *ys], steps


def _cond(params, invals):
  index, ops = invals[0], invals[1:]
  branches = [lambda *o, b=b: tuple(_eval(*_parts(b), list(o))) for b in params['branches']]
  outs, steps = lax.switch(index, branches, *ops)
  return list(outs), steps
