"""The paper's datasets as TFDS datasets: the table, loading to :class:`Records`, the prepared-data check.

Every dataset of the paper is one :class:`DatasetSpec` in :data:`DATASETS`
(keys as :data:`tapjax.data.layouts.REFERENCE_SIZES` names them). Catalog
datasets (CIFAR-100, Fashion-MNIST, AG News, CommonGen) are read from TFDS'
own builders; the others from the local builders of
:mod:`tapjax.data.sources.builders`. Either way the data must have been
*prepared* (built as ArrayRecord files in a TFDS ``data_dir``) beforehand:

* :func:`require_prepared` checks that, from the metadata files alone, in
  milliseconds, and raises :class:`DatasetNotPreparedError` naming the first
  missing dataset and the command that prepares it (see
  :func:`prepare_command`). Nothing here ever downloads.
* :func:`load` reads one split with ``tfds.data_source`` (random access over
  ArrayRecord, no TensorFlow needed; the same path is taken when TensorFlow
  is installed) and maps each raw example to :class:`Records` fields with the
  dataset's ``to_fields``: images resized to ``[n, S, S, 3]`` uint8 RGB
  (bilinear, as torchvision's ``Resize`` on PIL images; grayscale repeated to
  3 channels), text through the templates of
  :mod:`tapjax.data.sources.templates`.
* :func:`num_examples` reads a split's size from the metadata.

Normalization (CIFAR-100 mean/std) and tokenization happen later, in the
federation assembly.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import shlex
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.core import constants as tfds_constants

from tapjax.data.layouts import PAPER_DOMAINS  # the reference's domain ids (MoDE experts)
from tapjax.data.records import Records
from tapjax.data.sources import templates
from tapjax.data.tasks import MODALITIES, TaskKind

__all__ = [
  "DATASETS",
  "PAPER_DOMAINS",
  "DatasetNotPreparedError",
  "DatasetSpec",
  "dataset_spec",
  "default_data_dir",
  "load",
  "num_examples",
  "builder_class",
  "prepare_command",
  "require_prepared",
  "resolve_data_dir",
]


_FILE_FORMAT = "array_record"  # what tfds.data_source reads without TensorFlow
_CLASSIFICATION = (TaskKind.IMAGE_CLASSIFICATION, TaskKind.TEXT_CLASSIFICATION)

Fields = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset of the paper and how it becomes :class:`Records`.

  Attributes:
    name: the key in :data:`DATASETS` (as the federation layouts name it).
    tfds_name: the TFDS dataset, ``name`` or ``name/config``.
    builder_module: the module whose import registers the TFDS builder.
    local: True when the dataset is built from files the user places (a local
      builder, ``--manual_dir``); False for TFDS catalog datasets (downloaded
      by TFDS when prepared).
    train_split: the TFDS split the paper trains on.
    test_split: the TFDS split the paper tests on (may equal ``train_split``
      when the source has one split and the layout cuts it).
    kind: the task kind (decides head and loss).
    num_classes: classes of a classification task, 0 for generation.
    domains: the domain ids its examples carry (from :data:`PAPER_DOMAINS`).
    modalities: input modalities, a subset of ``("image", "text")``.
    to_fields: raw TFDS example (feature name -> numpy value, str or bytes)
      -> Records fields: ``label`` (int), ``domain`` (str) and, as the
      modalities and kind ask, ``image`` (uint8 ``[h, w, c]``, any size, c in
      1, 3, 4), ``prompt`` (str) and ``answer`` (str).
    reference_source: what the reference loads instead (Hugging Face name).
    prepare_note: what preparing it involves, shown with the prepare command.
  """

  name: str
  tfds_name: str
  builder_module: str
  local: bool
  train_split: str
  test_split: str
  kind: TaskKind
  num_classes: int
  domains: tuple[str, ...]
  modalities: tuple[str, ...]
  to_fields: Callable[[Mapping[str, Any]], Fields]
  reference_source: str
  prepare_note: str = ""

  def __post_init__(self):
    if (self.kind in _CLASSIFICATION) != (self.num_classes > 0):
      raise ValueError(f"dataset {self.name!r}: num_classes={self.num_classes} does not fit {self.kind.name}")
    unknown = set(self.domains) - set(PAPER_DOMAINS)
    if not self.domains or unknown:
      raise ValueError(
        f"dataset {self.name!r}: domains {self.domains} must be non-empty, within {PAPER_DOMAINS}"
      )
    if not self.modalities or not set(self.modalities) <= set(MODALITIES):
      raise ValueError(
        f"dataset {self.name!r}: modalities {self.modalities} must be a subset of {MODALITIES}"
      )

  @property
  def has_image(self) -> bool:
    """Whether its Records carry ``image``."""
    return "image" in self.modalities

  @property
  def has_prompt(self) -> bool:
    """Whether its Records carry ``prompt`` (the text input)."""
    return "text" in self.modalities

  @property
  def has_answer(self) -> bool:
    """Whether its Records carry ``answer`` (text generation)."""
    return self.kind == TaskKind.TEXT_GENERATION


