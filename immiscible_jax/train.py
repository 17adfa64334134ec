"""Consistency training: the per-device train step, k of them per compiled call, and the loop that logs,
evaluates and checkpoints.

The batch's path through `train_step`, top to bottom, one call site per idea:
  images -> noise (one stream per global example) -> assignment (permute the noise to the images, or pick per
  image with KNN) -> noise-level pair (sigma_i, sigma_{i+1}) per example -> online and target consistency
  functions (same noise, same dropout mask) -> loss -> gradients pmean'd over the device axis -> optax update
  -> EMA and (CT) target update -> metrics, pmean'd.
Randomness: step key = fold_in(key(seed), step); noise and noise levels are drawn per *global example index*
(batch['example_id'], from the input pipeline), so a run does not depend on how the global batch is split over
processes and devices (only dropout and KNN's extra candidates are drawn per device).
The step runs under either parallel.mode (parallel/layouts.py: jax.pmap, or jax.jit + jax.shard_map over a
Mesh) with the same per-device view, so both modes compute the same thing. The state and its factories are in
train_state.py; the evaluator is built by the caller (main.py) and passed in.
"""
import collections
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
from immiscible_jax import errors
from immiscible_jax import metric_writer
from immiscible_jax import models
from immiscible_jax import perf
from immiscible_jax import profiling
from immiscible_jax import storage
from immiscible_jax import train_state
from immiscible_jax.models import lpips
from immiscible_jax.parallel import agreement
from immiscible_jax.parallel import layouts
from immiscible_jax.parallel import preemption
from immiscible_jax.parallel import prefetch

AXIS = layouts.AXIS
# Dispatches the host may have made that the device has not finished: after dispatching n the loop waits for
# n - 1. Two keep the device fed (the next step is queued while the host prepares the one after) and bound how
# long a stop waits: at most two dispatches of device time, not a queue of fifty.
MAX_DISPATCHES_IN_FLIGHT = 2


def draw_noise(key, example_ids, image_shape):
  """Standard normal noise [B, *image_shape], one independent stream per global example index."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), image_shape))(example_ids)


def to_unit_range(images):
  """uint8 pixels [0, 255] -> float32 in [-1, 1], on the device (the pipeline ships uint8: 4x fewer bytes)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def accumulated_value_and_grad(loss_fn, params, batch, key, num_micro):
  """(mean loss, mean gradient) of loss_fn(params, micro_batch, key) over `num_micro` equal micro-batches of
  `batch` (a pytree of [B, ...] arrays), scanned so that one micro-batch's activations are live at a time.

  The loss is a mean over examples, so the mean over equal micro-batches is the whole batch's loss and gradient
  (up to float32 summation order). Micro-batch i gets fold_in(key, i) (its own dropout mask); num_micro = 1 is
  one plain value_and_grad on the whole batch with `key`.
  """
  grad_fn = jax.value_and_grad(loss_fn)
  if num_micro == 1:
    return grad_fn(params, batch, key)
  micro = jax.tree_util.tree_map(lambda x: x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]), batch)

  def add_micro(total, inputs):
    i, micro_batch = inputs
    return jax.tree_util.tree_map(jnp.add, total, grad_fn(params, micro_batch, jax.random.fold_in(key, i))), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
  total, _ = jax.lax.scan(add_micro, zeros, (jnp.arange(num_micro), micro))
  return jax.tree_util.tree_map(lambda x: x / num_micro, total)


