"""A jax.profiler trace of a few training steps (config.profile: start_step, num_steps; off by default).

Tracing starts before the first dispatch that begins at or after profile.start_step and stops after the dispatch
that completes start_step + num_steps steps, once the device has finished it, so the trace holds the device's
work for every traced step. Process 0 only (one process's trace is what a reader opens; the others run the same
program). Written under WORKDIR/profile/plugins/profile/<time>/: *.xplane.pb for TensorBoard's profile plugin
(`tensorboard --logdir WORKDIR/profile`) and perfetto_trace.json.gz for ui.perfetto.dev (and for
benchmarks/profile_host.py, which adds up where the host's time goes). With a bucket workdir the trace is written
to a local temporary folder and uploaded through storage.py. Each dispatch is a StepTraceAnnotation 'train' with
its first step's number; the Python tracer records the loop's own function calls (input, waits, logs, saves).
"""
import os
import tempfile

import jax

from immiscible_jax import storage


class StepTrace:
  """Starts and stops the trace around the loop's dispatches; every call is a no-op when profiling is off."""

  def __init__(self, profile_config, workdir, log):
    self._start, self._end = profile_config.start_step, profile_config.start_step + profile_config.num_steps
    self._off = profile_config.num_steps <= 0 or jax.process_index() != 0
    self._workdir, self._log = workdir, log
    self._dir = None  # the folder being traced into, while tracing

  def before_dispatch(self, step):
    """step: the steps done so far (the dispatch about to run starts after it)."""
    if self._off or self._dir is not None or not self._start <= step < self._end:
      return
    target = storage.join(self._workdir, 'profile')
    self._dir = tempfile.mkdtemp(prefix='immiscible_jax_profile_') if storage.is_remote(target) else target
    storage.makedirs(self._dir)
    jax.profiler.start_trace(self._dir, create_perfetto_trace=True)
    self._first = step

  def after_dispatch(self, step, outputs):
    """step: the steps done after the dispatch; outputs: its results, waited for before the trace stops."""
    if self._dir is not None and step >= self._end:
      jax.block_until_ready(outputs)
      self.close(step)

  def close(self, step=None):
    """Stops a running trace (also when the loop ends early) and uploads it for a bucket workdir."""
    if self._dir is None:
      return
    jax.profiler.stop_trace()
    target = storage.join(self._workdir, 'profile')
    if self._dir != target:
      for folder, _, files in os.walk(self._dir):
        for name in files:
          local = os.path.join(folder, name)
          with open(local, 'rb') as f:
            storage.write_bytes(storage.join(target, os.path.relpath(local, self._dir)), f.read())
    self._log(f'profile: traced steps {self._first + 1}-{step if step is not None else "end"} to {target} '
              '(tensorboard --logdir there, or perfetto_trace.json.gz in ui.perfetto.dev)')
    self._dir = None
    self._off = True  # one trace per run
