"""A complete TAP experiment: stage 1, stage 2, the baselines, evaluation, report.

  python -m experiments.tap --workdir=runs/demo [--config=experiments/configs/default.py]
         [--config.rounds=20 ...] [--overwrite] [--config_changed_ok]
  python -m experiments.tap --config=experiments/configs/paper_flava.py --dry_run

Runs from one seed: TAP stage 1 (FedAvg on the global model + replacement into
personal models) for ``rounds`` rounds, the Local-only baseline on the same client
draws, stage 2 (post-training of each client's global slice = "FedAvg + post-train"
and TAP's teacher; distillation into the personal models; the same with lambda = 0
= "TAP without KD"), and evaluates every client's final model per task on its test
split. Writes ``metrics.jsonl`` (one line per round), ``results.json``,
``config.json`` and PNG plots to ``--workdir``; prints one table.

Checkpoints (Orbax, ``<workdir>/checkpoints``) are written every
``checkpoint_every`` rounds and at every stage boundary. Rerunning the same command
on the same workdir resumes from the newest complete checkpoint (and says so); a
finished run is not redone; a different config is refused, naming the keys that
differ (``--config_changed_ok`` resumes anyway, ``--overwrite`` starts again).

Exit codes:
  0    finished (or already finished).
  2    bad input: config, workdir or checkpoint; a one-line reason on stderr, the
       workdir unchanged.
  143  stopped by SIGTERM: the run saved a checkpoint at the next round (or stage)
       boundary and exited; rerun the same command to resume.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import validate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  str(pathlib.Path(__file__).parent / "configs" / "default.py"),
  "Experiment config file (get_config); override fields with --config.<name>=<value>.",
)
flags.DEFINE_string("workdir", None, "Output folder (created; a run there is resumed, see --overwrite).")
flags.DEFINE_bool("overwrite", False, "Start again: delete the results and checkpoints in --workdir.")
flags.DEFINE_bool(
  "dry_run",
  False,
  "Print the federation (clients x tasks x modalities x domains x example counts) and each "
  "client's trainable parameter count, then exit; needs no data, weights or --workdir; writes nothing.",
)
flags.DEFINE_bool(
  "config_changed_ok", False, "Resume a run in --workdir although its config differs from this one."
)

EXIT_STOPPED = 143  # 128 + SIGTERM: saved, not finished


def write_atomic(path: pathlib.Path, text: str):
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def stop_on_sigterm():
  """Install a SIGTERM handler that only records the request; returns ``stop() -> bool``."""
  requested = []

  def handler(signum, frame):
    if not requested:
      os.write(sys.stdout.fileno(), b"SIGTERM: saving at the next round boundary, then exiting\n")
    requested.append(signum)

  signal.signal(signal.SIGTERM, handler)
  return lambda: bool(requested)


def clear_outputs(workdir: pathlib.Path):
  """``--overwrite``: remove what an earlier run wrote (and nothing else)."""
  for name in validate.OUTPUTS:
    (workdir / name).unlink(missing_ok=True)
  shutil.rmtree(workdir / validate.CHECKPOINTS, ignore_errors=True)


def experiment(cfg, workdir: pathlib.Path):
  validate.check_config(cfg)
  if FLAGS.dry_run:
    from experiments import dry_run

    print(dry_run.describe(cfg))
    return 0
  workdir = validate.check_workdir(str(workdir) if workdir else None)
  cfg_json = cfg.to_json(indent=2)
  action = validate.workdir_action(workdir, cfg_json, FLAGS.overwrite, FLAGS.config_changed_ok)
  if action == "finished":
    print(f"{workdir} already holds this run's results ({workdir / 'results.json'}); nothing to do.")
    print("Pass --overwrite to run it again, or choose a new --workdir.")
    return 0
  stop = stop_on_sigterm()
  # Heavy imports after the checks, so a bad command fails in a fraction of a second.
  import jax
  from absl import logging

  logging.set_verbosity(logging.ERROR)  # Orbax's informational warnings
  if cfg.get("compilation_cache"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache))
    min_secs = float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1.0))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
  from experiments import checkpoint, report, run

  run.require_data(cfg)  # a paper federation's datasets, before the model or the data load
  store = checkpoint.Store(workdir / validate.CHECKPOINTS, keep=cfg.keep_checkpoints)
  exp = run.Experiment(cfg, store, resume=action == "resume")  # reads checkpoints; writes nothing
  # Every check passed: from here on the workdir changes.
  if FLAGS.overwrite:
    clear_outputs(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if exp.resumed_from is not None:
    print(f"resumed from {store.directory} step {exp.resumed_from}: {exp.where()}")
  elif action == "resume":
    print(f"no complete checkpoint in {store.directory}; starting from the beginning")
  if (workdir / "config.json").exists() and FLAGS.config_changed_ok:
    diff = validate.config_diff(json.loads((workdir / "config.json").read_text()), json.loads(cfg_json))
    if diff:
      print(f"resuming with a changed config (--config_changed_ok): {'; '.join(diff)}")
  write_atomic(workdir / "config.json", cfg_json)
  try:
    results, history = exp.run(log_path=workdir / "metrics.jsonl.tmp", stop=stop)
  except run.Stopped as e:
    store.close()
    print(f"stopped by SIGTERM after saving checkpoint step {exp.progress.step} ({e});", flush=True)
    print("rerun the same command to resume", flush=True)
    return EXIT_STOPPED
  store.close()
  os.replace(workdir / "metrics.jsonl.tmp", workdir / "metrics.jsonl")
  write_atomic(workdir / "results.json", json.dumps(results, indent=1, allow_nan=True))
  print(report.table(results))
  tm = results["text_metrics"]
  print(f"METEOR matching: {tm['meteor']}; BERTScore: {tm['bertscore'] or 'off (--config.bertscore)'}")
  if cfg.plots:
    for p in report.plots(results, history, workdir):
      print("wrote", p)
  print(f"wrote {workdir / 'metrics.jsonl'} and {workdir / 'results.json'} ({results['wall_seconds']:.0f} s)")
  return 0


def main(argv):
  del argv
  try:
    code = experiment(FLAGS.config, FLAGS.workdir)
  except validate.UserError as e:
    sys.stdout.flush()
    sys.stderr.write(f"error: {e}\n")
    sys.stderr.flush()
    os._exit(validate.EXIT_USER_ERROR)  # no interpreter teardown: nothing was written
  sys.stdout.flush()
  sys.exit(code)


if __name__ == "__main__":
  app.run(main)
