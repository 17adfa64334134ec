"""Consistency training: the pmapped train step, and the loop that logs, evaluates and checkpoints.

The batch's path through `train_step`, top to bottom, one call site per idea:
  images -> noise (one stream per global example) -> assignment (permute the noise to the images, or pick per
  image with KNN) -> noise-level pair (sigma_i, sigma_{i+1}) per example -> online and target consistency
  functions (same noise, same dropout mask) -> loss -> gradients pmean'd over the device axis -> optax update
  -> EMA and (CT) target update -> metrics, pmean'd.
Randomness: step key = fold_in(key(seed), step); noise and noise levels are drawn per *global example index*
(batch['example_id'], from the input pipeline), so a run does not depend on how the global batch is split over
processes and devices (only dropout and KNN's extra candidates are drawn per device).
The state and its factories are in train_state.py; the evaluator is built by the caller (main.py) and passed in.
"""
import functools
import json
import os
import time

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
from immiscible_jax import prefetch
from immiscible_jax import preemption
from immiscible_jax import replicas
from immiscible_jax import train_state

AXIS = replicas.AXIS


def draw_noise(key, example_ids, image_shape):
  """Standard normal noise [B, *image_shape], one independent stream per global example index."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), image_shape))(example_ids)


def to_unit_range(images):
  """uint8 pixels [0, 255] -> float32 in [-1, 1], on the device (the pipeline ships uint8: 4x fewer bytes)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def train_step(state, batch, *, apply_fn, optimizer, config):
  """One consistency-training step on this device's shard; runs under jax.pmap(axis_name='batch')."""
  tcfg = config.training
  images = to_unit_range(batch['image'])                              # [B_dev, H, W, C] in [-1, 1]
  example_ids = batch['example_id']                                   # [B_dev] index in the global batch
  device = jax.lax.axis_index(AXIS)
  step_key = jax.random.fold_in(train_state.run_keys(config.seed)[1], state.step)
  noise_key, pair_key, dropout_key, assign_key = jax.random.split(step_key, 4)

  # 1. Noise per example, then assigned to the images. assign_noise folds the device index into assign_key
  #    itself (knn draws differ per device).
  noise = draw_noise(noise_key, example_ids, images.shape[1:])       # [B_dev, H, W, C]
  noise, info = assignment.assign_noise(images, noise, assign_key, config.assignment, axis_name=AXIS)
  # 2. The noise-level pair of each example on the current grid of N(k) levels.
  num_scales = consistency.num_scales(state.step, tcfg)               # [] int32, N(k)
  pairs = consistency.sample_pairs(jax.vmap(lambda i: jax.random.fold_in(pair_key, i))(example_ids),
                                   num_scales, tcfg, tcfg.recipe)

  # 3. Loss and gradients. CT's target is the EMA theta^-; iCT's is theta itself, which consistency_loss
  #    stops the gradient of. One dropout key for both branches, so they share the dropout mask.
  def loss_fn(params):
    target = state.target_params if tcfg.recipe == 'ct' else params
    loss, _ = consistency.consistency_loss(apply_fn, params, target, images, noise, pairs, tcfg,
                                           jax.random.fold_in(dropout_key, device))
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grads = jax.lax.pmean(grads, AXIS)

  # 4. Optimizer step, then the EMA for sampling and (CT) the target: theta^- <- mu theta^- + (1 - mu) theta.
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - tcfg.ema_rate)
  target_params = state.target_params
  if tcfg.recipe == 'ct':
    mu = consistency.ct_target_ema(num_scales, tcfg.s0, tcfg.mu0)
    target_params = optax.incremental_update(params, target_params, 1.0 - mu)
  new_state = train_state.TrainState(step=state.step + 1, params=params, target_params=target_params,
                                     ema_params=ema_params, opt_state=opt_state)

  # 5. Metrics, averaged over the devices.
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


def summarize(per_step, lr):
  """Means of the per-step metrics ({name: [steps]} on the host) since the last log, the derived assignment
  reduction, and the learning rate."""
  mean = {k: float(np.mean(v)) for k, v in per_step.items()}
  before, after = mean['assignment/distance_before'], mean['assignment/distance_after']
  mean['assignment/reduction_pct'] = 100.0 * (before - after) / before if before > 0 else 0.0
  mean['train/lr'] = lr
  return mean


class NonFiniteError(RuntimeError):
  pass


