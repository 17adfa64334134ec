"""Launchers and sweeps: the generated commands, real multi-process runs of tiny Python programs, and sweep
expansion (deterministic, idempotent, skips finished arms, relaunches unfinished ones). No training is launched."""
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap

import pytest

from launch import common
from launch import local
from launch import multiprocess
from launch import slurm
from launch import sweep
from launch import tpu_pod

TRAINER_ARGS = ['--config=configs/digits.py', '--workdir=/runs/a', '--config.model.ch_mult=(1,2)']
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_override_flags_format_values_as_config_flags_parses_them():
  flags = common.override_flags({'assignment.method': 'knn', 'seed': 2, 'model.ch_mult': (1, 2, 2),
                                 'model.attn_resolutions': (16,), 'data.random_flip': False, 'optim.lr': 0.0004})
  assert flags == ['--config.assignment.method=knn', '--config.seed=2', '--config.model.ch_mult=(1,2,2)',
                   '--config.model.attn_resolutions=(16,)', '--config.data.random_flip=False', '--config.optim.lr=0.0004']


def test_split_argv_and_flag_value():
  own, trainer = common.split_argv(['--dry_run', '--', '--workdir', 'W', '--x=1', '--'])
  assert own == ['--dry_run'] and trainer == ['--workdir', 'W', '--x=1', '--']
  assert common.flag_value(trainer, 'workdir') == 'W'
  assert common.flag_value(['--workdir=A', '--workdir=B'], 'workdir') == 'B'
  assert common.flag_value(['--workdirx=A'], 'workdir') is None


def test_local_command_is_the_trainer_with_args_unchanged():
  (cmd,) = local.local_commands(TRAINER_ARGS, python='py')
  assert cmd.argv == ['py', '-m', 'immiscible_jax.main', *TRAINER_ARGS]
  assert cmd.env == {}
  assert shlex.split(cmd.shell()) == cmd.argv  # the printed line pastes back to the same argv