def train_step(state, batch, loss_params, *, apply_fn, optimizer, config):
  """One consistency-training step on this device's shard; runs mapped over the device axis 'batch' (either
  layout of parallel/layouts.py). loss_params: the frozen weights of the loss's network (LPIPS; {} for the other
  metrics), an input of the step that is never differentiated, updated or saved."""
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
  #    stops the gradient of. One dropout key for both branches, so they share the dropout mask. With
  #    training.grad_accum_steps > 1 the noise above was drawn and assigned over the whole batch at once;
  #    only the gradients are taken micro-batch by micro-batch.
  def loss_fn(params, micro, key):
    target = state.target_params if tcfg.recipe == 'ct' else params
    loss, _ = consistency.consistency_loss(apply_fn, params, target, *micro, tcfg, key, loss_params)
    return loss

  loss, grads = accumulated_value_and_grad(loss_fn, state.params, (images, noise, pairs),
                                           jax.random.fold_in(dropout_key, device), tcfg.grad_accum_steps)
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
      'train/grad_norm': optax.tree.norm(grads),
      'train/update_norm': optax.tree.norm(updates),
      'train/num_scales': num_scales.astype(jnp.float32),
      'assignment/distance_before': info.distance_before,
      'assignment/distance_after': info.distance_after,
  }
  if info.converged is not None:  # jv, auction, sinkhorn: the share of solves within their caps, their depth
    metrics['assignment/converged'] = info.converged
    metrics['assignment/sequential_steps'] = info.sequential_steps
  return new_state, jax.lax.pmean(metrics, AXIS)


def train_steps(state, batches, loss_params, **step_args):
  """training.steps_per_dispatch = k steps in one compiled call, over batches ({name: [k, B_dev, ...]}); returns
  the state after the k steps and every step's metrics ({name: [k]}).

  k = 1 calls train_step directly; only k > 1 runs it in a lax.scan. On XLA:CPU a scan costs far more than it
  saves: XLA:CPU's convolution canonicalisation, which rewrites the backward pass's convolutions (weight
  gradients `f01b_i01o->01bf`, input gradients `b01f_01oi->b01f`) into the one layout its multi-threaded Eigen
  kernel takes, does not reach convolutions inside the scan's while body, so those run in XLA's naive loop
  emitter (the same HLO goes in; compare the dim_labels of `compiled.as_text()`). A length-1 scan ran the digits
  step about 8x slower than the direct call (benchmarks/dispatch.py; `unroll=True` does not help). So k > 1
  pays only where dispatch is the cost, on GPUs and TPUs; on CPU the loop says so at start-up.
  """
  step = lambda s, b: train_step(s, b, loss_params, **step_args)
  if jax.tree_util.tree_leaves(batches)[0].shape[0] == 1:
    state, metrics = step(state, jax.tree_util.tree_map(lambda x: x[0], batches))
    return state, jax.tree_util.tree_map(lambda x: x[None], metrics)
  return jax.lax.scan(step, state, batches)


def frozen_loss_params(config):
  """The weights of training.loss's network: LPIPS-VGG16 from the cache for 'lpips' (a one-line ConfigError naming
  the command that converts them when missing), {} for the other metrics."""
  if config.training.loss != 'lpips':
    return {}
  return lpips.load_params(lpips.weights_path(storage.default_cache_dir()))


class TrainSteps:
  """The compiled k-step function of a layout with the frozen inputs every call passes (make_train_steps)."""

  def __init__(self, compiled, frozen):
    self._compiled, self._frozen = compiled, frozen

  def __call__(self, d_state, d_batches):
    return self._compiled(d_state, d_batches, self._frozen)

  def lower(self, d_state, d_batches):
    """The lowered program for these arguments; after a call with their shapes, its compile() is the cached
    executable (perf.flops_per_call reads its cost analysis without compiling again)."""
    return self._compiled.lower(d_state, d_batches, self._frozen)


def make_train_steps(model, optimizer, config, layout, loss_params=None):
  """The compiled k-step function of `layout` (layouts.create_layout): (device state, device batches) ->
  (device state, metrics); the state is donated. loss_params (frozen_loss_params; default {}) are put on the
  devices once here and passed to every call as an input, so they are neither baked into the program as
  constants nor part of the trained, checkpointed state."""
  compiled = layout.compile(functools.partial(train_steps, apply_fn=model.apply, optimizer=optimizer,
                                              config=config))
  return TrainSteps(compiled, layout.put_state(loss_params if loss_params is not None else {}))


