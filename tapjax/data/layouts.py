"""Client layouts (federation partition plans): who holds which examples.

A layout is built from dataset *sizes* only, so a ``--dry_run`` can print the
whole federation with no data present; loaders then take the listed rows.

The paper's layouts (:func:`paper_layout`, backbones ``"flava"`` and
``"vilt"``) follow the authors' code (``TAP_final/utils/load_clients.py``,
``evaluation/load_test_data.py``, ``evaluate.py``, ``main_training.py``; line
numbers below refer to those files):

* 30 clients = 3 groups x 10 patterns; client ``g{group}p{pattern}`` is the
  reference's client id ``10 * group + pattern``.
* Train rows. Each dataset's train split is put in an order: for the
  Hugging Face sources the reference calls ``.shuffle(seed=run_seed)``
  (load_clients.py:95-97, 137-139, ...), which is
  ``np.random.default_rng(seed).permutation(len)`` (``datasets``'
  ``Dataset.shuffle``), reproduced here bit for bit; Fashion-MNIST is read
  from disk unshuffled (load_clients.py:14, 113). The first ``used`` rows of
  that order form the pool (VQAv2-small keeps 17,000 of 21,435,
  load_clients.py:21). The pool is cut into 3 contiguous group shards of
  ``len // 3`` rows, the last group taking the remainder (``split_range``,
  load_clients.py:365-370). A shard is then cut between the patterns holding
  it at ``int(size * f)`` for the fractions ``f`` in the table below: thirds
  are ``0 / 0.33 / 0.66 / 1`` (AG News load_clients.py:73-80, ViLT
  Fashion-MNIST :44-53), halves ``0 / 0.5 / 1`` (CommonGen :55-62,
  Caltech-256 :64-71, VQA :172-182). So a 40,000-row AG News shard gives
  13,200 / 13,200 / 13,600.
* Test rows are not partitioned: every client of pattern ``p`` (in every
  group) is tested on the whole test split of each dataset it holds
  (load_test_data.py builds one group, :8; evaluate.py:119-121 and :225 map
  client ``c`` to pattern ``c % 10``). VQAv2-small has one split, so its test
  rows are rows 17,000..21,435 of that split shuffled with the *fixed* seed
  42 (load_test_data.py:93-95), whatever the run seed: for a run seed other
  than 42 (the reference's scripts use 41-44, run_train.sh:4) about 79% of
  those test rows are also in the training pool. Reproduced as is.
* A client's aggregation weight is its number of train rows over all its
  holdings (main_training.py:63-64, 138): :attr:`Layout.n_train`.

Row indices are positions in the split *as the reference's source orders
it* (the Hugging Face dataset, or torchvision for Fashion-MNIST). A loader
with another row order (e.g. TFDS) gets the same counts and the same
partition rule, but not the same rows.

==  ================================  =======================================
p   FLAVA                             ViLT
==  ================================  =======================================
0   Tiny-ImageNet cls (whole shard)   Fashion-MNIST gen [0, 0.33)
1   AG News cls [0, 0.33)             same
2   AG News cls [0.33, 0.66)          same
3   Caltech-256 gen [0, 0.5)          same
4   VQAv2-small text gen [0, 0.5)     same
5   VQAv2-small text gen [0.5, 1)     same
6   MMLU law + medicine + moral       same
    (3 holdings, whole shards)
7   CIFAR-100 cls (whole shard) +     Fashion-MNIST gen [0.33, 0.66) +
    AG News cls [0.66, 1)             AG News cls [0.66, 1)
8   CommonGen text gen [0, 0.5) +     CommonGen text gen [0, 0.5) +
    Fashion-MNIST gen (whole shard)   Fashion-MNIST gen [0.66, 1)
9   CommonGen text gen [0.5, 1) +     same
    Caltech-256 gen [0.5, 1)
==  ================================  =======================================

For new federations, write a pattern table of :class:`Share` rows and call
:func:`build_layout`; :mod:`tapjax.data.partition` has label- and size-skew
partitioners for splitting further.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np

from tapjax.data.tasks import MODALITIES

__all__ = [
  "BACKBONES",
  "MODALITIES",
  "PAPER_DOMAINS",
  "REFERENCE_SIZES",
  "ClientPlan",
  "DatasetSizes",
  "HoldingPlan",
  "Layout",
  "Share",
  "SplitUse",
  "build_layout",
  "group_bounds",
  "paper_layout",
  "paper_patterns",
]

# The reference's domain ids (MoDE experts). Its own order is a Python set's
# (main_training.py:105-112), so this order is ours.
PAPER_DOMAINS: tuple[str, ...] = (
  "finegrain_general_object",
  "news",
  "general_object",
  "visual_answering",
  "law_answering",
  "medicine_answering",
  "moral_answering",
  "common_sense_answering",
)

TEST_MODES: tuple[str, ...] = ("shared", "partitioned")


# --------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class SplitUse:
  """Which rows of one split a layout draws from.

  The rows are ``order[start:stop]`` where ``order`` is
  ``np.random.default_rng(s).permutation(total)`` when ``shuffle`` (``s`` is
  ``seed``, or the layout's seed when ``seed`` is None) and ``arange(total)``
  otherwise; ``stop=None`` means ``total``.

  Attributes:
    split: the split's name in the source (for the loader).
    total: rows in that split.
    shuffle: whether the rows are put in a seeded order first.
    start: first used position in that order.
    stop: end of the used positions (exclusive), None for ``total``.
    seed: a fixed shuffle seed that overrides the layout's seed.
  """

  split: str
  total: int
  shuffle: bool
  start: int = 0
  stop: int | None = None
  seed: int | None = None

  def __post_init__(self):
    stop = self.total if self.stop is None else self.stop
    if not 0 <= self.start <= stop <= self.total:
      raise ValueError(
        f"SplitUse({self.split!r}): need 0 <= start={self.start} <= stop={stop} <= total={self.total}"
      )

  @property
  def used(self) -> int:
    """Rows drawn from the split."""
    return (self.total if self.stop is None else self.stop) - self.start

  def rows(self, layout_seed: int) -> np.ndarray:
    """int64 ``[used]``: the used rows' indices into the split, in pool order."""
    if self.shuffle:
      seed = layout_seed if self.seed is None else self.seed
      order = np.random.default_rng(seed).permutation(self.total).astype(np.int64)
    else:
      order = np.arange(self.total, dtype=np.int64)
    return order[self.start : self.stop]


@dataclasses.dataclass(frozen=True)
class DatasetSizes:
  """How a layout uses one dataset: its train and test rows, and where the counts come from.

  Attributes:
    name: the dataset key layouts refer to.
    source: where the reference loads it from.
    train: the train rows (:class:`SplitUse`).
    test: the test rows (:class:`SplitUse`).
    note: the source of every number.
  """

  name: str
  source: str
  train: SplitUse
  test: SplitUse
  note: str = ""


# Real split sizes as the reference uses them. "load_clients.py:N" and
# "load_test_data.py:N" are lines of the authors' code.
REFERENCE_SIZES: Mapping[str, DatasetSizes] = types.MappingProxyType(
  {
    d.name: d
    for d in (
      DatasetSizes(
        "tiny_imagenet",
        "zh-plus/tiny-imagenet",
        SplitUse("train", 100_000, shuffle=True),
        SplitUse("valid", 10_000, shuffle=False),
        "train 100,000 hard-coded at load_clients.py:28/41; 'valid' 10,000 (load_test_data.py:21); "
        "both the dataset card's counts",
      ),
      DatasetSizes(
        "ag_news",
        "sh0416/ag_news",
        SplitUse("train", 120_000, shuffle=True),
        SplitUse("test", 7_600, shuffle=False),
        "train 120,000 hard-coded at load_clients.py:20/33; test 7,600 (load_test_data.py:57); "
        "the TFDS catalog's ag_news_subset has the same 120,000 / 7,600",
      ),
      DatasetSizes(
        "caltech256",
        "ilee0022/Caltech-256",
        SplitUse("train", 24_791, shuffle=True),
        SplitUse("test", 3_061, shuffle=False),
        "train 24,791 hard-coded at load_clients.py:42; test (load_test_data.py:75) 3,061 INFERRED: the "
        "dataset viewer shows 'test 3.06k, validation 2.76k' of 30,607 images, and 30,607 - 3,061 (10%, "
        "rounded up) = 27,546, - 2,755 (10%, rounded up) = 24,791 matches the train count",
      ),
      DatasetSizes(
        "vqav2_small",
        "merve/vqav2-small",
        SplitUse("validation", 21_435, shuffle=True, stop=17_000),
        SplitUse("validation", 21_435, shuffle=True, start=17_000, seed=42),
        "one split, 'validation', 21,435 rows (dataset card; load_test_data.py:95 ends there); train pool "
        "= first 17,000 of the run-seed shuffle (load_clients.py:21, 189-191); test = rows 17,000..21,435 of "
        "the seed-42 shuffle (load_test_data.py:93-95)",
      ),
      DatasetSizes(
        "mmlu_law",
        "cais/mmlu professional_law",
        SplitUse("test", 1_534, shuffle=True),
        SplitUse("validation", 170, shuffle=False),
        "trains on MMLU's 'test' split, 1,534 (load_clients.py:23, 209); tests on 'validation', 170 "
        "(load_test_data.py:113; MMLU's published per-subject counts)",
      ),
      DatasetSizes(
        "mmlu_medicine",
        "cais/mmlu professional_medicine",
        SplitUse("test", 272, shuffle=True),
        SplitUse("validation", 31, shuffle=False),
        "trains on 'test', 272 (load_clients.py:25, 213); tests on 'validation', 31 (load_test_data.py:114)",
      ),
      DatasetSizes(
        "mmlu_moral",
        "cais/mmlu moral_scenarios",
        SplitUse("test", 895, shuffle=True),
        SplitUse("validation", 100, shuffle=False),
        "trains on 'test', 895 (load_clients.py:24, 217); tests on 'validation', 100 (load_test_data.py:115)",
      ),
      DatasetSizes(
        "cifar100",
        "uoft-cs/cifar100",
        SplitUse("train", 50_000, shuffle=True),
        SplitUse("test", 10_000, shuffle=False),
        "train 50,000 hard-coded at load_clients.py:27/40; test 10,000 (load_test_data.py:131); "
        "TFDS cifar100 has the same",
      ),
      DatasetSizes(
        "common_gen",
        "allenai/common_gen",
        SplitUse("train", 67_389, shuffle=True),
        SplitUse("validation", 4_018, shuffle=False),
        "train 67,389 hard-coded at load_clients.py:26/39 (TFDS gem/common_gen train is also 67,389); "
        "tests on allenai/common_gen 'validation', 4,018 rows, one per (concept set, sentence) "
        "(load_test_data.py:189); TFDS gem/common_gen 'validation' has 993 rows, one per concept set",
      ),
      DatasetSizes(
        "fashion_mnist",
        "torchvision FashionMNIST, saved to disk unshuffled",
        SplitUse("train", 60_000, shuffle=False),
        SplitUse("test", 10_000, shuffle=False),
        "len(fmnist_full) (load_clients.py:14, 22; utils/torch_to_hf.py), 60,000; test 10,000 "
        "(load_test_data.py:4); TFDS fashion_mnist has the same; never shuffled by the reference",
      ),
    )
  }
)


# --------------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class Share:
  """One row of a pattern table: a pattern's claim on one dataset.

  Within each group's shard of ``dataset`` the pattern takes rows
  ``[int(size * start), int(size * stop))``. Fractions may be floats (the
  reference's ``0.33`` / ``0.66``) or :class:`fractions.Fraction` (exact
  floors; see :meth:`part`).

  Attributes:
    dataset: a key of the sizes table.
    task: the task these rows train (the head they use).
    modalities: the input modalities, a subset of :data:`MODALITIES`.
    domain: the domain id of these rows.
    start: where the pattern's cut starts, in [0, 1].
    stop: where it ends, in (start, 1].
  """

  dataset: str
  task: str
  modalities: tuple[str, ...]
  domain: str
  start: float | Fraction = 0
  stop: float | Fraction = 1

  def __post_init__(self):
    if not 0 <= self.start < self.stop <= 1:
      raise ValueError(
        f"Share({self.dataset!r}): need 0 <= start < stop <= 1, got start={self.start}, stop={self.stop}"
      )
    if not self.modalities or not set(self.modalities) <= set(MODALITIES):
      raise ValueError(
        f"Share({self.dataset!r}): modalities {self.modalities} must be a subset of {MODALITIES}"
      )

  def part(self, k: int, m: int) -> Share:
    """This share restricted to part ``k`` of ``m`` equal parts (exact fractions)."""
    if not 0 <= k < m:
      raise ValueError(f"Share.part: need 0 <= k < m, got k={k}, m={m}")
    return dataclasses.replace(self, start=Fraction(k, m), stop=Fraction(k + 1, m))


@dataclasses.dataclass(frozen=True, eq=False)
class HoldingPlan:
  """A client's rows of one dataset.

  Attributes:
    dataset: the dataset key.
    task: the task trained on these rows.
    modalities: input modalities.
    domain: domain id.
    train: int64 ``[n_train]``, row indices into the dataset's train split.
    test: int64 ``[n_test]``, row indices into the dataset's test split.
  """

  dataset: str
  task: str
  modalities: tuple[str, ...]
  domain: str
  train: np.ndarray
  test: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class ClientPlan:
  """One client: its name ``g{group}p{pattern}`` and its holdings."""

  name: str
  group: int
  pattern: int
  holdings: tuple[HoldingPlan, ...]

  @property
  def n_train(self) -> int:
    """Train rows over all holdings (the reference's aggregation weight)."""
    return sum(len(h.train) for h in self.holdings)

  @property
  def n_test(self) -> int:
    return sum(len(h.test) for h in self.holdings)

  @property
  def tasks(self) -> tuple[str, ...]:
    """Distinct tasks, in holding order."""
    return tuple(dict.fromkeys(h.task for h in self.holdings))

  @property
  def modalities(self) -> tuple[str, ...]:
    """All input modalities, in :data:`MODALITIES` order."""
    held = {m for h in self.holdings for m in h.modalities}
    return tuple(m for m in MODALITIES if m in held)

  @property
  def domains(self) -> tuple[str, ...]:
    """Distinct domains, in holding order."""
    return tuple(dict.fromkeys(h.domain for h in self.holdings))

  @property
  def datasets(self) -> tuple[str, ...]:
    return tuple(h.dataset for h in self.holdings)


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """A federation plan: every client's rows, built from sizes only.

  Attributes:
    clients: ``[clients]`` plans, group-major (client ``g * num_patterns + p``).
    sizes: the sizes table it was built from.
    seed: the seed that ordered the shuffled splits.
    num_groups: data groups.
    num_patterns: patterns per group.
    test_mode: ``"shared"`` (every holder of a dataset is tested on all its
      test rows, as the reference) or ``"partitioned"`` (test rows cut like
      the train rows).
    backbone: the paper backbone the layout belongs to, or None.
  """

  clients: tuple[ClientPlan, ...]
  sizes: Mapping[str, DatasetSizes]
  seed: int
  num_groups: int
  num_patterns: int
  test_mode: str
  backbone: str | None = None

  def __len__(self) -> int:
    return len(self.clients)

  def client(self, name: str) -> ClientPlan:
    """The client called ``name`` (``g{group}p{pattern}``)."""
    for c in self.clients:
      if c.name == name:
        return c
    raise KeyError(f"no client {name!r}; clients are {self.names[0]} .. {self.names[-1]}")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(c.name for c in self.clients)

  @property
  def n_train(self) -> np.ndarray:
    """int64 ``[clients]``: train rows per client, the aggregation weights."""
    return np.array([c.n_train for c in self.clients], np.int64)

  @property
  def n_test(self) -> np.ndarray:
    """int64 ``[clients]``: test rows per client."""
    return np.array([c.n_test for c in self.clients], np.int64)

  @property
  def groups(self) -> np.ndarray:
    """int32 ``[clients]``."""
    return np.array([c.group for c in self.clients], np.int32)

  @property
  def patterns(self) -> np.ndarray:
    """int32 ``[clients]``."""
    return np.array([c.pattern for c in self.clients], np.int32)

  @property
  def tasks(self) -> tuple[str, ...]:
    """All tasks, in order of first appearance."""
    return tuple(dict.fromkeys(t for c in self.clients for t in c.tasks))

  @property
  def domains(self) -> tuple[str, ...]:
    """All domains: :data:`PAPER_DOMAINS` order first, others after in order of appearance."""
    held = dict.fromkeys(d for c in self.clients for d in c.domains)
    return tuple(d for d in PAPER_DOMAINS if d in held) + tuple(d for d in held if d not in PAPER_DOMAINS)

  @property
  def client_tasks(self) -> np.ndarray:
    """bool ``[clients, tasks]``: which of :attr:`tasks` each client holds."""
    return np.array([[t in c.tasks for t in self.tasks] for c in self.clients], bool)

  def describe(self) -> str:
    """A table: client x datasets x tasks x modalities x domains x train / test rows."""
    head = ("client", "datasets", "tasks", "modalities", "domains", "train", "test")
    rows = []
    for c in self.clients:
      per = [str(len(h.train)) for h in c.holdings]
      per_test = [str(len(h.test)) for h in c.holdings]
      train = f"{c.n_train}" + (f" ({'+'.join(per)})" if len(per) > 1 else "")
      test = f"{c.n_test}" + (f" ({'+'.join(per_test)})" if len(per_test) > 1 else "")
      rows.append(
        (
          c.name,
          " + ".join(c.datasets),
          " + ".join(c.tasks),
          "+".join(c.modalities),
          " + ".join(c.domains),
          train,
          test,
        )
      )
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    right = {5, 6}

    def line(r):
      return "  ".join(
        v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))
      ).rstrip()

    n = self.n_train
    title = (
      f"layout: {self.backbone or 'custom'}, seed {self.seed}, {self.num_groups} groups x "
      f"{self.num_patterns} patterns = {len(self)} clients, test rows {self.test_mode}"
    )
    foot = (
      f"train rows: total {int(n.sum())}, per client min {int(n.min())} / max {int(n.max())}; "
      f"{len(self.tasks)} tasks, {len(self.domains)} domains"
    )
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(head), sep, *(line(r) for r in rows), sep, foot])


