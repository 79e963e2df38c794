"""The embedded default federation: built offline, in seconds, from a seed.

It mirrors the ten client patterns of the paper (its federation table; the
reference uses 3 groups x 10 patterns = 30 clients, our default is one group of
10 clients) with small data that ships with the code: scikit-learn's real
digits, procedurally drawn images, and templated text. The tasks really share
(one expert group serves several tasks; text tasks share one vocabulary and
filler words; image tasks share shapes, colours and backgrounds) and really
interfere (classification and generation of the same images, several answer
styles decoded by one text head).

Patterns (client ``p`` of every group) and their mirror in the paper:

==  =========================================  ====================================
p   here                                       paper (FLAVA column)
==  =========================================  ====================================
0   ``digits_cls``: real 8x8 digits, upsampled  Tiny-ImageNet classification (200)
    to S with random scale/shift/contrast/noise
    (10 classes), first half of the digits
1   ``topic_cls`` 1/3: news-like sentences in   AG News classification (4), 1/3
    4 topics, with shared words and distractor
    clauses
2   ``topic_cls`` 1/3                           AG News, 1/3
3   ``shapes_gen`` 1/2: 1-3 shapes on noisy     Caltech-256 generation, 1/2
    gradient backgrounds, reconstructed
4   ``vqa_gen`` 1/2: 1-3 coloured shapes + a    VQAv2-small answer generation, 1/2
    templated question, one-word answer
5   ``vqa_gen`` 1/2                             VQAv2-small, 1/2
6   ``qa_gen``: multiple-choice questions from  MMLU law / medicine / moral
    small fact tables in 3 domains, answer      scenarios (3 domains)
    ``"<letter> : <word>"``
7   ``shapes_cls`` (6 shape kinds) +            CIFAR-100 classification (100) +
    ``topic_cls`` (last 1/3)                    AG News (last 1/3)
8   ``concept_gen`` 1/2 (CommonGen-like:        CommonGen 1/2 + Fashion-MNIST
    concepts -> templated sentence) +           generation
    ``digits_gen`` (the other half of digits)
9   ``concept_gen`` 1/2 + ``shapes_gen`` 1/2    CommonGen 1/2 + Caltech-256 1/2
==  =========================================  ====================================

Partitioning follows the reference: each task's pool is cut into ``num_groups``
equal contiguous shards (one per group), each shard into the parts its
holders take (:data:`tapjax.data.tasks.PATTERNS`), each part into train then
test. Procedural pools are drawn i.i.d. (text ones de-duplicated over the whole
pool), so contiguous cuts are as good as a shuffle; the digits are shuffled
first. When a digits part has fewer base images than requested, its examples
cycle over them with fresh augmentation (train and test never share a base
image).

Every (client, task) holding gets ``examples_per_task`` train and
``test_examples_per_task`` test examples; a client's examples are shuffled so
that its tasks interleave.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tapjax.data import tokenize
from tapjax.data.tasks import (
  DOMAINS,
  PATTERNS,
  TASKS,
  Federation,
  Holding,
  TaskKind,
  task_index,
)

__all__ = [
  "CIFAR100_MEAN",
  "CIFAR100_STD",
  "SHAPE_KINDS",
  "TOPICS",
  "make_embedded_federation",
  "normalize_images",
]

CIFAR100_MEAN = np.array([0.5071, 0.4865, 0.4409], np.float32)
CIFAR100_STD = np.array([0.2673, 0.2564, 0.2762], np.float32)


def normalize_images(images: np.ndarray) -> np.ndarray:
  """Maps ``[..., 3]`` images in [0, 1] to CIFAR-100-normalized float32."""
  return ((images - CIFAR100_MEAN) / CIFAR100_STD).astype(np.float32)


# ---------------------------------------------------------------------------
# A source's raw examples (before tokenization).


@dataclasses.dataclass
class _Raw:
  """``n`` raw examples of one task.

  Attributes:
    label: int ``[n]``.
    domain: int ``[n]``, indices into :data:`DOMAINS`.
    image: float ``[n, S, S, 3]`` in [0, 1], or None.
    text: ``n`` prompt strings, or None.
    target: ``n`` answer strings, or None.
  """

  label: np.ndarray
  domain: np.ndarray
  image: np.ndarray | None = None
  text: list[str] | None = None
  target: list[str] | None = None

  def __len__(self) -> int:
    return len(self.label)

  def slice(self, start: int, stop: int) -> _Raw:
    return _Raw(
      label=self.label[start:stop],
      domain=self.domain[start:stop],
      image=None if self.image is None else self.image[start:stop],
      text=None if self.text is None else self.text[start:stop],
      target=None if self.target is None else self.target[start:stop],
    )


def _domain_ids(names: Sequence[str]) -> np.ndarray:
  return np.array([DOMAINS.index(n) for n in names], np.int32)


def _unique_draws(
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


# ---------------------------------------------------------------------------
# Images: vectorized shape rendering.

SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "stripes")


def _shape_masks(kind: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, size: int) -> np.ndarray:
  """Boolean masks ``[n, S, S]`` of shapes ``kind[n]`` (indices into SHAPE_KINDS).

  Centres ``cx, cy`` and radii ``r`` are in pixels, all ``[n]``.
  """
  coords = np.arange(size, dtype=np.float32) + 0.5
  dx = coords[None, None, :] - cx[:, None, None]
  dy = coords[None, :, None] - cy[:, None, None]
  rr = r[:, None, None]
  ax, ay = np.abs(dx), np.abs(dy)
  d2 = dx * dx + dy * dy
  box = np.maximum(ax, ay)
  masks = np.stack(
    [
      d2 <= rr * rr,  # circle
      box <= 0.8 * rr,  # square
      (dy >= -rr) & (dy <= 0.75 * rr) & (ax <= (dy + rr) * 0.62),  # triangle
      ((ax <= 0.3 * rr) & (ay <= rr)) | ((ay <= 0.3 * rr) & (ax <= rr)),  # cross
      (d2 <= rr * rr) & (d2 >= (0.55 * rr) ** 2),  # ring
      (box <= 0.85 * rr) & (np.floor((dy + rr) / (0.34 * rr)) % 2 == 0),  # stripes
    ],
    axis=1,
  )  # [n, kinds, S, S]
  return np.take_along_axis(masks, kind[:, None, None, None], axis=1)[:, 0]


def _backgrounds(
  rng: np.random.Generator, base: np.ndarray, size: int, gradient: float, noise: np.ndarray
) -> np.ndarray:
  """Backgrounds ``[n, S, S, 3]``: colour ``base [n, 3]`` + a linear gradient + pixel noise ``[n]``."""
  n = len(base)
  angle = rng.uniform(0, 2 * np.pi, n)
  amp = rng.uniform(0, gradient, n)
  t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
  ramp = (
    np.cos(angle)[:, None, None] * t[None, None, :] + np.sin(angle)[:, None, None] * t[None, :, None]
  )  # [n, S, S]
  img = base[:, None, None, :] + (amp[:, None, None] * ramp)[..., None]
  img = img + rng.normal(0, 1, (n, size, size, 3)) * noise[:, None, None, None]
  return img


def _paint(img: np.ndarray, mask: np.ndarray, color: np.ndarray) -> np.ndarray:
  """Paints ``color [n, 3]`` onto ``img [n, S, S, 3]`` where ``mask [n, S, S]``."""
  return np.where(mask[..., None], color[:, None, None, :], img)


def _contrasting_colors(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Random shape colours and background colours ``[n, 3]`` that differ by >= 0.3 per channel."""
  color = rng.uniform(0, 1, (n, 3))
  background = (color + rng.uniform(0.3, 0.7, (n, 3))) % 1.0
  return color, 0.15 + 0.7 * background


