"""Orbax checkpoints of a run: train state and the run's config (the data position is the step itself).

Layout: workdir/checkpoints/<step>/{state, meta}. Orbax writes each step to
`<step>.orbax-checkpoint-tmp` and renames it when every item is complete, so a run killed mid-write leaves no
step that `all_steps()` would list; the leftover temporary directory is removed when the next run opens the
manager. Restore walks the steps newest-first, checks the saved config before reading any array (a changed
experiment is refused, not mistaken for a corrupt checkpoint) and falls back past unreadable steps, saying so.
With several processes every candidate step is agreed on: all processes try the same step and keep it only if
every one of them read it, so they never train on from different states.
Orbax does not notice flipped bytes inside an array file, so meta also holds a CRC-32 of every state leaf
(about 4 GB/s here), checked after each restore.
In a single-process run a save costs the training thread only the copy of the state to the host: BackgroundSaves
runs the checksums and Orbax's synchronous part on a thread of its own (benchmarks/checkpoint_save.py measures
each part); with several processes they stay on the training thread (background_saves says why).
"""
import json
import logging
import threading
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from immiscible_jax import errors
from immiscible_jax import storage
from immiscible_jax.parallel import agreement


class UnreadableCheckpointError(RuntimeError):
  """A checkpoint just written does not read back: the run must not be marked done."""


def create_manager(workdir, ckpt_config, read_only=False):
  storage.check_no_glob_characters(workdir, '--workdir')
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_config.max_to_keep, create=not read_only, read_only=read_only,
      # Interval is decided by the trainer (it also saves on preemption and at the end).
      save_interval_steps=1,
      # Partial steps of a killed run: remove them (they are never restored either way).
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(f'{workdir}/checkpoints', options=options, item_names=('state', 'meta'))


def checksums(state):
  """CRC-32 of each leaf's bytes, in tree order."""
  leaves = jax.tree_util.tree_leaves(state)
  return [zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8)) for x in leaves]


class BackgroundSaves:
  """An Orbax CheckpointManager whose saves (save() below) start on a background thread: the checksums of the
  host state and Orbax's synchronous part (which then hands the writing to Orbax's own threads) run there while
  the training thread dispatches the next steps. One save at a time, in order. Any other use of the manager (an
  attribute, a method: wait_until_finished, check_for_errors, latest_step, restore...) first waits for the save
  being started and raises its error, if it failed, in the training thread.

  The host state must not change under the thread: the loop's host copy is a copy on accelerators; on CPU it is
  a view of the device buffers, and JAX then declines to donate those buffers to the next step (checked on jax
  0.10.2: the view keeps its values), so it cannot change either."""

  def __init__(self, manager):
    self.manager, self._thread, self._error = manager, None, None

  def start(self, fn):
    self.join()
    self._thread = threading.Thread(target=self._run, args=(fn,), name='checkpoint-save', daemon=True)
    self._thread.start()

  def _run(self, fn):
    try:
      fn()
    except BaseException as e:  # pylint: disable=broad-except  # re-raised in the training thread by join()
      self._error = e

  def join(self):
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    error, self._error = self._error, None
    if error is not None:
      raise error

  def __getattr__(self, name):
    self.join()
    return getattr(self.manager, name)


def background_saves(manager):
  """The training loop's manager: BackgroundSaves in a single-process run. With several processes the manager
  itself: Orbax starts every save with a barrier that is a device collective, which every process must issue in
  the same order relative to the train step's collectives; from a thread of its own it interleaves differently
  in each process (the two-process test deadlocked: one process in the barrier, the other in a step's pmean).
  Deferring the save() call to the next dispatch boundary, with only the checksums on the thread, would keep the
  order; not done."""
  return BackgroundSaves(manager) if jax.process_count() == 1 else manager


