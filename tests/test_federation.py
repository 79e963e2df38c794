"""Mapping strategies (values and real sharding), trace counts, order independence
and evaluation. Values against an independent oracle: ``test_oracle.py``."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tapjax
from tapjax import federation

import toy

BIG = np.tile(toy.CLIENT_TASKS, (4, 1))[:16]  # 16 heterogeneous clients
COHORT = 8  # >= the 8 (fake CPU) devices


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


def run(alg, world, rounds=2, hp=None, data=None, keep=False):
  data = world["data"] if data is None else data
  state = alg.init(world["params"], data.num_examples.shape[0])
  fn = jax.jit(alg.round)
  infos, states = [], []
  for _ in range(rounds):
    state, info = fn(state, world["frozen"], data, hp or world["hp"], world["root"])
    infos.append(info)
    states.append(state)
  return (state, infos) if not keep else (states, infos)


def assert_tree_close(a, b, tol=2e-5):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@pytest.fixture(scope="module")
def big(world):
  """16 clients, cohort 8: the vmap round's result, to compare the strategies with."""
  data = toy.make_data(client_tasks=BIG)
  setup = toy.make_setup(cohort_size=COHORT)[0]
  states, infos = run(tapjax.tap(setup), world, data=data, keep=True)
  return data, states, infos


@pytest.mark.parametrize(
  "client_map",
  [
    tapjax.ClientMap("map", batch_size=2),
    tapjax.ClientMap("shard", mesh=tapjax.client_mesh(8)),
  ],
  ids=["lax.map", "shard8"],
)
def test_strategies_equal_vmap(world, big, client_map):
  data, ref, ref_infos = big
  setup = toy.make_setup(client_map=client_map, cohort_size=COHORT)[0]
  other, infos = run(tapjax.tap(setup), world, data=data, keep=True)
  for r, tol in ((0, 2e-5), (1, 2e-3)):
    # Round 1 agrees to float reassociation; in round 2 Adam's m / sqrt(v) turns
    # 1e-7 noise into up to 1e-3 where a gradient is ~0 (seen on one client's enc_b).
    assert_tree_close(ref[r].server.params, other[r].server.params, tol=2e-5)
    assert_tree_close(ref[r].personal, other[r].personal, tol=tol)
    np.testing.assert_array_equal(ref[r].replaced_tasks, other[r].replaced_tasks)
    np.testing.assert_array_equal(ref_infos[r].clients, infos[r].clients)
  assert int(ref[-1].replaced_tasks.sum()) > 0


def test_shard_strategy_shards_the_trained_client_states(world, big):
  """The cohort's trained states (uploads and personal models) live one client per
  device, and equal the unsharded result."""
  data = big[0]
  mesh = tapjax.client_mesh(8)
  loss_fn = tapjax.supervised_loss(toy.OBJECTIVE, world["frozen"])
  ids = jnp.arange(COHORT, dtype=jnp.int32)

  def trained(setup):
    def client(cid, personal, student, examples, n, tasks, held):
      return federation.tap_client(
        setup, loss_fn, world["params"], personal, student, cid, examples, n, tasks, held,
        jnp.float32(1e-2), world["hp"].margin, world["root"], jnp.int32(0),
      )  # fmt: skip

    def fn(data):
      held = federation.client_holders(setup, data)
      take = lambda t: jax.tree_util.tree_map(lambda x: x[:COHORT], t)
      personal = federation.stack(world["params"], COHORT)
      student = tapjax.initial_student_loss(COHORT, toy.T)
      return setup.client_map(client)(
        ids,
        personal,
        student,
        take(data.examples),
        data.num_examples[:COHORT],
        take(data.client_tasks),
        held[:COHORT],
      )

    return jax.jit(fn)(data)

  sharded = trained(toy.make_setup(client_map=tapjax.ClientMap("shard", mesh=mesh), cohort_size=COHORT)[0])
  want = NamedSharding(mesh, P("clients"))
  for leaf in jax.tree_util.tree_leaves((sharded.upload, sharded.personal, sharded.student_loss)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), leaf.sharding
    assert len(leaf.sharding.device_set) == 8
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {1}
  plain = trained(toy.make_setup(cohort_size=COHORT)[0])
  assert_tree_close(plain.upload, sharded.upload)
  assert_tree_close(plain.personal, sharded.personal)


def test_sharded_round_aggregates_with_a_collective(world, big):
  data = big[0]
  mesh = tapjax.client_mesh(8)
  setup = toy.make_setup(client_map=tapjax.ClientMap("shard", mesh=mesh), cohort_size=COHORT)[0]
  alg = tapjax.tap(setup)
  state = alg.init(world["params"], data.num_examples.shape[0])
  hlo = jax.jit(alg.round).lower(state, world["frozen"], data, world["hp"], world["root"]).compile().as_text()
  assert "all-reduce" in hlo or "reduce-scatter" in hlo


