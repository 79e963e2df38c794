"""The TAP model: components, parameter counts, routing, gradients, compat quirks."""

import dataclasses
import difflib
import functools
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tapjax
from tapjax.data.tasks import DOMAINS, MODALITIES, TASK_GROUPS, TASKS, TaskKind, task_index
from tapjax.model import sizes, tap as M

HERE = pathlib.Path(__file__).parent
BACKBONE = sizes.SIZES["tiny"][0]
COMPATS = ("paper", "reference")
REGEN = os.environ.get("TAPJAX_REGEN_GOLDEN") == "1"


def make(compat="paper"):
  """``(cfg, model, frozen, params)`` of the tiny model, built once per compat (treat as read-only)."""
  return _make(compat)


@functools.lru_cache(maxsize=None)
def _make(compat):
  cfg = M.TapModelConfig(
    tasks=TASKS,
    domains=DOMAINS,
    backbone=BACKBONE,
    image_size=16,
    patch_size=8,
    text_len=12,
    target_len=4,
    answer_vocab=20,
    compat=compat,
  )
  model = M.TapModel(cfg)
  frozen = M.frozen_from_bert(M.random_bert_params(jax.random.key(0), BACKBONE), cfg)
  # jitted (one program per compat, about a second each: one random draw fills every leaf)
  params = M.init_trainable(jax.random.key(1), cfg)
  return cfg, model, frozen, params


def batch_for(tasks, seed=0, domains=None):
  """One example per task id in ``tasks`` (domain: ``domains[i]``, else the task's first)."""
  rng = np.random.default_rng(seed)
  n = len(tasks)
  t = np.asarray(tasks, np.int32)
  mods = [TASKS[i].modalities for i in tasks]
  domains = domains or [TASKS[i].domains[0] for i in tasks]
  return {
    "image": jnp.asarray(rng.normal(size=(n, 16, 16, 3)), jnp.float32),
    "text": jnp.asarray(rng.integers(1000, 2000, (n, 12)), jnp.int32),
    "text_mask": jnp.ones((n, 12), jnp.int32),
    "target": jnp.asarray(rng.integers(1, 20, (n, 4)), jnp.int32),
    "target_mask": jnp.ones((n, 4), jnp.int32),
    "label": jnp.zeros(n, jnp.int32),
    "task": jnp.asarray(t),
    "domain": jnp.asarray([DOMAINS.index(d) for d in domains], jnp.int32),
    "has_image": jnp.asarray(["image" in m for m in mods]),
    "has_text": jnp.asarray(["text" in m for m in mods]),
  }


def randomize(params, seed=3):
  """Nonzero LoRA B factors so every trainable leaf gets a gradient where it is used."""
  return _randomize(params, jax.random.key(seed))


@jax.jit  # one program (eager, every leaf shape compiled its own)
def _randomize(params, key):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
    tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


def component_nonzero(tree, leaf_ids, num_components):
  """``[components]`` bool: which components have a nonzero entry (stacked leaves per slice)."""
  out = np.zeros(num_components, bool)
  for i, g in zip(jax.tree_util.tree_leaves(leaf_ids), jax.tree_util.tree_leaves(tree)):
    ids = np.asarray(i)
    per_slice = (np.asarray(g) != 0).reshape(ids.shape + (-1,)).any(-1)  # on the host: no eager op per leaf
    np.logical_or.at(out, ids.ravel(), per_slice.ravel())
  return out


def row(cm, matrix, t):
  """Task ``t``'s row of a ``[tasks, components]`` matrix as a set of names."""
  return {cm.names[c] for c in np.flatnonzero(matrix[t])}


def check_golden(name, text):
  """``text`` equals the file ``name``; with TAPJAX_REGEN_GOLDEN=1, rewrite it and fail."""
  path = HERE / name
  if REGEN:
    path.write_text(text)
    pytest.fail(f"wrote {path}: review it, then re-run without TAPJAX_REGEN_GOLDEN=1")
  assert path.exists(), f"{path} is missing: run once with TAPJAX_REGEN_GOLDEN=1 and review it"
  want = path.read_text()
  if text != want:
    diff = difflib.unified_diff(want.splitlines(), text.splitlines(), name, "computed", lineterm="", n=1)
    pytest.fail(f"{name} != computed (TAPJAX_REGEN_GOLDEN=1 rewrites it):\n" + "\n".join(diff)[:8000])


# --------------------------------------------------------------------------- hand-written usage
#
# Written from the architecture, NOT from tap._paths / task_uses. An input of modality m
# of a task of group g takes these fusion paths (input, MoTE block, MoTE expert, MoME
# block, MoME expert):
#   shared -> task:      shared_proj, mote/m,      expert/mote/shared/g,      mome/g,      expert/mome/g/shared
#   modality -> task:    private,     mote/m,      expert/mote/m/g,           mome/g,      expert/mome/g/m
#   modality -> shared:  private,     mote/m,      expert/mote/m/shared,      mome/shared, expert/mome/shared/m
#   shared -> shared:    shared_proj, mote/shared, expert/mote/shared/shared, mome/shared, expert/mome/shared/shared
#                        (paper only: dead in the reference, quirk 1)
# plus encoder/m per modality, shared_proj, head/<task>, and per block used its domain
# experts <block>/domain/<d> for the task's domains. The reference's replacement rule
# copies, for classification tasks, neither any mome/... component (MoME blocks and their
# domain experts) nor any expert keyed by the task's group.

