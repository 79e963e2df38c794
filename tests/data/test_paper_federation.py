"""The paper's 30-client federation (FLAVA and ViLT) over mocked TFDS data.

Every dataset is "prepared" as metadata files only (``dataset_info.json`` with
small split sizes, as ``prepare`` leaves them) and read under
``tfds.testing.mock_data`` with a data source that serves fixture rows. Each
fixture row carries its own index: image datasets fill the image with
``1 + row (+ 100 in a separate test split)``, text datasets write
``"<split> <row>"`` into the answer (generation) or the prompt
(classification). Reading the markers back out of the Federation shows which
source rows each client got. Nothing is downloaded; TensorFlow is not needed.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses
import re
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfds_fixtures import fake_prepared
from tapjax.data import CIFAR100_MEAN, CIFAR100_STD, TaskKind, load_tokenizer, tokenize
from tapjax.data import layouts, sources
from tapjax.data.paper import allot, make_paper_federation, paper_datasets, prepared_sizes
from tapjax.data.sources import DATASETS, DatasetNotPreparedError, dataset_spec

S, LT, LA, SEED = 16, 16, 12, 41

# Prepared split sizes of the fixture (VQAv2-small has one split for train and test).
COUNTS = {
  "tiny_imagenet": {"train": 30, "valid": 6},
  "ag_news": {"train": 36, "test": 5},
  "caltech256": {"train": 24, "test": 4},
  "vqav2_small": {"validation": 27},
  "mmlu_law": {"test": 12, "validation": 3},
  "mmlu_medicine": {"test": 9, "validation": 2},
  "mmlu_moral": {"test": 9, "validation": 2},
  "cifar100": {"train": 21, "test": 4},
  "common_gen": {"train": 30, "validation": 5},
  "fashion_mnist": {"train": 30, "test": 4},
}


def _value(name: str, split: str, i: int) -> int:
  spec = dataset_spec(name)
  return 1 + i + (100 if split == spec.test_split != spec.train_split else 0)


def _image(name, split, i, channels=3):
  return np.full((S, S, channels), _value(name, split, i), np.uint8)


def _mmlu(name, split, i):
  return {"question": "which one?", "choices": [f"{split} {i}", "b", "c", "d"], "answer": 0}


# dataset -> (split, row) -> the raw TFDS example (features as the builders define them).
RAW = {
  "tiny_imagenet": lambda s, i: {"image": _image("tiny_imagenet", s, i), "label": i % 200},
  "ag_news": lambda s, i: {"title": f"{s} {i}", "description": "market news", "label": i % 4},
  "caltech256": lambda s, i: {"image": _image("caltech256", s, i), "label": 7},
  "vqav2_small": lambda s, i: {
    "image": _image("vqav2_small", s, i),
    "question": "what is it?",
    "multiple_choice_answer": f"{s} {i}",
  },
  "mmlu_law": lambda s, i: _mmlu("mmlu_law", s, i),
  "mmlu_medicine": lambda s, i: _mmlu("mmlu_medicine", s, i),
  "mmlu_moral": lambda s, i: _mmlu("mmlu_moral", s, i),
  "cifar100": lambda s, i: {"image": _image("cifar100", s, i), "label": i % 100, "coarse_label": 0},
  "common_gen": lambda s, i: {"concepts": ["dog", "run"], "target": f"{s} {i}"},
  "fashion_mnist": lambda s, i: {"image": _image("fashion_mnist", s, i, channels=1), "label": i % 10},
}
BY_TFDS_NAME = {spec.tfds_name: name for name, spec in DATASETS.items()}


def _fixture_source(builder, split, decoders=None, deserialize_method=None, **kwargs):
  """Stands in for ``DatasetBuilder.as_data_source``: the fixture rows of one split."""
  full = builder.name + (f"/{builder.builder_config.name}" if builder.builder_config else "")
  name = BY_TFDS_NAME[full]
  return [RAW[name](split, i) for i in range(COUNTS[name][split])]


def _prepare_metadata(data_dir, names):
  """Every dataset in ``names`` "prepared" with the fixture's split sizes, no data files."""
  for name in names:
    fake_prepared(name, data_dir, COUNTS[name])


