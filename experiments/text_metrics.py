"""METEOR and BERTScore-F1 of the text-generation clients, on the host.

The jitted evaluation returns each test example's predicted answer tokens (indices
into the federation's answer vocabulary, ``[clients, examples, La]``); here they
are mapped back to tokenizer ids, cut at the first ``[SEP]``, decoded to strings
and scored against the decoded reference answers. Per (client, task) the metric is
the mean over that client's test examples of that task.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tapjax.data.tasks import Federation, TaskKind


def decode_answers(ids: np.ndarray, tokenizer: Any) -> list[str]:
  """Strings of tokenizer ids ``[n, La]``: everything before the first ``[SEP]``, no pads."""
  out = []
  for row in np.asarray(ids):
    stop = np.flatnonzero(row == tokenizer.sep_token_id)
    row = row[: stop[0]] if len(stop) else row
    out.append(tokenizer.decode(row[row != tokenizer.pad_token_id], skip_special_tokens=True))
  return out


def text_pairs(fed: Federation, predicted: np.ndarray, tokenizer: Any) -> dict[tuple[int, int], tuple]:
  """``{(client, task): (candidates, references)}`` for every text-generation task a
  client holds. ``predicted``: int ``[clients, examples, La]`` answer-vocabulary indices
  of the test split (rows past ``n_test`` are padding)."""
  out = {}
  for t, task in enumerate(fed.tasks):
    if task.kind != TaskKind.TEXT_GENERATION:
      continue
    for c in np.flatnonzero(fed.client_tasks[:, t]):
      n = int(fed.n_test[c])
      rows = np.flatnonzero(fed.test["task"][c, :n] == t)
      if not len(rows):
        continue
      cand = decode_answers(fed.answer_vocab[np.asarray(predicted[c, rows])], tokenizer)
      ref = decode_answers(fed.test["target"][c, rows], tokenizer)
      out[int(c), t] = (cand, ref)
  return out


def scores(pairs: dict, scorer_fn) -> dict[tuple[int, int], float]:
  """``{(client, task): mean of scorer_fn(candidates, references)}``, every pair scored in
  one call of ``scorer_fn`` (one BERT pass for all clients)."""
  keys = list(pairs)
  cands = [s for k in keys for s in pairs[k][0]]
  refs = [s for k in keys for s in pairs[k][1]]
  if not cands:
    return {}
  values = np.asarray(scorer_fn(cands, refs), np.float64)
  out, start = {}, 0
  for k in keys:
    n = len(pairs[k][0])
    out[k] = float(values[start : start + n].mean())
    start += n
  return out