DIGITS_CLS_PAPER = {
  "encoder/image",
  "shared_proj",
  "head/digits_cls",
  "mote/image",
  "mote/shared",
  "mome/image_classification",
  "mome/shared",
  "mote/image/domain/handwritten",
  "mote/shared/domain/handwritten",
  "mome/image_classification/domain/handwritten",
  "mome/shared/domain/handwritten",
  "expert/mote/shared/image_classification",  # shared -> task
  "expert/mome/image_classification/shared",
  "expert/mote/image/image_classification",  # image -> task
  "expert/mome/image_classification/image",
  "expert/mote/image/shared",  # image -> shared
  "expert/mome/shared/image",
  "expert/mote/shared/shared",  # shared -> shared
  "expert/mome/shared/shared",
}
DIGITS_CLS_REFERENCE = {
  "encoder/image",
  "shared_proj",
  "head/digits_cls",
  "mote/image",
  "mome/image_classification",
  "mome/shared",
  "mote/image/domain/handwritten",
  "mome/image_classification/domain/handwritten",
  "mome/shared/domain/handwritten",
  "expert/mote/shared/image_classification",
  "expert/mome/image_classification/shared",
  "expert/mote/image/image_classification",
  "expert/mome/image_classification/image",
  "expert/mote/image/shared",
  "expert/mome/shared/image",
}
DIGITS_CLS_REFERENCE_REPLACE = {
  "encoder/image",
  "shared_proj",
  "head/digits_cls",
  "mote/image",
  "mote/image/domain/handwritten",
  "expert/mote/image/shared",
  "expert/mome/shared/image",
}
VQA_GEN_PAPER = {
  "encoder/image",
  "encoder/text",
  "shared_proj",
  "head/vqa_gen",
  "mote/image",
  "mote/text",
  "mote/shared",
  "mome/text_generation",
  "mome/shared",
  "mote/image/domain/visual_answering",
  "mote/text/domain/visual_answering",
  "mote/shared/domain/visual_answering",
  "mome/text_generation/domain/visual_answering",
  "mome/shared/domain/visual_answering",
  "expert/mote/shared/text_generation",  # shared -> task (both modalities)
  "expert/mome/text_generation/shared",
  "expert/mote/image/text_generation",  # image -> task
  "expert/mome/text_generation/image",
  "expert/mote/text/text_generation",  # text -> task
  "expert/mome/text_generation/text",
  "expert/mote/image/shared",  # image -> shared
  "expert/mome/shared/image",
  "expert/mote/text/shared",  # text -> shared
  "expert/mome/shared/text",
  "expert/mote/shared/shared",  # shared -> shared
  "expert/mome/shared/shared",
}
VQA_GEN_REFERENCE = {
  "encoder/image",
  "encoder/text",
  "shared_proj",
  "head/vqa_gen",
  "mote/image",
  "mote/text",
  "mome/text_generation",
  "mome/shared",
  "mote/image/domain/visual_answering",
  "mote/text/domain/visual_answering",
  "mome/text_generation/domain/visual_answering",
  "mome/shared/domain/visual_answering",
  "expert/mote/shared/text_generation",
  "expert/mome/text_generation/shared",
  "expert/mote/image/text_generation",
  "expert/mome/text_generation/image",
  "expert/mote/text/text_generation",
  "expert/mome/text_generation/text",
  "expert/mote/image/shared",
  "expert/mome/shared/image",
  "expert/mote/text/shared",
  "expert/mome/shared/text",
}
LITERAL_ROWS = {  # (task, compat, replace) -> row
  ("digits_cls", "paper", False): DIGITS_CLS_PAPER,
  ("digits_cls", "paper", True): DIGITS_CLS_PAPER,
  ("digits_cls", "reference", False): DIGITS_CLS_REFERENCE,
  ("digits_cls", "reference", True): DIGITS_CLS_REFERENCE_REPLACE,
  ("vqa_gen", "paper", False): VQA_GEN_PAPER,
  ("vqa_gen", "paper", True): VQA_GEN_PAPER,
  ("vqa_gen", "reference", False): VQA_GEN_REFERENCE,
  ("vqa_gen", "reference", True): VQA_GEN_REFERENCE,
}


def hand_paths(m, g, compat):
  """The fusion paths of an input of modality ``m`` for a task of group ``g``, as listed
  above: ``(input, MoTE block, MoTE expert, MoME block, MoME expert)``."""
  paths = [
    ("shared_proj", f"mote/{m}", f"expert/mote/shared/{g}", f"mome/{g}", f"expert/mome/{g}/shared"),
    ("private", f"mote/{m}", f"expert/mote/{m}/{g}", f"mome/{g}", f"expert/mome/{g}/{m}"),
    ("private", f"mote/{m}", f"expert/mote/{m}/shared", "mome/shared", f"expert/mome/shared/{m}"),
  ]
  if compat == "paper":  # shared -> shared
    paths.append(
      ("shared_proj", "mote/shared", "expert/mote/shared/shared", "mome/shared", "expert/mome/shared/shared")
    )
  return paths


