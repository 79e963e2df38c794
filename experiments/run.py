"""The experiment pipeline behind ``experiments.tap`` (importable, no flags).

An experiment is a sequence of stages, each resumable from a checkpoint:

  local          the Local-only baseline, ``rounds`` rounds (then evaluated)
  tap            TAP stage 1, ``rounds`` rounds (then FedAvg's global model is evaluated)
  post           stage 2: post-training of every client's global slice (FedAvg + post-train)
  distill        stage 2: distillation into TAP's personal models
  distill_no_kd  stage 2: the same with lambda = 0 (TAP w/o KD)

A checkpoint is written every ``checkpoint_every`` rounds and at every stage boundary
(see :class:`Experiment`). Every key derives from ``(root, stage, round, client,
purpose)``, so a run resumed at a boundary computes exactly what the uninterrupted
run computes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import tapjax
import tapjax.eval as tapjax_eval
from experiments import report, text_metrics
from experiments.validate import UserError
from tapjax.data import load_tokenizer, make_embedded_federation
from tapjax.data.stream import HostFeed, chunk_ids
from tapjax.data.tasks import TaskKind
from tapjax.model import tap as tap_model
from tapjax.model.sizes import SIZES


def load_backbone(name: str, key):
  """``(BertConfig, bert params)``: "minilm" (the real weights), a local HF folder, or
  another name of ``tapjax.model.sizes.SIZES`` (random weights of that shape)."""
  if name in SIZES and name != "minilm":
    return SIZES[name][0], tap_model.random_bert_params(key, SIZES[name][0])
  from tapjax.model import hf

  return hf.load_bert(hf.minilm_path() if name == "minilm" else name)


def host_arrays(split: dict, answer_vocab: np.ndarray, text_len: int) -> dict:
  """Numpy arrays of one split, with ``target`` re-indexed into the answer vocabulary
  and text cut to ``text_len`` positions."""
  lookup = np.zeros(int(answer_vocab.max()) + 1, np.int32)
  lookup[answer_vocab] = np.arange(len(answer_vocab), dtype=np.int32)
  cut = lambda k, v: v[..., :text_len] if k in ("text", "text_mask") else v
  out = {k: cut(k, v) for k, v in split.items() if k != "target"}
  out["target"] = lookup[split["target"]]
  return out


def fed_arrays(split: dict, answer_vocab: np.ndarray, text_len: int) -> dict:
  """:func:`host_arrays` on the device."""
  return {k: jnp.asarray(v) for k, v in host_arrays(split, answer_vocab, text_len).items()}


PAPER_BACKBONES = {"paper_flava": "flava", "paper_vilt": "vilt"}  # federation -> layout


def federation(cfg, tokenizer):
  """The config's federation: the embedded one, or a paper layout on prepared TFDS data."""
  if cfg.federation == "embedded":
    return make_embedded_federation(
      seed=cfg.seed,
      num_groups=cfg.num_groups,
      examples_per_task=cfg.examples_per_task,
      test_examples_per_task=cfg.test_examples_per_task,
      image_size=cfg.image_size,
      text_len=cfg.text_len,
      target_len=cfg.target_len,
      tokenizer=tokenizer,
    )
  from tapjax.data import make_paper_federation

  return make_paper_federation(
    PAPER_BACKBONES[cfg.federation],
    seed=cfg.seed,
    data_dir=cfg.data_dir or None,
    tokenizer=tokenizer,
    text_len=cfg.text_len,
    target_len=cfg.target_len,
    image_size=cfg.image_size,
    max_train_per_client=cfg.max_train_per_client or None,
  )


def require_data(cfg):
  """Before anything heavy: a paper federation's datasets are prepared (else a UserError
  naming the first missing one and the command that prepares it)."""
  if cfg.federation == "embedded":
    return
  from tapjax.data import paper, sources

  try:
    sources.require_prepared(paper.paper_datasets(PAPER_BACKBONES[cfg.federation]), cfg.data_dir or None)
  except sources.DatasetNotPreparedError as e:
    raise UserError(str(e)) from None


