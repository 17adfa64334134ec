"""Consistency training: the train state, the pmapped step and the loop that logs, evaluates and checkpoints.

One step, one call site per idea (DESIGN.md §2): images -> noise -> assignment -> noise-level pair ->
online / target consistency functions -> loss -> grads pmean'd over 'batch' -> optax -> EMA / target update.
Randomness: step key = fold_in(key(seed), step); noise and noise levels are drawn per *global example index*, so
a run does not depend on how the global batch is split over devices and hosts (only dropout and KNN's extra
candidates are drawn per device).
"""
import functools
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from immiscible_jax import assignment
from immiscible_jax import checkpointing
from immiscible_jax import config_checks
from immiscible_jax import consistency
from immiscible_jax import data
from immiscible_jax import metric_writer
from immiscible_jax import models
from immiscible_jax import preemption

AXIS = 'batch'
# Test-only hook: the loss becomes NaN at this step (see tests/test_reliability.py).
_NAN_STEP_ENV = 'IMMISCIBLE_JAX_TEST_NAN_AT_STEP'


@flax.struct.dataclass
class TrainState:
  """What a run carries from step to step (all of it is checkpointed)."""
  step: jax.Array       # [] int32, optimisation steps taken
  params: Any           # online parameters theta
  target_params: Any    # CT: EMA target theta^- ; iCT: {} (its target is stop_gradient(theta))
  ema_params: Any       # EMA of theta with decay training.ema_rate, used for sampling and evaluation
  opt_state: Any


def learning_rate_schedule(optim_cfg):
  if optim_cfg.warmup_steps > 0:
    return optax.linear_schedule(0.0, optim_cfg.learning_rate, optim_cfg.warmup_steps)
  return optax.constant_schedule(optim_cfg.learning_rate)


def create_optimizer(optim_cfg):
  make = {'adam': optax.adam, 'radam': optax.radam}[optim_cfg.optimizer]
  opt = make(learning_rate_schedule(optim_cfg), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
  if optim_cfg.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), opt)
  return opt


def create_train_state(key, model, image_shape, optimizer, recipe):
  x = jnp.zeros((1, *image_shape), jnp.float32)
  params = model.init(key, x, jnp.zeros((1,), jnp.float32), train=False)['params']
  return TrainState(step=jnp.int32(0), params=params,
                    target_params=params if recipe == 'ct' else {},
                    ema_params=params, opt_state=optimizer.init(params))


def run_keys(seed):
  """(parameter-init key, base of the per-step keys) of a run: independent streams from one seed."""
  init_key, step_base = jax.random.split(jax.random.key(seed))
  return init_key, step_base


def draw_noise(key, example_ids, image_shape):
  """Standard normal noise [B, *image_shape], one independent stream per global example index."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), image_shape))(example_ids)


def train_step(state, batch, *, apply_fn, optimizer, config):
  """One consistency-training step on this device's shard; runs under jax.pmap(axis_name='batch')."""
  tcfg = config.training
  images = batch['image']                                             # [B_dev, H, W, C] in [-1, 1]
  b_dev = images.shape[0]
  device = jax.lax.axis_index(AXIS)
  step_key = jax.random.fold_in(run_keys(config.seed)[1], state.step)
  noise_key, pair_key, dropout_key, assign_key = jax.random.split(step_key, 4)
  example_ids = device * b_dev + jnp.arange(b_dev)                    # global example index

  noise = draw_noise(noise_key, example_ids, images.shape[1:])
  # assign_noise folds the device index into assign_key itself (knn draws differ per device).
  noise, info = assignment.assign_noise(images, noise, assign_key, config.assignment, axis_name=AXIS)
  num_scales = consistency.num_scales(state.step, tcfg)
  pairs = consistency.sample_pairs(jax.vmap(lambda i: jax.random.fold_in(pair_key, i))(example_ids),
                                   num_scales, tcfg, tcfg.recipe)

  def loss_fn(params):
    target = state.target_params if tcfg.recipe == 'ct' else params   # iCT: stop_gradient(theta)
    loss, _ = consistency.consistency_loss(apply_fn, params, target, images, noise, pairs, tcfg,
                                           jax.random.fold_in(dropout_key, device))
    if os.environ.get(_NAN_STEP_ENV):
      loss = jnp.where(state.step == int(os.environ[_NAN_STEP_ENV]), jnp.nan, loss)
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - tcfg.ema_rate)
  target_params = state.target_params
  if tcfg.recipe == 'ct':  # theta^- <- stop_gradient(mu theta^- + (1 - mu) theta)
    mu = consistency.ct_target_ema(num_scales, tcfg.s0, tcfg.mu0)
    target_params = optax.incremental_update(params, target_params, 1.0 - mu)
  new_state = TrainState(step=state.step + 1, params=params, target_params=target_params,
                         ema_params=ema_params, opt_state=opt_state)
  metrics = {
      'train/loss': loss,
      'train/grad_norm': optax.global_norm(grads),
      'train/update_norm': optax.global_norm(updates),
      'train/num_scales': num_scales.astype(jnp.float32),
      'assignment/distance_before': info.distance_before,
      'assignment/distance_after': info.distance_after,
  }
  return new_state, jax.lax.pmean(metrics, AXIS)


