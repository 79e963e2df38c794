"""The paper's federation: 30 clients on the real datasets, through the TFDS sources.

:func:`make_paper_federation` puts together the three pieces:

1. :func:`tapjax.data.sources.require_prepared` for the backbone's datasets,
   before anything heavy (a missing dataset fails in milliseconds, naming it
   and the command that prepares it);
2. the layout, :func:`tapjax.data.layouts.paper_layout`, from the prepared
   datasets' split sizes (:func:`prepared_sizes`) or a given sizes table;
3. each dataset's splits loaded once (:func:`tapjax.data.sources.load`), each
   holding's rows taken from them (``Records.take``), the task table built
   from the layout and the sources' :class:`~tapjax.data.sources.DatasetSpec`
   table (:func:`task_table`), then :func:`tapjax.data.assemble.assemble`.

The reference shares one generation head per kind: the layout's task names
already encode that (one ``text_generation`` task fed by VQAv2-small, the three
MMLU subjects and CommonGen, each with its own domain; one
``image_generation`` task fed by Caltech-256 and Fashion-MNIST).

Memory: the :class:`~tapjax.data.tasks.Federation` is dense, float32 images
padded to the longest client. With every row (the paper) and 64 x 64 images,
the FLAVA train arrays alone are 30 clients x 33,334 rows x 48 KiB = 49 GB,
and every client of a pattern holds the whole test split of its datasets.
``max_train_per_client`` / ``max_test_per_client`` cap the rows for smaller
machines; the aggregation weights (:attr:`Federation.weights`) stay the real
train counts of the layout.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from tapjax.data import layouts, sources, tokenize
from tapjax.data.assemble import ClientData, Shard, assemble
from tapjax.data.records import Records
from tapjax.data.tasks import MODALITIES, TASK_GROUPS, Federation, TaskKind, TaskSpec

__all__ = [
  "KIND_GROUP",
  "allot",
  "make_paper_federation",
  "paper_datasets",
  "prepared_sizes",
  "task_table",
]

# The expert group of each task kind (the MoME/MoTE group keys).
KIND_GROUP: Mapping[TaskKind, str] = {
  TaskKind.IMAGE_CLASSIFICATION: "image_classification",
  TaskKind.TEXT_CLASSIFICATION: "text_classification",
  TaskKind.IMAGE_GENERATION: "image_generation",
  TaskKind.TEXT_GENERATION: "text_generation",
}
assert set(KIND_GROUP.values()) == set(TASK_GROUPS)


def paper_datasets(backbone: str) -> tuple[str, ...]:
  """The datasets of ``backbone``'s layout, in pattern order (keys of :data:`tapjax.data.sources.DATASETS`)."""
  return tuple(dict.fromkeys(s.dataset for p in layouts.paper_patterns(backbone) for s in p))


def _rescaled(use: layouts.SplitUse, total: int) -> layouts.SplitUse:
  """``use`` on a split of ``total`` rows: explicit start/stop keep their fraction (floored)."""
  if total == use.total:
    return use
  scale = lambda x: None if x is None else x * total // use.total  # noqa: E731
  return dataclasses.replace(use, total=total, start=scale(use.start), stop=scale(use.stop))


def prepared_sizes(
  names: Iterable[str],
  data_dir: str | os.PathLike | None = None,
  reference: Mapping[str, layouts.DatasetSizes] = layouts.REFERENCE_SIZES,
) -> dict[str, layouts.DatasetSizes]:
  """The sizes table of prepared datasets: the reference's rules on the prepared split sizes.

  Each dataset keeps its :data:`~tapjax.data.layouts.REFERENCE_SIZES` entry
  (which split, shuffled or not, fixed seeds), with ``total`` set to the
  prepared split's size (:func:`tapjax.data.sources.num_examples`, metadata
  only). An explicit ``start`` / ``stop`` keeps its fraction of the split
  (VQAv2-small's 17,000 of 21,435 train rows become ``17000 * n // 21435``
  of ``n``). Where the prepared split has the reference's size, the entry is
  the reference's.

  Raises:
    DatasetNotPreparedError: a dataset is not prepared (run
      :func:`~tapjax.data.sources.require_prepared` first for the clear message).
  """
  out = {}
  for name in names:
    ref = reference[name]
    train = _rescaled(ref.train, sources.num_examples(name, ref.train.split, data_dir))
    test = _rescaled(ref.test, sources.num_examples(name, ref.test.split, data_dir))
    if (train, test) == (ref.train, ref.test):
      out[name] = ref
    else:
      note = f"{ref.note}; prepared split sizes: train {train.total}, test {test.total}"
      out[name] = dataclasses.replace(ref, train=train, test=test, note=note)
  return out


