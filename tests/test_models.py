"""NCSN++: shapes, dropout, zero init, conditioning, the CIFAR-10 parameter count, config errors, FIR.

Compilation dominates: one tiny model (nf 16, two levels) is shared, its init/apply are jitted once per
input shape, and the CIFAR-10 model is only traced (jax.eval_shape), never compiled.
"""
import functools
import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import signal

from immiscible_jax import models
from immiscible_jax.models import layers


def _model_cfg(**overrides):
  values = dict(
      name='ncsnpp', nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1,
      embedding_type='fourier', fourier_scale=16.0, positional_scale=1000.0, resblock_type='biggan',
      skip_rescale=True, resamp_with_conv=True, init_scale=1.0, fir=True, fir_kernel=(1, 3, 3, 1),
      progressive_input='residual', dtype='float32')
  values.update(overrides)  # before ConfigDict, whose fields refuse a change of type
  return ml_collections.ConfigDict(values)


# init_scale=1 so that the output is not identically zero (the zero-init test covers 0).
TINY = models.create_model(_model_cfg(), channels=1)
_init = jax.jit(TINY.init)
_eval = jax.jit(functools.partial(TINY.apply, train=False))
_train = jax.jit(functools.partial(TINY.apply, train=True))


def _key(seed):
  # RngBitGenerator keys: XLA:CPU compiles their init and dropout several times faster than threefry's.
  return jax.random.key(seed, impl='unsafe_rbg')


def _inputs(shape, seed=0):
  kx, kc = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(kx, shape), jax.random.uniform(kc, shape[:1], minval=-1.5, maxval=1.1)


@pytest.fixture(scope='module')
def tiny():
  x, c = _inputs((4, 8, 8, 1))
  return _init(_key(1), x, c)['params'], x, c


def test_output_shape_equals_input_shape_8x8x1(tiny):
  params, x, c = tiny
  out = _eval({'params': params}, x, c)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 0


def test_output_shape_equals_input_shape_16x16x3():
  # Traced, not compiled: shapes are all this test is about.
  model = models.create_model(_model_cfg(), channels=3)
  x, c = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32)
  variables = jax.eval_shape(model.init, _key(0), x, c)
  out = jax.eval_shape(functools.partial(model.apply, train=True), variables, x, c,
                       rngs={'dropout': _key(1)})
  assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32


def test_dropout_is_active_only_when_training(tiny):
  params, x, c = tiny
  train = lambda seed: np.asarray(_train({'params': params}, x, c, rngs={'dropout': _key(seed)}))
  evaluate = lambda seed: np.asarray(_eval({'params': params}, x, c, rngs={'dropout': _key(seed)}))
  assert not np.allclose(train(0), train(1))          # different masks
  np.testing.assert_array_equal(train(0), train(0))   # same key, same mask
  np.testing.assert_array_equal(evaluate(0), evaluate(1))  # no dropout at eval
  assert not np.allclose(train(0), evaluate(0))
  # Eval needs no rngs at all.
  np.testing.assert_array_equal(np.asarray(_eval({'params': params}, x, c)), evaluate(0))


def test_output_depends_on_noise_level_and_each_sample_alone(tiny):
  params, x, c = tiny
  out = np.asarray(_eval({'params': params}, x, c))
  out_c = np.asarray(_eval({'params': params}, x, c + 0.5))
  assert np.abs(out - out_c).max() > 1e-3 * np.abs(out).max()
  # GroupNorm normalises per sample, so reversing the batch just reverses the outputs.
  out_rev = np.asarray(_eval({'params': params}, x[::-1], c[::-1]))
  np.testing.assert_allclose(out_rev, out[::-1], rtol=1e-5, atol=1e-5)


