"""Tests for immiscible_jax.data and image_folder: batches, process shards, the stream by step, sources, errors.

Expected values come from the raw sources (scikit-learn's digits, tfds' mock, PNGs written here), never from the
code under test.
"""
import io
import os
import shutil
import tarfile

import numpy as np
from PIL import Image
import pytest

from configs import default
from immiscible_jax import data
from immiscible_jax import errors

_REAL_ARCHIVE = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, 'shared', 'data',
                             'cifar10-jpg.tar.gz')


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  # Decoded-folder caches go to a fresh directory per test, never to the user's ~/.cache.
  monkeypatch.setenv('IMMISCIBLE_JAX_CACHE', str(tmp_path / 'cache'))


def _config(**overrides):
  config = default.get_config().data
  config.update(overrides)
  return config


def _take(iterator, n):
  """n batches; the pipeline yields uint8 (scaled on the device by the step), returned here in [-1, 1]."""
  batches = [next(iterator)['image'] for _ in range(n)]
  assert all(b.dtype == np.uint8 for b in batches)
  return [_unit(b) for b in batches]


def _rows(images):
  """Images as a sorted list of bytes: a multiset that ignores order within a batch."""
  return sorted(bytes(x) for x in np.ascontiguousarray(images).reshape(len(images), -1))


def _unit(images):
  """uint8 values -> float32 in [-1, 1], the documented scaling."""
  return np.asarray(images, np.float32) / 127.5 - 1


def _digits_in_range():
  from sklearn.datasets import load_digits
  return _unit(np.round(load_digits().images * (255 / 16))[..., None])


# ---------------------------------------------------------------------------------------------------- digits


def test_digits_batches_shape_range_and_determinism():
  config = _config()
  batches = _take(data.create_train_iterator(config, 16, seed=0, process_index=0, process_count=1), 3)
  assert data.image_shape(config) == (8, 8, 1)
  for b in batches:
    assert b.shape == (16, 8, 8, 1)
  assert not np.array_equal(batches[0], batches[1])
  # Every image is one of the digits, scaled 0..16 -> 0..255 -> [-1, 1].
  assert set(_rows(np.concatenate(batches))) <= set(_rows(_digits_in_range()))
  again = _take(data.create_train_iterator(config, 16, seed=0, process_index=0, process_count=1), 3)
  other = _take(data.create_train_iterator(config, 16, seed=1, process_index=0, process_count=1), 3)
  np.testing.assert_array_equal(np.stack(batches), np.stack(again))
  assert not np.array_equal(np.stack(batches), np.stack(other))


def test_load_images_digits_fixed_order():
  from sklearn.datasets import load_digits
  images = data.load_images(_config(), max_images=10)
  assert images.dtype == np.uint8 and images.shape == (10, 8, 8, 1)
  np.testing.assert_array_equal(images[..., 0], np.round(load_digits().images[:10] * 255 / 16))
  assert data.load_images(_config(), split='test').shape == (1797, 8, 8, 1)


# ------------------------------------------------------------------------------------- sharding and state


def test_process_shards_are_contiguous_blocks_of_the_global_batch(image_dir):
  # Unique, asymmetric images (see image_dir), flips on: flips must also agree with the unsharded stream.
  config = _config(dataset='folder', path=str(image_dir), image_size=4, channels=3, random_flip=True)
  whole = list(_batches(config, 6, seed=3, count=5))
  parts = [list(_batches(config, 6, seed=3, count=5, process_index=k, process_count=2)) for k in range(2)]
  flipped = 0
  for step in range(5):
    a, b = parts[0][step], parts[1][step]
    assert a['image'].shape == b['image'].shape == (3, 4, 4, 3)
    # Process k holds rows 3k..3k+2 of the global batch, in order, tagged with their global index.
    np.testing.assert_array_equal(np.concatenate([a['image'], b['image']]), whole[step]['image'])
    np.testing.assert_array_equal(a['example_id'], [0, 1, 2])
    np.testing.assert_array_equal(b['example_id'], [3, 4, 5])
    flipped += len(set(_rows(whole[step]['image'])) - set(_rows(_expected_train())))
  assert flipped > 0  # Flips happened, and were the same in both layouts.
  with pytest.raises(ValueError, match='divide'):
    data.create_train_iterator(config, 5, seed=0, process_index=0, process_count=2)


