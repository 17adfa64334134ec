r"""Runs the trainer on every worker of a Cloud TPU VM slice with one `gcloud ... ssh --worker=all` line.

  python -m launch.tpu_pod --tpu=NAME --zone=ZONE [--project=P] setup [--dry_run]
  python -m launch.tpu_pod --tpu=NAME --zone=ZONE [--project=P] [--dry_run] -- --config=configs/cifar10_ct.py \
      --workdir=gs://BUCKET/run

`setup` copies the code and builds the environment on all workers: `git archive HEAD` makes a tarball of the
*committed* code (commit first; no .venv, no outputs), `gcloud ... scp --worker=all` copies it to every worker's
home, and `ssh --worker=all` unpacks it into --repo_dir and installs requirements.txt plus `jax[tpu]` into
--repo_dir/.venv. The run line cds into --repo_dir (relative to the remote home), sets IMMISCIBLE_JAX_DISTRIBUTED=1
(jax.distributed.initialize() finds the slice's other workers by itself on a TPU VM) and runs the venv's python.
The workdir must be storage every worker sees (a gs:// bucket or a shared mount): checkpoints are saved collectively.
"""
import argparse
import os
import shlex
import sys

from launch import common

_GCLOUD_TPU = ['gcloud', 'compute', 'tpus', 'tpu-vm']


def _where(zone, project):
  return [f'--zone={zone}'] + ([f'--project={project}'] if project else [])


def remote_run_line(trainer_args, repo_dir='immiscible_jax', python='.venv/bin/python', env=None):
  """The shell line each worker runs: cd into the code, mark the run distributed, start the trainer."""
  assignments = [f'{key}={shlex.quote(value)}' for key, value in {common.DISTRIBUTED_ENV: '1', **(env or {})}.items()]
  trainer = shlex.join([python, '-m', common.TRAINER_MODULE, *trainer_args])
  return f'cd {shlex.quote(repo_dir)} && ' + ' '.join(assignments + [trainer])


def pod_command(trainer_args, tpu, zone, project='', repo_dir='immiscible_jax', python='.venv/bin/python',
                env=None):
  """The gcloud command that runs the same trainer command on all workers of the slice at once."""
  remote = remote_run_line(trainer_args, repo_dir, python, env)
  return common.Command(_GCLOUD_TPU + ['ssh', tpu, *_where(zone, project), '--worker=all', '--command', remote])


def setup_commands(tpu, zone, project='', repo_dir='immiscible_jax', archive='/tmp/immiscible_jax.tar.gz'):
  """Three local commands: archive the committed code, copy it to every worker, unpack and install there."""
  remote_archive = os.path.basename(archive)
  install = (f'mkdir -p {shlex.quote(repo_dir)} && tar -xzf {shlex.quote(remote_archive)} -C {shlex.quote(repo_dir)}'
             f' && cd {shlex.quote(repo_dir)} && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip'
             ' && .venv/bin/pip install -q -r requirements.txt "jax[tpu]"')
  return [
      common.Command(['git', 'archive', '--format=tar.gz', f'--output={archive}', 'HEAD']),
      common.Command(_GCLOUD_TPU + ['scp', archive, f'{tpu}:{remote_archive}', *_where(zone, project),
                                    '--worker=all']),
      common.Command(_GCLOUD_TPU + ['ssh', tpu, *_where(zone, project), '--worker=all', '--command', install]),
  ]


def add_flags(parser):
  parser.add_argument('--tpu', required=True, help='TPU VM name')
  parser.add_argument('--zone', required=True, help='its zone, e.g. us-central2-b')
  parser.add_argument('--project', default='', help='Google Cloud project (default: gcloud\'s configured one)')
  parser.add_argument('--repo_dir', default='immiscible_jax', help='code directory on the workers (under home)')
  parser.add_argument('--python', default='.venv/bin/python', help='interpreter on the workers, within --repo_dir')
  parser.add_argument('--env', action='append', default=[], help='KEY=VALUE set for the trainer (repeatable)')


def commands(args, trainer_args):
  return [pod_command(trainer_args, args.tpu, args.zone, args.project, args.repo_dir, args.python,
                      common.parse_env(args.env))]


def execute(args, trainer_args, log=None):
  (command,) = commands(args, trainer_args)
  return command.run(log)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  own, trainer_args = common.split_argv(argv)
  parser = argparse.ArgumentParser(prog='launch.tpu_pod', description=__doc__.splitlines()[0])
  parser.add_argument('action', nargs='?', choices=['run', 'setup'], default='run')
  parser.add_argument('--dry_run', action='store_true', help='print the commands instead of running them')
  add_flags(parser)
  args = parser.parse_args(own)
  if args.action == 'setup':
    cmds = setup_commands(args.tpu, args.zone, args.project, args.repo_dir)
  elif not trainer_args:
    parser.error('give the trainer arguments after "--", e.g. -- --config=configs/cifar10_ct.py --workdir=gs://B/R')
  else:
    cmds = commands(args, trainer_args)
  if args.dry_run:
    print('\n'.join(c.shell() for c in cmds))
    return 0
  for command in cmds:
    status = command.run()
    if status:
      return status
  return 0


if __name__ == '__main__':
  sys.exit(main())
