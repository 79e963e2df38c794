"""The TAP foundation model of the paper over a pretrained BERT-family encoder.

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
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tapjax import components
from tapjax.data.tasks import MODALITIES, TASK_GROUPS, TaskKind, TaskSpec
from tapjax.disentangle import Latents
from tapjax.distill import kd_divergence
from tapjax.model.bert import BertConfig, attend
from tapjax.objective import Objective

PyTree = Any
COMPATS = ("paper", "reference")
DROPOUT_RNGS = ("hash", "jax")  # hash_keep_mask (fast on CPU) or jax.random.bernoulli
SHARED = "shared"
MOTE_KEYS = MODALITIES + (SHARED,)  # MoTE blocks: one per modality + shared
MOME_KEYS = TASK_GROUPS + (SHARED,)  # MoME blocks: one per task group + shared
# DisentAFL's latent groups: one per (input modality, task group), numbered in the
# reference's order (it sorts its (modality, task) keys before pairing them).
LATENT_GROUPS: tuple[tuple[str, str], ...] = tuple(sorted((m, g) for m in MODALITIES for g in TASK_GROUPS))
_LATENT_GROUP_OF = np.array(
  [[LATENT_GROUPS.index((m, g)) for g in TASK_GROUPS] for m in MODALITIES], np.int32
)


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
    dropout_rng: "hash" (dropout masks from :func:`hash_keep_mask`, the default: about
      40x cheaper on CPU) or "jax" (``jax.random.bernoulli``).
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
  dropout_rng: str = "hash"

  def __post_init__(self):
    if self.compat not in COMPATS:
      raise ValueError(f"compat={self.compat!r}; choose one of {COMPATS}")
    if 2 * self.num_layers > self.backbone.num_layers:
      raise ValueError(
        f"num_layers={self.num_layers} needs {2 * self.num_layers} pretrained "
        f"layers (MoTE i, MoME i + num_layers); the backbone has "
        f"{self.backbone.num_layers}. Lower num_layers or use a deeper backbone."
      )
    if self.image_size % self.patch_size or self.image_size % 8:
      raise ValueError(
        f"image_size={self.image_size} must be a multiple of 8 and of patch_size={self.patch_size}"
      )
    if self.dropout_rng not in DROPOUT_RNGS:
      raise ValueError(f"dropout_rng={self.dropout_rng!r}; choose one of {DROPOUT_RNGS}")
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
  cls = tuple(
    i
    for i, t in enumerate(cfg.tasks)
    if t.kind in (TaskKind.IMAGE_CLASSIFICATION, TaskKind.TEXT_CLASSIFICATION)
  )
  return cls, cfg.tasks_of(TaskKind.IMAGE_GENERATION), cfg.tasks_of(TaskKind.TEXT_GENERATION)


def _paths(cfg: TapModelConfig, modality: str, group: str):
  """The fusion paths an input of ``modality`` takes for a task of ``group``:
  ``(input, mote block, mote expert, mome block, mome expert)``, input is
  ``"shared"`` (through shared_proj) or ``"private"``."""
  m, g = modality, group
  paths = [
    (SHARED, m, (SHARED, g), g, (g, SHARED)),  # shared -> task
    ("private", m, (m, g), g, (g, m)),  # modality -> task
    ("private", m, (m, SHARED), SHARED, (SHARED, m)),
  ]  # modality -> shared
  if not cfg.reference:  # quirk 1: dead in the reference
    paths.append((SHARED, SHARED, (SHARED, SHARED), SHARED, (SHARED, SHARED)))
  return paths


MODALITY_TASK_PATH = 1  # index in _paths of modality -> task, whose MoTE output DisentAFL reads


# Stacked slots. Every MoTE and MoME block is one slot of the ``block`` leaves
# (``[8, layers, ...]``), every expert one slot of the ``expert`` leaves
# (``[30, layers, ...]``), every (block, domain) MoDE expert one slot of the
# ``domain`` leaves (``[8, domains, layers, ...]``), every head one slot of its
# kind's head leaves. A slot is one component (see :func:`component_names`).
BLOCKS: tuple[tuple[str, str], ...] = tuple(("mote", k) for k in MOTE_KEYS) + tuple(
  ("mome", k) for k in MOME_KEYS
)
EXPERTS: tuple[tuple[str, str, str], ...] = tuple(
  ("mote", a, b) for a in MOTE_KEYS for b in MOME_KEYS
) + tuple(("mome", a, b) for a in MOME_KEYS for b in MOTE_KEYS)
HEAD_KINDS = ("cls", "image", "text")


def _block_slot(stage: str, key: str) -> int:
  return BLOCKS.index((stage, key))


def _expert_slot(stage: str, a: str, b: str) -> int:
  return EXPERTS.index((stage, a, b))


def _head_kind(task: TaskSpec) -> str:
  if task.kind in (TaskKind.IMAGE_CLASSIFICATION, TaskKind.TEXT_CLASSIFICATION):
    return "cls"
  return "image" if task.kind == TaskKind.IMAGE_GENERATION else "text"


def task_uses(
  cfg: TapModelConfig,
  t: int,
  for_replacement: bool = False,
  modalities: tuple[str, ...] | None = None,
  domains: tuple[str, ...] | None = None,
) -> set[str]:
  """Component names task ``t``'s forward pass uses (on examples with ``modalities``
  and ``domains`` only, when given: subsets of the task's).

  With ``for_replacement`` in reference mode: what the reference's tracker copies,
  which for classification tasks skips every MoME block and every expert keyed by
  the task's group (its name never matches the group keys there).
  """
  task = cfg.tasks[t]
  modalities = task.modalities if modalities is None else modalities
  domains = task.domains if domains is None else domains
  uses = {"shared_proj", f"head/{task.name}"}
  for m in modalities:
    uses.add(f"encoder/{m}")
    for _, mote, mote_e, mome, mome_e in _paths(cfg, m, task.group):
      uses |= {f"mote/{mote}", f"mome/{mome}", "expert/mote/%s/%s" % mote_e, "expert/mome/%s/%s" % mome_e}
      uses |= {f"{blk}/domain/{d}" for blk in (f"mote/{mote}", f"mome/{mome}") for d in domains}
  if (
    for_replacement
    and cfg.reference
    and task.kind in (TaskKind.IMAGE_CLASSIFICATION, TaskKind.TEXT_CLASSIFICATION)
  ):
    uses = {
      u
      for u in uses
      if not u.startswith("mome/") and not (u.startswith("expert/") and task.group in u.split("/")[2:])
    }
  return uses


def component_names(trainable: PyTree, cfg: TapModelConfig) -> PyTree:
  """The trainable tree with each leaf replaced by its component name(s): a ``str``
  for a whole leaf, a numpy array of names (one per slot) for a stacked leaf."""
  blocks = np.array([f"{s}/{k}" for s, k in BLOCKS], object)
  domains = np.array([[f"{s}/{k}/domain/{d}" for d in cfg.domains] for s, k in BLOCKS], object)
  experts = np.array([f"expert/{s}/{a}/{b}" for s, a, b in EXPERTS], object)
  heads = {
    kind: np.array([f"head/{cfg.tasks[t].name}" for t in tasks], object)
    for kind, tasks in zip(HEAD_KINDS, _kind_tasks(cfg))
    if tasks
  }
  label = lambda tree, name: jax.tree_util.tree_map(lambda _: name, tree)
  return {
    "encoder": {m: label(v, f"encoder/{m}") for m, v in trainable["encoder"].items()},
    "shared_proj": label(trainable["shared_proj"], "shared_proj"),
    "block": label(trainable["block"], blocks),
    "domain": label(trainable["domain"], domains),
    "expert": label(trainable["expert"], experts),
    "head": {k: label(v, heads[k]) for k, v in trainable["head"].items()},
  }


# ----------------------------------------------------------------------------- init


class _Normal(NamedTuple):
  """An init leaf: ``scale * N(0, 1)`` of ``shape`` (materialized by :func:`_materialize`)."""

  shape: tuple
  scale: float


class _Uniform(NamedTuple):
  """An init leaf: ``U(-bound, bound)`` of ``shape``."""

  shape: tuple
  bound: float


class _Const(NamedTuple):
  """An init leaf: ``value`` everywhere."""

  shape: tuple
  value: float


_SPEC = (_Normal, _Uniform, _Const)
_is_spec = lambda x: isinstance(x, _SPEC)


def _materialize(key: jax.Array, spec: PyTree) -> PyTree:
  """Arrays for a pytree of init leaves from ONE random draw: every random leaf is a
  slice of a single ``jax.random.bits`` vector (uniforms from its mantissa bits, normals
  through ``erfinv``, as ``jax.random`` computes them). One threefry call instead of one
  per leaf: the init program compiles in about a second, where ~25 threefry calls took
  20-30 s on a 2-core CPU."""
  leaves, treedef = jax.tree_util.tree_flatten(spec, is_leaf=_is_spec)
  sizes = [math.prod(x.shape) if not isinstance(x, _Const) else 0 for x in leaves]
  bits = jax.random.bits(key, (max(sum(sizes), 1),), jnp.uint32)
  # [0, 1) from 23 mantissa bits, then (-1, 1) for the normals (jax.random.normal's map)
  u01 = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
  lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
  normal = np.float32(math.sqrt(2.0)) * jax.lax.erf_inv(jnp.maximum(lo, 2.0 * u01 - 1.0))
  out, start = [], 0
  for leaf, n in zip(leaves, sizes):
    if isinstance(leaf, _Const):
      out.append(jnp.full(leaf.shape, leaf.value, jnp.float32))
      continue
    if isinstance(leaf, _Normal):
      out.append(leaf.scale * normal[start : start + n].reshape(leaf.shape))
    else:
      out.append((2.0 * u01[start : start + n] - 1.0).reshape(leaf.shape) * leaf.bound)
    start += n
  return jax.tree_util.tree_unflatten(treedef, out)


def _dense(n_in, n_out, scale=None, lead=()):
  scale = 1.0 / math.sqrt(n_in) if scale is None else scale
  return {"kernel": _Normal(lead + (n_in, n_out), scale), "bias": _Const(lead + (n_out,), 0.0)}


def _ln(n, lead=()):
  return {"scale": _Const(lead + (n,), 1.0), "bias": _Const(lead + (n,), 0.0)}


def _lora(n_in, n_out, rank, lead=()):
  # PEFT's init: A random (Kaiming-uniform-like), B zero -> the delta starts at 0.
  return {"a": _Uniform(lead + (n_in, rank), 1.0 / math.sqrt(n_in)), "b": _Const(lead + (rank, n_out), 0.0)}


def _ffn_lora(cfg, lead):
  e, i = cfg.width, cfg.backbone.intermediate_size
  return {"in": _lora(e, i, cfg.expert_rank, lead), "out": _lora(i, e, cfg.expert_rank, lead)}


def _heads(cfg, kind: str, n: int):
  """``n`` heads of one kind stacked on a leading axis (classification heads share
  the widest class count; narrower tasks mask their extra logits)."""
  e, lead = cfg.width, (n,)
  if kind == "cls":
    c = max(cfg.tasks[t].num_classes for t in _kind_tasks(cfg)[0])
    if cfg.head_style == "vilt":
      return {
        "fc1": _dense(e, 2 * e, lead=lead),
        "ln": _ln(2 * e, lead),
        "fc2": _dense(2 * e, e, lead=lead),
        "out": _dense(e, c, lead=lead),
      }
    return {"fc1": _dense(e, e // 2, lead=lead), "out": _dense(e // 2, c, lead=lead)}
  if kind == "image":
    c, s = cfg.gen_channels, cfg.image_size // 8
    conv = lambda ci, co: {
      "kernel": _Normal(lead + (4, 4, ci, co), 1.0 / math.sqrt(16 * ci)),
      "bias": _Const(lead + (co,), 0.0),
    }
    return {
      "fc": _dense(e, c * s * s, lead=lead),
      "deconv1": conv(c, c // 2),
      "deconv2": conv(c // 2, c // 4),
      "deconv3": conv(c // 4, 3),
    }
  # text generation: positions cross-attend to the fused vector, one GPT-2 block, vocab projection
  head = {
    "pos": _Normal(lead + (cfg.target_len, e), 0.02),
    "cross_ln": _ln(e, lead),
    "cross_v": _dense(e, e, lead=lead),
    "cross_o": _dense(e, e, lead=lead),
    "ln1": _ln(e, lead),
    "qkv": _dense(e, 3 * e, lead=lead),
    "attn_o": _dense(e, e, lead=lead),
    "ln2": _ln(e, lead),
    "mlp_in": _dense(e, 2 * e, lead=lead),
    "mlp_out": _dense(2 * e, e, lead=lead),
    "ln_f": _ln(e, lead),
    "vocab": _dense(e, cfg.answer_vocab, lead=lead),
  }
  if cfg.reference:  # quirk 5: GPT-2's token embeddings, which no output depends on
    head["unused_wte"] = _Normal(lead + (cfg.answer_vocab, e), 0.02)
  return head


@functools.partial(jax.jit, static_argnums=1)  # one program, not one per leaf shape
def init_trainable(key: jax.Array, cfg: TapModelConfig) -> dict:
  """The trainable pytree (one client's, unstacked), about 70 leaves whatever the
  number of blocks, experts, domains and tasks:

  * ``encoder/{image,text}``, ``shared_proj``: plain leaves.
  * ``block``: ``[8 blocks (BLOCKS), layers, ...]`` layer norms and Q/V LoRA.
  * ``domain``: ``[8 blocks, domains, layers, ...]`` MoDE FFN LoRA on the Q and V inputs.
  * ``expert``: ``[30 experts (EXPERTS), layers, ...]`` expert FFN LoRA.
  * ``head/{cls,image,text}``: ``[heads of that kind, ...]``.

  Dense kernels are ``N(0, 1/fan_in)``, LoRA ``A`` uniform in ``+-1/sqrt(fan_in)`` and
  ``B`` zero (the delta starts at 0), layer norms identity; every random value comes from
  one draw of ``key`` (:func:`_materialize`).
  """
  e, h, p, n_l = cfg.width, cfg.width, cfg.patch_size, cfg.num_layers
  n_patches = (cfg.image_size // p) ** 2
  nb, nd, ne = len(BLOCKS), len(cfg.domains), len(EXPERTS)
  heads = {kind: _heads(cfg, kind, len(tasks)) for kind, tasks in zip(HEAD_KINDS, _kind_tasks(cfg)) if tasks}
  spec = {
    "encoder": {
      "image": {
        "patch": _dense(p * p * 3, h),
        "cls": _Normal((h,), 0.02),
        "pos": _Normal((n_patches + 1, h), 0.02),
        "proj": _dense(h, e),
        "ln": _ln(e),
      },
      "text": {"proj": _dense(h, e), "ln": _ln(e)},
    },
    "shared_proj": _dense(e, e),
    "block": {
      "ln1": _ln(e, (nb, n_l)),
      "ln2": _ln(e, (nb, n_l)),
      "q": _lora(e, e, cfg.lora_rank, (nb, n_l)),
      "v": _lora(e, e, cfg.lora_rank, (nb, n_l)),
    },
    "domain": {"q": _ffn_lora(cfg, (nb, nd, n_l)), "v": _ffn_lora(cfg, (nb, nd, n_l))},
    "expert": _ffn_lora(cfg, (ne, n_l)),
    "head": heads,
  }
  return _materialize(key, spec)


def frozen_from_bert(bert_params: dict, cfg: TapModelConfig) -> dict:
  """The frozen pytree from a BERT encoder's params (canonical layout of
  :mod:`tapjax.model.bert`): text embeddings, and the ``2 * num_layers`` fusion
  layers stacked ``[2 * num_layers, ...]`` (MoTE layer ``i`` is pretrained layer
  ``i``, MoME layer ``i`` is pretrained layer ``num_layers + i``): the attention and
  the FFN every expert and domain expert of that layer starts from, stored once.

  Raises:
    ValueError: if the checkpoint is narrower or shallower than ``cfg.backbone``.
  """
  emb = bert_params["embeddings"]
  got = np.shape(emb["word"]["embedding"])[1]
  if got != cfg.width:
    raise ValueError(
      f"pretrained width {got} != config backbone.hidden_size {cfg.width}; "
      "build the config with BertConfig.from_hf(<checkpoint folder>)"
    )
  missing = [f"layer_{i}" for i in range(2 * cfg.num_layers) if f"layer_{i}" not in bert_params]
  if missing:
    raise ValueError(f"checkpoint lacks pretrained layers {missing} needed by num_layers={cfg.num_layers}")

  def layer(i):
    lp = bert_params[f"layer_{i}"]
    a = lp["attention"]
    return {
      "q": a["query"],
      "k": a["key"],
      "v": a["value"],
      "o": a["out"],
      "ffn_in": lp["ffn"]["in"],
      "ffn_out": lp["ffn"]["out"],
    }

  layers = [layer(i) for i in range(2 * cfg.num_layers)]
  f = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)
  return f(
    {
      "text_embed": {
        "word": emb["word"]["embedding"],
        "position": emb["position"]["embedding"],
        "token_type": emb["token_type"]["embedding"],
        "ln": emb["ln"],
      },
      "fusion": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers),
    }
  )


def random_bert_params(key: jax.Array, backbone: BertConfig) -> dict:
  """A randomly initialized BERT params tree (for tiny test models and param counts)."""
  from tapjax.model.bert import BertEncoder

  ids = jnp.zeros((1, 4), jnp.int32)
  return jax.jit(BertEncoder(backbone).init)(key, ids)["params"]  # one program


# ----------------------------------------------------------------------------- forward


def _layer_norm(p, x, eps=1e-12):
  """LayerNorm over the last axis; ``p`` leaves may lead with ``[rows]`` (one per row of ``x``)."""
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
  scale, bias = p["scale"], p["bias"]
  if scale.ndim == 2 and x.ndim == 3:  # per-row parameters [rows, E] against [rows, T, E]
    scale, bias = scale[:, None], bias[:, None]
  return (x - mu) * jax.lax.rsqrt(var + eps) * scale + bias


def _per_example(p, x):
  """``x [rows, ..., in] @ p [rows, in, out]`` or ``@ p [in, out]``."""
  return jnp.einsum("b...i,bio->b...o", x, p) if p.ndim == 3 else x @ p


def _fmix32(x):
  """MurmurHash3's 32-bit finalizer: a bijective avalanche mix of uint32 values."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_keep_mask(seed: jax.Array, shape: tuple[int, ...], keep: float) -> jax.Array:
  """A ``shape`` bool mask, True with probability ``keep``, from a counter-based hash.

  ``seed`` is two uint32 words (``[2]``, see :class:`_Keys`); each element's bits are
  ``fmix32(fmix32(index + seed[0]) ^ seed[1])``. On CPU this is about 40x cheaper than
  ``jax.random.bernoulli`` (threefry per element), which made dropout cost as much as
  the fusion's matmuls. Statistically adequate for dropout, not for cryptography.
  """
  idx = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  bits = _fmix32(_fmix32(idx + seed[0]) ^ seed[1])
  return bits < jnp.uint32(min(int(keep * 2.0**32), 2**32 - 1))


