"""The host-fed pipeline (``tapjax.data.stream``): rounds and stage 2 on host-drawn
batches equal the dense calls, the device receives only the drawn batches, the
drawn indices are the dense call's, and bad input is named."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tapjax
from tapjax import federation, local
from tapjax.data.stream import HostFeed, draw_plan
from tapjax.rng import Purpose, Stage, derive

import toy


@pytest.fixture(scope="module")
def world():
  # the toy setup and data of test_federation / test_oracle: their dense round programs
  # are in the session's XLA cache already
  setup = toy.make_setup()[0]
  data = toy.make_data()
  host = {k: np.asarray(v) for k, v in data.examples.items()}
  held = np.asarray(federation.client_holders(setup, data))
  return dict(
    setup=setup,
    params=toy.init_params(jax.random.key(0)),
    frozen=toy.frozen_params(jax.random.key(1)),
    data=data,
    feed=HostFeed(host, data.num_examples, data.client_tasks, held),
    root=jax.random.key(3),
    hp=tapjax.HParams.create(toy.T, margin=[0.01, 0.005, 0.01], lr_peak=3e-2, lr_min=1e-2, warmup_rounds=2),
  )


def assert_trees_equal(a, b, rtol=1e-6, atol=1e-6):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize(
  "make", [tapjax.tap, tapjax.fedavg, tapjax.local_only], ids=["tap", "fedavg", "local"]
)
def test_rounds_on_host_batches_equal_the_dense_rounds(world, make):
  alg = make(world["setup"])
  fn = jax.jit(alg.round)
  dense = fed = alg.init(world["params"], 5)
  rounds = range(3)
  feed = world["feed"].rounds(world["root"], rounds, 3, world["setup"].local, alg.purposes)
  for r, cohort in zip(rounds, feed):
    dense, info_d = fn(dense, world["frozen"], world["data"], world["hp"], world["root"])
    fed, info_f = fn(fed, world["frozen"], cohort, world["hp"], world["root"])
    np.testing.assert_array_equal(info_f.clients, info_d.clients)  # the dense round's cohort
    np.testing.assert_array_equal(info_f.replaced, info_d.replaced)
    assert_trees_equal((fed, info_f), (dense, info_d))
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), fed, alg.init(world["params"], 5))
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3  # the rounds trained something


def test_tap_draws_both_purposes_and_a_missing_one_is_named(world):
  assert tapjax.tap(world["setup"]).purposes == (Purpose.GLOBAL_DATA, Purpose.PERSONAL_DATA)
  alg = tapjax.tap(world["setup"])
  only_global = world["feed"].round(world["root"], 0, 3, world["setup"].local, [Purpose.GLOBAL_DATA])
  with pytest.raises(ValueError, match="PERSONAL_DATA"):
    jax.eval_shape(
      alg.round, alg.init(world["params"], 5), world["frozen"], only_global, world["hp"], world["root"]
    )
  wrong_size = world["feed"].data([0, 1], world["root"], world["setup"].local, alg.purposes)
  with pytest.raises(ValueError, match="2 clients where a round of cohort_size=3 needs 3"):
    jax.eval_shape(
      alg.round, alg.init(world["params"], 5), world["frozen"], wrong_size, world["hp"], world["root"]
    )


def test_stage2_in_chunks_equals_the_dense_calls(world):
  setup, w = world["setup"], world
  g = w["params"]
  post = jax.jit(tapjax.post_train(setup))
  dist = jax.jit(tapjax.distill_personal(setup))
  teachers = post(g, w["frozen"], w["data"], w["hp"], w["root"])
  personal = federation.stack(jax.tree_util.tree_map(lambda x: 0.9 * x, g), 5)
  students = dist(personal, teachers, w["frozen"], w["data"], w["hp"], w["root"])
  got_t, got_s = [], []
  for rows, chunk in w["feed"].chunks(2, w["root"], setup.post):  # 2 + 2 + 1 (padded to 2)
    ids = np.asarray(chunk.ids)
    np.testing.assert_array_equal(ids[: len(rows)], rows)
    t = post(g, w["frozen"], chunk, w["hp"], w["root"])
    s = dist(federation.gather(personal, ids), t, w["frozen"], chunk, w["hp"], w["root"])
    got_t.append(jax.tree_util.tree_map(lambda x: x[: len(rows)], t))
    got_s.append(jax.tree_util.tree_map(lambda x: x[: len(rows)], s))
  cat = lambda parts: jax.tree_util.tree_map(lambda *x: jnp.concatenate(x), *parts)
  assert_trees_equal(cat(got_t), teachers)
  assert_trees_equal(cat(got_s), students)


def test_the_device_receives_only_the_drawn_batches(world):
  cfg = world["setup"].local  # 3 steps x accum 2 x batch 8
  d = world["feed"].round(world["root"], 4, 3, cfg, (Purpose.GLOBAL_DATA, Purpose.PERSONAL_DATA))
  for p in (Purpose.GLOBAL_DATA, Purpose.PERSONAL_DATA):
    assert d.batches[int(p)]["x"].shape == (3, cfg.steps * cfg.accum, cfg.batch_size, toy.D)
  np.testing.assert_array_equal(d.ids, federation.sample_cohort(world["root"], 4, 5, 3))
  np.testing.assert_array_equal(d.weights, np.asarray(world["data"].num_examples)[np.asarray(d.ids)])
  weights = np.arange(1, 6, dtype=np.float32)  # other weights travel with the cohort
  w = world["feed"]
  other = HostFeed(w.examples, w.num_examples, w.client_tasks, w.holders, weights)
  np.testing.assert_array_equal(
    other.round(world["root"], 4, 3, cfg, (1,)).weights, weights[np.asarray(d.ids)]
  )


def test_drawn_indices_are_the_dense_calls_batches(world):
  """``draw_indices`` written out from the dense contract: a permutation of the client's
  examples by ``uniform(key, capacity)``, read in order and cycled."""
  cfg = local.LocalConfig(steps=5, batch_size=8, accum=2)  # 80 draws > 24 examples: cycles
  n, cap = 24, 40
  key = derive(jax.random.key(3), Stage.FEDERATED, 2, 0, Purpose.GLOBAL_DATA)
  u = np.asarray(jax.random.uniform(key, (cap,)))
  order = np.argsort(np.where(np.arange(cap) < n, u, 2.0), kind="stable")
  want = order[np.arange(80) % n].reshape(10, 8)
  np.testing.assert_array_equal(local.draw_indices(key, n, cap, cfg), want)
  assert sorted(want.ravel()[:n]) == list(range(n))  # an epoch without replacement first
  plan = draw_plan(
    jax.random.key(3), 2, jnp.array([0]), jnp.array([n]), stage=1, capacity=cap, cfg=cfg, purposes=(1,)
  )
  np.testing.assert_array_equal(plan[0, 0], want)


def test_batches_must_fit_the_config(world):
  cfg = world["setup"].local
  d = world["feed"].data([0], world["root"], cfg, [Purpose.LOCAL_DATA])
  rows = jax.tree_util.tree_map(lambda x: x[0], d.batches[int(Purpose.LOCAL_DATA)])
  other = dataclasses.replace(cfg, steps=cfg.steps + 1)
  loss_fn = tapjax.supervised_loss(toy.OBJECTIVE, world["frozen"])
  with pytest.raises(ValueError, match=r"do not fit LocalConfig\(steps=4"):
    local.train(loss_fn, world["params"], local.Batches(rows), None, None, world["root"], 0.1, other, toy.T)


def test_host_feed_names_bad_input(world):
  ex = {k: np.asarray(v) for k, v in world["data"].examples.items()}
  n, tasks, held = world["data"].num_examples, world["data"].client_tasks, world["feed"].holders
  with pytest.raises(ValueError, match="same \\[clients, capacity\\]"):
    HostFeed({**ex, "x": ex["x"][:, :10]}, n, tasks, held)
  with pytest.raises(ValueError, match="more examples than the capacity 40"):
    HostFeed(ex, np.asarray(n) + 20, tasks, held)
  with pytest.raises(ValueError, match="num_examples has 4 clients, examples 5"):
    HostFeed(ex, np.asarray(n)[:4], tasks, held)
  with pytest.raises(ValueError, match="no data purposes"):
    world["feed"].round(world["root"], 0, 3, world["setup"].local, ())
  with pytest.raises(ValueError, match="chunk size must be positive"):
    next(world["feed"].chunks(0, world["root"], world["setup"].post))


def test_memory_mapped_examples_give_the_same_round(world, tmp_path):
  """``np.load(mmap_mode="r")`` arrays serve as the host store (only drawn rows are read)."""
  w = world["feed"]
  maps = {}
  for k, v in w.examples.items():
    np.save(tmp_path / f"{k}.npy", v)
    maps[k] = np.load(tmp_path / f"{k}.npy", mmap_mode="r")
  mapped = HostFeed(maps, w.num_examples, w.client_tasks, w.holders)
  cfg, purposes = world["setup"].local, tapjax.tap(world["setup"]).purposes
  a, b = w.round(world["root"], 2, 3, cfg, purposes), mapped.round(world["root"], 2, 3, cfg, purposes)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