def _batches(config, batch_size, seed, count, process_index=0, process_count=1, start_step=0):
  iterator = data.create_train_iterator(config, batch_size, seed, process_index, process_count, start_step)
  return [next(iterator) for _ in range(count)]


def test_stream_is_a_function_of_the_step_alone():
  # 1797 digits in batches of 599: an epoch is exactly 3 batches, so 8 batches span three epochs.
  config = _config()
  stream = _batches(config, 599, seed=0, count=8)
  # Resuming at step k (no iterator state) gives the batches an uninterrupted stream gives from k on.
  for batch, again in zip(stream[5:], _batches(config, 599, seed=0, count=3, start_step=5)):
    np.testing.assert_array_equal(again['image'], batch['image'])
  # Worker processes compute whole batches and keep their order: the same stream.
  for batch, again in zip(stream, _batches(_config(num_workers=2), 599, seed=0, count=8)):
    np.testing.assert_array_equal(again['image'], batch['image'])
  # Every epoch is a permutation of the data set, a different one each time.
  epochs = [_unit(np.concatenate([b['image'] for b in stream[3 * e:3 * e + 3]])) for e in range(2)]
  assert _rows(epochs[0]) == _rows(epochs[1]) == _rows(_digits_in_range())
  assert not np.array_equal(epochs[0], epochs[1])


# ------------------------------------------------------------------------------------------------- cifar10


def _cifar10(**overrides):
  return _config(**{'dataset': 'cifar10', 'image_size': 32, 'channels': 3, **overrides})


def test_cifar10_from_tfds_mock_with_flips():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    source = tfds.data_source('cifar10', split='train', download=False)
    records = np.stack([source[i]['image'] for i in range(12)])
    originals, mirrors = set(_rows(_unit(records))), set(_rows(_unit(records[:, :, ::-1])))
    seen = {True: set(), False: set()}
    for flip in (False, True):
      iterator = data.create_train_iterator(_cifar10(random_flip=flip), 8, seed=0, process_index=0,
                                            process_count=1)
      for b in _take(iterator, 3):
        assert b.shape == (8, 32, 32, 3)
        seen[flip] |= set(_rows(b))
    loaded = data.load_images(_cifar10(), max_images=5)
  assert seen[False] <= originals
  assert seen[True] <= originals | mirrors
  assert seen[True] & (mirrors - originals) and seen[True] & originals  # Some flipped, some not.
  np.testing.assert_array_equal(loaded, records[:5])


def test_cifar10_missing_explains_how_to_prepare(tmp_path):
  config = _cifar10(tfds_data_dir=str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match='tfds build cifar10') as error:
    data.create_train_iterator(config, 8, seed=0, process_index=0, process_count=1)
  assert 'data.tfds_data_dir' in str(error.value) and 'data.dataset=folder' in str(error.value)


# -------------------------------------------------------------------------------------------------- folder

_CLASSES, _PER_CLASS = ('cat', 'dog'), {'train': 6, 'test': 2}


def _image(split, label, i):
  """A unique 4x4 RGB image; random content, so mirrored it is (almost surely) a different image."""
  seed = [('train', 'test').index(split), label, i]
  return np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)


def _expected_train():
  # Round-robin over the class folders: cat/0, dog/0, cat/1, dog/1, ...
  return np.stack([_image('train', c, i) for i in range(6) for c in range(2)])


@pytest.fixture(scope='module')
def image_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('images') / 'pets'
  for split, count in _PER_CLASS.items():
    for label, name in enumerate(_CLASSES):
      os.makedirs(root / split / name)
      for i in range(count):
        Image.fromarray(_image(split, label, i)).save(root / split / name / f'{i:03d}.png')
  return root


@pytest.fixture(scope='module')
def image_archive(image_dir):
  path = image_dir.parent / 'pets.tar.gz'
  with tarfile.open(path, 'w:gz') as tar:
    tar.add(image_dir, arcname='pets')  # Wrapped in one folder, as `tar czf pets.tar.gz pets` makes.
  return path