def task_table(
  layout: layouts.Layout, datasets: Mapping[str, sources.DatasetSpec] = sources.DATASETS
) -> tuple[TaskSpec, ...]:
  """A :class:`TaskSpec` per task of ``layout``, in :attr:`Layout.tasks` order.

  Kind and classes come from the :class:`~tapjax.data.sources.DatasetSpec` of
  the datasets feeding the task (they must agree), the group from the kind
  (:data:`KIND_GROUP`), the modalities and domains from the holdings (each
  within its dataset's), domains in :attr:`Layout.domains` order.

  Raises:
    ValueError: datasets of one task disagree on kind or classes, or a
      holding asks for a modality or domain its dataset does not have.
  """
  out = []
  for task in layout.tasks:
    holdings = [h for c in layout.clients for h in c.holdings if h.task == task]
    specs = {h.dataset: datasets[h.dataset] for h in holdings}
    for h in holdings:
      spec = specs[h.dataset]
      if not set(h.modalities) <= set(spec.modalities) or h.domain not in spec.domains:
        raise ValueError(
          f"task {task!r}: a holding of {h.dataset!r} asks for modalities {h.modalities}, domain {h.domain!r}; "
          f"the dataset has modalities {spec.modalities}, domains {spec.domains}. Fix the layout's Share"
        )
    kinds = {s.kind for s in specs.values()}
    classes = {s.num_classes for s in specs.values()}
    if len(kinds) > 1 or len(classes) > 1:
      detail = {n: (s.kind.name, s.num_classes) for n, s in specs.items()}
      raise ValueError(
        f"task {task!r} is fed by datasets of different kinds or class counts {detail}; one task "
        "(one head) needs one kind and one label space. Give them separate task names in the layout"
      )
    kind = kinds.pop()
    held_modalities = {m for h in holdings for m in h.modalities}
    held_domains = {h.domain for h in holdings}
    out.append(
      TaskSpec(
        name=task,
        kind=kind,
        group=KIND_GROUP[kind],
        modalities=tuple(m for m in MODALITIES if m in held_modalities),
        num_classes=classes.pop(),
        domains=tuple(d for d in layout.domains if d in held_domains),
      )
    )
  return tuple(out)


def allot(sizes: Iterable[int], cap: int | None) -> list[int]:
  """Rows to keep of each holding when a client keeps at most ``cap`` rows in all.

  Proportional to ``sizes`` (largest remainders, earlier holdings first on
  ties); a non-empty holding keeps at least one row while ``cap`` allows.
  ``cap=None`` or ``sum(sizes) <= cap`` keeps everything.
  """
  sizes = [int(s) for s in sizes]
  total = sum(sizes)
  if cap is None or total <= cap:
    return sizes
  keep = [s * cap // total for s in sizes]
  remainders = sorted(range(len(sizes)), key=lambda i: (-(sizes[i] * cap % total), i))
  for i in remainders[: cap - sum(keep)]:
    keep[i] += 1
  for i in range(len(sizes)):
    if sizes[i] and not keep[i]:
      donor = max(range(len(sizes)), key=lambda j: keep[j])
      if keep[donor] > 1:
        keep[donor] -= 1
        keep[i] = 1
  return keep


def _holding_records(records: Records, rows: np.ndarray, h: layouts.HoldingPlan, where: str) -> Records:
  """Rows ``rows`` of a loaded split for holding ``h``, with only the layout's modalities."""
  taken = records.take(rows)
  if len(taken) and np.any(taken.domain != h.domain):
    raise ValueError(
      f"{where}: the layout gives these rows domain {h.domain!r}, the source yields "
      f"{sorted(set(taken.domain.tolist()))}; fix the layout's Share or the dataset's to_fields"
    )
  if "image" not in h.modalities:
    taken = dataclasses.replace(taken, image=None)
  if "text" not in h.modalities:
    taken = dataclasses.replace(taken, prompt=None)
  return taken


def _check_int(name: str, value: Any, low: int, allow_none: bool = False) -> None:
  if allow_none and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}{' or None' if allow_none else ''}, got {value!r}")


