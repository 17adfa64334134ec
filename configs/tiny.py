"""Tiny config for tests and smoke runs: a few-thousand-parameter NCSN++ on 8x8 digits; compiles in seconds."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.nf = 8
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.training.recipe = 'ict'   # learns far faster than CT on short runs (see configs/digits.py)
  config.training.loss = 'pseudo_huber'
  config.training.s0 = 10
  config.training.s1 = 40
  config.training.batch_size = 16
  config.training.num_steps = 20
  config.training.log_every_steps = 5
  config.checkpoint.every_steps = 10
  config.eval.num_samples = 64
  config.eval.batch_size = 8
  config.eval.reference_num_images = 256
  config.sampling.num_samples = 16
  return config
