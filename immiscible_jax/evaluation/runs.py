"""Sampling and evaluation from checkpoints (--mode=sample|eval) and the evaluator run during training.

The metric is the Frechet distance between features of generated and real images: 'pixels' (weight-free, for
digits and quick CPU runs) or 'inception' (FID with the standard TF Inception weights converted to Flax).
Evaluation is split over processes: each draws and extracts its own contiguous share of the samples (sample j
always comes from fold_in(key, j)), and the feature statistics are combined across processes, so every process
gets the metric a single process would. Reference statistics are computed and cached by process 0 alone (the
others read its file, or compute their own where the cache is not shared). Only process 0 writes files.
"""
import functools
import io
import json
import re

import flax.jax_utils
import jax

from immiscible_jax import checkpointing
from immiscible_jax import data
from immiscible_jax import errors
from immiscible_jax import models
from immiscible_jax import sampling
from immiscible_jax import storage
from immiscible_jax import train_state
from immiscible_jax.evaluation import frechet
from immiscible_jax.parallel import agreement


def metric_name(eval_config):
  return 'eval/fid' if eval_config.metric == 'inception' else 'eval/fd_pixels'


def _sampler(config, model, sigmas):
  return sampling.make_sampler(model.apply, data.image_shape(config.data), sigmas,
                               config.training.sigma_min, config.training.sigma_data)


def _reference_stats(config, extractor):
  d, e = config.data, config.eval
  source = d.dataset if d.dataset != 'folder' else 'folder-' + storage.basename(d.path)
  key = f'{source}_{e.reference_split}_{d.image_size}px_n{e.reference_num_images}'
  images_fn = functools.partial(data.load_images, d, e.reference_split, e.reference_num_images)
  compute = lambda: frechet.reference_statistics(extractor, images_fn, key, storage.default_cache_dir())
  if jax.process_count() == 1:
    return compute()
  if jax.process_index() == 0:  # one writer of the cache file; the others read it after the barrier
    stats = compute()
  agreement.barrier('immiscible_jax reference statistics')
  return stats if jax.process_index() == 0 else compute()


def frechet_to_reference(extractor, reference, images_uint8):
  """The metric of this process's share of the samples together with every other process's share."""
  mu, sigma = frechet.statistics_across_processes(extractor(images_uint8))
  return float(frechet.frechet_distance(mu, sigma, *reference))


