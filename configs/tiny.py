"""Tiny config for tests and smoke runs: the digits demo (configs/digits.py, iCT) shrunk to a few-thousand-parameter
NCSN++ of one level without attention, 16 images a step and 20 steps. Compiling is most of what a test pays: on
8 CPU devices its train step compiled in 13 s against the digits demo's 22 s (compile_s in
benchmarks/results/dispatch_cpu.json, `python benchmarks/dispatch.py --layouts=1x8`). tests/test_models.py covers
the larger architectures.

Tests choose the assignment method and turn evaluation on themselves, so both are off here.
"""
from configs import digits


def get_config():
  config = digits.get_config()
  config.model.nf = 8
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  config.training.s1 = 40
  config.training.batch_size = 16
  config.training.num_steps = 20
  config.training.log_every_steps = 5
  config.assignment.method = 'none'
  config.checkpoint.every_steps = 10
  config.eval.every_steps = 0
  config.eval.num_samples = 64
  config.eval.batch_size = 8
  config.eval.reference_num_images = 256
  config.sampling.num_samples = 16
  return config
