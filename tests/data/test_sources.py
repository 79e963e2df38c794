"""Real-dataset sources: the table, TFDS loading (mocked catalog data, tiny local builds), missing data.

Catalog datasets are read under ``tfds.testing.mock_data`` (policy
``USE_FILES``) over metadata files written here as ``prepare`` would leave
them; local builders are built for real from tiny fixture files in
``tmp_path``. Nothing is downloaded and TensorFlow is not needed.
"""

from __future__ import annotations

import csv
import io
import json
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tfds_fixtures import fake_prepared
from tapjax.data.records import Records
from tapjax.data.sources import (
  DATASETS,
  PAPER_DOMAINS,
  DatasetNotPreparedError,
  dataset_spec,
  load,
  num_examples,
  require_prepared,
  templates,
)
from tapjax.data.sources.builders import LayoutNotFoundError
from tapjax.data.sources.builders.caltech256 import folder_split
from tapjax.data.sources.prepare import main as prepare_main
from tapjax.data.sources.prepare import prepare
from tapjax.data.tasks import TaskKind

S = 64
SUFFIX = {"JPEG": "jpg", "PNG": "png"}


# --------------------------------------------------------------------------- helpers


def _encoded(array: np.ndarray, mode: str, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).convert(mode).save(buf, format=fmt)
  return buf.getvalue()


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
  """uint8 [h, w, 3], a smooth colourful image (survives JPEG)."""
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 40 * seed % 256)], -1)
  return base.astype(np.uint8)


def _write(path, data: bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def _check_records(records: Records, name: str, n: int):
  """The invariants every dataset's Records keep, per its table row."""
  spec = dataset_spec(name)
  assert len(records) == n
  assert records.label.dtype == np.int32
  assert set(records.domain) <= set(spec.domains)
  assert (records.image is not None) == spec.has_image
  assert (records.prompt is not None) == spec.has_prompt
  assert (records.answer is not None) == spec.has_answer
  if spec.has_image:
    assert records.image.shape == (n, S, S, 3) and records.image.dtype == np.uint8
  if spec.num_classes:
    assert np.all((records.label >= 0) & (records.label < spec.num_classes))
  else:
    assert np.all(records.label == 0)


_fake_prepared = fake_prepared


# --------------------------------------------------------------------------- the table and templates


def test_table_follows_the_reference():
  """Domains, kinds and splits as the reference's load_clients.py / load_test_data.py use them."""
  expected = {
    "tiny_imagenet": ("finegrain_general_object", TaskKind.IMAGE_CLASSIFICATION, 200, "train", "valid"),
    "ag_news": ("news", TaskKind.TEXT_CLASSIFICATION, 4, "train", "test"),
    "caltech256": ("general_object", TaskKind.IMAGE_GENERATION, 0, "train", "test"),
    "vqav2_small": ("visual_answering", TaskKind.TEXT_GENERATION, 0, "validation", "validation"),
    "mmlu_law": ("law_answering", TaskKind.TEXT_GENERATION, 0, "test", "validation"),
    "mmlu_medicine": ("medicine_answering", TaskKind.TEXT_GENERATION, 0, "test", "validation"),
    "mmlu_moral": ("moral_answering", TaskKind.TEXT_GENERATION, 0, "test", "validation"),
    "cifar100": ("finegrain_general_object", TaskKind.IMAGE_CLASSIFICATION, 100, "train", "test"),
    "common_gen": ("common_sense_answering", TaskKind.TEXT_GENERATION, 0, "train", "validation"),
    "fashion_mnist": ("general_object", TaskKind.IMAGE_GENERATION, 0, "train", "test"),
  }
  assert set(DATASETS) == set(expected)
  for name, (domain, kind, classes, train, test) in expected.items():
    spec = DATASETS[name]
    assert (spec.domains, spec.kind, spec.num_classes) == ((domain,), kind, classes), name
    assert (spec.train_split, spec.test_split) == (train, test), name
  assert DATASETS["vqav2_small"].modalities == ("image", "text")
  assert {d for s in DATASETS.values() for d in s.domains} == set(PAPER_DOMAINS)
  with pytest.raises(KeyError, match="tiny_imagenet"):
    dataset_spec("tinyimagenet")


def test_templates_match_the_reference_text():
  """The reference's strings (process_datasets.py), written out by hand."""
  assert templates.mmlu_prompt("Q?", ["w", "x", "y", "z"], "law") == (
    "The following is a multiple-choice question about law. Choose the correct answer from the options "
    "below.\n\nQuestion: Q?\nOptions:\nA. w\nB. x\nC. y\nD. z\n\n"
  )
  assert templates.mmlu_answer(["w", "x", "y", "z"], 2, "ethics") == "Correct answer on ethics: C. y"
  assert (
    templates.vqa_prompt("What colour?")
    == "Answer the question based on the image.\n\nQuestion: What colour?\n"
  )
  assert templates.vqa_answer("red") == "Answer: red"
  assert templates.commongen_prompt(["dog", "run"]) == (
    "Generate an appropriate description from the concepts below.\n\nConcepts:\nA. dog\nB. run\n\n"
  )
  assert templates.commongen_answer("A dog runs.") == "Description: A dog runs."
  assert templates.news_text("Title", "Body") == "Title\nBody"
  with pytest.raises(ValueError, match="outside"):
    templates.mmlu_answer(["a", "b"], 3, "law")


# --------------------------------------------------------------------------- catalog datasets (mocked)


@pytest.mark.parametrize("name", ["cifar100", "fashion_mnist", "ag_news", "common_gen"])
def test_catalog_dataset_loads_under_mock_data(name, tmp_path):
  spec = dataset_spec(name)
  _fake_prepared(name, tmp_path, {spec.train_split: 5, spec.test_split: 2})
  require_prepared([name], tmp_path)
  n = 3
  with tfds.testing.mock_data(
    num_examples=n, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)
  ):
    assert num_examples(name, spec.train_split, tmp_path) == 5
    records = load(name, spec.train_split, data_dir=tmp_path, image_size=S)
    raw = tfds.data_source(spec.tfds_name, split=spec.train_split, data_dir=str(tmp_path), download=False)
    raw = [raw[i] for i in range(n)]
  _check_records(records, name, n)
  if name == "fashion_mnist":  # 28x28x1 grayscale -> 64x64x3 with equal channels
    img = records.image.astype(np.int32)
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
    assert img.std() > 0
  if name == "cifar100":  # bilinear 32 -> 64: the mean colour is kept
    means = np.stack([r["image"].reshape(-1, 3).mean(0) for r in raw])
    np.testing.assert_allclose(records.image.reshape(n, -1, 3).mean(1), means, atol=2.0)
    assert list(records.label) == [int(r["label"]) for r in raw]
  if name == "ag_news":
    assert list(records.prompt) == [f"{r['title']}\n{r['description']}" for r in raw]
    assert list(records.label) == [int(r["label"]) for r in raw]
  if name == "common_gen":
    for rec_prompt, rec_answer, r in zip(records.prompt, records.answer, raw):
      assert rec_prompt.startswith(templates.COMMONGEN_PROMPT_HEAD + "A. " + str(r["concepts"][0]))
      assert rec_answer == templates.COMMONGEN_ANSWER_HEAD + str(r["target"])


