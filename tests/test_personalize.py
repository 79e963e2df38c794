import jax.numpy as jnp
import numpy as np

import tapjax


def test_decide_hand_numbers_and_first_visit():
  teacher = jnp.array([1.0, 1.0, 1.0, 1.0])
  student = jnp.array([1.02, 1.005, jnp.inf, 0.5])
  margin = jnp.array([0.01, 0.01, 0.01, 0.01])
  active = jnp.array([True, True, True, True])
  np.testing.assert_array_equal(tapjax.decide(teacher, student, margin, active), [True, False, True, False])
  # an inactive task never fires, even on a first visit (+inf)
  np.testing.assert_array_equal(
    tapjax.decide(teacher, student, margin, active.at[2].set(False)), [True, False, False, False]
  )


def test_expand_restricts_to_held():
  usage = jnp.array([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], bool)  # [tasks, comps]
  held = jnp.array([1, 1, 0, 1], bool)
  out = tapjax.expand(jnp.array([True, True, False]), usage, held)
  np.testing.assert_array_equal(out, [True, True, False, False])


def test_merge_hand_numbers():
  personal = {"a": jnp.array([1.0, 2.0]), "b": {"w": jnp.full((2, 2), 3.0)}, "c": jnp.array(5.0)}
  teacher = {"a": jnp.array([10.0, 20.0]), "b": {"w": jnp.full((2, 2), 30.0)}, "c": jnp.array(50.0)}
  leaf_ids = {"a": 0, "b": {"w": 1}, "c": 0}
  out = tapjax.merge(personal, teacher, jnp.array([True, False]), leaf_ids)
  np.testing.assert_array_equal(out["a"], [10.0, 20.0])
  np.testing.assert_array_equal(out["c"], 50.0)
  np.testing.assert_array_equal(out["b"]["w"], np.full((2, 2), 3.0))


def test_replace_counts_and_params():
  personal = {"x": jnp.zeros(3), "y": jnp.zeros(2)}
  teacher = {"x": jnp.ones(3), "y": jnp.ones(2)}
  leaf_ids = {"x": 0, "y": 1}
  usage = jnp.array([[1, 0], [0, 1]], bool)
  rep = tapjax.replace(
    personal,
    teacher,
    jnp.array([0.5, 0.9]),
    jnp.array([0.7, 0.905]),
    jnp.array([0.1, 0.01]),
    jnp.array([True, True]),
    usage,
    jnp.array([True, True]),
    leaf_ids,
  )
  # task 0: 0.6 < 0.7 -> replace; task 1: 0.91 < 0.905 is false
  np.testing.assert_array_equal(rep.tasks, [True, False])
  np.testing.assert_array_equal(rep.components, [True, False])
  np.testing.assert_array_equal(rep.params["x"], np.ones(3))
  np.testing.assert_array_equal(rep.params["y"], np.zeros(2))
