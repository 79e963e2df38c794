"""TAP and FedAvg rounds against a naive reference-style oracle, and the
mapping strategies, trace counts and order independence."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tapjax
from tapjax import federation, local
from tapjax.rng import Purpose, Stage, derive

import toy

ROUNDS = 3


@pytest.fixture(scope="module")
def world():
  setup, names, params = toy.make_setup()
  return dict(
    setup=setup,
    names=names,
    params=params,
    data=toy.make_data(),
    frozen=toy.frozen_params(jax.random.key(1)),
    root=jax.random.key(7),
    hp=tapjax.HParams.create(toy.T, margin=[0.01, 0.005, 0.01], lr_peak=3e-2, lr_min=1e-2, warmup_rounds=2),
  )


def run(alg, world, rounds=ROUNDS, hp=None):
  state = alg.init(world["params"], len(toy.CLIENT_TASKS))
  fn = jax.jit(alg.round)
  infos = []
  for _ in range(rounds):
    state, info = fn(state, world["frozen"], world["data"], hp or world["hp"], world["root"])
    infos.append(info)
  return state, infos


def slots(top_key):
  """Reference style, from the parameter's name: ``[(slot index or None, component)]``."""
  if top_key.startswith("enc_"):
    return [(None, "enc/" + top_key[4:])]
  if top_key == "head":  # the stacked head leaves: one component per slot
    return [(t, f"head/{t}") for t in range(toy.T)]
  return [(None, top_key)]


def holds(top_key, held):
  """The update mask of one top-level entry: a bool, or one bool per slot."""
  s = slots(top_key)
  return s[0][1] in held if s[0][0] is None else np.array([c in held for _, c in s])


def naive_tap(world, rounds=ROUNDS, personal_models=True):
  """One client at a time, dicts keyed by client id, per-client deep copies."""
  setup, data, hp, root = world["setup"], world["data"], world["hp"], world["root"]
  n_clients = len(toy.CLIENT_TASKS)
  loss_fn = tapjax.supervised_loss(toy.OBJECTIVE, world["frozen"])
  train = jax.jit(functools.partial(local.train, loss_fn, cfg=setup.local, num_tasks=toy.T))
  to_np = lambda t: jax.tree_util.tree_map(np.asarray, t)
  global_params = to_np(world["params"])
  personal = {c: copy.deepcopy(global_params) for c in range(n_clients)}
  student = {c: {t: float("inf") for t in range(toy.T)} for c in range(n_clients)}
  replaced = {c: {t: 0 for t in range(toy.T)} for c in range(n_clients)}
  for r in range(rounds):
    ids = [int(i) for i in federation.sample_cohort(root, r, n_clients, setup.cohort_size)]
    lr = float(tapjax.warmup_lr(jnp.asarray(r), hp.lr_min, hp.lr_peak, hp.warmup_rounds))
    uploads = {}
    for cid in ids:
      tasks = [t for t in range(toy.T) if toy.CLIENT_TASKS[cid, t]]
      held = set().union(*[toy.TASK_USES[t] for t in tasks])
      mask = {k: jax.tree_util.tree_map(lambda _: holds(k, held), v) for k, v in global_params.items()}
      arrays = {k: v[cid] for k, v in data.examples.items()}
      n = data.num_examples[cid]
      key = lambda p: derive(root, Stage.FEDERATED, r, cid, p)
      g = train(
        global_params, arrays, n, key(Purpose.GLOBAL_DATA), key(Purpose.GLOBAL_DROPOUT), lr, update_mask=mask
      )
      uploads[cid] = to_np(g.params)
      if not personal_models:
        continue
      g_loss, g_count = np.asarray(g.task_mean()), np.asarray(g.task_count)
      any_replaced = False
      for t in tasks:
        if g_count[t] > 0 and g_loss[t] + float(hp.margin[t]) < student[cid][t]:
          any_replaced = True
          replaced[cid][t] += 1
          for k in global_params:
            for i, comp in slots(k):
              if comp not in toy.TASK_USES[t]:
                continue
              for leaf in global_params[k]:
                if i is None:
                  personal[cid][k][leaf] = copy.deepcopy(uploads[cid][k][leaf])
                else:
                  personal[cid][k][leaf] = personal[cid][k][leaf].copy()
                  personal[cid][k][leaf][i] = uploads[cid][k][leaf][i]
      data_key = key(Purpose.PERSONAL_DATA) if any_replaced else key(Purpose.GLOBAL_DATA)
      p = train(personal[cid], arrays, n, data_key, key(Purpose.PERSONAL_DROPOUT), lr, update_mask=mask)
      personal[cid] = to_np(p.params)
      p_loss, p_count = np.asarray(p.task_mean()), np.asarray(p.task_count)
      for t in tasks:
        if p_count[t] > 0:
          student[cid][t] = float(p_loss[t])
    new_global = {}
    for k in global_params:
      new_global[k] = {leaf: np.array(v, copy=True) for leaf, v in global_params[k].items()}
      for i, comp in slots(k):
        holders = [
          c
          for c in ids
          if comp in set().union(*[toy.TASK_USES[t] for t in range(toy.T) if toy.CLIENT_TASKS[c, t]])
        ]
        if not holders:
          continue
        w = {c: float(data.num_examples[c]) for c in holders}
        for leaf in global_params[k]:
          part = (lambda x: x) if i is None else (lambda x: x[i])
          mean = sum(w[c] * part(uploads[c][k][leaf]) for c in holders) / sum(w.values())
          if i is None:
            new_global[k][leaf] = mean
          else:
            new_global[k][leaf][i] = mean
    global_params = new_global
  return global_params, personal, student, replaced


