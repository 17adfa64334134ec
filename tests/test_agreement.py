"""parallel/agreement.py: the one module of cross-process decisions, and the one private JAX API it uses.

Their multi-process behaviour is tested in tests/test_multihost.py (two real processes): restores agree, the
evaluation's moments sum, a SIGTERM to one process stops both at the same saved step. Here: what a JAX upgrade
could break without a second process, and that no other module makes cross-process decisions of its own."""
import ast
import os

import jax
from jax.experimental import multihost_utils
import numpy as np

from immiscible_jax.parallel import agreement

_PACKAGE = os.path.join(os.path.dirname(__file__), os.pardir, 'immiscible_jax')


def test_the_key_value_store_is_where_jax_keeps_it():
  """If this fails after a JAX upgrade, JAX moved its key-value store: update agreement.key_value_client (and only
  it); checkpoint restores with several processes depend on it."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  assert hasattr(distributed, 'global_state') and hasattr(distributed.global_state, 'client')
  assert agreement.key_value_client() is distributed.global_state.client is None  # one process: not initialised
  for method in ('key_value_set', 'blocking_key_value_get'):  # what gather_ints calls
    assert callable(getattr(_jax.DistributedRuntimeClient, method)), method


def test_the_preemption_sync_point_is_public_and_off_in_one_process():
  assert not multihost_utils.reached_preemption_sync_point(1)  # no distributed client: never a stop point


def test_one_process_agrees_with_itself():
  np.testing.assert_array_equal(agreement.gather_ints(7), [7])
  assert agreement.from_process0('decision', 'held') == 'held'
  x = np.arange(6, dtype=np.float64).reshape(2, 3) / 3
  np.testing.assert_array_equal(agreement.allgather_float64(x), x[None])
  agreement.barrier('nothing to wait for')

  class Flag:
    signalled = False

  flag = Flag()
  stop = agreement.StopPoints(flag)
  assert not stop.reached()
  flag.signalled = True
  assert stop.reached()
  flag.signalled = False
  assert stop.reached()  # a stop, once reached, stays reached


def test_no_other_module_makes_cross_process_decisions():
  """jax._src, the key-value store, multihost_utils and the preemption sync point appear in
  parallel/agreement.py only (every module of the package, subpackages included)."""
  markers = ('jax._src', 'multihost_utils', 'key_value', 'process_allgather', 'sync_global_devices',
             'reached_preemption')
  names = sorted(os.path.relpath(os.path.join(folder, f), _PACKAGE)
                 for folder, _, files in os.walk(_PACKAGE) for f in files if f.endswith('.py'))
  assert os.path.join('parallel', 'agreement.py') in names
  for name in names:
    if name != os.path.join('parallel', 'agreement.py'):
      source = open(os.path.join(_PACKAGE, name)).read()
      ast.parse(source)
      found = [m for m in markers if m in source]
      assert not found, f'{name} uses {found}: cross-process agreement belongs in parallel/agreement.py'
  assert jax.process_count() == 1
