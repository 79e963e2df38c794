"""Keyed host-side examples: what every data source yields, before tokenization.

A source (the embedded procedural data, a TFDS dataset, a local folder) turns
its examples into :class:`Records`: one task's examples, fields by name, on the
host as numpy arrays. The federation assembly then cuts records into client
shards, tokenizes text with the backbone's tokenizer and stacks clients. No
field is ever found by its position in a list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["Records"]

_OPTIONAL = ("image", "prompt", "answer")


@dataclasses.dataclass(frozen=True)
class Records:
  """``n`` examples of one task, on the host.

  Attributes:
    label: int32 ``[n]``, class ids (zeros for generation tasks).
    domain: str ``[n]``, the domain name of each example (the MoDE expert key).
    image: ``[n, S, S, 3]`` images, uint8 in 0..255 or float32 in [0, 1]
      (grayscale already repeated to 3 channels); None for text-only tasks.
    prompt: str ``[n]``, the input text (a prompt template already applied);
      None for image-only tasks.
    answer: str ``[n]``, the target text of a text-generation task; None
      otherwise.
  """

  label: np.ndarray
  domain: np.ndarray
  image: np.ndarray | None = None
  prompt: np.ndarray | None = None
  answer: np.ndarray | None = None

  def __post_init__(self):
    n = len(self.label)
    object.__setattr__(self, "label", np.asarray(self.label, np.int32))
    object.__setattr__(self, "domain", np.asarray(self.domain, str))
    for name in _OPTIONAL:
      value = getattr(self, name)
      if value is not None and not isinstance(value, np.ndarray):
        object.__setattr__(self, name, np.asarray(value, str))
    for name in ("domain", *_OPTIONAL):
      value = getattr(self, name)
      if value is not None and len(value) != n:
        raise ValueError(
          f"Records: {name} has {len(value)} rows, label has {n}; every field needs one per example"
        )
    if self.image is not None and (self.image.ndim != 4 or self.image.shape[-1] != 3):
      raise ValueError(f"Records: image must be [n, S, S, 3], got shape {self.image.shape}")

  def __len__(self) -> int:
    return len(self.label)

  def take(self, indices: np.ndarray | Sequence[int]) -> Records:
    """The examples at ``indices`` (int ``[m]``), in that order."""
    idx = np.asarray(indices, np.int64)
    return Records(**{f.name: _rows(getattr(self, f.name), idx) for f in dataclasses.fields(self)})

  def slice(self, start: int, stop: int) -> Records:
    """Examples ``start`` to ``stop`` (a contiguous shard)."""
    return self.take(np.arange(start, min(stop, len(self))))

  @staticmethod
  def concat(parts: Sequence[Records]) -> Records:
    """The examples of ``parts`` one after another; all must carry the same fields."""
    if not parts:
      raise ValueError("Records.concat needs at least one part")
    out = {}
    for f in dataclasses.fields(Records):
      values = [getattr(p, f.name) for p in parts]
      present = [v is not None for v in values]
      if any(present) and not all(present):
        raise ValueError(f"Records.concat: field {f.name!r} is present in some parts and not in others")
      out[f.name] = np.concatenate(values) if all(present) else None
    return Records(**out)


def _rows(value: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
  return None if value is None else value[idx]
