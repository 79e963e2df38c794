"""Prepare the paper's datasets as TFDS ArrayRecord datasets.

Usage::

  python -m tapjax.data.sources.prepare NAME [NAME ...] [--data_dir DIR] [--manual_dir DIR]

``NAME`` is a key of :data:`tapjax.data.sources.DATASETS`.
Catalog datasets (``ag_news``, ``cifar100``, ``common_gen``,
``fashion_mnist``) are downloaded by TFDS, whose downloader, extractor and
image encoder run on TensorFlow: preparing them needs TensorFlow installed,
reading them never does. Local datasets (``tiny_imagenet``, ``caltech256``,
``vqav2_small``, ``mmlu_*``) are built from the files in ``--manual_dir``
(layouts in ``DATASETS.md``); nothing is downloaded for them. Datasets
already prepared are left as they are.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

import tensorflow_datasets as tfds
from etils import epath

from tapjax.data.sources.tfds import DATASETS, builder_class, dataset_spec, resolve_data_dir

__all__ = ["main", "prepare"]


def prepare(
  name: str,
  *,
  data_dir: str | os.PathLike | None = None,
  manual_dir: str | os.PathLike | None = None,
) -> epath.Path:
  """Build dataset ``name`` as ArrayRecord in ``data_dir``; returns its versioned folder.

  Args:
    name: a key of :data:`~tapjax.data.sources.DATASETS`.
    data_dir: the TFDS data directory (default: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    manual_dir: for a local dataset, the folder holding its files (required);
      ignored for catalog datasets, which TFDS downloads.
  """
  spec = dataset_spec(name)
  if spec.local and manual_dir is None:
    raise ValueError(
      f"dataset {name!r} is built from files you place locally: pass manual_dir (--manual_dir DIR) "
      f"where DIR holds one of these layouts:\n{builder_class(spec).MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )
  if spec.local and not epath.Path(manual_dir).is_dir():
    raise FileNotFoundError(f"dataset {name!r}: manual_dir {manual_dir} is not a folder")
  importlib.import_module(spec.builder_module)
  builder = tfds.builder(
    spec.tfds_name, data_dir=resolve_data_dir(data_dir), file_format="array_record", try_gcs=False
  )
  config = tfds.download.DownloadConfig(
    manual_dir=os.fspath(manual_dir) if spec.local else None,
    try_download_gcs=False,
  )
  builder.download_and_prepare(download_config=config)
  return builder.data_path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m tapjax.data.sources.prepare",
    description="Prepare the paper's datasets as TFDS ArrayRecord datasets (see DATASETS.md).",
  )
  parser.add_argument(
    "names", nargs="+", choices=list(DATASETS), metavar="NAME", help=f"one or more of {', '.join(DATASETS)}"
  )
  parser.add_argument(
    "--data_dir", default=None, help="TFDS data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets)"
  )
  parser.add_argument("--manual_dir", default=None, help="folder with the files of the local dataset(s)")
  args = parser.parse_args(argv)
  for name in dict.fromkeys(args.names):
    path = prepare(name, data_dir=args.data_dir, manual_dir=args.manual_dir)
    print(f"{name}: prepared in {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