def cpu_scan_note(config, backend):
  """A start-up line for a run that puts its step in a lax.scan on CPU (steps_per_dispatch or grad_accum_steps
  > 1), where that scan is several times slower per step (train_steps says why); None otherwise."""
  tcfg = config.training
  scanned = [f'training.{key}={tcfg[key]}' for key in ('steps_per_dispatch', 'grad_accum_steps') if tcfg[key] > 1]
  if backend != 'cpu' or not scanned:
    return None
  return (f'note: {" and ".join(scanned)} put the step (or its gradient) inside a lax.scan, which XLA:CPU runs '
          'several times slower than a direct call (benchmarks/results/dispatch_cpu.json); on CPU set them to 1')


def stack_batches(data_iter, k):
  """The iterator's next k host batches, stacked on a new leading axis: {name: [k, B_host, ...]}."""
  batches = [next(data_iter) for _ in range(k)]
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)


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
    storage.write_text(storage.join(workdir, name), text, atomic=True)


def start_summary(config, workdir, step, config_name=None):
  """The run in one line, said before anything compiles: what is trained, on what, with which assignment."""
  t, a = config.training, config.assignment
  where = f'{jax.device_count()} {jax.default_backend()} device{"s" * (jax.device_count() > 1)}'
  if jax.process_count() > 1:
    where += f' in {jax.process_count()} processes'
  method = 'none' if a.method == 'none' else f'{a.method} ({a.cost}, {a.scope} scope)'
  begin = f'from step {step}' if step else 'from scratch'
  return (f'run: {config_name or "config"}: {t.recipe.upper() if t.recipe == "ct" else "iCT"} with {t.loss}, '
          f'{t.num_steps} steps of batch {t.batch_size} on {where}, assignment {method}; {begin} in {workdir}')


def end_summary(workdir, step, num_steps):
  """Where the run's outputs are, and the commands that come next."""
  if step < num_steps:
    return (f'stopped at step {step} of {num_steps}; the same command resumes from {workdir}/checkpoints')
  main = f'python -m immiscible_jax.main --workdir={workdir}'
  return '\n'.join([
      f'done: {num_steps} steps in {workdir}',
      f'  checkpoints {storage.join(workdir, "checkpoints")}, metrics {storage.join(workdir, "metrics.jsonl")} '
      f'(TensorBoard: {storage.join(workdir, "tensorboard")})',
      f'  next: {main} --mode=sample   (samples and a grid in {storage.join(workdir, "samples")})',
      f'        {main} --mode=eval     (the Frechet distance of fresh samples)'])


def _log_window(writer, step, pending, k, config, seconds, lr_fn, accounting, manager):
  """Writes the means of the steps since the last log (fetched in one transfer) with images/s over `seconds`
  and MFU; raises NonFiniteError, naming the window, when any of them is not finite."""
  tcfg = config.training
  scalars = summarize(layouts.fetch_stacked(pending), float(lr_fn(step - 1)))
  scalars['perf/images_per_sec'] = len(pending) * k * tcfg.batch_size / seconds
  mfu = perf.mfu(scalars['perf/images_per_sec'], *accounting, jax.device_count())
  if mfu is not None:
    scalars['perf/mfu'] = mfu
  writer.write(step, scalars)
  if not all(np.isfinite(v) for v in scalars.values()):
    first = step - len(pending) * k + 1
    raise NonFiniteError(
        f'non-finite loss or gradients between steps {first} and {step} (metrics written to metrics.jsonl); '
        f'the last checkpoint, step {manager.latest_step()}, is untouched.')