def _counting(fn):
  """``fn`` and a counter of how often it ran in Python (= traced, under ``jax.jit``). The
  model's forward is a nested jit whose trace is cached across programs, so counting the
  model's traces (``toy.TRACES``) would not see an outer program retracing."""
  count = {"traces": 0}

  def wrapped(*args):
    count["traces"] += 1
    return fn(*args)

  return wrapped, count


def test_no_retrace_when_numbers_change(world):
  setup = world["setup"]
  alg = tapjax.tap(setup)
  state = alg.init(world["params"], len(toy.CLIENT_TASKS))
  round_, count = _counting(alg.round)
  fn = jax.jit(round_)
  state, _ = fn(state, world["frozen"], world["data"], world["hp"], world["root"])
  assert count["traces"] == 1
  for r in range(3):
    hp = tapjax.HParams.create(
      toy.T, margin=[0.1 * r, 0.0, 0.02], kd_weight=[r, 1.0, 0.5], lr_peak=1e-3 * (r + 1), temperature=1.0 + r
    )
    state, _ = fn(state, world["frozen"], world["data"], hp, jax.random.key(100 + r))
  assert count["traces"] == 1
  # stage 2: KD weights (TAP vs TAP without KD) are numbers too
  teachers = jax.jit(tapjax.post_train(setup))(
    state.server.params, world["frozen"], world["data"], world["hp"], world["root"]
  )
  distill, count = _counting(tapjax.distill_personal(setup))
  dist = jax.jit(distill)
  args = (state.personal, teachers, world["frozen"], world["data"])
  hp = tapjax.HParams.create(toy.T, kd_weight=5.0, post_lr=1e-2)
  a = dist(*args, hp, world["root"])
  b = dist(*args, tapjax.HParams.create(toy.T, kd_weight=0.0, post_lr=1e-2), world["root"])
  assert count["traces"] == 1
  assert float(jnp.abs(a["shared"]["w"] - b["shared"]["w"]).max()) > 1e-3  # KD changes the result


def test_model_trace_shared_across_programs(world):
  """Two different programs over the same model and batch shape trace the model once
  (:func:`tapjax.objective.apply` is a nested jit) and give the values of a direct call."""
  # a fresh objective (a new apply function), so that no earlier test traced it
  fresh = world["setup"].objective._replace(apply=lambda *a: toy.apply(*a))
  setup = dataclasses.replace(world["setup"], objective=fresh)
  state = tapjax.fedavg(setup).init(world["params"], len(toy.CLIENT_TASKS))
  args = (world["frozen"], world["data"], world["hp"], world["root"])
  traces = toy.TRACES["apply"]
  jax.jit(tapjax.fedavg(setup).round).lower(state, *args)
  first = toy.TRACES["apply"] - traces
  assert first >= 1
  jax.jit(tapjax.local_only(setup).round).lower(tapjax.local_only(setup).init(world["params"], 5), *args)
  assert toy.TRACES["apply"] - traces == first  # the second program reused the trace
  batch = {k: v[0, :4] for k, v in world["data"].examples.items()}
  key = jax.random.key(3)
  direct = setup.objective.apply(world["params"], world["frozen"], batch, key)
  nested = tapjax.objective.apply(setup.objective, world["params"], world["frozen"], batch, key)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool(jnp.all(x == y)), direct, nested))
  # an objective that cannot be hashed (a list field) is applied directly, same values
  unhashable = setup.objective._replace(metrics=[setup.objective.metrics])
  again = tapjax.objective.apply(unhashable, world["params"], world["frozen"], batch, key)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool(jnp.all(x == y)), direct, again))


def test_client_randomness_independent_of_cohort_order(world, monkeypatch):
  ref, _ = run(tapjax.tap(world["setup"]), world)
  original = federation.sample_cohort
  monkeypatch.setattr(federation, "sample_cohort", lambda *a: original(*a)[::-1])
  rev, infos = run(tapjax.tap(world["setup"]), world)
  assert (
    np.asarray(infos[0].clients).tolist()
    == np.asarray(original(world["root"], 0, len(toy.CLIENT_TASKS), 3))[::-1].tolist()
  )
  assert_tree_close(ref.personal, rev.personal, tol=1e-6)
  assert_tree_close(ref.server.params, rev.server.params, tol=1e-6)


