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