def path_list_row(task, compat, replace=False):
  """The components ``task`` uses (``replace``: that the replacement rule copies), from the
  path list above."""
  g = task.group
  blocks, experts = set(), set()
  for m in task.modalities:
    for _, mote, mote_e, mome, mome_e in hand_paths(m, g, compat):
      blocks |= {mote, mome}
      experts |= {mote_e, mome_e}
  uses = {"shared_proj", f"head/{task.name}"} | {f"encoder/{m}" for m in task.modalities}
  uses |= blocks | experts | {f"{b}/domain/{d}" for b in blocks for d in task.domains}
  if replace and compat == "reference" and task.num_classes:  # classification
    skipped_blocks = {b for b in blocks if b.startswith("mome/")}
    skipped = skipped_blocks | {f"{b}/domain/{d}" for b in skipped_blocks for d in task.domains}
    skipped |= {e for e in experts if g in e.split("/")[2:]}
    uses -= skipped
  return uses


def hand_row(task, compat, replace=False):
  """The literal row where :data:`LITERAL_ROWS` has one, else :func:`path_list_row`."""
  return LITERAL_ROWS.get((task.name, compat, replace)) or path_list_row(task, compat, replace)


def only_domain(names, domain):
  """``names`` without the domain experts of other domains than ``domain``."""
  return {n for n in names if "/domain/" not in n or n.endswith("/domain/" + domain)}


@functools.lru_cache(maxsize=None)
def gradient_support(compat):
  """``{(task id, domain): component names}`` with a nonzero gradient of the loss of one
  example of that task and domain (randomized params, eval mode); one compile."""
  cfg, model, frozen, params = make(compat)
  cm = M.component_model(params, cfg)
  params = randomize(params)
  grad = jax.jit(jax.grad(lambda p, batch: model.loss(model.apply(p, frozen, batch), batch).sum()))
  out = {}
  for t, task in enumerate(TASKS):
    for d in task.domains:
      nonzero = component_nonzero(grad(params, batch_for([t], domains=[d])), cm.leaf_ids, len(cm.names))
      out[t, d] = {cm.names[c] for c in np.flatnonzero(nonzero)}
  return out


def test_hand_written_rows_literals_agree_with_the_path_list():
  """The literal rows and the compact path list above say the same thing."""
  for (name, compat, replace), want in LITERAL_ROWS.items():
    task = TASKS[task_index(name)]
    assert path_list_row(task, compat, replace) == want, (name, compat, replace)


@pytest.mark.parametrize("compat", COMPATS)
def test_usage_equals_hand_written_rows(compat):
  cfg, _, _, params = make(compat)
  cm = M.component_model(params, cfg)
  for t, task in enumerate(TASKS):
    assert row(cm, cm.usage, t) == hand_row(task, compat), (task.name, "usage")
    assert row(cm, cm.replace_usage, t) == hand_row(task, compat, True), (task.name, "replace_usage")


@pytest.mark.parametrize("compat", COMPATS)
def test_gradient_support_equals_hand_written_rows(compat):
  """A task's loss moves exactly the components of its hand-written row (of an example's
  own domain only), independently of the model's path table. Reference text generation
  (quirk 2: the text head never reads the fused features): only the head moves."""
  support = gradient_support(compat)
  for t, task in enumerate(TASKS):
    want = hand_row(task, compat)
    if compat == "reference" and task.kind == TaskKind.TEXT_GENERATION:
      want = {f"head/{task.name}"}
    for d in task.domains:
      got = support[t, d]
      assert got == only_domain(want, d), (task.name, d, sorted(got ^ only_domain(want, d)))


