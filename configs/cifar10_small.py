r"""iCT on real CIFAR-10 downsampled to 16x16, with a small NCSN++: one arm of the CPU-scale study in minutes.

  python -m immiscible_jax.main --config=configs/cifar10_small.py --workdir=DIR \
      --config.data.dataset=folder --config.data.path=PATH/cifar10-jpg.tar.gz   # or tfds' prepared cifar10
--config.data.image_size=8 gives the 8x8 variant (same model; its levels are then 8, 4, 2 pixels).
Images are area-averaged from 32x32 in the input pipeline, and the reference statistics are computed at the same
size from the whole training split. The metric is the pixel Frechet distance (768 dims at 16x16) of 2,000
one-step EMA samples, every 100 steps: weight-free, and comparable only between runs of this config.
Recipe: iCT as in configs/cifar10_ict.py (pseudo-Huber with c = 0.00054 sqrt(d), lognormal noise levels,
doubling curriculum from s0 = 10), with the curriculum capped at s1 = 160 so that an 800-step run passes five
phases (N = 11, 21, 41, 81, 161; 160 steps each); the full s1 = 1280 needs far more steps than a CPU run has.
No dropout, a short EMA (0.995) and lr 1e-3 with gradient clipping: settings meant to learn in 800 steps.
Model: NCSN++ with nf = 16, three levels, one residual block each, attention at 8x8 (318,739 parameters): a
train step at batch 128 took 0.68 s here, against 2.3 s for nf = 32 (timed with the step alone, same machine).
Measured on the project's 2-core CPU, arm size=16,batch=128,assign=none,seed=0 of the study
(configs/sweeps/cifar10_small_study.py, results/cifar10_small_study/): 26 minutes wall while the machine was
shared (load average 3.5-4; about 10 minutes is the estimate for an idle machine from the step time above, not a
measurement); pixel FD 41.8 at step 100, 10.9 at 400, 4.52 at 800, still falling. Its one-step samples have
CIFAR-10's colours and coarse blob structure, no recognisable objects yet.
"""
from configs import cifar10_ict


def get_config():
  config = cifar10_ict.get_config()
  config.data.image_size = 16

  config.model.nf = 16
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.0
  config.model.fir = False
  config.model.progressive_input = 'none'

  config.training.batch_size = 128
  config.training.num_steps = 800
  config.training.s1 = 160
  config.training.ema_rate = 0.995
  config.training.log_every_steps = 50

  config.optim.learning_rate = 1e-3
  config.optim.grad_clip = 1.0

  config.assignment.method = 'none'
  config.assignment.scope = 'global'

  config.eval.every_steps = 100
  config.eval.metric = 'pixels'
  config.eval.num_samples = 2000
  config.eval.batch_size = 250
  config.eval.reference_num_images = 50_000
  config.checkpoint.every_steps = 200
  config.checkpoint.max_to_keep = 1
  config.sampling.sigmas = (80.0,)
  config.sampling.num_samples = 100
  return config
