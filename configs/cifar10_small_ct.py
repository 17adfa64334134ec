r"""CT with LPIPS (the original consistency-training recipe) on real CIFAR-10 at 16x16, sized for a CPU.

  python -m immiscible_jax.main --config=configs/cifar10_small_ct.py --workdir=DIR \
      --config.data.dataset=folder --config.data.path=PATH/cifar10-jpg.tar.gz
The recipe of configs/cifar10_ct.py (CT: EMA target with mu0 = 0.9, uniform pair index, s0 = 2; LPIPS-VGG16 as
the metric) on the small model and data of configs/cifar10_small.py (NCSN++ nf = 16, 318,739 parameters; images
area-averaged to 16x16; pixel Frechet distance of 2,000 one-step EMA samples against the 50k training images at
that size). Scaled down where a CPU run needs it, each a choice of this project, not the paper's:
  - LPIPS at the images' own 16x16 (training.lpips_resolution = 0) instead of 224: VGG16 at 224 costs about 31
    GFLOPs per image and branch, out of reach here; 16x16 is the least VGG16's four poolings allow.
  - s1 = 20 instead of 150: over a run of a few hundred steps CT's N(k) would pass 50 levels within its first
    tenth, and its target EMA mu(k) = exp(s0 log mu0 / N(k)) approaches 1 with N, which left short runs grey
    (configs/digits.py: CT with s1 = 150 reached pixel FD 11.1 in 1,000 steps, with s1 = 20 4.0 in 400).
  - Batch 64, 400 steps, lr 1e-3 with clipping, EMA 0.995: what the study's budget allows and learns in it
    (configs/sweeps/cifar10_small_ct_lpips.py gives the measured step time behind that).
"""
from configs import cifar10_small


def get_config():
  config = cifar10_small.get_config()
  config.training.recipe = 'ct'
  config.training.loss = 'lpips'
  config.training.lpips_resolution = 0
  config.training.s0 = 2
  config.training.s1 = 20
  config.training.mu0 = 0.9
  return config