def _shapes_gen(rng: np.random.Generator, n: int, size: int) -> _Raw:
  """1-3 random shapes on a noisy gradient background (reconstruction target = input)."""
  base = rng.uniform(0.2, 0.8, (n, 3))
  img = _backgrounds(rng, base, size, gradient=0.4, noise=rng.uniform(0.01, 0.05, n))
  count = rng.integers(1, 4, n)
  for k in range(3):
    r = rng.uniform(0.12, 0.3, n) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    kind = rng.integers(0, len(SHAPE_KINDS), n)
    mask = _shape_masks(kind, cx, cy, r, size) & (count > k)[:, None, None]
    img = _paint(img, mask, rng.uniform(0, 1, (n, 3)))
  return _Raw(
    label=np.zeros(n, np.int32), domain=_domain_ids(["general_object"] * n), image=np.clip(img, 0, 1)
  )


def _shapes_cls(rng: np.random.Generator, n: int, size: int) -> _Raw:
  """One shape of one of 6 kinds (the label), random colour/size/place, noisy background."""
  label = rng.integers(0, len(SHAPE_KINDS), n).astype(np.int32)
  color, base = _contrasting_colors(rng, n)
  img = _backgrounds(rng, base, size, gradient=0.3, noise=rng.uniform(0.02, 0.12, n))
  r = rng.uniform(0.2, 0.38, n) * size
  cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
  img = _paint(img, _shape_masks(label, cx, cy, r, size), color)
  return _Raw(label=label, domain=_domain_ids(["general_object"] * n), image=np.clip(img, 0, 1))