def _matmul_inputs(jaxpr, found):
  """(primitive, input dtype, kernel shape) of every convolution and matmul in a jaxpr, sub-programs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
      found.append((eqn.primitive.name, str(eqn.invars[0].aval.dtype), tuple(eqn.invars[1].aval.shape)))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _matmul_inputs(getattr(sub, 'jaxpr', sub), found)
  return found


def test_bfloat16_compute_keeps_float32_params_head_and_embedding_and_stays_close(tiny):
  params, x, c = tiny
  model = models.create_model(_model_cfg(dtype='bfloat16'), channels=1)
  shapes = jax.eval_shape(model.init, _key(1), x, c)['params']
  assert {p.dtype for p in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
  # Which ops run in bfloat16: with nf = 16 the Fourier embedding feeds Dense kernels (32, 64) and (64, 64), and
  # the output conv's kernel is (3, 3, 16, 1); those stay float32, every other conv and matmul is bfloat16.
  found = _matmul_inputs(jax.make_jaxpr(lambda p: model.apply({'params': p}, x, c))(params).jaxpr, [])
  head_and_embedding = {(3, 3, 16, 1), (32, 64), (64, 64)}
  assert sorted(s for _, d, s in found if d == 'float32') == sorted(head_and_embedding)
  assert sum(d == 'bfloat16' for _, d, _ in found) > 40
  # Same parameters, both dtypes. bfloat16 keeps 8 significant bits (each rounding is within 2^-9 = 0.2%); over
  # the ~25 rounded layers of this net the errors add up like a random walk to a few percent (2.1% measured):
  # relative RMS error bound 5%. Not below 1e-3 either, or the body did not run in bfloat16.
  ref = np.asarray(_eval({'params': params}, x, c))
  out = jax.jit(model.apply)({'params': params}, x, c)
  assert out.dtype == jnp.float32
  rel = np.sqrt(np.mean((np.asarray(out) - ref) ** 2) / np.mean(ref ** 2))
  assert 1e-3 < rel < 0.05, rel


def test_zero_init_scale_gives_zero_output_that_still_learns():
  # Also the only run of the other code paths: DDPM blocks, plain resampling, positional embedding.
  model = models.create_model(_model_cfg(
      init_scale=0.0, dropout=0.0, resblock_type='ddpm', fir=False, progressive_input='none',
      embedding_type='positional'), channels=1)
  x, c = _inputs((2, 8, 8, 1))

  @jax.jit
  def out_and_grad(key):
    params = model.init(key, x, c)['params']
    loss = lambda p: jnp.sum(model.apply({'params': p}, x, c) * x)
    # Only the head's gradient is returned, so XLA drops the rest of the backward pass.
    return model.apply({'params': params}, x, c), jax.grad(loss)(params)['output_conv']

  out, head_grad = out_and_grad(_key(0))
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  # The zero-initialised output conv still gets a non-zero gradient, so training can start.
  assert float(jnp.abs(head_grad['kernel']).max()) > 0


def _resblock(cin, cout, temb=512, project=False):
  """Parameters of one residual block: GN, conv3x3, temb Dense, GN, conv3x3 (+ 1x1 shortcut)."""
  n = 2 * cin + (9 * cin * cout + cout) + (temb * cout + cout) + 2 * cout + (9 * cout * cout + cout)
  return n + (cin * cout + cout if project or cin != cout else 0)


def _attention(c):
  return 2 * c + 4 * (c * c + c)  # GN + q, k, v, out projections


def test_cifar10_parameter_count():
  """The CM paper's CIFAR-10 NCSN++ (nf 128, ch_mult (2, 2, 2), 4 blocks, attention at 16).

  Counted by hand below: embedding 128 (frozen Fourier w) + 256*512+512 + 512*512+512; stem conv
  3->128; level 32: 128->256 block, 3 x 256 blocks, down block (1x1 shortcut), pyramid conv 3->256;
  level 16: 4 blocks + 4 attentions, down block, pyramid conv 256->256; level 8: 4 blocks; middle:
  2 blocks + attention; up: 5 blocks per level on concatenations (512->256, the last one 384->256),
  attention after level 16, two up blocks; head GN(256) + conv 256->3. Total 56,395,651, i.e. the
  "about 56M" of the CM paper; without the input pyramid (progressive_input='none') it is 55,798,403.
  """
  expected = 128 + (256 * 512 + 512) + (512 * 512 + 512) + (9 * 3 * 128 + 128)
  expected += _resblock(128, 256) + 3 * _resblock(256, 256)
  expected += _resblock(256, 256, project=True) + (9 * 3 * 256 + 256)
  expected += 4 * _resblock(256, 256) + 4 * _attention(256)
  expected += _resblock(256, 256, project=True) + (9 * 256 * 256 + 256)
  expected += 4 * _resblock(256, 256)
  expected += 2 * _resblock(256, 256) + _attention(256)
  expected += 14 * _resblock(512, 256) + _resblock(384, 256) + _attention(256)
  expected += 2 * _resblock(256, 256, project=True)
  expected += 2 * 256 + (9 * 256 * 3 + 3)
  assert expected == 56_395_651

  cfg = _model_cfg(nf=128, ch_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.0,
                   init_scale=0.0)
  models.validate_config(cfg, image_size=32)
  model = models.create_model(cfg, channels=3)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))
  assert sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(shapes['params'])) == expected

  # The CIFAR-10 configs build this model (traced only): its parameter count, and an output of the input's shape.
  x, c_noise = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,))
  for name in ('cifar10_ct', 'cifar10_ict'):
    config = importlib.import_module(f'configs.{name}').get_config()
    net = models.create_model(config.model, config.data.channels)
    variables = jax.eval_shape(functools.partial(net.init, train=False), jax.random.key(0), x, c_noise)
    out = jax.eval_shape(functools.partial(net.apply, train=False), variables, x, c_noise)
    assert out.shape == x.shape, name
    assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables)) == expected, name


@pytest.mark.parametrize('key,value,image_size', [
    ('name', 'unet', 32),
    ('ch_mult', (1, 2, 2, 2), 12),        # 12 does not divide by 8
    ('ch_mult', (), 32),
    ('attn_resolutions', (5,), 8),        # reachable: 8, 4
    ('dropout', 1.0, 8),
    ('dropout', -0.1, 8),
    ('embedding_type', 'learned', 8),
    ('resblock_type', 'resnet', 8),
    ('progressive_input', 'input_skip', 8),
    ('nf', 2, 8),                          # 2 channels cannot form min(2 // 4, 32) = 0 groups
    ('nf', 200, 8),                        # 200 channels do not split into 32 groups
    ('num_res_blocks', 0, 8),
    ('fir_kernel', (1,), 8),
    ('init_scale', -1.0, 8),
    ('fir', 'yes', 8),
    ('dtype', 'float16', 8),
])
def test_validate_config_names_the_key(key, value, image_size):
  cfg = _model_cfg(**{key: value})
  with pytest.raises(ValueError, match=f'model.{key}'):
    models.validate_config(cfg, image_size)


def test_create_model_rejects_bad_config():
  with pytest.raises(ValueError, match='model.embedding_type'):
    models.create_model(_model_cfg(embedding_type='sinusoid'), channels=3)
  cfg = _model_cfg()
  del cfg['fir']
  with pytest.raises(ValueError, match='model.fir'):
    models.create_model(cfg, channels=3)


def _upfirdn_2d(x, taps, up, down, gain):
  """Reference separable FIR resampling with scipy, along H then W of x [H, W]."""
  h = np.asarray(taps, np.float64)
  h = h / h.sum() * np.sqrt(gain)
  rows = np.stack([signal.upfirdn(h, r, up=up, down=down) for r in x])
  return np.stack([signal.upfirdn(h, col, up=up, down=down) for col in rows.T]).T


def test_fir_resampling_matches_scipy_upfirdn():
  x = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
  taps = (1, 3, 3, 1)
  # Full-length scipy outputs; StyleGAN2's padding keeps a centred window of them.
  down_ref = _upfirdn_2d(x, taps, up=1, down=2, gain=1.0)[1:5, 1:5]
  up_ref = _upfirdn_2d(x, taps, up=2, down=1, gain=4.0)[1:17, 1:17]
  down = np.asarray(layers.fir_downsample(jnp.asarray(x)[None, :, :, None], taps))[0, :, :, 0]
  up = np.asarray(layers.fir_upsample(jnp.asarray(x)[None, :, :, None], taps))[0, :, :, 0]
  np.testing.assert_allclose(down, down_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(up, up_ref, rtol=1e-5, atol=1e-5)
