"""Text-generation metrics: METEOR and BERTScore (edge layer).

These run on the host after decoding, not inside jitted rounds: turn the
generated token ids into strings with the task's tokenizer (e.g.
`tokenizer.batch_decode(ids, skip_special_tokens=True)`), then score the
strings against the reference strings. BERTScore runs its own jitted BERT
forward pass on whatever device JAX uses; the matching itself is numpy.

    meteor.meteor(candidate, references, *, synonyms=None) -> float
    meteor_batch(candidates, references, *, synonyms=None) -> np.ndarray [candidates]
    matching_mode(synonyms=None) -> "exact+stem" | "exact+stem+wordnet"
    BertScorer(checkpoint, *, layer=None).score(candidates, references) -> F1 [candidates]
    BertScorer(...).prf(candidates, references) -> BertScores(precision, recall, f1)

Record `matching_mode()` and `BertScorer.description` beside the numbers:
METEOR with and without WordNet, and BERTScore at different models or
layers, are not comparable.

The single-text `meteor` function is not re-exported here, so that
`tapjax.eval.meteor` stays the module: `from tapjax.eval.meteor import meteor`.
"""

from tapjax.eval import bertscore, meteor
from tapjax.eval.bertscore import DEFAULT_CHECKPOINT, DEFAULT_LAYERS, BertScorer, BertScores
from tapjax.eval.meteor import (
  EXACT_STEM,
  EXACT_STEM_WORDNET,
  matching_mode,
  meteor_batch,
  wordnet_available,
)

__all__ = [
  "BertScorer",
  "BertScores",
  "DEFAULT_CHECKPOINT",
  "DEFAULT_LAYERS",
  "EXACT_STEM",
  "EXACT_STEM_WORDNET",
  "bertscore",
  "matching_mode",
  "meteor",
  "meteor_batch",
  "wordnet_available",
]
