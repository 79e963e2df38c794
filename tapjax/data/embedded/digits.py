"""The embedded federation's real images: scikit-learn's 1797 8x8 handwritten digits (no download).

One pool of base digits serves two tasks (classification and generation): it
is shuffled once and cut into ``[group][part]`` blocks (:func:`partition`), so
no base image serves two holdings. :func:`records` upsamples base digits to
``[S, S, 3]`` with random scale, shift, contrast and noise; when a holding
asks for more examples than its block has base images, :func:`cycle` repeats
them (each repeat gets fresh augmentation).
"""

from __future__ import annotations

import numpy as np

from tapjax.data.records import Records

__all__ = ["DOMAIN", "augment", "cycle", "load", "partition", "records"]

DOMAIN = "handwritten"


def load() -> tuple[np.ndarray, np.ndarray]:
  """``(images [1797, 8, 8] in [0, 1], labels [1797])`` from scikit-learn (no download)."""
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("the embedded federation needs scikit-learn: pip install 'tapjax[model]'.") from e
  d = load_digits()
  return (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)


def _bilinear_weights(start: np.ndarray, scale: np.ndarray, size: int, src: int) -> np.ndarray:
  """Bilinear weights ``[n, size, src]``: a ``src``-pixel axis placed at ``start [n]``, scaled
  by ``scale [n]`` (zero outside the source)."""
  out = np.arange(size, dtype=np.float32) + 0.5
  u = (out[None, :] - start[:, None]) / scale[:, None] - 0.5  # source coordinate [n, size]
  return np.maximum(0.0, 1.0 - np.abs(u[:, :, None] - np.arange(src, dtype=np.float32)[None, None, :]))


def augment(rng: np.random.Generator, base: np.ndarray, size: int) -> np.ndarray:
  """Digits ``[n, 8, 8]`` -> ``[n, S, S, 3]`` with random scale, shift, contrast and noise."""
  n, h, w = base.shape
  extent = rng.uniform(0.6, 0.85, n) * size  # digit side in pixels
  scale = extent / h
  slack = size - extent
  top = slack / 2 + rng.uniform(-0.4, 0.4, n) * slack
  left = slack / 2 + rng.uniform(-0.4, 0.4, n) * slack
  wy = _bilinear_weights(top, scale, size, h)  # [n, S, 8]
  wx = _bilinear_weights(left, scale, size, w)  # [n, S, 8]
  img = np.einsum("nih,nhw,njw->nij", wy, base, wx)
  floor = rng.uniform(0.0, 0.15, n)[:, None, None]
  contrast = rng.uniform(0.75, 1.0, n)[:, None, None]
  img = floor + (1 - floor) * contrast * img + rng.normal(0, 0.04, img.shape)
  return np.repeat(np.clip(img, 0, 1)[..., None], 3, axis=-1)


def partition(rng: np.random.Generator, num_groups: int, parts: int, total: int) -> list[list[np.ndarray]]:
  """Shuffled digit indices cut into ``[group][part]`` contiguous blocks."""
  perm = rng.permutation(total)
  shards = np.array_split(perm, num_groups)
  return [np.array_split(s, parts) for s in shards]


def cycle(ids: np.ndarray, n: int, what: str) -> np.ndarray:
  """``n`` of the base digit indices ``ids [m]``, repeating them in order when ``n > m``."""
  if len(ids) == 0:
    raise ValueError(f"{what}: no base digit images left for this part; lower num_groups.")
  return ids[np.arange(n) % len(ids)]


def records(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray | None, size: int) -> Records:
  """Augmented digits as Records.

  Args:
    rng: the augmentation stream.
    images: float ``[n, 8, 8]`` base digits in [0, 1].
    labels: int ``[n]`` their classes, or None for a generation task (labels 0).
    size: ``S``.

  Returns:
    Records with float64 images ``[n, S, S, 3]`` in [0, 1], domain ``"handwritten"``.
  """
  n = len(images)
  label = np.zeros(n, np.int32) if labels is None else labels
  return Records(label=label, domain=np.full(n, DOMAIN), image=augment(rng, images, size))
