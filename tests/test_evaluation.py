"""Frechet distance against closed forms, statistics, the pixel extractor, batching and the reference cache."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default

from immiscible_jax.evaluation import frechet


def _random_spd(rng, d, rank=None):
  b = rng.normal(size=(d, rank or d))
  return b @ b.T / d + (0.0 if rank else 0.1 * np.eye(d))


def _closed_form_congruent(mu1, sigma1, mu2, t):
  """FD to N(mu2, T S1 T) for symmetric PSD T: (S1^1/2 T S1 T S1^1/2)^1/2 = S1^1/2 T S1^1/2, trace tr(T S1)."""
  sigma2 = t @ sigma1 @ t
  value = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(t @ sigma1)
  return sigma2, value


def test_one_dimensional_closed_form():
  # W2^2 between 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
  fd = frechet.frechet_distance(np.array([1.5]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]]))
  assert fd == pytest.approx(2.0 ** 2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_diagonal_closed_form():
  rng = np.random.default_rng(0)
  d = 50
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  fd = frechet.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  assert fd == pytest.approx(expected, rel=1e-10)


def test_non_commuting_closed_form():
  rng = np.random.default_rng(1)
  d = 40
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  sigma1, t = _random_spd(rng, d), _random_spd(rng, d)
  sigma2, expected = _closed_form_congruent(mu1, sigma1, mu2, t)
  assert not np.allclose(sigma1 @ sigma2, sigma2 @ sigma1)  # A case the diagonal test does not cover.
  assert frechet.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize('rank', [1, 7, 19])
def test_rank_deficient_covariances_are_finite_and_accurate(rank):
  # Fewer samples than dimensions (as with FID-on-few-samples): S1 has rank < d, S2 = T S1 T too.
  rng = np.random.default_rng(rank)
  d = 64
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  sigma1, t = _random_spd(rng, d, rank=rank), _random_spd(rng, d)
  sigma2, expected = _closed_form_congruent(mu1, sigma1, mu2, t)
  fd = frechet.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert np.isfinite(fd)
  assert fd == pytest.approx(expected, rel=1e-7)


def test_near_singular_diagonal_spectrum():
  # Eigenvalues from 1 down to 1e-14 in a random basis: commuting, closed form sum (sqrt a - sqrt b)^2.
  rng = np.random.default_rng(2)
  d = 30
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a, b = np.logspace(0, -14, d), np.logspace(-14, 0, d)
  fd = frechet.frechet_distance(np.zeros(d), q @ np.diag(a) @ q.T, np.zeros(d), q @ np.diag(b) @ q.T)
  assert fd == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-8)


def test_zero_for_identical_and_symmetric():
  rng = np.random.default_rng(3)
  few = rng.normal(size=(10, 32))  # Rank-9 covariance.
  mu, sigma = few.mean(0), np.cov(few, rowvar=False)
  assert frechet.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-10 * np.trace(sigma))
  other = rng.normal(1.0, 2.0, size=(50, 32))
  mu2, sigma2 = other.mean(0), np.cov(other, rowvar=False)
  forward = frechet.frechet_distance(mu, sigma, mu2, sigma2)
  assert forward > 1.0
  assert frechet.frechet_distance(mu2, sigma2, mu, sigma) == pytest.approx(forward, rel=1e-9)


def test_rejects_mismatched_and_non_finite():
  with pytest.raises(ValueError, match='Shapes'):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match='NaN'):
    frechet.frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))


def test_statistics_approach_the_generating_gaussian():
  rng = np.random.default_rng(4)
  d, n = 4, 200_000
  mu = np.array([1.0, -2.0, 0.5, 3.0])
  a = rng.normal(size=(d, d))
  sigma = a @ a.T + np.eye(d)
  samples = rng.multivariate_normal(mu, sigma, size=n).astype(np.float32)
  mean, cov = frechet.compute_statistics(samples)
  assert mean.dtype == np.float64 and cov.shape == (d, d)
  np.testing.assert_allclose(mean, mu, atol=5 * np.sqrt(np.diag(sigma).max() / n))
  np.testing.assert_allclose(cov, sigma, atol=0.03 * np.abs(sigma).max())
  assert frechet.frechet_distance(mean, cov, mu, sigma) < 1e-3


def test_pixel_extractor_downsamples():
  images = np.zeros((2, 4, 4, 1), np.uint8)
  images[0, :2, :2, 0] = 255  # Top-left 2x2 block white in image 0.
  images[1, 0, 0, 0] = 255    # One white pixel in image 1.
  full = frechet.PixelExtractor(1)(images)
  assert full.shape == (2, 16) and full.dtype == np.float32 and full.max() == 1.0
  pooled = frechet.PixelExtractor(2)
  assert pooled.name == 'pixels_ds2'
  np.testing.assert_allclose(pooled(images), [[1, 0, 0, 0], [0.25, 0, 0, 0]])
  rgb = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  assert frechet.PixelExtractor(4)(rgb).shape == (3, 2 * 2 * 3)
  with pytest.raises(ValueError, match='eval.pixel_downsample'):
    frechet.PixelExtractor(3)(rgb)
  with pytest.raises(ValueError, match='uint8'):
    pooled(images.astype(np.float32))


def _load_default_config():
  return default.get_config()


def test_validate_config_names_the_key():
  config = _load_default_config()
  frechet.validate_config(config.eval)
  assert frechet.create_extractor(config.eval).name == f'pixels_ds{config.eval.pixel_downsample}'
  bad = ml_collections.ConfigDict(config.eval.to_dict())
  bad.metric = 'lpips'
  with pytest.raises(ValueError, match=r"eval\.metric.*'pixels', 'inception'"):
    frechet.validate_config(bad)
  bad = ml_collections.ConfigDict(config.eval.to_dict())
  bad.pixel_downsample = 0
  with pytest.raises(ValueError, match='eval.pixel_downsample'):
    frechet.validate_config(bad)


def test_missing_inception_weights_say_how_to_create_them(tmp_path):
  config = _load_default_config()
  config.eval.metric = 'inception'
  with pytest.raises(FileNotFoundError, match=r'python -m tools\.convert_inception --cache_dir='):
    frechet.create_extractor(config.eval, cache_dir=str(tmp_path))


def test_batched_features_pad_split_over_devices_and_trace_once():
  traces = []

  def fn(params, x):
    traces.append(x.shape)  # Runs only while tracing.
    return jnp.sum(x.astype(jnp.float32), axis=(1, 2)) * params

  n_dev = jax.local_device_count()
  extractor = frechet.BatchedFeatures('sum', fn, jnp.float32(2.0), batch_size=3, num_devices=n_dev)
  rng = np.random.default_rng(5)
  for n in (5, 3 * n_dev + 1, 1):  # Smaller than, not a multiple of, and equal-ish to the global batch.
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    expected = 2.0 * images.astype(np.float64).sum(axis=(1, 2))
    np.testing.assert_allclose(extractor(images), expected, rtol=1e-6)
  assert len(traces) == 1


def test_reference_statistics_cache_round_trip(tmp_path):
  calls = []
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, (20, 4, 4, 1), dtype=np.uint8)

  def images_fn():
    calls.append(1)
    return images

  extractor = frechet.PixelExtractor(2)
  mu, sigma = frechet.reference_statistics(extractor, images_fn, 'digits_train_20', str(tmp_path))
  assert os.path.exists(tmp_path / 'stats' / 'digits_train_20_pixels_ds2.npz')
  feats = images.astype(np.float64).reshape(20, 2, 2, 2, 2).mean(axis=(2, 4)).reshape(20, 4) / 255
  np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-9)
  mu2, sigma2 = frechet.reference_statistics(extractor, images_fn, 'digits_train_20', str(tmp_path))
  assert len(calls) == 1
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)
  # Same images, same statistics: distance zero.
  same = frechet.compute_statistics(extractor(images))
  assert frechet.frechet_distance(*same, mu2, sigma2) == pytest.approx(0.0, abs=1e-9)