class DatasetNotPreparedError(FileNotFoundError):
  """A dataset has not been prepared (built as ArrayRecord) in the data directory.

  Attributes:
    name: the dataset's key in :data:`DATASETS`.
    command: the shell command that prepares it.
  """

  def __init__(self, name: str, message: str, command: str):
    super().__init__(message)
    self.name = name
    self.command = command


# --------------------------------------------------------------------------- raw example -> fields


def _str(value: Any) -> str:
  """A TFDS text value (bytes from ArrayRecord, str from mocks, 0-d arrays) as str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value)


def _strs(values: Iterable[Any]) -> list[str]:
  return [_str(v) for v in values]


def _image_fields(example: Mapping[str, Any], *, domain: str, keep_label: bool) -> Fields:
  label = int(example["label"]) if keep_label else 0
  return {"label": label, "domain": domain, "image": example["image"]}


def _ag_news_fields(example: Mapping[str, Any]) -> Fields:
  text = templates.news_text(_str(example["title"]), _str(example["description"]))
  return {"label": int(example["label"]), "domain": "news", "prompt": text}


def _common_gen_fields(example: Mapping[str, Any]) -> Fields:
  return {
    "label": 0,
    "domain": "common_sense_answering",
    "prompt": templates.commongen_prompt(_strs(example["concepts"])),
    "answer": templates.commongen_answer(_str(example["target"])),
  }


def _vqa_fields(example: Mapping[str, Any]) -> Fields:
  return {
    "label": 0,
    "domain": "visual_answering",
    "image": example["image"],
    "prompt": templates.vqa_prompt(_str(example["question"])),
    "answer": templates.vqa_answer(_str(example["multiple_choice_answer"])),
  }


def _mmlu_fields(example: Mapping[str, Any], *, domain: str, subject: str) -> Fields:
  choices = _strs(example["choices"])
  return {
    "label": 0,
    "domain": domain,
    "prompt": templates.mmlu_prompt(_str(example["question"]), choices, subject),
    "answer": templates.mmlu_answer(choices, int(example["answer"]), subject),
  }


# --------------------------------------------------------------------------- the table

_IC, _TC, _IG, _TG = (
  TaskKind.IMAGE_CLASSIFICATION,
  TaskKind.TEXT_CLASSIFICATION,
  TaskKind.IMAGE_GENERATION,
  TaskKind.TEXT_GENERATION,
)
_BUILDERS = "tapjax.data.sources.builders"
# TFDS' downloader/extractor (tf.io.gfile) and image encoder (tf.image) run on TensorFlow.
_CATALOG_NOTE = (
  "This downloads the source files through TFDS. Preparing (not reading) a catalog dataset needs "
  "TensorFlow in the environment that runs the command (e.g. `pip install tensorflow-cpu`)."
)


def _mmlu(name: str, subject: str, domain: str, word: str) -> DatasetSpec:
  return DatasetSpec(
    name=name,
    tfds_name=f"tap_mmlu/{subject}",
    builder_module=f"{_BUILDERS}.mmlu",
    local=True,
    train_split="test",
    test_split="validation",
    kind=_TG,
    num_classes=0,
    domains=(domain,),
    modalities=("text",),
    to_fields=functools.partial(_mmlu_fields, domain=domain, subject=word),
    reference_source=f"cais/mmlu {subject}",
  )


_SPECS = (
  DatasetSpec(
    name="tiny_imagenet",
    tfds_name="tap_tiny_imagenet",
    builder_module=f"{_BUILDERS}.tiny_imagenet",
    local=True,
    train_split="train",
    test_split="valid",
    kind=_IC,
    num_classes=200,
    domains=("finegrain_general_object",),
    modalities=("image",),
    to_fields=functools.partial(_image_fields, domain="finegrain_general_object", keep_label=True),
    reference_source="zh-plus/tiny-imagenet",
  ),
  DatasetSpec(
    name="ag_news",
    tfds_name="ag_news_subset",
    builder_module="tensorflow_datasets.datasets.ag_news_subset.ag_news_subset_dataset_builder",
    local=False,
    train_split="train",
    test_split="test",
    kind=_TC,
    num_classes=4,
    domains=("news",),
    modalities=("text",),
    to_fields=_ag_news_fields,
    reference_source="sh0416/ag_news (labels 1..4 there, 0..3 here)",
    prepare_note=_CATALOG_NOTE,
  ),
  DatasetSpec(
    name="caltech256",
    tfds_name="tap_caltech256",
    builder_module=f"{_BUILDERS}.caltech256",
    local=True,
    train_split="train",
    test_split="test",
    kind=_IG,
    num_classes=0,
    domains=("general_object",),
    modalities=("image",),
    to_fields=functools.partial(_image_fields, domain="general_object", keep_label=False),
    reference_source="ilee0022/Caltech-256",
  ),
  DatasetSpec(
    name="vqav2_small",
    tfds_name="tap_vqav2_small",
    builder_module=f"{_BUILDERS}.vqav2_small",
    local=True,
    train_split="validation",
    test_split="validation",
    kind=_TG,
    num_classes=0,
    domains=("visual_answering",),
    modalities=("image", "text"),
    to_fields=_vqa_fields,
    reference_source="merve/vqav2-small",
  ),
  _mmlu("mmlu_law", "professional_law", "law_answering", "law"),
  _mmlu("mmlu_medicine", "professional_medicine", "medicine_answering", "medicine"),
  _mmlu("mmlu_moral", "moral_scenarios", "moral_answering", "ethics"),
  DatasetSpec(
    name="cifar100",
    tfds_name="cifar100",
    builder_module="tensorflow_datasets.image_classification.cifar",
    local=False,
    train_split="train",
    test_split="test",
    kind=_IC,
    num_classes=100,
    domains=("finegrain_general_object",),
    modalities=("image",),
    to_fields=functools.partial(_image_fields, domain="finegrain_general_object", keep_label=True),
    reference_source="uoft-cs/cifar100 (fine labels)",
    prepare_note=_CATALOG_NOTE,
  ),
  DatasetSpec(
    name="common_gen",
    tfds_name="gem/common_gen",
    builder_module="tensorflow_datasets.text.gem",
    local=False,
    train_split="train",
    test_split="validation",
    kind=_TG,
    num_classes=0,
    domains=("common_sense_answering",),
    modalities=("text",),
    to_fields=_common_gen_fields,
    reference_source="allenai/common_gen (its validation has one row per reference sentence, 4,018)",
    prepare_note=_CATALOG_NOTE,
  ),
  DatasetSpec(
    name="fashion_mnist",
    tfds_name="fashion_mnist",
    builder_module="tensorflow_datasets.image_classification.mnist",
    local=False,
    train_split="train",
    test_split="test",
    kind=_IG,
    num_classes=0,
    domains=("general_object",),
    modalities=("image",),
    to_fields=functools.partial(_image_fields, domain="general_object", keep_label=False),
    reference_source="torchvision FashionMNIST",
    prepare_note=_CATALOG_NOTE,
  ),
)

DATASETS: Mapping[str, DatasetSpec] = types.MappingProxyType({s.name: s for s in _SPECS})


def dataset_spec(name: str) -> DatasetSpec:
  """The :class:`DatasetSpec` called ``name``."""
  if name not in DATASETS:
    raise KeyError(f"no dataset {name!r}; the paper's datasets are {list(DATASETS)}")
  return DATASETS[name]


# --------------------------------------------------------------------------- prepared data


def default_data_dir() -> str:
  """The TFDS data directory used when none is given: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
  return os.environ.get("TFDS_DATA_DIR") or tfds_constants.DATA_DIR


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
  """``data_dir`` as a string, or :func:`default_data_dir` when None."""
  return os.fspath(data_dir) if data_dir is not None else default_data_dir()


