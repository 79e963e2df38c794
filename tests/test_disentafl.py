"""DisentAFL: the orthogonality loss against a loop transcription of the reference's
``compute_orthogonal_loss``, the loss it adds, its FedAvg round and post-training on the
toy model, and the TAP model's latents against its fusion internals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tapjax
from tapjax import disentangle
from tapjax.data.tasks import DOMAINS, TASKS
from tapjax.model import tap as M

import toy
from model.test_tap_model import batch_for, make

# --------------------------------------------------------------------------- oracle


def reference_ortho(values, group, valid, chunk=16):
  """A loop transcription of the reference's ``compute_orthogonal_loss`` (weight 1):
  rows grouped in row order, groups paired in increasing id order, the pair's first
  group's rows normalized and cut into chunks of ``min(chunk, rows)``, the pair's term
  the mean over chunks of ``(chunk @ other.T) ** 2`` means, the loss the mean over pairs."""
  reps = {}
  for z, g, ok in zip(np.asarray(values, np.float64), np.asarray(group), np.asarray(valid)):
    if ok:
      reps.setdefault(int(g), []).append(z)
  normalize = lambda r: r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
  groups = [normalize(np.stack(reps[g])) for g in sorted(reps)]
  total, count = 0.0, 0
  for i in range(len(groups)):
    for j in range(i + 1, len(groups)):
      size = min(chunk, len(groups[i]))
      sims = [np.mean((groups[i][k : k + size] @ groups[j].T) ** 2) for k in range(0, len(groups[i]), size)]
      total += sum(sims) / len(sims)
      count += 1
  return total / count if count else 0.0


ortho = jax.jit(disentangle.orthogonality, static_argnums=(3, 4))


# --------------------------------------------------------------------------- the loss


def test_orthogonality_by_hand():
  e = np.eye(4, dtype=np.float32)
  g = np.array([0, 0, 1, 1], np.int32)
  ok = np.ones(4, bool)
  # orthogonal groups: 0 (whatever the scales)
  assert float(ortho(np.stack([e[0], 3 * e[0], 2 * e[1], -e[1]]), g, ok, 3, 16)) == pytest.approx(
    0.0, abs=1e-7
  )
  # identical directions: 1 per pair; three groups -> the MEAN over their 3 pairs
  same = np.stack([e[0], 2 * e[0], -e[0], 5 * e[0]])
  assert float(ortho(same, g, ok, 3, 16)) == pytest.approx(1.0, abs=1e-6)
  three = np.stack([e[0], 2 * e[0], e[0], e[1]])
  assert float(ortho(three, np.array([0, 0, 1, 2]), ok, 3, 16)) == pytest.approx(1 / 3, abs=1e-6)
  # mixed: cos^2(e0, (e0+e1)/sqrt2) = 1/2, averaged over g0's rows x g1's rows
  mixed = np.stack([e[0], e[1], e[0] + e[1], e[0] + e[1]])
  assert float(ortho(mixed, g, ok, 3, 16)) == pytest.approx(0.5, abs=1e-6)
  # rows marked invalid (even NaN ones) change nothing
  junk = np.concatenate([three, np.full((2, 4), np.nan, np.float32)])
  got = ortho(junk, np.array([0, 0, 1, 2, 1, 0]), np.array([1, 1, 1, 1, 0, 0], bool), 3, 16)
  assert float(got) == pytest.approx(1 / 3, abs=1e-6)


def test_fewer_than_two_groups_is_zero_with_finite_gradient():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
  mixed, ok = jnp.array([0, 1, 2, 0, 1]), jnp.ones(5, bool)
  cases = {
    "one group": (x, jnp.full(5, 2), ok),
    "one group valid": (x, mixed, jnp.array([1, 0, 0, 1, 0], bool)),
    "nothing valid": (x, mixed, jnp.zeros(5, bool)),
    "all-zero rows": (jnp.zeros_like(x), mixed, ok),
  }
  value_and_grad = jax.jit(jax.value_and_grad(disentangle.orthogonality), static_argnums=3)
  for name, (values, group, valid) in cases.items():
    loss, grad = value_and_grad(values, group, valid, 3)
    assert float(loss) == 0.0, name
    assert np.all(np.isfinite(np.asarray(grad))), name
    if name != "all-zero rows":  # (there a finite subgradient, as torch's F.normalize)
      assert not np.asarray(grad).any(), name


def test_orthogonality_equals_the_reference_loop_with_its_chunks():
  """Groups of 20 and 17 rows (chunks 16 + 4 and 16 + 1: the short chunk's rows weigh
  more), interleaved, with invalid rows; group 4 is absent, group 5 has one row."""
  rng = np.random.default_rng(1)
  sizes = {0: 20, 2: 3, 3: 17, 5: 1}
  group = np.concatenate([np.full(n, g) for g, n in sizes.items()] + [np.array([4, 1, 0])])
  valid = np.arange(len(group)) < sum(sizes.values())
  perm = rng.permutation(len(group))
  group, valid = group[perm].astype(np.int32), valid[perm]
  values = (rng.normal(size=(len(group), 6)) + 0.7).astype(np.float32)  # correlated rows
  want = reference_ortho(values, group, valid)
  got = float(ortho(values, group, valid, 6, 16))
  assert got == pytest.approx(want, rel=1e-5)
  plain = reference_ortho(values, group, valid, chunk=10**9)  # one chunk per group
  assert abs(want - plain) > 1e-3, "the case must exercise the chunking"
  assert float(ortho(values, group, valid, 6, None)) == pytest.approx(plain, rel=1e-5)


# --------------------------------------------------------------------------- toy model


TRACES = {"latents": 0}
NUM_GROUPS = 2 * toy.T  # (toy modality a/b) x task


def toy_apply_with_latents(params, frozen, batch, key):
  """The toy's outputs and one latent row per (modality the task reads, example): the
  modality encoder's ``tanh(x W)``, group ``modality * T + task``."""
  TRACES["latents"] += 1
  x = batch["x"] @ frozen["proj"]
  lat = jnp.stack([jnp.tanh(x @ params["enc_a"]["w"]), jnp.tanh(x @ params["enc_b"]["w"])])  # [2, batch, H]
  group = jnp.arange(2)[:, None] * toy.T + batch["task"][None]  # [2, batch]
  valid = jnp.asarray(toy.TASK_MODS)[batch["task"]].T  # [2, batch]
  latents = tapjax.Latents(lat.reshape(-1, toy.H), group.reshape(-1), valid.reshape(-1))
  return toy.apply(params, frozen, batch, key), latents


