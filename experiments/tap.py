"""A complete TAP experiment: stage 1, stage 2, the baselines, evaluation, report.

  python -m experiments.tap --workdir=runs/demo [--config=experiments/configs/default.py]
         [--config.rounds=20 ...] [--overwrite]

Runs from one seed: TAP stage 1 (FedAvg on the global model + replacement into
personal models) for ``rounds`` rounds, the Local-only baseline on the same client
draws, stage 2 (post-training of each client's global slice = "FedAvg + post-train"
and TAP's teacher; distillation into the personal models; the same with lambda = 0
= "TAP without KD"), then evaluates every client's final model per task on its test
split. Writes ``metrics.jsonl`` (one line per round), ``results.json``,
``config.json`` and PNG plots to ``--workdir``; prints one table.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  str(pathlib.Path(__file__).parent / "configs" / "default.py"),
  "Experiment config file (get_config); override fields with --config.<name>=<value>.",
)
flags.DEFINE_string("workdir", None, "Output folder (created; must not hold results unless --overwrite).")
flags.DEFINE_bool("overwrite", False, "Replace results already in --workdir.")

OUTPUTS = ("metrics.jsonl", "results.json")


def check_workdir(workdir: str | None, overwrite: bool) -> pathlib.Path:
  """The output folder, refusing (before any work) to clobber earlier results."""
  if not workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/demo")
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise app.UsageError(f"--workdir={workdir} exists and is not a folder; pick another path")
  found = [n for n in OUTPUTS if (path / n).exists()]
  if found and not overwrite:
    raise app.UsageError(
      f"--workdir={workdir} already holds {found}; pass --overwrite to replace them or choose a new --workdir"
    )
  path.mkdir(parents=True, exist_ok=True)
  return path


def write_atomic(path: pathlib.Path, text: str):
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def main(argv):
  del argv
  cfg = FLAGS.config
  workdir = check_workdir(FLAGS.workdir, FLAGS.overwrite)
  # Heavy imports after argument checks, so a bad command fails in a second.
  import jax

  if cfg.get("compilation_cache"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  from experiments import run

  t0 = time.time()
  results, rounds_log = run.run_experiment(cfg, log_path=workdir / "metrics.jsonl.tmp")
  os.replace(workdir / "metrics.jsonl.tmp", workdir / "metrics.jsonl")
  results["wall_seconds"] = time.time() - t0
  write_atomic(workdir / "config.json", cfg.to_json(indent=2))
  write_atomic(workdir / "results.json", json.dumps(results, indent=1, allow_nan=True))
  from experiments import report

  print(report.table(results))
  if cfg.plots:
    for p in report.plots(results, rounds_log, workdir):
      print("wrote", p)
  print(f"wrote {workdir / 'metrics.jsonl'} and {workdir / 'results.json'} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
