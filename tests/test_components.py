import numpy as np
import pytest

import tapjax


def test_assign_components_with_groups_and_usage():
  params = {
    "enc_img": {"lora_a": np.zeros(2)},
    "enc_txt": {"w": np.zeros(1)},
    "head_cls": {"w": np.zeros(3), "b": np.zeros(1)},
  }
  rules = [tapjax.Rule(r"^enc_(\w+)/", r"encoder/\1"), tapjax.Rule(r"^head_(\w+)/", r"head/\1")]
  names, ids = tapjax.assign_components(params, rules)
  assert names == ("encoder/img", "encoder/txt", "head/cls")
  assert ids == {"enc_img": {"lora_a": 0}, "enc_txt": {"w": 1}, "head_cls": {"w": 2, "b": 2}}
  usage = tapjax.usage_matrix(names, [["encoder/img", "head/cls"], ["encoder/txt"]])
  np.testing.assert_array_equal(usage, [[1, 0, 1], [0, 1, 0]])
  held = tapjax.holders(np.array([[1, 0], [0, 1], [1, 1]], bool), usage)
  np.testing.assert_array_equal(held, [[1, 0, 1], [0, 1, 0], [1, 1, 1]])
  assert tapjax.components.num_params_per_component(params, ids, 3).tolist() == [2, 1, 4]


def test_unmatched_leaf_and_unknown_component_are_clear_errors():
  with pytest.raises(ValueError, match="match no component rule.*stray/w"):
    tapjax.assign_components({"stray": {"w": np.zeros(1)}}, [tapjax.Rule("^enc/", "enc")])
  with pytest.raises(ValueError, match="unknown components \\['nope'\\]"):
    tapjax.usage_matrix(("a",), [["nope"]])


@pytest.mark.parametrize("stacked_rows", [1, 3])
def test_flat_layout_matches_ravel_pytree_and_expands_component_values(stacked_rows):
  """The flat layout is ravel_pytree's order; ``expand`` puts each component's value on
  every element of it (whole and stacked leaves), and the layout serves as the flat
  vector's leaf ids for the component-wise functions."""
  import jax
  import jax.numpy as jnp
  from jax.flatten_util import ravel_pytree

  rng = np.random.default_rng(stacked_rows)
  stacked = rng.integers(0, 5, size=(stacked_rows, 2)).astype(np.int32)
  params = {
    "a": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=stacked.shape + (3,)), jnp.float32),
    "c": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
  }
  ids = {"a": 5, "b": stacked, "c": 6}
  layout = tapjax.components.FlatLayout.of(params, ids)
  flat = layout.ravel(params)
  np.testing.assert_array_equal(flat, ravel_pytree(params)[0])
  assert layout.size == flat.shape[0]
  back = layout.unravel(flat)
  for k in params:
    np.testing.assert_array_equal(back[k], params[k])
  rows = jnp.stack([flat, 2 * flat])  # [clients, P] rows round-trip
  np.testing.assert_array_equal(layout.ravel(layout.unravel(rows), batch_dims=1), rows)

  values = jnp.asarray(rng.normal(size=(2, 7)), jnp.float32)  # [clients, components]
  per_leaf = lambda v: jax.tree_util.tree_map(
    lambda i, x: np.broadcast_to(
      np.reshape(v[np.asarray(i)], np.shape(i) + (1,) * (x.ndim - np.ndim(i))), x.shape
    ),
    ids,
    params,
  )
  want = np.stack([ravel_pytree(per_leaf(np.asarray(v)))[0] for v in values])
  np.testing.assert_array_equal(jax.jit(layout.expand)(values), want)
  mask = np.array([1, 0, 1, 0, 1, 0, 1], bool)
  picked = tapjax.components.select(jnp.asarray(mask), flat, -flat, layout)
  np.testing.assert_array_equal(
    picked,
    layout.ravel(
      tapjax.components.select(jnp.asarray(mask), params, jax.tree_util.tree_map(jnp.negative, params), ids)
    ),
  )
  with pytest.raises(ValueError, match="leaf_ids has 2 leaves where the params have 3"):
    tapjax.components.FlatLayout.of(params, {"a": 0, "b": 1})
  with pytest.raises(ValueError, match="not a prefix"):
    tapjax.components.FlatLayout.of(params, {"a": np.zeros(3, np.int32), "b": 1, "c": 2})
