"""The TAP model: components, parameter counts, routing, gradients, compat quirks."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tapjax
from tapjax.data.tasks import DOMAINS, TASKS, TaskKind
from tapjax.model import sizes, tap as M

HERE = pathlib.Path(__file__).parent
BACKBONE = sizes.SIZES["tiny"][0]


def make(compat="paper"):
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
  params = jax.jit(M.init_trainable, static_argnums=1)(jax.random.key(1), cfg)
  return cfg, model, frozen, params


def batch_for(tasks, seed=0):
  """One example per task id in ``tasks``."""
  rng = np.random.default_rng(seed)
  n = len(tasks)
  t = np.asarray(tasks, np.int32)
  mods = [TASKS[i].modalities for i in tasks]
  return {
    "image": jnp.asarray(rng.normal(size=(n, 16, 16, 3)), jnp.float32),
    "text": jnp.asarray(rng.integers(1000, 2000, (n, 12)), jnp.int32),
    "text_mask": jnp.ones((n, 12), jnp.int32),
    "target": jnp.asarray(rng.integers(1, 20, (n, 4)), jnp.int32),
    "target_mask": jnp.ones((n, 4), jnp.int32),
    "label": jnp.zeros(n, jnp.int32),
    "task": jnp.asarray(t),
    "domain": jnp.asarray([DOMAINS.index(TASKS[i].domains[0]) for i in tasks], jnp.int32),
    "has_image": jnp.asarray(["image" in m for m in mods]),
    "has_text": jnp.asarray(["text" in m for m in mods]),
  }


def randomize(params, seed=3):
  """Nonzero LoRA B factors so every trainable leaf gets a gradient where it is used."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
    tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


def component_nonzero(tree, leaf_ids, num_components):
  """``[components]`` bool: which components have a nonzero entry (stacked leaves per slice)."""
  out = np.zeros(num_components, bool)
  for i, g in zip(jax.tree_util.tree_leaves(leaf_ids), jax.tree_util.tree_leaves(tree)):
    ids = np.asarray(i)
    per_slice = np.asarray(g != 0).reshape(ids.shape + (-1,)).any(-1)
    np.logical_or.at(out, ids.ravel(), per_slice.ravel())
  return out


def test_golden_component_listing():
  cfg, _, _, params = make()
  cm = M.component_model(params, cfg)
  golden = (HERE / "golden_tiny_components.txt").read_text().split()
  assert list(cm.names) == golden


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


def test_usage_equals_gradient_support_per_task():
  """A task's loss has nonzero gradient exactly on the components its usage row names."""
  cfg, model, frozen, params = make()
  cm = M.component_model(params, cfg)
  params = randomize(params)
  grad = jax.jit(jax.grad(lambda p, batch: model.loss(model.apply(p, frozen, batch), batch).sum()))
  for t in range(len(TASKS)):
    grads = grad(params, batch_for([t]))
    nonzero = component_nonzero(grads, cm.leaf_ids, len(cm.names))
    # domain experts: only the example's own domain is touched
    expected = cm.usage[t].copy()
    for c, name in enumerate(cm.names):
      if "/domain/" in name and not name.endswith("/" + TASKS[t].domains[0]):
        expected[c] = False
    bad = [cm.names[c] for c in np.flatnonzero(nonzero != expected)]
    assert not bad, f"task {TASKS[t].name}: gradient support != usage for {bad}"


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
    la = model.apply(params, frozen, a)["token_logits"]
    lb = model.apply(params, frozen, b)["token_logits"]
    assert (not np.allclose(la, lb)) == conditioned


def test_quirk3_double_projection_of_q_and_v():
  """With identity Q/V projections both modes agree; with a non-identity one they differ."""
  outs = {}
  for compat in ("paper", "reference"):
    cfg, model, frozen, params = make(compat)
    for scale in (1.0, 2.0):
      base = jax.tree_util.tree_map(lambda x: x[0], frozen["fusion"])
      for w in ("q", "v"):
        base[w] = {"kernel": scale * jnp.eye(cfg.width), "bias": jnp.zeros(cfg.width)}
      blk = M.BLOCKS.index(("mote", "image"))
      exp = M.EXPERTS.index(("mote", "image", "shared"))
      take = lambda tree, *idx: jax.tree_util.tree_map(lambda x: x[idx + (0,)], tree)
      dom = take(params["domain"], blk, 0)
      outs[compat, scale] = np.asarray(
        M._fusion_layer(
          jnp.ones((1, 3, cfg.width)) * jnp.arange(cfg.width) / cfg.width,
          jnp.ones((1, 3)),
          take(params["block"], blk),
          dom["q"],
          dom["v"],
          take(params["expert"], exp),
          base,
          cfg,
          M._Keys(None),
        )
      )
  np.testing.assert_allclose(outs["paper", 1.0], outs["reference", 1.0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(outs["paper", 2.0], outs["reference", 2.0])


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
