"""What resuming a run may change: every key of configs/default.py in one table, and the check the trainer runs.

A run resumes from its workdir's checkpoint with the config given now. Each key is one of:
  shape       the saved arrays no longer fit (the network's or optimizer's tree or shapes): refused;
  experiment  a different experiment from this step on (data, model, loss, noise, assignment, optimizer, or the
              meaning of the logged metric): refused;
  schedule    the training schedule (the curriculum N(k), the target EMA mu(k), the loss constant, the learning
              rate): refused unless --allow_schedule_change (the way to extend a finished run);
  free        paths, logging, checkpoint and evaluation intervals, performance knobs that give the same steps:
              resumed with the new value.
A key missing from the saved config (added since that run) is compared with its default, which keeps the earlier
behaviour. `python -m immiscible_jax.resume_rules` prints the table docs/reliability.md shows (a test keeps them
equal).
"""
from immiscible_jax import errors

SHAPE, EXPERIMENT, SCHEDULE, FREE = 'shape', 'experiment', 'schedule', 'free'
_ACTION = {SHAPE: 'refused', EXPERIMENT: 'refused', SCHEDULE: 'needs --allow_schedule_change', FREE: 'resumes'}

# key -> (category, why), in the order of configs/default.py.
RULES = {
    'seed': (EXPERIMENT, 'parameter init, noise, noise levels, dropout and data order'),
    'data.dataset': (EXPERIMENT, 'the training images'),
    'data.path': (EXPERIMENT, 'the training images (a folder at another path may hold others)'),
    'data.tfds_data_dir': (FREE, 'where tfds finds the prepared files, not which data'),
    'data.split': (EXPERIMENT, 'the training images'),
    'data.image_size': (EXPERIMENT, 'the training images'),
    'data.channels': (SHAPE, "the network's input and output channels"),
    'data.random_flip': (EXPERIMENT, 'the training distribution'),
    'data.num_workers': (FREE, 'batches do not depend on it (tested)'),
    'model.name': (SHAPE, 'the network'),
    'model.nf': (SHAPE, 'parameter shapes'),
    'model.ch_mult': (SHAPE, 'parameter tree and shapes'),
    'model.num_res_blocks': (SHAPE, 'parameter tree'),
    'model.attn_resolutions': (SHAPE, 'parameter tree'),
    'model.dropout': (EXPERIMENT, 'the network function'),
    'model.embedding_type': (SHAPE, 'parameter tree'),
    'model.fourier_scale': (EXPERIMENT, 'the noise embedding'),
    'model.resblock_type': (SHAPE, 'parameter tree'),
    'model.skip_rescale': (EXPERIMENT, 'the network function'),
    'model.resamp_with_conv': (SHAPE, 'parameter tree'),
    'model.init_scale': (EXPERIMENT, 'the initialisation the run started from'),
    'model.positional_scale': (EXPERIMENT, 'the noise embedding'),
    'model.fir': (EXPERIMENT, 'the network function'),
    'model.fir_kernel': (EXPERIMENT, 'the network function'),
    'model.progressive_input': (SHAPE, 'parameter tree'),
    'model.dtype': (EXPERIMENT, 'the compute precision of every step'),
    'training.recipe': (EXPERIMENT, 'target, noise levels and curriculum'),
    'training.batch_size': (EXPERIMENT, 'the batch, the assignment problem and the data position'),
    'training.num_steps': (SCHEDULE, 'K of the curriculum N(k)'),
    'training.loss': (EXPERIMENT, 'the loss'),
    'training.lpips_resolution': (EXPERIMENT, 'the loss'),
    'training.huber_c': (SCHEDULE, 'the loss constant'),
    'training.sigma_min': (EXPERIMENT, 'the noise-level grid and the parameterisation'),
    'training.sigma_max': (EXPERIMENT, 'the noise-level grid'),
    'training.rho': (EXPERIMENT, 'the noise-level grid'),
    'training.sigma_data': (EXPERIMENT, 'the parameterisation c_skip, c_out, c_in'),
    'training.s0': (SCHEDULE, 'the curriculum N(k)'),
    'training.s1': (SCHEDULE, 'the curriculum N(k)'),
    'training.mu0': (SCHEDULE, 'the target EMA mu(k)'),
    'training.p_mean': (SCHEDULE, "iCT's noise-level distribution"),
    'training.p_std': (SCHEDULE, "iCT's noise-level distribution"),
    'training.ema_rate': (EXPERIMENT, 'the EMA parameters that are sampled and evaluated'),
    'training.log_every_steps': (FREE, 'logging only'),
    'training.steps_per_dispatch': (FREE, 'steps per compiled call, the same steps (tested)'),
    'training.grad_accum_steps': (FREE, 'a memory knob: the same gradient to float32 summation order (tested)'),
    'assignment.method': (EXPERIMENT, 'the noise assignment'),
    'assignment.cost': (EXPERIMENT, 'the noise assignment'),
    'assignment.dtype': (EXPERIMENT, 'the noise assignment (quantised distances)'),
    'assignment.scope': (EXPERIMENT, 'the noise assignment'),
    'assignment.knn_k': (EXPERIMENT, 'the noise assignment and the noise marginal'),
    'assignment.sinkhorn_epsilon': (EXPERIMENT, "Sinkhorn's assignment"),
    'assignment.sinkhorn_max_iterations': (EXPERIMENT, "Sinkhorn's assignment"),
    'assignment.sinkhorn_threshold': (EXPERIMENT, "Sinkhorn's assignment"),
    'assignment.sinkhorn_arr_sweeps': (EXPERIMENT, "Sinkhorn's rounding"),
    'assignment.jv_warm_start_epsilon': (FREE, 'speed only: jv returns an exact optimum either way'),
    'assignment.jv_warm_start_iterations': (FREE, 'speed only: jv returns an exact optimum either way'),
    'assignment.jv_arr_sweeps': (FREE, 'speed only: jv returns an exact optimum either way'),
    'assignment.auction_epsilon': (EXPERIMENT, "the auction's near-exact assignment"),
    'assignment.auction_warm_start_epsilon': (EXPERIMENT, "the auction's near-exact assignment"),
    'assignment.auction_warm_start_iterations': (EXPERIMENT, "the auction's near-exact assignment"),
    'assignment.auction_max_rounds': (EXPERIMENT, "the auction's near-exact assignment"),
    'assignment.auction_swap_rounds': (EXPERIMENT, "the auction's near-exact assignment"),
    'optim.optimizer': (SHAPE, 'optimizer state tree'),
    'optim.learning_rate': (SCHEDULE, 'the learning-rate schedule'),
    'optim.warmup_steps': (SCHEDULE, 'the learning-rate schedule'),
    'optim.b1': (EXPERIMENT, 'the optimizer'),
    'optim.b2': (EXPERIMENT, 'the optimizer'),
    'optim.eps': (EXPERIMENT, 'the optimizer'),
    'optim.grad_clip': (EXPERIMENT, 'the update (on / off also changes the optimizer state tree)'),
    'eval.every_steps': (FREE, 'when the metric is logged, not what it means'),
    'eval.num_samples': (EXPERIMENT, "the logged metric's meaning (its sample-size bias)"),
    'eval.metric': (EXPERIMENT, "the logged metric's meaning"),
    'eval.pixel_downsample': (EXPERIMENT, "the logged metric's meaning"),
    'eval.batch_size': (FREE, 'batching only'),
    'eval.reference_split': (EXPERIMENT, "the logged metric's meaning"),
    'eval.reference_num_images': (EXPERIMENT, "the logged metric's meaning"),
    'sampling.sigmas': (FREE, 'read by --mode=sample|eval only (the training evaluator samples one step)'),
    'sampling.num_samples': (FREE, 'read by --mode=sample only'),
    'sampling.shard_size': (FREE, 'read by --mode=sample only'),
    'sampling.seed': (EXPERIMENT, "the training evaluator's noise: the logged metric's samples"),
    'parallel.mode': (FREE, 'the same step to float32 rounding; checkpoints resume across modes (tested)'),
    'profile.start_step': (FREE, 'which steps are traced, not what they compute'),
    'profile.num_steps': (FREE, 'which steps are traced, not what they compute'),
    'checkpoint.every_steps': (FREE, 'when checkpoints are written'),
    'checkpoint.max_to_keep': (FREE, 'how many are kept'),
}


