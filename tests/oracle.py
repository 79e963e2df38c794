"""An independent oracle for TAP, FedAvg, Local only and stage 2 on the toy model.

It shares NOTHING with the code under test except the model's functions
(``toy.apply``, ``toy.loss``, ``toy.divergence``). Everything tapjax does is
rewritten here from its documented contract, the slow and obvious way:

* keys: ``fold_in`` of the root key with stage, round, global client id and
  purpose, in that order (the numbers below are the contract, written out);
* the cohort: ``jax.random.choice(key(FEDERATED, round, SERVER, COHORT), clients,
  (cohort,), replace=False)``;
* local training: examples visited in the order ``argsort(uniform(data_key))``
  (padding last), step ``s`` micro-batch ``j`` takes positions ``(s * accum + j) *
  batch + [0, batch)`` of that order modulo the client's example count, dropout
  key ``fold_in(fold_in(dropout_key, s), j)``, gradient of the batch-mean loss
  averaged over micro-batches, clip by global norm then AdamW (optax, on the
  per-leaf dict), components the client does not hold never change;
* the rule, holders, the weighted mean over holders, the server optimizer and
  the broadcast mask per component name, one client at a time, in Python dicts
  keyed by client id, with per-client deep copies.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import toy

# The key-derivation contract (tapjax.rng), written out as numbers.
FEDERATED, POST = 1, 2
SERVER = 2**31 - 1
COHORT, GLOBAL_DATA, GLOBAL_DROPOUT, PERSONAL_DATA, PERSONAL_DROPOUT = 0, 1, 2, 3, 4
TEACHER_DATA, TEACHER_DROPOUT, STUDENT_DROPOUT, LOCAL_DATA, LOCAL_DROPOUT = 5, 6, 8, 9, 10

# Which component each part of the toy parameters belongs to, by hand: a top-level
# entry is one component, or (the stacked heads) one component per slot.
SLOTS = {
  "enc_a": [(None, "enc/a")],
  "enc_b": [(None, "enc/b")],
  "shared": [(None, "shared")],
  "head": [(t, f"head/{t}") for t in range(toy.T)],
}


def key(root, *ints):
  for i in ints:
    root = jax.random.fold_in(root, int(i))
  return root


def cohort(root, round_, num_clients, size):
  k = key(root, FEDERATED, round_, SERVER, COHORT)
  return [int(i) for i in jax.random.choice(k, num_clients, (size,), replace=False)]


def warmup(round_, lo, hi, rounds):
  return float(lo) + (float(hi) - float(lo)) * min(max(round_ / max(float(rounds), 1.0), 0.0), 1.0)


@dataclasses.dataclass
class Spec:
  """What the oracle runs: the toy federation's hyperparameters in plain Python."""

  client_tasks: np.ndarray  # [clients, tasks] bool
  num_examples: np.ndarray  # [clients]
  examples: dict  # {field: [clients, capacity, ...]} numpy
  frozen: dict
  cohort_size: int
  local: dict  # steps, batch, accum, weight_decay, clip_norm
  post: dict
  margin: list  # [tasks]
  kd_weight: list  # [tasks]
  temperature: float
  lr: tuple  # (lr_min, lr_peak, warmup_rounds)
  post_lr: float
  record: str = "mean"  # or "share_weighted"
  rule_uses: tuple = toy.TASK_USES  # what the rule copies per task
  broadcast: frozenset | None = None  # components sent; None = all
  server_tx: optax.GradientTransformation | None = None

  def held(self, c) -> set:
    return set().union(*[toy.TASK_USES[t] for t in range(toy.T) if self.client_tasks[c, t]])

  def tasks(self, c) -> list:
    return [t for t in range(toy.T) if self.client_tasks[c, t]]

  def data(self, c) -> dict:
    return {k: np.asarray(v[c]) for k, v in self.examples.items()}


def np_tree(tree):
  return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)


def parts(params):
  """Yield ``(top key, leaf name, slot or None, component)`` for every piece."""
  for top, slots in SLOTS.items():
    for leaf in params[top]:
      for slot, comp in slots:
        yield top, leaf, slot, comp


def copy_components(dst, src, comps):
  """``dst`` with every piece of a component in ``comps`` copied from ``src``."""
  out = copy.deepcopy(dst)
  for top, leaf, slot, comp in parts(dst):
    if comp in comps:
      if slot is None:
        out[top][leaf] = np.array(src[top][leaf], copy=True)
      else:
        out[top][leaf][slot] = src[top][leaf][slot]
  return out


