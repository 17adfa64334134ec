"""NCSN++ U-Net (Song et al. 2021, "Score-based generative modeling through SDEs"), as configured by
the consistency-model papers for CIFAR-10.

    F = NCSNpp(...).apply({'params': p}, x, c_noise, train=...)   # x [B, H, W, C], c_noise [B]

x is the already-scaled input x_t / sqrt(sigma^2 + sigma_data^2) and c_noise = 0.25 log(sigma); the
caller applies c_skip / c_out. Layout, top to bottom:
  noise embedding (Fourier or sinusoidal) -> Dense(4 nf) -> swish -> Dense(4 nf)   [B, 4 nf]
  conv3x3(nf) -> per level: num_res_blocks residual blocks (+ attention at attn_resolutions), then a
  down-sampling block (BigGAN: a residual block with down=True) and, with progressive_input
  'residual', an input-pyramid branch (FIR blur + strided conv of the previous pyramid level) summed in
  -> middle: block, attention, block -> per level in reverse: num_res_blocks + 1 blocks on
  [h, skip] concatenations (+ attention), then an up-sampling block -> GroupNorm, swish, conv3x3(C).
The final conv and the last conv of every block start at init_scale (0: exact zeros, so F = 0 at init).

`dtype` (config model.dtype) is the compute dtype of the body: every block's convolutions, matmuls and
activations. Parameters are float32 in every case. Three parts stay float32 whatever `dtype` is:
  - the noise embedding (Fourier / sinusoidal features and its two Dense layers): sin/cos of 2 pi w c_noise with
    |w c_noise| up to ~30 would keep only ~2 significant digits in bfloat16, and nearby sigma must map to
    distinguishable embeddings;
  - GroupNorm statistics (see layers.py);
  - the output head (last GroupNorm, swish and output conv): F is what the consistency loss compares at two
    nearby noise levels (a difference of two network outputs), so the last projection is not rounded to
    bfloat16's 8 mantissa bits on top of the body's error. F is returned in float32.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from immiscible_jax.models import layers


class NCSNpp(nn.Module):
  """NCSN++; fields mirror the `model` section of configs/default.py (see there for meanings)."""
  channels: int
  nf: int = 128
  ch_mult: Sequence[int] = (2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  embedding_type: str = 'fourier'
  fourier_scale: float = 16.0
  positional_scale: float = 1000.0
  resblock_type: str = 'biggan'
  skip_rescale: bool = True
  resamp_with_conv: bool = True
  init_scale: float = 0.0
  fir: bool = True
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  progressive_input: str = 'residual'
  dtype: Any = jnp.float32

  def _embed(self, c_noise):
    """c_noise [B] -> temb [B, 4 nf], float32 (see the module docstring)."""
    if self.embedding_type == 'fourier':
      temb = layers.GaussianFourierEmbedding(self.nf, self.fourier_scale)(c_noise)
    else:
      temb = layers.sinusoidal_embedding(c_noise * self.positional_scale, self.nf)
    temb = nn.Dense(4 * self.nf, kernel_init=layers.default_init())(temb)
    return nn.Dense(4 * self.nf, kernel_init=layers.default_init())(nn.swish(temb))

  def _block(self, features=None, up=False, down=False):
    if self.resblock_type == 'biggan':
      return layers.ResnetBlockBigGAN(
          features, up=up, down=down, dropout=self.dropout, fir=self.fir, fir_kernel=self.fir_kernel,
          skip_rescale=self.skip_rescale, init_scale=self.init_scale, dtype=self.dtype)
    return layers.ResnetBlockDDPM(
        features, dropout=self.dropout, skip_rescale=self.skip_rescale, init_scale=self.init_scale,
        dtype=self.dtype)

  def _attention(self):
    return layers.AttentionBlock(skip_rescale=self.skip_rescale, init_scale=self.init_scale, dtype=self.dtype)

  def _downsample(self, h, temb, train):
    if self.resblock_type == 'biggan':
      return self._block(down=True)(h, temb, train)
    return layers.Downsample(with_conv=self.resamp_with_conv, fir=self.fir, fir_kernel=self.fir_kernel,
                             dtype=self.dtype)(h)

  def _upsample(self, h, temb, train):
    if self.resblock_type == 'biggan':
      return self._block(up=True)(h, temb, train)
    return layers.Upsample(with_conv=self.resamp_with_conv, fir=self.fir, fir_kernel=self.fir_kernel,
                           dtype=self.dtype)(h)

  @nn.compact
  def __call__(self, x, c_noise, train: bool = False):
    if x.ndim != 4 or x.shape[-1] != self.channels:
      raise ValueError(f'NCSNpp expects [B, H, W, {self.channels}] inputs, got shape {x.shape}.')
    if c_noise.shape != x.shape[:1]:
      raise ValueError(f'c_noise must have shape [B] = {x.shape[:1]}, got {c_noise.shape}.')
    temb = self._embed(c_noise)
    num_levels = len(self.ch_mult)

    # Down path. `skips` keeps every tensor the up path will concatenate back in.
    pyramid = x.astype(self.dtype)
    skips = [layers.conv3x3(self.nf, dtype=self.dtype, name='input_conv')(x)]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = self._block(self.nf * mult)(skips[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = self._attention()(h)
        skips.append(h)
      if level != num_levels - 1:
        h = self._downsample(skips[-1], temb, train)
        if self.progressive_input == 'residual':
          pyramid = layers.Downsample(h.shape[-1], with_conv=True, fir=self.fir,
                                      fir_kernel=self.fir_kernel, dtype=self.dtype)(pyramid)
          # A Python float: a NumPy scalar would promote bfloat16 activations to float32.
          pyramid = (pyramid + h) * float(np.sqrt(0.5)) if self.skip_rescale else pyramid + h
          h = pyramid
        skips.append(h)

    # Middle.
    h = self._block()(skips[-1], temb, train)
    h = self._attention()(h)
    h = self._block()(h, temb, train)

    # Up path.
    for level in reversed(range(num_levels)):
      for _ in range(self.num_res_blocks + 1):
        h = self._block(self.nf * self.ch_mult[level])(
            jnp.concatenate([h, skips.pop()], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = self._attention()(h)
      if level != 0:
        h = self._upsample(h, temb, train)
    assert not skips, 'every skip connection must be consumed'

    # Output head in float32 (module docstring).
    h = nn.swish(layers.group_norm(h.shape[-1], jnp.float32)(h.astype(jnp.float32)))
    return layers.conv3x3(self.channels, init_scale=self.init_scale, dtype=jnp.float32,
                          name='output_conv')(h)  # [B, H, W, C] float32