# ---------------------------------------------------------------------------
# VQA: images of 1-3 named shapes, templated questions, one-word answers.

_VQA_KINDS = ("circle", "square", "triangle", "cross")
_VQA_COLORS = {
  "red": (0.9, 0.1, 0.1),
  "green": (0.1, 0.75, 0.2),
  "blue": (0.15, 0.3, 0.95),
  "yellow": (0.95, 0.9, 0.1),
  "purple": (0.6, 0.2, 0.8),
  "orange": (1.0, 0.55, 0.05),
}
_NUMBERS = ("one", "two", "three")


def _vqa_gen(rng: np.random.Generator, n: int, size: int) -> _Raw:
  """Images of 1-3 coloured shapes in horizontal slots, a question and its answer."""
  color_names = tuple(_VQA_COLORS)
  palette = np.array([_VQA_COLORS[c] for c in color_names], np.float32)
  count = np.ones(n, np.int64)
  kinds = rng.integers(0, len(_VQA_KINDS), (n, 3))
  colors = rng.integers(0, len(color_names), (n, 3))
  slot = np.zeros((n, 3), np.int64)  # horizontal slot of each shape, of `count` slots
  side = rng.integers(0, 2, n)  # 0 left, 1 right
  qtype = rng.integers(0, 6, n)
  texts, answers = [], []
  for i in range(n):
    q = qtype[i]
    if q == 0:  # count
      count[i] = rng.integers(1, 4)
      slot[i] = (side[i], 1, 2) if count[i] == 1 else (0, 1, 2)
      question, answer = "how many shapes are there ?", _NUMBERS[count[i] - 1]
    elif q in (1, 2, 3):  # one shape, placed left or right
      slot[i, 0] = side[i]
      count[i] = 1
      if q == 1:
        question, answer = "what color is the shape ?", color_names[colors[i, 0]]
      elif q == 2:
        question, answer = "what shape is in the image ?", _VQA_KINDS[kinds[i, 0]]
      else:
        question, answer = "is the shape on the left or right ?", ("left", "right")[side[i]]
    else:  # two shapes, left and right; they differ in the attribute asked
      count[i] = 2
      slot[i, :2] = (0, 1)
      where = ("left", "right")[side[i]]
      attr = colors if q == 4 else kinds
      options = len(color_names) if q == 4 else len(_VQA_KINDS)
      attr[i, 1] = (attr[i, 0] + rng.integers(1, options)) % options
      if q == 4:
        question, answer = f"what color is the shape on the {where} ?", color_names[colors[i, side[i]]]
      else:
        question, answer = f"what shape is on the {where} ?", _VQA_KINDS[kinds[i, side[i]]]
    texts.append(f"answer the question based on the image : {question}")
    answers.append(answer)
  # Layout: one shape -> left or right third; k shapes -> k equal columns.
  gray = rng.uniform(0.35, 0.6, n)
  base = gray[:, None] + rng.uniform(-0.04, 0.04, (n, 3))
  img = _backgrounds(rng, base, size, gradient=0.15, noise=np.full(n, 0.03))
  columns = np.where(count == 1, 2, count).astype(np.float32)  # one shape: 2 columns (left/right)
  width = size / columns
  for k in range(3):
    r = rng.uniform(0.28, 0.4, n) * np.minimum(width, 0.6 * size)
    cx = (slot[:, k] + rng.uniform(0.4, 0.6, n)) * width
    cy = rng.uniform(r, size - r)
    mask = _shape_masks(kinds[:, k], cx, cy, r, size) & (count > k)[:, None, None]
    color = palette[colors[:, k]] + rng.uniform(-0.05, 0.05, (n, 3))
    img = _paint(img, mask, color)
  return _Raw(
    label=np.zeros(n, np.int32),
    domain=_domain_ids(["visual_answering"] * n),
    image=np.clip(img, 0, 1),
    text=texts,
    target=answers,
  )


# ---------------------------------------------------------------------------
# Digits (real): scikit-learn's 1797 8x8 handwritten digits.


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  """``(images [1797, 8, 8] in [0, 1], labels [1797])`` from scikit-learn (no download)."""
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("the embedded federation needs scikit-learn: pip install 'tapjax[model]'.") from e
  d = load_digits()
  return (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)


