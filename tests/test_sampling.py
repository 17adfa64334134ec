"""Samplers against CM Algorithm 1 written out by hand, determinism, archives and grids (no trained model needed)."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from immiscible_jax import errors
from immiscible_jax import sampling
from immiscible_jax.parallel import layouts

SHAPE = (4, 4, 1)
SIGMA_MIN, SIGMA_DATA = 0.002, 0.5


def _net(variables, x, c_noise, train, rngs):  # pylint: disable=redefined-outer-name,unused-argument
  """A stand-in network: F(x, c) = w * x + c, enough to make every term of f visible."""
  return variables['params']['w'] * x + c_noise[:, None, None, None]


PARAMS = {'w': jnp.float32(0.3)}


def _f(x, sigma):
  """The consistency function written out from the CM paper for the stand-in network."""
  c_skip = SIGMA_DATA ** 2 / ((sigma - SIGMA_MIN) ** 2 + SIGMA_DATA ** 2)
  c_out = SIGMA_DATA * (sigma - SIGMA_MIN) / math.sqrt(SIGMA_DATA ** 2 + sigma ** 2)
  c_in = 1 / math.sqrt(sigma ** 2 + SIGMA_DATA ** 2)
  return c_skip * x + c_out * (0.3 * c_in * x + 0.25 * math.log(sigma))


def _noise(key, j, n):  # the documented stream: sample j, sampler step n
  return np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, j), n), SHAPE), np.float64)


@pytest.mark.parametrize('sigmas', [(80.0,), (80.0, 0.821), (80.0, 10.0, 1.0)])
def test_multistep_sampler_follows_algorithm_1(sigmas):
  key = jax.random.key(7)
  out = sampling.sample_batch(_net, PARAMS, key, jnp.arange(3), SHAPE, sigmas, SIGMA_MIN, SIGMA_DATA)
  for j in range(3):
    x = _f(sigmas[0] * _noise(key, j, 0), sigmas[0])
    for n, sigma in enumerate(sigmas[1:], start=1):
      x = _f(x + math.sqrt(sigma ** 2 - SIGMA_MIN ** 2) * _noise(key, j, n), sigma)
    np.testing.assert_allclose(out[j], x, rtol=1e-4, atol=1e-5)


def test_generate_is_deterministic_and_independent_of_chunking():
  sampler = sampling.make_sampler(_net, SHAPE, (80.0, 0.821), SIGMA_MIN, SIGMA_DATA)
  params = layouts.replicate(PARAMS)
  key = jax.random.key(1)
  thirteen = sampling.generate(sampler, params, key, 13, SHAPE, per_device_batch=1)
  assert thirteen.shape == (13, *SHAPE)
  five = sampling.generate(sampler, params, key, 5, SHAPE, per_device_batch=1)
  np.testing.assert_array_equal(thirteen[:5], five)
  np.testing.assert_array_equal(sampling.generate(sampler, params, key, 13, SHAPE, per_device_batch=1), thirteen)
  other = sampling.generate(sampler, params, jax.random.key(2), 13, SHAPE, per_device_batch=1)
  assert not np.allclose(other, thirteen)
  one_step = sampling.make_sampler(_net, SHAPE, (80.0,), SIGMA_MIN, SIGMA_DATA)
  single = sampling.generate(one_step, params, key, 5, SHAPE, per_device_batch=1)
  expected = np.stack([_f(80.0 * _noise(key, j, 0), 80.0) for j in range(5)])
  np.testing.assert_allclose(single, expected, rtol=1e-4, atol=1e-5)


def test_uint8_archive_and_grid_round_trip(tmp_path):
  images = np.array([-1.0, -0.999, 0.0, 0.5, 1.0, 3.0]).reshape(6, 1, 1, 1) * np.ones((6, 3, 5, 1))
  as_uint8 = sampling.to_uint8(images)
  np.testing.assert_array_equal(as_uint8[:, 0, 0, 0], [0, 0, 128, 191, 255, 255])  # round((x+1)*127.5), clipped
  paths = sampling.save_samples(as_uint8, str(tmp_path / 's'), shard_size=4)
  assert [p.rsplit('/', 1)[1] for p in paths] == ['samples_00000-of-00002.npz', 'samples_00001-of-00002.npz']
  np.testing.assert_array_equal(sampling.load_samples(str(tmp_path / 's')), as_uint8)
  np.testing.assert_array_equal(sampling.load_samples(paths[1]), as_uint8[4:])
  grid = np.asarray(sampling.image_grid(as_uint8, columns=3))
  # 2 rows x 3 columns of 3x5 tiles with 1-pixel gaps (9 x 19 pixels), scaled up by the smallest whole factor
  # that makes the longer side at least GRID_MIN_SIDE pixels, each pixel a constant scale x scale block.
  scale = grid.shape[0] // (2 * 4 + 1)
  assert grid.shape == ((2 * 4 + 1) * scale, (3 * 6 + 1) * scale)
  assert (scale - 1) * 19 < sampling.GRID_MIN_SIDE <= scale * 19
  blocks = grid.reshape(9, scale, 19, scale)
  assert np.all(blocks == blocks[:, :1, :, :1])
  small = blocks[:, 0, :, 0]
  assert small[1, 1] == 0 and small[1, 6 + 1] == 0      # tiles 0 and 1: black
  assert small[4 + 1, 2 * 6 + 1] == 255                 # tile 5: white
  assert small[0, 0] == 255                             # the gap
  # 100 digits (8x8): 91 pixels at 1:1, 546 here (each digit 48 pixels wide).
  assert sampling.image_grid(np.zeros((100, 8, 8, 1), np.uint8)).size == (546, 546)


def _images(n, value):
  return np.full((n, 4, 4, 1), value, np.uint8)


def test_a_sample_set_is_replaced_whole_and_read_by_its_manifest(tmp_path):
  """Issue 21, case 4: sampling again with another shard size left the old shards beside the new ones, and both
  were counted (32 instead of 16)."""
  out = str(tmp_path / 'set')
  sampling.save_samples(_images(16, 1), out, shard_size=8)
  sampling.save_samples(_images(16, 2), out, shard_size=16)
  np.testing.assert_array_equal(sampling.load_samples(out), _images(16, 2))
  assert sorted(f for f in os.listdir(out) if f.endswith('.npz')) == ['samples_00000-of-00001.npz']


def test_an_incomplete_sample_set_is_refused_naming_what_is_missing(tmp_path):
  """Issue 21, case 4: with 3 of 6 shards deleted, or killed between shards (no manifest yet), the rest was
  evaluated as if it were the whole set."""
  out = tmp_path / 'set'
  paths = sampling.save_samples(_images(48, 3), str(out), shard_size=8)
  for path in paths[1:4]:
    os.remove(path)
  with pytest.raises(errors.ConfigError, match=r'3 of its 6 shards are missing') as error:
    sampling.load_samples(str(out))
  assert all(os.path.basename(p) in str(error.value) for p in paths[1:4])
  os.remove(out / 'manifest.json')
  with pytest.raises(errors.ConfigError, match=r'no manifest\.json'):
    sampling.load_samples(str(out))