def make_paper_federation(
  backbone: str,
  *,
  seed: int,
  data_dir: str | os.PathLike | None = None,
  tokenizer: Any | str | os.PathLike | None = None,
  text_len: int,
  target_len: int,
  image_size: int = 64,
  sizes: Mapping[str, layouts.DatasetSizes] | None = None,
  max_train_per_client: int | None = None,
  max_test_per_client: int | None = None,
) -> Federation:
  """The paper's 30-client federation (3 groups x 10 patterns) for ``backbone``.

  Args:
    backbone: ``"flava"`` or ``"vilt"`` (their patterns differ, see
      :mod:`tapjax.data.layouts`).
    seed: the run seed: orders the shuffled splits as the reference does
      (its scripts use 41-44) and shuffles each client's rows.
    data_dir: the TFDS data directory holding the prepared datasets (default
      :func:`tapjax.data.sources.default_data_dir`).
    tokenizer: a BERT tokenizer, the path of a local tokenizer folder, or None
      for :func:`tapjax.data.tokenize.load_tokenizer`'s default.
    text_len: ``Lt``, token slots of the prompts.
    target_len: ``La``, token slots of the answers.
    image_size: ``S``; sources resize images to ``[S, S, 3]``.
    sizes: the sizes table for the layout; None reads the prepared split
      sizes (:func:`prepared_sizes`). Its split names are the splits loaded
      (TFDS slicing such as ``"train[:1000]"`` works, with ``total`` its size).
    max_train_per_client: at most this many train rows per client, shared
      between its holdings in proportion to their sizes (:func:`allot`),
      each holding keeping the first rows of its layout rows (a seeded
      random subset for the shuffled splits). None (the paper) keeps all.
      :attr:`Federation.weights` stays the layout's real train counts.
    max_test_per_client: the same for test rows (the reference tests every
      client on the whole test split of each dataset it holds). None keeps all.

  Returns:
    The :class:`~tapjax.data.tasks.Federation`: clients ``g{group}p{pattern}``
    group-major, tasks from :func:`task_table`, domains the layout's.

  Raises:
    DatasetNotPreparedError: a dataset is not prepared (raised before any
      loading; the message names it and the command that prepares it).
    ValueError: bad arguments, or a sizes table with more rows than a
      prepared split holds.
  """
  _check_int("seed", seed, 0)
  _check_int("text_len", text_len, 2)
  _check_int("target_len", target_len, 2)
  _check_int("image_size", image_size, 1)
  _check_int("max_train_per_client", max_train_per_client, 1, allow_none=True)
  _check_int("max_test_per_client", max_test_per_client, 1, allow_none=True)
  names = paper_datasets(backbone)
  sources.require_prepared(names, data_dir)
  if sizes is None:
    sizes = prepared_sizes(names, data_dir)
  layout = layouts.paper_layout(backbone, sizes, seed=seed)
  tasks = task_table(layout)
  if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = tokenize.load_tokenizer(tokenizer)

  loaded: dict[tuple[str, str], Records] = {}
  for name in names:
    for use in (sizes[name].train, sizes[name].test):
      if (name, use.split) not in loaded:
        records = sources.load(name, use.split, data_dir=data_dir, image_size=image_size)
        if len(records) < use.total:
          raise ValueError(
            f"sizes[{name!r}] says split {use.split!r} has {use.total} rows, the prepared split has "
            f"{len(records)}; pass sizes=None to use the prepared sizes"
          )
        loaded[name, use.split] = records

  clients = []
  for plan in layout.clients:
    keep_train = allot([len(h.train) for h in plan.holdings], max_train_per_client)
    keep_test = allot([len(h.test) for h in plan.holdings], max_test_per_client)
    shards = []
    for h, k_train, k_test in zip(plan.holdings, keep_train, keep_test):
      use = sizes[h.dataset]
      where = f"client {plan.name}, {h.dataset}"
      shards.append(
        Shard(
          h.task,
          _holding_records(loaded[h.dataset, use.train.split], h.train[:k_train], h, f"{where} train"),
          _holding_records(loaded[h.dataset, use.test.split], h.test[:k_test], h, f"{where} test"),
        )
      )
    clients.append(ClientData(plan.name, plan.group, plan.pattern, tuple(shards), weight=plan.n_train))

  rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
  return assemble(
    tasks,
    layout.domains,
    clients,
    tokenizer=tokenizer,
    image_size=image_size,
    text_len=text_len,
    target_len=target_len,
    rng=rng,
  )
