"""Sample quality: Frechet distance between feature Gaussians, feature extractors, cached reference statistics.

An extractor maps uint8 images [N, H, W, C] to float32 features [N, D]:
  - 'pixels': raw pixels scaled to [0, 1], optionally average-pooled by eval.pixel_downsample (weight-free);
  - 'inception': pool3 features of the standard FID Inception-v3 (inception.py; FID when used with it).
The metric is FD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between the features' Gaussians.
"""
import re
from typing import Protocol

import flax.jax_utils
import jax
import numpy as np

from immiscible_jax import errors
from immiscible_jax import storage
from immiscible_jax.evaluation import inception
from immiscible_jax.parallel import agreement

METRICS = ('pixels', 'inception')
INCEPTION_NAME = 'inception_v3_tf2015'


class Extractor(Protocol):
  name: str  # Identifies the features in cache keys, e.g. 'pixels_ds1', 'inception_v3_tf2015'.

  def __call__(self, images_uint8: np.ndarray, between_batches=None) -> np.ndarray:
    """between_batches: called after each batch of a batched extractor (the training loop's stop check), the
    same number of times for the same number of images."""


def validate_config(eval_config):
  """Raises errors.ConfigError naming the offending eval.* key."""
  if eval_config.metric not in METRICS:
    raise errors.ConfigError(f'eval.metric must be one of {METRICS}, got {eval_config.metric!r}.')
  for key, minimum in (('every_steps', 0), ('num_samples', 2), ('pixel_downsample', 1), ('batch_size', 1),
                       ('reference_num_images', 2)):
    value = eval_config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
      raise errors.ConfigError(f'eval.{key} must be an integer >= {minimum}, got {value!r}.')
  if not isinstance(eval_config.reference_split, str) or not eval_config.reference_split:
    raise errors.ConfigError(f'eval.reference_split must be a split name such as "train", '
                             f'got {eval_config.reference_split!r}.')


def compute_statistics(features):
  """[N, D] features -> (mean [D], covariance [D, D]), float64, unbiased (N - 1) as in the reference FID code."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'Need features [N >= 2, D], got shape {features.shape}.')
  return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def statistics_across_processes(features):
  """(mean, covariance) of the union of every process's features [N_p, D], as compute_statistics gives for
  their concatenation (up to float64 round-off): each process sends only its count and moment sums, in float64.
  Every process must call it; all get the same result."""
  features = np.asarray(features, np.float64)
  d = features.shape[1]
  sums = np.concatenate([[len(features)], features.sum(0), (features.T @ features).reshape(-1)])
  total = agreement.allgather_float64(sums).sum(0)
  n, mean = total[0], total[1:1 + d] / total[0]
  if n < 2:
    raise ValueError(f'Need >= 2 features over all processes, got {int(n)}.')
  scatter = total[1 + d:].reshape(d, d) - n * np.outer(mean, mean)
  return mean, (scatter + scatter.T) / (2 * (n - 1))


def process_share(num_items):
  """(start, count) of this process's contiguous share of num_items (earlier processes take the remainder)."""
  base, extra = divmod(num_items, jax.process_count())
  p = jax.process_index()
  return p * base + min(p, extra), base + (p < extra)


def _clip_round_off(eigenvalues):
  """Zeroes eigenvalues that are round-off (|w| <= d * eps * max|w|): sqrt would turn 1e-16 noise into 1e-8."""
  tol = eigenvalues.shape[0] * np.finfo(np.float64).eps * np.abs(eigenvalues).max(initial=0.0)
  return np.where(eigenvalues > tol, eigenvalues, 0.0)


