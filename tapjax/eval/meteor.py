"""METEOR (Banerjee & Lavie 2005; Lavie & Agarwal 2007) as NLTK's `meteor_score` computes it.

    meteor(candidate, references, *, synonyms=None)          -> float
    meteor_batch(candidates, references, *, synonyms=None)   -> np.ndarray [candidates]
    matching_mode(synonyms=None)                              -> "exact+stem" | "exact+stem+wordnet"
    wordnet_available()                                       -> bool

The alignment is written here; NLTK provides only the Porter stemmer and
(when present) the WordNet synsets. For the same tokens the score equals
`nltk.translate.meteor_score.meteor_score` (NLTK 3.10) with its defaults
alpha=0.9, beta=3, gamma=0.5.

Tokenization: lower-case, then split on whitespace (`str.lower().split()`).
NLTK expects pre-tokenized input; this is the simplest choice that needs no
tokenizer data. Punctuation stays attached to its word ("mat." != "mat"), so
decoded text should be detokenized/spaced consistently on both sides.
(Hugging Face `evaluate`'s meteor tokenizes with `nltk.word_tokenize`
instead, which needs the punkt data; scores differ where punctuation is
glued to words.)

Alignment of one candidate with one reference, in three stages; each stage
sees only the words the earlier stages left unmatched:
  1. exact: equal lower-cased words;
  2. stem: equal Porter stems;
  3. wordnet (only in "exact+stem+wordnet" mode): a candidate word matches a
     reference word that is one of its WordNet lemma names (single words,
     no "_") or itself.
Within a stage candidate words are taken from the last to the first, and
each takes the last still-unmatched reference position holding an
acceptable word. As in NLTK, stage 3 works on the Porter stems left over by
stage 2 (synsets are looked up for the stem, and a synonym must equal the
reference word's stem).

Score, with m matches, c the candidate length and r the reference length:
    P = m / c, R = m / r, Fmean = P R / (alpha P + (1 - alpha) R)
    chunks = runs of matches adjacent in both sentences (matches in candidate order)
    score = (1 - gamma (chunks / m) ** beta) Fmean
and 0 when m, c or r is 0. With several references the maximum is taken.

WordNet data is used when NLTK finds it locally (`nltk.data.find`, never a
download); otherwise exact + stem only. Report `matching_mode()` beside the
scores: the two modes give different numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import numpy as np

__all__ = [
  "EXACT_STEM",
  "EXACT_STEM_WORDNET",
  "wordnet_available",
  "matching_mode",
  "meteor",
  "meteor_batch",
]

EXACT_STEM = "exact+stem"
EXACT_STEM_WORDNET = "exact+stem+wordnet"

ALPHA, BETA, GAMMA = 0.9, 3.0, 0.5

_WORDNET_FIX = (
  "Fix: on a machine with network run `python -m nltk.downloader wordnet` and copy the "
  "resulting nltk_data/corpora/wordnet.zip into corpora/ under one of nltk.data.path "
  "(or set NLTK_DATA), or pass synonyms=False / None to score with exact + stem matching."
)


@functools.cache
def wordnet_available() -> bool:
  """Whether NLTK's WordNet corpus is on this machine (looked up once; never downloads)."""
  import nltk  # noqa: PLC0415 -- only the edges need nltk

  try:
    nltk.data.find("corpora/wordnet")
  except LookupError:
    return False
  return True


def matching_mode(synonyms: bool | None = None) -> str:
  """The matching stages `meteor(..., synonyms=synonyms)` runs on this machine.

  Args:
    synonyms: True requires WordNet, False never uses it, None uses it when
      `wordnet_available()`.

  Returns:
    EXACT_STEM ("exact+stem") or EXACT_STEM_WORDNET ("exact+stem+wordnet").

  Raises:
    LookupError: synonyms=True and WordNet data is not on this machine.
  """
  if synonyms is None:
    synonyms = wordnet_available()
  elif synonyms and not wordnet_available():
    raise LookupError(
      f"meteor(synonyms=True) needs NLTK's WordNet data, which is not installed. {_WORDNET_FIX}"
    )
  return EXACT_STEM_WORDNET if synonyms else EXACT_STEM


@functools.cache
def _stemmer():
  from nltk.stem.porter import PorterStemmer  # noqa: PLC0415

  return PorterStemmer()


@functools.lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
  return _stemmer().stem(word)


@functools.lru_cache(maxsize=1 << 16)
def _wordnet_synonyms(word: str) -> frozenset[str]:
  """Single-word lemma names of every synset of `word` (WordNet must be present)."""
  from nltk.corpus import wordnet  # noqa: PLC0415

  return frozenset(
    lemma.name() for synset in wordnet.synsets(word) for lemma in synset.lemmas() if "_" not in lemma.name()
  )


# A word's acceptable partners in the synonym stage (the word itself is added by the caller).
SynonymFn = Callable[[str], Iterable[str]]


