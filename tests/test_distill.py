import jax.numpy as jnp
import numpy as np

import tapjax


def test_kd_zero_at_equality_and_matches_numpy_kl():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(4, 7)).astype(np.float32)
  t = rng.normal(size=(4, 7)).astype(np.float32)
  assert abs(float(tapjax.kd_loss(jnp.asarray(s), jnp.asarray(s)))) < 1e-6
  for temp in (1.0, 2.5):
    p = np.exp(t / temp) / np.exp(t / temp).sum(-1, keepdims=True)
    q = np.exp(s / temp) / np.exp(s / temp).sum(-1, keepdims=True)
    want = np.mean(np.sum(p * np.log(p / q), -1)) * temp**2
    got = float(tapjax.kd_loss(jnp.asarray(s), jnp.asarray(t), temp))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_kd_batchmean_sums_over_tokens():
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.normal(size=(3, 5, 11)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(3, 5, 11)), jnp.float32)
  per_pos = tapjax.kd_divergence(s, t)  # [batch, tokens]
  assert per_pos.shape == (3, 5)
  np.testing.assert_allclose(tapjax.kd_loss(s, t), per_pos.sum(1).mean(), rtol=1e-6)


def test_distill_loss_weights_per_task():
  def apply(params, frozen, batch, key):
    return params["w"] * batch["x"]

  obj = tapjax.Objective(
    apply, lambda out, b: jnp.zeros(out.shape[0]), lambda s, t, b, temp: tapjax.kd_divergence(s, t, temp)
  )
  batch = {"x": jnp.array([[1.0, 2.0], [3.0, -1.0]]), "task": jnp.array([0, 1])}
  teacher = {"w": jnp.array(0.5)}
  fn = tapjax.distill_loss(obj, None, teacher, jnp.array([2.0, 0.0]), jnp.array(1.0))
  per = fn({"w": jnp.array(1.0)}, batch, None)
  want0 = 2.0 * tapjax.kd_divergence(batch["x"][0], 0.5 * batch["x"][0])
  np.testing.assert_allclose(per, [want0, 0.0], rtol=1e-6)
