"""What the local TFDS builders share: the base class and the readers of user files.

A local builder turns files a user has placed in one folder (its
``manual_dir``) into a TFDS dataset in the ArrayRecord format, with no network
access and no TensorFlow. Two kinds of input are read here:

* image files (or image bytes), normalized to 3-channel RGB: bytes that decode
  to an RGB JPEG or PNG are kept as they are, anything else (grayscale,
  palette, CMYK, RGBA) is converted to RGB (alpha dropped, as the reference's
  ``img.convert('RGB')``) and re-encoded losslessly as PNG;
* Hugging Face Parquet shards (``huggingface-cli download`` of a dataset
  repository), read row by row in the order Hugging Face ``datasets`` loads
  them: shard files sorted by name, rows in file order.

Builders keep their source order (``disable_shuffling``), so row ``i`` of a
prepared split is row ``i`` of the source the layouts index.
"""

from __future__ import annotations

import abc
import inspect
import io
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

__all__ = [
  "LocalBuilder",
  "LayoutNotFoundError",
  "image_cell_bytes",
  "parquet_rows",
  "parquet_shards",
  "rgb_image_bytes",
]

# Image encodings kept byte for byte when the image is already RGB.
_KEPT_FORMATS = ("JPEG", "PNG")


class LayoutNotFoundError(FileNotFoundError):
  """The manual folder holds none of the file layouts a local builder reads."""


def rgb_image_bytes(data: bytes) -> bytes:
  """Encoded image bytes that decode to an RGB ``[h, w, 3]`` uint8 image.

  RGB JPEG/PNG bytes are returned unchanged; other images are converted to RGB
  and re-encoded as PNG.
  """
  with Image.open(io.BytesIO(data)) as img:
    if img.mode == "RGB" and img.format in _KEPT_FORMATS:
      return data
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def parquet_shards(folder: Path, split: str) -> list[Path]:
  """The Parquet shards ``folder/{split}-*.parquet``, sorted by name (empty if none)."""
  return sorted(folder.glob(f"{split}-*.parquet"))


def parquet_rows(shards: Sequence[Path], columns: Sequence[str]) -> Iterator[dict[str, Any]]:
  """The rows of ``shards`` (in order) as dicts of ``columns``.

  An image column (a Hugging Face ``Image`` feature) comes back as a dict
  ``{"bytes": ..., "path": ...}``.
  """
  import pyarrow.parquet as pq

  for shard in shards:
    pf = pq.ParquetFile(shard)
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
      raise ValueError(
        f"{shard}: no column(s) {missing} (it has {pf.schema_arrow.names}); "
        "is this a shard of the dataset the layout names?"
      )
    for batch in pf.iter_batches(batch_size=256, columns=list(columns)):
      yield from batch.to_pylist()


def image_cell_bytes(cell: Any, where: str) -> bytes:
  """The encoded bytes of a Hugging Face ``Image`` cell (``{"bytes", "path"}``)."""
  data = cell.get("bytes") if isinstance(cell, dict) else None
  if not data:
    raise ValueError(f"{where}: the image cell holds no embedded bytes ({cell!r:.80}); re-download the shard")
  return data


def image_label_features(num_classes: int) -> tfds.features.FeaturesDict:
  """An RGB image of any size and a class label: the image datasets' features."""
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.ClassLabel(num_classes=num_classes),
    }
  )


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TFDS builder over files in ``manual_dir``; subclasses name the features and splits.

  Subclasses set ``MANUAL_DOWNLOAD_INSTRUCTIONS`` (the accepted file
  layouts), ``DESCRIPTION`` and ``HOMEPAGE``, and implement
  :meth:`_features` and :meth:`_split_generators`, whose generators are
  ``self._generate_examples(rows)`` over ``(int key, example)`` pairs with
  increasing keys (the written order).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  DESCRIPTION = ""
  HOMEPAGE = ""

  @abc.abstractmethod
  def _features(self) -> tfds.features.FeaturesDict:
    """The features of one example."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This builder's source file.

    TFDS' own lookup (tensorflow-datasets 4.9.10) checks the package's resource
    path against ``importlib_resources``, a module recent etils no longer pulls
    in; the file of the class is what that lookup finds anyway.
    """
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=self._features(),
      homepage=self.HOMEPAGE,
      disable_shuffling=True,
    )

  def _generate_examples(self, rows: Iterable[tuple[int, dict[str, Any]]]):
    yield from rows

  def _layout_error(self, root: Path) -> LayoutNotFoundError:
    return LayoutNotFoundError(
      f"{self.name}: {root} holds none of the accepted file layouts. Expected:\n"
      f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )
