"""Digits demo (`make demo`): scikit-learn's bundled 8x8 digits, CT with exact immiscible assignment, on CPU.

  python -m immiscible_jax.main --config=configs/digits.py --workdir=workdirs/demo
Runs in a few minutes on 2 CPU cores; one-step samples should be recognisable digits. The metric logged during
training is the Frechet distance on raw pixels (64 dims), weight-free.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.training.batch_size = 64
  config.training.num_steps = 1500
  config.training.log_every_steps = 100
  config.training.ema_rate = 0.995
  config.optim.learning_rate = 1e-3
  config.assignment.method = 'hungarian'
  config.eval.every_steps = 500
  config.eval.num_samples = 1000
  config.eval.reference_num_images = 1797
  config.checkpoint.every_steps = 500
  config.sampling.num_samples = 100
  return config
