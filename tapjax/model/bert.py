"""BERT encoder in Flax linen, numerically matching Hugging Face's `BertModel`.

The parameter tree has one canonical layout that the weight converter
(`tapjax.model.hf.bert_params_from_state_dict`) and the component rules rely on:

    embeddings/word/embedding            [vocab, hidden]
    embeddings/position/embedding        [max_positions, hidden]
    embeddings/token_type/embedding      [type_vocab, hidden]
    embeddings/ln/{scale, bias}          [hidden]
    layer_{i}/attention/{query, key, value, out}/kernel   [hidden, hidden] (in, out)
    layer_{i}/attention/{query, key, value, out}/bias     [hidden]
    layer_{i}/attention_ln/{scale, bias}                  [hidden]
    layer_{i}/ffn/in/kernel [hidden, intermediate], ffn/in/bias [intermediate]
    layer_{i}/ffn/out/kernel [intermediate, hidden], ffn/out/bias [hidden]
    layer_{i}/ffn_ln/{scale, bias}                        [hidden]

Layers are post-norm, as in BERT: `x = LN(x + attn(x)); x = LN(x + ffn(x))`.

`attend` is the shared scaled-dot-product attention core (already projected
q/k/v, fp32 softmax, HF-style additive mask); other backbones reuse it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
  "ACTIVATIONS",
  "BertConfig",
  "BertEmbeddings",
  "BertAttention",
  "BertFeedForward",
  "BertLayer",
  "BertEncoder",
  "attend",
]


def _gelu_exact(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


# HF `hidden_act` names -> activation. "gelu" is the exact erf form (HF BERT);
# "gelu_new" / "gelu_pytorch_tanh" are the tanh approximation.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": _gelu_exact,
  "gelu_new": _gelu_tanh,
  "gelu_pytorch_tanh": _gelu_tanh,
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}

# HF config.json key -> BertConfig field.
_HF_KEYS = {
  "vocab_size": "vocab_size",
  "hidden_size": "hidden_size",
  "num_hidden_layers": "num_layers",
  "num_attention_heads": "num_heads",
  "intermediate_size": "intermediate_size",
  "max_position_embeddings": "max_position_embeddings",
  "type_vocab_size": "type_vocab_size",
  "layer_norm_eps": "layer_norm_eps",
  "hidden_act": "hidden_act",
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Static structure of a BERT encoder (hashable; safe as a jit static arg).

  Defaults are bert-base-uncased. `dropout_rate` is hidden-state dropout
  (HF `hidden_dropout_prob`, applied after the embeddings, the attention
  output and the FFN output) used only when the encoder is called with
  `deterministic=False`; `from_hf` leaves it at 0.0 unless overridden, and
  attention-probability dropout is not implemented.
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  dropout_rate: float = 0.0

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"BertConfig: hidden_size={self.hidden_size} is not divisible by "
        f"num_heads={self.num_heads}; pick a head count that divides it."
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
        f"BertConfig: unsupported hidden_act={self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}."
      )
    for name in (
      "vocab_size",
      "hidden_size",
      "num_layers",
      "num_heads",
      "intermediate_size",
      "max_position_embeddings",
      "type_vocab_size",
    ):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"BertConfig: {name} must be positive, got {getattr(self, name)}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike, **overrides) -> "BertConfig":
    """Builds a config from a Hugging Face BERT `config.json`.

    Args:
      config: the parsed dict, a path to `config.json`, or a folder holding one.
      **overrides: BertConfig fields that replace what the file says
        (e.g. `dropout_rate=0.1`).

    Raises:
      FileNotFoundError: the path has no config.json.
      ValueError: a required key is missing, or the file describes a model
        this encoder does not implement (non-BERT model_type, relative
        position embeddings, a causal decoder).
    """
    source = "<dict>"
    if not isinstance(config, Mapping):
      path = pathlib.Path(config)
      if path.is_dir():
        path = path / "config.json"
      if not path.is_file():
        raise FileNotFoundError(
          f"No BERT config at {path}. Pass the checkpoint folder that holds "
          "config.json (see tapjax.model.hf.resolve_checkpoint)."
        )
      source = str(path)
      config = json.loads(path.read_text())
    model_type = config.get("model_type", "bert")
    if model_type != "bert":
      raise ValueError(
        f"{source}: model_type={model_type!r} is not 'bert'; BertEncoder only "
        "implements BERT (RoBERTa-style models offset positions differently)."
      )
    pos_type = config.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
      raise ValueError(
        f"{source}: position_embedding_type={pos_type!r} is not supported; "
        "only 'absolute' position embeddings are implemented."
      )
    if config.get("is_decoder", False):
      raise ValueError(f"{source}: is_decoder=true; BertEncoder is bidirectional only.")
    # layer_norm_eps, hidden_act and type_vocab_size fall back to BERT defaults.
    missing = [
      key
      for key, field in _HF_KEYS.items()
      if key not in config
      and field not in overrides
      and key not in ("layer_norm_eps", "hidden_act", "type_vocab_size")
    ]
    if missing:
      raise ValueError(f"{source}: missing required BERT config keys {missing}.")
    kwargs = {field: config[key] for key, field in _HF_KEYS.items() if key in config}
    kwargs.update(overrides)
    return cls(**kwargs)


def attend(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None,
  num_heads: int,
) -> jax.Array:
  """Multi-head scaled dot-product attention on already-projected inputs.

  Splits the hidden axis into `num_heads` heads, computes
  `softmax(q k^T / sqrt(head_dim) + additive_mask) v` per head and merges
  the heads back. Scores and the softmax are computed in float32 whatever
  the input dtype; the output has `q.dtype`. Masked positions get the
  large-negative additive bias `finfo(float32).min`, as HF's eager BERT
  attention does (a query whose keys are all masked gets a uniform average
  instead of NaN).

  Args:
    q: queries [batch, q_len, hidden].
    k: keys [batch, kv_len, hidden].
    v: values [batch, kv_len, hidden].
    mask: None (attend everywhere), a key mask [batch, kv_len], or a full
      mask [batch, q_len, kv_len]; nonzero/True = keep. Leading axes must
      broadcast against [batch].
    num_heads: number of heads; must divide hidden.

  Returns:
    [batch, q_len, hidden] in q.dtype.
  """
  *batch, q_len, hidden = q.shape
  kv_len = k.shape[-2]
  if hidden % num_heads:
    raise ValueError(f"attend: hidden={hidden} is not divisible by num_heads={num_heads}.")
  if k.shape[-1] != hidden or v.shape[-1] != hidden:
    raise ValueError(f"attend: q/k/v hidden sizes differ: q {q.shape}, k {k.shape}, v {v.shape}.")
  head_dim = hidden // num_heads
  qh = q.reshape(*batch, q_len, num_heads, head_dim)
  kh = k.reshape(*k.shape[:-1], num_heads, head_dim)
  vh = v.reshape(*v.shape[:-1], num_heads, head_dim)
  # scores [batch, heads, q_len, kv_len] in fp32.
  scores = jnp.einsum("...qhd,...khd->...hqk", qh, kh, preferred_element_type=jnp.float32)
  scores = scores.astype(jnp.float32) * (head_dim**-0.5)
  if mask is not None:
    if mask.ndim == q.ndim - 1:  # [batch, kv_len] key mask
      if mask.shape[-1] != kv_len:
        raise ValueError(f"attend: key mask {mask.shape} does not match kv_len={kv_len}.")
      keep = mask[..., None, None, :]
    elif mask.ndim == q.ndim:  # [batch, q_len, kv_len]
      if mask.shape[-2:] != (q_len, kv_len):
        raise ValueError(f"attend: mask {mask.shape} does not match [.., q_len={q_len}, kv_len={kv_len}].")
      keep = mask[..., None, :, :]
    else:
      raise ValueError(f"attend: mask must be [batch, kv_len] or [batch, q_len, kv_len], got {mask.shape}.")
    bias = jnp.where(keep.astype(bool), 0.0, jnp.finfo(jnp.float32).min)
    scores = scores + bias
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("...hqk,...khd->...qhd", probs.astype(v.dtype), vh)
  return out.reshape(*batch, q_len, hidden).astype(q.dtype)


def _layer_norm(config: BertConfig, name: str, dtype) -> nn.LayerNorm:
  # Two-pass variance: matches torch.nn.LayerNorm to fp32 rounding.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm (and dropout).

  Submodules: `word`, `position`, `token_type` (nn.Embed), `ln` (LayerNorm).
  """

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    token_type_ids: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> jax.Array:
    """Embeds tokens.

    Args:
      input_ids: token ids [batch, len] (int).
      token_type_ids: segment ids [batch, len]; default zeros.
      position_ids: [batch, len] or [len]; default arange(len).
      deterministic: disables dropout when True.

    Returns:
      [batch, len, hidden].
    """
    cfg = self.config
    seq_len = input_ids.shape[-1]
    if position_ids is None:
      if seq_len > cfg.max_position_embeddings:
        raise ValueError(
          f"BertEmbeddings: sequence length {seq_len} exceeds "
          f"max_position_embeddings={cfg.max_position_embeddings}; truncate the inputs."
        )
      position_ids = jnp.arange(seq_len)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    embed = lambda n, size, name: nn.Embed(n, size, dtype=self.dtype, name=name)  # noqa: E731
    x = embed(cfg.vocab_size, cfg.hidden_size, "word")(input_ids)
    x = x + embed(cfg.type_vocab_size, cfg.hidden_size, "token_type")(token_type_ids)
    x = x + embed(cfg.max_position_embeddings, cfg.hidden_size, "position")(position_ids)
    x = _layer_norm(cfg, "ln", self.dtype)(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class BertAttention(nn.Module):
  """Multi-head attention: Dense `query`/`key`/`value` -> `attend` -> Dense `out`.

  Self-attention by default; pass `kv` for cross-attention. No residual or
  LayerNorm here (see BertLayer).
  """

  hidden_size: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, kv: jax.Array | None = None) -> jax.Array:
    """Args: x [batch, q_len, hidden]; mask [batch, kv_len] or
    [batch, q_len, kv_len] (1 = keep) or None; kv [batch, kv_len, hidden]
    (defaults to x). Returns [batch, q_len, hidden]."""
    kv = x if kv is None else kv
    dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype, name=name)  # noqa: E731
    q, k, v = dense("query")(x), dense("key")(kv), dense("value")(kv)
    return dense("out")(attend(q, k, v, mask, self.num_heads))