def _folder(path, **overrides):
  return _config(**{'dataset': 'folder', 'path': str(path), 'image_size': 4, 'channels': 3, **overrides})


def test_folder_and_archive_load_identically(image_dir, image_archive):
  from_dir = data.load_images(_folder(image_dir))
  np.testing.assert_array_equal(from_dir, _expected_train())
  np.testing.assert_array_equal(data.load_images(_folder(image_archive)), from_dir)
  test_split = data.load_images(_folder(image_archive), split='test')
  np.testing.assert_array_equal(test_split, [_image('test', c, i) for i in range(2) for c in range(2)])
  np.testing.assert_array_equal(data.load_images(_folder(image_archive), max_images=3), from_dir[:3])
  batch = next(data.create_train_iterator(_folder(image_archive), 4, seed=0, process_index=0,
                                          process_count=1))['image']
  assert batch.shape == (4, 4, 4, 3) and set(_rows(batch)) <= set(_rows(_expected_train()))


def test_folder_cache_is_written_and_invalidated(image_dir, tmp_path):
  import shutil
  root = tmp_path / 'copy'
  shutil.copytree(image_dir, root)
  first = data.load_images(_folder(root))
  assert os.listdir(tmp_path / 'cache' / 'data')
  replacement = np.full((4, 4, 3), 7, np.uint8)
  Image.fromarray(replacement).save(root / 'train' / 'cat' / '000.png')
  os.utime(root / 'train' / 'cat' / '000.png', ns=(1, 1))  # A different mtime even on coarse clocks.
  second = data.load_images(_folder(root))
  np.testing.assert_array_equal(second[0], replacement)
  np.testing.assert_array_equal(second[1:], first[1:])


@pytest.mark.parametrize('name, content, match', [
    ('notes.txt', b'hello', 'not an image file'),
    ('broken.png', b'not a png at all', 'not a readable image'),
    ('big.png', ('RGB', 5), 'data.image_size=4'),
    ('gray.png', ('L', 4), 'data.channels=3'),
    ('alpha.png', ('RGBA', 4), "mode 'RGBA'"),
])
def test_folder_bad_file_is_named(image_dir, tmp_path, name, content, match):
  import shutil
  root = tmp_path / 'bad'
  shutil.copytree(image_dir, root)
  target = root / 'train' / 'dog' / name
  if isinstance(content, bytes):
    target.write_bytes(content)
  else:
    mode, size = content
    Image.new(mode, (size, size)).save(target)
  archive = tmp_path / 'bad.tgz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(root, arcname='.')
  for path in (root, archive):
    with pytest.raises(ValueError, match=match) as error:
      data.load_images(_folder(path))
    assert f'train/dog/{name}' in str(error.value)


def test_folder_path_split_and_emptiness_errors(image_dir, tmp_path):
  with pytest.raises(ValueError, match='data.path'):
    data.validate_config(_folder(tmp_path / 'missing'))
  not_archive = tmp_path / 'one.png'
  Image.new('RGB', (4, 4)).save(not_archive)
  with pytest.raises(ValueError, match='neither a folder nor'):
    data.validate_config(_folder(not_archive))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no images found') as error:
    data.load_images(_folder(tmp_path / 'empty'))
  assert str(tmp_path / 'empty') in str(error.value)
  with pytest.raises(ValueError, match="data.split='val'"):
    data.load_images(_folder(image_dir, split='val'))
  corrupt = tmp_path / 'corrupt.tar.gz'
  corrupt.write_bytes(b'\x1f\x8b not really gzip')
  with pytest.raises(ValueError, match='corrupt.tar.gz'):
    data.load_images(_folder(corrupt))


def _tar_gz(path, root, extra=()):
  """A .tar.gz of the folder `root` (member names relative to it) plus (name, bytes) members."""
  with tarfile.open(path, 'w:gz') as tar:
    tar.add(root, arcname='.')
    for name, content in extra:
      member = tarfile.TarInfo(name)
      member.size = len(content)
      tar.addfile(member, io.BytesIO(content))
  return path


