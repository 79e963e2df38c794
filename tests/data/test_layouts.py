"""Client layouts (tapjax.data.layouts) and partitioners (tapjax.data.partition).

The expected tables below are written out by hand from the reference's rule
(TAP_final/utils/load_clients.py): group shard = n // 3 rows (last group takes
the remainder), then ``int(shard * 0.33)`` / ``int(shard * 0.66)`` cuts for
thirds and ``int(shard * 0.5)`` for halves; test rows are the whole test split.
"""

from fractions import Fraction

import numpy as np
import pytest

from tapjax.data import partition
from tapjax.data.layouts import (
  REFERENCE_SIZES,
  DatasetSizes,
  Share,
  SplitUse,
  build_layout,
  group_bounds,
  paper_layout,
)


def _sizes(name, train, test, *, shuffle=True):
  return DatasetSizes(name, "synthetic", SplitUse("train", train, shuffle), SplitUse("test", test, False))


# Small synthetic sizes, chosen so the reference's float cuts differ from exact
# thirds (AG News shard 103: int(33.99) = 33, not 34) and halves are odd.
SMALL = {
  "tiny_imagenet": _sizes("tiny_imagenet", 31, 7),  # shards 10 / 10 / 11
  "ag_news": _sizes("ag_news", 310, 5),  # shards 103 / 103 / 104
  "caltech256": _sizes("caltech256", 23, 4),  # shards 7 / 7 / 9
  "vqav2_small": DatasetSizes(
    "vqav2_small",
    "synthetic",
    SplitUse("validation", 30, True, stop=21),  # pool 21: shards 7 / 7 / 7
    SplitUse("validation", 30, True, start=21, seed=42),  # 9 test rows, fixed seed
  ),
  "mmlu_law": _sizes("mmlu_law", 16, 3),  # 5 / 5 / 6
  "mmlu_medicine": _sizes("mmlu_medicine", 7, 2),  # 2 / 2 / 3
  "mmlu_moral": _sizes("mmlu_moral", 10, 1),  # 3 / 3 / 4
  "cifar100": _sizes("cifar100", 12, 6),  # 4 / 4 / 4
  "common_gen": _sizes("common_gen", 17, 8),  # 5 / 5 / 7
  "fashion_mnist": _sizes("fashion_mnist", 50, 10, shuffle=False),  # 16 / 16 / 18, never shuffled
}

IMG, TXT, BOTH = ("image",), ("text",), ("image", "text")
TINY = ("tiny_imagenet", "imagenet_image_classification", IMG, "finegrain_general_object")
AG = ("ag_news", "agnews_text_classification", TXT, "news")
CAL = ("caltech256", "image_generation", IMG, "general_object")
VQA = ("vqav2_small", "text_generation", BOTH, "visual_answering")
LAW = ("mmlu_law", "text_generation", TXT, "law_answering")
MED = ("mmlu_medicine", "text_generation", TXT, "medicine_answering")
MOR = ("mmlu_moral", "text_generation", TXT, "moral_answering")
CIF = ("cifar100", "cifar100_image_classification", IMG, "finegrain_general_object")
CGN = ("common_gen", "text_generation", TXT, "common_sense_answering")
FMN = ("fashion_mnist", "image_generation", IMG, "general_object")

# pattern -> ((dataset, task, modalities, domain, train rows of groups 0/1/2, test rows), ...)
FLAVA_SMALL = {
  0: ((*TINY, (10, 10, 11), 7),),
  # AG News: 103 -> 33 / 34 / 36 (cuts 33, 67); 104 -> 34 / 34 / 36 (cuts 34, 68)
  1: ((*AG, (33, 33, 34), 5),),
  2: ((*AG, (34, 34, 34), 5),),
  # Caltech-256: 7 -> 3 / 4; 9 -> 4 / 5
  3: ((*CAL, (3, 3, 4), 4),),
  4: ((*VQA, (3, 3, 3), 9),),
  5: ((*VQA, (4, 4, 4), 9),),
  6: ((*LAW, (5, 5, 6), 3), (*MED, (2, 2, 3), 2), (*MOR, (3, 3, 4), 1)),
  7: ((*CIF, (4, 4, 4), 6), (*AG, (36, 36, 36), 5)),
  # CommonGen: 5 -> 2 / 3; 7 -> 3 / 4. Fashion-MNIST: the whole shard.
  8: ((*CGN, (2, 2, 3), 8), (*FMN, (16, 16, 18), 10)),
  9: ((*CGN, (3, 3, 4), 8), (*CAL, (4, 4, 5), 4)),
}
VILT_SMALL = {
  **FLAVA_SMALL,
  # Fashion-MNIST: 16 -> 5 / 5 / 6 (cuts 5, 10); 18 -> 5 / 6 / 7 (cuts 5, 11)
  0: ((*FMN, (5, 5, 5), 10),),
  7: ((*FMN, (5, 5, 6), 10), (*AG, (36, 36, 36), 5)),
  8: ((*CGN, (2, 2, 3), 8), (*FMN, (6, 6, 7), 10)),
}
EXPECTED = {"flava": FLAVA_SMALL, "vilt": VILT_SMALL}


