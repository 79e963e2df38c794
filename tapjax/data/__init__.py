"""Federated data for tapjax: task tables, the assembly, the embedded and the paper federations.

* :func:`make_embedded_federation`: the embedded default (procedural data +
  scikit-learn digits, nothing downloaded).
* :func:`make_paper_federation`: the paper's 30 clients on the real datasets
  (prepared TFDS datasets, :mod:`tapjax.data.sources`). Imported on first use,
  so that ``import tapjax.data`` does not import ``tensorflow_datasets``.
* :func:`assemble`: per-client :class:`Records` -> :class:`Federation`, for
  any other source.

The embedded path needs only numpy, scikit-learn and a ``transformers``
tokenizer.
"""

from tapjax.data.assemble import (
  CIFAR100_MEAN,
  CIFAR100_STD,
  ClientData,
  Shard,
  assemble,
  normalize_images,
)
from tapjax.data.embedded import make_embedded_federation
from tapjax.data.records import Records
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
  "ClientData",
  "Federation",
  "Holding",
  "Records",
  "Shard",
  "TaskKind",
  "TaskSpec",
  "assemble",
  "default_tokenizer_path",
  "encode",
  "encode_targets",
  "load_tokenizer",
  "make_embedded_federation",
  "make_paper_federation",
  "normalize_images",
  "task_index",
]

_LAZY = {"make_paper_federation": "tapjax.data.paper"}


def __getattr__(name: str):
  if name in _LAZY:
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'tapjax.data' has no attribute {name!r}")
