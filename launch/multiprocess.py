"""Runs N trainer processes on this host, joined by jax.distributed (for tests and CPU multi-host experiments).

  python -m launch.multiprocess --num_processes=2 --cpu_devices=4 [--dry_run] -- --config=... --workdir=DIR

Every process gets the same command and IMMISCIBLE_JAX_DISTRIBUTED=1, JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT,
JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (main.py passes these to jax.distributed.initialize); with --cpu_devices=K
also JAX_PLATFORMS=cpu and --xla_force_host_platform_device_count=K in XLA_FLAGS (replacing any device count given
there; the launcher's other XLA flags are kept).
Output: every line of process i is printed to stdout prefixed with `[proc i] `. The launcher waits for all; when one
fails it terminates the others (they would hang in a collective) and exits with the failed process's status.
"""
import os
import queue
import socket
import subprocess
import sys
import threading

from launch import common

# Shown in dry runs when no --port is given: a free port is picked when the processes start.
FREE_PORT = '<free port>'
_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def free_port():
  """A TCP port that is free now (the OS picks it; a small race with other programs is accepted)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def cpu_device_flags(xla_flags, cpu_devices):
  """`xla_flags` with its forced CPU device count (if any) replaced by `cpu_devices`."""
  kept = [f for f in xla_flags.split() if not f.startswith(_DEVICE_COUNT_FLAG + '=')]
  return ' '.join([*kept, f'{_DEVICE_COUNT_FLAG}={cpu_devices}'])


def process_commands(argv, num_processes, port, cpu_devices=0):
  """The N commands: the same argv, each with the environment that makes it process i of N."""
  if num_processes < 1:
    raise ValueError(f'--num_processes must be >= 1, got {num_processes}')
  commands = []
  for i in range(num_processes):
    env = {
        common.DISTRIBUTED_ENV: '1',
        'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
        'JAX_NUM_PROCESSES': str(num_processes),
        'JAX_PROCESS_ID': str(i),
    }
    if cpu_devices:
      env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=cpu_device_flags(os.environ.get('XLA_FLAGS', ''), cpu_devices))
    commands.append(common.Command(list(argv), env))
  return commands


def run_processes(commands, out=None):
  """Starts all commands, prefixes their output, waits; on the first failure terminates the rest.

  Returns every process's exit status (negative: killed by that signal).
  """
  out = sys.stdout if out is None else out
  lock = threading.Lock()
  exits = queue.Queue()
  procs = [subprocess.Popen(c.argv, env=c.full_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors='replace') for c in commands]

  def pump(i, proc):
    for line in proc.stdout:
      with lock:
        out.write(f'[proc {i}] {line}')
        out.flush()
    exits.put((i, proc.wait()))

  threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
  for thread in threads:
    thread.start()
  for _ in procs:
    i, status = exits.get()
    if status != 0:
      with lock:
        out.write(f'[multiprocess] process {i} exited with status {status}; terminating the others\n')
      _terminate(procs)
      break
  for thread in threads:
    thread.join()
  return [p.wait() for p in procs]


def _terminate(procs, grace_s=10):
  for proc in procs:
    if proc.poll() is None:
      proc.terminate()
  for proc in procs:
    try:
      proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
      proc.kill()


def first_failure(statuses):
  """0 when every process succeeded, else the first non-zero status in process order."""
  return next((s for s in statuses if s != 0), 0)


def add_flags(parser):
  parser.add_argument('--num_processes', type=int, default=2, help='processes to start on this host')
  parser.add_argument('--cpu_devices', type=int, default=4,
                      help='forced CPU devices per process (sets JAX_PLATFORMS=cpu); 0 leaves the platform alone')
  parser.add_argument('--port', type=int, default=0, help='coordinator port (0: pick a free one at start)')
  parser.add_argument('--python', default=sys.executable, help='Python interpreter that runs the trainer')


def commands(args, trainer_args):
  return process_commands(common.trainer_argv(trainer_args, args.python), args.num_processes,
                          args.port or FREE_PORT, args.cpu_devices)


def execute(args, trainer_args, log=None):
  argv = common.trainer_argv(trainer_args, args.python)
  cmds = process_commands(argv, args.num_processes, args.port or free_port(), args.cpu_devices)
  return first_failure(run_processes(cmds, log))


def main(argv=None):
  return common.launcher_main(sys.modules[__name__], argv, prog='launch.multiprocess')


if __name__ == '__main__':
  sys.exit(main())