@pytest.mark.parametrize("compat", COMPATS)
def test_fuse_follows_hand_written_paths(compat, monkeypatch):
  """``_fuse`` is the mean over the hand-written paths of each path's masked mean-pooled
  output of its own MoTE and MoME layers (block, expert and domain expert slots looked up
  by component name), for every (modality, group) and a different domain per example:
  pins the wiring, which the usage rows (sets of names) cannot. Both ways of running the
  layers (the Python loop of shallow fusions, the ``lax.scan`` of deep ones) give it."""
  cfg, _, frozen, params = make(compat)
  assert cfg.num_layers == 1  # MoTE = pretrained layer 0, MoME = pretrained layer 1
  cm = M.component_model(params, cfg)
  params = randomize(params)
  slot_of = lambda ids: {cm.names[c]: s for s, c in np.ndenumerate(np.asarray(ids))}
  block_slot = slot_of(cm.leaf_ids["block"]["ln1"]["scale"])
  domain_slot = slot_of(cm.leaf_ids["domain"]["q"]["in"]["a"])
  expert_slot = slot_of(cm.leaf_ids["expert"]["in"]["a"])
  combos = [(m, g) for m in MODALITIES for g in TASK_GROUPS]
  n, length = len(combos), 4
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(n, length, cfg.width)), jnp.float32)
  mask = jnp.asarray([[int(j <= i % length) for j in range(length)] for i in range(n)], jnp.int32)
  dom = [DOMAINS[(3 * i + 1) % len(DOMAINS)] for i in range(n)]
  ids = lambda xs, table: jnp.asarray([table.index(v) for v in xs], jnp.int32)
  args = (
    x,
    mask,
    ids([m for m, _ in combos], MODALITIES),
    ids([g for _, g in combos], TASK_GROUPS),
    ids(dom, DOMAINS),
    params,
    frozen,
    cfg,
    None,
  )
  got = jax.jit(lambda *a: M._fuse(*a), static_argnums=7)(*args)
  monkeypatch.setattr(M, "UNROLL_FUSION_LAYERS", 0)
  scanned = jax.jit(lambda *a: M._fuse(*a), static_argnums=7)(*args)  # a new function: a new trace
  np.testing.assert_allclose(scanned, got, rtol=1e-5, atol=1e-6)
  layer = jax.jit(lambda *a: M._fusion_layer(*a, cfg, M._Keys(None)))
  at = lambda tree, idx: jax.tree_util.tree_map(lambda a: a[idx], tree)
  stage_base = [at(frozen["fusion"], j) for j in (0, 1)]
  sp = params["shared_proj"]
  for i, (m, g) in enumerate(combos):
    pooled = []
    for inp, *route in hand_paths(m, g, compat):
      h = x[i : i + 1] @ sp["kernel"] + sp["bias"] if inp == "shared_proj" else x[i : i + 1]
      for stage, (blk, exp) in enumerate((route[:2], route[2:])):
        layer_0 = lambda tree, *slot: at(tree, tuple(slot) + (0,))
        dq = layer_0(params["domain"]["q"], *domain_slot[f"{blk}/domain/{dom[i]}"])
        dv = layer_0(params["domain"]["v"], *domain_slot[f"{blk}/domain/{dom[i]}"])
        b, e = layer_0(params["block"], *block_slot[blk]), layer_0(params["expert"], *expert_slot[exp])
        h = layer(h, mask[i : i + 1], b, dq, dv, e, stage_base[stage])
      w = np.asarray(mask[i], np.float32) / float(mask[i].sum())
      pooled.append((np.asarray(h[0]) * w[:, None]).sum(0))
    np.testing.assert_allclose(got[i], np.mean(pooled, 0), rtol=1e-4, atol=1e-5, err_msg=f"{compat} {m} {g}")


def test_usage_equals_gradient_support_per_task():
  """A task's loss has nonzero gradient exactly on the components its usage row names
  (domain experts: only the example's own domain)."""
  cfg, _, _, params = make()
  cm = M.component_model(params, cfg)
  for (t, d), got in gradient_support("paper").items():
    want = only_domain(row(cm, cm.usage, t), d)
    assert got == want, f"task {TASKS[t].name}, {d}: gradient support != usage for {sorted(got ^ want)}"


# --------------------------------------------------------------------------- golden layout


def layout_text():
  """Every trainable leaf (path, shape, component of each slot) for both compat modes, and
  the usage and replace_usage rows (task -> sorted components)."""
  out = []
  cms = {}
  for compat in COMPATS:
    cfg, _, _, params = make(compat)
    cms[compat] = cm = M.component_model(params, cfg)
    out.append(f"## leaves compat={compat}: path shape [component], then one line per slot of a stacked leaf")
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    for (path, leaf), ids in zip(flat, jax.tree_util.tree_leaves(cm.leaf_ids), strict=True):
      name = "/".join(str(k.key) for k in path)
      shape, ids = tuple(np.shape(leaf)), np.asarray(ids)
      assert shape[: ids.ndim] == ids.shape, (name, shape, ids.shape)
      if ids.ndim == 0:
        out.append(f"{name} {shape} {cm.names[int(ids)]}")
        continue
      out.append(f"{name} {shape}")
      out += [f"  [{','.join(map(str, i))}] {cm.names[ids[i]]}" for i in np.ndindex(ids.shape)]
  for compat in COMPATS:
    for what in ("usage", "replace_usage"):
      out.append(f"## {what} compat={compat}: task, then its components")
      for t, task in enumerate(TASKS):
        out.append(task.name)
        out += [f"  {n}" for n in sorted(row(cms[compat], getattr(cms[compat], what), t))]
  return "\n".join(out) + "\n"


def test_golden_component_listing():
  cfg, _, _, params = make()
  cm = M.component_model(params, cfg)
  check_golden("golden_tiny_components.txt", "\n".join(cm.names) + "\n")


def test_golden_layout_and_usage():
  """Which leaf slot is which component, and the usage matrices (TAPJAX_REGEN_GOLDEN=1 rewrites)."""
  check_golden("golden_tiny_layout.txt", layout_text())


