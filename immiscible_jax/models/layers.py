"""Building blocks of NCSN++ (Song et al., score_sde; used by the consistency-model papers).

Noise-level embeddings, the DDPM-style initialiser, FIR (StyleGAN2-style) resampling, single-head
self-attention and the two residual blocks (BigGAN-style with resampling inside, and DDPM-style).
All tensors are NHWC. Everything here was written from the papers' descriptions and the anchor's
architecture, not copied.

Compute dtype: every module takes `dtype`, the dtype of its activations and of its convolution / matmul inputs
(flax's `dtype`); parameters always stay float32 (`param_dtype`), so the optimizer and the EMA see float32.
GroupNorm computes its mean and variance in float32 whatever `dtype` is (flax's force_float32_reductions): a
variance from bfloat16 sums of H*W*C/groups terms loses most of its digits. Attention's softmax runs in float32
(its logits are a sum over C products; exp of a bfloat16 logit is off by up to 2^-8 of its size).
"""
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_SQRT_HALF = float(np.sqrt(0.5))


def default_init(scale: float = 1.0):
  """DDPM's initialiser: variance scaling (fan_avg, uniform). scale=0 gives exact zeros.

  The anchor substitutes 1e-10 for 0; exact zeros give the same function at init and let the
  output be tested for == 0. The kernel still receives gradients (its input is non-zero).
  """
  if scale == 0:
    return nn.initializers.zeros
  return nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def conv3x3(features: int, init_scale: float = 1.0, dtype=jnp.float32, **kwargs) -> nn.Conv:
  return nn.Conv(features, (3, 3), kernel_init=default_init(init_scale), dtype=dtype, **kwargs)


def conv1x1(features: int, init_scale: float = 1.0, dtype=jnp.float32) -> nn.Conv:
  return nn.Conv(features, (1, 1), kernel_init=default_init(init_scale), dtype=dtype)


