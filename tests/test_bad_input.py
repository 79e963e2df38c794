"""Bad input to ``experiments.tap``: a one-line reason naming what is wrong and what to
do, exit code 2, no traceback, within seconds, and the workdir's files unchanged."""

import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

import tap_runs
from experiments import validate

# (id, extra flags, words the message must contain). Each runs in a workdir holding an
# earlier file, and fails before jax is imported.
CONFIG_CASES = [
  ("cohort", ["--config.cohort_size=11"], ["cohort_size=11", "larger than the federation (10 clients"]),
  ("rounds", ["--config.rounds=0"], ["--config.rounds=0", "integer >= 1"]),
  ("steps", ["--config.local_steps=-2"], ["--config.local_steps=-2", "integer >= 1"]),
  ("post_steps", ["--config.post_steps=0"], ["--config.post_steps=0", "integer >= 1"]),
  ("batch", ["--config.batch_size=0"], ["--config.batch_size=0", "integer >= 1"]),
  ("examples", ["--config.examples_per_task=0"], ["--config.examples_per_task=0", "integer >= 1"]),
  ("margin", ["--config.margin=-0.1"], ["--config.margin=-0.1", "negative"]),
  ("lr_nan", ["--config.lr_peak=nan"], ["--config.lr_peak=nan", "not a finite number", "learning rate"]),
  ("lr_inf", ["--config.post_lr=inf"], ["--config.post_lr=inf", "not a finite number"]),
  ("compat", ["--config.compat=papr"], ["--config.compat='papr'", "choose one of paper, reference"]),
  (
    "client_map",
    ["--config.client_map=pmap"],
    ["--config.client_map='pmap'", "choose one of vmap, map, shard"],
  ),
  ("backbone_name", ["--config.backbone=tinyy"], ["--config.backbone='tinyy'", "not a known size"]),
  ("backbone_path", ["--config.backbone=/no/such/bert"], ["/no/such/bert", "no such folder"]),
  ("checkpoint_every", ["--config.checkpoint_every=0"], ["--config.checkpoint_every=0"]),
  ("federation", ["--config.federation=paper"], ["--config.federation='paper'", "paper_flava, paper_vilt"]),
  ("opt_level", ["--config.xla_cpu_opt_level=4"], ["--config.xla_cpu_opt_level=4", "from -1 to 3"]),
  ("depth", ["--config.num_layers=2"], ["--config.num_layers=2 needs 4 pretrained layers", "has 2"]),
]


def earlier_run(folder: pathlib.Path) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "notes.txt").write_text("an earlier file that must survive\n")
  return folder


@pytest.mark.parametrize("extra,words", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(tmp_path, extra, words):
  wd = earlier_run(tmp_path / "wd")
  before = tap_runs.snapshot(wd)
  out, seconds = tap_runs.timed_run(wd, *extra)
  tap_runs.assert_refused(out, seconds, words, before, wd)


def test_several_problems_are_reported_together(tmp_path):
  wd = earlier_run(tmp_path / "wd")
  out, _ = tap_runs.timed_run(wd, "--config.rounds=0", "--config.margin=-1.0")
  assert out.returncode == 2 and "rounds=0" in out.stderr and "margin=-1.0" in out.stderr


def test_workdir_is_a_file(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a folder")
  out, seconds = tap_runs.timed_run(path)
  tap_runs.assert_refused(out, seconds, ["exists and is not a folder"], {"a_file": b"not a folder"}, tmp_path)


def test_workdir_under_a_file(tmp_path):
  (tmp_path / "a_file").write_text("x")
  out, seconds = tap_runs.timed_run(tmp_path / "a_file" / "run")
  tap_runs.assert_refused(out, seconds, ["is not a folder"], {"a_file": b"x"}, tmp_path)


def _read_only(folder: pathlib.Path):
  """Make ``folder`` unwritable, even for root (chattr +i); returns an undo, or None."""
  if os.geteuid() != 0:
    folder.chmod(0o555)
    return lambda: folder.chmod(0o755)
  if (
    shutil.which("chattr")
    and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
  ):
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
  return None


def test_unwritable_workdir(tmp_path):
  wd = earlier_run(tmp_path / "wd")
  before = tap_runs.snapshot(wd)
  undo = _read_only(wd)
  if undo is None:  # root without chattr: a folder nobody can create files in
    out, seconds = tap_runs.timed_run("/sys/tapjax-test-workdir")
    tap_runs.assert_refused(out, seconds, ["is not writable"], before, wd)
    return
  try:
    out, seconds = tap_runs.timed_run(wd)
  finally:
    undo()
  tap_runs.assert_refused(out, seconds, ["is not writable", "pick a folder you can write to"], before, wd)


def test_missing_parent_of_an_unwritable_folder():
  out, seconds = tap_runs.timed_run("/sys/tapjax-test-workdir/run")
  assert out.returncode == 2 and "is not writable" in out.stderr and seconds < tap_runs.FAST_S


def test_choices_match_the_library():
  """validate.py does not import jax, so it repeats the library's choices; they agree."""
  from tapjax import sharding
  from tapjax.model import sizes, tap

  assert validate.CHOICES["compat"] == tap.COMPATS
  assert validate.CHOICES["dropout_rng"] == tap.DROPOUT_RNGS
  assert validate.CHOICES["client_map"] == sharding.STRATEGIES
  assert set(validate.BACKBONE_SIZES) == set(sizes.SIZES)
  assert validate.BACKBONE_LAYERS == {k: b.num_layers for k, (b, _) in sizes.SIZES.items()}
  assert tap_runs.EXIT_USER_ERROR == validate.EXIT_USER_ERROR


def test_validation_does_not_import_jax():
  code = "import sys, experiments.validate; print('jax' in sys.modules)"
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=tap_runs.ROOT, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "False"


@pytest.mark.parametrize("config,first", [("paper_flava", "tiny_imagenet"), ("paper_vilt", "fashion_mnist")])
def test_paper_federation_without_prepared_data(tmp_path, config, first):
  """Names the first missing dataset and the command that prepares it, in seconds."""
  wd = earlier_run(tmp_path / "wd")
  before = tap_runs.snapshot(wd)
  t = time.perf_counter()
  out = subprocess.run(
    [sys.executable, "-m", "experiments.tap", f"--workdir={wd}", f"--config=experiments/configs/{config}.py"],
    cwd=tap_runs.ROOT,
    capture_output=True,
    text=True,
    env={**tap_runs.env(), "TFDS_DATA_DIR": str(tmp_path / "no_data")},
    timeout=60,
  )
  words = [f"Dataset '{first}'", "is not prepared", f"python -m tapjax.data.sources.prepare {first}"]
  tap_runs.assert_refused(out, time.perf_counter() - t, words, before, wd, limit=5)
  assert not (tmp_path / "no_data").exists()
