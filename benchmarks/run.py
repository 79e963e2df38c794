"""tapjax's benchmark tables, each measured side by side in one process.

  python -m benchmarks.run [--sections=a,b,c,d,e,f,g] [--compats=reference,paper] [--repeats=2]
                           [--strategies=map,vmap] [--out=benchmarks/results/run.json]

Sections (every time is a median of ``--repeats`` runs after a warm-up run, section c's of
at least 5, section b's of at least 7 for cohorts of 1 and 2, its contenders alternating;
section a's rounds and stage 2 are compiled ahead of time and timed without one):

a. Reference-shaped TAP round: a BERT-family backbone of width 64 (2 heads, FFN 256,
   2 layers), 64-px images with patch 4 (257 tokens), text padded to 256, 10 clients
   in the paper's 10 patterns, cohort 2, 5 steps x accumulation 4 of batch 8, LoRA
   dropout 0.3: the round and stage 2 per client next to the PyTorch reference's
   figures on this machine type (25.6 s per round, 28-29 s of stage 2 per client),
   in ``compat="reference"`` (every pad computed, as the reference does) and
   ``"paper"`` (text cut to the federation's real length). Also the achieved
   matmul FLOP/s of a training micro-batch against a plain fp32 matmul's.
b. Cohort scaling: one TAP round for cohorts of 1, 2, 8 and 32 clients per mapping
   strategy (``--strategies``: ``map``, the CPU default, unless asked; ``vmap`` adds four
   programs, about 3 minutes here), against a Python loop over a jitted one-client step.
c. Aggregation: the holder-masked weighted mean over a cohort of MiniLM-sized
   trainable trees, in GB/s against a plain sum over the same bytes.
d. Compiled programs of a 20-round experiment: how many, and seconds each.
e. Memory: bytes per additional client against the frozen backbone's bytes, and the
   largest federation whose client states fit in 16 GB and in 80 GB.
f. Checkpoint cost at the default config: rounds of TAP (and of Local only, whose
   checkpoints hold both states) with an asynchronous Orbax save after every round,
   against the same number of rounds without, as a share of a round's time.
g. The default config's training micro-batch (MiniLM width): achieved matmul FLOP/s
   against a plain fp32 matmul's (section a's width 64 is memory-bound).

Writes every row to ``--out`` as JSON and prints one table per section.
"""

from __future__ import annotations

import functools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

flags.DEFINE_list(
  "sections",
  ["a", "b", "c", "d", "e"],
  "which tables to produce (f, the checkpoint cost, and g, the default config's micro-batch, on request)",
)
flags.DEFINE_list("compats", ["reference"], "section a: compat modes to measure (reference, paper)")
flags.DEFINE_list(
  "strategies",
  ["map"],
  "section b: mapping strategies timed against the Python loop (map, the CPU default; vmap on request)",
)
flags.DEFINE_integer("repeats", 2, "timed repeats per figure (after one warm-up)")
flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results" / "run.json"), "JSON output")
FLAGS = flags.FLAGS

REFERENCE_ROUND_S = 25.6  # PyTorch reference, tiny FLAVA, cohort 2, 5 x 4 steps of batch 8
REFERENCE_STAGE2_PER_CLIENT_S = 28.5


def timed(fn, repeats, stat=statistics.median):
  """``stat`` (the median) of the wall seconds of ``fn()`` over ``repeats`` calls after one
  warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return stat(times)


def alternating(fns: dict, repeats: int) -> dict:
  """``{name: median seconds}`` of each ``fns[name]()``, one warm-up call each, then
  ``repeats`` rounds that call every function once in turn."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(v) for name, v in times.items()}


def table(title, header, rows):
  print(f"\n{title}")
  widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
  line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"
  print(line(header))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in rows:
    print(line(r))


def config(**overrides):
  from experiments.configs import default

  c = default.get_config()
  c.compilation_cache = ""
  c.plots = False
  for k, v in overrides.items():
    c[k] = v
  return c


# ----------------------------------------------------------------------------- flops


