"""Digits demo (`make demo`): scikit-learn's bundled 8x8 digits, iCT with exact immiscible assignment (jv), on CPU.

  python -m immiscible_jax.main --config=configs/digits.py --workdir=workdirs/demo
Runs in a few minutes on 2 CPU cores; one-step samples should be recognisable digits. The metric logged during
training is the Frechet distance on raw pixels (64 dims), weight-free.
iCT rather than CT: on runs this short, CT's target EMA and fast-growing N(k) leave the one-step samples grey.
Measured once here (same data; model with FIR and input pyramid on), pixel FD: CT with s1=150, 11.1 after 1000
steps; CT with s1=20, 4.0 after 400 steps; iCT with s1=80, 1.6 after 400 steps. The curriculum is capped at
s1 = 80 for the same reason: 1280 levels need far more steps than a demo has.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.training.recipe = 'ict'
  config.training.loss = 'pseudo_huber'
  config.training.s0 = 10
  config.training.s1 = 80
  config.training.batch_size = 64
  config.training.num_steps = 1200
  config.training.log_every_steps = 100
  config.training.ema_rate = 0.995
  config.optim.learning_rate = 1e-3
  config.assignment.method = 'jv'
  config.eval.every_steps = 400
  config.eval.num_samples = 1000
  config.eval.reference_num_images = 1797
  config.checkpoint.every_steps = 400
  config.sampling.num_samples = 100
  return config