def model_config(cfg, tasks, domains, backbone, text_len: int, answer_vocab: int) -> tap_model.TapModelConfig:
  """The TAP model's config from the experiment's (``backbone``: a ``BertConfig``)."""
  return tap_model.TapModelConfig(
    tasks=tasks,
    domains=domains,
    backbone=backbone,
    num_layers=cfg.num_layers,
    image_size=cfg.image_size,
    patch_size=cfg.patch_size,
    text_len=text_len,
    target_len=cfg.target_len,
    answer_vocab=answer_vocab,
    lora_rank=cfg.lora_rank,
    lora_alpha=cfg.lora_alpha,
    expert_rank=cfg.expert_rank,
    expert_alpha=cfg.expert_alpha,
    lora_dropout=cfg.lora_dropout,
    head_dropout=cfg.head_dropout,
    head_style=cfg.head_style,
    compat=cfg.compat,
    dropout_rng=cfg.get("dropout_rng", "hash"),
  )


def compiler_options(cfg) -> dict:
  """XLA options of the run's compiled programs (``jax.jit(..., compiler_options=...)``).

  ``xla_cpu_opt_level`` sets XLA's backend (LLVM) optimization level on the CPU backend
  only; -1 leaves XLA's default. Level 1 compiled the training programs about 25-30%
  faster than the default on the 2-core CPU with the same step time (matmuls and
  convolutions are library calls whatever the level; README, benchmarks).

  An ``xla_backend_optimization_level`` set in ``XLA_FLAGS`` wins (the config then adds
  nothing): the test suite compiles at level 0 that way.
  """
  level = cfg.get("xla_cpu_opt_level", -1)
  explicit = "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "")
  if level < 0 or explicit or jax.default_backend() != "cpu":
    return {}
  return {"xla_backend_optimization_level": int(level)}


