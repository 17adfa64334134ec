r"""Paired-seed study on real CIFAR-10 at CPU scale: does immiscible assignment speed up iCT? (configs/cifar10_small.py)

  python -m launch.sweep --sweep=configs/sweeps/cifar10_small_study.py --runner=local \
      --root=results/cifar10_small_study -- \
      --config.data.dataset=folder --config.data.path=PATH/cifar10-jpg.tar.gz
  python -m launch.report results/cifar10_small_study --metric=eval/fd_pixels --baseline=assign=none

Arms (name = size,batch,assign,seed; the report pairs every arm with assign=none of the same size, batch, seed):
  core      16x16, batch 128: none; exact with the paper's plain L2 cost (exact_l2); exact with squared L2
            (exact_sq: minibatch OT, only -x.n matters); knn8 (nearest of 8 noise draws per image): 5 seeds
  size      8x8, batch 128: none vs exact_l2: 5 seeds
  batch     16x16 at batch 32 and batch 512: none vs exact_l2: 5 seeds. Every batch size sees the same number of
            images (800 x 128 = 102,400): batch 32 runs 3,200 steps, batch 512 runs 200 steps, each with its own
            curriculum over its own step count, evaluations spaced by the same number of images.
Exact assignment is 'jv' (exact, fastest in-graph solver on CPU), over the whole batch (one device here).
Paired seeds: every arm with the same seed has the same initial parameters, data order and flips, base noise and
noise levels; only the assignment of that noise differs (tests/test_study.py checks it). Arms are ordered so that
any prefix of the plan holds complete paired sets: the sweep may be stopped and resumed across sessions.
"""
CONFIG = 'configs/cifar10_small.py'
IMAGES_SEEN = 800 * 128
EVAL_EVERY_IMAGES = 100 * 128

ASSIGN = {
    'none': {'assignment.method': 'none'},
    'exact_l2': {'assignment.method': 'jv', 'assignment.cost': 'l2'},
    'exact_sq': {'assignment.method': 'jv', 'assignment.cost': 'sqeuclidean'},
    'knn8': {'assignment.method': 'knn', 'assignment.knn_k': 8, 'assignment.cost': 'l2'},
}
# (image size, batch size, assignments, seeds), in the order they run.
PARTS = (
    (16, 128, ('none', 'exact_l2', 'exact_sq', 'knn8'), (0, 1, 2, 3, 4)),
    (8, 128, ('none', 'exact_l2'), (0, 1, 2, 3, 4)),
    (16, 32, ('none', 'exact_l2'), (0, 1, 2, 3, 4)),
    (16, 512, ('none', 'exact_l2'), (0, 1, 2, 3, 4)),
)


def arm_overrides(size, batch, assign, seed):
  steps = IMAGES_SEEN // batch
  every = EVAL_EVERY_IMAGES // batch
  return {'data.image_size': size, 'training.batch_size': batch, 'training.num_steps': steps,
          'eval.every_steps': every, 'training.log_every_steps': max(1, every // 2),
          'checkpoint.every_steps': 2 * every, 'seed': seed, **ASSIGN[assign]}


def get_sweep():
  for size, batch, assigns, seeds in PARTS:
    for seed in seeds:
      for assign in assigns:
        yield (f'size={size},batch={batch},assign={assign},seed={seed}',
               arm_overrides(size, batch, assign, seed))