def test_parameter_counts_per_size():
  for size, (bb, layers) in sizes.SIZES.items():
    cfg = sizes.model_config(size, TASKS, DOMAINS)
    frozen, trainable = sizes.param_counts(cfg)
    e, i = bb.hidden_size, bb.intermediate_size
    per_layer = 4 * (e * e + e) + (e * i + i) + (i * e + e)  # attention q,k,v,o + one FFN
    emb = (bb.vocab_size + bb.max_position_embeddings + bb.type_vocab_size + 2) * e
    assert frozen == {"text_embed": emb, "fusion": 2 * layers * per_layer}
    # one expert: LoRA on both FFN linears, per layer
    r = cfg.expert_rank
    assert trainable["expert/mote/image/shared"] == layers * (e * r + r * i + i * r + r * e)
    assert trainable["shared_proj"] == e * e + e
    assert len(trainable) == 113
  flava = sum(sizes.param_counts(sizes.model_config("flava", TASKS, DOMAINS))[1].values())
  vilt = sum(sizes.param_counts(sizes.model_config("vilt", TASKS, DOMAINS))[1].values())
  assert vilt > flava  # 4 layers per block


def test_unheld_components_get_exactly_zero_gradient():
  cfg, model, frozen, params = make()
  cm = M.component_model(params, cfg)
  params = randomize(params)
  client_tasks = np.zeros((1, len(TASKS)), bool)
  client_tasks[0, [0, 1]] = True  # digits_cls + topic_cls
  held = tapjax.holders(client_tasks, cm.usage)[0]
  batch = batch_for([0, 1, 0, 1])
  grads = jax.jit(
    jax.grad(lambda p: model.loss(model.apply(p, frozen, batch, jax.random.key(0)), batch).mean())
  )(params)
  moved = component_nonzero(grads, cm.leaf_ids, len(cm.names))
  assert not (moved & ~held).any(), [cm.names[c] for c in np.flatnonzero(moved & ~held)]
  assert (moved & held).sum() > 10
  assert held.sum() < len(cm.names) / 2


# --------------------------------------------------------------------------- compat quirks


def test_quirk1_shared_shared_path():
  for compat, want in (("paper", True), ("reference", False)):
    cfg, model, frozen, params = make(compat)
    cm = M.component_model(params, cfg)
    c = cm.names.index("mote/shared")
    assert bool(cm.usage[:, c].any()) == want
    batch = batch_for([0])
    p2 = jax.tree_util.tree_map(lambda x: x, params)
    slot = M.BLOCKS.index(("mote", "shared"))
    p2["block"]["ln1"]["scale"] = params["block"]["ln1"]["scale"].at[slot].mul(3.0)
    apply = jax.jit(lambda p: model.apply(p, frozen, batch)["class_logits"])
    moved = not np.allclose(apply(params), apply(p2))
    assert moved == want


def test_quirk2_text_head_conditioning():
  for compat, conditioned in (("paper", True), ("reference", False)):
    _, model, frozen, params = make(compat)
    t = [i for i, s in enumerate(TASKS) if s.kind == TaskKind.TEXT_GENERATION][0]
    a, b = batch_for([t], seed=0), batch_for([t], seed=1)
    apply = jax.jit(model.apply)
    la = apply(params, frozen, a)["token_logits"]
    lb = apply(params, frozen, b)["token_logits"]
    assert (not np.allclose(la, lb)) == conditioned