def dot_flops(jaxpr) -> float:
  """Matmul and convolution FLOPs of a (closed) jaxpr, scans counted ``length`` times."""
  total = 0.0
  for eqn in jaxpr.eqns:
    p = eqn.primitive.name
    if p == "dot_general":
      (lc, _), (lb, _) = eqn.params["dimension_numbers"]
      a, b = (v.aval.shape for v in eqn.invars)
      out = eqn.outvars[0].aval.shape
      total += 2.0 * np.prod(out) * np.prod([a[i] for i in lc])
    elif p == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2.0 * np.prod(out) * np.prod(rhs) / max(out[-1], 1)
    for sub in _subjaxprs(eqn):
      mult = eqn.params.get("length", 1) if p == "scan" else 1
      total += mult * dot_flops(sub)
  return total


def _subjaxprs(eqn):
  for v in eqn.params.values():
    for x in v if isinstance(v, (tuple, list)) else (v,):
      if hasattr(x, "jaxpr") and hasattr(x, "consts"):
        yield x.jaxpr
      elif hasattr(x, "eqns"):
        yield x


def matmul_peak(repeats) -> float:
  """GFLOP/s of a plain 2048^3 fp32 matmul on this machine, now: the best of 5 runs after a
  warm-up (a peak; the median of 2 once read 83 GFLOP/s where other runs read 124-173)."""
  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * 2048**3 / timed(lambda: f(a), max(5, repeats), stat=min) / 1e9


def microbatch(w, batch_size: int, repeats: int) -> tuple[float, float]:
  """``(matmul FLOPs, median seconds)`` of one training micro-batch (value and gradient)
  of a VQA client, whose examples run both token streams, so the counted FLOPs (both
  branches of the stream's ``cond``) are the executed ones."""
  import tapjax

  frozen = w["frozen"]
  c = int(np.flatnonzero(np.asarray(w["fed"].client_pattern) == 4)[0])
  batch = {k: v[c, :batch_size] for k, v in w["train"].examples.items()}
  train_loss = tapjax.supervised_loss(w["setup"].objective, frozen)  # the rounds' loss (shares their trace)
  loss = lambda p, k: train_loss(p, batch, k).mean()
  step = w["jit"](jax.value_and_grad(loss))
  flops = dot_flops(jax.make_jaxpr(jax.value_and_grad(loss))(w["params"], w["root"]).jaxpr)
  return flops, timed(lambda: step(w["params"], w["root"]), repeats)


# ----------------------------------------------------------------------------- a


def ref_config(compat):
  return config(
    backbone="ref_flava_tiny",
    num_groups=1,
    examples_per_task=256,
    test_examples_per_task=8,
    image_size=64,
    patch_size=4,
    text_len=256,
    target_len=8,
    cohort_size=2,
    local_steps=5,
    accum=4,
    batch_size=8,
    post_steps=13,
    lora_dropout=0.3,
    head_dropout=0.3,
    compat=compat,
    trim_text=compat == "paper",
    rounds=3,
  )