def _bilinear_weights(start: np.ndarray, scale: np.ndarray, size: int, src: int) -> np.ndarray:
  """Bilinear weights ``[n, size, src]``: a ``src``-pixel axis placed at ``start [n]``, scaled
  by ``scale [n]`` (zero outside the source)."""
  out = np.arange(size, dtype=np.float32) + 0.5
  u = (out[None, :] - start[:, None]) / scale[:, None] - 0.5  # source coordinate [n, size]
  return np.maximum(0.0, 1.0 - np.abs(u[:, :, None] - np.arange(src, dtype=np.float32)[None, None, :]))


def _augment_digits(rng: np.random.Generator, base: np.ndarray, size: int) -> np.ndarray:
  """Digits ``[n, 8, 8]`` -> ``[n, S, S, 3]`` with random scale, shift, contrast and noise."""
  n, h, w = base.shape
  extent = rng.uniform(0.6, 0.85, n) * size  # digit side in pixels
  scale = extent / h
  slack = size - extent
  top = slack / 2 + rng.uniform(-0.4, 0.4, n) * slack
  left = slack / 2 + rng.uniform(-0.4, 0.4, n) * slack
  wy = _bilinear_weights(top, scale, size, h)  # [n, S, 8]
  wx = _bilinear_weights(left, scale, size, w)  # [n, S, 8]
  img = np.einsum("nih,nhw,njw->nij", wy, base, wx)
  floor = rng.uniform(0.0, 0.15, n)[:, None, None]
  contrast = rng.uniform(0.75, 1.0, n)[:, None, None]
  img = floor + (1 - floor) * contrast * img + rng.normal(0, 0.04, img.shape)
  return np.repeat(np.clip(img, 0, 1)[..., None], 3, axis=-1)


def _digits_parts(
  rng: np.random.Generator, num_groups: int, parts: int, total: int
) -> list[list[np.ndarray]]:
  """Shuffled digit indices cut into ``[group][part]`` contiguous blocks."""
  perm = rng.permutation(total)
  shards = np.array_split(perm, num_groups)
  return [np.array_split(s, parts) for s in shards]


def _cycle(ids: np.ndarray, n: int, what: str) -> np.ndarray:
  if len(ids) == 0:
    raise ValueError(f"{what}: no base digit images left for this part; lower num_groups.")
  return ids[np.arange(n) % len(ids)]


# ---------------------------------------------------------------------------
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


def _topic_cls(rng: np.random.Generator, n: int, size: int) -> _Raw:
  del size
  rows = _unique_draws(_topic_sentence, n, rng, "topic_cls")
  return _Raw(
    label=np.array([r[1] for r in rows], np.int32),
    domain=_domain_ids(["news"] * n),
    text=[r[0] for r in rows],
  )


# ---------------------------------------------------------------------------
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


def _qa_gen(rng: np.random.Generator, n: int, size: int) -> _Raw:
  del size
  rows = _unique_draws(_qa_question, n, rng, "qa_gen")
  return _Raw(
    label=np.zeros(n, np.int32),
    domain=_domain_ids([r[2] for r in rows]),
    text=[r[0] for r in rows],
    target=[r[1] for r in rows],
  )


# ---------------------------------------------------------------------------
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


def _concept_gen(rng: np.random.Generator, n: int, size: int) -> _Raw:
  del size
  rows = _unique_draws(_concept_example, n, rng, "concept_gen")
  return _Raw(
    label=np.zeros(n, np.int32),
    domain=_domain_ids(["common_sense_answering"] * n),
    text=[r[1] for r in rows],
    target=[r[2] for r in rows],
  )


# Procedural sources, by task name: (rng, n, image_size) -> _Raw.
_PROCEDURAL: dict[str, Callable[[np.random.Generator, int, int], _Raw]] = {
  "topic_cls": _topic_cls,
  "shapes_gen": _shapes_gen,
  "vqa_gen": _vqa_gen,
  "qa_gen": _qa_gen,
  "shapes_cls": _shapes_cls,
  "concept_gen": _concept_gen,
}
_DIGIT_TASKS = ("digits_cls", "digits_gen")


# ---------------------------------------------------------------------------
# Assembly.


