"""The federation assembly: Records -> Federation (tokenization, normalization, the seeded
per-client shuffle, padding, weights, errors), and the embedded federation pinned bit for bit."""

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
  ClientData,
  Records,
  Shard,
  TaskKind,
  TaskSpec,
  assemble,
  encode,
  encode_targets,
  load_tokenizer,
  make_embedded_federation,
  normalize_images,
)

# sha256 (first 16 hex digits) of dtype, shape and bytes of every array, computed from the
# embedded federation's code before it was split into sources + assembly.
PINNED = {
  "default": {
    "answer_vocab": "1f98930efb310ccc",
    "client_group": "553a24368563e236",
    "client_pattern": "808e96005af601c8",
    "client_tasks": "d0d7dfe37e74a724",
    "n_test": "b89e74d4a10d5df6",
    "n_train": "ad8adde5096bcd07",
    "test/domain": "20a50e9a78ea661d",
    "test/has_image": "9c6eada667b21146",
    "test/has_text": "aeae6d656adbb2aa",
    "test/image": "8b8f571f852b22a6",
    "test/label": "5796b1787c8a8b53",
    "test/target": "5aee957f78d1ff7b",
    "test/target_mask": "7d68758acd810ed1",
    "test/task": "fc9734eda0711681",
    "test/text": "37bef740db41c9e3",
    "test/text_mask": "93606053a4b20f05",
    "train/domain": "35236e9836b96c45",
    "train/has_image": "8a9fc4a8d593aac8",
    "train/has_text": "1d645c8c82bc4dc6",
    "train/image": "ae36f33f8097d55c",
    "train/label": "f6eb794bbd2f875f",
    "train/target": "d7f51364bca96340",
    "train/target_mask": "cb46b1f12a8b8bc9",
    "train/task": "01e40a3284a1f79e",
    "train/text": "779ea7b7d6c2da3c",
    "train/text_mask": "b961c212bdc80b91",
  },
  "two_groups": {
    "answer_vocab": "7f6fd8183f5aaf70",
    "client_group": "85e469680fbc3b77",
    "client_pattern": "49d70a59337238c9",
    "client_tasks": "9e10bdf3b3839f37",
    "n_test": "f61a3782ee8261c2",
    "n_train": "f321e4896fe912a8",
    "test/domain": "9e5d4c2f83f4f335",
    "test/has_image": "656c9b4af1aa0c6d",
    "test/has_text": "3e871618baa0abc6",
    "test/image": "32c07f41c154c76b",
    "test/label": "a900897baf7f5c94",
    "test/target": "c352db15b7eee4e2",
    "test/target_mask": "6d6e19f817644073",
    "test/task": "9d31ce5026a16fb9",
    "test/text": "3cf4378900ed677a",
    "test/text_mask": "024288da6c13c46d",
    "train/domain": "eab4511c1cd43789",
    "train/has_image": "d9b73ac60995d7e5",
    "train/has_text": "7cf362cc7582b397",
    "train/image": "43f0593f0e20bf6d",
    "train/label": "c66f8cfd40506ddd",
    "train/target": "8a13a11d55d4b4ff",
    "train/target_mask": "0bf26f32004b5dfb",
    "train/task": "b1366a3cd80b980e",
    "train/text": "1adf92e368fc1ef4",
    "train/text_mask": "c302f223ff998d58",
  },
}
BUILDS = {
  "default": {},
  "two_groups": dict(num_groups=2, examples_per_task=24, test_examples_per_task=8),
}


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


def _digest(a: np.ndarray) -> str:
  a = np.asarray(a)
  h = hashlib.sha256()
  h.update(f"{a.dtype.str}{a.shape}".encode())
  h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_embedded_federation_is_bit_identical_to_before_the_split(build, tok):
  f = make_embedded_federation(seed=0, tokenizer=tok, **BUILDS[build])
  arrays = {f"{s}/{k}": v for s in ("train", "test") for k, v in getattr(f, s).items()}
  for k in ("client_tasks", "n_train", "n_test", "answer_vocab", "client_group", "client_pattern"):
    arrays[k] = getattr(f, k)
  assert {k: _digest(v) for k, v in arrays.items()} == PINNED[build]
  groups = 1 if build == "default" else 2
  assert f.client_names == tuple(f"g{g}p{p}" for g in range(groups) for p in range(10))
  assert f.tasks == TASKS and f.domains == DOMAINS
  assert (f.image_size, f.text_len, f.target_len) == (32, 24, 8)
  np.testing.assert_array_equal(f.weights, f.n_train)


