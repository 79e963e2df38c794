"""BERTScore with the real all-MiniLM-L6-v2 checkpoint: against a numpy hand computation
from the Flax encoder's hidden states, padding/batching invariance, multiple references,
default layer choice and errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tapjax.eval.bertscore import BertScorer, _known_model
from tapjax.model import hf
from tapjax.model.bert import BertEncoder

# Every text is 9 tokens with [CLS] and [SEP], so the unpadded reference forward compiles once;
# the scorer still pads them (to 16 tokens, 8 rows).
PAIRS = [
  ("the cat sat on the mat today", "a cat was sitting on the mat"),
  ("a quick brown fox jumps over it", "the fast brown fox leaped over dogs"),
  ("Federated learning personalizes models.", "Personalized federated models learn well"),
]
LONG = (
  "a much longer candidate sentence that runs well past sixteen word pieces so that the batch "
  "is padded to a longer bucket than the short pair alone"
)


@pytest.fixture(scope="module")
def checkpoint():
  try:
    return hf.minilm_path()
  except ImportError as e:
    pytest.skip(str(e))


LAYER = 2  # not the last (6): a wrong truncation of the encoder shows; fewer layers compile faster


@pytest.fixture(scope="module")
def scorer(checkpoint):
  return BertScorer(checkpoint, layer=LAYER)


@pytest.fixture(scope="module")
def hidden_states(checkpoint):
  """text -> [layers + 1, tokens, hidden] float64: every hidden layer of the unpadded text, from
  the full encoder (its blocks' outputs captured by Flax), tokenized by a separately loaded tokenizer."""
  from transformers import AutoTokenizer

  config, params = hf.load_bert(checkpoint)
  tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)

  @jax.jit
  def layers(ids):
    last, state = BertEncoder(config).apply(
      {"params": params}, ids, capture_intermediates=True, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    out = [inter["embeddings"]["__call__"][0]]
    out += [inter[f"layer_{n}"]["__call__"][0] for n in range(config.num_layers - 1)]
    return jnp.stack(out + [last])[:, 0]

  return lambda text: np.asarray(layers(np.array([tokenizer(text)["input_ids"]], np.int32)), np.float64)


def _hand_prf(cand, ref):
  """Greedy cosine matching with plain loops; [CLS]/[SEP] (first/last rows) are matched against
  but not averaged over."""

  def cos(a, b):
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

  p = np.mean([max(cos(cand[i], ref[j]) for j in range(len(ref))) for i in range(1, len(cand) - 1)])
  r = np.mean([max(cos(cand[i], ref[j]) for i in range(len(cand))) for j in range(1, len(ref) - 1)])
  return p, r, 2 * p * r / (p + r)


def test_equals_hand_computation_from_hidden_states(scorer, hidden_states):
  got = scorer.prf([c for c, _ in PAIRS], [r for _, r in PAIRS])
  want = np.array([_hand_prf(hidden_states(c)[LAYER], hidden_states(r)[LAYER]) for c, r in PAIRS])
  np.testing.assert_allclose(np.stack(got, axis=1), want, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(scorer.score([c for c, _ in PAIRS], [r for _, r in PAIRS]), got.f1)
  assert np.all(got.f1 < 0.99) and len(set(np.round(got.f1, 4))) == len(PAIRS)


def test_identical_strings_score_one(scorer):
  texts = [c for c, _ in PAIRS] + [LONG]
  got = scorer.prf(texts, texts)
  np.testing.assert_allclose(np.stack(got), 1.0, rtol=0, atol=1e-6)


def test_padding_and_batching_do_not_change_a_score(scorer):
  cand, ref = PAIRS[0]
  alone = np.stack(scorer.prf([cand], [ref]))
  assert len(scorer.tokenizer(LONG)["input_ids"]) > 16  # forces a longer token bucket
  batch = scorer.prf([LONG, cand, PAIRS[1][0]] * 4, [PAIRS[1][1], ref, LONG] * 4)
  for k in (1, 4, 7, 10):
    np.testing.assert_allclose(np.stack(batch)[:, k], alone[:, 0], rtol=0, atol=1e-6)


def test_multiple_references_take_each_maximum_and_empty_texts_score_zero(scorer):
  cand = PAIRS[0][0]
  refs = [PAIRS[1][1], "the cat", "yesterday the black cat sat on the mat by the door"]
  single = np.stack(scorer.prf([cand] * 3, refs))  # [3 (p, r, f1), references]
  multi = np.stack(scorer.prf([cand], [refs]))[:, 0]
  np.testing.assert_allclose(multi, single.max(axis=1), rtol=0, atol=1e-12)
  assert np.argmax(single[0]) != np.argmax(single[1])  # the maxima come from different references
  got = np.stack(scorer.prf(["", "  ", cand], [cand, cand, ""]))
  np.testing.assert_array_equal(got, 0.0)


def test_bad_input_errors(checkpoint, scorer, tmp_path):
  with pytest.raises(ValueError, match="2 candidates but 1 reference"):
    scorer.score(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="candidate 0 has no references"):
    scorer.score(["a"], [[]])
  with pytest.raises(TypeError, match="decode token ids"):
    scorer.score([[101, 102]], ["a"])
  with pytest.raises(ValueError, match=r"layer=7 is out of range .* 0\.\.6"):
    BertScorer(checkpoint, layer=7)
  with pytest.raises(FileNotFoundError, match="minilm_path"):
    BertScorer(tmp_path / "absent")


def test_default_layer(checkpoint):
  assert BertScorer(checkpoint).layer == 6  # MiniLM is not in DEFAULT_LAYERS: its last layer
  assert _known_model("google-bert/bert-base-uncased") == "bert-base-uncased"
  cache = "/hf/hub/models--google-bert--bert-large-uncased/snapshots/abc123"
  assert _known_model(cache) == "bert-large-uncased"
  assert _known_model("/models/bert-base-uncased-finetuned", "/x/all-MiniLM-L6-v2") is None
