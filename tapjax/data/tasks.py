"""Task table, client patterns and the :class:`Federation` container.

Everything here is data: the tasks of the embedded federation (:data:`TASKS`),
the domain ids (:data:`DOMAINS`) and the ten client patterns that mirror the
paper's (:data:`PATTERNS`). Downstream code sees indices and boolean arrays;
the names are for tables and logs.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

__all__ = [
  "TaskKind",
  "TaskSpec",
  "Holding",
  "TASKS",
  "DOMAINS",
  "MODALITIES",
  "TASK_GROUPS",
  "PATTERNS",
  "EXAMPLE_FIELDS",
  "Federation",
  "task_index",
]


class TaskKind(enum.IntEnum):
  """What a task asks of the model (decides its head and its loss)."""

  IMAGE_CLASSIFICATION = 0
  TEXT_CLASSIFICATION = 1
  IMAGE_GENERATION = 2  # reconstruct the input image (MSE)
  TEXT_GENERATION = 3  # answer text from a prompt, with or without an image


MODALITIES: tuple[str, ...] = ("image", "text")

# Expert-group keys (the MoME/MoTE task groups); several tasks may share one.
TASK_GROUPS: tuple[str, ...] = (
  "image_classification",
  "text_classification",
  "image_generation",
  "text_generation",
)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task of a federation.

  Attributes:
    name: short unique name (goes into tables).
    kind: the :class:`TaskKind`.
    group: the expert-group key, one of :data:`TASK_GROUPS`.
    modalities: the input modalities, a subset of :data:`MODALITIES`.
    num_classes: classes of a classification task, 0 for generation.
    domains: the domain names this task's examples can carry.
  """

  name: str
  kind: TaskKind
  group: str
  modalities: tuple[str, ...]
  num_classes: int
  domains: tuple[str, ...]

  def __post_init__(self):
    if self.group not in TASK_GROUPS:
      raise ValueError(f"task {self.name!r}: group {self.group!r} not in {TASK_GROUPS}")
    if not self.modalities or not set(self.modalities) <= set(MODALITIES):
      raise ValueError(f"task {self.name!r}: modalities {self.modalities} not within {MODALITIES}")
    is_cls = self.kind in (TaskKind.IMAGE_CLASSIFICATION, TaskKind.TEXT_CLASSIFICATION)
    if is_cls != (self.num_classes > 0):
      raise ValueError(
        f"task {self.name!r}: num_classes={self.num_classes} does not fit kind {self.kind.name}"
      )
    if not self.domains:
      raise ValueError(f"task {self.name!r}: needs at least one domain")


# Domain ids (MoDE experts), in the order of the reference's list; the first
# one stands where the reference has `finegrain_general_object`.
DOMAINS: tuple[str, ...] = (
  "handwritten",
  "news",
  "general_object",
  "visual_answering",
  "law_answering",
  "medicine_answering",
  "moral_answering",
  "common_sense_answering",
)

_IC, _TC, _IG, _TG = TaskKind
TASKS: tuple[TaskSpec, ...] = (
  TaskSpec("digits_cls", _IC, "image_classification", ("image",), 10, ("handwritten",)),
  TaskSpec("topic_cls", _TC, "text_classification", ("text",), 4, ("news",)),
  TaskSpec("shapes_gen", _IG, "image_generation", ("image",), 0, ("general_object",)),
  TaskSpec("vqa_gen", _TG, "text_generation", ("image", "text"), 0, ("visual_answering",)),
  TaskSpec(
    "qa_gen",
    _TG,
    "text_generation",
    ("text",),
    0,
    ("law_answering", "medicine_answering", "moral_answering"),
  ),
  TaskSpec("shapes_cls", _IC, "image_classification", ("image",), 6, ("general_object",)),
  TaskSpec("concept_gen", _TG, "text_generation", ("text",), 0, ("common_sense_answering",)),
  TaskSpec("digits_gen", _IG, "image_generation", ("image",), 0, ("handwritten",)),
)


def task_index(name: str, tasks: tuple[TaskSpec, ...] = TASKS) -> int:
  """The index of the task called ``name`` in ``tasks``."""
  for i, t in enumerate(tasks):
    if t.name == name:
      return i
  raise KeyError(f"no task {name!r}; tasks are {[t.name for t in tasks]}")