def _mix_seed(seed: jax.Array, i) -> jax.Array:
  """A child seed ``[2]`` (uint32) of ``seed [2]`` for the (possibly traced) integer ``i``."""
  i = jnp.asarray(i).astype(jnp.uint32)
  a = _fmix32(seed[0] ^ _fmix32(i + jnp.uint32(0x9E3779B9)))
  b = _fmix32(seed[1] ^ _fmix32(a + i + jnp.uint32(0x7F4A7C15)))
  return jnp.stack([a, b])


def _dropout(x, rate, keys):
  """Inverted dropout with the next key of ``keys`` (identity in eval mode)."""
  key = keys()
  if key is None or rate == 0.0:
    return x
  if keys.rng == "hash":
    keep = hash_keep_mask(key, x.shape, 1.0 - rate)
  else:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


class _Keys:
  """Deterministic stream of dropout keys (``None`` in eval mode); ``rng`` picks how
  masks are drawn (``"hash"`` or ``"jax"``, see :data:`DROPOUT_RNGS`).

  With ``"jax"`` the stream's keys are ``fold_in(key, n)`` and masks come from
  ``jax.random.bernoulli``. With ``"hash"`` the stream holds a ``[2]`` uint32 seed
  (the root key's data) and every child is :func:`_mix_seed`, an integer hash: no
  threefry anywhere in the forward pass. On XLA:CPU each threefry call lowers to its
  own while loop: about 80 of them were a fifth of the tiny one-client TAP step's fusions
  and compile time.
  """

  def __init__(self, key, rng="hash", *, seed=None):
    self.rng, self.n = rng, 0
    if seed is not None:  # an already derived hash seed
      self.key = seed
    elif key is None or rng != "hash":
      self.key = key
    else:
      self.key = jax.random.key_data(key).reshape(-1)[-2:].astype(jnp.uint32)

  def child(self, i) -> "_Keys":
    """The independent stream number ``i`` (traced or static) below this one."""
    if self.key is None:
      return _Keys(None, self.rng)
    if self.rng == "hash":
      return _Keys(None, self.rng, seed=_mix_seed(self.key, i))
    return _Keys(jax.random.fold_in(self.key, i), self.rng)

  def split(self, n: int):
    """``n`` independent streams' keys stacked on a leading axis (for ``vmap``; wrap
    each with :meth:`stream`)."""
    if self.rng == "hash":  # children < 2^16, sites from 2^16, splits from 2^17: all distinct
      return jax.vmap(lambda i: _mix_seed(self.key, i + 0x20000))(jnp.arange(n))
    return jax.random.split(self.key, n)

  def stream(self, key) -> "_Keys":
    """The stream around one key of :meth:`split`."""
    return _Keys(None, self.rng, seed=key) if self.rng == "hash" else _Keys(key, self.rng)

  def __call__(self):
    """The next key (``None`` in eval mode): a PRNG key, or a ``[2]`` hash seed."""
    if self.key is None:
      return None
    self.n += 1
    if self.rng == "hash":
      return _mix_seed(self.key, self.n + 0x10000)
    return jax.random.fold_in(self.key, self.n)


