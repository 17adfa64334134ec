"""Model construction from the `model` config section, and its validation.

    model = create_model(config.model, channels=config.data.channels)
    validate_config(config.model, image_size=config.data.image_size)   # before compiling anything
    out = model.apply({'params': params}, x, c_noise, train=train, rngs={'dropout': key})

Errors are errors.ConfigError that name the offending key (model.<key>) and what it may be.
"""
import flax.linen as nn
import jax.numpy as jnp

from immiscible_jax import errors
from immiscible_jax.models.ncsnpp import NCSNpp

MODEL_NAMES = ('ncsnpp',)
EMBEDDING_TYPES = ('fourier', 'positional')
RESBLOCK_TYPES = ('biggan', 'ddpm')
PROGRESSIVE_INPUTS = ('none', 'residual')
# model.dtype -> the compute dtype of the network body (parameters stay float32; see ncsnpp.py).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Keys of the `model` section passed straight to NCSNpp.
_MODULE_KEYS = ('nf', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'dropout', 'embedding_type',
                'fourier_scale', 'positional_scale', 'resblock_type', 'skip_rescale', 'resamp_with_conv',
                'init_scale', 'fir', 'fir_kernel', 'progressive_input')


def _get(cfg, key):
  if key not in cfg:
    raise errors.ConfigError(f'model.{key} is missing from the config (see configs/default.py).')
  return cfg[key]


def _check(ok: bool, key: str, message: str):
  if not ok:
    raise errors.ConfigError(f'model.{key}: {message}')


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _normalised_channels(nf: int, ch_mult, num_res_blocks: int) -> set:
  """Channel counts that meet a GroupNorm, following the U-Net's channel flow (see ncsnpp.py)."""
  counts, skips, ch = {nf}, [nf], nf
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      ch = nf * mult
      counts.add(ch)
      skips.append(ch)
    if level != len(ch_mult) - 1:
      skips.append(ch)
  for mult in reversed(ch_mult):
    for _ in range(num_res_blocks + 1):
      counts.add(ch + skips.pop())
      ch = nf * mult
      counts.add(ch)
  return counts


def _check_architecture(cfg):
  """Checks every key that does not depend on the image size."""
  name = _get(cfg, 'name')
  _check(name in MODEL_NAMES, 'name', f'got {name!r}; allowed: {MODEL_NAMES}.')
  nf, ch_mult, num_res_blocks = _get(cfg, 'nf'), _get(cfg, 'ch_mult'), _get(cfg, 'num_res_blocks')
  _check(_is_int(nf) and nf > 0, 'nf', f'must be a positive int, got {nf!r}.')
  _check(isinstance(ch_mult, (tuple, list)) and len(ch_mult) > 0
         and all(_is_int(m) and m > 0 for m in ch_mult),
         'ch_mult', f'must be a non-empty tuple of positive ints, got {ch_mult!r}.')
  _check(_is_int(num_res_blocks) and num_res_blocks > 0, 'num_res_blocks',
         f'must be a positive int, got {num_res_blocks!r}.')
  for c in sorted(_normalised_channels(nf, ch_mult, num_res_blocks)):
    groups = min(c // 4, 32)
    _check(groups > 0 and c % groups == 0, 'nf',
           f'nf={nf} with ch_mult={tuple(ch_mult)} gives {c} channels, which GroupNorm cannot split '
           f'into min(C // 4, 32) = {groups} equal groups; use a multiple of 32 (or of 4 below 128).')
  attn = _get(cfg, 'attn_resolutions')
  _check(isinstance(attn, (tuple, list)) and all(_is_int(r) for r in attn), 'attn_resolutions',
         f'must be a tuple of ints (pixels), got {attn!r}.')
  dropout = _get(cfg, 'dropout')
  _check(isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0, 'dropout',
         f'must be in [0, 1), got {dropout!r}.')
  embedding_type = _get(cfg, 'embedding_type')
  _check(embedding_type in EMBEDDING_TYPES, 'embedding_type',
         f'got {embedding_type!r}; allowed: {EMBEDDING_TYPES}.')
  _check(_get(cfg, 'fourier_scale') > 0, 'fourier_scale', 'must be > 0.')
  _check(_get(cfg, 'positional_scale') > 0, 'positional_scale', 'must be > 0.')
  resblock_type = _get(cfg, 'resblock_type')
  _check(resblock_type in RESBLOCK_TYPES, 'resblock_type',
         f'got {resblock_type!r}; allowed: {RESBLOCK_TYPES}.')
  progressive_input = _get(cfg, 'progressive_input')
  _check(progressive_input in PROGRESSIVE_INPUTS, 'progressive_input',
         f'got {progressive_input!r}; allowed: {PROGRESSIVE_INPUTS}.')
  dtype = _get(cfg, 'dtype')
  _check(dtype in DTYPES, 'dtype', f'got {dtype!r}; allowed: {tuple(DTYPES)}.')
  for key in ('skip_rescale', 'resamp_with_conv', 'fir'):
    _check(isinstance(_get(cfg, key), bool), key, f'must be True or False, got {cfg[key]!r}.')
  init_scale = _get(cfg, 'init_scale')
  _check(isinstance(init_scale, (int, float)) and init_scale >= 0, 'init_scale',
         f'must be >= 0, got {init_scale!r}.')
  fir_kernel = _get(cfg, 'fir_kernel')
  _check(isinstance(fir_kernel, (tuple, list)) and len(fir_kernel) >= 2 and sum(fir_kernel) > 0,
         'fir_kernel', f'must be a tuple of at least 2 taps with a positive sum, got {fir_kernel!r}.')


def validate_config(model_config, image_size: int) -> None:
  """Raises errors.ConfigError (naming model.<key>) for a config that cannot build a working model."""
  _check_architecture(model_config)
  ch_mult = model_config.ch_mult
  factor = 2 ** (len(ch_mult) - 1)
  _check(_is_int(image_size) and image_size > 0 and image_size % factor == 0, 'ch_mult',
         f'{len(ch_mult)} levels halve the image {len(ch_mult) - 1} times, so data.image_size '
         f'must divide by {factor}; got image_size={image_size!r}.')
  resolutions = tuple(image_size // 2 ** i for i in range(len(ch_mult)))
  attn = _get(model_config, 'attn_resolutions')
  _check(isinstance(attn, (tuple, list)) and all(r in resolutions for r in attn), 'attn_resolutions',
         f'got {attn!r}; with image_size={image_size} and {len(ch_mult)} levels the reachable '
         f'resolutions are {resolutions} (an empty tuple means attention only in the middle).')


def create_model(model_config, channels: int) -> nn.Module:
  """Builds the (unbound) Flax module; `channels` is the image channel count (input = output)."""
  _check_architecture(model_config)
  if not (_is_int(channels) and channels > 0):
    raise errors.ConfigError(f'data.channels must be a positive int, got {channels!r}.')
  kwargs = {key: model_config[key] for key in _MODULE_KEYS}
  for key in ('ch_mult', 'attn_resolutions', 'fir_kernel'):
    kwargs[key] = tuple(kwargs[key])  # hashable module fields
  return NCSNpp(channels=channels, dtype=DTYPES[model_config.dtype], **kwargs)
