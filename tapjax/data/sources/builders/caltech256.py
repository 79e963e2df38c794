"""Caltech-256 (30,607 images, 256 object classes + clutter) as the TFDS dataset ``tap_caltech256``.

TFDS' catalog has Caltech-101 only. Splits ``train`` (24,791), ``validation``
(2,755) and ``test`` (3,061) as the reference's Hugging Face source
``ilee0022/Caltech-256`` has them; the paper uses it for image generation
(reconstruction), so labels are kept but unused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tapjax.data.sources.builders.base import (
  image_label_features,
  LocalBuilder,
  image_cell_bytes,
  parquet_rows,
  parquet_shards,
  rgb_image_bytes,
)

__all__ = ["FOLDER_SPLIT_SEED", "SPLIT_SIZES", "TapCaltech256", "folder_split"]

NUM_CLASSES = 257  # 256 object classes and 257.clutter
# The Hugging Face source's split sizes; a folder layout is cut in these proportions.
SPLIT_SIZES = {"train": 24_791, "validation": 2_755, "test": 3_061}
FOLDER_SPLIT_SEED = 0
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class TapCaltech256(LocalBuilder):
  """Caltech-256 from its Hugging Face Parquet export or the original category folders."""

  DESCRIPTION = "Caltech-256 object categories (Griffin, Holub, Perona 2007); images of varying size."
  HOMEPAGE = "https://data.caltech.edu/records/nyy15-4j048"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
One of two layouts in the manual folder:
  (a) Hugging Face ilee0022/Caltech-256 (the paper's source; same splits and row order):
        data/train-*.parquet, data/validation-*.parquet, data/test-*.parquet   (columns: image, label)
      e.g. huggingface-cli download ilee0022/Caltech-256 --repo-type dataset --local-dir DIR
  (b) the original 256_ObjectCategories.tar from data.caltech.edu, extracted:
        256_ObjectCategories/001.ak47/001_0001.jpg ... 257.clutter/*.jpg
      label = the folder's number - 1; the images (sorted by path) are cut into
      train / validation / test in the proportions 24,791 : 2,755 : 3,061 by a
      seed-0 permutation (see folder_split); non-image files are skipped.
"""

  def _features(self):
    return image_label_features(NUM_CLASSES)

  def _split_generators(self, dl_manager):
    root = Path(dl_manager.manual_dir)
    shards = {s: parquet_shards(root / "data", s) for s in SPLIT_SIZES}
    if all(shards.values()):
      return {s: self._generate_examples(_parquet(shards[s])) for s in SPLIT_SIZES}
    folder = root / "256_ObjectCategories"
    if folder.is_dir():
      items = _folder_items(folder)
      parts = folder_split(len(items))
      empty = [s for s, rows in parts.items() if len(rows) == 0]
      if empty:
        raise ValueError(
          f"tap_caltech256: {len(items)} images under {folder} leave split(s) {empty} empty; use more images"
        )
      return {s: self._generate_examples(_files([items[i] for i in parts[s]])) for s in SPLIT_SIZES}
    raise self._layout_error(root)


def folder_split(n: int) -> dict[str, np.ndarray]:
  """Split name -> sorted int64 indices ``[n_split]`` of ``n`` images (the folder layout's cut).

  Validation and test get ``round(n * size / 30,607)`` images (their share in
  the Hugging Face source), train the rest, drawn by a
  ``default_rng(FOLDER_SPLIT_SEED)`` permutation.
  """
  total = sum(SPLIT_SIZES.values())
  n_val = round(n * SPLIT_SIZES["validation"] / total)
  n_test = round(n * SPLIT_SIZES["test"] / total)
  order = np.random.default_rng(FOLDER_SPLIT_SEED).permutation(n)
  n_train = n - n_val - n_test
  return {
    "train": np.sort(order[:n_train]),
    "validation": np.sort(order[n_train : n_train + n_val]),
    "test": np.sort(order[n_train + n_val :]),
  }


def _folder_items(folder: Path) -> list[tuple[Path, int]]:
  items = []
  for category in sorted(p for p in folder.iterdir() if p.is_dir()):
    number = category.name.split(".", 1)[0]
    if not number.isdigit():
      raise ValueError(f"{category}: a category folder is named NNN.name (e.g. 001.ak47)")
    label = int(number) - 1
    if not 0 <= label < NUM_CLASSES:
      raise ValueError(f"{category}: category number {number} is outside 001..{NUM_CLASSES:03d}")
    items += [(p, label) for p in sorted(category.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES]
  if not items:
    raise FileNotFoundError(f"tap_caltech256: no images under {folder}/NNN.name/")
  return items


def _files(items):
  for key, (path, label) in enumerate(items):
    yield key, {"image": rgb_image_bytes(path.read_bytes()), "label": label}


def _parquet(shards):
  for key, row in enumerate(parquet_rows(shards, ("image", "label"))):
    yield (
      key,
      {"image": rgb_image_bytes(image_cell_bytes(row["image"], str(shards[0]))), "label": row["label"]},
    )
