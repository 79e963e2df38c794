"""Procedural images of the embedded federation: shapes on noisy backgrounds, and VQA scenes.

Each source is ``(rng, n, image_size) -> Records`` of one task: images float64
``[n, S, S, 3]`` in [0, 1] (the assembly normalizes them), drawn i.i.d. from
``rng``, so contiguous slices of a pool are as good as a shuffle.

* :func:`shapes_gen`: 1-3 random shapes on a noisy gradient background
  (reconstruction target = input; mirrors Caltech-256 generation).
* :func:`shapes_cls`: one shape of :data:`SHAPE_KINDS` (the label; mirrors
  CIFAR-100 classification).
* :func:`vqa_gen`: 1-3 coloured shapes, a templated question, a one-word
  answer (mirrors VQAv2-small).
"""

from __future__ import annotations

import numpy as np

from tapjax.data.records import Records

__all__ = ["SHAPE_KINDS", "shapes_cls", "shapes_gen", "vqa_gen"]

SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "stripes")


def _shape_masks(kind: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, size: int) -> np.ndarray:
  """Boolean masks ``[n, S, S]`` of shapes ``kind[n]`` (indices into SHAPE_KINDS).

  Centres ``cx, cy`` and radii ``r`` are in pixels, all ``[n]``.
  """
  coords = np.arange(size, dtype=np.float32) + 0.5
  dx = coords[None, None, :] - cx[:, None, None]
  dy = coords[None, :, None] - cy[:, None, None]
  rr = r[:, None, None]
  ax, ay = np.abs(dx), np.abs(dy)
  d2 = dx * dx + dy * dy
  box = np.maximum(ax, ay)
  masks = np.stack(
    [
      d2 <= rr * rr,  # circle
      box <= 0.8 * rr,  # square
      (dy >= -rr) & (dy <= 0.75 * rr) & (ax <= (dy + rr) * 0.62),  # triangle
      ((ax <= 0.3 * rr) & (ay <= rr)) | ((ay <= 0.3 * rr) & (ax <= rr)),  # cross
      (d2 <= rr * rr) & (d2 >= (0.55 * rr) ** 2),  # ring
      (box <= 0.85 * rr) & (np.floor((dy + rr) / (0.34 * rr)) % 2 == 0),  # stripes
    ],
    axis=1,
  )  # [n, kinds, S, S]
  return np.take_along_axis(masks, kind[:, None, None, None], axis=1)[:, 0]


def _backgrounds(
  rng: np.random.Generator, base: np.ndarray, size: int, gradient: float, noise: np.ndarray
) -> np.ndarray:
  """Backgrounds ``[n, S, S, 3]``: colour ``base [n, 3]`` + a linear gradient + pixel noise ``[n]``."""
  n = len(base)
  angle = rng.uniform(0, 2 * np.pi, n)
  amp = rng.uniform(0, gradient, n)
  t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
  ramp = (
    np.cos(angle)[:, None, None] * t[None, None, :] + np.sin(angle)[:, None, None] * t[None, :, None]
  )  # [n, S, S]
  img = base[:, None, None, :] + (amp[:, None, None] * ramp)[..., None]
  img = img + rng.normal(0, 1, (n, size, size, 3)) * noise[:, None, None, None]
  return img


def _paint(img: np.ndarray, mask: np.ndarray, color: np.ndarray) -> np.ndarray:
  """Paints ``color [n, 3]`` onto ``img [n, S, S, 3]`` where ``mask [n, S, S]``."""
  return np.where(mask[..., None], color[:, None, None, :], img)