# ViLT is built from an explicit sizes table: the reference's rules, the fixture's
# sizes, but VQAv2-small cut at 20 (not 17000/21435 of 27 = 21) and only the first
# 27 of Fashion-MNIST's 30 train rows.
def _vilt_sizes():
  out = {}
  for name in paper_datasets("vilt"):
    ref = layouts.REFERENCE_SIZES[name]
    train = dataclasses.replace(ref.train, total=COUNTS[name][ref.train.split], start=0, stop=None)
    test = dataclasses.replace(ref.test, total=COUNTS[name][ref.test.split], start=0, stop=None)
    out[name] = dataclasses.replace(ref, train=train, test=test)
  vqa = out["vqav2_small"]
  out["vqav2_small"] = dataclasses.replace(
    vqa, train=dataclasses.replace(vqa.train, stop=20), test=dataclasses.replace(vqa.test, start=20)
  )
  fmnist = out["fashion_mnist"]
  out["fashion_mnist"] = dataclasses.replace(fmnist, train=dataclasses.replace(fmnist.train, total=27))
  return out


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  _prepare_metadata(path, DATASETS)
  return path


@pytest.fixture(scope="module")
def built(data_dir, tok):
  """backbone -> (federation, the layout it should follow)."""
  kw = dict(seed=SEED, data_dir=data_dir, tokenizer=tok, text_len=LT, target_len=LA, image_size=S)
  with tfds.testing.mock_data(
    policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(data_dir), as_data_source_fn=_fixture_source
  ):
    flava = make_paper_federation("flava", **kw)
    vilt = make_paper_federation("vilt", sizes=_vilt_sizes(), **kw)
    capped = make_paper_federation("flava", max_train_per_client=5, max_test_per_client=3, **kw)
  flava_layout = layouts.paper_layout("flava", prepared_sizes(paper_datasets("flava"), data_dir), seed=SEED)
  vilt_layout = layouts.paper_layout("vilt", _vilt_sizes(), seed=SEED)
  return {"flava": (flava, flava_layout), "vilt": (vilt, vilt_layout), "capped": (capped, flava_layout)}


# --------------------------------------------------------------------------- expectations, by hand

_IC, _TC, _IG, _TG = TaskKind
_FG, _NEWS, _OBJ, _VQA = "finegrain_general_object", "news", "general_object", "visual_answering"
_LAW, _MED, _MORAL, _CS = "law_answering", "medicine_answering", "moral_answering", "common_sense_answering"
_QA_DOMAINS = (_VQA, _LAW, _MED, _MORAL, _CS)
TASKS = {
  "flava": {
    "imagenet_image_classification": (_IC, 200, ("image",), (_FG,)),
    "agnews_text_classification": (_TC, 4, ("text",), (_NEWS,)),
    "image_generation": (_IG, 0, ("image",), (_OBJ,)),
    "text_generation": (_TG, 0, ("image", "text"), _QA_DOMAINS),
    "cifar100_image_classification": (_IC, 100, ("image",), (_FG,)),
  },
  "vilt": {
    "image_generation": (_IG, 0, ("image",), (_OBJ,)),
    "agnews_text_classification": (_TC, 4, ("text",), (_NEWS,)),
    "text_generation": (_TG, 0, ("image", "text"), _QA_DOMAINS),
  },
}
IMG, TXT, BOTH = (True, False), (False, True), (True, True)  # (has_image, has_text)
# pattern -> {(task, domain): (dataset, (has_image, has_text))}
_AG = {("agnews_text_classification", _NEWS): ("ag_news", TXT)}
_CALTECH = {("image_generation", _OBJ): ("caltech256", IMG)}
_FMNIST = {("image_generation", _OBJ): ("fashion_mnist", IMG)}
_VQA_H = {("text_generation", _VQA): ("vqav2_small", BOTH)}
_CGEN = {("text_generation", _CS): ("common_gen", TXT)}
_MMLU = {
  ("text_generation", _LAW): ("mmlu_law", TXT),
  ("text_generation", _MED): ("mmlu_medicine", TXT),
  ("text_generation", _MORAL): ("mmlu_moral", TXT),
}
PATTERNS = {
  "flava": (
    {("imagenet_image_classification", _FG): ("tiny_imagenet", IMG)},
    _AG,
    _AG,
    _CALTECH,
    _VQA_H,
    _VQA_H,
    _MMLU,
    {("cifar100_image_classification", _FG): ("cifar100", IMG), **_AG},
    {**_CGEN, **_FMNIST},
    {**_CGEN, **_CALTECH},
  ),
  "vilt": (
    _FMNIST,
    _AG,
    _AG,
    _CALTECH,
    _VQA_H,
    _VQA_H,
    _MMLU,
    {**_FMNIST, **_AG},
    {**_CGEN, **_FMNIST},
    {**_CGEN, **_CALTECH},
  ),
}


