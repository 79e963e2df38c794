"""The TAP foundation model (REFERENCE.md section 2) over a pretrained BERT-family encoder.

ViLT-style arrangement: one pretrained transformer serves both modalities. Its
embeddings encode text; a trainable patch embedding (+ CLS and positions) encodes
images; its layers initialize the fusion blocks (MoTE layer ``i`` from pretrained
layer ``i``, MoME layer ``i`` from layer ``i + num_layers``) and every expert and
MoDE base FFN.

Parameters are two pytrees:

* ``frozen``: pretrained weights, held once and shared by every client (text
  embeddings; per fusion layer the attention ``q, k, v, o`` and one FFN that all
  experts and domain experts of that layer start from, stored once).
* ``trainable``: LoRA factors, projections, layer norms, patch embedding, heads.
  Only these are stacked per client.

The forward pass routes every example by its task (group, kind, head) and domain
with gathers over stacked LoRA factors, so one program serves a batch that mixes
tasks and modalities, and an example only touches the components its task uses.

``compat="reference"`` reproduces the published code's quirks (README table).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tapjax import components
from tapjax.data.tasks import MODALITIES, TASK_GROUPS, TaskKind, TaskSpec
from tapjax.distill import kd_divergence
from tapjax.model.bert import BertConfig, attend
from tapjax.objective import Objective

PyTree = Any
COMPATS = ("paper", "reference")
SHARED = "shared"
MOTE_KEYS = MODALITIES + (SHARED,)       # MoTE blocks: one per modality + shared
MOME_KEYS = TASK_GROUPS + (SHARED,)      # MoME blocks: one per task group + shared


@dataclasses.dataclass(frozen=True)
class TapModelConfig:
  """Static structure of the model.

  Attributes:
    tasks: the federation's task table (index = task id).
    domains: domain names (index = domain id); one MoDE expert per (block, domain).
    backbone: the pretrained encoder's shape (width, heads, FFN width).
    num_layers: layers per MoTE/MoME block (FLAVA 1, ViLT 4); needs
      ``2 * num_layers <= backbone.num_layers``.
    image_size, patch_size: square RGB inputs, ViLT-style patch embedding.
    text_len, target_len: prompt and answer lengths.
    answer_vocab: size of the text heads' output vocabulary.
    lora_rank / lora_alpha: fusion attention Q/V LoRA. expert_rank / expert_alpha:
      expert and MoDE FFN LoRA (both linears). lora_dropout: dropout on LoRA inputs.
    head_dropout: dropout inside the heads.
    head_style: "vilt" (Linear(E,2E)-LN-GELU-Drop-Linear(E)-GELU-Linear(C)) or
      "flava" (Linear(E,E/2)-ReLU-Drop-Linear(C)).
    compat: "paper" (the method as described) or "reference" (the published code).
  """
  tasks: tuple[TaskSpec, ...]
  domains: tuple[str, ...]
  backbone: BertConfig
  num_layers: int = 1
  image_size: int = 32
  patch_size: int = 8
  text_len: int = 24
  target_len: int = 8
  answer_vocab: int = 128
  lora_rank: int = 8
  lora_alpha: float = 16.0
  expert_rank: int = 8
  expert_alpha: float = 16.0
  lora_dropout: float = 0.1
  head_dropout: float = 0.1
  head_style: str = "vilt"
  gen_channels: int = 64
  text_head_heads: int = 4
  compat: str = "paper"

  def __post_init__(self):
    if self.compat not in COMPATS:
      raise ValueError(f"compat={self.compat!r}; choose one of {COMPATS}")
    if 2 * self.num_layers > self.backbone.num_layers:
      raise ValueError(f"num_layers={self.num_layers} needs {2 * self.num_layers} pretrained "
                       f"layers (MoTE i, MoME i + num_layers); the backbone has "
                       f"{self.backbone.num_layers}. Lower num_layers or use a deeper backbone.")
    if self.image_size % self.patch_size or self.image_size % 8:
      raise ValueError(f"image_size={self.image_size} must be a multiple of 8 and of "
                       f"patch_size={self.patch_size}")
    if self.head_style not in ("vilt", "flava"):
      raise ValueError(f"head_style={self.head_style!r}; choose 'vilt' or 'flava'")

  @property
  def width(self) -> int:
    return self.backbone.hidden_size

  @property
  def reference(self) -> bool:
    return self.compat == "reference"

  def tasks_of(self, kind: TaskKind) -> tuple[int, ...]:
    return tuple(i for i, t in enumerate(self.tasks) if t.kind == kind)


# ----------------------------------------------------------------------------- structure tables


def _kind_tasks(cfg):
  cls = tuple(i for i, t in enumerate(cfg.tasks) if t.kind in (TaskKind.IMAGE_CLASSIFICATION,
                                                                TaskKind.TEXT_CLASSIFICATION))
  return cls, cfg.tasks_of(TaskKind.IMAGE_GENERATION), cfg.tasks_of(TaskKind.TEXT_GENERATION)


def _paths(cfg: TapModelConfig, modality: str, group: str):
  """The fusion paths an input of ``modality`` takes for a task of ``group``:
  ``(input, mote block, mote expert, mome block, mome expert)``, input is
  ``"shared"`` (through shared_proj) or ``"private"``."""
  m, g = modality, group
  paths = [(SHARED, m, (SHARED, g), g, (g, SHARED)),       # shared -> task
           ("private", m, (m, g), g, (g, m)),              # modality -> task
           ("private", m, (m, SHARED), SHARED, (SHARED, m))]  # modality -> shared
  if not cfg.reference:                                     # quirk 1: dead in the reference
    paths.append((SHARED, SHARED, (SHARED, SHARED), SHARED, (SHARED, SHARED)))
  return paths


def task_uses(cfg: TapModelConfig, t: int, for_replacement: bool = False) -> set[str]:
  """Component names task ``t``'s forward pass uses.

  With ``for_replacement`` in reference mode: what the reference's tracker copies,
  which for classification tasks skips every MoME block and every expert keyed by
  the task's group (its name never matches the group keys there).
  """
  task = cfg.tasks[t]
  uses = {"shared_proj", f"head/{task.name}"}
  for m in task.modalities:
    uses.add(f"encoder/{m}")
    for _, mote, mote_e, mome, mome_e in _paths(cfg, m, task.group):
      uses |= {f"mote/{mote}", f"mome/{mome}", "expert/mote/%s/%s" % mote_e,
               "expert/mome/%s/%s" % mome_e}
      uses |= {f"{blk}/domain/{d}" for blk in (f"mote/{mote}", f"mome/{mome}") for d in task.domains}
  if (for_replacement and cfg.reference and
      task.kind in (TaskKind.IMAGE_CLASSIFICATION, TaskKind.TEXT_CLASSIFICATION)):
    uses = {u for u in uses if not u.startswith("mome/")
            and not (u.startswith("expert/") and task.group in u.split("/")[2:])}
  return uses


RULES = (
    components.Rule(r"^encoder/(\w+)/", r"encoder/\1"),
    components.Rule(r"^shared_proj/", "shared_proj"),
    components.Rule(r"^(mote|mome)/(\w+)/domain/(\w+)/", r"\1/\2/domain/\3"),
    components.Rule(r"^(mote|mome)/(\w+)/layer", r"\1/\2"),
    components.Rule(r"^expert/(mote|mome)/(\w+)/(\w+)/", r"expert/\1/\2/\3"),
    components.Rule(r"^head/(\w+)/", r"head/\1"),
)


# ----------------------------------------------------------------------------- init


def _dense(key, n_in, n_out, scale=None):
  scale = 1.0 / math.sqrt(n_in) if scale is None else scale
  return {"kernel": scale * jax.random.normal(key, (n_in, n_out)), "bias": jnp.zeros(n_out)}


def _ln(n):
  return {"scale": jnp.ones(n), "bias": jnp.zeros(n)}


def _lora(key, n_in, n_out, rank):
  # PEFT's init: A random (Kaiming-uniform-like), B zero -> the delta starts at 0.
  bound = 1.0 / math.sqrt(n_in)
  return {"a": jax.random.uniform(key, (n_in, rank), minval=-bound, maxval=bound),
          "b": jnp.zeros((rank, n_out))}


def _ffn_lora(key, cfg):
  k1, k2 = jax.random.split(key)
  e, i = cfg.width, cfg.backbone.intermediate_size
  return {"in": _lora(k1, e, i, cfg.expert_rank), "out": _lora(k2, i, e, cfg.expert_rank)}


def _block(key, cfg):
  layers = {}
  e = cfg.width
  for li, k in enumerate(jax.random.split(key, cfg.num_layers)):
    kq, kv = jax.random.split(k)
    layers[f"layer_{li}"] = {"ln1": _ln(e), "ln2": _ln(e), "q": _lora(kq, e, e, cfg.lora_rank),
                             "v": _lora(kv, e, e, cfg.lora_rank)}
  return layers


def _domain_experts(key, cfg):
  out = {}
  for d, kd in zip(cfg.domains, jax.random.split(key, len(cfg.domains))):
    layers = {}
    for li, k in enumerate(jax.random.split(kd, cfg.num_layers)):
      kq, kv = jax.random.split(k)
      layers[f"layer_{li}"] = {"q": _ffn_lora(kq, cfg), "v": _ffn_lora(kv, cfg)}
    out[d] = layers
  return out


def _head(key, cfg, task: TaskSpec):
  e = cfg.width
  ks = jax.random.split(key, 8)
  if task.kind in (TaskKind.IMAGE_CLASSIFICATION, TaskKind.TEXT_CLASSIFICATION):
    if cfg.head_style == "vilt":
      return {"fc1": _dense(ks[0], e, 2 * e), "ln": _ln(2 * e), "fc2": _dense(ks[1], 2 * e, e),
              "out": _dense(ks[2], e, task.num_classes)}
    return {"fc1": _dense(ks[0], e, e // 2), "out": _dense(ks[2], e // 2, task.num_classes)}
  if task.kind == TaskKind.IMAGE_GENERATION:
    c, s = cfg.gen_channels, cfg.image_size // 8
    conv = lambda k, ci, co: {"kernel": jax.random.normal(k, (4, 4, ci, co)) / math.sqrt(16 * ci),
                              "bias": jnp.zeros(co)}
    return {"fc": _dense(ks[0], e, c * s * s), "deconv1": conv(ks[1], c, c // 2),
            "deconv2": conv(ks[2], c // 2, c // 4), "deconv3": conv(ks[3], c // 4, 3)}
  # text generation: positions cross-attend to the fused vector, one GPT-2 block, vocab projection
  head = {"pos": 0.02 * jax.random.normal(ks[0], (cfg.target_len, e)),
          "cross_ln": _ln(e), "cross_v": _dense(ks[1], e, e), "cross_o": _dense(ks[2], e, e),
          "ln1": _ln(e), "qkv": _dense(ks[3], e, 3 * e), "attn_o": _dense(ks[4], e, e),
          "ln2": _ln(e), "mlp_in": _dense(ks[5], e, 2 * e), "mlp_out": _dense(ks[6], 2 * e, e),
          "ln_f": _ln(e), "vocab": _dense(ks[7], e, cfg.answer_vocab)}
  if cfg.reference:   # quirk 5: GPT-2's unused token embeddings, still weight-decayed
    head["unused_wte"] = 0.02 * jax.random.normal(ks[7], (cfg.answer_vocab, e))
  return head


def init_trainable(key: jax.Array, cfg: TapModelConfig) -> dict:
  """The trainable pytree (one client's, unstacked)."""
  e, h, p = cfg.width, cfg.width, cfg.patch_size
  ks = iter(jax.random.split(key, 64))
  n_patches = (cfg.image_size // p) ** 2
  params = {
      "encoder": {
          "image": {"patch": _dense(next(ks), p * p * 3, h), "cls": 0.02 * jax.random.normal(next(ks), (h,)),
                    "pos": 0.02 * jax.random.normal(next(ks), (n_patches + 1, h)),
                    "proj": _dense(next(ks), h, e), "ln": _ln(e)},
          "text": {"proj": _dense(next(ks), h, e), "ln": _ln(e)}},
      "shared_proj": _dense(next(ks), e, e),
      "mote": {b: {**_block(next(ks), cfg), "domain": _domain_experts(next(ks), cfg)} for b in MOTE_KEYS},
      "mome": {b: {**_block(next(ks), cfg), "domain": _domain_experts(next(ks), cfg)} for b in MOME_KEYS},
      "expert": {
          "mote": {a: {b: {f"layer_{i}": _ffn_lora(k, cfg) for i, k in
                           enumerate(jax.random.split(next(ks), cfg.num_layers))}
                       for b in MOME_KEYS} for a in MOTE_KEYS},
          "mome": {a: {b: {f"layer_{i}": _ffn_lora(k, cfg) for i, k in
                           enumerate(jax.random.split(next(ks), cfg.num_layers))}
                       for b in MOTE_KEYS} for a in MOME_KEYS}},
      "head": {t.name: _head(k, cfg, t) for t, k in zip(cfg.tasks, jax.random.split(next(ks), len(cfg.tasks)))},
  }
  return params


def frozen_from_bert(bert_params: dict, cfg: TapModelConfig) -> dict:
  """The frozen pytree from a BERT encoder's params (canonical layout of
  :mod:`tapjax.model.bert`): text embeddings, and per fusion layer the attention
  and the FFN every expert / domain expert of that layer starts from (stored once).

  Raises:
    ValueError: if the checkpoint is narrower or shallower than ``cfg.backbone``.
  """
  emb = bert_params["embeddings"]
  got = np.shape(emb["word"]["embedding"])[1]
  if got != cfg.width:
    raise ValueError(f"pretrained width {got} != config backbone.hidden_size {cfg.width}; "
                     "build the config with BertConfig.from_hf(<checkpoint folder>)")
  missing = [f"layer_{i}" for i in range(2 * cfg.num_layers) if f"layer_{i}" not in bert_params]
  if missing:
    raise ValueError(f"checkpoint lacks pretrained layers {missing} needed by num_layers="
                     f"{cfg.num_layers}")

  def layer(i):
    lp = bert_params[f"layer_{i}"]
    a = lp["attention"]
    return {"q": a["query"], "k": a["key"], "v": a["value"], "o": a["out"],
            "ffn_in": lp["ffn"]["in"], "ffn_out": lp["ffn"]["out"]}

  f = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)
  return f({"text_embed": {"word": emb["word"]["embedding"], "position": emb["position"]["embedding"],
                           "token_type": emb["token_type"]["embedding"], "ln": emb["ln"]},
            "mote": {f"layer_{i}": layer(i) for i in range(cfg.num_layers)},
            "mome": {f"layer_{i}": layer(i + cfg.num_layers) for i in range(cfg.num_layers)}})


def random_bert_params(key: jax.Array, backbone: BertConfig) -> dict:
  """A randomly initialized BERT params tree (for tiny test models and param counts)."""
  from tapjax.model.bert import BertEncoder
  ids = jnp.zeros((1, 4), jnp.int32)
  return BertEncoder(backbone).init(key, ids)["params"]


# ----------------------------------------------------------------------------- forward


def _layer_norm(p, x, eps=1e-12):
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _per_example(p, x):
  """``x [batch, ..., in] @ p [batch, in, out]`` or ``@ p [in, out]``."""
  return jnp.einsum("b...i,bio->b...o", x, p) if p.ndim == 3 else x @ p


def _dropout(x, rate, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


class _Keys:
  """Deterministic stream of dropout keys (``None`` in eval mode)."""

  def __init__(self, key):
    self.key, self.n = key, 0

  def __call__(self):
    if self.key is None:
      return None
    self.n += 1
    return jax.random.fold_in(self.key, self.n)


def _lora_delta(x, lora, scale, rate, keys):
  return _per_example(lora["b"], _per_example(lora["a"], _dropout(x, rate, keys()))) * scale


def _ffn(x, base, lora, cfg, keys):
  """Frozen pretrained FFN + LoRA on both linears; ``lora`` leaves may lead with [batch]."""
  s = cfg.expert_alpha / cfg.expert_rank
  h = x @ base["ffn_in"]["kernel"] + base["ffn_in"]["bias"]
  h = jax.nn.gelu(h + _lora_delta(x, lora["in"], s, cfg.lora_dropout, keys), approximate=False)
  out = h @ base["ffn_out"]["kernel"] + base["ffn_out"]["bias"]
  return out + _lora_delta(h, lora["out"], s, cfg.lora_dropout, keys)


def _fusion_layer(h, mask, blk, dom_q, dom_v, expert, base, cfg, keys):
  """One pre-norm block layer: MoDE on the Q and V inputs, frozen attention with LoRA
  on Q and V, residual; then the path's expert FFN, residual. ``h [batch, len, E]``."""
  s = cfg.lora_alpha / cfg.lora_rank
  y = jax.vmap(_layer_norm)(blk["ln1"], h) if blk["ln1"]["scale"].ndim == 2 else _layer_norm(blk["ln1"], h)
  yq = y + _ffn(y, base, dom_q, cfg, keys)
  yv = y + _ffn(y, base, dom_v, cfg, keys)
  proj = lambda x, w: x @ w["kernel"] + w["bias"]
  q = proj(yq, base["q"]) + _lora_delta(yq, blk["q"], s, cfg.lora_dropout, keys)
  v = proj(yv, base["v"]) + _lora_delta(yv, blk["v"], s, cfg.lora_dropout, keys)
  if cfg.reference:   # quirk 3: the LoRA'd linear feeds the attention's own projection again
    q, v = proj(q, base["q"]), proj(v, base["v"])
  k = proj(y, base["k"])
  h = h + proj(attend(q, k, v, mask, cfg.backbone.num_heads), base["o"])
  y2 = jax.vmap(_layer_norm)(blk["ln2"], h) if blk["ln2"]["scale"].ndim == 2 else _layer_norm(blk["ln2"], h)
  return h + _ffn(y2, base, expert, cfg, keys)


def _stack(trees: Sequence[PyTree]) -> PyTree:
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _take(stacked: PyTree, idx: jax.Array) -> PyTree:
  return jax.tree_util.tree_map(lambda x: x[idx], stacked)


def _block_run(h, mask, block, block_idx, domain, experts, expert_idx, frozen_layers, cfg, keys):
  """A MoTE or MoME block (``num_layers`` layers). ``block`` / ``experts`` are pytrees
  stacked over block keys; ``block_idx`` / ``expert_idx`` are ``[batch]`` picks."""
  for li in range(cfg.num_layers):
    name = f"layer_{li}"
    blk = _take(block[name], block_idx)
    dom = _take(block["domain"][name], (block_idx, domain))
    exp = _take(experts[name], expert_idx)
    h = _fusion_layer(h, mask, blk, dom["q"], dom["v"], exp, frozen_layers[name], cfg, keys)
  return h


def _fuse(inputs, group, domain, params, frozen, cfg, key):
  """``[modalities, batch, E]``: per input modality, the mean over its fusion paths of
  mean-pooled block outputs.

  All modalities run as one ``[modalities * batch]`` batch (tokens padded to a common
  length and masked) and the paths run as a ``lax.scan``, so the fusion is traced
  once, whatever the number of paths and modalities.

  Args:
    inputs: per modality ``(tokens [batch, len_m, E], mask [batch, len_m])`` in
      :data:`MODALITIES` order.
    group, domain: ``[batch]`` task-group and domain ids.
  """
  length = max(x.shape[1] for x, _ in inputs)
  pad = lambda a: jnp.pad(a, [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
  x = jnp.concatenate([pad(x) for x, _ in inputs])                  # [M*B, L, E]
  mask = jnp.concatenate([pad(m) for _, m in inputs])               # [M*B, L]
  n_mod, batch = len(inputs), group.shape[0]
  g = jnp.tile(group, n_mod)
  dom = jnp.tile(domain, n_mod)

  def ids(keys, name, m):
    """Per-row index of block / expert key ``name`` ("G" = the example's group)."""
    return g[:batch] if name == "G" else jnp.full((batch,), keys.index(name), jnp.int32)

  table = []   # per path: (use shared_proj input [M*B], mote, mote_e (2), mome, mome_e (2))
  for m, modality in enumerate(MODALITIES[:n_mod]):
    rows = []
    for inp, mote, (ea, eb), mome, (fa, fb) in _paths(cfg, modality, "G"):
      rows.append((jnp.full((batch,), inp == SHARED), ids(MOTE_KEYS, mote, m),
                   ids(MOTE_KEYS, ea, m), ids(MOME_KEYS, eb, m), ids(MOME_KEYS, mome, m),
                   ids(MOME_KEYS, fa, m), ids(MOTE_KEYS, fb, m)))
    table.append(rows)
  # [paths, M*B] per field
  path_ids = tuple(jnp.stack([jnp.concatenate([table[m][p][f] for m in range(n_mod)])
                              for p in range(len(table[0]))]) for f in range(7))

  no_domain = lambda tree: {k: v for k, v in tree.items() if k != "domain"}
  mote_blocks = _stack([no_domain(params["mote"][b]) for b in MOTE_KEYS])
  mome_blocks = _stack([no_domain(params["mome"][b]) for b in MOME_KEYS])
  # domain experts as [block, domain, ...]
  mote_blocks["domain"] = _stack([_stack([params["mote"][b]["domain"][d] for d in cfg.domains])
                                  for b in MOTE_KEYS])
  mome_blocks["domain"] = _stack([_stack([params["mome"][b]["domain"][d] for d in cfg.domains])
                                  for b in MOME_KEYS])
  mote_exp = _stack([_stack([params["expert"]["mote"][a][b] for b in MOME_KEYS]) for a in MOTE_KEYS])
  mome_exp = _stack([_stack([params["expert"]["mome"][a][b] for b in MOTE_KEYS]) for a in MOME_KEYS])
  h_shared = x @ params["shared_proj"]["kernel"] + params["shared_proj"]["bias"]
  pool_w = mask.astype(x.dtype)[..., None] / jnp.maximum(mask.sum(-1), 1)[:, None, None]

  def path(total, xs):
    p, (shared_in, mote, ea, eb, mome, fa, fb) = xs
    keys = _Keys(None if key is None else jax.random.fold_in(key, p))
    h = jnp.where(shared_in[:, None, None], h_shared, x)
    h = _block_run(h, mask, mote_blocks, mote, dom, mote_exp, (ea, eb), frozen["mote"], cfg, keys)
    h = _block_run(h, mask, mome_blocks, mome, dom, mome_exp, (fa, fb), frozen["mome"], cfg, keys)
    return total + jnp.sum(h * pool_w, axis=1), None

  n_paths = path_ids[0].shape[0]
  total, _ = jax.lax.scan(path, jnp.zeros(x.shape[::2], x.dtype), (jnp.arange(n_paths), path_ids))
  return (total / n_paths).reshape(n_mod, batch, -1)


def encode_image(p, images, cfg):
  """``images [batch, S, S, 3]`` -> tokens ``[batch, 1 + patches, E]`` (ViLT-style)."""
  b, s, _, c = images.shape
  n = s // cfg.patch_size
  patches = images.reshape(b, n, cfg.patch_size, n, cfg.patch_size, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, n * n, -1) @ p["patch"]["kernel"] + p["patch"]["bias"]
  x = jnp.concatenate([jnp.broadcast_to(p["cls"], (b, 1, p["cls"].shape[0])), patches], 1) + p["pos"]
  return _layer_norm(p["ln"], x @ p["proj"]["kernel"] + p["proj"]["bias"])


def encode_text(p, frozen_embed, ids, cfg):
  """``ids [batch, len]`` -> ``[batch, len, E]``: frozen BERT embeddings, trainable projection."""
  x = (frozen_embed["word"][ids] + frozen_embed["position"][: ids.shape[1]] +
       frozen_embed["token_type"][0])
  x = _layer_norm(frozen_embed["ln"], x, cfg.backbone.layer_norm_eps)
  return _layer_norm(p["ln"], x @ p["proj"]["kernel"] + p["proj"]["bias"])


def _cls_head(p, z, cfg, keys):
  d = lambda x, w: x @ w["kernel"] + w["bias"]
  if cfg.head_style == "vilt":
    h = jax.nn.gelu(_layer_norm(p["ln"], d(z, p["fc1"])), approximate=False)
    h = jax.nn.gelu(d(_dropout(h, cfg.head_dropout, keys()), p["fc2"]), approximate=False)
  else:
    h = _dropout(jax.nn.relu(d(z, p["fc1"])), cfg.head_dropout, keys())
  return d(h, p["out"])


def _deconv(x, p):
  y = jax.lax.conv_transpose(x, p["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + p["bias"]


def _image_head(p, z, cfg):
  s, c = cfg.image_size // 8, cfg.gen_channels
  x = (z @ p["fc"]["kernel"] + p["fc"]["bias"]).reshape(z.shape[0], s, s, c)
  x = jax.nn.relu(_deconv(x, p["deconv1"]))
  x = jax.nn.relu(_deconv(x, p["deconv2"]))
  return _deconv(x, p["deconv3"])       # [batch, S, S, 3], no output activation (as the reference)


def _text_head(p, z, cfg, keys):
  """Non-autoregressive: learned positions cross-attend to the fused vector (one key,
  so the attention is the value path), a causal GPT-2 block, vocab logits."""
  d = lambda x, w: x @ w["kernel"] + w["bias"]
  b, e = z.shape
  h = jnp.broadcast_to(p["pos"], (b,) + p["pos"].shape)
  if not cfg.reference:   # quirk 2: the reference never passes the fused features
    h = h + d(d(_layer_norm(p["cross_ln"], z), p["cross_v"]), p["cross_o"])[:, None, :]
  q, k, v = jnp.split(d(_layer_norm(p["ln1"], h), p["qkv"]), 3, axis=-1)
  causal = jnp.tril(jnp.ones((cfg.target_len, cfg.target_len), bool))[None]
  h = h + _dropout(d(attend(q, k, v, causal, cfg.text_head_heads), p["attn_o"]), cfg.head_dropout, keys())
  m = jax.nn.gelu(d(_layer_norm(p["ln2"], h), p["mlp_in"]), approximate=True)
  h = h + _dropout(d(m, p["mlp_out"]), cfg.head_dropout, keys())
  return d(_layer_norm(p["ln_f"], h), p["vocab"])     # [batch, La, answer_vocab]


def _select(stacked, idx):
  """``stacked [heads, batch, ...]``, ``idx [batch]`` -> ``[batch, ...]``. Rows whose task has
  no head of this kind get an arbitrary (clipped) head's output; losses ignore them."""
  idx = jnp.clip(idx, 0, stacked.shape[0] - 1)
  return jnp.take_along_axis(stacked, idx.reshape((1, -1) + (1,) * (stacked.ndim - 2)), axis=0)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class TapModel:
  """The model's pure functions over ``(trainable, frozen)`` pytrees."""
  cfg: TapModelConfig

  # per-task lookup tables (numpy: static structure, never strings at run time)
  def _tables(self):
    cfg = self.cfg
    cls, img, txt = _kind_tasks(cfg)
    head_of = np.zeros(len(cfg.tasks), np.int32)
    for group in (cls, img, txt):
      for j, t in enumerate(group):
        head_of[t] = j
    num_classes = np.array([max(t.num_classes, 1) for t in cfg.tasks], np.int32)
    kind = np.array([int(t.kind) for t in cfg.tasks], np.int32)
    group = np.array([TASK_GROUPS.index(t.group) for t in cfg.tasks], np.int32)
    return cls, img, txt, head_of, num_classes, kind, group

  def apply(self, params, frozen, batch, key=None):
    """Outputs for a mixed batch.

    Args:
      batch: ``image [batch, S, S, 3]``, ``text``/``text_mask [batch, Lt]``, ``task``,
        ``domain [batch]``, ``has_image``/``has_text [batch]`` (bool).
      key: dropout key, ``None`` for eval.

    Returns:
      ``{"class_logits": [batch, max_classes], "image": [batch, S, S, 3],
      "token_logits": [batch, La, answer_vocab]}`` (zeros where the task has no such head).
    """
    cfg = self.cfg
    keys = _Keys(key)
    cls, img, txt, head_of, num_classes, kind, group_of = self._tables()
    task = batch["task"]
    group = jnp.asarray(group_of)[task]
    domain = batch["domain"]
    b = task.shape[0]
    n_img_tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    inputs = [(encode_image(params["encoder"]["image"], batch["image"], cfg),
               jnp.ones((b, n_img_tokens), jnp.int32)),
              (encode_text(params["encoder"]["text"], frozen["text_embed"], batch["text"], cfg),
               batch["text_mask"])]
    feats = _fuse(inputs, group, domain, params, frozen, cfg, keys())      # [modalities, batch, E]
    w = jnp.stack([batch["has_image"], batch["has_text"]]).astype(feats.dtype)   # [modalities, batch]
    z = jnp.sum(feats * w[..., None], 0) / jnp.maximum(w.sum(0), 1)[:, None]
    out = {}
    max_c = int(num_classes.max())
    if cls:
      logits = []
      for t in cls:
        lg = _cls_head(params["head"][cfg.tasks[t].name], z, cfg, keys)
        logits.append(jnp.pad(lg, ((0, 0), (0, max_c - lg.shape[1])), constant_values=-1e9))
      out["class_logits"] = _select(jnp.stack(logits), jnp.asarray(head_of)[task])
    if img:
      out["image"] = _select(jnp.stack([_image_head(params["head"][cfg.tasks[t].name], z, cfg)
                                        for t in img]), jnp.asarray(head_of)[task])
    if txt:
      out["token_logits"] = _select(jnp.stack([_text_head(params["head"][cfg.tasks[t].name], z, cfg, keys)
                                               for t in txt]), jnp.asarray(head_of)[task])
    return out

  def _per_kind(self, batch, cls_val, img_val, txt_val):
    kind = jnp.asarray(self._tables()[5])[batch["task"]]
    is_cls = (kind == TaskKind.IMAGE_CLASSIFICATION) | (kind == TaskKind.TEXT_CLASSIFICATION)
    zero = jnp.zeros(batch["task"].shape[0])
    return jnp.where(is_cls, cls_val if cls_val is not None else zero,
                     jnp.where(kind == TaskKind.IMAGE_GENERATION,
                               img_val if img_val is not None else zero,
                               txt_val if txt_val is not None else zero))

  def _token_ce(self, out, batch):
    logp = jax.nn.log_softmax(out["token_logits"])
    nll = -jnp.take_along_axis(logp, batch["target"][..., None], -1)[..., 0]
    m = batch["target_mask"].astype(nll.dtype)
    return jnp.sum(nll * m, -1) / jnp.maximum(m.sum(-1), 1), logp, m

  def loss(self, out, batch):
    """``[batch]``: CE (classification), pixel MSE (image generation), mean token CE
    over answer tokens (text generation), picked by each example's task kind."""
    ce = mse = tok = None
    if "class_logits" in out:
      ce = -jnp.take_along_axis(jax.nn.log_softmax(out["class_logits"]), batch["label"][:, None], -1)[:, 0]
    if "image" in out:
      mse = jnp.mean(jnp.square(out["image"] - batch["image"]), axis=(1, 2, 3))
    if "token_logits" in out:
      tok = self._token_ce(out, batch)[0]
    return self._per_kind(batch, ce, mse, tok)

  def divergence(self, student, teacher, batch, temperature):
    """``[batch]`` per-example KD (batch-mean semantics: summed over positions).

    Classification: KL over classes. Text generation: KL over the vocabulary summed
    over answer tokens (reference: over every position, pads included). Image
    generation: squared error to the teacher's image, per-pixel mean (reference:
    quirk 4, a softmax KL over the image's width axis, summed)."""
    kl = tok = img = None
    if "class_logits" in student:
      kl = kd_divergence(student["class_logits"], teacher["class_logits"], temperature)
    if "token_logits" in student:
      per_tok = kd_divergence(student["token_logits"], teacher["token_logits"], temperature)
      m = 1.0 if self.cfg.reference else batch["target_mask"].astype(per_tok.dtype)
      tok = jnp.sum(per_tok * m, -1)
    if "image" in student:
      if self.cfg.reference:   # NCHW's last axis is width: axis 2 of NHWC
        img = jnp.sum(kd_divergence(student["image"], teacher["image"], temperature, axis=2), (1, 2))
      else:
        img = jnp.mean(jnp.square(student["image"] - teacher["image"]), axis=(1, 2, 3))
    return self._per_kind(batch, kl, img, tok)

  def metrics(self, out, batch):
    """Per-example values; the meaningful ones per kind are listed in :data:`KIND_METRICS`."""
    zero = jnp.zeros(batch["task"].shape[0])
    acc = mse = tok_acc = tok_ce = zero
    if "class_logits" in out:
      acc = (jnp.argmax(out["class_logits"], -1) == batch["label"]).astype(jnp.float32)
    if "image" in out:
      mse = jnp.mean(jnp.square(out["image"] - batch["image"]), axis=(1, 2, 3))
    if "token_logits" in out:
      tok_ce, logp, m = self._token_ce(out, batch)
      hit = (jnp.argmax(logp, -1) == batch["target"]).astype(jnp.float32)
      tok_acc = jnp.sum(hit * m, -1) / jnp.maximum(m.sum(-1), 1)
    return {"accuracy": acc, "mse": mse, "token_accuracy": tok_acc, "token_ce": tok_ce}

  def objective(self) -> Objective:
    return Objective(self.apply, self.loss, self.divergence, self.metrics)


KIND_METRICS = {
    TaskKind.IMAGE_CLASSIFICATION: ("accuracy",),
    TaskKind.TEXT_CLASSIFICATION: ("accuracy",),
    TaskKind.IMAGE_GENERATION: ("mse",),
    TaskKind.TEXT_GENERATION: ("token_accuracy", "token_ce", "perplexity"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class ComponentModel:
  """The component structure derived from the model: names, leaf ids, usage."""
  names: tuple[str, ...]
  leaf_ids: PyTree
  usage: np.ndarray           # [tasks, components] forward usage
  replace_usage: np.ndarray   # [tasks, components] what the replacement rule copies
  fusion: np.ndarray          # [components] bool: MoTE/MoME blocks, experts, domain experts


def component_model(trainable: PyTree, cfg: TapModelConfig) -> ComponentModel:
  names, leaf_ids = components.assign_components(trainable, RULES)
  usage = components.usage_matrix(names, [task_uses(cfg, t) for t in range(len(cfg.tasks))])
  replace = components.usage_matrix(names, [task_uses(cfg, t, True) for t in range(len(cfg.tasks))])
  fusion = np.array([n.split("/")[0] in ("mote", "mome", "expert") for n in names])
  return ComponentModel(names, leaf_ids, usage, replace, fusion)
