"""Key derivation and cohort sampling, directly against their documented contract."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

import tapjax
from tapjax.rng import SERVER, Purpose, Stage, derive

ROOT = jax.random.key(3)


def data(k):
  return tuple(np.asarray(jax.random.key_data(k)).ravel().tolist())


def test_derive_is_the_documented_fold_in_chain():
  want = ROOT
  for i in (int(Stage.FEDERATED), 5, 11, int(Purpose.GLOBAL_DROPOUT)):
    want = jax.random.fold_in(want, i)
  assert data(derive(ROOT, Stage.FEDERATED, 5, 11, Purpose.GLOBAL_DROPOUT)) == data(want)
  # traced arguments give the same key
  traced = jax.jit(lambda r, c: derive(ROOT, Stage.FEDERATED, r, c, Purpose.GLOBAL_DROPOUT))
  assert data(traced(jnp.int32(5), jnp.int32(11))) == data(want)


def test_every_input_changes_the_key():
  base = dict(root=ROOT, stage=Stage.FEDERATED, round_=2, client=4, purpose=Purpose.GLOBAL_DATA)
  variants = dict(
    root=[jax.random.key(4)],
    stage=list(Stage),
    round_=[0, 1, 3, 200],
    client=[0, 3, 5, SERVER],
    purpose=list(Purpose),
  )
  keys = {data(derive(**base))}
  n = 1
  for field, values in variants.items():
    for v in values:
      if field != "root" and v == base[field]:
        continue
      keys.add(data(derive(**{**base, field: v})))
      n += 1
  assert len(keys) == n  # all distinct
  # and no two (round, client, purpose) triples collide
  triples = itertools.product(range(4), range(6), list(Purpose))
  all_keys = {data(derive(ROOT, Stage.FEDERATED, r, c, p)) for r, c, p in triples}
  assert len(all_keys) == 4 * 6 * len(Purpose)


def test_cohort_is_the_documented_draw():
  key = derive(ROOT, Stage.FEDERATED, 9, SERVER, Purpose.COHORT)
  want = jax.random.choice(key, 30, (2,), replace=False)
  np.testing.assert_array_equal(tapjax.sample_cohort(ROOT, 9, 30, 2), want)


def test_cohort_changes_with_round_and_root_and_never_repeats_a_client():
  rounds = jnp.arange(3000)
  draw = jax.jit(jax.vmap(lambda r: tapjax.sample_cohort(ROOT, r, 10, 3)))
  cohorts = np.asarray(draw(rounds))  # [rounds, 3]
  assert cohorts.dtype == np.int32 and cohorts.min() >= 0 and cohorts.max() < 10
  assert all(len(set(c)) == 3 for c in cohorts.tolist())  # distinct within a round
  assert len({tuple(c) for c in cohorts[:20].tolist()}) > 10  # changes with the round
  other = np.asarray(jax.vmap(lambda r: tapjax.sample_cohort(jax.random.key(4), r, 10, 3))(rounds[:20]))
  assert (other != cohorts[:20]).any()
  # uniform: each client is drawn 3000 * 3/10 = 900 times; binomial sd = sqrt(900 * 0.7) ~ 25
  counts = np.bincount(cohorts.ravel(), minlength=10)
  assert np.abs(counts - 900).max() < 5 * 25, counts
  # and each unordered pair about equally often (3 pairs per draw over 45 pairs = 200 each)
  pairs = np.zeros((10, 10))
  for a, b, c in cohorts.tolist():
    for i, j in ((a, b), (a, c), (b, c)):
      pairs[min(i, j), max(i, j)] += 1
  upper = pairs[np.triu_indices(10, 1)]
  assert np.abs(upper - 200).max() < 5 * np.sqrt(200), upper
