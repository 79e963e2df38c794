"""Real-dataset sources: the paper's datasets, read through TFDS into :class:`~tapjax.data.records.Records`.

* :data:`DATASETS`: the table (one :class:`DatasetSpec` per dataset).
* :func:`load`, :func:`num_examples`: read a prepared split / its size.
* :func:`require_prepared`: the fast check to run before heavy work; raises
  :class:`DatasetNotPreparedError` with the command that prepares the data.
* ``python -m tapjax.data.sources.prepare NAME ...``: prepares datasets
  (:func:`tapjax.data.sources.prepare.prepare`).

``DATASETS.md`` (next to this file) lists every dataset: TFDS name, split
sizes, how to prepare it, its domain and template. Importing this package
imports ``tensorflow_datasets`` (never TensorFlow).
"""

from tapjax.data.sources import templates
from tapjax.data.sources.tfds import (
  DATASETS,
  PAPER_DOMAINS,
  DatasetNotPreparedError,
  DatasetSpec,
  builder_class,
  dataset_spec,
  default_data_dir,
  load,
  num_examples,
  prepare_command,
  require_prepared,
  resolve_data_dir,
)

__all__ = [
  "DATASETS",
  "PAPER_DOMAINS",
  "DatasetNotPreparedError",
  "DatasetSpec",
  "builder_class",
  "dataset_spec",
  "default_data_dir",
  "load",
  "num_examples",
  "prepare_command",
  "require_prepared",
  "resolve_data_dir",
  "templates",
]
