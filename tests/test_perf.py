"""perf.py: FLOPs per image from XLA's cost analysis (against a count by hand), the peak table, and MFU."""
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from immiscible_jax import perf

_B = 4  # images per device


def _net(params, x):
  """[B, 10, 10, 3] -> [B, 5]: two 3x3 VALID convolutions (3 -> 16 -> 8 channels) and a dense layer, no bias."""
  dims = ('NHWC', 'HWIO', 'NHWC')
  y = lax.conv_general_dilated(x, params['w1'], (1, 1), 'VALID', dimension_numbers=dims)  # [B, 8, 8, 16]
  z = lax.conv_general_dilated(y, params['w2'], (1, 1), 'VALID', dimension_numbers=dims)  # [B, 6, 6, 8]
  return z.reshape(z.shape[0], -1) @ params['w3']


_PARAMS = {'w1': jnp.ones((3, 3, 3, 16)), 'w2': jnp.ones((3, 3, 16, 8)), 'w3': jnp.ones((6 * 6 * 8, 5))}
# Multiply-accumulates per image: every output element of a layer takes (kernel taps x input channels) of them.
_MACS = 8 * 8 * 16 * (3 * 3 * 3) + 6 * 6 * 8 * (3 * 3 * 16) + 5 * (6 * 6 * 8)


def test_flops_per_image_equal_a_count_by_hand_under_pmap_and_shard_map():
  n = jax.device_count()
  pmapped = jax.pmap(_net, in_axes=(None, 0))
  per_device = perf.flops_per_call(pmapped.lower(_PARAMS, jnp.ones((n, _B, 10, 10, 3)))) / _B
  mesh = Mesh(np.array(jax.devices()), ('batch',))
  sharded = jax.jit(jax.shard_map(_net, mesh=mesh, in_specs=(P(), P('batch')), out_specs=P('batch')))
  per_device_sharded = perf.flops_per_call(sharded.lower(_PARAMS, jnp.ones((n * _B, 10, 10, 3)))) / _B
  assert per_device == per_device_sharded == 2 * _MACS  # one device's program, 2 FLOPs per multiply-add


def test_xla_counts_a_loop_body_once():
  """What perf.train_step_accounting relies on for steps_per_dispatch > 1 (a lax.scan of k steps): the program's
  count is one step's. A JAX or XLA that multiplies by the trip count must fail here, not skew perf/mfu."""
  one = lambda c, xs: lax.scan(lambda c, x: (c @ x, None), c, xs)[0]
  counts = [perf.flops_per_call(jax.jit(one).lower(jnp.ones((64, 64)), jnp.ones((k, 64, 64)))) for k in (1, 4)]
  assert counts[0] >= 2 * 64 ** 3 and abs(counts[1] - counts[0]) < 16


def test_peaks_follow_the_compute_dtype_and_matmul_precision():
  h100 = 'NVIDIA H100 80GB HBM3'
  assert perf.peak_flops(h100, 'bfloat16')[0] == 989.5e12
  assert perf.peak_flops(h100, 'float32')[0] == 494.5e12  # TF32 at JAX's default precision
  assert perf.peak_flops(h100, 'float32', 'highest')[0] == 67e12
  assert perf.peak_flops('Tesla V100-SXM2-16GB', 'float32')[0] == 15.7e12  # no TF32 on Volta
  assert perf.peak_flops('TPU v5 lite', 'float32')[0] == 197e12  # one bf16 pass at default precision
  assert perf.peak_flops('TPU v5 lite', 'float32', 'highest')[0] is None
  for kind in ('NVIDIA H200', 'NVIDIA A100-SXM4-80GB', 'NVIDIA L4', 'TPU v4', 'TPU v5p', 'TPU v6 lite'):
    value, what = perf.peak_flops(kind, 'bfloat16')
    assert value > 0 and ('nvidia.com' in what or 'cloud.google.com' in what), kind


def test_an_unknown_device_gets_no_mfu_and_says_why():
  value, why = perf.peak_flops(jax.devices()[0].device_kind, 'bfloat16')  # this CPU
  assert value is None and 'no peak known for device kind' in why
  assert perf.mfu(1000.0, 1e9, None, 8) is None
  lowered = lambda: jax.jit(_net).lower(_PARAMS, jnp.ones((_B, 10, 10, 3)))
  per_image, peak, line = perf.train_step_accounting(lowered, _B, 'float32')
  assert per_image == 2 * _MACS and peak is None
  assert 'perf/mfu not logged: no peak known for device kind' in line
  assert perf.mfu(1000.0, 2e9, 1e12, 4) == 0.5  # 2 TFLOP/s achieved over 4 TFLOP/s of peak


def test_no_flops_with_gradient_accumulation_or_without_a_cost_analysis():
  per_image, _, line = perf.train_step_accounting(lambda: 1 / 0, _B, 'float32', grad_accum_steps=2)
  assert per_image is None and 'grad_accum_steps' in line
  per_image, _, line = perf.train_step_accounting(lambda: 1 / 0, _B, 'float32')
  assert per_image is None and 'ZeroDivisionError' in line
