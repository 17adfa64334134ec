"""The train state of a run and its factories: optimizer, learning-rate schedule, initial state, the run's keys.

Used by the trainer (train.py) and by everything that restores a checkpoint (evaluation/runs.py): a restore needs the
state's abstract shape, which `jax.eval_shape(initializer(config, model, optimizer), key)` gives without
computing anything.
"""
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from immiscible_jax import data


@flax.struct.dataclass
class TrainState:
  """What a run carries from step to step (all of it is checkpointed)."""
  step: jax.Array       # [] int32, optimisation steps taken
  params: Any           # online parameters theta
  target_params: Any    # CT: EMA target theta^- ; iCT: {} (its target is stop_gradient(theta))
  ema_params: Any       # EMA of theta with decay training.ema_rate, used for sampling and evaluation
  opt_state: Any


def learning_rate_schedule(optim_cfg):
  """Linear warm-up from 0 over optim.warmup_steps, then constant optim.learning_rate."""
  if optim_cfg.warmup_steps > 0:
    return optax.linear_schedule(0.0, optim_cfg.learning_rate, optim_cfg.warmup_steps)
  return optax.constant_schedule(optim_cfg.learning_rate)


def create_optimizer(optim_cfg):
  """optim.optimizer ('adam' / 'radam') on the schedule, after global-norm clipping when optim.grad_clip > 0."""
  make = {'adam': optax.adam, 'radam': optax.radam}[optim_cfg.optimizer]
  opt = make(learning_rate_schedule(optim_cfg), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
  if optim_cfg.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), opt)
  return opt


def create_train_state(key, model, image_shape, optimizer, recipe):
  """The state at step 0: parameters from `key`; the CT target and the EMA start as copies of them."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  params = model.init(key, x, jnp.zeros((1,), jnp.float32), train=False)['params']
  return TrainState(step=jnp.int32(0), params=params,
                    target_params=params if recipe == 'ct' else {},
                    ema_params=params, opt_state=optimizer.init(params))


def initializer(config, model, optimizer):
  """key -> the run's state at step 0 (jit it to initialise; jax.eval_shape it for a restore target)."""
  return functools.partial(create_train_state, model=model, image_shape=data.image_shape(config.data),
                           optimizer=optimizer, recipe=config.training.recipe)


def run_keys(seed):
  """(parameter-init key, base of the per-step keys) of a run: independent streams from one seed."""
  init_key, step_base = jax.random.split(jax.random.key(seed))
  return init_key, step_base
