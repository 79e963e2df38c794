"""Smoke: the experiment module end to end on the tiny config in a tmp workdir."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
METHODS = {"local", "fedavg", "fedavg_post", "tap_no_kd", "tap"}


def run_tap(workdir, *extra):
  cmd = [
    sys.executable,
    "-m",
    "experiments.tap",
    f"--workdir={workdir}",
    "--config=experiments/configs/tiny.py",
    "--config.compilation_cache=",
    *extra,
  ]
  return subprocess.run(
    cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
  )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("tap_run")
  out = run_tap(wd)
  assert out.returncode == 0, out.stderr[-3000:]
  return wd, out.stdout


def test_writes_metrics_results_and_plots(workdir):
  wd, stdout = workdir
  lines = (wd / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 2  # tiny config: 2 rounds
  rec = json.loads(lines[-1])
  assert rec["round"] == 2 and len(rec["clients"]) == 2
  assert set(rec["cumulative_replaced"]) == {
    "image_classification",
    "text_classification",
    "image_generation",
    "text_generation",
  }
  # the first visit always replaces: round 1 fired for every task of both clients
  assert sum(json.loads(lines[0])["replaced"].values()) >= 2
  results = json.loads((wd / "results.json").read_text())
  assert set(results["methods"]) == METHODS
  kinds = {t["name"]: t["kind"] for t in results["tasks"]}
  want = {
    "image_classification": {"accuracy"},
    "text_classification": {"accuracy"},
    "image_generation": {"mse"},
    "text_generation": {"token_accuracy", "token_ce", "perplexity"},
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


def test_refuses_to_overwrite_and_loses_nothing(workdir):
  wd, _ = workdir
  before = (wd / "results.json").read_bytes()
  out = run_tap(wd)
  assert out.returncode != 0
  assert "--overwrite" in out.stderr
  assert (wd / "results.json").read_bytes() == before


def test_missing_workdir_is_a_usage_error():
  out = subprocess.run([sys.executable, "-m", "experiments.tap"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0 and "workdir" in out.stderr