@pytest.fixture(scope="module")
def world():
  setup = toy.make_setup()[0]
  frozen = toy.frozen_params(jax.random.key(1))
  return dict(
    setup=setup,
    params=toy.init_params(jax.random.key(0)),
    frozen=frozen,
    data=toy.make_data(),
    root=jax.random.key(7),
    hp=tapjax.HParams.create(toy.T, lr_peak=3e-2, lr_min=1e-2, warmup_rounds=2, post_lr=1e-2),
    fedavg=jax.jit(tapjax.fedavg(setup).round),
    disentafl=jax.jit(tapjax.disentafl(setup, toy_apply_with_latents, NUM_GROUPS).round),
  )


def test_loss_is_task_loss_plus_weight_times_ortho(world):
  params, frozen = world["params"], world["frozen"]
  batch = jax.tree_util.tree_map(lambda x: x[2, :12], world["data"].examples)  # client 2: tasks 0 and 2
  key = jax.random.key(5)
  obj = tapjax.disentangled(toy.OBJECTIVE, toy_apply_with_latents, NUM_GROUPS)
  weighted = tapjax.supervised_loss(obj, tapjax.OrthoFrozen.create(frozen, 0.7))
  both = lambda p, b, k: (weighted(p, b, k), toy.loss(toy.apply(p, frozen, b, k), b))
  got, task = jax.jit(both)(params, batch, key)  # [batch] each
  x = np.asarray(batch["x"], np.float64) @ np.asarray(frozen["proj"], np.float64)
  t = np.asarray(batch["task"])
  uses = np.asarray(toy.TASK_MODS)[t]  # [batch, (a, b)]
  values = np.concatenate([np.tanh(x @ np.asarray(params[f"enc_{m}"]["w"])) for m in "ab"])
  want = reference_ortho(values, np.concatenate([t, toy.T + t]), np.concatenate([uses[:, 0], uses[:, 1]]))
  assert 0.05 < want < 0.95
  np.testing.assert_allclose(got, task + 0.7 * want, rtol=1e-5, atol=1e-6)
  assert float(jnp.mean(got)) == pytest.approx(float(jnp.mean(task)) + 0.7 * want, rel=1e-5)