def builder_class(spec: DatasetSpec) -> type[tfds.core.DatasetBuilder]:
  """The TFDS builder class of ``spec`` (importing the module that registers it)."""
  importlib.import_module(spec.builder_module)
  return tfds.builder_cls(spec.tfds_name.split("/")[0])


def _version_dir(spec: DatasetSpec, data_dir: str) -> epath.Path:
  """``data_dir/name[/config]/version`` for the version the installed builder code reads."""
  cls = builder_class(spec)
  base, _, config = spec.tfds_name.partition("/")
  version = cls.VERSION
  if config:
    builder_config = cls.builder_configs.get(config)
    if builder_config is None:
      raise ValueError(f"TFDS builder {base!r} has no config {config!r}; it has {list(cls.builder_configs)}")
    version = builder_config.version or version
  return epath.Path(data_dir, base, *([config] if config else []), str(version))


def prepare_command(name: str, data_dir: str | os.PathLike | None = None) -> str:
  """The shell command that prepares dataset ``name`` in ``data_dir`` (DIR: the user's files)."""
  spec = dataset_spec(name)
  command = (
    f"python -m tapjax.data.sources.prepare {name} --data_dir {shlex.quote(resolve_data_dir(data_dir))}"
  )
  return command + (" --manual_dir DIR" if spec.local else "")