# --------------------------------------------------------------------------- a small hand-made federation

_IC, _TG = TaskKind.IMAGE_CLASSIFICATION, TaskKind.TEXT_GENERATION
S = 4
TABLE = (
  TaskSpec("shapes", _IC, "image_classification", ("image",), 3, ("a",)),
  TaskSpec("answers", _TG, "text_generation", ("image", "text"), 0, ("b", "c")),
)
DOMAIN_TABLE = ("a", "b", "c")


def _images(values) -> np.ndarray:
  """uint8 [n, S, S, 3], image i filled with values[i] (a per-row marker)."""
  return np.broadcast_to(np.asarray(values, np.uint8)[:, None, None, None], (len(values), S, S, 3)).copy()


def _cls(values, labels) -> Records:
  return Records(label=labels, domain=["a"] * len(values), image=_images(values))


def _vqa(values) -> Records:
  n = len(values)
  return Records(
    label=np.zeros(n),
    domain=["b"] * n,
    image=_images(values),
    prompt=[f"what is shown in picture {v}" for v in values],
    answer=[f"shape {v}" for v in values],
  )


def _qa(words, domain="c") -> Records:
  n = len(words)
  return Records(
    label=np.zeros(n),
    domain=[domain] * n,
    prompt=[f"question about {w}" for w in words],
    answer=[f"the {w}" for w in words],
  )


def _clients():
  return [
    ClientData(
      "first",
      0,
      0,
      (
        Shard("shapes", _cls([10, 11, 12, 13], [0, 1, 2, 0]), _cls([14, 15], [1, 2])),
        Shard("answers", _vqa([20, 21, 22]), _vqa([23])),
        Shard("answers", _qa(["cat", "dog"]), _qa(["owl"])),
      ),
    ),
    ClientData("second", 1, 3, (Shard("answers", _qa(["cat", "fox"]), _qa(["bee"])),), weight=1000),
  ]


def _assemble(tok, clients=None, seed=7):
  return assemble(
    TABLE,
    DOMAIN_TABLE,
    _clients() if clients is None else clients,
    tokenizer=tok,
    image_size=S,
    text_len=12,
    target_len=5,
    rng=np.random.default_rng(seed),
  )


def _expected_rows(tok, shards, split):
  """The rows of ``shards`` (concatenated, unshuffled) as the assembly should write them."""
  rows = []
  for shard in shards:
    r = getattr(shard, split)
    task = [t.name for t in TABLE].index(shard.task)
    for i in range(len(r)):
      row = {
        "label": r.label[i],
        "task": task,
        "domain": DOMAIN_TABLE.index(r.domain[i]),
        "has_image": r.image is not None,
        "has_text": r.prompt is not None,
        "image": np.zeros((S, S, 3), np.float32) if r.image is None else normalize_images(r.image[i]),
        "text": np.zeros(12, np.int32),
        "text_mask": np.zeros(12, np.int32),
        "target": np.zeros(5, np.int32),
        "target_mask": np.zeros(5, np.int32),
      }
      if r.prompt is not None:
        row["text"], row["text_mask"] = (a[0] for a in encode(tok, [r.prompt[i]], 12))
      if r.answer is not None:
        row["target"], row["target_mask"] = (a[0] for a in encode_targets(tok, [r.answer[i]], 5))
      rows.append(row)
  return rows


def test_rows_are_the_records_shuffled_by_the_seeded_generator(tok):
  clients = _clients()
  fed = _assemble(tok, clients, seed=7)
  rng = np.random.default_rng(7)  # documented order: per client, train then test
  for c, client in enumerate(clients):
    for split, n in (("train", fed.n_train), ("test", fed.n_test)):
      expected = _expected_rows(tok, client.shards, split)
      assert n[c] == len(expected)
      perm = rng.permutation(len(expected))
      got = getattr(fed, split)
      for j, src in enumerate(perm):
        for k in EXAMPLE_FIELDS:
          np.testing.assert_array_equal(got[k][c, j], expected[src][k], err_msg=f"{c} {split} {j} {k}")
      for k in EXAMPLE_FIELDS:  # padding rows are zeros
        assert not got[k][c, n[c] :].any(), (c, split, k)
  assert fed.train["image"].shape == (2, 9, S, S, 3) and fed.test["text"].shape == (2, 4, 12)


