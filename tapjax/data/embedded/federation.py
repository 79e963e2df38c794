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
``test_examples_per_task`` test examples. The sources
(:mod:`~tapjax.data.embedded.shapes`, :mod:`~tapjax.data.embedded.text`,
:mod:`~tapjax.data.embedded.digits`) yield :class:`~tapjax.data.records.Records`;
:func:`tapjax.data.assemble.assemble` tokenizes, normalizes, shuffles each
client's examples (so that its tasks interleave) and stacks them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tapjax.data import tokenize
from tapjax.data.assemble import ClientData, Shard, assemble
from tapjax.data.embedded import digits, shapes, text
from tapjax.data.records import Records
from tapjax.data.tasks import DOMAINS, PATTERNS, TASKS, Federation, Holding, TaskSpec

__all__ = ["make_embedded_federation"]

# (pattern, holding) pairs of some tasks, pattern order.
Held = Sequence[tuple[int, Holding]]
# (group, pattern, task) -> (train, test) of every holding.
Shards = dict[tuple[int, int, str], tuple[Records, Records]]


@dataclasses.dataclass(frozen=True)
class _Pool:
  """A procedural source: one task, i.i.d. examples drawn fresh for each build.

  The pool (``num_groups * parts * (train + test)`` examples, from the task's
  own stream) is cut contiguously: group, then part, then train / test.
  """

  draw: Callable[[np.random.Generator, int, int], Records]  # (rng, n, image_size) -> Records

  def shards(
    self,
    held: Held,
    rngs: Mapping[str, np.random.Generator],
    num_groups: int,
    n_train: int,
    n_test: int,
    size: int,
  ) -> Shards:
    task = held[0][1].task
    parts = held[0][1].parts
    if {h.task for _, h in held} != {task} or sorted(h.part for _, h in held) != list(range(parts)):
      raise ValueError(f"PATTERNS: the holdings of {task!r} must take parts 0..{parts - 1} once each")
    per_part = n_train + n_test
    pool = self.draw(rngs[task], num_groups * parts * per_part, size)
    out = {}
    for g in range(num_groups):
      for p, h in held:
        start = (g * parts + h.part) * per_part
        out[g, p, task] = (pool.slice(start, start + n_train), pool.slice(start + n_train, start + per_part))
    return out


@dataclasses.dataclass(frozen=True)
class _Digits:
  """scikit-learn's digits, one finite pool split between the tasks that use it.

  The base digits are shuffled (stream ``split_stream``) and cut into
  ``[group][part]`` blocks; a holding's block is cut into train and test in
  the ratio of the requested counts, and each side cycles over its base
  images (with fresh augmentation from the task's stream) to the requested
  count. A task with classes keeps the digit labels.
  """

  split_stream: str

  def shards(
    self,
    held: Held,
    rngs: Mapping[str, np.random.Generator],
    num_groups: int,
    n_train: int,
    n_test: int,
    size: int,
  ) -> Shards:
    parts = {h.parts for _, h in held}
    if len(parts) != 1 or len({h.part for _, h in held}) != len(held):
      raise ValueError("PATTERNS: the digits tasks must split one source into distinct parts")
    images, labels = digits.load()
    blocks = digits.partition(rngs[self.split_stream], num_groups, parts.pop(), len(labels))
    per_part = n_train + n_test
    out = {}
    for p, h in held:
      keep_label = _SPEC[h.task].num_classes > 0
      for g in range(num_groups):
        block = blocks[g][h.part]
        cut = int(round(len(block) * n_train / per_part))
        split = []
        for ids, n in ((block[:cut], n_train), (block[cut:], n_test)):
          ids = digits.cycle(ids, n, h.task)
          split.append(digits.records(rngs[h.task], images[ids], labels[ids] if keep_label else None, size))
        out[g, p, h.task] = (split[0], split[1])
    return out


_SPEC: Mapping[str, TaskSpec] = {t.name: t for t in TASKS}
_DIGITS = _Digits(split_stream="digits_split")
# Task name -> its source; tasks that share a source object split it.
_SOURCES: Mapping[str, _Pool | _Digits] = {
  "digits_cls": _DIGITS,
  "topic_cls": _Pool(text.topic_cls),
  "shapes_gen": _Pool(shapes.shapes_gen),
  "vqa_gen": _Pool(shapes.vqa_gen),
  "qa_gen": _Pool(text.qa_gen),
  "shapes_cls": _Pool(shapes.shapes_cls),
  "concept_gen": _Pool(text.concept_gen),
  "digits_gen": _DIGITS,
}
# Independent random streams, in this order: one for the digits split, one for
# the client shuffles, one per task.
_STREAMS: tuple[str, ...] = (_DIGITS.split_stream, "clients") + tuple(t.name for t in TASKS)


def _holding_shards(
  rngs: Mapping[str, np.random.Generator], num_groups: int, n_train: int, n_test: int, size: int
) -> Shards:
  """``(group, pattern, task) -> (train, test)`` Records of every holding."""
  by_source: dict[int, list[tuple[int, Holding]]] = {}
  for p, pattern in enumerate(PATTERNS):
    for h in pattern:
      by_source.setdefault(id(_SOURCES[h.task]), []).append((p, h))
  out: Shards = {}
  for held in by_source.values():
    out.update(_SOURCES[held[0][1].task].shards(held, rngs, num_groups, n_train, n_test, size))
  return out


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
  if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = tokenize.load_tokenizer(tokenizer)

  seeds = np.random.SeedSequence(seed).spawn(len(_STREAMS))
  rngs = {k: np.random.default_rng(s) for k, s in zip(_STREAMS, seeds)}
  shards = _holding_shards(rngs, num_groups, examples_per_task, test_examples_per_task, image_size)
  clients = [
    ClientData(
      name=f"g{g}p{p}",
      group=g,
      pattern=p,
      shards=tuple(Shard(h.task, *shards[g, p, h.task]) for h in PATTERNS[p]),
    )
    for g in range(num_groups)
    for p in range(len(PATTERNS))
  ]
  return assemble(
    TASKS,
    DOMAINS,
    clients,
    tokenizer=tokenizer,
    image_size=image_size,
    text_len=text_len,
    target_len=target_len,
    rng=rngs["clients"],
  )
