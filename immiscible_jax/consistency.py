"""Consistency-model math: the Karras sigma grid, the CT / iCT schedules, the parameterisation and the losses.

References (equation numbers as in the papers):
  CT:  Song, Dhariwal, Chen, Sutskever, "Consistency Models", ICML 2023 (appendix C; Table 3).
  iCT: Song & Dhariwal, "Improved Techniques for Training Consistency Models", ICLR 2024 (section 3).
Everything here is a pure function of arrays and Python scalars, so it runs inside jit / pmap with the
discretisation N(k) a traced value: grids are computed from N on the fly instead of being stored.
"""
import math

import flax
import jax
import jax.numpy as jnp

from immiscible_jax import errors
from immiscible_jax.models import lpips


# ----------------------------------------------------------------------------- grids and schedules


def karras_sigma(i, num_scales, sigma_min, sigma_max, rho):
  """sigma_i = (s_min^(1/rho) + i/(N-1) (s_max^(1/rho) - s_min^(1/rho)))^rho; i and N may be traced."""
  frac = i / (num_scales - 1)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (lo + frac * (hi - lo)) ** rho


def ct_num_scales(step, total_steps, s0, s1):
  """CT's N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1."""
  k = jnp.asarray(step, jnp.float32)
  n = jnp.ceil(jnp.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1
  return n.astype(jnp.int32)


def ct_target_ema(num_scales, s0, mu0):
  """CT's target EMA decay mu(k) = exp(s0 log(mu0) / N(k)) (the paper's form; the JAX anchor uses N(k)-1)."""
  return jnp.exp(s0 * math.log(mu0) / num_scales)


def ict_num_scales(step, total_steps, s0, s1):
  """iCT's doubling curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2(s1/s0) + 1))."""
  k_prime = max(math.floor(total_steps / (math.log2(s1 / s0) + 1)), 1)
  doublings = jnp.asarray(step, jnp.int32) // k_prime
  # Clip the exponent first so 2**doublings cannot overflow on very long runs.
  doublings = jnp.minimum(doublings, math.ceil(math.log2(s1 / s0)))
  return (jnp.minimum(s0 * 2 ** doublings, s1) + 1).astype(jnp.int32)


def num_scales(step, cfg):
  """N(k) of the configured recipe (cfg = config.training)."""
  schedule = ct_num_scales if cfg.recipe == 'ct' else ict_num_scales
  return schedule(step, cfg.num_steps, cfg.s0, cfg.s1)


def ict_index_logits(num_scales, max_scales, sigma_min, sigma_max, rho, p_mean, p_std):
  """Log-probabilities of the pair index i in [0, N-2] under iCT's discretised lognormal.

  p(i) ∝ erf((log sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((log sigma_i - P_mean) / (sqrt(2) P_std)).
  Returned over a fixed length max_scales - 1 (static shape) with indices >= N-1 masked to -inf.
  """
  i = jnp.arange(max_scales - 1, dtype=jnp.float32)
  lo = karras_sigma(i, num_scales, sigma_min, sigma_max, rho)
  hi = karras_sigma(i + 1, num_scales, sigma_min, sigma_max, rho)
  cdf = lambda s: jax.scipy.special.erf((jnp.log(s) - p_mean) / (math.sqrt(2.0) * p_std))
  mass = jnp.maximum(cdf(hi) - cdf(lo), 1e-30)
  return jnp.where(i < num_scales - 1, jnp.log(mass), -jnp.inf)


# ----------------------------------------------------------------------------- parameterisation


def scalings(sigma, sigma_min, sigma_data):
  """c_skip, c_out, c_in of the consistency parameterisation (CM appendix C), so f(x, sigma_min) = x."""
  c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
  c_out = sigma_data * (sigma - sigma_min) / jnp.sqrt(sigma_data ** 2 + sigma ** 2)
  c_in = 1.0 / jnp.sqrt(sigma ** 2 + sigma_data ** 2)
  return c_skip, c_out, c_in


def denoise(apply_fn, params, x, sigma, sigma_min, sigma_data, train=False, dropout_key=None):
  """The consistency function f_theta(x, sigma) = c_skip x + c_out F_theta(c_in x, 0.25 log sigma).

  x: [B, H, W, C]; sigma: [B]. apply_fn(variables, x, c_noise, train=..., rngs=...) is the network.
  The combination is float32 even when the network body computes in bfloat16 (model.dtype): at small sigma
  c_skip ~ 1 and f is x plus a small correction, which bfloat16 (8 mantissa bits) would round away, and the
  consistency loss compares two such f at nearby sigma.
  """
  c_skip, c_out, c_in = (c[:, None, None, None] for c in scalings(sigma, sigma_min, sigma_data))
  rngs = {'dropout': dropout_key} if train else {}
  out = apply_fn({'params': params}, c_in * x, 0.25 * jnp.log(sigma), train=train, rngs=rngs)
  return c_skip * x + c_out * out.astype(jnp.float32)


# ----------------------------------------------------------------------------- distances and losses


def default_huber_c(image_shape):
  """iCT's pseudo-Huber constant c = 0.00054 sqrt(d), d = H*W*C."""
  return 0.00054 * math.sqrt(math.prod(image_shape))


def distance(x, y, kind, huber_c):
  """Per-example distance d(x, y) -> [B]. 'l2' is the mean squared error (the anchor's 'l2'),
  'l1' the mean absolute error, 'pseudo_huber' sqrt(||x-y||^2 + c^2) - c over all dimensions (iCT eq. 6)."""
  diff = (x - y).reshape(x.shape[0], -1)
  if kind == 'l2':
    return jnp.mean(diff ** 2, axis=-1)
  if kind == 'l1':
    return jnp.mean(jnp.abs(diff), axis=-1)
  if kind == 'pseudo_huber':
    return jnp.sqrt(jnp.sum(diff ** 2, axis=-1) + huber_c ** 2) - huber_c
  raise errors.ConfigError(f"training.loss: got {kind!r}; allowed here: 'l2', 'l1', 'pseudo_huber' ('lpips' is "
                           'lpips.distance)')


@flax.struct.dataclass
class PairSample:
  """The noise-level pair of one consistency-training step."""
  sigma_lo: jax.Array  # [B] sigma_i (the target's level)
  sigma_hi: jax.Array  # [B] sigma_{i+1} (the online network's level)
  weight: jax.Array    # [B] lambda(sigma_i)


def sample_pairs(keys, num_scales, cfg, recipe):
  """Draws the adjacent grid levels (sigma_i, sigma_{i+1}) and the loss weight, one key per example.

  CT: i uniform on [0, N-2], lambda = 1. iCT: i from the discretised lognormal, lambda = 1/(sigma_{i+1}-sigma_i).
  keys: [B] PRNG keys (per example, so the draw does not depend on how the batch is split over devices).
  """
  if recipe == 'ct':
    idx = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_scales - 1))(keys)
  else:
    logits = ict_index_logits(num_scales, cfg.s1 + 1, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                              cfg.p_mean, cfg.p_std)
    idx = jax.vmap(lambda k: jax.random.categorical(k, logits))(keys)
  idx = idx.astype(jnp.float32)
  lo = karras_sigma(idx, num_scales, cfg.sigma_min, cfg.sigma_max, cfg.rho)
  hi = karras_sigma(idx + 1, num_scales, cfg.sigma_min, cfg.sigma_max, cfg.rho)
  weight = jnp.ones_like(lo) if recipe == 'ct' else 1.0 / (hi - lo)
  return PairSample(lo, hi, weight)


