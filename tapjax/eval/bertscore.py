"""BERTScore (Zhang et al. 2020) with tapjax's Flax BERT, as the `bert_score` package computes it.

    scorer = BertScorer(checkpoint="google-bert/bert-base-uncased", layer=None)
    scorer.score(candidates, references) -> F1 np.ndarray [candidates]
    scorer.prf(candidates, references)   -> BertScores(precision, recall, f1), each [candidates]

Per text: strip surrounding whitespace, tokenize with the checkpoint's own
tokenizer (adds [CLS] ... [SEP], truncated to `max_length` tokens), run the
encoder up to hidden layer `layer` (the output of encoder block `layer`,
1-based; 0 = the embedding layer), L2-normalize each token's vector. For a
candidate/reference pair, with sim[i, j] the cosine similarity of candidate
token i and reference token j:

    precision = mean over candidate tokens i of max_j sim[i, j]
    recall    = mean over reference tokens j of max_i sim[i, j]
    f1        = 2 precision recall / (precision + recall)

The means run over the text's word pieces, [CLS] and [SEP] excluded; as in
`bert_score`, [CLS] and [SEP] still take part as the other side's match
candidates (its idf weight 0 only removes them from the means). A text with
no word piece (empty after stripping) gives precision = recall = f1 = 0.
With several references precision, recall and f1 are each the maximum over
the references (so the three may come from different references), as in
`bert_score.score`.

Defaults as `bert_score.score`: no idf weighting, no baseline rescaling (raw
cosine scores, typically 0.8-1.0 for bert-base; not comparable to rescaled
numbers). `layer=None` takes bert_score's tuned layer for the models it
lists (bert-base-uncased: 9) and the last layer for any other checkpoint.
One deliberate difference: padding is masked out of the max exactly, where
bert_score lets padded positions contribute a similarity of 0 (which matters
only if all of a token's similarities are negative).

Texts are deduplicated, sorted by length and encoded `batch_size` at a time
in one jitted forward pass per batch, padded to a bucketed shape (rows and
tokens rounded up to powers of two, at least 8 rows and 16 tokens), so
scoring many batches compiles only a few programs. The greedy matching runs
in numpy on the host. Never downloads: the checkpoint folder and its
tokenizer files must be on this machine.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tapjax.model import hf
from tapjax.model.bert import BertConfig, BertEmbeddings, BertEncoder

__all__ = [
  "DEFAULT_CHECKPOINT",
  "DEFAULT_LAYERS",
  "BertScores",
  "BertScorer",
]

DEFAULT_CHECKPOINT = "google-bert/bert-base-uncased"

# bert_score's tuned layers (its `model2layers`) for the BERT checkpoints it lists.
DEFAULT_LAYERS = {
  "bert-base-uncased": 9,
  "bert-large-uncased": 18,
  "bert-base-cased-finetuned-mrpc": 9,
  "bert-base-multilingual-cased": 9,
  "bert-base-chinese": 8,
}

_MIN_ROWS, _MIN_TOKENS = 8, 16


class BertScores(NamedTuple):
  """BERTScore per candidate: each field float64 [candidates]."""

  precision: np.ndarray
  recall: np.ndarray
  f1: np.ndarray


def _pow2_bucket(n: int, lo: int, hi: int) -> int:
  """Smallest power of two >= max(n, lo), capped at hi."""
  return min(hi, max(lo, 1 << max(0, n - 1).bit_length()))


def _known_model(*names: str | os.PathLike) -> str | None:
  """The DEFAULT_LAYERS key named by a repo id, a folder or an HF cache path, if any."""
  for name in names:
    for part in reversed(pathlib.PurePath(str(name)).parts):
      part = part.split("--")[-1] if part.startswith("models--") else part
      if part in DEFAULT_LAYERS:
        return part
  return None


def _unit_hidden(
  params: dict, input_ids: jax.Array, mask: jax.Array, *, config: BertConfig, layer: int, dtype
):
  """Hidden layer `layer`, L2-normalized per token.

  Args:
    params: canonical BERT params holding the embeddings and layer_0 .. layer_{layer-1}.
    input_ids: [texts, tokens] int32.
    mask: [texts, tokens] 1 = real token, 0 = padding.

  Returns:
    float32 [texts, tokens, hidden]; padded positions hold finite garbage.
  """
  if layer == 0:
    x = BertEmbeddings(config, dtype=dtype).apply({"params": params["embeddings"]}, input_ids)
  else:
    x = BertEncoder(dataclasses.replace(config, num_layers=layer), dtype=dtype).apply(
      {"params": params}, input_ids, mask
    )
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _greedy(cand: np.ndarray, cand_content: np.ndarray, ref: np.ndarray, ref_content: np.ndarray):
  """Greedy-matching precision, recall, F1 of one pair.

  Args:
    cand: unit vectors [candidate tokens, hidden]; ref: [reference tokens, hidden].
    cand_content, ref_content: bool [tokens], True for word pieces (not [CLS]/[SEP]).

  Returns:
    (precision, recall, f1) as floats; all 0 when a side has no word piece.
  """
  if not cand_content.any() or not ref_content.any():
    return 0.0, 0.0, 0.0
  sim = cand @ ref.T  # [candidate tokens, reference tokens]
  precision = float(sim[cand_content].max(axis=1).astype(np.float64).mean())
  recall = float(sim[:, ref_content].max(axis=0).astype(np.float64).mean())
  total = precision + recall
  f1 = 2 * precision * recall / total if total != 0 else 0.0
  return precision, recall, f1


class BertScorer:
  """BERTScore with one BERT checkpoint and one hidden layer (see the module docstring).

  Attributes:
    folder: the resolved checkpoint folder.
    name: the DEFAULT_LAYERS model name recognised in the checkpoint path, else None.
    layer: the hidden layer used (0 = embeddings, config.num_layers = last).
    config: the BertConfig read from the folder.
    tokenizer: the transformers tokenizer read from the folder.
    max_length: texts are truncated to this many tokens, [CLS] and [SEP] included.
  """

  def __init__(
    self,
    checkpoint: str | os.PathLike = DEFAULT_CHECKPOINT,
    *,
    layer: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_length: int | None = None,
    batch_size: int = 64,
    dtype=jnp.float32,
  ):
    """Loads the encoder and tokenizer from a local checkpoint.

    Args:
      checkpoint: anything `tapjax.model.hf.resolve_checkpoint` accepts: a
        folder, an HF cache `models--org--name` folder, or a repo id looked
        up in the HF hub cache (default: bert-base-uncased). The folder must
        also hold the tokenizer files (vocab.txt / tokenizer.json).
      layer: hidden layer, 0 .. num_layers; None = DEFAULT_LAYERS for a
        recognised model name, else the last layer.
      cache_dir: HF hub cache root for repo ids.
      max_length: truncation length in tokens; default the tokenizer's
        model_max_length capped at the model's max_position_embeddings.
      batch_size: texts per forward pass (the largest row bucket).
      dtype: compute dtype of the encoder (similarities are taken in float32).

    Raises:
      FileNotFoundError: no checkpoint found; the message says how to get one.
      OSError: the folder has no tokenizer files.
      ValueError: `layer`, `max_length` or `batch_size` out of range.
    """
    try:
      self.folder = hf.resolve_checkpoint(checkpoint, cache_dir=cache_dir)
    except FileNotFoundError as e:
      raise FileNotFoundError(
        f"BertScorer: {e} (BERTScore's default model is bert-base-uncased at layer 9; any local BERT "
        "checkpoint works, e.g. BertScorer(tapjax.model.hf.minilm_path()), whose default layer is its last.)"
      ) from e
    self.config, params = hf.load_bert(self.folder)
    self.name = _known_model(checkpoint, self.folder)
    if layer is None:
      layer = DEFAULT_LAYERS[self.name] if self.name is not None else self.config.num_layers
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer <= self.config.num_layers:
      raise ValueError(
        f"BertScorer: layer={layer!r} is out of range for {self.folder} "
        f"({self.config.num_layers} layers); pass an int in 0..{self.config.num_layers} "
        "(0 = embeddings, the last = final hidden state)."
      )
    self.layer = int(layer)

    from transformers import AutoTokenizer  # noqa: PLC0415 -- edge dependency

    try:
      self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
    except (OSError, ValueError) as e:
      raise OSError(
        f"BertScorer: cannot load a tokenizer from {self.folder} ({e}). Fix: copy the tokenizer files "
        "(vocab.txt or tokenizer.json, tokenizer_config.json) of the same model into that folder."
      ) from e
    limit = self.config.max_position_embeddings
    model_max = getattr(self.tokenizer, "model_max_length", None) or limit
    self.max_length = int(max_length) if max_length is not None else int(min(model_max, limit))
    if not 2 <= self.max_length <= limit:
      raise ValueError(
        f"BertScorer: max_length={max_length} must lie in 2..{limit} (max_position_embeddings)."
      )
    if batch_size < 1:
      raise ValueError(f"BertScorer: batch_size={batch_size} must be positive.")
    self.batch_size = int(batch_size)
    self._special = np.array(
      [t for t in (self.tokenizer.cls_token_id, self.tokenizer.sep_token_id) if t is not None], np.int64
    )
    self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    kept = {k: v for k, v in params.items() if k == "embeddings" or int(k.split("_")[1]) < self.layer}
    self._params = jax.device_put(kept)
    self._forward = jax.jit(
      functools.partial(_unit_hidden, config=self.config, layer=self.layer, dtype=dtype)
    )

  @property
  def description(self) -> str:
    """What the scores are, for experiment logs."""
    model = self.name or str(self.folder)
    return f"BERTScore {model} layer {self.layer} (no idf, no baseline rescaling)"

  def _token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    enc = self.tokenizer(
      [t.strip() for t in texts], add_special_tokens=True, truncation=True, max_length=self.max_length
    )
    return [list(ids) for ids in enc["input_ids"]]

  def embed(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Unit-norm contextual token vectors of each text.

    Args:
      texts: [texts] strings.

    Returns:
      Per text `(vectors, content)`: float32 [tokens, hidden] for the text's
      tokens ([CLS] and [SEP] included, no padding) and bool [tokens], True
      for word pieces (False for [CLS]/[SEP]).
    """
    ids = self._token_ids(texts)
    order = sorted(range(len(ids)), key=lambda n: -len(ids[n]))
    out: list = [None] * len(ids)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start : start + self.batch_size]
      rows = _pow2_bucket(len(chunk), _MIN_ROWS, self.batch_size)
      tokens = _pow2_bucket(max(len(ids[n]) for n in chunk), _MIN_TOKENS, self.max_length)
      batch = np.full((rows, tokens), self._pad_id, np.int32)
      mask = np.zeros((rows, tokens), np.int32)
      for row, n in enumerate(chunk):
        batch[row, : len(ids[n])] = ids[n]
        mask[row, : len(ids[n])] = 1
      # Full float32 matmuls: on GPUs the default may be TF32, ~1e-3 off the reference implementation.
      with jax.default_matmul_precision("highest"):
        vectors = np.asarray(self._forward(self._params, jnp.asarray(batch), jnp.asarray(mask)))
      for row, n in enumerate(chunk):
        length = len(ids[n])
        out[n] = (vectors[row, :length], ~np.isin(batch[row, :length], self._special))
    return out

  def prf(self, candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> BertScores:
    """Precision, recall and F1 of each candidate against its reference(s).

    Args:
      candidates: [candidates] decoded texts.
      references: [candidates], each one reference string or a non-empty
        sequence of them (precision, recall, f1 each maxed over them).

    Returns:
      BertScores with float64 arrays [candidates].

    Raises:
      ValueError: the lengths differ or a candidate has no reference.
      TypeError: a text is not a str.
    """
    if isinstance(candidates, str) or isinstance(references, str):
      raise TypeError("BertScorer: pass lists of texts (one candidate, one reference entry each), not a str.")
    if len(candidates) != len(references):
      raise ValueError(
        f"BertScorer: {len(candidates)} candidates but {len(references)} reference entries; "
        "give one entry (a string or a list of strings) per candidate."
      )
    groups = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    for n, group in enumerate(groups):
      if not group:
        raise ValueError(f"BertScorer: candidate {n} has no references; give at least one reference string.")
    texts = list(candidates) + [r for group in groups for r in group]
    for t in texts:
      if not isinstance(t, str):
        raise TypeError(
          f"BertScorer: texts must be str, got {type(t).__name__}; decode token ids to text first."
        )
    unique = list(dict.fromkeys(texts))
    embedded = dict(zip(unique, self.embed(unique)))
    scores = np.zeros((3, len(candidates)), np.float64)
    for n, (cand, group) in enumerate(zip(candidates, groups)):
      per_ref = np.array([_greedy(*embedded[cand], *embedded[ref]) for ref in group])  # [references, 3]
      scores[:, n] = per_ref.max(axis=0)
    return BertScores(*scores)

  def score(self, candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> np.ndarray:
    """BERTScore F1 [candidates]; see `prf`."""
    return self.prf(candidates, references).f1
