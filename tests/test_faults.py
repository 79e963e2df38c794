"""Fault quarantine: a client whose loss or update is not finite is left out of the
round (aggregation, personal row, student losses, counts) and named in RoundInfo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tapjax
from tapjax import federation

import toy

N_CLIENTS = len(toy.CLIENT_TASKS)
ROOT = jax.random.key(7)
HP = tapjax.HParams.create(toy.T, margin=0.01, lr_peak=3e-2, lr_min=1e-2, warmup_rounds=2)
COMPONENTS = {"enc_a": "enc/a", "enc_b": "enc/b", "shared": "shared"}


@pytest.fixture(scope="module")
def world():
  setup, names, params = toy.make_setup(client_map=tapjax.ClientMap("map"))
  cohort = np.asarray(federation.sample_cohort(ROOT, 0, N_CLIENTS, setup.cohort_size))
  bad = int(cohort[1])
  data = toy.make_data()
  x = np.asarray(data.examples["x"]).copy()
  x[bad, 3] = np.nan  # one NaN feature of one example: its loss and gradients are NaN
  poisoned = data._replace(examples={**data.examples, "x": jnp.asarray(x)})
  algs = {"tap": tapjax.tap(setup), "fedavg": tapjax.fedavg(setup), "local": tapjax.local_only(setup)}
  return dict(
    setup=setup,
    algs={k: (a, jax.jit(a.round)) for k, a in algs.items()},
    client_step=jax.jit(federation.tap_client, static_argnums=(0, 1)),
    params=params,
    frozen=toy.frozen_params(jax.random.key(1)),
    clean=data,
    poisoned=poisoned,
    cohort=cohort,
    bad=bad,
  )


def one_round(name, world, data, state=None):
  """One round of ``name`` (tap, fedavg, local), jitted once per module."""
  alg, fn = world["algs"][name]
  state = alg.init(world["params"], N_CLIENTS) if state is None else state
  return fn(state, world["frozen"], data, HP, ROOT)


def finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree))


def expected_mean(world, uploads: dict, fallback):
  """The holder-masked, example-weighted mean over ``uploads {client: params}``, by hand
  in numpy, one component (or head slot) at a time."""
  n = np.asarray(world["clean"].num_examples, np.float64)
  held = {c: set().union(*[toy.TASK_USES[t] for t in np.flatnonzero(toy.CLIENT_TASKS[c])]) for c in uploads}
  out = jax.tree_util.tree_map(lambda x: np.array(x, np.float64), fallback)
  for key, component in COMPONENTS.items():
    senders = [c for c in uploads if component in held[c]]
    if senders:
      w = np.array([n[c] for c in senders])
      x = np.stack([np.asarray(uploads[c][key]["w"], np.float64) for c in senders])
      out[key]["w"] = np.tensordot(w / w.sum(), x, 1)
  for t in range(toy.T):  # the stacked head leaves: slot t is component head/t
    senders = [c for c in uploads if f"head/{t}" in held[c]]
    if senders:
      w = np.array([n[c] for c in senders])
      for leaf in ("w", "b"):
        x = np.stack([np.asarray(uploads[c]["head"][leaf][t], np.float64) for c in senders])
        out["head"][leaf][t] = np.tensordot(w / w.sum(), x, 1)
  return out


def upload_of(world, cid):
  """Client ``cid``'s round-0 upload, from ``tap_client`` alone (keys depend on the id only)."""
  setup, data = world["setup"], world["clean"]
  loss_fn = tapjax.supervised_loss(toy.OBJECTIVE, world["frozen"])
  held = federation.client_holders(setup, data)[cid]
  lr = tapjax.warmup_lr(jnp.asarray(0), HP.lr_min, HP.lr_peak, HP.warmup_rounds)
  r = world["client_step"](
    setup,
    loss_fn,
    world["params"],
    world["params"],
    tapjax.initial_student_loss(1, toy.T)[0],
    jnp.int32(cid),
    {k: v[cid] for k, v in data.examples.items()},
    data.num_examples[cid],
    jnp.asarray(data.client_tasks[cid], bool),
    held,
    lr,
    HP.margin,
    ROOT,
    jnp.int32(0),
  )
  return r.upload