def consistency_loss(apply_fn, params, target_params, images, noise, pairs, cfg, dropout_key, loss_params=None):
  """Consistency-training loss (CT eq. 10 / iCT eq. 5) on one batch; both inputs share the same noise.

  The metric d is training.loss: 'l2', 'l1', 'pseudo_huber' (`distance`), or 'lpips' (lpips.distance with the
  frozen network weights `loss_params`, both outputs resized to training.lpips_resolution, as CT's code does).

  Everything here is float32 whatever model.dtype is: the loss is a difference of two network outputs at nearby
  sigma, smaller than bfloat16's rounding of either output.
  Returns (mean loss, per-example distances [B]). target_params is the CT EMA target or, for iCT,
  stop_gradient(params) — the caller decides; gradients never flow into it.
  """
  sig = lambda s: s[:, None, None, None]
  x_hi = images + sig(pairs.sigma_hi) * noise   # x_{i+1} = x + sigma_{i+1} z
  x_lo = images + sig(pairs.sigma_lo) * noise   # x_i     = x + sigma_i z   (same z)
  online = denoise(apply_fn, params, x_hi, pairs.sigma_hi, cfg.sigma_min, cfg.sigma_data, True,
                   dropout_key)
  # The same dropout mask for both branches, as in the reference implementations.
  target = denoise(apply_fn, jax.lax.stop_gradient(target_params), x_lo, pairs.sigma_lo, cfg.sigma_min,
                   cfg.sigma_data, True, dropout_key)
  target = jax.lax.stop_gradient(target)
  if cfg.loss == 'lpips':
    dist = lpips.distance(loss_params, online, target, cfg.lpips_resolution)
  else:
    huber_c = cfg.huber_c if cfg.huber_c >= 0 else default_huber_c(images.shape[1:])
    dist = distance(online, target, cfg.loss, huber_c)
  return jnp.mean(pairs.weight * dist), dist