def assert_tree_close(a, b, tol=2e-5):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def test_tap_equals_naive_oracle(world):
  state, infos = run(tapjax.tap(world["setup"]), world)
  g, personal, student, replaced = naive_tap(world)
  assert_tree_close(state.server.params, g)
  for c in range(len(toy.CLIENT_TASKS)):
    assert_tree_close(jax.tree_util.tree_map(lambda x: x[c], state.personal), personal[c])
    for t in range(toy.T):
      np.testing.assert_allclose(state.student_loss[c, t], student[c][t], rtol=1e-5)
      assert int(state.replaced_tasks[c, t]) == replaced[c][t]
  total = int(state.replaced_tasks.sum())
  assert 0 < total < sum(int(i.active.sum()) for i in infos)  # some fired, not all
  # replacement counts per component are consistent with per-task counts
  assert int(state.replaced_components.sum()) >= total


def test_fedavg_equals_oracle_and_tap_global(world):
  state, _ = run(tapjax.fedavg(world["setup"]), world)
  g, *_ = naive_tap(world, personal_models=False)
  assert_tree_close(state.server.params, g)
  tap_state, _ = run(tapjax.tap(world["setup"]), world)
  assert_tree_close(state.server.params, tap_state.server.params, tol=1e-6)


def test_local_only_never_shares(world):
  state, infos = run(tapjax.local_only(world["setup"]), world)
  assert_tree_close(state.server.params, world["params"], tol=0)
  trained = {int(c) for i in infos for c in i.clients}
  for c in range(len(toy.CLIENT_TASKS)):
    changed = not np.allclose(state.personal["shared"]["w"][c], world["params"]["shared"]["w"])
    assert changed == (c in trained)


@pytest.mark.parametrize(
  "client_map",
  [
    tapjax.ClientMap("map", batch_size=2),
    tapjax.ClientMap("shard", mesh=tapjax.client_mesh(8)),
  ],
  ids=["lax.map", "shard8"],
)
def test_strategies_equal_vmap(world, client_map):
  ref, _ = run(tapjax.tap(world["setup"]), world, rounds=2)
  setup = toy.make_setup(client_map=client_map)[0]
  other, _ = run(tapjax.tap(setup), dict(world, setup=setup), rounds=2)
  assert_tree_close(ref.server.params, other.server.params)
  assert_tree_close(ref.personal, other.personal)
  np.testing.assert_array_equal(ref.replaced_tasks, other.replaced_tasks)


def test_sharded_round_really_shards(world):
  mesh = tapjax.client_mesh(8)
  setup = toy.make_setup(client_map=tapjax.ClientMap("shard", mesh=mesh), cohort_size=4)[0]
  alg = tapjax.tap(setup)
  state = alg.init(world["params"], len(toy.CLIENT_TASKS))
  lowered = jax.jit(alg.round).lower(state, world["frozen"], world["data"], world["hp"], world["root"])
  hlo = lowered.compile().as_text()
  assert "all-reduce" in hlo or "reduce-scatter" in hlo or "all-gather" in hlo