def test_plain_frozen_is_a_clear_error(world):
  obj = tapjax.disentangled(toy.OBJECTIVE, toy_apply_with_latents, NUM_GROUPS)
  batch = jax.tree_util.tree_map(lambda x: x[0, :4], world["data"].examples)
  with pytest.raises(TypeError, match="OrthoFrozen"):
    obj.apply(world["params"], world["frozen"], batch, None)


def test_round_is_fedavg_at_weight_zero_differs_above_and_compiles_once(world):
  w = world
  args = lambda frozen: (w["frozen"] if frozen is None else frozen, w["data"], w["hp"], w["root"])
  state = tapjax.fedavg(w["setup"]).init(w["params"], w["data"].num_examples.shape[0])
  want, want_info = w["fedavg"](state, *args(None))
  runs = {}
  for weight in (0.0, 0.5, 2.0):
    runs[weight] = w["disentafl"](state, *args(tapjax.OrthoFrozen.create(w["frozen"], weight)))
    if weight == 0.0:
      traces = TRACES["latents"]
  assert TRACES["latents"] == traces, "a new weight recompiled the round"
  got, info = runs[0.0]
  for a, b in zip(jax.tree_util.tree_leaves((want, want_info)), jax.tree_util.tree_leaves((got, info))):
    np.testing.assert_array_equal(a, b)
  for weight in (0.5, 2.0):
    moved = jax.tree_util.tree_map(
      lambda a, b: float(jnp.max(jnp.abs(a - b))), want.server.params, runs[weight][0].server.params
    )
    assert moved["enc_a"]["w"] > 1e-4 and moved["enc_b"]["w"] > 1e-4, moved


def test_post_train_is_fedavg_post_at_weight_zero(world):
  w = world
  post = jax.jit(tapjax.post_train(w["setup"]))
  d_post = jax.jit(tapjax.disentafl_post_train(w["setup"], toy_apply_with_latents, NUM_GROUPS))
  run = lambda fn, frozen: fn(w["params"], frozen, w["data"], w["hp"], w["root"])
  want = run(post, w["frozen"])
  zero = run(d_post, tapjax.OrthoFrozen.create(w["frozen"], 0.0))
  half = run(d_post, tapjax.OrthoFrozen.create(w["frozen"], 0.5))
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(zero)):
    np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(want["enc_a"]["w"] - half["enc_a"]["w"]))) > 1e-4


# --------------------------------------------------------------------------- the TAP model