def _lora_delta(x, lora, scale, rate, keys):
  return _per_example(lora["b"], _per_example(lora["a"], _dropout(x, rate, keys))) * scale


def _ffn_out(x, h_base, base, lora, cfg, keys):
  """Frozen pretrained FFN + LoRA on both linears, given ``h_base = x @ W_in + b_in``
  (shared by every FFN of a layer that reads the same ``x``)."""
  s = cfg.expert_alpha / cfg.expert_rank
  h = jax.nn.gelu(h_base + _lora_delta(x, lora["in"], s, cfg.lora_dropout, keys), approximate=False)
  out = h @ base["ffn_out"]["kernel"] + base["ffn_out"]["bias"]
  return out + _lora_delta(h, lora["out"], s, cfg.lora_dropout, keys)


def _ffn(x, base, lora, cfg, keys):
  return _ffn_out(x, x @ base["ffn_in"]["kernel"] + base["ffn_in"]["bias"], base, lora, cfg, keys)


def _fusion_layer(h, mask, blk, dom_q, dom_v, expert, base, cfg, keys):
  """One pre-norm block layer: MoDE on the Q and V inputs, frozen attention with LoRA
  on Q and V, residual; then the path's expert FFN, residual.

  Args:
    h: ``[rows, len, E]``; mask ``[rows, len]``.
    blk, dom_q, dom_v, expert: LoRA / layer-norm params, leaves ``[rows, ...]`` (one per
      row) or unbatched.
    base: this layer's frozen weights.
  """
  s = cfg.lora_alpha / cfg.lora_rank
  y = _layer_norm(blk["ln1"], h)
  y_in = y @ base["ffn_in"]["kernel"] + base["ffn_in"]["bias"]  # both MoDE FFNs read y
  yq = y + _ffn_out(y, y_in, base, dom_q, cfg, keys)
  yv = y + _ffn_out(y, y_in, base, dom_v, cfg, keys)
  proj = lambda x, w: x @ w["kernel"] + w["bias"]
  if cfg.reference:  # quirks 3 and 8: a bias-free LoRA'd copy of W feeds the attention's projection
    q = proj(yq @ base["q"]["kernel"] + _lora_delta(yq, blk["q"], s, cfg.lora_dropout, keys), base["q"])
    v = proj(yv @ base["v"]["kernel"] + _lora_delta(yv, blk["v"], s, cfg.lora_dropout, keys), base["v"])
  else:
    q = proj(yq, base["q"]) + _lora_delta(yq, blk["q"], s, cfg.lora_dropout, keys)
    v = proj(yv, base["v"]) + _lora_delta(yv, blk["v"], s, cfg.lora_dropout, keys)
  k = proj(y, base["k"])
  h = h + proj(attend(q, k, v, mask, cfg.backbone.num_heads), base["o"])
  return h + _ffn(_layer_norm(blk["ln2"], h), base, expert, cfg, keys)