def _not_prepared(spec: DatasetSpec, data_dir: str, reason: str) -> DatasetNotPreparedError:
  command = prepare_command(spec.name, data_dir)
  lines = [
    f"Dataset {spec.name!r} (TFDS {spec.tfds_name!r}) is not prepared in {data_dir}: {reason}.",
    "Prepare it with:",
    f"  {command}",
  ]
  if spec.local:
    lines += [
      "where DIR holds its files:",
      builder_class(spec).MANUAL_DOWNLOAD_INSTRUCTIONS,
    ]
  elif spec.prepare_note:
    lines.append(spec.prepare_note)
  lines.append("tapjax/data/sources/DATASETS.md describes every dataset.")
  return DatasetNotPreparedError(spec.name, "\n".join(lines), command)


def _check_prepared(spec: DatasetSpec, data_dir: str, splits: Iterable[str]) -> None:
  """Raise :class:`DatasetNotPreparedError` unless ``spec`` is prepared with ``splits``; reads one JSON file."""
  version_dir = _version_dir(spec, data_dir)
  info_path = version_dir / "dataset_info.json"
  if not info_path.is_file():
    others = sorted(p.parent.name for p in version_dir.parent.glob("*/dataset_info.json"))
    found = (
      f" (found version(s) {others}, not the {version_dir.name} this tensorflow-datasets reads)"
      if others
      else ""
    )
    raise _not_prepared(spec, data_dir, f"{info_path} does not exist{found}")
  info = json.loads(info_path.read_text())
  file_format = info.get("fileFormat") or "tfrecord"
  if file_format != _FILE_FORMAT:
    raise _not_prepared(
      spec,
      data_dir,
      f"{version_dir} holds {file_format} files, but tfds.data_source (random access) reads {_FILE_FORMAT}; "
      f"delete that folder (or use another --data_dir) and prepare it again",
    )
  present = [s["name"] for s in info.get("splits", [])]
  missing = [s for s in splits if s not in present]
  if missing:
    raise _not_prepared(spec, data_dir, f"its prepared splits are {present}, not {missing}")


def require_prepared(names: Iterable[str] | str, data_dir: str | os.PathLike | None = None) -> None:
  """Check that the datasets ``names`` are prepared, before any heavy work.

  For each dataset, in order, its ``dataset_info.json`` must exist for the
  installed builder version, in the ArrayRecord format, with the dataset's
  train and test splits. Only metadata files are read: no download, no
  network, milliseconds per dataset.

  Raises:
    KeyError: a name that is not in :data:`DATASETS`.
    DatasetNotPreparedError: for the first dataset not prepared; its message
      names the dataset and the command that prepares it.
  """
  names = [names] if isinstance(names, str) else list(names)
  specs = [dataset_spec(n) for n in names]
  data_dir = resolve_data_dir(data_dir)
  for spec in specs:
    _check_prepared(spec, data_dir, dict.fromkeys((spec.train_split, spec.test_split)))


def _prepared_builder(spec: DatasetSpec, data_dir: str, split: str):
  """The TFDS builder of a prepared ``spec`` and the number of examples in ``split``."""
  _check_prepared(spec, data_dir, ())
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir, try_gcs=False)
  try:
    n = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(
      f"dataset {spec.name!r}: no split {split!r} ({e}); its splits are {list(builder.info.splits)} "
      "(TFDS slicing such as 'train[:1000]' is accepted)"
    ) from None
  return builder, n


