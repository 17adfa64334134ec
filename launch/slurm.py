r"""Submits the trainer to a SLURM GPU cluster: an sbatch script with one task per GPU, run by srun.

  python -m launch.slurm --nodes=2 --gpus_per_node=8 --time=24:00:00 [--partition=P] [--account=A] [--dry_run] \
      -- --config=configs/cifar10_ct.py --workdir=/shared/runs/ct

The script sets IMMISCIBLE_JAX_DISTRIBUTED=1; jax.distributed.initialize() reads the coordinator, process count and
process id from SLURM's variables and binds each process to the one GPU numbered SLURM_LOCALID (local_device_ids =
[SLURM_LOCALID]). So the job runs one task per GPU (--ntasks-per-node = --gpus-per-node = --gpus_per_node): with
one task per node, JAX would bind that task to GPU 0 alone and leave the node's other GPUs idle (jax #16788). Every
task sees all GPUs of its node (--gpus-per-node, not --gpus-per-task, which hides the GPU that SLURM_LOCALID
names). With --gpus_per_node=0 (a CPU cluster) it runs one task per node. It is written to --script (default
WORKDIR/slurm.sbatch) and submitted with `sbatch --parsable`; the job id goes to WORKDIR/slurm_job_id, and the job's
output to WORKDIR/slurm-<job id>.out. The cluster's filesystem must be shared (the repository and the workdir).
--dry_run prints the script and the sbatch line instead.
"""
import os
import shlex
import subprocess
import sys

from launch import common

JOB_ID_FILE = 'slurm_job_id'


def sbatch_script(trainer_args, *, nodes, gpus_per_node, time, partition='', account='', job_name='immiscible_jax',
                  repo_dir='.', python='.venv/bin/python', output='slurm-%j.out', cpus_per_task=0, env=None):
  """The sbatch script's text: resources as #SBATCH lines, then one `srun` of the trainer on every node."""
  # One JAX process per GPU (see the module docstring), or one per node without GPUs.
  lines = ['#!/bin/bash',
           f'#SBATCH --job-name={job_name}',
           f'#SBATCH --nodes={nodes}',
           f'#SBATCH --ntasks-per-node={gpus_per_node or 1}']
  if gpus_per_node:
    lines.append(f'#SBATCH --gpus-per-node={gpus_per_node}')
  if cpus_per_task:
    lines.append(f'#SBATCH --cpus-per-task={cpus_per_task}')
  lines.append(f'#SBATCH --time={time}')
  if partition:
    lines.append(f'#SBATCH --partition={partition}')
  if account:
    lines.append(f'#SBATCH --account={account}')
  lines += [f'#SBATCH --output={output}', '', 'set -euo pipefail', f'cd {shlex.quote(repo_dir)}',
            f'export {common.DISTRIBUTED_ENV}=1']
  lines += [f'export {key}={shlex.quote(value)}' for key, value in (env or {}).items()]
  lines.append('srun ' + shlex.join([python, '-m', common.TRAINER_MODULE, *trainer_args]))
  return '\n'.join(lines) + '\n'


def script_path(args, trainer_args):
  workdir = common.flag_value(trainer_args, 'workdir')
  return args.script or os.path.join(workdir or '.', 'slurm.sbatch')


def script_for(args, trainer_args):
  workdir = common.flag_value(trainer_args, 'workdir')
  job_name = os.path.basename(os.path.normpath(workdir)) if workdir else 'immiscible_jax'
  return sbatch_script(
      trainer_args, nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time, partition=args.partition,
      account=args.account, job_name=job_name, repo_dir=args.repo_dir, python=args.python,
      output=os.path.join(workdir or '.', 'slurm-%j.out'), cpus_per_task=args.cpus_per_task,
      env=common.parse_env(args.env))


def add_flags(parser):
  parser.add_argument('--nodes', type=int, default=1, help='hosts')
  parser.add_argument('--gpus_per_node', type=int, default=8,
                      help='GPUs per host: one task each (--gpus-per-node=N; 0: no GPUs, one task per host)')
  parser.add_argument('--cpus_per_task', type=int, default=0, help='CPUs per task, i.e. per GPU (0 omits it)')
  parser.add_argument('--time', default='24:00:00', help='wall-clock limit, HH:MM:SS')
  parser.add_argument('--partition', default='', help='SLURM partition (omitted when empty)')
  parser.add_argument('--account', default='', help='SLURM account (omitted when empty)')
  parser.add_argument('--repo_dir', default=os.getcwd(), help='repository on the shared filesystem')
  parser.add_argument('--python', default='.venv/bin/python', help='interpreter, relative to --repo_dir or absolute')
  parser.add_argument('--env', action='append', default=[], help='KEY=VALUE exported for the trainer (repeatable)')
  parser.add_argument('--script', default='', help='where to write the script (default WORKDIR/slurm.sbatch)')


def commands(args, trainer_args):
  return [common.Command(['sbatch', '--parsable', script_path(args, trainer_args)])]


def dry_run_text(args, trainer_args):
  path = script_path(args, trainer_args)
  return f'# {path}\n{script_for(args, trainer_args)}\n# then: {commands(args, trainer_args)[0].shell()}'


def execute(args, trainer_args, log=None):
  """Writes the script, submits it, records the job id beside it. Returns sbatch's exit status."""
  path = script_path(args, trainer_args)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    f.write(script_for(args, trainer_args))
  (command,) = commands(args, trainer_args)
  result = subprocess.run(command.argv, capture_output=True, text=True, check=False)
  if result.returncode:
    print(result.stdout + result.stderr, file=log or sys.stderr)
    return result.returncode
  job_id = result.stdout.strip().split(';')[0]
  with open(os.path.join(os.path.dirname(path) or '.', JOB_ID_FILE), 'w') as f:
    f.write(job_id + '\n')
  print(f'submitted {path} as SLURM job {job_id}', file=log or sys.stdout)
  return 0


def is_active(workdir):
  """True while the job last submitted for this workdir is still queued or running (so a sweep won't resubmit)."""
  try:
    with open(os.path.join(workdir, JOB_ID_FILE)) as f:
      job_id = f.read().strip()
    result = subprocess.run(['squeue', '-h', '-j', job_id, '-o', '%T'], capture_output=True, text=True, check=False)
  except (FileNotFoundError, OSError):
    return False
  return result.returncode == 0 and bool(result.stdout.strip())


def main(argv=None):
  return common.launcher_main(sys.modules[__name__], argv, prog='launch.slurm')


if __name__ == '__main__':
  sys.exit(main())
