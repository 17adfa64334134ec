"""Images from a folder, or a .tar.gz of one, decoded once into a uint8 array and cached on disk.

Layout: `<root>/[<split>/][<class>/...]<name>.(png|jpg|jpeg)`. A top-level folder named like the requested split
(`train/`, `test/`) selects that split; without split folders every image under the root is used. A single
wrapping folder (`cifar10/train/...`, as `tar czf cifar10.tar.gz cifar10` makes) is looked through.

Images are read as they are: grayscale (PIL mode L) gives 1 channel and RGB gives 3; nothing is converted, so a
wrong channel count or mode (RGBA, palette, 16-bit), or an image whose size differs from the others', is an error
naming the file. All images share one stored size S; a smaller data.image_size that divides S is made by area
averaging by the caller (data.area_downsample). Hidden
files (`.name`, `__MACOSX/`) are skipped; any other file that is not a PNG/JPEG is an error, so that a stray file
never silently changes the data set. Splits never mix: split folders below the top level next to anything else
(a stray file, a second folder) are an error listing what was found. An archive member is checked by its header
(name, size up to MAX_MEMBER_BYTES) before its bytes are read.

Order is fixed and round-robin over the folders holding the images (the classes), each folder sorted by name:
image k of every class, then image k+1, ... so any prefix (`max_images`) is class-balanced.

The decoded split is cached at its stored size as .npy in $IMMISCIBLE_JAX_CACHE (default ~/.cache/immiscible_jax)/data,
keyed by the absolute path, the archive's size and mtime (or every image's for a folder), the split and channels;
every data.image_size is made from that one cache. An unreadable cache file is decoded again, saying so.

data.path and the cache may be in a bucket (storage.py): an archive at gs://... is streamed through a file object
(a folder must be local), and $IMMISCIBLE_JAX_CACHE=gs://... keeps the decoded .npy there.
"""
import hashlib
import io
import json
import logging
import os
import posixpath
import tarfile

import numpy as np
from PIL import Image

from immiscible_jax import storage
from immiscible_jax.errors import ConfigError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
ARCHIVE_EXTENSIONS = ('.tar.gz', '.tgz')
# Top-level folder names taken to be splits: asking for a split that is not there is then an error.
KNOWN_SPLITS = ('train', 'test', 'val', 'validation')
# Largest archive member whose bytes are read: a member is checked by its header (name, size) first, so a small
# .tar.gz holding a huge member (400 MB of zeros compress to 400 KB) costs no memory. Images here are small
# (square, a few hundred pixels); 64 MB is a 4096 x 4096 RGB image stored without compression.
MAX_MEMBER_BYTES = 64 * 2**20
# Bump when the decoded layout or order changes, so stale caches are not read.
# 2: cached at the stored size (downsampling happens after the cache).
_CACHE_VERSION = 2


def is_archive(path):
  return path.lower().endswith(ARCHIVE_EXTENSIONS)


def cache_dir():
  return storage.join(storage.default_cache_dir(), 'data')


def _hidden(relpath):
  return any(part.startswith('.') or part == '__MACOSX' for part in relpath.split('/'))


def _list_files(path):
  """Returns ({relpath: stat fingerprint}, read(relpath) -> bytes) for the regular files under `path`."""
  if is_archive(path):
    return _list_archive(path)
  files = {}
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames.sort()
    for filename in filenames:
      relpath = os.path.relpath(os.path.join(dirpath, filename), path).replace(os.sep, '/')
      if not _hidden(relpath):
        st = os.stat(os.path.join(dirpath, filename))
        files[relpath] = (st.st_size, st.st_mtime_ns)

  def read(relpath):
    return storage.read_bytes(os.path.join(path, relpath))

  return files, read


def _member_name(member, path):
  """The member's path inside the archive, normalised; a name that leaves the archive is an error."""
  name = posixpath.normpath(member.name).lstrip('/')
  if name == '..' or name.startswith('../'):
    raise ConfigError(f'data.path={path!r}: archive member {member.name!r} points outside the archive.')
  return name