def _path_tables(cfg: TapModelConfig):
  """Static routing tables ``[paths, modalities, groups]``: whether the path reads
  ``shared_proj`` (``[paths]``), its block slot per stage ``[2, paths, M, G]`` and
  its expert slot per stage ``[2, paths, M, G]``."""
  n_p = len(_paths(cfg, MODALITIES[0], TASK_GROUPS[0]))
  shape = (2, n_p, len(MODALITIES), len(TASK_GROUPS))
  blk, exp = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  shared_in = np.zeros(n_p, bool)
  for mi, m in enumerate(MODALITIES):
    for gi, g in enumerate(TASK_GROUPS):
      for p, (inp, mote, mote_e, mome, mome_e) in enumerate(_paths(cfg, m, g)):
        shared_in[p] = inp == SHARED
        blk[:, p, mi, gi] = _block_slot("mote", mote), _block_slot("mome", mome)
        exp[:, p, mi, gi] = _expert_slot("mote", *mote_e), _expert_slot("mome", *mome_e)
  return shared_in, blk, exp


# Fusion depths up to this run as a Python loop over the layers (FLAVA's and the demo's 2
# layers), deeper ones (ViLT's 8) as a rolled ``lax.scan``. A scan, even unrolled, stacks
# every residual of the backward pass over the layers (a dynamic-update-slice per residual,
# a dynamic-slice per read): 7% of the tiny one-client TAP step's fusions at 2 layers.
UNROLL_FUSION_LAYERS = 2


