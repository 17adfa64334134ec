"""One trainer per workdir: an exclusive lock, taken before the trainer reads or writes anything in the workdir.

The lock is WORKDIR/lock.json; it records its owner: host, pid, the time it was taken (UTC) and the command line.
- Local folder: the file is locked with flock(2), which the kernel holds for the process and drops when the
  process ends, however it ends (SIGKILL included). So a local lock never goes stale: a lock.json left by a killed
  run is unlocked, and the next trainer takes it over, saying whose it was. (flock is honoured across hosts on
  NFSv4; where a network filesystem does not support it, the run says so and goes on without a lock.)
- gs:// URL: the object is created with the precondition ifGenerationMatch=0, so of two trainers exactly one
  creates it, and deleted at the end only if it is still the one created (ifGenerationMatch=its generation).
  A bucket knows no processes, so a lock left by a killed run stays. The rule: an owner on this host whose pid
  no longer runs is gone, and its lock is taken over (a conditional delete, then the create), saying so; any
  other owner is taken to be running, and the trainer is refused with the command that removes the lock for the
  case where that run is known to be gone (killed on another machine).
A refused trainer stops with one line naming the owner (errors.ConfigError: `error: ...`, exit status 2) and
touches nothing; the running trainer is not affected. With several processes, process 0 takes the lock and the
others learn the outcome from it (the distributed key-value store), so all of them go on or all stop.
"""
import contextlib
import errno
import json
import os
import socket
import sys
import time

from immiscible_jax import errors
from immiscible_jax import storage

LOCK_NAME = 'lock.json'


@contextlib.contextmanager
def hold(workdir, log=print):
  """Holds the workdir's lock for the `with` block; raises errors.ConfigError when another trainer holds it."""
  release = _agreed(lambda: _acquire(workdir, log))
  try:
    yield
  finally:
    release()


def _acquire(workdir, log):
  """Takes the lock; returns the function that releases it."""
  path = storage.join(workdir, LOCK_NAME)
  owner = {'host': socket.gethostname(), 'pid': os.getpid(),
           'since': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()), 'command': ' '.join(sys.argv)[:1000]}
  if storage.is_remote(workdir):
    return _acquire_remote(workdir, path, owner, log)
  return _acquire_local(workdir, path, owner, log)


def _describe(owner):
  return f'host {owner.get("host", "?")}, pid {owner.get("pid", "?")}, since {owner.get("since", "?")}'


def _parse(data):
  try:
    owner = json.loads(data)
  except ValueError:
    return {}
  return owner if isinstance(owner, dict) else {}


def _refusal(workdir, path, holder, remedy):
  return errors.ConfigError(f'--workdir={workdir}: another trainer is running in it ({_describe(holder)}; lock '
                            f'{path}); {remedy}')


# ---------------------------------------------------------------------------------------------------- local


def _read_fd(fd):
  return os.pread(fd, 1 << 16, 0).decode('utf-8', 'replace')


def _same_file(fd, path):
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return False
  return (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)


def _acquire_local(workdir, path, owner, log):
  import fcntl  # pylint: disable=g-import-not-at-top  # POSIX only, like the rest of the trainer's set-up
  for _ in range(20):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _parse(_read_fd(fd))
      os.close(fd)
      raise _refusal(workdir, path, holder, 'wait for it to finish, stop it, or use another --workdir') from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      os.close(fd)
      log(f'note: the filesystem of {workdir} does not support flock ({e.strerror}); training without a workdir '
          'lock: start one trainer at a time there')
      return lambda: None
    if not _same_file(fd, path):  # its holder removed it between our open and our flock: open the new one
      os.close(fd)
      continue
    previous = _parse(_read_fd(fd))
    if previous:
      log(f'note: took over the workdir lock left by a run that ended without releasing it ({_describe(previous)}; '
          'its process is gone: the kernel had released its flock)')
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + '\n').encode(), 0)
    os.fsync(fd)

    def release():
      os.unlink(path)  # while still locked, so that the next trainer opens a new file, never this one
      os.close(fd)

    return release
  raise OSError(f'{path}: could not take the lock (its file kept being replaced)')


# ---------------------------------------------------------------------------------------------------- gs://


def _running_here(holder):
  """True unless the holder is on this host and its pid no longer runs."""
  pid = holder.get('pid')
  if holder.get('host') != socket.gethostname() or not isinstance(pid, int):
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: it runs
    pass
  return True


def _acquire_remote(workdir, path, owner, log):
  data = (json.dumps(owner) + '\n').encode()
  for _ in range(5):
    generation = storage.create_if_absent(path, data)
    if generation is not None:
      return lambda: storage.remove_if_generation(path, generation)
    existing, held = storage.read_with_generation(path)
    if existing is None:
      continue  # released in between: try to create it again
    holder = _parse(existing)
    if _running_here(holder):
      raise _refusal(workdir, path, holder, 'wait for it to finish, or use another --workdir; if that run is gone '
                     f'(killed on another machine), remove the lock: gcloud storage rm {path}')
    if storage.remove_if_generation(path, held):
      log(f'note: took over the stale workdir lock of a run on this host whose process is gone '
          f'({_describe(holder)}; {path})')
  raise OSError(f'{path}: could not take the lock (the object kept changing)')


# ---------------------------------------------------------------------------------------------------- processes


def _agreed(acquire):
  """acquire() in process 0, its outcome shared with every process (agreement.from_process0): the release
  function (a no-op elsewhere), or the ConfigError raised in every process."""
  import jax  # pylint: disable=g-import-not-at-top
  from immiscible_jax.parallel import agreement  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return acquire()
  release, refusal = (lambda: None), ''
  if jax.process_index() == 0:
    try:
      release = acquire()
    except errors.ConfigError as e:
      refusal = str(e)
    except Exception as e:  # the others must not wait for an answer that never comes
      agreement.from_process0('workdir_lock',
                              f'refused: process 0 could not take the workdir lock ({type(e).__name__}: {e})')
      raise
    answer = agreement.from_process0('workdir_lock', 'refused: ' + refusal if refusal else 'held')
  else:
    answer = agreement.from_process0('workdir_lock')
  refusal = answer[len('refused: '):] if answer.startswith('refused: ') else ''
  if refusal:
    raise errors.ConfigError(refusal)
  return release
