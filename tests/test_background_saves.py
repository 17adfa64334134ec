"""checkpointing.BackgroundSaves: a save's checksums and Orbax's save() call run off the training thread, one save
at a time, and a failure there is raised in the training thread at the next use of the manager. (The real saves
go through it in every training test: tests/test_reliability.py kills, corrupts and resumes them.)"""
import threading

import numpy as np
import pytest

from immiscible_jax import checkpointing


class _Manager:
  """Records which thread called save(), and fails the save of step `fail_at`."""

  def __init__(self, fail_at=None):
    self.saved, self.fail_at, self.gate = [], fail_at, threading.Event()

  def save(self, step, args, force):
    assert force
    self.gate.wait(timeout=60)
    if step == self.fail_at:
      raise OSError(f'injected: cannot write step {step}')
    self.saved.append((step, threading.current_thread().name, args['meta'].item['state_crc32']))

  def latest_step(self):
    return self.saved[-1][0] if self.saved else None


def test_saves_start_off_the_training_thread_in_order_and_failures_surface_there():
  inner = _Manager(fail_at=3)
  manager = checkpointing.BackgroundSaves(inner)
  state = {'w': np.arange(4, dtype=np.float32)}
  checkpointing.save(manager, 1, state, {})  # returns while save() is held at its gate
  assert inner.saved == []
  inner.gate.set()
  checkpointing.save(manager, 2, state, {})  # waits for step 1's start first: one save at a time, in order
  assert manager.latest_step() == 2  # any use of the manager waits for the save being started
  assert [(s, t) for s, t, _ in inner.saved] == [(1, 'checkpoint-save'), (2, 'checkpoint-save')]
  assert inner.saved[0][2] == checkpointing.checksums(state)
  checkpointing.save(manager, 3, state, {})
  with pytest.raises(OSError, match='injected: cannot write step 3'):
    manager.check_for_errors()
  assert manager.latest_step() == 2  # the error is raised once


def test_several_processes_keep_saving_on_the_training_thread(monkeypatch):
  """Orbax's start-of-save barrier is a device collective that must stay in program order in every process."""
  import jax  # pylint: disable=g-import-not-at-top
  inner = _Manager()
  assert isinstance(checkpointing.background_saves(inner), checkpointing.BackgroundSaves)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  assert checkpointing.background_saves(inner) is inner