def _masked_mean(h, mask):
  """``h [rows, len, E]`` mean-pooled over the real tokens of ``mask [rows, len]``: ``[rows, E]``."""
  w = mask.astype(h.dtype)[..., None] / jnp.maximum(mask.sum(-1), 1)[:, None, None]
  return jnp.sum(h * w, axis=1)


def _fuse(x, mask, modality, group, domain, params, frozen, cfg, keys, with_latent=False):
  """``[batch, E]``: the mean over the fusion paths of mean-pooled block outputs of
  one token stream per example; with ``with_latent``, ``([batch, E], latent [batch, E])``
  where ``latent`` is the modality -> task path's MoTE block output (after its
  ``num_layers`` MoTE layers, before any MoME layer), mean-pooled over the real
  tokens like the fused outputs (DisentAFL's latent). Without it the program is
  unchanged.

  The paths run as one ``[paths * batch]`` batch of rows, so the fusion layer is
  traced once whatever the number of paths and blocks; each row gathers the LoRA
  factors of its block, domain and expert slots. The ``2 * num_layers`` fusion layers
  run as a Python loop up to :data:`UNROLL_FUSION_LAYERS` layers, else as one rolled
  ``lax.scan`` (traced once whatever the depth).

  Args:
    x: ``[batch, len, E]`` encoder tokens; mask ``[batch, len]`` (1 = real token).
    modality, group, domain: ``[batch]`` int ids (modality of this stream).
    keys: this stream's dropout keys (:class:`_Keys`; layer ``j`` uses ``keys.child(j)``),
      ``None`` for eval.
  """
  keys = _Keys(None) if keys is None else keys
  shared_in, blk_t, exp_t = _path_tables(cfg)
  n_p, b = len(shared_in), x.shape[0]
  rows = lambda a: jnp.tile(a, (n_p,) + (1,) * (a.ndim - 1))  # [paths * batch, ...]
  path = np.repeat(np.arange(n_p), b)
  m_r, g_r, d_r = rows(modality), rows(group), rows(domain)
  blk = jnp.asarray(blk_t)[:, path, m_r, g_r]  # [2, rows]
  exp = jnp.asarray(exp_t)[:, path, m_r, g_r]  # [2, rows]
  h_shared = x @ params["shared_proj"]["kernel"] + params["shared_proj"]["bias"]
  h = jnp.where(jnp.asarray(shared_in)[:, None, None, None], h_shared[None], x[None])
  h = h.reshape((n_p * b,) + x.shape[1:])
  mask_r = rows(mask)
  n_l = cfg.num_layers

  def layer(h, xs):
    base, j = xs
    stage, li = j // n_l, j % n_l
    bi, ei = blk[stage], exp[stage]
    take = lambda tree, *idx: jax.tree_util.tree_map(lambda a: a[idx + (li,)], tree)
    blk_p = take(params["block"], bi)
    dom = take(params["domain"], bi, d_r)
    exp_p = take(params["expert"], ei)
    h = _fusion_layer(h, mask_r, blk_p, dom["q"], dom["v"], exp_p, base, cfg, keys.child(j))
    if not with_latent:
      return h, None
    rows_mt = slice(MODALITY_TASK_PATH * b, (MODALITY_TASK_PATH + 1) * b)
    return h, _masked_mean(h[rows_mt], mask)  # [batch, E] after fusion layer j

  if 2 * n_l <= UNROLL_FUSION_LAYERS:  # a Python loop: no residuals stacked over layers
    per_layer = []
    for j in range(2 * n_l):
      h, latent = layer(h, (jax.tree_util.tree_map(lambda a: a[j], frozen["fusion"]), j))
      per_layer.append(latent)
  else:
    h, per_layer = jax.lax.scan(layer, h, (frozen["fusion"], jnp.arange(2 * n_l)))
  pooled = _masked_mean(h, mask_r)  # [rows, E]
  z = pooled.reshape(n_p, b, -1).mean(0)
  if not with_latent:
    return z
  return z, per_layer[n_l - 1]  # the last MoTE layer's output


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
  x = frozen_embed["word"][ids] + frozen_embed["position"][: ids.shape[1]] + frozen_embed["token_type"][0]
  x = _layer_norm(frozen_embed["ln"], x, cfg.backbone.layer_norm_eps)
  return _layer_norm(p["ln"], x @ p["proj"]["kernel"] + p["proj"]["bias"])


