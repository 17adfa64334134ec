r"""Ablation on CIFAR-10 at full scale, for TPU pods or GPU clusters (not run here): assignment.method in
{none, auction, sinkhorn, knn} x seeds {0, 1, 2} (12 arms) on the CT recipe, assignment over the global batch.
'auction' is the near-exact method with the fewest loop steps (README: which method on GPU/TPU).

  python -m launch.tpu_pod --tpu=NAME --zone=ZONE setup
  python -m launch.sweep --sweep=configs/sweeps/assignment_cifar10.py --runner=tpu_pod --tpu=NAME --zone=ZONE \
      --root=gs://BUCKET/ablation_cifar10
  python -m launch.report gs://BUCKET/ablation_cifar10 --metric=eval/fid --out=reports/ablation_cifar10
"""
CONFIG = 'configs/cifar10_ct.py'
METHODS = ('none', 'auction', 'sinkhorn', 'knn')
SEEDS = (0, 1, 2)
# Shared by every arm: solve the assignment over the whole global batch (captures more of the distance reduction).
COMMON = {'assignment.scope': 'global'}


def get_sweep():
  for method in METHODS:
    for seed in SEEDS:
      yield f'method={method},seed={seed}', {'assignment.method': method, 'seed': seed, **COMMON}