def test_evaluate_per_client_and_task(world):
  stacked = federation.stack(world["params"], len(toy.CLIENT_TASKS))
  data = world["data"]
  means, counts = tapjax.metrics.evaluate(
    toy.OBJECTIVE, stacked, world["frozen"], data.examples, data.num_examples, toy.T, batch_size=16
  )
  # counts equal the examples of each task each client has; NaN exactly where it has none
  for c in range(len(toy.CLIENT_TASKS)):
    n = int(data.num_examples[c])
    np.testing.assert_array_equal(
      counts[c], np.bincount(np.asarray(data.examples["task"][c, :n]), minlength=toy.T)
    )
  acc = np.asarray(means["accuracy"])
  assert np.all(np.isnan(acc[~toy.CLIENT_TASKS]))
  # the mean accuracy of client 2 on task 0, by hand
  n = int(data.num_examples[2])
  ex = {k: v[2, :n] for k, v in data.examples.items()}
  logits = toy.apply(world["params"], world["frozen"], ex, None)
  hit = np.asarray(jnp.argmax(logits, -1) == ex["label"])[np.asarray(ex["task"]) == 0]
  np.testing.assert_allclose(acc[2, 0], hit.mean(), rtol=1e-6)


def test_evaluate_returns_per_example_predictions(world):
  """``predict`` rides the same forward pass: ``[clients, examples]`` rows equal the
  model's predictions on each client's examples in order (batch 16 pads 40 -> 48 rows)."""
  stacked = federation.stack(world["params"], len(toy.CLIENT_TASKS))
  data = world["data"]
  means, counts, preds = tapjax.metrics.evaluate(
    toy.OBJECTIVE,
    stacked,
    world["frozen"],
    data.examples,
    data.num_examples,
    toy.T,
    batch_size=16,
    predict=lambda out, batch: {"argmax": jnp.argmax(out, -1)},
  )
  capacity = data.examples["task"].shape[1]
  assert preds["argmax"].shape == (len(toy.CLIENT_TASKS), capacity)
  for c in (0, 2):
    ex = {k: v[c] for k, v in data.examples.items()}
    want = np.asarray(jnp.argmax(toy.apply(world["params"], world["frozen"], ex, None), -1))
    np.testing.assert_array_equal(np.asarray(preds["argmax"][c]), want)


def test_aggregation_weights_default_to_num_examples(world):
  """``FedData.weights`` (a capped client's real size) replaces ``num_examples`` as the
  aggregation weight only: equal to it gives the same round (to float rounding: the two
  programs may fuse the weighted sum differently); other weights move the global model,
  not the training."""
  data = world["data"]
  alg = tapjax.fedavg(world["setup"])
  base, info = run(alg, world, rounds=1)
  same, _ = run(alg, world, rounds=1, data=data._replace(weights=data.num_examples))
  assert_tree_close(base.server.params, same.server.params, tol=1e-6)
  skew = data.num_examples.at[info[0].clients[0]].multiply(50)
  other, info2 = run(alg, world, rounds=1, data=data._replace(weights=skew))
  np.testing.assert_array_equal(np.asarray(info[0].global_loss), np.asarray(info2[0].global_loss))
  diff = jax.tree_util.tree_map(
    lambda a, b: float(jnp.abs(a - b).max()), base.server.params, other.server.params
  )
  assert max(jax.tree_util.tree_leaves(diff)) > 1e-4


def test_twice_returns_both_results_and_traces_once():
  """``twice(f, first_args, then, init)``: ``y0 = f(*first_args)``, ``(args, aux) =
  then(y0)``, ``y1 = f(*args)``, with ``f`` traced once (a tree result and a tree aux)."""
  traces = []

  def f(x, k):
    traces.append(1)
    return {"a": x * 2.0 + k, "b": jnp.sum(x)}

  def then(y):
    return (y["a"] + 1.0, jnp.float32(10.0)), {"prev": y["a"], "flag": y["b"] > 0}

  init = {"a": jnp.zeros(3), "b": jnp.zeros(())}
  y0, y1, aux = jax.jit(lambda x: federation.twice(f, (x, jnp.float32(0.5)), then, init))(jnp.arange(3.0))
  np.testing.assert_allclose(y0["a"], [0.5, 2.5, 4.5])
  np.testing.assert_allclose(y1["a"], (np.array([0.5, 2.5, 4.5]) + 1.0) * 2.0 + 10.0)
  np.testing.assert_allclose(y1["b"], np.sum([1.5, 3.5, 5.5]))
  np.testing.assert_allclose(aux["prev"], [0.5, 2.5, 4.5])
  assert bool(aux["flag"]) and len(traces) == 1