def test_tap_rejects_the_nan_client_and_aggregates_the_others(world):
  before = world["algs"]["tap"][0].init(world["params"], N_CLIENTS)
  state, info = one_round("tap", world, world["poisoned"])
  bad, cohort = world["bad"], world["cohort"]
  clients, rejected = np.asarray(info.clients), np.asarray(info.rejected)
  assert clients[rejected].tolist() == [bad]
  assert np.asarray(info.reason)[rejected].tolist() == [int(federation.Fault.LOSS | federation.Fault.PARAMS)]
  assert np.asarray(info.reason)[~rejected].tolist() == [0, 0]
  assert np.isnan(np.asarray(info.global_loss)[rejected]).any()  # reported as computed
  # the global model is finite and is the mean over the other clients' uploads
  assert finite(state.server.params)
  others = [int(c) for c in cohort if c != bad]
  want = expected_mean(world, {c: upload_of(world, c) for c in others}, world["params"])
  for got, exp in zip(jax.tree_util.tree_leaves(state.server.params), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-5, atol=1e-6)
  # the rejected client changed nothing of its own; the others equal a clean round's
  clean, _ = one_round("tap", world, world["clean"])
  row = lambda tree, c: jax.tree_util.tree_map(lambda x: np.asarray(x[c]), tree)
  for got, old in zip(
    jax.tree_util.tree_leaves(row(state.personal, bad)), jax.tree_util.tree_leaves(row(before.personal, bad))
  ):
    np.testing.assert_array_equal(got, old)
  assert np.all(np.isinf(np.asarray(state.student_loss[bad])))  # never trained successfully
  assert int(np.asarray(state.replaced_tasks[bad]).sum()) == 0
  assert int(np.asarray(state.replaced_components[bad]).sum()) == 0
  assert not np.asarray(info.replaced)[rejected].any()
  for c in others:
    for got, exp in zip(
      jax.tree_util.tree_leaves(row(state.personal, c)), jax.tree_util.tree_leaves(row(clean.personal, c))
    ):
      np.testing.assert_array_equal(got, exp)
    np.testing.assert_array_equal(np.asarray(state.student_loss[c]), np.asarray(clean.student_loss[c]))
  # the next rounds go on from a finite global model
  for _ in range(2):
    state, info = one_round("tap", world, world["poisoned"], state)
    assert finite(state.server.params)
    ids = np.asarray(info.clients)
    assert np.asarray(info.rejected).tolist() == (ids == bad).tolist()


def test_fedavg_quarantine_matches_tap_global_model(world):
  """TAP's global model is FedAvg's with the same key, quarantine included."""
  fed, info = one_round("fedavg", world, world["poisoned"])
  tap, _ = one_round("tap", world, world["poisoned"])
  assert np.asarray(info.clients)[np.asarray(info.rejected)].tolist() == [world["bad"]]
  assert finite(fed.server.params)
  for a, b in zip(jax.tree_util.tree_leaves(fed.server.params), jax.tree_util.tree_leaves(tap.server.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_local_only_keeps_the_rejected_personal_row(world):
  before = world["algs"]["local"][0].init(world["params"], N_CLIENTS)
  state, info = one_round("local", world, world["poisoned"])
  bad = world["bad"]
  assert np.asarray(info.clients)[np.asarray(info.rejected)].tolist() == [bad]
  assert finite(state.personal)
  for got, old in zip(jax.tree_util.tree_leaves(state.personal), jax.tree_util.tree_leaves(before.personal)):
    np.testing.assert_array_equal(np.asarray(got[bad]), np.asarray(old[bad]))
  others = [int(c) for c in world["cohort"] if c != bad]
  moved = (
    np.asarray(state.personal["shared"]["w"])[others] != np.asarray(before.personal["shared"]["w"])[others]
  )
  assert moved.any()


def test_whole_cohort_rejected_leaves_the_global_model(world):
  x = jnp.full_like(world["clean"].examples["x"], jnp.nan)
  data = world["clean"]._replace(examples={**world["clean"].examples, "x": x})
  state, info = one_round("tap", world, data)
  assert np.asarray(info.rejected).all()
  for got, init in zip(
    jax.tree_util.tree_leaves(state.server.params), jax.tree_util.tree_leaves(world["params"])
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(init))


def test_reason_bits():
  """The verdict alone (no training): a non-finite parameter with finite losses is its own
  reason; a NaN loss of a task the client does not hold does not count."""
  tasks = jnp.array([[True, False], [True, True], [False, True]])
  cohort = federation._Cohort(jnp.arange(3), {}, jnp.ones(3), tasks, jnp.ones((3, 1), bool), 0.0, jnp.ones(3))
  # client 0: NaN only on a task it lacks (ok); 1: an infinite parameter; 2: NaN on its task
  loss = jnp.array([[0.5, jnp.nan], [0.5, 0.7], [jnp.inf, jnp.nan]])
  params = {"w": jnp.ones((3, 4)).at[1, 2].set(jnp.inf), "b": jnp.zeros((3,))}
  v = federation._quarantine(cohort, (loss,), federation._rows_finite((params,)))
  assert np.asarray(v.reason).tolist() == [0, int(federation.Fault.PARAMS), int(federation.Fault.LOSS)]
  assert np.asarray(v.ok).tolist() == [True, False, False]
