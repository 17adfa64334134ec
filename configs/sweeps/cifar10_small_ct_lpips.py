r"""Paired-seed study of the paper's own recipe at CPU scale: does immiscible assignment speed up CT with LPIPS?

  python -m launch.sweep --sweep=configs/sweeps/cifar10_small_ct_lpips.py --runner=local \
      --root=results/cifar10_small_ct_lpips -- \
      --config.data.dataset=folder --config.data.path=PATH/cifar10-jpg.tar.gz
  python -m launch.report results/cifar10_small_ct_lpips --metric=eval/fd_pixels --baseline=assign=none

Config: configs/cifar10_small_ct.py (CT, LPIPS-VGG16 at 16x16, real CIFAR-10 at 16x16, NCSN++ nf = 16, batch 128,
800 steps, pixel FD of 2,000 one-step EMA samples at 8 evenly spaced steps). Every arm sees 102,400 images, as
every arm of the iCT study (configs/sweeps/cifar10_small_study.py) does, so the two recipes compare at equal data.
Arms (name = loss,assign,seed; the report pairs each arm with assign=none of the same loss and seed):
  lpips  none vs exact with the paper's plain L2 cost (jv): 5 seeds
  l2     the same pair with squared L2 (training.loss = 'l2') instead of LPIPS, the LPIPS-free control: 3 seeds
Exact assignment is 'jv' over the whole batch (one device here). Paired seeds: arms with the same seed and loss have
the same initial parameters, data order and flips, base noise and noise levels; only the assignment of that noise
differs. Arms run seed-major (lpips first), so any prefix of the plan holds complete pairs.
"""
CONFIG = 'configs/cifar10_small_ct.py'

ASSIGN = {
    'none': {'assignment.method': 'none'},
    'exact_l2': {'assignment.method': 'jv', 'assignment.cost': 'l2'},
}
LOSSES = {'lpips': {'training.loss': 'lpips'}, 'l2': {'training.loss': 'l2'}}
# (loss, assignments, seeds), in the order they run.
PARTS = (
    ('lpips', ('none', 'exact_l2'), (0, 1, 2, 3, 4)),
    ('l2', ('none', 'exact_l2'), (0, 1, 2)),
)


def get_sweep():
  for loss, assigns, seeds in PARTS:
    for seed in seeds:
      for assign in assigns:
        yield f'loss={loss},assign={assign},seed={seed}', {'seed': seed, **LOSSES[loss], **ASSIGN[assign]}