def _holding_raws(
  rngs: dict[str, np.random.Generator],
  num_groups: int,
  n_train: int,
  n_test: int,
  image_size: int,
) -> dict[tuple[int, int, str], tuple[_Raw, _Raw]]:
  """``(group, pattern, task) -> (train, test)`` raw examples of every holding."""
  holders: dict[str, list[tuple[int, Holding]]] = {}
  for p, pattern in enumerate(PATTERNS):
    for h in pattern:
      holders.setdefault(h.task, []).append((p, h))
  per_part = n_train + n_test
  out: dict[tuple[int, int, str], tuple[_Raw, _Raw]] = {}
  for name, held in holders.items():
    parts = held[0][1].parts
    if sorted(h.part for _, h in held) != list(range(parts)) and name not in _DIGIT_TASKS:
      raise ValueError(f"PATTERNS: the holdings of {name!r} must take parts 0..{parts - 1} once each")
    if name in _PROCEDURAL:
      pool = _PROCEDURAL[name](rngs[name], num_groups * parts * per_part, image_size)
      for g in range(num_groups):
        for p, h in held:
          start = (g * parts + h.part) * per_part
          out[g, p, name] = (
            pool.slice(start, start + n_train),
            pool.slice(start + n_train, start + per_part),
          )
  # The digits: one shuffled pool split between digits_cls and digits_gen.
  images, labels = _load_digits()
  digit_holdings = [h for name in _DIGIT_TASKS for _, h in holders.get(name, [])]
  digit_parts = {h.parts for h in digit_holdings}
  if len(digit_parts) != 1 or len({h.part for h in digit_holdings}) != len(digit_holdings):
    raise ValueError("PATTERNS: the digits tasks must split one source into distinct parts")
  blocks = _digits_parts(rngs["digits_split"], num_groups, digit_parts.pop(), len(labels))
  for name in _DIGIT_TASKS:
    for p, h in holders.get(name, []):
      for g in range(num_groups):
        block = blocks[g][h.part]
        cut = int(round(len(block) * n_train / per_part))
        split = []
        for ids, n in ((block[:cut], n_train), (block[cut:], n_test)):
          ids = _cycle(ids, n, name)
          split.append(
            _Raw(
              label=labels[ids] if name == "digits_cls" else np.zeros(n, np.int32),
              domain=_domain_ids(["handwritten"] * n),
              image=_augment_digits(rngs[name], images[ids], image_size),
            )
          )
        out[g, p, name] = (split[0], split[1])
  return out


def _fields(
  raws: list[tuple[int, _Raw]], tokenizer: Any, image_size: int, text_len: int, target_len: int
) -> list[dict[str, np.ndarray]]:
  """Converts ``(task index, raw)`` pairs into example-field arrays, tokenizing all text at once."""
  prompts = [s for _, r in raws if r.text is not None for s in r.text]
  answers = [s for _, r in raws if r.target is not None for s in r.target]
  text_ids, text_mask = tokenize.encode(tokenizer, prompts, text_len)
  target_ids, target_mask = tokenize.encode_targets(tokenizer, answers, target_len)
  out, ti, ai = [], 0, 0
  for t, r in raws:
    n, spec = len(r), TASKS[t]
    f = {
      "image": np.zeros((n, image_size, image_size, 3), np.float32),
      "text": np.zeros((n, text_len), np.int32),
      "text_mask": np.zeros((n, text_len), np.int32),
      "target": np.zeros((n, target_len), np.int32),
      "target_mask": np.zeros((n, target_len), np.int32),
      "label": r.label.astype(np.int32),
      "task": np.full(n, t, np.int32),
      "domain": r.domain.astype(np.int32),
      "has_image": np.full(n, "image" in spec.modalities),
      "has_text": np.full(n, "text" in spec.modalities),
    }
    if r.image is not None:
      f["image"] = normalize_images(r.image)
    if r.text is not None:
      f["text"], f["text_mask"] = text_ids[ti : ti + n], text_mask[ti : ti + n]
      ti += n
    if r.target is not None:
      f["target"], f["target_mask"] = target_ids[ai : ai + n], target_mask[ai : ai + n]
      ai += n
    out.append(f)
  return out