def np_layer_norm(p, x, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


np_erf = np.vectorize(math.erf)


def np_ffn(x, base, lora, s):
  """Frozen FFN (exact GELU) with LoRA ``(x @ a) @ b * s`` on both linears."""
  lo = lambda x, p: (x @ p["a"]) @ p["b"] * s
  h = x @ base["ffn_in"]["kernel"] + base["ffn_in"]["bias"] + lo(x, lora["in"])
  h = 0.5 * h * (1.0 + np_erf(h / math.sqrt(2.0)))
  return h @ base["ffn_out"]["kernel"] + base["ffn_out"]["bias"] + lo(h, lora["out"])


def np_attend(q, k, v, mask, heads):
  b, n, e = q.shape
  split = lambda x: x.reshape(b, -1, heads, e // heads).transpose(0, 2, 1, 3)  # [b, heads, n, d]
  scores = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(e // heads)
  scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return (p @ split(v)).transpose(0, 2, 1, 3).reshape(b, n, e)


def np_fusion_layer(h, mask, blk, dom_q, dom_v, expert, base, cfg):
  """``(output, (q, k, v))`` of one fusion layer in float64 numpy, from the paper's
  description (paper) or the published code (reference: quirks 3 and 8)."""
  s, se = cfg.lora_alpha / cfg.lora_rank, cfg.expert_alpha / cfg.expert_rank
  w = lambda name: base[name]["kernel"]
  b = lambda name: base[name]["bias"]
  y = np_layer_norm(blk["ln1"], h)
  yq = y + np_ffn(y, base, dom_q, se)  # MoDE FFN on the Q input
  yv = y + np_ffn(y, base, dom_v, se)  # and on the V input
  lora_q = (yq @ blk["q"]["a"]) @ blk["q"]["b"] * s
  lora_v = (yv @ blk["v"]["a"]) @ blk["v"]["b"] * s
  if cfg.reference:  # a bias-free LoRA'd copy of W feeds the real projection
    q = (yq @ w("q") + lora_q) @ w("q") + b("q")
    v = (yv @ w("v") + lora_v) @ w("v") + b("v")
  else:
    q = yq @ w("q") + b("q") + lora_q
    v = yv @ w("v") + b("v") + lora_v
  k = y @ w("k") + b("k")
  h = h + np_attend(q, k, v, mask, cfg.backbone.num_heads) @ w("o") + b("o")
  return h + np_ffn(np_layer_norm(blk["ln2"], h), base, expert, se), (q, k, v)


@pytest.mark.parametrize("compat", COMPATS)
def test_quirk3_double_projection_of_q_and_v(compat, monkeypatch):
  """``_fusion_layer`` against an independent numpy layer, with random (non-identity)
  frozen weights, nonzero biases and nonzero LoRA B factors everywhere; q, k, v are
  also checked where they enter the attention.

  paper:     q = yq @ Wq + bq + lora_q(yq)
  reference: q = (yq @ Wq + lora_q(yq)) @ Wq + bq (quirks 3 and 8), likewise v."""
  cfg = make(compat)[0]
  e, i, r, re = cfg.width, cfg.backbone.intermediate_size, cfg.lora_rank, cfg.expert_rank
  rng = np.random.default_rng(7)
  normal = lambda *shape, scale=1.0: (scale * rng.normal(size=shape)).astype(np.float32)
  dense = lambda n_in, n_out: {
    "kernel": normal(n_in, n_out, scale=n_in**-0.5),
    "bias": normal(n_out, scale=0.5),
  }
  ln = lambda: {"scale": 1.0 + normal(e, scale=0.2), "bias": normal(e, scale=0.2)}
  lora = lambda n_in, n_out, rank: {
    "a": normal(n_in, rank, scale=n_in**-0.5),
    "b": normal(rank, n_out, scale=0.3),
  }
  ffn_lora = lambda: {"in": lora(e, i, re), "out": lora(i, e, re)}
  base = {k: dense(e, e) for k in "qkvo"} | {"ffn_in": dense(e, i), "ffn_out": dense(i, e)}
  blk = {"ln1": ln(), "ln2": ln(), "q": lora(e, e, r), "v": lora(e, e, r)}
  dom_q, dom_v, expert = ffn_lora(), ffn_lora(), ffn_lora()
  h = normal(2, 5, e)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)

  seen = {}
  real_attend = M.attend

  def spy(q, k, v, mask, num_heads):
    seen.update(q=np.asarray(q), k=np.asarray(k), v=np.asarray(v))
    return real_attend(q, k, v, mask, num_heads)

  monkeypatch.setattr(M, "attend", spy)
  j = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)
  got = M._fusion_layer(
    jnp.asarray(h), jnp.asarray(mask), j(blk), j(dom_q), j(dom_v), j(expert), j(base), cfg, M._Keys(None)
  )
  f64 = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)
  want, (q, k, v) = np_fusion_layer(*f64((h, mask, blk, dom_q, dom_v, expert, base)), cfg)
  for name, a, b in (("q", seen["q"], q), ("k", seen["k"], k), ("v", seen["v"], v), ("out", got, want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"{compat}: {name}")


def test_quirk4_image_kd():
  rng = np.random.default_rng(0)
  s = jnp.asarray(rng.normal(size=(1, 16, 16, 3)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(1, 16, 16, 3)), jnp.float32)
  g = [i for i, x in enumerate(TASKS) if x.kind == TaskKind.IMAGE_GENERATION][0]
  batch = batch_for([g])
  paper = M.TapModel(make("paper")[0]).divergence({"image": s}, {"image": t}, batch, 1.0)
  np.testing.assert_allclose(paper, [np.mean((np.asarray(s) - np.asarray(t)) ** 2)], rtol=1e-5)
  ref = M.TapModel(make("reference")[0]).divergence({"image": s}, {"image": t}, batch, 1.0)
  sn, tn = np.asarray(s), np.asarray(t)  # softmax over the width axis (NCHW's last)
  p = np.exp(tn) / np.exp(tn).sum(2, keepdims=True)
  q = np.exp(sn) / np.exp(sn).sum(2, keepdims=True)
  np.testing.assert_allclose(ref, [np.sum(p * np.log(p / q))], rtol=1e-4)


def test_quirk5_unused_token_embeddings_only_in_reference():
  for compat, want in (("paper", False), ("reference", True)):
    _, _, _, params = make(compat)
    assert ("unused_wte" in params["head"]["text"]) == want


def test_reference_replacement_usage_skips_mome_for_classification():
  cfg, _, _, params = make("reference")
  cm = M.component_model(params, cfg)
  t = TASKS.index(next(x for x in TASKS if x.name == "digits_cls"))
  used = {cm.names[c] for c in np.flatnonzero(cm.usage[t])}
  copied = {cm.names[c] for c in np.flatnonzero(cm.replace_usage[t])}
  assert copied < used
  assert not any(n.startswith("mome/") for n in copied)
  assert any(n.startswith("mome/") for n in used)
  g = [i for i, x in enumerate(TASKS) if x.kind == TaskKind.TEXT_GENERATION][0]
  np.testing.assert_array_equal(cm.usage[g], cm.replace_usage[g])


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="compat"):
    M.TapModelConfig(tasks=TASKS, domains=DOMAINS, backbone=BACKBONE, compat="pytorch")
  with pytest.raises(ValueError, match="needs 4 pretrained layers"):
    M.TapModelConfig(tasks=TASKS, domains=DOMAINS, backbone=BACKBONE, num_layers=2)