def _contrasting_colors(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Random shape colours and background colours ``[n, 3]`` that differ by >= 0.3 per channel."""
  color = rng.uniform(0, 1, (n, 3))
  background = (color + rng.uniform(0.3, 0.7, (n, 3))) % 1.0
  return color, 0.15 + 0.7 * background


def shapes_gen(rng: np.random.Generator, n: int, size: int) -> Records:
  """1-3 random shapes on a noisy gradient background (reconstruction target = input)."""
  base = rng.uniform(0.2, 0.8, (n, 3))
  img = _backgrounds(rng, base, size, gradient=0.4, noise=rng.uniform(0.01, 0.05, n))
  count = rng.integers(1, 4, n)
  for k in range(3):
    r = rng.uniform(0.12, 0.3, n) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    kind = rng.integers(0, len(SHAPE_KINDS), n)
    mask = _shape_masks(kind, cx, cy, r, size) & (count > k)[:, None, None]
    img = _paint(img, mask, rng.uniform(0, 1, (n, 3)))
  return Records(label=np.zeros(n, np.int32), domain=np.full(n, "general_object"), image=np.clip(img, 0, 1))


def shapes_cls(rng: np.random.Generator, n: int, size: int) -> Records:
  """One shape of one of 6 kinds (the label), random colour/size/place, noisy background."""
  label = rng.integers(0, len(SHAPE_KINDS), n).astype(np.int32)
  color, base = _contrasting_colors(rng, n)
  img = _backgrounds(rng, base, size, gradient=0.3, noise=rng.uniform(0.02, 0.12, n))
  r = rng.uniform(0.2, 0.38, n) * size
  cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
  img = _paint(img, _shape_masks(label, cx, cy, r, size), color)
  return Records(label=label, domain=np.full(n, "general_object"), image=np.clip(img, 0, 1))


# VQA: images of 1-3 named shapes, templated questions, one-word answers.

_VQA_KINDS = ("circle", "square", "triangle", "cross")
_VQA_COLORS = {
  "red": (0.9, 0.1, 0.1),
  "green": (0.1, 0.75, 0.2),
  "blue": (0.15, 0.3, 0.95),
  "yellow": (0.95, 0.9, 0.1),
  "purple": (0.6, 0.2, 0.8),
  "orange": (1.0, 0.55, 0.05),
}
_NUMBERS = ("one", "two", "three")


def vqa_gen(rng: np.random.Generator, n: int, size: int) -> Records:
  """Images of 1-3 coloured shapes in horizontal slots, a question and its answer."""
  color_names = tuple(_VQA_COLORS)
  palette = np.array([_VQA_COLORS[c] for c in color_names], np.float32)
  count = np.ones(n, np.int64)
  kinds = rng.integers(0, len(_VQA_KINDS), (n, 3))
  colors = rng.integers(0, len(color_names), (n, 3))
  slot = np.zeros((n, 3), np.int64)  # horizontal slot of each shape, of `count` slots
  side = rng.integers(0, 2, n)  # 0 left, 1 right
  qtype = rng.integers(0, 6, n)
  texts, answers = [], []
  for i in range(n):
    q = qtype[i]
    if q == 0:  # count
      count[i] = rng.integers(1, 4)
      slot[i] = (side[i], 1, 2) if count[i] == 1 else (0, 1, 2)
      question, answer = "how many shapes are there ?", _NUMBERS[count[i] - 1]
    elif q in (1, 2, 3):  # one shape, placed left or right
      slot[i, 0] = side[i]
      count[i] = 1
      if q == 1:
        question, answer = "what color is the shape ?", color_names[colors[i, 0]]
      elif q == 2:
        question, answer = "what shape is in the image ?", _VQA_KINDS[kinds[i, 0]]
      else:
        question, answer = "is the shape on the left or right ?", ("left", "right")[side[i]]
    else:  # two shapes, left and right; they differ in the attribute asked
      count[i] = 2
      slot[i, :2] = (0, 1)
      where = ("left", "right")[side[i]]
      attr = colors if q == 4 else kinds
      options = len(color_names) if q == 4 else len(_VQA_KINDS)
      attr[i, 1] = (attr[i, 0] + rng.integers(1, options)) % options
      if q == 4:
        question, answer = f"what color is the shape on the {where} ?", color_names[colors[i, side[i]]]
      else:
        question, answer = f"what shape is on the {where} ?", _VQA_KINDS[kinds[i, side[i]]]
    texts.append(f"answer the question based on the image : {question}")
    answers.append(answer)
  # Layout: one shape -> left or right third; k shapes -> k equal columns.
  gray = rng.uniform(0.35, 0.6, n)
  base = gray[:, None] + rng.uniform(-0.04, 0.04, (n, 3))
  img = _backgrounds(rng, base, size, gradient=0.15, noise=np.full(n, 0.03))
  columns = np.where(count == 1, 2, count).astype(np.float32)  # one shape: 2 columns (left/right)
  width = size / columns
  for k in range(3):
    r = rng.uniform(0.28, 0.4, n) * np.minimum(width, 0.6 * size)
    cx = (slot[:, k] + rng.uniform(0.4, 0.6, n)) * width
    cy = rng.uniform(r, size - r)
    mask = _shape_masks(kinds[:, k], cx, cy, r, size) & (count > k)[:, None, None]
    color = palette[colors[:, k]] + rng.uniform(-0.05, 0.05, (n, 3))
    img = _paint(img, mask, color)
  return Records(
    label=np.zeros(n, np.int32),
    domain=np.full(n, "visual_answering"),
    image=np.clip(img, 0, 1),
    prompt=texts,
    answer=answers,
  )