def section_a(repeats):
  import tapjax
  from experiments import run

  rows, out = [], []
  peak = matmul_peak(repeats)
  for compat in FLAGS.compats:
    cfg = ref_config(compat)
    w = run.build(cfg)
    alg = tapjax.tap(w["setup"])
    state0 = alg.init(w["params"], w["fed"].num_clients)
    round_fn = w["jit"](alg.round)
    args = (w["frozen"], w["train"], w["hp"], w["root"])
    t = time.perf_counter()
    compiled = round_fn.lower(state0, *args).compile()
    compile_s = time.perf_counter() - t
    # Rounds differ by cohort (a VQA client runs a second stream): time several rounds.
    # Compiled ahead of time, so no warm-up round (on 2026-12-07 the first round after
    # compiling took 30.7 s, the next two 31.6 and 43.0 s: the cohort matters, not the order).
    state, times = state0, []
    for _ in range(repeats):
      t = time.perf_counter()
      state, info = compiled(state, *args)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t)
    round_s = statistics.median(times)
    print(f"  [{compat}] compile {compile_s:.1f} s, rounds {[round(x, 2) for x in times]}", flush=True)
    # Stage 2 per client, timed on the first client (the cost is per client): post-training
    # (the teacher) then distillation, both through the one stage-2 program the experiment
    # uses (post-training = lambda 0 with the teacher's dropout keys).
    dist = w["jit"](tapjax.distill_personal(w["setup"]))
    n = 1
    g = tapjax.federation.stack(tapjax.final_global(w["setup"], state), n)
    sub = jax.tree_util.tree_map(lambda x: x[:n], w["train"])
    personal = jax.tree_util.tree_map(lambda x: x[:n], state.personal)
    no_kd = w["hp"]._replace(kd_weight=jnp.zeros_like(w["hp"].kd_weight))
    purpose = lambda x: jnp.asarray(int(x), jnp.int32)
    teacher_p, student_p = (
      purpose(tapjax.rng.Purpose.TEACHER_DROPOUT),
      purpose(tapjax.rng.Purpose.STUDENT_DROPOUT),
    )
    dist_c = dist.lower(personal, g, w["frozen"], sub, w["hp"], w["root"], student_p).compile()
    t = time.perf_counter()  # one timed pass, compiled beforehand: 13 x 4 micro-batches per client
    teachers = dist_c(g, g, w["frozen"], sub, no_kd, w["root"], teacher_p)
    jax.block_until_ready(dist_c(personal, teachers, w["frozen"], sub, w["hp"], w["root"], student_p))
    stage2_s = (time.perf_counter() - t) / n
    flops, step_s = microbatch(w, cfg.batch_size, repeats)
    gflops = flops / step_s / 1e9
    tokens = w["train"].examples["text"].shape[-1]
    rows.append(
      [
        compat,
        tokens,
        f"{compile_s:.1f}",
        f"{round_s:.2f}",
        f"{REFERENCE_ROUND_S / round_s:.1f}x",
        f"{stage2_s:.2f}",
        f"{REFERENCE_STAGE2_PER_CLIENT_S / stage2_s:.1f}x",
        f"{gflops:.0f}",
        f"{gflops / peak:.0%}",
      ]
    )
    out.append(
      dict(
        compat=compat,
        text_tokens=tokens,
        compile_s=compile_s,
        round_s=round_s,
        round_speedup=REFERENCE_ROUND_S / round_s,
        stage2_per_client_s=stage2_s,
        stage2_speedup=REFERENCE_STAGE2_PER_CLIENT_S / stage2_s,
        microbatch_gflop=flops / 1e9,
        microbatch_s=step_s,
        gflops=gflops,
        matmul_peak_gflops=peak,
      )
    )
  table(
    f"a. Reference-shaped TAP (PyTorch reference: {REFERENCE_ROUND_S} s/round, "
    f"{REFERENCE_STAGE2_PER_CLIENT_S} s stage 2/client; fp32 matmul peak now {peak:.0f} GFLOP/s)",
    [
      "compat",
      "text len",
      "compile s",
      "round s",
      "vs ref",
      "stage 2 s/client",
      "vs ref",
      "micro-batch GFLOP/s",
      "of peak",
    ],
    rows,
  )
  return out


# ----------------------------------------------------------------------------- b


