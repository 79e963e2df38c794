"""Pre-emption and resume of ``experiments.tap``: SIGTERM in stage 1, then SIGKILL in
stage 1 and in stage 2, each followed by a rerun of the same command; the final
results equal the uninterrupted run's exactly. The last two reruns switch to the
host-fed input pipeline (``--config.stream``, an execution-only key a resume may
change; stage 2 and evaluation in chunks of 4 clients): the same equality shows that
it trains on the dense federation's batches (rounds, stage 2 and evaluation). And the workdirs a rerun must refuse:
another config, a checkpoint that does not match the model, a damaged checkpoint."""

import json
import pathlib
import re
import signal
import threading
import time

import pytest

import tap_runs

LINE = re.compile(r"checkpoint step (\d+): (.*)")
HOST_FED = ("--config.stream=True", "--config.chunk_clients=4")


def finish(proc, lines, timeout=300):
  rest, _ = proc.communicate(timeout=timeout)
  lines.append(rest)
  return "".join(lines)


def resumed_at(output: str) -> str:
  m = re.search(r"resumed from \S+ step \d+: (.*)", output)
  assert m, output[-3000:]
  return m.group(1)


def interrupted_runs(wd: pathlib.Path) -> dict:
  """SIGTERM in stage 1, rerun and SIGKILL in stage 1, rerun and SIGKILL in stage 2,
  rerun to the end: what each step printed and returned (the test asserts on it)."""
  rec: dict = {}
  # 1. SIGTERM during TAP stage 1: the round in flight finishes, is saved, exit 143.
  proc, lines = tap_runs.start(wd), []
  tap_runs.read_until(proc, ": TAP stage 1 round 1 of", lines)  # after Local only
  sent = time.perf_counter()
  proc.send_signal(signal.SIGTERM)
  rec["term_out"] = finish(proc, lines, timeout=120)
  rec["term_waited"] = time.perf_counter() - sent
  rec["term_rc"] = proc.returncode
  rec["term_results"] = (wd / "results.json").exists()
  last = [m.group(2) for m in map(LINE.search, rec["term_out"].splitlines()) if m][-1]
  rec["stopped"] = stopped = int(re.match(r"TAP stage 1 round (\d+)", last).group(1))

  # 2. The rerun resumes there; SIGKILL it later in stage 1.
  proc, lines = tap_runs.start(wd), []
  rec["kill1_resumed"] = tap_runs.read_until(proc, "resumed from", lines)
  tap_runs.read_until(proc, f"TAP stage 1 round {stopped + 2} of", lines)
  proc.kill()
  proc.wait()

  # 3. The rerun (host-fed from here on) resumes in stage 1 again; SIGKILL it in stage 2.
  # A save waits for the one before it, so once the second stage-2 save is queued the
  # first is complete.
  proc, lines = tap_runs.start(wd, *HOST_FED), []
  rec["kill2_resumed"] = resumed_at(tap_runs.read_until(proc, "resumed from", lines))
  tap_runs.read_until(proc, "stage 2 distillation done", lines)
  proc.kill()
  proc.wait()

  # 4. The last rerun resumes in stage 2 and finishes.
  proc, lines = tap_runs.start(wd, *HOST_FED), []
  rec["final_out"] = finish(proc, lines)
  rec["final_rc"] = proc.returncode
  return rec


_chain: dict = {}


def _chain_in_background():
  """Runs :func:`interrupted_runs` in a thread once the baseline has finished (it fills
  the shared XLA cache), so the four short runs overlap the in-process tests."""

  def work():
    try:
      tap_runs.baseline()
      _chain["rec"] = interrupted_runs(tap_runs.session_dir() / "interrupted")
    except BaseException as e:  # re-raised by the test
      _chain["error"] = e

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  _chain["thread"] = thread


tap_runs.start_baseline()  # compiles in the background while the in-process tests run
_chain_in_background()