def test_quirk7_text_kd_positions():
  rng = np.random.default_rng(0)
  t = [i for i, x in enumerate(TASKS) if x.kind == TaskKind.TEXT_GENERATION][0]
  batch = batch_for([t])
  batch["target_mask"] = jnp.asarray([[1, 1, 0, 0]], jnp.int32)
  s = {"token_logits": jnp.asarray(rng.normal(size=(1, 4, 20)), jnp.float32)}
  te = {"token_logits": jnp.asarray(rng.normal(size=(1, 4, 20)), jnp.float32)}
  per_tok = np.asarray(tapjax.kd_divergence(s["token_logits"], te["token_logits"]))[0]
  paper = M.TapModel(make("paper")[0]).divergence(s, te, batch, 1.0)
  ref = M.TapModel(make("reference")[0]).divergence(s, te, batch, 1.0)
  np.testing.assert_allclose(paper, [per_tok[:2].sum()], rtol=1e-5)
  np.testing.assert_allclose(ref, [per_tok.sum()], rtol=1e-5)


def test_client_holders_follow_the_examples_modalities_and_domains():
  """A client holds what its examples use: all of a task's modalities and domains give
  the task's usage row; text-only examples of the image+text task give no image
  component; one domain of three gives that domain's experts only."""
  cfg, _, _, params = make("paper")
  cm = M.component_model(params, cfg)
  vqa, qa = task_index("vqa_gen"), task_index("qa_gen")
  held = np.zeros((3, len(TASKS), len(MODALITIES), len(DOMAINS)), bool)
  held[0, vqa, :, DOMAINS.index("visual_answering")] = True  # both modalities, its domain
  held[0, qa, MODALITIES.index("text"), [DOMAINS.index(d) for d in TASKS[qa].domains]] = True
  held[1, vqa, MODALITIES.index("text"), DOMAINS.index("visual_answering")] = True  # text only
  held[2, qa, MODALITIES.index("text"), DOMAINS.index("law_answering")] = True  # one domain of 3
  got = M.client_holders(cfg, cm.names, held)
  tasks = np.zeros((3, len(TASKS)), bool)
  tasks[0, [vqa, qa]] = True
  np.testing.assert_array_equal(got[0], tapjax.holders(tasks, cm.usage)[0])
  names = lambda c: {cm.names[i] for i in np.flatnonzero(got[c])}
  assert names(1) == M.task_uses(cfg, vqa, modalities=("text",))
  assert not any(n.startswith(("encoder/image", "mote/image", "expert/mote/image")) for n in names(1))
  assert {n for n in names(2) if "/domain/" in n} == {
    n for n in names(0) if n.endswith("/domain/law_answering")
  }
  # from examples: padding rows and absent modalities never count
  ex = {
    "task": np.array([[vqa, vqa, qa]]),
    "domain": np.array([[3, 3, 4]]),
    "has_image": np.array([[False, True, True]]),
    "has_text": np.array([[True, True, True]]),
  }
  h = M.examples_held(cfg, ex, np.array([1]))
  assert np.flatnonzero(h.ravel()).tolist() == [np.ravel_multi_index((0, vqa, 1, 3), h.shape)]


def test_embedded_federation_holders_are_its_task_rows():
  """On the embedded federation every client's examples cover its tasks' modalities and
  domains, so the finer holders change nothing there (the demo's numbers stay)."""
  from tapjax.data import make_embedded_federation

  cfg, _, _, params = make("paper")
  cm = M.component_model(params, cfg)
  fed = make_embedded_federation(examples_per_task=8, test_examples_per_task=2, image_size=16)
  got = M.client_holders(cfg, cm.names, M.examples_held(cfg, fed.train, fed.n_train))
  np.testing.assert_array_equal(got, tapjax.holders(fed.client_tasks, cm.usage))