@dataclasses.dataclass(frozen=True)
class Holding:
  """A client's share of one task: part ``part`` of ``parts`` of the task's source.

  Tasks that draw on one source (``digits_cls`` and ``digits_gen`` both use
  scikit-learn's digits) split that source between them, so no base example
  serves two tasks.
  """

  task: str
  part: int
  parts: int


# The ten client patterns of one group, mirroring the paper's table
# (the paper's federation table); pattern p is client p of every group.
PATTERNS: tuple[tuple[Holding, ...], ...] = (
  (Holding("digits_cls", 0, 2),),  # 0: image classification
  (Holding("topic_cls", 0, 3),),  # 1: text classification, 1/3
  (Holding("topic_cls", 1, 3),),  # 2: text classification, 1/3
  (Holding("shapes_gen", 0, 2),),  # 3: image generation, 1/2
  (Holding("vqa_gen", 0, 2),),  # 4: image+text answer generation, 1/2
  (Holding("vqa_gen", 1, 2),),  # 5: image+text answer generation, 1/2
  (Holding("qa_gen", 0, 1),),  # 6: text generation, 3 domains
  (Holding("shapes_cls", 0, 1), Holding("topic_cls", 2, 3)),  # 7: image cls + text cls (last 1/3)
  (Holding("concept_gen", 0, 2), Holding("digits_gen", 1, 2)),  # 8: text gen 1/2 + image gen
  (Holding("concept_gen", 1, 2), Holding("shapes_gen", 1, 2)),  # 9: text gen 1/2 + image gen 1/2
)

# Every example carries every field (absent ones are zeros); shapes after the
# leading [clients, examples] axes. S = image size, Lt = text length,
# La = target length.
EXAMPLE_FIELDS: tuple[str, ...] = (
  "image",  # float32 [S, S, 3], CIFAR-100-normalized
  "text",  # int32 [Lt], [CLS] ... [SEP] then 0
  "text_mask",  # int32 [Lt]
  "target",  # int32 [La], answer wordpieces, [SEP], then 0
  "target_mask",  # int32 [La]
  "label",  # int32 [], class id (0 if none)
  "task",  # int32 [], index into Federation.tasks
  "domain",  # int32 [], index into Federation.domains
  "has_image",  # bool []
  "has_text",  # bool []
)


@dataclasses.dataclass
class Federation:
  """A federation's data, as arrays with a leading ``clients`` axis.

  Attributes:
    tasks: the task table; ``task`` fields index into it.
    domains: all domain names; ``domain`` fields index into it.
    client_names: ``[clients]`` short names, ``g{group}p{pattern}``.
    client_tasks: bool ``[clients, tasks]``, which tasks each client holds.
    train: field name -> array ``[clients, max_train, ...]`` (see
    :data:`EXAMPLE_FIELDS`); rows at and past ``n_train[c]`` are zeros.
    test: the same with ``[clients, max_test, ...]``.
    n_train: int32 ``[clients]``, real training examples per client.
    n_test: int32 ``[clients]``, real test examples per client.
    answer_vocab: int32 ``[A]``, sorted unique tokenizer ids of all
    text-generation targets, always with the pad id 0 and ``[SEP]``.
    image_size: ``S``.
    text_len: ``Lt``.
    target_len: ``La``.
    client_group: int32 ``[clients]``, the data group of each client.
    client_pattern: int32 ``[clients]``, the pattern (0..9) of each client.
    weights: int32 ``[clients]``, each client's aggregation weight: its real
    number of training examples (the reference's weight). Equal to
    ``n_train`` unless the rows were capped (e.g. ``max_train_per_client``
    of :func:`tapjax.data.paper.make_paper_federation`); defaults to
    ``n_train``.

  An image-generation example's target is its own ``image``; its ``target``
  field is zeros.
  """

  tasks: tuple[TaskSpec, ...]
  domains: tuple[str, ...]
  client_names: tuple[str, ...]
  client_tasks: np.ndarray
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  n_train: np.ndarray
  n_test: np.ndarray
  answer_vocab: np.ndarray
  image_size: int
  text_len: int
  target_len: int
  client_group: np.ndarray
  client_pattern: np.ndarray
  weights: np.ndarray | None = None

  def __post_init__(self):
    if self.weights is None:
      self.weights = np.array(self.n_train, np.int32)
    elif np.shape(self.weights) != np.shape(self.n_train):
      raise ValueError(
        f"Federation: weights has shape {np.shape(self.weights)}, expected [clients] = {np.shape(self.n_train)}"
      )

  @property
  def num_clients(self) -> int:
    return len(self.client_names)

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)