def _psd_sqrt(sigma):
  """Symmetric square root of a covariance (eigen-decomposition; round-off eigenvalues set to zero)."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(_clip_round_off(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
  S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2. Unlike scipy.linalg.sqrtm of the non-symmetric
  product this needs no epsilon for singular covariances (fewer samples than dimensions) and never goes complex.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'Shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}.')
  if not all(np.all(np.isfinite(a)) for a in (mu1, mu2, sigma1, sigma2)):
    raise ValueError('Statistics contain NaN or inf.')
  root1 = _psd_sqrt((sigma1 + sigma1.T) / 2)
  middle = root1 @ sigma2 @ root1
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  trace_sqrt = np.sqrt(_clip_round_off(eigenvalues)).sum()
  value = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
  return float(max(value, 0.0))  # Exact zero for identical statistics instead of -1e-12 round-off.


def _check_images(images):
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'Expected uint8 images [N, H, W, 1 or 3], got {images.dtype} {images.shape}.')
  return images


class PixelExtractor:
  """Raw pixels in [0, 1], average-pooled by `downsample` (must divide H and W), flattened: [N, H*W*C / ds^2]."""

  def __init__(self, downsample=1):
    self.downsample = downsample
    self.name = f'pixels_ds{downsample}'

  def __call__(self, images_uint8, between_batches=None):
    del between_batches  # numpy on the host, no device batches to stop between
    images = _check_images(images_uint8)
    n, h, w, c = images.shape
    k = self.downsample
    if h % k or w % k:
      raise ValueError(f'eval.pixel_downsample={k} must divide the image size {h}x{w}.')
    out = np.empty((n, (h // k) * (w // k) * c), np.float32)
    for start in range(0, n, 4096):  # Chunks keep the float copy small for 50k CIFAR-10 images.
      x = images[start:start + 4096].astype(np.float32) / 255.0
      x = x.reshape(-1, h // k, k, w // k, k, c).mean(axis=(2, 4))
      out[start:start + 4096] = x.reshape(x.shape[0], -1)
    return out


class BatchedFeatures:
  """Runs a jitted fn(params, uint8 batch) -> [B, D] over any number of images with one fixed batch shape.

  The last batch is padded (and the padding dropped), so each image size compiles once. With several local
  devices the batch is split over them with pmap (parameters broadcast); `batch_size` is per device. By default
  that is all local accelerators, and one device on CPU, where forced host devices share the same cores and
  would only multiply the memory.
  """

  def __init__(self, name, fn, params, batch_size, num_devices=None):
    self.name = name
    self.batch_size = batch_size
    if num_devices is None:
      num_devices = 1 if jax.default_backend() == 'cpu' else jax.local_device_count()
    self.num_devices = num_devices
    # Parameters go to the device(s) once here, not with every batch (87 MB for Inception).
    if self.num_devices > 1:
      devices = jax.local_devices()[:self.num_devices]
      self._fn = jax.pmap(fn, devices=devices)
      self._params = flax.jax_utils.replicate(params, devices)
    else:
      self._fn = jax.jit(fn)
      self._params = jax.device_put(params)

  def __call__(self, images_uint8, between_batches=None):
    images = _check_images(images_uint8)
    n = images.shape[0]
    step = self.batch_size * self.num_devices
    outputs = []
    for start in range(0, n, step):
      batch = images[start:start + step]
      if batch.shape[0] < step:
        pad = np.zeros((step - batch.shape[0],) + batch.shape[1:], batch.dtype)
        batch = np.concatenate([batch, pad])
      if self.num_devices > 1:
        batch = batch.reshape((self.num_devices, self.batch_size) + batch.shape[1:])
      outputs.append(self._fn(self._params, batch))  # dispatched asynchronously: the host pads the next batch
      if between_batches is not None:
        # At most two batches in flight, so that a stop between batches is not a wait for all queued ones.
        if len(outputs) > 1:
          outputs[-2] = np.asarray(outputs[-2])
        between_batches()
    if not outputs:
      raise ValueError('No images to extract features from.')
    features = np.concatenate([np.asarray(o).reshape(step, -1) for o in outputs])
    return features[:n].astype(np.float32)


def inception_extractor(cache_dir=None, batch_size=64, num_devices=None):
  """The FID feature extractor; the weights come from `make weights` (python -m tools.convert_inception)."""
  params = inception.load_params(inception.weights_path(cache_dir or storage.default_cache_dir()))
  return BatchedFeatures(INCEPTION_NAME, inception.features, params, batch_size, num_devices)


def create_extractor(eval_config, cache_dir=None):
  validate_config(eval_config)
  if eval_config.metric == 'pixels':
    return PixelExtractor(eval_config.pixel_downsample)
  return inception_extractor(cache_dir, eval_config.batch_size)


def reference_statistics(extractor, images_fn, cache_key, cache_dir):
  """(mu, sigma) of real images, cached at <cache_dir>/stats/<cache_key>_<extractor.name>.npz.

  `images_fn()` returns uint8 [N, H, W, C] and is called only when the file is missing. The cache key should
  name the dataset, split and image count (e.g. 'cifar10_train_50000') so different references never mix.
  """
  if not re.fullmatch(r'[A-Za-z0-9_.\-]+', cache_key):
    raise ValueError(f'cache_key must use letters, digits, ".", "_" or "-" only, got {cache_key!r}.')
  path = storage.join(cache_dir, 'stats', f'{cache_key}_{extractor.name}.npz')
  if storage.exists(path):
    npz = storage.load_npz(path)
    return npz['mu'], npz['sigma']
  images = images_fn()
  mu, sigma = compute_statistics(extractor(images))
  # Atomic, so an interrupted run never leaves a truncated cache.
  storage.save_npz(path, atomic=True, mu=mu, sigma=sigma, num_images=len(images))
  return mu, sigma


# FID on fewer samples than this is strongly biased upwards (its bias falls as 1/N; Heusel et al. ask for at least
# 10,000 samples, papers report 50,000): flagged in the output, not refused.
MIN_FID_SAMPLES = 10_000


def sample_size_warning(num_samples, num_reference, dim, metric):
  """A one-line warning when the Frechet distance of `num_samples` generated and `num_reference` real feature
  vectors of `dim` dimensions is not comparable to a standard one; None when it is."""
  problems = []
  for what, n in (('samples', num_samples), ('reference images', num_reference)):
    if n <= dim:
      problems.append(f'{n} {what} for {dim} feature dimensions (a singular covariance: the value mostly measures '
                      'the sample size)')
  if metric == 'inception' and num_samples < MIN_FID_SAMPLES:
    problems.append(f'{num_samples} samples, below the {MIN_FID_SAMPLES} an FID needs to be comparable (papers: '
                    '50,000)')
  return '; '.join(problems) or None

