"""Three MMLU subjects as the TFDS dataset ``tap_mmlu`` (one config per subject).

The paper's text-generation client answers MMLU's ``professional_law``,
``professional_medicine`` and ``moral_scenarios`` questions, one domain each.
Every config has MMLU's splits ``test`` (what the reference trains on),
``validation`` (what it tests on) and ``dev`` (5 few-shot examples):

==========================  =====  ==========  ===
config                      test   validation  dev
==========================  =====  ==========  ===
``professional_law``        1,534  170         5
``professional_medicine``   272    31          5
``moral_scenarios``         895    100         5
==========================  =====  ==========  ===
"""

from __future__ import annotations

import csv
from pathlib import Path

import tensorflow_datasets as tfds

from tapjax.data.sources.builders.base import LocalBuilder, parquet_rows, parquet_shards

__all__ = ["LETTERS", "SUBJECTS", "TapMmlu"]

SUBJECTS: tuple[str, ...] = ("professional_law", "professional_medicine", "moral_scenarios")
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
# Split name -> the folder / file suffix of the original CSV release.
_CSV_SPLITS = {"test": "test", "validation": "val", "dev": "dev"}


class TapMmlu(LocalBuilder):
  """MMLU questions of one subject, from the original CSV release or the cais/mmlu Parquet export."""

  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=s, description=f"MMLU {s}") for s in SUBJECTS]
  DESCRIPTION = "MMLU (Hendrycks et al. 2021) multiple-choice questions with four options."
  HOMEPAGE = "https://github.com/hendrycks/test"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
One of two layouts in the manual folder (all three subjects may share it):
  (a) the original release https://people.eecs.berkeley.edu/~hendrycks/data.tar, extracted:
        data/test/<subject>_test.csv, data/val/<subject>_val.csv, data/dev/<subject>_dev.csv
      rows without a header: question,A,B,C,D,answer-letter
  (b) Hugging Face cais/mmlu (the paper's source):
        <subject>/test-*.parquet, <subject>/validation-*.parquet, <subject>/dev-*.parquet
      (columns: question, choices, answer)
      e.g. huggingface-cli download cais/mmlu --repo-type dataset --include '<subject>/*' --local-dir DIR
<subject> is professional_law, professional_medicine or moral_scenarios.
"""

  def _features(self):
    return tfds.features.FeaturesDict(
      {
        "question": tfds.features.Text(),
        "choices": tfds.features.Sequence(tfds.features.Text(), length=len(LETTERS)),
        "answer": tfds.features.ClassLabel(names=LETTERS),
      }
    )

  def _split_generators(self, dl_manager):
    root = Path(dl_manager.manual_dir)
    subject = self.builder_config.name
    shards = {s: parquet_shards(root / subject, s) for s in _CSV_SPLITS}
    if all(shards.values()):
      return {s: self._generate_examples(_parquet(shards[s])) for s in _CSV_SPLITS}
    files = {s: root / "data" / d / f"{subject}_{d}.csv" for s, d in _CSV_SPLITS.items()}
    if all(p.is_file() for p in files.values()):
      return {s: self._generate_examples(_csv(p)) for s, p in files.items()}
    raise self._layout_error(root)


def _csv(path: Path):
  with path.open(newline="", encoding="utf-8") as f:
    for key, row in enumerate(csv.reader(f)):
      if len(row) != 6 or row[5] not in LETTERS:
        raise ValueError(f"{path}: row {key + 1} is not question,A,B,C,D,answer-letter: {row!r:.120}")
      yield key, {"question": row[0], "choices": row[1:5], "answer": LETTERS.index(row[5])}


def _parquet(shards):
  for key, row in enumerate(parquet_rows(shards, ("question", "choices", "answer"))):
    if len(row["choices"]) != len(LETTERS):
      raise ValueError(f"{shards[0]}: row {key} has {len(row['choices'])} choices, MMLU has 4")
    yield key, {"question": row["question"], "choices": list(row["choices"]), "answer": int(row["answer"])}
