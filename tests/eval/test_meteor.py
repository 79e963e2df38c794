"""METEOR against NLTK's `meteor_score` (WordNet replaced by stubs, so no corpus data is
needed), a hand-computed value, the synonym stage, the batch API and the mode switch."""

import numpy as np
import pytest
from nltk.translate.meteor_score import meteor_score as nltk_meteor

from tapjax.eval import meteor as meteor_mod
from tapjax.eval.meteor import EXACT_STEM, EXACT_STEM_WORDNET, matching_mode, meteor, meteor_batch


class _Lemma:
  def __init__(self, name):
    self._name = name

  def name(self):
    return self._name


class _Synset:
  def __init__(self, names):
    self._lemmas = [_Lemma(n) for n in names]

  def lemmas(self):
    return self._lemmas


class _StubWordNet:
  """Quacks like nltk.corpus.wordnet for meteor_score: word -> one synset of `table[word]`."""

  def __init__(self, table=None):
    self.table = table or {}

  def synsets(self, word):
    return [_Synset(self.table[word])] if word in self.table else []


NO_SYNONYMS = _StubWordNet()

HYP1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
REF1 = "It is a guide to action that ensures that the military will forever heed Party commands"
REF2 = "It is the guiding principle which guarantees the military forces always being under the command of the Party"
REF3 = "It is the practical guide for the army always to heed the directions of the party"

# (candidate, references): what each exercises.
FIXTURES = [
  ("the cat sat on the mat", ["the cat sat on the mat"]),  # identical: one chunk
  (HYP1, [REF1]),  # NLTK's doctest pair: exact matches, several chunks
  (HYP1, [REF1, REF2, REF3]),  # multiple references -> max
  ("It is to insure the troops forever hearing the activity guidebook that party direct", [REF1, REF2, REF3]),
  ("the cats were running quickly to the houses", ["a cat runs quick to his house"]),  # stem matches
  ("running runs run", ["run running"]),  # exact then stem on the leftovers
  ("a b c d", ["d c b a"]),  # fully reversed: 4 chunks
  ("one two three four five six", ["four five six one two three"]),  # two swapped chunks
  ("the the the cat", ["the cat sat on the mat"]),  # repeated candidate word
  ("a b a b a", ["b a b a"]),  # repeats: which occurrence is taken sets the chunks
  ("The CAT  Sat\ton the\nMAT", ["the cat sat on the mat", "THE DOG"]),  # case, mixed whitespace
  ("", ["the cat sat on the mat"]),  # empty candidate
  ("the cat", [""]),  # empty reference
  ("the cat", ["", "a cat"]),  # empty and non-empty references
  ("completely unrelated words", ["the cat sat on the mat"]),  # no match
  ("generously generous generation", ["generation general generously"]),  # stems that collide
]


def _nltk(candidate, references, wordnet=NO_SYNONYMS):
  return nltk_meteor([r.split() for r in references], candidate.split(), wordnet=wordnet)


@pytest.mark.parametrize("candidate, references", FIXTURES)
def test_equals_nltk_without_synonyms(candidate, references):
  got = meteor(candidate, references, synonyms=False)
  want = _nltk(candidate, references)
  assert abs(got - want) <= 1e-12, (got, want)


def test_fixtures_are_not_trivial():
  """The fixtures span zero, fragmented, stem-only and perfect scores."""
  scores = [meteor(c, r, synonyms=False) for c, r in FIXTURES]
  assert sum(s == 0.0 for s in scores) >= 3 and sum(0.0 < s < 0.9 for s in scores) >= 6
  assert meteor("the cats", ["the cat"], synonyms=False) > meteor("the dogs", ["the cat"], synonyms=False)


def test_hand_computed_fragmentation():
  # 4 matches, P = R = 1 so Fmean = 1; 4 chunks of 1: penalty 0.5 * (4/4)^3.
  assert meteor("a b c d", "d c b a", synonyms=False) == 0.5
  # 6 matches in 2 chunks: (1 - 0.5 * (2/6)^3) * 1.
  assert meteor(
    "one two three four five six", "four five six one two three", synonyms=False
  ) == pytest.approx(1 - 0.5 / 27, abs=1e-15)
  # 2 of 3 candidate words match 2 of 4 reference words, in 1 chunk.
  p, r = 2 / 3, 2 / 4
  want = (1 - 0.5 * (1 / 2) ** 3) * p * r / (0.9 * p + 0.1 * r)
  assert meteor("the cat xx", "the cat yy zz", synonyms=False) == pytest.approx(want, abs=1e-15)


def _stub_synonyms(table):
  """What `_wordnet_synonyms` yields for the stub: single-word lemma names."""
  return lambda word: [n for n in table.get(word, ()) if "_" not in n]


def test_synonym_stage_equals_nltk_with_a_stub_wordnet():
  """The WordNet stage, fed the same synsets NLTK is given, aligns as NLTK does
  (on Porter stems, multi-word lemmas ignored, last free reference position first)."""
  table = {
    "big": ["larg", "great_big", "big"],
    "fast": ["quick", "speedi"],
    "car": ["auto", "automobil"],
    "happi": ["glad"],
  }
  stub = _StubWordNet(table)
  cases = [
    ("the big fast car", ["a quick large automobile"]),
    ("the big fast car", ["the auto is large and quick", "great big car"]),
    ("happy happy joy", ["glad to be glad"]),
    ("fast fast", ["quick speedy quick"]),
  ]
  for cand, refs in cases:
    want = _nltk(cand, refs, wordnet=stub)
    got = meteor_mod._meteor_words(
      cand.lower().split(), [r.lower().split() for r in refs], _stub_synonyms(table)
    )
    assert abs(got - want) <= 1e-12, (cand, refs, got, want)
  # The stub really adds matches, so the comparison covers the stage.
  assert _nltk(*cases[0], wordnet=stub) > _nltk(*cases[0])


def test_batch_matches_single_calls_and_validates():
  cands = [c for c, _ in FIXTURES]
  refs = [r if len(r) > 1 else r[0] for _, r in FIXTURES]  # single references given as plain strings
  got = meteor_batch(cands, refs, synonyms=False)
  assert got.shape == (len(FIXTURES),) and got.dtype == np.float64
  np.testing.assert_array_equal(got, [meteor(c, r, synonyms=False) for c, r in FIXTURES])
  with pytest.raises(ValueError, match="2 candidates but 1 reference"):
    meteor_batch(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="no references"):
    meteor_batch(["a"], [[]])
  with pytest.raises(TypeError, match="decode token ids"):
    meteor([1, 2], ["a"])


def test_mode_follows_wordnet_availability(monkeypatch):
  monkeypatch.setattr(meteor_mod, "wordnet_available", lambda: False)
  assert matching_mode() == EXACT_STEM and matching_mode(False) == EXACT_STEM
  with pytest.raises(LookupError, match="nltk.downloader wordnet"):
    meteor("a", ["a"], synonyms=True)
  calls = []
  monkeypatch.setattr(meteor_mod, "_wordnet_synonyms", lambda w: calls.append(w) or ())
  meteor("big dog", ["large cat"])  # None -> no WordNet
  assert calls == []
  monkeypatch.setattr(meteor_mod, "wordnet_available", lambda: True)
  assert matching_mode() == EXACT_STEM_WORDNET and matching_mode(False) == EXACT_STEM
  meteor("big dog", ["large cat"])  # None -> WordNet on the stems left after exact + stem
  assert sorted(calls) == ["big", "dog"]
