"""One path layer for every file the project reads or writes: a local path or a URL such as gs://bucket/prefix.

Every workdir, sweep root, report folder, cache ($IMMISCIBLE_JAX_CACHE) and data.path archive goes through these
functions, so any of them may live in a bucket. Local paths use the builtin open and os.replace;
URLs go through `etils.epath`, which reaches gs:// with gcsfs (pinned in requirements.txt; with TensorFlow installed
epath uses tf.io.gfile instead). Orbax checkpoints are not written here: checkpointing.create_manager hands the
workdir to Orbax unchanged (epath for its files, tensorstore for the arrays).

Object stores differ from a disk in three ways that callers see here:
  - no directories: makedirs() does nothing for a URL, and a "folder" exists once an object lies under it;
  - one object write is atomic (readers see the old or the new object, never half of one), so write_*(atomic=True)
    is a plain write for a URL and a temporary file + os.replace locally;
  - no append: a file that grows (metrics.jsonl, TensorBoard events) is kept in memory and the whole object is
    rewritten at each flush (metric_writer.py). GCS also allows about one write per second to one object, so such
    flushes are spaced out.

Two more rules: a workdir may not contain the glob characters [ ] * ? (Orbax globs under it; see
GLOB_CHARACTERS), and create_if_absent / read_with_generation / remove_if_generation give a bucket the one atomic
create-if-absent the workdir lock needs (GCS generation preconditions; locally the lock uses flock instead).

Tests: tests/test_storage.py runs the trainer, sampling, evaluation, launch.sweep and launch.report against
gcp-storage-emulator (a GCS JSON-API server on localhost), with the environment variables of `emulator_env`.
"""
import io
import os
import posixpath

from etils import epath
import numpy as np

from immiscible_jax import errors

# Characters that Orbax's checkpoint code would read as a pattern in a workdir: it globs paths under the workdir
# through etils' epath.glob, which joins the folder and the pattern unescaped (Python's glob locally, fsspec's for
# gs://). With `[1]` in the folder the per-process array index was never merged and no checkpoint read back; `*`
# and `?` can match another run's folders.
GLOB_CHARACTERS = '[]*?'


def default_cache_dir():
  """Where converted weights, reference statistics and decoded images are cached: $IMMISCIBLE_JAX_CACHE (a folder
  or a URL) or ~/.cache/immiscible_jax."""
  return os.environ.get('IMMISCIBLE_JAX_CACHE') or os.path.expanduser('~/.cache/immiscible_jax')


def is_remote(path):
  """True for a URL such as gs://bucket/prefix, False for a local path."""
  return '://' in os.fspath(path)


def as_path(path):
  """An epath.Path (pathlib-like, local or remote)."""
  return epath.Path(path)


def join(base, *parts):
  """base/part/...: posix joining for URLs (keeps 'gs://'), os.path.join for local paths."""
  base = os.fspath(base)
  if is_remote(base):
    return posixpath.join(base, *parts)
  return os.path.join(base, *parts)


