import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tapjax
from tapjax import local


@pytest.mark.parametrize("round_,want", [(0, 1e-4), (10, 2e-4), (19, 2.9e-4), (20, 3e-4), (150, 3e-4)])
def test_warmup_lr_hand_numbers(round_, want):
  np.testing.assert_allclose(tapjax.warmup_lr(jnp.asarray(round_), 1e-4, 3e-4, 20), want, rtol=1e-5)


def _linear_problem():
  rng = np.random.default_rng(0)
  data = {
    "x": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(16,)), jnp.float32),
    "task": jnp.asarray(np.arange(16) % 2, jnp.int32),
  }
  loss_fn = lambda p, b, k: (b["x"] @ p["w"] + p["b"] - b["y"]) ** 2
  params = {"w": jnp.ones(3), "b": jnp.zeros(()), "unheld": jnp.ones(2)}
  return data, loss_fn, params


def test_accumulation_equals_big_batch_and_mask_freezes_unheld():
  data, loss_fn, params = _linear_problem()
  key = jax.random.key(0)
  mask = {"w": True, "b": True, "unheld": False}
  big = local.train(
    loss_fn, params, data, 16, key, key, 1e-2, local.LocalConfig(steps=3, batch_size=8, accum=1), 2, mask
  )
  acc = local.train(
    loss_fn, params, data, 16, key, key, 1e-2, local.LocalConfig(steps=3, batch_size=4, accum=2), 2, mask
  )
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), big.params, acc.params
  )
  # weight decay would shrink "unheld" if it were not masked
  np.testing.assert_array_equal(big.params["unheld"], np.ones(2))
  assert float(big.task_count.sum()) == 24.0 and float(big.num_seen) == 24.0
  assert not np.allclose(big.params["w"], 1.0)


def test_per_task_loss_record_hand_computed():
  data, loss_fn, params = _linear_problem()
  key = jax.random.key(3)
  cfg = local.LocalConfig(steps=1, batch_size=16, accum=1)
  res = local.train(loss_fn, params, data, 16, key, key, 0.0, cfg, 2)
  per = np.asarray(loss_fn(params, data, None))
  want = [per[0::2].mean(), per[1::2].mean()]
  np.testing.assert_allclose(res.task_mean(), want, rtol=1e-5)
  # the reference's record: the mean times the task's share of the batch (here 1/2)
  np.testing.assert_allclose(res.share_weighted(), np.array(want) / 2, rtol=1e-5)


def test_accumulated_gradient_is_the_mean_over_micro_batches(monkeypatch):
  """With plain SGD (AdamW is invariant to a gradient scale, so it would hide a missing
  ``/ accum``): 2 micro-batches of 4 move the parameters exactly as one batch of 8, and
  that one step equals ``p - lr * grad(mean loss over the 8 examples)`` by hand."""
  monkeypatch.setattr(local, "optimizer", lambda lr, cfg: optax.sgd(lr))
  data, loss_fn, params = _linear_problem()
  key = jax.random.key(1)
  one = local.train(loss_fn, params, data, 16, key, key, 0.1, local.LocalConfig(steps=1, batch_size=8), 2)
  two = local.train(
    loss_fn, params, data, 16, key, key, 0.1, local.LocalConfig(steps=1, batch_size=4, accum=2), 2
  )
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), one.params, two.params)
  order = np.asarray(local.example_order(key, jnp.asarray(16), 16))[:8]
  x, y = np.asarray(data["x"])[order], np.asarray(data["y"])[order]
  r = x @ np.ones(3) + 0.0 - y  # residuals at the start
  np.testing.assert_allclose(two.params["w"], 1.0 - 0.1 * (2 * r @ x / 8), rtol=1e-5)
  np.testing.assert_allclose(two.params["b"], -0.1 * (2 * r.mean()), rtol=1e-5)


@pytest.mark.parametrize("batch,steps,accum", [(5, 2, 1), (2, 5, 1), (1, 5, 2)])
def test_epochs_visit_every_valid_example_once_per_epoch(batch, steps, accum):
  """Two epochs over 5 valid examples (capacity 9): with the task id set to the example
  index, every valid example is seen exactly twice and no padding ever."""
  n, capacity = 5, 9
  data = {"task": jnp.arange(capacity, dtype=jnp.int32), "x": jnp.arange(capacity, dtype=jnp.float32)}
  loss_fn = lambda p, b, k: (p["w"] * b["x"]) ** 2
  cfg = local.LocalConfig(steps=steps, batch_size=batch, accum=accum)
  res = local.train(
    loss_fn,
    {"w": jnp.ones(())},
    data,
    jnp.asarray(n),
    jax.random.key(5),
    jax.random.key(0),
    1e-3,
    cfg,
    capacity,
  )
  np.testing.assert_array_equal(res.task_count, [2, 2, 2, 2, 2, 0, 0, 0, 0])
  # the loss record is each example's own loss (w ~ 1: x ** 2), so it is a real per-example record
  np.testing.assert_allclose(res.task_mean()[:n], np.arange(n) ** 2, rtol=1e-2)


def test_example_order_is_a_permutation_of_the_valid_examples_then_padding():
  for seed in range(5):
    order = np.asarray(local.example_order(jax.random.key(seed), jnp.asarray(5), 9))
    assert sorted(order[:5].tolist()) == [0, 1, 2, 3, 4]
    assert sorted(order[5:].tolist()) == [5, 6, 7, 8]
  # and the order depends on the key
  orders = {
    tuple(np.asarray(local.example_order(jax.random.key(s), jnp.asarray(5), 9))[:5]) for s in range(8)
  }
  assert len(orders) > 4


def test_finite_flag_sees_every_trained_parameter():
  """``TrainResult.finite`` is False when any trained parameter is not finite, even one the
  loss never reads (a held-out leaf carrying a NaN), and True otherwise."""
  data, loss_fn, params = _linear_problem()
  key = jax.random.key(0)
  cfg = local.LocalConfig(steps=2, batch_size=8)
  mask = {"w": True, "b": True, "unheld": False}
  clean = local.train(loss_fn, params, data, 16, key, key, 1e-2, cfg, 2, mask)
  assert bool(clean.finite) and np.isfinite(np.asarray(clean.task_mean())).all()
  poisoned = dict(params, unheld=jnp.array([1.0, jnp.nan]))
  res = local.train(loss_fn, poisoned, data, 16, key, key, 1e-2, cfg, 2, mask)
  assert not bool(res.finite) and np.isfinite(np.asarray(res.task_mean())).all()