def _rows(layout, dataset, part="train"):
  """All rows of ``dataset`` held by any client, concatenated."""
  return np.concatenate(
    [getattr(h, part) for c in layout.clients for h in c.holdings if h.dataset == dataset]
    or [np.zeros(0, int)]
  )


@pytest.mark.parametrize("backbone", ["flava", "vilt"])
def test_paper_layout_clients_match_hand_table(backbone):
  layout = paper_layout(backbone, SMALL, seed=7)
  table = EXPECTED[backbone]
  assert len(layout) == 30
  for i, c in enumerate(layout.clients):
    g, p = divmod(i, 10)
    assert (c.name, c.group, c.pattern) == (f"g{g}p{p}", g, p)
    got = tuple((h.dataset, h.task, h.modalities, h.domain, len(h.train), len(h.test)) for h in c.holdings)
    want = tuple((d, t, m, dom, n[g], nt) for d, t, m, dom, n, nt in table[p])
    assert got == want, c.name
    assert c.n_train == sum(n[g] for *_, n, _ in table[p])
    assert c.n_test == sum(nt for *_, nt in table[p])
  np.testing.assert_array_equal(layout.n_train, [c.n_train for c in layout.clients])


def test_paper_layout_client_summaries():
  flava = paper_layout("flava", SMALL, seed=7)
  vilt = paper_layout("vilt", SMALL, seed=7)
  assert flava.client("g1p7").tasks == ("cifar100_image_classification", "agnews_text_classification")
  assert flava.client("g1p7").modalities == ("image", "text")
  assert flava.client("g0p6").domains == ("law_answering", "medicine_answering", "moral_answering")
  assert flava.client("g0p4").modalities == ("image", "text")
  assert vilt.client("g2p0").tasks == ("image_generation",)
  assert len(flava.domains) == 8 and len(vilt.domains) == 7  # ViLT has no finegrain_general_object
  assert "finegrain_general_object" not in vilt.domains
  assert set(flava.tasks) == {
    "imagenet_image_classification",
    "agnews_text_classification",
    "image_generation",
    "text_generation",
    "cifar100_image_classification",
  }
  assert set(vilt.tasks) == {"agnews_text_classification", "image_generation", "text_generation"}
  ct = flava.client_tasks
  assert ct.shape == (30, 5) and ct[7].sum() == 2 and ct[0].sum() == 1


@pytest.mark.parametrize("backbone", ["flava", "vilt"])
def test_train_rows_disjoint_and_cover_the_pool(backbone):
  layout = paper_layout(backbone, SMALL, seed=7)
  held = {h.dataset for c in layout.clients for h in c.holdings}
  for d in held:
    rows = _rows(layout, d)
    assert len(np.unique(rows)) == len(rows), f"{d}: a train row is held twice"
    pool = (
      np.arange(SMALL[d].train.total) if d != "vqav2_small" else np.random.default_rng(7).permutation(30)[:21]
    )
    np.testing.assert_array_equal(np.sort(rows), np.sort(pool), err_msg=d)


def test_rows_follow_the_reference_order():
  flava = paper_layout("flava", SMALL, seed=7)
  vilt = paper_layout("vilt", SMALL, seed=7)
  # Hugging Face `shuffle(seed)` = default_rng(seed).permutation(n); AG News group 0, pattern 2 = [33, 67).
  perm = np.random.default_rng(7).permutation(310)
  np.testing.assert_array_equal(flava.client("g0p2").holdings[0].train, perm[33:67])
  np.testing.assert_array_equal(flava.client("g2p7").holdings[1].train, perm[206 + 68 : 310])
  # Fashion-MNIST is never shuffled: FLAVA g1p8 takes the whole shard [16, 32); ViLT g2p8 takes [43, 50).
  np.testing.assert_array_equal(flava.client("g1p8").holdings[1].train, np.arange(16, 32))
  np.testing.assert_array_equal(vilt.client("g2p8").holdings[1].train, np.arange(43, 50))
  # Test rows: the whole test split, the same for every group.
  np.testing.assert_array_equal(flava.client("g2p7").holdings[0].test, np.arange(6))
  np.testing.assert_array_equal(flava.client("g0p7").holdings[1].test, flava.client("g2p1").holdings[0].test)