def build(cfg, fed=None):
  """Federation (``fed``, else the config's), model, params and the core's Setup from a config.

  ``jit`` in the result is ``jax.jit`` with the config's :func:`compiler_options`."""
  root = jax.random.key(cfg.seed)
  bertscore = _bertscorer(cfg.get("bertscore", ""))  # before the data: a missing model fails at once
  tokenizer = load_tokenizer()
  fed = federation(cfg, tokenizer) if fed is None else fed
  # Positions that are padding in every example are never computed (paper mode); the
  # reference's mode keeps its fixed padded length, whose pads it pools over.
  text_len = cfg.text_len
  if cfg.get("trim_text", True) and cfg.compat != "reference":
    text_len = int(max(fed.train["text_mask"].sum(-1).max(), fed.test["text_mask"].sum(-1).max(), 1))
  init_key = tapjax.rng.derive(root, tapjax.rng.Stage.INIT, 0, tapjax.rng.SERVER, 0)
  backbone, bert = load_backbone(cfg.backbone, init_key)
  mcfg = model_config(cfg, fed.tasks, fed.domains, backbone, text_len, len(fed.answer_vocab))
  model = tap_model.TapModel(mcfg)
  frozen = tap_model.frozen_from_bert(bert, mcfg)
  params = tap_model.init_trainable(jax.random.fold_in(init_key, 1), mcfg)
  cm = tap_model.component_model(params, mcfg)
  reference = cfg.compat == "reference"
  client_map = tapjax.ClientMap(cfg.client_map, batch_size=cfg.map_batch or None)
  setup = tapjax.Setup(
    objective=model.objective(),
    leaf_ids=cm.leaf_ids,
    usage=cm.usage,
    local=tapjax.LocalConfig(cfg.local_steps, cfg.batch_size, cfg.accum),
    post=tapjax.LocalConfig(cfg.post_steps, cfg.batch_size, cfg.accum),
    cohort_size=cfg.cohort_size,
    client_map=client_map,
    replace_usage=cm.replace_usage if reference else None,
    loss_record="share_weighted" if reference else "mean",
    broadcast=~cm.fusion if reference else None,
  )
  small = np.array([t.kind in (TaskKind.IMAGE_GENERATION, TaskKind.TEXT_CLASSIFICATION) for t in fed.tasks])
  kd = np.array(
    [cfg.kd_weight_text_cls if t.kind == TaskKind.TEXT_CLASSIFICATION else cfg.kd_weight for t in fed.tasks]
  )
  hp = tapjax.HParams.create(
    len(fed.tasks),
    margin=np.where(small, cfg.small_margin, cfg.margin),
    kd_weight=kd,
    temperature=cfg.temperature,
    lr_min=cfg.lr_min,
    lr_peak=cfg.lr_peak,
    warmup_rounds=cfg.warmup_rounds,
    post_lr=cfg.post_lr,
  )
  # What each client holds, from the modalities and domains its examples really have
  # (finer than its tasks' rows when one head serves datasets of other modalities or
  # domains, as the paper's text-generation head does).
  held = tap_model.client_holders(mcfg, cm.names, tap_model.examples_held(mcfg, fed.train, fed.n_train))
  if cfg.get("stream", False):
    # The host-fed pipeline: the examples stay on the host; each round (and each
    # stage-2 and evaluation chunk of clients) sends the device only what it draws.
    feed = HostFeed(
      host_arrays(fed.train, fed.answer_vocab, text_len), fed.n_train, fed.client_tasks, held, fed.weights
    )
    train, test = None, (host_arrays(fed.test, fed.answer_vocab, text_len), np.asarray(fed.n_test))
  else:
    feed = None
    train = tapjax.FedData(
      fed_arrays(fed.train, fed.answer_vocab, text_len),
      jnp.asarray(fed.n_train),
      jnp.asarray(fed.client_tasks),
      jnp.asarray(fed.weights),  # the real train rows (== n_train unless max_train_per_client caps them)
      jnp.asarray(held),
    )
    test = (fed_arrays(fed.test, fed.answer_vocab, text_len), jnp.asarray(fed.n_test))
  return dict(
    root=root,
    fed=fed,
    model=model,
    mcfg=mcfg,
    frozen=frozen,
    params=params,
    cm=cm,
    setup=setup,
    hp=hp,
    train=train,
    feed=feed,
    test=test,
    tokenizer=tokenizer,
    bertscore=bertscore,
    jit=functools.partial(jax.jit, compiler_options=compiler_options(cfg)),
  )


def _kind_counts(replaced, fed) -> dict:
  """Replacements this round per task kind (``replaced [cohort, tasks]``)."""
  out = {k.name.lower(): 0 for k in TaskKind}
  for t, task in enumerate(fed.tasks):
    out[task.kind.name.lower()] += int(np.asarray(replaced)[:, t].sum())
  return out


def rejections(info) -> list[dict]:
  """``[{"client": id, "reason": [...]}]`` for every client the round left out."""
  reasons = {tapjax.Fault.LOSS: "non-finite loss", tapjax.Fault.PARAMS: "non-finite parameters"}
  out = []
  for cid, bits in zip(
    np.asarray(info.clients)[np.asarray(info.rejected)], np.asarray(info.reason)[np.asarray(info.rejected)]
  ):
    out.append({"client": int(cid), "reason": [why for flag, why in reasons.items() if int(bits) & flag]})
  return out


def replaced_pairs(info, fed) -> list[list[str]]:
  """``[client name, task name]`` of every replacement this round: any grouping (e.g. the
  reference's per-dataset types) can be tallied from these afterwards."""
  rows, tasks = np.nonzero(np.asarray(info.replaced))
  clients = np.asarray(info.clients)[rows]
  return [[fed.client_names[int(c)], fed.tasks[int(t)].name] for c, t in zip(clients, tasks)]


