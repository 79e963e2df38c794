"""The experiment's host text metrics: decoding answers and averaging per (client, task)."""

import numpy as np

from experiments import text_metrics
from tapjax.data import load_tokenizer


def test_decode_stops_at_sep_and_drops_pads():
  tok = load_tokenizer()
  ids = np.array(tok(["red circle", "two"], add_special_tokens=False)["input_ids"], dtype=object)
  rows = np.zeros((2, 6), np.int64)
  rows[0, :2] = ids[0]
  rows[0, 2] = tok.sep_token_id
  rows[0, 3] = ids[1][0]  # after [SEP]: ignored
  rows[1, 0] = ids[1][0]  # no [SEP]: everything but the pads
  assert text_metrics.decode_answers(rows, tok) == ["red circle", "two"]


def test_scores_are_per_key_means_from_one_call():
  calls = []

  def scorer(cands, refs):
    calls.append(len(cands))
    return [float(c == r) for c, r in zip(cands, refs)]

  pairs = {(0, 3): (["a", "b", "c"], ["a", "x", "c"]), (2, 1): (["d"], ["d"])}
  assert text_metrics.scores(pairs, scorer) == {(0, 3): 2 / 3, (2, 1): 1.0}
  assert calls == [4]
  assert text_metrics.scores({}, scorer) == {}