# --------------------------------------------------------------------------- building


def group_bounds(n: int, num_groups: int) -> np.ndarray:
  """int64 ``[num_groups + 1]``: group ``g`` owns positions ``[b[g], b[g+1])`` of ``n``.

  Each group gets ``n // num_groups``; the last one also takes the remainder
  (the reference's ``split_range``, load_clients.py:365-370).
  """
  if num_groups < 1:
    raise ValueError(f"num_groups={num_groups} must be >= 1")
  per = n // num_groups
  b = np.arange(num_groups + 1, dtype=np.int64) * per
  b[-1] = n
  return b


def _cut(size: int, f: float | Fraction) -> int:
  # The reference's `start + int(size * 0.33)` (load_clients.py:49-52, 76-79):
  # Python float product, truncated; exact floor for a Fraction.
  return int(size * f)


def build_layout(
  patterns: Sequence[Sequence[Share]],
  sizes: Mapping[str, DatasetSizes],
  *,
  seed: int,
  num_groups: int = 3,
  test_mode: str = "shared",
  backbone: str | None = None,
) -> Layout:
  """Build ``num_groups * len(patterns)`` clients from a pattern table and sizes.

  For each dataset the pool of train rows (:meth:`SplitUse.rows`) is cut into
  ``num_groups`` contiguous shards (:func:`group_bounds`); in each group,
  pattern ``p`` takes ``[int(size * start), int(size * stop))`` of the shard
  for each of its :class:`Share` rows. Test rows are either the whole test
  pool for every holder (``test_mode="shared"``, the reference's rule) or cut
  the same way as the train rows (``"partitioned"``).

  Args:
    patterns: ``[patterns]`` tuples of :class:`Share`, one per client pattern.
    sizes: dataset key -> :class:`DatasetSizes`; must hold every dataset used.
    seed: orders the shuffled splits (int >= 0).
    num_groups: data groups; each pattern appears once per group.
    test_mode: ``"shared"`` or ``"partitioned"``.
    backbone: a label for tables.

  Returns:
    The :class:`Layout`, clients group-major.
  """
  if test_mode not in TEST_MODES:
    raise ValueError(f"test_mode={test_mode!r}; choose one of {TEST_MODES}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed={seed!r} must be an int >= 0")
  if not patterns or any(len(p) == 0 for p in patterns):
    raise ValueError("build_layout: every pattern needs at least one Share, and there must be a pattern")
  used = list(dict.fromkeys(s.dataset for p in patterns for s in p))
  missing = [d for d in used if d not in sizes]
  if missing:
    raise ValueError(
      f"build_layout: sizes has no entry for {missing}; it has {sorted(sizes)}. Add DatasetSizes for them "
      "(REFERENCE_SIZES holds the paper's datasets)"
    )
  _check_disjoint(patterns)

  train_pool = {d: sizes[d].train.rows(seed) for d in used}
  test_pool = {d: sizes[d].test.rows(seed) for d in used}

  def take(pool: np.ndarray, group: int, share: Share) -> np.ndarray:
    lo, hi = group_bounds(len(pool), num_groups)[group : group + 2]
    size = int(hi - lo)
    return _frozen(pool[lo + _cut(size, share.start) : lo + _cut(size, share.stop)])

  clients = []
  for g in range(num_groups):
    for p, shares in enumerate(patterns):
      holdings = []
      for s in shares:
        test = _frozen(test_pool[s.dataset]) if test_mode == "shared" else take(test_pool[s.dataset], g, s)
        holdings.append(
          HoldingPlan(
            s.dataset, s.task, tuple(s.modalities), s.domain, take(train_pool[s.dataset], g, s), test
          )
        )
      clients.append(ClientPlan(f"g{g}p{p}", g, p, tuple(holdings)))
  return Layout(tuple(clients), sizes, int(seed), num_groups, len(patterns), test_mode, backbone)


