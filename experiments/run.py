"""The experiment pipeline behind ``experiments.tap`` (importable, no flags)."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import tapjax
from tapjax.data import make_embedded_federation
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


def fed_arrays(split: dict, answer_vocab: np.ndarray, text_len: int) -> dict:
  """Device arrays of one split, with ``target`` re-indexed into the answer vocabulary
  and text cut to ``text_len`` positions."""
  lookup = np.zeros(int(answer_vocab.max()) + 1, np.int32)
  lookup[answer_vocab] = np.arange(len(answer_vocab), dtype=np.int32)
  cut = lambda k, v: v[..., :text_len] if k in ("text", "text_mask") else v
  out = {k: jnp.asarray(cut(k, v)) for k, v in split.items() if k != "target"}
  out["target"] = jnp.asarray(lookup[split["target"]])
  return out


def build(cfg):
  """Federation, model, params and the core's Setup from a config."""
  root = jax.random.key(cfg.seed)
  fed = make_embedded_federation(
    seed=cfg.seed,
    num_groups=cfg.num_groups,
    examples_per_task=cfg.examples_per_task,
    test_examples_per_task=cfg.test_examples_per_task,
    image_size=cfg.image_size,
    text_len=cfg.text_len,
    target_len=cfg.target_len,
  )
  # Positions that are padding in every example are never computed (paper mode); the
  # reference's mode keeps its fixed padded length, whose pads it pools over.
  text_len = cfg.text_len
  if cfg.get("trim_text", True) and cfg.compat != "reference":
    text_len = int(max(fed.train["text_mask"].sum(-1).max(), fed.test["text_mask"].sum(-1).max(), 1))
  init_key = tapjax.rng.derive(root, tapjax.rng.Stage.INIT, 0, tapjax.rng.SERVER, 0)
  backbone, bert = load_backbone(cfg.backbone, init_key)
  mcfg = tap_model.TapModelConfig(
    tasks=fed.tasks,
    domains=fed.domains,
    backbone=backbone,
    num_layers=cfg.num_layers,
    image_size=cfg.image_size,
    patch_size=cfg.patch_size,
    text_len=text_len,
    target_len=cfg.target_len,
    answer_vocab=len(fed.answer_vocab),
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
  train = tapjax.FedData(
    fed_arrays(fed.train, fed.answer_vocab, text_len), jnp.asarray(fed.n_train), jnp.asarray(fed.client_tasks)
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
    test=test,
  )


def _kind_counts(replaced, fed) -> dict:
  """Replacements this round per task kind (``replaced [cohort, tasks]``)."""
  out = {k.name.lower(): 0 for k in TaskKind}
  for t, task in enumerate(fed.tasks):
    out[task.kind.name.lower()] += int(np.asarray(replaced)[:, t].sum())
  return out


def stage1(alg, w, rounds, desc, log=None):
  state = alg.init(w["params"], w["fed"].num_clients)
  round_fn = jax.jit(alg.round, donate_argnums=0)
  cumulative = {k.name.lower(): 0 for k in TaskKind}
  history = []
  for r in tqdm(range(rounds), desc=desc, unit="round"):
    state, info = round_fn(state, w["frozen"], w["train"], w["hp"], w["root"])
    jax.block_until_ready(info)  # honest progress bars
    if log is not None:
      counts = _kind_counts(info.replaced, w["fed"])
      for k, v in counts.items():
        cumulative[k] += v
      active = np.asarray(info.active)
      rec = {
        "round": r + 1,
        "lr": float(info.lr),
        "clients": np.asarray(info.clients).tolist(),
        "global_loss": float(np.asarray(info.global_loss)[active].mean()),
        "personal_loss": float(np.asarray(info.personal_loss)[active].mean()),
        "replaced": counts,
        "cumulative_replaced": dict(cumulative),
      }
      history.append(rec)
      log.write(json.dumps(rec) + "\n")
      log.flush()
  return state, history


def evaluate(w, stacked, cfg):
  """Per-client, per-task metrics of ``stacked [clients, ...]`` params on the test split
  (one compiled program, reused for every method)."""
  if "eval_fn" not in w:
    objective, frozen, client_map = w["setup"].objective, w["frozen"], w["setup"].client_map
    num_tasks = len(w["fed"].tasks)
    w["eval_fn"] = jax.jit(
      lambda p, test, n: tapjax.metrics.evaluate(
        objective, p, frozen, test, n, num_tasks, cfg.eval_batch, client_map
      )[0]
    )
  test, n_test = w["test"]
  return {k: np.asarray(v) for k, v in w["eval_fn"](stacked, test, n_test).items()}


def summarize(w, evals: dict) -> dict:
  """results.json's ``methods``: per client, per task, the task kind's metrics; per-task means."""
  fed = w["fed"]
  out = {}
  for method, ev in evals.items():
    clients, means = {}, {}
    for t, task in enumerate(fed.tasks):
      names = tap_model.KIND_METRICS[task.kind]
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


def run_experiment(cfg, log_path: pathlib.Path | None = None):
  """Everything; returns ``(results dict, per-round history)``."""
  w = build(cfg)
  setup, hp = w["setup"], w["hp"]
  with open(log_path, "w") if log_path else open("/dev/null", "w") as log:
    tap_state, history = stage1(tapjax.tap(setup), w, cfg.rounds, "TAP stage 1", log)
  local_state, _ = stage1(tapjax.local_only(setup), w, cfg.rounds, "Local only")
  final_global = tapjax.final_global(setup, tap_state)
  n = w["fed"].num_clients
  # Stage 2: post-training of every client's global slice ("FedAvg + post-train",
  # and TAP's KD teacher: TAP's global model IS FedAvg's, same keys), then
  # distillation into the personal models; TAP without KD is lambda = 0 through
  # the same compiled distillation program.
  dist = jax.jit(tapjax.distill_personal(setup))
  no_kd = hp._replace(kd_weight=jnp.zeros_like(hp.kd_weight))
  global_slices = tapjax.federation.stack(final_global, n)
  bar = tqdm(total=3, desc="stage 2", unit="phase")
  teachers = jax.block_until_ready(
    jax.jit(tapjax.post_train(setup))(final_global, w["frozen"], w["train"], hp, w["root"])
  )
  bar.update()
  tap_personal = jax.block_until_ready(
    dist(tap_state.personal, teachers, w["frozen"], w["train"], hp, w["root"])
  )
  bar.update()
  tap_no_kd = jax.block_until_ready(
    dist(tap_state.personal, teachers, w["frozen"], w["train"], no_kd, w["root"])
  )
  bar.update()
  bar.close()
  models = {
    "local": local_state.personal,
    "fedavg": global_slices,
    "fedavg_post": teachers,
    "tap_no_kd": tap_no_kd,
    "tap": tap_personal,
  }
  evals = {m: evaluate(w, p, cfg) for m, p in tqdm(models.items(), desc="evaluate", unit="method")}
  fed = w["fed"]
  results = {
    "methods": summarize(w, evals),
    "tasks": [{"name": t.name, "kind": t.kind.name.lower(), "group": t.group} for t in fed.tasks],
    "clients": list(fed.client_names),
    "replacements": {
      "per_client_task": np.asarray(tap_state.replaced_tasks).tolist(),
      "cumulative_by_kind": [h["cumulative_replaced"] for h in history],
    },
    "components": list(w["cm"].names),
  }
  return results, history
