"""TAP, FedAvg, Local only and stage 2, compiled and mapped, against the independent
oracle of ``oracle.py`` (which shares only the toy model's functions with tapjax),
over several rounds of heterogeneous clients, in both compat modes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tapjax

import oracle
import toy

ROUNDS = 4
MARGIN = [0.01, 0.005, 0.01]
KD = [0.5, 1.0, 2.0]
LR = dict(lr_min=1e-2, lr_peak=3e-2, warmup_rounds=2)
POST_LR = 1e-2
# "reference" compat on the toy: the rule never copies "shared" for tasks 0 and 1,
# the loss record is share-weighted, and "shared" is never broadcast.
REF_RULE_USES = tuple(
  tuple(c for c in u if c != "shared") if t < 2 else u for t, u in enumerate(toy.TASK_USES)
)
SERVER_TX = optax.adam(0.3)

CASES = {
  "tap-paper": ("tap", "paper", False),
  "tap-reference": ("tap", "reference", False),
  "tap-paper-server_adam": ("tap", "paper", True),
  "fedavg-reference": ("fedavg", "reference", False),
  "fedavg-paper-server_adam": ("fedavg", "paper", True),
  "local-paper": ("local", "paper", False),
}


@pytest.fixture(scope="module")
def world():
  data = toy.make_data()
  return dict(
    data=data,
    params=toy.init_params(jax.random.key(0)),
    frozen=toy.frozen_params(jax.random.key(1)),
    root=jax.random.key(7),
    hp=tapjax.HParams.create(toy.T, margin=MARGIN, kd_weight=KD, post_lr=POST_LR, **LR),
  )


def library_setup(compat, server_adam, cohort_size=3):
  kw = {}
  if compat == "reference":
    setup, names, _ = toy.make_setup()
    bc = np.array([n != "shared" for n in names])
    kw = dict(
      loss_record="share_weighted", replace_usage=tapjax.usage_matrix(names, REF_RULE_USES), broadcast=bc
    )
  if server_adam:
    kw["server_optimizer"] = SERVER_TX
  return toy.make_setup(cohort_size=cohort_size, **kw)


def oracle_spec(world, setup, compat, server_adam):
  data = world["data"]
  cfg = lambda c: dict(
    steps=c.steps, batch=c.batch_size, accum=c.accum, weight_decay=c.weight_decay, clip_norm=c.clip_norm
  )
  ref = compat == "reference"
  return oracle.Spec(
    client_tasks=np.asarray(data.client_tasks),
    num_examples=np.asarray(data.num_examples),
    examples={k: np.asarray(v) for k, v in data.examples.items()},
    frozen=world["frozen"],
    cohort_size=setup.cohort_size,
    local=cfg(setup.local),
    post=cfg(setup.post),
    margin=MARGIN,
    kd_weight=KD,
    temperature=1.0,
    lr=(LR["lr_min"], LR["lr_peak"], LR["warmup_rounds"]),
    post_lr=POST_LR,
    record="share_weighted" if ref else "mean",
    rule_uses=REF_RULE_USES if ref else toy.TASK_USES,
    broadcast=frozenset(c for _, _, _, c in oracle.parts(world["params"]) if c != "shared") if ref else None,
    server_tx=SERVER_TX if server_adam else None,
  )


@pytest.fixture(scope="module")
def runs(world):
  """``case -> (library state, [RoundInfo], oracle Federation, setup)``, computed once."""

  @functools.cache
  def get(case):
    alg_name, compat, server_adam = CASES[case]
    setup = library_setup(compat, server_adam)[0]
    alg = {"tap": tapjax.tap, "fedavg": tapjax.fedavg, "local": tapjax.local_only}[alg_name](setup)
    state = alg.init(world["params"], len(toy.CLIENT_TASKS))
    fn = jax.jit(alg.round)
    infos = []
    for _ in range(ROUNDS):
      state, info = fn(state, world["frozen"], world["data"], world["hp"], world["root"])
      infos.append(info)
    fed = oracle.Federation(oracle_spec(world, setup, compat, server_adam), world["params"], world["root"])
    for _ in range(ROUNDS):
      fed.step(alg_name)
    return state, infos, fed, setup

  return get


def close(a, b, tol=2e-5):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def row(tree, c):
  return jax.tree_util.tree_map(lambda x: np.asarray(x[c]), tree)


@pytest.mark.parametrize("case", list(CASES))
def test_round_equals_oracle(runs, case):
  state, infos, fed, setup = runs(case)
  alg_name = CASES[case][0]
  close(state.server.params, fed.global_)
  for r, (info, want) in enumerate(zip(infos, fed.rounds)):
    assert np.asarray(info.clients).tolist() == want["clients"], f"round {r}: cohort"
    for i, c in enumerate(want["clients"]):
      if alg_name != "local":
        np.testing.assert_allclose(info.global_loss[i], want["global_loss"][c], rtol=1e-5, atol=1e-6)
      if alg_name != "fedavg":
        np.testing.assert_allclose(info.personal_loss[i], want["personal_loss"][c], rtol=1e-5, atol=1e-6)
      if alg_name == "tap":
        fired = np.flatnonzero(np.asarray(info.replaced[i])).tolist()
        assert fired == want["replaced"][c], f"round {r} client {c}: tasks replaced"
  if alg_name == "fedavg":
    return
  visited = {c for info in fed.rounds for c in info["clients"]}
  for c in range(len(toy.CLIENT_TASKS)):
    close(row(state.personal, c), fed.personal[c])
    if c not in visited:  # never trained: still the initial parameters, exactly
      jax.tree_util.tree_map(np.testing.assert_array_equal, row(state.personal, c), fed.initial)
  if alg_name == "local":
    return
  names = toy.make_setup()[1]
  for c in range(len(toy.CLIENT_TASKS)):
    np.testing.assert_allclose(state.student_loss[c], fed.student[c], rtol=1e-5)
    assert np.asarray(state.replaced_tasks[c]).tolist() == fed.replaced_tasks[c]
    want = [fed.replaced_components[c].get(n, 0) for n in names]
    assert np.asarray(state.replaced_components[c]).tolist() == want, f"client {c}: components copied"


def test_oracle_runs_are_not_degenerate(runs):
  """The cases exercise what they claim: the rule fires sometimes but not always, the
  reference rule leaves "shared" alone, clients are revisited, the server optimizer
  moves the global model away from the plain mean."""
  _, _, fed, _ = runs("tap-paper")
  fired = sum(len(v) for info in fed.rounds for v in info["replaced"].values())
  chances = sum(len(fed.spec.tasks(c)) for info in fed.rounds for c in info["clients"])
  assert 0 < fired < chances
  clients = [c for info in fed.rounds for c in info["clients"]]
  assert len(set(clients)) < len(clients)  # some client trains twice (Local only from its own row)
  _, _, ref, _ = runs("tap-reference")
  # "shared" is copied exactly in the rounds where task 2 (whose rule still copies it) fired
  for c, counts in ref.replaced_components.items():
    task2 = sum(2 in info["replaced"].get(c, []) for info in ref.rounds)
    assert counts.get("shared", 0) == task2
  assert sum(v.get("shared", 0) for v in ref.replaced_components.values()) < sum(
    bool(v) for info in ref.rounds for v in info["replaced"].values()
  )
  assert any(ref.replaced_components[c].get("enc/a", 0) > 0 for c in ref.replaced_components)
  fedavg, _, _, _ = runs("fedavg-paper-server_adam")
  tap_adam, _, _, _ = runs("tap-paper-server_adam")
  # TAP's global model is FedAvg's (the two programs may round the aggregation differently)
  close(fedavg.server.params, tap_adam.server.params, tol=5e-5)
  tap_plain, _, _, _ = runs("tap-paper")
  assert not np.allclose(tap_plain.server.params["shared"]["w"], tap_adam.server.params["shared"]["w"])


def test_stage2_post_train_and_distill_equal_oracle(world, runs):
  state, _, fed, setup = runs("tap-paper")
  args = (world["frozen"], world["data"], world["hp"], world["root"])
  teachers = jax.jit(tapjax.post_train(setup))(state.server.params, *args)
  want_t = oracle.post_train(fed.spec, fed.global_, world["root"])
  dist = jax.jit(tapjax.distill_personal(setup))
  students = dist(state.personal, teachers, *args)
  no_kd = dist(
    state.personal,
    teachers,
    world["frozen"],
    world["data"],
    world["hp"]._replace(kd_weight=jnp.zeros(toy.T)),
    world["root"],
  )
  want_s = oracle.distill(fed.spec, fed.personal, want_t, world["root"], KD)
  want_0 = oracle.distill(fed.spec, fed.personal, want_t, world["root"], [0.0] * toy.T)
  for c in range(len(toy.CLIENT_TASKS)):
    close(row(teachers, c), want_t[c])
    close(row(students, c), want_s[c])
    close(row(no_kd, c), want_0[c])
  # KD changes the result, and post-training moves every held component
  assert not np.allclose(students["shared"]["w"], no_kd["shared"]["w"])
  assert not np.allclose(row(teachers, 0)["shared"]["w"], fed.global_["shared"]["w"])
  # Post-training is the distillation program with lambda = 0 and the teacher's dropout
  # keys (how the experiment runs stage 2 in one compiled program), purpose traced.
  stacked = tapjax.federation.stack(state.server.params, len(toy.CLIENT_TASKS))
  as_post = dist(
    stacked,
    stacked,
    world["frozen"],
    world["data"],
    world["hp"]._replace(kd_weight=jnp.zeros(toy.T)),
    world["root"],
    jnp.asarray(int(tapjax.rng.Purpose.TEACHER_DROPOUT), jnp.int32),
  )
  for c in range(len(toy.CLIENT_TASKS)):
    close(row(as_post, c), want_t[c])
