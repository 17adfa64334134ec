"""A stand-in for train.make_train_steps that compiles no train step: each dispatch returns the state unchanged
and metrics from a real XLA:CPU computation (dispatched asynchronously, as the real step is) that keeps the device
busy for a chosen number of 256x256 matmuls. For tests of the loop itself: its waits, stops and traces."""
import jax
import jax.numpy as jnp

METRICS = ('train/loss', 'train/grad_norm', 'assignment/distance_before', 'assignment/distance_after')


def _busy_metrics(iterations):
  """A jitted x -> {metric: [1]} that keeps one CPU thread busy for `iterations` 256x256 matmuls first."""
  def metrics(x):
    y = jax.lax.fori_loop(0, iterations, lambda i, y: jnp.tanh(y @ y) / 16.0, x)
    return {name: y[:1, 0] * 0.0 + 1.0 for name in METRICS}
  return jax.jit(metrics)


class SlowSteps:
  """Stands in for train.make_train_steps (pass `.make`): each dispatch returns the state unchanged and metrics
  that take the device a while. Records, at each dispatch, how many earlier dispatches had already finished."""

  def __init__(self, iterations):
    self.busy, self.x = _busy_metrics(iterations), jnp.ones((256, 256)) / 256.0
    jax.block_until_ready(self.busy(self.x))  # compiled (and its synchronous first call made) before the loop
    self.outputs, self.finished_before = [], []

  def make(self, model, optimizer, config, layout, loss_params=None):
    del model, optimizer, config, layout, loss_params

    def step(d_state, d_batches):
      del d_batches
      self.finished_before.append(sum(bool(m['train/loss'].is_ready()) for m in self.outputs))
      self.outputs.append(self.busy(self.x))
      return d_state, self.outputs[-1]

    return step


def tiny_config(**overrides):
  """configs/tiny.py with {'section.key': value} overrides."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  return config