def _frozen(a: np.ndarray) -> np.ndarray:
  out = np.array(a, np.int64)
  out.setflags(write=False)
  return out


def _check_disjoint(patterns: Sequence[Sequence[Share]]) -> None:
  by_dataset: dict[str, list[tuple[int, Share]]] = {}
  for p, shares in enumerate(patterns):
    for s in shares:
      by_dataset.setdefault(s.dataset, []).append((p, s))
  for d, claims in by_dataset.items():
    claims = sorted(claims, key=lambda c: c[1].start)
    for (p0, a), (p1, b) in zip(claims, claims[1:]):
      if b.start < a.stop:
        raise ValueError(
          f"build_layout: patterns {p0} and {p1} both claim rows of {d!r} "
          f"([{a.start}, {a.stop}) and [{b.start}, {b.stop})); give them disjoint start/stop windows"
        )


# --------------------------------------------------------------------------- the paper


BACKBONES: tuple[str, ...] = ("flava", "vilt")

_IMG, _TXT, _BOTH = ("image",), ("text",), ("image", "text")
_TINY = Share("tiny_imagenet", "imagenet_image_classification", _IMG, "finegrain_general_object")
_AG = Share("ag_news", "agnews_text_classification", _TXT, "news")
_CALTECH = Share("caltech256", "image_generation", _IMG, "general_object")
_VQA = Share("vqav2_small", "text_generation", _BOTH, "visual_answering")
_LAW = Share("mmlu_law", "text_generation", _TXT, "law_answering")
_MED = Share("mmlu_medicine", "text_generation", _TXT, "medicine_answering")
_MORAL = Share("mmlu_moral", "text_generation", _TXT, "moral_answering")
_CIFAR = Share("cifar100", "cifar100_image_classification", _IMG, "finegrain_general_object")
_CGEN = Share("common_gen", "text_generation", _TXT, "common_sense_answering")
_FMNIST = Share("fashion_mnist", "image_generation", _IMG, "general_object")