# --------------------------------------------------------------------------- reading rows back


def _marker(row: dict, dataset: str, tok) -> tuple[bool, int]:
  """``(from the separate test split, source row)`` of one Federation row."""
  spec = dataset_spec(dataset)
  if row["has_image"]:
    v = int(np.rint((row["image"][0, 0] * CIFAR100_STD + CIFAR100_MEAN)[0] * 255))
    assert np.allclose(row["image"], row["image"][0, 0])  # the whole image is the marker
    return v > 100, (v - 1) % 100
  ids, mask = (row["target"], row["target_mask"]) if spec.has_answer else (row["text"], row["text_mask"])
  split, i = re.search(r"(train|test|validation|valid) (\d+)", tok.decode(ids[mask > 0])).groups()
  return split == spec.test_split != spec.train_split, int(i)


def _rows(fed, split: str, c: int) -> list[dict]:
  arrays, n = getattr(fed, split), getattr(fed, f"n_{split}")[c]
  return [{k: v[c, j] for k, v in arrays.items()} for j in range(n)]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("backbone", ["flava", "vilt"])
def test_clients_tasks_modalities_domains(built, backbone):
  fed, layout = built[backbone]
  assert fed.num_clients == 30
  assert fed.client_names == tuple(f"g{g}p{p}" for g in range(3) for p in range(10))
  np.testing.assert_array_equal(fed.client_group, np.repeat(np.arange(3), 10))
  np.testing.assert_array_equal(fed.client_pattern, np.tile(np.arange(10), 3))
  table = {t.name: (t.kind, t.num_classes, t.modalities, t.domains) for t in fed.tasks}
  assert table == TASKS[backbone]
  assert {t.name: t.group for t in fed.tasks} == {t: TASKS[backbone][t][0].name.lower() for t in table}
  expected_domains = layouts.PAPER_DOMAINS[backbone == "vilt" :]  # ViLT has no fine-grained objects
  assert fed.domains == expected_domains
  for c in range(30):
    expected = PATTERNS[backbone][c % 10]
    held = {fed.tasks[t].name for t in np.flatnonzero(fed.client_tasks[c])}
    assert held == {task for task, _ in expected}, c
    for split in ("train", "test"):
      seen = {
        (fed.tasks[r["task"]].name, fed.domains[r["domain"]]): (bool(r["has_image"]), bool(r["has_text"]))
        for r in _rows(fed, split, c)
      }
      assert seen == {k: mods for k, (_, mods) in expected.items()}, (c, split)
  assert fed.train["image"].shape[2:] == (S, S, 3) and fed.train["text"].shape[2:] == (LT,)


