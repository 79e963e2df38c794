"""The host-fed input pipeline: each round's batches drawn on the host, sent to the device.

A dense :class:`tapjax.FedData` puts every client's examples on the device
(``[clients, capacity, ...]``); for the paper's federations (clients of up to 33k
examples of 64x64 images) that is tens of GB. :class:`HostFeed` keeps the examples
in host memory (numpy arrays, or ``np.load(..., mmap_mode="r")`` memory maps that
read only the rows a round draws) and sends the device, per round, only the
cohort's batches: a :class:`tapjax.CohortData` of ``[cohort, draws, batch, ...]``
per data purpose (``draws = steps * accum``). A round stays ONE compiled program
(its shapes do not depend on the clients drawn).

Which examples a round draws is computed with the functions the dense round uses
(:func:`tapjax.sample_cohort`, :func:`tapjax.rng.derive`,
:func:`tapjax.local.draw_indices`, run on the device as small integer programs), so
a round on :class:`HostFeed` data trains on the same batches as the dense round and
gives the same result. The next round's batches can be prepared while the current
one runs (:meth:`HostFeed.rounds`): the cohort of round ``r`` depends on ``(root, r)``
alone.

Example::

  feed = HostFeed(examples, num_examples, client_tasks, holders=held)
  round_fn = jax.jit(alg.round, donate_argnums=0)
  for data in feed.rounds(root, range(rounds), setup.cohort_size, setup.local, alg.purposes):
    state, info = round_fn(state, frozen, data, hparams, root)
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from tapjax import federation, local
from tapjax.rng import Purpose, Stage, derive


@functools.partial(jax.jit, static_argnames=("stage", "capacity", "cfg", "purposes"))
def draw_plan(
  root: jax.Array,
  round_: jax.Array,
  ids: jax.Array,
  num_examples: jax.Array,
  *,
  stage: int,
  capacity: int,
  cfg: local.LocalConfig,
  purposes: tuple[int, ...],
) -> jax.Array:
  """``[clients, purposes, draws, batch]`` int32: the example indices each client's
  training call of each purpose draws (:func:`tapjax.local.draw_indices` with the key
  ``derive(root, stage, round_, client, purpose)``).

  Args:
    ids: ``[clients]`` global client ids; num_examples: ``[clients]`` their example counts.
    capacity: the dense federation's capacity (the permutation depends on it).
  """

  def one(cid, n):
    keys = [derive(root, stage, round_, cid, p) for p in purposes]
    return jnp.stack([local.draw_indices(k, n, capacity, cfg) for k in keys])

  return jax.vmap(one)(ids, num_examples)


class HostFeed:
  """Every client's training examples on the host; each call returns device data for
  one round or one chunk of clients.

  Args:
    examples: ``{field: [clients, capacity, ...]}`` numpy arrays (or memory maps), zero
      padded past each client's ``num_examples``, as :class:`tapjax.FedData` holds them.
    num_examples: ``[clients]`` valid examples per client.
    client_tasks: ``[clients, tasks]`` bool.
    weights: ``[clients]`` aggregation weights (default ``num_examples``).
    holders: ``[clients, components]`` bool, what each client holds
      (:func:`tapjax.federation.client_holders`).
  """

  def __init__(self, examples: dict, num_examples, client_tasks, holders, weights=None):
    self.examples = examples
    shapes = {k: np.shape(v)[:2] for k, v in examples.items()}
    if len(set(shapes.values())) != 1:
      raise ValueError(f"every field needs the same [clients, capacity] axes; got {shapes}")
    self.num_clients, self.capacity = next(iter(shapes.values()))
    self.num_examples = np.asarray(num_examples, np.int32)
    self.client_tasks = np.asarray(client_tasks, bool)
    self.holders = np.asarray(holders, bool)
    self.weights = self.num_examples.astype(np.float32) if weights is None else np.asarray(weights)
    for name, a in (("num_examples", self.num_examples), ("client_tasks", self.client_tasks)):
      if a.shape[0] != self.num_clients:
        raise ValueError(f"{name} has {a.shape[0]} clients, examples {self.num_clients}")
    if (self.num_examples > self.capacity).any():
      raise ValueError(f"a client has more examples than the capacity {self.capacity}")

  # ------------------------------------------------------------------------- device data

  def cohort_ids(self, root: jax.Array, round_: int, cohort_size: int) -> np.ndarray:
    """``[cohort]`` the clients round ``round_`` samples (as the dense round does)."""
    return np.asarray(federation.sample_cohort(root, jnp.int32(round_), self.num_clients, cohort_size))

  def data(
    self,
    ids,
    root: jax.Array,
    cfg: local.LocalConfig,
    purposes: Iterable[int],
    stage: int = Stage.FEDERATED,
    round_: int = 0,
  ) -> federation.CohortData:
    """The :class:`tapjax.CohortData` of clients ``ids``: their batches for each of
    ``purposes``, drawn with the keys of ``(stage, round_)``."""
    purposes = tuple(int(p) for p in purposes)
    if not purposes:
      raise ValueError("no data purposes to draw batches for: pass the algorithm's Algorithm.purposes")
    ids = np.asarray(ids, np.int32)
    plan = draw_plan(
      root,
      jnp.int32(round_),
      jnp.asarray(ids),
      jnp.asarray(self.num_examples[ids]),
      stage=int(stage),
      capacity=self.capacity,
      cfg=cfg,
      purposes=purposes,
    )
    idx = np.asarray(plan)  # [k, purposes, draws, batch]
    rows = ids.reshape((-1,) + (1,) * (idx.ndim - 1))
    drawn = {k: np.asarray(v[rows, idx]) for k, v in self.examples.items()}  # [k, P, draws, batch, ...]
    batches = {p: {k: jnp.asarray(v[:, i]) for k, v in drawn.items()} for i, p in enumerate(purposes)}
    return federation.CohortData(
      jnp.asarray(ids),
      batches,
      jnp.asarray(self.num_examples[ids]),
      jnp.asarray(self.client_tasks[ids]),
      jnp.asarray(self.weights[ids]),
      jnp.asarray(self.holders[ids]),
    )

  def round(
    self, root: jax.Array, round_: int, cohort_size: int, cfg: local.LocalConfig, purposes: Iterable[int]
  ) -> federation.CohortData:
    """Round ``round_``'s data: its cohort's batches for an algorithm's ``purposes``."""
    ids = self.cohort_ids(root, round_, cohort_size)
    return self.data(ids, root, cfg, purposes, Stage.FEDERATED, round_)

  def rounds(
    self,
    root: jax.Array,
    rounds: Iterable[int],
    cohort_size: int,
    cfg: local.LocalConfig,
    purposes: Iterable[int],
  ) -> Iterator[federation.CohortData]:
    """:meth:`round` for each of ``rounds``, the next one prepared in a background
    thread while the caller runs the current one."""
    purposes = tuple(purposes)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = None
      for r in rounds:
        nxt = pool.submit(self.round, root, r, cohort_size, cfg, purposes)
        if pending is not None:
          yield pending.result()
        pending = nxt
      if pending is not None:
        yield pending.result()

  def chunks(
    self,
    size: int,
    root: jax.Array,
    cfg: local.LocalConfig,
    purposes: Iterable[int] = federation.STAGE2_PURPOSES,
  ) -> Iterator[tuple[np.ndarray, federation.CohortData]]:
    """Stage 2 over every client, ``size`` at a time: ``(rows, data)`` per chunk, where
    ``rows`` are the chunk's real clients (see :func:`chunk_ids`; drop the result rows
    past ``len(rows)``)."""
    for ids in chunk_ids(self.num_clients, size):
      rows = np.unique(ids)
      yield rows, self.data(ids, root, cfg, purposes, Stage.POST, 0)


def chunk_ids(num_clients: int, size: int) -> list[np.ndarray]:
  """``[size]`` client ids per chunk, in order; the last chunk repeats its last client so
  that every call has one shape (one compiled program): of the concatenated results
  keep the first ``num_clients`` rows."""
  if size <= 0:
    raise ValueError(f"chunk size must be positive, got {size}")
  out = []
  for start in range(0, num_clients, size):
    rows = np.arange(start, min(start + size, num_clients), dtype=np.int32)
    out.append(np.concatenate([rows, np.full(size - len(rows), rows[-1], np.int32)]))
  return out


__all__ = ["HostFeed", "Purpose", "chunk_ids", "draw_plan"]
