"""Federated data for tapjax: task tables and the embedded default federation.

Only numpy, scikit-learn (the digits) and a ``transformers`` tokenizer are
needed here; nothing is downloaded.
"""

from tapjax.data.embedded import (
  CIFAR100_MEAN,
  CIFAR100_STD,
  make_embedded_federation,
  normalize_images,
)
from tapjax.data.tasks import (
  DOMAINS,
  EXAMPLE_FIELDS,
  MODALITIES,
  PATTERNS,
  TASK_GROUPS,
  TASKS,
  Federation,
  Holding,
  TaskKind,
  TaskSpec,
  task_index,
)
from tapjax.data.tokenize import default_tokenizer_path, encode, encode_targets, load_tokenizer

__all__ = [
  "CIFAR100_MEAN",
  "CIFAR100_STD",
  "DOMAINS",
  "EXAMPLE_FIELDS",
  "MODALITIES",
  "PATTERNS",
  "TASK_GROUPS",
  "TASKS",
  "Federation",
  "Holding",
  "TaskKind",
  "TaskSpec",
  "default_tokenizer_path",
  "encode",
  "encode_targets",
  "load_tokenizer",
  "make_embedded_federation",
  "normalize_images",
  "task_index",
]
