"""Schedules, parameterisation and losses against values computed here from the papers' formulas."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from immiscible_jax import consistency


def _training_cfg(**kw):
  cfg = ml_collections.ConfigDict(dict(
      recipe='ct', num_steps=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5,
      s0=2, s1=150, mu0=0.9, p_mean=-1.1, p_std=2.0, loss='l2', huber_c=-1.0))
  cfg.update(kw)
  return cfg


def test_karras_grid_endpoints_and_interior():
  n = 18
  sig = np.asarray(consistency.karras_sigma(jnp.arange(n, dtype=jnp.float32), n, 0.002, 80.0, 7.0))
  lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
  expected = np.array([(lo + i / 17 * (hi - lo)) ** 7 for i in range(n)])
  np.testing.assert_allclose(sig, expected, rtol=1e-5)
  assert sig[0] == pytest.approx(0.002, rel=1e-5) and sig[-1] == pytest.approx(80.0, rel=1e-5)
  assert np.all(np.diff(sig) > 0)


@pytest.mark.parametrize('k', [0, 1, 500, 123456, 799999, 800000])
def test_ct_num_scales_matches_formula(k):
  big_k, s0, s1 = 800000, 2, 150
  expected = math.ceil(math.sqrt(k / big_k * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1
  assert int(consistency.ct_num_scales(k, big_k, s0, s1)) == expected
  assert 2 <= expected <= 151


def test_ct_schedule_endpoints_and_target_ema():
  assert int(consistency.ct_num_scales(0, 800000, 2, 150)) == 2
  assert int(consistency.ct_num_scales(800000, 800000, 2, 150)) == 151
  # mu(k) = exp(s0 log mu0 / N): N = s0 gives mu0 itself; N = 150 gives 0.9^(2/150).
  assert float(consistency.ct_target_ema(2, 2, 0.9)) == pytest.approx(0.9, rel=1e-6)
  assert float(consistency.ct_target_ema(150, 2, 0.9)) == pytest.approx(0.9 ** (2 / 150), rel=1e-6)


def test_ict_curriculum_doubles_from_10_to_1280():
  # K = 400k, s0 = 10, s1 = 1280: log2(128) + 1 = 8 stages, K' = 50000 steps each.
  expected = {0: 11, 49999: 11, 50000: 21, 100000: 41, 150000: 81, 300000: 641, 350000: 1281,
              399999: 1281}
  for k, n in expected.items():
    assert int(consistency.ict_num_scales(k, 400000, 10, 1280)) == n, k


def test_ict_lognormal_index_probabilities():
  n, max_scales = 21, 1281
  logits = consistency.ict_index_logits(n, max_scales, 0.002, 80.0, 7.0, -1.1, 2.0)
  probs = np.asarray(jax.nn.softmax(logits))
  lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
  sig = np.array([(lo + i / (n - 1) * (hi - lo)) ** 7 for i in range(n)], np.float64)
  cdf = stats.norm.cdf(np.log(sig), loc=-1.1, scale=2.0)
  expected = np.diff(cdf) / np.diff(cdf).sum()
  np.testing.assert_allclose(probs[:n - 1], expected, rtol=1e-4, atol=1e-7)
  assert np.all(probs[n - 1:] == 0)


def test_parameterisation_is_identity_at_sigma_min():
  c_skip, c_out, c_in = consistency.scalings(jnp.array([0.002, 1.0, 80.0]), 0.002, 0.5)
  assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
  t = 1.0
  assert float(c_skip[1]) == pytest.approx(0.25 / ((t - 0.002) ** 2 + 0.25), rel=1e-6)
  assert float(c_out[1]) == pytest.approx(0.5 * (t - 0.002) / math.sqrt(0.25 + t * t), rel=1e-6)
  assert float(c_in[2]) == pytest.approx(1 / math.sqrt(80.0 ** 2 + 0.25), rel=1e-6)

  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
  garbage_net = lambda v, xin, c, train, rngs: jnp.full_like(xin, 123.0)
  out = consistency.denoise(garbage_net, {}, x, jnp.full((3,), 0.002), 0.002, 0.5)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_distances():
  x = jnp.zeros((2, 2, 2, 1))
  y = jnp.stack([jnp.ones((2, 2, 1)), 2 * jnp.ones((2, 2, 1))])
  np.testing.assert_allclose(consistency.distance(x, y, 'l2', 0.0), [1.0, 4.0])
  np.testing.assert_allclose(consistency.distance(x, y, 'l1', 0.0), [1.0, 2.0])
  c = 0.5  # ||x - y||^2 = 4 and 16
  np.testing.assert_allclose(consistency.distance(x, y, 'pseudo_huber', c),
                             [math.sqrt(4 + 0.25) - 0.5, math.sqrt(16 + 0.25) - 0.5], rtol=1e-6)
  assert consistency.default_huber_c((32, 32, 3)) == pytest.approx(0.00054 * math.sqrt(3072))
  with pytest.raises(ValueError, match='training.loss'):
    consistency.distance(x, y, 'lpips', 0.0)


@pytest.mark.parametrize('recipe', ['ct', 'ict'])
def test_sample_pairs_are_adjacent_grid_levels(recipe):
  cfg = _training_cfg(recipe=recipe, s0=10, s1=1280)
  n = 21
  keys = jax.random.split(jax.random.key(1), 512)
  pairs = consistency.sample_pairs(keys, jnp.int32(n), cfg, recipe)
  lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
  grid = np.array([(lo + i / (n - 1) * (hi - lo)) ** 7 for i in range(n)])
  idx = np.abs(np.asarray(pairs.sigma_lo)[:, None] - grid[None]).argmin(1)
  np.testing.assert_allclose(pairs.sigma_lo, grid[idx], rtol=1e-5)
  np.testing.assert_allclose(pairs.sigma_hi, grid[idx + 1], rtol=1e-5)
  assert idx.max() <= n - 2
  expected_w = np.ones(512) if recipe == 'ct' else 1 / (grid[idx + 1] - grid[idx])
  np.testing.assert_allclose(pairs.weight, expected_w, rtol=1e-4)
  if recipe == 'ct':  # uniform over 20 indices: every index shows up in 512 draws
    assert len(set(idx.tolist())) == n - 1


def test_consistency_loss_zero_when_pair_collapses_and_uses_shared_noise():
  cfg = _training_cfg()
  # A network that returns its input: f is then a fixed function of x and sigma.
  net = lambda v, xin, c, train, rngs: xin * v['params']['w']
  params = {'w': jnp.float32(0.7)}
  images = jax.random.normal(jax.random.key(2), (4, 4, 4, 1))
  noise = jax.random.normal(jax.random.key(3), (4, 4, 4, 1))
  same = consistency.PairSample(jnp.full((4,), 1.0), jnp.full((4,), 1.0), jnp.ones((4,)))
  loss, _ = consistency.consistency_loss(net, params, params, images, noise, same, cfg, None)
  assert float(loss) == 0.0
  pairs = consistency.PairSample(jnp.full((4,), 1.0), jnp.full((4,), 2.0), jnp.ones((4,)))
  loss, dist = consistency.consistency_loss(net, params, params, images, noise, pairs, cfg, None)

  def f(x, t):  # the parameterisation written out independently
    s_min, sd = 0.002, 0.5
    c_skip = sd ** 2 / ((t - s_min) ** 2 + sd ** 2)
    c_out = sd * (t - s_min) / math.sqrt(sd ** 2 + t ** 2)
    return c_skip * x + c_out * 0.7 * x / math.sqrt(t ** 2 + sd ** 2)
  x, z = np.asarray(images, np.float64), np.asarray(noise, np.float64)
  expected = ((f(x + 2.0 * z, 2.0) - f(x + 1.0 * z, 1.0)) ** 2).reshape(4, -1).mean(1)
  np.testing.assert_allclose(dist, expected, rtol=1e-4)
  assert float(loss) == pytest.approx(expected.mean(), rel=1e-4)
  grads = jax.grad(lambda p: consistency.consistency_loss(net, p, p, images, noise, pairs, cfg, None)[0])(params)
  assert np.isfinite(float(grads['w'])) and float(grads['w']) != 0.0


def _nonlinear_net(variables, x, c_noise, train, rngs):  # pylint: disable=unused-argument
  """A stand-in network, nonlinear in its parameters and input, so both branches have a gradient."""
  p = variables['params']
  return jnp.tanh(p['w'] * x + p['b'] * c_noise[:, None, None, None])


def test_ict_gradient_flows_through_the_online_branch_only():
  """train_step hands iCT's online parameters to consistency_loss as the target too; the loss must stop their
  gradient. Reference: the same loss written out with the target computed beforehand as a numpy constant (an
  explicitly detached target)."""
  cfg = _training_cfg(recipe='ict', loss='pseudo_huber')
  params = {'w': jnp.float32(0.7), 'b': jnp.float32(0.3)}
  images = jax.random.normal(jax.random.key(4), (4, 4, 4, 1))
  noise = jax.random.normal(jax.random.key(5), (4, 4, 4, 1))
  lo, hi = jnp.array([0.5, 1.0, 2.0, 4.0]), jnp.array([0.8, 1.5, 3.0, 6.0])
  pairs = consistency.PairSample(lo, hi, 1.0 / (hi - lo))
  grads = jax.jit(jax.grad(lambda p: consistency.consistency_loss(_nonlinear_net, p, p, images, noise, pairs, cfg,
                                                                  None)[0]))(params)
  sig = lambda s: s[:, None, None, None]
  f = lambda p, sigma: consistency.denoise(_nonlinear_net, p, images + sig(sigma) * noise, sigma, 0.002, 0.5)
  c = 0.00054 * math.sqrt(16)

  def loss(p, target):  # iCT eq. (5) with the pseudo-Huber metric and lambda = 1 / (sigma_{i+1} - sigma_i)
    d = jnp.sqrt(jnp.sum((f(p, hi) - target).reshape(4, -1) ** 2, axis=-1) + c ** 2) - c
    return jnp.mean(d / (hi - lo))

  detached = np.asarray(jax.jit(f)(params, lo))
  online_only = jax.jit(jax.grad(lambda p: loss(p, detached)))(params)
  both_branches = jax.jit(jax.grad(lambda p: loss(p, f(p, lo))))(params)
  for name in params:
    np.testing.assert_allclose(grads[name], online_only[name], rtol=1e-5)
    # Without the stop-gradient the gradient would differ: this test can tell the two apart.
    assert abs(float(both_branches[name] - online_only[name])) > 0.05 * abs(float(online_only[name]))


class _DropoutNet(nn.Module):
  """A small Flax network with dropout between two convolutions (cheap to compile, unlike NCSN++)."""

  @nn.compact
  def __call__(self, x, c_noise, train):
    h = nn.Conv(8, (3, 3))(x) + c_noise[:, None, None, None]
    h = nn.Dropout(0.5, deterministic=not train)(nn.silu(h))
    return nn.Conv(x.shape[-1], (3, 3))(h)


def test_online_and_target_share_the_dropout_mask():
  """A model with dropout: the same key gives the same mask (same outputs), another key another mask; in the
  loss both branches get the one key, so a collapsed pair (same input, same parameters) is at distance 0."""
  model = _DropoutNet()
  images = jax.random.uniform(jax.random.key(6), (4, 8, 8, 1), minval=-1.0, maxval=1.0)
  noise = jax.random.normal(jax.random.key(7), images.shape)
  sigma = jnp.full((4,), 1.0)
  params = jax.jit(lambda key: model.init(key, images, sigma, train=False))(jax.random.key(8))['params']
  f = jax.jit(lambda key: consistency.denoise(model.apply, params, images + noise, sigma, 0.002, 0.5, True, key))
  same, again, other = f(jax.random.key(1)), f(jax.random.key(1)), f(jax.random.key(2))
  np.testing.assert_array_equal(same, again)
  assert float(jnp.mean(jnp.abs(same - other))) > 1e-3  # the mask shows in the output
  collapsed = consistency.PairSample(sigma, sigma, jnp.ones(4))
  cfg = _training_cfg(recipe='ict', loss='l2')
  _, dist = jax.jit(lambda key: consistency.consistency_loss(model.apply, params, params, images, noise, collapsed,
                                                             cfg, key))(jax.random.key(1))
  np.testing.assert_array_equal(dist, np.zeros(4))
