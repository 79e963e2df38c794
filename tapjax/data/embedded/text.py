"""Procedural text of the embedded federation: news topics, multiple-choice QA, concept-to-sentence.

Each source is ``(rng, n, image_size) -> Records`` of one task (``image_size``
unused), drawn from ``rng`` with no two examples alike (:func:`unique_draws`),
so contiguous slices of a pool are disjoint and as good as a shuffle.

* :func:`topic_cls`: news-like sentences in 4 :data:`TOPICS`, with shared
  words and distractor clauses (mirrors AG News).
* :func:`qa_gen`: multiple-choice questions from small fact tables in 3
  domains, answer ``"<letter> : <word>"`` (mirrors MMLU law / medicine /
  moral scenarios).
* :func:`concept_gen`: 3-4 concepts -> a templated sentence using them
  (mirrors CommonGen).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tapjax.data.records import Records

__all__ = ["TOPICS", "concept_gen", "qa_gen", "topic_cls", "unique_draws"]


def unique_draws(
  draw: Callable[[np.random.Generator], tuple[Any, ...]], n: int, rng: np.random.Generator, what: str
) -> list[tuple[Any, ...]]:
  """Draws ``n`` examples whose first element (a hashable key) is unique.

  Raises:
    ValueError: the template space cannot supply ``n`` distinct examples.
  """
  seen: set[Any] = set()
  out: list[tuple[Any, ...]] = []
  for _ in range(40 * n + 1000):
    if len(out) == n:
      break
    ex = draw(rng)
    if ex[0] not in seen:
      seen.add(ex[0])
      out.append(ex)
  if len(out) < n:
    raise ValueError(
      f"{what}: could draw only {len(out)} distinct examples of the {n} requested; "
      "lower examples_per_task / test_examples_per_task / num_groups."
    )
  return out


# Text classification: news-like sentences in 4 topics.

TOPICS: tuple[str, ...] = ("world", "sports", "business", "science")

_GENERIC = {
  "actor": (
    "officials",
    "the leader",
    "the group",
    "a spokesman",
    "the team",
    "analysts",
    "the committee",
    "critics",
  ),
  "action": (
    "announced",
    "reported",
    "welcomed",
    "criticized",
    "expected",
    "confirmed",
    "delayed",
    "praised",
  ),
  "object": (
    "a new plan",
    "the deal",
    "a record",
    "the report",
    "new talks",
    "the results",
    "a major change",
    "the decision",
  ),
  "context": (
    "on monday",
    "this week",
    "late on friday",
    "in a statement",
    "after long delays",
    "despite concerns",
    "officials said",
    "on tuesday",
  ),
}
_TOPIC_WORDS = {
  "world": {
    "actor": (
      "the prime minister",
      "rebels",
      "the united nations",
      "diplomats",
      "the president",
      "protesters",
      "troops",
    ),
    "action": (
      "condemned",
      "negotiated",
      "invaded",
      "voted on",
      "sanctioned",
      "signed",
      "rejected",
    ),
    "object": (
      "a ceasefire",
      "the border",
      "the election",
      "a peace treaty",
      "refugees",
      "the embassy",
      "the parliament",
    ),
    "context": (
      "in the capital",
      "near the border",
      "amid unrest",
      "at the summit",
      "after the vote",
    ),
  },
  "sports": {
    "actor": (
      "the striker",
      "the coach",
      "the champions",
      "the goalkeeper",
      "the captain",
      "fans",
      "the referee",
    ),
    "action": ("scored", "defeated", "won", "coached", "celebrated", "qualified for", "missed"),
    "object": (
      "the final",
      "the league title",
      "a penalty",
      "the tournament",
      "the match",
      "the cup",
      "the season",
    ),
    "context": (
      "at the stadium",
      "in overtime",
      "before kickoff",
      "on home soil",
      "in the second half",
    ),
  },
  "business": {
    "actor": (
      "the bank",
      "investors",
      "the retailer",
      "shareholders",
      "the ceo",
      "the airline",
      "the company",
    ),
    "action": ("acquired", "invested in", "cut", "raised", "sold", "merged with", "priced"),
    "object": (
      "profits",
      "shares",
      "prices",
      "the stock",
      "quarterly earnings",
      "a rival firm",
      "the budget",
    ),
    "context": (
      "on wall street",
      "as markets fell",
      "amid inflation",
      "in early trading",
      "after the merger",
    ),
  },
  "science": {
    "actor": (
      "researchers",
      "scientists",
      "astronomers",
      "nasa",
      "engineers",
      "the lab",
      "biologists",
    ),
    "action": ("discovered", "launched", "tested", "measured", "developed", "observed", "studied"),
    "object": (
      "a new species",
      "the telescope",
      "a vaccine",
      "the satellite",
      "a distant planet",
      "the software",
      "the genome",
    ),
    "context": (
      "in the lab",
      "in orbit",
      "in a new study",
      "under the microscope",
      "in the journal",
    ),
  },
}
_P_TOPIC_WORD = 0.6  # each slot uses the topic's own words with this probability, else generic ones
_P_DISTRACTOR = 0.5  # probability of a trailing clause from another topic


def _topic_sentence(rng: np.random.Generator) -> tuple[str, int]:
  label = int(rng.integers(len(TOPICS)))
  own = _TOPIC_WORDS[TOPICS[label]]

  def pick(slot: str, table: dict[str, tuple[str, ...]]) -> str:
    pool = table[slot] if rng.random() < _P_TOPIC_WORD else _GENERIC[slot]
    return pool[rng.integers(len(pool))]

  actor, action, obj, context = (pick(s, own) for s in ("actor", "action", "object", "context"))
  if rng.random() < 0.5:
    words = [actor, action, obj, context]
  else:
    words = [context, ",", actor, action, obj]
  if rng.random() < _P_DISTRACTOR:
    other = _TOPIC_WORDS[TOPICS[(label + rng.integers(1, len(TOPICS))) % len(TOPICS)]]
    a, v = other["actor"], other["action"]
    words += [", while", a[rng.integers(len(a))], v[rng.integers(len(v))]]
  return " ".join(words), label


def topic_cls(rng: np.random.Generator, n: int, size: int) -> Records:
  """``n`` distinct news-like sentences, labelled with their topic (index into :data:`TOPICS`)."""
  del size
  rows = unique_draws(_topic_sentence, n, rng, "topic_cls")
  return Records(
    label=np.array([r[1] for r in rows], np.int32), domain=np.full(n, "news"), prompt=[r[0] for r in rows]
  )


# Multiple-choice QA in 3 domains (MMLU-like) from small fact tables.

_LAW = (
  ("who decides the verdict at a trial", "jury"),
  ("what document passes property at death", "will"),
  ("what agreement rents a home", "lease"),
  ("what protects an invention", "patent"),
  ("what protects a brand name", "trademark"),
  ("who presides over a court", "judge"),
  ("what order lets police search a home", "warrant"),
  ("what is a promise enforced by law", "contract"),
  ("who represents a client in court", "lawyer"),
  ("what money buys release before trial", "bail"),
  ("who brings a civil lawsuit", "plaintiff"),
  ("who is accused in a criminal case", "defendant"),
)
_MEDICINE = (
  ("what organ pumps blood", "heart"),
  ("what organ filters blood into urine", "kidney"),
  ("what organ makes bile", "liver"),
  ("what hormone lowers blood sugar", "insulin"),
  ("what bone protects the brain", "skull"),
  ("what organs take in oxygen", "lungs"),
  ("what disease comes with high blood sugar", "diabetes"),
  ("what vessel brings blood to the heart", "vein"),
  ("what vessel carries blood from the heart", "artery"),
  ("what shot trains the immune system", "vaccine"),
  ("what organ digests food with acid", "stomach"),
  ("what tissue connects muscle to bone", "tendon"),
)
# Moral facts: (situation, answer, polarity); distractors take the other polarity.
_MORAL = (
  ("returning a lost wallet is", "honest", 1),
  ("sharing lunch with a hungry friend is", "generous", 1),
  ("saving a drowning child is", "brave", 1),
  ("thanking the bus driver is", "polite", 1),
  ("helping a neighbor move is", "kind", 1),
  ("splitting the prize equally is", "fair", 1),
  ("standing by a friend in trouble is", "loyal", 1),
  ("mocking a sick person is", "cruel", 0),
  ("cutting in line is", "rude", 0),
  ("keeping all the cake for yourself is", "selfish", 0),
  ("taking more than your share is", "greedy", 0),
  ("blaming others for your mistake is", "unfair", 0),
  ("skipping your chores every day is", "lazy", 0),
)
_QA_DOMAINS = (
  ("law", "law_answering"),
  ("medicine", "medicine_answering"),
  ("morality", "moral_answering"),
)
_LETTERS = ("a", "b", "c", "d")


def _qa_question(rng: np.random.Generator) -> tuple[Any, ...]:
  d = int(rng.integers(len(_QA_DOMAINS)))
  subject, domain = _QA_DOMAINS[d]
  if d < 2:
    table = _LAW if d == 0 else _MEDICINE
    question, answer = table[rng.integers(len(table))]
    wrong = [a for _, a in table if a != answer]
  else:
    question, answer, polarity = _MORAL[rng.integers(len(_MORAL))]
    wrong = [a for _, a, p in _MORAL if p != polarity]
  options = [answer] + [wrong[i] for i in rng.choice(len(wrong), 3, replace=False)]
  order = rng.permutation(4)
  options = [options[i] for i in order]
  letter = _LETTERS[int(np.argmax(order == 0))]
  listed = " ".join(f"{l} {o}" for l, o in zip(_LETTERS, options))
  prompt = f"{subject} : {question} ? {listed}"
  return prompt, f"{letter} : {answer}", domain


def qa_gen(rng: np.random.Generator, n: int, size: int) -> Records:
  """``n`` distinct multiple-choice questions over the law, medicine and moral fact tables."""
  del size
  rows = unique_draws(_qa_question, n, rng, "qa_gen")
  return Records(
    label=np.zeros(n, np.int32),
    domain=[r[2] for r in rows],
    prompt=[r[0] for r in rows],
    answer=[r[1] for r in rows],
  )


# CommonGen-like: 3-4 concepts -> a templated sentence using them.

_SUBJECTS = ("man", "woman", "boy", "girl", "child", "teacher", "farmer", "student", "dog", "cat")
_ADJECTIVES = ("old", "young", "tall", "happy", "tired", "small", "busy", "quiet")
# verb lemma -> (third person singular, objects)
_VERBS = {
  "throw": ("throws", ("ball", "stone", "stick")),
  "read": ("reads", ("book", "letter", "paper")),
  "eat": ("eats", ("apple", "bread", "cake")),
  "ride": ("rides", ("bike", "horse", "bus")),
  "play": ("plays", ("guitar", "piano", "game")),
  "carry": ("carries", ("bag", "box", "chair")),
  "paint": ("paints", ("fence", "wall", "door")),
  "kick": ("kicks", ("ball", "can", "door")),
  "clean": ("cleans", ("car", "table", "window")),
  "open": ("opens", ("door", "window", "box")),
}


def _concept_example(rng: np.random.Generator) -> tuple[Any, ...]:
  subject = _SUBJECTS[rng.integers(len(_SUBJECTS))]
  lemma = tuple(_VERBS)[rng.integers(len(_VERBS))]
  verb, objects = _VERBS[lemma]
  obj = objects[rng.integers(len(objects))]
  concepts = [subject, lemma, obj]
  if rng.random() < 0.5:
    adjective = _ADJECTIVES[rng.integers(len(_ADJECTIVES))]
    concepts.append(adjective)
    target = f"the {adjective} {subject} {verb} the {obj}"
  else:
    target = f"the {subject} {verb} the {obj}"
  key = frozenset(concepts)
  shuffled = [concepts[i] for i in rng.permutation(len(concepts))]
  prompt = "generate a sentence from the concepts : " + " ".join(shuffled)
  return key, prompt, target


def concept_gen(rng: np.random.Generator, n: int, size: int) -> Records:
  """``n`` distinct concept sets, each with the templated sentence that uses them."""
  del size
  rows = unique_draws(_concept_example, n, rng, "concept_gen")
  return Records(
    label=np.zeros(n, np.int32),
    domain=np.full(n, "common_sense_answering"),
    prompt=[r[1] for r in rows],
    answer=[r[2] for r in rows],
  )