def make_p_train_step(model, optimizer, config, devices=None):
  step = functools.partial(train_step, apply_fn=model.apply, optimizer=optimizer, config=config)
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,), devices=devices)


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


def summarize(metric_list, lr):
  """Averages the per-step metrics since the last log; adds the derived assignment reduction."""
  host = [checkpointing.host_state(m) for m in metric_list]  # local reads, as for the state
  mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  before, after = mean['assignment/distance_before'], mean['assignment/distance_after']
  mean['assignment/reduction_pct'] = 100.0 * (before - after) / before if before > 0 else 0.0
  mean['train/lr'] = lr
  return mean


def _is_finite(scalars):
  return all(np.isfinite(v) for v in scalars.values())


class NonFiniteError(RuntimeError):
  pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stop_at_step=None):
  """Trains (resuming from workdir's newest readable checkpoint), logging, evaluating and checkpointing.

  Resume order: 1. the newest readable checkpoint in workdir/checkpoints, 2. from scratch.
  stop_at_step: leave (with a checkpoint) after this step, as if preempted there; the schedules still
  follow training.num_steps. Returns the final host TrainState.
  """
  config_checks.validate(config)
  tcfg = config.training
  image_shape = data.image_shape(config.data)
  model = models.create_model(config.model, config.data.channels)
  optimizer = create_optimizer(config.optim)
  lr_fn = learning_rate_schedule(config.optim)
  data_iter = data.create_train_iterator(config.data, tcfg.batch_size, config.seed)
  manager = checkpointing.create_manager(workdir, config.checkpoint)
  writer = metric_writer.MetricWriter(workdir, tcfg.num_steps)

  init = functools.partial(create_train_state, model=model, image_shape=image_shape, optimizer=optimizer,
                           recipe=tcfg.recipe)
  init_key = run_keys(config.seed)[0]
  # The saved config is checked before any array is read: a changed experiment is refused, not skipped.
  check = lambda meta: config_checks.check_resume_compatible(meta['config'], config)
  restored = checkpointing.restore(manager, jax.eval_shape(init, init_key), data_iter, log=writer.log,
                                   check_meta=check)
  if restored is None:
    state = jax.jit(init)(init_key)
    writer.log(f'training from scratch in {workdir}')
  else:
    step, state, meta = restored
    writer.log(f'resumed from step {step} in {workdir}')
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(indent=2))

  start = int(state.step)
  p_state = replicate(state)
  p_step = make_p_train_step(model, optimizer, config)
  evaluator = _make_evaluator(config, model, workdir)
  flag = preemption.install()
  meta = {'config': config.to_dict()}
  pending, t0, step = [], time.time(), start
  try:
    while step < tcfg.num_steps:
      p_state, metrics = p_step(p_state, shard_batch(next(data_iter)))
      pending.append(metrics)
      step += 1
      last = step == tcfg.num_steps
      preempted = flag.should_stop(step) or step == stop_at_step
      save_now = last or preempted or step % config.checkpoint.every_steps == 0
      if step % tcfg.log_every_steps == 0 or save_now:
        scalars = summarize(pending, float(lr_fn(step - 1)))
        scalars['perf/images_per_sec'] = len(pending) * tcfg.batch_size / (time.time() - t0)
        writer.write(step, scalars)
        first, pending, t0 = step - len(pending) + 1, [], time.time()  # first: the window's first step
        if not _is_finite(scalars):
          raise NonFiniteError(
              f'non-finite loss or gradients between steps {first} and {step} '
              f'(metrics written to metrics.jsonl); the last checkpoint, step {manager.latest_step()}, is '
              'untouched.')
      if evaluator is not None and (step % config.eval.every_steps == 0 or last):
        writer.write(step, evaluator(p_state, step))
        t0 = time.time()
      if save_now:
        manager.check_for_errors()  # a failed background save must stop the run, not pass unnoticed
        checkpointing.save(manager, step, checkpointing.host_state(p_state), data_iter, meta)
      if preempted:
        manager.wait_until_finished()
        writer.log(f'preempted: saved step {step} to {manager.directory}; exiting')
        break
  finally:
    manager.wait_until_finished()
    writer.close()
    flag.uninstall()
  if step == tcfg.num_steps and jax.process_index() == 0:
    with open(os.path.join(workdir, 'done.json'), 'w') as f:
      json.dump({'step': step}, f)
  return checkpointing.host_state(p_state)


def _make_evaluator(config, model, workdir):
  if config.eval.every_steps <= 0:
    return None
  from immiscible_jax import evaluators  # pylint: disable=g-import-not-at-top  # heavier imports only when used
  return evaluators.TrainingEvaluator(config, model, workdir)
