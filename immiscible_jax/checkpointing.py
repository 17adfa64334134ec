"""Orbax checkpoints of a run: train state, the grain iterator's position and the run's config.

Layout: workdir/checkpoints/<step>/{state, data_iter, meta}. Orbax writes each step to
`<step>.orbax-checkpoint-tmp` and renames it when every item is complete, so a run killed mid-write leaves no
step that `all_steps()` would list; the leftover temporary directory is removed when the next run opens the
manager. Restore walks the steps newest-first, checks the saved config before reading any array (a changed
experiment is refused, not mistaken for a corrupt checkpoint) and falls back past unreadable steps, saying so.
Orbax does not notice flipped bytes inside an array file, so meta also holds a CRC-32 of every state leaf
(about 4 GB/s here), checked after each restore.
"""
import logging
import zlib

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from immiscible_jax import errors


def create_manager(workdir, ckpt_config, read_only=False):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_config.max_to_keep, create=not read_only, read_only=read_only,
      # Interval is decided by the trainer (it also saves on preemption and at the end).
      save_interval_steps=1,
      # Partial steps of a killed run: remove them (they are never restored either way).
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(f'{workdir}/checkpoints', options=options,
                               item_names=('state', 'data_iter', 'meta'))


def checksums(state):
  """CRC-32 of each leaf's bytes, in tree order."""
  leaves = jax.tree_util.tree_leaves(state)
  return [zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8)) for x in leaves]


def save(manager, step, state, data_iter, meta):
  """Starts an asynchronous save of `state` (host pytree), the iterator position and `meta` (JSON), to which
  the state's checksums are added."""
  meta = {**meta, 'state_crc32': checksums(state)}
  args = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
  if data_iter is not None:
    args['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(step, args=ocp.args.Composite(**args), force=True)


def read_meta(manager, step):
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def restore(manager, abstract_state, data_iter=None, step=None, log=logging.warning, check_meta=None):
  """Restores (step, state, meta) from `step`, or from the newest readable step when step is None.

  check_meta(meta) runs on each candidate's meta before its arrays are read; what it raises propagates (a
  config that changed the experiment must be refused, not skipped over as if the checkpoint were corrupt).
  Returns None when the manager holds no step. Raises RuntimeError when steps exist but none is readable:
  starting over must be an explicit decision (a fresh workdir), never a silent fallback.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise errors.ConfigError(f'--step={step}: no checkpoint at that step in {manager.directory}; '
                               f'allowed: {errors.allowed_values(sorted(steps))}')
    steps = [step]
  if not steps:
    return None
  errors = []

  def skip(candidate, why):
    errors.append(f'step {candidate}: {why}')
    log(f'checkpoint at step {candidate} is unreadable, trying an earlier one ({errors[-1]})')

  for candidate in steps:
    try:
      meta = read_meta(manager, candidate)
    except Exception as e:  # pylint: disable=broad-except  # unreadable: try the previous step
      skip(candidate, f'{type(e).__name__}: {str(e)[:300]}')
      continue
    if check_meta is not None:
      check_meta(meta)
    args = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = manager.restore(candidate, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except  # any unreadable checkpoint: try the previous one
      skip(candidate, f'{type(e).__name__}: {str(e)[:300]}')
      continue
    if 'state_crc32' in meta and checksums(restored['state']) != meta['state_crc32']:  # older: no checksums
      skip(candidate, 'the arrays read back differ from their saved CRC-32 checksums (corrupt data)')
      continue
    return candidate, restored['state'], meta
  raise RuntimeError(f'no readable checkpoint in {manager.directory}:\n  ' + '\n  '.join(errors) +
                     '\nMove the directory away to start from scratch.')