@pytest.mark.parametrize("backbone", ["flava", "vilt"])
def test_every_holding_holds_exactly_its_layout_rows(built, backbone, tok):
  fed, layout = built[backbone]
  np.testing.assert_array_equal(fed.n_train, layout.n_train)
  np.testing.assert_array_equal(fed.n_test, layout.n_test)
  np.testing.assert_array_equal(fed.weights, layout.n_train)
  for c, plan in enumerate(layout.clients):
    for split in ("train", "test"):
      by_holding = {}
      for r in _rows(fed, split, c):
        by_holding.setdefault((fed.tasks[r["task"]].name, fed.domains[r["domain"]]), []).append(r)
      assert len(by_holding) == len(plan.holdings)
      for h in plan.holdings:
        rows = by_holding[h.task, h.domain]
        markers = [_marker(r, h.dataset, tok) for r in rows]
        separate = (
          split == "test" and dataset_spec(h.dataset).test_split != dataset_spec(h.dataset).train_split
        )
        assert {m[0] for m in markers} == {separate}, (plan.name, h.dataset, split)
        assert sorted(m[1] for m in markers) == sorted(getattr(h, split).tolist()), (
          plan.name,
          h.dataset,
          split,
        )
        classes = dataset_spec(h.dataset).num_classes
        for r, (_, i) in zip(rows, markers):
          assert r["label"] == (i % classes if classes else 0)


def test_sizes_come_from_the_prepared_splits(built, data_dir):
  sizes = prepared_sizes(paper_datasets("flava"), data_dir)
  assert sizes["ag_news"].train.total == 36 and sizes["ag_news"].test.total == 5
  vqa = sizes["vqav2_small"]  # the reference's 17,000 of 21,435, on 27 rows
  assert (vqa.train.total, vqa.train.stop, vqa.test.start, vqa.test.seed) == (27, 21, 21, 42)
  flava, _ = built["flava"]
  # Every train row of every dataset goes to one client (VQAv2-small: its 21-row pool).
  assert int(flava.n_train.sum()) == 30 + 36 + 24 + 21 + 12 + 9 + 9 + 21 + 30 + 30


def test_caps_keep_the_first_rows_and_the_real_weights(built, tok):
  fed, layout = built["capped"]
  np.testing.assert_array_equal(fed.weights, layout.n_train)  # aggregation weights: the real counts
  np.testing.assert_array_equal(fed.n_train, np.minimum(layout.n_train, 5))
  np.testing.assert_array_equal(fed.n_test, np.minimum(layout.n_test, 3))
  for c, plan in enumerate(layout.clients):
    for split, cap in (("train", 5), ("test", 3)):
      keep = allot([len(getattr(h, split)) for h in plan.holdings], cap)
      rows = _rows(fed, split, c)
      for h, k in zip(plan.holdings, keep):
        got = [
          _marker(r, h.dataset, tok)[1]
          for r in rows
          if (fed.tasks[r["task"]].name, fed.domains[r["domain"]]) == (h.task, h.domain)
        ]
        assert sorted(got) == sorted(getattr(h, split)[:k].tolist())


def test_allot():
  assert allot([511, 90, 298], 256) == [145, 26, 85]  # 145.6, 25.6, 84.8: the largest remainders
  assert sum(allot([511, 90, 298], 256)) == 256
  assert allot([100, 1], 10) == [9, 1]  # every holding keeps a row
  assert allot([3, 0], 2) == [2, 0]
  assert allot([4, 4], None) == [4, 4] and allot([4, 4], 9) == [4, 4]


def _fail_if_called(*args, **kwargs):
  raise AssertionError("data or the tokenizer was loaded before the prepared-data check")


@pytest.mark.parametrize("backbone, first", [("flava", "tiny_imagenet"), ("vilt", "fashion_mnist")])
def test_missing_data_fails_fast_before_loading_anything(backbone, first, tmp_path, monkeypatch):
  for target, attr in ((sources, "load"), (tokenize, "load_tokenizer"), (tfds, "data_source")):
    monkeypatch.setattr(target, attr, _fail_if_called)
  start = time.perf_counter()
  with pytest.raises(DatasetNotPreparedError) as err:
    make_paper_federation(backbone, seed=0, data_dir=tmp_path, text_len=LT, target_len=LA)
  assert time.perf_counter() - start < 1.0
  assert err.value.name == first and f"prepare {first}" in str(err.value)
  # All but one prepared: that one is named.
  _prepare_metadata(tmp_path, [n for n in paper_datasets(backbone) if n != "mmlu_moral"])
  with pytest.raises(DatasetNotPreparedError, match="'mmlu_moral'") as err:
    make_paper_federation(backbone, seed=0, data_dir=tmp_path, text_len=LT, target_len=LA)
  assert err.value.command.startswith("python -m tapjax.data.sources.prepare mmlu_moral")