def round_record(info, round_: int, fed, cumulative: dict) -> dict:
  """One line of ``metrics.jsonl`` (``cumulative`` replacement counts are updated in place)."""
  counts = _kind_counts(info.replaced, fed)
  for k, v in counts.items():
    cumulative[k] += v
  accepted = np.asarray(info.active) & ~np.asarray(info.rejected)[:, None]
  mean = lambda x: float(np.asarray(x)[accepted].mean()) if accepted.any() else float("nan")
  return {
    "round": round_,
    "lr": float(info.lr),
    "clients": np.asarray(info.clients).tolist(),
    "global_loss": mean(info.global_loss),
    "personal_loss": mean(info.personal_loss),
    "replaced": counts,
    "cumulative_replaced": dict(cumulative),
    "replaced_by_task": {
      task.name: int(np.asarray(info.replaced)[:, t].sum()) for t, task in enumerate(fed.tasks)
    },
    "replaced_pairs": replaced_pairs(info, fed),
    "rejected": rejections(info),
  }


def evaluate(w, stacked, cfg):
  """Per-client, per-task metrics ``{name: [clients, tasks]}`` of ``stacked [clients, ...]``
  params on the test split (one compiled program, reused for every method), plus METEOR
  and (``cfg.bertscore`` set) BERTScore-F1 of the decoded text answers, on the host."""
  if "eval_fn" not in w:
    objective, frozen, client_map = w["setup"].objective, w["frozen"], w["setup"].client_map
    num_tasks, predict = len(w["fed"].tasks), w["model"].predict
    w["eval_fn"] = w["jit"](
      lambda p, test, n: tapjax.metrics.evaluate(
        objective, p, frozen, test, n, num_tasks, cfg.eval_batch, client_map, predict=predict
      )
    )
  test, n_test = w["test"]
  if w["feed"] is None:
    means, _, preds = w["eval_fn"](stacked, test, n_test)
  else:  # chunks of clients, their test rows sent from the host
    parts = [
      w["eval_fn"](_gather(stacked, ids), {k: v[ids] for k, v in test.items()}, n_test[ids])
      for ids in chunk_ids(len(n_test), _chunk(cfg, len(n_test)))
    ]
    means, _, preds = _concat(parts, len(n_test))
  out = {k: np.asarray(v) for k, v in means.items()}
  fed = w["fed"]
  pairs = text_metrics.text_pairs(fed, np.asarray(preds["answer"]), w["tokenizer"])
  scorers = {"meteor": tapjax_eval.meteor_batch}
  if w["bertscore"] is not None:
    scorers["bertscore_f1"] = w["bertscore"].score
  for name, fn in scorers.items():
    out[name] = np.full((fed.num_clients, len(fed.tasks)), np.nan)
    for (c, t), v in text_metrics.scores(pairs, fn).items():
      out[name][c, t] = v
  return out


HOST_TEXT_METRICS = ("meteor", "bertscore_f1")


def _bertscorer(name: str):
  """The BERTScore model, loaded before any training so a missing checkpoint fails at
  once: ``""`` none, ``"minilm"`` the offline MiniLM weights, else a local checkpoint
  folder or a hub name found in the local hub cache."""
  if not name:
    return None
  from tapjax.model import hf

  try:
    return tapjax_eval.BertScorer(hf.minilm_path() if name == "minilm" else name)
  except FileNotFoundError as e:
    raise UserError(f"--config.bertscore={name!r}: {e}") from None


def summarize(w, evals: dict) -> dict:
  """results.json's ``methods``: per client, per task, the task kind's metrics; per-task means."""
  fed = w["fed"]
  out = {}
  for method, ev in evals.items():
    clients, means = {}, {}
    for t, task in enumerate(fed.tasks):
      names = tap_model.KIND_METRICS[task.kind]
      if task.kind == TaskKind.TEXT_GENERATION:  # the host metrics this run computed
        names += tuple(m for m in HOST_TEXT_METRICS if m in ev)
      holders = np.flatnonzero(fed.client_tasks[:, t])
      for c in holders:
        vals = {}
        for m in names:
          vals[m] = math.exp(float(ev["token_ce"][c, t])) if m == "perplexity" else float(ev[m][c, t])
        clients.setdefault(fed.client_names[c], {})[task.name] = vals
      means[task.name] = {
        m: float(np.mean([clients[fed.client_names[c]][task.name][m] for c in holders])) for m in names
      }
    out[method] = {"clients": clients, "task_means": means}
  return out


