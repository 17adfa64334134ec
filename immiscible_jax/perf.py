"""How hard a run works its accelerators: FLOPs per image from XLA's cost analysis, dense peaks, MFU.

  flops = perf.flops_per_call(lowered)                  # XLA's count for one device's program
  per_image = flops / images_per_device_per_call         # (k steps x per-device batch)
  peak = perf.peak_flops(device_kind, 'bfloat16')        # None for a device the table does not know
  mfu = perf.mfu(images_per_sec, per_image, peak, device_count)

FLOPs: XLA's HloCostAnalysis of the *compiled* program (`Lowered.compile().cost_analysis()['flops']`): every
multiply and add of every convolution and dot (2 per multiply-accumulate), plus one per element of the elementwise
and reduction ops; the program of pmap and of jit + shard_map is one device's part, so it is divided by the images
that device handles per call (tests/test_perf.py checks a small conv net against a count by hand). Called on a
function that has already run, it compiles nothing: jit and pmap find the executable in their caches.

Loops: XLA's cost analysis counts a while loop's body once, whatever its trip count (checked by
tests/test_perf.py). With training.steps_per_dispatch = k > 1 the k steps are a lax.scan whose body is one step,
so the program's count is one step's and is divided by one step's images; with training.grad_accum_steps > 1 the
gradient is a scan over micro-batches (one micro-batch counted), so no FLOPs are given. The assignment solvers'
loops are counted once too: at most a few B x B passes, well under 0.1% of the network's count at CIFAR-10 size.

MFU = achieved FLOP/s / (dense peak x devices), the peak of the arithmetic XLA uses for the model's compute dtype:
bfloat16 -> the bf16 tensor-core / MXU peak; float32 -> on GPUs with TF32 the TF32 peak at JAX's default matmul
precision, FP32 at 'highest'; on TPUs the bf16 peak at default precision (XLA:TPU computes float32 dots in one
bfloat16 pass then, `jax.lax.Precision`'s docstring), none at 'high'/'highest' (no vendor figure for 3 or 6
passes). Parts of a bfloat16 model that stay float32 (GroupNorm statistics, the head, LPIPS) are counted at the
bf16 peak too, so MFU is if anything understated. Dense peaks only: NVIDIA's datasheets quote tensor-core figures
"with sparsity", twice the dense rate; the values below are halved.
"""
import dataclasses
from typing import Optional

import jax


@dataclasses.dataclass(frozen=True)
class Peak:
  """Dense peak TFLOP/s of one device (one GPU, one TPU chip as JAX exposes it); None: no such arithmetic."""
  bf16: Optional[float]
  tf32: Optional[float]
  fp32: Optional[float]
  source: str


_H100_SXM = Peak(bf16=1979 / 2, tf32=989 / 2, fp32=67,
                 source='nvidia.com/en-us/data-center/h100 datasheet, H100 SXM: BF16 1,979 and TF32 989 TFLOPS with '
                        'sparsity, FP32 67')
_H100_PCIE = Peak(bf16=1513 / 2, tf32=756 / 2, fp32=51,
                  source='nvidia.com/en-us/data-center/h100 datasheet, H100 PCIe: BF16 1,513 and TF32 756 TFLOPS '
                         'with sparsity, FP32 51')
_H100_NVL = Peak(bf16=1671 / 2, tf32=835 / 2, fp32=60,
                 source='nvidia.com/en-us/data-center/h100 datasheet, H100 NVL: BF16 1,671 and TF32 835 TFLOPS with '
                        'sparsity, FP32 60')
_H200_SXM = Peak(bf16=1979 / 2, tf32=989 / 2, fp32=67,
                 source='nvidia.com/en-us/data-center/h200 datasheet, H200 SXM: BF16 1,979 and TF32 989 TFLOPS with '
                        'sparsity, FP32 67')
_H200_NVL = Peak(bf16=1671 / 2, tf32=835 / 2, fp32=60,
                 source='nvidia.com/en-us/data-center/h200 datasheet, H200 NVL: BF16 1,671 and TF32 835 TFLOPS with '
                        'sparsity, FP32 60')
_A100 = Peak(bf16=312, tf32=156, fp32=19.5,
             source='nvidia.com/en-us/data-center/a100 datasheet (SXM4 and PCIe, 40 and 80 GB alike): BF16 312 and '
                    'TF32 156 TFLOPS dense (624 / 312 with sparsity), FP32 19.5')
# Volta has no bf16 or TF32 units: XLA computes bfloat16 dots in float32 there, so FP32 is bf16's ceiling too.
_V100_SXM2 = Peak(bf16=15.7, tf32=None, fp32=15.7,
                  source='nvidia.com/en-us/data-center/v100 datasheet, V100 SXM2: FP32 15.7 TFLOPS (no bf16 units: '
                         'bf16 runs at the FP32 rate)')
_V100_PCIE = Peak(bf16=14, tf32=None, fp32=14,
                  source='nvidia.com/en-us/data-center/v100 datasheet, V100 PCIe: FP32 14 TFLOPS (no bf16 units)')
_V100S = Peak(bf16=16.4, tf32=None, fp32=16.4,
              source='nvidia.com/en-us/data-center/v100 datasheet, V100S PCIe: FP32 16.4 TFLOPS (no bf16 units)')