def section_b(repeats):
  import dataclasses

  import tapjax
  from experiments import run
  from tapjax import federation

  out, rows = [], []
  sizes = (1, 2, 8, 32)
  # One federation and model for every row; only the Setup's cohort size and mapping change.
  cfg = config(
    backbone="tiny", num_groups=4, examples_per_task=32, image_size=16, local_steps=2, batch_size=8
  )
  w = run.build(cfg)
  base = w["setup"]
  args = (w["frozen"], w["train"], w["hp"], w["root"])
  # A Python loop over clients, each a jitted one-client TAP step (compiled once for all
  # sizes), and its aggregation: what a straightforward port would do.
  loss_fn = tapjax.supervised_loss(base.objective, w["frozen"])
  one = w["jit"](
    lambda start, personal, sl, cid, ex, n, tasks, held, lr, margin, root, r: federation.tap_client(
      base, loss_fn, start, personal, sl, cid, ex, n, tasks, held, lr, margin, root, r
    )
  )
  held_all = federation.client_holders(base, w["train"])
  # Its aggregation is a running weighted sum, one jitted step per client (compiled once for
  # every cohort size, as the one-client step is), then the division and the server step.
  components = tapjax.components

  def accumulate(acc, upload, held, n):
    sums, total = acc
    w_c = held.astype(jnp.float32) * n.astype(jnp.float32)  # [components]
    add = lambda ids, s, x: s + components.broadcast_to_leaf(components.per_leaf(w_c, ids), x) * x
    return jax.tree_util.tree_map(add, base.leaf_ids, sums, upload), total + w_c

  def finish(st, acc):
    sums, total = acc
    sent = total > 0
    scale = 1.0 / jnp.where(sent, total, 1.0)
    mean = lambda ids, s, fb: jnp.where(
      components.broadcast_to_leaf(components.per_leaf(sent, ids), fb),
      s * components.broadcast_to_leaf(components.per_leaf(scale, ids), s),
      fb,
    )
    agg = tapjax.Aggregate(jax.tree_util.tree_map(mean, base.leaf_ids, sums, st.server.params), sent)
    return tapjax.server_update(st.server, agg, base.leaf_ids, base.server_optimizer)

  start_sums = w["jit"](
    lambda p: (jax.tree_util.tree_map(jnp.zeros_like, p), jnp.zeros((base.num_components,), jnp.float32))
  )
  accumulate, finish = w["jit"](accumulate, donate_argnums=0), w["jit"](finish)
  strategies = [x for x in ("vmap", "map") if x in FLAGS.strategies]
  for k in sizes:
    fns = {}
    for strategy in strategies:
      setup = dataclasses.replace(base, cohort_size=k, client_map=tapjax.ClientMap(strategy))
      alg = tapjax.tap(setup)
      fns[strategy] = functools.partial(
        w["jit"](alg.round), alg.init(w["params"], w["fed"].num_clients), *args
      )
    state = tapjax.tap(base).init(w["params"], w["fed"].num_clients)

    def loop_round():
      ids = [int(i) for i in federation.sample_cohort(w["root"], state.round, w["fed"].num_clients, k)]
      lr = tapjax.warmup_lr(state.round, w["hp"].lr_min, w["hp"].lr_peak, w["hp"].warmup_rounds)
      acc = start_sums(state.server.params)
      for cid in ids:
        r = one(
          state.server.params,
          jax.tree_util.tree_map(lambda x: x[cid], state.personal),
          state.student_loss[cid],
          cid,
          {f: v[cid] for f, v in w["train"].examples.items()},
          w["train"].num_examples[cid],
          w["train"].client_tasks[cid],
          held_all[cid],
          lr,
          w["hp"].margin,
          w["root"],
          state.round,
        )
        acc = accumulate(acc, r.upload, held_all[cid], w["train"].num_examples[cid])
      return finish(state, acc)

    fns["loop"] = loop_round
    # Alternate the contenders, so that drifts in machine speed hit them alike; cohorts of
    # 1 and 2 (a tenth of a second a round) get at least 7 repeats: with 2, their ratio
    # read 0.94-1.32x across runs of the same code.
    row = {"cohort": k, **alternating(fns, max(repeats, 7) if k <= 2 else repeats)}
    out.append(row)
    rows.append(
      [k, f"{row['loop'] * 1e3:.0f}"]
      + [f"{row[x] * 1e3:.0f}" for x in strategies]
      + [f"{row['loop'] / row[x]:.2f}x" for x in strategies]
    )
  table(
    "b. Cohort scaling, one TAP round (tiny backbone, 2 steps x batch 8; ms)",
    ["cohort", "Python loop", *strategies, *(f"{x} vs loop" for x in strategies)],
    rows,
  )
  return out


# ----------------------------------------------------------------------------- c


def section_c(repeats):
  import tapjax
  from experiments import run

  w = run.build(config())
  setup = w["setup"]
  k = 8
  stacked = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (k,) + x.shape) + 0.0, w["params"])
  held = tapjax.federation.client_holders(setup, w["train"])[:k]
  weights = w["train"].num_examples[:k].astype(jnp.float32)
  agg = jax.jit(lambda s: tapjax.masked_mean(s, held, weights, setup.leaf_ids, w["params"]).mean)
  flat = jnp.concatenate([x.reshape(k, -1) for x in jax.tree_util.tree_leaves(stacked)], axis=1)
  plain = jax.jit(lambda x: jnp.sum(x, axis=0))
  ones = jnp.ones((k,), jnp.float32)
  dot = jax.jit(lambda x: jnp.tensordot(ones, x, axes=(0, 0), precision=jax.lax.Precision.HIGHEST))
  nbytes = flat.size * 4
  # Milliseconds each: a median of at least 5 (of 2, one run read 29 ms where the same
  # program takes 12 ms alone).
  n = max(repeats, 5)
  times = {
    "masked weighted mean (tapjax)": timed(lambda: agg(stacked), n),
    "plain sum over clients (jnp.sum axis 0)": timed(lambda: plain(flat), n),
    "plain dot with a ones vector": timed(lambda: dot(flat), n),
  }
  t_agg = times["masked weighted mean (tapjax)"]
  rows = [
    [op, f"{nbytes / 1e6:.0f}", f"{t * 1e3:.1f}", f"{nbytes / t / 1e9:.2f}", f"{t / t_agg:.0%}"]
    for op, t in times.items()
  ]
  table(
    f"c. Aggregation over {k} MiniLM-sized clients ({len(jax.tree_util.tree_leaves(stacked))} leaves), "
    "the same bytes read by each op",
    ["op", "MB read", "ms", "GB/s", "masked mean's bandwidth / this op's"],
    rows,
  )
  return [dict(op=op, bytes=nbytes, s=t) for op, t in times.items()]


