"""Orbax checkpoints of a run: train state, the grain iterator's position and the run's config.

Layout: workdir/checkpoints/<step>/{state, data_iter, meta}. Orbax writes each step to a temporary directory and
renames it when complete, so a run killed mid-write leaves no step that `all_steps()` would list.
Restore walks the steps newest-first and falls back past unreadable ones, saying so.
"""
import logging

import grain
import jax
import orbax.checkpoint as ocp


def create_manager(workdir, ckpt_config, read_only=False):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_config.max_to_keep, create=not read_only, read_only=read_only,
      # Interval is decided by the trainer (it also saves on preemption and at the end).
      save_interval_steps=1)
  return ocp.CheckpointManager(f'{workdir}/checkpoints', options=options,
                               item_names=('state', 'data_iter', 'meta'))


def save(manager, step, state, data_iter, meta):
  """Starts an asynchronous save of `state` (host pytree), the iterator position and `meta` (JSON)."""
  args = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
  if data_iter is not None:
    args['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(step, args=ocp.args.Composite(**args), force=True)


def read_meta(manager, step):
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def restore(manager, abstract_state, data_iter=None, step=None, log=logging.warning):
  """Restores (step, state, meta) from `step`, or from the newest readable step when step is None.

  Returns None when the manager holds no step. Raises RuntimeError when steps exist but none is readable:
  starting over must be an explicit decision (a fresh workdir), never a silent fallback.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise ValueError(f'no checkpoint at step {step} in {manager.directory}; available: {sorted(steps)}')
    steps = [step]
  if not steps:
    return None
  errors = []
  for candidate in steps:
    args = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
    if data_iter is not None:
      args['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = manager.restore(candidate, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except  # any unreadable checkpoint: try the previous one
      errors.append(f'step {candidate}: {type(e).__name__}: {str(e)[:300]}')
      log(f'checkpoint at step {candidate} is unreadable, trying an earlier one ({errors[-1]})')
      continue
    return candidate, restored['state'], restored['meta']
  raise RuntimeError(f'no readable checkpoint in {manager.directory}:\n  ' + '\n  '.join(errors) +
                     '\nMove the directory away to start from scratch.')


def host_state(replicated_state):
  """The first replica of a pmap-replicated state, as host numpy arrays (what every process saves)."""
  return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], replicated_state))