_stack = jax.jit(tapjax.federation.stack, static_argnums=1)  # one program, not one per leaf shape
_gather = jax.jit(tapjax.federation.gather)
_concat = jax.jit(
  lambda parts, n: jax.tree_util.tree_map(lambda *x: jnp.concatenate(x)[:n], *parts), static_argnums=1
)


def _chunk(cfg, num_clients: int) -> int:
  """Clients per stage-2 / evaluation call of the host-fed pipeline (0 = all)."""
  return cfg.get("chunk_clients", 0) or num_clients


# ----------------------------------------------------------------------------- resumable run

# Local only runs first: its state is not needed afterwards (it is evaluated at once),
# so every checkpoint of a round holds ONE federation state (benchmarks.run f).
# DisentAFL (config ``disentafl``) runs between them, its own FedAvg-like stage 1.
STAGES = ("local", "disentafl", "tap", "post", "distill", "distill_no_kd", "done")
METHODS = report.METHODS  # results.json order (the optional ones only when run)
FORMAT = 1  # of the checkpoint metadata


class Stopped(Exception):
  """The run stopped on request (SIGTERM) after its progress was saved."""


@dataclasses.dataclass
class Progress:
  """Where a run is (JSON in every checkpoint's metadata)."""

  stage: str = "local"  # the stage in progress (one of STAGES)
  round: int = 0  # rounds completed in "local" / "tap"
  step: int = 0  # the last checkpoint step written (0: none)
  history: list = dataclasses.field(default_factory=list)  # metrics.jsonl records so far
  evals: dict = dataclasses.field(default_factory=dict)  # method -> {metric: [clients][tasks]}
  wall_seconds: float = 0.0  # over every process of the run, up to the last save

  def where(self, rounds: int, disentafl: bool = False) -> str:
    """What is done, in words (``rounds``: rounds per stage-1 stage; ``disentafl``: the
    DisentAFL stage runs)."""
    if self.stage == "local":
      return f"Local only round {self.round} of {rounds} done"
    if self.stage == "disentafl" and self.round:
      return f"DisentAFL round {self.round} of {rounds} done"
    if self.stage == "tap" and self.round:
      return f"TAP stage 1 round {self.round} of {rounds} done"
    return {
      "disentafl": "Local only done",
      "tap": "DisentAFL done" if disentafl else "Local only done",
      "post": "TAP stage 1 done",
      "distill": "stage 2 post-training done",
      "distill_no_kd": "stage 2 distillation done",
      "done": "all done",
    }[self.stage]