def supervised(frozen):
  return lambda p, batch, k: toy.loss(toy.apply(p, frozen, batch, k), batch)


def with_kd(frozen, teacher, kd_weight, temperature):
  kd_weight = jnp.asarray(kd_weight, jnp.float32)

  def loss(p, batch, k):
    out = toy.apply(p, frozen, batch, k)
    t_out = jax.lax.stop_gradient(toy.apply(teacher, frozen, batch, None))
    return toy.loss(out, batch) + kd_weight[batch["task"]] * toy.divergence(
      out, t_out, batch, jnp.float32(temperature)
    )

  return loss


def train(loss_fn, params, data, n, data_key, dropout_key, lr, cfg, held):
  """One client's training: ``(params, per-task loss sum, per-task count, examples seen)``."""
  capacity = data["task"].shape[0]
  u = np.array(jax.random.uniform(data_key, (capacity,)))
  u[n:] = 2.0  # padding goes last
  order = np.argsort(u, kind="stable")
  tx = optax.chain(
    optax.clip_by_global_norm(cfg["clip_norm"]),
    optax.adamw(np.float32(lr), weight_decay=cfg["weight_decay"]),
  )
  params = np_tree(params)
  opt_state = tx.init(params)
  loss_sum, count = np.zeros(toy.T), np.zeros(toy.T)
  b, accum = cfg["batch"], cfg["accum"]
  for s in range(cfg["steps"]):
    total = None
    for j in range(accum):
      pos = ((s * accum + j) * b + np.arange(b)) % max(n, 1)
      batch = {k: jnp.asarray(v[order[pos]]) for k, v in data.items()}
      k = jax.random.fold_in(jax.random.fold_in(dropout_key, s), j)
      (_, per), g = jax.value_and_grad(
        lambda p: (jnp.mean(loss_fn(p, batch, k)), loss_fn(p, batch, k)), has_aux=True
      )(params)
      per = np.asarray(per)
      for i, t in enumerate(np.asarray(batch["task"])):
        loss_sum[t] += per[i]
        count[t] += 1
      total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
    grads = jax.tree_util.tree_map(lambda x: x / accum, total)
    updates, opt_state = tx.update(grads, opt_state, params)
    moved = np_tree(optax.apply_updates(params, updates))
    not_held = {c for _, _, _, c in parts(params)} - held
    params = copy_components(moved, params, not_held)  # unheld pieces never change
  return params, loss_sum, count, cfg["steps"] * accum * b


def record(spec, loss_sum, count, seen):
  if spec.record == "mean":
    return np.where(count > 0, loss_sum / np.maximum(count, 1), 0.0)
  return loss_sum / seen


def weighted_mean(spec, uploads, fallback, ids):
  """Per component, the example-weighted mean over the cohort's holders; the
  ``fallback`` where no cohort client holds it. Also the set of components sent."""
  out, sent = np_tree(fallback), set()
  for top, leaf, slot, comp in parts(fallback):
    holders = [c for c in ids if comp in spec.held(c)]
    if not holders:
      continue
    sent.add(comp)
    pick = (lambda x: x) if slot is None else (lambda x: x[slot])
    w = {c: float(spec.num_examples[c]) for c in holders}
    mean = sum(w[c] * pick(np.asarray(uploads[c][top][leaf], np.float64)) for c in holders) / sum(w.values())
    if slot is None:
      out[top][leaf] = mean.astype(np.float32)
    else:
      out[top][leaf][slot] = mean
  return out, sent