def category(key):
  """The key's category; a key missing from the table counts as an experiment key (refused, never silent)."""
  return RULES.get(key, (EXPERIMENT, ''))[0]


def flatten(d, prefix=''):
  """{'a': {'b': 1}} -> {'a.b': 1} for ConfigDicts and plain dicts."""
  out = {}
  for key, value in d.items():
    if hasattr(value, 'items'):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def check(saved, given, defaults, allow_schedule_change=False):
  """Raises errors.ConfigError (one line) when `given` (the config now) differs from `saved` (the run's own, as
  JSON gave it back) in a shape or experiment key, or, unless allow_schedule_change, in a schedule key. All
  three are flat or nested dicts; `defaults` stands in for keys the saved run did not know."""
  old, new, default = flatten(saved), flatten(given), flatten(defaults)
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  changed = sorted(k for k in new if norm(old.get(k, default.get(k))) != norm(new[k]))
  describe = lambda keys: ', '.join(f'{k} (saved {old.get(k, default.get(k))!r}, now {new[k]!r})' for k in keys)
  refused = [k for k in changed if category(k) in (SHAPE, EXPERIMENT)]
  if refused:
    raise errors.ConfigError(f'cannot resume: the workdir holds a run whose config differs in keys that change '
                             f'the experiment: {describe(refused)}; use a new --workdir, or restore these values')
  schedule = [k for k in changed if category(k) == SCHEDULE]
  if schedule and not allow_schedule_change:
    raise errors.ConfigError(
        f'cannot resume: {describe(schedule)}: the noise-level curriculum N(k), the target EMA mu(k), the loss and '
        'the learning rate follow these keys, so changing them mid-run changes the experiment from this step on; '
        'restore the saved values, or pass --allow_schedule_change to continue with the new ones deliberately '
        '(the way to extend a finished run: raise training.num_steps and pass it)')


def markdown():
  """The table of docs/reliability.md: every key, its category, what resuming with a changed value does, why."""
  lines = ['| key | kind | changed on resume | why |', '|---|---|---|---|']
  lines += [f'| `{key}` | {kind} | {_ACTION[kind]} | {why} |' for key, (kind, why) in RULES.items()]
  return '\n'.join(lines)


if __name__ == '__main__':
  print(markdown())
