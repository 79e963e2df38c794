"""Federation assembly: per-client :class:`Records` -> a dense :class:`Federation`.

Every source (the embedded procedural data, the paper's TFDS datasets) hands
the assembly the same thing: a task table, a domain table and, per client,
its :class:`Shard` s (one task's train and test :class:`Records`). The
assembly then

* checks every shard against its :class:`TaskSpec` (fields present as the
  task's modalities and kind ask, labels in range, domains the task knows,
  images ``[n, S, S, 3]``);
* tokenizes all prompts in one call of :func:`tapjax.data.tokenize.encode`
  and all answers in one call of :func:`~tapjax.data.tokenize.encode_targets`
  (each distinct string once);
* normalizes images with the CIFAR-100 mean / std (uint8 is divided by 255
  first; float images are taken as [0, 1]); nothing is resized;
* shuffles each client's examples (train, then test, client by client) with
  the given generator, so that its tasks interleave;
* pads clients with zero rows to the longest one and stacks them.

A client's ``has_image`` / ``has_text`` come from its records (an example has
an image when its shard's Records carry one), so one task may mix
image+text and text-only examples (the paper's shared text-generation head).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tapjax.data import tokenize
from tapjax.data.records import Records
from tapjax.data.tasks import EXAMPLE_FIELDS, Federation, TaskKind, TaskSpec

__all__ = [
  "CIFAR100_MEAN",
  "CIFAR100_STD",
  "ClientData",
  "Shard",
  "assemble",
  "normalize_images",
]

CIFAR100_MEAN = np.array([0.5071, 0.4865, 0.4409], np.float32)
CIFAR100_STD = np.array([0.2673, 0.2564, 0.2762], np.float32)

_SPLITS = ("train", "test")


def normalize_images(images: np.ndarray) -> np.ndarray:
  """CIFAR-100-normalized float32 images from ``[..., 3]`` uint8 (0..255) or floats in [0, 1].

  uint8 is converted to float32 and divided by 255 first; floats are
  normalized in their own precision, then cast to float32.
  """
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / np.float32(255)
  elif not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be uint8 (0..255) or floating ([0, 1]), got dtype {images.dtype}")
  return ((images - CIFAR100_MEAN) / CIFAR100_STD).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Shard:
  """A client's examples of one task.

  Attributes:
    task: the task's name in the task table.
    train: its training examples.
    test: its test examples.
  """

  task: str
  train: Records
  test: Records


@dataclasses.dataclass(frozen=True)
class ClientData:
  """One client: names, its shards, and its aggregation weight.

  Attributes:
    name: short unique name (``g{group}p{pattern}`` in the paper's layouts).
    group: its data group.
    pattern: its client pattern.
    shards: its :class:`Shard` s; a client holds a task when one of its
      shards has it (several shards may share a task).
    weight: its aggregation weight (the reference's: its real number of
      train examples); None for the train rows given here.
  """

  name: str
  group: int
  pattern: int
  shards: tuple[Shard, ...]
  weight: int | None = None


def _check_tables(tasks: tuple[TaskSpec, ...], domains: tuple[str, ...]) -> None:
  names = [t.name for t in tasks]
  if not tasks or len(set(names)) != len(names):
    raise ValueError(f"assemble: the task table must be non-empty with unique names, got {names}")
  if len(set(domains)) != len(domains):
    raise ValueError(f"assemble: the domain table has repeated names: {domains}")
  for t in tasks:
    unknown = [d for d in t.domains if d not in domains]
    if unknown:
      raise ValueError(
        f"assemble: task {t.name!r} has domains {unknown} that are not in the domain table {domains}"
      )


def _check_records(r: Records, spec: TaskSpec, image_size: int, where: str) -> None:
  """Raise ValueError unless ``r`` fits ``spec`` (fields, labels, domains, image shape)."""
  fix = "fix the source, or the task's TaskSpec"
  if r.image is not None and "image" not in spec.modalities:
    raise ValueError(
      f"{where}: the Records carry images but the task's modalities are {spec.modalities}; {fix}"
    )
  if r.prompt is not None and "text" not in spec.modalities:
    raise ValueError(
      f"{where}: the Records carry prompts but the task's modalities are {spec.modalities}; {fix}"
    )
  if len(r) and r.image is None and r.prompt is None:
    raise ValueError(f"{where}: the Records carry neither image nor prompt; every example needs an input")
  generates_text = spec.kind == TaskKind.TEXT_GENERATION
  if (r.answer is not None) != generates_text:
    have = "carry answers" if r.answer is not None else "carry no answers"
    raise ValueError(f"{where}: the Records {have}, but the task's kind is {spec.kind.name}; {fix}")
  if r.image is not None:
    if r.image.shape[1:] != (image_size, image_size, 3):
      raise ValueError(
        f"{where}: images are {r.image.shape[1:]}, expected ({image_size}, {image_size}, 3); "
        "sources must resize to image_size (the assembly resizes nothing)"
      )
    if r.image.dtype != np.uint8 and not np.issubdtype(r.image.dtype, np.floating):
      raise ValueError(f"{where}: image dtype {r.image.dtype}; use uint8 (0..255) or floats in [0, 1]")
  limit = max(spec.num_classes, 1)
  if len(r) and (r.label.min() < 0 or r.label.max() >= limit):
    raise ValueError(
      f"{where}: labels span {r.label.min()}..{r.label.max()}, the task takes 0..{limit - 1}"
      + ("" if spec.num_classes else " (generation tasks carry label 0)")
    )
  unknown = sorted(set(np.unique(r.domain).tolist()) - set(spec.domains))
  if unknown:
    raise ValueError(f"{where}: domains {unknown} are not among the task's domains {spec.domains}; {fix}")


def _encode_all(
  encode: Callable[[Any, Sequence[str], int], tuple[np.ndarray, np.ndarray]],
  tokenizer: Any,
  texts: list[np.ndarray],
  length: int,
) -> tuple[np.ndarray, np.ndarray]:
  """``encode`` over the concatenation of ``texts`` (str arrays), each distinct string once.

  Returns ``(ids, mask)``, int32 ``[sum of lengths, length]``, rows in the
  order of the concatenation.
  """
  if not texts:
    return np.zeros((0, length), np.int32), np.zeros((0, length), np.int32)
  distinct, inverse = np.unique(np.concatenate(texts), return_inverse=True)
  ids, mask = encode(tokenizer, distinct.tolist(), length)
  inverse = inverse.reshape(-1)
  return ids[inverse], mask[inverse]


def _domain_ids(domain: np.ndarray, index: dict[str, int]) -> np.ndarray:
  names, inverse = np.unique(domain, return_inverse=True)
  return np.array([index[n] for n in names.tolist()], np.int32)[inverse.reshape(-1)]


def _allocate(clients: int, width: int, image_size: int, text_len: int, target_len: int) -> dict:
  shapes = {
    "image": ((image_size, image_size, 3), np.float32),
    "text": ((text_len,), np.int32),
    "text_mask": ((text_len,), np.int32),
    "target": ((target_len,), np.int32),
    "target_mask": ((target_len,), np.int32),
    "label": ((), np.int32),
    "task": ((), np.int32),
    "domain": ((), np.int32),
    "has_image": ((), np.bool_),
    "has_text": ((), np.bool_),
  }
  assert set(shapes) == set(EXAMPLE_FIELDS)
  return {k: np.zeros((clients, width) + shape, dtype) for k, (shape, dtype) in shapes.items()}


def assemble(
  tasks: Sequence[TaskSpec],
  domains: Sequence[str],
  clients: Sequence[ClientData],
  *,
  tokenizer: Any,
  image_size: int,
  text_len: int,
  target_len: int,
  rng: np.random.Generator,
) -> Federation:
  """Builds a :class:`Federation` from every client's shards.

  Args:
    tasks: the task table; shards name their task in it, and the ``task``
      field indexes it.
    domains: the domain table; every Records domain name must be in it (and
      in its task's ``domains``); the ``domain`` field indexes it.
    clients: ``[clients]`` :class:`ClientData`, in federation order.
    tokenizer: a BERT fast tokenizer (:func:`tapjax.data.tokenize.load_tokenizer`).
    image_size: ``S``; every image must already be ``[S, S, 3]``.
    text_len: ``Lt``, token slots of the prompts.
    target_len: ``La``, token slots of the answers.
    rng: shuffles each client's rows: for each client in order, a
      permutation of its train rows, then one of its test rows.

  Returns:
    The Federation: ``train`` / ``test`` fields ``[clients, max rows, ...]``
    (:data:`~tapjax.data.tasks.EXAMPLE_FIELDS`, zero rows past each client's
    count), ``n_train`` / ``n_test`` the real row counts, ``weights`` the
    clients' ``weight`` (their train rows where None), ``answer_vocab`` the
    sorted token ids of all answers plus pad and ``[SEP]``.

  Raises:
    ValueError: a shard that does not fit its task or the tables (the message
      names the client, the task and the split).
  """
  tasks, domains, clients = tuple(tasks), tuple(domains), tuple(clients)
  _check_tables(tasks, domains)
  if not clients:
    raise ValueError("assemble: no clients")
  names = [c.name for c in clients]
  if len(set(names)) != len(names):
    raise ValueError(f"assemble: client names must be unique, got {names}")
  task_of = {t.name: i for i, t in enumerate(tasks)}
  domain_of = {d: i for i, d in enumerate(domains)}
  for c in clients:
    for shard in c.shards:
      if shard.task not in task_of:
        raise ValueError(
          f"assemble: client {c.name!r} has a shard of task {shard.task!r}, which is not in the task table "
          f"{list(task_of)}; add a TaskSpec for it or fix the shard's task name"
        )
      for split in _SPLITS:
        where = f"client {c.name!r}, task {shard.task!r}, {split}"
        _check_records(getattr(shard, split), tasks[task_of[shard.task]], image_size, where)

  # All prompts (answers) of every client, shard and split, in that order, tokenized at once.
  ordered = [
    (c, shard, split) for c in range(len(clients)) for shard in clients[c].shards for split in _SPLITS
  ]
  recs = [getattr(shard, split) for _, shard, split in ordered]
  text_ids, text_mask = _encode_all(
    tokenize.encode, tokenizer, [r.prompt for r in recs if r.prompt is not None], text_len
  )
  target_ids, target_mask = _encode_all(
    tokenize.encode_targets, tokenizer, [r.answer for r in recs if r.answer is not None], target_len
  )

  counts = {
    split: np.array([sum(len(getattr(s, split)) for s in c.shards) for c in clients], np.int32)
    for split in _SPLITS
  }
  # Row j of a client's concatenated shards lands at position inverse[j] (out = merged[perm]).
  where_to = {split: [] for split in _SPLITS}
  for c in range(len(clients)):
    for split in _SPLITS:
      perm = rng.permutation(int(counts[split][c]))
      inverse = np.empty_like(perm)
      inverse[perm] = np.arange(len(perm))
      where_to[split].append(inverse)

  width = {split: int(counts[split].max()) for split in _SPLITS}
  out = {split: _allocate(len(clients), width[split], image_size, text_len, target_len) for split in _SPLITS}
  offset = {split: np.zeros(len(clients), np.int64) for split in _SPLITS}
  ti = ai = 0
  for (c, shard, split), r in zip(ordered, recs):
    n = len(r)
    rows = where_to[split][c][offset[split][c] : offset[split][c] + n]
    offset[split][c] += n
    f = out[split]
    f["label"][c, rows] = r.label
    f["task"][c, rows] = task_of[shard.task]
    f["domain"][c, rows] = _domain_ids(r.domain, domain_of)
    f["has_image"][c, rows] = r.image is not None
    f["has_text"][c, rows] = r.prompt is not None
    if r.image is not None:
      f["image"][c, rows] = normalize_images(r.image)
    if r.prompt is not None:
      f["text"][c, rows], f["text_mask"][c, rows] = text_ids[ti : ti + n], text_mask[ti : ti + n]
      ti += n
    if r.answer is not None:
      f["target"][c, rows], f["target_mask"][c, rows] = target_ids[ai : ai + n], target_mask[ai : ai + n]
      ai += n

  client_tasks = np.zeros((len(clients), len(tasks)), bool)
  for c, client in enumerate(clients):
    for shard in client.shards:
      client_tasks[c, task_of[shard.task]] = True
  answer_vocab = np.unique(
    np.concatenate([target_ids.ravel(), np.array([tokenizer.pad_token_id, tokenizer.sep_token_id])])
  ).astype(np.int32)
  weights = np.array(
    [counts["train"][c] if cl.weight is None else cl.weight for c, cl in enumerate(clients)], np.int32
  )

  return Federation(
    tasks=tasks,
    domains=domains,
    client_names=tuple(names),
    client_tasks=client_tasks,
    train=out["train"],
    test=out["test"],
    n_train=counts["train"],
    n_test=counts["test"],
    answer_vocab=answer_vocab,
    image_size=image_size,
    text_len=text_len,
    target_len=target_len,
    client_group=np.array([c.group for c in clients], np.int32),
    client_pattern=np.array([c.pattern for c in clients], np.int32),
    weights=weights,
  )