def _list_archive(path):
  """_list_files of a .tar.gz, in one sequential pass (seeking back in a gzip stream is slow). A member's name and
  size are checked from its header before its bytes are read: only image files up to MAX_MEMBER_BYTES are read;
  the others are listed (load() names a non-image in the chosen split) and reading one raises ConfigError."""
  blobs, refused = {}, {}
  try:
    with storage.open(path, 'rb') as f, tarfile.open(fileobj=f, mode='r:gz') as tar:
      for member in tar:
        name = _member_name(member, path)
        if not member.isfile() or _hidden(name):
          continue
        if not name.lower().endswith(IMAGE_EXTENSIONS):
          refused[name] = 'not an image file'
        elif member.size > MAX_MEMBER_BYTES:
          refused[name] = (f'{member.size} bytes, larger than {MAX_MEMBER_BYTES} (image_folder.MAX_MEMBER_BYTES); '
                           'not read')
        else:
          blobs[name] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ConfigError(f'data.path={path!r}: cannot read the archive ({e}).') from e

  def read(name):
    if name in refused:
      raise ConfigError(f'{storage.join(path, name)}: {refused[name]}.')
    return blobs[name]

  return dict.fromkeys([*blobs, *refused]), read


def _select_split(relpaths, split, path):
  """The files of `split`: under a top-level `split/` folder when there is one, else all of them."""
  parts = [p.split('/') for p in relpaths]
  # Look through wrapping folders that hold everything and are not themselves a split.
  wrapping = []
  while (parts and all(len(q) > 2 for q in parts) and len({q[0] for q in parts}) == 1
         and parts[0][0] not in KNOWN_SPLITS + (split,)):
    wrapping.append(parts[0][0])
    parts = [q[1:] for q in parts]
  tops = {q[0] for q in parts if len(q) > 1}
  if split in tops:
    return [p for p, q in zip(relpaths, parts) if q[0] == split and len(q) > 1]
  if tops & set(KNOWN_SPLITS):
    raise ConfigError(f'data.split={split!r}: no {split!r} folder in data.path={path!r}; its split folders are '
                     f'{sorted(tops & set(KNOWN_SPLITS))}.')
  _refuse_nested_splits(parts, wrapping, split, path)
  return list(relpaths)


def _refuse_nested_splits(parts, wrapping, split, path):
  """Split folders below the top level next to other entries (a stray file, a second folder): there is no one
  wrapping folder to look through, and taking every image would mix the splits (test images in training)."""
  names = KNOWN_SPLITS + (split,)
  prefix = ''.join(w + '/' for w in wrapping)
  nested = sorted({prefix + '/'.join(q[:i + 1]) for q in parts for i in range(1, len(q) - 1) if q[i] in names})
  if nested:
    entries = sorted({prefix + q[0] + ('/' if len(q) > 1 else '') for q in parts})
    raise ConfigError(
        f'data.split={split!r}: data.path={path!r} holds split folders below its top level '
        f'({", ".join(nested[:8])}) next to other entries (top level: {", ".join(entries[:8])}); using every image '
        'would mix the splits: put the split folders at the top level, or alone in one wrapping folder.')


def _canonical_order(relpaths):
  """Round-robin over the image folders (classes), each sorted by name: any prefix is class-balanced."""
  groups = {}
  for p in sorted(relpaths):
    groups.setdefault(posixpath.dirname(p), []).append(p)
  columns = [groups[k] for k in sorted(groups)]
  longest = max((len(c) for c in columns), default=0)
  return [c[i] for i in range(longest) for c in columns if i < len(c)]


def _decode(data, where, channels, expected_size=None):
  """One image file's bytes -> uint8 [H, W, C]; every failure names the file.

  expected_size: (size, where the size came from) that the image must have, or None for square of any size.
  """
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      mode, (width, height) = img.mode, img.size
      array = np.asarray(img)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
    raise ConfigError(f'{where}: not a readable image ({type(e).__name__}: {e}).') from e
  if mode not in ('L', 'RGB'):
    raise ConfigError(f'{where}: image mode {mode!r}; only grayscale (L, 1 channel) or RGB (3 channels) images '
                     'are read, without conversion. Convert the files first.')
  if expected_size is not None and (height, width) != (expected_size[0],) * 2:
    raise ConfigError(f'{where}: image is {width}x{height}, but {expected_size[1]}; all images must have one size.')
  if height != width:
    raise ConfigError(f'{where}: image is {width}x{height}; only square images are read.')
  found = 1 if mode == 'L' else 3
  if found != channels:
    raise ConfigError(f'{where}: image has {found} channel(s) (mode {mode}), but data.channels={channels}.')
  return array.reshape(height, width, channels)