def save(manager, step, state, meta):
  """Starts an asynchronous save of `state` (host pytree) and `meta` (JSON), to which the state's checksums are
  added; with BackgroundSaves, the checksums and the start of the save happen on its thread."""
  background = isinstance(manager, BackgroundSaves)
  orbax_manager = manager.manager if background else manager

  def start():
    full_meta = {**meta, 'state_crc32': checksums(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(full_meta))
    orbax_manager.save(step, args=args, force=True)

  if background:
    manager.start(start)
  else:
    start()


def read_meta(manager, step):
  """The meta item of `step`, read as the JSON file Orbax wrote, not through Orbax: a process probing a step
  must not enter Orbax's restore, whose cross-process synchronisation would wait for the processes that skip it."""
  return json.loads(storage.read_text(storage.join(str(manager.directory), str(step), 'meta', 'metadata')))


# What one process found at a candidate step.
_READ, _UNREADABLE, _INCOMPATIBLE = 0, 1, 2


def _gather(value):
  """[process_count] ints: `value` from every process (agreement.gather_ints: the key-value store, no device
  collective); every process must call it, in the same order."""
  return agreement.gather_ints(value, 'restore')


def _is_incompatible(error):
  """A state that Orbax read but that does not fit this config's tree or shapes: a config error, not I/O."""
  text = str(error).lower()
  return isinstance(error, ValueError) and ('shape' in text or 'tree structure' in text or 'mismatch' in text)


def _probe_step(manager, candidate, check_meta):
  """(outcome, meta or the ConfigError, why): can this process read the step's meta, and does it fit?"""
  try:
    meta = read_meta(manager, candidate)
  except Exception as e:  # pylint: disable=broad-except  # unreadable: the caller tries an earlier step
    return _UNREADABLE, None, f'{type(e).__name__}: {str(e)[:300]}'
  if check_meta is not None:
    try:
      check_meta(meta)
    except errors.ConfigError as e:
      return _INCOMPATIBLE, e, str(e)
  return _READ, meta, ''


def _read_step(manager, candidate, abstract_state, meta):
  """(outcome, (step, state, meta) or the ConfigError, why): the step's arrays, checked against meta's CRCs."""
  try:
    state = manager.restore(candidate, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  except Exception as e:  # pylint: disable=broad-except
    if _is_incompatible(e):
      return _INCOMPATIBLE, errors.ConfigError(
          f'cannot restore step {candidate}: its arrays do not fit this config ({type(e).__name__}: '
          f'{" ".join(str(e).split())[:300]}); check the model and optimizer keys against the saved config'), ''
    return _UNREADABLE, None, f'{type(e).__name__}: {str(e)[:300]}'
  state = state['state']
  if 'state_crc32' in meta and checksums(state) != meta['state_crc32']:  # older checkpoints: no checksums
    return _UNREADABLE, None, 'the arrays read back differ from their saved CRC-32 checksums (corrupt data)'
  return _READ, (candidate, state, meta), ''


def _agree(candidate, outcome, result, why):
  """This process's (outcome, result, why) made common: _READ only if every process read the step; a config
  error anywhere is raised everywhere; otherwise _UNREADABLE with this process's reason or the failed ones."""
  outcomes = _gather(outcome)
  if (outcomes == _INCOMPATIBLE).any():
    if outcome == _INCOMPATIBLE:
      raise result
    raise errors.ConfigError(f'cannot restore step {candidate}: process(es) '
                             f'{np.flatnonzero(outcomes == _INCOMPATIBLE).tolist()} found it incompatible with '
                             'this config (their message says how)')
  if (outcomes == _READ).all():
    return _READ, result, ''
  failed = np.flatnonzero(outcomes != _READ).tolist()
  return _UNREADABLE, None, why or f'unreadable on process(es) {failed}'


def verify_readable(manager, step, state):
  """Reads `step` back from disk (meta, arrays, and their CRC-32s against `state`'s as saved); raises
  UnreadableCheckpointError if any process cannot. Every process must call it (the outcome is agreed)."""
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
  outcome, meta, why = _agree(step, *_probe_step(manager, step, None))
  if outcome == _READ:
    outcome, _, why = _agree(step, *_read_step(manager, step, abstract, meta))
  if outcome != _READ:
    raise UnreadableCheckpointError(
        f'the final checkpoint (step {step}) does not read back from {manager.directory} ({why}); done.json is '
        'not written. Check the storage (free space, permissions) and rerun the same command to resume')


def restore(manager, abstract_state, step=None, log=logging.warning, check_meta=None):
  """Restores (step, state, meta) from `step`, or from the newest step that every process can read.

  check_meta(meta) runs on each candidate's meta before its arrays are read and raises errors.ConfigError for
  a config that changed the experiment: that is raised in every process, never skipped over as if the
  checkpoint were corrupt; so is a state whose arrays do not fit `abstract_state`. Only I/O errors and checksum
  mismatches make a step unreadable. Returns None when the manager holds no step. Raises RuntimeError when
  steps exist but none is readable by all processes: starting over must be an explicit decision (a fresh
  workdir), never a silent fallback. Every process must call this (it agrees on the step with collectives).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if not _gather(int(step in steps)).all():  # raised by every process, or the others would wait for it
      raise errors.ConfigError(f'--step={step}: no checkpoint at that step in {manager.directory}; '
                               f'allowed: {errors.allowed_values(sorted(steps))}')
    steps = [step]
  reasons, below = [], None
  while True:
    # The candidate: the newest step that every process lists (listings can differ on a flaky filesystem).
    mine = next((s for s in steps if below is None or s < below), -1)
    candidate = int(_gather(mine).min())
    if candidate < 0:
      break
    below = candidate
    # Two agreed stages: the meta (read directly), then the arrays through Orbax, which every process enters
    # together or not at all.
    outcome, result, why = _probe_step(manager, candidate, check_meta) if candidate in steps else (
        _UNREADABLE, None, 'not listed by this process')
    outcome, result, why = _agree(candidate, outcome, result, why)
    if outcome == _READ:
      outcome, result, why = _agree(candidate, *_read_step(manager, candidate, abstract_state, result))
      if outcome == _READ:
        return result
    reasons.append(f'step {candidate}: {why}')
    log(f'checkpoint at step {candidate} is unreadable, trying an earlier one ({reasons[-1]})')
  if not reasons:
    return None
  raise RuntimeError(f'no readable checkpoint in {manager.directory}:\n  ' + '\n  '.join(reasons) +
                     '\nMove the directory away to start from scratch.')