def group_norm(channels: int, dtype=jnp.float32) -> nn.GroupNorm:
  """GroupNorm with min(C // 4, 32) groups, as in NCSN++; statistics in float32, output in `dtype`."""
  return nn.GroupNorm(num_groups=min(channels // 4, 32), dtype=dtype, force_float32_reductions=True)


# ---------------------------------------------------------------------------------------------
# Noise-level embeddings of c_noise [B] -> [B, D].


class GaussianFourierEmbedding(nn.Module):
  """[sin(2 pi w c), cos(2 pi w c)] with w ~ N(0, scale^2) drawn once at init and never trained.

  w is kept in 'params' (as in the anchor, so checkpoints carry it) behind a stop_gradient.
  """
  features: int
  scale: float

  @nn.compact
  def __call__(self, c_noise):  # [B] -> [B, 2 * features]
    w = self.param('w', nn.initializers.normal(stddev=self.scale), (self.features,))
    angles = 2 * jnp.pi * c_noise[:, None] * jax.lax.stop_gradient(w)[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def sinusoidal_embedding(c_noise, features: int, max_period: float = 10000.0):
  """Transformer/DDPM positional embedding: [sin(c f_k), cos(c f_k)], f_k = max_period^(-k/(K-1))."""
  half = features // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  angles = c_noise[:, None].astype(jnp.float32) * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, features % 2)))  # [B, features]


# ---------------------------------------------------------------------------------------------
# Resampling. FIR filters follow StyleGAN2's upfirdn (zero padding at the borders); the kernel
# is separable and normalised so a constant image stays constant away from the borders.


def _fir_kernel(taps: Sequence[float], gain: float) -> np.ndarray:
  k = np.asarray(taps, dtype=np.float32)
  k = np.outer(k, k)
  return k * (gain / k.sum())


def _depthwise_fir(x, taps, gain, padding, strides=(1, 1), lhs_dilation=(1, 1)):
  """Filters every channel of x [B, H, W, C] with the same 2-D FIR kernel (true convolution)."""
  channels = x.shape[-1]
  k = _fir_kernel(taps, gain)[::-1, ::-1]
  w = jnp.asarray(np.tile(k[:, :, None, None], (1, 1, 1, channels)), dtype=x.dtype)  # HWIO
  return jax.lax.conv_general_dilated(
      x, w, window_strides=strides, padding=padding, lhs_dilation=lhs_dilation,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels)


def fir_downsample(x, taps=(1, 3, 3, 1)):
  """[B, H, W, C] -> [B, H/2, W/2, C]: FIR low-pass, keep every other pixel."""
  p = len(taps) - 2
  pad = ((p + 1) // 2, p // 2)
  return _depthwise_fir(x, taps, 1.0, (pad, pad), strides=(2, 2))


def fir_upsample(x, taps=(1, 3, 3, 1)):
  """[B, H, W, C] -> [B, 2H, 2W, C]: insert zeros between pixels, FIR low-pass (gain 4)."""
  p = len(taps) - 2
  # lhs_dilation leaves no trailing zero after the last pixel, hence the +1 on the right.
  pad = ((p + 1) // 2 + 1, p // 2 + 1)
  return _depthwise_fir(x, taps, 4.0, (pad, pad), lhs_dilation=(2, 2))


def naive_downsample(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def naive_upsample(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Downsample(nn.Module):
  """Halves H and W; with_conv adds a learned 3x3 conv (to `features` channels)."""
  features: Optional[int] = None
  with_conv: bool = True
  fir: bool = True
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = self.features or x.shape[-1]
    if self.with_conv and self.fir:
      # StyleGAN2's fused conv-downsample: blur once (padding for the taps and the 3x3 conv),
      # then a strided 3x3 conv without padding.
      p = (len(self.fir_kernel) - 2) + (3 - 1)
      pad = ((p + 1) // 2, p // 2)
      x = _depthwise_fir(x, self.fir_kernel, 1.0, (pad, pad))
      return conv3x3(features, strides=(2, 2), padding='VALID', dtype=self.dtype)(x)
    if self.with_conv:
      return conv3x3(features, strides=(2, 2), dtype=self.dtype)(x)
    return fir_downsample(x, self.fir_kernel) if self.fir else naive_downsample(x)


class Upsample(nn.Module):
  """Doubles H and W; with_conv adds a 3x3 conv after the resampling (used by 'ddpm' blocks)."""
  features: Optional[int] = None
  with_conv: bool = True
  fir: bool = True
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = fir_upsample(x, self.fir_kernel) if self.fir else naive_upsample(x)
    return conv3x3(self.features or x.shape[-1], dtype=self.dtype)(x) if self.with_conv else x


# ---------------------------------------------------------------------------------------------
# Attention and residual blocks.


class AttentionBlock(nn.Module):
  """DDPM self-attention over all H*W positions, one head, residual; output projection init_scale."""
  skip_rescale: bool = True
  init_scale: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = group_norm(c, self.dtype)(x).reshape(b, h * w, 1, c)
    # q, k, v use DDPM's small init (scale 0.1); attention scales logits by 1/sqrt(c).
    q, k, v = (nn.Dense(c, kernel_init=default_init(0.1), dtype=self.dtype, name=n)(y)
               for n in ('query', 'key', 'value'))
    y = nn.dot_product_attention(q, k, v, dtype=self.dtype, force_fp32_for_softmax=True).reshape(b, h, w, c)
    y = nn.Dense(c, kernel_init=default_init(self.init_scale), dtype=self.dtype, name='out')(y)
    return (x + y) * _SQRT_HALF if self.skip_rescale else x + y


def _condition(h, temb, features: int, dtype):
  """Adds a per-channel bias projected from the noise embedding: h [B,H,W,F] + Dense(swish(temb)).

  temb arrives in float32; the projection computes in `dtype` (the embedding itself stays float32).
  """
  bias = nn.Dense(features, kernel_init=default_init(), dtype=dtype)(nn.swish(temb))
  return h + bias[:, None, None, :]


class ResnetBlockBigGAN(nn.Module):
  """BigGAN-style residual block; `up`/`down` resample both branches inside the block."""
  features: Optional[int] = None
  up: bool = False
  down: bool = False
  dropout: float = 0.0
  fir: bool = True
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool):
    features = self.features or x.shape[-1]
    h = nn.swish(group_norm(x.shape[-1], self.dtype)(x))
    if self.up or self.down:
      if self.up:
        resample = functools.partial(fir_upsample, taps=self.fir_kernel) if self.fir else naive_upsample
      else:
        resample = functools.partial(fir_downsample, taps=self.fir_kernel) if self.fir else naive_downsample
      h, x = resample(h), resample(x)
    h = _condition(conv3x3(features, dtype=self.dtype)(h), temb, features, self.dtype)
    h = nn.swish(group_norm(features, self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv3x3(features, init_scale=self.init_scale, dtype=self.dtype)(h)
    if x.shape[-1] != features or self.up or self.down:
      x = conv1x1(features, dtype=self.dtype)(x)
    return (x + h) * _SQRT_HALF if self.skip_rescale else x + h


class ResnetBlockDDPM(nn.Module):
  """DDPM-style residual block (no resampling inside; the U-Net uses Up/Downsample between levels)."""
  features: Optional[int] = None
  dropout: float = 0.0
  skip_rescale: bool = True
  init_scale: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool):
    features = self.features or x.shape[-1]
    h = nn.swish(group_norm(x.shape[-1], self.dtype)(x))
    h = _condition(conv3x3(features, dtype=self.dtype)(h), temb, features, self.dtype)
    h = nn.swish(group_norm(features, self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv3x3(features, init_scale=self.init_scale, dtype=self.dtype)(h)
    if x.shape[-1] != features:
      # DDPM's "NIN" shortcut: a 1x1 projection with the small 0.1 init.
      x = nn.Dense(features, kernel_init=default_init(0.1), dtype=self.dtype)(x)
    return (x + h) * _SQRT_HALF if self.skip_rescale else x + h