class TrainingEvaluator:
  """The evaluator the training loop runs (main.py builds it; train.train_and_evaluate calls it).

  Called with (host train state, step): draws eval.num_samples one-step samples from the EMA parameters
  and returns {metric name: value}. Building it computes (or loads the cached) reference statistics.
  """

  def __init__(self, config):
    self._config = config
    model = models.create_model(config.model, config.data.channels)
    self._sampler = _sampler(config, model, (config.training.sigma_max,))
    self._extractor = frechet.create_extractor(config.eval)
    self._reference = _reference_stats(config, self._extractor)
    warning = _sample_size_warning(config, config.eval.num_samples, self._reference)
    if warning and jax.process_index() == 0:
      print(f'note: {metric_name(config.eval)} during training: {warning}')

  def __call__(self, state, step, between_batches=None):
    """between_batches: called after every batch of samples and of features (the training loop's stop check,
    agreement.StopPoints.check), equally often in every process: each draws and extracts as many images as the
    largest share, and drops the one extra image a smaller share then has."""
    cfg = self._config
    key = jax.random.fold_in(jax.random.key(cfg.sampling.seed), 10_000_019)  # same noise at every eval
    start, count = frechet.process_share(cfg.eval.num_samples)
    largest = -(-cfg.eval.num_samples // jax.process_count())
    params = flax.jax_utils.replicate(state.ema_params)
    images = sampling.generate(self._sampler, params, key, largest, data.image_shape(cfg.data), cfg.eval.batch_size,
                               start_index=start, between_batches=between_batches)
    features = self._extractor(sampling.to_uint8(images), between_batches=between_batches)[:count]
    mu, sigma = frechet.statistics_across_processes(features)
    return {metric_name(cfg.eval): float(frechet.frechet_distance(mu, sigma, *self._reference))}


def _sample_size_warning(config, num_samples, reference):
  return frechet.sample_size_warning(num_samples, config.eval.reference_num_images, reference[0].shape[0],
                                        config.eval.metric)


def restore_ema_params(config, workdir, step=None, log=print):
  """(step, EMA params) of a checkpoint, opened read-only: `step`, or the newest readable one (an unreadable newer
  step is skipped, and `log` says so)."""
  model = models.create_model(config.model, config.data.channels)
  init = train_state.initializer(config, model, train_state.create_optimizer(config.optim))
  abstract = jax.eval_shape(init, jax.random.key(0))
  manager = checkpointing.create_manager(workdir, config.checkpoint, read_only=True)
  restored = checkpointing.restore(manager, abstract, step=step, log=log)
  if restored is None:
    raise errors.ConfigError(f'--workdir={workdir}: no checkpoint in {workdir}/checkpoints; train first '
                             '(--mode=train)')
  found_step, state, _ = restored
  return found_step, state.ema_params, model


def _generate_from_checkpoint(config, workdir, step, num_samples, start_index=0):
  """(step, uint8 samples start_index .. start_index + num_samples - 1) of the checkpoint's EMA model."""
  step, ema_params, model = restore_ema_params(config, workdir, step)
  sampler = _sampler(config, model, tuple(config.sampling.sigmas))
  key = jax.random.key(config.sampling.seed)
  images = sampling.generate(sampler, flax.jax_utils.replicate(ema_params), key, num_samples,
                             data.image_shape(config.data), config.eval.batch_size, start_index=start_index)
  return step, sampling.to_uint8(images)


def sample_from_checkpoint(config, workdir, step=None):
  """Writes sampling.num_samples samples (.npz shards) and a PNG grid under workdir/samples/; returns paths."""
  step, images = _generate_from_checkpoint(config, workdir, step, config.sampling.num_samples)
  out_dir = storage.join(workdir, 'samples', f'step_{step}_{len(config.sampling.sigmas)}step')
  paths, grid_path = [], storage.join(out_dir, 'grid.png')
  if jax.process_index() == 0:
    info = {'step': step, 'sigmas': list(config.sampling.sigmas), 'seed': config.sampling.seed}
    paths = sampling.save_samples(images, out_dir, config.sampling.shard_size, info=info)
    png = io.BytesIO()
    sampling.image_grid(images[:min(len(images), 100)]).save(png, format='png')
    storage.write_bytes(grid_path, png.getvalue())
    print(f'wrote {len(images)} samples from step {step}: {", ".join(paths)}')
    print(f'sample grid: {grid_path}')
  return paths, grid_path


def _load_sample_set(config, samples_path):
  """(uint8 images, step of the checkpoint they came from or None) of a --samples file or folder; a set that does
  not fit the run is an errors.ConfigError naming it."""
  images = sampling.load_samples(samples_path)
  expected = data.image_shape(config.data)
  if images.shape[1:] != expected:
    raise errors.ConfigError(f'--samples={samples_path}: images of shape {images.shape[1:]}, but this run makes '
                             f'{expected} (data.image_size, data.channels)')
  if len(images) < 2:
    raise errors.ConfigError(f'--samples={samples_path}: {len(images)} sample(s); the Frechet distance needs at least '
                             '2 samples (a covariance)')
  step = sampling.read_manifest(samples_path).get('step') if storage.isdir(samples_path) else None
  return images, step


def _result_name(step, extractor, samples_path):
  """eval_<step>_<features>[_<sample set>].json: one file per metric and sample source, so no result replaces
  another's."""
  name = f'eval_{step if step is not None else "samples"}_{extractor.name}'
  if samples_path:
    source = storage.basename(samples_path)
    name += '_' + re.sub(r'[^A-Za-z0-9_.=-]', '_', source[:-len('.npz')] if source.endswith('.npz') else source)
  return name + '.json'


def evaluate(config, workdir, step=None, samples_path=None):
  """Frechet distance of a sample set (or eval.num_samples fresh samples) to the reference statistics; each
  process draws or extracts its own share. Written to workdir/<_result_name>, with a warning when the sample
  counts are too small for the value to be comparable."""
  if samples_path:
    images, step = _load_sample_set(config, samples_path)
    num_samples = len(images)
    start, count = frechet.process_share(num_samples)
    images = images[start:start + count]
  else:
    num_samples = config.eval.num_samples
    start, count = frechet.process_share(num_samples)
    step, images = _generate_from_checkpoint(config, workdir, step, count, start_index=start)
  extractor = frechet.create_extractor(config.eval)
  reference = _reference_stats(config, extractor)
  value = frechet_to_reference(extractor, reference, images)
  result = {'step': step, metric_name(config.eval): value, 'num_samples': int(num_samples),
            'extractor': extractor.name, 'samples': samples_path or 'fresh'}
  warning = _sample_size_warning(config, num_samples, reference)
  if warning:
    result['warning'] = warning
  if jax.process_index() == 0:
    path = storage.join(workdir, _result_name(step, extractor, samples_path))
    storage.write_text(path, json.dumps(result, indent=2), atomic=True)
    print(json.dumps(result))
  return result