def test_multiprocess_commands_set_the_distributed_environment(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1')
  cmds = multiprocess.process_commands(['py', '-m', 'immiscible_jax.main', *TRAINER_ARGS], 3, 12345, cpu_devices=4)
  assert len(cmds) == 3
  for i, cmd in enumerate(cmds):
    assert cmd.argv == ['py', '-m', 'immiscible_jax.main', *TRAINER_ARGS]
    assert cmd.env == {'IMMISCIBLE_JAX_DISTRIBUTED': '1', 'JAX_COORDINATOR_ADDRESS': '127.0.0.1:12345',
                       'JAX_NUM_PROCESSES': '3', 'JAX_PROCESS_ID': str(i), 'JAX_PLATFORMS': 'cpu',
                       'XLA_FLAGS': '--xla_backend_optimization_level=1 --xla_force_host_platform_device_count=4'}
  no_cpu = multiprocess.process_commands(['py'], 2, 1, cpu_devices=0)
  assert 'XLA_FLAGS' not in no_cpu[0].env and 'JAX_PLATFORMS' not in no_cpu[0].env


_PRINT_ENV = ('import os; print(" ".join(os.environ[k] for k in ("JAX_PROCESS_ID", "JAX_NUM_PROCESSES", '
              '"JAX_COORDINATOR_ADDRESS", "IMMISCIBLE_JAX_DISTRIBUTED", "XLA_FLAGS")))')


def test_multiprocess_runs_n_processes_with_their_environment(tmp_path, monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  cmds = multiprocess.process_commands([sys.executable, '-c', _PRINT_ENV], 3, 23456, cpu_devices=2)
  log = tmp_path / 'out.txt'
  with open(log, 'w') as out:
    statuses = multiprocess.run_processes(cmds, out)
  assert statuses == [0, 0, 0]
  lines = sorted(log.read_text().splitlines())
  assert lines == [f'[proc {i}] {i} 3 127.0.0.1:23456 1 --xla_force_host_platform_device_count=2' for i in range(3)]


def test_multiprocess_failure_terminates_the_others_and_propagates(tmp_path):
  # Process 1 fails at once; 0 and 2 would sleep for 10 minutes unless the launcher terminates them.
  code = ('import os, sys, time\nif os.environ["JAX_PROCESS_ID"] == "1": sys.exit(3)\n'
          'print("sleeping", flush=True); time.sleep(600)')
  cmds = multiprocess.process_commands([sys.executable, '-c', code], 3, 1, cpu_devices=0)
  with open(tmp_path / 'out.txt', 'w') as out:
    statuses = multiprocess.run_processes(cmds, out)
  assert statuses[1] == 3
  assert statuses[0] == statuses[2] == -signal.SIGTERM
  assert multiprocess.first_failure(statuses) == -signal.SIGTERM  # process order: the first non-zero status
  assert 'process 1 exited with status 3' in (tmp_path / 'out.txt').read_text()


def test_multiprocess_main_prefixes_output_and_returns_the_failure(capsys):
  # `echo` and `false` stand in for the interpreter: they ignore `-m immiscible_jax.main ...` and exit 0 and 1.
  assert multiprocess.main(['--num_processes=2', '--cpu_devices=0', '--python=echo', '--', 'hi']) == 0
  out = sorted(capsys.readouterr().out.splitlines())
  assert out == ['[proc 0] -m immiscible_jax.main hi', '[proc 1] -m immiscible_jax.main hi']
  assert multiprocess.main(['--num_processes=2', '--cpu_devices=0', '--python=false', '--', 'hi']) == 1


def test_tpu_pod_runs_the_same_command_on_every_worker():
  cmd = tpu_pod.pod_command(TRAINER_ARGS, 'my-tpu', 'us-central2-b', 'proj', repo_dir='code dir',
                            env={'TFDS_DATA_DIR': 'gs://b/tfds'})
  assert cmd.argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu']
  assert {'--zone=us-central2-b', '--project=proj', '--worker=all'} <= set(cmd.argv)
  remote = cmd.argv[cmd.argv.index('--command') + 1]
  assert shlex.split(remote) == ['cd', 'code dir', '&&', 'IMMISCIBLE_JAX_DISTRIBUTED=1', 'TFDS_DATA_DIR=gs://b/tfds',
                                 '.venv/bin/python', '-m', 'immiscible_jax.main', *TRAINER_ARGS]
  assert shlex.split(cmd.shell()) == cmd.argv
  no_project = tpu_pod.pod_command(TRAINER_ARGS, 'my-tpu', 'z')
  assert not any(a.startswith('--project') for a in no_project.argv)


def test_tpu_pod_setup_copies_the_committed_code_to_all_workers():
  archive, scp, ssh = tpu_pod.setup_commands('my-tpu', 'z', 'proj', repo_dir='code', archive='/tmp/c.tar.gz')
  assert archive.argv == ['git', 'archive', '--format=tar.gz', '--output=/tmp/c.tar.gz', 'HEAD']
  assert scp.argv[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert {'/tmp/c.tar.gz', 'my-tpu:c.tar.gz', '--worker=all', '--zone=z', '--project=proj'} <= set(scp.argv)
  install = ssh.argv[ssh.argv.index('--command') + 1]
  assert '--worker=all' in ssh.argv and 'tar -xzf c.tar.gz -C code' in install
  assert 'pip install -q -r requirements.txt "jax[tpu]"' in install


def test_tpu_pod_dry_run_prints_and_runs_nothing(capsys, monkeypatch):
  monkeypatch.setattr(subprocess, 'run', lambda *a, **k: pytest.fail('ran a command in a dry run'))
  assert tpu_pod.main(['--tpu=t', '--zone=z', '--dry_run', '--', *TRAINER_ARGS]) == 0
  assert capsys.readouterr().out.startswith('gcloud compute tpus tpu-vm ssh t --zone=z --worker=all --command ')


def test_slurm_script_runs_one_task_per_gpu():
  script = slurm.sbatch_script(TRAINER_ARGS, nodes=4, gpus_per_node=8, time='12:00:00', partition='gpu',
                               account='acct', job_name='a', repo_dir='/shared/repo', output='/runs/a/slurm-%j.out',
                               env={'TFDS_DATA_DIR': '/data'})
  lines = script.splitlines()
  assert lines[0] == '#!/bin/bash'
  assert not any('gpus-per-task' in line or '--gres' in line for line in lines)
  for line in ('#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=8', '#SBATCH --gpus-per-node=8', '#SBATCH --time=12:00:00',
               '#SBATCH --partition=gpu', '#SBATCH --account=acct', '#SBATCH --job-name=a',
               '#SBATCH --output=/runs/a/slurm-%j.out', 'cd /shared/repo', 'export IMMISCIBLE_JAX_DISTRIBUTED=1',
               'export TFDS_DATA_DIR=/data'):
    assert line in lines
  assert shlex.split(lines[-1]) == ['srun', '.venv/bin/python', '-m', 'immiscible_jax.main', *TRAINER_ARGS]
  bare = slurm.sbatch_script(TRAINER_ARGS, nodes=1, gpus_per_node=0, time='1:00:00')
  assert '--partition' not in bare and '--account' not in bare and '--gpus' not in bare
  assert '#SBATCH --ntasks-per-node=1' in bare.splitlines()  # no GPUs: one task per node


def _sbatch_value(script, name):
  (value,) = [line.split('=', 1)[1] for line in script.splitlines() if line.startswith(f'#SBATCH --{name}=')]
  return int(value)


def test_slurm_tasks_make_every_gpu_of_every_node_a_device(monkeypatch):
  """What jax.distributed.initialize() derives from the variables SLURM sets for each task of the script: every
  (node, GPU) pair is one process's device, with one coordinator and consistent process ids. SLURM's variables are
  written here from the script's #SBATCH lines the way srun sets them (block distribution of tasks over nodes)."""
  from jax._src.clusters import cluster  # pylint: disable=g-import-not-at-top  # JAX's own SLURM detection
  script = slurm.sbatch_script(TRAINER_ARGS, nodes=3, gpus_per_node=4, time='1:00:00')
  nodes, per_node, gpus = (_sbatch_value(script, k) for k in ('nodes', 'ntasks-per-node', 'gpus-per-node'))
  for key in list(os.environ):
    if key.startswith(('SLURM_', 'OMPI_', 'PMI_', 'TPU_', 'CLOUD_TPU', 'JAX_')):
      monkeypatch.delenv(key)
  bound, coordinators = set(), set()
  for task in range(nodes * per_node):
    for key, value in {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': f'gpu[001-{nodes:03d}]',
                       'SLURM_NTASKS': str(nodes * per_node), 'SLURM_PROCID': str(task),
                       'SLURM_LOCALID': str(task % per_node), 'SLURM_STEP_NUM_NODES': str(nodes)}.items():
      monkeypatch.setenv(key, value)
    address, count, process_id, local_ids = cluster.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, None)
    assert (count, process_id) == (nodes * per_node, task)
    coordinators.add(address)
    bound |= {(task // per_node, gpu) for gpu in local_ids}
  assert coordinators == {'gpu001:' + str(4242 % 2 ** 12 + 65535 - 2 ** 12 + 1)}
  assert bound == {(node, gpu) for node in range(nodes) for gpu in range(gpus)}  # 12 GPUs, each once


def test_slurm_dry_run_prints_the_script_and_does_not_submit(capsys, monkeypatch, tmp_path):
  monkeypatch.setattr(subprocess, 'run', lambda *a, **k: pytest.fail('called sbatch in a dry run'))
  workdir = tmp_path / 'run'
  assert slurm.main(['--nodes=2', '--repo_dir=/r', '--dry_run', '--', f'--workdir={workdir}']) == 0
  out = capsys.readouterr().out
  assert '#SBATCH --nodes=2' in out and f'sbatch --parsable {workdir}/slurm.sbatch' in out
  assert not workdir.exists()


def test_slurm_execute_writes_script_and_records_job_id(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(subprocess, 'run', lambda argv, **k: calls.append(argv) or subprocess.CompletedProcess(
      argv, 0, stdout='4242;cluster\n', stderr=''))
  workdir = tmp_path / 'run'
  assert slurm.main(['--nodes=2', '--repo_dir=/r', '--', f'--workdir={workdir}']) == 0
  assert calls == [['sbatch', '--parsable', f'{workdir}/slurm.sbatch']]
  assert '#SBATCH --nodes=2' in (workdir / 'slurm.sbatch').read_text()
  assert (workdir / 'slurm_job_id').read_text().strip() == '4242'


# --- Sweeps -------------------------------------------------------------------------------------------------


@pytest.fixture
def sweep_file(tmp_path):
  """A base config with training.num_steps=100 and a 2 x 2 sweep, one arm overriding num_steps to 50."""
  (tmp_path / 'base.py').write_text(textwrap.dedent('''
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict({'seed': 0, 'training': {'num_steps': 100}, 'assignment': {'method': 'none'}})
      '''))
  path = tmp_path / 'sweep_file.py'
  path.write_text(textwrap.dedent(f'''
      CONFIG = {str(tmp_path / 'base.py')!r}
      def get_sweep():
        for method in ('none', 'knn'):
          for seed in (0, 1):
            overrides = {{'assignment.method': method, 'seed': seed}}
            if method == 'knn' and seed == 1:
              overrides['training.num_steps'] = 50
            yield f'method={{method}},seed={{seed}}', overrides
      '''))
  return str(path)


class StubRunner:
  """Stands in for a launcher: records the trainer args of every launch and 'finishes' the arm by writing done.json."""

  def __init__(self, finish=True):
    self.launched, self.finish = [], finish

  def __call__(self, args, trainer_args, log=None):
    self.launched.append(trainer_args)
    workdir = common.flag_value(trainer_args, 'workdir')
    if self.finish:
      os.makedirs(workdir, exist_ok=True)
      steps = 50 if 'method=knn,seed=1' in workdir else 100
      with open(os.path.join(workdir, 'done.json'), 'w') as f:
        json.dump({'step': steps}, f)
    return 0


def _done(root, name, step):
  os.makedirs(os.path.join(root, name), exist_ok=True)
  with open(os.path.join(root, name, 'done.json'), 'w') as f:
    json.dump({'step': step}, f)


def test_expand_is_deterministic_with_overrides_and_targets(sweep_file, tmp_path):
  root = str(tmp_path / 'root')
  config, plan = sweep.expand(sweep_file, root, ['--config.training.log_every_steps=5'])
  assert sweep.expand(sweep_file, root, ['--config.training.log_every_steps=5']) == (config, plan)
  assert [a['name'] for a in plan] == ['method=none,seed=0', 'method=none,seed=1', 'method=knn,seed=0',
                                       'method=knn,seed=1']
  assert [a['num_steps'] for a in plan] == [100, 100, 100, 50]
  assert plan[2]['trainer_args'] == [f'--config={config}', f'--workdir={root}/method=knn,seed=0', '--mode=train',
                                     '--config.assignment.method=knn', '--config.seed=0',
                                     '--config.training.log_every_steps=5']
  _, longer = sweep.expand(sweep_file, root, ['--config.training.num_steps=7'])
  assert [a['num_steps'] for a in longer] == [7, 7, 7, 7]  # extra args win


def test_sweep_skips_finished_and_relaunches_unfinished(sweep_file, tmp_path, monkeypatch, capsys):
  root = str(tmp_path / 'root')
  _done(root, 'method=none,seed=0', 100)  # finished
  _done(root, 'method=none,seed=1', 60)  # stopped early (done.json of a shorter run): unfinished
  _done(root, 'method=knn,seed=1', 50)  # finished: this arm's target is 50
  stub = StubRunner()
  monkeypatch.setattr(local, 'execute', stub)
  argv = [f'--sweep={sweep_file}', '--runner=local', f'--root={root}']
  assert sweep.main(argv) == 0
  launched = [common.flag_value(a, 'workdir') for a in stub.launched]
  assert launched == [f'{root}/method=none,seed=1', f'{root}/method=knn,seed=0']
  record = (tmp_path / 'root' / 'sweep.json').read_text()
  assert [a['name'] for a in json.loads(record)['arms']] == ['method=none,seed=0', 'method=none,seed=1',
                                                              'method=knn,seed=0', 'method=knn,seed=1']
  # Second run: everything is finished, nothing is launched, the record is rewritten byte for byte.
  stub.launched.clear()
  assert sweep.main(argv) == 0
  assert stub.launched == []
  assert (tmp_path / 'root' / 'sweep.json').read_text() == record
  assert capsys.readouterr().out.count('skipped, finished') == 2 + 4


def test_sweep_reports_failed_arms(sweep_file, tmp_path, monkeypatch):
  monkeypatch.setattr(local, 'execute', lambda args, trainer_args, log=None: 5)
  assert sweep.main([f'--sweep={sweep_file}', f'--root={tmp_path}/root']) == 1


def test_sweep_parallel_writes_each_arms_output_to_its_log(sweep_file, tmp_path, monkeypatch):
  def execute(args, trainer_args, log=None):
    log.write('hello from ' + common.flag_value(trainer_args, 'workdir') + '\n')
    return 0
  monkeypatch.setattr(local, 'execute', execute)
  root = tmp_path / 'root'
  assert sweep.main([f'--sweep={sweep_file}', f'--root={root}', '--parallel=2']) == 0
  assert (root / 'method=knn,seed=1' / 'launch.log').read_text() == f'hello from {root}/method=knn,seed=1\n'


def test_sweep_dry_run_prints_the_plan_and_writes_nothing(sweep_file, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(local, 'execute', lambda *a, **k: pytest.fail('launched in a dry run'))
  root = tmp_path / 'root'
  _done(str(root), 'method=none,seed=0', 100)
  assert sweep.main([f'--sweep={sweep_file}', f'--root={root}', '--runner=multiprocess', '--num_processes=2',
                     '--dry_run']) == 0
  out = capsys.readouterr().out
  assert '# method=none,seed=0: finished, would skip' in out and '# method=knn,seed=1: would launch' in out
  assert out.count('JAX_PROCESS_ID=1') == 4
  assert not (root / 'sweep.json').exists()


def test_sweep_slurm_does_not_resubmit_a_queued_arm(sweep_file, tmp_path, monkeypatch):
  monkeypatch.setattr(slurm, 'is_active', lambda workdir: workdir.endswith('method=none,seed=0'))
  stub = StubRunner(finish=False)
  monkeypatch.setattr(slurm, 'execute', stub)
  root = str(tmp_path / 'root')
  assert sweep.main([f'--sweep={sweep_file}', '--runner=slurm', f'--root={root}']) == 0
  assert [common.flag_value(a, 'workdir') for a in stub.launched] == [
      f'{root}/method=none,seed=1', f'{root}/method=knn,seed=0', f'{root}/method=knn,seed=1']


@pytest.mark.parametrize('bad', ['../escape', 'a/b', 'two words', ''])
def test_sweep_rejects_unsafe_arm_names(tmp_path, bad):
  path = tmp_path / 'bad_sweep.py'
  path.write_text(f'CONFIG = "x.py"\ndef get_sweep():\n  return [({bad!r}, {{}})]\n')
  with pytest.raises(ValueError, match='arm name'):
    sweep.load_sweep(str(path))


def test_sweep_rejects_duplicate_arm_names(tmp_path):
  path = tmp_path / 'dup_sweep.py'
  path.write_text('CONFIG = "x.py"\ndef get_sweep():\n  return [("a", {}), ("a", {"seed": 1})]\n')
  with pytest.raises(ValueError, match='twice'):
    sweep.load_sweep(str(path))


@pytest.mark.parametrize('name', ['assignment_digits', 'assignment_cifar10'])
def test_shipped_sweeps_cover_methods_by_seeds_with_existing_keys(name):
  from configs import default  # pylint: disable=g-import-not-at-top
  config_spec, arms = sweep.load_sweep(os.path.join(REPO, 'configs', 'sweeps', f'{name}.py'))
  assert os.path.exists(os.path.join(REPO, config_spec.partition(':')[0])) or name == 'assignment_cifar10'
  assert len(arms) == 12
  pairs = {(o['assignment.method'], o['seed']) for _, o in arms}
  exact = {'assignment_digits': 'hungarian', 'assignment_cifar10': 'auction'}[name]  # cifar10: for accelerators
  assert pairs == {(m, s) for m in ('none', exact, 'sinkhorn', 'knn') for s in (0, 1, 2)}
  config = default.get_config()
  for _, overrides in arms:
    for key in overrides:  # every override names a key the config has (config_flags would refuse others)
      node = config
      for part in key.split('.'):
        node = node[part]


@pytest.mark.parametrize('bad', ['run [1]', 'run[ab]', 'run*', 'run?'])
def test_sweep_refuses_a_root_that_orbax_would_glob(sweep_file, tmp_path, monkeypatch, capsys, bad):
  """Issue 21, case 1: Orbax globs under the workdir, so a root with glob characters would lose every arm's
  checkpoints; refused before anything is written or launched."""
  monkeypatch.setattr(local, 'execute', lambda *a, **k: pytest.fail('launched with a glob-character root'))
  root = tmp_path / bad
  with pytest.raises(SystemExit) as exit_:
    sweep.main([f'--sweep={sweep_file}', f'--root={root}'])
  assert exit_.value.code == 2
  assert '--root' in capsys.readouterr().err and not root.exists()
