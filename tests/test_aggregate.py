import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tapjax
from tapjax.sharding import client_mesh, place_clients

# components: 0 held by clients 0 and 1, 1 held by client 1 only, 2 held by nobody
LEAF_IDS = {"a": 0, "b": 1, "c": 2}
HELD = jnp.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)  # [clients, comps]
WEIGHTS = jnp.array([1.0, 3.0, 5.0])
STACKED = {
  "a": jnp.array([[1.0, 2.0], [5.0, 6.0], [100.0, 100.0]]),
  "b": jnp.array([7.0, 8.0, 9.0]),
  "c": jnp.array([1.0, 2.0, 3.0]),
}
GLOBAL = {"a": jnp.zeros(2), "b": jnp.array(-1.0), "c": jnp.array(42.0)}


def test_masked_weighted_mean_hand_numbers():
  agg = tapjax.masked_mean(STACKED, HELD, WEIGHTS, LEAF_IDS, GLOBAL)
  # a: (1*[1,2] + 3*[5,6]) / 4 ; client 2 does not hold it, its weight is ignored
  np.testing.assert_allclose(agg.mean["a"], [4.0, 5.0])
  np.testing.assert_allclose(agg.mean["b"], 8.0)  # held by one client: its value
  np.testing.assert_allclose(agg.mean["c"], 42.0)  # held by nobody: keeps its value
  np.testing.assert_array_equal(agg.sent, [True, True, False])


def test_server_optimizers():
  agg = tapjax.masked_mean(STACKED, HELD, WEIGHTS, LEAF_IDS, GLOBAL)
  sgd = optax.sgd(1.0)
  new = tapjax.server_update(tapjax.server_init(GLOBAL, sgd), agg, LEAF_IDS, sgd)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), new.params, agg.mean)
  adam = optax.adam(0.1)
  state = tapjax.server_init(GLOBAL, adam)
  for _ in range(3):
    state = tapjax.server_update(state, agg, LEAF_IDS, adam)
  assert float(state.params["c"]) == 42.0  # unsent component never drifts
  assert np.all(np.asarray(state.params["a"]) > 0)  # moved towards the mean


def test_sharded_over_8_devices_equals_single_device():
  n = 8
  rng = np.random.default_rng(0)
  stacked = {
    "a": jnp.asarray(rng.normal(size=(n, 4, 3)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(n, 5)), jnp.float32),
  }
  held = jnp.asarray(rng.random((n, 2)) > 0.4)
  w = jnp.asarray(rng.integers(1, 50, n), jnp.float32)
  ids = {"a": 0, "b": 1}
  fb = {"a": jnp.zeros((4, 3)), "b": jnp.zeros(5)}
  f = jax.jit(lambda s, h, w: tapjax.masked_mean(s, h, w, ids, fb).mean)
  single = f(stacked, held, w)
  mesh = client_mesh(8)
  sharded = f(place_clients(stacked, mesh), place_clients(held, mesh), place_clients(w, mesh))
  assert len(jax.tree_util.tree_leaves(stacked)[0].sharding.device_set) == 1
  assert len(place_clients(stacked, mesh)["a"].sharding.device_set) == 8
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), single, sharded)


# 21 and 40 > UNROLL_MAX (8): the loop over chunks, with and without a tail
@pytest.mark.parametrize("clients", [3, 21, 40])
@pytest.mark.parametrize("how", tapjax.aggregate.SUMS)
def test_every_sum_over_clients_is_the_weighted_mean(how, clients):
  """Each way of summing over clients equals a numpy weighted mean per slot of a
  stacked leaf (slot j of ``a`` is component j) and of a one-component leaf."""
  rng = np.random.default_rng(1)
  stacked = {
    "a": rng.normal(size=(clients, 2, 3, 4)).astype(np.float32),
    "b": rng.normal(size=(clients, 5)).astype(np.float32),
  }
  held = rng.random((clients, 3)) > 0.3
  held[0] = True  # every component sent
  w = rng.integers(1, 50, clients).astype(np.float32)
  ids = {"a": np.array([0, 1]), "b": 2}
  fb = {"a": np.zeros((2, 3, 4), np.float32), "b": np.zeros(5, np.float32)}
  got = jax.jit(lambda s: tapjax.masked_mean(s, held, w, ids, fb, how).mean)(stacked)
  for j in range(2):
    cw = w * held[:, j]
    want = np.einsum("c,cij->ij", cw, stacked["a"][:, j].astype(np.float64)) / cw.sum()
    np.testing.assert_allclose(got["a"][j], want, rtol=1e-5, atol=1e-6)
  cw = w * held[:, 2]
  np.testing.assert_allclose(got["b"], cw @ stacked["b"].astype(np.float64) / cw.sum(), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="unknown sum_over_clients 'mean'"):
    tapjax.masked_mean(stacked, held, w, ids, fb, "mean")
