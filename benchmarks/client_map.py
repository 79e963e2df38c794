"""Benchmark: one TAP stage-1 round under each client-mapping strategy, side by side.

  python -m benchmarks.client_map [--config.backbone=minilm] [--strategies=vmap,map] [--repeats=3]

Prints a table (compile seconds, steady-state seconds per round, ratio to vmap) and
writes benchmarks/results/client_map.json. Same data, model and keys for every row.
"""

import json
import pathlib
import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
  "config",
  str(pathlib.Path(__file__).parents[1] / "experiments" / "configs" / "default.py"),
  "experiment config",
)
flags.DEFINE_list("strategies", ["vmap", "map"], "client_map strategies to compare")
flags.DEFINE_integer("repeats", 3, "timed rounds per strategy")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import tapjax
  from experiments import run

  rows = []
  for strategy in FLAGS.strategies:
    cfg = FLAGS.config
    cfg.client_map = strategy
    w = run.build(cfg)
    alg = tapjax.tap(w["setup"])
    state = alg.init(w["params"], w["fed"].num_clients)
    fn = jax.jit(alg.round, donate_argnums=0)
    args = (w["frozen"], w["train"], w["hp"], w["root"])
    t = time.perf_counter()
    compiled = fn.lower(state, *args).compile()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(FLAGS.repeats + 1):
      t = time.perf_counter()
      state, info = compiled(state, *args)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t)
    rows.append({"strategy": strategy, "compile_s": compile_s, "round_s": statistics.median(times[1:])})
  base = rows[0]["round_s"]
  print(
    f"\nTAP round, backbone={FLAGS.config.backbone}, cohort={FLAGS.config.cohort_size}, "
    f"steps={FLAGS.config.local_steps}x{FLAGS.config.batch_size}, devices={jax.device_count()}"
  )
  print(f"{'strategy':<10}{'compile s':>12}{'round s':>10}{'vs ' + rows[0]['strategy']:>10}")
  for r in rows:
    print(f"{r['strategy']:<10}{r['compile_s']:>12.1f}{r['round_s']:>10.2f}{r['round_s'] / base:>10.2f}")
  out = pathlib.Path(__file__).parent / "results"
  out.mkdir(exist_ok=True)
  (out / "client_map.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  app.run(main)
