"""Smoke: the experiment module end to end on the tiny config in a tmp workdir
(the uninterrupted run of ``tap_runs.baseline``, shared with the resume tests)."""

import json
import math
import subprocess
import sys

import pytest

import tap_runs

tap_runs.start_baseline()  # compiles in the background while the in-process tests run
METHODS = {"local", "fedavg", "fedavg_post", "tap_no_kd", "tap"}


@pytest.fixture(scope="module")
def workdir():
  wd, stdout = tap_runs.baseline()
  return wd, stdout


def test_writes_metrics_results_and_plots(workdir):
  wd, stdout = workdir
  lines = (wd / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == tap_runs.ROUNDS
  rec = json.loads(lines[-1])
  assert rec["round"] == tap_runs.ROUNDS and len(rec["clients"]) == 2
  assert all(json.loads(line)["rejected"] == [] for line in lines)
  assert set(rec["cumulative_replaced"]) == {
    "image_classification",
    "text_classification",
    "image_generation",
    "text_generation",
  }
  # the first visit always replaces: round 1 fired for every task of both clients
  assert sum(json.loads(lines[0])["replaced"].values()) >= 2
  # replaced_pairs names exactly the replacements the per-kind counts add up
  for line in map(json.loads, lines):
    assert len(line["replaced_pairs"]) == sum(line["replaced"].values())
    named = {c for c, _ in line["replaced_pairs"]}
    assert named <= {f"g0p{c}" for c in line["clients"]}, (named, line["clients"])
  results = json.loads((wd / "results.json").read_text())
  assert set(results["methods"]) == METHODS
  kinds = {t["name"]: t["kind"] for t in results["tasks"]}
  want = {
    "image_classification": {"accuracy"},
    "text_classification": {"accuracy"},
    "image_generation": {"mse"},
    "text_generation": {"token_accuracy", "token_ce", "perplexity", "meteor"},  # BERTScore: off
  }
  for method in results["methods"].values():
    assert len(method["clients"]) == 10
    for client, tasks in method["clients"].items():
      for task, vals in tasks.items():
        assert set(vals) == want[kinds[task]]
        assert all(math.isfinite(v) for v in vals.values()), (client, task, vals)
    assert set(method["task_means"]) == set(kinds)
  for png in ("task_metrics.png", "replacements.png"):
    assert (wd / png).stat().st_size > 10_000
  assert "per-task mean over clients" in stdout and "TAP w/o KD" in stdout
  from tapjax.eval import matching_mode  # "exact+stem", or "+wordnet" where NLTK's data is

  assert results["text_metrics"] == {"meteor": matching_mode(), "bertscore": None}
  assert f"METEOR matching: {matching_mode()};" in stdout


def test_checkpoints_kept_and_stage_boundaries_announced(workdir):
  wd, stdout = workdir
  steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir())
  assert len(steps) == 2 and not any("tmp" in p.name for p in (wd / "checkpoints").iterdir())
  for where in ("Local only done", "TAP stage 1 done", "post-training done", "distillation done"):
    assert where in stdout


def test_a_finished_run_is_not_redone(workdir):
  wd, _ = workdir
  before = tap_runs.snapshot(wd)
  out = tap_runs.run(wd, timeout=60)
  assert out.returncode == 0, out.stderr
  assert "already holds this run's results" in out.stdout
  assert tap_runs.snapshot(wd) == before


def test_missing_workdir_is_a_usage_error():
  out = subprocess.run(
    [sys.executable, "-m", "experiments.tap"], cwd=tap_runs.ROOT, capture_output=True, text=True
  )
  assert out.returncode == 2 and "--workdir is required" in out.stderr


def test_compiler_options_follow_the_config_unless_xla_flags_set_the_level(monkeypatch):
  """``xla_cpu_opt_level`` reaches ``jax.jit`` as XLA's backend level on CPU; -1 adds
  nothing; a level already in ``XLA_FLAGS`` (the suite's 0) wins over the config."""
  from experiments import run

  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert run.compiler_options({"xla_cpu_opt_level": 1}) == {"xla_backend_optimization_level": 1}
  assert run.compiler_options({"xla_cpu_opt_level": -1}) == {}
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  assert run.compiler_options({"xla_cpu_opt_level": 1}) == {}