# --------------------------------------------------------------------------- one round on it


def test_one_round_of_tap_and_of_disentafl_on_the_paper_federation(built):
  """The experiment's world (``experiments.run.build``: tiny backbone, the paper federation
  as given, the host-fed pipeline as the paper configs run it) trains: one TAP round and
  one DisentAFL round on their host-drawn batches, finite, the global model moves, TAP
  replaces every task its cohort trained (a first visit always copies)."""
  import jax

  import tapjax
  from experiments import run
  from experiments.configs import tiny

  fed, _ = built["flava"]
  cfg = tiny.get_config()
  cfg.federation, cfg.image_size, cfg.text_len, cfg.target_len = "paper_flava", S, LT, LA
  cfg.stream = True
  w = run.build(cfg, fed=fed)
  feed = w["feed"]
  assert w["train"] is None and np.array_equal(feed.weights, fed.weights)
  # holders follow the examples: MMLU (text only, 3 domains) under the image+text
  # text-generation head holds no image component and no VQA domain expert
  names, held = w["cm"].names, feed.holders
  has = lambda client: {names[i] for i in np.flatnonzero(held[fed.client_names.index(client)])}
  mmlu, vqa = has("g0p6"), has("g0p4")
  assert "encoder/text" in mmlu and not any("image" in n for n in mmlu), sorted(mmlu)
  assert "encoder/image" in vqa and not any(n.endswith("/domain/law_answering") for n in vqa)
  assert any(n.endswith("/domain/law_answering") for n in mmlu)
  # on the host: an eager jnp op per leaf shape would compile a program each
  leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
  moved = lambda a, b: max(float(np.abs(x - y).max()) for x, y in zip(leaves(a), leaves(b)))
  finite = lambda t: all(bool(np.isfinite(x).all()) for x in leaves(t))

  tap = tapjax.tap(w["setup"])
  data = feed.round(w["root"], 0, cfg.cohort_size, w["setup"].local, tap.purposes)
  draws = cfg.local_steps * cfg.accum
  assert data.batches[int(tapjax.rng.Purpose.GLOBAL_DATA)]["image"].shape == (
    2,
    draws,
    cfg.batch_size,
    S,
    S,
    3,
  )
  state, info = jax.jit(tap.round)(
    jax.jit(tap.init, static_argnums=1)(w["params"], 30), w["frozen"], data, w["hp"], w["root"]
  )
  assert finite(state.server.params) and finite(state.personal)
  assert moved(state.server.params, w["params"]) > 0
  cohort = np.asarray(info.clients)
  # every task the round trained is replaced (first visit: the student loss is +inf)
  active = np.asarray(info.active)
  assert active.any() and not (active & ~fed.client_tasks[cohort]).any()
  np.testing.assert_array_equal(np.asarray(info.replaced), active)

  model = w["model"]
  d_setup = tapjax.disentafl_setup(w["setup"], model.apply_with_latents, model.num_latent_groups)
  alg = tapjax.fedavg(d_setup)
  frozen = tapjax.OrthoFrozen.create(w["frozen"], 0.5)
  d_data = feed.round(w["root"], 0, cfg.cohort_size, w["setup"].local, alg.purposes)
  d_state, d_info = jax.jit(alg.round)(
    jax.jit(alg.init, static_argnums=1)(w["params"], 30), frozen, d_data, w["hp"], w["root"]
  )
  assert finite(d_state.server.params) and np.isfinite(np.asarray(d_info.global_loss)).all()
  assert moved(d_state.server.params, w["params"]) > 0
  np.testing.assert_array_equal(np.asarray(d_info.clients), cohort)  # same cohort draw as TAP's
