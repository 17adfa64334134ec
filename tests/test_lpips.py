"""LPIPS-VGG16: the weight conversion's safety, equality with the reference PyTorch LPIPS, and its properties.

The reference tests need PyTorch, the `lpips==0.1.4` wheel (its v0.1 heads and reference code; `make weights`
installs both) and the converted weights (`make weights` writes them into IMMISCIBLE_JAX_CACHE); without them
they are skipped with the reason. lpips imports torchvision only for `tv.vgg16(...).features`; PyPI's torchvision
does not load against this machine's torch, so a stand-in with torchvision's VGG16 layer order is installed for
them (conv/ReLU pairs, max pools at 4, 9, 16, 23, 30), and its backbone is loaded from our converted weights.
"""
import importlib.util
import io
import os
import pickle
import sys
import tarfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from immiscible_jax import errors
from immiscible_jax import storage
from immiscible_jax.models import lpips
from tools import convert_lpips

HAS_TORCH = importlib.util.find_spec('torch') is not None
HAS_LPIPS = importlib.util.find_spec('lpips') is not None
WEIGHTS = lpips.weights_path(storage.default_cache_dir())
_REAL_ARCHIVE = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, 'shared', 'data',
                             'cifar10-jpg.tar.gz')
needs_weights = pytest.mark.skipif(not os.path.exists(WEIGHTS),
                                   reason=f'no converted LPIPS weights at {WEIGHTS}: run `make weights`')
needs_reference = pytest.mark.skipif(not (HAS_TORCH and HAS_LPIPS),
                                     reason='torch or the lpips wheel not installed: run `make weights`')


class _Evil:

  def __reduce__(self):
    return (os.system, ('echo owned',))


@pytest.mark.parametrize('payload', [_Evil(), {'a': np.ones(3), 'b': _Evil()}, __import__('collections').OrderedDict(a=1)])
def test_restricted_unpickler_refuses_any_other_global(payload):
  data = pickle.dumps(payload, protocol=3)
  with pytest.raises(convert_lpips.ForbiddenPickleGlobal, match=r'names (posix|os|nt|collections)\.'):
    convert_lpips.load_array_pickle(data)


def test_restricted_unpickler_reads_a_dict_of_arrays():
  tree = {'VGG16_0': {'Conv_0': {'kernel': np.arange(6, dtype=np.float32).reshape(1, 2, 3)}}, 'n': [1, 'x']}
  back = convert_lpips.load_array_pickle(pickle.dumps(tree, protocol=3))
  np.testing.assert_array_equal(back['VGG16_0']['Conv_0']['kernel'], tree['VGG16_0']['Conv_0']['kernel'])
  assert back['n'] == [1, 'x']


def test_network_shapes_and_converter_constants():
  shapes = lpips.param_shapes()
  # VGG16's 13 convolutions (kernel + bias) and the five heads: 14,714,688 + 1,472 parameters.
  assert len(shapes) == 13 * 2 + 5
  assert sum(int(np.prod(s)) for s in shapes.values()) == lpips.NUM_PARAMS == convert_lpips.NUM_PARAMS
  assert shapes['conv1_1/kernel'] == (3, 3, 3, 64) and shapes['conv5_3/bias'] == (512,)
  assert [shapes[f'lin{i}'] for i in range(5)] == [(64,), (128,), (256,), (512,), (512,)]
  assert convert_lpips.CONV_NAMES == lpips.CONV_NAMES and convert_lpips.WEIGHTS_FILENAME == lpips.WEIGHTS_FILENAME


def test_missing_weights_is_one_line_naming_the_command(tmp_path):
  with pytest.raises(errors.ConfigError,
                     match=r'make weights \(or: python -m tools\.convert_lpips --cache_dir=') as info:
    lpips.load_params(str(tmp_path / 'lpips_vgg16.npz'))
  assert '\n' not in str(info.value)


def test_below_16_pixels_is_a_named_error():
  params = _random_params()
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(errors.ConfigError, match='at least 16x16'):
    lpips.distance(params, x, x, resolution=0)


