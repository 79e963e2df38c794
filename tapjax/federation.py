"""Federated state, cohort gather/scatter, and TAP and its baselines as
``(init, round)`` pairs of pure functions.

Per-client state is one pytree whose arrays lead with a ``[clients]`` axis. A
round samples its cohort from ``(root key, round)`` alone, gathers the cohort's
rows, trains them with a one-client function mapped by :class:`ClientMap`,
scatters them back and aggregates. Fault quarantine: a cohort client whose loss
record or trained parameters are not finite is left out of that round (no
aggregation weight, its personal row and bookkeeping keep their old values) and
named in ``RoundInfo.rejected`` / ``RoundInfo.reason``; the check is part of the
jitted round (a selection, so a finite round is bit-identical to one without
it). Structure (task set, step counts, cohort size, model) is static; numbers
(margins, KD weights, learning rates, round, keys) are array arguments, so a
jitted round compiles once.

The library returns un-jitted functions; the caller jits (with donation)::

  alg = tap(setup)
  state = alg.init(params, num_clients)
  round_fn = jax.jit(alg.round, donate_argnums=0)
  for _ in range(rounds):
    state, info = round_fn(state, frozen, data, hparams, root_key)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tapjax import aggregate, components, distill, local, personalize
from tapjax.objective import Objective, supervised_loss
from tapjax.rng import SERVER, Purpose, Stage, derive
from tapjax.sharding import ClientMap

PyTree = Any
LOSS_RECORDS = ("mean", "share_weighted")


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
  """Static structure shared by every algorithm (changing it recompiles).

  Attributes:
    objective: the model's pure functions.
    leaf_ids: pytree of int component ids, structured like the trainable params.
    usage: ``[tasks, components]`` bool, components each task's forward pass uses.
    local: stage-1 local training shape.
    post: stage-2 (post-training and distillation) shape.
    cohort_size: clients sampled per round.
    client_map: how one-client functions are mapped.
    server_optimizer: optax transform on the pseudo-gradient; ``None`` = FedAvg
      (the mean is taken as is; equal to ``optax.sgd(1.0)``).
    replace_usage: ``[tasks, components]`` used by the replacement rule; defaults
      to ``usage``. The reference's component tracking differs from its forward
      pass; its compatibility mode passes that matrix here.
    loss_record: ``"mean"`` (each task's mean training loss feeds the rule) or
      ``"share_weighted"`` (the reference: mean times the task's batch share).
    broadcast: ``[components]`` bool, components the server sends; the others
      reach clients at their initial value (the reference never delivers its
      aggregated fusion). ``None`` = all.
  """

  objective: Objective
  leaf_ids: PyTree
  usage: np.ndarray
  local: local.LocalConfig
  post: local.LocalConfig
  cohort_size: int
  client_map: ClientMap = ClientMap()
  server_optimizer: optax.GradientTransformation | None = None
  replace_usage: np.ndarray | None = None
  loss_record: str = "mean"
  broadcast: np.ndarray | None = None

  def __post_init__(self):
    if self.loss_record not in LOSS_RECORDS:
      raise ValueError(f"loss_record={self.loss_record!r}; choose one of {LOSS_RECORDS}")
    if self.replace_usage is not None and np.shape(self.replace_usage) != np.shape(self.usage):
      raise ValueError(
        f"replace_usage shape {np.shape(self.replace_usage)} != usage shape {np.shape(self.usage)}"
      )

  @property
  def num_tasks(self) -> int:
    return int(np.shape(self.usage)[0])

  @property
  def num_components(self) -> int:
    return int(np.shape(self.usage)[1])


class HParams(NamedTuple):
  """Dynamic hyperparameters (arrays: changing them never recompiles).

  Build with :meth:`create`, which makes every field a float32 (non-weak) array; a
  field replaced by a Python float or a weakly typed array changes the abstract
  signature and triggers one retrace.
  """

  margin: jax.Array  # [tasks]
  kd_weight: jax.Array  # [tasks] lambda_t
  temperature: jax.Array  # scalar T
  lr_min: jax.Array  # warm-up start
  lr_peak: jax.Array
  warmup_rounds: jax.Array
  post_lr: jax.Array  # stage 2 (constant)

  @classmethod
  def create(
    cls,
    num_tasks: int,
    margin=0.01,
    kd_weight=2e-3,
    temperature=1.0,
    lr_min=1e-4,
    lr_peak=3e-4,
    warmup_rounds=20,
    post_lr=1e-4,
  ) -> "HParams":
    """Reference defaults (FLAVA); ``margin`` and ``kd_weight`` may be scalars or ``[tasks]``."""
    f = lambda x: jnp.asarray(x, jnp.float32)
    vec = lambda x: jnp.broadcast_to(f(x), (num_tasks,))
    return cls(
      vec(margin), vec(kd_weight), f(temperature), f(lr_min), f(lr_peak), f(warmup_rounds), f(post_lr)
    )


class FedData(NamedTuple):
  """Every client's training data, padded to a common capacity."""

  examples: dict  # {field: [clients, examples, ...]} with "task" [clients, examples]
  num_examples: jax.Array  # [clients] valid examples (also the aggregation weights by default)
  client_tasks: jax.Array  # [clients, tasks] bool
  # [clients] aggregation weights when they are not the stored examples (a client's rows
  # capped on a small machine keep their real dataset size as weight); None = num_examples
  weights: jax.Array | None = None
  # [clients, components] bool, what each client holds when it is finer than its tasks'
  # usage rows (a client whose examples of a task have fewer modalities or domains than
  # the task: it trains, copies and uploads only those); None = from client_tasks and usage
  holders: jax.Array | None = None


class CohortData(NamedTuple):
  """The data of one round, or of one chunk of clients in stage 2, with the clients'
  training batches drawn ahead (on the host: :mod:`tapjax.data.stream`) instead of
  their whole datasets, so the device never holds a large client's examples. Every
  algorithm's ``round``, :func:`post_train` and :func:`distill_personal` take it in
  place of :class:`FedData`; given the batches a dense call would draw
  (:func:`tapjax.local.draw_indices`), the result is the same.
  """

  ids: jax.Array  # [cohort] global client ids (a round's: sample_cohort(root, round, ...))
  # {int(Purpose): {field: [cohort, draws, batch, ...]}}: each training call's batches
  # (local.Batches rows), one entry per data purpose the algorithm draws with
  # (Algorithm.purposes; stage 2: STAGE2_PURPOSES)
  batches: dict
  num_examples: jax.Array  # [cohort] the clients' example counts
  client_tasks: jax.Array  # [cohort, tasks] bool
  weights: jax.Array  # [cohort] aggregation weights
  holders: jax.Array  # [cohort, components] bool, what each client holds (client_holders)


STAGE2_PURPOSES = (Purpose.TEACHER_DATA,)  # post-training and distillation share batches


class State(NamedTuple):
  """The whole federation. ``personal`` is ``()`` for algorithms without personal models."""

  round: jax.Array  # scalar int32, rounds completed
  server: aggregate.ServerState  # the global trainable params (+ server optimizer state)
  initial: PyTree  # the initial trainable params
  personal: PyTree  # [clients, ...]
  student_loss: jax.Array  # [clients, tasks], +inf before a client's first training
  replaced_tasks: jax.Array  # [clients, tasks] int32, cumulative replacements
  replaced_components: jax.Array  # [clients, components] int32, cumulative


class Fault(enum.IntFlag):
  """Why a cohort client was rejected (``RoundInfo.reason``; the flags combine)."""

  NONE = 0
  LOSS = 1  # a loss record of a task the client holds is NaN or infinite
  PARAMS = 2  # a trained parameter (upload or personal model) is NaN or infinite


class RoundInfo(NamedTuple):
  """What a round did, for logs and the appendix figures.

  A rejected client (``reason != 0``) was left out of everything the round
  changes: it sent nothing to the aggregation, its personal row, student losses
  and replacement counts keep their values from before the round. Its loss
  records are reported as computed (so the NaN shows).
  """

  clients: jax.Array  # [cohort] global client ids
  lr: jax.Array  # scalar
  global_loss: jax.Array  # [cohort, tasks] loss record of the locally trained global copy
  personal_loss: jax.Array  # [cohort, tasks] loss record of the personal model
  active: jax.Array  # [cohort, tasks] bool, tasks seen this round
  replaced: jax.Array  # [cohort, tasks] bool, applied replacements (none for rejected clients)
  replaced_components: jax.Array  # [cohort, components] bool
  rejected: jax.Array  # [cohort] bool, left out of this round (non-finite loss or update)
  reason: jax.Array  # [cohort] int32, a :class:`Fault` bit set (0 = accepted)


class Algorithm(NamedTuple):
  """``init(params, num_clients) -> State``;
  ``round(state, frozen, data, hparams, root_key) -> (State, RoundInfo)`` where ``data``
  is a :class:`FedData` or a round's :class:`CohortData` holding batches for each of
  ``purposes`` (the data purposes its training calls draw with)."""

  init: Callable[..., State]
  round: Callable[..., tuple[State, RoundInfo]]
  purposes: tuple[Purpose, ...] = ()


# ----------------------------------------------------------------------------- helpers


def sample_cohort(root: jax.Array, round_: jax.Array, num_clients: int, cohort_size: int) -> jax.Array:
  """``[cohort]`` distinct client ids drawn uniformly from ``(root, round)`` alone."""
  key = derive(root, Stage.FEDERATED, round_, SERVER, Purpose.COHORT)
  return jax.random.choice(key, num_clients, (cohort_size,), replace=False).astype(jnp.int32)


def gather(tree: PyTree, ids: jax.Array) -> PyTree:
  """Rows ``ids`` of every ``[clients, ...]`` leaf."""
  return jax.tree_util.tree_map(lambda x: x[ids], tree)


def scatter(tree: PyTree, ids: jax.Array, rows: PyTree) -> PyTree:
  """``tree`` with rows ``ids`` set to ``rows`` (in place under donation)."""
  return jax.tree_util.tree_map(lambda x, v: x.at[ids].set(v), tree, rows)


def stack(tree: PyTree, num_clients: int) -> PyTree:
  """A ``[clients, ...]`` copy of an unstacked pytree for every client."""
  return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), tree)


