"""Where scalars go: metrics.jsonl and TensorBoard in the workdir, and the console (progress bar on a terminal).

Only process 0 writes; the others get a writer that does nothing, so callers need no `if` of their own.

The workdir may be a bucket (gs://...; storage.py). Objects cannot be appended to, so for a URL both files are
kept in memory and rewritten whole: metrics.jsonl at a write at most every REMOTE_FLUSH_SECS (GCS takes about one
write per second to an object) and at close(); the TensorBoard event file at tensorboardX's own flushes (every
REMOTE_FLUSH_SECS) and at close(). A hard kill loses at most the rows of the last REMOTE_FLUSH_SECS; the resumed run
logs from its checkpoint on. TensorBoard: tensorboardX's SummaryWriter with a record writer of ours for the URL's
scheme, which buffers the event file and uploads it through storage.py at each flush. Not tensorboardX's bundled
gs:// writer (its own google-cloud-storage client: a second set of credentials and settings beside gcsfs, gs://
only, and it rewrites the object from __del__ at interpreter exit) and not tf.summary (needs TensorFlow); nor a
local temporary folder uploaded at each flush, which would write under the local disk. A local workdir gets
metrics.jsonl appended and flushed at every write, and TensorBoard through tensorboardX's file writer.
"""
import io
import json
import sys
import time

import jax

from immiscible_jax import storage

# Least seconds between two uploads of one growing object (metrics.jsonl, an event file) in a bucket.
REMOTE_FLUSH_SECS = 10.0


class _RemoteText:
  """A text file in a bucket that grows: kept whole in memory, uploaded at flush() (file-like for write/flush)."""

  def __init__(self, path, initial=''):
    self._path, self._text, self._dirty, self._last = path, initial, False, 0.0

  def write(self, text):
    self._text += text
    self._dirty = True

  def flush(self, force=False):
    if self._dirty and (force or time.time() - self._last >= REMOTE_FLUSH_SECS):
      storage.write_text(self._path, self._text)
      self._dirty, self._last = False, time.time()

  def close(self):
    self.flush(force=True)


class _RemoteRecordFile:
  """tensorboardX record file for a URL: buffers the event file and uploads it whole through storage.py."""

  def __init__(self, path):
    self._path, self._buffer, self._uploaded = path, io.BytesIO(), -1

  def write(self, data):
    self._buffer.write(data)

  def flush(self):
    if self._buffer.tell() != self._uploaded:
      storage.write_bytes(self._path, self._buffer.getvalue())
      self._uploaded = self._buffer.tell()

  def close(self):
    self.flush()


class _RemoteRecordFactory:

  def open(self, path):
    return _RemoteRecordFile(path)

  def directory_check(self, path):
    del path  # a bucket has no folders to create


def _summary_writer(logdir):
  """tensorboardX's SummaryWriter for a local folder or a URL; None without tensorboardX."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  # in requirements
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if not storage.is_remote(logdir):
    return SummaryWriter(logdir)
  record_writer.register_writer_factory(logdir.split('://')[0], _RemoteRecordFactory())
  return SummaryWriter(logdir, flush_secs=REMOTE_FLUSH_SECS)


# What the console shows of a log row (metrics.jsonl and TensorBoard get every value): short name and format.
_CONSOLE = (('train/loss', 'loss', '{:.4g}'), ('assignment/reduction_pct', 'reduction', '{:.2f}%'),
            ('perf/images_per_sec', 'img/s', '{:.0f}'))


def console_summary(scalars):
  """'loss=0.0123 reduction=2.41% img/s=111' plus every eval/* value: the numbers that matter, in 80 columns."""
  parts = [f'{short}={fmt.format(scalars[key])}' for key, short, fmt in _CONSOLE if key in scalars]
  parts += [f'{key.split("/", 1)[1]}={value:.4g}' for key, value in scalars.items() if key.startswith('eval/')]
  return ' '.join(parts)


def format_seconds(seconds):
  """3725 -> '1h02m', 125 -> '2m05s', 7 -> '7s'."""
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


class MetricWriter:
  """Writes one JSON line per call to workdir/metrics.jsonl, TensorBoard scalars and a console line."""

  def __init__(self, workdir, total_steps, initial_step=0, enabled=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._total, self._start_step, self._start_time = total_steps, initial_step, time.time()
    self._bar = self._tb = self._jsonl = None
    if not self.enabled:
      return
    storage.makedirs(workdir)
    path = storage.join(workdir, 'metrics.jsonl')
    # A hard kill can leave a half-written last line: start the resumed run's rows on a line of their own.
    if storage.is_remote(path):
      old = storage.read_text(path) if storage.exists(path) else ''
      self._jsonl = _RemoteText(path, old + ('\n' if old and not old.endswith('\n') else ''))
    else:
      torn = storage.exists(path) and storage.size(path) > 0 and storage.read_bytes(path)[-1:] != b'\n'
      self._jsonl = storage.open(path, 'a')  # pylint: disable=consider-using-with
      if torn:
        self._jsonl.write('\n')
    self._tb = _summary_writer(storage.join(workdir, 'tensorboard'))
    if sys.stderr.isatty():
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, unit='step')

  def start_clock(self, step):
    """ETA counts from here: call once the step is compiled, with the step the run starts from (not 0 on a
    resume), so neither compilation nor the steps of an earlier run distort it."""
    self._start_step, self._start_time = step, time.time()
    if self._bar is not None:
      self._bar.reset(total=self._total)
      self._bar.update(step)

  def advance(self, step):
    """Moves the progress bar to `step` (every dispatch, between logs); no output without a terminal."""
    if self._bar is not None and step > self._bar.n:
      self._bar.update(step - self._bar.n)

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
    text = console_summary(scalars)
    if self._bar is not None:
      self.advance(step)
      if text:
        self._bar.set_postfix_str(text, refresh=True)
      return
    done = step - self._start_step
    elapsed = time.time() - self._start_time
    eta = f' eta {format_seconds(elapsed / done * (self._total - step))}' if done > 0 else ''
    print(f'step {step}/{self._total} {text}{eta}', flush=True)

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
