"""Where scalars go: metrics.jsonl and TensorBoard in the workdir, and the console (progress bar on a terminal).

Only process 0 writes; the others get a writer that does nothing, so callers need no `if` of their own.
"""
import json
import os
import sys
import time

import jax


class MetricWriter:
  """Writes one JSON line per call to workdir/metrics.jsonl, TensorBoard scalars and a console line."""

  def __init__(self, workdir, total_steps, initial_step=0, enabled=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._total, self._start_step, self._start_time = total_steps, initial_step, time.time()
    self._bar = self._tb = self._jsonl = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'metrics.jsonl')
    # A hard kill can leave a half-written last line: start the resumed run's rows on a line of their own.
    torn = os.path.exists(path) and os.path.getsize(path) > 0 and open(path, 'rb').read()[-1:] != b'\n'
    self._jsonl = open(path, 'a')
    if torn:
      self._jsonl.write('\n')
    try:
      from tensorboardX import SummaryWriter  # optional at import time; listed in requirements
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      self._tb = None
    if sys.stderr.isatty():
      import tqdm
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, unit='step')

  def write(self, step, scalars):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, step)
    self._console(step, scalars)

  def _console(self, step, scalars):
    short = {k.split('/')[-1]: v for k, v in scalars.items()}
    text = ' '.join(f'{k}={v:.4g}' for k, v in short.items())
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix_str(text, refresh=True)
      return
    done = step - self._start_step
    elapsed = time.time() - self._start_time
    eta = elapsed / done * (self._total - step) if done > 0 else float('nan')
    print(f'step {step}/{self._total} {text} eta={eta:.0f}s', flush=True)

  def log(self, message):
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def close(self):
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    self._jsonl.close()
