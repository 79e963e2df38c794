"""Tiny-ImageNet (200 classes, 64x64) as the TFDS dataset ``tap_tiny_imagenet``.

TFDS has no Tiny-ImageNet; its catalog's ImageNet variants need the full
ImageNet-1k by hand (``imagenet_resized``) or carry no labels
(``downsampled_imagenet``), so this builder reads the dataset from files.
Splits: ``train`` (100,000) and ``valid`` (10,000), named as the reference's
Hugging Face source ``zh-plus/tiny-imagenet`` names them.
"""

from __future__ import annotations

from pathlib import Path


from tapjax.data.sources.builders.base import (
  image_label_features,
  LocalBuilder,
  image_cell_bytes,
  parquet_rows,
  parquet_shards,
  rgb_image_bytes,
)

__all__ = ["TapTinyImagenet"]

NUM_CLASSES = 200
_HF_SPLITS = ("train", "valid")
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class TapTinyImagenet(LocalBuilder):
  """Tiny-ImageNet-200 from its Hugging Face Parquet export or the original zip's folder."""

  DESCRIPTION = "Tiny-ImageNet: 200 ImageNet classes, 64x64 images (500 train, 50 valid per class)."
  HOMEPAGE = "http://cs231n.stanford.edu/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
One of two layouts in the manual folder:
  (a) Hugging Face zh-plus/tiny-imagenet (the paper's source; same row order):
        data/train-*.parquet, data/valid-*.parquet   (columns: image, label)
      e.g. huggingface-cli download zh-plus/tiny-imagenet --repo-type dataset --local-dir DIR
  (b) the original http://cs231n.stanford.edu/tiny-imagenet-200.zip, extracted:
        tiny-imagenet-200/wnids.txt
        tiny-imagenet-200/train/<wnid>/images/*.JPEG
        tiny-imagenet-200/val/val_annotations.txt    (file<TAB>wnid<TAB>box...)
        tiny-imagenet-200/val/images/*.JPEG
      labels are the positions of the sorted wnids; 'valid' is the zip's val/.
"""

  def _features(self):
    return image_label_features(NUM_CLASSES)

  def _split_generators(self, dl_manager):
    root = Path(dl_manager.manual_dir)
    shards = {s: parquet_shards(root / "data", s) for s in _HF_SPLITS}
    if all(shards.values()):
      return {s: self._generate_examples(_parquet(shards[s])) for s in _HF_SPLITS}
    folder = root / "tiny-imagenet-200"
    if (folder / "wnids.txt").is_file():
      wnids = sorted(w.strip() for w in (folder / "wnids.txt").read_text().split() if w.strip())
      return {
        "train": self._generate_examples(_train_folder(folder, wnids)),
        "valid": self._generate_examples(_val_folder(folder, wnids)),
      }
    raise self._layout_error(root)


def _parquet(shards):
  for key, row in enumerate(parquet_rows(shards, ("image", "label"))):
    yield (
      key,
      {"image": rgb_image_bytes(image_cell_bytes(row["image"], str(shards[0]))), "label": row["label"]},
    )


def _train_folder(folder: Path, wnids: list[str]):
  key = 0
  for label, wnid in enumerate(wnids):
    images = folder / "train" / wnid / "images"
    paths = sorted(p for p in images.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not paths:
      raise FileNotFoundError(f"tap_tiny_imagenet: no images in {images} (wnid {wnid} is in wnids.txt)")
    for path in paths:
      yield key, {"image": rgb_image_bytes(path.read_bytes()), "label": label}
      key += 1


def _val_folder(folder: Path, wnids: list[str]):
  index = {w: i for i, w in enumerate(wnids)}
  annotations = folder / "val" / "val_annotations.txt"
  lines = [line for line in annotations.read_text().splitlines() if line.strip()]
  for key, line in enumerate(lines):
    name, wnid = line.split("\t")[:2]
    if wnid not in index:
      raise ValueError(f"{annotations}:{key + 1}: wnid {wnid!r} is not in wnids.txt")
    path = folder / "val" / "images" / name
    yield key, {"image": rgb_image_bytes(path.read_bytes()), "label": index[wnid]}
