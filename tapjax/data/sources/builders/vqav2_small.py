"""VQAv2-small (21,435 questions on COCO images) as the TFDS dataset ``tap_vqav2_small``.

The reference uses Hugging Face ``merve/vqav2-small``, one split
``validation`` of 21,435 (question, most common answer, image) rows, a subset
of VQAv2's val2014 questions. This builder keeps that one split, in source
order; the federation layout draws its train and test rows from it
(:mod:`tapjax.data.layouts`).
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow_datasets as tfds

from tapjax.data.sources.builders.base import (
  LocalBuilder,
  image_cell_bytes,
  parquet_rows,
  parquet_shards,
  rgb_image_bytes,
)

__all__ = ["TapVqav2Small"]

_SPLIT = "validation"


class TapVqav2Small(LocalBuilder):
  """VQAv2 questions with their most common answer, from Parquet or the official JSON files."""

  DESCRIPTION = "VQAv2 (Goyal et al. 2017) questions, each with its most common answer and its COCO image."
  HOMEPAGE = "https://visualqa.org/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
One of two layouts in the manual folder:
  (a) Hugging Face merve/vqav2-small (the paper's source; same rows, same order):
        data/validation-*.parquet   (columns: question, multiple_choice_answer, image)
      e.g. huggingface-cli download merve/vqav2-small --repo-type dataset --local-dir DIR
  (b) VQAv2 in its official format (visualqa.org), any subset of it:
        *questions*.json     {"data_subtype": "val2014", "questions": [{"question_id", "image_id", "question"}]}
        *annotations*.json   {"annotations": [{"question_id", "multiple_choice_answer", ...}]}
        <data_subtype>/COCO_<data_subtype>_<image_id as 12 digits>.jpg
      rows follow the questions file's order; data_subtype defaults to val2014.
"""

  def _features(self):
    return tfds.features.FeaturesDict(
      {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "question": tfds.features.Text(),
        "multiple_choice_answer": tfds.features.Text(),
      }
    )

  def _split_generators(self, dl_manager):
    root = Path(dl_manager.manual_dir)
    shards = parquet_shards(root / "data", _SPLIT)
    if shards:
      return {_SPLIT: self._generate_examples(_parquet(shards))}
    questions = sorted(root.glob("*questions*.json"))
    annotations = sorted(root.glob("*annotations*.json"))
    if len(questions) == 1 and len(annotations) == 1:
      return {_SPLIT: self._generate_examples(_official(root, questions[0], annotations[0]))}
    if questions or annotations:
      raise ValueError(
        f"tap_vqav2_small: {root} needs exactly one *questions*.json and one *annotations*.json, "
        f"found {[p.name for p in questions]} and {[p.name for p in annotations]}"
      )
    raise self._layout_error(root)


def _parquet(shards):
  for key, row in enumerate(parquet_rows(shards, ("question", "multiple_choice_answer", "image"))):
    yield (
      key,
      {
        "image": rgb_image_bytes(image_cell_bytes(row["image"], str(shards[0]))),
        "question": row["question"],
        "multiple_choice_answer": row["multiple_choice_answer"],
      },
    )


def _official(root: Path, questions_path: Path, annotations_path: Path):
  questions = json.loads(questions_path.read_text())
  answers = {
    a["question_id"]: a["multiple_choice_answer"]
    for a in json.loads(annotations_path.read_text())["annotations"]
  }
  subtype = questions.get("data_subtype", "val2014")
  for key, q in enumerate(questions["questions"]):
    if q["question_id"] not in answers:
      raise ValueError(f"{annotations_path}: no annotation for question_id {q['question_id']}")
    image = root / subtype / f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"
    yield (
      key,
      {
        "image": rgb_image_bytes(image.read_bytes()),
        "question": q["question"],
        "multiple_choice_answer": answers[q["question_id"]],
      },
    )