def test_tables_weights_vocabulary_and_mixed_modalities(tok):
  fed = _assemble(tok)
  assert fed.tasks == TABLE and fed.domains == DOMAIN_TABLE and fed.client_names == ("first", "second")
  np.testing.assert_array_equal(fed.n_train, [9, 2])
  np.testing.assert_array_equal(fed.n_test, [4, 1])
  np.testing.assert_array_equal(fed.weights, [9, 1000])  # None -> the train rows; else as given
  np.testing.assert_array_equal(fed.client_tasks, [[True, True], [False, True]])
  np.testing.assert_array_equal(fed.client_group, [0, 1])
  np.testing.assert_array_equal(fed.client_pattern, [0, 3])
  # One task, two input kinds: image+text rows and text-only rows.
  n = fed.n_train[0]
  gen = fed.train["task"][0, :n] == 1
  combos = set(zip(fed.train["has_image"][0, :n][gen].tolist(), fed.train["has_text"][0, :n][gen].tolist()))
  assert combos == {(True, True), (False, True)}
  answers = [
    "shape 20",
    "shape 21",
    "shape 22",
    "shape 23",
    "the cat",
    "the dog",
    "the owl",
    "the fox",
    "the bee",
  ]
  ids = encode_targets(tok, answers, 5)[0]
  expected = np.unique(np.concatenate([ids.ravel(), [tok.pad_token_id, tok.sep_token_id]]))
  np.testing.assert_array_equal(fed.answer_vocab, expected)
  assert fed.answer_vocab.dtype == np.int32


def test_uint8_and_float_images_normalize_alike():
  u8 = np.array([[[[0, 128, 255]]]], np.uint8)
  np.testing.assert_allclose(normalize_images(u8), ((u8 / 255.0) - CIFAR100_MEAN) / CIFAR100_STD, atol=1e-6)
  np.testing.assert_allclose(normalize_images(u8), normalize_images(u8 / 255.0), atol=1e-6)
  assert normalize_images(u8).dtype == np.float32
  with pytest.raises(ValueError, match="uint8"):
    normalize_images(np.zeros((1, 1, 1, 3), np.int32))


def _replace_shard(shard: Shard, **train) -> list[ClientData]:
  import dataclasses

  bad = dataclasses.replace(shard, train=dataclasses.replace(shard.train, **train))
  return [ClientData("only", 0, 0, (bad,))]


@pytest.mark.parametrize(
  "clients, message",
  [
    (
      [ClientData("x", 0, 0, (Shard("nope", _qa(["a"]), _qa(["b"])),))],
      "task 'nope', which is not in the task table",
    ),
    (
      _replace_shard(Shard("shapes", _cls([1], [0]), _cls([2], [0])), image=np.zeros((1, 5, 5, 3), np.uint8)),
      "expected \\(4, 4, 3\\)",
    ),
    (
      _replace_shard(Shard("shapes", _cls([1], [0]), _cls([2], [0])), label=np.array([3])),
      "labels span 3..3, the task takes 0..2",
    ),
    (
      _replace_shard(Shard("shapes", _cls([1], [0]), _cls([2], [0])), prompt=np.array(["hi"])),
      "carry prompts",
    ),
    (_replace_shard(Shard("answers", _qa(["a"]), _qa(["b"])), answer=None), "carry no answers"),
    (_replace_shard(Shard("answers", _qa(["a"]), _qa(["b"])), domain=np.array(["a"])), "domains \\['a'\\]"),
    ([ClientData("x", 0, 0, ()), ClientData("x", 0, 1, ())], "client names must be unique"),
  ],
)
def test_clear_errors(tok, clients, message):
  with pytest.raises(ValueError, match=message):
    _assemble(tok, clients)