def test_vqa_test_rows_use_the_fixed_seed_42():
  want = np.random.default_rng(42).permutation(30)[21:]
  for seed in (0, 7, 42):
    layout = paper_layout("flava", SMALL, seed=seed)
    np.testing.assert_array_equal(layout.client("g1p5").holdings[0].test, want)
  # With run seed 42 train and test are disjoint and cover the split; with another seed they overlap.
  at42 = paper_layout("flava", SMALL, seed=42)
  train42 = _rows(at42, "vqav2_small")
  np.testing.assert_array_equal(np.sort(np.concatenate([train42, want])), np.arange(30))
  assert np.isin(want, _rows(paper_layout("flava", SMALL, seed=7), "vqav2_small")).any()


def test_same_seed_same_layout_other_seed_differs():
  a, b, c = (paper_layout("vilt", SMALL, seed=s) for s in (3, 3, 4))
  for ca, cb, cc in zip(a.clients, b.clients, c.clients):
    for ha, hb, hc in zip(ca.holdings, cb.holdings, cc.holdings):
      np.testing.assert_array_equal(ha.train, hb.train)
      np.testing.assert_array_equal(ha.test, hb.test)
      if ha.dataset == "fashion_mnist":  # unshuffled: the seed does not matter
        np.testing.assert_array_equal(ha.train, hc.train)
  assert not np.array_equal(a.client("g0p1").holdings[0].train, c.client("g0p1").holdings[0].train)
  np.testing.assert_array_equal(a.n_train, c.n_train)


def test_real_sizes_counts():
  flava = paper_layout("flava", seed=41)
  n = dict(zip(flava.names, flava.n_train.tolist()))
  # Tiny-ImageNet 100,000 // 3 = 33,333, last group 33,334.
  assert (n["g0p0"], n["g1p0"], n["g2p0"]) == (33_333, 33_333, 33_334)
  # AG News shard 40,000: 13,200 / 13,200 / 13,600; CIFAR-100 16,666 (last 16,668).
  assert (n["g0p1"], n["g0p2"], n["g0p7"], n["g2p7"]) == (13_200, 13_200, 16_666 + 13_600, 16_668 + 13_600)
  # Caltech-256 24,791 // 3 = 8,263 -> 4,131 / 4,132; last shard 8,265 -> 4,132 / 4,133.
  # CommonGen 67,389 // 3 = 22,463 -> 11,231 / 11,232 (last shard also 22,463).
  assert (n["g0p3"], n["g2p3"], n["g0p9"], n["g2p9"]) == (4_131, 4_132, 11_232 + 4_132, 11_232 + 4_133)
  assert n["g0p8"] == 11_231 + 20_000  # Fashion-MNIST: whole 20,000 shard
  # VQAv2-small pool 17,000 // 3 = 5,666 -> 2,833 each; last shard 5,668 -> 2,834 each.
  assert (n["g0p4"], n["g0p5"], n["g2p4"], n["g2p5"]) == (2_833, 2_833, 2_834, 2_834)
  # MMLU 1,534 / 272 / 895 -> 511 + 90 + 298; last 512 + 92 + 299.
  assert (n["g0p6"], n["g2p6"]) == (899, 903)
  assert flava.n_train.min() == 899 and flava.n_train.max() == 33_334
  t = dict(zip(flava.names, flava.n_test.tolist()))
  assert (t["g0p0"], t["g1p4"], t["g2p6"], t["g0p8"], t["g0p9"]) == (10_000, 4_435, 301, 14_018, 7_079)
  vilt = paper_layout("vilt", seed=41)
  v = dict(zip(vilt.names, vilt.n_train.tolist()))
  # Fashion-MNIST shard 20,000: 6,600 / 6,600 / 6,800.
  assert (v["g0p0"], v["g1p7"], v["g2p8"]) == (6_600, 6_600 + 13_600, 11_231 + 6_800)


def test_real_rows_match_hugging_face_shuffle():
  # Golden values from `datasets` 5.2.0: Dataset.from_dict({"i": range(n)}).shuffle(seed).select(range(a, b)).
  flava = paper_layout("flava", seed=41)
  np.testing.assert_array_equal(
    flava.client("g0p2").holdings[0].train[:8], [46860, 74504, 17191, 38715, 66104, 100562, 100879, 88919]
  )
  np.testing.assert_array_equal(
    flava.client("g0p4").holdings[0].test[:8], [12501, 6431, 5862, 12910, 20725, 12973, 21147, 11361]
  )