def _evaluate(evaluator, writer, manager, step, host, meta, stop, saved):
  """Runs the evaluator on `host` after this step's checkpoint is on disk; True when a stop came between its
  batches (the step is then saved, if it was not a checkpoint step, and the run must leave)."""
  manager.wait_until_finished()  # this step's checkpoint is on disk before the evaluator can fail
  try:
    writer.write(step, evaluator(host, step, between_batches=stop.check))
    return False
  except agreement.StopReached:
    writer.log(f'preempted during the evaluation of step {step}: stopped between its batches')
    if not saved:
      checkpointing.save(manager, step, host, meta)
    return True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, evaluator=None, stop_at_step=None,
                       allow_schedule_change=False, config_name=None):
  """Trains (resuming from workdir's newest readable checkpoint), logging, evaluating and checkpointing.

  evaluator: (host TrainState, step, between_batches) -> {metric name: value}, run every eval.every_steps steps
  (when > 0) and after the last step; it calls between_batches() after each of its batches (which raises
  agreement.StopReached when the run must stop); None: no evaluation. main.py passes
  evaluation.runs.TrainingEvaluator(config). stop_at_step: leave (with a checkpoint) after the dispatch that reaches
  this step, as if preempted there; the schedules still follow training.num_steps. allow_schedule_change: resume
  even if a schedule key (resume_rules.RULES) changed (e.g. a raised training.num_steps). config_name: how the
  start-up line names the config (main.py: its file). Returns the final host TrainState.

  Dispatch granularity (training.steps_per_dispatch = k): the host sees the run only between compiled calls of
  k steps, and every interval is a multiple of k (config_checks), so logs, evaluations and checkpoints fall on
  dispatch boundaries exactly as with k = 1. The host runs at most MAX_DISPATCHES_IN_FLIGHT dispatches ahead of
  the device and waits for it in short sleeps, never inside XLA, so signal handlers run while the device works.
  The stop (agreement.StopPoints: a signal in one process, JAX's preemption sync point in several) is asked after
  each dispatch and between the batches of an in-loop evaluation: a signal stops the run after the next dispatch
  (several processes: after the dispatch all of them agree on, within about a second), with a checkpoint of the
  step reached; during an evaluation, after its current batch, with that step's checkpoint (saved first, if that
  step was not a checkpoint step). The first dispatch compiles the step: it is announced and timed, and images/s
  and the ETA count from its end. The train step's FLOPs per image are read once from XLA's cost analysis and
  perf/mfu is logged where the device's peak is known (perf.py). The NaN guard sees every step's metrics (all k
  are returned) at each log and names the window of steps it found them in; nothing of that window is saved. At
  a step that both saves and evaluates, the save is finished before the evaluator runs, so an evaluator that
  crashes (or is killed for its memory) cannot lose that checkpoint.
  """
  config_checks.validate(config)
  tcfg, k = config.training, config.training.steps_per_dispatch
  model = models.create_model(config.model, config.data.channels)
  optimizer = train_state.create_optimizer(config.optim)
  lr_fn = train_state.learning_rate_schedule(config.optim)
  start_stream = data.train_stream(config.data, tcfg.batch_size, config.seed)  # bad data fails before compiling
  loss_params = frozen_loss_params(config)  # and so do missing LPIPS weights
  # One process: saves start on a thread of their own; the training thread only copies the state to the host.
  manager = checkpointing.background_saves(checkpointing.create_manager(workdir, config.checkpoint))
  writer = metric_writer.MetricWriter(workdir, tcfg.num_steps)
  state = _restore_or_init(config, workdir, model, optimizer, manager, writer, allow_schedule_change)
  step = int(state.step)
  if step % k:
    raise errors.ConfigError(f'training.steps_per_dispatch: the run resumes at step {step}, which is not a '
                             f'multiple of {k}; resume with a value that divides {step}')
  _write_json(workdir, 'config.json', config.to_json(indent=2))

  writer.log(start_summary(config, workdir, step, config_name))
  notes = (cpu_scan_note(config, jax.default_backend()), assignment.problem_size_note(config, jax.device_count()))
  for note in notes:
    if note:
      writer.log(note)
  layout = layouts.create_layout(config.parallel.mode)
  data_iter = start_stream(step)
  # The next dispatch's k batches are read and put on the devices while this one runs.
  dispatches = prefetch.DevicePrefetcher(iter(lambda: stack_batches(data_iter, k), None), put=layout.put_batches)
  d_state = layout.put_state(state)
  train_fn = make_train_steps(model, optimizer, config, layout, loss_params)
  flag = preemption.install(notify_jax=jax.process_count() > 1)
  stop = agreement.StopPoints(flag)
  meta = {'config': config.to_dict()}
  every_eval = config.eval.every_steps
  pending, t0 = [], time.time()
  in_flight = collections.deque()  # metrics of the dispatches the device may not have finished
  accounting = None  # (FLOPs per image, peak FLOP/s per device), read after the first dispatch
  trace = profiling.StepTrace(config.profile, workdir, writer.log)
  writer.log(f'compiling the train step ({k} step{"s" * (k > 1)} per call) ...')
  try:
    while step < tcfg.num_steps:
      trace.before_dispatch(step)
      batches = next(dispatches)
      with jax.profiler.StepTraceAnnotation('train', step_num=step + 1):
        d_state, metrics = train_fn(d_state, batches)
      pending.append(jax.tree_util.tree_map(layout.first, metrics))  # on the device until the log
      in_flight.append(pending[-1])
      if accounting is None:  # the first call compiled the step (synchronously) before dispatching it
        writer.log(f'compiled in {time.time() - t0:.1f} s')
        *accounting, line = perf.train_step_accounting(lambda: train_fn.lower(d_state, batches),
                                                       tcfg.batch_size // jax.device_count(), config.model.dtype,
                                                       tcfg.grad_accum_steps)
        writer.log(line)
        writer.start_clock(step)
        t0 = time.time()  # images/s and the ETA leave the compilation out
      step += k
      writer.advance(step)
      while len(in_flight) >= MAX_DISPATCHES_IN_FLIGHT:
        layouts.wait_until_ready(in_flight.popleft())
      trace.after_dispatch(step, metrics)
      last = step == tcfg.num_steps
      preempted = stop.reached() or (stop_at_step is not None and step >= stop_at_step)
      save_now = last or preempted or step % config.checkpoint.every_steps == 0
      evaluate_now = evaluator is not None and (last or (every_eval > 0 and step % every_eval == 0))
      if in_flight and (save_now or evaluate_now or step % tcfg.log_every_steps == 0):
        layouts.wait_until_ready(in_flight.pop())  # the host reads results now: wait where signals still work
        in_flight.clear()
      if step % tcfg.log_every_steps == 0 or save_now:
        _log_window(writer, step, pending, k, config, time.time() - t0, lr_fn, accounting, manager)
        pending, t0 = [], time.time()
      host = None
      if save_now:
        manager.check_for_errors()  # a failed background save must stop the run, not pass unnoticed
        host = layout.host(d_state)
        checkpointing.save(manager, step, host, meta)
      if evaluate_now:
        host = host if host is not None else layout.host(d_state)
        preempted |= _evaluate(evaluator, writer, manager, step, host, meta, stop, saved=save_now)
        t0 = time.time()
      if preempted:
        manager.wait_until_finished()
        writer.log(f'preempted: saved step {step} to {manager.directory}; exiting')
        break
  finally:
    trace.close()
    manager.wait_until_finished()
    writer.close()
    flag.uninstall()
  final = layout.host(d_state)
  if step == tcfg.num_steps:
    checkpointing.verify_readable(manager, step, final)  # done.json only for a run whose end can be restored
    _write_json(workdir, 'done.json', json.dumps({'step': step}))
  if jax.process_index() == 0:
    print(end_summary(workdir, step, tcfg.num_steps), flush=True)
  return final
