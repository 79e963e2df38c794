"""Shared by the data tests: a dataset "prepared" as metadata only."""

import tensorflow_datasets as tfds
from tensorflow_datasets.core import naming

from tapjax.data.sources import builder_class, dataset_spec


def fake_prepared(name: str, data_dir, splits: dict[str, int]):
  """Write what ``prepare`` leaves (dataset_info.json, ArrayRecord format, split sizes
  ``{split: rows}``), no data files."""
  spec = dataset_spec(name)
  builder_class(spec)
  builder = tfds.builder(spec.tfds_name, data_dir=str(data_dir), file_format="array_record")
  infos = [
    tfds.core.SplitInfo(
      name=split,
      shard_lengths=[n],
      num_bytes=0,
      filename_template=naming.ShardedFileTemplate(
        data_dir=builder.data_path, dataset_name=builder.name, split=split, filetype_suffix="array_record"
      ),
    )
    for split, n in splits.items()
  ]
  builder.info.set_splits(tfds.core.SplitDict(infos))
  builder.data_path.mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)