def select_key(pred: jax.Array, on_true: jax.Array, on_false: jax.Array) -> jax.Array:
  """``jnp.where`` for PRNG keys (typed or raw)."""
  typed = jnp.issubdtype(on_true.dtype, jax.dtypes.prng_key)
  a = jax.random.key_data(on_true) if typed else on_true
  b = jax.random.key_data(on_false) if typed else on_false
  out = jnp.where(pred, a, b)
  return jax.random.wrap_key_data(out, impl=jax.random.key_impl(on_true)) if typed else out


def where_tree(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Leafwise ``jnp.where(pred, a, b)`` for a scalar ``pred``, PRNG keys included."""
  leaf = lambda a, b: (
    select_key(pred, a, b) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else jnp.where(pred, a, b)
  )
  return jax.tree_util.tree_map(leaf, on_true, on_false)


def twice(f: Callable, first_args: tuple, then: Callable, init: Any):
  """``(y0, y1, aux)`` where ``y0 = f(*first_args)``, ``(args, aux) = then(y0)`` and
  ``y1 = f(*args)``, with ``f`` traced and compiled ONCE (a two-step ``lax.scan``).

  TAP trains twice per client (global copy, then personal model); two call sites
  would compile the whole training twice. ``init`` is any value shaped like ``f``'s
  output (``then`` also runs on it once, and that result is discarded); ``aux`` holds
  numeric or bool arrays (it starts as zeros in the scan's carry).
  """

  def body(carry, i):
    prev, first, _ = carry
    args, aux = then(prev)
    y = f(*where_tree(i == 0, tuple(first_args), tuple(args)))
    # Keep the first result in the carry (a select per leaf) rather than stacking both
    # results as the scan's outputs (a dynamic-update-slice per leaf, and a slice per leaf
    # to read each back): fewer, cheaper ops in every TAP round program.
    return (y, where_tree(i == 0, y, first), aux), None

  aux0 = jax.eval_shape(lambda: then(init)[1])
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
  (y1, y0, aux), _ = jax.lax.scan(body, (init, init, zeros), jnp.arange(2))
  return y0, y1, aux


def final_global(setup: Setup, state: State) -> PyTree:
  """The global trainable params as clients receive them (see ``Setup.broadcast``)."""
  if setup.broadcast is None:
    return state.server.params
  return components.select(jnp.asarray(setup.broadcast), state.server.params, state.initial, setup.leaf_ids)


def _record(setup: Setup, res: local.TrainResult) -> jax.Array:
  return res.task_mean() if setup.loss_record == "mean" else res.share_weighted()


def _init_state(params: PyTree, num_clients: int, setup: Setup, with_personal: bool) -> State:
  own = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # states are donated: never alias
  return State(
    round=jnp.zeros((), jnp.int32),
    server=aggregate.server_init(own(params), setup.server_optimizer),
    initial=own(params),
    personal=stack(params, num_clients) if with_personal else (),
    student_loss=personalize.initial_student_loss(num_clients, setup.num_tasks),
    replaced_tasks=jnp.zeros((num_clients, setup.num_tasks), jnp.int32),
    replaced_components=jnp.zeros((num_clients, setup.num_components), jnp.int32),
  )


class _Cohort(NamedTuple):
  """One round's sampled clients and their rows of the federation."""

  ids: jax.Array  # [cohort] global client ids
  examples: dict  # [cohort, examples, ...]
  num_examples: jax.Array  # [cohort]
  tasks: jax.Array  # [cohort, tasks] bool
  held: jax.Array  # [cohort, components] bool
  lr: jax.Array  # scalar, this round's local learning rate
  weights: jax.Array  # [cohort] aggregation weights


def client_holders(setup: Setup, data: FedData) -> jax.Array:
  """``[clients, components]`` bool: what each client holds: ``data.holders`` when given,
  else every component one of its tasks uses."""
  if data.holders is not None:
    return jnp.asarray(data.holders, bool)
  return components.holders(jnp.asarray(data.client_tasks, bool), jnp.asarray(setup.usage))


class _Drawn(NamedTuple):
  """A client's pre-drawn batches per data purpose (from :class:`CohortData`)."""

  by_purpose: dict


def _draw(examples, key: Callable, purpose: Purpose):
  """What one training call draws its batches with: the client's pre-drawn batches of
  ``purpose`` (a :class:`CohortData` call), else the key of ``purpose``."""
  if not isinstance(examples, _Drawn):
    return key(purpose)
  if int(purpose) not in examples.by_purpose:
    raise ValueError(
      f"CohortData.batches has no batches for {Purpose(purpose)!r} (it has "
      f"{sorted(Purpose(p).name for p in examples.by_purpose)}); draw them for the algorithm's "
      "purposes (Algorithm.purposes, or STAGE2_PURPOSES in stage 2)"
    )
  return local.Batches(examples.by_purpose[int(purpose)])


def _data_and_key(examples, draw):
  """``(data, data_key)`` of a :func:`tapjax.local.train` call from :func:`_draw`'s result."""
  return (draw, None) if isinstance(draw, local.Batches) else (examples, draw)


def _check_cohort_data(data: CohortData, size: int, what: str):
  got = np.shape(data.ids)[0]
  if got != size:
    raise ValueError(f"CohortData holds {got} clients where {what} needs {size}")


def _cohort(setup: Setup, state: State, data: FedData | CohortData, hp: HParams, root: jax.Array) -> _Cohort:
  lr = local.warmup_lr(state.round, hp.lr_min, hp.lr_peak, hp.warmup_rounds)
  if isinstance(data, CohortData):
    _check_cohort_data(data, setup.cohort_size, f"a round of cohort_size={setup.cohort_size}")
    return _Cohort(
      jnp.asarray(data.ids, jnp.int32),
      _Drawn(data.batches),
      data.num_examples,
      jnp.asarray(data.client_tasks, bool),
      jnp.asarray(data.holders, bool),
      lr,
      data.weights,
    )
  ids = sample_cohort(root, state.round, data.num_examples.shape[0], setup.cohort_size)
  return _Cohort(
    ids,
    gather(data.examples, ids),
    data.num_examples[ids],
    jnp.asarray(data.client_tasks, bool)[ids],
    client_holders(setup, data)[ids],
    lr,
    (data.num_examples if data.weights is None else data.weights)[ids],
  )


def _flat_loss(layout: components.FlatLayout, loss_fn):
  """``loss_fn`` over the flat parameter vector of ``layout``."""
  return lambda q, batch, key: loss_fn(layout.unravel(q), batch, key)


def _train(
  setup: Setup,
  loss_fn,
  params,
  examples,
  n,
  held,
  lr,
  draw,
  dropout_key,
  cfg: local.LocalConfig,
  leaf_ids: PyTree | None = None,
) -> local.TrainResult:
  """One client's local training, updating only the components it holds (``draw``: a
  data key, or pre-drawn batches, see :func:`_draw`). ``leaf_ids`` defaults to
  ``setup.leaf_ids``; a flat ``[P]`` ``params`` takes its
  :class:`tapjax.components.FlatLayout` (and a ``loss_fn`` over the flat vector)."""
  data, data_key = _data_and_key(examples, draw)
  return local.train(
    loss_fn,
    params,
    data,
    n,
    data_key,
    dropout_key,
    lr,
    cfg,
    setup.num_tasks,
    components.leaf_mask(held, setup.leaf_ids if leaf_ids is None else leaf_ids),
  )


def _rows_finite(tree: PyTree) -> jax.Array:
  """``[cohort]`` bool: every value of the row is finite, over all ``[cohort, ...]`` leaves."""
  leaves = jax.tree_util.tree_leaves(tree)
  per_leaf = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in leaves]
  return functools.reduce(jnp.logical_and, per_leaf)


class _Verdict(NamedTuple):
  ok: jax.Array  # [cohort] bool
  reason: jax.Array  # [cohort] int32 Fault bits


def _quarantine(c: _Cohort, losses: tuple, params_ok: jax.Array) -> _Verdict:
  """Which cohort clients' results may enter the federation.

  Args:
    losses: ``[cohort, tasks]`` loss records; only tasks a client holds count.
    params_ok: ``[cohort]`` bool, every parameter the client produced (uploads, personal
      models) is finite (:attr:`tapjax.local.TrainResult.finite`, computed on the flat
      vector in training: a per-leaf check here was a sixth of a round's fusions).
  """
  loss_ok = _rows_finite(tuple(jnp.where(c.tasks, x, 0.0) for x in losses))
  reason = jnp.where(loss_ok, 0, int(Fault.LOSS)) | jnp.where(params_ok, 0, int(Fault.PARAMS))
  return _Verdict(reason == 0, reason.astype(jnp.int32))


def _keep_rows(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """Rows of ``new`` where ``ok [cohort]``, else of ``old`` (a selection: accepted rows are
  bit-identical to ``new``)."""
  return jax.tree_util.tree_map(
    lambda n, o: jnp.where(ok.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old
  )


def _aggregate(
  setup: Setup, state: State, trained: PyTree, c: _Cohort, ok: jax.Array
) -> aggregate.ServerState:
  """Aggregate the accepted clients' uploads (a rejected client holds nothing this round;
  its rows are zeroed so that a NaN cannot leak through a zero weight)."""
  trained = _keep_rows(ok, trained, jax.tree_util.tree_map(jnp.zeros_like, trained))
  held = c.held & ok[:, None]
  how = "reduce" if setup.client_map.strategy == "shard" else "unrolled"  # sharded: an all-reduce
  agg = aggregate.masked_mean(trained, held, c.weights, setup.leaf_ids, state.server.params, how)
  return aggregate.server_update(state.server, agg, setup.leaf_ids, setup.server_optimizer)


# ----------------------------------------------------------------------------- algorithms


class TapClientResult(NamedTuple):
  """One client's TAP stage-1 step (see :func:`tap_client`)."""

  upload: PyTree  # the locally trained global copy (sent to the server)
  personal: PyTree  # the personal model after the rule and its training
  student_loss: jax.Array  # [tasks] updated where the personal model saw the task
  global_loss: jax.Array  # [tasks] loss record of the global copy
  personal_loss: jax.Array  # [tasks] loss record of the personal model
  active: jax.Array  # [tasks] bool, tasks the global copy saw
  replaced: jax.Array  # [tasks] bool
  replaced_components: jax.Array  # [components] bool
  finite: jax.Array = True  # bool: the upload and the personal model are finite


def tap_client(
  setup: Setup,
  loss_fn,
  start: PyTree,
  personal: PyTree,
  student_loss: jax.Array,
  cid: jax.Array,
  examples: dict,
  n: jax.Array,
  has_task: jax.Array,
  held: jax.Array,
  lr: jax.Array,
  margin: jax.Array,
  root: jax.Array,
  round_: jax.Array,
) -> TapClientResult:
  """TAP stage 1 for one client: train the global copy, apply
  the replacement rule, train the personal model.

  Args:
    start: the global params as the server sends them (unstacked).
    personal: ``[...]`` this client's personal params; ``student_loss [tasks]``.
    cid: global client id (keys depend on it, never on the cohort position).
    examples, n: the client's data and its valid example count.
    has_task: ``[tasks]`` bool; held: ``[components]`` bool.
    lr, margin: this round's learning rate, ``[tasks]`` margins.
  """
  key = functools.partial(derive, root, Stage.FEDERATED, round_, cid)
  rule_usage = setup.usage if setup.replace_usage is None else setup.replace_usage
  # The whole step runs on flat parameter vectors: the rule's selection and the two-phase
  # scan's carries are then one kernel each instead of one per leaf.
  layout = components.FlatLayout.of(start, setup.leaf_ids)  # also the flat vector's leaf ids
  flat_loss = _flat_loss(layout, loss_fn)
  personal_f = layout.ravel(personal)

  def train_from(params, draw, dropout_key):
    return _train(setup, flat_loss, params, examples, n, held, lr, draw, dropout_key, setup.local, layout)

  def rule(g: local.TrainResult):
    """2. Copy every component of each task whose teacher (the trained global copy)
    beats the student by the margin; the personal model then trains on other batches
    when something was replaced."""
    rep = personalize.replace(
      personal_f,
      g.params,
      _record(setup, g),
      student_loss,
      margin,
      has_task & (g.task_count > 0),
      jnp.asarray(rule_usage),
      held,
      layout,
    )
    draw = where_tree(
      jnp.any(rep.tasks),
      _draw(examples, key, Purpose.PERSONAL_DATA),
      _draw(examples, key, Purpose.GLOBAL_DATA),
    )
    return (rep.params, draw, key(Purpose.PERSONAL_DROPOUT)), rep

  # 1. train the global copy; 2. the rule; 3. train the personal model (one traced body).
  start_f = layout.ravel(start)
  g, p, rep = twice(
    train_from,
    (start_f, _draw(examples, key, Purpose.GLOBAL_DATA), key(Purpose.GLOBAL_DROPOUT)),
    rule,
    local.TrainResult.like(start_f, setup.num_tasks),
  )
  g_loss, p_loss = _record(setup, g), _record(setup, p)
  p_seen = has_task & (p.task_count > 0)
  return TapClientResult(
    layout.unravel(g.params),
    layout.unravel(p.params),
    jnp.where(p_seen, p_loss, student_loss),
    g_loss,
    p_loss,
    has_task & (g.task_count > 0),
    rep.tasks,
    rep.components,
    g.finite & p.finite,
  )


def tap(setup: Setup) -> Algorithm:
  """TAP stage 1: FedAvg on the global model plus per-client replacement into
  personal models. Only the global copy is uploaded, so ``state.server`` follows
  exactly the trajectory of :func:`fedavg` with the same key."""

  def init(params: PyTree, num_clients: int) -> State:
    return _init_state(params, num_clients, setup, with_personal=True)

  def round_(state: State, frozen: PyTree, data: FedData, hp: HParams, root: jax.Array):
    c = _cohort(setup, state, data, hp, root)
    loss_fn = supervised_loss(setup.objective, frozen)
    start = final_global(setup, state)

    def client(cid, personal, student_loss, examples, n, has_task, held):
      return tap_client(
        setup,
        loss_fn,
        start,
        personal,
        student_loss,
        cid,
        examples,
        n,
        has_task,
        held,
        c.lr,
        hp.margin,
        root,
        state.round,
      )

    personal, student_loss = gather(state.personal, c.ids), state.student_loss[c.ids]
    r = setup.client_map(client)(c.ids, personal, student_loss, c.examples, c.num_examples, c.tasks, c.held)
    # A client whose loss or params are not finite changes nothing this round.
    v = _quarantine(c, (r.global_loss, r.personal_loss), r.finite)
    replaced = r.replaced & v.ok[:, None]
    replaced_components = r.replaced_components & v.ok[:, None]
    new = state._replace(
      round=state.round + 1,
      server=_aggregate(setup, state, r.upload, c, v.ok),
      personal=scatter(state.personal, c.ids, _keep_rows(v.ok, r.personal, personal)),
      student_loss=state.student_loss.at[c.ids].set(_keep_rows(v.ok, r.student_loss, student_loss)),
      replaced_tasks=state.replaced_tasks.at[c.ids].add(replaced.astype(jnp.int32)),
      replaced_components=state.replaced_components.at[c.ids].add(replaced_components.astype(jnp.int32)),
    )
    return new, RoundInfo(
      c.ids,
      c.lr,
      r.global_loss,
      r.personal_loss,
      r.active,
      replaced,
      replaced_components,
      ~v.ok,
      v.reason,
    )

  return Algorithm(init, round_, (Purpose.GLOBAL_DATA, Purpose.PERSONAL_DATA))


def _train_cohort(
  setup: Setup,
  c: _Cohort,
  starts: PyTree,
  frozen: PyTree,
  root: jax.Array,
  round_: jax.Array,
  data_purpose: int,
  dropout_purpose: int,
):
  """One plain local training per cohort client from ``starts [cohort, ...]``:
  ``(params [cohort, ...], loss record [cohort, tasks], seen [cohort, tasks], finite
  [cohort])``."""
  loss_fn = supervised_loss(setup.objective, frozen)

  def client(cid, params, examples, n, has_task, held):
    key = functools.partial(derive, root, Stage.FEDERATED, round_, cid)
    draw = _draw(examples, key, data_purpose)
    r = _train(setup, loss_fn, params, examples, n, held, c.lr, draw, key(dropout_purpose), setup.local)
    return r.params, _record(setup, r), has_task & (r.task_count > 0), r.finite

  return setup.client_map(client)(c.ids, starts, c.examples, c.num_examples, c.tasks, c.held)


def _no_replacement_info(
  setup: Setup, c: _Cohort, global_loss, personal_loss, active, v: _Verdict
) -> RoundInfo:
  return RoundInfo(
    c.ids,
    c.lr,
    global_loss,
    personal_loss,
    active,
    jnp.zeros_like(active),
    jnp.zeros((setup.cohort_size, setup.num_components), bool),
    ~v.ok,
    v.reason,
  )


def fedavg(setup: Setup) -> Algorithm:
  """FedAvg (or FedOpt with ``setup.server_optimizer``): the global model only."""

  def init(params: PyTree, num_clients: int) -> State:
    return _init_state(params, num_clients, setup, with_personal=False)

  def round_(state: State, frozen: PyTree, data: FedData, hp: HParams, root: jax.Array):
    c = _cohort(setup, state, data, hp, root)
    starts = stack(final_global(setup, state), setup.cohort_size)
    g_params, g_loss, active, finite = _train_cohort(
      setup, c, starts, frozen, root, state.round, Purpose.GLOBAL_DATA, Purpose.GLOBAL_DROPOUT
    )
    v = _quarantine(c, (g_loss,), finite)
    new = state._replace(round=state.round + 1, server=_aggregate(setup, state, g_params, c, v.ok))
    return new, _no_replacement_info(setup, c, g_loss, jnp.full_like(g_loss, jnp.nan), active, v)

  return Algorithm(init, round_, (Purpose.GLOBAL_DATA,))


def local_only(setup: Setup) -> Algorithm:
  """Local only: the sampled clients train their own models; nothing is shared."""

  def init(params: PyTree, num_clients: int) -> State:
    return _init_state(params, num_clients, setup, with_personal=True)

  def round_(state: State, frozen: PyTree, data: FedData, hp: HParams, root: jax.Array):
    c = _cohort(setup, state, data, hp, root)
    before = gather(state.personal, c.ids)
    personal, p_loss, active, finite = _train_cohort(
      setup, c, before, frozen, root, state.round, Purpose.LOCAL_DATA, Purpose.LOCAL_DROPOUT
    )
    v = _quarantine(c, (p_loss,), finite)
    personal = _keep_rows(v.ok, personal, before)
    new = state._replace(round=state.round + 1, personal=scatter(state.personal, c.ids, personal))
    return new, _no_replacement_info(setup, c, jnp.full_like(p_loss, jnp.nan), p_loss, active, v)

  return Algorithm(init, round_, (Purpose.LOCAL_DATA,))


# ----------------------------------------------------------------------------- stage 2


def _stage2_rows(setup: Setup, data: FedData | CohortData):
  """``(ids, examples, num_examples, holders)`` of the clients a stage-2 call trains:
  every client of a :class:`FedData`, the chunk of a :class:`CohortData`."""
  if isinstance(data, CohortData):
    return (
      jnp.asarray(data.ids, jnp.int32),
      _Drawn(data.batches),
      data.num_examples,
      jnp.asarray(data.holders, bool),
    )
  ids = jnp.arange(data.num_examples.shape[0], dtype=jnp.int32)
  return ids, data.examples, data.num_examples, client_holders(setup, data)


def post_train(setup: Setup) -> Callable[..., PyTree]:
  """``(global_params, frozen, data, hparams, root) -> [clients, ...]``: every client
  fine-tunes its slice of the global model on its own data (``setup.post`` steps at
  ``hparams.post_lr``). This is the "FedAvg + post-train" model and TAP's KD teacher.
  With a :class:`CohortData` ``data`` (batches of :data:`STAGE2_PURPOSES`) it trains that
  chunk of clients: ``[chunk, ...]``, the same rows as the dense call's."""

  def run(global_params: PyTree, frozen: PyTree, data: FedData | CohortData, hp: HParams, root: jax.Array):
    loss_fn = supervised_loss(setup.objective, frozen)

    def client(cid, examples, n, held):
      key = functools.partial(derive, root, Stage.POST, 0, cid)
      return _train(
        setup,
        loss_fn,
        global_params,
        examples,
        n,
        held,
        hp.post_lr,
        _draw(examples, key, Purpose.TEACHER_DATA),
        key(Purpose.TEACHER_DROPOUT),
        setup.post,
      ).params

    return setup.client_map(client)(*_stage2_rows(setup, data))

  return run


def distill_personal(setup: Setup) -> Callable[..., PyTree]:
  """``(personal, teachers, frozen, data, hparams, root[, dropout_purpose]) -> [clients, ...]``:
  TAP stage 2. Each personal model fine-tunes on the same batches as its teacher with task
  loss + ``kd_weight[task]`` * KD(teacher || student). ``kd_weight = 0`` is "TAP without KD"
  (same compiled program). With a :class:`CohortData` ``data`` (a chunk of clients),
  ``personal`` and ``teachers`` are that chunk's rows ``[chunk, ...]``.

  ``dropout_purpose`` (default ``Purpose.STUDENT_DROPOUT``; may be a traced int) names the
  dropout keys. With ``kd_weight = 0``, ``teachers`` ignored and
  ``Purpose.TEACHER_DROPOUT``, the call is :func:`post_train` on ``personal`` (the same
  values to float rounding: the teacher's forward pass is skipped by a ``lax.cond``), so
  one compiled program can serve all of stage 2 where the cond is a real branch
  (``ClientMap("map")``; under ``vmap`` both branches run)."""

  def run(
    personal: PyTree,
    teachers: PyTree,
    frozen: PyTree,
    data: FedData | CohortData,
    hp: HParams,
    root: jax.Array,
    dropout_purpose: jax.Array | int = Purpose.STUDENT_DROPOUT,
  ):
    ids, examples, num_examples, held = _stage2_rows(setup, data)

    def client(cid, params, teacher, examples, n, held_c):
      key = functools.partial(derive, root, Stage.POST, 0, cid)
      data_c, data_key = _data_and_key(examples, _draw(examples, key, Purpose.TEACHER_DATA))
      return distill.distill(
        setup.objective,
        params,
        teacher,
        frozen,
        data_c,
        n,
        data_key,
        key(dropout_purpose),
        hp.post_lr,
        setup.post,
        hp.kd_weight,
        hp.temperature,
        setup.num_tasks,
        components.leaf_mask(held_c, setup.leaf_ids),
      ).params

    return setup.client_map(client)(ids, personal, teachers, examples, num_examples, held)

  return run