def test_sigterm_then_kills_resume_to_the_uninterrupted_results():
  _chain["thread"].join(timeout=900)
  if "error" in _chain:
    raise _chain["error"]
  rec = _chain["rec"]
  base_wd, _ = tap_runs.baseline()
  wd = tap_runs.session_dir() / "interrupted"
  rounds = tap_runs.ROUNDS

  out = rec["term_out"]
  assert rec["term_rc"] == 143, out[-3000:]
  assert "stopped by SIGTERM after saving checkpoint" in out and "Traceback" not in out
  assert rec["stopped"] in (2, 3), out[-3000:]  # the round running when the signal came (rarely the next)
  assert rec["term_waited"] < 60, rec["term_waited"]
  assert not rec["term_results"]

  assert f"TAP stage 1 round {rec['stopped']} of {rounds} done" in rec["kill1_resumed"]
  where = rec["kill2_resumed"]
  assert where.startswith("TAP stage 1 round"), where
  assert int(where.split()[4]) >= rec["stopped"] + 1

  assert rec["final_rc"] == 0, rec["final_out"][-3000:]
  assert resumed_at(rec["final_out"]).startswith("stage 2"), resumed_at(rec["final_out"])

  assert tap_runs.results(wd) == tap_runs.results(base_wd)
  assert (wd / "metrics.jsonl").read_text() == (base_wd / "metrics.jsonl").read_text()
  config = json.loads((wd / "config.json").read_text())
  assert (config["stream"], config["chunk_clients"]) == (True, 4)  # the last run's
  assert {**config, "stream": False, "chunk_clients": 0} == json.loads((base_wd / "config.json").read_text())
  leftovers = [p.name for p in (wd / "checkpoints").iterdir() if "tmp" in p.name]
  assert not leftovers, leftovers


def test_changed_config_on_an_existing_run_names_the_keys(tmp_path):
  wd = tap_runs.copy_of_baseline(tmp_path / "wd")
  before = tap_runs.snapshot(wd)
  out, seconds = tap_runs.timed_run(wd, "--config.rounds=7", "--config.lr_peak=0.002")
  tap_runs.assert_refused(
    out, seconds, ["different config", "rounds (6 -> 7)", "lr_peak (0.001 -> 0.002)"], before, wd
  )
  assert "--config_changed_ok" in out.stderr and "--overwrite" in out.stderr


# The checkpoint cases import jax and build the (tiny) model to know what the
# checkpoint must hold, and fail before any training.
CHECKPOINT_S = 30


def unfinished_copy(tmp_path) -> pathlib.Path:
  """The baseline's workdir without its results: a rerun restores the newest checkpoint."""
  wd = tap_runs.copy_of_baseline(tmp_path / "wd")
  (wd / "results.json").unlink()
  return wd


def newest_step(wd: pathlib.Path) -> pathlib.Path:
  return max((p for p in (wd / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def test_checkpoint_that_does_not_match_the_model(tmp_path):
  wd = unfinished_copy(tmp_path)
  before = tap_runs.snapshot(wd)
  out, seconds = tap_runs.timed_run(wd, "--config.lora_rank=4", "--config_changed_ok")
  step = newest_step(wd)
  words = [f"checkpoint {step} does not match the model", "in the checkpoint, the model needs", "--overwrite"]
  tap_runs.assert_refused(out, seconds, words, before, wd, limit=CHECKPOINT_S)
  first = out.stderr.split("does not match the model: ")[1].split(" has shape")[0]
  assert first.startswith("tap/"), first  # names the array


@pytest.mark.parametrize("damage", ["truncate_array", "truncate_metadata"])
def test_corrupt_checkpoint(tmp_path, damage):
  wd = unfinished_copy(tmp_path)
  step = newest_step(wd)
  if damage == "truncate_array":
    victim = max((step / "state" / "d").iterdir(), key=lambda p: p.stat().st_size)
  else:
    victim = step / "meta" / "metadata"
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  before = tap_runs.snapshot(wd)
  out, seconds = tap_runs.timed_run(wd)
  words = [f"checkpoint {step} cannot be read, it is corrupt or truncated", "Delete that folder"]
  tap_runs.assert_refused(out, seconds, words, before, wd, limit=CHECKPOINT_S)