_L4 = Peak(bf16=242 / 2, tf32=120 / 2, fp32=30.3,
           source='nvidia.com/en-us/data-center/l4 datasheet: BF16 242 and TF32 120 TFLOPS with sparsity, FP32 30.3')


def _tpu(tflops, page):
  return Peak(bf16=tflops, tf32=None, fp32=None,
              source=f'cloud.google.com/tpu/docs/{page}: peak compute per chip {tflops} TFLOPS (bf16)')


# device_kind exactly as jax.devices()[0].device_kind reports it -> its peaks. TPU v4 and v5p expose one device per
# chip (megacore), v5e and v6e have one TensorCore per chip: per-chip figures are per-device figures.
PEAKS = {
    'NVIDIA H100 80GB HBM3': _H100_SXM,
    'NVIDIA H100 PCIe': _H100_PCIE,
    'NVIDIA H100 NVL': _H100_NVL,
    'NVIDIA H200': _H200_SXM,
    'NVIDIA H200 NVL': _H200_NVL,
    'NVIDIA A100-SXM4-40GB': _A100,
    'NVIDIA A100-SXM4-80GB': _A100,
    'NVIDIA A100-PCIE-40GB': _A100,
    'NVIDIA A100 80GB PCIe': _A100,
    'Tesla V100-SXM2-16GB': _V100_SXM2,
    'Tesla V100-SXM2-32GB': _V100_SXM2,
    'Tesla V100-PCIE-16GB': _V100_PCIE,
    'Tesla V100-PCIE-32GB': _V100_PCIE,
    'Tesla V100S-PCIE-32GB': _V100S,
    'NVIDIA L4': _L4,
    'TPU v4': _tpu(275, 'v4'),
    'TPU v5 lite': _tpu(197, 'v5e'),
    'TPU v5e': _tpu(197, 'v5e'),
    'TPU v5': _tpu(459, 'v5p'),
    'TPU v5p': _tpu(459, 'v5p'),
    'TPU v6 lite': _tpu(918, 'v6e'),
    'TPU v6e': _tpu(918, 'v6e'),
}


def flops_per_call(lowered):
  """XLA's FLOP count of one device's part of a lowered (jit or pmap) program, from its compiled cost analysis;
  None when the backend gives none."""
  cost = lowered.compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def peak_flops(device_kind, model_dtype, matmul_precision=None):
  """(dense peak FLOP/s of one device for this compute dtype, what it is) or (None, why there is none).

  matmul_precision: jax.config.jax_default_matmul_precision (None / 'default' / 'fastest' / 'high' / 'highest' /
  'bfloat16' / 'tensorfloat32' / 'float32'); it decides what float32 dots run as."""
  peak = PEAKS.get(device_kind)
  if peak is None:
    return None, f'no peak known for device kind {device_kind!r} (immiscible_jax/perf.py PEAKS)'
  if model_dtype == 'bfloat16':
    kind = 'bf16'
  else:
    precision = (matmul_precision or 'default').lower()
    full = precision in ('highest', 'float32')
    if device_kind.startswith('TPU'):
      if precision not in ('default', 'fastest', 'bfloat16'):
        return None, (f'float32 at matmul precision {precision!r} runs as several bf16 passes on {device_kind}; no '
                      'vendor peak for that')
      kind = 'bf16'
    else:
      kind = 'fp32' if full or peak.tf32 is None else 'tf32'
  value = getattr(peak, kind)
  if value is None:
    return None, f'{device_kind} has no {kind} peak in the table'
  return value * 1e12, f'{kind} {value:g} TFLOP/s ({peak.source})'


def mfu(images_per_sec, flops_per_image, peak_per_device, num_devices):
  """Model FLOPs utilisation: achieved FLOP/s over the devices' summed dense peak; None without a peak or count."""
  if not peak_per_device or not flops_per_image:
    return None
  return images_per_sec * flops_per_image / (peak_per_device * num_devices)


def train_step_accounting(lower, images_per_device, model_dtype, grad_accum_steps=1):
  """(FLOPs per image or None, dense peak FLOP/s per device or None, one line for the log), once per run.

  lower(): the train step's lowered program (train.TrainSteps.lower; one step, or k in a scan, per call);
  images_per_device: one step's images per device (training.batch_size / device count)."""
  flops, why = None, ''
  if grad_accum_steps > 1:
    why = 'not counted with training.grad_accum_steps > 1 (XLA counts one micro-batch of its loop)'
  else:
    try:
      flops = flops_per_call(lower())
      why = '' if flops else 'the backend reports no FLOPs'
    except Exception as e:  # pylint: disable=broad-except  # accounting must never stop a run
      why = f'no cost analysis ({type(e).__name__}: {str(e)[:200]})'
  per_image = flops / images_per_device if flops else None
  kind = jax.devices()[0].device_kind
  peak, what = peak_flops(kind, model_dtype, jax.config.jax_default_matmul_precision)
  line = (f'perf: {per_image / 1e9:.3f} GFLOPs per image per train step (XLA cost analysis of the compiled step)'
          if per_image else f'perf: FLOPs per image {why}')
  line += f'; perf/mfu against {what}' if peak and per_image else '; perf/mfu not logged: ' + (
      what if not peak else 'no FLOPs count')
  return per_image, peak, line
