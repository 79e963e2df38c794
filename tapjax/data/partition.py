"""General, seeded partitioners for new federations (pure numpy).

These split one dataset's examples between clients; they know nothing about
tasks or modalities (for those, see :func:`tapjax.data.layouts.build_layout`).
Every function takes an explicit ``seed`` and draws from its own
``np.random.default_rng(seed)``, so equal arguments give equal partitions.

* :func:`dirichlet_label_skew`: label skew, per class proportions drawn from
  ``Dirichlet(alpha)`` (small ``alpha``: each client sees few classes).
* :func:`lognormal_sizes`, :func:`power_law_sizes`: skewed client sizes that
  sum to ``n`` exactly; :func:`split_by_sizes` turns sizes into index arrays.
* :func:`apportion`: integer shares of ``n`` proportional to weights
  (largest-remainder rounding), the rounding rule the others use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
  "apportion",
  "dirichlet_label_skew",
  "lognormal_sizes",
  "power_law_sizes",
  "split_by_sizes",
]


def apportion(n: int, weights: np.ndarray | Sequence[float], min_size: int = 0) -> np.ndarray:
  """Integer sizes ``[k]`` that sum to ``n``, proportional to ``weights [k]``.

  Every entry first gets ``min_size``; the remaining ``n - k * min_size`` are
  shared in proportion to ``weights`` by largest remainder (floors first, then
  one more to the entries with the largest fractional parts, ties to the lower
  index).

  Returns:
    int64 ``[k]``, each ``>= min_size``, summing to ``n``.
  """
  w = np.asarray(weights, np.float64)
  if w.ndim != 1 or len(w) == 0:
    raise ValueError(f"apportion: weights must be a non-empty 1-D array, got shape {w.shape}")
  if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
    raise ValueError("apportion: weights must be finite, >= 0 and not all zero")
  k = len(w)
  if min_size < 0:
    raise ValueError(f"apportion: min_size={min_size} must be >= 0")
  rest = int(n) - k * min_size
  if rest < 0:
    raise ValueError(
      f"apportion: n={n} cannot give {k} entries at least min_size={min_size} each; "
      f"lower min_size to at most {int(n) // k} or use fewer entries"
    )
  exact = w / w.sum() * rest
  sizes = np.floor(exact).astype(np.int64)
  short = rest - int(sizes.sum())
  order = np.argsort(-(exact - sizes), kind="stable")
  sizes[order[:short]] += 1
  return sizes + min_size


def split_by_sizes(
  indices: int | np.ndarray | Sequence[int], sizes: np.ndarray | Sequence[int], *, seed: int | None = None
) -> list[np.ndarray]:
  """Cut ``indices`` (or ``arange(indices)`` for an int) into consecutive parts.

  Args:
    indices: int ``[n]`` example indices, or ``n``.
    sizes: int ``[clients]``, non-negative and summing to ``n``.
    seed: when given, the indices are shuffled with ``default_rng(seed)``
      before cutting; when None they are cut in the given order.

  Returns:
    ``clients`` int64 arrays; together they hold every index exactly once.
  """
  idx = np.arange(indices, dtype=np.int64) if np.isscalar(indices) else np.asarray(indices, np.int64)
  sz = np.asarray(sizes, np.int64)
  if sz.ndim != 1 or np.any(sz < 0):
    raise ValueError(f"split_by_sizes: sizes must be a 1-D array of counts >= 0, got {sz}")
  if int(sz.sum()) != len(idx):
    raise ValueError(
      f"split_by_sizes: sizes sum to {int(sz.sum())} but there are {len(idx)} indices; "
      "make them equal (apportion() gives sizes with an exact sum)"
    )
  if seed is not None:
    idx = np.random.default_rng(seed).permutation(idx)
  return [part.copy() for part in np.split(idx, np.cumsum(sz)[:-1])]


def lognormal_sizes(n: int, num_clients: int, *, sigma: float, seed: int, min_size: int = 1) -> np.ndarray:
  """Client sizes ``[clients]`` with lognormal spread, summing to ``n``.

  Weights are ``exp(N(0, sigma^2))`` per client (``sigma = 0`` gives equal
  sizes, larger ``sigma`` more skew); sizes follow by :func:`apportion`.

  Returns:
    int64 ``[clients]``, each ``>= min_size``, summing to ``n``.
  """
  _check_clients(num_clients)
  if not sigma >= 0:
    raise ValueError(f"lognormal_sizes: sigma={sigma} must be >= 0")
  w = np.exp(np.random.default_rng(seed).normal(0.0, sigma, num_clients))
  return apportion(n, w, min_size)


def power_law_sizes(n: int, num_clients: int, *, exponent: float, seed: int, min_size: int = 1) -> np.ndarray:
  """Client sizes ``[clients]`` following a power law (Zipf ranks), summing to ``n``.

  The client of rank ``r`` (1-based) gets weight ``r ** -exponent``; ranks are
  dealt to clients in a seeded random order. ``exponent = 0`` gives equal
  sizes.

  Returns:
    int64 ``[clients]``, each ``>= min_size``, summing to ``n``.
  """
  _check_clients(num_clients)
  if not exponent >= 0:
    raise ValueError(f"power_law_sizes: exponent={exponent} must be >= 0")
  ranks = np.random.default_rng(seed).permutation(num_clients) + 1
  return apportion(n, ranks.astype(np.float64) ** -exponent, min_size)


def dirichlet_label_skew(
  labels: np.ndarray | Sequence[int],
  num_clients: int,
  *,
  alpha: float,
  seed: int,
  min_size: int = 0,
  max_tries: int = 100,
) -> list[np.ndarray]:
  """Label-skewed partition: each class is split by ``Dirichlet(alpha)`` proportions.

  For every class, the class's examples are shuffled and cut between clients
  at the cumulative proportions of one ``Dirichlet(alpha * ones[clients])``
  draw (the scheme of Hsu et al. 2019 / Yurochkin et al. 2019). When
  ``min_size > 0`` the whole draw is repeated (up to ``max_tries`` times) until
  every client has at least ``min_size`` examples.

  Args:
    labels: int ``[n]``, the class of each example.
    num_clients: how many parts.
    alpha: concentration, > 0; small values give clients few classes each,
      large values approach an i.i.d. split.
    seed: seeds the shuffles and draws.
    min_size: least examples per client.
    max_tries: draws to attempt before giving up on ``min_size``.

  Returns:
    ``num_clients`` sorted int64 index arrays into ``labels``; together they
    hold every index exactly once.
  """
  y = np.asarray(labels)
  if y.ndim != 1:
    raise ValueError(f"dirichlet_label_skew: labels must be 1-D [n], got shape {y.shape}")
  _check_clients(num_clients)
  if not alpha > 0:
    raise ValueError(f"dirichlet_label_skew: alpha={alpha} must be > 0")
  if min_size * num_clients > len(y):
    raise ValueError(
      f"dirichlet_label_skew: {num_clients} clients x min_size={min_size} exceeds the {len(y)} examples"
    )
  rng = np.random.default_rng(seed)
  classes = np.unique(y)
  for _ in range(max(1, max_tries)):
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
      idx = rng.permutation(np.flatnonzero(y == c))
      p = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
      for client, chunk in enumerate(np.split(idx, cuts)):
        parts[client].append(chunk)
    out = [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]
    if min(len(o) for o in out) >= min_size:
      return out
  raise ValueError(
    f"dirichlet_label_skew: no draw in {max_tries} tries gave every client >= {min_size} examples "
    f"(alpha={alpha}); raise alpha, lower min_size or raise max_tries"
  )


def _check_clients(num_clients: int) -> None:
  if int(num_clients) < 1:
    raise ValueError(f"num_clients={num_clients} must be >= 1")