def _cls_head(p, z, cfg, keys):
  d = lambda x, w: x @ w["kernel"] + w["bias"]
  if cfg.head_style == "vilt":
    h = jax.nn.gelu(_layer_norm(p["ln"], d(z, p["fc1"])), approximate=False)
    h = jax.nn.gelu(d(_dropout(h, cfg.head_dropout, keys), p["fc2"]), approximate=False)
  else:
    h = _dropout(jax.nn.relu(d(z, p["fc1"])), cfg.head_dropout, keys)
  return d(h, p["out"])


# Sub-pixel form of a stride-2, 4x4, "SAME" transposed convolution (see :func:`_deconv`):
# output phase ``a`` (row ``2i + a``) reads padded input rows ``i + dy``, ``dy`` in
# {a, a + 1}, through kernel row ``2 (dy - a) + a``. ``_PHASE_TAP[dy, a]`` is that kernel
# row (0 where ``dy`` is not one of phase ``a``'s rows, masked by ``_PHASE_OK``).
_PHASE_TAP = np.array([[2 * (dy - a) + a if 0 <= dy - a <= 1 else 0 for a in range(2)] for dy in range(3)])
_PHASE_OK = np.array([[0 <= dy - a <= 1 for a in range(2)] for dy in range(3)])


def _deconv(x, p):
  """``x [batch, n, n, C]`` -> ``[batch, 2n, 2n, C_out]``: ``jax.lax.conv_transpose`` with
  stride 2, the ``[4, 4, C, C_out]`` kernel and "SAME" padding, computed as ONE matmul
  of the 1-padded input's 3x3 neighbourhoods ``[batch, n, n, 9 C]`` into ``4 * C_out``
  channels (the four output phases), then depth-to-space. Same values up to float
  rounding. The heads of a kind are vmapped, and XLA:CPU lowered the kernel gradient of
  the vmapped (grouped) convolution as a slow dilated convolution: a VQA-shaped image
  head's value and gradient took 96 ms in that form, and the dilated transposed form
  multiplies three zeros in four."""
  k = p["kernel"]
  b, n, _, c = x.shape
  co = k.shape[-1]
  w = k[_PHASE_TAP[:, :, None, None], _PHASE_TAP[None, None, :, :]]  # [3 dy, 2 a, 3 dx, 2 b, C, C_out]
  ok = (_PHASE_OK[:, :, None, None] & _PHASE_OK[None, None, :, :])[..., None, None]
  w = jnp.where(ok, w, 0.0).transpose(0, 2, 4, 1, 3, 5).reshape(9 * c, 4 * co)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.concatenate([xp[:, dy : dy + n, dx : dx + n] for dy in range(3) for dx in range(3)], -1)
  y = (patches @ w).reshape(b, n, n, 2, 2, co).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * n, 2 * n, co)
  return y + p["bias"]


def _image_head(p, z, cfg):
  s, c = cfg.image_size // 8, cfg.gen_channels
  x = (z @ p["fc"]["kernel"] + p["fc"]["bias"]).reshape(z.shape[0], s, s, c)
  x = jax.nn.relu(_deconv(x, p["deconv1"]))
  x = jax.nn.relu(_deconv(x, p["deconv2"]))
  return _deconv(x, p["deconv3"])  # [batch, S, S, 3], no output activation (as the reference)