def _decode_all(paths, read, root, image_size, channels):
  """Decodes `paths` (relative to root) into uint8 [N, S, S, C]; the first image sets S."""
  images, expected = [], None
  for relpath in paths:
    where = storage.join(root, relpath)
    image = _decode(read(relpath), where, channels, expected)
    if expected is None:
      first = image.shape[0]
      expected = (first, f'data.image_size={image_size} and the first image ({relpath}) is {first}x{first}')
    images.append(image)
  return np.stack(images)


def _cache_path(path, split, channels, files):
  if is_archive(path):
    stamp = storage.fingerprint(path)
  else:
    stamp = sorted(files.items())
  key = json.dumps([_CACHE_VERSION, storage.abspath(path), split, channels, stamp])
  name = f'{storage.basename(path)}-{split}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy'
  return storage.join(cache_dir(), name)


def _read_cache(cache_file, channels):
  """The cached uint8 [N, S, S, channels] images, or None when there is no cache or it is unreadable (a truncated
  or foreign file: decoded again, saying so, and rewritten)."""
  if not storage.exists(cache_file):
    return None
  try:
    images = storage.load_npy(cache_file)
  except (ValueError, OSError, EOFError) as e:
    reason = f'{type(e).__name__}: {e}'
  else:
    if images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == channels and len(images):
      return images
    reason = f'holds {images.dtype} {images.shape}, not uint8 images with {channels} channel(s)'
  logging.warning('decoded-image cache %s is unreadable (%s); decoding the images again', cache_file, reason)
  return None


def _write_cache(cache_file, images):
  try:
    storage.save_npy(cache_file, images, atomic=True)  # Atomic: several processes may decode and write at once.
  except OSError as e:
    logging.warning('Could not cache decoded images at %s (%s); they will be decoded again next time.',
                    cache_file, e)


def load(path, split, channels, max_images=None, image_size=None):
  """uint8 [N, S, S, channels] at the stored size S, in the fixed order above; N = all, or at most max_images.

  image_size (the size the caller will downsample to) only words the error for an image of another size.
  """
  if not storage.exists(path):
    raise FileNotFoundError(f'data.path={path!r} does not exist.')
  if storage.is_remote(path) and not is_archive(path):
    raise ConfigError(f'data.path={path!r}: a folder in a bucket is not read; give a '
                      f'{"/".join(ARCHIVE_EXTENSIONS)} archive of it (or a local folder).')
  # An archive's cache key needs only its stat, so a cached archive is not even decompressed.
  if is_archive(path):
    cache_file = _cache_path(path, split, channels, None)
    cached = _read_cache(cache_file, channels)
    if cached is not None:
      return cached[:max_images]
  files, read = _list_files(path)
  if not is_archive(path):
    cache_file = _cache_path(path, split, channels, files)
    cached = _read_cache(cache_file, channels)
    if cached is not None:
      return cached[:max_images]
  selected = _select_split(list(files), split, path)
  if not selected:
    raise ConfigError(f'data.path={path!r} (data.split={split!r}): no images found; expected '
                     f'{"/".join(IMAGE_EXTENSIONS)} files, optionally in <split>/<class>/ folders.')
  for relpath in selected:
    if not relpath.lower().endswith(IMAGE_EXTENSIONS):
      raise ConfigError(f'{storage.join(path, relpath)}: not an image file (allowed: {IMAGE_EXTENSIONS}); '
                       'remove it from data.path.')
  ordered = _canonical_order(selected)
  partial = max_images is not None and max_images < len(ordered)
  images = _decode_all(ordered[:max_images], read, path, image_size, channels)
  if not partial:  # Cache only whole splits.
    _write_cache(cache_file, images)
  return images