def _restore_or_init(config, workdir, model, optimizer, manager, writer, allow_schedule_change):
  """The run's state: 1. the newest checkpoint in workdir/checkpoints that every process can read, 2. a fresh
  one from the seed. The saved config is checked before any array is read: a changed experiment is refused, not
  skipped. The data position is the step itself (data.create_train_iterator)."""
  init = train_state.initializer(config, model, optimizer)
  init_key = train_state.run_keys(config.seed)[0]
  check = lambda meta: config_checks.check_resume_compatible(meta['config'], config, allow_schedule_change)
  restored = checkpointing.restore(manager, jax.eval_shape(init, init_key), log=writer.log, check_meta=check)
  if restored is None:
    writer.log(f'training from scratch in {workdir}')
    return jax.jit(init)(init_key)
  step, state, _ = restored
  writer.log(f'resumed from step {step} in {workdir}')
  return state


def _write_json(workdir, name, text):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, name), 'w') as f:
      f.write(text)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, evaluator=None, stop_at_step=None,
                       allow_schedule_change=False):
  """Trains (resuming from workdir's newest readable checkpoint), logging, evaluating and checkpointing.

  evaluator: (replicated state, step) -> {metric name: value}, run every eval.every_steps steps (when > 0)
  and after the last step; None: no evaluation. main.py passes evaluators.TrainingEvaluator(config).
  stop_at_step: leave (with a checkpoint) after this step, as if preempted there; the schedules still
  follow training.num_steps. allow_schedule_change: resume even if a key of
  config_checks.RESUME_SCHEDULE changed (e.g. a raised training.num_steps). Returns the final host TrainState.
  """
  config_checks.validate(config)
  tcfg = config.training
  model = models.create_model(config.model, config.data.channels)
  optimizer = train_state.create_optimizer(config.optim)
  lr_fn = train_state.learning_rate_schedule(config.optim)
  manager = checkpointing.create_manager(workdir, config.checkpoint)
  writer = metric_writer.MetricWriter(workdir, tcfg.num_steps)
  state = _restore_or_init(config, workdir, model, optimizer, manager, writer, allow_schedule_change)
  data_iter = data.create_train_iterator(config.data, tcfg.batch_size, config.seed, start_step=int(state.step))
  data_iter = prefetch.DevicePrefetcher(data_iter)  # batch k+1 goes to the devices while step k runs
  _write_json(workdir, 'config.json', config.to_json(indent=2))

  p_state = replicas.replicate(state)
  p_step = make_p_train_step(model, optimizer, config)
  flag = preemption.install()
  meta = {'config': config.to_dict()}
  every_eval = config.eval.every_steps
  pending, t0, step = [], time.time(), int(state.step)
  try:
    while step < tcfg.num_steps:
      p_state, metrics = p_step(p_state, next(data_iter))
      pending.append(jax.tree_util.tree_map(replicas.first_replica, metrics))  # on the device until the log
      step += 1
      last = step == tcfg.num_steps
      preempted = flag.should_stop(step) or step == stop_at_step
      save_now = last or preempted or step % config.checkpoint.every_steps == 0
      if step % tcfg.log_every_steps == 0 or save_now:
        scalars = summarize(replicas.fetch_stacked(pending), float(lr_fn(step - 1)))
        scalars['perf/images_per_sec'] = len(pending) * tcfg.batch_size / (time.time() - t0)
        writer.write(step, scalars)
        first, pending, t0 = step - len(pending) + 1, [], time.time()  # first: the window's first step
        if not all(np.isfinite(v) for v in scalars.values()):
          raise NonFiniteError(
              f'non-finite loss or gradients between steps {first} and {step} '
              f'(metrics written to metrics.jsonl); the last checkpoint, step {manager.latest_step()}, is '
              'untouched.')
      if evaluator is not None and (last or (every_eval > 0 and step % every_eval == 0)):
        writer.write(step, evaluator(p_state, step))
        t0 = time.time()
      if save_now:
        manager.check_for_errors()  # a failed background save must stop the run, not pass unnoticed
        checkpointing.save(manager, step, replicas.host_state(p_state), meta)
      if preempted:
        manager.wait_until_finished()
        writer.log(f'preempted: saved step {step} to {manager.directory}; exiting')
        break
  finally:
    manager.wait_until_finished()
    writer.close()
    flag.uninstall()
  if step == tcfg.num_steps:
    _write_json(workdir, 'done.json', json.dumps({'step': step}))
  return replicas.host_state(p_state)