def abspath(path):
  """A local path made absolute; a URL unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def check_no_glob_characters(path, what):
  """Raises errors.ConfigError naming `what` (e.g. '--workdir') when `path` holds a GLOB_CHARACTERS character."""
  found = [c for c in GLOB_CHARACTERS if c in os.fspath(path)]
  if found:
    raise errors.ConfigError(
        f'{what}={os.fspath(path)!r}: contains {" ".join(found)}, which Orbax\'s checkpoint code reads as a glob '
        'pattern (its checkpoints would not read back, or another folder would be read); choose a path without '
        f'{" ".join(GLOB_CHARACTERS)}')


def basename(path):
  """The last component, ignoring a trailing slash ('gs://b/run/' -> 'run')."""
  path = os.fspath(path)
  return posixpath.basename(path.rstrip('/')) if is_remote(path) else os.path.basename(os.path.normpath(path))


def dirname(path):
  path = os.fspath(path)
  return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def exists(path):
  path = os.fspath(path)
  return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path):
  path = os.fspath(path)
  return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path):
  """Creates a local folder and its parents (no error when it exists); nothing for a URL (no directories)."""
  path = os.fspath(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def open(path, mode='r'):  # pylint: disable=redefined-builtin
  """A file object. For a URL: 'r'/'rb' stream (seekable), 'w'/'wb' upload the object on close; no 'a'."""
  path = os.fspath(path)
  if not is_remote(path):
    import builtins  # pylint: disable=g-import-not-at-top
    return builtins.open(path, mode)
  if 'a' in mode or '+' in mode:
    raise ValueError(f'{path}: mode {mode!r}; objects in a bucket cannot be appended to or updated in place')
  return epath.Path(path).open(mode)


def read_bytes(path):
  with open(path, 'rb') as f:
    return f.read()


def read_text(path):
  return read_bytes(path).decode('utf-8')


def write_bytes(path, data, atomic=False):
  """Writes `data` to `path`, creating local parent folders. atomic: locally via a temporary file in the same
  folder and os.replace, so a reader (or a killed writer) never leaves a truncated file; a URL is one object
  write, atomic already."""
  path = os.fspath(path)
  if is_remote(path):
    with epath.Path(path).open('wb') as f:
      f.write(data)
    return
  makedirs(os.path.dirname(path) or '.')
  target = f'{path}.{os.getpid()}.tmp' if atomic else path
  try:
    with open(target, 'wb') as f:
      f.write(data)
  except BaseException:
    if atomic and os.path.exists(target):  # a full disk must not leave a 0-byte temporary file behind
      os.remove(target)
    raise
  if atomic:
    os.replace(target, path)


def write_text(path, text, atomic=False):
  write_bytes(path, text.encode('utf-8'), atomic=atomic)


def size(path):
  path = os.fspath(path)
  return epath.Path(path).stat().length if is_remote(path) else os.path.getsize(path)


def fingerprint(path):
  """(size, modification time) of a file: what a cache key needs to notice that the file changed."""
  path = os.fspath(path)
  if is_remote(path):
    st = epath.Path(path).stat()
    return [st.length, st.mtime]
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


def listdir(path):
  """Sorted names of the entries directly under `path`."""
  path = os.fspath(path)
  if is_remote(path):
    return sorted(p.name for p in epath.Path(path).iterdir())
  return sorted(os.listdir(path))


def glob(path, pattern):
  """Sorted paths (as strings) under `path` that match `pattern` ('*/metrics.jsonl')."""
  return sorted(os.fspath(p) for p in epath.Path(path).glob(pattern))


def remove(path):
  path = os.fspath(path)
  if is_remote(path):
    epath.Path(path).unlink()
  else:
    os.remove(path)


def _bucket_object(path):
  """(gcsfs filesystem, bucket, object name) of a gs:// URL: the conditional requests below need GCS itself."""
  import fsspec  # pylint: disable=g-import-not-at-top  # gcsfs registers 'gs'
  path = os.fspath(path)
  if not path.startswith('gs://'):
    raise ValueError(f'{path}: conditional object writes need a gs:// URL')
  fs = fsspec.filesystem('gs')
  bucket, name, _ = fs.split_path(path)
  return fs, bucket, name


def create_if_absent(path, data):
  """gs:// only: writes a new object and returns its generation, or returns None when an object is there already.
  One request with the precondition ifGenerationMatch=0, so of two writers exactly one creates it."""
  fs, bucket, name = _bucket_object(path)
  try:
    fs.pipe_file(path, data, mode='create')
  except FileExistsError:  # 412 Precondition Failed
    return None
  fs.invalidate_cache(path)
  return read_with_generation(path)[1]


def read_with_generation(path):
  """gs:// only: (bytes, generation) of an object, or (None, None) when there is none; the generation is that of
  the bytes returned (read again if the object was replaced in between)."""
  fs, bucket, name = _bucket_object(path)
  for _ in range(5):
    fs.invalidate_cache(path)
    try:
      before = str(fs.info(path)['generation'])
      data = fs.cat_file(path)
      fs.invalidate_cache(path)
      if str(fs.info(path)['generation']) == before:
        return data, before
    except FileNotFoundError:
      return None, None
  raise OSError(f'{path}: the object kept changing while it was read')


def remove_if_generation(path, generation):
  """gs:// only: deletes the object if its generation is still `generation`; returns whether it did."""
  fs, bucket, name = _bucket_object(path)
  try:
    fs.call('DELETE', 'b/{}/o/{}', bucket, name, ifGenerationMatch=str(generation))
  except (FileExistsError, FileNotFoundError):  # 412: replaced since; 404: already gone
    return False
  finally:
    fs.invalidate_cache(path)
  return True


def save_npz(path, atomic=True, **arrays):
  """np.savez to a local path or a URL (atomic by default: caches must never be read half-written)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue(), atomic=atomic)


def load_npz(path):
  """{name: array} of a .npz; from a URL it is read whole first (np.load needs a seekable file)."""
  path = os.fspath(path)
  with np.load(path if not is_remote(path) else io.BytesIO(read_bytes(path))) as npz:
    return {k: npz[k] for k in npz.files}


def save_npy(path, array, atomic=True):
  buffer = io.BytesIO()
  np.save(buffer, array)
  write_bytes(path, buffer.getvalue(), atomic=atomic)


def load_npy(path):
  path = os.fspath(path)
  return np.load(path) if not is_remote(path) else np.load(io.BytesIO(read_bytes(path)))


def emulator_env(url):
  """The environment that points gcsfs, google-cloud-storage and tensorstore (Orbax's array writer) at a GCS
  emulator such as gcp-storage-emulator at `url` (http://127.0.0.1:PORT), as the tests set it."""
  return {'STORAGE_EMULATOR_HOST': url,
          # gcsfs 2026.10 first asks for the bucket type over gRPC, which the emulator does not answer (60 s).
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
          'TENSORSTORE_GCS_HTTP_URL': url,
          'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'x'}