# ----------------------------------------------------------------------------- d


def section_d(repeats):
  del repeats
  from experiments import run

  compiles = []

  def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  cfg = config(
    backbone="tiny",
    examples_per_task=16,
    test_examples_per_task=8,
    image_size=16,
    rounds=20,
    cohort_size=2,
    local_steps=1,
    batch_size=4,
    post_steps=1,
    eval_batch=8,
  )
  t = time.perf_counter()
  run.run_experiment(cfg)
  wall = time.perf_counter() - t
  big = sorted((c for c in compiles if c > 0.5), reverse=True)
  rows = [
    [len(compiles), len(big), f"{sum(compiles):.1f}", ", ".join(f"{c:.1f}" for c in big), f"{wall:.0f}"]
  ]
  table(
    "d. Compilations of a whole 20-round experiment (tiny backbone)",
    ["compiles", "programs > 0.5 s", "compile s total", "seconds of each > 0.5 s", "wall s"],
    rows,
  )
  return [dict(compiles=len(compiles), big_programs=big, compile_s=sum(compiles), wall_s=wall)]


# ----------------------------------------------------------------------------- e


def section_e(repeats):
  del repeats
  from tapjax.data.tasks import DOMAINS, TASKS
  from tapjax.model import sizes, tap

  rows, out = [], []
  for size in ("minilm", "flava", "vilt"):
    cfg = sizes.model_config(size, TASKS, DOMAINS)
    frozen, trainable = sizes.param_counts(cfg)
    frozen_b = 4 * sum(frozen.values())
    # a TAP client: its personal trainable params (f32) + per-task losses and counters
    shapes = jax.eval_shape(lambda: tap.init_trainable(jax.random.key(0), cfg))
    per_client = 4 * sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    per_client += 4 * (2 * len(TASKS) + len(trainable))
    server = 3 * per_client  # server params + initial + one aggregation buffer
    fit = {gb: int((gb * 2**30 - frozen_b - server) // per_client) for gb in (16, 80)}
    rows.append(
      [
        size,
        f"{frozen_b / 2**20:.0f}",
        f"{per_client / 2**20:.1f}",
        f"{per_client / frozen_b:.2f}",
        f"{fit[16]:,}",
        f"{fit[80]:,}",
      ]
    )
    out.append(
      dict(size=size, frozen_bytes=frozen_b, per_client_bytes=per_client, fit_16gb=fit[16], fit_80gb=fit[80])
    )
  table(
    "e. Memory per client (TAP personal state, f32) vs the frozen backbone",
    ["model", "frozen MiB", "per client MiB", "client/frozen", "clients in 16 GB", "in 80 GB"],
    rows,
  )
  return out


# ----------------------------------------------------------------------------- f


def section_f(repeats):
  import tempfile

  from absl import logging

  import tapjax
  from experiments import checkpoint, run

  logging.set_verbosity(logging.ERROR)  # Orbax's per-save log lines
  cfg = config()
  w = run.build(cfg)
  args = (w["frozen"], w["train"], w["hp"], w["root"])
  n = w["fed"].num_clients
  k = 3  # rounds per sequence
  rows, out = [], []
  with tempfile.TemporaryDirectory(prefix="tapjax-ckpt-bench-") as tmp:
    for stage in ("local", "tap"):  # the experiment's order; a checkpoint holds that stage's state
      alg = tapjax.local_only(w["setup"]) if stage == "local" else tapjax.tap(w["setup"])
      round_fn = w["jit"](alg.round, donate_argnums=0)
      start, _ = jax.block_until_ready(round_fn(alg.init(w["params"], n), *args))  # compile
      store = checkpoint.Store(pathlib.Path(tmp) / stage, keep=2)

      def rounds(save: bool):
        """The same k rounds (same cohorts, same work) from ``start``, with or without saves."""
        state = jax.tree_util.tree_map(jnp.copy, start)
        blocked, t = 0.0, time.perf_counter()
        for _ in range(k):
          state, info = round_fn(state, *args)
          jax.block_until_ready(info)
          if save:
            b = time.perf_counter()
            store.save(store.latest_saved + 1, {stage: state}, {"round": int(state.round)})
            blocked += time.perf_counter() - b
        store.wait()
        return time.perf_counter() - t, blocked, state

      plain, saved, blocked = [], [], []
      for _ in range(repeats):  # alternate, so that drifts in machine speed hit both alike
        plain.append(rounds(save=False)[0])
        t, b, state = rounds(save=True)
        saved.append(t)
        blocked.append(b)
      t = time.perf_counter()  # one synchronous save: the whole write, nothing overlapping
      store.save(store.latest_saved + 1, {stage: state}, {})
      store.wait()
      write_s = time.perf_counter() - t
      store.close()
      nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
      round_s = statistics.median(plain) / k
      per_save = (statistics.median(saved) - statistics.median(plain)) / k
      share = per_save / round_s
      rows.append(
        [
          stage,
          f"{nbytes / 2**20:.0f}",
          f"{round_s:.2f}",
          f"{statistics.median(blocked) / k:.3f}",
          f"{write_s:.2f}",
          f"{per_save:.2f}",
          f"{share:.1%}",
          f"{share / cfg.checkpoint_every:.1%}",
        ]
      )
      out.append(
        dict(
          stage=stage,
          checkpoint_bytes=nbytes,
          rounds=k,
          round_s=round_s,
          plain_s=plain,
          saved_s=saved,
          save_blocking_s=statistics.median(blocked) / k,
          sync_write_s=write_s,
          added_per_save_s=per_save,
          share_per_save=share,
          share_per_round_at_default_interval=share / cfg.checkpoint_every,
        )
      )
  table(
    f"f. Checkpoint cost, default config ({k} rounds with an async save after each vs the same "
    f"{k} rounds without; median of {repeats})",
    [
      "stage",
      "checkpoint MiB",
      "round s",
      "save blocks s",
      "sync write s",
      "added per save s",
      "per save / round",
      f"per round (every {cfg.checkpoint_every})",
    ],
    rows,
  )
  return out


# ----------------------------------------------------------------------------- g


def section_g(repeats):
  """The default config's training micro-batch (MiniLM width 384, batch 16) on a client
  whose examples run both token streams (so the jaxpr's counted FLOPs are all executed):
  achieved matmul GFLOP/s against a plain fp32 matmul's, next to section a's width 64."""
  from experiments import run

  peak = matmul_peak(repeats)
  cfg = config()
  w = run.build(cfg)
  flops, step_s = microbatch(w, cfg.batch_size, repeats)
  gflops = flops / step_s / 1e9
  table(
    f"g. Default config's training micro-batch (MiniLM, batch {cfg.batch_size}, both streams; "
    f"fp32 matmul peak now {peak:.0f} GFLOP/s)",
    ["micro-batch GFLOP", "ms", "GFLOP/s", "of peak"],
    [[f"{flops / 1e9:.1f}", f"{step_s * 1e3:.0f}", f"{gflops:.0f}", f"{gflops / peak:.0%}"]],
  )
  return [dict(microbatch_gflop=flops / 1e9, microbatch_s=step_s, gflops=gflops, matmul_peak_gflops=peak)]


def main(argv):
  del argv
  unknown = [x for x in FLAGS.strategies if x not in ("vmap", "map")]
  if unknown:
    raise app.UsageError(
      f"--strategies={','.join(FLAGS.strategies)}: unknown {unknown}; choose from vmap, map"
    )
  fns = {
    "a": section_a,
    "b": section_b,
    "c": section_c,
    "d": section_d,
    "e": section_e,
    "f": section_f,
    "g": section_g,
  }
  results = {"date": time.strftime("%Y-%m-%d"), "devices": str(jax.devices()), "repeats": FLAGS.repeats}
  for s in FLAGS.sections:
    t = time.perf_counter()
    results[s] = fns[s](FLAGS.repeats)
    print(f"(section {s}: {time.perf_counter() - t:.0f} s)")
  path = pathlib.Path(FLAGS.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=1, default=float))
  print(f"\nwrote {path}")


if __name__ == "__main__":
  app.run(main)
