import jax
import jax.numpy as jnp
import numpy as np
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


def test_epochs_without_replacement_over_valid_examples_only():
  order = local.example_order(jax.random.key(0), jnp.asarray(5), 9)
  assert sorted(np.asarray(order[:5]).tolist()) == [0, 1, 2, 3, 4]
  batch = local.take_batch({"i": jnp.arange(9)}, order, jnp.asarray(5), jnp.asarray(3), 4)
  assert set(np.asarray(batch["i"]).tolist()) <= {0, 1, 2, 3, 4}
