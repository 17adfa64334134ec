"""`gcp-storage-emulator` (a GCS JSON-API server) with the object generation on downloads, as GCS sends it.

  python tests/gcs_emulator.py start --host=127.0.0.1 --port=PORT --in-memory --default-bucket=BUCKET

The same command line as the package's `gcp-storage-emulator`; three handlers are wrapped before the server is
built. Media downloads there carry no `x-goog-generation` header and ignore the ifGeneration[Not]Match conditions,
so tensorstore (Orbax's array writer) fails on its first read of an OCDBT manifest with "Malformed
StorageGeneration". GCS itself sends the header, answers 304 when ifGenerationNotMatch equals the object's
generation and 412 when ifGenerationMatch differs from it: the wrapper does the same. Uploads and deletes there
ignore ifGenerationMatch too (GCS answers 412 when it differs, 0 meaning "no such object"), which the workdir lock
(immiscible_jax/workdir_lock.py) relies on: wrapped the same way. Used by tests/test_storage.py.
"""
import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except NotFound:
    return _download(request, response, storage, *args, **kwargs)
  generation = str(obj['generation'])
  response['x-goog-generation'] = generation
  response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
  not_match = request.query.get('ifGenerationNotMatch', [None])[0]
  match = request.query.get('ifGenerationMatch', [None])[0]
  if not_match is not None and not_match == generation:
    response.status = HTTPStatus.NOT_MODIFIED
    return None
  if match is not None and match != generation:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return None
  return _download(request, response, storage, *args, **kwargs)


def _generation(storage, bucket, name):
  """The live object's generation as a string, or None when there is none."""
  try:
    return str(storage.get_file_obj(bucket, name)['generation'])
  except NotFound:
    return None


def _precondition_failed(request, storage, name):
  match = request.query.get('ifGenerationMatch', [None])[0]
  if match is None or name is None:
    return False
  current = _generation(storage, request.params['bucket_name'], name)
  return current is not None if match == '0' else current != match


_insert = objects.insert


def _insert_with_precondition(request, response, storage, *args, **kwargs):
  name = request.query.get('name', [None])[0]
  if name is None and isinstance(request.data, dict):
    name = (request.data.get('meta') or {}).get('name') or request.data.get('name')
  if _precondition_failed(request, storage, name):
    response.status = HTTPStatus.PRECONDITION_FAILED
    return None
  return _insert(request, response, storage, *args, **kwargs)


_delete = objects.delete


def _delete_with_precondition(request, response, storage, *args, **kwargs):
  if _precondition_failed(request, storage, request.params.get('object_id')):
    response.status = HTTPStatus.PRECONDITION_FAILED
    return None
  return _delete(request, response, storage, *args, **kwargs)


# Before server.py builds its handler table from them.
objects.download = _download_with_generation
objects.insert = _insert_with_precondition
objects.delete = _delete_with_precondition

if __name__ == '__main__':
  from gcp_storage_emulator.__main__ import main  # pylint: disable=g-import-not-at-top
  main(sys.argv[1:])