class Federation:
  """Stage 1 of TAP / FedAvg / Local only, one client at a time."""

  def __init__(self, spec: Spec, params, root):
    self.spec, self.root = spec, root
    n_clients = len(spec.client_tasks)
    self.initial = np_tree(params)
    self.global_ = np_tree(params)
    self.server_state = spec.server_tx.init(self.global_) if spec.server_tx is not None else None
    self.personal = {c: np_tree(params) for c in range(n_clients)}
    self.student = {c: [float("inf")] * toy.T for c in range(n_clients)}
    self.replaced_tasks = {c: [0] * toy.T for c in range(n_clients)}
    self.replaced_components = {c: {} for c in range(n_clients)}
    self.rounds = []  # per round: {"clients", "global_loss", "personal_loss", "replaced"}
    self.round = 0

  def sent(self):
    """The global model as clients receive it (components outside ``broadcast`` at
    their initial value)."""
    if self.spec.broadcast is None:
      return np_tree(self.global_)
    others = {c for *_, c in parts(self.global_)} - set(self.spec.broadcast)
    return copy_components(self.global_, self.initial, others)

  def _key(self, cid, purpose):
    return key(self.root, FEDERATED, self.round, cid, purpose)

  def _train(self, params, cid, data_p, drop_p):
    s = self.spec
    lr = warmup(self.round, *s.lr)
    return train(
      supervised(s.frozen),
      params,
      s.data(cid),
      int(s.num_examples[cid]),
      self._key(cid, data_p),
      self._key(cid, drop_p),
      lr,
      s.local,
      s.held(cid),
    )

  def step(self, algorithm: str):
    s = self.spec
    ids = cohort(self.root, self.round, len(s.client_tasks), s.cohort_size)
    info = {"clients": ids, "global_loss": {}, "personal_loss": {}, "replaced": {}}
    uploads = {}
    for cid in ids:
      if algorithm == "local":
        p, ls, cnt, seen = self._train(self.personal[cid], cid, LOCAL_DATA, LOCAL_DROPOUT)
        self.personal[cid] = p
        info["personal_loss"][cid] = record(s, ls, cnt, seen)
        continue
      g, ls, cnt, seen = self._train(self.sent(), cid, GLOBAL_DATA, GLOBAL_DROPOUT)
      uploads[cid] = g
      g_rec = record(s, ls, cnt, seen)
      info["global_loss"][cid] = g_rec
      if algorithm == "fedavg":
        continue
      fired = [t for t in s.tasks(cid) if cnt[t] > 0 and g_rec[t] + s.margin[t] < self.student[cid][t]]
      info["replaced"][cid] = fired
      comps = set().union(*[set(s.rule_uses[t]) for t in fired]) & s.held(cid) if fired else set()
      for t in fired:
        self.replaced_tasks[cid][t] += 1
      for c in comps:
        self.replaced_components[cid][c] = self.replaced_components[cid].get(c, 0) + 1
      merged = copy_components(self.personal[cid], g, comps)
      data_p = PERSONAL_DATA if fired else GLOBAL_DATA
      p, ls, cnt, seen = self._train(merged, cid, data_p, PERSONAL_DROPOUT)
      self.personal[cid] = p
      p_rec = record(s, ls, cnt, seen)
      info["personal_loss"][cid] = p_rec
      for t in s.tasks(cid):
        if cnt[t] > 0:
          self.student[cid][t] = float(p_rec[t])
    if algorithm != "local":
      mean, sent = weighted_mean(s, uploads, self.global_, ids)
      if s.server_tx is None:
        self.global_ = mean
      else:
        pseudo = jax.tree_util.tree_map(lambda p, m: p - m, self.global_, mean)
        updates, self.server_state = s.server_tx.update(pseudo, self.server_state, self.global_)
        moved = np_tree(optax.apply_updates(self.global_, updates))
        unsent = {c for *_, c in parts(self.global_)} - sent
        self.global_ = copy_components(moved, self.global_, unsent)
    self.rounds.append(info)
    self.round += 1


def post_train(spec: Spec, global_params, root):
  """``{client: params}``: every client fine-tunes the global model on its data."""
  out = {}
  for cid in range(len(spec.client_tasks)):
    k = lambda p: key(root, POST, 0, cid, p)
    out[cid] = train(
      supervised(spec.frozen),
      global_params,
      spec.data(cid),
      int(spec.num_examples[cid]),
      k(TEACHER_DATA),
      k(TEACHER_DROPOUT),
      spec.post_lr,
      spec.post,
      spec.held(cid),
    )[0]
  return out


def distill(spec: Spec, personal, teachers, root, kd_weight):
  """``{client: params}``: each personal model trains on its teacher's batches with
  task loss + ``kd_weight[task]`` * KD(teacher || student)."""
  out = {}
  for cid in range(len(spec.client_tasks)):
    k = lambda p: key(root, POST, 0, cid, p)
    out[cid] = train(
      with_kd(spec.frozen, teachers[cid], kd_weight, spec.temperature),
      personal[cid],
      spec.data(cid),
      int(spec.num_examples[cid]),
      k(TEACHER_DATA),
      k(STUDENT_DROPOUT),
      spec.post_lr,
      spec.post,
      spec.held(cid),
    )[0]
  return out