def _w(share: Share, start: float, stop: float) -> Share:
  return dataclasses.replace(share, start=start, stop=stop)


# The reference's cut points (floats, truncated as it does).
_THIRDS = ((0, 0.33), (0.33, 0.66), (0.66, 1))
_HALVES = ((0, 0.5), (0.5, 1))

_PAPER_PATTERNS: Mapping[str, tuple[tuple[Share, ...], ...]] = types.MappingProxyType(
  {
    "flava": (
      (_TINY,),
      (_w(_AG, *_THIRDS[0]),),
      (_w(_AG, *_THIRDS[1]),),
      (_w(_CALTECH, *_HALVES[0]),),
      (_w(_VQA, *_HALVES[0]),),
      (_w(_VQA, *_HALVES[1]),),
      (_LAW, _MED, _MORAL),
      (_CIFAR, _w(_AG, *_THIRDS[2])),
      (_w(_CGEN, *_HALVES[0]), _FMNIST),
      (_w(_CGEN, *_HALVES[1]), _w(_CALTECH, *_HALVES[1])),
    ),
    "vilt": (
      (_w(_FMNIST, *_THIRDS[0]),),
      (_w(_AG, *_THIRDS[0]),),
      (_w(_AG, *_THIRDS[1]),),
      (_w(_CALTECH, *_HALVES[0]),),
      (_w(_VQA, *_HALVES[0]),),
      (_w(_VQA, *_HALVES[1]),),
      (_LAW, _MED, _MORAL),
      (_w(_FMNIST, *_THIRDS[1]), _w(_AG, *_THIRDS[2])),
      (_w(_CGEN, *_HALVES[0]), _w(_FMNIST, *_THIRDS[2])),
      (_w(_CGEN, *_HALVES[1]), _w(_CALTECH, *_HALVES[1])),
    ),
  }
)


def paper_patterns(backbone: str) -> tuple[tuple[Share, ...], ...]:
  """The paper's 10 client patterns for ``backbone`` (``"flava"`` or ``"vilt"``), as a Share table."""
  if backbone not in _PAPER_PATTERNS:
    raise ValueError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")
  return _PAPER_PATTERNS[backbone]


def paper_layout(backbone: str, sizes: Mapping[str, DatasetSizes] = REFERENCE_SIZES, *, seed: int) -> Layout:
  """The paper's 30-client layout for ``backbone`` (``"flava"`` or ``"vilt"``).

  Args:
    backbone: ``"flava"`` or ``"vilt"``.
    sizes: the datasets' sizes; :data:`REFERENCE_SIZES` for the real runs, or
      a small table of the same keys for tests and dry runs.
    seed: the run seed (the reference shuffles with it; its scripts use 41-44).

  Returns:
    The :class:`Layout` (3 groups x 10 patterns, test rows shared).
  """
  return build_layout(paper_patterns(backbone), sizes, seed=seed, num_groups=3, backbone=backbone)