# --------------------------------------------------------------------------- local builders


def test_caltech256_from_category_folders(tmp_path):
  root = tmp_path / "raw"
  files = []
  for c, cat in enumerate(["001.ak47", "002.american-flag", "257.clutter"]):
    for k in range(4):
      h, w = 20 + 3 * k, 30 - 2 * c
      mode, fmt = [("RGB", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("CMYK", "JPEG")][k]
      path = root / "256_ObjectCategories" / cat / f"{cat[:3]}_{k:04d}.{SUFFIX[fmt]}"
      _write(path, _encoded(_pattern(h, w, c + k), mode, fmt))
      files.append((path, mode))
  _write(root / "256_ObjectCategories" / "002.american-flag" / "RENAME2", b"not an image")
  data_dir = tmp_path / "tfds"
  assert prepare_main(["caltech256", "--data_dir", str(data_dir), "--manual_dir", str(root)]) == 0
  require_prepared(["caltech256"], data_dir)
  parts = folder_split(12)
  assert [num_examples("caltech256", s, data_dir) for s in ("train", "validation", "test")] == [10, 1, 1]
  records = load("caltech256", "train", data_dir=data_dir)
  _check_records(records, "caltech256", 10)
  assert set(records.domain) == {"general_object"}
  gray = [i for i, row in enumerate(parts["train"]) if files[row][1] == "L"]
  assert gray, "the fixture puts a grayscale image in train"
  for i in gray:
    img = records.image[i]
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
  assert load("caltech256", "train[:4]", data_dir=data_dir, image_size=32).image.shape == (4, 32, 32, 3)


def test_tiny_imagenet_from_the_zip_folder(tmp_path):
  folder = tmp_path / "raw" / "tiny-imagenet-200"
  wnids = ["n02", "n01", "n03"]  # labels follow the sorted wnids
  (folder / "train").mkdir(parents=True)
  (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
  for w in wnids:
    for k in range(2):
      _write(folder / "train" / w / "images" / f"{w}_{k}.JPEG", _encoded(_pattern(64, 64, k), "RGB", "JPEG"))
  val = [("val_0.JPEG", "n03"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n02")]
  for name, _ in val:
    _write(folder / "val" / "images" / name, _encoded(_pattern(64, 64, 1), "L", "JPEG"))
  (folder / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in val))
  data_dir = tmp_path / "tfds"
  prepare("tiny_imagenet", data_dir=data_dir, manual_dir=tmp_path / "raw")
  train = load("tiny_imagenet", "train", data_dir=data_dir)
  _check_records(train, "tiny_imagenet", 6)
  assert list(train.label) == [0, 0, 1, 1, 2, 2]
  valid = load("tiny_imagenet", "valid", data_dir=data_dir)
  _check_records(valid, "tiny_imagenet", 3)
  assert list(valid.label) == [2, 0, 1]
  assert np.array_equal(valid.image[..., 0], valid.image[..., 2])


def _vqa_parquet(path, rows):
  import pyarrow as pa
  import pyarrow.parquet as pq

  table = pa.table(
    {
      "multiple_choice_answer": [r[1] for r in rows],
      "question": [r[0] for r in rows],
      "image": [{"bytes": r[2], "path": None} for r in rows],
    }
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(table, path)


def test_vqav2_small_from_parquet_shards_keeps_row_order(tmp_path):
  rows = [
    (f"question {i}?", f"answer{i}", _encoded(_pattern(40, 50 + i, i), "RGB", "JPEG")) for i in range(5)
  ]
  rows[3] = (rows[3][0], rows[3][1], _encoded(_pattern(30, 30, 3), "L", "PNG"))
  data = tmp_path / "raw" / "data"
  _vqa_parquet(data / "validation-00001-of-00002.parquet", rows[3:])
  _vqa_parquet(data / "validation-00000-of-00002.parquet", rows[:3])
  data_dir = tmp_path / "tfds"
  prepare("vqav2_small", data_dir=data_dir, manual_dir=tmp_path / "raw")
  records = load("vqav2_small", "validation", data_dir=data_dir)
  _check_records(records, "vqav2_small", 5)
  assert list(records.prompt) == [templates.vqa_prompt(f"question {i}?") for i in range(5)]
  assert list(records.answer) == [f"Answer: answer{i}" for i in range(5)]
  assert all(p.startswith(templates.VQA_PROMPT_HEAD) for p in records.prompt)
  assert np.array_equal(records.image[3, ..., 0], records.image[3, ..., 1])


def test_vqav2_small_from_official_json(tmp_path):
  root = tmp_path / "raw"
  questions = [(11, 7, "Is it red?"), (12, 9, "How many?")]
  (root / "val2014").mkdir(parents=True)
  for _, image_id, _ in questions:
    _write(
      root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg",
      _encoded(_pattern(48, 64, image_id), "RGB", "JPEG"),
    )
  (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
    json.dumps(
      {
        "data_subtype": "val2014",
        "questions": [{"question_id": q, "image_id": i, "question": t} for q, i, t in questions],
      }
    )
  )
  (root / "v2_mscoco_val2014_annotations.json").write_text(
    json.dumps(
      {
        "annotations": [
          {"question_id": 12, "multiple_choice_answer": "2"},
          {"question_id": 11, "multiple_choice_answer": "yes"},
        ]
      }
    )
  )
  data_dir = tmp_path / "tfds"
  prepare("vqav2_small", data_dir=data_dir, manual_dir=root)
  records = load("vqav2_small", "validation", data_dir=data_dir)
  _check_records(records, "vqav2_small", 2)
  assert list(records.answer) == ["Answer: yes", "Answer: 2"]
  assert records.prompt[1] == "Answer the question based on the image.\n\nQuestion: How many?\n"


def test_mmlu_from_the_csv_release(tmp_path):
  root = tmp_path / "raw"
  rows = {
    "test": [
      ["A contract, signed\nin 1990, is", "void", "valid", "voidable", "moot", "B"],
      ["Q2", "a", "b", "c", "d", "D"],
    ],
    "val": [["Q3", "a", "b", "c", "d", "A"]],
    "dev": [["Q4", "a", "b", "c", "d", "C"]],
  }
  for subject in ("professional_law", "moral_scenarios"):
    for folder, content in rows.items():
      path = root / "data" / folder / f"{subject}_{folder}.csv"
      path.parent.mkdir(parents=True, exist_ok=True)
      with path.open("w", newline="") as f:
        csv.writer(f).writerows(content)
  data_dir = tmp_path / "tfds"
  prepare_main(["mmlu_law", "mmlu_moral", "--data_dir", str(data_dir), "--manual_dir", str(root)])
  require_prepared(["mmlu_law", "mmlu_moral"], data_dir)
  law = load("mmlu_law", "test", data_dir=data_dir)
  _check_records(law, "mmlu_law", 2)
  assert law.prompt[0] == (
    "The following is a multiple-choice question about law. Choose the correct answer from the options "
    "below.\n\nQuestion: A contract, signed\nin 1990, is\nOptions:\nA. void\nB. valid\nC. voidable\nD. moot\n\n"
  )
  assert list(law.answer) == ["Correct answer on law: B. valid", "Correct answer on law: D. d"]
  assert set(law.domain) == {"law_answering"}
  moral = load("mmlu_moral", "validation", data_dir=data_dir)
  _check_records(moral, "mmlu_moral", 1)
  assert moral.prompt[0].startswith(templates.MMLU_PROMPT_HEAD + "ethics. ")
  assert moral.answer[0] == "Correct answer on ethics: A. a" and moral.domain[0] == "moral_answering"
  assert num_examples("mmlu_moral", "dev", data_dir) == 1
  with pytest.raises(DatasetNotPreparedError, match="mmlu_medicine"):
    require_prepared(["mmlu_law", "mmlu_medicine"], data_dir)


def test_mmlu_from_cais_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  root = tmp_path / "raw"
  sizes = {"test": 3, "validation": 2, "dev": 1}
  for split, n in sizes.items():
    table = pa.table(
      {
        "question": [f"{split} q{i}" for i in range(n)],
        "subject": ["professional_medicine"] * n,
        "choices": [[f"c{i}{j}" for j in range(4)] for i in range(n)],
        "answer": [i % 4 for i in range(n)],
      }
    )
    (root / "professional_medicine").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "professional_medicine" / f"{split}-00000-of-00001.parquet")
  data_dir = tmp_path / "tfds"
  prepare("mmlu_medicine", data_dir=data_dir, manual_dir=root)
  assert [num_examples("mmlu_medicine", s, data_dir) for s in sizes] == list(sizes.values())
  records = load("mmlu_medicine", "test", data_dir=data_dir)
  _check_records(records, "mmlu_medicine", 3)
  assert records.prompt[2].startswith(templates.MMLU_PROMPT_HEAD + "medicine. ")
  assert "Question: test q2\nOptions:\nA. c20\nB. c21\nC. c22\nD. c23\n\n" in records.prompt[2]
  assert list(records.answer) == [f"Correct answer on medicine: {'ABC'[i]}. c{i}{i}" for i in range(3)]
  assert set(records.domain) == {"medicine_answering"}


def test_local_builder_names_the_layouts_it_reads(tmp_path):
  raw = tmp_path / "raw"
  _write(raw / "README.txt", b"wrong folder")
  with pytest.raises(LayoutNotFoundError, match="256_ObjectCategories"):
    prepare("caltech256", data_dir=tmp_path / "tfds", manual_dir=raw)
  with pytest.raises(ValueError, match="--manual_dir"):
    prepare("caltech256", data_dir=tmp_path / "tfds")


# --------------------------------------------------------------------------- missing data


def test_missing_data_fails_fast_with_the_command(tmp_path, monkeypatch):
  def no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
  start = time.perf_counter()
  with pytest.raises(DatasetNotPreparedError) as err:
    require_prepared(["ag_news", "caltech256"], tmp_path)
  assert time.perf_counter() - start < 1.0
  assert err.value.name == "ag_news"
  assert err.value.command == f"python -m tapjax.data.sources.prepare ag_news --data_dir {tmp_path}"
  assert err.value.command in str(err.value) and "'ag_news'" in str(err.value)

  start = time.perf_counter()
  with pytest.raises(DatasetNotPreparedError) as err:
    load("caltech256", "train", data_dir=tmp_path)
  assert time.perf_counter() - start < 1.0
  message = str(err.value)
  assert "'caltech256'" in message and "--manual_dir DIR" in message and "256_ObjectCategories" in message


def test_tfrecord_or_partial_preparation_is_reported(tmp_path):
  _fake_prepared("cifar100", tmp_path, {"train": 4})
  with pytest.raises(DatasetNotPreparedError, match=r"not \['test'\]"):
    require_prepared(["cifar100"], tmp_path)
  info = next(tmp_path.glob("cifar100/*/dataset_info.json"))
  meta = json.loads(info.read_text())
  meta["fileFormat"] = "tfrecord"
  info.write_text(json.dumps(meta))
  with pytest.raises(DatasetNotPreparedError, match="reads array_record"):
    require_prepared("cifar100", tmp_path)