def num_examples(name: str, split: str, data_dir: str | os.PathLike | None = None) -> int:
  """Examples in ``split`` of dataset ``name`` (TFDS split syntax allowed), from metadata only."""
  spec = dataset_spec(name)
  return _prepared_builder(spec, resolve_data_dir(data_dir), split)[1]


# --------------------------------------------------------------------------- loading


def _square_rgb(image: np.ndarray, size: int, where: str) -> np.ndarray:
  """uint8 ``[h, w]`` / ``[h, w, 1|3|4]`` -> uint8 ``[size, size, 3]`` (bilinear; gray repeated)."""
  img = np.asarray(image)
  if img.dtype != np.uint8:
    raise ValueError(f"{where}: image dtype is {img.dtype}, expected uint8")
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  if img.ndim == 2:
    if img.shape != (size, size):
      img = np.asarray(Image.fromarray(img, "L").resize((size, size), Image.Resampling.BILINEAR))
    return np.repeat(img[..., None], 3, axis=-1)
  if img.ndim == 3 and img.shape[-1] in (3, 4):
    if img.shape[-1] == 4:
      img = np.asarray(Image.fromarray(img, "RGBA").convert("RGB"))
    if img.shape[:2] != (size, size):
      img = np.asarray(Image.fromarray(img, "RGB").resize((size, size), Image.Resampling.BILINEAR))
    return img
  raise ValueError(f"{where}: image shape {img.shape} is none of [h, w], [h, w, 1], [h, w, 3], [h, w, 4]")


def _expected_keys(spec: DatasetSpec) -> set[str]:
  present = {"image": spec.has_image, "prompt": spec.has_prompt, "answer": spec.has_answer}
  return {"label", "domain"} | {k for k, on in present.items() if on}


def load(
  name: str,
  split: str,
  *,
  data_dir: str | os.PathLike | None = None,
  image_size: int = 64,
) -> Records:
  """One split of a prepared dataset as :class:`Records`, on the host.

  Args:
    name: a key of :data:`DATASETS`.
    split: a split of the prepared TFDS dataset (e.g. ``spec.train_split``);
      TFDS slicing such as ``"train[:1000]"`` is accepted.
    data_dir: the TFDS data directory (default :func:`default_data_dir`).
    image_size: ``S``, the side images are resized to.

  Returns:
    Records with ``label`` int32 ``[n]``, ``domain`` str ``[n]`` and, as the
    dataset has them, ``image`` uint8 ``[n, S, S, 3]`` (RGB, 0..255),
    ``prompt`` str ``[n]`` and ``answer`` str ``[n]``; rows in the order of
    the prepared split.

  Raises:
    DatasetNotPreparedError: the dataset is not prepared in ``data_dir``.
  """
  spec = dataset_spec(name)
  if image_size < 1:
    raise ValueError(f"image_size must be >= 1, got {image_size}")
  data_dir = resolve_data_dir(data_dir)
  _prepared_builder(spec, data_dir, split)
  source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False, try_gcs=False)
  n = len(source)
  keys = _expected_keys(spec)
  label = np.zeros(n, np.int32)
  domain = np.empty(n, object)
  image = np.zeros((n, image_size, image_size, 3), np.uint8) if spec.has_image else None
  prompt = np.empty(n, object) if spec.has_prompt else None
  answer = np.empty(n, object) if spec.has_answer else None
  limit = max(spec.num_classes, 1)
  for i in range(n):
    fields = spec.to_fields(source[i])
    if set(fields) != keys:
      raise ValueError(
        f"dataset {name!r}: to_fields gave fields {sorted(fields)}, the table expects {sorted(keys)}"
      )
    if not 0 <= fields["label"] < limit:
      raise ValueError(f"dataset {name!r} {split} row {i}: label {fields['label']} outside 0..{limit - 1}")
    label[i] = fields["label"]
    domain[i] = fields["domain"]
    if image is not None:
      image[i] = _square_rgb(fields["image"], image_size, f"dataset {name!r} {split} row {i}")
    if prompt is not None:
      prompt[i] = fields["prompt"]
    if answer is not None:
      answer[i] = fields["answer"]
  as_str = lambda a: None if a is None else a.astype(str)  # noqa: E731
  return Records(
    label=label, domain=as_str(domain), image=image, prompt=as_str(prompt), answer=as_str(answer)
  )