class BertFeedForward(nn.Module):
  """Dense `in` [hidden -> intermediate], activation, Dense `out` [-> hidden]."""

  intermediate_size: int
  hidden_size: int
  hidden_act: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [batch, len, hidden]. Returns [batch, len, hidden]."""
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="in")(x)
    h = ACTIVATIONS[self.hidden_act](h)
    return nn.Dense(self.hidden_size, dtype=self.dtype, name="out")(h)


class BertLayer(nn.Module):
  """One post-norm BERT block: `LN(x + attn(x))`, then `LN(x + ffn(x))`.

  Submodules: `attention`, `attention_ln`, `ffn`, `ffn_ln`.
  """

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, *, deterministic: bool = True) -> jax.Array:
    """Args: x [batch, len, hidden]; mask [batch, len] (1 = keep) or
    [batch, len, len] or None. Returns [batch, len, hidden]."""
    cfg = self.config
    drop = nn.Dropout(cfg.dropout_rate)
    a = BertAttention(cfg.hidden_size, cfg.num_heads, dtype=self.dtype, name="attention")(x, mask)
    x = _layer_norm(cfg, "attention_ln", self.dtype)(x + drop(a, deterministic=deterministic))
    f = BertFeedForward(cfg.intermediate_size, cfg.hidden_size, cfg.hidden_act, dtype=self.dtype, name="ffn")(
      x
    )
    return _layer_norm(cfg, "ffn_ln", self.dtype)(x + drop(f, deterministic=deterministic))


class BertEncoder(nn.Module):
  """BERT: `embeddings` then `layer_0 .. layer_{N-1}`; returns last_hidden_state.

  Equals HF `BertModel(...).last_hidden_state` in eval mode. Apply with the
  canonical params: `BertEncoder(cfg).apply({"params": params}, ids, mask)`.
  `dtype` is the compute dtype (params stay as given; softmax and LayerNorm
  statistics run in fp32).
  """

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> jax.Array:
    """Encodes tokens.

    Args:
      input_ids: [batch, len] int token ids.
      attention_mask: [batch, len], 1 = real token, 0 = padding; None = all real.
      token_type_ids: [batch, len] segment ids; default zeros.
      position_ids: [batch, len] or [len]; default arange(len).
      deterministic: disables dropout when True.

    Returns:
      last_hidden_state [batch, len, hidden].
    """
    x = BertEmbeddings(self.config, dtype=self.dtype, name="embeddings")(
      input_ids, token_type_ids, position_ids, deterministic=deterministic
    )
    for i in range(self.config.num_layers):
      x = BertLayer(self.config, dtype=self.dtype, name=f"layer_{i}")(
        x, attention_mask, deterministic=deterministic
      )
    return x