def _random_params(seed=0):
  x = jnp.zeros((1, 16, 16, 3))
  params = lpips.LPIPS().init(jax.random.key(seed), x, x)['params']
  # Positive heads (initialised at zero, which would make every distance 0).
  return {k: (jnp.abs(jax.random.normal(jax.random.key(seed + 1), v.shape)) if k.startswith('lin') else v)
          for k, v in params.items()}


def test_gradient_reaches_the_images_never_the_lpips_weights():
  """distance() stops the gradient at the weights and at the target: d/d(weights) is zero, d/d(target) is zero,
  d/d(online) is not."""
  params = _random_params()
  keys = jax.random.split(jax.random.key(2), 2)
  online, target = (jax.random.uniform(k, (2, 16, 16, 1), minval=-1, maxval=1) for k in keys)
  g_params, g_online, g_target = jax.grad(lambda p, o, t: lpips.distance(p, o, t, 16).sum(), argnums=(0, 1, 2))(
      params, online, target)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(g_params))
  assert float(jnp.abs(g_target).max()) == 0.0
  assert float(jnp.abs(g_online).max()) > 0.0


def _box_blur(images, radius):
  """Mean over a (2r + 1)^2 window, edges clamped; radius 0 is the identity."""
  if radius == 0:
    return images
  padded = np.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode='edge')
  h, w = images.shape[1:3]
  windows = [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]
  return np.mean(windows, axis=0)


def _cifar_images(n=8):
  """n real CIFAR-10 training images as float32 [n, 32, 32, 3] in [-1, 1], read with PIL from the archive."""
  if not os.path.exists(_REAL_ARCHIVE):
    pytest.skip(f'the offline CIFAR-10 archive is absent ({_REAL_ARCHIVE})')
  images = []
  with tarfile.open(_REAL_ARCHIVE, 'r:gz') as tar:
    for member in tar:
      if member.isfile() and member.name.endswith('.jpg') and '/train/' in f'/{member.name}':
        images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert('RGB')))
        if len(images) == n:
          break
  return np.stack(images).astype(np.float32) / 127.5 - 1.0


@needs_weights
def test_zero_for_identical_images_and_growing_with_blur():
  params = lpips.load_params(WEIGHTS)
  rng = np.random.default_rng(0)
  # Smooth random images (a blurred noise field), so that blurring further changes them gradually.
  images = np.clip(_box_blur(rng.uniform(-1, 1, (4, 32, 32, 3)), 1) * 2, -1, 1).astype(np.float32)
  same = lpips.distance(params, images, images, 0)
  np.testing.assert_array_equal(np.asarray(same), 0.0)
  values = [np.asarray(lpips.distance(params, images, _box_blur(images, r).astype(np.float32), 0))
            for r in (1, 2, 3)]
  assert (values[0] > 0).all() and (values[1] > values[0]).all() and (values[2] > values[1]).all(), values