def test_tap_latents_are_the_modality_task_mote_output():
  """Every stream's latent equals its modality -> task MoTE block run by hand with
  ``_fusion_layer`` on the unpadded tokens (random LoRA factors: every expert differs),
  mean-pooled over its real tokens; groups and validity follow the example's streams;
  the outputs equal :meth:`TapModel.apply`'s."""
  cfg, model, frozen, params = make()
  rng = np.random.default_rng(3)  # on the host: no program per leaf shape
  params = jax.tree_util.tree_map(
    lambda x: np.asarray(x) + np.float32(0.05) * rng.normal(size=x.shape), params
  )
  params = jax.tree_util.tree_map(lambda x: x.astype(np.float32), params)
  tasks = [0, 1, 3, 4, 6]  # digits_cls (image), topic_cls (text), vqa_gen (both), qa_gen, concept_gen
  domains = ["handwritten", "news", "visual_answering", "medicine_answering", "common_sense_answering"]
  batch = batch_for(tasks, seed=2, domains=domains)
  batch["text_mask"] = batch["text_mask"].at[1, 7:].set(0).at[2, 9:].set(0)  # padded texts
  # (the first stream: the image if the task has one; the second: the text of two-modality tasks)
  streams = [(i, s, m) for i, t in enumerate(tasks) for s, m in enumerate(TASKS[t].modalities)]

  def by_hand(params, batch):
    """``[streams, E]``: each stream's MoTE block (m, task group) run layer by layer."""
    image = M.encode_image(params["encoder"]["image"], batch["image"], cfg)  # [n, Ti, E]
    text = M.encode_text(params["encoder"]["text"], frozen["text_embed"], batch["text"], cfg)
    out = []
    for i, _, m in streams:
      h = (image if m == "image" else text)[i : i + 1]
      mask = jnp.ones(h.shape[:2]) if m == "image" else batch["text_mask"][i : i + 1]
      bi, ei = M._block_slot("mote", m), M._expert_slot("mote", m, TASKS[tasks[i]].group)
      for layer in range(cfg.num_layers):
        take = lambda tree, *idx: jax.tree_util.tree_map(lambda a: a[idx + (layer,)], tree)
        dom = take(params["domain"], bi, DOMAINS.index(domains[i]))
        base = jax.tree_util.tree_map(lambda a: a[layer], frozen["fusion"])
        blk, expert = take(params["block"], bi), take(params["expert"], ei)
        h = M._fusion_layer(h, mask, blk, dom["q"], dom["v"], expert, base, cfg, M._Keys(None))
      w = mask[0].astype(h.dtype)
      out.append((w[:, None] * h[0]).sum(0) / w.sum())
    return jnp.stack(out)

  obj = tapjax.disentangled(model.objective(), model.apply_with_latents, model.num_latent_groups)

  def both(params, batch):
    return (
      model.apply(params, frozen, batch),
      model.apply_with_latents(params, frozen, batch),
      by_hand(params, batch),
      obj.apply(params, tapjax.OrthoFrozen.create(frozen), batch, None),
    )

  out, (out2, lat), want, wrapped = jax.jit(both)(params, batch)
  # the same computation in one program; XLA may fuse the copies differently (last bits)
  for a, b, c in zip(*(jax.tree_util.tree_leaves(o) for o in (out, out2, wrapped.outputs))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
  n = len(tasks)
  assert lat.values.shape == (2 * n, cfg.width) and model.num_latent_groups == len(M.LATENT_GROUPS) == 8
  np.testing.assert_array_equal(lat.valid, [True] * n + [len(TASKS[t].modalities) == 2 for t in tasks])
  for (i, s, m), row_want in zip(streams, want):
    row = s * n + i
    assert M.LATENT_GROUPS[int(lat.group[row])] == (m, TASKS[tasks[i]].group)
    np.testing.assert_allclose(lat.values[row], row_want, rtol=2e-4, atol=2e-5, err_msg=f"{tasks[i]} {m}")
  # the wrapped objective's penalty: the reference's loss of these latents, times 0.5
  groups = [M.LATENT_GROUPS.index((m, TASKS[tasks[i]].group)) for i, _, m in streams]
  ortho_want = reference_ortho(np.asarray(want), groups, np.ones(len(streams), bool))
  assert float(wrapped.ortho) == pytest.approx(ortho_want, rel=1e-4)
  assert float(wrapped.penalty) == pytest.approx(0.5 * ortho_want, rel=1e-4)
