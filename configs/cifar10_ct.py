"""CIFAR-10 consistency training (CT), Song et al. 2023, with the paper's NCSN++ (56,395,651 parameters).

  python -m immiscible_jax.main --config=configs/cifar10_ct.py --workdir=gs://BUCKET/ct \
      --config.assignment.method=auction --config.assignment.scope=global
(auction: the assignment method README recommends on GPUs/TPUs; use jv for exact assignment on CPU.)
Paper (Table 3, CT on CIFAR-10): batch 512, K = 800k iterations, RAdam lr 4e-4, mu0 = 0.9, s0 = 2, s1 = 150,
sampling EMA 0.9999, LPIPS metric; published FID 8.70 (1 step) / 5.83 (2 steps). LPIPS-VGG16 as in the CT code
(jcm/losses.py): both outputs resized bilinearly to 224x224 (training.lpips_resolution), weights converted once
by `make weights` (immiscible_jax/models/lpips.py).
FLOPs: 251.5 GFLOPs per image per train step with LPIPS, 162.2 without it (training.loss='l2'), plus 2.7 GFLOPs
per step whatever the batch (optimizer, EMA and target updates): XLA's cost analysis of the compiled step
(benchmarks/flops.py: XLA:CPU, one device, assignment none, per-device batches 1 and 2, the count linear in the
batch; benchmarks/results/flops_cifar10_ct_cpu.json). LPIPS's 89.4 GFLOPs (VGG16 at 224 forward on both outputs,
backward through the online one) run in float32 at precision 'highest' by design (models/lpips.py), so on a GPU they
run at the FP32 rate, not the bf16 one: at an H100's datasheet peaks (989 bf16, 67 FP32 dense TFLOP/s) the step
cannot exceed about 670 images/s per GPU (arithmetic from those peaks, not a measurement; `make device-check`
measures it). The model and data settings follow the JAX anchor's CT config
(openai/consistency_models_cifar10, configs/cifar10_ve_ct_adaptive.py): Fourier embedding scale 16, dropout 0,
FIR resampling, residual input pyramid, no gradient clipping, random flips. The optimizer does not: that config
names RAdam with lr 2e-4 and a warm-up of 1e7/512 = 19,531 steps, but the anchor's RAdam branch (jcm/losses.py,
get_optimizer) ignores the warm-up and runs a constant 2e-4. Here: the paper's RAdam lr 4e-4 after a linear
warm-up over those 19,531 steps (this project's choice; neither the paper's stated setting nor the anchor's code).
Cost: 800k steps at batch 512 is days on 8 GPUs; use `runlocal`-style overrides to smoke-test it on CPU:
  --config.training.batch_size=8 --config.training.num_steps=2 --config.model.nf=16
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'cifar10'
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True

  config.model.nf = 128
  config.model.ch_mult = (2, 2, 2)
  config.model.num_res_blocks = 4
  config.model.attn_resolutions = (16,)
  config.model.embedding_type = 'fourier'
  config.model.fourier_scale = 16.0
  config.model.dropout = 0.0
  config.model.fir = True
  config.model.fir_kernel = (1, 3, 3, 1)
  config.model.progressive_input = 'residual'
  # bfloat16 body, float32 parameters / head / loss (ncsnpp.py): CT's grid has at most s1 + 1 = 151 levels, so
  # adjacent sigma differ by 3.7% (at sigma_max) to 18% (at sigma_min), well above bfloat16's ~0.4% rounding of
  # the network output. Untested on an accelerator here: set model.dtype='float32' to rule it out.
  config.model.dtype = 'bfloat16'

  config.training.recipe = 'ct'
  config.training.batch_size = 512
  config.training.num_steps = 800_000
  config.training.loss = 'lpips'
  config.training.lpips_resolution = 224
  config.training.s0 = 2
  config.training.s1 = 150
  config.training.mu0 = 0.9
  config.training.ema_rate = 0.9999
  config.training.log_every_steps = 100

  config.optim.optimizer = 'radam'
  config.optim.learning_rate = 4e-4
  config.optim.warmup_steps = 19_531  # the anchor config's 1e7 / 512 (its RAdam branch ignores it; see above)
  config.optim.grad_clip = 0.0

  config.assignment.scope = 'global'
  config.eval.every_steps = 10_000
  config.eval.metric = 'inception'
  config.eval.num_samples = 5000
  config.eval.batch_size = 250
  config.eval.reference_num_images = 50_000
  config.sampling.sigmas = (80.0,)
  config.sampling.num_samples = 50_000
  config.checkpoint.every_steps = 5000
  config.checkpoint.max_to_keep = 5
  return config