@pytest.mark.parametrize('stray', ['preview.png', 'other/0.png'])
def test_split_folders_next_to_a_stray_entry_are_an_error_not_a_mix_of_splits(image_dir, tmp_path, stray):
  """Issue 21, case 2: root/pets/{train,test}/<class>/ plus one stray image (or a second top-level folder): the
  wrapping folder cannot be looked through, and using every image would train on the test split too."""
  root = tmp_path / 'root'
  shutil.copytree(image_dir, root / 'pets')
  os.makedirs((root / stray).parent, exist_ok=True)
  Image.fromarray(_image('train', 0, 0)).save(root / stray)
  for path in (root, _tar_gz(tmp_path / 'root.tar.gz', root)):
    with pytest.raises(errors.ConfigError) as error:
      data.load_images(_folder(path))
    message = str(error.value)
    assert "data.split='train'" in message and 'pets/test' in message and 'pets/train' in message, message
    assert stray.split('/')[0] in message and '\n' not in message


def _extracted_members(monkeypatch):
  """Names of the archive members whose bytes the code under test reads."""
  read, extractfile = [], tarfile.TarFile.extractfile

  def recording(self, member):
    read.append(member.name if isinstance(member, tarfile.TarInfo) else member)
    return extractfile(self, member)

  monkeypatch.setattr(tarfile.TarFile, 'extractfile', recording)
  return read


@pytest.mark.parametrize('name,match', [('train/cat/blob.bin', 'not an image file'),
                                        ('train/cat/huge.png', 'larger than')])
def test_archive_members_are_checked_by_name_and_size_before_they_are_read(image_dir, tmp_path, monkeypatch,
                                                                            name, match):
  """Issue 21, case 12: a 1.8 MB .tar.gz that holds a 400 MB member raised peak memory by 400 MB before any
  check. Here the limit is lowered to 1 MB and the member is 3 MB of zeros (a few KB compressed)."""
  from immiscible_jax import image_folder  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(image_folder, 'MAX_MEMBER_BYTES', 2**20)
  archive = _tar_gz(tmp_path / 'big.tar.gz', image_dir, [(name, bytes(3 * 2**20))])
  read = _extracted_members(monkeypatch)
  with pytest.raises(errors.ConfigError, match=match) as error:
    data.load_images(_folder(archive))
  assert name in str(error.value)
  assert read and not [n for n in read if n.endswith(name)]  # the images were read, the bad member never