def _text_head(p, z, cfg, keys):
  """Non-autoregressive: learned positions cross-attend to the fused vector (one key,
  so the attention is the value path), a causal GPT-2 block, vocab logits."""
  d = lambda x, w: x @ w["kernel"] + w["bias"]
  b, e = z.shape
  h = jnp.broadcast_to(p["pos"], (b,) + p["pos"].shape)
  if not cfg.reference:  # quirk 2: the reference never passes the fused features
    h = h + d(d(_layer_norm(p["cross_ln"], z), p["cross_v"]), p["cross_o"])[:, None, :]
  q, k, v = jnp.split(d(_layer_norm(p["ln1"], h), p["qkv"]), 3, axis=-1)
  causal = jnp.tril(jnp.ones((cfg.target_len, cfg.target_len), bool))[None]
  h = h + _dropout(d(attend(q, k, v, causal, cfg.text_head_heads), p["attn_o"]), cfg.head_dropout, keys)
  m = jax.nn.gelu(d(_layer_norm(p["ln2"], h), p["mlp_in"]), approximate=True)
  h = h + _dropout(d(m, p["mlp_out"]), cfg.head_dropout, keys)
  return d(_layer_norm(p["ln_f"], h), p["vocab"])  # [batch, La, answer_vocab]


def _select(stacked, idx):
  """``stacked [heads, batch, ...]``, ``idx [batch]`` -> ``[batch, ...]``. Rows whose task has
  no head of this kind get an arbitrary (clipped) head's output; losses ignore them."""
  idx = jnp.clip(idx, 0, stacked.shape[0] - 1)
  return jnp.take_along_axis(stacked, idx.reshape((1, -1) + (1,) * (stacked.ndim - 2)), axis=0)[0]