def _match_stage(
  cand: list[tuple[int, str]],
  ref: list[tuple[int, str]],
  accepts: Callable[[str], Iterable[str]],
) -> tuple[list[tuple[int, int]], list[tuple[int, str]], list[tuple[int, str]]]:
  """One alignment stage.

  Args:
    cand: unmatched candidate words as (position in the candidate, form).
    ref: unmatched reference words as (position in the reference, form).
    accepts: form -> the reference forms a candidate word of that form may match.

  Returns:
    (matches as (candidate position, reference position), cand left, ref left).
    Candidate words go from last to first; each takes the highest still-free
    index into `ref` whose form it accepts.
  """
  free: dict[str, list[int]] = {}  # form -> free indices into `ref`, ascending
  for k, (_, form) in enumerate(ref):
    free.setdefault(form, []).append(k)
  matches, used_c, used_r = [], set(), set()
  for i in range(len(cand) - 1, -1, -1):
    best_form, best_k = None, -1
    for form in accepts(cand[i][1]):
      slots = free.get(form)
      if slots and slots[-1] > best_k:
        best_form, best_k = form, slots[-1]
    if best_form is None:
      continue
    free[best_form].pop()
    used_c.add(i)
    used_r.add(best_k)
    matches.append((cand[i][0], ref[best_k][0]))
  cand_left = [w for i, w in enumerate(cand) if i not in used_c]
  ref_left = [w for k, w in enumerate(ref) if k not in used_r]
  return matches, cand_left, ref_left


def _align(
  cand_words: list[str], ref_words: list[str], synonyms_of: SynonymFn | None
) -> list[tuple[int, int]]:
  """Exact, stem, then (if synonyms_of) synonym matches, sorted by candidate position."""
  cand = list(enumerate(cand_words))
  ref = list(enumerate(ref_words))
  same = lambda form: (form,)  # noqa: E731
  exact, cand, ref = _match_stage(cand, ref, same)
  cand = [(i, _stem(w)) for i, w in cand]
  ref = [(j, _stem(w)) for j, w in ref]
  stemmed, cand, ref = _match_stage(cand, ref, same)
  matches = exact + stemmed
  if synonyms_of is not None:
    syn, _, _ = _match_stage(cand, ref, lambda form: set(synonyms_of(form)) | {form})
    matches += syn
  return sorted(matches)


def _count_chunks(matches: list[tuple[int, int]]) -> int:
  """Fewest runs of matches adjacent in both sentences; `matches` sorted by candidate position."""
  return 1 + sum(1 for (c0, r0), (c1, r1) in zip(matches, matches[1:]) if not (c1 == c0 + 1 and r1 == r0 + 1))


def _single(cand_words: list[str], ref_words: list[str], synonyms_of: SynonymFn | None) -> float:
  matches = _align(cand_words, ref_words, synonyms_of) if cand_words and ref_words else []
  m = len(matches)
  if m == 0:
    return 0.0
  # Same operation order as NLTK, so the results agree to the last bit.
  precision = float(m) / len(cand_words)
  recall = float(m) / len(ref_words)
  fmean = (precision * recall) / (ALPHA * precision + (1 - ALPHA) * recall)
  frag = float(_count_chunks(matches)) / m
  return (1 - GAMMA * frag**BETA) * fmean


def _meteor_words(cand_words: list[str], refs_words: list[list[str]], synonyms_of: SynonymFn | None) -> float:
  """METEOR of tokenized, lower-cased words against several references (max)."""
  return max(_single(cand_words, ref, synonyms_of) for ref in refs_words)


def _tokens(text: str, what: str) -> list[str]:
  if not isinstance(text, str):
    raise TypeError(
      f"meteor: {what} must be a str, got {type(text).__name__}; decode token ids to text first."
    )
  return text.lower().split()


def _reference_list(references: str | Sequence[str], where: str) -> list[list[str]]:
  refs = [references] if isinstance(references, str) else list(references)
  if not refs:
    raise ValueError(f"meteor: {where} has no references; give at least one reference string per candidate.")
  return [_tokens(r, f"each reference of {where}") for r in refs]


def meteor(candidate: str, references: str | Sequence[str], *, synonyms: bool | None = None) -> float:
  """METEOR of one candidate against one or several references (their maximum).

  Args:
    candidate: the generated text.
    references: one reference string or a non-empty sequence of them.
    synonyms: WordNet synonym stage; True requires it, False skips it, None
      uses it when the data is on this machine (see `matching_mode`).

  Returns:
    The score in [0, 1]; 0.0 when nothing matches or a side is empty.

  Raises:
    LookupError: synonyms=True without WordNet data.
    ValueError: `references` is empty.
    TypeError: a text is not a str.
  """
  synonyms_of = _wordnet_synonyms if matching_mode(synonyms) == EXACT_STEM_WORDNET else None
  return _meteor_words(
    _tokens(candidate, "candidate"), _reference_list(references, "the candidate"), synonyms_of
  )


def meteor_batch(
  candidates: Sequence[str],
  references: Sequence[str | Sequence[str]],
  *,
  synonyms: bool | None = None,
) -> np.ndarray:
  """`meteor` of each candidate against its own references.

  Args:
    candidates: texts [candidates].
    references: [candidates], each one reference string or a non-empty
      sequence of them.
    synonyms: as in `meteor`; one mode for the whole batch.

  Returns:
    float64 scores [candidates].

  Raises:
    ValueError: the two sequences differ in length, or a candidate has no references.
  """
  if isinstance(candidates, str) or isinstance(references, str):
    raise TypeError("meteor_batch: pass lists of texts (one candidate, one reference entry each), not a str.")
  if len(candidates) != len(references):
    raise ValueError(
      f"meteor_batch: {len(candidates)} candidates but {len(references)} reference entries; "
      "give one entry (a string or a list of strings) per candidate."
    )
  synonyms_of = _wordnet_synonyms if matching_mode(synonyms) == EXACT_STEM_WORDNET else None
  out = np.zeros(len(candidates), np.float64)
  for n, (cand, refs) in enumerate(zip(candidates, references)):
    out[n] = _meteor_words(
      _tokens(cand, f"candidate {n}"), _reference_list(refs, f"candidate {n}"), synonyms_of
    )
  return out