class Experiment:
  """One experiment, from its config, optionally resumable through ``store``.

  Checkpointed arrays, by stage: ``local`` (the Local-only :class:`tapjax.State`,
  during its rounds), ``tap`` (TAP's State: server params and optimizer state, every
  client's personal params, student losses, replacement counts; from its first round
  on), ``teachers`` (stage 2's post-trained global slices, ``[clients, ...]``, after
  post-training). The metadata holds the :class:`Progress`: stage, round, metrics
  history, the evaluations of the methods already final. The frozen backbone is
  never written (``build`` recreates it).

  Constructing it builds the world and (``resume``) restores the newest checkpoint (raising
  :class:`experiments.checkpoint.CheckpointError` if it cannot be used) before any
  training; :meth:`run` does the rest.
  """

  def __init__(self, cfg, store=None, resume: bool = True):
    self.cfg, self.store = cfg, store
    self.progress, self.arrays, self.resumed_from = Progress(), {}, None
    step = store.latest() if store is not None and resume else None
    if step is not None:  # the metadata first: a damaged one fails before the build
      meta = store.meta(step)
      if meta.get("format") != FORMAT or meta.get("progress", {}).get("stage") not in STAGES:
        from experiments.checkpoint import CheckpointError

        raise CheckpointError(
          f"checkpoint {store.directory / str(step)} was not written by this version of the experiment "
          "(unknown metadata format); pass --overwrite to start the run again"
        )
    self.w = build(cfg)
    setup, model = self.w["setup"], self.w["model"]
    self.algs = {"tap": tapjax.tap(setup), "local": tapjax.local_only(setup)}
    self.frozen = {"tap": self.w["frozen"], "local": self.w["frozen"]}
    if cfg.get("disentafl", False):
      # FedAvg with the orthogonality loss (weight 0.5, an array: no recompiles).
      self.disentafl_setup = tapjax.disentafl_setup(setup, model.apply_with_latents, model.num_latent_groups)
      self.algs["disentafl"] = tapjax.fedavg(self.disentafl_setup)
      self.frozen["disentafl"] = tapjax.OrthoFrozen.create(self.w["frozen"], cfg.disentafl_weight)
    if step is not None:
      progress = Progress(**meta["progress"])
      self.arrays = store.restore(step, self._template(progress))
      self.progress, self.resumed_from = progress, step

  # --------------------------------------------------------------------------- checkpoints

  def _template(self, p: Progress) -> dict:
    """Shapes and dtypes of the arrays a checkpoint at ``p`` holds."""
    n, params = self.w["fed"].num_clients, self.w["params"]
    state = jax.eval_shape(lambda x: self.algs["tap"].init(x, n), params)
    out = {}
    if p.stage == "local" and p.round > 0:
      out["local"] = state
    if p.stage == "disentafl" and p.round > 0:
      out["disentafl"] = jax.eval_shape(lambda x: self.algs["disentafl"].init(x, n), params)
    if (p.stage == "tap" and p.round > 0) or p.stage in ("post", "distill", "distill_no_kd", "done"):
      out["tap"] = state
    if p.stage in ("distill", "distill_no_kd"):
      out["teachers"] = jax.eval_shape(lambda x: tapjax.federation.stack(x, n), params)
    return out

  def _checkpoint(self, stop, boundary: bool):
    """After a round or a stage: save (every ``checkpoint_every`` rounds, at a boundary,
    or when a stop was requested); then stop if requested."""
    p, stopping = self.progress, stop()
    due = boundary or stopping or p.round % self.cfg.checkpoint_every == 0
    if self.store is not None and due:
      p.step += 1
      meta = dataclasses.asdict(p)
      meta["wall_seconds"] = p.wall_seconds + time.time() - self._t0
      self.store.save(p.step, self.arrays, {"format": FORMAT, "progress": meta})
      print(f"checkpoint step {p.step}: {self.where()}", flush=True)
    if stopping:
      if self.store is not None:
        self.store.wait()
      raise Stopped(self.where())

  def where(self) -> str:
    """What is done, in words."""
    return self.progress.where(self.cfg.rounds, "disentafl" in self.algs)

  def _evaluate(self, method: str, stacked):
    self.progress.evals[method] = {k: v.tolist() for k, v in evaluate(self.w, stacked, self.cfg).items()}

  # --------------------------------------------------------------------------- stages

  def _per_client(self, post_cfg, fn, *stacked):
    """``fn(data, *rows) -> [clients, ...]`` for every client: one call on the dense
    data, or (host-fed) one call per chunk of clients on their batches drawn on the
    host with ``post_cfg``, ``stacked [clients, ...]`` trees cut to the chunk's rows."""
    w = self.w
    if w["feed"] is None:
      return fn(w["train"], *stacked)
    n = w["feed"].num_clients
    chunks = w["feed"].chunks(_chunk(self.cfg, n), w["root"], post_cfg)
    parts = [fn(data, *(_gather(s, data.ids) for s in stacked)) for _, data in chunks]
    return _concat(parts, n)

  def _rounds(self, name: str, log, stop):
    """The remaining rounds of stage ``name`` ("local", "disentafl" or "tap")."""
    w, p, rounds = self.w, self.progress, self.cfg.rounds
    if name not in self.arrays:
      init = w["jit"](self.algs[name].init, static_argnums=1)  # one program, not one per leaf
      self.arrays[name] = init(w["params"], w["fed"].num_clients)
    round_fn = w["jit"](self.algs[name].round, donate_argnums=0)
    cumulative = (
      dict(p.history[-1]["cumulative_replaced"]) if p.history else {k.name.lower(): 0 for k in TaskKind}
    )
    desc = {"tap": "TAP stage 1", "local": "Local only", "disentafl": "DisentAFL"}[name]
    todo = range(p.round, rounds)
    if w["feed"] is None:
      feed = (w["train"] for _ in todo)
    else:  # each round's batches drawn on the host, the next one while this one runs
      feed = w["feed"].rounds(
        w["root"], todo, w["setup"].cohort_size, w["setup"].local, self.algs[name].purposes
      )
    for r, data in tqdm(zip(todo, feed), desc=desc, unit="round", initial=p.round, total=rounds):
      self.arrays[name], info = round_fn(self.arrays[name], self.frozen[name], data, w["hp"], w["root"])
      jax.block_until_ready(info)  # honest progress bars
      p.round = r + 1
      rejected = rejections(info)
      if rejected:
        print(f"{desc} round {r + 1}: left out {rejected}", flush=True)
      if name == "tap":
        p.history.append(round_record(info, r + 1, w["fed"], cumulative))
        log.write(json.dumps(p.history[-1]) + "\n")
        log.flush()
      if r + 1 < rounds:
        self._checkpoint(stop, boundary=False)

  def run(self, log_path: pathlib.Path | None = None, stop=lambda: False):
    """Run (or finish) the experiment; returns ``(results dict, per-round history)``.
    ``stop()`` is polled after every round and stage; when it returns True the progress
    is saved and :class:`Stopped` raised."""
    self._t0 = time.time()
    w, p, setup, hp = self.w, self.progress, self.w["setup"], self.w["hp"]
    n = w["fed"].num_clients
    with open(log_path or os.devnull, "w") as log:
      for rec in p.history:
        log.write(json.dumps(rec) + "\n")
      log.flush()
      if p.stage == "local":
        self._rounds("local", log, stop)
        self._evaluate("local", self.arrays.pop("local").personal)
        p.stage, p.round = "disentafl", 0
        if "disentafl" in self.algs:
          self._checkpoint(stop, boundary=True)
      if p.stage == "disentafl":
        if "disentafl" in self.algs:
          self._disentafl(log, stop)
        p.stage, p.round = "tap", 0
        self._checkpoint(stop, boundary=True)
      if p.stage == "tap":
        self._rounds("tap", log, stop)
        self._evaluate("fedavg", _stack(tapjax.final_global(setup, self.arrays["tap"]), n))
        p.stage = "post"
        self._checkpoint(stop, boundary=True)
    # Stage 2: post-training of every client's global slice ("FedAvg + post-train",
    # and TAP's KD teacher: TAP's global model IS FedAvg's, same keys), then
    # distillation into the personal models; TAP without KD is lambda = 0 through
    # the same compiled distillation program.
    tap_state = self.arrays["tap"]
    dist = w["jit"](tapjax.distill_personal(setup))
    # The dropout purpose is an array, so that every stage-2 call is the same program.
    purpose = lambda x: jnp.asarray(int(x), jnp.int32)
    if p.stage == "post":
      final_global = tapjax.final_global(setup, tap_state)
      if setup.client_map.strategy == "map":
        # Post-training is the distillation program with lambda = 0 (its teacher's forward
        # pass skipped by a real lax.cond) and the teacher's dropout keys: one compiled
        # program for all of stage 2 instead of two (a test checks it equals post_train).
        no_kd = hp._replace(kd_weight=jnp.zeros_like(hp.kd_weight))
        teachers = self._per_client(
          setup.post,
          lambda d, g: dist(
            g, g, w["frozen"], d, no_kd, w["root"], purpose(tapjax.rng.Purpose.TEACHER_DROPOUT)
          ),
          _stack(final_global, n),
        )
      else:  # under vmap a cond runs both branches: post-training keeps its own program
        post = w["jit"](tapjax.post_train(setup))
        teachers = self._per_client(setup.post, lambda d: post(final_global, w["frozen"], d, hp, w["root"]))
      self.arrays["teachers"] = jax.block_until_ready(teachers)
      self._evaluate("fedavg_post", teachers)
      if self.cfg.get("fedavg_post2x", False):  # the ablation: twice the post-training budget
        post = self.w["setup"].post
        twice = dataclasses.replace(setup, post=dataclasses.replace(post, steps=2 * post.steps))
        post2x = w["jit"](tapjax.post_train(twice))
        longer = self._per_client(twice.post, lambda d: post2x(final_global, w["frozen"], d, hp, w["root"]))
        self._evaluate("fedavg_post2x", longer)
      p.stage = "distill"
      self._checkpoint(stop, boundary=True)
    if p.stage == "distill":
      personal = self._per_client(
        setup.post,
        lambda d, s, t: dist(
          s, t, w["frozen"], d, hp, w["root"], purpose(tapjax.rng.Purpose.STUDENT_DROPOUT)
        ),
        tap_state.personal,
        self.arrays["teachers"],
      )
      self._evaluate("tap", personal)
      p.stage = "distill_no_kd"
      self._checkpoint(stop, boundary=True)
    if p.stage == "distill_no_kd":
      no_kd = hp._replace(kd_weight=jnp.zeros_like(hp.kd_weight))
      personal = self._per_client(
        setup.post,
        lambda d, s, t: dist(
          s, t, w["frozen"], d, no_kd, w["root"], purpose(tapjax.rng.Purpose.STUDENT_DROPOUT)
        ),
        tap_state.personal,
        self.arrays["teachers"],
      )
      self._evaluate("tap_no_kd", personal)
      p.stage = "done"
    if self.store is not None:
      self.store.wait()
    p.wall_seconds += time.time() - self._t0
    return self._results(), p.history

  def _disentafl(self, log, stop):
    """DisentAFL's rounds, then its final global model evaluated ("disentafl") and
    post-trained per client with the same loss ("disentafl_post", as the reference)."""
    w, setup, n = self.w, self.w["setup"], self.w["fed"].num_clients
    self._rounds("disentafl", log, stop)
    final = tapjax.final_global(setup, self.arrays.pop("disentafl"))
    self._evaluate("disentafl", _stack(final, n))
    post = self.w["jit"](tapjax.post_train(self.disentafl_setup))
    frozen = self.frozen["disentafl"]
    self._evaluate(
      "disentafl_post", self._per_client(setup.post, lambda d: post(final, frozen, d, w["hp"], w["root"]))
    )

  def _results(self) -> dict:
    fed, p = self.w["fed"], self.progress
    evals = {m: {k: np.asarray(v) for k, v in p.evals[m].items()} for m in METHODS if m in p.evals}
    return {
      "methods": summarize(self.w, evals),
      "tasks": [{"name": t.name, "kind": t.kind.name.lower(), "group": t.group} for t in fed.tasks],
      "clients": list(fed.client_names),
      "replacements": {
        "per_client_task": np.asarray(self.arrays["tap"].replaced_tasks).tolist(),
        "cumulative_by_kind": [h["cumulative_replaced"] for h in p.history],
      },
      "components": list(self.w["cm"].names),
      # how the host text metrics were computed (scores under other settings do not compare)
      "text_metrics": {
        "meteor": tapjax_eval.matching_mode(),
        "bertscore": None if self.w["bertscore"] is None else self.w["bertscore"].description,
      },
      "wall_seconds": p.wall_seconds,
    }


def run_experiment(cfg, log_path: pathlib.Path | None = None):
  """Everything in one process, no checkpoints; returns ``(results dict, per-round history)``."""
  return Experiment(cfg).run(log_path)
