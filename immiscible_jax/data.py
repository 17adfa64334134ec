"""Input pipeline: uint8 images from digits, CIFAR-10 (tfds) or an image folder, through grain.

Sources (config key `data.dataset`):
  digits   scikit-learn's bundled 8x8 digits (1797 images, values 0..16 scaled to 0..255), 1 channel, no
           download. There is no held-out split: 'train' and 'test' both give all 1797 images.
  cifar10  `tfds.data_source('cifar10')`: prepared array_record files read without TensorFlow, decoded into
           memory once when the iterator is built (150 MB for the training split), not at every read.
  folder   PNG/JPEG files in a folder or .tar.gz (see image_folder.py), decoded once and cached.

`data.image_size` may be smaller than the stored images (digits 8, CIFAR-10 32, a folder's own size) when it
divides the stored size: each (stored / image_size)^2 block is averaged (area downsampling, rounded half up to
uint8), for training batches and reference images alike. So CIFAR-10 at 16x16 or 8x8 needs no converted copy.

Training batches: a grain dataset over step numbers whose element n is global batch n, a pure function of
(seed, n) (see _GlobalBatches): endless, reshuffled every epoch, optional random horizontal flips. Each process
computes only its own contiguous rows of it, tagged with their global example index. So a run's batches do not
depend on the process layout or on data.num_workers, and resuming at step k starts the stream at batch k.
Batches stay uint8 up to the device (a quarter of float32's bytes over PCIe or to a TPU host); the train step
scales them to [-1, 1] itself (train.to_unit_range).
"""
import functools
import os

import grain
import numpy as np

from immiscible_jax import errors
from immiscible_jax import image_folder
from immiscible_jax import storage
from immiscible_jax.errors import ConfigError

DATASETS = ('digits', 'cifar10', 'folder')
_ENDLESS = 2**40  # batches in the stream: more than any run takes
# Datasets whose stored images have one fixed (size, channels).
_STORED_SHAPES = {'digits': (8, 1), 'cifar10': (32, 3)}
_DIGITS_SPLITS = ('train', 'test')


def validate_config(data_config):
  """Fails fast, naming the key and its allowed values, before anything is read or compiled."""
  dataset, size, channels = data_config.dataset, data_config.image_size, data_config.channels
  if dataset not in DATASETS:
    raise ConfigError(f'data.dataset={dataset!r}; allowed: {DATASETS}.')
  if channels not in (1, 3):
    raise ConfigError(f'data.channels={channels!r}; allowed: 1 (grayscale) or 3 (RGB).')
  if not isinstance(size, int) or size <= 0:
    raise ConfigError(f'data.image_size={size!r}; must be a positive integer.')
  if dataset in _STORED_SHAPES:
    stored, want_channels = _STORED_SHAPES[dataset]
    if channels != want_channels:
      raise ConfigError(f'data.channels={channels!r}: data.dataset={dataset!r} has {want_channels} channel(s); '
                       f'set data.channels={want_channels}.')
    check_downsampling(size, stored, f'data.dataset={dataset!r}')
  if not isinstance(data_config.split, str) or not data_config.split:
    raise ConfigError(f'data.split={data_config.split!r}; must be a split name such as "train" or "test".')
  if dataset == 'digits' and data_config.split not in _DIGITS_SPLITS:
    raise ConfigError(f'data.split={data_config.split!r} for digits; allowed: {_DIGITS_SPLITS}.')
  if dataset != 'folder' and data_config.path:  # a given archive would be ignored: the run would train on other data
    raise ConfigError(f'data.path={data_config.path!r}: data.dataset={dataset!r} does not read it (only "folder" '
                      "does); set data.dataset=folder to train on it, or data.path=''.")
  if dataset == 'folder':
    path = data_config.path
    if not path or not storage.exists(path):
      raise ConfigError(f'data.path={path!r} does not exist; for data.dataset="folder" it must be a folder of '
                       f'PNG/JPEG files or a {"/".join(image_folder.ARCHIVE_EXTENSIONS)} archive of one.')
    if not (storage.isdir(path) or image_folder.is_archive(path)):
      raise ConfigError(f'data.path={path!r} is neither a folder nor a '
                       f'{"/".join(image_folder.ARCHIVE_EXTENSIONS)} archive.')
  if not isinstance(data_config.num_workers, int) or data_config.num_workers < 0:
    raise ConfigError(f'data.num_workers={data_config.num_workers!r}; must be an integer >= 0.')