def _stacked_heads(fn, heads, z, keys):
  """``fn(head, z, keys)`` for every head of one kind (``heads`` leaves ``[heads, ...]``):
  ``[heads, batch, ...]``, one traced head whatever the number of tasks. Head ``i`` draws
  its dropout from ``keys.split(heads)[i]``."""
  n = jax.tree_util.tree_leaves(heads)[0].shape[0]
  if keys.key is None:
    return jax.vmap(lambda h: fn(h, z, keys))(heads)
  return jax.vmap(lambda h, k: fn(h, z, keys.stream(k)))(heads, keys.split(n))


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

  @property
  def multimodal(self) -> bool:
    """Whether some task reads two modalities per example (then a second token stream exists)."""
    return any(len(t.modalities) > 1 for t in self.cfg.tasks)

  @property
  def num_latent_groups(self) -> int:
    """Number of DisentAFL latent groups (:data:`LATENT_GROUPS`, one per (modality, task group))."""
    return len(LATENT_GROUPS)

  def apply(self, params, frozen, batch, key=None):
    """Outputs for a mixed batch.

    Every example runs ONE token stream through the fusion: its image if it has one,
    else its text. Examples with both modalities (VQA) also run their text stream,
    and only when the batch holds such an example (``lax.cond``; under ``vmap`` both
    branches run). The two streams' fused vectors are averaged.

    Args:
      batch: ``image [batch, S, S, 3]``, ``text``/``text_mask [batch, Lt]``, ``task``,
        ``domain [batch]``, ``has_image``/``has_text [batch]`` (bool).
      key: dropout key, ``None`` for eval.

    Returns:
      ``{"class_logits": [batch, max_classes], "image": [batch, S, S, 3],
      "token_logits": [batch, La, answer_vocab]}`` (arbitrary where the task has no such
      head; the losses pick by task kind).
    """
    return self._forward(params, frozen, batch, key, with_latents=False)

  def apply_with_latents(self, params, frozen, batch, key=None):
    """``(outputs, latents)``: :meth:`apply`'s outputs (same key, same values) and the
    DisentAFL latents of every token stream that ran.

    Returns:
      ``latents``: a :class:`tapjax.disentangle.Latents` over ``[streams * batch]`` rows
      (stream-major: every example's first stream, then, for a multi-modal model, every
      example's text stream): ``values [rows, E]`` the modality -> task path's MoTE output
      mean-pooled over the stream's real tokens, ``group [rows]`` the row's index in
      :data:`LATENT_GROUPS` (its stream's modality and its task's group), ``valid
      [rows]`` whether the stream exists (the second stream only for two-modality examples).
    """
    return self._forward(params, frozen, batch, key, with_latents=True)

  def _forward(self, params, frozen, batch, key, with_latents):
    cfg = self.cfg
    keys = _Keys(key, cfg.dropout_rng)
    cls, img, txt, head_of, num_classes, kind, group_of = self._tables()
    task = batch["task"]
    group = jnp.asarray(group_of)[task]
    domain = batch["domain"]
    b = task.shape[0]
    image = encode_image(params["encoder"]["image"], batch["image"], cfg)  # [batch, Ti, E]
    text = encode_text(params["encoder"]["text"], frozen["text_embed"], batch["text"], cfg)
    n_image = image.shape[1]
    length = max(n_image, text.shape[1])
    pad = lambda a: jnp.pad(a, [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    image, text, text_mask = pad(image), pad(text), pad(batch["text_mask"])
    image_mask = jnp.broadcast_to((jnp.arange(length) < n_image).astype(text_mask.dtype), (b, length))
    has_image, has_text = batch["has_image"], batch["has_text"]
    first = has_image[:, None]
    first_modality = jnp.where(has_image, 0, 1).astype(jnp.int32)  # index in MODALITIES
    x1, m1 = jnp.where(first[..., None], image, text), jnp.where(first, image_mask, text_mask)
    stream = lambda x, m, modality, i: _fuse(
      x, m, modality, group, domain, params, frozen, cfg, keys.child(i), with_latents
    )  # [batch, E], or with_latents ([batch, E], the stream's latent [batch, E])
    fused = stream(x1, m1, first_modality, 1)
    z, first_latent = fused if with_latents else (fused, None)
    lat, lat_modality, lat_valid = [first_latent], [first_modality], [jnp.ones((b,), bool)]
    if self.multimodal:  # the text stream of two-modality examples, when the batch has one
      both = has_image & has_text
      text_modality = jnp.ones((b,), jnp.int32)
      zero = jnp.zeros_like(z)
      second = jax.lax.cond(
        jnp.any(both),
        lambda: stream(text, text_mask, text_modality, 2),
        lambda: (zero, zero) if with_latents else zero,
      )
      second, second_latent = second if with_latents else (second, None)
      z = jnp.where(both[:, None], 0.5 * (z + second), z)
      lat.append(second_latent)
      lat_modality.append(text_modality)
      lat_valid.append(both)
    out = {}
    heads = params["head"]
    sel = lambda stacked: _select(stacked, jnp.asarray(head_of)[task])
    if cls:
      logits = sel(_stacked_heads(lambda h, z_, k: _cls_head(h, z_, cfg, k), heads["cls"], z, keys.child(3)))
      valid = jnp.arange(logits.shape[-1]) < jnp.asarray(num_classes)[task][:, None]
      out["class_logits"] = jnp.where(valid, logits, -1e9)
    if img:
      out["image"] = sel(
        _stacked_heads(lambda h, z_, k: _image_head(h, z_, cfg), heads["image"], z, _Keys(None))
      )
    if txt:
      out["token_logits"] = sel(
        _stacked_heads(lambda h, z_, k: _text_head(h, z_, cfg, k), heads["text"], z, keys.child(4))
      )
    if not with_latents:
      return out
    lat_group = [jnp.asarray(_LATENT_GROUP_OF)[m, group] for m in lat_modality]
    return out, Latents(jnp.concatenate(lat), jnp.concatenate(lat_group), jnp.concatenate(lat_valid))

  def _per_kind(self, batch, cls_val, img_val, txt_val):
    kind = jnp.asarray(self._tables()[5])[batch["task"]]
    is_cls = (kind == TaskKind.IMAGE_CLASSIFICATION) | (kind == TaskKind.TEXT_CLASSIFICATION)
    zero = jnp.zeros(batch["task"].shape[0])
    return jnp.where(
      is_cls,
      cls_val if cls_val is not None else zero,
      jnp.where(
        kind == TaskKind.IMAGE_GENERATION,
        img_val if img_val is not None else zero,
        txt_val if txt_val is not None else zero,
      ),
    )

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
      if self.cfg.reference:  # NCHW's last axis is width: axis 2 of NHWC
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

  def predict(self, out, batch):
    """Per-example predictions for metrics computed on the host (METEOR, BERTScore):
    ``{"answer": int32 [batch, La]}``, the argmax answer-vocabulary index per target
    position (zeros when the model has no text-generation head)."""
    if "token_logits" not in out:
      return {"answer": jnp.zeros((batch["task"].shape[0], self.cfg.target_len), jnp.int32)}
    return {"answer": jnp.argmax(out["token_logits"], -1).astype(jnp.int32)}

  def objective(self) -> Objective:
    return Objective(self.apply, self.loss, self.divergence, self.metrics)


KIND_METRICS = {
  TaskKind.IMAGE_CLASSIFICATION: ("accuracy",),
  TaskKind.TEXT_CLASSIFICATION: ("accuracy",),
  TaskKind.IMAGE_GENERATION: ("mse",),
  TaskKind.TEXT_GENERATION: ("token_accuracy", "token_ce", "perplexity"),
}


def client_holders(cfg: TapModelConfig, names: tuple[str, ...], held: np.ndarray) -> np.ndarray:
  """``[clients, components]`` bool: what each client's examples use.

  Args:
    names: the component names (:attr:`ComponentModel.names`).
    held: bool ``[clients, tasks, modalities (MODALITIES), domains (cfg.domains)]``:
      whether the client has an example of that task with that input modality and
      domain. A client whose text-generation examples are all text-only (MMLU beside
      VQA's image + text under one head) holds no image component for them; one with
      a single domain holds that domain's experts only.
  """
  index = {n: i for i, n in enumerate(names)}
  out = np.zeros((held.shape[0], len(names)), bool)
  for c, t, m, d in zip(*np.nonzero(held)):
    uses = task_uses(cfg, int(t), modalities=(MODALITIES[m],), domains=(cfg.domains[d],))
    out[c, [index[u] for u in uses]] = True
  return out


def examples_held(cfg: TapModelConfig, examples: dict, num_examples: np.ndarray) -> np.ndarray:
  """The ``held`` argument of :func:`client_holders` from a federation's examples
  (``[clients, examples]`` fields ``task``, ``domain``, ``has_image``, ``has_text``;
  rows past ``num_examples [clients]`` are padding)."""
  n_clients, capacity = np.shape(examples["task"])
  valid = np.arange(capacity)[None] < np.asarray(num_examples)[:, None]
  out = np.zeros((n_clients, len(cfg.tasks), len(MODALITIES), len(cfg.domains)), bool)
  for m, field in enumerate(("has_image", "has_text")):
    c, e = np.nonzero(valid & np.asarray(examples[field], bool))
    out[c, np.asarray(examples["task"])[c, e], m, np.asarray(examples["domain"])[c, e]] = True
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class ComponentModel:
  """The component structure derived from the model: names, leaf ids, usage."""

  names: tuple[str, ...]
  leaf_ids: PyTree
  usage: np.ndarray  # [tasks, components] forward usage
  replace_usage: np.ndarray  # [tasks, components] what the replacement rule copies
  fusion: np.ndarray  # [components] bool: MoTE/MoME blocks, experts, domain experts


def component_model(trainable: PyTree, cfg: TapModelConfig) -> ComponentModel:
  names, leaf_ids = components.assign_named(component_names(trainable, cfg))
  usage = components.usage_matrix(names, [task_uses(cfg, t) for t in range(len(cfg.tasks))])
  replace = components.usage_matrix(names, [task_uses(cfg, t, True) for t in range(len(cfg.tasks))])
  fusion = np.array([n.split("/")[0] in ("mote", "mome", "expert") for n in names])
  return ComponentModel(names, leaf_ids, usage, replace, fusion)