def _install_torchvision_stand_in():
  """A `torchvision` module whose models.vgg16(...).features has torchvision's layer order (random weights)."""
  if 'torchvision' in sys.modules and getattr(sys.modules['torchvision'], '_immiscible_stand_in', False):
    return
  import torch  # pylint: disable=g-import-not-at-top

  def vgg16(pretrained=False, **unused):
    del pretrained, unused
    layers, channels = [], 3
    for width in (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'):
      if width == 'M':
        layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers += [torch.nn.Conv2d(channels, width, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
        channels = width
    return types.SimpleNamespace(features=torch.nn.Sequential(*layers))

  tv = types.ModuleType('torchvision')
  tv.models = types.ModuleType('torchvision.models')
  tv.models.vgg16 = vgg16
  tv._immiscible_stand_in = True  # pylint: disable=protected-access
  sys.modules['torchvision'], sys.modules['torchvision.models'] = tv, tv.models


def _reference_lpips(npz):
  """lpips.LPIPS(net='vgg') with its own v0.1 heads and its VGG16 backbone loaded from our converted weights."""
  _install_torchvision_stand_in()
  import lpips as reference  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  model = reference.LPIPS(net='vgg', pnet_rand=True, verbose=False)
  convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
  assert len(convs) == 13
  with torch.no_grad():
    for name, conv in zip(lpips.CONV_NAMES, convs):
      conv.weight.copy_(torch.from_numpy(npz[f'{name}/kernel'].transpose(3, 2, 0, 1).copy()))  # HWIO -> OIHW
      conv.bias.copy_(torch.from_numpy(npz[f'{name}/bias']))
  return model.eval()


@needs_weights
@needs_reference
def test_heads_equal_the_lpips_wheels_v0_1_vgg_weights():
  import torch  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('lpips')  # the wheel's folder, found without importing it
  pth = os.path.join(os.path.dirname(spec.origin), 'weights', 'v0.1', 'vgg.pth')
  state = torch.load(pth, map_location='cpu')
  npz = storage.load_npz(WEIGHTS)
  for level, channels in enumerate((64, 128, 256, 512, 512)):
    head = state[f'lin{level}.model.1.weight'].numpy()  # [1, C, 1, 1]
    assert head.shape == (1, channels, 1, 1)
    np.testing.assert_array_equal(npz[f'lin{level}'], head.reshape(-1))


@needs_weights
@needs_reference
@pytest.mark.parametrize('source', ['random', 'cifar10'])
@pytest.mark.parametrize('size', [32, 224])
def test_equals_the_reference_pytorch_lpips(source, size):
  import torch  # pylint: disable=g-import-not-at-top
  npz = storage.load_npz(WEIGHTS)
  rng = np.random.default_rng(size)
  if source == 'random':
    x = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
  else:
    x = _cifar_images(8)
    y = np.roll(x, 1, axis=0)  # pairs of different real images
  if size != 32:  # both sides get the same 224x224 input: this tests the network, not the resize
    x, y = (np.asarray(lpips.resize(jnp.asarray(a), size)) for a in (x, y))
  ours = np.asarray(lpips.distance(lpips.load_params(WEIGHTS), x, y, 0))
  with torch.no_grad():
    to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    theirs = _reference_lpips(npz)(to_nchw(x), to_nchw(y)).numpy().reshape(-1)
  assert (theirs > 0).all()
  np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_two_lpips_training_steps_of_the_tiny_config(tmp_path, monkeypatch):
  """configs/tiny.py with training.loss='lpips' (8x8 digits resized to 16x16) trains two steps from the cache's
  weights (random ones here, written in the converter's format, so that the run does not depend on a download):
  finite, positive losses, and neither the trained parameters, the optimizer state nor the checkpoint hold any
  LPIPS weight."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from immiscible_jax import checkpointing, train  # pylint: disable=g-import-not-at-top
  cache = tmp_path / 'cache'
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(_random_params())[0]}
  storage.save_npz(lpips.weights_path(str(cache)), **flat)
  monkeypatch.setenv('IMMISCIBLE_JAX_CACHE', str(cache))
  config = tiny.get_config()
  config.training.loss, config.training.lpips_resolution = 'lpips', 16
  config.training.num_steps = config.training.log_every_steps = config.checkpoint.every_steps = 2
  workdir = tmp_path / 'run'
  state = train.train_and_evaluate(config, str(workdir))
  rows = [__import__('json').loads(line) for line in open(workdir / 'metrics.jsonl')]
  loss = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert len(loss) == 1 and np.isfinite(loss[0]) and loss[0] > 0
  names = lambda tree: {str(getattr(k, 'key', k)) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
                        for k in path}
  assert not names(state) & (set(lpips.CONV_NAMES) | set(lpips.HEAD_NAMES))
  saved = checkpointing.read_meta(checkpointing.create_manager(str(workdir), config.checkpoint, read_only=True), 2)
  assert len(saved['state_crc32']) == len(jax.tree_util.tree_leaves(state))  # the checkpoint is this state


def test_missing_weights_stop_training_before_it_compiles(tmp_path, monkeypatch):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from immiscible_jax import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('IMMISCIBLE_JAX_CACHE', str(tmp_path / 'empty_cache'))
  config = tiny.get_config()
  config.training.loss, config.training.lpips_resolution = 'lpips', 16
  with pytest.raises(errors.ConfigError, match=r"training.loss='lpips': no LPIPS weights at .*make weights"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists() or not os.listdir(tmp_path / 'run' / 'checkpoints')