def check_downsampling(size, stored, what):
  """Named error unless `size` divides the stored size `stored` (what: where the images come from)."""
  if stored % size:
    allowed = [d for d in range(stored, 0, -1) if stored % d == 0]
    raise ConfigError(f'data.image_size={size}: {what} stores {stored}x{stored} images; data.image_size must '
                     f'divide {stored} to area-average them down; allowed: {allowed}.')


def area_downsample(images, size):
  """uint8 [..., S, S, C] -> uint8 [..., size, size, C]: the mean of each (S/size)^2 block, rounded half up.

  Integer arithmetic, so the result is exact (no float ties). size must divide S (check_downsampling).
  """
  images = np.asarray(images)
  stored, channels = images.shape[-2], images.shape[-1]
  if stored == size:
    return images
  f = stored // size
  blocks = images.reshape(*images.shape[:-3], size, f, size, f, channels).astype(np.uint32)
  total = blocks.sum(axis=(-4, -2))
  return ((2 * total + f * f) // (2 * f * f)).astype(np.uint8)


def image_shape(data_config):
  """(H, W, C) of the images the pipeline yields."""
  return (data_config.image_size, data_config.image_size, data_config.channels)


class _Images:
  """Random access to uint8 images: records that hold one image each (optionally under `key`).

  With `size`, each image read is area-downsampled to size x size (for sources read record by record).
  """

  def __init__(self, records, name, key=None, size=None):
    self.records, self._name, self._key, self._size = records, name, key, size
    # One uint8 [N, H, W, C] array, ready as stored: batches are gathered with one indexing operation.
    self.in_memory = isinstance(records, np.ndarray) and key is None and size is None

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    record = self.records[index]
    image = record if self._key is None else record[self._key]
    return image if self._size is None else area_downsample(image, self._size)

  def __repr__(self):  # short: no data, no ids
    return f'_Images({self._name}, n={len(self)})'


def _digits():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  images = load_digits().images  # [1797, 8, 8] float, integer values 0..16
  return np.round(images * (255.0 / 16.0)).astype(np.uint8)[..., None]


def _tfds_source(data_config, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = data_config.tfds_data_dir or os.environ.get('TFDS_DATA_DIR') or None
  try:  # download=False: never try the network; unprepared data must fail here with advice.
    return tfds.data_source('cifar10', split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises KeyError, NotImplementedError, FileNotFoundError, ... depending on state.
    where = data_dir or '~/tensorflow_datasets'
    raise errors.MissingInputError(
        f'CIFAR-10 (split {split!r}) is not prepared as array_record in {where} ({type(e).__name__}: '
        f'{" ".join(str(e).split())[:100]}). '
        'Either prepare it on a machine with internet and TensorFlow: `tfds build cifar10 '
        '--file_format=array_record --data_dir=DIR`, copy DIR here and set data.tfds_data_dir=DIR (or '
        '$TFDS_DATA_DIR); or use data.dataset=folder with data.path=<folder or .tar.gz of '
        '<split>/<class>/*.png|jpg>.') from e


def _source(data_config, split, max_images=None):
  """A grain random-access source of uint8 [H, W, C] images, in a fixed order."""
  dataset = data_config.dataset
  size = data_config.image_size
  if dataset == 'digits':
    return _Images(area_downsample(_digits(), size), f'digits:{split}')
  if dataset == 'cifar10':
    records = _tfds_source(data_config, split)
    count = len(records) if max_images is None else min(max_images, len(records))
    # Decoded once (tfds decodes a PNG at every read); one record at a time: tfds' mock source (tests) has no
    # working batched read.
    images = np.stack([np.asarray(records[i]['image'], dtype=np.uint8) for i in range(count)])
    return _Images(area_downsample(images, size), f'cifar10:{split}')
  images = image_folder.load(data_config.path, split, data_config.channels, max_images, image_size=size)
  check_downsampling(size, images.shape[1], f'data.path={data_config.path!r}')
  images = area_downsample(images, size)
  return _Images(images, f'folder:{storage.abspath(data_config.path)}:{split}')


class _GlobalBatches:
  """Batch n of the endless global stream, as this process's rows: a pure function of (seed, n).

  Global batch n holds the records at stream positions n*B .. n*B + B - 1; position q is record
  permutation(epoch = q // N)[q % N], each epoch's permutation drawn from (seed, epoch). Flips are drawn per global
  batch from (seed, n). Process p of P holds the contiguous rows p*B/P .. (p+1)*B/P - 1, device-major like the
  devices of the pmap axis, so device g of any layout sees the same examples. `example_id` is each row's index in
  the global batch: the trainer keys noise and noise levels on it.
  """

  def __init__(self, source, global_batch_size, seed, random_flip, process_index, process_count):
    self._source, self._batch, self._flip = source, global_batch_size, random_flip
    self._seed = int(seed) % 2**32  # numpy seed sequences take non-negative integers
    host_batch = global_batch_size // process_count
    self._rows = np.arange(process_index * host_batch, (process_index + 1) * host_batch)
    self._permutations = {}

  def _permutation(self, epoch):
    if epoch not in self._permutations:
      if len(self._permutations) > 2:  # batches straddle at most two epochs
        self._permutations.pop(min(self._permutations))
      self._permutations[epoch] = np.random.default_rng((self._seed, 0, epoch)).permutation(len(self._source))
    return self._permutations[epoch]

  def __call__(self, n):
    epochs, offsets = np.divmod(n * self._batch + self._rows, len(self._source))
    indices = np.array([self._permutation(e)[o] for e, o in zip(epochs, offsets)])
    if self._source.in_memory:
      images = self._source.records[indices]
    else:
      images = np.stack([np.asarray(self._source[i], np.uint8) for i in indices])
    if self._flip:
      mirror = np.random.default_rng((self._seed, 1, n)).random(self._batch)[self._rows] < 0.5
      images[mirror] = images[mirror, :, ::-1]
    return {'image': images, 'example_id': self._rows.astype(np.int32)}  # uint8: scaled on the device

  def __repr__(self):
    return f'_GlobalBatches({self._source!r}, batch={self._batch}, seed={self._seed}, flip={self._flip})'


def create_train_iterator(data_config, global_batch_size, seed, process_index=None, process_count=None,
                          start_step=0):
  """Endless iterator of this process's part of each global batch, from global batch `start_step` on.

  Yields {'image': uint8 [global_batch_size // process_count, H, W, C], 'example_id': int32 [same]}.
  Batch n depends only on (data, seed, n, global_batch_size): not on the process count, nor on data.num_workers
  (grain worker processes compute whole batches and return them in order). So resuming at step k needs no
  iterator state: start at k. Process defaults come from jax.process_index()/count().
  """
  return train_stream(data_config, global_batch_size, seed, process_index, process_count)(start_step)


def train_stream(data_config, global_batch_size, seed, process_index=None, process_count=None):
  """start_step -> create_train_iterator's iterator. The images are read (and bad input reported) here, so the
  trainer can open its data before it compiles anything and start the stream once it knows its step."""
  validate_config(data_config)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'Global batch size {global_batch_size} must be positive and divide by the process count '
                     f'({process_count}).')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is outside [0, {process_count}).')
  batches = _GlobalBatches(_source(data_config, data_config.split), global_batch_size, seed,
                           data_config.random_flip, process_index, process_count)
  return functools.partial(_iterate, batches, data_config.num_workers)


def _iterate(batches, num_workers, start_step):
  dataset = grain.MapDataset.range(start_step, _ENDLESS).map(batches).to_iter_dataset(
      # Inline reads: grain's reader threads were 5-7x slower here (2.0k vs 14.6k images/s from memory on
      # 2 cores); parallelism comes from data.num_workers processes instead.
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags, even outside an absl app.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(dataset)


def load_images(data_config, split=None, max_images=None):
  """uint8 [N, H, W, C] in a fixed order, not augmented (FID reference statistics, benchmarks).

  N is the split's size, or at most max_images (the first ones in that order).
  """
  validate_config(data_config)
  split = data_config.split if split is None else split
  if data_config.dataset == 'digits' and split not in _DIGITS_SPLITS:
    raise ValueError(f'split={split!r} for digits; allowed: {_DIGITS_SPLITS}.')
  source = _source(data_config, split, max_images)
  if isinstance(source.records, np.ndarray):  # digits, folder: already one array.
    return np.array(source.records[:max_images])
  count = len(source) if max_images is None else min(max_images, len(source))
  # One record at a time: tfds' mock source (tests) has no working batched read.
  return np.stack([np.asarray(source[i], dtype=np.uint8) for i in range(count)])
