"""Consistency sampling (CM paper, Algorithm 1), sample sets (.npz shards and their manifest) and image grids.

One step:  x = f(sigma_max z, sigma_max).
Multistep: then for each later sigma_n, x = f(x + sqrt(sigma_n^2 - sigma_min^2) z_n, sigma_n).
A 1-element sigma sequence is the one-step sampler. Sampling is pmapped over local devices and deterministic
for a given key: sample j always uses fold_in(key, j), whatever the device count.
"""
import functools
import json
import math

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from immiscible_jax import consistency
from immiscible_jax import errors
from immiscible_jax import storage

# Grids are scaled up (nearest neighbour, by a whole factor) until their longer side reaches this many pixels:
# 100 digits of 8x8 become a 546-pixel image (each digit 48 pixels wide), 100 CIFAR-10 images 662 pixels.
GRID_MIN_SIDE = 512


def sample_batch(apply_fn, params, key, sample_ids, image_shape, sigmas, sigma_min, sigma_data):
  """Samples for the given global sample indices [B] -> [B, H, W, C] in (about) [-1, 1]."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(sample_ids)
  draw = lambda n: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, n), image_shape))(keys)
  f = lambda x, s: consistency.denoise(apply_fn, params, x, jnp.full((x.shape[0],), s, jnp.float32),
                                       sigma_min, sigma_data)
  x = f(sigmas[0] * draw(0), sigmas[0])
  for n, sigma in enumerate(sigmas[1:], start=1):
    x = f(x + math.sqrt(sigma ** 2 - sigma_min ** 2) * draw(n), sigma)
  return x


def make_sampler(apply_fn, image_shape, sigmas, sigma_min, sigma_data):
  """The pmapped sampler: (replicated params, replicated key, ids [devices, B]) -> images. Build it once."""
  fn = functools.partial(sample_batch, apply_fn, image_shape=tuple(image_shape),
                         sigmas=tuple(float(s) for s in sigmas), sigma_min=sigma_min, sigma_data=sigma_data)
  return jax.pmap(fn, axis_name='batch')


def generate(sampler, replicated_params, key, num_samples, image_shape, per_device_batch=256, start_index=0,
             between_batches=None):
  """num_samples images as float32 numpy [N, H, W, C], in chunks of local_devices x per_device_batch.

  Under several processes each process generates its own part: pass start_index = its first sample index.
  between_batches: called after each chunk (the training loop's stop check).
  """
  n_dev = jax.local_device_count()
  per_device_batch = max(1, min(per_device_batch, math.ceil(num_samples / n_dev)))
  chunk = n_dev * per_device_batch
  keys = flax.jax_utils.replicate(key)
  out = []
  for begin in range(0, num_samples, chunk):
    ids = start_index + begin + np.arange(chunk, dtype=np.int32).reshape(n_dev, per_device_batch)
    out.append(np.asarray(sampler(replicated_params, keys, ids)).reshape(chunk, *image_shape))
    if between_batches is not None:
      between_batches()
  return np.concatenate(out)[:num_samples]


def to_uint8(images):
  """[-1, 1] floats -> uint8 [0, 255] (rounded, clipped)."""
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images_uint8, columns=None, min_side=GRID_MIN_SIDE):
  """[N, H, W, C] uint8 -> one PIL image: N tiles in rows of `columns` with a 1-pixel white gap, scaled up by
  the smallest whole factor that makes its longer side at least `min_side` pixels (nearest neighbour)."""
  n, h, w, c = images_uint8.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 255, np.uint8)
  for i, img in enumerate(images_uint8):
    r, col = divmod(i, columns)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = img
  scale = max(1, math.ceil(min_side / max(grid.shape[:2])))
  grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  return Image.fromarray(grid[..., 0] if c == 1 else grid)


# Written last into a sample folder: the set's shards and count. A folder without one is incomplete (a run killed
# while writing it) or not a set written here, and is refused.
MANIFEST = 'manifest.json'


def save_samples(images_uint8, out_dir, shard_size=10000, prefix='samples', info=None):
  """Writes [N, H, W, C] uint8 as a complete sample set: <prefix>_00000-of-000NN.npz shards (key 'images'), then
  MANIFEST listing them, the count and `info` (e.g. the checkpoint step). A set already in `out_dir` is removed
  first, its manifest before its shards, so the folder never holds a mix of two sets. Returns the shard paths."""
  storage.makedirs(out_dir)
  _remove_sample_set(out_dir)
  num_shards = max(1, math.ceil(len(images_uint8) / shard_size))
  paths, shards = [], []
  for i in range(num_shards):
    path = storage.join(out_dir, f'{prefix}_{i:05d}-of-{num_shards:05d}.npz')
    shard = images_uint8[i * shard_size:(i + 1) * shard_size]
    storage.save_npz(path, atomic=False, images=shard)
    paths.append(path)
    shards.append({'name': storage.basename(path), 'num_samples': len(shard)})
  manifest = {'num_samples': len(images_uint8), 'image_shape': list(images_uint8.shape[1:]), 'shards': shards,
              **(info or {})}
  storage.write_text(storage.join(out_dir, MANIFEST), json.dumps(manifest, indent=2) + '\n', atomic=True)
  return paths


def _remove_sample_set(out_dir):
  try:
    names = storage.listdir(out_dir)
  except FileNotFoundError:  # a bucket has no empty folders: nothing there yet
    return
  if MANIFEST in names:
    storage.remove(storage.join(out_dir, MANIFEST))
  for name in names:
    if name.endswith('.npz'):
      storage.remove(storage.join(out_dir, name))


def read_manifest(sample_dir):
  """The MANIFEST of a sample folder; errors.ConfigError when it is missing or unreadable."""
  path = storage.join(sample_dir, MANIFEST)
  if not storage.exists(path):
    raise errors.ConfigError(
        f'--samples={sample_dir}: no {MANIFEST}, so the set is incomplete (a run killed while writing it) or was not '
        'written by --mode=sample; write it again with --mode=sample')
  try:
    manifest = json.loads(storage.read_text(path))
    well_formed = isinstance(manifest['num_samples'], int) and all(
        isinstance(s['name'], str) and isinstance(s['num_samples'], int) for s in manifest['shards'])
  except (ValueError, KeyError, TypeError) as e:
    well_formed, manifest = False, f'{type(e).__name__}: {e}'
  if not well_formed:
    raise errors.ConfigError(f'--samples={sample_dir}: {MANIFEST} is unreadable ({str(manifest)[:200]}); write the '
                             'set again with --mode=sample')
  return manifest


def load_npz_images(path):
  """The uint8 [N, H, W, C] 'images' of one .npz; every failure is an errors.ConfigError naming the file."""
  if not storage.exists(path):
    raise errors.ConfigError(f'--samples={path}: does not exist')
  try:
    arrays = storage.load_npz(path)
  except Exception as e:  # pylint: disable=broad-except  # zipfile, numpy and OS errors: all mean unreadable
    raise errors.ConfigError(f'--samples={path}: not a readable .npz ({type(e).__name__}: {e})') from e
  if 'images' not in arrays:
    raise errors.ConfigError(f"--samples={path}: no 'images' array (it holds {sorted(arrays)}); sample archives hold "
                             "uint8 images [N, H, W, C] under 'images'")
  images = arrays['images']
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise errors.ConfigError(f'--samples={path}: holds {images.dtype} {images.shape}; expected uint8 images '
                             '[N, H, W, C] with C = 1 or 3')
  return images


def load_samples(path_or_dir):
  """The images of one .npz, or of the complete sample set in a folder (the shards its MANIFEST lists, in order;
  a missing shard or a count that differs is an errors.ConfigError naming what is wrong)."""
  if not storage.isdir(path_or_dir):
    return load_npz_images(path_or_dir)
  manifest = read_manifest(path_or_dir)
  names = [shard['name'] for shard in manifest['shards']]
  missing = [n for n in names if not storage.exists(storage.join(path_or_dir, n))]
  if missing:
    raise errors.ConfigError(f'--samples={path_or_dir}: incomplete sample set: {len(missing)} of its {len(names)} '
                             f'shards are missing ({", ".join(missing)}); write it again with --mode=sample')
  shards = [load_npz_images(storage.join(path_or_dir, n)) for n in names]
  counts = [len(x) for x in shards]
  if counts != [shard['num_samples'] for shard in manifest['shards']] or sum(counts) != manifest['num_samples']:
    raise errors.ConfigError(f'--samples={path_or_dir}: the shards hold {counts} samples, but {MANIFEST} lists '
                             f'{[s["num_samples"] for s in manifest["shards"]]}; write the set again with '
                             '--mode=sample')
  return np.concatenate(shards)