def test_a_corrupt_decoded_image_cache_is_decoded_again_saying_so(image_dir, tmp_path, caplog):
  """Issue 21, case 10: a truncated cache .npy ended in a traceback; it is decoded again from the images."""
  first = data.load_images(_folder(image_dir))
  (cached,) = (tmp_path / 'cache' / 'data').iterdir()
  cached.write_bytes(cached.read_bytes()[:100])
  with caplog.at_level('WARNING'):
    again = data.load_images(_folder(image_dir))
  np.testing.assert_array_equal(again, first)
  assert any(str(cached) in r.getMessage() and 'decoding the images again' in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(np.load(cached), first)  # and the cache is rewritten whole


@pytest.mark.skipif(not os.path.exists(_REAL_ARCHIVE), reason=f'offline CIFAR-10 JPEGs absent: {_REAL_ARCHIVE}')
def test_real_cifar10_archive():
  images = data.load_images(_config(dataset='folder', path=_REAL_ARCHIVE, image_size=32, channels=3),
                            max_images=20)
  assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
  assert len(set(_rows(images))) == 20 and images.std() > 10


# ---------------------------------------------------------------------------------------------- downsampling


def _block_means(images, size):
  """Reference area downsampling, written independently: float64 mean of each block, rounded half up."""
  images = np.asarray(images, np.float64)
  n, stored, _, channels = images.shape
  f = stored // size
  out = np.empty((n, size, size, channels))
  for i in range(size):
    for j in range(size):
      out[:, i, j] = images[:, i * f:(i + 1) * f, j * f:(j + 1) * f].mean(axis=(1, 2))
  return np.floor(out + 0.5).astype(np.uint8)


def test_downsampled_digits_folder_and_tfds_match_block_means(image_dir, image_archive):
  import tensorflow_datasets as tfds
  digits8 = data.load_images(_config())
  np.testing.assert_array_equal(data.load_images(_config(image_size=4)), _block_means(digits8, 4))
  for path in (image_dir, image_archive):  # 4x4 PNGs -> 2x2 and 1x1
    for size in (2, 1):
      np.testing.assert_array_equal(data.load_images(_folder(path, image_size=size)),
                                    _block_means(_expected_train(), size))
  with tfds.testing.mock_data(num_examples=6):
    source = tfds.data_source('cifar10', split='train', download=False)
    records = np.stack([source[i]['image'] for i in range(6)])
    np.testing.assert_array_equal(data.load_images(_cifar10(image_size=16), max_images=6), _block_means(records, 16))
    batch = next(data.create_train_iterator(_cifar10(image_size=8), 6, seed=0, process_index=0, process_count=1))
  assert batch['image'].shape == (6, 8, 8, 3)
  assert _rows(batch['image']) == _rows(_block_means(records, 8))  # one epoch: every image once


def test_downsampling_that_does_not_divide_is_a_named_error(image_dir):
  with pytest.raises(ValueError, match=r'data.image_size=3: .*4x4 images; .* allowed: \[4, 2, 1\]'):
    data.load_images(_folder(image_dir, image_size=3))
  with pytest.raises(ValueError, match=r'data.image_size=8: .*4x4'):
    data.load_images(_folder(image_dir, image_size=8))
  with pytest.raises(ValueError, match=r'data.image_size=5: .*32x32'):
    data.validate_config(_cifar10(image_size=5))


@pytest.mark.skipif(not os.path.exists(_REAL_ARCHIVE), reason=f'offline CIFAR-10 JPEGs absent: {_REAL_ARCHIVE}')
def test_real_cifar10_archive_downsampled():
  full = data.load_images(_config(dataset='folder', path=_REAL_ARCHIVE, image_size=32, channels=3), max_images=8)
  for size in (16, 8):
    small = data.load_images(_config(dataset='folder', path=_REAL_ARCHIVE, image_size=size, channels=3),
                             max_images=8)
    np.testing.assert_array_equal(small, _block_means(full, size))


# -------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize('overrides, match', [
    (dict(dataset='mnist'), 'data.dataset'),
    (dict(channels=2), 'data.channels'),
    (dict(image_size=0), 'data.image_size'),
    (dict(image_size=32), r'data.image_size=32: .*8x8.* allowed: \[8, 4, 2, 1\]'),
    (dict(image_size=3), r'data.image_size=3: .*must divide 8'),
    (dict(dataset='cifar10'), 'data.channels=1: .* set data.channels=3'),
    (dict(split='validation'), 'data.split'),
    (dict(num_workers=-1), 'data.num_workers'),
])
def test_validate_config_names_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    data.validate_config(_config(**overrides))


def test_device_prefetch_reads_ahead_and_shards_for_pmap():
  from immiscible_jax.parallel import prefetch  # pylint: disable=g-import-not-at-top
  new = lambda: data.create_train_iterator(_config(), 16, seed=0, process_index=0, process_count=1)
  expected = [next(it) for it in [new()] for _ in range(4)]
  put = []
  batches = prefetch.DevicePrefetcher(new(), put=lambda b: put.append(b) or b, depth=2)
  first = next(batches)
  assert len(put) == 3  # the batch returned and the two behind it are already on their way to the devices
  for got, want in zip([first, next(batches), next(batches)], expected):
    np.testing.assert_array_equal(got['image'], want['image'])
  # The default put lays a batch out as pmap reads it: [devices, B / devices, ...], one shard per local device,
  # the images still uint8 (scaled on the device) and each row with its global example index.
  on_device = next(prefetch.DevicePrefetcher(new()))
  assert on_device['image'].shape == (8, 2, 8, 8, 1) and on_device['image'].dtype == np.uint8
  assert len(on_device['image'].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(on_device['image']).reshape(16, 8, 8, 1), expected[0]['image'])
  np.testing.assert_array_equal(np.asarray(on_device['example_id']), np.arange(16).reshape(8, 2))