def test_init_draws_each_leaf_from_its_own_slice_with_the_stated_distribution():
  """``init_trainable`` fills every random leaf from one draw: check the distributions
  (dense kernels N(0, 1/fan_in), LoRA A uniform in +-1/sqrt(fan_in), LoRA B zero, layer
  norms identity) and that leaves do not share values (each leaf its own slice)."""
  cfg, _, _, params = make("paper")
  e = cfg.width
  kernel = np.asarray(params["shared_proj"]["kernel"])
  assert abs(kernel.mean()) < 0.05 / math.sqrt(e)
  np.testing.assert_allclose(kernel.std(), 1 / math.sqrt(e), rtol=0.1)
  a = np.asarray(params["expert"]["in"]["a"])
  bound = 1 / math.sqrt(e)
  assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.95 * bound
  np.testing.assert_allclose(a.std(), bound / math.sqrt(3), rtol=0.1)
  for lora in (params["expert"]["in"], params["block"]["q"], params["domain"]["v"]["out"]):
    assert not np.any(np.asarray(lora["b"]))
  assert np.all(np.asarray(params["block"]["ln1"]["scale"]) == 1)
  assert not np.any(np.asarray(params["block"]["ln1"]["bias"]))
  # no two random leaves start with the same values, and another key gives other values
  firsts = [
    np.asarray(x).ravel()[:8]
    for x in (
      params["block"]["q"]["a"],
      params["block"]["v"]["a"],
      params["expert"]["in"]["a"],
      params["domain"]["q"]["in"]["a"],
      params["domain"]["v"]["in"]["a"],
    )
  ]
  assert all(not np.allclose(x, y) for i, x in enumerate(firsts) for y in firsts[i + 1 :])
  other = M.init_trainable(jax.random.key(2), cfg)
  assert not np.allclose(other["shared_proj"]["kernel"], kernel)


def _primitives(jaxpr) -> set[str]:
  """Names of every primitive in ``jaxpr`` and its sub-jaxprs (scan, cond, pjit, ...)."""
  out = set()
  for eqn in jaxpr.eqns:
    out.add(eqn.primitive.name)
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out |= _primitives(inner)
  return out


def test_hashed_dropout_draws_no_threefry_and_fresh_masks():
  """With ``dropout_rng="hash"`` a training forward pass calls no threefry (on XLA:CPU each
  call is its own while loop: about 90 of them, a sixth of the training program's compile
  time); its masks still depend on the key, and one key repeats them exactly."""
  cfg, model, frozen, params = make("paper")
  batch = batch_for(list(range(len(TASKS))))
  fwd = lambda m: jax.make_jaxpr(lambda k: m.apply(params, frozen, batch, k))(jax.random.key(7)).jaxpr
  threefry = {"threefry2x32", "random_bits", "random_fold_in", "random_split"}
  assert not threefry & _primitives(fwd(model))
  jax_rng = M.TapModel(dataclasses.replace(cfg, dropout_rng="jax"))
  assert {"random_fold_in", "random_bits"} <= _primitives(fwd(jax_rng))  # the check can see them
  apply = jax.jit(model.apply)
  logits = lambda k: np.asarray(apply(params, frozen, batch, k)["class_logits"])
  same, again, other = logits(jax.random.key(7)), logits(jax.random.key(7)), logits(jax.random.key(8))
  np.testing.assert_array_equal(same, again)
  assert not np.allclose(same, other)
  assert not np.allclose(same, np.asarray(apply(params, frozen, batch, None)["class_logits"]))


def test_hash_seeds_are_distinct_and_keep_the_rate():
  """Children, heads and successive sites of one dropout stream get distinct seeds, and a
  mask keeps ``keep`` of its elements (to 0.5% over 10^5)."""
  keys = M._Keys(jax.random.key(3))
  seeds = [keys(), keys(), keys.child(0).key, keys.child(1).key, *keys.split(3)]
  seeds += [keys.child(0).child(0).key, keys.child(1).child(0).key, keys.child(0)()]
  as_tuples = {tuple(np.asarray(s).tolist()) for s in seeds}
  assert len(as_tuples) == len(seeds)
  mask = np.asarray(M.hash_keep_mask(seeds[0], (1000, 100), 0.9))
  assert abs(mask.mean() - 0.9) < 0.005
  other = np.asarray(M.hash_keep_mask(seeds[1], (1000, 100), 0.9))
  assert 0.8 < (mask == other).mean() < 0.84  # independent: 0.9^2 + 0.1^2 = 0.82


def test_deconv_equals_the_transposed_convolution_it_replaces():
  """``_deconv`` (one matmul over 3x3 neighbourhoods, four output phases) equals
  ``lax.conv_transpose`` (stride 2, 4x4, SAME) in values and gradients, also vmapped over
  stacked heads as the image heads run."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 5, 6)), jnp.float32)
  p = {
    "kernel": jnp.asarray(rng.normal(size=(2, 4, 4, 6, 4)), jnp.float32),
    "bias": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32),
  }

  def ref(x, p):
    y = jax.lax.conv_transpose(x, p["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"]

  def loss(f):
    return lambda x, p: jnp.sum(jnp.sin(jax.vmap(f, (None, 0))(x, p)))

  got, want = jax.jit(jax.vmap(M._deconv, (None, 0)))(x, p), jax.vmap(ref, (None, 0))(x, p)
  assert got.shape == (2, 3, 10, 10, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  g_got = jax.jit(jax.grad(loss(M._deconv), (0, 1)))(x, p)
  g_want = jax.grad(loss(ref), (0, 1))(x, p)
  for a, b in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