def test_describe_lists_every_client():
  text = paper_layout("flava", SMALL, seed=7).describe()
  lines = text.splitlines()
  rows = [ln for ln in lines if ln.startswith("g")]
  assert [r.split()[0] for r in rows] == [f"g{g}p{p}" for g in range(3) for p in range(10)]
  g2p8 = next(r for r in rows if r.startswith("g2p8"))
  assert "common_gen + fashion_mnist" in g2p8 and "21 (3+18)" in g2p8 and "18 (8+10)" in g2p8
  assert "image+text" in g2p8 and "common_sense_answering + general_object" in g2p8
  assert "min 3 / max 40" in lines[-1]


def test_errors_say_what_to_do():
  with pytest.raises(ValueError, match=r"unknown backbone 'bert'.*'flava', 'vilt'"):
    paper_layout("bert", SMALL, seed=0)
  partial = {k: v for k, v in SMALL.items() if k != "cifar100"}
  with pytest.raises(ValueError, match=r"no entry for \['cifar100'\]"):
    paper_layout("flava", partial, seed=0)
  paper_layout("vilt", partial, seed=0)  # ViLT does not use CIFAR-100
  a = Share("ag_news", "cls", TXT, "news", 0, 0.5)
  with pytest.raises(ValueError, match="patterns 0 and 1 both claim rows of 'ag_news'"):
    build_layout([(a,), (Share("ag_news", "cls", TXT, "news", 0.4, 1),)], SMALL, seed=0)
  with pytest.raises(ValueError, match="start < stop"):
    Share("ag_news", "cls", TXT, "news", 0.5, 0.5)
  with pytest.raises(ValueError, match="modalities"):
    Share("ag_news", "cls", ("audio",), "news")
  with pytest.raises(ValueError, match="test_mode"):
    build_layout([(a,)], SMALL, seed=0, test_mode="split")


def test_build_layout_custom_table_exact_parts_and_partitioned_test():
  sizes = {"d": _sizes("d", 20, 11), "e": _sizes("e", 9, 6, shuffle=False)}
  base = Share("d", "cls", IMG, "x")
  table = [(base.part(0, 3),), (base.part(1, 3), Share("e", "gen", TXT, "y")), (base.part(2, 3),)]
  layout = build_layout(table, sizes, seed=1, num_groups=2, test_mode="partitioned")
  assert layout.names == ("g0p0", "g0p1", "g0p2", "g1p0", "g1p1", "g1p2")
  # d: shards of 10; exact thirds floor(10/3) = 3, floor(20/3) = 6 -> 3 / 3 / 4.
  # d test (11): shards 5 / 6 -> 1 / 2 / 2 and 2 / 2 / 2. e: shards 4 / 5, test 3 / 3.
  assert [[len(h.train) for h in c.holdings] for c in layout.clients] == [[3], [3, 4], [4], [3], [3, 5], [4]]
  assert [[len(h.test) for h in c.holdings] for c in layout.clients] == [[1], [2, 3], [2], [2], [2, 3], [2]]
  for d in ("d", "e"):
    for part in ("train", "test"):
      rows = _rows(layout, d, part)
      assert len(np.unique(rows)) == len(rows)
  np.testing.assert_array_equal(layout.client("g1p1").holdings[1].train, np.arange(4, 9))
  assert Fraction(1, 3) == base.part(1, 3).start


def test_group_bounds():
  np.testing.assert_array_equal(group_bounds(10, 3), [0, 3, 6, 10])
  np.testing.assert_array_equal(group_bounds(120_000, 3), [0, 40_000, 80_000, 120_000])


def test_reference_sizes_table():
  totals = {k: (v.train.used, v.test.used) for k, v in REFERENCE_SIZES.items()}
  assert totals == {
    "tiny_imagenet": (100_000, 10_000),
    "ag_news": (120_000, 7_600),
    "caltech256": (24_791, 3_061),
    "vqav2_small": (17_000, 4_435),
    "mmlu_law": (1_534, 170),
    "mmlu_medicine": (272, 31),
    "mmlu_moral": (895, 100),
    "cifar100": (50_000, 10_000),
    "common_gen": (67_389, 4_018),
    "fashion_mnist": (60_000, 10_000),
  }
  assert all(v.note for v in REFERENCE_SIZES.values())
  # The reference shuffles every Hugging Face train split with the run seed, never Fashion-MNIST
  # (read from disk) and never a test split, except VQAv2-small's (fixed seed 42).
  assert {k for k, v in REFERENCE_SIZES.items() if not v.train.shuffle} == {"fashion_mnist"}
  assert all(v.train.seed is None for v in REFERENCE_SIZES.values())
  assert {k: v.test.seed for k, v in REFERENCE_SIZES.items() if v.test.shuffle} == {"vqav2_small": 42}
  flava = paper_layout("flava", seed=41)
  np.testing.assert_array_equal(flava.client("g1p8").holdings[1].train, np.arange(20_000, 40_000))