def test_no_retrace_when_numbers_change(world):
  setup = world["setup"]
  alg = tapjax.tap(setup)
  state = alg.init(world["params"], len(toy.CLIENT_TASKS))
  fn = jax.jit(alg.round)
  state, _ = fn(state, world["frozen"], world["data"], world["hp"], world["root"])
  traces = toy.TRACES["apply"]
  for r in range(3):
    hp = tapjax.HParams.create(
      toy.T, margin=[0.1 * r, 0.0, 0.02], kd_weight=[r, 1.0, 0.5], lr_peak=1e-3 * (r + 1), temperature=1.0 + r
    )
    state, _ = fn(state, world["frozen"], world["data"], hp, jax.random.key(100 + r))
  assert toy.TRACES["apply"] == traces
  # stage 2: KD weights (TAP vs TAP without KD) are numbers too
  teachers = jax.jit(tapjax.post_train(setup))(
    state.server.params, world["frozen"], world["data"], world["hp"], world["root"]
  )
  dist = jax.jit(tapjax.distill_personal(setup))
  args = (state.personal, teachers, world["frozen"], world["data"])
  hp = tapjax.HParams.create(toy.T, kd_weight=5.0, post_lr=1e-2)
  a = dist(*args, hp, world["root"])
  traces = toy.TRACES["apply"]
  b = dist(*args, tapjax.HParams.create(toy.T, kd_weight=0.0, post_lr=1e-2), world["root"])
  assert toy.TRACES["apply"] == traces
  assert float(jnp.abs(a["shared"]["w"] - b["shared"]["w"]).max()) > 1e-3  # KD changes the result


def test_client_randomness_independent_of_cohort_order(world, monkeypatch):
  ref, _ = run(tapjax.tap(world["setup"]), world, rounds=2)
  original = federation.sample_cohort
  monkeypatch.setattr(federation, "sample_cohort", lambda *a: original(*a)[::-1])
  rev, infos = run(tapjax.tap(world["setup"]), world, rounds=2)
  assert (
    np.asarray(infos[0].clients).tolist()
    == np.asarray(original(world["root"], 0, len(toy.CLIENT_TASKS), 3))[::-1].tolist()
  )
  assert_tree_close(ref.personal, rev.personal, tol=1e-6)
  assert_tree_close(ref.server.params, rev.server.params, tol=1e-6)


def test_stage2_post_train_and_distill_and_evaluate(world):
  setup = world["setup"]
  state, _ = run(tapjax.tap(setup), world, rounds=2)
  teachers = tapjax.post_train(setup)(
    state.server.params, world["frozen"], world["data"], world["hp"], world["root"]
  )
  personal = tapjax.distill_personal(setup)(
    state.personal, teachers, world["frozen"], world["data"], world["hp"], world["root"]
  )
  means, counts = tapjax.metrics.evaluate(
    toy.OBJECTIVE,
    personal,
    world["frozen"],
    world["data"].examples,
    world["data"].num_examples,
    toy.T,
    batch_size=16,
  )
  # present exactly where the client has the task
  np.testing.assert_array_equal(np.asarray(counts) > 0, toy.CLIENT_TASKS)
  acc = np.asarray(means["accuracy"])
  assert np.all(np.isnan(acc[~toy.CLIENT_TASKS]))
  assert np.all((acc[toy.CLIENT_TASKS] >= 0) & (acc[toy.CLIENT_TASKS] <= 1))
  # counts equal the examples of each task each client has
  for c in range(len(toy.CLIENT_TASKS)):
    n = int(world["data"].num_examples[c])
    want = np.bincount(np.asarray(world["data"].examples["task"][c, :n]), minlength=toy.T)
    np.testing.assert_array_equal(counts[c], want)


def test_broadcast_mask_sends_initial_values(world):
  """Setup.broadcast=False components reach clients at their initial value (reference quirk 10)."""
  setup, names, params = toy.make_setup()
  shared = names.index("shared")
  bc = np.ones(len(names), bool)
  bc[shared] = False
  quirky = toy.make_setup(broadcast=bc)[0]
  state, _ = run(tapjax.tap(quirky), dict(world, setup=quirky), rounds=2)
  sent = tapjax.final_global(quirky, state)
  np.testing.assert_array_equal(sent["shared"]["w"], world["params"]["shared"]["w"])
  assert not np.allclose(state.server.params["shared"]["w"], world["params"]["shared"]["w"])
  np.testing.assert_array_equal(sent["enc_a"]["w"], state.server.params["enc_a"]["w"])
  normal, _ = run(tapjax.tap(setup), world, rounds=2)
  assert not np.allclose(normal.server.params["enc_a"]["w"], state.server.params["enc_a"]["w"])


def test_replace_usage_limits_what_is_copied(world):
  setup, names, params = toy.make_setup()
  ru = np.array(setup.usage)
  ru[:, names.index("shared")] = False
  quirky = toy.make_setup(replace_usage=ru)[0]
  state, _ = run(tapjax.tap(quirky), dict(world, setup=quirky), rounds=2)
  assert int(state.replaced_components[:, names.index("shared")].sum()) == 0
  assert int(state.replaced_components.sum()) > 0