def _stack_clients(per_client: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Pads each client's ``[n_c, ...]`` fields to ``[clients, max n_c, ...]`` with zeros."""
  counts = np.array([len(f["task"]) for f in per_client], np.int32)
  width = int(counts.max())
  stacked = {}
  for key in per_client[0]:
    first = per_client[0][key]
    arr = np.zeros((len(per_client), width) + first.shape[1:], first.dtype)
    for c, f in enumerate(per_client):
      arr[c, : counts[c]] = f[key]
    stacked[key] = arr
  return stacked, counts


def make_embedded_federation(
  seed: int = 0,
  num_groups: int = 1,
  examples_per_task: int = 96,
  test_examples_per_task: int = 32,
  image_size: int = 32,
  text_len: int = 24,
  target_len: int = 8,
  tokenizer: Any | str | os.PathLike[str] | None = None,
) -> Federation:
  """Builds the embedded federation: ``10 * num_groups`` clients, no download.

  Client ``10 * g + p`` follows pattern ``p`` (module docstring) on group
  ``g``'s shard of every dataset. Same arguments -> identical arrays.

  Args:
    seed: the only source of randomness.
    num_groups: groups of 10 clients, each on its own disjoint data shard.
    examples_per_task: train examples per (client, task).
    test_examples_per_task: test examples per (client, task).
    image_size: ``S``, images are ``[S, S, 3]`` (>= 8).
    text_len: ``Lt``, token slots of the input text (>= 2; 24 fits every
    default prompt untruncated).
    target_len: ``La``, token slots of the answers (>= 2; 8 fits every answer).
    tokenizer: a BERT tokenizer, the path of a local tokenizer folder, or None
    for :func:`tapjax.data.tokenize.load_tokenizer`'s default.

  Returns:
    A :class:`Federation`; with the defaults ``train`` arrays are
    ``[10, 192, ...]`` (1-task clients hold 96 rows, 2-task clients 192),
    ``test`` arrays ``[10, 64, ...]``.

  Raises:
    ValueError: on sizes out of range, or when a template space cannot supply
    enough distinct examples.
  """
  for name, value, low in (
    ("num_groups", num_groups, 1),
    ("examples_per_task", examples_per_task, 1),
    ("test_examples_per_task", test_examples_per_task, 1),
    ("image_size", image_size, 8),
    ("text_len", text_len, 2),
    ("target_len", target_len, 2),
  ):
    if int(value) != value or value < low:
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = tokenize.load_tokenizer(tokenizer)

  # Independent streams: one per task, one for the digits split, one for client shuffles.
  streams = ["digits_split", "clients"] + [t.name for t in TASKS]
  seeds = np.random.SeedSequence(seed).spawn(len(streams))
  rngs = {k: np.random.default_rng(s) for k, s in zip(streams, seeds)}

  raws = _holding_raws(rngs, num_groups, examples_per_task, test_examples_per_task, image_size)
  clients = [(g, p) for g in range(num_groups) for p in range(len(PATTERNS))]
  items = []  # (task index, raw) for every (client, holding, split)
  for g, p in clients:
    for h in PATTERNS[p]:
      train, test = raws[g, p, h.task]
      items += [(task_index(h.task), train), (task_index(h.task), test)]
  fields = _fields(items, tokenizer, image_size, text_len, target_len)

  splits: dict[str, list[dict[str, np.ndarray]]] = {"train": [], "test": []}
  k = 0
  for g, p in clients:
    for split in ("train", "test"):
      parts = [fields[k + 2 * j + (split == "test")] for j in range(len(PATTERNS[p]))]
      merged = {key: np.concatenate([f[key] for f in parts]) for key in parts[0]}
      order = rngs["clients"].permutation(len(merged["task"]))
      splits[split].append({key: v[order] for key, v in merged.items()})
    k += 2 * len(PATTERNS[p])
  train, n_train = _stack_clients(splits["train"])
  test, n_test = _stack_clients(splits["test"])

  client_tasks = np.zeros((len(clients), len(TASKS)), bool)
  for c, (_, p) in enumerate(clients):
    for h in PATTERNS[p]:
      client_tasks[c, task_index(h.task)] = True

  gen = np.array([t.kind == TaskKind.TEXT_GENERATION for t in TASKS])
  answer_ids = [s["target"][gen[s["task"]]].ravel() for split in splits.values() for s in split]
  answer_vocab = np.unique(
    np.concatenate(answer_ids + [np.array([tokenizer.pad_token_id, tokenizer.sep_token_id])])
  ).astype(np.int32)

  return Federation(
    tasks=TASKS,
    domains=DOMAINS,
    client_names=tuple(f"g{g}p{p}" for g, p in clients),
    client_tasks=client_tasks,
    train=train,
    test=test,
    n_train=n_train,
    n_test=n_test,
    answer_vocab=answer_vocab,
    image_size=image_size,
    text_len=text_len,
    target_len=target_len,
    client_group=np.array([g for g, _ in clients], np.int32),
    client_pattern=np.array([p for _, p in clients], np.int32),
  )