# --------------------------------------------------------------------------- partitioners


def _covers_once(parts, n):
  allidx = np.concatenate(parts)
  return len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


def test_dirichlet_covers_every_index_once_and_skews():
  labels = np.repeat(np.arange(10), 60)  # 600 examples, 10 classes
  np.random.default_rng(0).shuffle(labels)

  def classes_held(parts):
    """Mean over clients of the classes that make up >= 5% of the client's examples."""
    cnt = np.array([np.bincount(labels[p], minlength=10) for p in parts])
    return ((cnt / np.maximum(cnt.sum(1, keepdims=True), 1)) >= 0.05).sum(1).mean()

  skewed = partition.dirichlet_label_skew(labels, 6, alpha=0.05, seed=1)
  near_iid = partition.dirichlet_label_skew(labels, 6, alpha=1000.0, seed=1)
  assert _covers_once(skewed, 600) and _covers_once(near_iid, 600)
  assert classes_held(skewed) < 4
  assert classes_held(near_iid) == 10
  again = partition.dirichlet_label_skew(labels, 6, alpha=0.05, seed=1)
  assert all(np.array_equal(a, b) for a, b in zip(skewed, again))
  other = partition.dirichlet_label_skew(labels, 6, alpha=0.05, seed=2)
  assert not all(np.array_equal(a, b) for a, b in zip(skewed, other))


def test_dirichlet_min_size():
  labels = np.repeat(np.arange(10), 60)
  parts = partition.dirichlet_label_skew(labels, 6, alpha=0.5, seed=3, min_size=40)
  assert min(len(p) for p in parts) >= 40 and _covers_once(parts, 600)
  with pytest.raises(ValueError, match="exceeds"):
    partition.dirichlet_label_skew(labels, 6, alpha=0.5, seed=3, min_size=101)
  with pytest.raises(ValueError, match="raise alpha"):
    partition.dirichlet_label_skew(labels, 6, alpha=0.01, seed=3, min_size=100, max_tries=2)


def test_size_skew_sums_to_n():
  for sizes in (
    partition.lognormal_sizes(1000, 7, sigma=1.5, seed=0),
    partition.power_law_sizes(1000, 7, exponent=1.2, seed=0),
  ):
    assert sizes.dtype == np.int64 and sizes.sum() == 1000 and sizes.min() >= 1
  np.testing.assert_array_equal(partition.lognormal_sizes(700, 7, sigma=0.0, seed=0), np.full(7, 100))
  np.testing.assert_array_equal(partition.power_law_sizes(700, 7, exponent=0.0, seed=0), np.full(7, 100))
  skew = partition.lognormal_sizes(10_000, 20, sigma=2.0, seed=0)
  assert skew.max() / skew.min() > 10
  pl = np.sort(partition.power_law_sizes(10_000, 5, exponent=2.0, seed=4))[::-1]
  # weights 1, 1/4, 1/9, 1/16, 1/25 of 10,000 (after 1 each): 6827 6827/4 ...
  np.testing.assert_allclose(pl[0] / pl[1], 4.0, rtol=0.01)
  tiny = partition.lognormal_sizes(10, 5, sigma=5.0, seed=0, min_size=2)
  np.testing.assert_array_equal(tiny, np.full(5, 2))


def test_apportion_and_split_by_sizes():
  np.testing.assert_array_equal(partition.apportion(10, [1, 1, 1]), [4, 3, 3])
  np.testing.assert_array_equal(partition.apportion(7, [0, 1, 3], min_size=1), [1, 2, 4])
  with pytest.raises(ValueError, match="lower min_size"):
    partition.apportion(5, [1, 1, 1], min_size=2)
  sizes = partition.power_law_sizes(50, 4, exponent=1.0, seed=0)
  parts = partition.split_by_sizes(50, sizes, seed=9)
  assert [len(p) for p in parts] == sizes.tolist() and _covers_once(parts, 50)
  np.testing.assert_array_equal(partition.split_by_sizes(np.arange(5, 10), [2, 3])[1], [7, 8, 9])
  with pytest.raises(ValueError, match="sum to 4 but there are 5"):
    partition.split_by_sizes(5, [2, 2])
